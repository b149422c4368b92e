//! The crate's error type. Every I/O error carries what postbox was doing when it failed.

use std::time::Duration;

/// Everything that can go wrong in postbox's library code.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A setting has a value postbox cannot use.
    #[error("invalid setting `{setting}` = {value:?}: {reason}")]
    Config {
        /// The setting's name as written in the config file (`relay.batch_size`).
        setting: &'static str,
        /// The offending value, with any password removed.
        value: String,
        /// What is allowed instead.
        reason: String,
    },

    /// The configuration could not be read or parsed (file missing, wrong type...).
    #[error("could not load configuration: {0}")]
    ConfigLoad(#[from] config::ConfigError),

    /// A Postgres operation failed.
    #[error("postgres: {context}: {source}")]
    Database {
        /// What postbox was doing, e.g. "claiming a batch" or "connecting to 127.0.0.1:5432/app".
        context: String,
        /// The driver's error.
        #[source]
        source: sqlx::Error,
    },

    /// Applying the schema migrations failed.
    #[error("postgres: applying postbox migrations: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),

    /// A RabbitMQ operation failed.
    #[error("rabbitmq: {context}: {source}")]
    Amqp {
        /// What postbox was doing, e.g. "publishing" or "connecting to 127.0.0.1:5672/%2f".
        context: String,
        /// The client's error.
        #[source]
        source: lapin::Error,
    },

    /// A message could not be built (a payload that does not serialize, say).
    #[error("invalid message: {0}")]
    InvalidMessage(String),

    /// Reading or writing a local file failed.
    #[error("{context}: {source}")]
    Io {
        /// What postbox was doing, with the file's path.
        context: String,
        /// The operating system's error.
        #[source]
        source: std::io::Error,
    },

    /// The broker did not accept a message postbox published itself (a dead letter, a benchmark
    /// message): nacked, returned as unroutable, or not confirmed.
    #[error("rabbitmq did not accept a message: {0}")]
    Unconfirmed(String),

    /// `postbox reconcile` found published messages a consumer never processed.
    #[error("reconcile: {0}")]
    Discrepancy(String),

    /// Concurrent transactions kept changing what this one reads (the inbox's versions of a
    /// key): roll back and run it again.
    #[error("postgres: {0}; retry the transaction")]
    Conflict(String),

    /// The Prometheus recorder could not be installed.
    #[error("metrics: {0}")]
    Metrics(String),

    /// The operation did not finish in time.
    #[error("{what} did not finish within {after:?}")]
    Timeout {
        /// What was being waited for.
        what: &'static str,
        /// How long postbox waited.
        after: Duration,
    },
}

/// Shorthand for results with postbox's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Attaches what postbox was doing to a driver error.
pub(crate) trait Context<T> {
    /// Wraps the error with a description of the operation that failed.
    fn context(self, context: impl Into<String>) -> Result<T>;
}

impl<T> Context<T> for std::result::Result<T, sqlx::Error> {
    fn context(self, context: impl Into<String>) -> Result<T> {
        self.map_err(|source| Error::Database {
            context: context.into(),
            source,
        })
    }
}

impl<T> Context<T> for std::result::Result<T, lapin::Error> {
    fn context(self, context: impl Into<String>) -> Result<T> {
        self.map_err(|source| Error::Amqp {
            context: context.into(),
            source,
        })
    }
}
