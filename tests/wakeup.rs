//! Waking the relay: producers' commits notify only while a relay sleeps, and a relay falling
//! asleep never leaves a commit for its poll.

mod common;

use std::time::Duration;

use common::{hold_the_wakeup_keys, RunningRelay, Stage, TestDb};
use postbox::{enqueue, Message};
use sqlx::postgres::PgListener;
use sqlx::Connection;

/// Long enough that only a notification (or the relay's own claims) can deliver in time.
const POLL: Duration = Duration::from_secs(600);
const DEADLINE: Duration = Duration::from_secs(10);

async fn insert_plain(db: &TestDb) {
    sqlx::query("insert into postbox.outbox (routing_key, payload) values ('q', '{}')")
        .execute(&db.pool)
        .await
        .expect("insert");
}

/// Without a sleeping relay a commit sends no notification (so it never waits on Postgres's
/// notification lock); while one sleeps, it does. Falling asleep waits for a producer that
/// inserted without notifying to finish its transaction.
#[tokio::test]
async fn producers_notify_only_while_a_relay_sleeps() {
    let db = TestDb::migrated().await;
    let mut listener = PgListener::connect(&db.url).await.expect("listener");
    listener.listen("postbox_outbox").await.expect("listen");
    insert_plain(&db).await;
    let quiet = tokio::time::timeout(Duration::from_millis(500), listener.recv()).await;
    assert!(quiet.is_err(), "no relay sleeps: no notification");

    // A producer inside its transaction, having inserted without notifying: a relay falling
    // asleep waits for it.
    let mut producer = db.pool.begin().await.expect("begin");
    sqlx::query("insert into postbox.outbox (routing_key, payload) values ('q', 'straddling')")
        .execute(&mut *producer)
        .await
        .expect("insert");
    let mut sleeper = sqlx::PgConnection::connect(&db.url).await.expect("connect");
    let falling_asleep = tokio::spawn(async move {
        hold_the_wakeup_keys(&mut sleeper).await;
        sleeper
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!falling_asleep.is_finished(), "waits for the producer");
    producer.commit().await.expect("commit");
    let _sleeper = tokio::time::timeout(DEADLINE, falling_asleep)
        .await
        .expect("asleep once the producer committed")
        .expect("task");
    assert_eq!(
        db.count("payload = 'straddling'").await,
        1,
        "and its row is visible"
    );
    // Drain what the straddling commit may have sent, then: asleep, a commit notifies.
    while tokio::time::timeout(Duration::from_millis(200), listener.recv())
        .await
        .is_ok()
    {}
    insert_plain(&db).await;
    tokio::time::timeout(DEADLINE, listener.recv())
        .await
        .expect("a notification while a relay sleeps")
        .expect("notification");
}

/// An idle relay wakes on commits from the Rust API and from plain SQL, with a poll far beyond
/// the deadline.
#[tokio::test]
async fn an_idle_relay_wakes_on_commits_from_rust_and_sql() {
    let Stage {
        db,
        rabbit: _rabbit,
        queue,
        mut inbox,
    } = Stage::start().await;
    let mut settings = db.settings();
    settings.relay.poll_interval = POLL;
    let relay = RunningRelay::start(settings).await;
    for n in 0..3 {
        enqueue(&db.pool, &Message::text(&queue, format!("rust {n}")))
            .await
            .expect("enqueue");
        inbox.take(1, DEADLINE).await;
        sqlx::query("insert into postbox.outbox (routing_key, payload) values ($1, $2)")
            .bind(&queue)
            .bind(format!("sql {n}"))
            .execute(&db.pool)
            .await
            .expect("insert");
        inbox.take(1, DEADLINE).await;
    }
    relay.stop().await;
}

/// Commits timed around a relay's moves between busy and asleep, some holding their
/// transaction open a while after the insert: each arrives within the deadline, never left for
/// the (10-minute) poll. With `relays` relays (with two, one may sleep while the other works).
async fn commits_around_falling_asleep(relays: usize) {
    let Stage {
        db,
        rabbit: _rabbit,
        queue,
        mut inbox,
    } = Stage::start().await;
    let mut settings = db.settings();
    settings.relay.poll_interval = POLL;
    let mut running = Vec::new();
    for _ in 0..relays {
        running.push(RunningRelay::start(settings.clone()).await);
    }
    // A fixed pseudo-random sequence: gaps and open transactions of 0 to 24 ms.
    let mut state: u64 = 0x2545_f491_4f6c_dd1d;
    let mut next = || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        Duration::from_millis(state % 25)
    };
    for n in 0..60 {
        tokio::time::sleep(next()).await;
        let mut tx = db.pool.begin().await.expect("begin");
        enqueue(&mut *tx, &Message::text(&queue, format!("{n}")))
            .await
            .expect("enqueue");
        tokio::time::sleep(next()).await;
        tx.commit().await.expect("commit");
        let arrived = inbox.take(1, DEADLINE).await;
        assert_eq!(arrived[0].payload, format!("{n}").as_bytes());
    }
    for relay in running {
        relay.stop().await;
    }
}

#[tokio::test]
async fn commits_around_a_relay_falling_asleep_are_never_left_for_the_poll() {
    commits_around_falling_asleep(1).await;
}

#[tokio::test]
async fn commits_around_two_relays_falling_asleep_are_never_left_for_the_poll() {
    commits_around_falling_asleep(2).await;
}
