//! The broker's ceiling: raw persistent publishes with pipelined confirms, the same client and
//! message shape as the relay's, no Postgres; and how a throughput is measured.

use std::collections::VecDeque;
use std::time::Instant;

use tokio_util::sync::CancellationToken;

use super::error::{BenchError, Result};
use super::resources::{self, Usage};
use super::{BenchOptions, Env};
use crate::error::Context;
use crate::relay::encode::outgoing;

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

/// Raw publishing: the same client library, persistent messages, a window of
/// `batch_size × in_flight` unconfirmed messages.
pub(super) async fn ceiling_once(
    env: &Env,
    queue_type: &str,
    options: &BenchOptions,
) -> Result<(f64, Usage)> {
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
pub(super) struct Rate {
    start: Instant,
    first: Option<(Instant, u64)>,
}

impl Rate {
    pub(super) fn new(start: Instant) -> Self {
        Self { start, first: None }
    }

    /// Records a count of finished messages seen now.
    pub(super) fn saw(&mut self, done: u64) {
        if done > 0 && self.first.is_none() {
            self.first = Some((Instant::now(), done));
        }
    }

    /// Messages per second up to now, when `total` are done. A run finished in a single batch
    /// has no second point: it is measured from the start.
    pub(super) fn per_second(&self, total: u64) -> f64 {
        match self.first {
            Some((at, done)) if done < total => (total - done) as f64 / at.elapsed().as_secs_f64(),
            _ => total as f64 / self.start.elapsed().as_secs_f64(),
        }
    }
}
