//! SQL for `postbox.inbox_streams` and `postbox.inbox_waiting`: a consumer's place in each
//! stream, and the messages it holds until their predecessor is applied.

use std::time::Duration;

use sqlx::{PgConnection, PgExecutor, Row};
use uuid::Uuid;

use super::inbox::text;
use super::inbox_versions::version_key;
use super::Result;
use crate::error::Context;

/// One consumer's view of one stream: a partition key's messages to one exchange and routing
/// key, from one outbox (`source`).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct StreamKey {
    /// The consumer's name.
    pub consumer: String,
    /// The outbox the stream comes from (`x-postbox-source`; `""` when unknown).
    pub source: String,
    /// The partition key.
    pub partition_key: String,
    /// The exchange the stream's messages were published to.
    pub exchange: String,
    /// Their routing key.
    pub routing_key: String,
}

impl StreamKey {
    fn bind<'q>(
        &'q self,
        query: sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments>,
    ) -> sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments> {
        query
            .bind(self.consumer.as_str())
            .bind(text(&self.source))
            .bind(version_key(&self.partition_key))
            .bind(text(&self.exchange))
            .bind(text(&self.routing_key))
    }
}

const WHERE_STREAM: &str = "consumer = $1 and source = $2 and partition_key = $3 \
                            and exchange = $4 and routing_key = $5";

/// Locks the stream's row for the rest of the transaction (creating it if new) and returns
/// the last number applied (`None`: none yet). Transactions applying the stream's messages
/// take turns here, whichever consumer instance runs them. One statement: the no-op update of
/// an existing row takes its lock and returns the row as committed, after waiting for any
/// transaction that holds it (a plain `select … for update` would not see a row another
/// transaction inserted after this statement's snapshot).
pub async fn lock(conn: &mut PgConnection, stream: &StreamKey) -> Result<Option<i64>> {
    stream
        .bind(sqlx::query(
            "insert into postbox.inbox_streams as s \
                 (consumer, source, partition_key, exchange, routing_key) \
             values ($1, $2, $3, $4, $5) \
             on conflict (consumer, source, partition_key, exchange, routing_key) \
                 do update set last_seq = s.last_seq \
             returning s.last_seq",
        ))
        .fetch_one(&mut *conn)
        .await
        .and_then(|row| row.try_get(0))
        .context("locking a stream in postbox.inbox_streams")
}

/// [`lock`] for many streams at once, in the order given (sorted by the caller, so concurrent
/// batches lock in one order and wait for each other instead of deadlocking). Returns each
/// stream's last number applied.
pub async fn lock_many(conn: &mut PgConnection, streams: &[StreamKey]) -> Result<Vec<Option<i64>>> {
    let column =
        |field: fn(&StreamKey) -> String| -> Vec<String> { streams.iter().map(field).collect() };
    let consumers = column(|s| s.consumer.clone());
    let sources = column(|s| text(&s.source));
    let keys = column(|s| version_key(&s.partition_key));
    let exchanges = column(|s| text(&s.exchange));
    let routing_keys = column(|s| text(&s.routing_key));
    sqlx::query(
        "insert into postbox.inbox_streams \
             (consumer, source, partition_key, exchange, routing_key) \
         select * from unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[]) \
         on conflict do nothing",
    )
    .bind(&consumers)
    .bind(&sources)
    .bind(&keys)
    .bind(&exchanges)
    .bind(&routing_keys)
    .execute(&mut *conn)
    .await
    .context("recording streams in postbox.inbox_streams")?;
    let rows: Vec<(i64, Option<i64>)> = sqlx::query_as(
        "select u.position, s.last_seq \
         from unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[]) \
              with ordinality as u(consumer, source, partition_key, exchange, routing_key, position) \
         cross join lateral ( \
             select last_seq from postbox.inbox_streams s \
             where s.consumer = u.consumer and s.source = u.source \
               and s.partition_key = u.partition_key and s.exchange = u.exchange \
               and s.routing_key = u.routing_key \
             for no key update) s \
         order by u.position",
    )
    .bind(&consumers)
    .bind(&sources)
    .bind(&keys)
    .bind(&exchanges)
    .bind(&routing_keys)
    .fetch_all(&mut *conn)
    .await
    .context("locking streams in postbox.inbox_streams")?;
    Ok(rows.into_iter().map(|(_, last)| last).collect())
}

