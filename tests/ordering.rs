//! Per-key order from the outbox row to the handler: stream numbers given by the relay, a
//! consumer that applies each stream in number order (holding what arrives early), skip
//! messages for released rows, against the real Postgres and RabbitMQ.

mod common;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use common::{wait_until, RelayProcess, RunningRelay, Subscriber, TestDb};
use lapin::types::{AMQPValue, FieldTable};
use postbox::inbox::{ConsumerHandle, ConsumerOptions, Handler, HandlerError, Incoming};
use postbox::Message;
use sqlx::{Postgres, Transaction};
use uuid::Uuid;

const DEADLINE: Duration = Duration::from_secs(30);
const LONG: Duration = Duration::from_secs(120);

/// A handler that is not idempotent by itself: it adds one to its key's counter, and records
/// the message's number and whether it came right after the key's previous one.
#[derive(Clone, Default)]
struct Counters;

impl Counters {
    async fn install(sub: &Subscriber) -> Self {
        sqlx::query(
            "create table counters (key text primary key, value bigint not null, \
             last_seq bigint not null, out_of_order bigint not null default 0)",
        )
        .execute(&sub.db.pool)
        .await
        .expect("create counters");
        sqlx::query(
            "create table applied (n bigserial primary key, key text, seq bigint, \
             message_id uuid, body text)",
        )
        .execute(&sub.db.pool)
        .await
        .expect("create applied");
        Self
    }
}

impl Handler for Counters {
    async fn handle(
        &self,
        tx: &mut Transaction<'_, Postgres>,
        message: &Incoming,
    ) -> Result<(), HandlerError> {
        let key = message.partition_key().unwrap_or("").to_owned();
        let seq = message.seq().unwrap_or(0);
        sqlx::query(
            "insert into counters as c (key, value, last_seq) values ($1, 1, $2) \
             on conflict (key) do update set value = c.value + 1, last_seq = $2, \
                 out_of_order = c.out_of_order + (c.last_seq <> $2 - 1)::int",
        )
        .bind(&key)
        .bind(seq)
        .execute(&mut **tx)
        .await?;
        sqlx::query("insert into applied (key, seq, message_id, body) values ($1, $2, $3, $4)")
            .bind(&key)
            .bind(seq)
            .bind(message.message_id())
            .bind(message.text().unwrap_or(""))
            .execute(&mut **tx)
            .await?;
        Ok(())
    }
}

/// `(key, seq, body)` in the order applied.
async fn applied(sub: &Subscriber) -> Vec<(String, i64, String)> {
    sqlx::query_as("select key, seq, body from applied order by n")
        .fetch_all(&sub.db.pool)
        .await
        .expect("read applied")
}

/// Headers as the relay sends them for number `seq` of `key`'s stream.
fn numbered(seq: i64, key: &str) -> FieldTable {
    let mut headers = FieldTable::default();
    headers.insert("x-postbox-seq".into(), AMQPValue::LongLongInt(seq));
    headers.insert(
        "x-postbox-partition-key".into(),
        AMQPValue::LongString(key.into()),
    );
    headers.insert(
        "x-postbox-source".into(),
        AMQPValue::LongString("source-1".into()),
    );
    headers
}

fn consumer(sub: &Subscriber, options: ConsumerOptions) -> ConsumerHandle {
    sub.consumer("ordered", Counters, options)
}

/// Waits until the consumer's `applied` table holds `n` rows.
async fn until_applied(sub: &Subscriber, n: i64, deadline: Duration) {
    wait_until(&format!("{n} messages applied"), deadline, || async {
        let count: i64 = sqlx::query_scalar("select count(*) from applied")
            .fetch_one(&sub.db.pool)
            .await
            .expect("count applied");
        (count >= n).then_some(())
    })
    .await;
}

