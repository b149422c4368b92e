//! Operating postbox: the SQL views, `postbox status`, `postbox dead`, retention.

mod common;

use std::process::Output;
use std::time::Duration;

use common::http::{free_port, http_get};
use common::{postbox_command, wait_until, Rabbit, RelayProcess, RunningRelay, Stage, TestDb};
use serde_json::Value;

const DEADLINE: Duration = Duration::from_secs(20);

fn postbox(db: &TestDb, args: &[&str]) -> Output {
    postbox_command()
        .args(args)
        .env("DATABASE_URL", &db.url)
        .output()
        .expect("run postbox")
}

fn stdout(output: &Output) -> String {
    assert!(
        output.status.success(),
        "exit {:?}: {}",
        output.status.code(),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

async fn execute(db: &TestDb, sql: &str) {
    sqlx::raw_sql(sqlx::AssertSqlSafe(sql.to_string()))
        .execute(&db.pool)
        .await
        .expect("seed rows");
}

/// Rows in every state: 3 due (the oldest a minute late), 1 scheduled, 1 retrying on key k1
/// with 2 rows of k1 behind it, 2 dead, 4 published an hour ago.
async fn seed_every_state(db: &TestDb) {
    execute(
        db,
        "insert into postbox.outbox (routing_key, payload, available_at) values \
           ('orders', '{}', now() - interval '60 seconds'), ('orders', '{}', now()), \
           ('invoices', '{}', now()), ('orders', '{}', now() + interval '1 hour'); \
         insert into postbox.outbox (routing_key, partition_key, payload, attempts, last_error, available_at) values \
           ('orders', 'k1', '{}', 2, 'NO_ROUTE', now() + interval '1 hour'); \
         insert into postbox.outbox (routing_key, partition_key, payload, available_at) values \
           ('orders', 'k1', '{}', now() + interval '1 hour'), ('orders', 'k1', '{}', now() + interval '1 hour'); \
         insert into postbox.outbox (routing_key, payload, attempts, last_error, dead_at) values \
           ('invoices', '{}', 10, 'nacked', now()), ('invoices', '{}', 10, 'nacked', now()); \
         insert into postbox.outbox (routing_key, payload, published_at) \
           select 'orders', '{}', now() - interval '1 hour' from generate_series(1, 4);",
    )
    .await;
}

#[tokio::test]
async fn views_and_status_show_every_state() {
    let db = TestDb::migrated().await;
    seed_every_state(&db).await;
    execute(
        &db,
        "insert into postbox.inbox (consumer, message_id, queue, outcome, processed_at, duplicates) \
           select 'billing', gen_random_uuid(), 'q', 'applied', now(), 1 from generate_series(1, 3); \
         insert into postbox.inbox (consumer, message_id, queue, attempts) \
           values ('billing', gen_random_uuid(), 'q', 2);",
    )
    .await;

    let json: Value = serde_json::from_str(&stdout(&postbox(&db, &["status", "--json"])))
        .expect("status --json is JSON");
    // 3 due + 1 scheduled + 1 retrying + 2 waiting behind it (scheduled too).
    assert_eq!(json["pending"], 7);
    assert_eq!(json["pending_due"], 3);
    assert_eq!(json["scheduled"], 3);
    assert_eq!(json["retrying"], 1);
    assert_eq!(json["dead"], 2);
    assert_eq!(json["published"], 4);
    let lag = json["oldest_pending_age_seconds"]
        .as_f64()
        .expect("a number");
    assert!((60.0..3600.0).contains(&lag), "lag {lag}");
    assert_eq!(json["inbox"][0]["consumer"], "billing");
    assert_eq!(json["inbox"][0]["applied"], 3);
    assert_eq!(json["inbox"][0]["failing"], 1);
    assert_eq!(json["inbox"][0]["duplicates"], 3);
    assert_eq!(json["inbox"][0]["waiting"], 0);
    // k1's three pending rows, none numbered (seeded by hand, no relay ran).
    assert_eq!(json["streams"]["keyed_streams_pending"], 1);
    assert_eq!(json["streams"]["keyed_rows_pending"], 3);
    assert_eq!(json["streams"]["keyed_rows_unnumbered"], 3);

    let text = stdout(&postbox(&db, &["status"]));
    assert!(text.contains("dead") && text.contains("billing"), "{text}");

    let routes: Vec<(String, i64, i64, i64)> = sqlx::query_as(
        "select routing_key, pending, retrying, dead from postbox.outbox_routes order by 1",
    )
    .fetch_all(&db.pool)
    .await
    .expect("routes view");
    assert_eq!(
        routes,
        [("invoices".into(), 1, 0, 2), ("orders".into(), 6, 1, 0)]
    );
    let errors: Vec<(String, String)> =
        sqlx::query_as("select state, last_error from postbox.outbox_errors order by id")
            .fetch_all(&db.pool)
            .await
            .expect("errors view");
    assert_eq!(
        errors,
        [
            ("retrying".into(), "NO_ROUTE".into()),
            ("dead".into(), "nacked".into()),
            ("dead".into(), "nacked".into()),
        ]
    );
    let blocked: (String, i32, i64) =
        sqlx::query_as("select partition_key, attempts, rows_waiting from postbox.blocked_keys")
            .fetch_one(&db.pool)
            .await
            .expect("blocked keys view");
    assert_eq!(blocked, ("k1".into(), 2, 2));
}

#[tokio::test]
async fn a_dead_row_fixed_by_an_operator_is_retried_and_published() {
    let Stage {
        db,
        rabbit: _rabbit,
        queue,
        mut inbox,
    } = Stage::start().await;
    let mut settings = db.settings();
    settings.relay.max_attempts = 1;
    let relay = RunningRelay::start(settings).await;
    // No queue of that name: returned as unroutable, dead after one attempt.
    let nowhere = format!("no-such-queue-{}", uuid::Uuid::new_v4().simple());
    let message = postbox::Message::json(&nowhere, &serde_json::json!({})).expect("json");
    let enqueued = postbox::enqueue(&db.pool, &message).await.expect("enqueue");
    let id = enqueued.id.expect("new row");
    wait_until("the row dead", DEADLINE, || async {
        (db.count("dead_at is not null").await == 1).then_some(())
    })
    .await;

    let listed: Value = serde_json::from_str(&stdout(&postbox(&db, &["dead", "list", "--json"])))
        .expect("dead list --json is JSON");
    assert_eq!(listed[0]["id"], id);
    assert!(listed[0]["last_error"]
        .as_str()
        .is_some_and(|e| e.contains("unroutable")));

    // Naming a row that is not dead changes nothing and exits 2.
    let output = postbox(
        &db,
        &["dead", "retry", "--id", &id.to_string(), "--id", "999999"],
    );
    assert_eq!(output.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&output.stderr).contains("999999"));
    assert_eq!(db.count("dead_at is not null").await, 1);

    // The operator fixes the destination, then retries the row: it goes out with its id.
    sqlx::query("update postbox.outbox set routing_key = $1 where id = $2")
        .bind(&queue)
        .bind(id)
        .execute(&db.pool)
        .await
        .expect("fix routing key");
    let text = stdout(&postbox(&db, &["dead", "retry", "--id", &id.to_string()]));
    assert!(text.contains("1 dead row(s) pending again"), "{text}");
    let received = inbox.take(1, DEADLINE).await;
    assert_eq!(
        received[0].message_id.as_deref(),
        Some(enqueued.message_id.to_string().as_str())
    );
    wait_until("the row published", DEADLINE, || async {
        (db.count("published_at is not null").await == 1).then_some(())
    })
    .await;
    relay.stop().await;
    let text = stdout(&postbox(&db, &["dead", "list"]));
    assert_eq!(text.trim(), "no dead rows");
}

#[tokio::test]
async fn cleanup_deletes_only_old_published_rows() {
    let db = TestDb::migrated().await;
    execute(
        &db,
        "insert into postbox.outbox (routing_key, payload, published_at) \
           select 'orders', '{}', now() - interval '10 days' from generate_series(1, 2500); \
         insert into postbox.outbox (routing_key, payload, published_at) values ('orders', '{}', now()); \
         insert into postbox.outbox (routing_key, payload, created_at, available_at) \
           values ('orders', '{}', now() - interval '30 days', now() + interval '1 day'); \
         insert into postbox.outbox (routing_key, payload, created_at, dead_at) \
           values ('orders', '{}', now() - interval '30 days', now() - interval '20 days');",
    )
    .await;
    // 0s keeps everything, for the inbox as for the outbox.
    execute(
        &db,
        "insert into postbox.inbox (consumer, message_id, queue, outcome, processed_at) \
           values ('billing', gen_random_uuid(), 'q', 'applied', now() - interval '1 hour')",
    )
    .await;
    let text = stdout(&postbox(
        &db,
        &["cleanup", "--older-than", "0s", "--inbox-older-than", "0s"],
    ));
    assert!(text.contains("nothing deleted"), "{text}");
    let inbox_rows = || async {
        sqlx::query_scalar::<_, i64>("select count(*) from postbox.inbox")
            .fetch_one(&db.pool)
            .await
            .expect("count inbox")
    };
    assert_eq!(inbox_rows().await, 1, "{text}");
    assert_eq!(db.count("published_at is not null").await, 2501);
    let text = stdout(&postbox(
        &db,
        &["cleanup", "--older-than", "7d", "--inbox-older-than", "1m"],
    ));
    assert!(text.contains("outbox: 2500 published row(s)"), "{text}");
    assert!(text.contains("inbox: 1 decided row(s)"), "{text}");
    assert_eq!(inbox_rows().await, 0);
    assert_eq!(db.count("published_at is not null").await, 1);
    assert_eq!(
        db.count("published_at is null").await,
        2,
        "pending and dead kept"
    );
}

#[tokio::test]
async fn the_running_relay_applies_retention() {
    let db = TestDb::migrated().await;
    execute(
        &db,
        "insert into postbox.outbox (routing_key, payload, published_at) \
           select 'orders', '{}', now() - interval '2 hours' from generate_series(1, 1500); \
         insert into postbox.outbox (routing_key, payload, published_at) values ('orders', '{}', now());",
    )
    .await;
    let mut settings = db.settings();
    settings.relay.retention = Duration::from_secs(3600);
    settings.relay.cleanup_interval = Duration::from_millis(100);
    let relay = RunningRelay::start(settings).await;
    wait_until("old published rows deleted", DEADLINE, || async {
        (db.count("true").await == 1).then_some(())
    })
    .await;
    relay.stop().await;
}

/// `postbox run` serving metrics and health on `port`, with a 30 s readiness lag bound.
fn daemon(database_url: &str, amqp_url: &str, port: u16) -> RelayProcess {
    RelayProcess::spawn(
        database_url,
        &[
            ("AMQP_URL", amqp_url),
            ("POSTBOX_METRICS_ADDR", &port.to_string()),
            ("POSTBOX_READINESS_MAX_LAG", "30s"),
        ],
    )
}

#[tokio::test]
async fn metrics_health_and_readiness_over_http() {
    let Stage {
        db,
        rabbit: _rabbit,
        queue,
        mut inbox,
    } = Stage::start().await;
    let port = free_port();
    let daemon = daemon(&db.url, &common::amqp_url(), port);

    let (_, body) = wait_until("/readyz to answer 200", DEADLINE, || async {
        http_get(port, "/readyz").await.filter(|(s, _)| *s == 200)
    })
    .await;
    let ready: Value = serde_json::from_str(&body).expect("readyz JSON");
    assert_eq!(ready["checks"]["broker"], "ok");
    assert_eq!(ready["checks"]["database"], "ok");
    assert_eq!(ready["checks"]["listener"], "ok");
    assert_eq!(http_get(port, "/healthz").await.map(|r| r.0), Some(200));

    for _ in 0..3 {
        let message = postbox::Message::json(queue.as_str(), &serde_json::json!({})).expect("json");
        postbox::enqueue(&db.pool, &message).await.expect("enqueue");
    }
    inbox.take(3, DEADLINE).await;
    // The gauges are read when scraped and the counters move after the mark commits: wait for
    // a scrape that has seen both.
    let metrics = wait_until("published counted and marked", DEADLINE, || async {
        http_get(port, "/metrics").await.map(|r| r.1).filter(|m| {
            m.contains("postbox_published_total 3") && m.contains("postbox_pending_rows 0")
        })
    })
    .await;
    for expected in [
        "postbox_claim_seconds_bucket",
        "postbox_confirm_seconds_bucket",
        "postbox_mark_seconds_bucket",
        "postbox_batch_rows_bucket",
        "postbox_lag_seconds 0",
        "postbox_pending_rows 0",
        "postbox_broker_up 1",
        "postbox_listener_up 1",
        "postbox_database_up 1",
    ] {
        assert!(
            metrics.contains(expected),
            "{expected} missing from:\n{metrics}"
        );
    }
    assert_eq!(daemon.stop(DEADLINE).await, Some(0));
}

#[tokio::test]
async fn readiness_fails_on_a_growing_backlog_and_a_missing_broker() {
    let db = TestDb::migrated().await;
    execute(
        &db,
        "insert into postbox.outbox (routing_key, payload, available_at) \
         values ('orders', '{}', now() - interval '1 hour')",
    )
    .await;
    let port = free_port();
    // Nothing listens on port 1: the relay keeps retrying the broker, the row keeps ageing.
    let daemon = daemon(&db.url, "amqp://guest:guest@127.0.0.1:1/%2f", port);
    let (_, body) = wait_until("/readyz to answer 503", DEADLINE, || async {
        http_get(port, "/readyz").await.filter(|(s, _)| *s == 503)
    })
    .await;
    let ready: Value = serde_json::from_str(&body).expect("readyz JSON");
    assert_eq!(ready["ready"], false);
    assert_eq!(ready["checks"]["database"], "ok");
    assert_eq!(ready["checks"]["broker"], "not connected");
    assert!(
        ready["checks"]["lag"]
            .as_str()
            .is_some_and(|reason| reason.contains("above 30.0s")),
        "{body}"
    );
    assert_eq!(
        http_get(port, "/healthz").await.map(|r| r.0),
        Some(200),
        "alive all the same"
    );
    assert_eq!(daemon.stop(DEADLINE).await, Some(0));
}

/// A dead keyed row parks its stream (when keys park): counted apart, since consumers wait
/// for its number until an operator acts; the relay's lag covers every pending row, since
/// none waits at the relay for a dead one.
#[tokio::test]
async fn parked_streams_are_counted_and_the_lag_covers_every_pending_row() {
    let db = TestDb::migrated().await;
    execute(
        &db,
        "insert into postbox.outbox (routing_key, payload, partition_key, available_at, dead_at, \
         attempts, last_error, seq) values ('orders', '{}', 'k', now() - interval '2 hours', now(), 1, 'x', 1)",
    )
    .await;
    execute(
        &db,
        "insert into postbox.outbox (routing_key, payload, partition_key, available_at) \
         values ('orders', '{}', 'k', now() - interval '1 hour')",
    )
    .await;
    let parking = postbox::testing::store::operations::backlog(&db.pool, true)
        .await
        .expect("backlog");
    assert_eq!((parking.pending, parking.dead, parking.parked), (1, 1, 1));
    assert!(parking.oldest_pending_age_seconds > 3000.0, "{parking:?}");
    let not_parking = postbox::testing::store::operations::backlog(&db.pool, false)
        .await
        .expect("backlog");
    assert_eq!(not_parking.parked, 0);
    let streams = postbox::testing::store::operations::streams(&db.pool, true)
        .await
        .expect("streams");
    assert_eq!(
        (
            streams.keyed_streams_pending,
            streams.keyed_rows_pending,
            streams.keyed_rows_unnumbered,
            streams.parked_streams
        ),
        (1, 1, 1, 1)
    );
    // A second dead row of the same stream parks no second stream; one of another does.
    execute(
        &db,
        "insert into postbox.outbox (routing_key, payload, partition_key, dead_at, attempts, \
         last_error, seq) values ('orders', '{}', 'k', now(), 1, 'x', 2), \
         ('orders', '{}', 'other', now(), 1, 'x', 1)",
    )
    .await;
    let pool = &db.pool;
    let parked = |park_keys| async move {
        let backlog = postbox::testing::store::operations::backlog(pool, park_keys)
            .await
            .expect("backlog");
        let streams = postbox::testing::store::operations::streams(pool, park_keys)
            .await
            .expect("streams");
        (backlog.parked, streams.parked_streams)
    };
    assert_eq!(parked(true).await, (2, 2));
    assert_eq!(parked(false).await, (0, 0));
}

/// While Postgres is unreachable at start the relay waits for it, and meanwhile answers
/// /healthz (a liveness probe must not restart it in a loop) and fails /readyz.
#[tokio::test]
async fn health_answers_while_postgres_is_unreachable_at_start() {
    let port = free_port();
    let nowhere = format!("postgres://postgres@127.0.0.1:{}/postgres", free_port());
    let daemon = daemon(&nowhere, &common::amqp_url(), port);
    wait_until("/healthz to answer", DEADLINE, || async {
        http_get(port, "/healthz")
            .await
            .filter(|(status, _)| *status == 200)
    })
    .await;
    let (status, body) = http_get(port, "/readyz").await.expect("/readyz answers");
    assert_eq!(status, 503, "{body}");
    let ready: Value = serde_json::from_str(&body).expect("readyz JSON");
    assert_ne!(ready["checks"]["database"], "ok", "{body}");
    assert_eq!(
        daemon.stop(DEADLINE).await,
        Some(0),
        "stopped while waiting: nothing to lose"
    );
}

#[tokio::test]
async fn replay_republishes_retained_events_with_their_original_ids() {
    let Stage {
        db,
        rabbit: _rabbit,
        queue,
        mut inbox,
    } = Stage::start().await;
    // No fallback poll within the test: replayed rows must wake the relay.
    let mut settings = db.settings();
    settings.relay.poll_interval = Duration::from_secs(3600);
    let relay = RunningRelay::start(settings).await;
    let mut ids = Vec::new();
    for n in 0..5 {
        let message =
            postbox::Message::json(queue.as_str(), &serde_json::json!({ "n": n })).expect("json");
        let enqueued = postbox::enqueue(&db.pool, &message).await.expect("enqueue");
        ids.push((
            enqueued.id.expect("new row"),
            enqueued.message_id.to_string(),
        ));
    }
    inbox.take(5, DEADLINE).await;
    wait_until("all published", DEADLINE, || async {
        (db.count("published_at is not null").await == 5).then_some(())
    })
    .await;
    let (from, to) = (ids[1].0.to_string(), ids[3].0.to_string());
    // Rows 2 to 4, plus `extra` options.
    let replay = |extra: &[&str]| {
        let mut args = vec!["replay", "--from-id", from.as_str(), "--to-id", to.as_str()];
        args.extend_from_slice(extra);
        stdout(&postbox(&db, &args))
    };

    let text = replay(&["--dry-run"]);
    assert!(
        text.contains("3 published event(s)") && text.contains("dry run"),
        "{text}"
    );
    assert!(inbox.drain_for(Duration::from_millis(300)).await.is_empty());
    let text = replay(&["--routing-key", "elsewhere"]);
    assert!(text.contains("0 published event(s)"), "{text}");

    // One row per statement while the relay republishes them: each row is replayed once,
    // not again after its republication.
    let text = replay(&["--batch-size", "1"]);
    assert!(text.contains("3 event(s) pending again"), "{text}");
    let replayed = inbox.take(3, DEADLINE).await;
    let got: Vec<String> = replayed
        .iter()
        .map(|r| r.message_id.clone().expect("message id"))
        .collect();
    let expected: Vec<String> = ids[1..4].iter().map(|(_, m)| m.clone()).collect();
    assert_eq!(got, expected, "original ids, in id order");
    wait_until("replayed rows published again", DEADLINE, || async {
        (db.count("published_at is not null").await == 5).then_some(())
    })
    .await;
    relay.stop().await;

    let output = postbox(&db, &["replay", "--since", "yesterday"]);
    assert_eq!(output.status.code(), Some(2), "a bad time is a usage error");
    let output = postbox(&db, &["replay", "--since", "300000years"]);
    assert_eq!(
        output.status.code(),
        Some(2),
        "a time before the calendar is a usage error, not a panic"
    );
    let output = postbox(&db, &["replay"]);
    assert_eq!(output.status.code(), Some(2), "a range is required");
    for range in [
        ["--from-id", "10", "--to-id", "5"],
        ["--since", "1h", "--until", "2h"],
    ] {
        let output = postbox(&db, &[&["replay"][..], &range[..]].concat());
        assert_eq!(output.status.code(), Some(2), "an empty range: {range:?}");
    }
    assert_eq!(
        db.count("published_at is null").await,
        0,
        "nothing was replayed"
    );

    // Where relays delete what they publish, finding nothing is explained.
    let output = postbox_command()
        .args(["replay", "--since", "1h", "--routing-key", "elsewhere"])
        .env("DATABASE_URL", &db.url)
        .env("POSTBOX_RELAY__KEEP_PUBLISHED", "false")
        .output()
        .expect("run postbox");
    let text = stdout(&output);
    assert!(
        text.contains("0 published event(s)") && text.contains("relay.keep_published is false"),
        "{text}"
    );
}

#[tokio::test]
async fn reconcile_finds_a_missing_and_a_doubled_message() {
    let outbox = TestDb::migrated().await;
    let consumer_db = TestDb::empty().await;
    postbox::migrate_parts(&consumer_db.pool, &[postbox::Part::Inbox])
        .await
        .expect("inbox schema");
    // Five events published an hour ago, one just now (still within the grace period), one
    // for another routing key.
    execute(
        &outbox,
        "insert into postbox.outbox (routing_key, payload, published_at) \
           select 'orders', '{}', now() - interval '1 hour' from generate_series(1, 5); \
         insert into postbox.outbox (routing_key, payload, published_at) values \
           ('orders', '{}', now()), ('invoices', '{}', now() - interval '1 hour');",
    )
    .await;
    let ids: Vec<uuid::Uuid> = sqlx::query_scalar(
        "select message_id from postbox.outbox where routing_key = 'orders' order by id",
    )
    .fetch_all(&outbox.pool)
    .await
    .expect("ids");
    // The consumer processed 1, 3 (twice over) and 6; 2 arrived ahead of its stream's turn
    // and is held; 4 never arrived; 5 arrived and its handler keeps failing.
    sqlx::query(
        "insert into postbox.inbox (consumer, message_id, queue, outcome) \
         values ('billing', $1, 'orders', 'waiting')",
    )
    .bind(ids[1])
    .execute(&consumer_db.pool)
    .await
    .expect("held inbox row");
    for (i, duplicates) in [(0, 0), (2, 1), (5, 0)] {
        sqlx::query(
            "insert into postbox.inbox (consumer, message_id, queue, outcome, processed_at, duplicates) \
             values ('billing', $1, 'orders', 'applied', now(), $2)",
        )
        .bind(ids[i])
        .bind(duplicates)
        .execute(&consumer_db.pool)
        .await
        .expect("inbox row");
    }
    sqlx::query(
        "insert into postbox.inbox (consumer, message_id, queue, attempts, last_error) \
         values ('billing', $1, 'orders', 2, 'boom')",
    )
    .bind(ids[4])
    .execute(&consumer_db.pool)
    .await
    .expect("failing inbox row");
    let reconcile = |extra: &[&str]| {
        let mut args = vec![
            "reconcile",
            "--inbox-database-url",
            consumer_db.url.as_str(),
            "--consumer",
            "billing",
            "--routing-key",
            "orders",
            "--json",
        ];
        args.extend_from_slice(extra);
        postbox(&outbox, &args)
    };
    let output = reconcile(&[]);
    assert_eq!(output.status.code(), Some(3), "discrepancies found");
    let report: Value = serde_json::from_slice(&output.stdout).expect("reconcile --json is JSON");
    assert_eq!(report["published_checked"], 5);
    assert_eq!(report["missing_count"], 1);
    assert_eq!(report["missing"], serde_json::json!([ids[3].to_string()]));
    assert_eq!(report["failing_count"], 1, "received is not processed");
    assert_eq!(report["failing"], serde_json::json!([ids[4].to_string()]));
    assert_eq!(report["waiting_count"], 1, "held is not processed");
    assert_eq!(report["waiting"], serde_json::json!([ids[1].to_string()]));
    assert_eq!(report["duplicated_count"], 1);
    assert_eq!(report["duplicated"][0]["message_id"], ids[2].to_string());
    assert_eq!(report["duplicated"][0]["duplicates"], 1);
    // --limit bounds the lists, not the counts.
    let report: Value = serde_json::from_slice(&reconcile(&["--limit", "0"]).stdout).expect("JSON");
    assert_eq!(report["missing_count"], 1);
    assert_eq!(report["missing"], serde_json::json!([]));

    // Once they are processed, the check passes.
    for i in [1, 3, 4] {
        sqlx::query(
            "insert into postbox.inbox (consumer, message_id, queue, outcome, processed_at) \
             values ('billing', $1, 'orders', 'applied', now()) \
             on conflict (consumer, message_id) \
             do update set outcome = 'applied', processed_at = now()",
        )
        .bind(ids[i])
        .execute(&consumer_db.pool)
        .await
        .expect("inbox row");
    }
    let output = reconcile(&["--grace", "0s"]);
    assert_eq!(output.status.code(), Some(0));
    let report: Value = serde_json::from_slice(&output.stdout).expect("JSON");
    assert_eq!(
        report["published_checked"], 6,
        "no grace: the newest counts too"
    );
    // A grace longer than history checks nothing, rather than failing.
    let output = reconcile(&["--grace", "1000000000y"]);
    assert_eq!(output.status.code(), Some(0), "{output:?}");
    let report: Value = serde_json::from_slice(&output.stdout).expect("JSON");
    assert_eq!(report["published_checked"], 0);
    // A consumer name with no inbox rows is pointed out; a bad inbox URL is a usage error.
    let output = postbox(
        &outbox,
        &[
            "reconcile",
            "--inbox-database-url",
            consumer_db.url.as_str(),
            "--consumer",
            "biling",
        ],
    );
    assert_eq!(output.status.code(), Some(3));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("no rows of consumer \"biling\""),
        "{stderr}"
    );
    let output = postbox(
        &outbox,
        &[
            "reconcile",
            "--inbox-database-url",
            "notaurl:s3cret",
            "--consumer",
            "billing",
        ],
    );
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("--inbox-database-url"), "{stderr}");
}

