//! The producer API and the SQL contract: ids, idempotent enqueue, ordering, refused rows.

mod common;

use std::time::Duration;

use common::{wait_until, Harness, TestDb};
use postbox::{deterministic_id, enqueue, enqueue_many, Message};

#[test]
fn deterministic_ids_match_the_documented_test_vector() {
    // Computed independently with Python's uuid.uuid5 over the documented netstring encoding.
    let cases: [(&[&str], &str); 3] = [
        (
            &["order.created", "42"],
            "b2735dd2-fda0-583d-ae9b-325e47073520",
        ),
        (
            &["payment.captured", "tenant-7", "ß€"],
            "e4e34580-9b02-5319-a363-533b708285a0",
        ),
        (&[], "2e278ee3-cdce-58bb-863b-19fae23cef74"),
    ];
    for (fields, expected) in cases {
        assert_eq!(
            deterministic_id(fields.iter()).to_string(),
            expected,
            "{fields:?}"
        );
    }
}

#[tokio::test]
async fn a_retried_enqueue_with_a_deterministic_id_is_a_no_op() {
    let db = TestDb::migrated().await;
    let message = Message::json("orders", &serde_json::json!({"order_id": 42}))
        .expect("json")
        .deterministic_id(["order.created", "42"]);
    let first = enqueue(&db.pool, &message).await.expect("enqueue");
    let again = enqueue(&db.pool, &message).await.expect("enqueue again");
    assert!(first.is_new());
    assert!(!again.is_new());
    assert_eq!(first.message_id, again.message_id);
    assert_eq!(
        first.message_id.to_string(),
        "b2735dd2-fda0-583d-ae9b-325e47073520"
    );
    assert_eq!(db.count("true").await, 1);
}

#[tokio::test]
async fn enqueue_many_is_one_statement_in_order_and_reports_duplicates() {
    let db = TestDb::migrated().await;
    let existing = Message::text("q", "old").deterministic_id(["dup"]);
    enqueue(&db.pool, &existing).await.expect("enqueue");
    let messages = vec![
        Message::text("q", "a").partition_key("k"),
        Message::text("q", "dup again").deterministic_id(["dup"]),
        Message::bytes("q", vec![1, 2, 3]).exchange("amq.direct"),
        Message::text("q", "c").deterministic_id(["twice"]),
        Message::text("q", "c again").deterministic_id(["twice"]),
    ];
    let results = enqueue_many(&db.pool, &messages)
        .await
        .expect("enqueue_many");
    let new: Vec<bool> = results.iter().map(|r| r.is_new()).collect();
    assert_eq!(new, [true, false, true, true, false]);
    let ids: Vec<i64> = results.iter().filter_map(|r| r.id).collect();
    assert!(
        ids.windows(2).all(|w| w[0] < w[1]),
        "ids ascend in slice order: {ids:?}"
    );
    let stored: Vec<(Option<String>, Option<Vec<u8>>, String)> =
        sqlx::query_as("select payload, payload_bytes, exchange from postbox.outbox order by id")
            .fetch_all(&db.pool)
            .await
            .expect("rows");
    assert_eq!(stored[1], (Some("a".into()), None, String::new()));
    assert_eq!(stored[2], (None, Some(vec![1, 2, 3]), "amq.direct".into()));
    assert_eq!(stored.len(), 4);
}

