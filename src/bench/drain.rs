//! Backlog drains: a committed backlog, then the relay(s) started; rows/s from the first
//! marked batch to the last. Also the drain with published history retained.

use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use super::ceiling::Rate;
use super::error::{BenchError, Result};
use super::report::{progress, progress_figures};
use super::resources::{self, Usage};
use super::{BenchOptions, CaseResult, Env};
use crate::config::Settings;
use crate::error::Context;
use crate::relay::RelayHandle;

pub(super) fn relay_settings(settings: &Settings, env: &Env, options: &BenchOptions) -> Settings {
    let mut s = settings.clone();
    s.database_url = env.db_url.clone();
    s.relay.batch_size = options.batch_size;
    s.relay.max_in_flight_batches = options.in_flight;
    s
}

pub(super) async fn start_relay(settings: &Settings) -> Result<RelayHandle> {
    Ok(settings.connect_relay().await?.spawn())
}

/// A relay that is connected to the broker and listening for commits, as one that has been
/// running a while is: the latency cases measure a running relay, not its start-up.
pub(super) async fn start_ready_relay(settings: &Settings) -> Result<RelayHandle> {
    const LIMIT: Duration = Duration::from_secs(30);
    let relay = settings.connect_relay().await?;
    let health = relay.health();
    let relay = relay.spawn();
    let ready = async {
        while !(health.broker_connected() && health.listening()) {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    };
    if tokio::time::timeout(LIMIT, ready).await.is_err() {
        let _ = relay.stop().await;
        return Err(BenchError::Timeout {
            what: "the relay to connect to the broker and listen for commits",
            after: LIMIT,
        });
    }
    Ok(relay)
}

/// What a drain's backlog and relays look like.
#[derive(Debug, Clone, Copy)]
pub(super) struct Shape {
    /// Partition keys the rows are spread over (0: unkeyed).
    pub keys: u32,
    /// Relays draining side by side (each with its own pool and broker connection).
    pub relays: usize,
    /// `relay.keep_published`.
    pub keep_published: bool,
}

impl Shape {
    pub const PLAIN: Shape = Shape {
        keys: 0,
        relays: 1,
        keep_published: true,
    };
}

/// `rows` rows committed first (see [`super::keys::commit_backlog`]), then the relay(s)
/// started: rows/s from the first marked batch to the last (see [`Rate`]), and the resources
/// used meanwhile.
pub(super) async fn drain_once(
    env: &Env,
    settings: &Settings,
    queue_type: &str,
    options: &BenchOptions,
    shape: Shape,
    rows: u32,
) -> Result<(f64, Usage)> {
    let queue = env.queue(queue_type).await?;
    super::keys::commit_backlog(env, &queue, rows, shape.keys, options.payload_size).await?;
    sqlx::query("vacuum analyze postbox.outbox")
        .execute(&env.pool)
        .await
        .context("vacuum before drain")?;
    let mut settings = relay_settings(settings, env, options);
    settings.relay.keep_published = shape.keep_published;
    let stop_sampling = CancellationToken::new();
    let sampler = tokio::spawn(resources::sample(stop_sampling.clone()));
    let start = Instant::now();
    let mut relays = Vec::with_capacity(shape.relays);
    for _ in 0..shape.relays {
        relays.push(start_relay(&settings).await?);
    }
    let target = u64::from(rows);
    let deadline = start + Duration::from_secs(600);
    let published =
        |relays: &[RelayHandle]| -> u64 { relays.iter().map(|r| r.stats().published()).sum() };
    let mut rate = Rate::new(start);
    loop {
        let done = published(&relays);
        rate.saw(done);
        if done >= target {
            break;
        }
        if Instant::now() > deadline {
            for relay in relays {
                let _ = relay.stop().await;
            }
            return Err(BenchError::Timeout {
                what: "backlog drain",
                after: Duration::from_secs(600),
            });
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let rate = rate.per_second(target);
    stop_sampling.cancel();
    let usage = sampler.await.unwrap_or_default();
    for relay in relays {
        let _ = relay.stop().await;
    }
    env.clear(&queue).await?;
    Ok((rate, usage))
}

/// [`drain_once`] of `options.messages` unkeyed rows by one relay, reported as `what`.
pub(super) async fn plain_drain(
    env: &Env,
    settings: &Settings,
    queue_type: &str,
    options: &BenchOptions,
    what: &str,
) -> Result<(f64, Usage)> {
    let (rate, usage) = drain_once(
        env,
        settings,
        queue_type,
        options,
        Shape::PLAIN,
        options.messages,
    )
    .await?;
    progress_figures(
        options,
        what,
        &format!("{rate:.0} rows/s; {}", usage.describe()),
    );
    Ok((rate, usage))
}

/// Retained rows are inserted this many per statement, with a progress line after each.
const HISTORY_CHUNK: u64 = 1_000_000;

/// The plain drain again, with `options.history` published rows retained in the table: the
/// partial index on pending rows should keep claims from ever seeing them.
pub(super) async fn history_case(
    env: &Env,
    settings: &Settings,
    queue_type: &str,
    options: &BenchOptions,
    ceiling: f64,
    plain: f64,
) -> Result<CaseResult> {
    let mut filled = 0;
    while filled < options.history {
        let n = HISTORY_CHUNK.min(options.history - filled);
        sqlx::query(
            "insert into postbox.outbox
                 (routing_key, payload, created_at, available_at, published_at)
             select 'postbox-bench-history', repeat('x', $1), now() - interval '1 hour',
                    now() - interval '1 hour', now() - interval '1 hour'
             from generate_series(1, $2)",
        )
        .bind(options.payload_size as i32)
        .bind(n as i64)
        .execute(&env.pool)
        .await
        .context("filling the outbox with published history")?;
        filled += n;
        progress(&format!("history: {filled} published rows retained"));
    }
    let mut rates = Vec::new();
    for rep in 0..options.repetitions {
        let what = format!("drain with history {queue_type} #{}", rep + 1);
        let (rate, _) = plain_drain(env, settings, queue_type, options, &what).await?;
        rates.push(rate);
    }
    let mut result = CaseResult::from_samples(
        format!("drain, {} history", options.history),
        queue_type,
        &mut rates,
        "rows/s",
        Some(ceiling),
    );
    result.note = format!(
        "the plain drain with {} published rows retained in the outbox; {:.2} × the plain drain",
        options.history,
        result.times(plain)
    );
    Ok(result)
}
