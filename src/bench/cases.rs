//! The cases: broker ceiling, backlog drain (plain, two relays, no history, with history),
//! idle latency; the order they run in.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use futures_util::StreamExt;

use tokio_util::sync::CancellationToken;

use super::error::{BenchError, Result};
use super::resources::{self, Usage};
use super::{quantile, BenchOptions, CaseResult, Env, Report};
use crate::config::Settings;
use crate::error::Context;
use crate::relay::encode::outgoing;
use crate::relay::RelayHandle;

pub(super) async fn run_all(
    env: &Env,
    settings: &Settings,
    options: &BenchOptions,
) -> Result<Report> {
    let mut report = Report {
        options: format!(
            "{} messages of {} bytes, batch {}, {} in flight, {} repetition(s)",
            options.messages,
            options.payload_size,
            options.batch_size,
            options.in_flight,
            options.repetitions
        ),
        smoke: false,
        cases: Vec::new(),
    };
    let mut ceilings = Vec::new();
    for queue_type in &options.queue_types {
        let mut ceiling = Vec::new();
        let mut drain_rates = Vec::new();
        let mut drain_usage = Usage::default();
        for rep in 0..options.repetitions {
            // Interleaved, so that a noisy moment hurts both sides alike.
            let (c, usage) = ceiling_once(env, queue_type, options).await?;
            progress_figures(
                options,
                &format!("ceiling {queue_type} #{}", rep + 1),
                &format!("{c:.0} msgs/s; {}", usage.describe()),
            );
            ceiling.push(c);
            let (d, usage) = drain_once(
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
                &format!("drain {queue_type} #{}", rep + 1),
                &format!("{d:.0} rows/s; {}", usage.describe()),
            );
            drain_rates.push(d);
            drain_usage = usage;
        }
        let mut ceiling =
            CaseResult::from_samples("ceiling", queue_type, &mut ceiling, "msgs/s", None);
        let c_med = ceiling.value.unwrap_or(0.0);
        ceiling.ratio_to_ceiling = Some(1.0);
        ceiling.note = "raw persistent publishes, pipelined confirms, no Postgres".into();
        report.cases.push(ceiling);
        let mut drain = CaseResult::from_samples(
            "backlog drain",
            queue_type,
            &mut drain_rates,
            "rows/s",
            Some(c_med),
        );
        let d_med = drain.value.unwrap_or(0.0);
        drain.note = format!(
            "claim → publish → confirm → mark, rows committed first ({}); last run: {}",
            super::keys::backlog_shape(),
            drain_usage.describe()
        );
        report.cases.push(drain);
        ceilings.push((queue_type.clone(), c_med, d_med));
    }
    let (queue_type, ceiling, plain) = ceilings.first().cloned().unwrap_or_default();
    if options.runs("keys") {
        report
            .cases
            .extend(super::keys::keyed_drains(env, settings, &queue_type, options, ceiling).await?);
    }
    for (name, case, shape, what) in [
        (
            "relays",
            "drain, 2 relays",
            Shape {
                relays: 2,
                ..Shape::PLAIN
            },
            "two relays (own pools and connections) sharing one backlog",
        ),
        (
            "nohistory",
            "drain, no history",
            Shape {
                keep_published: false,
                ..Shape::PLAIN
            },
            "relay.keep_published = false: published rows deleted, not marked",
        ),
    ] {
        if !options.runs(name) {
            continue;
        }
        let mut rates = Vec::new();
        let mut last_usage = Usage::default();
        for rep in 0..options.repetitions {
            let (rate, usage) =
                drain_once(env, settings, &queue_type, options, shape, options.messages).await?;
            progress_figures(
                options,
                &format!("{case} {queue_type} #{}", rep + 1),
                &format!("{rate:.0} rows/s; {}", usage.describe()),
            );
            rates.push(rate);
            last_usage = usage;
        }
        let mut result =
            CaseResult::from_samples(case, &queue_type, &mut rates, "rows/s", Some(ceiling));
        result.note = format!(
            "{what}; {:.2} × the plain drain; last run: {}",
            result.times(plain),
            last_usage.describe()
        );
        report.cases.push(result);
    }
    if options.runs("claim") {
        report
            .cases
            .push(super::claim::claim_case(env, options).await?);
    }
    let queue_type = queue_type.as_str();
    if options.runs("latency") {
        report
            .cases
            .push(latency_case(env, settings, queue_type, options).await?);
    }
    if options.runs("idle") {
        report
            .cases
            .push(super::live::idle_queries(env, settings, options, options.idle_seconds).await?);
    }
    if options.runs("live") {
        report.cases.extend(
            super::live::live_cases(
                env,
                settings,
                queue_type,
                options,
                plain,
                options.live_seconds,
            )
            .await?,
        );
        report
            .cases
            .extend(super::live::live_keyed_cases(env, settings, queue_type, options).await?);
    }
    if options.soak_seconds > 0 {
        report
            .cases
            .push(super::live::soak(env, settings, options).await?);
    }
    if options.runs("dedup") {
        report
            .cases
            .push(super::inbox::dedup_case(env, options).await?);
    }
    if options.runs("consumer") {
        report
            .cases
            .extend(super::inbox::consumer_cases(env, queue_type, options).await?);
    }
    if options.runs("producers") {
        report
            .cases
            .extend(super::producers::producers_cases(env, options).await?);
    }
    // Last: the retained rows stay in the table until the bench database is dropped.
    if options.history > 0 {
        report
            .cases
            .push(history_case(env, settings, queue_type, options, ceiling, plain).await?);
    }
    Ok(report)
}

