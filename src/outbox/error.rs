//! What can go wrong writing messages into the outbox.

use crate::error::DatabaseError;

/// A message postbox refuses to write: it breaks a rule of the SQL contract (the relay would
/// mark such a row dead), or its payload does not serialize.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid message: {reason}")]
pub struct InvalidMessage {
    reason: String,
}

impl InvalidMessage {
    pub(crate) fn new(reason: impl Into<String>) -> Self {
        Self {
            reason: reason.into(),
        }
    }

    /// Which rule the message breaks.
    pub fn reason(&self) -> &str {
        &self.reason
    }
}

/// Enqueueing messages failed. Nothing was written by the failed call; the caller's
/// transaction decides what else is kept.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EnqueueError {
    /// A message breaks a rule of the SQL contract; nothing was sent to Postgres.
    #[error(transparent)]
    Invalid(#[from] InvalidMessage),
    /// Postgres failed the insert.
    #[error(transparent)]
    Database(#[from] DatabaseError),
}

impl EnqueueError {
    /// Whether the same call may succeed later: Postgres unreachable, restarting or
    /// overloaded, a serialization failure. An invalid message never becomes valid.
    pub fn is_transient(&self) -> bool {
        match self {
            EnqueueError::Invalid(_) => false,
            EnqueueError::Database(error) => error.is_transient(),
        }
    }
}
