//! The fault suite: faults injected at the relay against the real Postgres and RabbitMQ
//! (connections cut or stalled through a TCP proxy, relay processes killed or paused), then
//! the checker compares what arrived with what was committed. Each scenario prints its counts
//! (`cargo test --test faults -- --nocapture` shows them).

mod common;

use std::time::Duration;

use common::checker::{assert_settled, in_flight_rows, Committed};
use common::proxy::Proxy;
use common::{
    admin_database_url, amqp_url, host_port, wait_until, Inbox, Rabbit, Received, RelayProcess,
    RunningRelay, Stage, TestDb,
};
use postbox::Message;

const LONG: Duration = Duration::from_secs(120);

/// A migrated database, a queue with a consumer, and `rows` events committed over `keys` keys.
struct Scenario {
    db: TestDb,
    /// Owns the test's exclusive queue.
    rabbit: Rabbit,
    inbox: Inbox,
    committed: Committed,
}

impl Scenario {
    async fn start(rows: usize, keys: usize) -> Self {
        let Stage {
            db,
            rabbit,
            queue,
            inbox,
        } = Stage::start().await;
        let committed = backlog(&db, &queue, rows, keys).await;
        Self {
            db,
            rabbit,
            inbox,
            committed,
        }
    }
}

/// Commits `rows` events to `queue` over `keys` partition keys, every tenth row unkeyed.
async fn backlog(db: &TestDb, queue: &str, rows: usize, keys: usize) -> Committed {
    let messages: Vec<Message> = (0..rows)
        .map(|n| {
            let message = Message::text(queue, n.to_string());
            if n % 10 == 9 {
                message
            } else {
                message.partition_key(format!("key-{}", n % keys))
            }
        })
        .collect();
    for chunk in messages.chunks(5_000) {
        postbox::enqueue_many(&db.pool, chunk)
            .await
            .expect("commit backlog");
    }
    Committed::read(db).await
}

async fn published(db: &TestDb) -> i64 {
    db.count("published_at is not null").await
}

/// Waits until at least `n` rows are marked published.
async fn published_at_least(db: &TestDb, n: i64) {
    wait_until(&format!("{n} rows published"), LONG, || async {
        (published(db).await >= n).then_some(())
    })
    .await;
}

/// Everything committed, received at least once, plus whatever duplicates trail in.
async fn receive_all(
    inbox: &mut Inbox,
    committed: &Committed,
    mut so_far: Vec<Received>,
) -> Vec<Received> {
    let mut missing = committed.ids();
    for received in &so_far {
        if let Some(id) = &received.message_id {
            missing.remove(id);
        }
    }
    so_far.extend(inbox.until_all(&missing, LONG).await);
    so_far
}

/// Relay settings for the process-based scenarios: small batches, so a kill lands mid-stream.
const SMALL_BATCHES: &[(&str, &str)] = &[("POSTBOX_RELAY__BATCH_SIZE", "50")];

fn small_batch_settings(db: &TestDb) -> postbox::RelayOptions {
    let mut settings = db.settings().relay;
    settings.batch_size = 50;
    settings
}

#[tokio::test]
async fn broker_connection_cut_mid_batch_repeatedly() {
    const ROWS: usize = 6_000;
    const CUTS: usize = 5;
    let Scenario {
        db,
        rabbit: _rabbit,
        mut inbox,
        committed,
    } = Scenario::start(ROWS, 50).await;
    let broker = Proxy::tcp(&host_port(&amqp_url())).await;
    let mut settings = db.settings();
    settings.amqp_url = broker.redirect(&amqp_url());
    settings.relay.batch_size = 100;
    let relay = RunningRelay::start(settings.clone()).await;

    for cut in 1..=CUTS {
        published_at_least(&db, (cut * ROWS / (CUTS + 1)) as i64).await;
        broker.cut();
    }
    let received = receive_all(&mut inbox, &committed, Vec::new()).await;
    assert_eq!(assert_settled(&db, LONG).await, 0, "no row died");
    let released = relay.stats.released();
    relay.stop().await;
    committed.check(&received).assert_sound(
        "broker connection cut 5x mid-batch",
        CUTS * in_flight_rows(&settings.relay),
    );
    // Rows in flight when a cut lands are given back unmarked: none means no cut hit a batch.
    assert!(released > 0, "no cut landed while rows were in flight");
    println!("rows released unmarked by the cuts: {released}");
}

