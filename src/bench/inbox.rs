//! The consumer side: the inbox's batch claim alone, and a consumer end to end.

use std::time::{Duration, Instant};

use super::cases::progress;
use super::{BenchOptions, CaseResult, Env};
use crate::amqp::message::outgoing;
use crate::error::{Context, Error, Result};
use crate::inbox::{Consumer, ConsumerOptions, Handler, HandlerError, Incoming};

pub(super) async fn dedup_case(env: &Env, options: &BenchOptions) -> Result<CaseResult> {
    let mut dedup = Vec::new();
    for rep in 0..options.repetitions {
        let rate = inbox_dedup_once(env, options, rep).await?;
        progress(&format!("inbox dedup #{}: {rate:.0} msgs/s", rep + 1));
        dedup.push(rate);
    }
    let mut result = CaseResult::from_samples("inbox dedup", "-", &mut dedup, "msgs/s", None);
    result.note = format!(
        "inbox::receive_many alone, {INBOX_BATCH} ids per transaction, 10 % duplicates, \
         {INBOX_STREAMS} connections at once"
    );
    Ok(result)
}

/// Message ids per inbox transaction in the dedup case.
const INBOX_BATCH: usize = 1_000;

/// Transactions claiming at once in the dedup case: one per core here, as a consumer with
/// `concurrency` > 1 runs them. One stream keeps one Postgres backend busy and leaves the
/// other core idle.
const INBOX_STREAMS: usize = 2;

/// The consumer's batch claim alone: `INBOX_STREAMS` connections each claim their share of
/// the ids, `INBOX_BATCH` per transaction, every tenth one a duplicate of an id from that
/// stream's previous batch.
async fn inbox_dedup_once(env: &Env, options: &BenchOptions, rep: u32) -> Result<f64> {
    let consumer = format!("bench-{rep}");
    let total = options.messages as usize;
    let start = Instant::now();
    let streams = (0..INBOX_STREAMS).map(|stream| {
        let share = total / INBOX_STREAMS + usize::from(stream < total % INBOX_STREAMS);
        dedup_stream(env, &consumer, share)
    });
    futures_util::future::try_join_all(streams).await?;
    Ok(total as f64 / start.elapsed().as_secs_f64())
}

async fn dedup_stream(env: &Env, consumer: &str, total: usize) -> Result<()> {
    let mut previous: Vec<uuid::Uuid> = Vec::new();
    let mut done = 0;
    while done < total {
        let n = INBOX_BATCH.min(total - done);
        let ids: Vec<uuid::Uuid> = (0..n)
            // position 4 of every ten is always fresh, so each duplicate is a distinct id
            .map(|i| match previous.get(i.saturating_sub(5)) {
                Some(id) if i % 10 == 9 => *id,
                _ => uuid::Uuid::now_v7(),
            })
            .collect();
        let mut tx = env.pool.begin().await.context("bench: begin")?;
        crate::inbox::receive_many(&mut tx, consumer, "bench", &ids).await?;
        tx.commit().await.context("bench: commit")?;
        previous = ids;
        done += n;
    }
    Ok(())
}

/// A handler that writes nothing: what is measured is the consumer's own work per message
/// (delivery, inbox insert, commit, ack).
struct Noop;

impl Handler for Noop {
    async fn handle(
        &self,
        _: &mut sqlx::Transaction<'_, sqlx::Postgres>,
        _: &Incoming,
    ) -> std::result::Result<(), HandlerError> {
        Ok(())
    }
}

/// The consumer configurations measured end to end: (name, concurrency, batch size, prefetch).
const CONSUMER_SHAPES: [(&str, usize, usize, u16); 2] = [
    ("consumer, defaults", 1, 1, 64),
    ("consumer, batched", 4, 100, 800),
];