/// Asserts every stream was applied exactly once per number, 1 to n, in number order.
async fn assert_in_order(sub: &Subscriber, expected: &HashMap<String, i64>) {
    let rows = applied(sub).await;
    let mut next: HashMap<&str, i64> = HashMap::new();
    for (key, seq, _) in &rows {
        let want = next.entry(key.as_str()).or_insert(1);
        assert_eq!(
            *seq, *want,
            "key {key}: number {seq} applied when {want} was due"
        );
        *want += 1;
    }
    for (key, n) in expected {
        assert_eq!(
            next.get(key.as_str()).copied(),
            Some(n + 1),
            "key {key}: {n} applied"
        );
    }
    let (stale, out_of_order): (i64, i64) = sqlx::query_as(
        "select (select count(*) from postbox.inbox where outcome = 'stale'), \
                (select coalesce(sum(out_of_order), 0)::bigint from counters)",
    )
    .fetch_one(&sub.db.pool)
    .await
    .expect("stale and out-of-order counts");
    assert_eq!(
        (stale, out_of_order),
        (0, 0),
        "nothing stale, nothing out of order"
    );
}

/// Messages that arrive before their predecessor (a requeued delivery overtaken by a later
/// one, a publish the broker took out of order) are held, visible in SQL, and applied right
/// after the predecessor; nothing is skipped as stale.
#[tokio::test]
async fn a_message_ahead_of_its_turn_is_held_then_applied_right_after_its_predecessor() {
    let sub = Subscriber::start().await;
    Counters::install(&sub).await;
    let ids: Vec<Uuid> = (0..4).map(|_| Uuid::new_v4()).collect();
    let consumer = consumer(&sub, sub.options());
    sub.send(ids[1], numbered(2, "k"), b"second").await;
    sub.send(ids[3], numbered(4, "k"), b"fourth").await;
    let stats = consumer.stats();
    wait_until("two messages held", DEADLINE, || async {
        (stats.waiting() == 2).then_some(())
    })
    .await;
    let (missing, waiting, first_waiting): (i64, i64, i64) = sqlx::query_as(
        "select missing_seq, waiting, first_waiting_seq from postbox.inbox_waiting_streams \
         where consumer = 'ordered' and partition_key = 'k'",
    )
    .fetch_one(&sub.db.pool)
    .await
    .expect("the stream waits, visibly");
    assert_eq!((missing, waiting, first_waiting), (1, 2, 2));
    let (held, oldest) = postbox::testing::store::inbox_streams::waiting(&sub.db.pool, "ordered")
        .await
        .expect("held figures");
    assert_eq!(held, 2);
    assert!(oldest > Duration::ZERO, "{oldest:?}");
    assert_eq!(
        sub.inbox_row("ordered", ids[1]).await.0.as_deref(),
        Some("waiting")
    );
    // A redelivery of a held message is a duplicate, not a second copy held.
    sub.send(ids[1], numbered(2, "k"), b"second").await;
    sub.send(ids[0], numbered(1, "k"), b"first").await;
    until_applied(&sub, 2, DEADLINE).await;
    sub.send(ids[2], numbered(3, "k"), b"third").await;
    until_applied(&sub, 4, DEADLINE).await;
    consumer.stop().await.expect("stop");
    let bodies: Vec<String> = applied(&sub).await.into_iter().map(|(_, _, b)| b).collect();
    assert_eq!(bodies, ["first", "second", "third", "fourth"]);
    assert_in_order(&sub, &HashMap::from([("k".to_string(), 4)])).await;
    let held: i64 = sqlx::query_scalar("select count(*) from postbox.inbox_waiting")
        .fetch_one(&sub.db.pool)
        .await
        .expect("count held");
    assert_eq!(held, 0, "nothing left held");
    assert_eq!(
        sub.inbox_row("ordered", ids[1]).await,
        (Some("applied".into()), 1, 0)
    );
}

