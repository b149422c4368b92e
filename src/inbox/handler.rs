//! What a consumer runs for each new message, and how it says a message failed.

use std::fmt;
use std::future::Future;

use sqlx::{Postgres, Transaction};

use super::Incoming;

/// The application's code for one message. It runs inside the transaction that also records
/// the message id in `postbox.inbox`: its writes and the inbox row commit together or not at
/// all, so a redelivered message is recognized and not applied twice.
///
/// ```no_run
/// use postbox::inbox::{Handler, HandlerError, Incoming};
/// use sqlx::{Postgres, Transaction};
///
/// #[derive(serde::Deserialize)]
/// struct OrderPlaced { order_id: i64, total_cents: i64 }
///
/// struct Revenue;
///
/// impl Handler for Revenue {
///     async fn handle(
///         &self,
///         tx: &mut Transaction<'_, Postgres>,
///         message: &Incoming,
///     ) -> Result<(), HandlerError> {
///         let event: OrderPlaced = message.json()?;
///         sqlx::query("insert into revenue (order_id, cents) values ($1, $2)")
///             .bind(event.order_id)
///             .bind(event.total_cents)
///             .execute(&mut **tx)
///             .await?;
///         Ok(())
///     }
/// }
/// ```
pub trait Handler: Send + Sync + 'static {
    /// Applies `message`, writing through `tx`. Do not commit or roll back `tx`: the consumer
    /// does, after recording the outcome. An error rolls everything back; see [`HandlerError`]
    /// for what happens next.
    fn handle(
        &self,
        tx: &mut Transaction<'_, Postgres>,
        message: &Incoming,
    ) -> impl Future<Output = Result<(), HandlerError>> + Send;

    /// Applies several new messages in one transaction, when the consumer's `batch_size` is
    /// above 1 (duplicates and stale messages are filtered out first, with a few inbox
    /// statements for the whole batch).
    /// Override it to write the batch in a few statements; the default calls
    /// [`handle`](Handler::handle) for each message in order. If it fails, the consumer rolls
    /// the batch back and processes its messages one by one, with the usual retries.
    fn handle_batch(
        &self,
        tx: &mut Transaction<'_, Postgres>,
        messages: &[Incoming],
    ) -> impl Future<Output = Result<(), HandlerError>> + Send {
        async move {
            for message in messages {
                self.handle(tx, message).await?;
            }
            Ok(())
        }
    }
}

/// How a failure is treated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureKind {
    /// Might work next time (a deadlock, a remote service down): retried with backoff up to
    /// the consumer's `max_attempts`, then dead-lettered. What `?` produces.
    Transient,
    /// Will never work: dead-lettered at once.
    Permanent,
    /// The message itself is unusable (its payload does not deserialize): handled by the
    /// consumer's [`MalformedPolicy`](super::MalformedPolicy).
    Malformed,
}

/// A handler's failure: any error converts into a transient one with `?`.
pub struct HandlerError {
    kind: FailureKind,
    error: Box<dyn std::error::Error + Send + Sync + 'static>,
}

impl HandlerError {
    /// A failure worth retrying.
    pub fn transient(error: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> Self {
        Self::new(FailureKind::Transient, error)
    }

    /// A failure no retry will fix: the message is dead-lettered at once.
    pub fn permanent(error: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> Self {
        Self::new(FailureKind::Permanent, error)
    }

    /// The message cannot be understood (bad payload).
    pub fn malformed(error: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> Self {
        Self::new(FailureKind::Malformed, error)
    }

    fn new(kind: FailureKind, error: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> Self {
        Self {
            kind,
            error: error.into(),
        }
    }

    /// How the consumer treats this failure.
    pub fn kind(&self) -> FailureKind {
        self.kind
    }

    /// The underlying error.
    pub fn error(&self) -> &(dyn std::error::Error + Send + Sync + 'static) {
        &*self.error
    }
}

// Like anyhow::Error, HandlerError is not itself a std Error, which is what lets every error
// convert into it with `?`.
impl<E> From<E> for HandlerError
where
    E: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    fn from(error: E) -> Self {
        Self::transient(error)
    }
}

impl fmt::Display for HandlerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The whole chain: "inserting order: error returned from database: deadlock detected".
        write!(f, "{}", self.error)?;
        let mut source = self.error.source();
        while let Some(error) = source {
            write!(f, ": {error}")?;
            source = error.source();
        }
        Ok(())
    }
}

impl fmt::Debug for HandlerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}: {}", self.kind, self)
    }
}
