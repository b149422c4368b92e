//! The cleanup loop the relay runs for `postbox.outbox` and a consumer for its inbox rows:
//! delete old rows in rounds, and vacuum where nothing else would.

use std::future::Future;
use std::time::Duration;

use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use crate::store::operations::{self, HotTable};
use crate::store::Result;

/// When a cleanup loop vacuums its table (where it vacuums at all, see
/// [`operations::vacuums_itself`]).
#[derive(Debug, Clone, Copy)]
pub(crate) enum VacuumAfter {
    /// After every round: the table also collects dead row versions from updates (the outbox's
    /// marks).
    EveryRound,
    /// After rounds that deleted rows.
    Deletes,
}

/// Runs `delete` (one round of deletes; how many rows it deleted) now and every `interval` until
/// `shutdown`, and vacuums `table` after rounds as `after` says when `vacuum` asks postbox to
/// (`Vacuum::Auto`: when autovacuum is off for the table, which would otherwise keep every dead
/// row version for good). `delete` is `None` when nothing is ever deleted (retention off).
pub(crate) async fn run<F, Fut>(
    pool: PgPool,
    table: HotTable,
    vacuum: crate::Vacuum,
    after: VacuumAfter,
    interval: Duration,
    shutdown: CancellationToken,
    mut delete: Option<F>,
) where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<u64>>,
{
    let vacuum = operations::vacuums_itself(&pool, table, vacuum).await;
    // Nothing to delete, and no vacuum that would run without deletes.
    if delete.is_none() && (!vacuum || matches!(after, VacuumAfter::Deletes)) {
        return;
    }
    if vacuum {
        tracing::info!(
            table = table.name(),
            "vacuums the table after cleanup rounds"
        );
    }
    loop {
        let deleted = match delete.as_mut() {
            None => 0,
            Some(delete) => match delete().await {
                Ok(deleted) => deleted,
                Err(error) => {
                    tracing::warn!(table = table.name(), %error, "cleanup failed");
                    0
                }
            },
        };
        if deleted > 0 {
            tracing::info!(table = table.name(), deleted, "old rows deleted");
        }
        let vacuum_now = match after {
            VacuumAfter::EveryRound => vacuum,
            VacuumAfter::Deletes => vacuum && deleted > 0,
        };
        if vacuum_now {
            if let Err(error) = operations::vacuum(&pool, table).await {
                tracing::warn!(table = table.name(), %error, "vacuum failed");
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(interval) => {}
        }
    }
}
