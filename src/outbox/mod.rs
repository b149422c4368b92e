//! The producer side: put messages into `postbox.outbox` inside the caller's transaction.
//!
//! Plain SQL works just as well (the manual's "The SQL contract"); this API adds typed payloads,
//! deterministic ids and one round trip for many messages.

mod error;
mod id;
mod message;

pub use error::{EnqueueError, InvalidMessage};
pub use id::{canonical_key, deterministic_id, NAMESPACE};
pub use message::{Message, Payload};

use sqlx::PgExecutor;
use uuid::Uuid;

use crate::store;
use crate::store::outbox::{Body, NewRow};

/// What became of one enqueued message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Enqueued {
    /// The message id, given or assigned.
    pub message_id: Uuid,
    /// The outbox position of the new row; `None` when a row with this message id already existed.
    pub id: Option<i64>,
}

impl Enqueued {
    /// Whether this call inserted the row (false: the message id was already in the outbox).
    pub fn is_new(&self) -> bool {
        self.id.is_some()
    }
}

/// Enqueues one message. Pass the transaction that writes the business rows, so both commit or
/// neither does.
pub async fn enqueue<'e, E: PgExecutor<'e>>(
    executor: E,
    message: &Message,
) -> Result<Enqueued, EnqueueError> {
    let results = enqueue_many(executor, std::slice::from_ref(message)).await?;
    // enqueue_many returns exactly one result per message
    results
        .into_iter()
        .next()
        .ok_or_else(|| InvalidMessage::new("enqueue returned no result").into())
}

/// Enqueues many messages in one statement, in order (their outbox ids ascend in slice order).
/// A message whose id is already in the outbox is skipped and reported with `id: None`.
pub async fn enqueue_many<'e, E: PgExecutor<'e>>(
    executor: E,
    messages: &[Message],
) -> Result<Vec<Enqueued>, EnqueueError> {
    if messages.is_empty() {
        return Ok(Vec::new());
    }
    for (place, message) in messages.iter().enumerate() {
        message.check().map_err(|error| {
            if messages.len() > 1 {
                InvalidMessage::new(format!(
                    "message {place} of {}: {}",
                    messages.len(),
                    error.reason()
                ))
            } else {
                error
            }
        })?;
    }
    // Ids are chosen here rather than by the column default so that every message, new or
    // duplicate, can be reported with its id.
    let ids: Vec<Uuid> = messages
        .iter()
        .map(|m| m.message_id.unwrap_or_else(Uuid::now_v7))
        .collect();
    let fresh = messages.iter().all(|m| m.message_id.is_none());
    let rows: Vec<NewRow<'_>> = messages
        .iter()
        .zip(&ids)
        .map(|(m, &message_id)| NewRow {
            message_id,
            exchange: &m.exchange,
            routing_key: &m.routing_key,
            partition_key: m.partition_key.as_deref(),
            payload: match &m.payload {
                Payload::Text(text) => Body::Text(text),
                Payload::Bytes(bytes) => Body::Bytes(bytes),
            },
            content_type: &m.content_type,
            headers: serde_json::Value::Object(m.headers.clone()).to_string(),
            available_at: m.available_at,
            delay_ms: m.delay.map(|d| d.as_secs_f64() * 1000.0),
        })
        .collect();
    let mut inserted = store::outbox::insert_many(executor, &rows, fresh).await?;
    // remove(): when one call repeats a message id, only its first occurrence is the new row
    Ok(ids
        .into_iter()
        .map(|message_id| Enqueued {
            message_id,
            id: inserted.remove(&message_id),
        })
        .collect())
}
