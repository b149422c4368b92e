//! The inbox without the consumer: functions any code calls inside its own transaction, for
//! subscribers that run their own consume loop or another broker client.

use sqlx::PgConnection;
use uuid::Uuid;

use super::ConsumerError;
use crate::store::inbox::{self, Claim, Outcome, Receipt};
use crate::store::inbox_streams::{self, StreamKey};
use crate::store::inbox_versions;

type Result<T, E = ConsumerError> = std::result::Result<T, E>;

/// What the inbox says about a message, inside the caller's transaction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    /// Not seen before (or only failed before): apply it in this transaction. The inbox row
    /// already says `applied`; it commits with your writes, or rolls back with them.
    New {
        /// Failed runs recorded earlier with [`record_failure`].
        failed_attempts: u32,
    },
    /// Decided before: skip it (counted in `duplicates`).
    Duplicate,
    /// Older than the version already applied for its partition key, or a number its stream
    /// applied already under another message id (a replay of old positions): skip it
    /// (recorded as `stale`).
    Stale,
    /// Its stream's previous number is not applied yet: do not apply it now. Store it with
    /// [`hold`] in this transaction (the consumer applies it once its turn comes); the inbox
    /// row says `waiting`.
    Ahead,
    /// A skip message (whose turn came, when ordered by stream number): it stands for a row
    /// the relay released. Nothing to apply (recorded as `skipped`).
    Skipped,
}

/// Claims `receipt`'s message id for its consumer inside the caller's transaction, and checks
/// it against its stream (by number, with `receipt.seq`) or its key's newest version (with
/// `receipt.version`), from the same source. Commit the transaction whatever the status (a
/// duplicate's count and a stale outcome are recorded in it); ack the message only after the
/// commit.
///
/// ```no_run
/// # async fn example(pool: sqlx::PgPool, message_id: uuid::Uuid)
/// #     -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
/// use postbox::inbox::{receive, Receipt, Status};
///
/// let mut tx = pool.begin().await?;
/// let receipt = Receipt {
///     consumer: "billing", message_id, queue: "orders", exchange: "", routing_key: "orders",
///     partition_key: Some("order-42"), version: None, seq: Some(17), skip: false,
///     source: Some("0192f1c4-6b1e-7a1d-9c1f-3b2e4d5a6c7b"),
/// };
/// match receive(&mut tx, &receipt).await? {
///     Status::New { .. } => { /* ... the handler's writes, through &mut *tx ... */ }
///     Status::Ahead => { /* ... postbox::inbox::hold(&mut tx, ...) ... */ }
///     _ => {}
/// }
/// tx.commit().await?;
/// // ... now ack the delivery ...
/// # Ok(()) }
/// ```
pub async fn receive(conn: &mut PgConnection, receipt: &Receipt<'_>) -> Result<Status> {
    Ok(receive_turn(conn, receipt, false).await?.0)
}

