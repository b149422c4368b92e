//! Idle latency: single events into an idle relay, insert to arrival at a consumer.

use std::time::{Duration, Instant};

use futures_util::StreamExt;

use super::drain::{relay_settings, start_ready_relay};
use super::error::{BenchError, Result};
use super::report::progress_figures;
use super::{quantile, BenchOptions, CaseResult, Env};
use crate::config::Settings;
use crate::error::Context;

pub(super) async fn latency_case(
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
