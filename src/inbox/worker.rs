//! Processing one delivery: claim its id in the inbox, check its version, run the handler, all
//! in one transaction; commit, then ack. Failures are retried, recorded, and dead-lettered.

use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures_util::FutureExt;

use lapin::options::BasicAckOptions;
use lapin::Acker;
use lapin::BasicProperties;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::dead_letter::{Cause, DeadLetters};
use super::receive::{hold, receive_turn, Status};
use super::{ConsumerOptions, ConsumerStats, FailureKind, Handler, Incoming, MalformedPolicy};
use super::{HandlerError, Versioning};
use crate::error::Context;
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

/// What a batch transaction decided, message by message.
#[derive(Debug, Default)]
struct BatchCounts {
    applied: usize,
    duplicates: usize,
    stale: usize,
    waiting: usize,
    skipped: usize,
}

/// Why a run did not decide the message.
enum Failed {
    /// Postgres could not be reached: wait and retry without counting an attempt.
    Database(crate::Error),
    /// The handler (or its commit) failed.
    Handler(HandlerError),
    /// Postgres refuses the message's own values in the inbox: no run can ever record it.
    Refused(String),
}

/// Where a message ended up.
enum Decision {
    Duplicate,
    Decided(Outcome),
    /// Failed `max_attempts` times already (before a restart, say).
    Exhausted {
        attempts: u32,
    },
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

    /// Counts in the consumer's stats and in the metrics (`postbox_consumer_messages_total`).
    fn count(&self, counter: Counter) {
        self.count_many(counter, 1);
    }

    fn count_many(&self, counter: Counter, n: u64) {
        if n == 0 {
            return;
        }
        self.shared.stats.record(counter, n);
        let outcome = match counter {
            Counter::Applied => "applied",
            Counter::Duplicates => "duplicate",
            Counter::Stale => "stale",
            Counter::DeadLettered => "dead_lettered",
            Counter::Discarded => "discarded",
            Counter::Failures => "failure",
            Counter::Waiting => "waiting",
            Counter::Skipped => "skipped",
        };
        metrics::counter!(
            "postbox_consumer_messages_total",
            "consumer" => self.shared.name.clone(),
            "outcome" => outcome
        )
        .increment(n);
    }

