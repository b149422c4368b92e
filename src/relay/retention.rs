//! Outbox retention: published rows older than `relay.retention` are deleted in small batches.

use std::time::Duration;

use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use crate::error::Result;
use crate::store::{self, operations};
use crate::Vacuum;

/// Deletes rows published more than `older_than` ago, 1,000 rows
/// per statement, until none is left; pending and dead rows are never touched. Returns how many
/// rows were deleted.
pub async fn cleanup(pool: &PgPool, older_than: Duration) -> Result<u64> {
    let older_than_ms = i64::try_from(older_than.as_millis()).unwrap_or(i64::MAX);
    store::drain_batches(|| operations::cleanup_batch(pool, older_than_ms, store::CLEANUP_BATCH))
        .await
}

/// Runs [`cleanup`] every `interval` until `shutdown` (a zero `retention` keeps everything),
/// and vacuums the outbox after each round when `vacuum` says so (`auto`: when the server's
/// autovacuum is off, which would otherwise leave every deleted and every marked row's old
/// version in the table for good).
pub(crate) async fn run(
    pool: PgPool,
    retention: Duration,
    interval: Duration,
    vacuum: Vacuum,
    shutdown: CancellationToken,
) {
    let vacuum = operations::vacuums_itself(&pool, operations::HotTable::Outbox, vacuum).await;
    if retention.is_zero() && !vacuum {
        return;
    }
    if vacuum {
        tracing::info!("relay: vacuums postbox.outbox after each cleanup round (relay.vacuum)");
    }
    loop {
        if !retention.is_zero() {
            match cleanup(&pool, retention).await {
                Ok(0) => {}
                Ok(deleted) => tracing::info!(deleted, "relay: old published rows deleted"),
                Err(error) => tracing::warn!(%error, "relay: outbox cleanup failed"),
            }
        }
        if vacuum {
            if let Err(error) = operations::vacuum(&pool, operations::HotTable::Outbox).await {
                tracing::warn!(%error, "relay: vacuum failed");
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(interval) => {}
        }
    }
}