/// Batches decide as single runs would: each stream's numbers that follow on are applied in
/// number order in the batch's transaction, later ones held until their turn; duplicates,
/// skips and old numbers are recognized in the batch.
#[tokio::test]
async fn batches_apply_each_stream_in_number_order_and_hold_what_is_ahead() {
    let sub = Subscriber::start().await;
    Counters::install(&sub).await;
    // Three keys, numbers 1 to 12 each, sent shuffled (a fixed permutation); key c's 6 is a
    // skip; and a copy of a's 1.
    let mut sends: Vec<(String, i64, Uuid)> = Vec::new();
    let ids: HashMap<(String, i64), Uuid> = ["a", "b", "c"]
        .iter()
        .flat_map(|k| (1..=12).map(move |seq| ((k.to_string(), seq), Uuid::new_v4())))
        .collect();
    for n in 0..36i64 {
        let permuted = (n * 7) % 36; // 7 is coprime with 36: every message once
        let key = ["a", "b", "c"][(permuted % 3) as usize].to_string();
        let seq = permuted / 3 + 1;
        sends.push((key.clone(), seq, ids[&(key, seq)]));
    }
    sends.push(("a".into(), 1, ids[&("a".to_string(), 1)]));
    for (key, seq, id) in &sends {
        let mut headers = numbered(*seq, key);
        if key == "c" && *seq == 6 {
            headers.insert(
                "x-postbox-skip".into(),
                AMQPValue::LongString("gone".into()),
            );
        }
        sub.send(*id, headers, format!("{key}{seq}").as_bytes())
            .await;
    }
    let options = sub.options().batch_size(16).concurrency(1);
    let consumer = consumer(&sub, options);
    until_applied(&sub, 35, DEADLINE).await;
    let stats = consumer.stats();
    wait_until("the duplicate and the skip counted", DEADLINE, || async {
        (stats.duplicates() == 1 && stats.skipped() == 1).then_some(())
    })
    .await;
    consumer.stop().await.expect("stop");
    println!("{} held in batches or single runs", stats.waiting());
    assert!(stats.waiting() > 0, "some arrived ahead of their turn");
    let rows = applied(&sub).await;
    assert_eq!(rows.len(), 35);
    let mut next: HashMap<String, i64> = HashMap::new();
    for (key, seq, _) in rows {
        let want = next.entry(key.clone()).or_insert(1);
        if key == "c" && *want == 6 {
            *want = 7; // the skip
        }
        assert_eq!(seq, *want, "key {key}");
        *want += 1;
    }
}

/// A consumer with state semantics (no stream order) never hands a skip message to its
/// handler, singly or in batches: recorded as skipped.
#[tokio::test]
async fn skip_messages_never_reach_a_handler_whatever_the_versioning() {
    let sub = Subscriber::start().await;
    Counters::install(&sub).await;
    for batch_size in [1, 16] {
        let options = sub
            .options()
            .versioning(postbox::inbox::Versioning::OutboxId)
            .batch_size(batch_size);
        let consumer = consumer(&sub, options);
        let mut headers = numbered(1, "k");
        headers.insert(
            "x-postbox-skip".into(),
            AMQPValue::LongString("gone".into()),
        );
        sub.send(Uuid::new_v4(), headers, b"").await;
        let stats = consumer.stats();
        wait_until("the skip recorded", DEADLINE, || async {
            (stats.skipped() == 1).then_some(())
        })
        .await;
        consumer.stop().await.expect("stop");
    }
    assert!(applied(&sub).await.is_empty(), "no handler ran");
}

