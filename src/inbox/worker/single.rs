//! One delivery at a time: claim its id in the inbox, check its version or stream number, run
//! the handler, all in one transaction; commit, then ack. Failed runs are recorded and retried
//! or dead-lettered as `disposition` decides; Postgres outages are waited out uncounted.

use std::panic::AssertUnwindSafe;
use std::sync::atomic::Ordering;
use std::time::Duration;

use futures_util::FutureExt;
use tracing::Instrument;

use super::disposition::{self, panicked, AfterRecorded, Disposition, Failed};
use super::{Event, Worker};
use crate::error::Context;
use crate::inbox::receive::{hold, receive_turn, Status};
use crate::inbox::{Handler, HandlerError, Incoming};
use crate::reconnect::connection_backoff;
use crate::store::inbox::{self, Outcome, Receipt};

/// Where a message ended up.
enum Decision {
    Duplicate,
    Decided(Outcome),
    /// Failed `max_attempts` times already (before a restart, say).
    Exhausted {
        attempts: u32,
    },
}

impl<H: Handler> Worker<H> {
    pub(super) async fn process_incoming(&self, mut incoming: Incoming) -> bool {
        let shared = &self.shared;
        let owned = incoming.clone();
        let receipt = self.receipt(&owned);
        let mut outages = connection_backoff();
        // A redelivered message may be back because its last run took the consumer down (out of
        // memory, an abort, a kill), and such a run records nothing. So a redelivery's run is
        // counted before it starts, in its own transaction, and uncounted in the transaction
        // that records its outcome: a message that keeps taking consumers down is dead-lettered
        // after `max_attempts` runs, as one that keeps failing is. Rare (redeliveries follow a
        // lost connection or a crash), so the extra statement costs nothing in the usual case.
        let mut counted_ahead = false;
        if incoming.redelivered {
            loop {
                if self.session.is_cancelled() {
                    return false;
                }
                match inbox::count_run_ahead(&shared.pool, &receipt).await {
                    Ok(counted) => {
                        // None: decided meanwhile; the run sees a duplicate.
                        counted_ahead = counted.is_some();
                        break;
                    }
                    Err(error) if error.refuses_values() => {
                        let error = error.to_string();
                        return self
                            .dead_letter(&incoming, None, &error, incoming.attempt)
                            .await;
                    }
                    Err(error) => self.outage(&mut outages, &error).await,
                }
            }
        }
        loop {
            if self.session.is_cancelled() {
                if counted_ahead {
                    // Counted, but it never ran (or met an outage, which is not counted).
                    if let Err(error) = inbox::uncount_run(&shared.pool, &receipt).await {
                        tracing::warn!(message_id = %receipt.message_id, %error, "consumer: a run counted ahead of a stop stays counted");
                    }
                }
                return false;
            }
            let run = self.run_once(&mut incoming, &receipt, counted_ahead).await;
            let failure = match run {
                // A held message another instance applied a moment before: no delivery.
                Ok(Decision::Duplicate) if incoming.its_turn => return true,
                Ok(Decision::Duplicate) => {
                    self.emit(Event::Duplicate {
                        message_id: incoming.message_id,
                    });
                    return true;
                }
                Ok(Decision::Decided(outcome)) => {
                    self.emit(Event::Settled {
                        receipt: &receipt,
                        outcome,
                    });
                    return true;
                }
                Ok(Decision::Exhausted { attempts }) => {
                    let error = format!("failed {attempts} times before; giving up");
                    return self
                        .dead_letter(&incoming, Some(&receipt), &error, attempts)
                        .await;
                }
                Err(failed) => failed,
            };
            let error = match &failure {
                Failed::Database(error) => error.to_string(),
                Failed::Handler(failure) => failure.to_string(),
                Failed::Refused(error) => error.clone(),
            };
            // A message Postgres refuses gets no inbox row (Postgres would refuse that too).
            let receipt_of_run = match failure {
                Failed::Refused(_) => None,
                _ => Some(&receipt),
            };
            match disposition::on_failure(&failure) {
                Disposition::WaitForOutage => {
                    self.outage(&mut outages, &error).await;
                    continue;
                }
                Disposition::Malformed => {
                    return self
                        .malformed(&incoming, receipt_of_run, &error, incoming.attempt)
                        .await;
                }
                Disposition::DeadLetter => {
                    return self
                        .dead_letter(&incoming, receipt_of_run, &error, incoming.attempt)
                        .await;
                }
                Disposition::Record => {}
            }
            // A run counted ahead is not counted again; the retries after it are runs of their
            // own.
            let recorded = if std::mem::take(&mut counted_ahead) {
                inbox::record_error(&shared.pool, &receipt, &error).await
            } else {
                inbox::record_failure(&shared.pool, &receipt, &error).await
            }
            .map(|failures| failures.map(|n| u32::try_from(n).unwrap_or(0)));
            let failures = match recorded {
                Ok(Some(failures)) => failures,
                // Decided meanwhile by another consumer instance: the next run sees it.
                Ok(None) => continue,
                // Postgres refuses this message's receipt: no run can ever be counted.
                Err(db_error) if db_error.refuses_values() => {
                    let error =
                        format!("{error}; and its failure could not be recorded: {db_error}");
                    return self
                        .dead_letter(&incoming, None, &error, incoming.attempt)
                        .await;
                }
                // Not recorded, so not counted: an outage must not dead-letter messages.
                Err(db_error) => {
                    self.outage(&mut outages, &db_error).await;
                    continue;
                }
            };
            let next = disposition::after_recorded(failures, &shared.retry);
            self.emit(Event::Failed {
                message_id: incoming.message_id,
                attempt: failures,
                retry_in: match next {
                    AfterRecorded::RetryAfter(delay) => Some(delay),
                    AfterRecorded::DeadLetter => None,
                },
                error: &error,
            });
            let AfterRecorded::RetryAfter(delay) = next else {
                return self
                    .dead_letter(&incoming, Some(&receipt), &error, failures)
                    .await;
            };
            self.load.retrying.store(true, Ordering::Relaxed);
            self.pause(delay).await;
            self.load.retrying.store(false, Ordering::Relaxed);
        }
    }

