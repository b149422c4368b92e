//! SQL for `postbox.inbox` and `postbox.inbox_versions`: claiming a message id, the per-key
//! version check, and recording outcomes.

use sqlx::{PgConnection, PgExecutor, Row};
use uuid::Uuid;

use crate::error::{Context, Result};

/// What the inbox records about one delivery (see [`receive`](crate::inbox::receive)).
#[derive(Debug, Clone)]
pub struct Receipt<'a> {
    /// The consumer's name.
    pub consumer: &'a str,
    /// The message's id.
    pub message_id: Uuid,
    /// The queue it was consumed from.
    pub queue: &'a str,
    /// Its routing key.
    pub routing_key: &'a str,
    /// Its ordering key, if it has one.
    pub partition_key: Option<&'a str>,
    /// The version it carries for its key, if any.
    pub version: Option<i64>,
    /// Where the version comes from (the outbox's `x-postbox-source`): versions are compared
    /// only between messages of the same source. `None` for messages without one.
    pub source: Option<&'a str>,
}

/// A decided message's outcome, as stored in `postbox.inbox.outcome`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The handler ran and its writes committed.
    Applied,
    /// Skipped: a newer version of its key had been applied.
    Stale,
    /// Sent to the dead-letter queue.
    DeadLettered,
    /// Malformed and dropped by policy.
    Discarded,
}

impl Outcome {
    /// The value stored in the `outcome` column.
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Applied => "applied",
            Outcome::Stale => "stale",
            Outcome::DeadLettered => "dead_lettered",
            Outcome::Discarded => "discarded",
        }
    }

    fn parse(value: &str) -> Option<Self> {
        Some(match value {
            "applied" => Outcome::Applied,
            "stale" => Outcome::Stale,
            "dead_lettered" => Outcome::DeadLettered,
            "discarded" => Outcome::Discarded,
            _ => return None,
        })
    }
}

/// The result of claiming a message id.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Claim {
    /// Seen for the first time: the row is written, already marked applied (it commits with
    /// the handler's writes or rolls back with them).
    First,
    /// Seen before but not decided: failed runs (`attempts`) came before. The outcome still
    /// has to be set.
    Undecided {
        /// Failed handler runs recorded so far.
        attempts: i32,
    },
    /// Already decided: a duplicate, counted.
    Duplicate(Outcome),
}

// One statement in the common case. A new id is inserted as applied; `xmax = 0` tells a fresh
// insert from a conflict (the row of a conflicting insert has been locked, so its xmax is set),
// and for a conflict the returned outcome is the one stored before, since the update leaves it
// alone. A concurrent delivery of the same id waits on the row lock until the first transaction
// ends, then sees its outcome: two consumers never both run the handler.
const CLAIM: &str = r#"
insert into postbox.inbox as i
    (consumer, message_id, queue, routing_key, partition_key, version, outcome, processed_at)
values ($1, $2, $3, $4, $5, $6, 'applied', now())
on conflict (consumer, message_id) do update
    set duplicates = i.duplicates + (i.outcome is not null)::int,
        last_received_at = now()
returning (i.xmax = 0) as inserted, i.outcome, i.attempts
"#;

/// Claims `receipt`'s message id inside the handler's transaction.
pub async fn claim(conn: &mut PgConnection, receipt: &Receipt<'_>) -> Result<Claim> {
    let row = bind(sqlx::query(CLAIM), receipt)
        .fetch_one(conn)
        .await
        .context("claiming a message id in postbox.inbox")?;
    let inserted: bool = row.get(0);
    let outcome: Option<String> = row.get(1);
    let attempts: i32 = row.get(2);
    Ok(match outcome.as_deref().and_then(Outcome::parse) {
        _ if inserted => Claim::First,
        Some(outcome) => Claim::Duplicate(outcome),
        None => Claim::Undecided { attempts },
    })
}

const ADVANCE_VERSION: &str = r#"
insert into postbox.inbox_versions as v (consumer, source, partition_key, version, message_id)
values ($1, $5, $2, $3, $4)
on conflict (consumer, source, partition_key) do update
    set version = excluded.version, message_id = excluded.message_id, updated_at = now()
    where v.version < excluded.version
returning v.version
"#;

/// Records `version` as the newest applied for the key of `source` (`""`: none), inside the
/// handler's transaction. Returns false, changing nothing, when the key already has this
/// version or a newer one from that source.
pub async fn advance_version(
    conn: &mut PgConnection,
    consumer: &str,
    source: &str,
    partition_key: &str,
    version: i64,
    message_id: Uuid,
) -> Result<bool> {
    let advanced = sqlx::query(ADVANCE_VERSION)
        .bind(consumer)
        .bind(version_key(partition_key))
        .bind(version)
        .bind(message_id)
        .bind(text(source))
        .fetch_optional(conn)
        .await
        .context("checking the key's version in postbox.inbox_versions")?;
    Ok(advanced.is_some())
}

const DECIDE: &str = r#"
update postbox.inbox
set outcome = $3, processed_at = now()
where consumer = $1 and message_id = $2
"#;

