//! End to end: rows committed to postbox.outbox arrive in RabbitMQ, once, intact.

mod common;

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use common::{proxy::PgProxy, wait_until, Harness, Rabbit, RunningRelay, Stage, TestDb};
use lapin::types::AMQPValue;
use postbox::{enqueue, Message};

const DEADLINE: Duration = Duration::from_secs(30);

#[tokio::test]
async fn events_from_concurrent_writers_all_arrive_once_intact() {
    let mut h = Harness::start().await;
    let (db, queue, inbox) = (&h.db, h.queue.clone(), &mut h.inbox);

    const WRITERS: usize = 8;
    const PER_WRITER: usize = 250;
    let mut writers = Vec::new();
    for writer in 0..WRITERS {
        let pool = db.pool.clone();
        let queue = queue.clone();
        writers.push(tokio::spawn(async move {
            let mut ids = Vec::new();
            for n in 0..PER_WRITER {
                let mut tx = pool.begin().await.expect("begin");
                let message = Message::json(&queue, &serde_json::json!({"writer": writer, "n": n}))
                    .expect("json")
                    .partition_key(format!("writer-{writer}"))
                    .header("type", "test.event")
                    .header("n", n as i64);
                let enqueued = enqueue(&mut *tx, &message).await.expect("enqueue");
                tx.commit().await.expect("commit");
                ids.push(enqueued.message_id.to_string());
            }
            ids
        }));
    }
    let mut committed = HashSet::new();
    for writer in writers {
        committed.extend(writer.await.expect("writer task"));
    }

    let received = inbox.take(WRITERS * PER_WRITER, DEADLINE).await;
    let source: uuid::Uuid = sqlx::query_scalar("select id from postbox.outbox_source")
        .fetch_one(&db.pool)
        .await
        .expect("the outbox's identity");
    let mut seen = HashMap::new();
    for message in &received {
        *seen
            .entry(message.message_id.clone().expect("message id set"))
            .or_insert(0) += 1;
        assert_eq!(message.content_type.as_deref(), Some("application/json"));
        assert_eq!(message.delivery_mode, Some(2), "persistent");
        assert_eq!(
            message.header("type"),
            Some(&AMQPValue::LongString("test.event".into()))
        );
        assert!(message.header("x-postbox-created-at").is_some());
        assert_eq!(
            message.header("x-postbox-source"),
            Some(&AMQPValue::LongString(source.to_string().as_str().into()))
        );
        let body: serde_json::Value = serde_json::from_slice(&message.payload).expect("json body");
        assert_eq!(
            message.header("n"),
            Some(&AMQPValue::LongLongInt(body["n"].as_i64().expect("n")))
        );
        assert_eq!(
            message.header("x-postbox-partition-key"),
            Some(&AMQPValue::LongString(
                format!("writer-{}", body["writer"]).as_str().into()
            ))
        );
    }
    assert_eq!(seen.keys().cloned().collect::<HashSet<_>>(), committed);
    assert!(seen.values().all(|&n| n == 1), "each message arrives once");
    // each writer's events are numbered in the order it committed them (the order consumers
    // apply them in)
    let mut by_writer: HashMap<i64, Vec<(i64, i64)>> = HashMap::new();
    for message in &received {
        let body: serde_json::Value = serde_json::from_slice(&message.payload).expect("json");
        let (writer, n) = (
            body["writer"].as_i64().expect("w"),
            body["n"].as_i64().expect("n"),
        );
        let seq = message.seq().expect("a keyed message has a number");
        by_writer.entry(writer).or_default().push((seq, n));
    }
    for (writer, mut events) in by_writer {
        events.sort_unstable();
        let numbers: Vec<i64> = events.iter().map(|(seq, _)| *seq).collect();
        assert_eq!(
            numbers,
            (1..=events.len() as i64).collect::<Vec<_>>(),
            "writer {writer}"
        );
        assert!(
            events.windows(2).all(|pair| pair[0].1 < pair[1].1),
            "writer {writer}: numbers out of commit order: {events:?}"
        );
    }
    wait_until("all rows marked published", DEADLINE, || async {
        (db.count("published_at is null").await == 0).then_some(())
    })
    .await;
    assert_eq!(
        db.count("published_at is not null").await,
        (WRITERS * PER_WRITER) as i64
    );
    h.relay.stop().await;
    assert!(inbox.drain_for(Duration::from_millis(300)).await.is_empty());
}