#[tokio::test]
async fn database_connection_cut_between_publish_and_mark() {
    const ROWS: usize = 4_000;
    const CUTS: usize = 3;
    // Many keys, so claims run ahead of the publisher: batches claimed before the stall are
    // published during it, and their marks hang.
    let Scenario {
        db,
        rabbit: _rabbit,
        mut inbox,
        committed,
    } = Scenario::start(ROWS, 1_000).await;
    let postgres = Proxy::start(host_port(&admin_database_url())).await;
    let mut settings = db.settings();
    settings.database_url = postgres.url_for(&db.url);
    settings.relay.batch_size = 100;
    let relay = RunningRelay::start(settings.clone()).await;

    let mut received = Vec::new();
    for cut in 1..=CUTS {
        published_at_least(&db, (cut * ROWS / (CUTS + 2)) as i64).await;
        // Stall Postgres so marks hang while publishes and confirms go on; cut once the
        // consumer holds a message whose row is not marked: the fault lands exactly between
        // the broker's confirm and the mark.
        let mut landed = false;
        for _ in 0..10 {
            postgres.stall();
            landed = delivered_but_unmarked(&db, &mut inbox, &mut received).await;
            if landed {
                break;
            }
            // Nothing was in flight: let the relay make progress, then try again.
            postgres.resume();
            published_at_least(&db, published(&db).await + 1).await;
        }
        assert!(landed, "never caught a delivered row unmarked");
        postgres.cut();
    }
    let received = receive_all(&mut inbox, &committed, received).await;
    assert_eq!(assert_settled(&db, LONG).await, 0, "no row died");
    relay.stop().await;
    let report = committed.check(&received);
    report.assert_sound(
        "Postgres cut 3x between publish and mark",
        CUTS * in_flight_rows(&settings.relay),
    );
    assert!(
        report.duplicates > 0,
        "rows delivered but not marked are published again"
    );
}