/// Sets the outcome of a claimed message, inside the handler's transaction.
pub async fn decide(
    conn: &mut PgConnection,
    consumer: &str,
    message_id: Uuid,
    outcome: Outcome,
) -> Result<()> {
    sqlx::query(DECIDE)
        .bind(consumer)
        .bind(message_id)
        .bind(outcome.as_str())
        .execute(conn)
        .await
        .context("recording an outcome in postbox.inbox")?;
    Ok(())
}

const RECORD_FAILURE: &str = r#"
insert into postbox.inbox as i
    (consumer, message_id, queue, routing_key, partition_key, version, attempts, last_error)
values ($1, $2, $3, $4, $5, $6, 1, $7)
on conflict (consumer, message_id) do update
    set attempts = i.attempts + 1, last_error = excluded.last_error, last_received_at = now()
    where i.outcome is null
returning i.attempts
"#;

/// Records a failed handler run on its own (the handler's transaction was rolled back).
/// Returns the failed runs so far, or `None` if the message was decided meanwhile.
pub async fn record_failure<'e, E: PgExecutor<'e>>(
    executor: E,
    receipt: &Receipt<'_>,
    error: &str,
) -> Result<Option<i32>> {
    let row = bind(sqlx::query(RECORD_FAILURE), receipt)
        .bind(text(error))
        .fetch_optional(executor)
        .await
        .context("recording a failed attempt in postbox.inbox")?;
    Ok(row.map(|row| row.get(0)))
}

const RECORD_OUTCOME: &str = r#"
insert into postbox.inbox as i
    (consumer, message_id, queue, routing_key, partition_key, version, outcome, processed_at,
     last_error, attempts)
values ($1, $2, $3, $4, $5, $6, $7, now(), $8, $9)
on conflict (consumer, message_id) do update
    set outcome = excluded.outcome, processed_at = now(), last_error = excluded.last_error,
        last_received_at = now(), attempts = greatest(i.attempts, excluded.attempts)
    where i.outcome is null
"#;

/// Records an outcome decided without the handler's transaction (dead-lettered, discarded) on
/// its own, with the failed runs that led to it (`attempts`: a permanent failure is one run
/// more than those recorded before). A message decided meanwhile keeps its outcome.
pub async fn record_outcome<'e, E: PgExecutor<'e>>(
    executor: E,
    receipt: &Receipt<'_>,
    outcome: Outcome,
    error: Option<&str>,
    attempts: u32,
) -> Result<()> {
    bind(sqlx::query(RECORD_OUTCOME), receipt)
        .bind(outcome.as_str())
        .bind(error.map(text))
        .bind(i32::try_from(attempts).unwrap_or(i32::MAX))
        .execute(executor)
        .await
        .context("recording an outcome in postbox.inbox")?;
    Ok(())
}

const INSERT_MANY: &str = r#"
insert into postbox.inbox (consumer, message_id, queue, outcome, processed_at)
select $1, m.id, $2, 'applied', now() from unnest($3::uuid[]) as m(id)
on conflict (consumer, message_id) do nothing
returning message_id
"#;

// For ids that were there already: undecided ones (failed before) become applied now, decided
// ones count a duplicate. The locking subquery reads each row's outcome as it was before this
// update, after waiting for any transaction that holds it.
const REVISIT_MANY: &str = r#"
update postbox.inbox i
set outcome = coalesce(i.outcome, 'applied'),
    processed_at = coalesce(i.processed_at, now()),
    duplicates = i.duplicates + (old.outcome is not null)::int,
    last_received_at = now()
from (select consumer, message_id, outcome from postbox.inbox
      where consumer = $1 and message_id = any($2)
      for update) as old
where i.consumer = old.consumer and i.message_id = old.message_id
returning i.message_id, old.outcome is null
"#;

/// Claims many distinct message ids at once for a batch handler, marking the new ones applied
/// (the caller commits its writes in the same transaction). Returns the new ids; the others
/// are counted as duplicates. One statement when every id is new, two otherwise.
pub async fn claim_many(
    conn: &mut PgConnection,
    consumer: &str,
    queue: &str,
    message_ids: &[Uuid],
) -> Result<Vec<Uuid>> {
    let mut new: Vec<Uuid> = sqlx::query_scalar(INSERT_MANY)
        .bind(consumer)
        .bind(queue)
        .bind(message_ids)
        .fetch_all(&mut *conn)
        .await
        .context("claiming message ids in postbox.inbox")?;
    if new.len() < message_ids.len() {
        let inserted: std::collections::HashSet<Uuid> = new.iter().copied().collect();
        let rest: Vec<Uuid> = message_ids
            .iter()
            .filter(|id| !inserted.contains(id))
            .copied()
            .collect();
        let rows = sqlx::query(REVISIT_MANY)
            .bind(consumer)
            .bind(&rest)
            .fetch_all(&mut *conn)
            .await
            .context("counting duplicates in postbox.inbox")?;
        new.extend(
            rows.iter()
                .filter(|row| row.get::<bool, _>(1))
                .map(|row| row.get::<Uuid, _>(0)),
        );
    }
    Ok(new)
}