/// Sets each stream's last number applied (`(stream, seq)`; moving forward only), inside the
/// transaction that locked them.
pub async fn advance_many(conn: &mut PgConnection, advanced: &[(StreamKey, i64)]) -> Result<()> {
    let column = |field: fn(&StreamKey) -> String| -> Vec<String> {
        advanced.iter().map(|(s, _)| field(s)).collect()
    };
    let seqs: Vec<i64> = advanced.iter().map(|(_, seq)| *seq).collect();
    sqlx::query(
        "update postbox.inbox_streams s set last_seq = u.seq, updated_at = now() \
         from unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::int8[]) \
              as u(consumer, source, partition_key, exchange, routing_key, seq) \
         where s.consumer = u.consumer and s.source = u.source \
           and s.partition_key = u.partition_key and s.exchange = u.exchange \
           and s.routing_key = u.routing_key \
           and (s.last_seq is null or s.last_seq < u.seq)",
    )
    .bind(column(|s| s.consumer.clone()))
    .bind(column(|s| text(&s.source)))
    .bind(column(|s| version_key(&s.partition_key)))
    .bind(column(|s| text(&s.exchange)))
    .bind(column(|s| text(&s.routing_key)))
    .bind(&seqs)
    .execute(conn)
    .await
    .context("advancing streams in postbox.inbox_streams")?;
    Ok(())
}

/// Records `seq` as applied: the stream's last number, and no longer waiting. Returns whether
/// the next number is waiting already (so the caller applies it next, without looking).
pub async fn applied(conn: &mut PgConnection, stream: &StreamKey, seq: i64) -> Result<bool> {
    let sql = format!(
        "with advanced as ( \
             update postbox.inbox_streams set last_seq = $6, updated_at = now() \
             where {WHERE_STREAM} and (last_seq is null or last_seq < $6) returning 1), \
         removed as ( \
             delete from postbox.inbox_waiting where {WHERE_STREAM} and seq = $6 returning 1) \
         select exists (select 1 from postbox.inbox_waiting \
                        where {WHERE_STREAM} and seq = $6 + 1)"
    );
    stream
        .bind(sqlx::query(sqlx::AssertSqlSafe(sql)))
        .bind(seq)
        .fetch_one(conn)
        .await
        .and_then(|row| row.try_get(0))
        .context("advancing a stream in postbox.inbox_streams")
}

/// A message's outcome was decided outside a transaction holding its stream (dead-lettered,
/// discarded): if it is the stream's next number, the stream moves on past it.
pub async fn settle(pool: &sqlx::PgPool, stream: &StreamKey, seq: i64) -> Result<()> {
    let mut tx = pool.begin().await.context("settling a stream")?;
    let last = lock(&mut tx, stream).await?;
    if last.map_or(seq == 1, |last| seq == last + 1) {
        applied(&mut tx, stream, seq).await?;
    }
    tx.commit().await.context("settling a stream")?;
    Ok(())
}

/// A message held for later, with what it takes to run the handler then.
#[derive(Debug, Clone)]
pub struct Held<'a> {
    /// Its number in the stream.
    pub seq: i64,
    /// Its message id.
    pub message_id: Uuid,
    /// The queue it came from.
    pub queue: &'a str,
    /// Its AMQP properties as JSON.
    pub properties: String,
    /// Its body.
    pub payload: &'a [u8],
}

/// Stores `held` as waiting in `stream`, in the transaction that found it ahead of its turn.
pub async fn hold(conn: &mut PgConnection, stream: &StreamKey, held: &Held<'_>) -> Result<()> {
    stream
        .bind(sqlx::query(
            "insert into postbox.inbox_waiting \
                 (consumer, source, partition_key, exchange, routing_key, seq, message_id, \
                  queue, properties, payload) \
             values ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10) \
             on conflict do nothing",
        ))
        .bind(held.seq)
        .bind(held.message_id)
        .bind(text(held.queue))
        .bind(text(&held.properties))
        .bind(held.payload)
        .execute(conn)
        .await
        .context("holding a message in postbox.inbox_waiting")?;
    Ok(())
}

/// A waiting message whose turn has come.
#[derive(Debug, Clone)]
pub struct Waiting {
    /// Its number in the stream.
    pub seq: i64,
    /// Its message id.
    pub message_id: Uuid,
    /// The queue it came from.
    pub queue: String,
    /// Its AMQP properties as JSON.
    pub properties: String,
    /// Its body.
    pub payload: Vec<u8>,
}

