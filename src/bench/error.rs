//! Why `postbox bench` could not measure as designed.

use std::time::Duration;

use crate::error::{BrokerError, DatabaseError, InvalidSetting};

/// A benchmark run failed; no figures are reported for it.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BenchError {
    /// An option has a value the benchmark cannot use.
    #[error(transparent)]
    Setting(#[from] InvalidSetting),
    /// A Postgres operation failed.
    #[error(transparent)]
    Database(#[from] DatabaseError),
    /// A RabbitMQ operation failed.
    #[error(transparent)]
    Broker(#[from] BrokerError),
    /// The benchmark database could not be migrated.
    #[error(transparent)]
    Migrate(#[from] crate::MigrateError),
    /// A relay under test could not start.
    #[error(transparent)]
    Relay(#[from] crate::RelayError),
    /// A consumer under test could not start.
    #[error(transparent)]
    Consumer(#[from] crate::inbox::ConsumerError),
    /// A case's producer could not write its events.
    #[error(transparent)]
    Enqueue(#[from] crate::EnqueueError),
    /// The broker nacked or returned a message the benchmark published itself.
    #[error("bench: rabbitmq did not accept a message: {0}")]
    Unconfirmed(String),
    /// A case did not finish in time (the relay or a consumer stalled).
    #[error("bench: {what} did not finish within {after:?}")]
    Timeout {
        /// What was being waited for.
        what: &'static str,
        /// How long the benchmark waited.
        after: Duration,
    },
    /// A case could not run as designed (a producer task failed, a case committed nothing).
    #[error("bench: {0}")]
    Failed(String),
}

/// What the cases return.
pub(crate) type Result<T, E = BenchError> = std::result::Result<T, E>;
