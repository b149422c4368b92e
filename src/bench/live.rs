//! The relay under live load and at rest: commit→arrival latency while producers commit at a
//! fixed rate, and the queries an idle relay sends.

use std::time::{Duration, Instant};

use futures_util::StreamExt;

use super::cases::{progress, relay_settings, start_ready_relay, start_relay};
use super::{quantile, BenchOptions, CaseResult, Env};
use crate::config::Settings;
use crate::error::{Context, Error, Result};

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
                    let sent = std::str::from_utf8(&delivery.data)
                        .ok()
                        .and_then(|s| s.trim_matches('"').parse::<u64>().ok());
                    if let Some(micros) = sent {
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
        return Err(Error::Timeout {
            what: "every live event to arrive",
            after: Duration::from_secs(30),
        });
    }
    latencies.sort();
    Ok(latencies)
}

/// Live cases at 25 %, 50 % and 90 % of the measured drain rate.
pub(super) async fn live_cases(
    env: &Env,
    settings: &Settings,
    queue_type: &str,
    options: &BenchOptions,
    drain_rate: f64,
    seconds: f64,
) -> Result<Vec<CaseResult>> {
    let mut cases = Vec::new();
    for share in [0.25, 0.5, 0.9] {
        let rate = drain_rate * share;
        let latencies = latency_at_rate(env, settings, queue_type, options, rate, seconds).await?;
        let ms = |q: f64| quantile(&latencies, q).as_secs_f64() * 1e3;
        let (p50, p99, max) = (ms(0.5), ms(0.99), ms(1.0));
        progress(&format!(
            "live {queue_type} at {rate:.0}/s: p50 {p50:.1} ms, p99 {p99:.1} ms, max {max:.1} ms"
        ));
        cases.push(CaseResult {
            case: format!("live {:.0} %", share * 100.0),
            queue_type: queue_type.into(),
            value: p50,
            min: latencies.first().map_or(0.0, |d| d.as_secs_f64() * 1e3),
            max,
            unit: "ms p50".into(),
            ratio_to_ceiling: None,
            note: format!(
                "{rate:.0} rows/s committed for {seconds:.0}s (a transaction per 10 ms), \
                 insert start → arrival; p99 {p99:.1} ms, max {max:.1} ms, {} events",
                latencies.len()
            ),
        });
    }
    Ok(cases)
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
    progress(&format!(
        "idle: {per_second:.2} transactions/s over {seconds}s"
    ));
    Ok(CaseResult {
        case: "idle queries".into(),
        queue_type: "-".into(),
        value: per_second,
        min: per_second,
        max: per_second,
        unit: "queries/s".into(),
        ratio_to_ceiling: None,
        note: format!(
            "statements (each its own transaction) the idle relay sent over {seconds}s, from \
             pg_stat_database; poll every {}, heartbeat every {}",
            humantime::format_duration(settings.relay.poll_interval),
            humantime::format_duration(settings.relay.heartbeat_interval)
        ),
    })
}
