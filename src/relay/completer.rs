//! Stage 4: write a batch's decisions in one statement and commit, releasing its rows.

use std::sync::Arc;

use tokio::sync::{mpsc, Notify};
use tracing::Instrument;

use super::batch::{Batch, Decided};
use super::events::{BatchMarked, BatchReleased, Release};
use super::Stats;

use crate::error::Context;
use crate::store::operations::wake_relays;
use crate::store::outbox;
use crate::store::Result;

/// Persists decisions on the transaction that claimed the batch: if that transaction is gone
/// (connection lost, session killed), nothing is written and the rows are claimed again later.
pub(crate) struct Completer {
    /// For announcing rows given back.
    pub pool: sqlx::PgPool,
    pub wake: Arc<Notify>,
    pub stats: Arc<Stats>,
    /// `relay.keep_published`: mark published rows (true) or delete them (false).
    pub keep_published: bool,
    /// `relay.dead_rows_park_keys`: a dead keyed row holds its stream back at the consumers
    /// until released (true), or is released at once (false).
    pub park_keys: bool,
}

impl Completer {
    /// Completes batches until the confirmer is done. Batches are marked concurrently, each on
    /// its own transaction: they never share a row (the claim sees to that), and a stream's
    /// order is in its rows' numbers, so the order of their commits does not matter. Not cancellable on purpose: a mark is one
    /// short statement, and finishing it is what keeps duplicates down on shutdown.
    pub async fn run(self, mut input: mpsc::Receiver<Decided>) {
        let this = Arc::new(self);
        let mut marking = tokio::task::JoinSet::new();
        loop {
            tokio::select! {
                decided = input.recv() => match decided {
                    Some(decided) => {
                        let this = this.clone();
                        marking.spawn(async move { this.complete_logged(decided).await });
                    }
                    None => break,
                },
                Some(_) = marking.join_next(), if !marking.is_empty() => {}
            }
        }
        while marking.join_next().await.is_some() {}
    }

    async fn complete_logged(&self, decided: Decided) {
        let rows = decided.batch.rows.len() as u64;
        if let Err(error) = self.complete(decided).await {
            // Rolled back: every row goes back as it was, to be published again.
            BatchReleased {
                rows,
                why: Release::MarkFailed(&error),
            }
            .emit(&self.stats);
        }
        // A finished batch frees a slot: the claimer claims again at once.
        self.wake.notify_one();
    }

    async fn complete(&self, decided: Decided) -> Result<()> {
        let Decided {
            batch,
            completions,
            published_at,
            confirmed_at,
        } = decided;
        if completions.is_empty() {
            // Nothing was decided (the broker connection went away): the rows go back as
            // they are, and other relays hear of it.
            release(batch, &self.stats).await;
            return Ok(());
        }
        let mut tx = batch.tx;
        let released = (batch.rows.len() - completions.len()) as u64;
        outbox::complete(&mut tx, &completions, self.keep_published, self.park_keys)
            .instrument(tracing::debug_span!(
                "postbox.mark",
                rows = completions.len()
            ))
            .await?;
        tx.commit().await.context("committing a batch")?;
        if released > 0 {
            // Rows left unmarked are free now: let other relays know. After the commit, so
            // that the marks never depend on it.
            if let Err(error) = crate::store::operations::wake_relays(&self.pool).await {
                tracing::debug!(%error, "relay: could not announce released rows");
            }
        }
        BatchMarked {
            completions: &completions,
            released,
            claimed_at: batch.claimed_at,
            published_at,
            confirmed_at,
        }
        .emit(&self.stats);
        drop(batch.permit);
        Ok(())
    }
}

/// How long a release may take before the batch is simply dropped (rolled back unannounced).
const RELEASE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// Gives `batch`'s rows back unmarked, and tells every relay at once (rather than at its next
/// poll) that they are free: the transaction only locked them, so committing it releases them
/// as a rollback would, and delivers the notification in the same moment.
async fn release(batch: Batch, stats: &Stats) {
    let rows = batch.rows.len() as u64;
    let mut tx = batch.tx;
    let release = async {
        wake_relays(&mut *tx).await?;
        tx.commit().await.context("releasing a batch")
    };
    match tokio::time::timeout(RELEASE_TIMEOUT, release).await {
        Ok(Ok(())) => {}
        // The session is gone, and its locks with it: the rows are free, and other relays
        // find them on their next poll.
        Ok(Err(error)) => tracing::debug!(%error, "relay: could not announce a released batch"),
        // Postgres does not answer: the transaction rolls back when dropped, but the locks
        // stay until Postgres ends the session (at the latest `takeover_timeout`).
        Err(_) => tracing::warn!(
            rows,
            "relay: giving back a batch timed out; its rows stay locked until Postgres ends the session"
        ),
    }
    BatchReleased {
        rows,
        why: Release::Undecided,
    }
    .emit(stats);
}