/// The stream's next message, if it arrived early and waits.
pub async fn next_waiting<'e, E: PgExecutor<'e>>(
    executor: E,
    stream: &StreamKey,
) -> Result<Option<Waiting>> {
    const NEXT: &str = "select w.seq, w.message_id, w.queue, w.properties, w.payload \
         from postbox.inbox_streams s \
         join postbox.inbox_waiting w using (consumer, source, partition_key, exchange, routing_key) \
         where s.consumer = $1 and s.source = $2 and s.partition_key = $3 \
           and s.exchange = $4 and s.routing_key = $5 \
           and w.seq = coalesce(s.last_seq, 0) + 1";
    let row = stream
        .bind(sqlx::query(NEXT))
        .fetch_optional(executor)
        .await
        .context("reading postbox.inbox_waiting")?;
    row.map(|row| {
        Ok::<_, sqlx::Error>(Waiting {
            seq: row.try_get(0)?,
            message_id: row.try_get(1)?,
            queue: row.try_get(2)?,
            properties: row.try_get(3)?,
            payload: row.try_get(4)?,
        })
    })
    .transpose()
    .context("reading postbox.inbox_waiting")
}

// Streams of `consumer` whose first waiting message is next, or that never started and have
// waited `start_wait` for their first number: such a stream starts at its lowest waiting
// number (a consumer that joins a stream midway never receives the numbers before). One row
// per stream with waiting messages, so its cost follows what waits, not the history.
const READY: &str = r#"
with heads as (
    select consumer, source, partition_key, exchange, routing_key,
           min(seq) as first_seq, min(received_at) as since
    from postbox.inbox_waiting
    where consumer = $1
    group by consumer, source, partition_key, exchange, routing_key
),
started as (
    update postbox.inbox_streams s
    set last_seq = h.first_seq - 1, updated_at = now()
    from heads h
    where s.consumer = h.consumer and s.source = h.source and s.partition_key = h.partition_key
      and s.exchange = h.exchange and s.routing_key = h.routing_key
      and s.last_seq is null and h.first_seq > 1
      and h.since < now() - $2 * interval '1 millisecond'
    returning s.consumer, s.source, s.partition_key, s.exchange, s.routing_key
)
select h.source, h.partition_key, h.exchange, h.routing_key
from heads h
left join postbox.inbox_streams s using (consumer, source, partition_key, exchange, routing_key)
where h.first_seq = coalesce(s.last_seq, 0) + 1
   or (h.partition_key, h.source, h.exchange, h.routing_key) in
      (select partition_key, source, exchange, routing_key from started)
"#;

/// Streams of `consumer` with a waiting message whose turn has come (see `READY`).
pub async fn ready(
    pool: &sqlx::PgPool,
    consumer: &str,
    start_wait: Duration,
) -> Result<Vec<StreamKey>> {
    let rows = sqlx::query(READY)
        .bind(consumer)
        .bind(i64::try_from(start_wait.as_millis()).unwrap_or(i64::MAX))
        .fetch_all(pool)
        .await
        .context("looking for waiting messages whose turn came")?;
    rows.iter()
        .map(|row| {
            Ok(StreamKey {
                consumer: consumer.to_owned(),
                source: row.try_get(0)?,
                partition_key: row.try_get(1)?,
                exchange: row.try_get(2)?,
                routing_key: row.try_get(3)?,
            })
        })
        .collect::<Result<_, sqlx::Error>>()
        .context("reading streams ready to go on")
}

/// Messages `consumer` holds waiting for their predecessor, and how long the oldest of them
/// has waited (zero when none waits).
pub async fn waiting<'e, E: PgExecutor<'e>>(
    executor: E,
    consumer: &str,
) -> Result<(i64, Duration)> {
    let (count, seconds): (i64, f64) = sqlx::query_as(
        "select count(*), \
                coalesce(extract(epoch from now() - min(received_at)), 0)::float8 \
         from postbox.inbox_waiting where consumer = $1",
    )
    .bind(consumer)
    .fetch_one(executor)
    .await
    .context("counting postbox.inbox_waiting")?;
    Ok((
        count,
        Duration::try_from_secs_f64(seconds.max(0.0)).unwrap_or(Duration::MAX),
    ))
}