#[tokio::test]
async fn sql_inserts_get_time_ordered_v7_message_ids() {
    let db = TestDb::migrated().await;
    let before = std::time::SystemTime::now();
    sqlx::query(
        "insert into postbox.outbox (routing_key, payload) \
         select 'q', '{}' from generate_series(1, 50)",
    )
    .execute(&db.pool)
    .await
    .expect("insert");
    let ids: Vec<uuid::Uuid> =
        sqlx::query_scalar("select message_id from postbox.outbox order by id")
            .fetch_all(&db.pool)
            .await
            .expect("ids");
    assert_eq!(ids.len(), 50);
    for id in &ids {
        assert_eq!(id.get_version_num(), 7, "{id} is a v7 UUID");
        assert_eq!(id.get_variant(), uuid::Variant::RFC4122, "{id}");
        let (seconds, _) = id.get_timestamp().expect("v7 has a timestamp").to_unix();
        let written = std::time::UNIX_EPOCH + Duration::from_secs(seconds);
        let skew = written
            .duration_since(before)
            .unwrap_or_else(|e| e.duration());
        assert!(
            skew < Duration::from_secs(60),
            "{id}: timestamp {written:?}"
        );
    }
    let distinct: std::collections::HashSet<_> = ids.iter().collect();
    assert_eq!(distinct.len(), 50, "distinct ids");
    // Within one millisecond the order is random; across milliseconds it follows time.
    let millis = |id: &uuid::Uuid| id.as_bytes()[..6].to_vec();
    assert!(
        ids.windows(2).all(|w| millis(&w[0]) <= millis(&w[1])),
        "timestamps never go backwards in insert order: {ids:?}"
    );
}

#[tokio::test]
async fn delayed_messages_wait_for_their_time() {
    let db = TestDb::migrated().await;
    let next_due = || postbox::testing::store::outbox::next_due(&db.pool);
    assert_eq!(next_due().await.expect("probe"), None, "nothing pending");
    let later = enqueue(
        &db.pool,
        &Message::text("q", "later").delay(Duration::from_secs(3600)),
    )
    .await
    .expect("enqueue");
    let delay: f64 = sqlx::query_scalar(
        "select extract(epoch from available_at - created_at)::float8 from postbox.outbox where id = $1",
    )
    .bind(later.id)
    .fetch_one(&db.pool)
    .await
    .expect("row");
    assert!((3599.0..=3601.0).contains(&delay), "{delay}");
    // The idle relay's probe sleeps until the row is due, rather than claiming now.
    let wait = next_due().await.expect("probe").expect("a row pending");
    assert!(wait > Duration::from_secs(3590), "{wait:?}");
    enqueue(&db.pool, &Message::text("q", "now"))
        .await
        .expect("enqueue");
    assert_eq!(next_due().await.expect("probe"), Some(Duration::ZERO));
}

/// Rows that break the SQL contract are written (Postgres checks nothing on insert, so that an
/// event costs the application no more than a minimal outbox row), then refused by the relay:
/// each is marked dead at once, its last_error naming the rule, while a good row written
/// beside them goes out.
#[tokio::test]
async fn nonsense_rows_are_refused_by_the_relay_naming_the_rule() {
    let h = Harness::start().await;
    let q = &h.queue;
    let long = "r".repeat(256);
    let cases = [
        ("insert into postbox.outbox (routing_key, payload) values ('', 'x')".to_string(),
         "routing_key must not be empty"),
        (format!("insert into postbox.outbox (routing_key) values ('{q}')"),
         "exactly one of payload and payload_bytes"),
        (format!("insert into postbox.outbox (routing_key, payload, payload_bytes) values ('{q}', 'x', '\\x00')"),
         "exactly one of payload and payload_bytes"),
        (format!("insert into postbox.outbox (routing_key, payload, headers) values ('{q}', 'x', '[1]')"),
         "headers must be a JSON object"),
        (format!("insert into postbox.outbox (routing_key, payload) values ('{long}', 'x')"),
         "routing_key"),
        (format!("insert into postbox.outbox (routing_key, payload, content_type) values ('{q}', 'x', '')"),
         "content_type must not be empty"),
        (format!("insert into postbox.outbox (routing_key, payload, created_at) values ('{q}', 'x', 'infinity')"),
         "created_at must be a finite time"),
        (format!("insert into postbox.outbox (routing_key, payload, available_at) values ('{q}', 'x', '-infinity')"),
         "available_at must be a finite time"),
    ];
    let mut expected = Vec::new();
    for (sql, reason) in &cases {
        let id: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(format!("{sql} returning id")))
            .fetch_one(&h.db.pool)
            .await
            .expect(sql);
        expected.push((id, *reason));
    }
    enqueue(&h.db.pool, &Message::text(q.as_str(), "good"))
        .await
        .expect("enqueue");
    let mut inbox = h.inbox;
    let received = inbox.take(1, Duration::from_secs(20)).await;
    assert_eq!(received[0].payload, b"good");
    for (id, reason) in expected {
        let (dead, error): (bool, Option<String>) = wait_until(
            &format!("row {id} marked dead"),
            Duration::from_secs(20),
            || async {
                let row: (bool, Option<String>) = sqlx::query_as(
                    "select dead_at is not null, last_error from postbox.outbox where id = $1",
                )
                .bind(id)
                .fetch_one(&h.db.pool)
                .await
                .expect("row");
                row.0.then_some(row)
            },
        )
        .await;
        assert!(dead);
        let error = error.unwrap_or_default();
        assert!(
            error.contains(reason),
            "row {id}: {error:?} does not name {reason:?}"
        );
    }
    h.relay.stop().await;
}

