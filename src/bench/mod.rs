//! `postbox bench`: the relay measured against the broker's own ceiling, side by side in one run.
//!
//! Every case runs against the configured Postgres and RabbitMQ in a database and queues of its
//! own, created at the start and dropped at the end. Figures are reported with their ratio to
//! the ceiling measured in the same run, because absolute numbers move from machine to machine.

mod cases;
mod ceiling;
mod claim;
mod drain;
mod error;
mod inbox;
mod keys;
mod latency;
mod live;
mod producers;
mod report;
mod resources;

use std::time::Duration;

use lapin::options::{QueueDeclareOptions, QueueDeleteOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{Channel, Connection};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{AssertSqlSafe, Connection as _, PgConnection, PgPool};
use uuid::Uuid;

use crate::amqp::Broker;
use crate::config::Settings;
use crate::error::{Context, InvalidSetting};
pub(crate) use error::BenchError;
use error::Result;
pub use report::{CaseResult, Report};

/// What to measure and how big.
#[derive(Debug, Clone)]
pub struct BenchOptions {
    /// Messages per throughput case.
    pub messages: u32,
    /// Payload size in bytes.
    pub payload_size: usize,
    /// Relay batch size (and the ceiling's publish window per batch).
    pub batch_size: u32,
    /// Relay batches in flight (and the ceiling's window, in batches).
    pub in_flight: u32,
    /// Queue types to run: "classic", "quorum".
    pub queue_types: Vec<String>,
    /// Runs per case; the median is reported with the min–max range.
    pub repetitions: u32,
    /// Single events sent to an idle relay for the latency case.
    pub latency_samples: u32,
    /// How long the idle relay's queries are counted.
    pub idle_seconds: u64,
    /// How long each live case commits at its fixed rate.
    pub live_seconds: f64,
    /// Length of the retention soak (0: skipped).
    pub soak_seconds: u32,
    /// Rows per second committed during the soak.
    pub soak_rate: u32,
    /// Published rows retained for the history case (0: skipped).
    pub history: u64,
    /// The optional cases to run (from [`CASES`]); ceiling and drain always run.
    pub cases: Vec<String>,
    /// Rows per key at least in the 1- and 4-key drains (0: `messages` rows, whatever the keys).
    pub rows_per_key: u32,
    /// The claim case's two backlogs behind one key: (smaller, larger) pending rows.
    pub claim_backlogs: (u64, u64),
    /// A smoke run (`--quick`): every case runs, at a size too small to measure anything, so
    /// the report and progress lines carry no figures.
    pub smoke: bool,
}

impl BenchOptions {
    fn runs(&self, case: &str) -> bool {
        self.cases.iter().any(|c| c == case)
    }
}

/// The cases, as `postbox bench --cases` names them. "drain" (the broker ceiling and the plain
/// drain) always runs: the others are measured against it. "keys" is the drains over 1, 4 and
/// 100 partition keys; "claim" the claim time with a backlog behind one key; "live" includes
/// the live case with 4 writers each committing its own key; "producers" what the outbox costs
/// concurrent producers' commits, against a minimal outbox table.
pub const CASES: [&str; 11] = [
    "drain",
    "keys",
    "claim",
    "relays",
    "nohistory",
    "latency",
    "idle",
    "live",
    "dedup",
    "consumer",
    "producers",
];

/// Runs every case and returns the report.
pub async fn run(settings: &Settings, options: &BenchOptions) -> Result<Report> {
    let env = Env::create(settings).await?;
    let result = cases::run_all(&env, settings, options).await;
    env.drop_all().await;
    let mut report = result?;
    if options.smoke {
        report.without_figures();
    }
    Ok(report)
}

/// The benchmark's own database and broker connection.
pub(crate) struct Env {
    pub db_name: String,
    pub db_url: String,
    /// The broker's nodes, for clients the bench starts (consumers).
    pub amqp_urls: Vec<String>,
    admin_url: String,
    /// How to connect to the bench database, for pools of the bench's own load generators.
    connect: PgConnectOptions,
    pub pool: PgPool,
    pub connection: Connection,
    pub channel: Channel,
    queues: std::sync::Mutex<Vec<String>>,
}

impl Env {
    async fn create(settings: &Settings) -> Result<Self> {
        let db_name = format!("postbox_bench_{}", Uuid::new_v4().simple());
        let admin_url = settings.database_url.clone();
        let mut admin = PgConnection::connect(&admin_url)
            .await
            .context("connecting to create the bench database")?;
        sqlx::query(AssertSqlSafe(format!("create database {db_name}")))
            .execute(&mut admin)
            .await
            .context("creating the bench database")?;
        admin.close().await.context("closing admin connection")?;
        match Self::open(settings, &admin_url, db_name.clone()).await {
            Ok(env) => Ok(env),
            Err(error) => {
                drop_database(&admin_url, &db_name).await;
                Err(error)
            }
        }
    }

    /// Connects to the bench database `db_name` (just created), migrates it, and connects to
    /// the broker.
    async fn open(settings: &Settings, admin_url: &str, db_name: String) -> Result<Self> {
        let admin_url = admin_url.to_string();
        let mut url = url::Url::parse(&admin_url).map_err(|e| {
            InvalidSetting::new(
                "database_url",
                crate::redact::redact_url(&admin_url),
                e.to_string(),
            )
        })?;
        url.set_path(&db_name);
        let db_url = url.to_string();
        let connect = <PgConnectOptions as std::str::FromStr>::from_str(&db_url)
            .context("parsing the bench database URL")?;
        let pool = PgPoolOptions::new()
            .max_connections(4)
            .connect_with(connect.clone())
            .await
            .context("connecting to the bench database")?;
        // The pool closes when dropped on an error below, before the database is dropped
        // (`with (force)` would end its sessions anyway).
        crate::migrate(&pool).await?;
        let connection = Broker::new(settings.amqp_urls())
            .connect("postbox bench")
            .await?;
        let channel = crate::amqp::confirm_channel(&connection).await?;
        Ok(Self {
            db_name,
            db_url,
            amqp_urls: settings.amqp_urls().map(String::from).collect(),
            admin_url,
            connect,
            pool,
            connection,
            channel,
            queues: std::sync::Mutex::default(),
        })
    }

    /// A pool of up to `connections` connections to the bench database: for load generators
    /// that each hold one connection while the relay has its own pool.
    pub async fn pool_of(&self, connections: u32) -> Result<PgPool> {
        PgPoolOptions::new()
            .max_connections(connections)
            .connect_with(self.connect.clone())
            .await
            .context("connecting bench writers to the bench database")
            .map_err(Into::into)
    }

    /// Declares a fresh durable queue of `queue_type` and returns its name.
    pub async fn queue(&self, queue_type: &str) -> Result<String> {
        let name = format!("postbox-bench-{queue_type}-{}", Uuid::new_v4().simple());
        let mut args = FieldTable::default();
        args.insert(
            "x-queue-type".into(),
            AMQPValue::LongString(queue_type.into()),
        );
        self.channel
            .queue_declare(
                name.as_str().into(),
                QueueDeclareOptions {
                    durable: true,
                    ..QueueDeclareOptions::default()
                },
                args,
            )
            .await
            .context(format!("declaring {queue_type} queue {name}"))?;
        if let Ok(mut queues) = self.queues.lock() {
            queues.push(name.clone());
        }
        Ok(name)
    }

    /// Consumes `queue` (auto-ack) on a channel of its own.
    pub async fn consume(&self, queue: &str) -> Result<lapin::Consumer> {
        let channel = self
            .connection
            .create_channel()
            .await
            .context("opening a consumer channel")?;
        channel
            .basic_consume(
                queue.into(),
                format!("postbox-bench-{}", Uuid::new_v4().simple())
                    .as_str()
                    .into(),
                lapin::options::BasicConsumeOptions {
                    no_ack: true,
                    ..lapin::options::BasicConsumeOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .context(format!("consuming {queue}"))
            .map_err(Into::into)
    }

    /// Deletes the rows published to `queue` (the history case's retained rows stay) and the
    /// queue, ready for the next case.
    pub async fn clear(&self, queue: &str) -> Result<()> {
        sqlx::query("delete from postbox.outbox where routing_key = $1")
            .bind(queue)
            .execute(&self.pool)
            .await
            .context("clearing the outbox")?;
        self.delete_queue(queue).await;
        Ok(())
    }

    /// Deletes a queue now (its messages would otherwise slow the next case down).
    pub async fn delete_queue(&self, name: &str) {
        let _ = self
            .channel
            .queue_delete(name.into(), QueueDeleteOptions::default())
            .await;
    }

    async fn drop_all(self) {
        let queues = self.queues.lock().map(|q| q.clone()).unwrap_or_default();
        for queue in queues {
            self.delete_queue(&queue).await;
        }
        let _ = self.connection.close(200, "bench done".into()).await;
        self.pool.close().await;
        drop_database(&self.admin_url, &self.db_name).await;
    }
}

/// Drops a bench database, ending its sessions; best effort (the run is over either way).
async fn drop_database(admin_url: &str, db_name: &str) {
    if let Ok(mut admin) = PgConnection::connect(admin_url).await {
        let _ = sqlx::query(AssertSqlSafe(format!(
            "drop database if exists {db_name} with (force)"
        )))
        .execute(&mut admin)
        .await;
    }
}

/// Median, min and max of `samples` (sorted in place).
pub(crate) fn summarize(samples: &mut [f64]) -> (f64, f64, f64) {
    samples.sort_by(f64::total_cmp);
    match samples {
        [] => (0.0, 0.0, 0.0),
        _ => (
            samples[samples.len() / 2],
            samples[0],
            samples[samples.len() - 1],
        ),
    }
}

/// The `q`-quantile of sorted `samples`.
pub(crate) fn quantile(sorted: &[Duration], q: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let index = ((sorted.len() as f64 - 1.0) * q).round() as usize;
    sorted[index.min(sorted.len() - 1)]
}