/// Retained rows are inserted this many per statement, with a progress line after each.
const HISTORY_CHUNK: u64 = 1_000_000;

/// The plain drain again, with `options.history` published rows retained in the table: the
/// partial index on pending rows should keep claims from ever seeing them.
async fn history_case(
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
            &format!("drain with history {queue_type} #{}", rep + 1),
            &format!("{rate:.0} rows/s; {}", usage.describe()),
        );
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

async fn latency_case(
    env: &Env,
    settings: &Settings,
    queue_type: &str,
    options: &BenchOptions,
) -> Result<CaseResult> {
    let mut latencies = idle_latency(env, settings, queue_type, options).await?;
    latencies.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    let p50 = ms(quantile(&latencies, 0.5));
    progress_figures(
        options,
        &format!("idle latency {queue_type}"),
        &format!("p50 {p50:.2} ms"),
    );
    let note = format!(
        "insert+commit → arrival at a consumer, {} single events; p99 {:.2} ms",
        latencies.len(),
        ms(quantile(&latencies, 0.99))
    );
    Ok(
        CaseResult::single("idle latency", queue_type, p50, "ms p50", note).with_range(
            latencies.first().copied().map_or(0.0, ms),
            latencies.last().copied().map_or(0.0, ms),
        ),
    )
}

/// A row as the relay would claim it, published to `queue` through the default exchange: the
/// bench's own publishes carry exactly the properties and headers the relay sends.
pub(super) fn bench_row(queue: &str) -> crate::store::outbox::ClaimedRow {
    crate::store::outbox::ClaimedRow {
        id: 0,
        message_id: uuid::Uuid::nil(),
        exchange: String::new(),
        routing_key: queue.into(),
        partition_key: None,
        seq: None,
        payload: Vec::new(),
        invalid: None,
        content_type: "application/json".into(),
        headers: Ok(serde_json::json!({})),
        created_at: chrono::Utc::now(),
        attempts: 0,
        source: Some(uuid::Uuid::new_v4()),
    }
}

pub(super) fn progress(line: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "bench: {line}");
}

/// A progress line with what a case measured (`what: figures`); in a smoke run only that
/// `what` ran, since its figures measure nothing.
pub(super) fn progress_figures(options: &BenchOptions, what: &str, figures: &str) {
    if options.smoke {
        progress(&format!("{what}: ran (smoke run, not measured)"));
    } else {
        progress(&format!("{what}: {figures}"));
    }
}