/// The Rust API refuses what the relay would refuse, before anything is written.
#[tokio::test]
async fn the_producer_api_refuses_messages_the_relay_would_refuse() {
    let db = TestDb::migrated().await;
    let cases = [
        (Message::text("", "x"), "routing key must not be empty"),
        (
            Message::text("q", "x").content_type(""),
            "content type must not be empty",
        ),
        (
            Message::text("r".repeat(256), "x"),
            "routing key of 256 bytes",
        ),
        (
            Message::text("q", "x").header("h".repeat(256), 1),
            "header name of 256 bytes",
        ),
        // names inside a header's value travel as AMQP short strings too
        (
            Message::text("q", "x").header("nested", serde_json::json!([{ "n".repeat(300): 1 }])),
            "header name of 300 bytes",
        ),
    ];
    for (message, reason) in cases {
        let error = enqueue(&db.pool, &message).await.expect_err(reason);
        assert!(
            error.to_string().contains(reason),
            "{error} does not say {reason:?}"
        );
    }
    let error = enqueue_many(&db.pool, &[Message::text("q", "x"), Message::text("", "y")])
        .await
        .expect_err("second message refused");
    assert!(error.to_string().contains("message 1 of 2"), "{error}");
    assert_eq!(db.count("true").await, 0, "nothing was written");
    // A routing key may be empty when an exchange is named (fanout exchanges ignore it).
    enqueue(&db.pool, &Message::text("", "x").exchange("amq.fanout"))
        .await
        .expect("empty routing key with a named exchange");
}

#[tokio::test]
async fn one_notification_per_transaction_whatever_the_row_count() {
    let db = TestDb::migrated().await;
    // As while a relay sleeps: without one, commits notify nobody (tests/wakeup.rs).
    let mut sleeper = <sqlx::PgConnection as sqlx::Connection>::connect(&db.url)
        .await
        .expect("connect");
    common::hold_the_wakeup_keys(&mut sleeper).await;
    let mut listener = sqlx::postgres::PgListener::connect(&db.url)
        .await
        .expect("listener");
    listener
        .listen(postbox::contract::NOTIFY_CHANNEL)
        .await
        .expect("listen");
    let mut tx = db.pool.begin().await.expect("begin");
    for _ in 0..3 {
        let messages: Vec<Message> = (0..10).map(|n| Message::text("q", n.to_string())).collect();
        enqueue_many(&mut *tx, &messages).await.expect("enqueue");
    }
    sqlx::query("insert into postbox.outbox (routing_key, payload) select 'q', g::text from generate_series(1, 10) g")
        .execute(&mut *tx)
        .await
        .expect("sql insert");
    tx.commit().await.expect("commit");
    // a second transaction, so we know when the first one's notifications have all arrived
    enqueue(&db.pool, &Message::text("q", "marker"))
        .await
        .expect("enqueue");
    let mut notifications = 0;
    while notifications < 2 {
        tokio::time::timeout(Duration::from_secs(10), listener.recv())
            .await
            .expect("notification within 10s")
            .expect("listener");
        notifications += 1;
    }
    let extra = tokio::time::timeout(Duration::from_millis(300), listener.recv()).await;
    assert!(
        extra.is_err(),
        "two transactions gave more than two notifications"
    );
}

