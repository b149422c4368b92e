//! What can go wrong building or starting a relay.

use crate::error::{DatabaseError, InvalidSetting};

/// Building or connecting a relay failed. Once running, a relay does not fail: it waits out
/// Postgres and RabbitMQ outages, logging them, until it is stopped.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RelayError {
    /// An option has a value the relay cannot use.
    #[error(transparent)]
    Options(#[from] InvalidSetting),
    /// Postgres could not be reached.
    #[error(transparent)]
    Database(#[from] DatabaseError),
}

impl RelayError {
    /// Whether trying again later may succeed unchanged: Postgres unreachable or restarting.
    /// (RabbitMQ is connected once the relay runs, which waits out its outages.)
    pub fn is_transient(&self) -> bool {
        match self {
            RelayError::Options(_) => false,
            RelayError::Database(error) => error.is_transient(),
        }
    }
}