/// A held message whose stored properties cannot be read back is dead-lettered with its body
/// (nothing is lost), and its stream goes on past it.
#[tokio::test]
async fn an_unreadable_held_message_is_dead_lettered_and_its_stream_goes_on() {
    let mut sub = Subscriber::start().await;
    Counters::install(&sub).await;
    let broken = Uuid::new_v4();
    sqlx::query(
        "insert into postbox.inbox (consumer, message_id, queue, outcome, version) \
         values ('ordered', $1, $2, 'waiting', 2)",
    )
    .bind(broken)
    .bind(&sub.queue)
    .execute(&sub.db.pool)
    .await
    .expect("held inbox row");
    sqlx::query(
        "insert into postbox.inbox_waiting (consumer, source, partition_key, exchange, \
             routing_key, seq, message_id, queue, properties, payload) \
         values ('ordered', 'source-1', 'k', '', $1, 2, $2, $1, 'not json', 'the body')",
    )
    .bind(&sub.queue)
    .bind(broken)
    .execute(&sub.db.pool)
    .await
    .expect("held message");
    let consumer = consumer(&sub, sub.options());
    sub.send(Uuid::new_v4(), numbered(1, "k"), b"first").await;
    sub.send(Uuid::new_v4(), numbered(3, "k"), b"third").await;
    until_applied(&sub, 2, DEADLINE).await;
    let dead = sub.dead_letters.take(1, DEADLINE).await;
    consumer.stop().await.expect("stop");
    assert_eq!(
        dead[0].message_id.as_deref(),
        Some(broken.to_string().as_str())
    );
    assert_eq!(dead[0].payload, b"the body");
    let seqs: Vec<i64> = applied(&sub)
        .await
        .into_iter()
        .map(|(_, seq, _)| seq)
        .collect();
    assert_eq!(seqs, [1, 3]);
    assert_eq!(
        sub.inbox_row("ordered", broken).await.0.as_deref(),
        Some("dead_lettered")
    );
}

/// A number at or below the last applied: the same message again is a duplicate; another
/// message with an old number (a replay of old positions) is stale, never applied.
#[tokio::test]
async fn old_numbers_are_duplicates_or_stale_never_applied_twice() {
    let sub = Subscriber::start().await;
    Counters::install(&sub).await;
    let consumer = consumer(&sub, sub.options());
    let first = Uuid::new_v4();
    sub.send(first, numbered(1, "k"), b"first").await;
    sub.send(Uuid::new_v4(), numbered(2, "k"), b"second").await;
    until_applied(&sub, 2, DEADLINE).await;
    sub.send(first, numbered(1, "k"), b"first").await;
    let replayed = Uuid::new_v4();
    sub.send(replayed, numbered(1, "k"), b"replayed").await;
    let stats = consumer.stats();
    wait_until("a duplicate and a stale message", DEADLINE, || async {
        (stats.duplicates() == 1 && stats.stale() == 1).then_some(())
    })
    .await;
    consumer.stop().await.expect("stop");
    assert_eq!(applied(&sub).await.len(), 2);
    assert_eq!(
        sub.inbox_row("ordered", replayed).await.0.as_deref(),
        Some("stale")
    );
}

/// A consumer that joins a stream midway never receives its early numbers: after
/// `stream_start_wait` the stream starts at the lowest number it holds.
#[tokio::test]
async fn a_stream_joined_midway_starts_after_the_start_wait() {
    let sub = Subscriber::start().await;
    Counters::install(&sub).await;
    let options = sub.options().stream_start_wait(Duration::from_millis(300));
    let consumer = consumer(&sub, options);
    sub.send(Uuid::new_v4(), numbered(8, "joined"), b"eighth")
        .await;
    sub.send(Uuid::new_v4(), numbered(7, "joined"), b"seventh")
        .await;
    until_applied(&sub, 2, DEADLINE).await;
    consumer.stop().await.expect("stop");
    let rows: Vec<i64> = applied(&sub)
        .await
        .into_iter()
        .map(|(_, seq, _)| seq)
        .collect();
    assert_eq!(rows, [7, 8]);
}

/// A producer, its relay and a consumer, each with its own database.
struct Pipeline {
    outbox: TestDb,
    sub: Subscriber,
}

impl Pipeline {
    async fn start() -> Self {
        let outbox = TestDb::migrated().await;
        let sub = Subscriber::start().await;
        Counters::install(&sub).await;
        Self { outbox, sub }
    }

