//! The consumer's lifecycle: connect, consume, hand deliveries to workers by partition key,
//! reconnect after a connection loss, and stop gracefully.

use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use lapin::options::{BasicCancelOptions, BasicConsumeOptions, BasicQosOptions};
use lapin::types::FieldTable;
use lapin::Connection;
use sqlx::PgPool;
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use super::dead_letter::DeadLetters;
use super::worker::{Counter, Job, Load, Malformed, Shared, Worker};
use super::ConsumerError;
use super::{ConsumerOptions, Handler, Incoming};
use crate::amqp::Broker;
use crate::contract::HEADER_PARTITION_KEY;
use crate::error::{Context, InvalidSetting};
use crate::reconnect::until_ok;
use crate::retention::VacuumAfter;
use crate::store::operations::HotTable;

/// Running totals of what a consumer did, readable while it runs.
#[derive(Debug, Default)]
pub struct ConsumerStats {
    applied: AtomicU64,
    duplicates: AtomicU64,
    stale: AtomicU64,
    dead_lettered: AtomicU64,
    discarded: AtomicU64,
    failures: AtomicU64,
    waiting: AtomicU64,
    skipped: AtomicU64,
}

impl ConsumerStats {
    pub(crate) fn record(&self, counter: Counter, n: u64) {
        let field = match counter {
            Counter::Applied => &self.applied,
            Counter::Duplicates => &self.duplicates,
            Counter::Stale => &self.stale,
            Counter::DeadLettered => &self.dead_lettered,
            Counter::Discarded => &self.discarded,
            Counter::Failures => &self.failures,
            Counter::Waiting => &self.waiting,
            Counter::Skipped => &self.skipped,
        };
        field.fetch_add(n, Ordering::Relaxed);
    }

    /// Messages whose handler ran and committed.
    pub fn applied(&self) -> u64 {
        self.applied.load(Ordering::Relaxed)
    }

    /// Deliveries of already-decided messages, acked without running the handler.
    pub fn duplicates(&self) -> u64 {
        self.duplicates.load(Ordering::Relaxed)
    }

    /// Messages skipped because a newer version of their key was applied first.
    pub fn stale(&self) -> u64 {
        self.stale.load(Ordering::Relaxed)
    }

    /// Messages sent to the dead-letter destination.
    pub fn dead_lettered(&self) -> u64 {
        self.dead_lettered.load(Ordering::Relaxed)
    }

    /// Malformed messages dropped by policy.
    pub fn discarded(&self) -> u64 {
        self.discarded.load(Ordering::Relaxed)
    }

    /// Failed handler runs that were retried or led to a dead letter.
    pub fn failures(&self) -> u64 {
        self.failures.load(Ordering::Relaxed)
    }

    /// Messages that arrived ahead of their stream's next number and were held until their
    /// turn (each is counted again as applied when its turn comes).
    pub fn waiting(&self) -> u64 {
        self.waiting.load(Ordering::Relaxed)
    }

    /// Skip messages applied: stream numbers of rows the relay released.
    pub fn skipped(&self) -> u64 {
        self.skipped.load(Ordering::Relaxed)
    }
}

/// An effectively-once consumer of one queue. See the [module docs](super).
pub struct Consumer<H> {
    pool: PgPool,
    broker: Broker,
    queue: String,
    name: String,
    handler: H,
    options: ConsumerOptions,
    stats: Arc<ConsumerStats>,
}

/// A consumer running on its own task (from [`Consumer::spawn`]).
pub type ConsumerHandle = crate::running::Running<ConsumerStats>;