#[tokio::test]
async fn running_relays_are_listed_until_they_stop_and_reappear_if_deleted() {
    let db = TestDb::migrated().await;
    let mut settings = db.settings();
    settings.relay.heartbeat_interval = Duration::from_millis(100);
    let relay = RunningRelay::start(settings).await;
    let (pid, open_batches): (i32, i32) = wait_until("the relay registered", DEADLINE, || async {
        sqlx::query_as("select pid, open_batches from postbox.relays_alive")
            .fetch_optional(&db.pool)
            .await
            .ok()
            .flatten()
    })
    .await;
    assert_eq!(pid as u32, std::process::id());
    assert_eq!(open_batches, 0, "idle");
    let json: Value =
        serde_json::from_str(&stdout(&postbox(&db, &["status", "--json"]))).expect("status --json");
    assert_eq!(json["relays_alive"], 1);
    // A row deleted under a running relay (by an operator, say) comes back at the next beats.
    sqlx::query("delete from postbox.relays")
        .execute(&db.pool)
        .await
        .expect("delete the relay's row");
    wait_until("the relay registered again", DEADLINE, || async {
        let alive: i64 = sqlx::query_scalar("select count(*) from postbox.relays_alive")
            .fetch_one(&db.pool)
            .await
            .ok()?;
        (alive == 1).then_some(())
    })
    .await;
    relay.stop().await;
    let left: i64 = sqlx::query_scalar("select count(*) from postbox.relays")
        .fetch_one(&db.pool)
        .await
        .expect("count relays");
    assert_eq!(left, 0, "a clean stop removes the relay's row");
}

