//! A consumer's worker: processes the deliveries sent to it, in order. One delivery (`single`):
//! claim its id in the inbox, check its version or stream number, run the handler, all in one
//! transaction; commit, then ack. Several (`batch`): one transaction for all, falling back to
//! one by one. What follows a failed run is decided in `disposition`.

mod batch;
mod disposition;
mod events;
mod single;

pub(crate) use events::Counter;
use events::Event;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use lapin::options::BasicAckOptions;
use lapin::Acker;
use lapin::BasicProperties;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use super::dead_letter::{Cause, DeadLetters};
use super::Versioning;
use super::{ConsumerOptions, ConsumerStats, Handler, Incoming, MalformedPolicy};
use crate::reconnect::{connection_backoff, until_ok_finishing};
use crate::retry::RetryPolicy;
use crate::store::inbox::{self, Outcome, Receipt};
use crate::store::inbox_streams::{self, StreamKey};

/// A delivery on its way to a worker.
pub(crate) struct Job {
    pub acker: Acker,
    pub message: Result<Incoming, Malformed>,
}

/// A delivery postbox cannot process: what is needed to dead-letter it.
pub(crate) struct Malformed {
    pub reason: String,
    pub exchange: String,
    pub routing_key: String,
    pub properties: BasicProperties,
    pub payload: Vec<u8>,
}

/// What the consumer shares with its workers.
pub(crate) struct Shared<H> {
    pub pool: PgPool,
    pub queue: String,
    pub name: String,
    pub handler: H,
    pub options: ConsumerOptions,
    /// The schedule of handler retries, from `options`.
    pub retry: RetryPolicy,
    pub stats: Arc<ConsumerStats>,
}

/// One worker of a session: processes the deliveries sent to it, in order.
pub(crate) struct Worker<H> {
    pub shared: Arc<Shared<H>>,
    pub dead_letters: Arc<DeadLetters>,
    /// Cancelled when the session ends (shutdown or connection lost): deliveries not yet
    /// started are left to the broker to redeliver, retries stop waiting.
    pub session: CancellationToken,
    /// What the dispatcher reads to send unkeyed deliveries where they wait least.
    pub load: Arc<Load>,
    /// Set by a run that applied a stream's number while the next one was held already: the
    /// worker applies the held ones right after (otherwise it does not look for any).
    pub next_held: AtomicBool,
}

/// How busy a worker is, as the dispatcher sees it.
#[derive(Debug, Default)]
pub(crate) struct Load {
    /// Deliveries sent to the worker and not yet finished.
    pub queued: AtomicUsize,
    /// Waiting out a failed run's backoff: whatever is sent to it waits at least that long.
    pub retrying: AtomicBool,
}

impl<H: Handler> Worker<H> {
    /// Processes `job` and acks it once its outcome is committed. Returns false, without
    /// acking, if the session ends first; the broker then redelivers the message.
    pub async fn process(&self, job: Job) -> bool {
        let Job { acker, message } = job;
        let (done, stream) = match message {
            Ok(incoming) => {
                let stream = self.stream_of(&incoming);
                (self.process_incoming(incoming).await, stream)
            }
            Err(malformed) => (self.reject_malformed(malformed).await, None),
        };
        if done {
            self.ack(&acker, false).await;
            if let Some(stream) = stream.filter(|_| self.next_held.swap(false, Ordering::Relaxed)) {
                return self.drain(&stream).await;
            }
        }
        done
    }

    /// The stream `incoming` is ordered in, if the consumer orders it by number.
    fn stream_of(&self, incoming: &Incoming) -> Option<StreamKey> {
        let receipt = self.receipt(incoming);
        receipt.seq.and(super::receive::stream_of(&receipt))
    }

    /// Counts and logs `event` (see [`events`]).
    fn emit(&self, event: Event<'_>) {
        event.emit(&self.shared);
    }

    async fn ack(&self, acker: &Acker, multiple: bool) {
        if let Err(error) = acker.ack(BasicAckOptions { multiple }).await {
            // The outcome is committed: the redelivery will be recognized as a duplicate.
            tracing::warn!(%error, queue = %self.shared.queue, "consumer: ack failed; the message will come back as a duplicate");
        }
    }

    /// What the inbox records of `incoming`: its version or its stream number, as the
    /// consumer's options say.
    fn receipt<'a>(&'a self, incoming: &'a Incoming) -> Receipt<'a> {
        let shared = &self.shared;
        let (version, seq) = match &shared.options.versioning {
            Versioning::Sequence => (None, incoming.seq()),
            Versioning::OutboxId => (incoming.outbox_id(), None),
            Versioning::Header(name) => (incoming.header_i64(name), None),
            Versioning::Off => (None, None),
        };
        Receipt {
            consumer: &shared.name,
            message_id: incoming.message_id,
            queue: &shared.queue,
            exchange: &incoming.exchange,
            routing_key: &incoming.routing_key,
            partition_key: incoming.partition_key(),
            version,
            seq,
            skip: incoming.is_skip(),
            source: incoming.source(),
        }
    }

    /// Applies the held messages of every stream whose turn has come (see [`Worker::drain`]).
    /// Returns false if the session ended first.
    pub async fn drain_ready(&self) -> bool {
        let shared = &self.shared;
        let ready =
            inbox_streams::ready(&shared.pool, &shared.name, shared.options.stream_start_wait)
                .await;
        match ready {
            Ok(streams) => {
                for stream in streams {
                    if !self.drain(&stream).await {
                        return false;
                    }
                }
                true
            }
            // The consumer's periodic check tries again.
            Err(error) => {
                tracing::warn!(%error, consumer = %shared.name, "consumer: could not look for held messages");
                true
            }
        }
    }

