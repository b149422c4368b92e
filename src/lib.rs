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
//! Modules:
//! - [`outbox`]: the producer API: [`Message`], [`enqueue`], [`enqueue_many`], deterministic ids.
//! - [`relay`]: [`Relay`], the claim → publish → confirm → mark pipeline, to embed in a service
//!   of your own or to run as `postbox run`.
//! - [`inbox`]: the consumer library: [`inbox::Consumer`] runs a [`inbox::Handler`] once per
//!   message, in stream order, over an inbox table.
//! - [`running`]: the handle of a relay or a consumer running on its own task.
//! - [`migrate`] and [`migrate_parts`]: the schema, outbox and inbox parts.
//! - [`contract`]: the names producers, the relay and consumers share: headers, the NOTIFY
//!   channel, the wake-up keys, the id namespace.
//! - [`config`]: the relay's settings and their checks.
//! - [`trace`]: W3C `traceparent`, carried from the enqueue to the consumer's handler.
//!
//! Errors: each area has its own enum, [`EnqueueError`], [`RelayError`],
//! [`inbox::ConsumerError`] and [`MigrateError`], built from the failures they share
//! ([`DatabaseError`], [`BrokerError`], [`InvalidSetting`]); each says with `is_transient()`
//! whether the same call may succeed later.
//!
//! With the default feature `cli` (the `postbox` command): `metrics` (the HTTP listener for
//! Prometheus metrics, liveness and readiness), `telemetry` (log output) and loading settings
//! from files and the environment. Without it, the library leaves out clap, axum, the
//! Prometheus exporter, the configuration loader and tracing-subscriber.

#![warn(missing_docs)]

/// Builder-style setters for an options struct's public fields: `options.field(value)` returns
/// the options with `field` set, so non-exhaustive options build from `Default` in one
/// expression.
macro_rules! setters {
    ($($field:ident: $type:ty),* $(,)?) => {
        $(
            #[doc = concat!("Sets [`", stringify!($field), "`](Self::", stringify!($field), ").")]
            pub fn $field(mut self, $field: $type) -> Self {
                self.$field = $field;
                self
            }
        )*
    };
}

mod amqp;
#[cfg(feature = "cli")]
mod bench;
#[cfg(feature = "cli")]
#[doc(hidden)]
pub mod cli;
pub mod config;
pub mod contract;
mod error;
pub mod inbox;
#[cfg(feature = "cli")]
pub mod metrics;
mod migrations;
pub mod outbox;
mod reconnect;
mod redact;
pub mod relay;
mod retention;
mod retry;
pub mod running;
mod store;
#[cfg(feature = "cli")]
pub mod telemetry;
#[doc(hidden)]
pub mod testing;
pub mod trace;
mod vacuum;

pub use config::Settings;
pub use error::{BrokerError, DatabaseError, InvalidSetting};
pub use migrations::{migrate, migrate_parts, MigrateError, Part};
pub use outbox::{
    deterministic_id, enqueue, enqueue_many, EnqueueError, Enqueued, InvalidMessage, Message,
    Payload,
};
pub use relay::{Relay, RelayError, RelayOptions};
pub use vacuum::Vacuum;
