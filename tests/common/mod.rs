//! Test support against the real Postgres and RabbitMQ: a fresh database per test, uniquely
//! named queues that vanish with the test's connection, a relay runner, waiting with deadlines,
//! and a TCP proxy that counts the statements a client sends.

#![allow(dead_code)] // each test binary uses its own subset

pub mod checker;
pub mod http;
pub mod proxy;

use std::future::Future;
use std::process::Command;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use lapin::options::{BasicConsumeOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{Channel, Connection, ConnectionProperties};
use postbox::Settings;
use sqlx::postgres::PgPoolOptions;
use sqlx::{AssertSqlSafe, PgPool};
use tokio::sync::mpsc;
use uuid::Uuid;

/// `host:port` of a URL (to put a proxy in front of it).
pub fn host_port(url: &str) -> String {
    let url = url::Url::parse(url).expect("URL parses");
    format!(
        "{}:{}",
        url.host_str().expect("URL has a host"),
        url.port().unwrap_or(match url.scheme() {
            "amqp" => 5672,
            "amqps" => 5671,
            _ => 5432,
        })
    )
}

/// Admin URL of the shared Postgres server (its `postgres` database).
pub fn admin_database_url() -> String {
    std::env::var("POSTBOX_TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into())
}

/// URL of the shared RabbitMQ.
pub fn amqp_url() -> String {
    std::env::var("POSTBOX_TEST_AMQP_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into())
}

/// Waits until `check` returns `Some`, polling every 20 ms; panics with `what` after `deadline`.
pub async fn wait_until<T, F, Fut>(what: &str, deadline: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let start = Instant::now();
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(
            start.elapsed() < deadline,
            "timed out after {deadline:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A database of its own for one test, dropped when the test ends.
pub struct TestDb {
    pub name: String,
    pub url: String,
    pub pool: PgPool,
}

impl TestDb {
    /// A new empty database.
    pub async fn empty() -> Self {
        let name = format!("postbox_test_{}", Uuid::new_v4().simple());
        let admin = PgPoolOptions::new()
            .max_connections(1)
            .connect(&admin_database_url())
            .await
            .expect("test Postgres is reachable (is it running? see .ci/run)");
        sqlx::query(AssertSqlSafe(format!("create database {name}")))
            .execute(&admin)
            .await
            .expect("create test database");
        admin.close().await;
        let url = database_url_for(&name);
        let pool = PgPoolOptions::new()
            .max_connections(8)
            .connect(&url)
            .await
            .expect("connect test database");
        Self { name, url, pool }
    }

    /// A new database with the postbox schema applied.
    pub async fn migrated() -> Self {
        let db = Self::empty().await;
        postbox::migrate(&db.pool).await.expect("migrate");
        db
    }

    /// Counts rows of `postbox.outbox` matching `condition` (a SQL boolean expression).
    pub async fn count(&self, condition: &str) -> i64 {
        sqlx::query_scalar(AssertSqlSafe(format!(
            "select count(*) from postbox.outbox where {condition}"
        )))
        .fetch_one(&self.pool)
        .await
        .expect("count outbox rows")
    }

    /// Waits (up to 20 s) until some session of this database waits on a lock.
    pub async fn until_a_session_waits_on_a_lock(&self) {
        wait_until(
            "a session waiting on a lock",
            Duration::from_secs(20),
            || async {
                let waiting: i64 = sqlx::query_scalar(
                    "select count(*) from pg_stat_activity \
                 where datname = current_database() and wait_event_type = 'Lock'",
                )
                .fetch_one(&self.pool)
                .await
                .ok()?;
                (waiting > 0).then_some(())
            },
        )
        .await;
    }

    /// Pending rows claimed (row-locked) by some session right now. Read with `pgrowlocks`,
    /// which takes no row lock: a probe by `FOR UPDATE SKIP LOCKED` would lock the free rows
    /// for a moment, and a relay claiming then would skip them.
    pub async fn locked_rows(&self) -> i64 {
        sqlx::query("create extension if not exists pgrowlocks")
            .execute(&self.pool)
            .await
            .expect("pgrowlocks (Postgres contrib) is available");
        sqlx::query_scalar(
            "select count(*) from postbox.outbox o \
             join pgrowlocks('postbox.outbox') l on l.locked_row = o.ctid \
             where o.published_at is null and o.dead_at is null",
        )
        .fetch_one(&self.pool)
        .await
        .expect("count locked rows")
    }

    /// Relay settings for this database with quick, test-friendly timings.
    pub fn settings(&self) -> Settings {
        settings_for(&self.url)
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let name = self.name.clone();
        // Drop runs outside async context; a short-lived thread with its own runtime does the
        // cleanup without blocking the test's runtime.
        let _ = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build();
            if let Ok(runtime) = runtime {
                runtime.block_on(async {
                    if let Ok(admin) = PgPoolOptions::new()
                        .max_connections(1)
                        .connect(&admin_database_url())
                        .await
                    {
                        let _ = sqlx::query(AssertSqlSafe(format!(
                            "drop database if exists {name} with (force)"
                        )))
                        .execute(&admin)
                        .await;
                    }
                });
            }
        })
        .join();
    }
}

/// The admin URL with its database replaced by `name`.
pub fn database_url_for(name: &str) -> String {
    let mut url = url::Url::parse(&admin_database_url()).expect("admin URL parses");
    url.set_path(name);
    url.to_string()
}

/// Settings for a relay on `database_url` with quick test timings.
pub fn settings_for(database_url: &str) -> Settings {
    let defaults = Settings::load(None).expect("default settings load");
    let mut settings = defaults;
    settings.database_url = database_url.to_string();
    settings.amqp_url = amqp_url();
    settings.relay.poll_interval = Duration::from_millis(200);
    settings.relay.retry_initial_delay = Duration::from_millis(100);
    settings.relay.retry_max_delay = Duration::from_secs(1);
    settings.relay.shutdown_timeout = Duration::from_secs(10);
    settings
}

/// A relay running in this process.
pub struct RunningRelay {
    handle: postbox::relay::RelayHandle,
    pub stats: std::sync::Arc<postbox::relay::Stats>,
}

impl RunningRelay {
    /// Starts a relay with `settings` (the schema must exist).
    pub async fn start(settings: Settings) -> Self {
        // The relay's warnings show up in a failing test's output.
        postbox::telemetry::init();
        let handle = settings
            .relay()
            .await
            .expect("relay connects to Postgres")
            .spawn();
        let stats = handle.stats();
        Self { handle, stats }
    }

    /// Graceful stop; waits until every stage has ended.
    pub async fn stop(self) {
        tokio::time::timeout(Duration::from_secs(30), self.handle.stop())
            .await
            .expect("relay stops within 30s")
            .expect("relay task did not panic");
    }
}

/// The usual setup for a test that starts its own relays: a migrated database and a queue of
/// its own with a consumer.
pub struct Stage {
    pub db: TestDb,
    /// Owns the test's exclusive queue.
    pub rabbit: Rabbit,
    pub queue: String,
    pub inbox: Inbox,
}

impl Stage {
    pub async fn start() -> Self {
        let db = TestDb::migrated().await;
        let rabbit = Rabbit::connect().await;
        let queue = rabbit.queue().await;
        let inbox = rabbit.consume(&queue).await;
        Self {
            db,
            rabbit,
            queue,
            inbox,
        }
    }
}

/// The usual test setup: a migrated database, a queue with a consumer, and a relay.
pub struct Harness {
    pub db: TestDb,
    /// Keeps the test's exclusive queue alive.
    pub _rabbit: Rabbit,
    pub queue: String,
    pub inbox: Inbox,
    pub relay: RunningRelay,
}

impl Harness {
    pub async fn start() -> Self {
        let db = TestDb::migrated().await;
        let rabbit = Rabbit::connect().await;
        let queue = rabbit.queue().await;
        let inbox = rabbit.consume(&queue).await;
        let relay = RunningRelay::start(db.settings()).await;
        Self {
            db,
            _rabbit: rabbit,
            queue,
            inbox,
            relay,
        }
    }
}

/// One message as a consumer received it.
#[derive(Debug, Clone)]
pub struct Received {
    pub message_id: Option<String>,
    pub payload: Vec<u8>,
    pub content_type: Option<String>,
    pub headers: FieldTable,
    pub delivery_mode: Option<u8>,
}

impl Received {
    /// A header's value, if present.
    pub fn header(&self, name: &str) -> Option<&AMQPValue> {
        self.headers.inner().get(name)
    }

    /// The `x-postbox-outbox-id` header.
    pub fn outbox_id(&self) -> i64 {
        match self.header("x-postbox-outbox-id") {
            Some(AMQPValue::LongLongInt(id)) => *id,
            other => panic!("x-postbox-outbox-id header missing or mistyped: {other:?}"),
        }
    }

    /// The `x-postbox-seq` header: the message's number in its stream.
    pub fn seq(&self) -> Option<i64> {
        match self.header("x-postbox-seq")? {
            AMQPValue::LongLongInt(seq) => Some(*seq),
            other => panic!("x-postbox-seq header mistyped: {other:?}"),
        }
    }
}

/// A connection to the shared broker for declaring and consuming test queues. Queues are
/// exclusive to this connection, so the broker deletes them when the test ends, even on panic.
pub struct Rabbit {
    connection: Connection,
    channel: Channel,
}

impl Rabbit {
    pub async fn connect() -> Self {
        let connection = Connection::connect(&amqp_url(), ConnectionProperties::default())
            .await
            .expect("test RabbitMQ is reachable (is it running? see .ci/run)");
        let channel = connection.create_channel().await.expect("open channel");
        Self {
            connection,
            channel,
        }
    }

    /// Declares a uniquely named queue and returns its name.
    pub async fn queue(&self) -> String {
        let name = format!("postbox-test-{}", Uuid::new_v4().simple());
        self.channel
            .queue_declare(
                name.as_str().into(),
                QueueDeclareOptions {
                    exclusive: true,
                    ..QueueDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .expect("declare test queue");
        name
    }

    /// Declares a uniquely named queue other connections can consume (a consumer under test
    /// has its own connection). The broker deletes it once unused for 30 s.
    pub async fn shared_queue(&self) -> String {
        self.shared_queue_with(&[]).await
    }

    /// [`Rabbit::shared_queue`] with queue `arguments` on top (`x-max-length` and the like).
    pub async fn shared_queue_with(&self, extra: &[(&str, AMQPValue)]) -> String {
        let name = format!("postbox-test-{}", Uuid::new_v4().simple());
        let mut arguments = FieldTable::default();
        arguments.insert("x-expires".into(), AMQPValue::LongInt(30_000));
        for (key, value) in extra {
            arguments.insert((*key).into(), value.clone());
        }
        self.channel
            .queue_declare(
                name.as_str().into(),
                QueueDeclareOptions::default(),
                arguments,
            )
            .await
            .expect("declare shared test queue");
        name
    }

    /// Starts consuming `queue` (auto-ack); received messages arrive on the returned channel.
    pub async fn consume(&self, queue: &str) -> Inbox {
        let mut consumer = self
            .channel
            .basic_consume(
                queue.into(),
                format!("test-{}", Uuid::new_v4().simple()).as_str().into(),
                BasicConsumeOptions {
                    no_ack: true,
                    ..BasicConsumeOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .expect("consume test queue");
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Some(Ok(delivery)) = consumer.next().await {
                let props = &delivery.properties;
                let received = Received {
                    message_id: props.message_id().as_ref().map(|s| s.to_string()),
                    payload: delivery.data.clone(),
                    content_type: props.content_type().as_ref().map(|s| s.to_string()),
                    headers: props.headers().clone().unwrap_or_default(),
                    delivery_mode: *props.delivery_mode(),
                };
                if tx.send(received).is_err() {
                    break;
                }
            }
        });
        Inbox { rx }
    }

    pub fn connection(&self) -> &Connection {
        &self.connection
    }

    /// Publishes `payload` to `queue` through the default exchange, as postbox's relay would:
    /// persistent, with `message_id` (if any) and `headers`.
    pub async fn publish(
        &self,
        queue: &str,
        message_id: Option<Uuid>,
        headers: FieldTable,
        payload: &[u8],
    ) {
        let mut properties = lapin::BasicProperties::default()
            .with_delivery_mode(2)
            .with_headers(headers);
        if let Some(id) = message_id {
            properties = properties.with_message_id(id.to_string().into());
        }
        self.channel
            .basic_publish(
                "".into(),
                queue.into(),
                lapin::options::BasicPublishOptions::default(),
                payload,
                properties,
            )
            .await
            .expect("publish test message");
    }

    /// Declares the direct exchange `name` routing key `queue` to `queue`. It is auto-deleted
    /// once its binding goes with the test's exclusive queue.
    pub async fn exchange_to(&self, name: &str, queue: &str) {
        self.declare_exchange(name, queue, false).await;
    }

    /// As [`Rabbit::exchange_to`], but internal: clients may not publish to it (the broker
    /// closes the channel of one that tries).
    pub async fn internal_exchange_to(&self, name: &str, queue: &str) {
        self.declare_exchange(name, queue, true).await;
    }

    async fn declare_exchange(&self, name: &str, queue: &str, internal: bool) {
        self.channel
            .exchange_declare(
                name.into(),
                lapin::ExchangeKind::Direct,
                lapin::options::ExchangeDeclareOptions {
                    auto_delete: true,
                    internal,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .expect("declare test exchange");
        self.bind(name, queue, queue).await;
    }

    /// Binds `queue` to `exchange` with `routing_key` too.
    pub async fn bind(&self, exchange: &str, queue: &str, routing_key: &str) {
        self.channel
            .queue_bind(
                queue.into(),
                exchange.into(),
                routing_key.into(),
                lapin::options::QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .expect("bind test queue");
    }

    /// Deletes `queue` (for queues a test's code under test declared durable).
    pub async fn delete_queue(&self, queue: &str) {
        self.channel
            .queue_delete(queue.into(), lapin::options::QueueDeleteOptions::default())
            .await
            .expect("delete queue");
    }

    /// Messages ready in `queue` (not delivered to a consumer).
    pub async fn ready(&self, queue: &str) -> u32 {
        self.channel
            .queue_declare(
                queue.into(),
                QueueDeclareOptions {
                    passive: true,
                    ..QueueDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .expect("queue exists")
            .message_count()
    }
}

/// Headers postbox's relay sets: the outbox position and, if given, the partition key.
pub fn relay_headers(outbox_id: i64, partition_key: Option<&str>) -> FieldTable {
    let mut headers = FieldTable::default();
    headers.insert(
        "x-postbox-outbox-id".into(),
        AMQPValue::LongLongInt(outbox_id),
    );
    if let Some(key) = partition_key {
        headers.insert(
            "x-postbox-partition-key".into(),
            AMQPValue::LongString(key.into()),
        );
    }
    headers
}

/// The consumer side: a database with the inbox schema only, a queue to consume, and an
/// exclusive queue the consumer's dead letters are routed to, read by `dead_letters`.
pub struct Subscriber {
    pub db: TestDb,
    pub rabbit: Rabbit,
    pub queue: String,
    pub dead_letter_queue: String,
    pub dead_letters: Inbox,
}

impl Subscriber {
    pub async fn start() -> Self {
        Self::start_with_queue_arguments(&[]).await
    }

    /// [`Subscriber::start`] with a queue declared with `arguments`.
    pub async fn start_with_queue_arguments(arguments: &[(&str, AMQPValue)]) -> Self {
        let db = TestDb::empty().await;
        postbox::migrate_parts(&db.pool, &[postbox::Part::Inbox])
            .await
            .expect("migrate inbox");
        let rabbit = Rabbit::connect().await;
        let queue = rabbit.shared_queue_with(arguments).await;
        let dead_letter_queue = rabbit.queue().await;
        let dead_letters = rabbit.consume(&dead_letter_queue).await;
        Self {
            db,
            rabbit,
            queue,
            dead_letter_queue,
            dead_letters,
        }
    }

    /// Publishes message `id` to the consumer's queue, as the relay would.
    pub async fn send(&self, id: Uuid, headers: FieldTable, payload: &[u8]) {
        self.rabbit
            .publish(&self.queue, Some(id), headers, payload)
            .await;
    }

    /// Quick retries, dead letters to the test's own queue.
    pub fn options(&self) -> postbox::inbox::ConsumerOptions {
        postbox::inbox::ConsumerOptions::default()
            .retry_initial_delay(Duration::from_millis(10))
            .retry_max_delay(Duration::from_millis(50))
            .dead_letter(postbox::inbox::DeadLetter::Exchange {
                exchange: String::new(),
                routing_key: self.dead_letter_queue.clone(),
            })
            .shutdown_timeout(Duration::from_secs(10))
    }

    /// Starts a consumer named `name` of the test's queue, writing through `pool` and
    /// connecting to the broker at `amqp_url` (either may go through a proxy).
    pub fn consumer_via<H: postbox::inbox::Handler>(
        &self,
        pool: PgPool,
        amqp_url: &str,
        name: &str,
        handler: H,
        options: postbox::inbox::ConsumerOptions,
    ) -> postbox::inbox::ConsumerHandle {
        postbox::telemetry::init();
        postbox::inbox::Consumer::builder(pool, postbox::inbox::Broker::new([amqp_url]))
            .queue(self.queue.clone())
            .name(name)
            .options(options)
            .handler(handler)
            .expect("valid consumer options")
            .spawn()
    }

    /// Starts a consumer named `name` of the test's queue.
    pub fn consumer<H: postbox::inbox::Handler>(
        &self,
        name: &str,
        handler: H,
        options: postbox::inbox::ConsumerOptions,
    ) -> postbox::inbox::ConsumerHandle {
        self.consumer_via(self.db.pool.clone(), &amqp_url(), name, handler, options)
    }

    /// `(outcome, duplicates, attempts)` of a message in the inbox.
    pub async fn inbox_row(&self, consumer: &str, message_id: Uuid) -> (Option<String>, i32, i32) {
        sqlx::query_as(
            "select outcome, duplicates, attempts from postbox.inbox \
             where consumer = $1 and message_id = $2",
        )
        .bind(consumer)
        .bind(message_id)
        .fetch_one(&self.db.pool)
        .await
        .expect("inbox row exists")
    }
}

/// Messages received from one queue.
pub struct Inbox {
    rx: mpsc::UnboundedReceiver<Received>,
}

impl Inbox {
    /// Receives until `n` messages have arrived; panics after `deadline` with how many came.
    pub async fn take(&mut self, n: usize, deadline: Duration) -> Vec<Received> {
        let mut out = Vec::with_capacity(n);
        let until = tokio::time::Instant::now() + deadline;
        while out.len() < n {
            match tokio::time::timeout_at(until, self.rx.recv()).await {
                Ok(Some(received)) => out.push(received),
                Ok(None) => panic!("consumer stopped after {} of {n} messages", out.len()),
                Err(_) => panic!(
                    "timed out after {deadline:?}: received {} of {n} messages",
                    out.len()
                ),
            }
        }
        out
    }

    /// Receives until every id in `expected` has arrived at least once; returns everything
    /// received, duplicates included. Panics after `deadline` with how many are missing.
    pub async fn until_all(
        &mut self,
        expected: &std::collections::HashSet<String>,
        deadline: Duration,
    ) -> Vec<Received> {
        let mut out = Vec::new();
        let mut missing = expected.clone();
        let until = tokio::time::Instant::now() + deadline;
        while !missing.is_empty() {
            match tokio::time::timeout_at(until, self.rx.recv()).await {
                Ok(Some(received)) => {
                    if let Some(id) = &received.message_id {
                        missing.remove(id);
                    }
                    out.push(received);
                }
                _ => panic!(
                    "after {deadline:?}: {} of {} messages never arrived",
                    missing.len(),
                    expected.len()
                ),
            }
        }
        out
    }

    /// Whatever has arrived by now, without waiting.
    pub fn received_so_far(&mut self) -> Vec<Received> {
        let mut out = Vec::new();
        while let Ok(received) = self.rx.try_recv() {
            out.push(received);
        }
        out
    }

    /// Whatever arrives within `window` (for asserting that nothing more comes).
    pub async fn drain_for(&mut self, window: Duration) -> Vec<Received> {
        let mut out = Vec::new();
        let until = tokio::time::Instant::now() + window;
        while let Ok(Some(received)) = tokio::time::timeout_at(until, self.rx.recv()).await {
            out.push(received);
        }
        out
    }
}

/// The `postbox` binary built for these tests, with a clean environment for its settings.
pub fn postbox_command() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_postbox"));
    for (key, _) in std::env::vars() {
        if key.starts_with("POSTBOX_") || key == "DATABASE_URL" || key == "AMQP_URL" {
            command.env_remove(key);
        }
    }
    command.env("RUST_LOG", "postbox=info");
    command
}

/// `postbox run` as a child process, its stderr in a log file under the cargo target's tmp
/// directory (named in panics); killed when dropped.
pub struct RelayProcess {
    child: std::process::Child,
    pub log: std::path::PathBuf,
}

impl RelayProcess {
    /// Starts `postbox run` against `database_url` and the test broker, with `env` on top
    /// (`POSTBOX_RELAY__BATCH_SIZE` and the like).
    pub fn spawn(database_url: &str, env: &[(&str, &str)]) -> Self {
        let log = std::path::Path::new(env!("CARGO_TARGET_TMPDIR"))
            .join(format!("relay-{}.log", Uuid::new_v4().simple()));
        let file = std::fs::File::create(&log).expect("create relay log");
        let mut command = postbox_command();
        command
            .arg("run")
            .env("DATABASE_URL", database_url)
            .env("AMQP_URL", amqp_url())
            .stdout(std::process::Stdio::null())
            .stderr(file);
        for (key, value) in env {
            command.env(key, value);
        }
        let child = command.spawn().expect("spawn postbox run");
        Self { child, log }
    }

    fn signal(&self, signal: nix::sys::signal::Signal) {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        nix::sys::signal::kill(pid, signal).expect("signal the relay");
    }

    /// SIGKILL: no chance to finish or release anything.
    pub fn kill(mut self) {
        self.signal(nix::sys::signal::Signal::SIGKILL);
        let _ = self.child.wait();
    }

    /// SIGSTOP: the process hangs with its connections open.
    pub fn pause(&self) {
        self.signal(nix::sys::signal::Signal::SIGSTOP);
    }

    /// SIGCONT after `pause`.
    pub fn resume(&self) {
        self.signal(nix::sys::signal::Signal::SIGCONT);
    }

    /// SIGTERM, then waits up to `deadline` for the exit; returns the exit code.
    pub async fn stop(mut self, deadline: Duration) -> Option<i32> {
        self.signal(nix::sys::signal::Signal::SIGTERM);
        let log = self.log.clone();
        let status = wait_until(
            &format!("the relay to exit (log: {log:?})"),
            deadline,
            || {
                let status = self.child.try_wait().expect("try_wait");
                async move { status }
            },
        )
        .await;
        status.code()
    }

    /// The relay's log so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for RelayProcess {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Takes every wake-up key in share mode on `connection`, as a sleeping relay does: from then
/// on, commits into the outbox notify.
pub async fn hold_the_wakeup_keys(connection: &mut sqlx::PgConnection) {
    sqlx::query(
        "select count(pg_advisory_lock_shared(-1084948806, k)) \
         from generate_series(0, 255) k",
    )
    .execute(connection)
    .await
    .expect("take the wake-up keys");
}
