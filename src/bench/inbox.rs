//! The consumer side: the inbox's batch claim alone, and a consumer end to end.

use std::time::{Duration, Instant};

use super::error::{BenchError, Result};
use super::report::progress_figures;
use super::{BenchOptions, CaseResult, Env};
use crate::error::Context;
use crate::inbox::{Consumer, ConsumerOptions, Handler, HandlerError, Incoming, Versioning};
use crate::relay::encode::outgoing;

pub(super) async fn dedup_case(env: &Env, options: &BenchOptions) -> Result<CaseResult> {
    let mut dedup = Vec::new();
    for rep in 0..options.repetitions {
        let rate = inbox_dedup_once(env, options, rep).await?;
        progress_figures(
            options,
            &format!("inbox dedup #{}", rep + 1),
            &format!("{rate:.0} msgs/s"),
        );
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

/// `options.messages` relay-shaped messages (see [`fill_queue`]) put in a queue first, then a
/// [`Consumer`] ordering each stream by number (`Versioning::Sequence`, the default) with a
/// handler that writes nothing started on it: messages/s from its start until every one is
/// applied or recognized as a duplicate.
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
            // The default, named: the case measures the consumer with ordering on.
            versioning: Versioning::Sequence,
            ..ConsumerOptions::default()
        };
        let mut rates = Vec::new();
        let mut last = Outcomes::default();
        for rep in 0..options.repetitions {
            let (rate, outcomes) =
                consume_once(env, queue_type, options, consumer_options.clone(), rep).await?;
            progress_figures(
                options,
                &format!("{case} #{}", rep + 1),
                &format!("{rate:.0} msgs/s; {}", outcomes.describe()),
            );
            rates.push(rate);
            last = outcomes;
        }
        let mut result = CaseResult::from_samples(case, queue_type, &mut rates, "msgs/s", None);
        result.note = format!(
            "queue filled first with relay-shaped messages (x-postbox-seq numbered per key, \
             x-postbox-partition-key, x-postbox-source) over {KEYS} keys, applied in stream \
             order (Versioning::Sequence); 10 % duplicates (relay retries), 1 in {} arriving \
             ahead of its predecessor in its stream; concurrency {concurrency}, batch_size \
             {batch_size}, prefetch {prefetch}; a handler that writes nothing; last run: {}",
            2 * EARLY_EVERY,
            last.describe()
        );
        results.push(result);
    }
    Ok(results)
}

/// How a consumer case's messages were decided.
#[derive(Debug, Default, Clone, Copy)]
struct Outcomes {
    applied: u64,
    duplicates: u64,
    held: u64,
    /// Expected to stay 0: stale, dead-lettered or discarded messages.
    other: u64,
}

impl Outcomes {
    fn describe(&self) -> String {
        format!(
            "{} applied ({} of them held until their predecessor came), {} duplicates, {} \
             stale/dead-lettered/discarded",
            self.applied, self.held, self.duplicates, self.other
        )
    }
}

async fn consume_once(
    env: &Env,
    queue_type: &str,
    options: &BenchOptions,
    consumer_options: ConsumerOptions,
    rep: u32,
) -> Result<(f64, Outcomes)> {
    let queue = env.queue(queue_type).await?;
    let total = u64::from(options.messages);
    let distinct = fill_queue(env, &queue, options).await?;
    let broker = crate::amqp::Broker::new(env.amqp_urls.clone());
    let name = format!("bench-consumer-{rep}-{}", consumer_options.batch_size);
    let consumer = Consumer::builder(env.pool.clone(), broker)
        .queue(queue.clone())
        .name(name.clone())
        .options(consumer_options)
        .handler(Noop)?
        .spawn();
    let stats = consumer.stats();
    let outcomes = || Outcomes {
        applied: stats.applied(),
        duplicates: stats.duplicates(),
        held: stats.waiting(),
        other: stats.stale() + stats.dead_lettered() + stats.discarded(),
    };
    let start = Instant::now();
    let deadline = start + Duration::from_secs(600);
    loop {
        let now = outcomes();
        // Every delivery accounted for (a held message counts once applied). The inbox has the
        // last word, since a delivery counted twice would end the wait early: every distinct
        // message decided there.
        let counted = now.applied + now.duplicates + now.other >= total;
        if counted && decided(env, &name).await? >= distinct {
            break;
        }
        if Instant::now() > deadline {
            let _ = consumer.stop().await;
            return Err(BenchError::Timeout {
                what: "the consumer to process its queue",
                after: Duration::from_secs(600),
            });
        }
        // Counting the inbox takes longer than reading counters: not every 2 ms.
        let pause = if counted { 20 } else { 2 };
        tokio::time::sleep(Duration::from_millis(pause)).await;
    }
    let rate = total as f64 / start.elapsed().as_secs_f64();
    let outcomes = outcomes();
    let _ = consumer.stop().await;
    env.delete_queue(&queue).await;
    // the dead-letter queue the consumer declared (DeadLetter::DefaultQueue)
    env.delete_queue(&format!("{queue}.dead")).await;
    Ok((rate, outcomes))
}