/// A relay that refuses rows over 1,000 bytes, a test queue with a consumer, and a first row
/// of key "k" to the queue that dies (too big), numbered 1 in its stream.
async fn with_a_dead_row_on_key_k(
    park: bool,
) -> (TestDb, Rabbit, String, common::Inbox, RunningRelay, i64) {
    let Stage {
        db,
        rabbit,
        queue,
        inbox,
    } = Stage::start().await;
    let mut settings = db.settings();
    settings.relay.max_message_bytes = 1_000;
    settings.relay.dead_rows_park_keys = park;
    let relay = RunningRelay::start(settings).await;
    let poison = postbox::Message::text(&queue, "x".repeat(2_000)).partition_key("k");
    let dead_id = postbox::enqueue(&db.pool, &poison)
        .await
        .expect("enqueue")
        .id
        .expect("new row");
    wait_until("the first row of k dead", DEADLINE, || async {
        (db.count("dead_at is not null").await == 1).then_some(())
    })
    .await;
    (db, rabbit, queue, inbox, relay, dead_id)
}

async fn enqueue_keyed(db: &TestDb, queue: &str, key: &str, n: i64) -> String {
    let message = postbox::Message::json(queue, &serde_json::json!({ "n": n }))
        .expect("json")
        .partition_key(key);
    postbox::enqueue(&db.pool, &message)
        .await
        .expect("enqueue")
        .message_id
        .to_string()
}