#[tokio::test]
async fn rolled_back_transactions_publish_nothing() {
    let mut h = Harness::start().await;
    let (db, queue, inbox) = (&h.db, h.queue.clone(), &mut h.inbox);

    let mut tx = db.pool.begin().await.expect("begin");
    enqueue(&mut *tx, &Message::text(&queue, "rolled back"))
        .await
        .expect("enqueue");
    tx.rollback().await.expect("rollback");
    let mut tx = db.pool.begin().await.expect("begin");
    enqueue(&mut *tx, &Message::text(&queue, "committed"))
        .await
        .expect("enqueue");
    tx.commit().await.expect("commit");

    let received = inbox.take(1, DEADLINE).await;
    assert_eq!(received[0].payload, b"committed");
    h.relay.stop().await;
    assert!(inbox.drain_for(Duration::from_millis(300)).await.is_empty());
    assert_eq!(db.count("true").await, 1);
}

#[tokio::test]
async fn plain_sql_insert_is_published_byte_for_byte() {
    let mut h = Harness::start().await;
    let (db, queue, inbox) = (&h.db, h.queue.clone(), &mut h.inbox);

    // A JSON literal with escapes that bytea's input syntax would mangle or reject.
    let json = r#"{"id":1,"path":"C:\\dir","quote":"say \"hi\"","emoji":"✓"}"#;
    let sql = format!(
        "insert into postbox.outbox (routing_key, payload) values ('{queue}', '{json}') returning message_id"
    );
    let message_id: uuid::Uuid = sqlx::query_scalar(sqlx::AssertSqlSafe(sql))
        .fetch_one(&db.pool)
        .await
        .expect("insert");

    let received = inbox.take(1, DEADLINE).await;
    assert_eq!(received[0].payload, json.as_bytes());
    assert_eq!(received[0].message_id, Some(message_id.to_string()));
    assert_eq!(
        received[0].content_type.as_deref(),
        Some("application/json")
    );
    serde_json::from_slice::<serde_json::Value>(&received[0].payload).expect("still valid JSON");
    h.relay.stop().await;
}

#[tokio::test]
async fn binary_payloads_arrive_unchanged() {
    let mut h = Harness::start().await;
    let (db, queue, inbox) = (&h.db, h.queue.clone(), &mut h.inbox);
    let bytes: Vec<u8> = (0..=255u8).chain([0, 0xff, 0]).collect();
    enqueue(&db.pool, &Message::bytes(&queue, bytes.clone()))
        .await
        .expect("enqueue");
    let received = inbox.take(1, DEADLINE).await;
    assert_eq!(received[0].payload, bytes);
    assert_eq!(
        received[0].content_type.as_deref(),
        Some("application/octet-stream")
    );
    h.relay.stop().await;
}

#[tokio::test]
async fn lower_id_committed_after_a_higher_id_was_published_still_goes_out() {
    let mut h = Harness::start().await;
    let (db, queue, inbox) = (&h.db, h.queue.clone(), &mut h.inbox);

    let mut slow = db.pool.begin().await.expect("begin");
    let first = enqueue(&mut *slow, &Message::text(&queue, "slow"))
        .await
        .expect("enqueue");
    let second = enqueue(&db.pool, &Message::text(&queue, "fast"))
        .await
        .expect("enqueue");
    assert!(
        first.id < second.id,
        "the slow transaction took the lower id"
    );

    let received = inbox.take(1, DEADLINE).await;
    assert_eq!(received[0].payload, b"fast");
    wait_until("the higher id to be marked published", DEADLINE, || async {
        (db.count(&format!(
            "id = {} and published_at is not null",
            second.id.unwrap_or(0)
        ))
        .await
            == 1)
            .then_some(())
    })
    .await;
    slow.commit().await.expect("commit");

    let received = inbox.take(1, DEADLINE).await;
    assert_eq!(received[0].payload, b"slow");
    assert_eq!(received[0].outbox_id(), first.id.expect("new row"));
    h.relay.stop().await;
}