    fn event(&self, key: &str, body: impl Into<String>) -> Message {
        Message::text(self.sub.queue.as_str(), body.into()).partition_key(key)
    }
}

/// Two transactions write events of one key and commit in the other order of their ids: the
/// one committed first is numbered first and applied first; neither is skipped.
#[tokio::test]
async fn two_commits_on_one_key_against_their_id_order_are_applied_in_commit_order() {
    let pipeline = Pipeline::start().await;
    let relay = RunningRelay::start(pipeline.outbox.settings()).await;
    let consumer = consumer(&pipeline.sub, pipeline.sub.options());
    let mut early = pipeline.outbox.pool.begin().await.expect("begin");
    postbox::enqueue(
        &mut *early,
        &pipeline.event("k", "id drawn first, committed second"),
    )
    .await
    .expect("enqueue");
    postbox::enqueue(
        &pipeline.outbox.pool,
        &pipeline.event("k", "id drawn second, committed first"),
    )
    .await
    .expect("enqueue");
    until_applied(&pipeline.sub, 1, DEADLINE).await;
    early.commit().await.expect("commit");
    until_applied(&pipeline.sub, 2, DEADLINE).await;
    consumer.stop().await.expect("stop");
    relay.stop().await;
    let bodies: Vec<String> = applied(&pipeline.sub)
        .await
        .into_iter()
        .map(|(_, _, body)| body)
        .collect();
    assert_eq!(
        bodies,
        [
            "id drawn second, committed first",
            "id drawn first, committed second"
        ]
    );
    assert_in_order(&pipeline.sub, &HashMap::from([("k".to_string(), 2)])).await;
}

/// A row the relay gives up on holds its stream at the consumers (parking) until released;
/// released, a skip message with its number lets them go on, and the inbox records the skip.
/// With parking off the skip goes out at once.
async fn a_released_row_lets_its_stream_go_on(park: bool) {
    let pipeline = Pipeline::start().await;
    let mut settings = pipeline.outbox.settings();
    settings.relay.max_message_bytes = 1_000;
    settings.relay.dead_rows_park_keys = park;
    let relay = RunningRelay::start(settings).await;
    let consumer = consumer(&pipeline.sub, pipeline.sub.options());
    let rows = postbox::enqueue_many(
        &pipeline.outbox.pool,
        &[
            pipeline.event("k", "x".repeat(2_000)),
            pipeline.event("k", "after the dead one"),
            pipeline.event("k", "and another"),
        ],
    )
    .await
    .expect("enqueue");
    let dead_id = rows[0].id.expect("new row");
    let stats = consumer.stats();
    if park {
        wait_until("the later rows held at the consumer", DEADLINE, || async {
            (stats.waiting() == 2).then_some(())
        })
        .await;
        assert_eq!(
            applied(&pipeline.sub).await.len(),
            0,
            "parked: nothing applied yet"
        );
        let released = postbox::testing::store::operations::release_dead(
            &pipeline.outbox.pool,
            Some(&[dead_id]),
            None,
        )
        .await
        .expect("release");
        assert_eq!(released, vec![dead_id]);
    }
    until_applied(&pipeline.sub, 2, DEADLINE).await;
    wait_until("the skip recorded", DEADLINE, || async {
        (stats.skipped() == 1).then_some(())
    })
    .await;
    consumer.stop().await.expect("stop");
    relay.stop().await;
    let seqs: Vec<i64> = applied(&pipeline.sub)
        .await
        .into_iter()
        .map(|(_, seq, _)| seq)
        .collect();
    assert_eq!(seqs, [2, 3]);
    let skipped: Vec<(Option<i64>, Option<String>)> = sqlx::query_as(
        "select version, partition_key from postbox.inbox \
         where consumer = 'ordered' and outcome = 'skipped'",
    )
    .fetch_all(&pipeline.sub.db.pool)
    .await
    .expect("skip rows");
    assert_eq!(
        skipped,
        vec![(Some(1), Some("k".to_string()))],
        "the skipped number"
    );
    let (released, skips): (i64, i64) = sqlx::query_as(
        "select (select count(*) from postbox.outbox where released_at is not null), \
                (select count(*) from postbox.outbox_skips where published_at is not null)",
    )
    .fetch_one(&pipeline.outbox.pool)
    .await
    .expect("outbox state");
    assert_eq!((released, skips), (1, 1));
}

