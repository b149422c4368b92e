//! SQL for operators: the status view, dead rows, and outbox retention.

use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::{PgExecutor, PgPool, Row};
use uuid::Uuid;

use super::Result;
use crate::error::Context;
use crate::Vacuum;

/// `postbox.outbox_status`, one row.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct OutboxStatus {
    /// Rows not yet published nor dead.
    pub pending: i64,
    /// Pending rows whose time has come.
    pub pending_due: i64,
    /// Pending rows scheduled for later, never attempted.
    pub scheduled: i64,
    /// Pending rows that failed at least once, waiting for a retry.
    pub retrying: i64,
    /// Rows the relay gave up on.
    pub dead: i64,
    /// Published rows still retained.
    pub published: i64,
    /// Age of the oldest due pending row: how far behind the relay is (0 when caught up).
    pub oldest_pending_age_seconds: f64,
    /// When the latest row was published.
    pub last_published_at: Option<DateTime<Utc>>,
}

/// Reads `postbox.outbox_status`.
pub async fn status(pool: &PgPool) -> Result<OutboxStatus> {
    let row = sqlx::query(
        "select pending, pending_due, scheduled, retrying, dead, published, \
         oldest_pending_age_seconds, last_published_at from postbox.outbox_status",
    )
    .fetch_one(pool)
    .await
    .context("reading postbox.outbox_status")?;
    Ok(OutboxStatus {
        pending: row.get(0),
        pending_due: row.get(1),
        scheduled: row.get(2),
        retrying: row.get(3),
        dead: row.get(4),
        published: row.get(5),
        oldest_pending_age_seconds: row.get(6),
        last_published_at: row.get(7),
    })
}

/// The cheap part of the status: what is waiting, read from the partial indexes only (no
/// scan of the published history), for metrics and readiness.
#[derive(Debug, Clone, Copy, Serialize, PartialEq)]
pub struct Backlog {
    /// Rows not yet published nor dead.
    pub pending: i64,
    /// Rows marked dead.
    pub dead: i64,
    /// Dead keyed rows that park their stream (when keys park): consumers hold the stream's
    /// later messages until the row is released or retried.
    pub parked: i64,
    /// Age of the oldest due pending row (0 when none is due): how far behind the relay is.
    pub oldest_pending_age_seconds: f64,
}

// $1: whether dead rows park their streams (relay.dead_rows_park_keys). Probes run this every
// scrape: the pending part reads the partial pending index, the dead part the partial dead
// index, never the published history.
/// Streams (partition key, exchange, routing key) held back by a dead row of theirs: however
/// many dead rows a stream has, it counts once.
macro_rules! parked_streams {
    () => {
        "(select count(*) from (select distinct o.partition_key, o.exchange, o.routing_key           from postbox.parking_rows d join postbox.outbox o on o.id = d.id) parked)"
    };
}

const BACKLOG: &str = concat!(
    r#"
select count(*),
       (select count(*) from postbox.outbox where dead_at is not null),
       case when $1 then "#,
    parked_streams!(),
    r#" else 0 end,
       coalesce(extract(epoch from now() - min(available_at) filter (where available_at <= now())),
                0)::float8
from postbox.outbox
where published_at is null and dead_at is null
"#
);

/// Reads the backlog figures; `park_keys` says whether dead rows park their streams.
pub async fn backlog(pool: &PgPool, park_keys: bool) -> Result<Backlog> {
    let row = sqlx::query(BACKLOG)
        .bind(park_keys)
        .fetch_one(pool)
        .await
        .context("reading the outbox backlog")?;
    Ok(Backlog {
        pending: row.get(0),
        dead: row.get(1),
        parked: row.get(2),
        oldest_pending_age_seconds: row.get(3),
    })
}

/// Keyed rows at the relay and streams held at consumers, as `postbox status` shows them.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Streams {
    /// Streams (partition key, exchange, routing key) with rows pending at the relay.
    pub keyed_streams_pending: i64,
    /// Keyed rows pending at the relay, and of those not numbered yet.
    pub keyed_rows_pending: i64,
    /// Pending keyed rows without their number yet.
    pub keyed_rows_unnumbered: i64,
    /// Streams whose consumers wait for the number of a dead row (`relay.dead_rows_park_keys`;
    /// 0 when dead rows do not park).
    pub parked_streams: i64,
}

