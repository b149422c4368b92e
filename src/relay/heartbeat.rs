//! The relay's entry in `postbox.relays`: registered at start, refreshed every
//! `relay.heartbeat_interval`, removed on a clean stop.

use std::sync::Arc;
use std::time::Duration;

use sqlx::PgPool;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::Stats;
use crate::store::relays;

/// Heartbeats until `shutdown`; registration failures are logged and retried at the next beat,
/// never fatal: the registry is for operators, not for correctness.
pub(crate) async fn run(
    pool: PgPool,
    interval: Duration,
    stats: Arc<Stats>,
    slots: Arc<Semaphore>,
    total_slots: usize,
    shutdown: CancellationToken,
) {
    let id = Uuid::now_v7();
    let mut registered = false;
    loop {
        let result = if registered {
            let open = total_slots.saturating_sub(slots.available_permits());
            relays::heartbeat(
                &pool,
                id,
                i32::try_from(open).unwrap_or(i32::MAX),
                i64::try_from(stats.published()).unwrap_or(i64::MAX),
            )
            .await
        } else {
            relays::register(&pool, id, interval).await.map(|()| true)
        };
        match result {
            Ok(present) => registered = present,
            Err(error) => tracing::warn!(%error, "relay: heartbeat failed"),
        }
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = tokio::time::sleep(interval) => {}
        }
    }
    if registered {
        if let Err(error) = relays::deregister(&pool, id).await {
            tracing::warn!(%error, "relay: could not remove itself from postbox.relays");
        }
    }
}