#[tokio::test]
async fn a_commit_wakes_the_relay_without_waiting_for_the_poll() {
    let Stage {
        db,
        rabbit: _rabbit,
        queue,
        mut inbox,
    } = Stage::start().await;
    let mut settings = db.settings();
    // Far beyond the deadline below: only LISTEN/NOTIFY can deliver in time.
    settings.relay.poll_interval = Duration::from_secs(600);
    let relay = RunningRelay::start(settings).await;
    // The first message may ride the relay's startup claim; the later ones find it idle.
    enqueue(&db.pool, &Message::text(&queue, "warm up"))
        .await
        .expect("enqueue");
    inbox.take(1, Duration::from_secs(20)).await;
    for n in 0..3 {
        enqueue(&db.pool, &Message::text(&queue, format!("wake {n}")))
            .await
            .expect("enqueue");
        let received = inbox.take(1, Duration::from_secs(20)).await;
        assert_eq!(received[0].payload, format!("wake {n}").as_bytes());
    }
    relay.stop().await;
}

#[tokio::test]
async fn an_unroutable_row_stays_pending_with_its_error_and_does_not_stop_others() {
    let mut h = Harness::start().await;
    let (db, queue, inbox) = (&h.db, h.queue.clone(), &mut h.inbox);

    let missing = format!("{queue}-missing");
    let bad = enqueue(&db.pool, &Message::text(&missing, "nowhere"))
        .await
        .expect("enqueue");
    enqueue(&db.pool, &Message::text(&queue, "fine"))
        .await
        .expect("enqueue");
    let received = inbox.take(1, DEADLINE).await;
    assert_eq!(received[0].payload, b"fine");

    let bad_id = bad.id.expect("new row");
    let (attempts, error): (i32, Option<String>) =
        wait_until("the failure recorded", DEADLINE, || async {
            let row: (i32, Option<String>, bool) = sqlx::query_as(
            "select attempts, last_error, published_at is null from postbox.outbox where id = $1",
        )
        .bind(bad_id)
        .fetch_one(&db.pool)
        .await
        .expect("row");
            (row.0 >= 1 && row.2).then_some((row.0, row.1))
        })
        .await;
    assert!(attempts >= 1);
    let error = error.expect("last_error set");
    assert!(
        error.contains("NO_ROUTE") && error.contains(&missing),
        "{error}"
    );
    h.relay.stop().await;
}

/// With `relay.keep_published = false` published rows are deleted by the statement that would
/// mark them, in all-published batches and in batches with failures alike; failed rows stay.
#[tokio::test]
async fn without_history_published_rows_are_deleted_and_failed_rows_stay() {
    let Stage {
        db,
        rabbit: _rabbit,
        queue,
        mut inbox,
    } = Stage::start().await;
    let missing = format!("{queue}-missing");
    // Committed before the relay starts, so the first claim takes them as one batch: five
    // confirmed and one returned as unroutable.
    let mut mixed: Vec<Message> = (0..5)
        .map(|n| Message::text(&queue, format!("mixed {n}")))
        .collect();
    mixed.push(Message::text(&missing, "nowhere"));
    postbox::enqueue_many(&db.pool, &mixed)
        .await
        .expect("enqueue");
    let mut settings = db.settings();
    settings.relay.keep_published = false;
    settings.relay.max_attempts = 1;
    let relay = RunningRelay::start(settings).await;
    inbox.take(5, DEADLINE).await;
    for n in 0..10 {
        enqueue(&db.pool, &Message::text(&queue, format!("plain {n}")))
            .await
            .expect("enqueue");
    }
    inbox.take(10, DEADLINE).await;

    let (routing_key, error): (String, Option<String>) =
        wait_until("only the dead row is left", DEADLINE, || async {
            let rows: Vec<(String, Option<String>, bool)> = sqlx::query_as(
                "select routing_key, last_error, dead_at is not null from postbox.outbox",
            )
            .fetch_all(&db.pool)
            .await
            .expect("rows");
            match rows.as_slice() {
                [(key, error, true)] => Some((key.clone(), error.clone())),
                _ => None,
            }
        })
        .await;
    assert_eq!(routing_key, missing);
    assert!(error.is_some_and(|e| e.contains("NO_ROUTE")));
    // Counted after the commit that deleted them.
    wait_until("15 rows counted as published", DEADLINE, || async {
        (relay.stats.published() == 15).then_some(())
    })
    .await;
    relay.stop().await;
}

