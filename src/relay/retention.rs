//! Outbox retention: published rows older than `relay.retention` are deleted in small batches
//! (the relay runs it in `crate::retention::run`).

use std::time::Duration;

use sqlx::PgPool;

use crate::error::DatabaseError;
use crate::store::{self, operations};

/// Deletes rows published more than `older_than` ago, 1,000 rows
/// per statement, until none is left; pending and dead rows are never touched. Returns how many
/// rows were deleted.
pub async fn cleanup(pool: &PgPool, older_than: Duration) -> Result<u64, DatabaseError> {
    let older_than_ms = i64::try_from(older_than.as_millis()).unwrap_or(i64::MAX);
    store::drain_batches(|| operations::cleanup_batch(pool, older_than_ms, store::CLEANUP_BATCH))
        .await
}
