//! The relay under live load and at rest: commit→arrival latency while producers commit at a
//! fixed rate or as fast as writers of their own keys can, the retention soak, and the queries
//! an idle relay sends.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use lapin::types::AMQPValue;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use super::drain::{relay_settings, start_ready_relay, start_relay};
use super::error::{BenchError, Result};
use super::keys::ROWS_PER_TRANSACTION;
use super::report::progress_figures;
use super::{quantile, resources, BenchOptions, CaseResult, Env};
use crate::config::Settings;
use crate::contract::{HEADER_PARTITION_KEY, HEADER_SEQ};
use crate::error::Context;

/// Commits per producer tick.
const TICK: Duration = Duration::from_millis(10);

/// Producers commit `rate` rows/s (one transaction per 10 ms tick) for `seconds` while the
/// relay runs; a consumer reads each row's commit time from its payload. Returns the sorted
/// commit→arrival latencies.
pub(super) async fn latency_at_rate(
    env: &Env,
    settings: &Settings,
    queue_type: &str,
    options: &BenchOptions,
    rate: f64,
    seconds: f64,
) -> Result<Vec<Duration>> {
    let queue = env.queue(queue_type).await?;
    let mut consumer = env.consume(&queue).await?;
    let relay = start_ready_relay(&relay_settings(settings, env, options)).await?;
    let base = Instant::now();
    let ticks = (seconds / TICK.as_secs_f64()).ceil() as u64;
    let per_tick = rate * TICK.as_secs_f64();
    let total = (per_tick * ticks as f64).round() as usize;
    let receiver = tokio::spawn(async move {
        let mut latencies = Vec::with_capacity(total);
        while latencies.len() < total {
            match tokio::time::timeout(Duration::from_secs(30), consumer.next()).await {
                Ok(Some(Ok(delivery))) => {
                    if let Some(micros) = sent_micros(&delivery.data) {
                        let arrived = base.elapsed();
                        latencies.push(arrived.saturating_sub(Duration::from_micros(micros)));
                    }
                }
                _ => break,
            }
        }
        latencies
    });
    let mut committed = 0usize;
    for tick in 0..ticks {
        let due = base + TICK * (tick as u32);
        tokio::time::sleep_until(due.into()).await;
        let n = ((per_tick * (tick + 1) as f64).round() as usize).saturating_sub(committed);
        if n == 0 {
            continue;
        }
        // The commit time is taken just before the insert; the row carries it as its payload.
        let micros = base.elapsed().as_micros() as i64;
        sqlx::query(
            "insert into postbox.outbox (routing_key, payload)
             select $1, to_json($2::bigint)::text from generate_series(1, $3)",
        )
        .bind(&queue)
        .bind(micros)
        .bind(n as i32)
        .execute(&env.pool)
        .await
        .context("live insert")?;
        committed += n;
    }
    let mut latencies = receiver.await.unwrap_or_default();
    let _ = relay.stop().await;
    env.clear(&queue).await?;
    if latencies.len() < committed {
        return Err(BenchError::Timeout {
            what: "every live event to arrive",
            after: Duration::from_secs(30),
        });
    }
    latencies.sort();
    Ok(latencies)
}

/// The drain rate a smoke run's live cases take their shares of: its own drain, over a few
/// batches, measures nothing, and committing at a share of such a "rate" (hundreds of
/// thousands of rows/s) would only pile up a backlog for the relay to work through.
const SMOKE_DRAIN_RATE: f64 = 4_000.0;

/// Live cases at 25 %, 50 % and 90 % of the measured drain rate.
pub(super) async fn live_cases(
    env: &Env,
    settings: &Settings,
    queue_type: &str,
    options: &BenchOptions,
    drain_rate: f64,
    seconds: f64,
) -> Result<Vec<CaseResult>> {
    let drain_rate = if options.smoke {
        SMOKE_DRAIN_RATE
    } else {
        drain_rate
    };
    let mut cases = Vec::new();
    for share in [0.25, 0.5, 0.9] {
        let rate = drain_rate * share;
        let latencies = latency_at_rate(env, settings, queue_type, options, rate, seconds).await?;
        let ms = |q: f64| quantile(&latencies, q).as_secs_f64() * 1e3;
        let (p50, p99, max) = (ms(0.5), ms(0.99), ms(1.0));
        progress_figures(
            options,
            &format!("live {queue_type} at {:.0} %", share * 100.0),
            &format!("{rate:.0}/s: p50 {p50:.1} ms, p99 {p99:.1} ms, max {max:.1} ms"),
        );
        let note = format!(
            "{rate:.0} rows/s committed for {seconds:.0}s (a transaction per 10 ms), \
             insert start → arrival; p99 {p99:.1} ms, max {max:.1} ms, {} events",
            latencies.len()
        );
        cases.push(
            CaseResult::single(
                format!("live {:.0} %", share * 100.0),
                queue_type,
                p50,
                "ms p50",
                note,
            )
            .with_range(ms(0.0), max),
        );
    }
    Ok(cases)
}