/// A key's rows are claimed only as a contiguous run: a row of the key locked by another batch
/// (or waiting for a retry) holds back every later row of that key, and nothing else.
/// Keyed rows are claimed only once numbered; a stream's numbers start at 1 and follow id
/// order among rows committed together; streams are counted apart. A claim stops at the first
/// keyed row not numbered yet (it would otherwise walk the unnumbered backlog for nothing).
#[tokio::test]
async fn keyed_rows_are_claimed_once_numbered_per_stream() {
    let db = TestDb::migrated().await;
    let before = enqueue_unkeyed(&db, "before").await;
    let keyed = commit_keyed(&db, &["a", "b", "a", "a", "b"]).await;
    let after = enqueue_unkeyed(&db, "after").await;
    assert_eq!(
        claim_seqs(&db).await,
        vec![(before, None)],
        "unnumbered rows wait, and the scan stops at the first"
    );

    let numbered = postbox::testing::store::outbox::number(&db.pool, 100)
        .await
        .expect("number");
    assert_eq!(numbered, Some(5));
    let claimed = claim_seqs(&db).await;
    let expected = vec![
        (before, None),
        (keyed[0], Some(1)),
        (keyed[1], Some(1)),
        (keyed[2], Some(2)),
        (keyed[3], Some(3)),
        (keyed[4], Some(2)),
        (after, None),
    ];
    assert_eq!(claimed, expected);
    // A claim rolled back (a relay that crashed after publishing) leaves the numbers: the same
    // rows go out again with the same numbers, and a second pass numbers nothing.
    assert_eq!(claim_seqs(&db).await, expected);
    assert_eq!(
        postbox::testing::store::outbox::number(&db.pool, 100)
            .await
            .expect("number"),
        Some(0)
    );
    let streams: Vec<(String, i64)> = sqlx::query_as(
        "select partition_key, last_seq from postbox.outbox_streams order by partition_key",
    )
    .fetch_all(&db.pool)
    .await
    .expect("streams");
    assert_eq!(streams, vec![("a".into(), 3), ("b".into(), 2)]);
}

/// Two transactions write events of one key and commit in the other order of their ids: the
/// row committed first gets the lower number, and a claim puts the stream's rows in number
/// order, so they go out in the order they committed.
#[tokio::test]
async fn a_late_commit_gets_the_next_number_and_goes_out_after() {
    let db = TestDb::migrated().await;
    let mut early = db.pool.begin().await.expect("begin");
    let first_id = enqueue(
        &mut *early,
        &Message::text("q", "drawn first").partition_key("k"),
    )
    .await
    .expect("enqueue")
    .id
    .expect("new");
    let second_id = commit_keyed(&db, &["k"]).await[0];
    assert!(first_id < second_id);
    postbox::testing::store::outbox::number(&db.pool, 100)
        .await
        .expect("number");
    early.commit().await.expect("commit");
    postbox::testing::store::outbox::number(&db.pool, 100)
        .await
        .expect("number");
    assert_eq!(
        claim_seqs(&db).await,
        vec![(second_id, Some(1)), (first_id, Some(2))],
        "number order, not id order"
    );
}

/// While one relay's numbering pass holds the lock, another pass numbers nothing and says so.
#[tokio::test]
async fn one_numbering_pass_at_a_time() {
    let db = TestDb::migrated().await;
    commit_keyed(&db, &["k", "k"]).await;
    let mut other = db.pool.begin().await.expect("begin");
    let locked: bool = sqlx::query_scalar(
        "select pg_try_advisory_xact_lock(hashtext('postbox.outbox numbering'))",
    )
    .fetch_one(&mut *other)
    .await
    .expect("lock");
    assert!(locked);
    assert_eq!(
        postbox::testing::store::outbox::number(&db.pool, 100)
            .await
            .expect("number"),
        None
    );
    other.rollback().await.expect("rollback");
    assert_eq!(
        postbox::testing::store::outbox::number(&db.pool, 100)
            .await
            .expect("number"),
        Some(2)
    );
}