/// Raw publishing: the same client library, persistent messages, a window of
/// `batch_size × in_flight` unconfirmed messages.
async fn ceiling_once(env: &Env, queue_type: &str, options: &BenchOptions) -> Result<(f64, Usage)> {
    let queue = env.queue(queue_type).await?;
    let payload = vec![b'x'; options.payload_size];
    let mut row = bench_row(&queue);
    let mut window: VecDeque<Vec<lapin::PublisherConfirm>> = VecDeque::new();
    let stop_sampling = CancellationToken::new();
    let sampler = tokio::spawn(resources::sample(stop_sampling.clone()));
    let mut rate = Rate::new(Instant::now());
    let mut sent = 0u32;
    let mut confirmed = 0u64;
    while sent < options.messages {
        let n = options.batch_size.min(options.messages - sent);
        // Published the way the relay publishes a batch: queued in order, writes awaited
        // together.
        let mut messages = Vec::with_capacity(n as usize);
        for _ in 0..n {
            row.id += 1;
            row.message_id = uuid::Uuid::now_v7();
            let message = outgoing(&row).map_err(|e| BenchError::Failed(e.to_string()))?;
            messages.push((message, payload.as_slice()));
        }
        let batch = crate::amqp::publish_in_order(&env.channel, messages)
            .await
            .into_iter()
            .collect::<Result<Vec<_>, _>>()
            .context("bench publish")?;
        sent += n;
        window.push_back(batch);
        if window.len() >= options.in_flight as usize {
            confirmed += await_confirms(window.pop_front()).await?;
            rate.saw(confirmed);
        }
    }
    while let Some(batch) = window.pop_front() {
        confirmed += await_confirms(Some(batch)).await?;
        rate.saw(confirmed);
    }
    let rate = rate.per_second(confirmed);
    stop_sampling.cancel();
    let usage = sampler.await.unwrap_or_default();
    env.delete_queue(&queue).await;
    Ok((rate, usage))
}

/// Awaits a batch's confirms; returns how many there were.
async fn await_confirms(batch: Option<Vec<lapin::PublisherConfirm>>) -> Result<u64> {
    let batch = batch.unwrap_or_default();
    let n = batch.len() as u64;
    for confirm in batch {
        let confirmation = confirm.await.context("bench confirm")?;
        if !matches!(confirmation, lapin::Confirmation::Ack(None)) {
            return Err(BenchError::Unconfirmed(format!("{confirmation:?}")));
        }
    }
    Ok(n)
}

/// A throughput measured from the first finished batch to the last, as the ceiling and the
/// drain both are: what comes before the first batch is done (the relay's start-up, the first
/// claim, the pipeline filling) is not throughput, and counting it would make a run's rate
/// depend on its length.
struct Rate {
    start: Instant,
    first: Option<(Instant, u64)>,
}

impl Rate {
    fn new(start: Instant) -> Self {
        Self { start, first: None }
    }

    /// Records a count of finished messages seen now.
    fn saw(&mut self, done: u64) {
        if done > 0 && self.first.is_none() {
            self.first = Some((Instant::now(), done));
        }
    }

    /// Messages per second up to now, when `total` are done. A run finished in a single batch
    /// has no second point: it is measured from the start.
    fn per_second(&self, total: u64) -> f64 {
        match self.first {
            Some((at, done)) if done < total => (total - done) as f64 / at.elapsed().as_secs_f64(),
            _ => total as f64 / self.start.elapsed().as_secs_f64(),
        }
    }
}

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

/// Single events into an idle relay: time from the insert to arrival at a consumer.
async fn idle_latency(
    env: &Env,
    settings: &Settings,
    queue_type: &str,
    options: &BenchOptions,
) -> Result<Vec<Duration>> {
    let queue = env.queue(queue_type).await?;
    let mut consumer = env.consume(&queue).await?;
    let relay = start_ready_relay(&relay_settings(settings, env, options)).await?;
    let mut samples = Vec::new();
    for _ in 0..options.latency_samples {
        // Let the relay finish its after-batch claim and go idle, as a quiet system would be.
        tokio::time::sleep(Duration::from_millis(20)).await;
        let start = Instant::now();
        sqlx::query("insert into postbox.outbox (routing_key, payload) values ($1, '{}')")
            .bind(&queue)
            .execute(&env.pool)
            .await
            .context("inserting a latency probe")?;
        match tokio::time::timeout(Duration::from_secs(10), consumer.next()).await {
            Ok(Some(Ok(_))) => samples.push(start.elapsed()),
            _ => {
                let _ = relay.stop().await;
                return Err(BenchError::Timeout {
                    what: "a latency probe to arrive",
                    after: Duration::from_secs(10),
                });
            }
        }
    }
    let _ = relay.stop().await;
    env.delete_queue(&queue).await;
    Ok(samples)
}