/// The commit time (µs from the case's start) a live event carries as its payload.
fn sent_micros(payload: &[u8]) -> Option<u64> {
    std::str::from_utf8(payload)
        .ok()
        .and_then(|s| s.trim_matches('"').parse::<u64>().ok())
}

/// Writers in the keyed live case, each committing its own partition key's events.
const KEYED_WRITERS: u32 = 4;

/// How long the writers' cases wait for another event before giving up on the rest.
const ARRIVAL_TIMEOUT: Duration = Duration::from_secs(30);

/// What a writers' case's consumer saw.
#[derive(Debug, Default)]
struct Arrivals {
    /// Commit → arrival, per event, sorted once all are in.
    latencies: Vec<Duration>,
    /// When the last event arrived, from the case's start.
    last: Duration,
    /// Events that arrived after a higher stream number (`x-postbox-seq`) of their key: each
    /// batch goes out on a channel of its own, so a stream in two batches at once can reach
    /// the queue out of order, and the consumer holds it.
    late: u64,
    /// Events without a key or stream number.
    unnumbered: u64,
}

/// One run of [`KEYED_WRITERS`] writers committing as fast as they can while the relay
/// publishes.
#[derive(Debug)]
struct WritersRun {
    committed: u64,
    /// How long the writers committed.
    window: Duration,
    /// Events committed but not yet arrived when the writers stopped.
    in_transit: u64,
    arrivals: Arrivals,
    usage: resources::Usage,
}

impl WritersRun {
    fn commits_per_second(&self) -> f64 {
        self.committed as f64 / self.window.as_secs_f64().max(1e-3)
    }

    /// Events over the time from the start to the last arrival: equal to the commit rate,
    /// less a latency's worth, when the relay keeps pace.
    fn arrivals_per_second(&self) -> f64 {
        self.committed as f64 / self.arrivals.last.as_secs_f64().max(1e-3)
    }

    fn latency_ms(&self, q: f64) -> f64 {
        quantile(&self.arrivals.latencies, q).as_secs_f64() * 1e3
    }

    fn describe(&self) -> String {
        format!(
            "{:.0} rows/s committed, {:.0} arriving; p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
            self.commits_per_second(),
            self.arrivals_per_second(),
            self.latency_ms(0.5),
            self.latency_ms(0.99),
            self.latency_ms(1.0)
        )
    }
}

