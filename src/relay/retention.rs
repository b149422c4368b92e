//! Outbox retention: published rows older than `relay.retention` are deleted in small batches.

use std::time::Duration;

use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use crate::error::Result;
use crate::store::{self, operations};

/// Deletes rows published more than `older_than` ago, [`CLEANUP_BATCH`](store::CLEANUP_BATCH)
/// per statement, until none is left; pending and dead rows are never touched. Returns how many
/// rows were deleted.
pub async fn cleanup(pool: &PgPool, older_than: Duration) -> Result<u64> {
    let older_than_ms = i64::try_from(older_than.as_millis()).unwrap_or(i64::MAX);
    store::drain_batches(|| operations::cleanup_batch(pool, older_than_ms, store::CLEANUP_BATCH))
        .await
}

/// Runs [`cleanup`] every `interval` until `shutdown`; a zero `retention` keeps everything.
pub(crate) async fn run(
    pool: PgPool,
    retention: Duration,
    interval: Duration,
    shutdown: CancellationToken,
) {
    if retention.is_zero() {
        return;
    }
    loop {
        match cleanup(&pool, retention).await {
            Ok(0) => {}
            Ok(deleted) => tracing::info!(deleted, "relay: old published rows deleted"),
            Err(error) => tracing::warn!(%error, "relay: outbox cleanup failed"),
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(interval) => {}
        }
    }
}
