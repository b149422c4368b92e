//! Stage 1: claim batches of due rows, as many as there are free in-flight slots.

use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use sqlx::PgPool;
use tokio::sync::{mpsc, Notify, Semaphore};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::batch::Batch;
use super::events;
use crate::error::Context;
use crate::reconnect::connection_backoff;
use crate::store::outbox;
use crate::store::Result;

/// Numbers keyed rows, then claims due rows in id order and hands each batch, still locked,
/// to the publisher.
pub(crate) struct Claimer {
    pub pool: PgPool,
    pub batch_size: u32,
    pub poll_interval: Duration,
    /// Free in-flight slots; a batch holds one until it is marked.
    pub slots: Arc<Semaphore>,
    /// All the slots: with every one free, no batch of this relay is open.
    pub total_slots: usize,
    /// Fired by NOTIFY, by the listener reconnecting, and by each finished batch.
    pub wake: Arc<Notify>,
    pub stats: Arc<super::Stats>,
    /// The broker's state: nothing is claimed while it is away or blocks publishing.
    pub health: Arc<super::Health>,
    pub scan: Scan,
    /// The relay's wake-up keys: taken when a claim finds nothing and no batch is open, given
    /// back when a claim finds work (see [`super::sleeper`]).
    pub sleeper: tokio::sync::Mutex<super::sleeper::Sleeper>,
}

/// Full scans every this many claims while the tail keeps batches full.
const FULL_SCAN_EVERY: u32 = 8;

/// Where claims start scanning. The in-flight batches hold the lowest pending ids, locked; a
/// claim from the start of the pending index would step over every one of them (SKIP LOCKED
/// still visits each row), which under a backlog costs more than the claim itself. So claims
/// start after the highest id claimed so far, with a full scan every `FULL_SCAN_EVERY` claims
/// and whenever the tail runs dry, which is what finds rows that committed late with a lower
/// id, were numbered after a claim passed them, or came back from a released batch.
#[derive(Debug, Default)]
pub(crate) struct Scan {
    /// One past the highest id claimed so far.
    next_id: AtomicI64,
    claims: AtomicU32,
    full_next: AtomicBool,
}

impl Scan {
    /// The id the next claim starts from (0: the whole table).
    fn start(&self) -> i64 {
        let n = self.claims.fetch_add(1, Ordering::Relaxed);
        if self.full_next.swap(false, Ordering::Relaxed) || n.is_multiple_of(FULL_SCAN_EVERY) {
            0
        } else {
            self.next_id.load(Ordering::Relaxed)
        }
    }

    /// Records what a claim from `from` found (`rows`, the highest id among them); returns
    /// whether to claim again at once.
    fn claimed(&self, from: i64, rows: usize, last: Option<i64>, batch_size: u32) -> bool {
        if let Some(last) = last {
            self.next_id.fetch_max(last + 1, Ordering::Relaxed);
        }
        if rows < batch_size as usize {
            // The scan ran out of rows. After the last claimed id: look at the whole table
            // before calling it a day.
            if from > 0 {
                self.full_next.store(true, Ordering::Relaxed);
                return true;
            }
            return false;
        }
        true
    }
}

/// What one claim found.
pub(crate) enum Claimed {
    /// A batch to publish; `again` when more may be claimable at once.
    Batch { batch: Batch, again: bool },
    /// Nothing claimable right now.
    Nothing,
    /// Nothing claimable where this claim looked: claim again over the whole table at once.
    Again,
}

