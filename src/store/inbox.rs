//! SQL for `postbox.inbox`: claiming a message id, recording outcomes and failed runs, and the
//! operator's queries. The per-key versions are in `inbox_versions`.

use sqlx::{PgConnection, PgExecutor, Row};
use uuid::Uuid;

use super::Result;
use crate::error::Context;

/// What the inbox records about one delivery (see `postbox::inbox::receive`).
#[derive(Debug, Clone)]
pub struct Receipt<'a> {
    /// The consumer's name.
    pub consumer: &'a str,
    /// The message's id.
    pub message_id: Uuid,
    /// The queue it was consumed from.
    pub queue: &'a str,
    /// The exchange it was published to (`""`: the default exchange).
    pub exchange: &'a str,
    /// Its routing key.
    pub routing_key: &'a str,
    /// Its ordering key, if it has one.
    pub partition_key: Option<&'a str>,
    /// The version it carries for its key, if any: an older one than applied is stale.
    pub version: Option<i64>,
    /// Its number in its stream (`x-postbox-seq`), if any: the stream's messages are applied
    /// in number order. Takes precedence over `version`.
    pub seq: Option<i64>,
    /// Whether it is a skip message (`x-postbox-skip`): it stands for a row the relay
    /// released, and only moves its stream on.
    pub skip: bool,
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
    /// Held until its stream's previous number is applied (not decided yet).
    Waiting,
    /// A skip message: its stream moved on past the number of a row the relay released.
    Skipped,
}