/// Reads the keyed backlog (`postbox.outbox_keyed_backlog`) and the parked streams;
/// `park_keys` says whether dead rows park their streams.
pub async fn streams(pool: &PgPool, park_keys: bool) -> Result<Streams> {
    const STREAMS: &str = concat!(
        "select count(*), coalesce(sum(pending), 0)::bigint, \
                coalesce(sum(unnumbered), 0)::bigint, case when $1 then ",
        parked_streams!(),
        " else 0 end from postbox.outbox_keyed_backlog"
    );
    let row = sqlx::query(STREAMS)
        .bind(park_keys)
        .fetch_one(pool)
        .await
        .context("reading postbox.outbox_keyed_backlog")?;
    Ok(Streams {
        keyed_streams_pending: row.get(0),
        keyed_rows_pending: row.get(1),
        keyed_rows_unnumbered: row.get(2),
        parked_streams: row.get(3),
    })
}

/// One consumer's line of `postbox.inbox_summary`.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct InboxSummary {
    /// The consumer's name.
    pub consumer: String,
    /// Messages applied.
    pub applied: i64,
    /// Messages skipped as stale.
    pub stale: i64,
    /// Messages dead-lettered.
    pub dead_lettered: i64,
    /// Malformed messages discarded.
    pub discarded: i64,
    /// Messages failing right now (retries pending).
    pub failing: i64,
    /// Duplicate deliveries absorbed.
    pub duplicates: i64,
    /// Messages held until their stream's previous number is applied.
    pub waiting: i64,
    /// Skip messages applied (numbers of rows the relay released).
    pub skipped: i64,
    /// Streams with held messages, and how long the longest has waited.
    pub waiting_streams: i64,
    /// Seconds the longest-held message has waited (0 when none is held).
    pub longest_wait_seconds: f64,
}

/// Whether this database holds `relation` (`postbox.outbox`, say): a database may carry one
/// part of the schema alone (a subscriber's, the inbox).
pub async fn has_relation(pool: &PgPool, relation: &str) -> Result<bool> {
    sqlx::query_scalar("select to_regclass($1) is not null")
        .bind(relation)
        .fetch_one(pool)
        .await
        .context(format!("looking for {relation}"))
}

/// Reads `postbox.inbox_summary`, or nothing if this database has no inbox.
pub async fn inbox_summary(pool: &PgPool) -> Result<Vec<InboxSummary>> {
    if !has_relation(pool, "postbox.inbox_summary").await? {
        return Ok(Vec::new());
    }
    let rows = sqlx::query(
        "select s.consumer, s.applied, s.stale, s.dead_lettered, s.discarded, s.failing, \
                s.duplicates, s.waiting, s.skipped, \
                (select count(*) from postbox.inbox_waiting_streams w \
                 where w.consumer = s.consumer), \
                coalesce((select max(waiting_seconds) from postbox.inbox_waiting_streams w \
                          where w.consumer = s.consumer), 0)::float8 \
         from postbox.inbox_summary s order by s.consumer",
    )
    .fetch_all(pool)
    .await
    .context("reading postbox.inbox_summary")?;
    Ok(rows
        .iter()
        .map(|row| InboxSummary {
            consumer: row.get(0),
            applied: row.get(1),
            stale: row.get(2),
            dead_lettered: row.get(3),
            discarded: row.get(4),
            failing: row.get(5),
            duplicates: row.get(6),
            waiting: row.get(7),
            skipped: row.get(8),
            waiting_streams: row.get(9),
            longest_wait_seconds: row.get(10),
        })
        .collect())
}

/// A dead outbox row, as `postbox dead list` shows it.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct DeadRow {
    /// The row's id (its position).
    pub id: i64,
    /// Its message id.
    pub message_id: Uuid,
    /// Its exchange.
    pub exchange: String,
    /// Its routing key.
    pub routing_key: String,
    /// Its partition key.
    pub partition_key: Option<String>,
    /// Failed attempts.
    pub attempts: i32,
    /// The last failure.
    pub last_error: Option<String>,
    /// When it was marked dead.
    pub dead_at: Option<DateTime<Utc>>,
}

/// Dead rows, oldest first, at most `limit`.
pub async fn dead(pool: &PgPool, limit: i64) -> Result<Vec<DeadRow>> {
    let rows = sqlx::query(
        "select id, message_id, exchange, routing_key, partition_key, attempts, last_error, \
         dead_at from postbox.outbox where dead_at is not null order by id limit $1",
    )
    .bind(limit)
    .fetch_all(pool)
    .await
    .context("listing dead rows")?;
    Ok(rows
        .iter()
        .map(|row| DeadRow {
            id: row.get(0),
            message_id: row.get(1),
            exchange: row.get(2),
            routing_key: row.get(3),
            partition_key: row.get(4),
            attempts: row.get(5),
            last_error: row.get(6),
            dead_at: row.get(7),
        })
        .collect())
}