impl Consumer<()> {
    /// Starts describing a consumer that writes through `pool` (whose database must have the
    /// inbox schema: `postbox migrate --part inbox`) and consumes from `broker`. Name its queue
    /// and itself, then give it its handler:
    ///
    /// ```no_run
    /// # use postbox::inbox::{Consumer, ConsumerOptions, Handler, HandlerError, Incoming};
    /// # struct Billing;
    /// # impl Handler for Billing {
    /// #     async fn handle(&self, _: &mut sqlx::Transaction<'_, sqlx::Postgres>, _: &Incoming)
    /// #         -> Result<(), HandlerError> { Ok(()) }
    /// # }
    /// # async fn example(pool: sqlx::PgPool) -> Result<(), postbox::inbox::ConsumerError> {
    /// let broker = postbox::inbox::Broker::new(["amqp://guest:guest@127.0.0.1:5672/%2f"]);
    /// let consumer = Consumer::builder(pool, broker)
    ///     .queue("orders")
    ///     .name("billing")
    ///     .options(ConsumerOptions::default().concurrency(4))
    ///     .handler(Billing)?
    ///     .spawn();
    /// # Ok(()) }
    /// ```
    pub fn builder(pool: PgPool, broker: Broker) -> ConsumerBuilder {
        ConsumerBuilder {
            pool,
            broker,
            queue: None,
            name: None,
            options: ConsumerOptions::default(),
        }
    }
}

/// A consumer being described; from [`Consumer::builder`].
#[must_use = "a consumer builder does nothing until `handler` builds the consumer"]
pub struct ConsumerBuilder {
    pool: PgPool,
    broker: Broker,
    queue: Option<String>,
    name: Option<String>,
    options: ConsumerOptions,
}

impl ConsumerBuilder {
    /// The queue to consume (declared by whoever owns the topology; the consumer does not
    /// declare it).
    pub fn queue(mut self, queue: impl Into<String>) -> Self {
        self.queue = Some(queue.into());
        self
    }

    /// The consumer's name, the inbox's key: instances of one service share a name; each
    /// independent subscriber has its own.
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.name = Some(name.into());
        self
    }

    /// Options other than the defaults.
    pub fn options(mut self, options: ConsumerOptions) -> Self {
        self.options = options;
        self
    }

    /// The consumer, running `handler` for each message. Fails, naming the setting, when the
    /// queue or the name is missing or an option is invalid.
    pub fn handler<H: Handler>(self, handler: H) -> Result<Consumer<H>, ConsumerError> {
        let missing = |setting: &'static str, what: &str| {
            InvalidSetting::new(
                setting,
                "",
                format!("expected {what}; set it on the consumer builder"),
            )
        };
        let queue = self
            .queue
            .ok_or_else(|| missing("consumer.queue", "the queue to consume"))?;
        let name = self
            .name
            .ok_or_else(|| missing("consumer.name", "the consumer's name"))?;
        self.options.validate(&queue, &name)?;
        self.broker.check()?;
        Ok(Consumer {
            pool: self.pool,
            broker: self.broker,
            queue,
            name,
            handler,
            options: self.options,
            stats: Arc::default(),
        })
    }
}

impl<H: Handler> Consumer<H> {
    /// Counters that stay readable while the consumer runs.
    pub fn stats(&self) -> Arc<ConsumerStats> {
        self.stats.clone()
    }

    /// Runs the consumer on its own task.
    pub fn spawn(self) -> ConsumerHandle {
        ConsumerHandle::spawn(self.stats(), |shutdown| async move {
            self.run(shutdown).await;
        })
    }

    /// Consumes until `shutdown` is cancelled, reconnecting (with backoff) whenever the broker
    /// connection or the consumer's channel is lost.
    pub async fn run(self, shutdown: CancellationToken) {
        let Consumer {
            pool,
            broker,
            queue,
            name,
            handler,
            options,
            stats,
        } = self;
        let shared = Arc::new(Shared {
            pool,
            queue,
            name,
            handler,
            retry: options.retry_policy(),
            options,
            stats,
        });
        let connection_name = format!("postbox consumer {}", shared.name);
        // Deletes the consumer's decided rows older than the dedup window (none: kept).
        let (retention_pool, consumer) = (shared.pool.clone(), shared.name.clone());
        let cleaner = tokio::spawn(crate::retention::run(
            shared.pool.clone(),
            HotTable::Inbox,
            shared.options.vacuum,
            VacuumAfter::Deletes,
            shared.options.cleanup_interval,
            shutdown.clone(),
            shared.options.dedup_window.map(|window| {
                move || {
                    let (pool, consumer) = (retention_pool.clone(), consumer.clone());
                    async move { super::retention::cleanup(&pool, Some(&consumer), window).await }
                }
            }),
        ));
        Self::consume(&shared, &broker, &connection_name, &shutdown).await;
        let _ = cleaner.await;
    }