#[tokio::test]
async fn a_parked_row_holds_its_stream_until_released_then_the_stream_goes_on() {
    a_released_row_lets_its_stream_go_on(true).await;
}

#[tokio::test]
async fn without_parking_a_dead_row_is_skipped_at_once() {
    a_released_row_lets_its_stream_go_on(false).await;
}

/// The broker refuses some of a key's publishes (a full queue with `reject-publish`) while it
/// takes later ones: the refused rows are retried, and the consumer applies every message once,
/// in number order, holding the later ones until the retried ones arrive.
#[tokio::test]
async fn publishes_the_broker_refuses_mid_stream_are_applied_in_order_once_retried() {
    const ROWS: i64 = 300;
    let outbox = TestDb::migrated().await;
    let sub = Subscriber::start_with_queue_arguments(&[
        ("x-max-length", AMQPValue::LongInt(5)),
        ("x-overflow", AMQPValue::LongString("reject-publish".into())),
    ])
    .await;
    Counters::install(&sub).await;
    let messages: Vec<Message> = (0..ROWS)
        .map(|n| Message::text(sub.queue.as_str(), n.to_string()).partition_key("k"))
        .collect();
    postbox::enqueue_many(&outbox.pool, &messages)
        .await
        .expect("enqueue");
    let options = sub.options().prefetch(1);
    let consumer = consumer(&sub, options);
    let mut settings = outbox.settings();
    settings.relay.batch_size = 50;
    settings.relay.retry_initial_delay = Duration::from_millis(20);
    settings.relay.retry_max_delay = Duration::from_millis(200);
    settings.relay.max_attempts = 1_000;
    let relay = RunningRelay::start(settings).await;
    until_applied(&sub, ROWS, LONG).await;
    let stats = consumer.stats();
    consumer.stop().await.expect("stop");
    relay.stop().await;
    let refused = outbox.count("attempts > 0").await;
    println!(
        "{refused} rows refused at least once; {} held at the consumer",
        stats.waiting()
    );
    assert!(refused > 0, "the broker refused some publishes");
    assert!(
        stats.waiting() > 0,
        "later messages arrived before refused ones"
    );
    assert_in_order(&sub, &HashMap::from([("k".to_string(), ROWS)])).await;
}

/// Two instances of one consumer share a queue; one dies mid-stream (its connections cut,
/// then stopped). Over 100 keys, a handler that adds to counters ends with exact counts, each
/// key's messages applied in number order.
#[tokio::test]
async fn two_instances_one_dying_keep_counters_exact_and_in_order() {
    const KEYS: i64 = 100;
    const PER_KEY: i64 = 30;
    let pipeline = Pipeline::start().await;
    let sub = &pipeline.sub;
    let pg = common::proxy::Proxy::tcp(&common::host_port(&sub.db.url)).await;
    let amqp = common::proxy::Proxy::tcp(&common::host_port(&common::amqp_url())).await;
    let doomed_pool = sqlx::PgPool::connect(&pg.redirect(&sub.db.url))
        .await
        .expect("pool through the proxy");
    let options = sub.options().concurrency(4).prefetch(32);
    let doomed = sub.consumer_via(
        doomed_pool,
        &amqp.redirect(&common::amqp_url()),
        "ordered",
        Counters,
        options.clone(),
    );
    let survivor = sub.consumer("ordered", Counters, options);
    let messages: Vec<Message> = (0..KEYS * PER_KEY)
        .map(|n| pipeline.event(&format!("key-{}", n % KEYS), n.to_string()))
        .collect();
    for chunk in messages.chunks(100) {
        postbox::enqueue_many(&pipeline.outbox.pool, chunk)
            .await
            .expect("enqueue");
    }
    let relay = RunningRelay::start(pipeline.outbox.settings()).await;
    until_applied(sub, KEYS * PER_KEY / 4, LONG).await;
    pg.cut();
    amqp.cut();
    doomed.stop().await.expect("stop the dying instance");
    until_applied(sub, KEYS * PER_KEY, LONG).await;
    // Anything more would be a second effect.
    tokio::time::sleep(Duration::from_millis(300)).await;
    survivor.stop().await.expect("stop");
    relay.stop().await;
    let expected: HashMap<String, i64> = (0..KEYS).map(|k| (format!("key-{k}"), PER_KEY)).collect();
    assert_in_order(sub, &expected).await;
    let wrong: i64 = sqlx::query_scalar("select count(*) from counters where value <> $1")
        .bind(PER_KEY)
        .fetch_one(&sub.db.pool)
        .await
        .expect("counters");
    assert_eq!(wrong, 0, "every counter exact");
}