/// [`KEYED_WRITERS`] writers, each committing its own partition key's events
/// [`ROWS_PER_TRANSACTION`] to a transaction as fast as it can for `options.live_seconds`,
/// while the relay publishes: arrivals/s against commits/s, and commit → arrival latency.
/// Unlike the fixed-rate cases the load is whatever the writers manage, sharing the cores with
/// the relay as an application does. The same writers without keys run just before, so a
/// reader can tell what the keys cost from what the commit pattern does.
pub(super) async fn live_keyed_cases(
    env: &Env,
    settings: &Settings,
    queue_type: &str,
    options: &BenchOptions,
) -> Result<Vec<CaseResult>> {
    let plain = writers_once(env, settings, queue_type, options, false).await?;
    progress_figures(
        options,
        &format!("live {queue_type}, {KEYED_WRITERS} writers, unkeyed pair"),
        &format!("{}; {}", plain.describe(), plain.usage.describe()),
    );
    let keyed = writers_once(env, settings, queue_type, options, true).await?;
    progress_figures(
        options,
        &format!("live {queue_type}, {KEYED_WRITERS} writer keys"),
        &format!("{}; {}", keyed.describe(), keyed.usage.describe()),
    );
    let (commits, arrivals) = (keyed.commits_per_second(), keyed.arrivals_per_second());
    let throughput = CaseResult::single(
        format!("live, {KEYED_WRITERS} writer keys"),
        queue_type,
        arrivals,
        "rows/s",
        format!(
            "{KEYED_WRITERS} writers, each committing its own partition key's events \
             {ROWS_PER_TRANSACTION} per transaction as fast as it can for {:.0}s, while the \
             relay publishes: {commits:.0} rows/s committed, {arrivals:.0} arriving (start → \
             last arrival) = {:.2} × commits (target: keeps pace); {} not yet arrived when the \
             writers stopped; {} events, {} arriving after a higher number of their key, {} \
             unnumbered; {}; the same writers unkeyed, just before: {}",
            options.live_seconds,
            arrivals / commits.max(1e-9),
            keyed.in_transit,
            keyed.committed,
            keyed.arrivals.late,
            keyed.arrivals.unnumbered,
            keyed.usage.describe(),
            plain.describe()
        ),
    );
    let (p50, p99, max) = (
        keyed.latency_ms(0.5),
        keyed.latency_ms(0.99),
        keyed.latency_ms(1.0),
    );
    let latency = CaseResult::single(
        format!("live, {KEYED_WRITERS} writer keys, latency"),
        queue_type,
        p50,
        "ms p50",
        format!(
            "insert start → arrival at a consumer during the case above; p99 {p99:.1} ms \
             (target ≤ 100), max {max:.1} ms; unkeyed pair p50 {:.1} ms, p99 {:.1} ms",
            plain.latency_ms(0.5),
            plain.latency_ms(0.99)
        ),
    )
    .with_range(keyed.latency_ms(0.0), max);
    Ok(vec![throughput, latency])
}

/// [`KEYED_WRITERS`] writers commit for `options.live_seconds`, each its own partition key's
/// events when `keyed`; a consumer takes each event's commit time from its payload.
async fn writers_once(
    env: &Env,
    settings: &Settings,
    queue_type: &str,
    options: &BenchOptions,
    keyed: bool,
) -> Result<WritersRun> {
    let queue = env.queue(queue_type).await?;
    let consumer = env.consume(&queue).await?;
    let writers = env.pool_of(KEYED_WRITERS).await?;
    let relay = start_ready_relay(&relay_settings(settings, env, options)).await?;
    let stop_sampling = CancellationToken::new();
    let sampler = tokio::spawn(resources::sample(stop_sampling.clone()));
    let base = Instant::now();
    let expected = Arc::new(AtomicU64::new(u64::MAX));
    let arrived = Arc::new(AtomicU64::new(0));
    let receiver = tokio::spawn(receive(
        consumer,
        base,
        Arc::clone(&expected),
        Arc::clone(&arrived),
    ));
    let end = base + Duration::from_secs_f64(options.live_seconds);
    let committed = futures_util::future::try_join_all((0..KEYED_WRITERS).map(|writer| {
        let key = keyed.then(|| format!("writer-{writer}"));
        writer_once(&writers, &queue, key, base, end)
    }))
    .await
    .map(|counts| counts.into_iter().sum::<u64>());
    let window = base.elapsed();
    let in_transit = committed.as_ref().map_or(0, |total| {
        total.saturating_sub(arrived.load(Ordering::Acquire))
    });
    // After a failed writer, wait for nothing more.
    expected.store(*committed.as_ref().unwrap_or(&0), Ordering::Release);
    let mut arrivals = receiver.await.unwrap_or_default();
    stop_sampling.cancel();
    let usage = sampler.await.unwrap_or_default();
    let _ = relay.stop().await;
    writers.close().await;
    env.clear(&queue).await?;
    let committed = committed?;
    if (arrivals.latencies.len() as u64) < committed {
        return Err(BenchError::Timeout {
            what: "every live writer's event to arrive",
            after: ARRIVAL_TIMEOUT,
        });
    }
    arrivals.latencies.sort();
    Ok(WritersRun {
        committed,
        window,
        in_transit,
        arrivals,
        usage,
    })
}

