//! The consumer library: effectively-once processing with an inbox table.
//!
//! A [`Consumer`] takes deliveries from one RabbitMQ queue. For each, in one Postgres
//! transaction, it records the message id in `postbox.inbox` under the consumer's name,
//! checks the message's place in its stream (its partition key's messages to one exchange and
//! routing key, numbered by the relay in `x-postbox-seq`), runs the [`Handler`] only if the id
//! is new and its turn has come, commits, and only then acks.
//!
//! - A duplicate (a redelivery after a crash between commit and ack, a relay retry, a replay)
//!   finds its id decided, is acked without running the handler, and is counted.
//! - A message that arrives before its predecessor is held in `postbox.inbox_waiting` (and
//!   acked), then applied right after it: a stream's messages take effect in number order, each
//!   once, none skipped, across any number of consumer instances. An old number under another
//!   id (a replay) is skipped as `stale`. [`Versioning`] offers state semantics instead (skip
//!   what is older than the version applied).
//! - A failing handler rolls back and is retried with backoff; after `max_attempts` failed runs
//!   (counted in `postbox.inbox`, so a restart does not reset them) the message goes to the
//!   dead-letter queue with the error, consumer and attempts in its headers.
//! - Malformed messages (no message id, payload that does not deserialize) follow the
//!   [`MalformedPolicy`], dead-lettering by default.
//!
//! ```no_run
//! # use postbox::inbox::{Consumer, Handler, HandlerError, Incoming};
//! # struct Projector;
//! # impl Handler for Projector {
//! #     async fn handle(&self, _: &mut sqlx::Transaction<'_, sqlx::Postgres>, _: &Incoming)
//! #         -> Result<(), HandlerError> { Ok(()) }
//! # }
//! # async fn example(pool: sqlx::PgPool) -> Result<(), postbox::inbox::ConsumerError> {
//! let broker = postbox::inbox::Broker::new(["amqp://guest:guest@127.0.0.1:5672/%2f"]);
//! let consumer = Consumer::builder(pool, broker)
//!     .queue("orders")
//!     .name("billing")
//!     .handler(Projector)?
//!     .spawn();
//! // ... on shutdown:
//! consumer.stop().await.ok();
//! # Ok(()) }
//! ```

mod consumer;
mod dead_letter;
mod error;
mod handler;
mod incoming;
mod options;
mod receive;
mod retention;
mod upsert;
mod worker;

pub use crate::amqp::Broker;
pub use crate::store::inbox::{Outcome, Receipt};
pub use consumer::{Consumer, ConsumerBuilder, ConsumerHandle, ConsumerStats};
pub use error::ConsumerError;
pub use handler::{FailureKind, Handler, HandlerError};
pub use incoming::Incoming;
pub use options::{ConsumerOptions, DeadLetter, MalformedPolicy, Versioning};
pub use receive::{
    apply_order, hold, receive, receive_batch, receive_many, record_failure, retry_dead_lettered,
    Status,
};
pub use retention::cleanup;
pub use upsert::VersionedUpsert;
