//! What the relay reports. Each event is counted in [`Stats`], in the Prometheus metrics and in
//! the log by one `emit`, so the three never disagree and each is written in one place.

use std::time::{Duration, Instant};

use super::Stats;
use crate::store::outbox::Completion;

/// A claim statement ran (whether or not it found rows).
pub(crate) struct Claimed {
    pub rows: usize,
    /// Rows the numbering pass before it numbered; `None` when another pass was at it.
    pub numbered: Option<u64>,
    pub from: i64,
    pub took: Duration,
}

impl Claimed {
    pub fn emit(&self, stats: &Stats) {
        stats.record_claim();
        metrics::counter!("postbox_claims_total").increment(1);
        metrics::histogram!("postbox_claim_seconds").record(self.took.as_secs_f64());
        tracing::trace!(
            rows = self.rows,
            numbered = self.numbered,
            from = self.from,
            claim_ms = self.took.as_secs_f64() * 1e3,
            "relay: claimed"
        );
    }
}

/// A batch's decisions were written and committed.
pub(crate) struct BatchMarked<'a> {
    pub completions: &'a [(i64, Completion)],
    /// Rows of the batch left without a decision, given back.
    pub released: u64,
    pub claimed_at: Instant,
    pub published_at: Instant,
    pub confirmed_at: Instant,
}

impl BatchMarked<'_> {
    pub fn emit(&self, stats: &Stats) {
        let (mut published, mut retried, mut dead) = (0u64, 0u64, 0u64);
        for (_, completion) in self.completions {
            match completion {
                Completion::Published => published += 1,
                Completion::Retry { .. } => retried += 1,
                Completion::Dead { .. } => dead += 1,
            }
        }
        let rows = self.completions.len() as u64 + self.released;
        let publish = self.published_at - self.claimed_at;
        let confirm = self.confirmed_at - self.published_at;
        let mark = self.confirmed_at.elapsed();
        stats.record(published, retried, dead, self.released);
        metrics::counter!("postbox_published_total").increment(published);
        metrics::counter!("postbox_retried_total").increment(retried);
        metrics::counter!("postbox_dead_total").increment(dead);
        metrics::counter!("postbox_released_total").increment(self.released);
        metrics::histogram!("postbox_batch_rows").record(rows as f64);
        metrics::histogram!("postbox_publish_seconds").record(publish.as_secs_f64());
        metrics::histogram!("postbox_confirm_seconds").record(confirm.as_secs_f64());
        metrics::histogram!("postbox_mark_seconds").record(mark.as_secs_f64());
        tracing::debug!(
            rows,
            published,
            retried,
            dead,
            released = self.released,
            publish_ms = publish.as_secs_f64() * 1e3,
            confirm_ms = confirm.as_secs_f64() * 1e3,
            mark_ms = mark.as_secs_f64() * 1e3,
            "relay: batch done"
        );
        for (id, completion) in self.completions {
            match completion {
                Completion::Published => {}
                Completion::Retry { error, retry_after } => {
                    tracing::warn!(id, %error, retry_in = ?retry_after, "relay: publish failed; will retry")
                }
                Completion::Dead { error } => {
                    tracing::error!(id, %error, "relay: publish failed for the last time; row marked dead")
                }
            }
        }
    }
}

/// A batch's rows went back unmarked, to be claimed again.
pub(crate) struct BatchReleased<'a> {
    pub rows: u64,
    pub why: Release<'a>,
}

/// Why a batch went back unmarked.
pub(crate) enum Release<'a> {
    /// Nothing was decided for it: the broker connection went away, a broker alarm, shutdown.
    Undecided,
    /// Writing its decisions failed; the transaction rolled back.
    MarkFailed(&'a crate::error::DatabaseError),
}

impl BatchReleased<'_> {
    pub fn emit(&self, stats: &Stats) {
        stats.record(0, 0, 0, self.rows);
        metrics::counter!("postbox_released_total").increment(self.rows);
        match self.why {
            Release::Undecided => {
                tracing::debug!(rows = self.rows, "relay: batch given back undecided")
            }
            Release::MarkFailed(error) => {
                metrics::counter!("postbox_mark_failures_total").increment(1);
                tracing::warn!(
                    %error,
                    rows = self.rows,
                    "relay: could not mark a batch; its rows stay pending and will be published again"
                );
            }
        }
    }
}
