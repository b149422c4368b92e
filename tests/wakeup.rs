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

/// Whether a relay sleeps holding the wake-up keys (all 256 taken in share mode by one
/// session).
async fn a_relay_sleeps(db: &TestDb) -> bool {
    let sessions: i64 = sqlx::query_scalar(
        "select count(*) from (select pid from pg_locks \
         where locktype = 'advisory' and granted and mode = 'ShareLock' \
           and classid = (-1084948806)::oid \
           and database = (select oid from pg_database where datname = current_database()) \
         group by pid having count(*) = 256) s",
    )
    .fetch_one(&db.pool)
    .await
    .expect("read pg_locks");
    sessions > 0
}

/// Producers keep committing while the relay is stopped gracefully, while no relay runs, while
/// a new one starts, and while that one is killed asleep and another starts: every row arrives,
/// none is left for the (10-minute) poll, and after each restart a commit arrives within the
/// wake-up deadline.
#[tokio::test]
async fn a_relay_restarted_while_producers_commit_leaves_nothing_for_the_poll() {
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use std::sync::Arc;

    let Stage {
        db,
        rabbit: _rabbit,
        queue,
        mut inbox,
    } = Stage::start().await;
    let poll = ("POSTBOX_RELAY__POLL_INTERVAL", "600s");
    let committing = Arc::new(AtomicBool::new(true));
    let committed = Arc::new(AtomicUsize::new(0));
    let producers: Vec<_> = (0..4)
        .map(|producer| {
            let (pool, queue) = (db.pool.clone(), queue.clone());
            let (committing, committed) = (committing.clone(), committed.clone());
            tokio::spawn(async move {
                let mut n = 0;
                while committing.load(Ordering::SeqCst) {
                    enqueue(&pool, &Message::text(&queue, format!("{producer}-{n}")))
                        .await
                        .expect("enqueue");
                    committed.fetch_add(1, Ordering::SeqCst);
                    n += 1;
                    tokio::time::sleep(Duration::from_millis(3)).await;
                }
            })
        })
        .collect();
    // Until `at_least` rows were committed (producers keep going meanwhile).
    let commits_reach = |at_least: usize| {
        let committed = committed.clone();
        common::wait_until("producers to commit", DEADLINE, move || {
            let reached = committed.load(Ordering::SeqCst) >= at_least;
            async move { reached.then_some(()) }
        })
    };

    let first = common::RelayProcess::spawn(&db.url, &[poll]);
    commits_reach(100).await;
    assert_eq!(first.stop(DEADLINE).await, Some(0), "graceful stop");
    // No relay: commits notify nobody and take no lock anyone waits for.
    let gap = committed.load(Ordering::SeqCst);
    commits_reach(gap + 100).await;
    let second = common::RelayProcess::spawn(&db.url, &[poll]);
    commits_reach(committed.load(Ordering::SeqCst) + 100).await;
    committing.store(false, Ordering::SeqCst);
    for producer in producers {
        producer.await.expect("producer");
    }
    let total = committed.load(Ordering::SeqCst);
    inbox.take(total, DEADLINE).await;

    // The second relay falls asleep; killed there, its keys go with its session, and a third
    // relay picks up a commit made in between, then wakes for the next one.
    common::wait_until("the relay to fall asleep", DEADLINE, || async {
        a_relay_sleeps(&db).await.then_some(())
    })
    .await;
    second.kill();
    common::wait_until("the killed relay's keys to go", DEADLINE, || async {
        (!a_relay_sleeps(&db).await).then_some(())
    })
    .await;
    enqueue(&db.pool, &Message::text(&queue, "between relays"))
        .await
        .expect("enqueue");
    let third = common::RelayProcess::spawn(&db.url, &[poll]);
    assert_eq!(inbox.take(1, DEADLINE).await[0].payload, b"between relays");
    common::wait_until("the new relay to fall asleep", DEADLINE, || async {
        a_relay_sleeps(&db).await.then_some(())
    })
    .await;
    enqueue(&db.pool, &Message::text(&queue, "after the restart"))
        .await
        .expect("enqueue");
    assert_eq!(
        inbox.take(1, DEADLINE).await[0].payload,
        b"after the restart"
    );
    assert_eq!(third.stop(DEADLINE).await, Some(0));
    assert_eq!(
        db.count("published_at is null").await,
        0,
        "every committed row was published"
    );
}