/// One writer: events of `key`, [`ROWS_PER_TRANSACTION`] per transaction, each carrying the
/// time just before its insert, until `end`. Returns the rows committed.
async fn writer_once(
    pool: &PgPool,
    queue: &str,
    key: Option<String>,
    base: Instant,
    end: Instant,
) -> Result<u64> {
    let mut connection = pool.acquire().await.context("connecting a live writer")?;
    let mut committed = 0;
    while Instant::now() < end {
        let micros = base.elapsed().as_micros() as i64;
        sqlx::query(
            "insert into postbox.outbox (routing_key, payload, partition_key)
             select $1, to_json($2::bigint)::text, $3 from generate_series(1, $4)",
        )
        .bind(queue)
        .bind(micros)
        .bind(key.as_deref())
        .bind(ROWS_PER_TRANSACTION as i32)
        .execute(&mut *connection)
        .await
        .context("live writer insert")?;
        committed += u64::from(ROWS_PER_TRANSACTION);
    }
    Ok(committed)
}

/// Receives a writers' case's events until `expected` (unknown until the writers stop) have
/// arrived, or none has for [`ARRIVAL_TIMEOUT`]; counts them in `arrived` as they come.
async fn receive(
    mut consumer: lapin::Consumer,
    base: Instant,
    expected: Arc<AtomicU64>,
    arrived: Arc<AtomicU64>,
) -> Arrivals {
    // Short waits, so the count the writers settle on is seen soon after the last arrival.
    const POLL: Duration = Duration::from_millis(50);
    let mut arrivals = Arrivals::default();
    let mut highest: HashMap<String, i64> = HashMap::new();
    let mut quiet = Duration::ZERO;
    while (arrivals.latencies.len() as u64) < expected.load(Ordering::Acquire) {
        match tokio::time::timeout(POLL, consumer.next()).await {
            Ok(Some(Ok(delivery))) => {
                quiet = Duration::ZERO;
                let now = base.elapsed();
                let Some(micros) = sent_micros(&delivery.data) else {
                    continue;
                };
                arrivals
                    .latencies
                    .push(now.saturating_sub(Duration::from_micros(micros)));
                arrivals.last = now;
                arrived.fetch_add(1, Ordering::Release);
                match stream_position(&delivery.properties) {
                    Some((key, seq)) => {
                        let highest = highest.entry(key).or_insert(0);
                        if seq < *highest {
                            arrivals.late += 1;
                        }
                        *highest = (*highest).max(seq);
                    }
                    None => arrivals.unnumbered += 1,
                }
            }
            Ok(_) => break, // the consumer ended
            Err(_) => {
                quiet += POLL;
                if quiet >= ARRIVAL_TIMEOUT {
                    break;
                }
            }
        }
    }
    arrivals
}

/// The partition key and stream number a relay's message carries.
fn stream_position(properties: &lapin::BasicProperties) -> Option<(String, i64)> {
    let headers = properties.headers().as_ref()?.inner();
    let key = match headers.get(HEADER_PARTITION_KEY)? {
        AMQPValue::LongString(key) => String::from_utf8_lossy(key.as_bytes()).into_owned(),
        _ => return None,
    };
    match headers.get(HEADER_SEQ)? {
        AMQPValue::LongLongInt(seq) => Some((key, *seq)),
        _ => None,
    }
}

/// Published rows are deleted this long after publishing during the soak.
const SOAK_RETENTION: Duration = Duration::from_secs(5);

