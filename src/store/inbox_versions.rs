//! SQL for `postbox.inbox_versions`: the newest version applied per consumer, source and
//! partition key, and the check that a message is newer (state semantics, see
//! `Versioning::OutboxId` and `Versioning::Header`).

use sqlx::PgConnection;
use uuid::Uuid;

use super::inbox::{text, Receipt};
use super::Result;
use crate::error::Context;

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

// Keys seen before: locked (in one order for every batch), read as they were before this
// statement after waiting for any transaction that holds them, and moved forward where the
// batch has something newer. Returns every key found, with its version before.
const ADVANCE_VERSIONS: &str = r#"
with old as (
    select consumer, source, partition_key, version from postbox.inbox_versions
    where (consumer, source, partition_key) in
          (select * from unnest($1::text[], $2::text[], $3::text[]))
    order by consumer collate "C", source collate "C", partition_key collate "C"
    for update
),
advanced as (
    update postbox.inbox_versions v
    set version = x.version, message_id = x.message_id, updated_at = now()
    from unnest($1::text[], $2::text[], $3::text[], $4::int8[], $5::uuid[])
            as x(consumer, source, partition_key, version, message_id),
         old
    where v.consumer = x.consumer and v.source = x.source and v.partition_key = x.partition_key
      and old.consumer = x.consumer and old.source = x.source
      and old.partition_key = x.partition_key
      and old.version < x.version
)
select consumer, source, partition_key, version from old
"#;

// Keys seen for the first time take the batch's newest version at once; `do nothing` waits for
// a concurrent insert of the same key and then leaves it alone, so a returned key truly had no
// version before, and one not returned has one now, committed by another transaction.
const INSERT_VERSIONS: &str = r#"
insert into postbox.inbox_versions (consumer, source, partition_key, version, message_id)
select * from unnest($1::text[], $2::text[], $3::text[], $4::int8[], $5::uuid[])
on conflict (consumer, source, partition_key) do nothing
returning consumer, source, partition_key
"#;

/// The newest version of one key in a batch, and the message carrying it.
struct Newest {
    version: i64,
    message_id: Uuid,
}

/// Why a batch's versions could not be checked.
#[derive(Debug, thiserror::Error)]
pub(crate) enum AdvanceError {
    /// A statement failed.
    #[error(transparent)]
    Database(#[from] crate::error::DatabaseError),
    /// Another transaction changed a key's version between this one's two reads.
    #[error("the version of partition key {0:?} changed while it was being read")]
    Conflict(String),
}

/// Checks the versions of a batch's messages against the newest applied for their keys, in the
/// order given, as one message after another would be: a message is fresh if its version is
/// newer than the key's stored one and than every earlier fresh message of the key in the batch.
/// Records each key's newest version (inside the caller's transaction): one statement when every
/// key was seen before, two otherwise. Returns one flag per receipt: false for a stale one.
/// Receipts without a key or a version are fresh.
pub async fn advance_versions(
    conn: &mut PgConnection,
    receipts: &[Receipt<'_>],
) -> Result<Vec<bool>, AdvanceError> {
    use std::collections::{BTreeMap, HashMap};
    type Key = (String, String, String);
    let key_of = |r: &Receipt<'_>| -> Option<(Key, i64)> {
        let (key, version) = (r.partition_key?, r.version?);
        let source = text(r.source.unwrap_or_default());
        Some(((r.consumer.to_owned(), source, version_key(key)), version))
    };
    // Sorted: one lock order for every batch.
    let mut newest: BTreeMap<Key, Newest> = BTreeMap::new();
    for r in receipts {
        if let Some((key, version)) = key_of(r) {
            let entry = newest.entry(key).or_insert(Newest {
                version,
                message_id: r.message_id,
            });
            if version > entry.version {
                *entry = Newest {
                    version,
                    message_id: r.message_id,
                };
            }
        }
    }
    if newest.is_empty() {
        return Ok(vec![true; receipts.len()]);
    }
    // Each key's version before the batch; `None` for a key seen for the first time.
    let mut before: HashMap<Key, Option<i64>> = HashMap::with_capacity(newest.len());
    // A key inserted by another transaction between the two statements is read again; versions
    // are never deleted, so the second round finds it.
    for _ in 0..2 {
        let pending = newest.iter().filter(|(key, _)| !before.contains_key(*key));
        let found: Vec<(String, String, String, i64)> =
            bind_versions(sqlx::query_as(ADVANCE_VERSIONS), pending)
                .fetch_all(&mut *conn)
                .await
                .context("checking keys' versions in postbox.inbox_versions")?;
        for (consumer, source, key, version) in found {
            before.insert((consumer, source, key), Some(version));
        }
        if before.len() == newest.len() {
            break;
        }
        let pending = newest.iter().filter(|(key, _)| !before.contains_key(*key));
        let inserted: Vec<Key> = bind_versions(sqlx::query_as(INSERT_VERSIONS), pending)
            .fetch_all(&mut *conn)
            .await
            .context("recording keys' versions in postbox.inbox_versions")?;
        for key in inserted {
            before.insert(key, None);
        }
        if before.len() == newest.len() {
            break;
        }
    }
    let mut applied: HashMap<Key, Option<i64>> = HashMap::with_capacity(newest.len());
    receipts
        .iter()
        .map(|r| {
            let Some((key, version)) = key_of(r) else {
                return Ok(true);
            };
            let Some(&stored) = before.get(&key) else {
                return Err(AdvanceError::Conflict(key.2));
            };
            let last = applied.entry(key).or_insert(stored);
            let fresh = last.is_none_or(|last| version > last);
            if fresh {
                *last = Some(version);
            }
            Ok(fresh)
        })
        .collect()
}

fn bind_versions<'q, 'k, O>(
    query: sqlx::query::QueryAs<'q, sqlx::Postgres, O, sqlx::postgres::PgArguments>,
    keys: impl Iterator<Item = (&'k (String, String, String), &'k Newest)>,
) -> sqlx::query::QueryAs<'q, sqlx::Postgres, O, sqlx::postgres::PgArguments> {
    let (mut consumers, mut sources, mut partition_keys) = (Vec::new(), Vec::new(), Vec::new());
    let (mut versions, mut message_ids) = (Vec::new(), Vec::new());
    for ((consumer, source, key), newest) in keys {
        consumers.push(consumer.clone());
        sources.push(source.clone());
        partition_keys.push(key.clone());
        versions.push(newest.version);
        message_ids.push(newest.message_id);
    }
    query
        .bind(consumers)
        .bind(sources)
        .bind(partition_keys)
        .bind(versions)
        .bind(message_ids)
}

/// A partition key as `postbox.inbox_versions` stores it: as it is, unless it is too long for
/// the primary key's index (Postgres refuses index entries beyond ~2.7 kB), then a UUIDv5 of
/// it, so the key still has its own version.
pub(super) fn version_key(partition_key: &str) -> String {
    const LONGEST: usize = 1024;
    let key = text(partition_key);
    if key.len() <= LONGEST {
        return key;
    }
    let digest = Uuid::new_v5(&Uuid::NAMESPACE_OID, key.as_bytes());
    format!("postbox-uuid5:{digest}")
}
