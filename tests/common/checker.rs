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
    /// Breaches of the numbering contract: a keyed message without a number or arriving with
    /// two, a number given to two messages of a stream, or a stream whose numbers are not
    /// 1 to n (a gap). The order consumers restore rests on it.
    pub number_violations: usize,
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

    /// Counts `received` against the committed rows. Keyed messages are judged on their
    /// numbers (`x-postbox-seq`), which is what consumers order by: arrival order across a
    /// stream's batches is not the relay's promise.
    pub fn check(&self, received: &[Received]) -> Report {
        let mut seen = HashSet::new();
        let mut number_of: HashMap<&str, i64> = HashMap::new();
        let mut streams: HashMap<&str, HashMap<i64, &str>> = HashMap::new();
        let (mut duplicates, mut number_violations, mut unknown) = (0, 0, 0);
        for message in received {
            let Some((message_id, (id, key))) = message
                .message_id
                .as_ref()
                .and_then(|m| self.rows.get_key_value(m))
            else {
                unknown += 1;
                continue;
            };
            let first = seen.insert(*id);
            if !first {
                duplicates += 1;
            }
            let Some(key) = key else { continue };
            let Some(seq) = message.seq() else {
                number_violations += 1;
                continue;
            };
            match number_of.insert(message_id.as_str(), seq) {
                Some(before) if before != seq => number_violations += 1,
                Some(_) => {}
                None => {
                    // Every test routes a key's rows to one destination: the key is the stream.
                    let holder = streams
                        .entry(key.as_str())
                        .or_default()
                        .insert(seq, message_id.as_str());
                    if holder.is_some_and(|other| other != message_id.as_str()) {
                        number_violations += 1;
                    }
                }
            }
        }
        for numbers in streams.values() {
            let n = numbers.len() as i64;
            if numbers.keys().any(|&seq| seq < 1 || seq > n) {
                number_violations += 1;
            }
        }
        Report {
            committed: self.rows.len(),
            delivered: seen.len(),
            duplicates,
            number_violations,
            missing: self.rows.len() - seen.len(),
            unknown,
        }
    }
}

impl Report {
    /// Prints the counts (shown with `--nocapture`, and in the output of a failing test).
    pub fn print(&self, scenario: &str) {
        println!(
            "{scenario}: committed {}, delivered {}, duplicates {}, number violations {}, \
             missing {}, unknown {}",
            self.committed,
            self.delivered,
            self.duplicates,
            self.number_violations,
            self.missing,
            self.unknown
        );
    }

    /// Everything committed arrived, nothing else did, every stream numbered 1 to n, and no more
    /// duplicates than `max_duplicates` (the in-flight window times the faults injected).
    pub fn assert_sound(&self, scenario: &str, max_duplicates: usize) {
        self.print(scenario);
        assert_eq!(self.missing, 0, "{scenario}: lost events: {self:?}");
        assert_eq!(self.unknown, 0, "{scenario}: uncommitted events: {self:?}");
        assert_eq!(self.number_violations, 0, "{scenario}: numbers: {self:?}");
        assert!(
            self.duplicates <= max_duplicates,
            "{scenario}: {} duplicates, more than the in-flight bound {max_duplicates}",
            self.duplicates
        );
    }
}

/// Rows a relay with this batch size and window can hold at once: the most one fault can
/// send twice.
pub fn in_flight_rows(settings: &postbox::RelayOptions) -> usize {
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
