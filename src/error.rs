//! The crate's error type. Every I/O error carries what postbox was doing when it failed.

use std::time::Duration;

/// Everything that can go wrong in postbox. New variants may come in any release; match with a
/// wildcard arm, and use [`Error::is_transient`] to decide whether to try again.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
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
    #[cfg(feature = "cli")]
    #[error("could not load configuration: {0}")]
    ConfigLoad(#[from] config::ConfigError),

    /// The configuration file does not parse.
    #[cfg(feature = "cli")]
    #[error("could not read configuration file {path}: {reason}")]
    ConfigFile {
        /// The file.
        path: String,
        /// What is wrong, and where (without the file's text, which may hold passwords).
        reason: String,
    },

    /// The configuration names something that is not a setting (a misspelling, most likely).
    #[cfg(feature = "cli")]
    #[error("unknown setting `{name}` in {origin}; see README \"Configuration\" for the settings")]
    UnknownSetting {
        /// The key as written (`relay.batch_sise`).
        name: String,
        /// Where it was found.
        origin: String,
    },

    /// A Postgres operation failed.
    #[error("postgres: {context}: {}", describe(source))]
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

    /// `postbox bench` could not measure as designed (a producer task failed, a case
    /// committed nothing, the broker lost messages).
    #[cfg(feature = "cli")]
    #[error("bench: {0}")]
    Bench(String),

    /// Concurrent transactions kept changing what this one reads (the inbox's versions of a
    /// key): roll back and run it again.
    #[error("postgres: {0}; retry the transaction")]
    Conflict(String),

    /// The Prometheus recorder could not be installed.
    #[cfg(feature = "cli")]
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

impl Error {
    /// Whether trying again later may succeed without anything about the request changing:
    /// Postgres or RabbitMQ unreachable or restarting, a pool timing out, a serialization
    /// conflict, and Postgres errors about the database rather than the values sent (a missing
    /// table or permission: an operator can fix those while the caller waits). False for
    /// Postgres refusing the values themselves (SQLSTATE classes 22 data exception, 23
    /// integrity constraint violation, 54 program limit exceeded), for invalid messages and for
    /// configuration errors: repeating those fails the same way.
    pub fn is_transient(&self) -> bool {
        match self {
            Error::Database {
                source: sqlx::Error::Database(database),
                ..
            } => {
                let code = database.code().unwrap_or_default();
                !["22", "23", "54"]
                    .iter()
                    .any(|class| code.starts_with(class))
            }
            Error::Database { .. }
            | Error::Amqp { .. }
            | Error::Io { .. }
            | Error::Unconfirmed(_)
            | Error::Conflict(_)
            | Error::Timeout { .. } => true,
            Error::Config { .. } | Error::Migrate(_) | Error::InvalidMessage(_) => false,
            #[cfg(feature = "cli")]
            Error::ConfigLoad(_)
            | Error::ConfigFile { .. }
            | Error::UnknownSetting { .. }
            | Error::Bench(_)
            | Error::Metrics(_) => false,
        }
    }
}

/// A driver error as a user reads it: the server's message with its detail, hint and SQLSTATE
/// (not the line of Postgres's own source that raised it), and what to do when postbox's
/// schema is missing.
fn describe(error: &sqlx::Error) -> String {
    let Some(server) = error
        .as_database_error()
        .and_then(|e| e.try_downcast_ref::<sqlx::postgres::PgDatabaseError>())
    else {
        return error.to_string();
    };
    let mut text = format!("{} (SQLSTATE {})", server.message(), server.code());
    if let Some(detail) = server.detail() {
        text.push_str(&format!("; {detail}"));
    }
    if let Some(hint) = server.hint() {
        text.push_str(&format!("; hint: {hint}"));
    }
    // undefined_table, undefined_function or invalid_schema_name on one of postbox's objects.
    if matches!(server.code(), "42P01" | "42883" | "3F000") && server.message().contains("postbox")
    {
        text.push_str("; is the schema migrated? Run `postbox migrate`");
    }
    text
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