// Small batches, each its own statement and transaction: no long locks, and concurrent
// cleaners skip each other's rows instead of waiting.
const CLEANUP: &str = r#"
with doomed as (
    select consumer, message_id from postbox.inbox
    where processed_at < now() - $1 * interval '1 millisecond'
      and ($2::text is null or consumer = $2)
    -- no order: every row past the cutoff goes in this round, found through the BRIN index
    limit $3
    for update skip locked
)
delete from postbox.inbox i
using doomed d
where i.consumer = d.consumer and i.message_id = d.message_id
"#;

/// Deletes up to `limit` decided rows older than `older_than_ms` (of `consumer`, or of every
/// consumer). Undecided rows (failures being retried) are never deleted.
pub async fn cleanup_batch<'e, E: PgExecutor<'e>>(
    executor: E,
    consumer: Option<&str>,
    older_than_ms: i64,
    limit: i64,
) -> Result<u64> {
    Ok(sqlx::query(CLEANUP)
        .bind(older_than_ms)
        .bind(consumer)
        .bind(limit)
        .execute(executor)
        .await
        .context("deleting old rows from postbox.inbox")?
        .rows_affected())
}

fn bind<'q>(
    query: sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments>,
    receipt: &Receipt<'q>,
) -> sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments> {
    query
        .bind(receipt.consumer)
        .bind(receipt.message_id)
        .bind(receipt.queue)
        .bind(text(receipt.routing_key))
        .bind(receipt.partition_key.map(text))
        .bind(receipt.version)
}

/// `value` as Postgres `text` can hold it: without NUL characters, which a delivery's routing
/// key, partition key header or a handler's error message may carry, and which would make
/// every statement writing them fail.
fn text(value: &str) -> String {
    value.replace('\0', "\u{FFFD}")
}

/// A partition key as `postbox.inbox_versions` stores it: as it is, unless it is too long for
/// the primary key's index (Postgres refuses index entries beyond ~2.7 kB), then a UUIDv5 of
/// it, so the key still has its own version.
fn version_key(partition_key: &str) -> String {
    const LONGEST: usize = 1024;
    let key = text(partition_key);
    if key.len() <= LONGEST {
        return key;
    }
    let digest = Uuid::new_v5(&Uuid::NAMESPACE_OID, key.as_bytes());
    format!("postbox-uuid5:{digest}")
}

/// What `consumer`'s inbox says about one message id, when it is not simply "processed once".
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unsettled {
    /// No inbox row: the message never reached the consumer (or its transaction never committed).
    Missing,
    /// Received, but every handler run so far failed: still being retried.
    Failing,
    /// Processed, and delivered this many more times (absorbed by the inbox).
    Duplicated(i32),
}

/// Of `message_ids`, those `consumer` has not simply processed once, with what happened to
/// each, in the order given.
pub async fn unsettled(
    pool: &sqlx::PgPool,
    consumer: &str,
    message_ids: &[Uuid],
) -> Result<Vec<(Uuid, Unsettled)>> {
    let rows: Vec<(Uuid, bool, bool, i32)> = sqlx::query_as(
        "select m.id, i.message_id is not null, i.outcome is not null, \
                coalesce(i.duplicates, 0) \
         from unnest($2::uuid[]) with ordinality as m(id, position) \
         left join postbox.inbox i on i.consumer = $1 and i.message_id = m.id \
         where i.message_id is null or i.outcome is null or i.duplicates > 0 \
         order by m.position",
    )
    .bind(consumer)
    .bind(message_ids)
    .fetch_all(pool)
    .await
    .context("comparing message ids with postbox.inbox")?;
    Ok(rows
        .into_iter()
        .map(|(id, present, decided, duplicates)| {
            let state = match (present, decided) {
                (false, _) => Unsettled::Missing,
                (true, false) => Unsettled::Failing,
                (true, true) => Unsettled::Duplicated(duplicates),
            };
            (id, state)
        })
        .collect())
}

// A dead-lettered message made undecided again, with a fresh set of attempts: when it comes
// back (moved from the dead-letter queue, or published again), the handler runs.
const RETRY_DEAD_LETTERED: &str = r#"
update postbox.inbox
set outcome = null, processed_at = null, attempts = 0
where consumer = $1 and outcome = 'dead_lettered'
  and ($2::uuid[] is null or message_id = any($2))
returning message_id
"#;

/// Makes `consumer`'s dead-lettered messages (those in `ids`, or all) undecided again, so
/// that their next delivery runs the handler instead of being absorbed as a duplicate.
/// Returns the ids changed.
pub async fn retry_dead_lettered<'e, E: PgExecutor<'e>>(
    executor: E,
    consumer: &str,
    ids: Option<&[Uuid]>,
) -> Result<Vec<Uuid>> {
    sqlx::query_scalar(RETRY_DEAD_LETTERED)
        .bind(consumer)
        .bind(ids)
        .fetch_all(executor)
        .await
        .context("making dead-lettered inbox rows undecided")
}