/// `options.messages` relay-shaped messages (every tenth a redelivery of an earlier id) put in
/// a queue first, then a [`Consumer`] with a handler that writes nothing started on it:
/// messages/s from its start until every one is applied or recognized as a duplicate.
pub(super) async fn consumer_cases(
    env: &Env,
    queue_type: &str,
    options: &BenchOptions,
) -> Result<Vec<CaseResult>> {
    let mut results = Vec::new();
    for (case, concurrency, batch_size, prefetch) in CONSUMER_SHAPES {
        let consumer_options = ConsumerOptions {
            concurrency,
            batch_size,
            prefetch,
            ..ConsumerOptions::default()
        };
        let mut rates = Vec::new();
        for rep in 0..options.repetitions {
            let rate =
                consume_once(env, queue_type, options, consumer_options.clone(), rep).await?;
            progress(&format!("{case} #{}: {rate:.0} msgs/s", rep + 1));
            rates.push(rate);
        }
        let mut result = CaseResult::from_samples(case, queue_type, &mut rates, "msgs/s", None);
        result.note = format!(
            "queue filled first, 10 % duplicates (relay retries), {KEYS} partition keys (versions checked); \
             concurrency {concurrency}, batch_size {batch_size}, prefetch {prefetch}; a handler \
             that writes nothing"
        );
        results.push(result);
    }
    Ok(results)
}

async fn consume_once(
    env: &Env,
    queue_type: &str,
    options: &BenchOptions,
    consumer_options: ConsumerOptions,
    rep: u32,
) -> Result<f64> {
    let queue = env.queue(queue_type).await?;
    let total = u64::from(options.messages);
    fill_queue(env, &queue, options).await?;
    let broker = crate::amqp::Broker::new(env.amqp_urls.clone());
    let consumer = Consumer::new(
        env.pool.clone(),
        broker,
        queue.clone(),
        format!("bench-consumer-{rep}-{}", consumer_options.batch_size),
        Noop,
    )
    .options(consumer_options)
    .spawn()?;
    let stats = consumer.stats();
    let start = Instant::now();
    let deadline = start + Duration::from_secs(600);
    while stats.applied() + stats.duplicates() < total {
        if Instant::now() > deadline {
            let _ = consumer.stop().await;
            return Err(Error::Timeout {
                what: "the consumer to process its queue",
                after: Duration::from_secs(600),
            });
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let rate = total as f64 / start.elapsed().as_secs_f64();
    let _ = consumer.stop().await;
    env.delete_queue(&queue).await;
    // the dead-letter queue the consumer declared (DeadLetter::DefaultQueue)
    env.delete_queue(&format!("{queue}.dead")).await;
    Ok(rate)
}

/// Partition keys of the consumer cases' messages, in turn.
const KEYS: u32 = 1000;

/// Publishes `options.messages` messages shaped as the relay sends them, over [`KEYS`] partition
/// keys (so the inbox checks versions, as it does for most real events); every tenth is a copy
/// of the one five before (its message id, outbox id and key), as a relay retry sends it.
async fn fill_queue(env: &Env, queue: &str, options: &BenchOptions) -> Result<()> {
    let payload = vec![b'x'; options.payload_size];
    let mut row = super::cases::bench_row(queue);
    // (outbox id, message id, key) of every message sent
    let mut sent_rows: Vec<(i64, uuid::Uuid, u32)> = Vec::with_capacity(options.messages as usize);
    let mut next_id = 0;
    let mut sent = 0;
    while sent < options.messages {
        let n = options.batch_size.min(options.messages - sent);
        let mut messages = Vec::with_capacity(n as usize);
        for i in sent..sent + n {
            // the message five before is always a fresh one: each copy repeats a different one
            let earlier = i
                .checked_sub(5)
                .and_then(|e| sent_rows.get(e as usize))
                .copied();
            let (id, message_id, key) = match earlier {
                Some(copy) if i % 10 == 9 => copy,
                _ => {
                    next_id += 1;
                    (next_id, uuid::Uuid::now_v7(), i % KEYS)
                }
            };
            sent_rows.push((id, message_id, key));
            row.id = id;
            row.message_id = message_id;
            row.partition_key = Some(format!("key-{key}"));
            messages.push((
                outgoing(&row).map_err(Error::Unconfirmed)?,
                payload.as_slice(),
            ));
        }
        for confirm in crate::amqp::publish_in_order(&env.channel, messages).await {
            let confirmation = confirm
                .context("bench publish")?
                .await
                .context("bench confirm")?;
            if !matches!(confirmation, lapin::Confirmation::Ack(None)) {
                return Err(Error::Unconfirmed(format!("{confirmation:?}")));
            }
        }
        sent += n;
    }
    Ok(())
}