/// One batch's outcomes written in one statement: published rows are marked (or, without
/// history, deleted), retried rows pushed back with their error, dead rows kept with theirs.
#[tokio::test]
async fn a_mixed_batch_is_written_in_one_statement_with_and_without_history() {
    use postbox::testing::store::outbox::{complete, Completion};
    let db = TestDb::migrated().await;
    for keep_published in [true, false] {
        let batch: Vec<Message> = (0..3).map(|n| Message::text("q", n.to_string())).collect();
        let ids: Vec<i64> = postbox::enqueue_many(&db.pool, &batch)
            .await
            .expect("enqueue")
            .iter()
            .map(|e| e.id.expect("new row"))
            .collect();
        let outcomes = [
            (ids[0], Completion::Published),
            (
                ids[1],
                Completion::Retry {
                    error: "nacked".into(),
                    retry_after: Duration::from_secs(60),
                },
            ),
            (
                ids[2],
                Completion::Dead {
                    error: "too big".into(),
                },
            ),
        ];
        let mut tx = db.pool.begin().await.expect("begin");
        let written = complete(&mut tx, &outcomes, keep_published, true)
            .await
            .expect("complete");
        tx.commit().await.expect("commit");
        assert_eq!(written, 3);
        let rows: Vec<(i64, bool, i32, Option<String>, bool, bool)> = sqlx::query_as(
            "select id, published_at is not null, attempts, last_error, dead_at is not null,                     available_at > now() + interval '30 seconds'              from postbox.outbox where id = any($1) order by id",
        )
        .bind(&ids)
        .fetch_all(&db.pool)
        .await
        .expect("rows");
        let mut expected = vec![
            (ids[1], false, 1, Some("nacked".to_string()), false, true),
            (ids[2], false, 1, Some("too big".to_string()), true, false),
        ];
        if keep_published {
            expected.insert(0, (ids[0], true, 0, None, false, false));
        }
        assert_eq!(rows, expected, "keep_published = {keep_published}");
    }
}

/// A key whose first row is not due yet (waiting for its retry, or scheduled for later) holds
/// nothing back at the relay: its later rows go out numbered (consumers hold them until the
/// earlier number arrives), other keys' rows with them, and the row not due is numbered only
/// once due.
#[tokio::test]
async fn rows_not_due_yet_hold_nothing_back_at_the_relay() {
    const KEYS: usize = 24;
    let Stage {
        db,
        rabbit: _rabbit,
        queue,
        mut inbox,
    } = Stage::start().await;
    // Each key's first row: on even keys a failure waiting an hour for its retry, on odd keys
    // an event scheduled an hour ahead.
    for key in 0..KEYS {
        let attempts = if key % 2 == 0 { 1 } else { 0 };
        sqlx::query(
            "insert into postbox.outbox \
                 (routing_key, payload, partition_key, attempts, available_at) \
             values ($1, 'first', $2, $3, now() + interval '1 hour')",
        )
        .bind(&queue)
        .bind(format!("k{key}"))
        .bind(attempts)
        .execute(&db.pool)
        .await
        .expect("held-back row");
    }
    let mut later: Vec<Message> = (0..4 * KEYS)
        .map(|n| Message::text(&queue, format!("k {n}")).partition_key(format!("k{}", n % KEYS)))
        .collect();
    later.extend(
        (0..5).map(|n| {
            Message::text(&queue, format!("other {n}")).partition_key(format!("other-{n}"))
        }),
    );
    postbox::enqueue_many(&db.pool, &later)
        .await
        .expect("enqueue");
    let mut settings = db.settings();
    settings.relay.batch_size = 20;
    let relay = RunningRelay::start(settings).await;
    let received = inbox.take(later.len(), DEADLINE).await;
    assert!(received.iter().all(|r| !r.payload.starts_with(b"first")));
    let mut numbers: HashMap<Vec<u8>, Vec<i64>> = HashMap::new();
    for message in &received {
        let key = match message.header("x-postbox-partition-key") {
            Some(AMQPValue::LongString(k)) => k.as_bytes().to_vec(),
            other => panic!("partition key header: {other:?}"),
        };
        numbers
            .entry(key)
            .or_default()
            .push(message.seq().expect("numbered"));
    }
    for (key, mut seqs) in numbers {
        seqs.sort_unstable();
        let expected = if key.starts_with(b"other") {
            vec![1]
        } else {
            vec![1, 2, 3, 4]
        };
        assert_eq!(seqs, expected, "{}", String::from_utf8_lossy(&key));
    }
    assert!(
        inbox.drain_for(Duration::from_millis(300)).await.is_empty(),
        "the rows not due wait for their time"
    );
    assert_eq!(
        db.count("payload = 'first' and seq is null and published_at is null")
            .await,
        KEYS as i64,
        "numbered only once due"
    );
    relay.stop().await;
}