// A fresh start: due now, a full set of attempts. `last_error` stays as the record of why it
// died until the next attempt overwrites or the publish succeeds. A released row's number was
// skipped already (consumers moved on past it): it gets a new one, at the end of its stream.
const RETRY_DEAD: &str = r#"
update postbox.outbox
set dead_at = null, released_at = null, attempts = 0, available_at = now(),
    seq = case when released_at is null then seq end
where dead_at is not null and ($1::bigint[] is null or id = any($1))
returning id
"#;

/// Makes dead rows pending again: those in `ids`, or every dead row when `ids` is `None`.
/// Returns the ids revived (ids that are not dead are left alone).
pub async fn retry_dead<'e, E: PgExecutor<'e>>(
    executor: E,
    ids: Option<&[i64]>,
) -> Result<Vec<i64>> {
    sqlx::query_scalar(RETRY_DEAD)
        .bind(ids)
        .fetch_all(executor)
        .await
        .context("retrying dead rows")
}

/// Releases parked keys: dead rows in `ids` or of `partition_key`, or all of them when both
/// are `None`; each released keyed row sends a skip message in its place. Returns the ids
/// released.
pub async fn release_dead<'e, E: PgExecutor<'e>>(
    executor: E,
    ids: Option<&[i64]>,
    partition_key: Option<&str>,
) -> Result<Vec<i64>> {
    super::outbox::release(executor, ids, partition_key).await
}

/// Wakes running relays (as a commit into the outbox does): rows are free to claim. Sent inside a
/// transaction, it is delivered when that transaction commits.
pub async fn wake_relays<'e, E: PgExecutor<'e>>(executor: E) -> Result<()> {
    sqlx::query("select pg_notify('postbox_outbox', '')")
        .execute(executor)
        .await
        .context("notifying the relays")?;
    Ok(())
}

// A small batch per statement, skipping rows someone holds: no long locks, and never a pending
// or dead row (only published ones match). No order: every row past the cutoff goes in this
// round, and the BRIN index on published_at finds them without sorting the history.
const CLEANUP: &str = r#"
with doomed as (
    select id from postbox.outbox
    where published_at < now() - $1 * interval '1 millisecond'
    limit $2
    for update skip locked
)
delete from postbox.outbox o
using doomed d
where o.id = d.id
"#;

/// Deletes up to `limit` published rows published more than `older_than_ms` ago.
pub async fn cleanup_batch<'e, E: PgExecutor<'e>>(
    executor: E,
    older_than_ms: i64,
    limit: i64,
) -> Result<u64> {
    Ok(sqlx::query(CLEANUP)
        .bind(older_than_ms)
        .bind(limit)
        .execute(executor)
        .await
        .context("deleting old published rows from postbox.outbox")?
        .rows_affected())
}

/// Which retained rows a replay or a reconciliation covers.
#[derive(Debug, Clone, Default)]
pub struct Selection {
    /// Lowest id (inclusive).
    pub from_id: Option<i64>,
    /// Highest id (inclusive).
    pub to_id: Option<i64>,
    /// Written at or after this time.
    pub since: Option<DateTime<Utc>>,
    /// Written before this time.
    pub until: Option<DateTime<Utc>>,
    /// Only this routing key.
    pub routing_key: Option<String>,
}

// Published rows in the selection (parameters $1 to $5; callers add theirs from $6).
const SELECTED: &str = r#"
published_at is not null
and ($1::bigint is null or id >= $1)
and ($2::bigint is null or id <= $2)
and ($3::timestamptz is null or created_at >= $3)
and ($4::timestamptz is null or created_at < $4)
and ($5::text is null or routing_key = $5)
"#;

fn selected<'q>(
    sql: String,
    selection: &'q Selection,
) -> sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments> {
    sqlx::query(sqlx::AssertSqlSafe(sql))
        .bind(selection.from_id)
        .bind(selection.to_id)
        .bind(selection.since)
        .bind(selection.until)
        .bind(selection.routing_key.as_deref())
}

/// Published rows in `selection` (what a replay would republish).
pub async fn count_replayable(pool: &PgPool, selection: &Selection) -> Result<i64> {
    let row = selected(
        format!("select count(*) from postbox.outbox where {SELECTED}"),
        selection,
    )
    .fetch_one(pool)
    .await
    .context("counting rows to replay")?;
    Ok(row.get(0))
}

/// The database's clock, so that bounds compare with `published_at` as Postgres wrote it.
pub async fn now(pool: &PgPool) -> Result<DateTime<Utc>> {
    sqlx::query_scalar("select now()")
        .fetch_one(pool)
        .await
        .context("reading the database clock")
}