    /// Waits out a Postgres outage (the next delay of `outages`), unless the session ends.
    pub(super) async fn outage(
        &self,
        outages: &mut impl Iterator<Item = Duration>,
        error: &(dyn std::fmt::Display + Sync),
    ) {
        let delay = outages.next().unwrap_or(Duration::from_secs(10));
        self.emit(Event::Outage {
            retry_in: delay,
            error,
        });
        self.pause(delay).await;
    }

    /// One transaction: claim the id, check the version, run the handler, record the outcome.
    /// `counted_ahead`: this run is already counted among the message's failed runs (a
    /// redelivery's); it is uncounted with the outcome.
    async fn run_once(
        &self,
        incoming: &mut Incoming,
        receipt: &Receipt<'_>,
        counted_ahead: bool,
    ) -> Result<Decision, Failed> {
        let shared = &self.shared;
        let mut tx = shared
            .pool
            .begin()
            .await
            .context("beginning the inbox transaction")
            .map_err(|error| Failed::Database(error.into()))?;
        let (status, next_held) = receive_turn(&mut tx, receipt, incoming.its_turn)
            .await
            .map_err(Failed::inbox)?;
        let outcome = match status {
            Status::Duplicate => None,
            Status::Ahead => {
                hold(&mut tx, receipt, &incoming.properties, &incoming.payload)
                    .await
                    .map_err(Failed::inbox)?;
                Some(Outcome::Waiting)
            }
            Status::Skipped => Some(Outcome::Skipped),
            Status::Stale => Some(Outcome::Stale),
            Status::New { failed_attempts } => {
                let failed_before = failed_attempts.saturating_sub(u32::from(counted_ahead));
                // The dead-letter path records the outcome, with the runs there were.
                if shared.retry.exhausted(failed_before) {
                    if counted_ahead {
                        // Not in `tx`, which already says `applied`: rolled back first.
                        tx.rollback()
                            .await
                            .context("rolling back the inbox transaction")
                            .map_err(|error| Failed::Database(error.into()))?;
                        inbox::uncount_run(&shared.pool, receipt)
                            .await
                            .map_err(Failed::inbox)?;
                    }
                    return Ok(Decision::Exhausted {
                        attempts: failed_before,
                    });
                }
                incoming.attempt = failed_before.saturating_add(1);
                // The handler's span carries the producer's trace ids (as fields, not as a
                // remote parent: that takes an OpenTelemetry layer).
                let trace = incoming.traceparent();
                let span = tracing::info_span!(
                    "postbox.handle",
                    consumer = %shared.name,
                    message_id = %receipt.message_id,
                    attempt = incoming.attempt,
                    trace_id = trace.as_ref().map(|t| t.trace_id.as_str()),
                    parent_id = trace.as_ref().map(|t| t.parent_id.as_str()),
                );
                // A panicking handler is a failed run like any other (counted, retried, then
                // dead-lettered), not a lost worker whose message comes back uncounted forever.
                AssertUnwindSafe(shared.handler.handle(&mut tx, incoming).instrument(span))
                    .catch_unwind()
                    .await
                    .map_err(|panic| Failed::Handler(panicked(panic)))?
                    .map_err(Failed::Handler)?;
                Some(Outcome::Applied)
            }
        };
        if counted_ahead && outcome.is_some() {
            inbox::uncount_run(&mut *tx, receipt)
                .await
                .map_err(Failed::inbox)?;
        }
        tx.commit()
            .await
            .context("committing the inbox transaction")
            .map_err(|e| Failed::Handler(HandlerError::transient(e)))?;
        self.next_held.store(next_held, Ordering::Relaxed);
        Ok(match outcome {
            None => Decision::Duplicate,
            Some(outcome) => Decision::Decided(outcome),
        })
    }
}