impl Claimer {
    /// Claims until `stop` is cancelled, then returns; the publisher sees the channel close.
    /// When idle, a claimer that `polls` also wakes on the poll timer; the others wait for a
    /// wake-up (a notification, a finished batch, or the poller finding more than one batch).
    pub async fn run(
        self: Arc<Self>,
        out: mpsc::Sender<Batch>,
        polls: bool,
        stop: CancellationToken,
    ) {
        let mut idle = false;
        let mut next_poll = Instant::now() + self.poll_interval;
        let mut errors = connection_backoff();
        loop {
            // `select!` picks among ready branches at random: a stop must win over a free slot
            // or a stored wake-up, or claims would go on after SIGTERM.
            if stop.is_cancelled() {
                return;
            }
            if idle {
                let poll = async {
                    if polls {
                        tokio::time::sleep_until(next_poll.into()).await;
                    } else {
                        std::future::pending::<()>().await;
                    }
                };
                let woken_by_poll = tokio::select! {
                    biased;
                    _ = stop.cancelled() => return,
                    _ = self.wake.notified() => false,
                    _ = poll => true,
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
            // Rows claimed now would stay locked until publishing works again, out of reach
            // of any relay that could publish them: claim only with a broker connection that
            // is not blocked.
            if !self.health.broker.usable() {
                tokio::select! {
                    biased;
                    _ = stop.cancelled() => return,
                    _ = self.health.broker.until_usable() => {}
                }
            }
            let permit = tokio::select! {
                biased;
                _ = stop.cancelled() => return,
                permit = self.slots.clone().acquire_owned() => match permit {
                    Ok(permit) => permit,
                    Err(_) => return, // semaphore closed: the relay is shutting down
                },
            };
            // The slot may have been freed by the very batch the loss released.
            if !self.health.broker.usable() {
                idle = false; // claim as soon as it is back
                continue;
            }
            match self
                .claim_once(permit)
                .instrument(tracing::debug_span!("postbox.claim"))
                .await
            {
                Ok(Claimed::Batch { batch, again }) => {
                    errors = connection_backoff();
                    idle = !again;
                    // Busy: commits need not notify.
                    if self.sleeper.lock().await.wake().await {
                        self.stats.record_wake();
                    }
                    if batch.rows.len() == self.batch_size as usize {
                        // more is likely waiting: an idle claimer may join in
                        self.wake.notify_one();
                    }
                    if out.send(batch).await.is_err() {
                        return;
                    }
                }
                Ok(Claimed::Nothing) => {
                    errors = connection_backoff();
                    // With a batch still open, its end wakes a claimer. With none, the relay
                    // asks producers to wake it; having just done so, it claims once more for
                    // the rows of producers that committed without notifying meanwhile.
                    let open = self
                        .total_slots
                        .saturating_sub(self.slots.available_permits());
                    let fell_asleep =
                        open == 0 && self.sleeper.lock().await.sleep(&self.pool).await;
                    if fell_asleep {
                        self.stats.record_sleep();
                    }
                    idle = !fell_asleep;
                }
                Ok(Claimed::Again) => {
                    errors = connection_backoff();
                    idle = false;
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

    /// One claim: number what is due and unnumbered (unless another pass is at it), then
    /// begin a transaction and lock up to `batch_size` due rows in it.
    pub async fn claim_once(&self, permit: tokio::sync::OwnedSemaphorePermit) -> Result<Claimed> {
        let started = Instant::now();
        // A full pass means more may wait unnumbered: claim again at once.
        let numbered = outbox::number(&self.pool, self.batch_size).await?;
        let more_to_number = numbered == Some(u64::from(self.batch_size));
        let mut tx = self.pool.begin().await.context("starting a claim")?;
        let from = self.scan.start();
        let rows = outbox::claim(&mut tx, self.batch_size, from).await?;
        events::Claimed {
            rows: rows.len(),
            numbered,
            from,
            took: started.elapsed(),
        }
        .emit(&self.stats);
        let last = rows.iter().map(|row| row.id).max();
        let again = self.scan.claimed(from, rows.len(), last, self.batch_size) || more_to_number;
        if rows.is_empty() {
            tx.rollback().await.context("ending an empty claim")?;
            return Ok(if again {
                Claimed::Again
            } else {
                Claimed::Nothing
            });
        }
        Ok(Claimed::Batch {
            batch: Batch {
                tx,
                rows,
                claimed_at: Instant::now(),
                permit,
            },
            again,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_batch_claims_again_from_the_tail() {
        let scan = Scan::default();
        let from = scan.start(); // the first claim is a full scan
        assert_eq!(from, 0);
        assert!(scan.claimed(from, 500, Some(500), 500));
        assert_eq!(
            scan.start(),
            501,
            "the next claim starts after the last id claimed"
        );
    }

    #[test]
    fn a_short_tail_claim_looks_at_the_whole_table_next() {
        let scan = Scan::default();
        let _ = scan.start();
        assert!(scan.claimed(0, 500, Some(500), 500));
        let from = scan.start();
        assert_eq!(from, 501);
        assert!(
            scan.claimed(from, 3, Some(510), 500),
            "claims again at once"
        );
        assert_eq!(scan.start(), 0, "over the whole table");
        // A short claim over the whole table means nothing more is claimable: idle.
        assert!(!scan.claimed(0, 3, Some(20), 500));
    }

    #[test]
    fn every_few_claims_is_a_full_scan() {
        let scan = Scan::default();
        let starts: Vec<i64> = (0..2 * FULL_SCAN_EVERY)
            .map(|_| {
                let from = scan.start();
                scan.claimed(from, 500, Some(1000), 500);
                from
            })
            .collect();
        assert_eq!(starts.iter().filter(|&&from| from == 0).count(), 2);
    }
}
