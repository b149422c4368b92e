//! Stage 1: claim batches of due rows, as many as there are free in-flight slots.

use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use sqlx::PgPool;
use tokio::sync::{mpsc, Notify, Semaphore};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::batch::{Batch, Open};
use crate::error::{Context, Result};
use crate::reconnect::connection_backoff;
use crate::store::outbox;

/// Claims due rows in id order and hands each batch, still locked, to the publisher.
pub(crate) struct Claimer {
    pub pool: PgPool,
    pub batch_size: u32,
    pub poll_interval: Duration,
    /// What a batch may take of each partition key.
    pub keys: outbox::KeyRules,
    /// Free in-flight slots; a batch holds one until it is marked.
    pub slots: Arc<Semaphore>,
    /// Fired by NOTIFY, by the listener reconnecting, and by each finished batch.
    pub wake: Arc<Notify>,
    pub stats: Arc<super::Stats>,
    pub scan: Scan,
}

/// Full scans every this many claims while the tail keeps batches full.
const FULL_SCAN_EVERY: u32 = 8;

/// A claim that kept nothing, having locked a full scan's worth of rows of at most this many
/// keys, steps over them: scanning on finds other keys' rows, where with many keys in flight
/// it would find only more of theirs.
const FEW_KEYS: u32 = 10;

/// Where claims start scanning. The in-flight batches hold the lowest pending ids, locked; a
/// claim from the start of the pending index would step over every one of them (SKIP LOCKED
/// still visits each row), which under a backlog costs more than the claim itself. So claims
/// start after the highest id claimed so far, with a full scan every `FULL_SCAN_EVERY` claims
/// and whenever the tail runs dry, which is what finds rows that committed late with a lower
/// id, or came back from a released batch.
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

    /// Records what a claim from `from` found; returns whether to claim again at once.
    fn claimed(&self, from: i64, claim: &outbox::Claim, batch_size: u32) -> bool {
        if let Some(last) = claim.rows.last() {
            self.next_id.fetch_max(last.id + 1, Ordering::Relaxed);
        }
        if claim.locked < batch_size {
            // The scan ran out of rows. After the last claimed id: look at the whole table
            // before calling it a day.
            if from > 0 {
                self.scan_all_next();
                return true;
            }
            return false;
        }
        if claim.rows.is_empty() {
            if let Some(last) = claim.last_locked.filter(|_| claim.locked_keys <= FEW_KEYS) {
                // A few keys' backlogs fill the scan (a burst on one aggregate): step the tail
                // over them, so that other keys' rows and unkeyed rows behind are not held up
                // until those backlogs drain one round trip per row; full scans still serve
                // those keys. Only forward: a scan that cannot move the tail waits like any.
                let tail = self.next_id.fetch_max(last + 1, Ordering::Relaxed);
                if last + 1 > tail {
                    return true;
                }
            }
            // Every row it found waits behind an earlier row of its key, in flight: only a
            // finished batch (or a commit) can change that, so wait for one instead of claiming
            // in vain. Those keys' next rows lie before a tail scan's start: look at the whole
            // table then.
            self.scan_all_next();
            return false;
        }
        if claim.locked == batch_size
            && claim.locked_keys > FEW_KEYS
            && kept_keys(claim) == claim.locked_keys
        {
            // Every key the scan found is now in flight in this very batch: a claim right away
            // would find the rest of the window held back behind it and keep nothing (half of
            // all claims in a 100-key drain, and most of Postgres's time there). Wait for a
            // finished batch or a commit instead, as after such an empty claim.
            self.scan_all_next();
            return false;
        }
        true
    }

    /// The next claim looks at the whole table.
    fn scan_all_next(&self) {
        self.full_next.store(true, Ordering::Relaxed);
    }
}