/// Four writers interleave transactions on four keys; three relay processes share the outbox
/// and one is SIGKILLed mid-stream. Every event is applied once, each key in number order,
/// none stale, and each writer's events on a key in the order it committed them.
#[tokio::test]
async fn interleaving_writers_and_a_killed_relay_lose_reorder_and_double_nothing() {
    const WRITERS: i64 = 4;
    const TRANSACTIONS: i64 = 150;
    let pipeline = Arc::new(Pipeline::start().await);
    let small_batches = [("POSTBOX_RELAY__BATCH_SIZE", "20")];
    let mut relays: Vec<RelayProcess> = (0..3)
        .map(|_| RelayProcess::spawn(&pipeline.outbox.url, &small_batches))
        .collect();
    let consumer = consumer(&pipeline.sub, pipeline.sub.options().concurrency(4));
    let writers: Vec<_> = (0..WRITERS)
        .map(|writer| {
            let pipeline = pipeline.clone();
            tokio::spawn(async move {
                for t in 0..TRANSACTIONS {
                    // Each transaction writes to two of the four keys, so concurrent
                    // transactions of different writers meet on every key.
                    let keys = [(writer + t) % 4, (writer + t + 1) % 4];
                    let messages: Vec<Message> = keys
                        .iter()
                        .map(|k| {
                            let body = serde_json::json!({ "writer": writer, "t": t }).to_string();
                            pipeline.event(&format!("key-{k}"), body)
                        })
                        .collect();
                    let mut tx = pipeline.outbox.pool.begin().await.expect("begin");
                    postbox::enqueue_many(&mut *tx, &messages)
                        .await
                        .expect("enqueue");
                    tx.commit().await.expect("commit");
                }
            })
        })
        .collect();
    until_applied(&pipeline.sub, WRITERS * TRANSACTIONS / 2, LONG).await;
    relays.remove(0).kill();
    for writer in writers {
        writer.await.expect("writer");
    }
    let total = WRITERS * TRANSACTIONS * 2;
    until_applied(&pipeline.sub, total, LONG).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    consumer.stop().await.expect("stop");
    for relay in relays {
        assert_eq!(relay.stop(LONG).await, Some(0));
    }
    let rows = applied(&pipeline.sub).await;
    assert_eq!(rows.len() as i64, total, "each event applied once");
    let mut per_key: HashMap<String, i64> = HashMap::new();
    for (key, _, _) in &rows {
        *per_key.entry(key.clone()).or_default() += 1;
    }
    assert_in_order(&pipeline.sub, &per_key).await;
    let mut last: HashMap<(String, i64), i64> = HashMap::new();
    for (key, _, body) in rows {
        let body: serde_json::Value = serde_json::from_str(&body).expect("json");
        let (writer, t) = (
            body["writer"].as_i64().expect("w"),
            body["t"].as_i64().expect("t"),
        );
        let previous = last.insert((key.clone(), writer), t);
        assert!(
            previous < Some(t),
            "{key}: writer {writer}'s {t} after {previous:?}"
        );
    }
}

