//! Stage 1: claim batches of due rows, as many as there are free in-flight slots.

use std::sync::Arc;
use std::time::{Duration, Instant};

use sqlx::PgPool;
use tokio::sync::{mpsc, Notify, Semaphore};
use tokio_util::sync::CancellationToken;

use super::batch::Batch;
use crate::error::{Context, Result};
use crate::reconnect::connection_backoff;
use crate::store::outbox;

/// Claims due rows in id order and hands each batch, still locked, to the publisher.
pub(crate) struct Claimer {
    pub pool: PgPool,
    pub batch_size: u32,
    pub poll_interval: Duration,
    /// Free in-flight slots; a batch holds one until it is marked.
    pub slots: Arc<Semaphore>,
    /// Fired by NOTIFY, by the listener reconnecting, and by each finished batch.
    pub wake: Arc<Notify>,
    pub stats: Arc<super::Stats>,
}

/// What one claim found.
pub(crate) enum Claimed {
    /// A batch to publish; `full` when it hit the batch size, so more is likely waiting.
    Batch { batch: Batch, full: bool },
    /// Nothing claimable right now.
    Nothing,
}

impl Claimer {
    /// Claims until `stop` is cancelled, then returns; the publisher sees the channel close.
    pub async fn run(self: Arc<Self>, out: mpsc::Sender<Batch>, stop: CancellationToken) {
        let mut idle = false;
        let mut next_poll = Instant::now() + self.poll_interval;
        let mut errors = connection_backoff();
        loop {
            if idle {
                let woken_by_poll = tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = self.wake.notified() => false,
                    _ = tokio::time::sleep_until(next_poll.into()) => true,
                };
                if woken_by_poll {
                    match outbox::next_due(&self.pool).await {
                        Ok(Some(wait)) if wait.is_zero() => {}
                        Ok(due) => {
                            // Sleep until the next scheduled row or the next poll, whichever is first.
                            let wait = due.unwrap_or(self.poll_interval).min(self.poll_interval);
                            next_poll = Instant::now() + wait;
                            continue;
                        }
                        Err(error) => {
                            tracing::warn!(%error, "relay: idle poll failed");
                            next_poll = Instant::now() + self.poll_interval;
                            continue;
                        }
                    }
                }
            }
            let permit = tokio::select! {
                _ = stop.cancelled() => return,
                permit = self.slots.clone().acquire_owned() => match permit {
                    Ok(permit) => permit,
                    Err(_) => return, // semaphore closed: the relay is shutting down
                },
            };
            match self.claim_once(permit).await {
                Ok(Claimed::Batch { batch, full }) => {
                    errors = connection_backoff();
                    idle = !full;
                    if out.send(batch).await.is_err() {
                        return;
                    }
                }
                Ok(Claimed::Nothing) => {
                    errors = connection_backoff();
                    idle = true;
                }
                Err(error) => {
                    let delay = errors.next().unwrap_or(Duration::from_secs(10));
                    tracing::warn!(%error, retry_in = ?delay, "relay: claim failed");
                    tokio::select! {
                        _ = stop.cancelled() => return,
                        _ = tokio::time::sleep(delay) => {}
                    }
                }
            }
            if idle {
                next_poll = Instant::now() + self.poll_interval;
            }
        }
    }

    /// One claim: begin a transaction and lock up to `batch_size` due rows in it.
    pub async fn claim_once(&self, permit: tokio::sync::OwnedSemaphorePermit) -> Result<Claimed> {
        let started = Instant::now();
        let mut tx = self.pool.begin().await.context("starting a claim")?;
        let rows = outbox::claim(&mut tx, self.batch_size).await?;
        self.stats.record_claim();
        tracing::trace!(
            rows = rows.len(),
            claim_ms = started.elapsed().as_secs_f64() * 1e3,
            "relay: claimed"
        );
        if rows.is_empty() {
            tx.rollback().await.context("ending an empty claim")?;
            return Ok(Claimed::Nothing);
        }
        let full = rows.len() >= self.batch_size as usize;
        Ok(Claimed::Batch {
            batch: Batch {
                tx,
                rows,
                claimed_at: Instant::now(),
                permit,
            },
            full,
        })
    }
}
