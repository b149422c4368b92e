//! What a worker reports, one typed event per thing that happened: each counts in the
//! consumer's stats, in the metrics (`postbox_consumer_messages_total`) and in the log together,
//! once, after the outcome is committed.

use std::time::Duration;

use uuid::Uuid;

use super::Shared;
use crate::inbox::ConsumerStats;
use crate::store::inbox::{Outcome, Receipt};

/// The consumer's counters, as `ConsumerStats` and the metric's `outcome` label keep them.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Counter {
    Applied,
    Duplicates,
    Stale,
    DeadLettered,
    Discarded,
    Failures,
    Waiting,
    Skipped,
}

impl Counter {
    fn label(self) -> &'static str {
        match self {
            Counter::Applied => "applied",
            Counter::Duplicates => "duplicate",
            Counter::Stale => "stale",
            Counter::DeadLettered => "dead_lettered",
            Counter::Discarded => "discarded",
            Counter::Failures => "failure",
            Counter::Waiting => "waiting",
            Counter::Skipped => "skipped",
        }
    }
}

/// The outcomes of one batch transaction.
#[derive(Debug, Default)]
pub(super) struct BatchCounts {
    pub applied: usize,
    pub duplicates: usize,
    pub stale: usize,
    pub waiting: usize,
    pub skipped: usize,
}

/// Something a worker did with a message.
pub(super) enum Event<'a> {
    /// A message's outcome committed in its own transaction.
    Settled {
        receipt: &'a Receipt<'a>,
        outcome: Outcome,
    },
    /// A delivery of a message decided before, acked without running the handler.
    Duplicate { message_id: Uuid },
    /// A batch transaction committed.
    Batch(&'a BatchCounts),
    /// A failed run was recorded; the message runs again after `retry_in`, or is dead-lettered
    /// (`None`, reported by its own event).
    Failed {
        message_id: Uuid,
        attempt: u32,
        retry_in: Option<Duration>,
        error: &'a str,
    },
    /// The message went to the dead-letter destination (confirmed by the broker).
    DeadLettered {
        message_id: Uuid,
        attempts: u32,
        error: &'a str,
    },
    /// A malformed message was discarded, as `on_malformed = Discard` asks.
    Discarded { message_id: Uuid, reason: &'a str },
    /// Postgres is away: the worker waits this long, counting no attempt.
    Outage {
        retry_in: Duration,
        error: &'a (dyn std::fmt::Display + Sync),
    },
}

impl Event<'_> {
    /// Counts and logs the event.
    pub(super) fn emit<H>(&self, shared: &Shared<H>) {
        let count = |counter: Counter, n: usize| count(&shared.stats, &shared.name, counter, n);
        let (consumer, queue) = (shared.name.as_str(), shared.queue.as_str());
        match *self {
            Event::Settled { receipt, outcome } => {
                let (message_id, key) = (receipt.message_id, receipt.partition_key);
                match outcome {
                    Outcome::Waiting => {
                        count(Counter::Waiting, 1);
                        tracing::debug!(%message_id, partition_key = key, seq = receipt.seq, "consumer: message ahead of its stream held until its turn");
                    }
                    Outcome::Skipped => {
                        count(Counter::Skipped, 1);
                        tracing::info!(%message_id, partition_key = key, seq = receipt.seq, "consumer: a released row's number skipped");
                    }
                    Outcome::Stale => {
                        count(Counter::Stale, 1);
                        tracing::info!(%message_id, partition_key = key, version = receipt.version, "consumer: stale message skipped; a newer version was applied");
                    }
                    Outcome::Applied => count(Counter::Applied, 1),
                    Outcome::DeadLettered => count(Counter::DeadLettered, 1),
                    Outcome::Discarded => count(Counter::Discarded, 1),
                }
            }
            Event::Duplicate { message_id } => {
                count(Counter::Duplicates, 1);
                tracing::debug!(%message_id, "consumer: duplicate acked");
            }
            Event::Batch(counts) => {
                count(Counter::Applied, counts.applied);
                count(Counter::Duplicates, counts.duplicates);
                count(Counter::Stale, counts.stale);
                count(Counter::Waiting, counts.waiting);
                count(Counter::Skipped, counts.skipped);
            }
            Event::Failed {
                message_id,
                attempt,
                retry_in,
                error,
            } => {
                count(Counter::Failures, 1);
                if let Some(retry_in) = retry_in {
                    tracing::warn!(
                        %message_id, queue, attempt,
                        max_attempts = shared.options.max_attempts, ?retry_in, error,
                        "consumer: handler failed; retrying"
                    );
                }
            }
            Event::DeadLettered {
                message_id,
                attempts,
                error,
            } => {
                count(Counter::DeadLettered, 1);
                tracing::warn!(%message_id, queue, consumer, attempts, error, "consumer: message dead-lettered");
            }
            Event::Discarded { message_id, reason } => {
                count(Counter::Discarded, 1);
                tracing::warn!(%message_id, queue, consumer, reason, "consumer: malformed message discarded");
            }
            Event::Outage { retry_in, error } => {
                tracing::warn!(%error, ?retry_in, consumer, "consumer: postgres unavailable; not counted as an attempt");
            }
        }
    }
}

/// Adds `n` to `counter` in the stats and the metric.
fn count(stats: &ConsumerStats, consumer: &str, counter: Counter, n: usize) {
    if n == 0 {
        return;
    }
    let n = n as u64;
    stats.record(counter, n);
    metrics::counter!(
        "postbox_consumer_messages_total",
        "consumer" => consumer.to_owned(),
        "outcome" => counter.label()
    )
    .increment(n);
}