/// The seq header of a received message, and whether it is a skip message.
fn seq_and_skip(received: &common::Received) -> (Option<i64>, bool) {
    (received.seq(), received.header("x-postbox-skip").is_some())
}

/// A dead row parks its stream: the relay goes on publishing the stream's later rows, with
/// their numbers, and consumers hold them until the number of the dead row comes. Released,
/// the row is replaced in its stream by a skip message carrying its number.
#[tokio::test]
async fn a_dead_row_parks_its_stream_until_released_then_a_skip_takes_its_number() {
    let (db, _rabbit, queue, mut inbox, relay, dead_id) = with_a_dead_row_on_key_k(true).await;
    enqueue_keyed(&db, &queue, "k", 1).await;
    enqueue_keyed(&db, &queue, "k", 2).await;
    enqueue_keyed(&db, &queue, "j", 3).await;
    let mut first: Vec<(Option<i64>, bool)> = inbox
        .take(3, DEADLINE)
        .await
        .iter()
        .map(seq_and_skip)
        .collect();
    first.sort_unstable();
    assert_eq!(
        first,
        [(Some(1), false), (Some(2), false), (Some(3), false)]
    );
    assert!(
        inbox.drain_for(Duration::from_millis(500)).await.is_empty(),
        "no skip while the row parks its stream"
    );
    let parked: (String, i64, String) =
        sqlx::query_as("select partition_key, dead_id, reason from postbox.parked_keys")
            .fetch_one(&db.pool)
            .await
            .expect("one parked key");
    assert_eq!((parked.0.as_str(), parked.1), ("k", dead_id));
    assert!(parked.2.contains("relay.max_message_bytes"), "{}", parked.2);
    let parked_at: Option<i64> = sqlx::query_scalar(
        "select parked_at_seq from postbox.outbox_keyed_backlog where partition_key = 'k'",
    )
    .fetch_optional(&db.pool)
    .await
    .expect("keyed backlog")
    .flatten();
    assert_eq!(parked_at, None, "nothing of k pending at the relay");

    let output = postbox(&db, &["dead", "release"]);
    assert_eq!(
        output.status.code(),
        Some(2),
        "release needs --id, --key or --all"
    );
    let text = stdout(&postbox(&db, &["dead", "release", "--key", "k"]));
    assert!(text.contains("1 dead row(s) released"), "{text}");
    let skip = inbox.take(1, DEADLINE).await;
    assert_eq!(
        seq_and_skip(&skip[0]),
        (Some(1), true),
        "the skip takes number 1"
    );
    assert_eq!(
        skip[0].header("x-postbox-partition-key"),
        Some(&lapin::types::AMQPValue::LongString("k".into()))
    );
    // Released twice: still one skip.
    postbox::testing::store::operations::release_dead(&db.pool, Some(&[dead_id]), None)
        .await
        .expect("release again");
    assert!(inbox.drain_for(Duration::from_millis(500)).await.is_empty());
    relay.stop().await;
    let parked: i64 = sqlx::query_scalar("select count(*) from postbox.parked_keys")
        .fetch_one(&db.pool)
        .await
        .expect("count");
    assert_eq!(parked, 0);
    assert_eq!(
        db.count("dead_at is not null").await,
        1,
        "the dead row stays dead"
    );
}

