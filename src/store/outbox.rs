//! SQL for `postbox.outbox`: insert, claim, complete and the idle probe.

use std::collections::HashMap;
use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::{PgConnection, PgExecutor, Row};
use uuid::Uuid;

use super::Result;
use crate::error::Context;

/// The insert of `insert_many`, with `$conflict` between the rows and `returning`.
macro_rules! insert_many_sql {
    ($conflict:literal) => {
        concat!(
            r#"
insert into postbox.outbox
    (message_id, exchange, routing_key, partition_key, payload, payload_bytes, content_type,
     headers, available_at)
select m.message_id, m.exchange, m.routing_key, m.partition_key, m.payload, m.payload_bytes,
       m.content_type, m.headers::jsonb,
       coalesce(m.available_at, now() + m.delay_ms * interval '1 millisecond', now())
from unnest($1::uuid[], $2::text[], $3::text[], $4::text[], $5::text[], $6::bytea[], $7::text[],
            $8::text[], $9::timestamptz[], $10::float8[])
     with ordinality
     as m(message_id, exchange, routing_key, partition_key, payload, payload_bytes, content_type,
          headers, available_at, delay_ms, position)
-- identity values are drawn in this order, so ids ascend in the caller's order
order by m.position
"#,
            $conflict,
            "returning id, message_id"
        )
    };
}

/// For messages whose ids the caller chose: an id already in the outbox is skipped.
const INSERT_MANY_IDEMPOTENT: &str = insert_many_sql!("on conflict (message_id) do nothing\n");

/// For messages whose ids were drawn just now (UUIDv7, so none can be in the outbox yet): a
/// plain insert, cheaper than checking each id for a conflict first.
const INSERT_MANY_NEW: &str = insert_many_sql!("");

/// One row to insert, column by column.
pub struct NewRow<'a> {
    /// `message_id`.
    pub message_id: Uuid,
    /// `exchange`.
    pub exchange: &'a str,
    /// `routing_key`.
    pub routing_key: &'a str,
    /// `partition_key`.
    pub partition_key: Option<&'a str>,
    /// `payload` (text) or `payload_bytes`.
    pub payload: Body<'a>,
    /// `content_type`.
    pub content_type: &'a str,
    /// `headers`, a JSON object as text.
    pub headers: String,
    /// `available_at`, if given as a time.
    pub available_at: Option<DateTime<Utc>>,
    /// `available_at` as a delay from the insert's `now()`, in milliseconds.
    pub delay_ms: Option<f64>,
}