/// A burst on one key goes out at the speed of unkeyed rows, numbered 1 to n in the order it
/// was committed: no row of the key waits for another to be confirmed.
#[tokio::test]
async fn a_hot_keys_burst_goes_out_numbered_in_commit_order() {
    const BURST: usize = 1_000;
    let Stage {
        db,
        rabbit: _rabbit,
        queue,
        mut inbox,
    } = Stage::start().await;
    let messages: Vec<Message> = (0..BURST)
        .map(|n| Message::text(&queue, format!("{n}")).partition_key("hot"))
        .collect();
    for chunk in messages.chunks(100) {
        postbox::enqueue_many(&db.pool, chunk)
            .await
            .expect("enqueue");
    }
    let mut settings = db.settings();
    settings.relay.batch_size = 100;
    let relay = RunningRelay::start(settings).await;
    let received = inbox.take(BURST, DEADLINE).await;
    relay.stop().await;
    let mut numbered: Vec<(i64, i64)> = received
        .iter()
        .map(|message| {
            let n: i64 = std::str::from_utf8(&message.payload)
                .ok()
                .and_then(|p| p.parse().ok())
                .expect("a burst row");
            (message.seq().expect("numbered"), n)
        })
        .collect();
    numbered.sort_unstable();
    let expected: Vec<(i64, i64)> = (0..BURST as i64).map(|n| (n + 1, n)).collect();
    assert_eq!(numbered, expected);
    // Several batches of the key were in flight at once: more than one claim's worth went out
    // before the first batch was marked (one batch at a time would take ten round trips).
    let batches_with_the_key: i64 = sqlx::query_scalar(
        "select count(distinct published_at) from postbox.outbox where partition_key = 'hot'",
    )
    .fetch_one(&db.pool)
    .await
    .expect("marks");
    assert!(batches_with_the_key >= 10, "{batches_with_the_key} marks");
}

/// Runs a relay through the counting proxy over `batches` full batches of `batch_size` rows
/// and returns the statements it sent, the batches it completed and the claims it ran.
async fn statements_for(
    batches: usize,
    batch_size: u32,
) -> (u64, u64, u64, u64, std::sync::Arc<postbox::relay::Stats>) {
    let Stage {
        db,
        rabbit: _rabbit,
        queue,
        mut inbox,
    } = Stage::start().await;
    let rows = batches * batch_size as usize;
    let messages: Vec<Message> = (0..rows)
        .map(|n| Message::text(&queue, n.to_string()))
        .collect();
    postbox::enqueue_many(&db.pool, &messages)
        .await
        .expect("backlog");

    let upstream = url::Url::parse(&db.url).expect("url");
    let proxy = PgProxy::start(format!(
        "{}:{}",
        upstream.host_str().unwrap_or("127.0.0.1"),
        upstream.port().unwrap_or(5432)
    ))
    .await;
    let mut settings = common::settings_for(&proxy.url_for(&db.url));
    settings.relay.batch_size = batch_size;
    settings.relay.max_in_flight_batches = 1;
    settings.relay.poll_interval = Duration::from_secs(600);
    // Retention's periodic delete is not part of the per-batch budget; the heartbeat only
    // registers (at start) and deregisters (at stop) within the test.
    settings.relay.retention = Duration::ZERO;
    settings.relay.vacuum = postbox::Vacuum::Never;
    settings.relay.heartbeat_interval = Duration::from_secs(600);
    let relay = RunningRelay::start(settings).await;
    let relay_stats = relay.stats.clone();
    inbox.take(rows, DEADLINE).await;
    wait_until("every batch marked", DEADLINE, || async {
        (relay.stats.published() == rows as u64).then_some(())
    })
    .await;
    relay.stop().await;
    (
        proxy.statements(),
        relay_stats.batches(),
        relay_stats.claims(),
        relay_stats.released(),
        relay_stats,
    )
}

