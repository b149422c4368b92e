//! Inbox retention: decided rows older than the dedup window are deleted in small batches.

use std::time::Duration;

use sqlx::PgPool;

use crate::error::DatabaseError;
use crate::store::{self, inbox};

/// Deletes decided inbox rows older than `older_than` (of `consumer`, or of every consumer when
/// `None`), 1,000 rows per statement, until none is left. Rows of messages still
/// being retried are kept. Returns how many rows were deleted.
///
/// A duplicate arriving after its row was deleted is processed again (unless the version check
/// skips it as stale: `postbox.inbox_versions` is never cleaned up), so `older_than` must exceed
/// the longest horizon over which a message can come back: consumer retries, relay retries,
/// replays.
pub async fn cleanup(
    pool: &PgPool,
    consumer: Option<&str>,
    older_than: Duration,
) -> Result<u64, DatabaseError> {
    let older_than_ms = i64::try_from(older_than.as_millis()).unwrap_or(i64::MAX);
    store::drain_batches(|| {
        inbox::cleanup_batch(pool, consumer, older_than_ms, store::CLEANUP_BATCH)
    })
    .await
}