/// Makes up to `limit` rows of `selection` with ids above `after_id` that were published before
/// `published_before` pending again (original message ids, a fresh set of attempts), lowest ids
/// first. Returns how many, and the highest id looked at (the next batch's `after_id`), so a long
/// replay reads each row once instead of rescanning what it already queued. The time bound
/// keeps rows the relay republished meanwhile from being taken twice by a replay that starts
/// over. Rows another session holds are waited for, not skipped, and checked again once free
/// (a row a concurrent replay took meanwhile is left alone); the cursor moves past the whole
/// page either way, so the replay ends only when no row is left above it.
pub async fn replay_batch(
    pool: &PgPool,
    selection: &Selection,
    published_before: DateTime<Utc>,
    after_id: i64,
    limit: i64,
) -> Result<(u64, Option<i64>)> {
    let row = selected(
        format!(
            "with page as ( \
                 select id from postbox.outbox where {SELECTED} \
                 and published_at < $6 and id > $7 order by id limit $8), \
             replayed as ( \
                 update postbox.outbox set published_at = null, attempts = 0, \
                        available_at = now() \
                 where id in (select id from page) and {SELECTED} and published_at < $6 \
                 returning id) \
             select (select count(*) from replayed), (select max(id) from page)"
        ),
        selection,
    )
    .bind(published_before)
    .bind(after_id)
    .bind(limit)
    .fetch_one(pool)
    .await
    .context("queueing rows for replay")?;
    let count: i64 = row.try_get(0).context("reading the replayed count")?;
    let last: Option<i64> = row.try_get(1).context("reading the last replayed id")?;
    Ok((u64::try_from(count).unwrap_or(0), last))
}

/// One page of published message ids of `selection`, published before `published_before`,
/// with ids above `after_id`, in id order: `(id, message_id)`.
pub async fn published_ids(
    pool: &PgPool,
    selection: &Selection,
    published_before: DateTime<Utc>,
    after_id: i64,
    limit: i64,
) -> Result<Vec<(i64, Uuid)>> {
    let rows = selected(
        format!(
            "select id, message_id from postbox.outbox where {SELECTED} \
             and published_at < $6 and id > $7 order by id limit $8"
        ),
        selection,
    )
    .bind(published_before)
    .bind(after_id)
    .bind(limit)
    .fetch_all(pool)
    .await
    .context("reading published message ids")?;
    Ok(rows.iter().map(|row| (row.get(0), row.get(1))).collect())
}

/// A table postbox may vacuum itself.
#[derive(Debug, Clone, Copy)]
pub enum HotTable {
    /// `postbox.outbox`.
    Outbox,
    /// `postbox.inbox`.
    Inbox,
}

impl HotTable {
    /// The table's qualified name, for logs and statements.
    pub fn name(self) -> &'static str {
        match self {
            HotTable::Outbox => "postbox.outbox",
            HotTable::Inbox => "postbox.inbox",
        }
    }
}

/// Whether autovacuum will vacuum `table`: on for the server and not disabled for the table.
pub async fn autovacuum_on(pool: &PgPool, table: HotTable) -> Result<bool> {
    sqlx::query_scalar(
        "select current_setting('autovacuum')::bool \
            and coalesce((select o.option_value::bool \
                          from pg_options_to_table(c.reloptions) o \
                          where o.option_name = 'autovacuum_enabled'), true) \
         from pg_class c where c.oid = $1::regclass",
    )
    .bind(table.name())
    .fetch_one(pool)
    .await
    .context("reading the autovacuum setting")
}

/// Whether postbox vacuums `table` itself under `policy`; `Auto` does when autovacuum will
/// not (off for the server or the table), since nothing else would make the space of deleted
/// and superseded rows reusable. If the setting cannot be read, it does not.
pub async fn vacuums_itself(pool: &PgPool, table: HotTable, policy: Vacuum) -> bool {
    match policy {
        Vacuum::Always => true,
        Vacuum::Never => false,
        Vacuum::Auto => match autovacuum_on(pool, table).await {
            Ok(on) => !on,
            Err(error) => {
                tracing::warn!(%error, table = table.name(), "cannot tell whether autovacuum is on; not vacuuming");
                false
            }
        },
    }
}

/// `VACUUM (ANALYZE)` of `table`: makes the space of deleted and superseded rows reusable.
pub async fn vacuum(pool: &PgPool, table: HotTable) -> Result<()> {
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "vacuum (analyze) {}",
        table.name()
    )))
    .execute(pool)
    .await
    .context(format!("vacuuming {}", table.name()))?;
    Ok(())
}