#[tokio::test]
async fn statements_per_batch_do_not_grow_with_batch_size() {
    for batch_size in [10, 1000] {
        let (statements, batches, claims, released, relay_stats) =
            statements_for(5, batch_size).await;
        println!(
            "batch size {batch_size}: {statements} statements for {batches} batches ({released} \
             rows released), {} empty claims",
            claims - batches
        );
        // A batch claimed just as the publisher was (re)connecting is given back whole and
        // claimed again: one batch more, at the same cost.
        assert_eq!(batches, 5 + released.div_ceil(u64::from(batch_size)));
        // LISTEN and registration at start, UNLISTEN and deregistration at stop; per batch
        // the numbering pass, BEGIN, claim, mark (or, given back, the release's NOTIFY),
        // COMMIT; per empty claim (the relay looking for more before it goes idle) the
        // numbering pass, BEGIN, claim, ROLLBACK. Nothing per row.
        // Falling asleep takes the wake-up keys (one statement, and the lock timeout when
        // their connection opens); waking gives them back (one).
        let (sleeps, wakes) = (relay_stats.sleeps(), relay_stats.wakes());
        let wakeup = u64::from(sleeps > 0) + sleeps + wakes;
        assert_eq!(
            statements,
            4 + 5 * batches + 4 * (claims - batches) + wakeup
        );
    }
}

#[tokio::test]
async fn two_relays_share_one_outbox_without_duplicates_or_gaps_in_numbers() {
    let Stage {
        db,
        rabbit: _rabbit,
        queue,
        mut inbox,
    } = Stage::start().await;
    let mut settings = db.settings();
    // Small batches, so both relays take turns many times over the same keys.
    settings.relay.batch_size = 25;
    let first = RunningRelay::start(settings.clone()).await;
    let second = RunningRelay::start(settings).await;
    // Both ready before the work arrives, so that both can claim from the first commit on.
    wait_until("both relays connected to the broker", DEADLINE, || async {
        (first.health.broker_connected() && second.health.broker_connected()).then_some(())
    })
    .await;
    let messages: Vec<Message> = (0..2000)
        .map(|i| {
            Message::json(queue.as_str(), &serde_json::json!({ "n": i }))
                .expect("json")
                .partition_key(format!("key-{}", i % 100))
        })
        .collect();
    for chunk in messages.chunks(100) {
        postbox::enqueue_many(&db.pool, chunk)
            .await
            .expect("enqueue");
    }
    let received = inbox.take(2000, DEADLINE).await;
    assert!(
        inbox.drain_for(Duration::from_millis(300)).await.is_empty(),
        "nothing published twice"
    );
    let (a, b) = (first.stats.published(), second.stats.published());
    first.stop().await;
    second.stop().await;
    assert_eq!(a + b, 2000);
    assert!(a > 0 && b > 0, "both relays worked: {a} and {b}");
    let ids: HashSet<_> = received.iter().map(|r| r.message_id.clone()).collect();
    assert_eq!(ids.len(), 2000, "each message once");
    // Each key's rows carry the numbers 1 to 20, each once, whichever relay numbered and
    // published them: the order consumers restore.
    let mut numbers: HashMap<String, Vec<i64>> = HashMap::new();
    for message in &received {
        let key = match message.header("x-postbox-partition-key") {
            Some(AMQPValue::LongString(k)) => String::from_utf8_lossy(k.as_bytes()).into_owned(),
            other => panic!("partition key header: {other:?}"),
        };
        let seq = match message.header("x-postbox-seq") {
            Some(AMQPValue::LongLongInt(seq)) => *seq,
            other => panic!("sequence header: {other:?}"),
        };
        numbers.entry(key).or_default().push(seq);
    }
    assert_eq!(numbers.len(), 100);
    for (key, mut seqs) in numbers {
        seqs.sort_unstable();
        assert_eq!(seqs, (1..=20).collect::<Vec<i64>>(), "key {key}");
    }
}

fn messages(
    rows: &[postbox::testing::store::outbox::ClaimedRow],
) -> Vec<(postbox::testing::amqp::message::Outgoing, &[u8])> {
    rows.iter()
        .map(|row| {
            (
                postbox::testing::amqp::message::outgoing(row).unwrap(),
                row.payload.as_slice(),
            )
        })
        .collect()
}

