//! The fault suite's referee: what was committed to the outbox against what a consumer
//! received, and whether the outbox settled afterwards.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use super::{wait_until, Received, TestDb};

/// Every row of a test's outbox, as committed.
pub struct Committed {
    /// message id → (outbox id, partition key)
    rows: HashMap<String, (i64, Option<String>)>,
}

/// What arrived, counted against what was committed.
#[derive(Debug)]
pub struct Report {
    pub committed: usize,
    /// Distinct committed message ids that arrived.
    pub delivered: usize,
    /// Arrivals beyond the first of a message id.
    pub duplicates: usize,
    /// First arrivals of a keyed message after a later message of the same key.
    pub order_violations: usize,
    /// Committed message ids that never arrived.
    pub missing: usize,
    /// Arrivals whose message id was never committed (or had none).
    pub unknown: usize,
}

impl Committed {
    /// Reads the outbox of `db`.
    pub async fn read(db: &TestDb) -> Self {
        let rows: Vec<(i64, uuid::Uuid, Option<String>)> =
            sqlx::query_as("select id, message_id, partition_key from postbox.outbox")
                .fetch_all(&db.pool)
                .await
                .expect("read committed rows");
        Self {
            rows: rows
                .into_iter()
                .map(|(id, message_id, key)| (message_id.to_string(), (id, key)))
                .collect(),
        }
    }

    /// The committed message ids (what `Inbox::until_all` waits for).
    pub fn ids(&self) -> HashSet<String> {
        self.rows.keys().cloned().collect()
    }

    /// Counts `received` (in arrival order) against the committed rows. Order is judged on
    /// first arrivals: a redelivered copy of an earlier message is a duplicate, not disorder.
    pub fn check(&self, received: &[Received]) -> Report {
        let mut seen = HashSet::new();
        let mut last_of_key: HashMap<&str, i64> = HashMap::new();
        let (mut duplicates, mut order_violations, mut unknown) = (0, 0, 0);
        for message in received {
            let Some((id, key)) = message.message_id.as_ref().and_then(|m| self.rows.get(m)) else {
                unknown += 1;
                continue;
            };
            if !seen.insert(*id) {
                duplicates += 1;
                continue;
            }
            if let Some(key) = key {
                let last = last_of_key.entry(key.as_str()).or_insert(*id);
                if *id < *last {
                    order_violations += 1;
                }
                *last = (*last).max(*id);
            }
        }
        Report {
            committed: self.rows.len(),
            delivered: seen.len(),
            duplicates,
            order_violations,
            missing: self.rows.len() - seen.len(),
            unknown,
        }
    }
}

impl Report {
    /// Prints the counts (shown with `--nocapture`, and in the output of a failing test).
    pub fn print(&self, scenario: &str) {
        println!(
            "{scenario}: committed {}, delivered {}, duplicates {}, order violations {}, \
             missing {}, unknown {}",
            self.committed,
            self.delivered,
            self.duplicates,
            self.order_violations,
            self.missing,
            self.unknown
        );
    }

    /// Everything committed arrived, nothing else did, every key in order, and no more
    /// duplicates than `max_duplicates` (the in-flight window times the faults injected).
    pub fn assert_sound(&self, scenario: &str, max_duplicates: usize) {
        self.print(scenario);
        assert_eq!(self.missing, 0, "{scenario}: lost events: {self:?}");
        assert_eq!(self.unknown, 0, "{scenario}: uncommitted events: {self:?}");
        assert_eq!(self.order_violations, 0, "{scenario}: key order: {self:?}");
        assert!(
            self.duplicates <= max_duplicates,
            "{scenario}: {} duplicates, more than the in-flight bound {max_duplicates}",
            self.duplicates
        );
    }
}

/// Rows a relay with this batch size and window can hold at once: the most one fault can
/// send twice.
pub fn in_flight_rows(settings: &postbox::config::RelaySettings) -> usize {
    settings.batch_size as usize * (3 * settings.max_in_flight_batches as usize)
}

/// Waits until no row of `db` is pending and no session holds a transaction open on it (no
/// row stays claimed), then returns how many rows are dead.
pub async fn assert_settled(db: &TestDb, deadline: Duration) -> i64 {
    wait_until("the outbox to settle", deadline, || async {
        let pending = db.count("published_at is null and dead_at is null").await;
        let open: i64 = sqlx::query_scalar(
            "select count(*) from pg_stat_activity \
             where datname = current_database() and pid <> pg_backend_pid() \
               and state like 'idle in transaction%'",
        )
        .fetch_one(&db.pool)
        .await
        .expect("read sessions");
        (pending == 0 && open == 0).then_some(())
    })
    .await;
    db.count("dead_at is not null").await
}