/// Applies the migrations of `dir` (one of postbox's parts) older than `before`, as an
/// installation from before that migration has them.
async fn migrate_before(
    pool: &sqlx::PgPool,
    mut migrator: sqlx::migrate::Migrator,
    table: &'static str,
    before: i64,
) {
    let older: Vec<_> = migrator
        .migrations
        .iter()
        .filter(|migration| migration.version < before)
        .cloned()
        .collect();
    migrator.migrations = std::borrow::Cow::Owned(older);
    migrator.create_schema("postbox");
    migrator.dangerous_set_table_name(table);
    migrator.run(pool).await.expect("migrate the older schema");
}

/// An installation from before stream numbers upgrades in place: rows pending then are
/// numbered and published by the new relay, a consumer whose inbox holds versions from before
/// applies them in order, and the older tables keep their rows.
#[tokio::test]
async fn an_installation_from_before_stream_numbers_upgrades_in_place() {
    let outbox = TestDb::empty().await;
    migrate_before(
        &outbox.pool,
        sqlx::migrate!("./migrations/outbox"),
        "postbox._migrations_outbox",
        20261204000001,
    )
    .await;
    let sub = Subscriber::start_with_queue_arguments(&[]).await;
    // The subscriber's database as an older consumer left it: rebuilt at the older schema, with
    // a version row and an applied message.
    sqlx::query("drop schema postbox cascade")
        .execute(&sub.db.pool)
        .await
        .expect("drop the new inbox schema");
    migrate_before(
        &sub.db.pool,
        sqlx::migrate!("./migrations/inbox"),
        "postbox._migrations_inbox",
        20261204000101,
    )
    .await;
    sqlx::raw_sql(
        "insert into postbox.inbox_versions (consumer, source, partition_key, version, message_id) \
         values ('ordered', '', 'k', 41, gen_random_uuid()); \
         insert into postbox.inbox (consumer, message_id, queue, outcome, processed_at) \
         values ('ordered', gen_random_uuid(), 'q', 'applied', now())",
    )
    .execute(&sub.db.pool)
    .await
    .expect("older inbox rows");
    Counters::install(&sub).await;
    // Written by producers before the upgrade: plain SQL, keyed, pending.
    for n in 0..5 {
        sqlx::query(
            "insert into postbox.outbox (routing_key, payload, partition_key) values ($1, $2, 'k')",
        )
        .bind(&sub.queue)
        .bind(format!("before {n}"))
        .execute(&outbox.pool)
        .await
        .expect("older row");
    }

    postbox::migrate(&outbox.pool)
        .await
        .expect("upgrade the outbox");
    postbox::migrate_parts(&sub.db.pool, &[postbox::Part::Inbox])
        .await
        .expect("upgrade the inbox");
    let relay = RunningRelay::start(outbox.settings()).await;
    let consumer = consumer(&sub, sub.options());
    until_applied(&sub, 5, DEADLINE).await;
    consumer.stop().await.expect("stop");
    relay.stop().await;
    let bodies: Vec<String> = applied(&sub).await.into_iter().map(|(_, _, b)| b).collect();
    assert_eq!(
        bodies,
        (0..5).map(|n| format!("before {n}")).collect::<Vec<_>>()
    );
    assert_in_order(&sub, &HashMap::from([("k".to_string(), 5)])).await;
    let kept: i64 = sqlx::query_scalar(
        "select (select count(*) from postbox.inbox_versions) \
              + (select count(*) from postbox.inbox where queue = 'q')",
    )
    .fetch_one(&sub.db.pool)
    .await
    .expect("older rows");
    assert_eq!(kept, 2, "the older tables keep their rows");
}