    /// Applies the messages of `stream` held in `postbox.inbox_waiting` whose turn has come,
    /// one after another, as deliveries are (retried, dead-lettered). Returns false if the
    /// session ended first.
    pub async fn drain(&self, stream: &StreamKey) -> bool {
        let mut outages = connection_backoff();
        let mut previous = None;
        loop {
            if self.session.is_cancelled() {
                return false;
            }
            // This loop looks for the next held message itself.
            self.next_held.store(false, Ordering::Relaxed);
            let waiting = match inbox_streams::next_waiting(&self.shared.pool, stream).await {
                Ok(Some(waiting)) => waiting,
                Ok(None) => return true,
                Err(error) => {
                    self.outage(&mut outages, &error).await;
                    continue;
                }
            };
            if previous == Some(waiting.seq) {
                // Processed, yet still the next one: its outcome did not move the stream.
                tracing::error!(consumer = %self.shared.name, partition_key = %stream.partition_key, seq = waiting.seq, "consumer: a waiting message did not move its stream on; leaving it for the next check");
                return true;
            }
            previous = Some(waiting.seq);
            let seq = waiting.seq;
            match Incoming::from_waiting(stream, waiting) {
                (incoming, None) => {
                    if !self.process_incoming(incoming).await {
                        return false;
                    }
                }
                // Stored by this library, so not expected: the body goes to the dead letters
                // (nothing is lost) and the stream takes its turn past it.
                (incoming, Some(reason)) => {
                    tracing::error!(consumer = %self.shared.name, seq, %reason, "consumer: a waiting message cannot be read back; dead-lettering it");
                    let receipt = self.receipt(&incoming);
                    if !self
                        .dead_letter(&incoming, Some(&receipt), &reason, 0)
                        .await
                    {
                        return false;
                    }
                }
            }
        }
    }

    async fn reject_malformed(&self, malformed: Malformed) -> bool {
        let incoming = Incoming {
            message_id: uuid::Uuid::nil(),
            queue: self.shared.queue.clone(),
            exchange: malformed.exchange,
            routing_key: malformed.routing_key,
            redelivered: false,
            properties: malformed.properties,
            payload: malformed.payload,
            attempt: 0,
            its_turn: false,
        };
        self.malformed(&incoming, None, &malformed.reason, 0).await
    }

    /// Applies the malformed-message policy. Without a usable message id there is no inbox
    /// row to write.
    async fn malformed(
        &self,
        incoming: &Incoming,
        receipt: Option<&Receipt<'_>>,
        reason: &str,
        attempts: u32,
    ) -> bool {
        let shared = &self.shared;
        match shared.options.on_malformed {
            MalformedPolicy::DeadLetter => {
                self.dead_letter(incoming, receipt, reason, attempts).await
            }
            MalformedPolicy::Discard => {
                if let Some(receipt) = receipt {
                    if !self
                        .record(receipt, Outcome::Discarded, reason, attempts)
                        .await
                    {
                        return false;
                    }
                }
                self.emit(Event::Discarded {
                    message_id: incoming.message_id,
                    reason,
                });
                true
            }
        }
    }

    /// Publishes to the dead-letter destination (retrying until the broker confirms), then
    /// records the outcome. Returns whether the original may be acked.
    async fn dead_letter(
        &self,
        incoming: &Incoming,
        receipt: Option<&Receipt<'_>>,
        error: &str,
        attempts: u32,
    ) -> bool {
        let shared = &self.shared;
        let cause = Cause {
            consumer: &shared.name,
            queue: &shared.queue,
            exchange: &incoming.exchange,
            routing_key: &incoming.routing_key,
            error,
            attempts,
        };
        // Until the broker confirms: the original stays unacked meanwhile, so nothing is lost.
        let published = until_ok_finishing("consumer: dead-lettering", &self.session, || {
            self.dead_letters
                .publish(&incoming.payload, &incoming.properties, &cause)
        })
        .await;
        if published.is_none() {
            return false;
        }
        if let Some(receipt) = receipt {
            if !self
                .record(receipt, Outcome::DeadLettered, error, attempts)
                .await
            {
                return false;
            }
        }
        self.emit(Event::DeadLettered {
            message_id: incoming.message_id,
            attempts,
            error,
        });
        true
    }

    /// Records an outcome decided outside the handler's transaction, retrying while Postgres
    /// is down. An attempt under way finishes even if the session ends; returns false if the
    /// session ended before one succeeded.
    async fn record(
        &self,
        receipt: &Receipt<'_>,
        outcome: Outcome,
        error: &str,
        attempts: u32,
    ) -> bool {
        let stream = receipt.seq.zip(super::receive::stream_of(receipt));
        until_ok_finishing("consumer: recording the outcome", &self.session, || async {
            inbox::record_outcome(&self.shared.pool, receipt, outcome, Some(error), attempts)
                .await?;
            // Decided all the same: its stream goes on past it, and what it held back may go.
            if let Some((seq, stream)) = &stream {
                inbox_streams::settle(&self.shared.pool, stream, *seq).await?;
                self.next_held.store(true, Ordering::Relaxed);
            }
            Ok::<_, crate::error::DatabaseError>(())
        })
        .await
        .is_some()
    }

    /// Sleeps for `delay` unless the session ends first; returns whether it slept in full.
    async fn pause(&self, delay: Duration) -> bool {
        tokio::select! {
            _ = self.session.cancelled() => false,
            _ = tokio::time::sleep(delay) => true,
        }
    }
}
