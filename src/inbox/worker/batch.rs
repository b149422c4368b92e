//! Several deliveries in one transaction: one inbox statement sorts out duplicates, stale and
//! early messages, the handler applies the rest together, one commit, then the acks. Anything
//! unusual falls back to the single path, message by message.

use std::fmt;
use std::panic::AssertUnwindSafe;

use futures_util::FutureExt;

use super::disposition::panicked;
use super::events::{BatchCounts, Event};
use super::{Job, Worker};
use crate::error::Context;
use crate::inbox::receive::{hold, Status};
use crate::inbox::{ConsumerError, Handler, HandlerError, Incoming};
use crate::store::inbox::Receipt;

/// Why a batch transaction was rolled back; its messages then go one by one, where each gets
/// the retries, counting and dead-lettering of its own.
enum BatchFailed {
    /// An inbox statement, the begin or the commit failed.
    Database(ConsumerError),
    /// A message of the batch has no attempts left: the single path dead-letters it.
    Exhausted {
        message_id: uuid::Uuid,
        failed_attempts: u32,
    },
    /// The handler failed (or panicked) on the batch.
    Handler(HandlerError),
}

impl From<ConsumerError> for BatchFailed {
    fn from(error: ConsumerError) -> Self {
        BatchFailed::Database(error)
    }
}

impl From<crate::error::DatabaseError> for BatchFailed {
    fn from(error: crate::error::DatabaseError) -> Self {
        BatchFailed::Database(error.into())
    }
}

impl fmt::Display for BatchFailed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BatchFailed::Database(error) => write!(f, "{error}"),
            BatchFailed::Exhausted {
                message_id,
                failed_attempts,
            } => write!(
                f,
                "message {message_id} failed {failed_attempts} times before"
            ),
            BatchFailed::Handler(failure) => write!(f, "the batch handler failed: {failure}"),
        }
    }
}

impl<H: Handler> Worker<H> {
    /// Processes `jobs` (drained) in one transaction: one inbox statement filters out the
    /// duplicates, the handler applies the rest as a batch, one commit, then the acks. Anything
    /// unusual (malformed messages, a failing batch, Postgres down) falls back to processing
    /// messages one by one, which retries and dead-letters as usual.
    pub async fn process_batch(&self, jobs: &mut Vec<Job>, ack_multiple: bool) {
        let mut all_done = true;
        let mut messages = Vec::with_capacity(jobs.len());
        let mut ackers = Vec::with_capacity(jobs.len());
        for job in jobs.drain(..) {
            match job.message {
                Ok(incoming) => {
                    messages.push(incoming);
                    ackers.push(job.acker);
                }
                malformed => {
                    all_done &= self
                        .process(Job {
                            acker: job.acker,
                            message: malformed,
                        })
                        .await;
                }
            }
        }
        let Some(last) = ackers.last() else {
            return;
        };
        // A redelivery's run is counted ahead (see `process_incoming`), one message at a time;
        // a batch holding one (after a reconnect, say) goes one by one, in order.
        let sequenced = messages.iter().any(|m| self.stream_of(m).is_some());
        let batch = if messages.iter().any(|m| m.redelivered) {
            None
        } else {
            Some(self.apply_batch(&messages).await)
        };
        match batch {
            Some(Ok(counts)) => {
                self.emit(Event::Batch(&counts));
                if ack_multiple && all_done {
                    self.ack(last, true).await;
                } else {
                    for acker in &ackers {
                        self.ack(acker, false).await;
                    }
                }
                if sequenced {
                    // Held messages whose turn this batch brought.
                    self.drain_ready().await;
                }
            }
            unbatched => {
                if let Some(Err(failure)) = unbatched {
                    tracing::debug!(error = %failure, messages = messages.len(), "consumer: batch failed; processing its messages one by one");
                }
                for (incoming, acker) in messages.into_iter().zip(ackers) {
                    if !self
                        .process(Job {
                            acker,
                            message: Ok(incoming),
                        })
                        .await
                    {
                        return;
                    }
                }
            }
        }
    }

    /// The batch transaction. Returns the count of each outcome.
    async fn apply_batch(&self, messages: &[Incoming]) -> Result<BatchCounts, BatchFailed> {
        let shared = &self.shared;
        let mut tx = shared
            .pool
            .begin()
            .await
            .context("beginning a batch transaction")?;
        let receipts: Vec<Receipt<'_>> = messages
            .iter()
            .map(|incoming| self.receipt(incoming))
            .collect();
        let statuses = crate::inbox::receive_batch(&mut tx, &receipts).await?;
        let mut counts = BatchCounts::default();
        let mut batch = Vec::with_capacity(messages.len());
        // Each stream's messages go to the handler in number order.
        for i in crate::inbox::apply_order(&receipts) {
            let incoming = &messages[i];
            match statuses[i] {
                Status::Duplicate => counts.duplicates += 1,
                Status::Stale => counts.stale += 1,
                Status::Skipped => counts.skipped += 1,
                Status::Ahead => {
                    hold(
                        &mut tx,
                        &receipts[i],
                        &incoming.properties,
                        &incoming.payload,
                    )
                    .await?;
                    counts.waiting += 1;
                }
                // Rolled back: one by one, the message goes where its attempts say.
                Status::New { failed_attempts } if shared.retry.exhausted(failed_attempts) => {
                    return Err(BatchFailed::Exhausted {
                        message_id: incoming.message_id,
                        failed_attempts,
                    });
                }
                Status::New { failed_attempts } => {
                    let mut incoming = incoming.clone();
                    incoming.attempt = failed_attempts.saturating_add(1);
                    batch.push(incoming);
                }
            }
        }
        counts.applied = batch.len();
        // A panic fails the batch; the one-by-one rerun then counts it against its message.
        AssertUnwindSafe(shared.handler.handle_batch(&mut tx, &batch))
            .catch_unwind()
            .await
            .map_err(|panic| BatchFailed::Handler(panicked(panic)))?
            .map_err(BatchFailed::Handler)?;
        tx.commit()
            .await
            .context("committing a batch transaction")?;
        Ok(counts)
    }
}