/// [`receive`]; `its_turn`: the message comes from the waiting ones, its turn having come.
/// Also says whether the stream's next number is waiting already.
pub(crate) async fn receive_turn(
    conn: &mut PgConnection,
    receipt: &Receipt<'_>,
    its_turn: bool,
) -> Result<(Status, bool)> {
    // A first sighting is recorded as applied by the claim itself; one that failed before
    // still needs its outcome.
    let claim = inbox::claim(conn, receipt, its_turn).await?;
    let (failed_attempts, recorded) = match claim {
        Claim::Duplicate(_) => return Ok((Status::Duplicate, false)),
        Claim::First => (0, true),
        Claim::Undecided { attempts } => (u32::try_from(attempts).unwrap_or(0), false),
    };
    if let (Some(stream), Some(seq)) = (stream_of(receipt), receipt.seq) {
        let last = inbox_streams::lock(conn, &stream).await?;
        let next = last.map_or(1, |last| last + 1);
        if seq > next {
            inbox::decide(conn, receipt.consumer, receipt.message_id, Outcome::Waiting).await?;
            return Ok((Status::Ahead, false));
        }
        if seq < next {
            // Applied already under another id (a replay of old positions), unless this very
            // message was made undecided again on purpose (a dead letter given another
            // chance), which runs out of turn.
            if recorded || receipt.skip {
                inbox::decide(conn, receipt.consumer, receipt.message_id, Outcome::Stale).await?;
                return Ok((Status::Stale, false));
            }
            return Ok((Status::New { failed_attempts }, false));
        }
        let next_waiting = inbox_streams::applied(conn, &stream, seq).await?;
        if receipt.skip {
            inbox::decide(conn, receipt.consumer, receipt.message_id, Outcome::Skipped).await?;
            return Ok((Status::Skipped, next_waiting));
        }
        if !recorded || its_turn {
            inbox::decide(conn, receipt.consumer, receipt.message_id, Outcome::Applied).await?;
        }
        return Ok((Status::New { failed_attempts }, next_waiting));
    }
    // A skip message outside stream order (a consumer with state semantics): nothing to apply.
    if receipt.skip {
        inbox::decide(conn, receipt.consumer, receipt.message_id, Outcome::Skipped).await?;
        return Ok((Status::Skipped, false));
    }
    if let (Some(key), Some(version)) = (receipt.partition_key, receipt.version) {
        let source = receipt.source.unwrap_or_default();
        let newer = inbox_versions::advance_version(
            conn,
            receipt.consumer,
            source,
            key,
            version,
            receipt.message_id,
        )
        .await?;
        if !newer {
            inbox::decide(conn, receipt.consumer, receipt.message_id, Outcome::Stale).await?;
            return Ok((Status::Stale, false));
        }
    }
    if !recorded {
        inbox::decide(conn, receipt.consumer, receipt.message_id, Outcome::Applied).await?;
    }
    Ok((Status::New { failed_attempts }, false))
}

/// The stream `receipt` belongs to, if it is keyed.
pub(crate) fn stream_of(receipt: &Receipt<'_>) -> Option<StreamKey> {
    Some(StreamKey {
        consumer: receipt.consumer.to_owned(),
        source: receipt.source.unwrap_or_default().to_owned(),
        partition_key: receipt.partition_key?.to_owned(),
        exchange: receipt.exchange.to_owned(),
        routing_key: receipt.routing_key.to_owned(),
    })
}

/// Stores a message [`receive`] found [`Status::Ahead`], in the same transaction: `properties`
/// and `payload` are what the handler sees when its turn comes.
pub async fn hold(
    conn: &mut PgConnection,
    receipt: &Receipt<'_>,
    properties: &lapin::BasicProperties,
    payload: &[u8],
) -> Result<()> {
    let (Some(stream), Some(seq)) = (stream_of(receipt), receipt.seq) else {
        return Err(ConsumerError::InvalidMessage(format!(
            "message {} has no stream number to wait by",
            receipt.message_id
        )));
    };
    let properties = serde_json::to_string(properties).map_err(|error| {
        ConsumerError::InvalidMessage(format!("storing its properties: {error}"))
    })?;
    let held = inbox_streams::Held {
        seq,
        message_id: receipt.message_id,
        queue: receipt.queue,
        properties,
        payload,
    };
    Ok(inbox_streams::hold(conn, &stream, &held).await?)
}