    async fn consume(
        shared: &Arc<Shared<H>>,
        broker: &Broker,
        connection_name: &str,
        shutdown: &CancellationToken,
    ) {
        loop {
            let session = until_ok("consumer: rabbitmq", shutdown, || {
                Session::open(broker, connection_name, shared)
            })
            .await;
            let Some(session) = session else {
                return;
            };
            tracing::info!(queue = %shared.queue, consumer = %shared.name, "consumer: consuming");
            if session.run(shared, shutdown).await {
                return;
            }
            tracing::warn!(queue = %shared.queue, "consumer: connection lost; reconnecting");
        }
    }
}

/// One broker connection's worth of consuming.
struct Session {
    connection: Arc<Connection>,
    channel: lapin::Channel,
    deliveries: lapin::Consumer,
    dead_letters: Arc<DeadLetters>,
}

impl Session {
    async fn open<H>(
        broker: &Broker,
        connection_name: &str,
        shared: &Shared<H>,
    ) -> Result<Self, ConsumerError> {
        let connection = Arc::new(broker.connect(connection_name).await?);
        let dead_letters =
            Arc::new(DeadLetters::open(connection.clone(), &shared.options, &shared.queue).await?);
        let channel = connection
            .create_channel()
            .await
            .context("opening a channel")?;
        channel
            .basic_qos(shared.options.prefetch, BasicQosOptions::default())
            .await
            .context("setting prefetch")?;
        let tag = format!("postbox-{}-{}", shared.name, uuid::Uuid::new_v4().simple());
        let deliveries = channel
            .basic_consume(
                shared.queue.as_str().into(),
                tag.as_str().into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .context(format!("consuming queue {:?}", shared.queue))?;
        Ok(Self {
            connection,
            channel,
            deliveries,
            dead_letters,
        })
    }

    /// Dispatches deliveries until shutdown (returns true) or the connection is lost (false).
    async fn run<H: Handler>(
        mut self,
        shared: &Arc<Shared<H>>,
        shutdown: &CancellationToken,
    ) -> bool {
        let session = shutdown.child_token();
        let mut workers = JoinSet::new();
        let mut queues = Vec::with_capacity(shared.options.concurrency);
        let mut loads = Vec::with_capacity(shared.options.concurrency);
        for _ in 0..shared.options.concurrency {
            let load = Arc::new(Load::default());
            loads.push(load.clone());
            // Never full: the broker sends at most `prefetch` unacked deliveries.
            let (tx, mut rx) = mpsc::channel::<Job>(usize::from(shared.options.prefetch));
            let worker = Worker {
                shared: shared.clone(),
                dead_letters: self.dead_letters.clone(),
                session: session.clone(),
                load,
                next_held: AtomicBool::new(false),
            };
            // With one worker, jobs arrive in delivery-tag order, so a batch's acks can be one
            // `multiple` ack; with several, a multiple ack would cover other workers' messages.
            let ack_multiple = shared.options.concurrency == 1;
            let batch_size = shared.options.batch_size;
            workers.spawn(async move {
                let mut jobs = Vec::with_capacity(batch_size);
                while rx.recv_many(&mut jobs, batch_size).await > 0 {
                    let taken = jobs.len();
                    if worker.session.is_cancelled() {
                        // Unacked: the broker redelivers them.
                        jobs.clear();
                    } else if taken == 1 {
                        for job in jobs.drain(..) {
                            worker.process(job).await;
                        }
                    } else {
                        worker.process_batch(&mut jobs, ack_multiple).await;
                    }
                    worker.load.queued.fetch_sub(taken, Ordering::Relaxed);
                }
            });
            queues.push(tx);
        }
        if shared.options.versioning == super::Versioning::Sequence {
            let sweeper = Worker {
                shared: shared.clone(),
                dead_letters: self.dead_letters.clone(),
                session: session.clone(),
                load: Arc::new(Load::default()),
                next_held: AtomicBool::new(false),
            };
            workers.spawn(sweep_streams(sweeper));
        }

        let mut next_unkeyed = 0usize;
        let stopped = loop {
            let delivery = tokio::select! {
                biased;
                _ = shutdown.cancelled() => break true,
                delivery = self.deliveries.next() => delivery,
            };
            let mut delivery = match delivery {
                Some(Ok(delivery)) => delivery,
                Some(Err(error)) => {
                    tracing::warn!(%error, queue = %shared.queue, "consumer: delivery stream failed");
                    break false;
                }
                None => break false,
            };
            let worker = match partition_key(&delivery) {
                Some(key) => {
                    let mut hasher = DefaultHasher::new();
                    key.hash(&mut hasher);
                    (hasher.finish() % queues.len() as u64) as usize
                }
                None => {
                    next_unkeyed = next_unkeyed.wrapping_add(1);
                    least_loaded(&loads, next_unkeyed)
                }
            };
            let message =
                Incoming::parse(&shared.queue, &mut delivery).map_err(|reason| Malformed {
                    reason,
                    exchange: delivery.exchange.to_string(),
                    routing_key: delivery.routing_key.to_string(),
                    properties: delivery.properties.clone(),
                    payload: std::mem::take(&mut delivery.data),
                });
            let job = Job {
                acker: delivery.acker,
                message,
            };
            loads[worker].queued.fetch_add(1, Ordering::Relaxed);
            if queues[worker].send(job).await.is_err() {
                break false;
            }
        };

        if stopped {
            // No new deliveries; those prefetched but not started go back to the queue when
            // the channel closes.
            let _ = self
                .channel
                .basic_cancel(self.deliveries.tag(), BasicCancelOptions::default())
                .await;
        }
        session.cancel();
        drop(queues);
        let finished = tokio::time::timeout(shared.options.shutdown_timeout, async {
            while workers.join_next().await.is_some() {}
        })
        .await;
        if finished.is_err() {
            tracing::warn!(timeout = ?shared.options.shutdown_timeout, "consumer: handlers did not finish in time; rolling them back");
            // Dropping a running handler drops its transaction, which rolls back.
            workers.shutdown().await;
        }
        crate::amqp::close(&self.connection, "postbox consumer stopping").await;
        stopped
    }
}

/// How often a consumer looks for held messages whose turn came without a delivery to
/// trigger it: a stream's next message applied by an instance that stopped before applying
/// the ones held after it, or a stream whose start waited `stream_start_wait`.
const STREAM_CHECK: Duration = Duration::from_secs(1);

/// Applies held messages whose turn came (see [`STREAM_CHECK`]) until the session ends, and
/// keeps the `postbox_consumer_waiting` and `postbox_consumer_oldest_waiting_seconds` gauges
/// current, with a warning while a message has been held for a minute or more.
async fn sweep_streams<H: Handler>(worker: Worker<H>) {
    /// A held message this old is worth a warning.
    const WARN_AFTER: Duration = Duration::from_secs(60);
    const WARN_EVERY: Duration = Duration::from_secs(60);
    let shared = worker.shared.clone();
    let mut last_warning = None;
    loop {
        tokio::select! {
            _ = worker.session.cancelled() => return,
            _ = tokio::time::sleep(STREAM_CHECK) => {}
        }
        if !worker.drain_ready().await {
            return;
        }
        match crate::store::inbox_streams::waiting(&shared.pool, &shared.name).await {
            Ok((waiting, oldest)) => {
                metrics::gauge!("postbox_consumer_waiting", "consumer" => shared.name.clone())
                    .set(waiting as f64);
                metrics::gauge!("postbox_consumer_oldest_waiting_seconds", "consumer" => shared.name.clone())
                    .set(oldest.as_secs_f64());
                // Said once a minute at most: a number missing that long is failing at the
                // relay, parked behind a dead row, or was never published to this queue.
                let due = last_warning.is_none_or(|at: Instant| at.elapsed() >= WARN_EVERY);
                if oldest >= WARN_AFTER && due {
                    last_warning = Some(Instant::now());
                    tracing::warn!(
                        consumer = %shared.name,
                        waiting,
                        oldest = ?oldest,
                        "consumer: messages held for a missing stream number; see postbox.inbox_waiting_streams"
                    );
                }
            }
            Err(error) => tracing::debug!(%error, "consumer: could not count held messages"),
        }
    }
}

/// Where an unkeyed delivery waits least: a worker not held up by a retry, with the fewest
/// deliveries queued; ties go round-robin from `turn`. A retrying worker would hold it for the
/// whole backoff, and round-robin alone would keep feeding it.
fn least_loaded(loads: &[Arc<Load>], turn: usize) -> usize {
    let n = loads.len();
    (0..n)
        .map(|i| (turn + i) % n)
        .min_by_key(|&i| {
            let load = &loads[i];
            (
                load.retrying.load(Ordering::Relaxed),
                load.queued.load(Ordering::Relaxed),
            )
        })
        .unwrap_or(0)
}

fn partition_key(delivery: &lapin::message::Delivery) -> Option<String> {
    let value = delivery
        .properties
        .headers()
        .as_ref()?
        .inner()
        .get(HEADER_PARTITION_KEY)?;
    match value {
        lapin::types::AMQPValue::LongString(s) => {
            Some(String::from_utf8_lossy(s.as_bytes()).into())
        }
        lapin::types::AMQPValue::ShortString(s) => Some(s.as_str().into()),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::inbox::HandlerError;

    struct Noop;

    impl Handler for Noop {
        async fn handle(
            &self,
            _: &mut sqlx::Transaction<'_, sqlx::Postgres>,
            _: &Incoming,
        ) -> Result<(), HandlerError> {
            Ok(())
        }
    }

    /// The setting a builder's failure names.
    fn refused(builder: ConsumerBuilder) -> &'static str {
        match builder.handler(Noop) {
            Err(ConsumerError::Options(InvalidSetting { setting, .. })) => setting,
            Err(other) => panic!("expected a setting error, got {other}"),
            Ok(_) => panic!("expected the builder to refuse"),
        }
    }

    #[tokio::test]
    async fn the_builder_names_what_is_missing_or_invalid() {
        // Lazy: nothing connects until the consumer runs.
        let pool = || PgPool::connect_lazy("postgres://postgres@127.0.0.1:1/none").expect("URL");
        let broker = || Broker::new(["amqp://guest:guest@127.0.0.1:1/%2f"]);
        let builder = || Consumer::builder(pool(), broker());
        assert_eq!(refused(builder().name("billing")), "consumer.queue");
        assert_eq!(refused(builder().queue("orders")), "consumer.name");
        let invalid = ConsumerOptions::default().concurrency(0);
        let builder_with = builder().queue("orders").name("billing").options(invalid);
        assert_eq!(refused(builder_with), "consumer.concurrency");
        // A broker without a node would retry connecting to nothing for good.
        let nowhere = Consumer::builder(pool(), Broker::new(Vec::<String>::new()))
            .queue("orders")
            .name("billing");
        assert_eq!(refused(nowhere), "amqp_url");
        assert!(builder()
            .queue("orders")
            .name("billing")
            .handler(Noop)
            .is_ok());
    }
}