/// A batch queued with `publish_in_order` reaches the queue in the order given, each publish
/// confirmed on its own; on a closed channel the first publish fails at once and nothing after
/// it is queued.
#[tokio::test]
async fn publish_in_order_keeps_the_given_order_and_stops_at_a_closed_channel() {
    use postbox::testing::amqp::{confirm_channel, publish_in_order};
    use postbox::testing::store::outbox::ClaimedRow;

    let rabbit = Rabbit::connect().await;
    let queue = rabbit.queue().await;
    let mut inbox = rabbit.consume(&queue).await;
    let channel = confirm_channel(rabbit.connection()).await.unwrap();
    let rows: Vec<ClaimedRow> = (1..=2_000)
        .map(|id| ClaimedRow {
            id,
            message_id: uuid::Uuid::new_v4(),
            exchange: String::new(),
            routing_key: queue.clone(),
            partition_key: Some("one-key".into()),
            seq: Some(id),
            payload: format!("{{\"n\":{id}}}").into_bytes(),
            invalid: None,
            content_type: "application/json".into(),
            headers: Ok(serde_json::json!({})),
            created_at: chrono::Utc::now(),
            attempts: 0,
            source: None,
        })
        .collect();
    let confirms = publish_in_order(&channel, messages(&rows)).await;
    assert_eq!(confirms.len(), rows.len());
    for confirm in confirms {
        let confirmation = confirm.unwrap().await.unwrap();
        assert!(
            matches!(confirmation, lapin::Confirmation::Ack(None)),
            "{confirmation:?}"
        );
    }
    let arrived: Vec<i64> = inbox
        .take(rows.len(), Duration::from_secs(30))
        .await
        .iter()
        .map(|received| received.outbox_id())
        .collect();
    assert_eq!(arrived, (1..=2_000).collect::<Vec<i64>>());

    channel.close(200, "test closes it".into()).await.unwrap();
    let results = publish_in_order(&channel, messages(&rows[..3])).await;
    assert_eq!(results.len(), 1, "nothing is queued after a failed publish");
    assert!(results[0].is_err());
}

/// The broker acks many publishes at once (`multiple`), and lapin hands a basic.return to
/// whichever confirm such an ack resolves first. Returns must still fail exactly the rows that
/// were returned: every unroutable row dead with its reason, every other row published, never
/// the other way round (which would drop an event silently and kill a good one).
#[tokio::test]
async fn unroutable_rows_among_many_fail_alone() {
    const ROWS: usize = 3_000;
    let Stage {
        db,
        rabbit: _rabbit,
        queue,
        mut inbox,
    } = Stage::start().await;
    let missing = format!("{queue}-missing");
    let messages: Vec<Message> = (0..ROWS)
        .map(|n| {
            if n % 97 == 13 {
                Message::text(&missing, format!("nowhere {n}"))
            } else {
                Message::text(&queue, format!("row {n}"))
            }
        })
        .collect();
    let unroutable = (0..ROWS).filter(|n| n % 97 == 13).count();
    postbox::enqueue_many(&db.pool, &messages)
        .await
        .expect("enqueue");
    let mut settings = db.settings();
    settings.relay.max_attempts = 1;
    let relay = RunningRelay::start(settings).await;
    inbox.take(ROWS - unroutable, DEADLINE).await;
    wait_until("every row decided", DEADLINE, || async {
        (db.count("published_at is null and dead_at is null").await == 0).then_some(())
    })
    .await;
    relay.stop().await;
    let dead: Vec<(String, Option<String>)> = sqlx::query_as(
        "select routing_key, last_error from postbox.outbox where dead_at is not null",
    )
    .fetch_all(&db.pool)
    .await
    .expect("dead rows");
    assert_eq!(dead.len(), unroutable, "exactly the unroutable rows died");
    for (routing_key, error) in dead {
        assert_eq!(routing_key, missing, "a routable row died: {error:?}");
        assert!(error.is_some_and(|e| e.contains("NO_ROUTE")));
    }
    let published_unroutable = db
        .count(&format!(
            "routing_key = '{missing}' and published_at is not null"
        ))
        .await;
    assert_eq!(
        published_unroutable, 0,
        "an unroutable row was marked published"
    );
}