/// [`receive`] for a batch applied in one transaction, with as few statements as the batch
/// allows (one when every id is new and none carries a version or number): the statuses come
/// back in the order given, as if the receipts had been received one after another in their
/// streams' number order (an id given twice is new at most once; of a stream's numbers, those
/// that follow on from its last applied are new, later ones [`Status::Ahead`]; of a key's
/// versions, each must be newer than those applied before it). Apply the new messages of a
/// stream in number order ([`apply_order`]), [`hold`] those ahead, commit the transaction
/// whatever the statuses, and ack the messages only after the commit.
pub async fn receive_batch(
    conn: &mut PgConnection,
    receipts: &[Receipt<'_>],
) -> Result<Vec<Status>> {
    let claimed = inbox::claim_batch(conn, receipts).await?;
    let mut statuses: Vec<Option<Status>> = claimed
        .iter()
        .map(|claim| claim.is_none().then_some(Status::Duplicate))
        .collect();
    in_streams(conn, receipts, &claimed, &mut statuses).await?;
    // Skip messages outside stream order: nothing to apply.
    let mut skips: Vec<(&str, Uuid)> = Vec::new();
    for (status, receipt) in statuses.iter_mut().zip(receipts) {
        if status.is_none() && receipt.skip {
            *status = Some(Status::Skipped);
            skips.push((receipt.consumer, receipt.message_id));
        }
    }
    if !skips.is_empty() {
        inbox::decide_many(conn, &skips, Outcome::Skipped).await?;
    }
    // The rest (new, without a stream number): versions, when they carry one.
    let versioned: Vec<usize> = (0..receipts.len())
        .filter(|&i| statuses[i].is_none())
        .collect();
    let new: Vec<Receipt<'_>> = versioned.iter().map(|&i| receipts[i].clone()).collect();
    let fresh = inbox_versions::advance_versions(conn, &new).await?;
    let stale: Vec<(&str, Uuid)> = new
        .iter()
        .zip(&fresh)
        .filter(|(_, fresh)| !**fresh)
        .map(|(receipt, _)| (receipt.consumer, receipt.message_id))
        .collect();
    if !stale.is_empty() {
        inbox::decide_many(conn, &stale, Outcome::Stale).await?;
    }
    for (&i, fresh) in versioned.iter().zip(fresh) {
        statuses[i] = Some(if fresh {
            new_status(claimed[i])
        } else {
            Status::Stale
        });
    }
    Ok(statuses
        .into_iter()
        .map(|status| status.unwrap_or(Status::Duplicate))
        .collect())
}

fn new_status(claimed: Option<inbox::Claimed>) -> Status {
    Status::New {
        failed_attempts: claimed.map_or(0, |c| u32::try_from(c.attempts).unwrap_or(0)),
    }
}

/// Decides the new receipts of a batch that carry a stream number: each stream locked once
/// (in one order for every batch), its numbers taken in order from its last applied on.
async fn in_streams(
    conn: &mut PgConnection,
    receipts: &[Receipt<'_>],
    claimed: &[Option<inbox::Claimed>],
    statuses: &mut [Option<Status>],
) -> Result<()> {
    use std::collections::BTreeMap;
    let mut streams: BTreeMap<StreamKey, Vec<usize>> = BTreeMap::new();
    for (i, receipt) in receipts.iter().enumerate() {
        if claimed[i].is_none() || receipt.seq.is_none() {
            continue;
        }
        if let Some(stream) = stream_of(receipt) {
            streams.entry(stream).or_default().push(i);
        }
    }
    if streams.is_empty() {
        return Ok(());
    }
    let keys: Vec<StreamKey> = streams.keys().cloned().collect();
    let lasts = inbox_streams::lock_many(conn, &keys).await?;
    let (mut advanced, mut waiting, mut skipped, mut stale) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for ((stream, mut members), last) in streams.into_iter().zip(lasts) {
        members.sort_by_key(|&i| receipts[i].seq);
        let mut next = last.map_or(1, |last| last + 1);
        for i in members {
            let receipt = &receipts[i];
            let seq = receipt.seq.unwrap_or_default();
            let first = claimed[i].is_some_and(|c| c.first);
            let pair = (receipt.consumer, receipt.message_id);
            statuses[i] = Some(if seq == next {
                next += 1;
                if receipt.skip {
                    skipped.push(pair);
                    Status::Skipped
                } else {
                    new_status(claimed[i])
                }
            } else if seq > next {
                waiting.push(pair);
                Status::Ahead
            } else if first || receipt.skip {
                stale.push(pair);
                Status::Stale
            } else {
                // Made undecided again on purpose (a dead letter given another chance).
                new_status(claimed[i])
            });
        }
        if next > last.map_or(1, |last| last + 1) {
            advanced.push((stream, next - 1));
        }
    }
    if !advanced.is_empty() {
        inbox_streams::advance_many(conn, &advanced).await?;
    }
    for (decided, outcome) in [
        (waiting, Outcome::Waiting),
        (skipped, Outcome::Skipped),
        (stale, Outcome::Stale),
    ] {
        if !decided.is_empty() {
            inbox::decide_many(conn, &decided, outcome).await?;
        }
    }
    Ok(())
}

/// The order to apply a batch's new messages in: as given, except that each stream's
/// messages are put in number order within the places they hold. Returns indexes into
/// `receipts`.
pub fn apply_order(receipts: &[Receipt<'_>]) -> Vec<usize> {
    use std::collections::BTreeMap;
    let mut order: Vec<usize> = (0..receipts.len()).collect();
    let mut streams: BTreeMap<StreamKey, Vec<usize>> = BTreeMap::new();
    for (i, receipt) in receipts.iter().enumerate() {
        if let (Some(stream), Some(_)) = (stream_of(receipt), receipt.seq) {
            streams.entry(stream).or_default().push(i);
        }
    }
    for places in streams.into_values() {
        let mut members = places.clone();
        members.sort_by_key(|&i| receipts[i].seq);
        for (place, member) in places.into_iter().zip(members) {
            order[place] = member;
        }
    }
    order
}

/// Claims many message ids in one statement, for a batch applied in the caller's transaction:
/// returns the ids that are new (now `applied`, committing with the caller's writes); the
/// others are counted as duplicates (an id given twice is new at most once). Versions are not
/// checked: use [`receive_batch`] for that, or guard the writes with a
/// [`VersionedUpsert`](super::VersionedUpsert).
pub async fn receive_many(
    conn: &mut PgConnection,
    consumer: &str,
    queue: &str,
    message_ids: &[Uuid],
) -> Result<Vec<Uuid>> {
    let receipts: Vec<Receipt<'_>> = message_ids
        .iter()
        .map(|&message_id| Receipt {
            consumer,
            message_id,
            queue,
            exchange: "",
            routing_key: "",
            partition_key: None,
            version: None,
            seq: None,
            skip: false,
            source: None,
        })
        .collect();
    let claimed = inbox::claim_batch(conn, &receipts).await?;
    Ok(message_ids
        .iter()
        .zip(claimed)
        .filter(|(_, claim)| claim.is_some())
        .map(|(id, _)| *id)
        .collect())
}

/// Records a failed attempt in its own statement (run it outside the rolled-back transaction).
/// Returns the failed attempts so far, or `None` if the message was decided meanwhile.
pub async fn record_failure<'e, E: sqlx::PgExecutor<'e>>(
    executor: E,
    receipt: &Receipt<'_>,
    error: &str,
) -> Result<Option<u32>> {
    Ok(inbox::record_failure(executor, receipt, error)
        .await?
        .map(|attempts| u32::try_from(attempts).unwrap_or(0)))
}

/// Gives `consumer`'s dead-lettered messages (those in `ids`, or all) another chance: their
/// inbox rows become undecided with a fresh set of attempts, so the next delivery of each (moved
/// back from the dead-letter queue, say) runs the handler instead of being absorbed as a
/// duplicate. Returns the ids changed. `postbox inbox retry` runs it.
pub async fn retry_dead_lettered<'e, E: sqlx::PgExecutor<'e>>(
    executor: E,
    consumer: &str,
    ids: Option<&[Uuid]>,
) -> Result<Vec<Uuid>> {
    Ok(inbox::retry_dead_lettered(executor, consumer, ids).await?)
}