/// Collects arrivals for up to 5 s until one of them is a row not marked published.
async fn delivered_but_unmarked(
    db: &TestDb,
    inbox: &mut Inbox,
    received: &mut Vec<Received>,
) -> bool {
    let until = tokio::time::Instant::now() + Duration::from_secs(5);
    while tokio::time::Instant::now() < until {
        let new = inbox.received_so_far();
        let ids: Vec<uuid::Uuid> = new
            .iter()
            .filter_map(|r| r.message_id.as_deref()?.parse().ok())
            .collect();
        received.extend(new);
        let unmarked: i64 = sqlx::query_scalar(
            "select count(*) from postbox.outbox where published_at is null and message_id = any($1)",
        )
        .bind(&ids)
        .fetch_one(&db.pool)
        .await
        .expect("count unmarked");
        if unmarked > 0 {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    false
}

#[tokio::test]
async fn relay_killed_mid_batch_twenty_times() {
    const ROWS: usize = 20_000;
    const KILLS: usize = 20;
    let Scenario {
        db,
        rabbit: _rabbit,
        mut inbox,
        committed,
    } = Scenario::start(ROWS, 100).await;

    let mut before = 0;
    for _ in 0..KILLS {
        let relay = RelayProcess::spawn(&db.url, SMALL_BATCHES);
        published_at_least(&db, before + 1).await;
        relay.kill();
        before = published(&db).await;
    }
    assert!(
        before < ROWS as i64,
        "the backlog ran out before the last kill; the kills were not mid-stream"
    );
    println!("published across {KILLS} killed relays: {before} of {ROWS}");
    let last = RelayProcess::spawn(&db.url, SMALL_BATCHES);
    let received = receive_all(&mut inbox, &committed, Vec::new()).await;
    assert_eq!(assert_settled(&db, LONG).await, 0, "no row died");
    assert_eq!(last.stop(LONG).await, Some(0));
    committed.check(&received).assert_sound(
        "relay SIGKILLed 20x mid-batch",
        KILLS * in_flight_rows(&small_batch_settings(&db)),
    );
}

/// `relays` relays share 10,000 events over 100 keys; one of them is killed mid-stream.
async fn relays_race_and_one_is_killed(relays: usize) {
    const ROWS: usize = 10_000;
    let Scenario {
        db,
        rabbit: _rabbit,
        mut inbox,
        committed,
    } = Scenario::start(ROWS, 100).await;

    let mut running: Vec<RelayProcess> = (0..relays)
        .map(|_| RelayProcess::spawn(&db.url, SMALL_BATCHES))
        .collect();
    published_at_least(&db, ROWS as i64 / 4).await;
    running.remove(0).kill();
    let received = receive_all(&mut inbox, &committed, Vec::new()).await;
    assert_eq!(assert_settled(&db, LONG).await, 0, "no row died");
    for relay in running {
        assert_eq!(relay.stop(LONG).await, Some(0));
    }
    committed.check(&received).assert_sound(
        &format!("{relays} relays racing, one SIGKILLed"),
        in_flight_rows(&small_batch_settings(&db)),
    );
}

#[tokio::test]
async fn two_relays_race_and_one_is_killed() {
    relays_race_and_one_is_killed(2).await;
}

#[tokio::test]
async fn three_relays_race_and_one_is_killed() {
    relays_race_and_one_is_killed(3).await;
}

#[tokio::test]
async fn a_paused_relay_loses_its_rows_after_the_takeover_timeout_and_cannot_mark_them() {
    const ROWS: usize = 3_000;
    let Scenario {
        db,
        rabbit: _rabbit,
        mut inbox,
        committed,
    } = Scenario::start(ROWS, 30).await;
    let env = [
        ("POSTBOX_RELAY__BATCH_SIZE", "50"),
        ("POSTBOX_RELAY__CONFIRM_TIMEOUT", "1s"),
        ("POSTBOX_RELAY__TAKEOVER_TIMEOUT", "3s"),
    ];

    let paused = RelayProcess::spawn(&db.url, &env);
    let mut held = 0;
    for _ in 0..50 {
        published_at_least(&db, published(&db).await + 1).await;
        paused.pause();
        held = db.locked_rows().await;
        if held > 0 {
            break;
        }
        paused.resume();
    }
    assert!(held > 0, "never paused the relay while it held rows");
    let paused_at = std::time::Instant::now();
    let other = RelayProcess::spawn(&db.url, &env);
    let received = receive_all(&mut inbox, &committed, Vec::new()).await;
    println!(
        "paused relay held {held} rows; all delivered {:.1}s after the pause",
        paused_at.elapsed().as_secs_f64()
    );
    assert_eq!(assert_settled(&db, LONG).await, 0, "no row died");
    let marks: Vec<(i64, chrono::DateTime<chrono::Utc>)> =
        sqlx::query_as("select id, published_at from postbox.outbox order by id")
            .fetch_all(&db.pool)
            .await
            .expect("read marks");

    // The paused relay wakes up holding claims that Postgres ended: it may publish what it
    // had in hand (duplicates), but none of its marks can land.
    paused.resume();
    assert_eq!(paused.stop(LONG).await, Some(0));
    let after: Vec<(i64, chrono::DateTime<chrono::Utc>)> =
        sqlx::query_as("select id, published_at from postbox.outbox order by id")
            .fetch_all(&db.pool)
            .await
            .expect("read marks");
    assert_eq!(marks, after, "a relay whose claim expired changed a mark");
    assert_eq!(other.stop(LONG).await, Some(0));
    committed.check(&received).assert_sound(
        "relay paused past the takeover timeout",
        in_flight_rows(&small_batch_settings(&db)),
    );
}

/// Commits `messages` in one transaction; returns their outbox ids.
async fn commit(db: &TestDb, messages: &[Message]) -> Vec<i64> {
    postbox::enqueue_many(&db.pool, messages)
        .await
        .expect("commit")
        .iter()
        .map(|e| e.id.expect("new row"))
        .collect()
}

#[tokio::test]
async fn rows_the_broker_would_refuse_die_alone_with_their_reason() {
    let Stage {
        db,
        rabbit: _rabbit,
        queue,
        mut inbox,
    } = Stage::start().await;
    let big_header = serde_json::json!("x".repeat(300_000));
    let messages = vec![
        // larger than relay.max_message_bytes below
        Message::text(&queue, "y".repeat(2_000)).partition_key("too-big"),
        Message::text(&queue, "after the big one").partition_key("too-big"),
        // a header far beyond the broker's frame size
        Message::text(&queue, "{}").header("blob", big_header),
        Message::text(&queue, "fine").partition_key("fine"),
        // headers nested deeper than the relay's JSON parser goes (Postgres takes them)
        Message::text(&queue, "{}").header(
            "deep",
            (0..200).fold(serde_json::json!(1), |inner, _| serde_json::json!([inner])),
        ),
    ];
    let mut ids = commit(&db, &messages).await;
    // A header name beyond AMQP's 255 bytes, written in SQL (the Rust API refuses it).
    let header_name: i64 = sqlx::query_scalar(
        "insert into postbox.outbox (routing_key, payload, headers) \
         values ($1, '{}', jsonb_build_object(repeat('n', 300), 1)) returning id",
    )
    .bind(&queue)
    .fetch_one(&db.pool)
    .await
    .expect("insert");
    ids.insert(3, header_name);
    let mut settings = db.settings();
    settings.relay.max_message_bytes = 1_000;
    let relay = RunningRelay::start(settings).await;

    // The row after the oversized one in its stream goes out with the next number: consumers
    // hold it until the dead row is released or retried.
    let mut arrived: Vec<(i64, Option<i64>)> = inbox
        .take(2, LONG)
        .await
        .iter()
        .map(|received| (received.outbox_id(), received.seq()))
        .collect();
    arrived.sort_unstable();
    assert_eq!(arrived, vec![(ids[1], Some(2)), (ids[4], Some(1))]);
    wait_until("the four refused rows to die", LONG, || async {
        (db.count("dead_at is not null").await == 4).then_some(())
    })
    .await;
    let dead: Vec<(i64, i32, String)> = sqlx::query_as(
        "select id, attempts, last_error from postbox.outbox where dead_at is not null order by id",
    )
    .fetch_all(&db.pool)
    .await
    .expect("dead rows");
    let reasons = [
        (ids[0], "relay.max_message_bytes"),
        (ids[2], "frame_max"),
        (ids[5], "headers cannot be read"),
        (ids[3], "header name"),
    ];
    for ((id, attempts, error), (expected_id, reason)) in dead.iter().zip(reasons) {
        assert_eq!(*id, expected_id);
        assert_eq!(*attempts, 1, "refused at once, not retried: {error}");
        assert!(error.contains(reason), "row {id}: {error}");
    }
    // The oversized row parks its stream (no skip message is sent for it); the relay carries
    // on: a row committed later is published, and only then is the absence of a skip more
    // than timing.
    let later = commit(&db, &[Message::text(&queue, "later")]).await;
    assert_eq!(inbox.take(1, LONG).await[0].outbox_id(), later[0]);
    assert_eq!(
        db.count(&format!("id = {} and released_at is null", ids[0]))
            .await,
        1,
        "the dead row parks its stream"
    );
    assert!(
        inbox.drain_for(Duration::from_millis(300)).await.is_empty(),
        "nothing else was published"
    );
    relay.stop().await;
}

#[tokio::test]
async fn the_relay_fails_over_to_the_next_broker_node() {
    const ROWS: usize = 3_000;
    let Scenario {
        db,
        rabbit: _rabbit,
        mut inbox,
        committed,
    } = Scenario::start(ROWS, 30).await;
    // Two "nodes": proxies in front of the one broker.
    let first = Proxy::tcp(&host_port(&amqp_url())).await;
    let second = Proxy::tcp(&host_port(&amqp_url())).await;
    let mut settings = db.settings();
    settings.amqp_url = format!(
        "{}, {}",
        first.redirect(&amqp_url()),
        second.redirect(&amqp_url())
    );
    settings.relay.batch_size = 50;
    let relay = RunningRelay::start(settings.clone()).await;

    published_at_least(&db, ROWS as i64 / 4).await;
    first.shut();
    let received = receive_all(&mut inbox, &committed, Vec::new()).await;
    assert_eq!(assert_settled(&db, LONG).await, 0, "no row died");
    assert!(
        relay.health.broker_connected(),
        "connected through the second node"
    );
    relay.stop().await;
    committed.check(&received).assert_sound(
        "first broker node gone mid-stream",
        in_flight_rows(&settings.relay),
    );
}

/// Row `id`'s last error, once `condition` holds for it.
async fn last_error_once(db: &TestDb, id: i64, condition: &str) -> String {
    let sql = format!("select last_error from postbox.outbox where id = $1 and {condition}");
    wait_until(condition, LONG, || async {
        sqlx::query_scalar::<_, Option<String>>(sqlx::AssertSqlSafe(sql.as_str()))
            .bind(id)
            .fetch_optional(&db.pool)
            .await
            .expect("row")
            .flatten()
    })
    .await
}

/// The broker answers a publish to a missing exchange by closing the channel, which would fail
/// every confirm in flight, batch after batch: the relay probes exchanges first instead.
#[tokio::test]
async fn a_row_for_a_missing_exchange_fails_visibly_and_others_flow() {
    let Stage {
        db,
        rabbit,
        queue,
        mut inbox,
    } = Stage::start().await;
    let missing = format!("postbox-test-missing-{}", uuid::Uuid::new_v4().simple());
    let ids = commit(
        &db,
        &[
            Message::text(&queue, "later").exchange(&missing),
            Message::text(&queue, "fine"),
        ],
    )
    .await;
    let relay = RunningRelay::start(db.settings()).await;
    assert_eq!(inbox.take(1, LONG).await[0].outbox_id(), ids[1]);
    let error = last_error_once(&db, ids[0], "attempts >= 1").await;
    assert!(error.contains(&missing), "{error}");
    // Once the exchange exists, the retry goes out.
    rabbit.exchange_to(&missing, &queue).await;
    assert_eq!(inbox.take(1, LONG).await[0].outbox_id(), ids[0]);
    relay.stop().await;
}

/// A publish the broker refuses by closing the channel (here: to an internal exchange, which
/// exists, so the probe passes) is a counted failed attempt for the row whose exchange the
/// broker names: the row dies after `max_attempts` instead of coming back forever, and the rows
/// around it flow.
#[tokio::test]
async fn a_row_the_broker_refuses_by_closing_the_channel_dies_and_others_flow() {
    let Stage {
        db,
        rabbit,
        queue,
        mut inbox,
    } = Stage::start().await;
    let internal = format!("postbox-test-internal-{}", uuid::Uuid::new_v4().simple());
    rabbit.internal_exchange_to(&internal, &queue).await;
    let ids = commit(
        &db,
        // The refused row last: its publish is written before the broker's refusal comes
        // back, so the refusal arrives on its confirm (the path that used to loop forever).
        &[
            Message::text(&queue, "fine"),
            Message::text(&queue, "fine too"),
            Message::text(&queue, "refused").exchange(&internal),
        ],
    )
    .await;
    let mut settings = db.settings();
    settings.relay.max_attempts = 2;
    settings.relay.retry_initial_delay = Duration::from_millis(50);
    settings.relay.retry_max_delay = Duration::from_millis(100);
    let relay = RunningRelay::start(settings).await;
    let error = last_error_once(&db, ids[2], "dead_at is not null").await;
    assert!(error.contains(&internal), "{error}");
    let mut arrived: Vec<i64> = inbox
        .take(2, LONG)
        .await
        .iter()
        .map(|m| m.outbox_id())
        .collect();
    arrived.sort_unstable();
    assert_eq!(arrived, ids[..2]);
    assert_eq!(
        db.count("published_at is null and dead_at is null").await,
        0,
        "nothing left pending"
    );
    relay.stop().await;
}

/// An idle relay notices a lost broker without waiting for something to publish, so readiness
/// and `postbox_broker_up` tell the truth; it reconnects when there is work again.
#[tokio::test]
async fn an_idle_relay_reports_a_lost_broker_and_reconnects_for_work() {
    let Stage {
        db,
        rabbit: _rabbit,
        queue,
        mut inbox,
    } = Stage::start().await;
    let broker = Proxy::tcp(&host_port(&amqp_url())).await;
    let mut settings = db.settings();
    settings.amqp_url = broker.redirect(&amqp_url());
    let relay = RunningRelay::start(settings).await;
    let health = relay.health.clone();
    wait_until("the relay connected", Duration::from_secs(20), || async {
        health.broker_connected().then_some(())
    })
    .await;

    broker.shut();
    wait_until(
        "the idle relay reports the broker down",
        Duration::from_secs(20),
        || async { (!health.broker_connected()).then_some(()) },
    )
    .await;

    broker.reopen();
    let message = postbox::Message::json(queue.as_str(), &serde_json::json!({})).expect("json");
    postbox::enqueue(&db.pool, &message).await.expect("enqueue");
    inbox.take(1, Duration::from_secs(30)).await;
    assert!(health.broker_connected(), "connected again for the work");
    relay.stop().await;
}

/// The notification listener survives a lost database: while Postgres is away the relay says
/// it is not listening (readiness fails), and once LISTEN holds again a commit wakes it at
/// once — the poll interval here is far beyond the test's deadlines.
#[tokio::test]
async fn the_listener_comes_back_after_postgres_does_and_commits_wake_the_relay_again() {
    let Stage {
        db,
        rabbit: _rabbit,
        queue,
        mut inbox,
    } = Stage::start().await;
    let postgres = Proxy::start(host_port(&admin_database_url())).await;
    let mut settings = db.settings();
    settings.database_url = postgres.url_for(&db.url);
    settings.relay.poll_interval = Duration::from_secs(600);
    let relay = RunningRelay::start(settings).await;
    let health = relay.health.clone();
    let listening = |expected: bool| {
        let health = health.clone();
        move || {
            let health = health.clone();
            async move { (health.listening() == expected).then_some(()) }
        }
    };
    wait_until(
        "the relay listens",
        Duration::from_secs(20),
        listening(true),
    )
    .await;

    postgres.shut();
    wait_until(
        "the relay reports it is not listening",
        Duration::from_secs(20),
        listening(false),
    )
    .await;
    postgres.reopen();
    wait_until("the relay listens again", LONG, listening(true)).await;
    for n in 0..3 {
        commit(
            &db,
            &[Message::text(&queue, format!("after the outage {n}"))],
        )
        .await;
        let received = inbox.take(1, Duration::from_secs(30)).await;
        assert_eq!(
            received[0].payload,
            format!("after the outage {n}").as_bytes()
        );
    }
    relay.stop().await;
}

/// A relay that loses its broker gives its rows back and says so: another relay, idle and
/// polling only every ten minutes, publishes them at once. The first relay holds every row
/// (its publishes stalled) when its broker goes away; it must neither keep them locked while
/// it reconnects nor claim them again before it has a broker.
#[tokio::test]
async fn a_relay_that_loses_its_broker_hands_its_rows_to_another_at_once() {
    const ROWS: usize = 60;
    let Stage {
        db,
        rabbit: _rabbit,
        queue,
        mut inbox,
    } = Stage::start().await;
    let broker = Proxy::tcp(&host_port(&amqp_url())).await;
    let mut settings = db.settings();
    settings.relay.poll_interval = Duration::from_secs(600);
    settings.relay.confirm_timeout = Duration::from_secs(50);
    settings.relay.takeover_timeout = Duration::from_secs(120);
    let mut proxied = settings.clone();
    proxied.amqp_url = broker.redirect(&amqp_url());
    let first = RunningRelay::start(proxied).await;
    let stats = first.stats.clone();
    let health = first.health.clone();
    wait_until(
        "the first relay connected",
        Duration::from_secs(20),
        || async { health.broker_connected().then_some(()) },
    )
    .await;

    broker.stall();
    let committed = backlog(&db, &queue, ROWS, 6).await;
    wait_until(
        "the first relay holds every row",
        Duration::from_secs(20),
        || async { (db.locked_rows().await == ROWS as i64).then_some(()) },
    )
    .await;
    let second = RunningRelay::start(settings).await;
    let other = second.stats.clone();
    let other_health = second.health.clone();
    wait_until(
        "the second relay is ready and found nothing to claim",
        Duration::from_secs(20),
        || async {
            (other_health.broker_connected() && other_health.listening() && other.claims() > 0)
                .then_some(())
        },
    )
    .await;

    broker.shut();
    let started = std::time::Instant::now();
    let received = inbox
        .until_all(&committed.ids(), Duration::from_secs(30))
        .await;
    println!(
        "all {ROWS} rows delivered {:.2}s after the first relay lost its broker",
        started.elapsed().as_secs_f64()
    );
    assert_eq!(assert_settled(&db, LONG).await, 0, "no row died");
    // Its claims locked every row but kept one row per key (the rest only waited locked).
    assert!(stats.released() > 0, "the first relay released its batches");
    assert_eq!(stats.published(), 0, "the first relay marked nothing");
    assert!(!health.broker_connected());
    assert_eq!(other.published(), ROWS as u64);
    second.stop().await;
    first.stop().await;
    committed
        .check(&received)
        .assert_sound("a relay lost its broker while holding rows", ROWS);
}

/// A Postgres that stops answering (no reset, no reply: a partition) must not keep a relay
/// from stopping: stages stuck on it are aborted after a bound, their transactions ending with
/// their connections.
#[tokio::test]
async fn a_relay_stops_while_postgres_is_stalled() {
    let db = TestDb::migrated().await;
    let postgres = Proxy::start(host_port(&admin_database_url())).await;
    let mut settings = db.settings();
    settings.database_url = postgres.url_for(&db.url);
    settings.relay.shutdown_timeout = Duration::from_secs(1);
    let relay = RunningRelay::start(settings).await;
    let health = relay.health.clone();
    wait_until("the relay listens", LONG, || async {
        health.listening().then_some(())
    })
    .await;
    postgres.stall();
    // Deregistering from postbox.relays hangs on the stalled connection; `stop` fails the
    // test if the relay is not down within 30 s.
    relay.stop().await;
    postgres.resume();
}