/// Partition keys among the rows a claim kept.
fn kept_keys(claim: &outbox::Claim) -> u32 {
    let keys: std::collections::HashSet<&str> = claim
        .rows
        .iter()
        .filter_map(|row| row.partition_key.as_deref())
        .collect();
    u32::try_from(keys.len()).unwrap_or(u32::MAX)
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
            if !self.stats.broker.usable() {
                tokio::select! {
                    biased;
                    _ = stop.cancelled() => return,
                    _ = self.stats.broker.until_usable() => {}
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
            if !self.stats.broker.usable() {
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
                    idle = true;
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

    /// One claim: begin a transaction and lock up to `batch_size` due rows in it.
    pub async fn claim_once(&self, permit: tokio::sync::OwnedSemaphorePermit) -> Result<Claimed> {
        let started = Instant::now();
        let finished_before = self.stats.finished();
        let mut tx = self.pool.begin().await.context("starting a claim")?;
        let from = self.scan.start();
        let claim = outbox::claim(&mut tx, self.batch_size, from, self.keys).await?;
        self.stats.record_claim();
        metrics::counter!("postbox_claims_total").increment(1);
        metrics::histogram!("postbox_claim_seconds").record(started.elapsed().as_secs_f64());
        tracing::trace!(
            rows = claim.rows.len(),
            locked = claim.locked,
            locked_keys = claim.locked_keys,
            last_locked = claim.last_locked,
            from,
            claim_ms = started.elapsed().as_secs_f64() * 1e3,
            "relay: claimed"
        );
        let mut again = self.scan.claimed(from, &claim, self.batch_size);
        if claim.rows.is_empty() {
            tx.rollback().await.context("ending an empty claim")?;
            // Waiting for a finished batch only works while one of this relay's batches is
            // open. With none open, claim again from the start if what held the rows back may
            // be gone: rows behind a tail scan's start (a late commit, a released batch), or a
            // batch that finished during this claim (after its snapshot, perhaps, and with its
            // wake-up taken by the other claimer, which skips this claim's locks and can come
            // up empty too). Otherwise only a commit or the poll would wake the claimers.
            let may_be_free = from > 0 || self.stats.finished() != finished_before;
            if !again && may_be_free && self.stats.open_batches() == 0 {
                self.scan.scan_all_next();
                again = true;
            }
            return Ok(if again {
                Claimed::Again
            } else {
                Claimed::Nothing
            });
        }
        Ok(Claimed::Batch {
            batch: Batch {
                tx,
                rows: claim.rows,
                claimed_at: Instant::now(),
                permit,
                _open: Open::new(self.stats.clone()),
            },
            again,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::outbox::{Claim, ClaimedRow};

    fn row(id: i64, key: Option<String>) -> ClaimedRow {
        ClaimedRow {
            id,
            message_id: uuid::Uuid::nil(),
            exchange: String::new(),
            routing_key: "q".into(),
            partition_key: key,
            payload: Vec::new(),
            content_type: "application/json".into(),
            headers: Ok(serde_json::json!({})),
            created_at: chrono::Utc::now(),
            attempts: 0,
            source: None,
        }
    }

    /// A full window of `keys` keys of which the claim kept one row each.
    fn one_row_per_key(keys: u32, batch_size: u32) -> Claim {
        Claim {
            rows: (0..keys)
                .map(|k| row(i64::from(k) + 1, Some(format!("key-{k}"))))
                .collect(),
            locked: batch_size,
            last_locked: Some(i64::from(batch_size)),
            locked_keys: keys,
        }
    }

    #[test]
    fn a_batch_holding_every_key_of_a_full_window_waits_instead_of_claiming_again() {
        let scan = Scan::default();
        let from = scan.start(); // the first claim is a full scan anyway
        assert!(!scan.claimed(from, &one_row_per_key(100, 500), 500));
        assert_eq!(scan.start(), 0, "the next claim looks at the whole table");

        // Whereas after a batch that claims again, the next claim starts after it.
        let scan = Scan::default();
        let from = scan.start();
        let mut claim = one_row_per_key(100, 500);
        claim.locked_keys = 120;
        assert!(scan.claimed(from, &claim, 500));
        assert_eq!(scan.start(), 101);
    }

    #[test]
    fn otherwise_a_kept_batch_claims_again() {
        // A few keys: the step-over handles them, and a claim again moves past them.
        assert!(Scan::default().claimed(0, &one_row_per_key(5, 500), 500));
        // Unkeyed rows fill the batch.
        let unkeyed = Claim {
            rows: (1..=500).map(|id| row(id, None)).collect(),
            locked: 500,
            last_locked: Some(500),
            locked_keys: 0,
        };
        assert!(Scan::default().claimed(0, &unkeyed, 500));
    }
}
