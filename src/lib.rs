//! # postbox
//!
//! A transactional outbox relay for Postgres and RabbitMQ.
//!
//! Applications write their business rows and the events about them in one Postgres
//! transaction, into `postbox.outbox` ([`enqueue`] / [`enqueue_many`] from Rust, or a plain
//! `INSERT` from any language). The relay ([`Relay`], `postbox run`) claims committed rows,
//! publishes them to RabbitMQ with their stable message ids and publisher confirms, and marks
//! them published.
//!
//! Module map:
//! - [`outbox`]: the producer API: [`Message`], [`enqueue`], deterministic ids.
//! - [`inbox`]: the consumer library: effectively-once handlers over an inbox table.
//! - [`relay`]: the claim → publish → confirm → mark pipeline.
//! - [`retry`]: the backoff schedule shared by relay and consumer.
//! - [`store`]: every SQL statement, one file per table, and [`migrate`].
//! - [`amqp`]: RabbitMQ connections with failover, message properties and headers.
//! - [`metrics`]: the HTTP listener for Prometheus metrics, liveness and readiness.
//! - [`config`]: settings from defaults, a TOML file and the environment.
//! - [`trace`]: W3C `traceparent`, carried from the enqueue to the consumer's handler.
//! - [`cli`]: the `postbox` command's subcommands.
//! - [`contract`]: the names producers, the relay and consumers share: headers, the NOTIFY
//!   channel, the wake-up keys, the id namespace.
//! - [`bench`](mod@bench): `postbox bench`, the relay measured against the broker's ceiling.

pub mod amqp;
pub mod bench;
pub mod cli;
pub mod config;
pub mod contract;
mod error;
pub mod inbox;
pub mod metrics;
pub mod outbox;
pub mod reconnect;
pub mod relay;
pub mod retry;
pub mod store;
pub mod telemetry;
pub mod trace;

pub use config::Settings;
pub use error::{Error, Result};
pub use outbox::{deterministic_id, enqueue, enqueue_many, Enqueued, Message, Payload};
pub use relay::Relay;
pub use store::{migrate, migrate_parts, Part};