/// Steady load with retention on: does the outbox stop growing? Producers commit
/// `soak_rate` rows/s in 100 ms ticks; the relay publishes them and deletes rows published more
/// than `SOAK_RETENTION` ago every second. Reports the table's size (heap, indexes, TOAST).
pub(super) async fn soak(
    env: &Env,
    settings: &Settings,
    options: &BenchOptions,
) -> Result<CaseResult> {
    let queue = env.queue("classic").await?;
    let mut relay_settings = relay_settings(settings, env, options);
    relay_settings.relay.retention = SOAK_RETENTION;
    relay_settings.relay.cleanup_interval = Duration::from_secs(1);
    let relay = start_relay(&relay_settings).await?;
    let start = Instant::now();
    let mut committed: u64 = 0;
    let mut ticks: u64 = 0;
    let end = start + Duration::from_secs(u64::from(options.soak_seconds));
    let mut next_tick = start;
    let mut next_sample = start;
    let mut sizes: Vec<(f64, i64)> = Vec::new();
    while Instant::now() < end {
        if Instant::now() >= next_sample {
            let size: i64 = sqlx::query_scalar("select pg_total_relation_size('postbox.outbox')")
                .fetch_one(&env.pool)
                .await
                .context("reading the outbox size")?;
            sizes.push((start.elapsed().as_secs_f64(), size));
            next_sample += Duration::from_secs(1);
        }
        // What is due by the end of this tick, so a rate that is not a multiple of ten per
        // second is kept exactly over the run instead of rounded down every tick.
        ticks += 1;
        let due = u64::from(options.soak_rate) * ticks / 10;
        let rows = due - committed;
        if rows > 0 {
            sqlx::query(
                "insert into postbox.outbox (routing_key, payload)
                 select $1, repeat('x', $2) from generate_series(1, $3)",
            )
            .bind(&queue)
            .bind(options.payload_size as i32)
            .bind(rows as i64)
            .execute(&env.pool)
            .await
            .context("soak insert")?;
            committed = due;
        }
        next_tick += Duration::from_millis(100);
        tokio::time::sleep_until(next_tick.into()).await;
    }
    let published = relay.stats().published();
    let _ = relay.stop().await;
    env.clear(&queue).await?;
    let mib = |bytes: i64| bytes as f64 / (1024.0 * 1024.0);
    let at = |fraction: f64| {
        let t = options.soak_seconds as f64 * fraction;
        sizes
            .iter()
            .find(|(s, _)| *s >= t)
            .or(sizes.last())
            .map(|(_, b)| mib(*b))
            .unwrap_or(0.0)
    };
    let peak = sizes.iter().map(|(_, b)| mib(*b)).fold(0.0, f64::max);
    let (third, two_thirds, last) = (at(1.0 / 3.0), at(2.0 / 3.0), at(1.0));
    progress_figures(
        options,
        "soak",
        &format!(
            "outbox {third:.1} → {two_thirds:.1} → {last:.1} MiB (peak {peak:.1}), {published} published"
        ),
    );
    let note = format!(
        "outbox size after {}s at {} rows/s, retention {}s: {third:.1} MiB at 1/3, \
         {two_thirds:.1} at 2/3, {last:.1} at the end (range: 1/3 size to peak); {published} published",
        options.soak_seconds,
        options.soak_rate,
        SOAK_RETENTION.as_secs()
    );
    Ok(CaseResult::single("retention soak", "classic", last, "MiB", note).with_range(third, peak))
}

/// Transactions per second the idle relay makes in the bench database (from
/// `pg_stat_database`, less the two reads of the counter itself), over `seconds`.
pub(super) async fn idle_queries(
    env: &Env,
    settings: &Settings,
    options: &BenchOptions,
    seconds: u64,
) -> Result<CaseResult> {
    let relay = start_relay(&relay_settings(settings, env, options)).await?;
    // Let the relay finish starting (first claim, cleanup, registry row), and Postgres publish
    // those counters: a session that is idle flushes them up to 10 s late. Shorter windows
    // (--quick) only show that the case runs.
    let settle = if seconds >= 10 { 11 } else { 2 };
    tokio::time::sleep(Duration::from_secs(settle)).await;
    let read = || async {
        // Postgres publishes a session's counters at most once a second, and reads them
        // through a per-transaction snapshot: clear it so each read is fresh.
        sqlx::query("select pg_stat_clear_snapshot()")
            .execute(&env.pool)
            .await
            .context("clearing the stats snapshot")?;
        sqlx::query_scalar::<_, i64>(
            "select xact_commit + xact_rollback from pg_stat_database \
             where datname = current_database()",
        )
        .fetch_one(&env.pool)
        .await
        .context("reading pg_stat_database")
    };
    let before = read().await?;
    tokio::time::sleep(Duration::from_secs(seconds)).await;
    let after = read().await?;
    let _ = relay.stop().await;
    // Our own two statements per read, counted in the window once each.
    let relay_xacts = (after - before - 2).max(0);
    let per_second = relay_xacts as f64 / seconds as f64;
    progress_figures(
        options,
        "idle",
        &format!("{per_second:.2} transactions/s over {seconds}s"),
    );
    let note = format!(
        "statements (each its own transaction) the idle relay sent over {seconds}s, from \
         pg_stat_database; poll every {}, heartbeat every {}",
        humantime::format_duration(settings.relay.poll_interval),
        humantime::format_duration(settings.relay.heartbeat_interval)
    );
    Ok(CaseResult::single(
        "idle queries",
        "-",
        per_second,
        "queries/s",
        note,
    ))
}
