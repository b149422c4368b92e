//! What can go wrong building a consumer or recording a message in the inbox.

use crate::error::{BrokerError, DatabaseError, InvalidSetting};

/// Building a consumer, or recording a message with [`receive`](super::receive), failed. A
/// running consumer does not fail: it waits out outages and settles each message as its
/// options say.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConsumerError {
    /// An option has a value the consumer cannot use.
    #[error(transparent)]
    Options(#[from] InvalidSetting),
    /// A Postgres statement failed.
    #[error(transparent)]
    Database(#[from] DatabaseError),
    /// A RabbitMQ operation failed.
    #[error(transparent)]
    Broker(#[from] BrokerError),
    /// The message cannot be recorded in the inbox (a field Postgres cannot store).
    #[error("invalid message: {0}")]
    InvalidMessage(String),
    /// Concurrent transactions kept changing what this one reads (the versions of a key):
    /// roll back and run it again.
    #[error("postgres: {0}; retry the transaction")]
    Conflict(String),
    /// The broker did not accept a dead letter: nacked, returned as unroutable, or not
    /// confirmed. The original message stays unacknowledged and is delivered again.
    #[error("rabbitmq did not accept a dead letter: {0}")]
    DeadLetterRefused(String),
}

impl ConsumerError {
    /// Whether trying again may succeed unchanged: a service unreachable or restarting, a
    /// serialization conflict, a dead letter the broker did not confirm.
    pub fn is_transient(&self) -> bool {
        match self {
            ConsumerError::Options(_) | ConsumerError::InvalidMessage(_) => false,
            ConsumerError::Database(error) => error.is_transient(),
            ConsumerError::Broker(_)
            | ConsumerError::Conflict(_)
            | ConsumerError::DeadLetterRefused(_) => true,
        }
    }

    /// Whether the failure is the message's own (Postgres refuses its values, or it cannot be
    /// stored), so no later run can record it. Everything else, a missing table or permission
    /// included, is waited out: an operator can fix those, and dead-lettering every message
    /// meanwhile would be worse.
    pub(crate) fn refuses_message(&self) -> bool {
        match self {
            ConsumerError::InvalidMessage(_) => true,
            ConsumerError::Database(error) => error.refuses_values(),
            _ => false,
        }
    }
}

impl From<crate::store::inbox_versions::AdvanceError> for ConsumerError {
    fn from(error: crate::store::inbox_versions::AdvanceError) -> Self {
        use crate::store::inbox_versions::AdvanceError;
        match error {
            AdvanceError::Database(error) => ConsumerError::Database(error),
            AdvanceError::Conflict(_) => ConsumerError::Conflict(error.to_string()),
        }
    }
}