impl Outcome {
    /// The value stored in the `outcome` column.
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Applied => "applied",
            Outcome::Stale => "stale",
            Outcome::DeadLettered => "dead_lettered",
            Outcome::Discarded => "discarded",
            Outcome::Waiting => "waiting",
            Outcome::Skipped => "skipped",
        }
    }

    fn parse(value: &str) -> Option<Self> {
        Some(match value {
            "applied" => Outcome::Applied,
            "stale" => Outcome::Stale,
            "dead_lettered" => Outcome::DeadLettered,
            "discarded" => Outcome::Discarded,
            "waiting" => Outcome::Waiting,
            "skipped" => Outcome::Skipped,
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
    -- a held message taken for its turn is not a delivery: never a duplicate (another
    -- instance may have applied it a moment before)
    set duplicates = i.duplicates + (i.outcome is not null and not $7)::int,
        last_received_at = now()
returning (i.xmax = 0) as inserted, i.outcome, i.attempts
"#;

/// Claims `receipt`'s message id inside the handler's transaction. `its_turn`: the message is
/// taken from the waiting ones because its turn came, so `waiting` counts as undecided.
pub async fn claim(
    conn: &mut PgConnection,
    receipt: &Receipt<'_>,
    its_turn: bool,
) -> Result<Claim> {
    let row = bind(sqlx::query(CLAIM), receipt)
        .bind(its_turn)
        .fetch_one(conn)
        .await
        .context("claiming a message id in postbox.inbox")?;
    let inserted: bool = row.get(0);
    let outcome: Option<String> = row.get(1);
    let attempts: i32 = row.get(2);
    Ok(match outcome.as_deref().and_then(Outcome::parse) {
        _ if inserted => Claim::First,
        Some(Outcome::Waiting) if its_turn => Claim::Undecided { attempts },
        Some(outcome) => Claim::Duplicate(outcome),
        None => Claim::Undecided { attempts },
    })
}

// A waiting message is received, not decided: no processed_at, so retention keeps its row.
const DECIDE: &str = r#"
update postbox.inbox
set outcome = $3, processed_at = case when $3 = 'waiting' then null else now() end
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
    where i.outcome is null or i.outcome = 'waiting'
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

/// What a run counted ahead says until its outcome is recorded.
const INTERRUPTED: &str =
    "redelivered before an outcome was recorded: a consumer may have stopped while handling it";

// Like RECORD_FAILURE, but an earlier run's real error is kept.
const COUNT_RUN_AHEAD: &str = r#"
insert into postbox.inbox as i
    (consumer, message_id, queue, routing_key, partition_key, version, attempts, last_error)
values ($1, $2, $3, $4, $5, $6, 1, $7)
on conflict (consumer, message_id) do update
    set attempts = i.attempts + 1, last_error = coalesce(i.last_error, excluded.last_error),
        last_received_at = now()
    where i.outcome is null or i.outcome = 'waiting'
returning i.attempts
"#;

/// Counts the run about to start as failed, on its own, before it starts: a run that takes
/// its process down records nothing itself. Returns the failed runs so far, this one included,
/// or `None` if the message was decided meanwhile.
pub async fn count_run_ahead<'e, E: PgExecutor<'e>>(
    executor: E,
    receipt: &Receipt<'_>,
) -> Result<Option<i32>> {
    let row = bind(sqlx::query(COUNT_RUN_AHEAD), receipt)
        .bind(INTERRUPTED)
        .fetch_optional(executor)
        .await
        .context("counting a run ahead in postbox.inbox")?;
    Ok(row.map(|row| row.get(0)))
}

const UNCOUNT_RUN: &str = r#"
update postbox.inbox
set attempts = greatest(attempts - 1, 0),
    last_error = nullif(last_error, $3)
where consumer = $1 and message_id = $2
"#;

/// Takes back a run counted ahead that reached an outcome (in the outcome's transaction), or
/// that never ran.
pub async fn uncount_run<'e, E: PgExecutor<'e>>(executor: E, receipt: &Receipt<'_>) -> Result<()> {
    sqlx::query(UNCOUNT_RUN)
        .bind(receipt.consumer)
        .bind(receipt.message_id)
        .bind(INTERRUPTED)
        .execute(executor)
        .await
        .context("uncounting a run in postbox.inbox")?;
    Ok(())
}

const RECORD_ERROR: &str = r#"
update postbox.inbox as i
set last_error = $3, last_received_at = now()
where consumer = $1 and message_id = $2 and (outcome is null or outcome = 'waiting')
returning attempts
"#;

/// Records the error of a failed run already counted ahead, on its own. Returns the failed
/// runs so far, or `None` if the message was decided meanwhile.
pub async fn record_error<'e, E: PgExecutor<'e>>(
    executor: E,
    receipt: &Receipt<'_>,
    error: &str,
) -> Result<Option<i32>> {
    let row = sqlx::query(RECORD_ERROR)
        .bind(receipt.consumer)
        .bind(receipt.message_id)
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
    where i.outcome is null or i.outcome = 'waiting'
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
insert into postbox.inbox as i
    (consumer, message_id, queue, routing_key, partition_key, version, outcome, processed_at,
     duplicates)
select m.consumer, m.id, m.queue, m.routing_key, m.partition_key, m.version, 'applied', now(),
       m.copies - 1
from unnest($1::text[], $2::uuid[], $3::text[], $4::text[], $5::text[], $6::int8[], $7::int4[])
    as m(consumer, id, queue, routing_key, partition_key, version, copies)
on conflict (consumer, message_id) do nothing
returning consumer, message_id
"#;

// For ids that were there already: undecided ones (failed before) become applied now, decided
// ones count a duplicate per copy in the batch. The locking subquery reads each row's outcome as
// it was before this update, after waiting for any transaction that holds it; it locks in the
// order the batch was sorted in, so concurrent batches wait on each other instead of deadlocking.
const REVISIT_MANY: &str = r#"
update postbox.inbox i
set outcome = coalesce(i.outcome, 'applied'),
    processed_at = coalesce(i.processed_at, now()),
    duplicates = i.duplicates + m.copies - (old.outcome is null)::int,
    last_received_at = now()
from unnest($1::text[], $2::uuid[], $3::int4[]) as m(consumer, message_id, copies),
     (select consumer, message_id, outcome from postbox.inbox
      where (consumer, message_id) in (select * from unnest($1::text[], $2::uuid[]))
      order by consumer collate "C", message_id
      for update) as old
where i.consumer = old.consumer and i.message_id = old.message_id
  and m.consumer = old.consumer and m.message_id = old.message_id
returning i.consumer, i.message_id, old.outcome is null, i.attempts
"#;

/// A receipt of a batch that is not a duplicate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Claimed {
    /// Failed runs recorded before.
    pub attempts: i32,
    /// Seen for the first time (rather than undecided since an earlier delivery).
    pub first: bool,
}

/// Claims the message ids of `receipts` at once, for a batch applied in one transaction: the
/// new ones (and those that only failed before) are marked applied and committed with the
/// caller's writes. Returns, in the order given, what each new receipt was, or `None` for a
/// duplicate (an id given twice is new at most once, and the inbox counts its other copies as
/// duplicates). One statement when every id is new, two otherwise.
pub async fn claim_batch(
    conn: &mut PgConnection,
    receipts: &[Receipt<'_>],
) -> Result<Vec<Option<Claimed>>> {
    use std::collections::{BTreeMap, HashMap};
    // Sorted (byte order, as `collate "C"` sorts): one lock order for every batch.
    let mut distinct: BTreeMap<(&str, Uuid), (&Receipt<'_>, i32)> = BTreeMap::new();
    for receipt in receipts {
        distinct
            .entry((receipt.consumer, receipt.message_id))
            .or_insert((receipt, 0))
            .1 += 1;
    }
    let column = |field: fn(&Receipt<'_>) -> Option<String>| -> Vec<Option<String>> {
        distinct.values().map(|(r, _)| field(r)).collect()
    };
    let (consumers, ids): (Vec<&str>, Vec<Uuid>) = distinct.keys().copied().unzip();
    let copies: Vec<i32> = distinct.values().map(|(_, n)| *n).collect();
    let inserted: Vec<(String, Uuid)> = sqlx::query_as(INSERT_MANY)
        .bind(&consumers)
        .bind(&ids)
        .bind(column(|r| Some(text(r.queue))))
        .bind(column(|r| Some(text(r.routing_key))))
        .bind(column(|r| r.partition_key.map(text)))
        .bind(
            distinct
                .values()
                .map(|(r, _)| r.seq.or(r.version))
                .collect::<Vec<_>>(),
        )
        .bind(&copies)
        .fetch_all(&mut *conn)
        .await
        .context("claiming message ids in postbox.inbox")?;
    let mut new: HashMap<(String, Uuid), Claimed> = inserted
        .into_iter()
        .map(|key| {
            let first = Claimed {
                attempts: 0,
                first: true,
            };
            (key, first)
        })
        .collect();
    if new.len() < distinct.len() {
        let mut rest = (Vec::new(), Vec::new(), Vec::new());
        for ((consumer, id), (_, n)) in &distinct {
            if !new.contains_key(&((*consumer).to_owned(), *id)) {
                rest.0.push(*consumer);
                rest.1.push(*id);
                rest.2.push(*n);
            }
        }
        let rows = sqlx::query(REVISIT_MANY)
            .bind(&rest.0)
            .bind(&rest.1)
            .bind(&rest.2)
            .fetch_all(&mut *conn)
            .await
            .context("counting duplicates in postbox.inbox")?;
        for row in rows.iter().filter(|row| row.get::<bool, _>(2)) {
            let undecided = Claimed {
                attempts: row.get(3),
                first: false,
            };
            new.insert((row.get(0), row.get(1)), undecided);
        }
    }
    Ok(receipts
        .iter()
        .map(|r| new.remove(&(r.consumer.to_owned(), r.message_id)))
        .collect())
}

const DECIDE_MANY: &str = r#"
update postbox.inbox
set outcome = $3, processed_at = case when $3 = 'waiting' then null else now() end
where (consumer, message_id) in (select * from unnest($1::text[], $2::uuid[]))
"#;

/// Sets the outcome of claimed messages (`(consumer, message_id)` pairs), inside the handler's
/// transaction.
pub async fn decide_many(
    conn: &mut PgConnection,
    messages: &[(&str, Uuid)],
    outcome: Outcome,
) -> Result<()> {
    let (consumers, ids): (Vec<&str>, Vec<Uuid>) = messages.iter().copied().unzip();
    sqlx::query(DECIDE_MANY)
        .bind(consumers)
        .bind(ids)
        .bind(outcome.as_str())
        .execute(conn)
        .await
        .context("recording outcomes in postbox.inbox")?;
    Ok(())
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
        .bind(receipt.seq.or(receipt.version))
}

/// `value` as Postgres `text` can hold it: without NUL characters, which a delivery's routing
/// key, partition key header or a handler's error message may carry, and which would make
/// every statement writing them fail.
pub(super) fn text(value: &str) -> String {
    value.replace('\0', "\u{FFFD}")
}

#[cfg(feature = "cli")]
/// Whether `consumer` has any row in the inbox (a mistyped consumer name has none).
pub async fn has_rows<'e, E: PgExecutor<'e>>(executor: E, consumer: &str) -> Result<bool> {
    sqlx::query_scalar("select exists (select 1 from postbox.inbox where consumer = $1)")
        .bind(consumer)
        .fetch_one(executor)
        .await
        .context("reading postbox.inbox")
}

#[cfg(feature = "cli")]
/// What `consumer`'s inbox says about one message id, when it is not simply "processed once".
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unsettled {
    /// No inbox row: the message never reached the consumer (or its transaction never committed).
    Missing,
    /// Received, but every handler run so far failed: still being retried.
    Failing,
    /// Received ahead of its stream's next number, held until its turn.
    Waiting,
    /// Processed, and delivered this many more times (absorbed by the inbox).
    Duplicated(i32),
}

#[cfg(feature = "cli")]
/// Of `message_ids`, those `consumer` has not simply processed once, with what happened to
/// each, in the order given.
pub async fn unsettled(
    pool: &sqlx::PgPool,
    consumer: &str,
    message_ids: &[Uuid],
) -> Result<Vec<(Uuid, Unsettled)>> {
    let rows: Vec<(Uuid, bool, Option<String>, i32)> = sqlx::query_as(
        "select m.id, i.message_id is not null, i.outcome, coalesce(i.duplicates, 0) \
         from unnest($2::uuid[]) with ordinality as m(id, position) \
         left join postbox.inbox i on i.consumer = $1 and i.message_id = m.id \
         where i.message_id is null or i.outcome is null or i.outcome = 'waiting' \
            or i.duplicates > 0 \
         order by m.position",
    )
    .bind(consumer)
    .bind(message_ids)
    .fetch_all(pool)
    .await
    .context("comparing message ids with postbox.inbox")?;
    Ok(rows
        .into_iter()
        .map(|(id, present, outcome, duplicates)| {
            let state = match (present, outcome.as_deref()) {
                (false, _) => Unsettled::Missing,
                (true, None) => Unsettled::Failing,
                (true, Some("waiting")) => Unsettled::Waiting,
                (true, Some(_)) => Unsettled::Duplicated(duplicates),
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