/// Messages `consumer` has decided in the inbox (applied, stale, dead-lettered, ...): not
/// held for their turn nor failing.
async fn decided(env: &Env, consumer: &str) -> Result<u64> {
    let decided: i64 = sqlx::query_scalar(
        "select count(*) from postbox.inbox where consumer = $1 and processed_at is not null",
    )
    .bind(consumer)
    .fetch_one(&env.pool)
    .await
    .context("counting the messages the consumer decided")?;
    Ok(u64::try_from(decided).unwrap_or(0))
}

/// Partition keys of the consumer cases' messages, in turn.
const KEYS: u32 = 1000;

/// One message in this many of alternate rounds over the keys arrives ahead of its predecessor.
const EARLY_EVERY: u32 = 100;

/// Publishes `options.messages` messages shaped as the relay sends them, over [`KEYS`]
/// partition keys in turn, each numbered in its key's stream (`x-postbox-seq` 1, 2, 3, …), so
/// the consumer orders them as it orders a relay's. Every tenth is a copy of the one five
/// before (message id, outbox id, key and number), as a relay retry sends it. And a few arrive
/// ahead of their predecessor, as they can with several relays: in every other round over the
/// keys, every [`EARLY_EVERY`]th message swaps places with the next message of its key (the
/// same position a round later); the consumer holds it in `postbox.inbox_waiting` until its
/// predecessor is applied. Returns the number of distinct messages (copies not counted).
async fn fill_queue(env: &Env, queue: &str, options: &BenchOptions) -> Result<u64> {
    let payload = vec![b'x'; options.payload_size];
    let mut row = super::ceiling::bench_row(queue);
    let total = options.messages;
    // (outbox id, message id, key, stream number) of every message, in the order sent
    let mut messages: Vec<(i64, uuid::Uuid, u32, i64)> = Vec::with_capacity(total as usize);
    let mut last_seq = vec![0_i64; KEYS as usize];
    let mut next_id = 0;
    for i in 0..total {
        // the message five before is always a fresh one: each copy repeats a different one
        let earlier = i
            .checked_sub(5)
            .and_then(|e| messages.get(e as usize))
            .copied();
        let message = match earlier {
            Some(copy) if i % 10 == 9 => copy,
            _ => {
                next_id += 1;
                let key = i % KEYS;
                let seq = &mut last_seq[key as usize];
                *seq += 1;
                (next_id, uuid::Uuid::now_v7(), key, *seq)
            }
        };
        messages.push(message);
    }
    // Positions ≡ 0 (mod 10) hold fresh messages (copies sit at 9), and the next message of
    // the same key is KEYS places on; swapping only in odd rounds keeps the pairs apart.
    for i in (0..total).filter(|i| i % EARLY_EVERY == 0 && (i / KEYS) % 2 == 1) {
        if i + KEYS < total {
            messages.swap(i as usize, (i + KEYS) as usize);
        }
    }
    for chunk in messages.chunks(options.batch_size.max(1) as usize) {
        let mut batch = Vec::with_capacity(chunk.len());
        for &(id, message_id, key, seq) in chunk {
            row.id = id;
            row.message_id = message_id;
            row.partition_key = Some(format!("key-{key}"));
            row.seq = Some(seq);
            batch.push((
                outgoing(&row).map_err(|e| BenchError::Failed(e.to_string()))?,
                payload.as_slice(),
            ));
        }
        for confirm in crate::amqp::publish_in_order(&env.channel, batch).await {
            let confirmation = confirm
                .context("bench publish")?
                .await
                .context("bench confirm")?;
            if !matches!(confirmation, lapin::Confirmation::Ack(None)) {
                return Err(BenchError::Unconfirmed(format!("{confirmation:?}")));
            }
        }
    }
    Ok(next_id as u64)
}