    async fn ack(&self, acker: &Acker, multiple: bool) {
        if let Err(error) = acker.ack(BasicAckOptions { multiple }).await {
            // The outcome is committed: the redelivery will be recognized as a duplicate.
            tracing::warn!(%error, queue = %self.shared.queue, "consumer: ack failed; the message will come back as a duplicate");
        }
    }

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
                self.count_many(Counter::Applied, counts.applied as u64);
                self.count_many(Counter::Duplicates, counts.duplicates as u64);
                self.count_many(Counter::Stale, counts.stale as u64);
                self.count_many(Counter::Waiting, counts.waiting as u64);
                self.count_many(Counter::Skipped, counts.skipped as u64);
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
    async fn apply_batch(&self, messages: &[Incoming]) -> Result<BatchCounts, String> {
        let shared = &self.shared;
        let mut tx = shared.pool.begin().await.map_err(|e| e.to_string())?;
        let receipts: Vec<Receipt<'_>> = messages
            .iter()
            .map(|incoming| self.receipt(incoming))
            .collect();
        let statuses = super::receive_batch(&mut tx, &receipts)
            .await
            .map_err(|e| e.to_string())?;
        let mut counts = BatchCounts::default();
        let mut batch = Vec::with_capacity(messages.len());
        // Each stream's messages go to the handler in number order.
        for i in super::apply_order(&receipts) {
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
                    .await
                    .map_err(|e| e.to_string())?;
                    counts.waiting += 1;
                }
                // Rolled back: one by one, the message goes where its attempts say.
                Status::New { failed_attempts } if shared.retry.exhausted(failed_attempts) => {
                    return Err(format!(
                        "message {} failed {failed_attempts} times before",
                        incoming.message_id
                    ));
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
            .map_err(|panic| panicked(panic).to_string())?
            .map_err(|e| e.to_string())?;
        tx.commit().await.map_err(|e| e.to_string())?;
        Ok(counts)
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

    async fn process_incoming(&self, mut incoming: Incoming) -> bool {
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
                    Err(error) if !is_outage(&error) => {
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
                    self.count(Counter::Duplicates);
                    tracing::debug!(message_id = %incoming.message_id, "consumer: duplicate acked");
                    return true;
                }
                Ok(Decision::Decided(outcome)) => {
                    self.count(match outcome {
                        Outcome::Stale => Counter::Stale,
                        Outcome::Waiting => Counter::Waiting,
                        Outcome::Skipped => Counter::Skipped,
                        _ => Counter::Applied,
                    });
                    return true;
                }
                Ok(Decision::Exhausted { attempts }) => {
                    let error = format!("failed {attempts} times before; giving up");
                    return self
                        .dead_letter(&incoming, Some(&receipt), &error, attempts)
                        .await;
                }
                Err(Failed::Database(error)) => {
                    self.outage(&mut outages, &error).await;
                    continue;
                }
                // Without an inbox row: Postgres would refuse that too.
                Err(Failed::Refused(error)) => {
                    return self
                        .dead_letter(&incoming, None, &error, incoming.attempt)
                        .await;
                }
                // The handler's own queries lost Postgres: an outage, not the message's fault,
                // so no attempt is counted.
                Err(Failed::Handler(failure)) if lost_connection(&failure) => {
                    self.outage(&mut outages, &failure).await;
                    continue;
                }
                Err(Failed::Handler(failure)) => failure,
            };
            let error = failure.to_string();
            match failure.kind() {
                FailureKind::Malformed => {
                    return self
                        .malformed(&incoming, Some(&receipt), &error, incoming.attempt)
                        .await;
                }
                FailureKind::Permanent => {
                    return self
                        .dead_letter(&incoming, Some(&receipt), &error, incoming.attempt)
                        .await;
                }
                FailureKind::Transient => {}
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
                Ok(Some(failures)) => {
                    self.count(Counter::Failures);
                    failures
                }
                // Decided meanwhile by another consumer instance: the next run sees it.
                Ok(None) => continue,
                // Postgres refuses this message's receipt: no run can ever be counted.
                Err(db_error) if !is_outage(&db_error) => {
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
            if shared.retry.exhausted(failures) {
                return self
                    .dead_letter(&incoming, Some(&receipt), &error, failures)
                    .await;
            }
            let delay = shared.retry.delay(failures);
            tracing::warn!(
                message_id = %incoming.message_id, queue = %shared.queue, attempt = failures,
                max_attempts = shared.options.max_attempts, retry_in = ?delay, %error,
                "consumer: handler failed; retrying"
            );
            self.load.retrying.store(true, Ordering::Relaxed);
            self.pause(delay).await;
            self.load.retrying.store(false, Ordering::Relaxed);
        }
    }

    /// Waits out a Postgres outage (the next delay of `outages`), unless the session ends.
    async fn outage(
        &self,
        outages: &mut impl Iterator<Item = Duration>,
        error: &(dyn std::fmt::Display + Sync),
    ) {
        let delay = outages.next().unwrap_or(Duration::from_secs(10));
        tracing::warn!(%error, retry_in = ?delay, "consumer: postgres unavailable; not counted as an attempt");
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
            .map_err(Failed::Database)?;
        let (status, next_held) = receive_turn(&mut tx, receipt, incoming.its_turn)
            .await
            .map_err(refused_by_postgres)?;
        let outcome = match status {
            Status::Duplicate => None,
            Status::Ahead => {
                hold(&mut tx, receipt, &incoming.properties, &incoming.payload)
                    .await
                    .map_err(refused_by_postgres)?;
                tracing::debug!(message_id = %receipt.message_id, partition_key = receipt.partition_key, seq = receipt.seq, "consumer: message ahead of its stream held until its turn");
                Some(Outcome::Waiting)
            }
            Status::Skipped => {
                tracing::info!(message_id = %receipt.message_id, partition_key = receipt.partition_key, seq = receipt.seq, "consumer: a released row's number skipped");
                Some(Outcome::Skipped)
            }
            Status::Stale => {
                tracing::info!(message_id = %receipt.message_id, partition_key = receipt.partition_key, version = receipt.version, "consumer: stale message skipped; a newer version was applied");
                Some(Outcome::Stale)
            }
            Status::New { failed_attempts } => {
                let failed_before = failed_attempts.saturating_sub(u32::from(counted_ahead));
                // The dead-letter path records the outcome, with the runs there were.
                if shared.retry.exhausted(failed_before) {
                    if counted_ahead {
                        // Not in `tx`, which already says `applied`: rolled back first.
                        tx.rollback()
                            .await
                            .context("rolling back the inbox transaction")
                            .map_err(Failed::Database)?;
                        inbox::uncount_run(&shared.pool, receipt)
                            .await
                            .map_err(refused_by_postgres)?;
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
                .map_err(refused_by_postgres)?;
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
                tracing::warn!(queue = %shared.queue, consumer = %shared.name, reason, "consumer: malformed message; dead-lettering it");
                self.dead_letter(incoming, receipt, reason, attempts).await
            }
            MalformedPolicy::Discard => {
                tracing::warn!(queue = %shared.queue, consumer = %shared.name, reason, "consumer: malformed message; discarding it");
                if let Some(receipt) = receipt {
                    if !self
                        .record(receipt, Outcome::Discarded, reason, attempts)
                        .await
                    {
                        return false;
                    }
                }
                self.count(Counter::Discarded);
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
        tracing::warn!(message_id = %incoming.message_id, queue = %shared.queue, consumer = %shared.name, attempts, error, "consumer: message dead-lettered");
        if let Some(receipt) = receipt {
            if !self
                .record(receipt, Outcome::DeadLettered, error, attempts)
                .await
            {
                return false;
            }
        }
        self.count(Counter::DeadLettered);
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
            Ok(())
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

/// A handler's panic as a transient failure, with its message when it has one.
fn panicked(panic: Box<dyn std::any::Any + Send>) -> HandlerError {
    let message = panic
        .downcast_ref::<&str>()
        .map(|s| (*s).to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic without a message".to_string());
    HandlerError::transient(format!("the handler panicked: {message}"))
}

/// An inbox statement failed: Postgres being away (or the inbox itself broken: a missing
/// table, a permission) is waited out, uncounted; Postgres refusing this message's own values
/// (a key it cannot store or index: data exceptions, constraint violations, program limits)
/// would fail every run the same way, so the message is dead-lettered.
fn refused_by_postgres(error: crate::Error) -> Failed {
    if is_outage(&error) {
        Failed::Database(error)
    } else {
        Failed::Refused(format!("the inbox cannot record this message: {error}"))
    }
}

/// Whether an inbox statement's failure is about Postgres or the inbox rather than the message.
fn is_outage(error: &crate::Error) -> bool {
    let crate::Error::Database {
        source: sqlx::Error::Database(database),
        ..
    } = error
    else {
        return true;
    };
    // SQLSTATE classes 22 (data exception), 23 (integrity constraint violation) and 54
    // (program limit exceeded) are about the values written.
    let code = database.code().unwrap_or_default();
    !["22", "23", "54"]
        .iter()
        .any(|class| code.starts_with(class))
}

/// Whether a transient failure is Postgres going away (connection refused, reset, pool
/// exhausted) rather than something about the message.
fn lost_connection(failure: &HandlerError) -> bool {
    if failure.kind() != FailureKind::Transient {
        return false;
    }
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(failure.error());
    while let Some(error) = source {
        let sqlx_error = error.downcast_ref::<sqlx::Error>().or_else(|| {
            match error.downcast_ref::<crate::Error>() {
                Some(crate::Error::Database { source, .. }) => Some(source),
                _ => None,
            }
        });
        if let Some(sqlx_error) = sqlx_error {
            return matches!(
                sqlx_error,
                sqlx::Error::Io(_)
                    | sqlx::Error::Tls(_)
                    | sqlx::Error::PoolTimedOut
                    | sqlx::Error::PoolClosed
                    | sqlx::Error::WorkerCrashed
            );
        }
        source = error.source();
    }
    false
}

/// The consumer's counters, by name.
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