/// A claim stops at the first due keyed row not numbered yet, but only at one it could take: a
/// claim from the tail is not held back by an unnumbered row below its start (one that
/// committed late while another relay's numbering pass held the lock), which the next full
/// scan finds once it is numbered.
#[tokio::test]
async fn a_claim_from_the_tail_stops_only_at_unnumbered_rows_past_its_start() {
    let db = TestDb::migrated().await;
    let keyed = commit_keyed(&db, &["k"]).await[0];
    let unkeyed = enqueue_unkeyed(&db, "after the keyed row").await;
    let beyond = commit_keyed(&db, &["k2"]).await[0];
    let after_beyond = enqueue_unkeyed(&db, "after the second keyed row").await;
    let claim_from = |from: i64| {
        let pool = db.pool.clone();
        async move {
            let mut tx = pool.begin().await.expect("begin");
            let rows = postbox::testing::store::outbox::claim(&mut tx, 100, from)
                .await
                .expect("claim");
            tx.rollback().await.expect("rollback");
            rows.iter().map(|row| row.id).collect::<Vec<_>>()
        }
    };
    // Nothing numbered: a full scan stops at the first keyed row.
    assert_eq!(claim_from(0).await, Vec::<i64>::new());
    // From the tail, the unnumbered row below the start holds nothing back; the one past it
    // still bounds the claim.
    assert_eq!(claim_from(unkeyed).await, vec![unkeyed]);
    postbox::testing::store::outbox::number(&db.pool, 100)
        .await
        .expect("number");
    assert_eq!(
        claim_from(0).await,
        vec![keyed, unkeyed, beyond, after_beyond]
    );
}

/// Commits one unkeyed row; returns its id.
async fn enqueue_unkeyed(db: &TestDb, text: &str) -> i64 {
    enqueue(&db.pool, &Message::text("q", text))
        .await
        .expect("enqueue")
        .id
        .expect("new")
}

/// Commits one row per entry of `keys` (its partition key), in order; returns their ids.
async fn commit_keyed(db: &TestDb, keys: &[&str]) -> Vec<i64> {
    let messages: Vec<Message> = keys
        .iter()
        .enumerate()
        .map(|(n, key)| Message::text("q", n.to_string()).partition_key(*key))
        .collect();
    enqueue_many(&db.pool, &messages)
        .await
        .expect("enqueue")
        .iter()
        .map(|e| e.id.expect("new"))
        .collect()
}

/// Runs one claim of up to 100 rows in its own transaction and rolls it back; returns the
/// claimed ids with their numbers, in publish order.
async fn claim_seqs(db: &TestDb) -> Vec<(i64, Option<i64>)> {
    let mut tx = db.pool.begin().await.expect("begin");
    let rows = postbox::testing::store::outbox::claim(&mut tx, 100, 0)
        .await
        .expect("claim");
    tx.rollback().await.expect("rollback");
    rows.iter().map(|row| (row.id, row.seq)).collect()
}

#[test]
fn a_malformed_traceparent_is_refused_with_its_value() {
    let message = Message::json("orders", &serde_json::json!({})).expect("json");
    let error = message
        .traceparent("00-abc-def-01")
        .expect_err("malformed traceparent");
    assert!(error.to_string().contains("00-abc-def-01"), "{error}");
}

/// The relay's sessions carry their settings: the takeover timeout, asynchronous marks, and no
/// JIT (a prepared claim compiled by JIT took ~400 ms instead of ~2 ms).
#[tokio::test]
async fn relay_sessions_carry_their_settings() {
    let db = TestDb::migrated().await;
    let settings = db.settings();
    let pool = postbox::testing::store::connect(&settings, 1)
        .await
        .expect("connect");
    let (jit, synchronous_commit, idle_timeout): (String, String, String) = sqlx::query_as(
        "select current_setting('jit'), current_setting('synchronous_commit'), \
                (select setting from pg_settings \
                 where name = 'idle_in_transaction_session_timeout')",
    )
    .fetch_one(&pool)
    .await
    .expect("settings");
    assert_eq!(jit, "off");
    assert_eq!(synchronous_commit, "off");
    assert_eq!(
        idle_timeout,
        settings.relay.takeover_timeout.as_millis().to_string(),
        "takeover_timeout"
    );
    pool.close().await;
}