/// A release by hand in SQL sends the skip just as `postbox dead release` does; a row
/// released twice sends one, and a skip that died sends none.
#[tokio::test]
async fn a_release_in_plain_sql_writes_the_skip_message() {
    let db = TestDb::migrated().await;
    execute(
        &db,
        "insert into postbox.outbox (routing_key, payload, partition_key, seq, dead_at, attempts) \
         values ('orders', '{}', 'k', 7, now(), 1)",
    )
    .await;
    let release = "update postbox.outbox set released_at = now() \
                   where dead_at is not null and released_at is null";
    execute(&db, release).await;
    execute(
        &db,
        "update postbox.outbox set released_at = null where seq = 7 and payload = '{}'",
    )
    .await;
    execute(&db, release).await;
    let skips: Vec<(String, i64, Option<chrono::DateTime<chrono::Utc>>)> =
        sqlx::query_as("select partition_key, seq, published_at from postbox.outbox_skips")
            .fetch_all(&db.pool)
            .await
            .expect("skips");
    assert_eq!(skips, vec![("k".to_string(), 7, None)], "one skip, pending");
    // The skip dies too (no such queue, say): released, it begets no skip of its own.
    execute(
        &db,
        "update postbox.outbox set dead_at = now() where headers ? 'x-postbox-skip'",
    )
    .await;
    execute(&db, release).await;
    assert_eq!(db.count("headers ? 'x-postbox-skip'").await, 1);
}