/// Which payload column a row fills.
pub enum Body<'a> {
    /// `payload`: text stored as written.
    Text(&'a str),
    /// `payload_bytes`.
    Bytes(&'a [u8]),
}

/// Inserts `rows` in one statement. Returns the outbox id of each row that was new, by message
/// id; rows whose message id already existed are left alone. `fresh`: every id was drawn just
/// now rather than given by the caller, so none can exist.
pub async fn insert_many<'e, E: PgExecutor<'e>>(
    executor: E,
    rows: &[NewRow<'_>],
    fresh: bool,
) -> Result<HashMap<Uuid, i64>> {
    let n = rows.len();
    let mut ids = Vec::with_capacity(n);
    let mut exchange = Vec::with_capacity(n);
    let mut routing_key = Vec::with_capacity(n);
    let mut partition_key = Vec::with_capacity(n);
    let mut text = Vec::with_capacity(n);
    let mut bytes = Vec::with_capacity(n);
    let mut content_type = Vec::with_capacity(n);
    let mut headers = Vec::with_capacity(n);
    let mut available_at = Vec::with_capacity(n);
    let mut delay_ms = Vec::with_capacity(n);
    for row in rows {
        ids.push(row.message_id);
        exchange.push(row.exchange);
        routing_key.push(row.routing_key);
        partition_key.push(row.partition_key);
        match row.payload {
            Body::Text(t) => {
                text.push(Some(t));
                bytes.push(None);
            }
            Body::Bytes(b) => {
                text.push(None);
                bytes.push(Some(b));
            }
        }
        content_type.push(row.content_type);
        headers.push(row.headers.as_str());
        available_at.push(row.available_at);
        delay_ms.push(row.delay_ms);
    }
    let statement = if fresh {
        INSERT_MANY_NEW
    } else {
        INSERT_MANY_IDEMPOTENT
    };
    let inserted = sqlx::query(statement)
        .bind(&ids)
        .bind(&exchange)
        .bind(&routing_key)
        .bind(&partition_key)
        .bind(&text)
        .bind(&bytes)
        .bind(&content_type)
        .bind(&headers)
        .bind(&available_at)
        .bind(&delay_ms)
        .fetch_all(executor)
        .await
        .context(format!("inserting {n} message(s) into postbox.outbox"))?;
    inserted
        .iter()
        .map(|row| Ok((row.try_get("message_id")?, row.try_get("id")?)))
        .collect::<Result<_, sqlx::Error>>()
        .context("reading inserted outbox ids")
}

/// A pending row, locked by the claiming transaction until it is completed or released.
#[derive(Debug, Clone)]
pub struct ClaimedRow {
    /// Outbox position.
    pub id: i64,
    /// Becomes the AMQP message id.
    pub message_id: Uuid,
    /// Target exchange (`""` is the default exchange).
    pub exchange: String,
    /// Routing key.
    pub routing_key: String,
    /// Ordering key, if any.
    pub partition_key: Option<String>,
    /// The row's number in its stream (partition key, exchange, routing key); `None` for
    /// unkeyed rows. Keyed rows are claimed only once numbered.
    pub seq: Option<i64>,
    /// The body, from `payload` or `payload_bytes`.
    pub payload: Vec<u8>,
    /// Which rule of the SQL contract the row breaks, if any (no payload or two, no routing
    /// key for the default exchange, an empty content type, an infinite `created_at` or
    /// `available_at`): the
    /// relay refuses such a row with this reason instead of sending it.
    pub invalid: Option<String>,
    /// AMQP content type.
    pub content_type: String,
    /// The row's headers, a JSON object; or why they could not be read (JSON nested deeper
    /// than the relay parses: such a row is marked dead, not allowed to fail every claim).
    pub headers: Result<serde_json::Value, String>,
    /// When the row was written.
    pub created_at: DateTime<Utc>,
    /// Failed attempts before this one.
    pub attempts: i32,
    /// The outbox's identity (`postbox.outbox_source`), sent as `x-postbox-source`.
    pub source: Option<Uuid>,
}

impl ClaimedRow {
    /// Whether the row is a skip message standing for a released row (header
    /// `x-postbox-skip`, written by the trigger that replaces a released dead row).
    pub fn is_skip(&self) -> bool {
        matches!(&self.headers, Ok(serde_json::Value::Object(headers)) if headers.contains_key(crate::contract::HEADER_SKIP))
    }
}

/// Numbers up to `limit` due keyed rows, in one statement outside any transaction (committed
/// on return; see `postbox.number_rows`). Returns how many it numbered, or `None` when
/// another pass (of this relay or another) holds the numbering lock: that pass does the work.
pub async fn number<'e, E: PgExecutor<'e>>(executor: E, limit: u32) -> Result<Option<u64>> {
    let numbered: Option<i32> = sqlx::query_scalar("select postbox.number_rows($1)")
        .bind(i32::try_from(limit).unwrap_or(i32::MAX))
        .fetch_one(executor)
        .await
        .context("numbering keyed rows of postbox.outbox")?;
    Ok(numbered.map(|n| u64::try_from(n).unwrap_or(0)))
}

// The first due pending rows from $2 on, in id order, that no other batch has locked; keyed
// rows only once numbered (see `number`). No row is held back for its key: order travels in the
// number, and consumers apply a stream's messages in number order. The scan stops at the first
// due keyed row not numbered yet (found in outbox_unnumbered_idx): past it lies the backlog the
// numbering passes have not reached, which the claim would otherwise walk row by row without
// taking any (measured: 486 ms and 57,000 buffers over 1 M unnumbered rows of one key, against
// 0.7 ms with the bound). Rows behind it wait for the next numbering pass, which runs before
// every claim. The bound is looked for from $2 on too: below $2 the index holds an entry for
// every row numbered since the table was last vacuumed (dead, but still read: 1,919 pages and
// 2 ms after 500,000 numbered rows), and the claim looks at nothing below $2 anyway; from the
// tail it reads a few pages.
//
// `invalid` says which rule of the SQL contract a row breaks that Postgres does not enforce
// (checking at insert would cost every producer's transaction; see the migration
// 20261205000002_cheaper_outbox_row.sql): such a row is refused, that is marked dead with the
// reason, instead of being sent. The rules on lengths and headers are checked where the row is
// encoded (`relay::encode::outgoing`).
const CLAIM: &str = r#"
select id, message_id, exchange, routing_key, partition_key, seq, payload, payload_bytes,
       content_type, headers::text as headers, attempts,
       (select id from postbox.outbox_source limit 1) as source,
       case when isfinite(created_at) then created_at else now() end as created_at,
       case when num_nonnulls(payload, payload_bytes) <> 1
                 then 'exactly one of payload and payload_bytes must be set'
            when exchange = '' and routing_key = ''
                 then 'routing_key must not be empty when exchange is '''' (the default exchange)'
            when content_type = ''
                 then 'content_type must not be empty'
            when not isfinite(created_at)
                 then 'created_at must be a finite time'
            -- '-infinity' is due at once, but the operator views cannot subtract it from now()
            when not isfinite(available_at)
                 then 'available_at must be a finite time (''infinity'' stays scheduled for good)'
       end as invalid
from postbox.outbox
where published_at is null and dead_at is null and available_at <= now()
  and id >= $2
  and id < coalesce((select min(u.id) from postbox.outbox u
                     where u.id >= $2 and u.partition_key is not null and u.seq is null
                       and u.published_at is null and u.dead_at is null
                       and u.available_at <= now()),
                    9223372036854775807)
  and (partition_key is null or seq is not null)
order by id
limit $1
for update skip locked
"#;

/// Claims up to `limit` due rows with ids from `from_id` on, on `tx`'s connection; they stay
/// locked until it ends. The rows come back in publish order: id order, except that each
/// stream's rows are put in number order (a row that committed late has a lower id than rows
/// of its stream numbered before it).
pub async fn claim(tx: &mut PgConnection, limit: u32, from_id: i64) -> Result<Vec<ClaimedRow>> {
    let rows = sqlx::query(CLAIM)
        .bind(i64::from(limit))
        .bind(from_id)
        .fetch_all(tx)
        .await
        .context("claiming a batch from postbox.outbox")?;
    let mut claimed = rows
        .iter()
        .map(claimed_row)
        .collect::<Result<Vec<_>, sqlx::Error>>()
        .context("reading claimed outbox rows")?;
    in_stream_order(&mut claimed);
    Ok(claimed)
}

/// Reorders each stream's rows by number within the places its rows hold, leaving every
/// other row where it is.
fn in_stream_order(rows: &mut [ClaimedRow]) {
    use std::collections::BTreeMap;
    let mut streams: BTreeMap<(&str, &str, &str), Vec<usize>> = BTreeMap::new();
    for (place, row) in rows.iter().enumerate() {
        if let Some(key) = row.partition_key.as_deref() {
            streams
                .entry((key, row.exchange.as_str(), row.routing_key.as_str()))
                .or_default()
                .push(place);
        }
    }
    let moves: Vec<Vec<usize>> = streams
        .into_values()
        .filter(|places| {
            places
                .windows(2)
                .any(|pair| rows[pair[0]].seq > rows[pair[1]].seq)
        })
        .collect();
    for places in moves {
        let mut members: Vec<ClaimedRow> = places.iter().map(|&p| rows[p].clone()).collect();
        members.sort_by_key(|row| row.seq);
        for (place, row) in places.into_iter().zip(members) {
            rows[place] = row;
        }
    }
}

fn claimed_row(row: &sqlx::postgres::PgRow) -> Result<ClaimedRow, sqlx::Error> {
    let text: Option<String> = row.try_get("payload")?;
    let bytes: Option<Vec<u8>> = row.try_get("payload_bytes")?;
    Ok(ClaimedRow {
        id: row.try_get("id")?,
        message_id: row.try_get("message_id")?,
        exchange: row.try_get("exchange")?,
        routing_key: row.try_get("routing_key")?,
        partition_key: row.try_get("partition_key")?,
        seq: row.try_get("seq")?,
        payload: text.map(String::into_bytes).or(bytes).unwrap_or_default(),
        invalid: row.try_get("invalid")?,
        content_type: row.try_get("content_type")?,
        // As text, parsed here: a jsonb nested deeper than serde_json's limit (Postgres takes
        // far deeper) would otherwise fail the decoding of the whole claim, every time.
        headers: serde_json::from_str(row.try_get::<&str, _>("headers")?)
            .map_err(|e| format!("headers cannot be read: {e}")),
        created_at: row.try_get("created_at")?,
        attempts: row.try_get("attempts")?,
        source: row.try_get("source")?,
    })
}

/// The decision for one claimed row, as the completer writes it.
#[derive(Debug, Clone, PartialEq)]
pub enum Completion {
    /// Confirmed by the broker.
    Published,
    /// Failed; try again after `retry_after`.
    Retry {
        /// Why the attempt failed.
        error: String,
        /// Backoff before the next attempt.
        retry_after: Duration,
    },
    /// Failed for the last time.
    Dead {
        /// Why the last attempt failed.
        error: String,
    },
}

// The usual batch: every row confirmed. No join, so no plan can go quadratic.
const COMPLETE_PUBLISHED: &str = r#"
update postbox.outbox
set published_at = now()
where id = any($1) and published_at is null and dead_at is null
"#;

// The same with `relay.keep_published = false`: a deleted row writes no new row version and no
// index entries, about half of Postgres's work per row.
const DELETE_PUBLISHED: &str = r#"
delete from postbox.outbox
where id = any($1) and published_at is null and dead_at is null
"#;

// A batch with failures. Always planned for the batch at hand (not prepared): a generic plan
// guesses ten rows for the unnest and, with a big table, joins it by a nested loop that
// rescans the whole batch for every row (measured with 10 M rows of history: 80 ms instead
// of 6.5 ms for 500 rows). With $5 (`relay.keep_published = false`) its published rows are
// deleted rather than marked; the two parts touch disjoint rows.
const COMPLETE: &str = r#"
with d as materialized (
    select * from unnest($1::bigint[], $2::text[], $3::text[], $4::float8[])
                  as d(id, outcome, error, retry_after_ms)
),
deleted as (
    delete from postbox.outbox o
    using d
    where $5 and d.outcome = 'published' and o.id = d.id
      -- lets the planner fetch the batch by primary key instead of hashing the whole table
      and o.id = any($1)
      and o.published_at is null and o.dead_at is null
    returning 1
),
updated as (
    update postbox.outbox o
    set published_at = case when d.outcome = 'published' then now() end,
        dead_at      = case when d.outcome = 'dead' then now() end,
        attempts     = o.attempts + case when d.outcome = 'published' then 0 else 1 end,
        last_error   = coalesce(d.error, o.last_error),
        available_at = case when d.outcome = 'retry'
                            then now() + d.retry_after_ms * interval '1 millisecond'
                            else o.available_at end
    from d
    where not ($5 and d.outcome = 'published') and o.id = d.id
      and o.id = any($1)
      and o.published_at is null and o.dead_at is null
    returning 1
)
select (select count(*) from deleted) + (select count(*) from updated)
"#;

/// Writes the outcomes of a batch in one statement, on the transaction that claimed it; with
/// `keep_published` false, published rows are deleted instead of marked. Unless `park_keys`,
/// rows that die are released at once (see [`release`]). Returns the number of rows written.
pub async fn complete(
    tx: &mut PgConnection,
    outcomes: &[(i64, Completion)],
    keep_published: bool,
    park_keys: bool,
) -> Result<u64> {
    let n = outcomes.len();
    if outcomes
        .iter()
        .all(|(_, completion)| *completion == Completion::Published)
    {
        let ids: Vec<i64> = outcomes.iter().map(|(id, _)| *id).collect();
        let statement = if keep_published {
            COMPLETE_PUBLISHED
        } else {
            DELETE_PUBLISHED
        };
        let result = sqlx::query(statement)
            .bind(&ids)
            .execute(tx)
            .await
            .context(format!("marking {n} outbox row(s) published"))?;
        return Ok(result.rows_affected());
    }
    let mut ids = Vec::with_capacity(n);
    let mut kinds = Vec::with_capacity(n);
    let mut errors = Vec::with_capacity(n);
    let mut retry_after_ms = Vec::with_capacity(n);
    for (id, completion) in outcomes {
        ids.push(*id);
        let (kind, error, after) = match completion {
            Completion::Published => ("published", None, None),
            Completion::Retry { error, retry_after } => (
                "retry",
                Some(error.as_str()),
                Some(retry_after.as_secs_f64() * 1000.0),
            ),
            Completion::Dead { error } => ("dead", Some(error.as_str()), None),
        };
        kinds.push(kind);
        errors.push(error);
        retry_after_ms.push(after);
    }
    let written: i64 = sqlx::query_scalar(COMPLETE)
        .persistent(false)
        .bind(&ids)
        .bind(&kinds)
        .bind(&errors)
        .bind(&retry_after_ms)
        .bind(!keep_published)
        .fetch_one(&mut *tx)
        .await
        .context(format!("marking {n} outbox row(s)"))?;
    if !park_keys {
        let dead: Vec<i64> = outcomes
            .iter()
            .filter(|(_, completion)| matches!(completion, Completion::Dead { .. }))
            .map(|(id, _)| *id)
            .collect();
        if !dead.is_empty() {
            release(&mut *tx, Some(&dead), None).await?;
        }
    }
    Ok(written.try_into().unwrap_or(0))
}

// Dead rows let go: marked released. For each numbered keyed row, the trigger
// `outbox_skip_released` writes a skip message with its number into the outbox (published like
// any row), so its stream's consumers move on past the number instead of waiting for it.
const RELEASE: &str = r#"
update postbox.outbox
set released_at = now()
where dead_at is not null and released_at is null
  and ($1::bigint[] is null or id = any($1))
  and ($2::text is null or partition_key = $2)
returning id
"#;

/// Releases dead rows (those in `ids`, or of `partition_key`, or all when both are `None`):
/// their streams move on past them. Returns the ids released.
pub async fn release<'e, E: PgExecutor<'e>>(
    executor: E,
    ids: Option<&[i64]>,
    partition_key: Option<&str>,
) -> Result<Vec<i64>> {
    sqlx::query_scalar(RELEASE)
        .bind(ids)
        .bind(partition_key)
        .fetch_all(executor)
        .await
        .context("releasing dead rows")
        .map(|mut ids: Vec<i64>| {
            ids.sort_unstable();
            ids
        })
}

const NEXT_DUE: &str = r#"
-- null when nothing is pending; rows already due count as due now. Rows scheduled at
-- ±infinity (the SQL contract refuses them, the table does not) would make the subtraction
-- fail: '-infinity' is due now (claims take it, and mark it dead), 'infinity' never.
select extract(epoch from min(greatest(available_at, clock_timestamp())) - clock_timestamp())::float8
from postbox.outbox
where published_at is null and dead_at is null and available_at < 'infinity'
"#;

/// How long until the earliest pending row is due, by the database's clock (zero: due now;
/// `None`: nothing pending). One cheap statement, so an idle relay's fallback poll costs the
/// database next to nothing.
pub async fn next_due<'e, E: PgExecutor<'e>>(executor: E) -> Result<Option<Duration>> {
    let seconds: Option<f64> = sqlx::query_scalar(NEXT_DUE)
        .fetch_one(executor)
        .await
        .context("probing postbox.outbox for due rows")?;
    Ok(seconds.map(|s| Duration::try_from_secs_f64(s.max(0.0)).unwrap_or(Duration::MAX)))
}
