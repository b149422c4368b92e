//! The `postbox` command's errors, and the exit code each one means.

use super::{EXIT_FAILURE, EXIT_USAGE};
use crate::error::{DatabaseError, InvalidSetting};

/// Why a `postbox` command failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A setting or argument has a value the command cannot use.
    #[error(transparent)]
    Setting(#[from] InvalidSetting),
    /// The configuration could not be loaded: a wrong type, an unknown setting.
    #[error("could not load configuration: {0}")]
    ConfigLoad(#[from] config::ConfigError),
    /// The configuration file could not be read or does not parse.
    #[error("could not read configuration file {path}: {reason}")]
    ConfigFile {
        /// The file.
        path: String,
        /// What is wrong, and where (without the file's text, which may hold passwords).
        reason: String,
    },
    /// A Postgres operation failed.
    #[error(transparent)]
    Database(#[from] DatabaseError),
    /// Applying the migrations failed.
    #[error(transparent)]
    Migrate(#[from] crate::MigrateError),
    /// The relay could not be built or connected.
    #[error(transparent)]
    Relay(#[from] crate::RelayError),
    /// An inbox operation failed.
    #[error(transparent)]
    Consumer(#[from] crate::inbox::ConsumerError),
    /// The metrics listener failed.
    #[error(transparent)]
    Metrics(#[from] crate::metrics::MetricsError),
    /// `postbox bench` could not measure as designed.
    #[error(transparent)]
    Bench(#[from] crate::bench::BenchError),
    /// Reading or writing a local file, or binding a socket, failed.
    #[error("{context}: {source}")]
    Io {
        /// What the command was doing, with the file's path or the address.
        context: String,
        /// The operating system's error.
        #[source]
        source: std::io::Error,
    },
}

impl Error {
    /// The process exit code for this failure.
    pub(super) fn exit_code(&self) -> u8 {
        match self {
            Error::Setting(_) | Error::ConfigLoad(_) | Error::ConfigFile { .. } => EXIT_USAGE,
            Error::Relay(crate::RelayError::Options(_))
            | Error::Consumer(crate::inbox::ConsumerError::Options(_))
            | Error::Bench(crate::bench::BenchError::Setting(_)) => EXIT_USAGE,
            _ => EXIT_FAILURE,
        }
    }
}

/// What the subcommands return.
pub(super) type Result<T, E = Error> = std::result::Result<T, E>;