/// Retrying a released row publishes it again as a new event at the end of its stream (its
/// old number went to the skip, which consumers applied already).
#[tokio::test]
async fn a_released_row_retried_gets_a_new_number() {
    let (db, _rabbit, _queue, mut inbox, relay, dead_id) = with_a_dead_row_on_key_k(false).await;
    let skip = inbox.take(1, DEADLINE).await;
    assert_eq!(seq_and_skip(&skip[0]), (Some(1), true));
    relay.stop().await;
    // Small enough now: an operator fixed the row.
    execute(
        &db,
        &format!("update postbox.outbox set payload = 'fixed' where id = {dead_id}"),
    )
    .await;
    let revived = postbox::testing::store::operations::retry_dead(&db.pool, Some(&[dead_id]))
        .await
        .expect("retry");
    assert_eq!(revived, vec![dead_id]);
    let relay = RunningRelay::start(db.settings()).await;
    let again = inbox.take(1, DEADLINE).await;
    assert_eq!(again[0].payload, b"fixed");
    assert_eq!(seq_and_skip(&again[0]), (Some(2), false));
    relay.stop().await;
}

#[tokio::test]
async fn with_parking_off_a_dead_row_is_skipped_at_once() {
    let (db, _rabbit, queue, mut inbox, relay, _) = with_a_dead_row_on_key_k(false).await;
    let skip = inbox.take(1, DEADLINE).await;
    assert_eq!(seq_and_skip(&skip[0]), (Some(1), true));
    enqueue_keyed(&db, &queue, "k", 1).await;
    let arrived = inbox.take(1, DEADLINE).await;
    assert_eq!(seq_and_skip(&arrived[0]), (Some(2), false));
    relay.stop().await;
}

/// `vacuum = auto` vacuums a table exactly where autovacuum will not; `always` and `never`
/// mean what they say. The same rule serves the relay (outbox) and the consumer (inbox).
#[tokio::test]
async fn postbox_vacuums_a_table_itself_only_where_autovacuum_will_not() {
    use postbox::testing::store::operations::{vacuums_itself, HotTable};
    use postbox::Vacuum;
    let db = TestDb::migrated().await;
    let server_autovacuum: bool = sqlx::query_scalar("select current_setting('autovacuum')::bool")
        .fetch_one(&db.pool)
        .await
        .expect("autovacuum setting");
    for table in [HotTable::Outbox, HotTable::Inbox] {
        let name = match table {
            HotTable::Outbox => "postbox.outbox",
            HotTable::Inbox => "postbox.inbox",
        };
        // Postgres keeps the value as written: every spelling of a boolean counts.
        for (written, enabled) in [
            ("false", false),
            ("on", true),
            ("off", false),
            ("true", true),
        ] {
            execute(
                &db,
                &format!("alter table {name} set (autovacuum_enabled = {written})"),
            )
            .await;
            let autovacuum_runs = enabled && server_autovacuum;
            assert_eq!(
                vacuums_itself(&db.pool, table, Vacuum::Auto).await,
                !autovacuum_runs,
                "{name}, autovacuum_enabled = {written}"
            );
            assert!(vacuums_itself(&db.pool, table, Vacuum::Always).await);
            assert!(!vacuums_itself(&db.pool, table, Vacuum::Never).await);
        }
    }
}
