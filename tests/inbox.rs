//! The consumer library against the real Postgres and RabbitMQ: effectively-once processing,
//! duplicates, a crash between commit and ack, retries and dead letters, malformed messages,
//! stale events, and the relay → consumer path end to end.

mod common;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::proxy::Proxy;
use common::{relay_headers, wait_until, Harness, Subscriber};
use lapin::types::{AMQPValue, FieldTable};
use postbox::inbox::{
    ConsumerHandle, ConsumerOptions, ConsumerStats, Handler, HandlerError, Incoming,
    MalformedPolicy, VersionedUpsert, Versioning,
};
use sqlx::{Postgres, Transaction};
use tokio::sync::Notify;
use uuid::Uuid;

const DEADLINE: Duration = Duration::from_secs(20);

/// A handler that writes one row per run into `applied` and can be told to fail or wait.
#[derive(Clone, Default)]
struct Recorder {
    runs: Arc<AtomicU32>,
    /// Fail (after writing) with this kind of error.
    fail: Option<fn(String) -> HandlerError>,
    /// Signalled when a run starts; the run then waits for `release`.
    gate: Option<(Arc<Notify>, Arc<Notify>)>,
    /// Deserialize the payload as this JSON shape.
    typed: bool,
    /// Fail or gate only this message (every message when `None`).
    poison: Option<Uuid>,
}

impl Recorder {
    /// A recorder whose runs signal `started` and then wait for `release`.
    fn gated() -> (Self, Arc<Notify>, Arc<Notify>) {
        let started = Arc::new(Notify::new());
        let release = Arc::new(Notify::new());
        let recorder = Self {
            gate: Some((started.clone(), release.clone())),
            ..Self::default()
        };
        (recorder, started, release)
    }
}

#[derive(serde::Deserialize)]
#[allow(dead_code)]
struct Deposit {
    account: String,
    balance: i64,
}

impl Handler for Recorder {
    async fn handle(
        &self,
        tx: &mut Transaction<'_, Postgres>,
        message: &Incoming,
    ) -> Result<(), HandlerError> {
        self.runs.fetch_add(1, Ordering::SeqCst);
        if self.typed {
            let _: Deposit = message.json()?;
        }
        sqlx::query(
            "insert into applied (message_id, partition_key, outbox_id, attempt, trace_id) \
             values ($1, $2, $3, $4, $5)",
        )
        .bind(message.message_id())
        .bind(message.partition_key())
        .bind(message.outbox_id())
        .bind(message.attempt() as i32)
        .bind(message.traceparent().map(|t| t.trace_id))
        .execute(&mut **tx)
        .await?;
        let targeted = self.poison.is_none_or(|id| id == message.message_id());
        if let Some((started, release)) = self.gate.as_ref().filter(|_| targeted) {
            started.notify_one();
            release.notified().await;
        }
        match self.fail {
            Some(fail) if targeted => Err(fail(format!("boom on attempt {}", message.attempt()))),
            _ => Ok(()),
        }
    }
}

/// Waits until `done` holds for the consumer's counters; returns them.
async fn wait_for(
    consumer: &ConsumerHandle,
    what: &str,
    done: impl Fn(&ConsumerStats) -> bool,
) -> Arc<ConsumerStats> {
    let stats = consumer.stats();
    wait_until(what, DEADLINE, || {
        let ready = done(&stats);
        async move { ready.then_some(()) }
    })
    .await;
    stats
}

/// Waits until `done` holds for the consumer's counters, then stops it; returns the counters.
async fn stop_when(
    consumer: ConsumerHandle,
    what: &str,
    done: impl Fn(&ConsumerStats) -> bool,
) -> Arc<ConsumerStats> {
    let stats = wait_for(&consumer, what, done).await;
    consumer.stop().await.expect("consumer stops");
    stats
}

/// Message `id` arrives in the dead-letter queue, the consumer records it (then stops), and its
/// inbox row says dead_lettered.
async fn expect_dead_letter(sub: &mut Subscriber, consumer: ConsumerHandle, id: Uuid) {
    let dead = sub.dead_letters.take(1, DEADLINE).await;
    assert_eq!(dead[0].message_id.as_deref(), Some(id.to_string().as_str()));
    stop_when(consumer, "dead letter recorded", |stats| {
        stats.dead_lettered() == 1
    })
    .await;
    assert_eq!(
        sub.inbox_row("billing", id).await.0.as_deref(),
        Some("dead_lettered")
    );
}

async fn subscriber() -> Subscriber {
    let sub = Subscriber::start().await;
    sqlx::query(
        "create table applied (seq bigserial primary key, message_id uuid not null, \
         partition_key text, outbox_id bigint, attempt int not null, trace_id text)",
    )
    .execute(&sub.db.pool)
    .await
    .expect("create applied table");
    sub
}

/// Options for state semantics: a key's outbox position is its version, and older events are
/// skipped as stale.
fn state_options(sub: &Subscriber) -> ConsumerOptions {
    sub.options().versioning(Versioning::OutboxId)
}

async fn applied(sub: &Subscriber) -> Vec<(Uuid, Option<String>, Option<i64>)> {
    sqlx::query_as("select message_id, partition_key, outbox_id from applied order by seq")
        .fetch_all(&sub.db.pool)
        .await
        .expect("read applied")
}

#[tokio::test]
async fn each_message_takes_effect_once_and_duplicates_are_counted() {
    let sub = subscriber().await;
    let recorder = Recorder::default();
    let consumer = sub.consumer("billing", recorder.clone(), sub.options());
    let ids: Vec<Uuid> = (0..20).map(|_| Uuid::new_v4()).collect();
    for (i, id) in ids.iter().enumerate() {
        sub.send(*id, relay_headers(i as i64 + 1, None), b"{}")
            .await;
    }
    // A relay retry after a lost confirm, a replay: the same ids again.
    for (i, id) in ids.iter().take(5).enumerate() {
        sub.send(*id, relay_headers(i as i64 + 1, None), b"{}")
            .await;
    }
    stop_when(consumer, "20 applied and 5 duplicates", |stats| {
        stats.applied() == 20 && stats.duplicates() == 5
    })
    .await;

    assert_eq!(
        recorder.runs.load(Ordering::SeqCst),
        20,
        "handler ran once per id"
    );
    let rows = applied(&sub).await;
    assert_eq!(rows.iter().map(|r| r.0).collect::<Vec<_>>(), ids);
    for (i, id) in ids.iter().enumerate() {
        let (outcome, duplicates, attempts) = sub.inbox_row("billing", *id).await;
        assert_eq!(outcome.as_deref(), Some("applied"));
        assert_eq!(duplicates, i32::from(i < 5), "duplicates of message {i}");
        assert_eq!(attempts, 0);
    }
    assert_eq!(sub.rabbit.ready(&sub.queue).await, 0, "everything acked");
}

#[tokio::test]
async fn consumers_with_different_names_each_apply_the_message() {
    let sub = subscriber().await;
    let id = Uuid::new_v4();
    sub.send(id, relay_headers(1, None), b"{}").await;
    let first = Recorder::default();
    let billing = sub.consumer("billing", first.clone(), sub.options());
    stop_when(billing, "billing applied", |stats| stats.applied() == 1).await;
    // The same id under another consumer name is new to that consumer.
    sub.send(id, relay_headers(1, None), b"{}").await;
    let second = Recorder::default();
    let shipping = sub.consumer("shipping", second.clone(), sub.options());
    stop_when(shipping, "shipping applied", |stats| stats.applied() == 1).await;
    assert_eq!(first.runs.load(Ordering::SeqCst), 1);
    assert_eq!(second.runs.load(Ordering::SeqCst), 1);
    assert_eq!(
        sub.inbox_row("billing", id).await.0.as_deref(),
        Some("applied")
    );
    assert_eq!(
        sub.inbox_row("shipping", id).await.0.as_deref(),
        Some("applied")
    );
}

#[tokio::test]
async fn a_crash_between_commit_and_ack_redelivers_as_a_duplicate() {
    let sub = subscriber().await;
    let proxy = Proxy::tcp(&common::host_port(&common::amqp_url())).await;
    let (recorder, started, release) = Recorder::gated();
    let consumer = sub.consumer_via(
        sub.db.pool.clone(),
        &proxy.redirect(&common::amqp_url()),
        "billing",
        recorder.clone(),
        sub.options(),
    );
    let id = Uuid::new_v4();
    sub.send(id, relay_headers(7, None), b"{}").await;
    tokio::time::timeout(DEADLINE, started.notified())
        .await
        .expect("handler started");
    // The broker connection dies while the handler runs: its commit still succeeds (Postgres
    // is not behind the proxy) but the ack cannot reach the broker, which redelivers.
    proxy.cut();
    release.notify_one();
    let stats = stop_when(
        consumer,
        "the redelivery recognized as a duplicate",
        |stats| stats.duplicates() == 1,
    )
    .await;

    assert_eq!(recorder.runs.load(Ordering::SeqCst), 1, "handler ran once");
    assert_eq!(applied(&sub).await.len(), 1, "its write took effect once");
    assert_eq!(stats.applied(), 1);
    let (outcome, duplicates, _) = sub.inbox_row("billing", id).await;
    assert_eq!(outcome.as_deref(), Some("applied"));
    assert_eq!(duplicates, 1);
    assert_eq!(
        sub.rabbit.ready(&sub.queue).await,
        0,
        "the redelivery was acked"
    );
}

/// A run that takes the consumer down records nothing itself, so a redelivery's run is counted
/// before it starts: a message that keeps killing its consumer is dead-lettered after
/// `max_attempts` counted runs instead of coming back forever, and the message behind it (its
/// redelivery counted ahead too) is applied with no attempt left on its row.
#[tokio::test]
async fn a_message_that_keeps_taking_its_consumer_down_is_dead_lettered() {
    let mut sub = subscriber().await;
    let proxy = Proxy::tcp(&common::host_port(&common::amqp_url())).await;
    let poison = Uuid::new_v4();
    let innocent = Uuid::new_v4();
    // The poison's runs never end, as if each took its process down: the test cuts the
    // consumer's broker connection each time one starts.
    let (gated, started, _never) = Recorder::gated();
    let handler = Recorder {
        poison: Some(poison),
        ..gated
    };
    let options = sub
        .options()
        .max_attempts(2)
        // How long a lost session waits for its handlers before rolling them back: the
        // "crashed" run's transaction ends unrecorded, as a dead process's would.
        .shutdown_timeout(Duration::from_millis(100));
    let consumer = sub.consumer_via(
        sub.db.pool.clone(),
        &proxy.redirect(&common::amqp_url()),
        "billing",
        handler.clone(),
        options,
    );
    sub.send(poison, relay_headers(1, Some("a")), b"{}").await;
    sub.send(innocent, relay_headers(2, Some("b")), b"{}").await;
    // The first delivery's run is not counted (it was not a redelivery); the next two are.
    for run in 1..=3 {
        tokio::time::timeout(DEADLINE, started.notified())
            .await
            .unwrap_or_else(|_| panic!("run {run} of the poison started"));
        proxy.cut();
    }
    let dead = sub.dead_letters.take(1, DEADLINE).await;
    assert_eq!(
        dead[0].message_id.as_deref(),
        Some(poison.to_string().as_str())
    );
    let stats = stop_when(consumer, "poison dead, innocent applied", |stats| {
        stats.dead_lettered() == 1 && stats.applied() == 1
    })
    .await;
    assert_eq!(
        handler.runs.load(Ordering::SeqCst),
        4,
        "three runs of the poison, one of the message behind it"
    );
    assert_eq!(
        stats.failures(),
        0,
        "no run failed in the handler's own way"
    );
    let (outcome, _, attempts) = sub.inbox_row("billing", poison).await;
    assert_eq!(outcome.as_deref(), Some("dead_lettered"));
    assert_eq!(attempts, 2, "the runs counted, not the delivery it died on");
    let (outcome, _, attempts) = sub.inbox_row("billing", innocent).await;
    assert_eq!(outcome.as_deref(), Some("applied"));
    assert_eq!(attempts, 0, "a redelivery that succeeded leaves no attempt");
    let runs: Vec<(Uuid, i32)> =
        sqlx::query_as("select message_id, attempt from applied order by seq")
            .fetch_all(&sub.db.pool)
            .await
            .expect("applied");
    assert_eq!(
        runs,
        [(innocent, 1)],
        "the innocent message ran once, as its first attempt"
    );
}

#[tokio::test]
async fn a_failing_handler_is_retried_then_dead_lettered_and_does_not_block_the_queue() {
    let mut sub = subscriber().await;
    let poison = Uuid::new_v4();
    let failing = Recorder {
        fail: Some(HandlerError::transient),
        poison: Some(poison),
        ..Recorder::default()
    };
    let options = sub.options().max_attempts(3);
    let consumer = sub.consumer("billing", failing.clone(), options);
    let mut headers = relay_headers(1, Some("acc-1"));
    headers.insert("x-trace".into(), AMQPValue::LongString("kept".into()));
    sub.send(poison, headers, b"{\"poison\":true}").await;
    // Queued behind the poison message on the consumer's one worker, while it is retried.
    let good = Uuid::new_v4();
    sub.send(good, relay_headers(2, Some("acc-2")), b"{}").await;

    let dead = sub.dead_letters.take(1, DEADLINE).await;
    let dead = &dead[0];
    assert_eq!(
        dead.message_id.as_deref(),
        Some(poison.to_string().as_str())
    );
    assert_eq!(dead.payload, b"{\"poison\":true}");
    let text = |name: &str| match dead.header(name) {
        Some(AMQPValue::LongString(s)) => String::from_utf8_lossy(s.as_bytes()).into_owned(),
        other => panic!("header {name}: {other:?}"),
    };
    assert_eq!(text("x-postbox-error"), "boom on attempt 3");
    assert_eq!(text("x-postbox-consumer"), "billing");
    assert_eq!(text("x-postbox-queue"), sub.queue);
    assert_eq!(text("x-trace"), "kept", "original headers are kept");
    assert_eq!(
        dead.header("x-postbox-attempts"),
        Some(&AMQPValue::LongLongInt(3))
    );
    // The queue moves on: the message behind the poison one is applied by the same consumer.
    let stats = wait_for(
        &consumer,
        "dead letter recorded, next message applied",
        |stats| stats.dead_lettered() == 1 && stats.applied() == 1,
    )
    .await;
    assert_eq!(
        failing.runs.load(Ordering::SeqCst),
        4,
        "the poison message ran max_attempts times, the next one once"
    );
    assert_eq!(stats.failures(), 3);
    let rows = applied(&sub).await;
    assert_eq!(rows.len(), 1, "failed runs rolled back their writes");
    assert_eq!(rows[0].0, good);
    let (outcome, _, attempts) = sub.inbox_row("billing", poison).await;
    assert_eq!(outcome.as_deref(), Some("dead_lettered"));
    assert_eq!(attempts, 3);

    // The poison message, if it comes again, is a duplicate.
    sub.send(poison, relay_headers(1, Some("acc-1")), b"{}")
        .await;
    stop_when(consumer, "poison absorbed", |stats| stats.duplicates() == 1).await;
    assert_eq!(failing.runs.load(Ordering::SeqCst), 4);
    assert_eq!(sub.rabbit.ready(&sub.queue).await, 0);
}

/// A panicking handler is a failed run like any other: counted, retried, dead-lettered (here
/// with a NUL character in its message, which Postgres text cannot hold).
#[tokio::test]
async fn a_panicking_handler_is_counted_and_dead_lettered() {
    let mut sub = subscriber().await;
    let panicking = Recorder {
        fail: Some(|message| panic!("handler bug\0 {message}")),
        ..Recorder::default()
    };
    let options = sub.options().max_attempts(2);
    let consumer = sub.consumer("billing", panicking.clone(), options);
    let id = Uuid::new_v4();
    sub.send(id, relay_headers(1, Some("acc-1")), b"{}").await;
    expect_dead_letter(&mut sub, consumer, id).await;
    assert_eq!(panicking.runs.load(Ordering::SeqCst), 2);
    let (_, _, attempts) = sub.inbox_row("billing", id).await;
    assert_eq!(attempts, 2);
    let error: String =
        sqlx::query_scalar("select last_error from postbox.inbox where message_id = $1")
            .bind(id)
            .fetch_one(&sub.db.pool)
            .await
            .expect("read last_error");
    assert!(
        error.starts_with("the handler panicked: handler bug\u{FFFD} boom"),
        "{error}"
    );
}

/// Partition keys Postgres cannot take as they are (a NUL character; a key too long for an
/// index entry) are stored and versioned all the same, instead of failing every run.
#[tokio::test]
async fn partition_keys_postgres_cannot_index_are_still_versioned() {
    /// Counts its runs and writes nothing (the test's `applied` table could not take a NUL).
    #[derive(Clone, Default)]
    struct Runs(Arc<AtomicU32>);
    impl Handler for Runs {
        async fn handle(
            &self,
            _: &mut Transaction<'_, Postgres>,
            _: &Incoming,
        ) -> Result<(), HandlerError> {
            self.0.fetch_add(1, Ordering::SeqCst);
            Ok(())
        }
    }
    let sub = subscriber().await;
    let runs = Runs::default();
    let consumer = sub.consumer("billing", runs.clone(), state_options(&sub));
    let long_key = "k".repeat(5_000);
    sub.send(Uuid::new_v4(), relay_headers(2, Some("acc\0-1")), b"{}")
        .await;
    sub.send(Uuid::new_v4(), relay_headers(2, Some(&long_key)), b"{}")
        .await;
    // Older than what was applied for the long key: stale, so its version was recorded.
    sub.send(Uuid::new_v4(), relay_headers(1, Some(&long_key)), b"{}")
        .await;
    let stats = stop_when(consumer, "two applied, one stale", |stats| {
        stats.applied() == 2 && stats.stale() == 1
    })
    .await;
    assert_eq!(stats.failures(), 0);
    assert_eq!(runs.0.load(Ordering::SeqCst), 2);
}

/// A message whose own values Postgres refuses in the inbox (here a check constraint, SQLSTATE
/// class 23; value errors are 22, size limits 54) can never be recorded: it is dead-lettered at
/// once, without an inbox row, rather than waited on as if Postgres were down; the messages
/// behind it go on.
#[tokio::test]
async fn a_message_postgres_refuses_in_the_inbox_is_dead_lettered_at_once() {
    let mut sub = subscriber().await;
    sqlx::query(
        "alter table postbox.inbox add constraint test_refuses_this_key \
         check (partition_key is distinct from 'refused')",
    )
    .execute(&sub.db.pool)
    .await
    .expect("add constraint");
    let recorder = Recorder::default();
    let consumer = sub.consumer("billing", recorder.clone(), sub.options());
    let refused = Uuid::new_v4();
    let fine = Uuid::new_v4();
    sub.send(refused, relay_headers(1, Some("refused")), b"{}")
        .await;
    sub.send(fine, relay_headers(2, Some("fine")), b"{}").await;
    let dead = sub.dead_letters.take(1, DEADLINE).await;
    assert_eq!(
        dead[0].message_id.as_deref(),
        Some(refused.to_string().as_str())
    );
    let stats = stop_when(consumer, "the other one applied", |stats| {
        stats.applied() == 1 && stats.dead_lettered() == 1
    })
    .await;
    assert_eq!(stats.failures(), 0, "no attempt counted, none retried");
    let rows: i64 = sqlx::query_scalar("select count(*) from postbox.inbox where message_id = $1")
        .bind(refused)
        .fetch_one(&sub.db.pool)
        .await
        .expect("count");
    assert_eq!(rows, 0, "no inbox row for the refused message");
    let applied: Vec<Uuid> = applied(&sub).await.into_iter().map(|r| r.0).collect();
    assert_eq!(applied, [fine]);
}

/// With several workers, a worker waiting out a failed run's backoff gets no unkeyed
/// deliveries: they go to a worker that can run them now, not round-robin behind the retry.
#[tokio::test]
async fn unkeyed_messages_are_not_queued_behind_a_retrying_worker() {
    let sub = subscriber().await;
    let poison = Uuid::new_v4();
    let recorder = Recorder {
        fail: Some(HandlerError::transient),
        poison: Some(poison),
        ..Recorder::default()
    };
    let options = sub
        .options()
        .concurrency(2)
        .max_attempts(2)
        // Far beyond the test's deadline: whatever waits behind the retry fails the test.
        .retry_initial_delay(Duration::from_secs(60))
        .retry_max_delay(Duration::from_secs(60));
    let consumer = sub.consumer("billing", recorder.clone(), options);
    sub.send(poison, FieldTable::default(), b"{}").await;
    wait_for(&consumer, "the first failed run", |stats| {
        stats.failures() == 1
    })
    .await;
    for _ in 0..10 {
        sub.send(Uuid::new_v4(), FieldTable::default(), b"{}").await;
    }
    let stats = wait_for(&consumer, "ten applied", |stats| stats.applied() == 10).await;
    assert_eq!(
        stats.dead_lettered(),
        0,
        "the poison message is still retrying"
    );
    consumer.stop().await.expect("stops");
}

/// After a fix, a dead letter moved back to the queue must run the handler: `postbox inbox
/// retry` makes it undecided again (without it, the redelivery is absorbed as a duplicate).
#[tokio::test]
async fn a_dead_letter_given_another_chance_runs_the_handler() {
    let mut sub = subscriber().await;
    let id = Uuid::new_v4();
    let failing = Recorder {
        fail: Some(HandlerError::permanent),
        ..Recorder::default()
    };
    let consumer = sub.consumer("billing", failing, sub.options());
    sub.send(id, relay_headers(1, None), b"{}").await;
    expect_dead_letter(&mut sub, consumer, id).await;

    // The inbox named on its own: the outbox's DATABASE_URL (unreachable here) is not used.
    let retry = |args: &[String]| {
        common::postbox_command()
            .args(["inbox", "retry", "--inbox-database-url", &sub.db.url])
            .args(args)
            .env("DATABASE_URL", "postgres://postgres@127.0.0.1:1/nowhere")
            .output()
            .expect("run postbox inbox retry")
    };
    let with = |consumer: &str, rest: &[&str]| -> Vec<String> {
        ["--consumer", consumer]
            .iter()
            .chain(rest)
            .map(|s| s.to_string())
            .collect()
    };
    // A consumer with no inbox rows (a typo) is pointed out; nothing changes.
    let output = retry(&with("biling", &["--all"]));
    assert!(output.status.success(), "{output:?}");
    assert!(
        String::from_utf8_lossy(&output.stderr).contains("no rows of consumer \"biling\""),
        "{output:?}"
    );
    // One id that is not a dead letter: nothing changes, exit 2.
    let output = retry(&with(
        "billing",
        &["--id", &id.to_string(), "--id", &Uuid::new_v4().to_string()],
    ));
    assert_eq!(output.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&output.stderr).contains("nothing was changed"));
    assert_eq!(
        sub.inbox_row("billing", id).await.0.as_deref(),
        Some("dead_lettered")
    );
    let output = retry(&with("billing", &["--all"]));
    assert!(output.status.success(), "{output:?}");
    assert!(String::from_utf8_lossy(&output.stdout).starts_with("1 dead-lettered message(s)"));

    let healthy = Recorder::default();
    let consumer = sub.consumer("billing", healthy.clone(), sub.options());
    sub.send(id, relay_headers(1, None), b"{}").await; // moved back from the dead letters
    let stats = stop_when(consumer, "applied", |stats| stats.applied() == 1).await;
    assert_eq!(stats.duplicates(), 0);
    assert_eq!(healthy.runs.load(Ordering::SeqCst), 1);
    let (outcome, _, attempts) = sub.inbox_row("billing", id).await;
    assert_eq!(outcome.as_deref(), Some("applied"));
    assert_eq!(attempts, 0);
}

#[tokio::test]
async fn attempts_are_remembered_across_restarts() {
    let mut sub = subscriber().await;
    let id = Uuid::new_v4();
    // A previous process failed this message twice, then died.
    sqlx::query(
        "insert into postbox.inbox (consumer, message_id, queue, attempts, last_error) \
         values ('billing', $1, $2, 2, 'earlier failure')",
    )
    .bind(id)
    .bind(&sub.queue)
    .execute(&sub.db.pool)
    .await
    .expect("seed inbox");
    let recorder = Recorder::default();
    let options = sub.options().max_attempts(2);
    let consumer = sub.consumer("billing", recorder.clone(), options);
    sub.send(id, relay_headers(1, None), b"{}").await;
    expect_dead_letter(&mut sub, consumer, id).await;
    assert_eq!(
        recorder.runs.load(Ordering::SeqCst),
        0,
        "not run a third time"
    );
}

#[tokio::test]
async fn permanent_failures_are_dead_lettered_without_retries() {
    let mut sub = subscriber().await;
    let recorder = Recorder {
        fail: Some(HandlerError::permanent),
        ..Recorder::default()
    };
    let consumer = sub.consumer("billing", recorder.clone(), sub.options());
    let id = Uuid::new_v4();
    sub.send(id, relay_headers(1, None), b"{}").await;
    let dead = sub.dead_letters.take(1, DEADLINE).await;
    assert_eq!(
        dead[0].header("x-postbox-attempts"),
        Some(&AMQPValue::LongLongInt(1))
    );
    let stats = stop_when(consumer, "recorded", |stats| stats.dead_lettered() == 1).await;
    assert_eq!(recorder.runs.load(Ordering::SeqCst), 1);
    assert_eq!(stats.failures(), 0);
    // The inbox row agrees with the dead letter's header: one failed run.
    let (outcome, _, attempts) = sub.inbox_row("billing", id).await;
    assert_eq!(outcome.as_deref(), Some("dead_lettered"));
    assert_eq!(attempts, 1);
}

#[tokio::test]
async fn malformed_messages_follow_the_policy() {
    let mut sub = subscriber().await;
    let recorder = Recorder {
        typed: true,
        ..Recorder::default()
    };
    let consumer = sub.consumer("billing", recorder.clone(), sub.options());
    // No message id at all, then a payload that is not the expected JSON.
    sub.rabbit
        .publish(&sub.queue, None, FieldTable::default(), b"no id")
        .await;
    let bad_json = Uuid::new_v4();
    sub.send(bad_json, relay_headers(2, None), b"{\"account\":1}")
        .await;
    let dead = sub.dead_letters.take(2, DEADLINE).await;
    let error = |i: usize| match dead[i].header("x-postbox-error") {
        Some(AMQPValue::LongString(s)) => String::from_utf8_lossy(s.as_bytes()).into_owned(),
        other => panic!("no error header: {other:?}"),
    };
    assert_eq!(dead[0].payload, b"no id");
    assert!(error(0).contains("no message_id"), "{}", error(0));
    assert!(error(1).contains("not the expected JSON"), "{}", error(1));
    stop_when(consumer, "both dead-lettered", |stats| {
        stats.dead_lettered() == 2
    })
    .await;
    assert_eq!(
        recorder.runs.load(Ordering::SeqCst),
        1,
        "malformed JSON is not retried"
    );
    assert_eq!(
        sub.inbox_row("billing", bad_json).await.0.as_deref(),
        Some("dead_lettered")
    );

    // The discard policy acks and records instead.
    let options = sub.options().on_malformed(MalformedPolicy::Discard);
    let consumer = sub.consumer("billing", recorder.clone(), options);
    let discarded = Uuid::new_v4();
    sub.send(discarded, relay_headers(3, None), b"[]").await;
    stop_when(consumer, "discarded", |stats| stats.discarded() == 1).await;
    assert_eq!(
        sub.inbox_row("billing", discarded).await.0.as_deref(),
        Some("discarded")
    );
    assert!(sub
        .dead_letters
        .drain_for(Duration::from_millis(200))
        .await
        .is_empty());
    assert_eq!(sub.rabbit.ready(&sub.queue).await, 0);
}

/// A handler that keeps an account's balance with the versioned upsert.
#[derive(Clone)]
struct Balances {
    upsert: VersionedUpsert,
    runs: Arc<AtomicU32>,
}

impl Balances {
    async fn new(sub: &Subscriber) -> Self {
        sqlx::query(
            "create table balances (account text primary key, version bigint not null, \
             balance bigint not null)",
        )
        .execute(&sub.db.pool)
        .await
        .expect("create balances");
        Self {
            upsert: VersionedUpsert::new("balances", &["account"], "version", &["balance"]),
            runs: Arc::default(),
        }
    }
}

impl Handler for Balances {
    async fn handle(
        &self,
        tx: &mut Transaction<'_, Postgres>,
        message: &Incoming,
    ) -> Result<(), HandlerError> {
        self.runs.fetch_add(1, Ordering::SeqCst);
        let deposit: Deposit = message.json()?;
        let version = message
            .header_i64("x-version")
            .or(message.outbox_id())
            .ok_or("no version")?;
        self.upsert
            .query()
            .bind(&deposit.account)
            .bind(version)
            .bind(deposit.balance)
            .execute(&mut **tx)
            .await?;
        Ok(())
    }
}

async fn balance(sub: &Subscriber, account: &str) -> (i64, i64) {
    sqlx::query_as("select version, balance from balances where account = $1")
        .bind(account)
        .fetch_one(&sub.db.pool)
        .await
        .expect("balance row")
}

fn deposit(account: &str, balance: i64) -> Vec<u8> {
    format!("{{\"account\":\"{account}\",\"balance\":{balance}}}").into_bytes()
}

#[tokio::test]
async fn a_late_event_never_overwrites_newer_state() {
    let sub = subscriber().await;
    let handler = Balances::new(&sub).await;
    let consumer = sub.consumer("ledger", handler.clone(), state_options(&sub));
    // Outbox positions 5 then 3 for one key: 3 arrives late (a replay, a requeue).
    let newer = Uuid::new_v4();
    let older = Uuid::new_v4();
    let other_key = Uuid::new_v4();
    sub.send(
        newer,
        relay_headers(5, Some("acc-1")),
        &deposit("acc-1", 50),
    )
    .await;
    sub.send(
        older,
        relay_headers(3, Some("acc-1")),
        &deposit("acc-1", 30),
    )
    .await;
    // Another key's lower position is not stale: versions are per key.
    sub.send(
        other_key,
        relay_headers(1, Some("acc-2")),
        &deposit("acc-2", 10),
    )
    .await;
    stop_when(consumer, "two applied, one stale", |stats| {
        stats.applied() == 2 && stats.stale() == 1
    })
    .await;
    assert_eq!(balance(&sub, "acc-1").await, (5, 50));
    assert_eq!(balance(&sub, "acc-2").await, (1, 10));
    assert_eq!(
        handler.runs.load(Ordering::SeqCst),
        2,
        "the stale event never ran"
    );
    assert_eq!(
        sub.inbox_row("ledger", older).await.0.as_deref(),
        Some("stale")
    );
    let newest: (i64, Uuid) = sqlx::query_as(
        "select version, message_id from postbox.inbox_versions \
         where consumer = 'ledger' and partition_key = 'acc-1'",
    )
    .fetch_one(&sub.db.pool)
    .await
    .expect("version row");
    assert_eq!(newest, (5, newer));
}

/// Two services whose outboxes key events by the same id (an order id, say): their outbox
/// positions are not comparable, so neither service's events are skipped as older than the
/// other's; within one source, an older position is still stale.
#[tokio::test]
async fn versions_are_compared_only_within_one_outbox() {
    let sub = subscriber().await;
    let recorder = Recorder::default();
    let consumer = sub.consumer("billing", recorder.clone(), state_options(&sub));
    let from = |source: &str, outbox_id: i64| {
        let mut headers = relay_headers(outbox_id, Some("order-42"));
        headers.insert(
            "x-postbox-source".into(),
            AMQPValue::LongString(source.into()),
        );
        headers
    };
    sub.send(Uuid::new_v4(), from("orders-outbox", 500), b"{}")
        .await;
    sub.send(Uuid::new_v4(), from("payments-outbox", 7), b"{}")
        .await;
    sub.send(Uuid::new_v4(), from("orders-outbox", 499), b"{}")
        .await;
    let stats = stop_when(consumer, "two applied, one stale", |stats| {
        stats.applied() == 2 && stats.stale() == 1
    })
    .await;
    assert_eq!(stats.failures(), 0);
    let outbox_ids: Vec<Option<i64>> = applied(&sub).await.into_iter().map(|r| r.2).collect();
    assert_eq!(outbox_ids, [Some(500), Some(7)]);
}

#[tokio::test]
async fn versions_from_a_header_and_the_upsert_guard() {
    let sub = subscriber().await;
    let handler = Balances::new(&sub).await;
    let with_version = |outbox_id: i64, version: i64| {
        let mut headers = relay_headers(outbox_id, Some("acc-1"));
        headers.insert("x-version".into(), AMQPValue::LongLongInt(version));
        headers
    };
    // Header versioning: the producer's version 2 wins over version 1 although version 1 was
    // written later (a higher outbox position).
    let options = sub
        .options()
        .versioning(Versioning::Header("x-version".into()));
    let consumer = sub.consumer("ledger", handler.clone(), options);
    sub.send(Uuid::new_v4(), with_version(10, 2), &deposit("acc-1", 20))
        .await;
    sub.send(Uuid::new_v4(), with_version(11, 1), &deposit("acc-1", 10))
        .await;
    stop_when(consumer, "one applied, one stale", |stats| {
        stats.applied() == 1 && stats.stale() == 1
    })
    .await;
    assert_eq!(balance(&sub, "acc-1").await, (2, 20));

    // With the inbox's check off, the versioned upsert alone keeps the newer state.
    let options = sub.options().versioning(Versioning::Off);
    let consumer = sub.consumer("ledger-raw", handler.clone(), options);
    sub.send(Uuid::new_v4(), with_version(12, 1), &deposit("acc-1", 99))
        .await;
    stop_when(consumer, "applied without effect", |stats| {
        stats.applied() == 1
    })
    .await;
    assert_eq!(
        balance(&sub, "acc-1").await,
        (2, 20),
        "the upsert kept version 2"
    );
}

#[tokio::test]
async fn relay_to_consumer_end_to_end_in_key_order() {
    let harness = Harness::start().await;
    // The consumer's own database, apart from the producer's.
    let sub = subscriber().await;
    let mut messages = Vec::new();
    for i in 0..200 {
        messages.push(
            postbox::Message::json(sub.queue.as_str(), &serde_json::json!({ "n": i }))
                .expect("json payload")
                .partition_key(format!("key-{}", i % 7))
                .traceparent(&format!("00-{:032x}-00f067aa0ba902b7-01", i + 1))
                .expect("valid traceparent"),
        );
    }
    let mut tx = harness.db.pool.begin().await.expect("begin");
    postbox::enqueue_many(&mut *tx, &messages)
        .await
        .expect("enqueue");
    tx.commit().await.expect("commit");

    let recorder = Recorder::default();
    let options = sub.options().concurrency(4);
    let consumer = sub.consumer("projection", recorder.clone(), options);
    let stats = stop_when(consumer, "all 200 applied", |stats| stats.applied() == 200).await;
    harness.relay.stop().await;

    let rows = applied(&sub).await;
    assert_eq!(rows.len(), 200);
    assert_eq!(
        stats.stale(),
        0,
        "the relay keeps each key in order, so nothing is stale"
    );
    let mut last: HashMap<String, i64> = HashMap::new();
    for (_, key, outbox_id) in rows {
        let key = key.expect("partition key header");
        let outbox_id = outbox_id.expect("outbox id header");
        let previous = last.insert(key.clone(), outbox_id);
        assert!(previous < Some(outbox_id), "key {key} applied out of order");
    }
    assert_eq!(last.len(), 7);
    // Each producer's trace context reached its handler.
    let traced: Vec<(i64, Option<String>)> =
        sqlx::query_as("select outbox_id, trace_id from applied order by outbox_id")
            .fetch_all(&sub.db.pool)
            .await
            .expect("trace ids");
    for (outbox_id, trace_id) in traced {
        assert_eq!(trace_id, Some(format!("{outbox_id:032x}")));
    }
}

#[tokio::test]
async fn stopping_lets_the_running_handler_commit() {
    let sub = subscriber().await;
    let (recorder, started, release) = Recorder::gated();
    let consumer = sub.consumer("billing", recorder.clone(), sub.options());
    let stats = consumer.stats();
    let id = Uuid::new_v4();
    sub.send(id, relay_headers(1, None), b"{}").await;
    tokio::time::timeout(DEADLINE, started.notified())
        .await
        .expect("handler started");
    let stopping = tokio::spawn(consumer.stop());
    release.notify_one();
    tokio::time::timeout(DEADLINE, stopping)
        .await
        .expect("stops in time")
        .expect("task joined")
        .expect("no panic");
    assert_eq!(stats.applied(), 1);
    assert_eq!(
        sub.inbox_row("billing", id).await.0.as_deref(),
        Some("applied")
    );
    assert_eq!(
        sub.rabbit.ready(&sub.queue).await,
        0,
        "acked before the channel closed"
    );
}

/// A batch handler: one multi-row insert per batch; fails any batch holding `poison`.
#[derive(Clone, Default)]
struct BatchRecorder {
    batches: Arc<std::sync::Mutex<Vec<usize>>>,
    poison: Option<Uuid>,
}

impl Handler for BatchRecorder {
    async fn handle(
        &self,
        tx: &mut Transaction<'_, Postgres>,
        message: &Incoming,
    ) -> Result<(), HandlerError> {
        self.handle_batch(tx, std::slice::from_ref(message)).await
    }

    async fn handle_batch(
        &self,
        tx: &mut Transaction<'_, Postgres>,
        messages: &[Incoming],
    ) -> Result<(), HandlerError> {
        self.batches
            .lock()
            .expect("batches lock")
            .push(messages.len());
        if let Some(poison) = self.poison {
            if messages.iter().any(|m| m.message_id() == poison) {
                return Err(HandlerError::permanent("poison in batch"));
            }
        }
        let ids: Vec<Uuid> = messages.iter().map(|m| m.message_id()).collect();
        let keys: Vec<Option<&str>> = messages.iter().map(|m| m.partition_key()).collect();
        let outbox_ids: Vec<Option<i64>> = messages.iter().map(|m| m.outbox_id()).collect();
        sqlx::query(
            "insert into applied (message_id, partition_key, outbox_id, attempt) \
             select id, key, outbox_id, 1 from unnest($1::uuid[], $2::text[], $3::int8[]) \
                 as m(id, key, outbox_id)",
        )
        .bind(&ids)
        .bind(&keys)
        .bind(&outbox_ids)
        .execute(&mut **tx)
        .await?;
        Ok(())
    }
}

#[tokio::test]
async fn batches_deduplicate_in_one_statement_and_fall_back_one_by_one() {
    let mut sub = subscriber().await;
    let ids: Vec<Uuid> = (0..40).map(|_| Uuid::new_v4()).collect();
    // One message failed once before (an undecided inbox row): a batch must treat it as new.
    sqlx::query(
        "insert into postbox.inbox (consumer, message_id, queue, attempts, last_error) \
         values ('billing', $1, $2, 1, 'earlier failure')",
    )
    .bind(ids[3])
    .bind(&sub.queue)
    .execute(&sub.db.pool)
    .await
    .expect("seed inbox");
    // Messages 0..10 were applied by an earlier run: they come back as duplicates.
    let mut tx = sub.db.pool.begin().await.expect("begin");
    postbox::inbox::receive_many(&mut tx, "billing", &sub.queue, &ids[10..20])
        .await
        .expect("pre-apply");
    tx.commit().await.expect("commit");
    for id in &ids {
        sub.send(*id, relay_headers(1, None), b"{}").await;
    }
    let poison = ids[30];
    let handler = BatchRecorder {
        poison: Some(poison),
        ..BatchRecorder::default()
    };
    let options = sub.options().batch_size(16);
    // Everything is queued before the consumer starts, so prefetch hands it full batches.
    let consumer = sub.consumer("billing", handler.clone(), options);
    let dead = sub.dead_letters.take(1, DEADLINE).await;
    assert_eq!(
        dead[0].message_id.as_deref(),
        Some(poison.to_string().as_str())
    );
    let stats = consumer.stats();
    wait_until("29 applied, 10 duplicates, 1 dead", DEADLINE, || async {
        (stats.applied() == 29 && stats.duplicates() == 10 && stats.dead_lettered() == 1)
            .then_some(())
    })
    .await;
    consumer.stop().await.expect("stops");

    let batches = handler.batches.lock().expect("lock").clone();
    assert!(
        batches.iter().any(|n| *n > 1),
        "messages were applied in batches: {batches:?}"
    );
    let mut applied: Vec<Uuid> = applied(&sub).await.into_iter().map(|r| r.0).collect();
    applied.sort();
    let mut expected: Vec<Uuid> = ids
        .iter()
        .enumerate()
        .filter(|(i, _)| !(10..20).contains(i) && *i != 30)
        .map(|(_, id)| *id)
        .collect();
    expected.sort();
    assert_eq!(applied, expected, "each new message applied exactly once");
    assert_eq!(
        sub.inbox_row("billing", ids[3]).await.0.as_deref(),
        Some("applied")
    );
    assert_eq!(
        sub.inbox_row("billing", ids[12]).await.1,
        1,
        "duplicate counted"
    );
    assert_eq!(sub.rabbit.ready(&sub.queue).await, 0, "all acked");
}

/// A batch decides each message as processing them one after another would: of a key's
/// positions 2, 1, 4, 3 only 2 and 4 are applied, whichever batches they fall into.
#[tokio::test]
async fn batches_skip_stale_messages_as_single_runs_would() {
    let sub = subscriber().await;
    let mut stale = Vec::new();
    for key in 0..10 {
        let key = format!("acc-{key}");
        for (position, late) in [(2, false), (1, true), (4, false), (3, true)] {
            let id = Uuid::new_v4();
            sub.send(id, relay_headers(position, Some(&key)), b"{}")
                .await;
            if late {
                stale.push(id);
            }
        }
    }
    let handler = BatchRecorder::default();
    let options = sub
        .options()
        .batch_size(16)
        .concurrency(1)
        .versioning(Versioning::OutboxId);
    let consumer = sub.consumer("billing", handler.clone(), options);
    let stats = stop_when(consumer, "20 applied, 20 stale", |stats| {
        stats.applied() == 20 && stats.stale() == 20
    })
    .await;
    assert_eq!(stats.failures(), 0);
    let batches = handler.batches.lock().expect("lock").clone();
    assert!(
        batches.iter().any(|n| *n > 1),
        "messages were applied in batches: {batches:?}"
    );
    let mut per_key: HashMap<String, Vec<i64>> = HashMap::new();
    for (_, key, outbox_id) in applied(&sub).await {
        per_key
            .entry(key.expect("keyed"))
            .or_default()
            .push(outbox_id.expect("outbox id"));
    }
    assert_eq!(per_key.len(), 10);
    assert!(
        per_key.values().all(|positions| positions == &[2, 4]),
        "only the newer positions applied, in order: {per_key:?}"
    );
    for id in stale {
        assert_eq!(
            sub.inbox_row("billing", id).await.0.as_deref(),
            Some("stale")
        );
    }
    let versions: Vec<i64> =
        sqlx::query_scalar("select version from postbox.inbox_versions where consumer = 'billing'")
            .fetch_all(&sub.db.pool)
            .await
            .expect("versions");
    assert_eq!(versions, [4; 10]);
}

#[tokio::test]
async fn a_database_outage_mid_stream_loses_and_doubles_nothing() {
    let sub = subscriber().await;
    let proxy = Proxy::start(common::host_port(&common::admin_database_url())).await;
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(4)
        .connect(&proxy.url_for(&sub.db.url))
        .await
        .expect("pool through the proxy");
    let recorder = Recorder::default();
    let options = sub
        .options()
        .concurrency(4)
        // One counted failure would dead-letter a message: outages must not count.
        .max_attempts(1);
    let consumer = sub.consumer_via(
        pool,
        &common::amqp_url(),
        "billing",
        recorder.clone(),
        options,
    );
    let ids: Vec<Uuid> = (0..300).map(|_| Uuid::new_v4()).collect();
    for (i, id) in ids.iter().enumerate() {
        sub.send(*id, relay_headers(i as i64, None), b"{}").await;
    }
    // Cut every Postgres connection three times while messages are in flight.
    for threshold in [50, 120, 200] {
        wait_until("progress", DEADLINE, || async {
            let done: i64 = sqlx::query_scalar("select count(*) from applied")
                .fetch_one(&sub.db.pool)
                .await
                .ok()?;
            (done >= threshold).then_some(())
        })
        .await;
        proxy.cut();
    }
    wait_until("all 300 decided", DEADLINE, || async {
        let decided: i64 =
            sqlx::query_scalar("select count(*) from postbox.inbox where outcome = 'applied'")
                .fetch_one(&sub.db.pool)
                .await
                .ok()?;
        (decided == 300).then_some(())
    })
    .await;
    let stats = consumer.stats();
    wait_until("all acked", DEADLINE, || async {
        (sub.rabbit.ready(&sub.queue).await == 0 && stats.applied() + stats.duplicates() >= 300)
            .then_some(())
    })
    .await;
    consumer.stop().await.expect("stops");
    let rows = applied(&sub).await;
    let distinct: std::collections::HashSet<Uuid> = rows.iter().map(|r| r.0).collect();
    assert_eq!(rows.len(), 300, "no message applied twice");
    assert_eq!(distinct, ids.into_iter().collect(), "no message lost");
}

#[tokio::test]
async fn running_the_whole_pipeline_twice_leaves_the_same_state() {
    let harness = Harness::start().await;
    let sub = subscriber().await;
    let handler = Balances::new(&sub).await;
    let consumer = sub.consumer("ledger", handler.clone(), sub.options());
    let stats = consumer.stats();
    // The producer's job: 30 deposits over 5 accounts, with ids derived from the input.
    let produce = || async {
        let messages: Vec<postbox::Message> = (0..30)
            .map(|n| {
                let account = format!("acc-{}", n % 5);
                postbox::Message::json(
                    sub.queue.as_str(),
                    &serde_json::json!({ "account": account, "balance": n * 10 }),
                )
                .expect("json")
                .partition_key(account)
                .deterministic_id(["deposit", &n.to_string()])
            })
            .collect();
        let mut tx = harness.db.pool.begin().await.expect("begin");
        postbox::enqueue_many(&mut *tx, &messages)
            .await
            .expect("enqueue");
        tx.commit().await.expect("commit");
    };
    let snapshot = || async {
        let balances: Vec<(String, i64, i64)> =
            sqlx::query_as("select account, version, balance from balances order by account")
                .fetch_all(&sub.db.pool)
                .await
                .expect("balances");
        let inbox: i64 =
            sqlx::query_scalar("select count(*) from postbox.inbox where outcome = 'applied'")
                .fetch_one(&sub.db.pool)
                .await
                .expect("inbox count");
        (balances, inbox)
    };

    produce().await;
    wait_until("first run applied", DEADLINE, || async {
        (stats.applied() == 30).then_some(())
    })
    .await;
    let first = snapshot().await;

    // Run it all again from the same input: the producer's outbox was restored from before
    // the run (its rows pending again), so the relay publishes every event a second time.
    sqlx::query("update postbox.outbox set published_at = null")
        .execute(&harness.db.pool)
        .await
        .expect("reset outbox");
    produce().await; // deterministic ids: a no-op for rows already there
    wait_until("second run absorbed", DEADLINE, || async {
        (stats.duplicates() == 30).then_some(())
    })
    .await;
    let second = snapshot().await;
    consumer.stop().await.expect("stops");
    harness.relay.stop().await;

    assert_eq!(first.1, 30);
    assert_eq!(first.0.len(), 5);
    assert_eq!(
        first, second,
        "destination state and row counts identical after each run"
    );
    assert_eq!(stats.applied(), 30);
    assert_eq!(handler.runs.load(Ordering::SeqCst), 30);
}

#[tokio::test]
async fn the_inbox_functions_work_inside_any_transaction() {
    use postbox::inbox::{receive, Receipt, Status};
    let sub = subscriber().await;
    let receipt = |message_id, version, source| Receipt {
        consumer: "own-loop",
        message_id,
        queue: "q",
        exchange: "",
        routing_key: "rk",
        partition_key: Some("key-1"),
        version: Some(version),
        seq: None,
        skip: false,
        source: Some(source),
    };
    let from = |source: &'static str, id: Uuid, version: i64, commit: bool| {
        let pool = sub.db.pool.clone();
        async move {
            let mut tx = pool.begin().await.expect("begin");
            let status = receive(&mut tx, &receipt(id, version, source))
                .await
                .expect("receive");
            if commit {
                tx.commit().await.expect("commit");
            } else {
                tx.rollback().await.expect("rollback");
            }
            status
        }
    };
    let status = |id, version, commit| from("outbox-a", id, version, commit);
    let first = Uuid::new_v4();
    // Rolled back: nothing recorded, so it is still new.
    assert_eq!(
        status(first, 5, false).await,
        Status::New { failed_attempts: 0 }
    );
    assert_eq!(
        status(first, 5, true).await,
        Status::New { failed_attempts: 0 }
    );
    assert_eq!(status(first, 5, true).await, Status::Duplicate);
    assert_eq!(status(Uuid::new_v4(), 4, true).await, Status::Stale);
    assert_eq!(
        status(Uuid::new_v4(), 6, true).await,
        Status::New { failed_attempts: 0 }
    );
    // Another outbox's positions say nothing about this one's: the same key from another
    // source has versions of its own.
    assert_eq!(
        from("outbox-b", Uuid::new_v4(), 2, true).await,
        Status::New { failed_attempts: 0 }
    );
    assert_eq!(
        from("outbox-b", Uuid::new_v4(), 1, true).await,
        Status::Stale
    );

    let failing = Uuid::new_v4();
    let failures =
        postbox::inbox::record_failure(&sub.db.pool, &receipt(failing, 7, "outbox-a"), "boom")
            .await
            .expect("record failure");
    assert_eq!(failures, Some(1));
    assert_eq!(
        status(failing, 7, true).await,
        Status::New { failed_attempts: 1 }
    );
}

#[tokio::test]
async fn receive_batch_decides_like_receiving_one_after_another() {
    use postbox::inbox::{receive, receive_batch, record_failure, Receipt, Status};
    let sub = subscriber().await;
    let receipt = |message_id, key: Option<&'static str>, version| Receipt {
        consumer: "own-loop",
        message_id,
        queue: "q",
        exchange: "",
        routing_key: "rk",
        partition_key: key,
        version,
        seq: None,
        skip: false,
        source: Some("outbox-a"),
    };
    let ids: Vec<Uuid> = (0..9).map(|_| Uuid::new_v4()).collect();
    let mut tx = sub.db.pool.begin().await.expect("begin");
    let before = receive(&mut tx, &receipt(ids[0], Some("key-1"), Some(5)))
        .await
        .expect("receive");
    assert_eq!(before, Status::New { failed_attempts: 0 });
    tx.commit().await.expect("commit");
    let failures = record_failure(
        &sub.db.pool,
        &receipt(ids[8], Some("key-3"), Some(1)),
        "boom",
    )
    .await
    .expect("record failure");
    assert_eq!(failures, Some(1));

    let batch = [
        receipt(ids[1], Some("key-1"), Some(4)), // older than the stored 5
        receipt(ids[2], Some("key-1"), Some(7)),
        receipt(ids[3], Some("key-1"), Some(6)), // older than 7, earlier in the batch
        receipt(ids[4], Some("key-2"), Some(1)), // a key seen for the first time
        receipt(ids[5], Some("key-2"), Some(1)), // the same version again
        receipt(ids[6], None, Some(1)),          // no key: never stale
        receipt(ids[2], Some("key-1"), Some(7)), // the same id twice
        receipt(ids[0], Some("key-1"), Some(5)), // decided before
        receipt(ids[8], Some("key-3"), Some(1)), // failed once before
    ];
    let new = Status::New { failed_attempts: 0 };
    let expected = [
        Status::Stale,
        new,
        Status::Stale,
        new,
        Status::Stale,
        new,
        Status::Duplicate,
        Status::Duplicate,
        Status::New { failed_attempts: 1 },
    ];
    // Rolled back, the batch leaves nothing behind: the same statuses come back.
    for commit in [false, true] {
        let mut tx = sub.db.pool.begin().await.expect("begin");
        let statuses = receive_batch(&mut tx, &batch).await.expect("receive batch");
        assert_eq!(statuses, expected, "commit: {commit}");
        if commit {
            tx.commit().await.expect("commit");
        } else {
            tx.rollback().await.expect("rollback");
        }
    }
    let outcomes: Vec<(Uuid, Option<String>)> =
        sqlx::query_as("select message_id, outcome from postbox.inbox where consumer = 'own-loop'")
            .fetch_all(&sub.db.pool)
            .await
            .expect("outcomes");
    let outcomes: HashMap<Uuid, Option<String>> = outcomes.into_iter().collect();
    let outcome = |i: usize| outcomes.get(&ids[i]).cloned().flatten();
    for i in [1, 3, 5] {
        assert_eq!(outcome(i).as_deref(), Some("stale"), "message {i}");
    }
    for i in [0, 2, 4, 6, 8] {
        assert_eq!(outcome(i).as_deref(), Some("applied"), "message {i}");
    }
    for i in [0, 2] {
        assert_eq!(
            sub.inbox_row("own-loop", ids[i]).await.1,
            1,
            "message {i}'s second copy counted as a duplicate"
        );
    }
    let mut versions: Vec<(String, i64, Uuid)> = sqlx::query_as(
        "select partition_key, version, message_id from postbox.inbox_versions \
         where consumer = 'own-loop'",
    )
    .fetch_all(&sub.db.pool)
    .await
    .expect("versions");
    versions.sort();
    assert_eq!(
        versions,
        [
            ("key-1".to_owned(), 7, ids[2]),
            ("key-2".to_owned(), 1, ids[4]),
            ("key-3".to_owned(), 1, ids[8]),
        ]
    );
    // Against what the batch stored, the next one is checked as well.
    let mut tx = sub.db.pool.begin().await.expect("begin");
    let next = [receipt(Uuid::new_v4(), Some("key-1"), Some(7))];
    assert_eq!(
        receive_batch(&mut tx, &next).await.expect("receive batch"),
        [Status::Stale]
    );
}

/// What README promises a batch costs: one inbox statement when every id is new and none
/// carries a version; with versions, one more for keys seen before, two when some are seen for
/// the first time, and one to record stale messages; a second for ids seen before. Never one
/// per message.
#[tokio::test]
async fn receive_batch_costs_a_few_statements_whatever_its_size() {
    use postbox::inbox::{receive_batch, Receipt};
    use sqlx::Connection;
    let sub = subscriber().await;
    let proxy = Proxy::start(common::host_port(&common::admin_database_url())).await;
    let mut conn = sqlx::PgConnection::connect(&proxy.url_for(&sub.db.url))
        .await
        .expect("connect through the proxy");
    let ids: Vec<Uuid> = (0..100).map(|_| Uuid::new_v4()).collect();
    const KEYS: [&str; 10] = ["k0", "k1", "k2", "k3", "k4", "k5", "k6", "k7", "k8", "k9"];
    let batch = |versions: Option<i64>| -> Vec<Receipt<'_>> {
        (0..100)
            .map(|i| Receipt {
                consumer: "own-loop",
                message_id: versions.map_or(ids[i], |_| Uuid::new_v4()),
                queue: "q",
                exchange: "",
                routing_key: "rk",
                partition_key: versions.map(|_| KEYS[i % 10]),
                version: versions.map(|base| base + i as i64),
                seq: None,
                skip: false,
                source: None,
            })
            .collect()
    };
    // Statements one batch in its own transaction costs, BEGIN and COMMIT aside.
    async fn statements(
        proxy: &Proxy,
        conn: &mut sqlx::PgConnection,
        batch: &[Receipt<'_>],
    ) -> u64 {
        let before = proxy.statements();
        let mut tx = conn.begin().await.expect("begin");
        receive_batch(&mut tx, batch).await.expect("receive batch");
        tx.commit().await.expect("commit");
        proxy.statements() - before - 2
    }
    assert_eq!(
        statements(&proxy, &mut conn, &batch(None)).await,
        1,
        "100 new ids, no versions"
    );
    assert_eq!(
        statements(&proxy, &mut conn, &batch(None)).await,
        2,
        "the same 100 ids again"
    );
    assert_eq!(
        statements(&proxy, &mut conn, &batch(Some(1_000))).await,
        3,
        "10 keys seen first"
    );
    assert_eq!(
        statements(&proxy, &mut conn, &batch(Some(2_000))).await,
        2,
        "10 keys seen before, newer"
    );
    assert_eq!(
        statements(&proxy, &mut conn, &batch(Some(0))).await,
        3,
        "10 keys seen before, all stale"
    );
}

/// Two transactions receiving batches with one key at once (two instances of a consumer): the
/// second waits for the first, then decides against what the first committed, whether the key
/// was seen before or is new to both.
#[tokio::test]
async fn concurrent_batches_on_one_key_decide_against_each_other() {
    use postbox::inbox::{receive_batch, Receipt, Status};
    let sub = subscriber().await;
    let receipt = |key: &'static str, version| Receipt {
        consumer: "own-loop",
        message_id: Uuid::new_v4(),
        queue: "q",
        exchange: "",
        routing_key: "rk",
        partition_key: Some(key),
        version: Some(version),
        seq: None,
        skip: false,
        source: None,
    };
    let new = Status::New { failed_attempts: 0 };
    let mut tx = sub.db.pool.begin().await.expect("begin");
    receive_batch(&mut tx, &[receipt("seen", 1)])
        .await
        .expect("receive batch");
    tx.commit().await.expect("commit");
    // (key, the first transaction's version, the second's batch, what the second decides)
    let cases = [
        ("seen", 5, vec![7, 3], vec![new, Status::Stale]),
        ("fresh", 9, vec![7], vec![Status::Stale]),
        ("fresh-too", 2, vec![1, 4], vec![Status::Stale, new]),
    ];
    for (key, first, second, expected) in cases {
        let mut holder = sub.db.pool.begin().await.expect("begin");
        let held = receive_batch(&mut holder, &[receipt(key, first)])
            .await
            .expect("receive batch");
        assert_eq!(held, [new]);
        let pool = sub.db.pool.clone();
        let newest = second.iter().copied().chain([first]).max();
        let waiter = tokio::spawn(async move {
            let batch: Vec<Receipt<'_>> = second.iter().map(|v| receipt(key, *v)).collect();
            let mut tx = pool.begin().await.expect("begin");
            let statuses = receive_batch(&mut tx, &batch).await.expect("receive batch");
            tx.commit().await.expect("commit");
            statuses
        });
        // The second batch waits for the first.
        sub.db.until_a_session_waits_on_a_lock().await;
        holder.commit().await.expect("commit");
        assert_eq!(waiter.await.expect("no panic"), expected, "key {key}");
        let stored: i64 = sqlx::query_scalar(
            "select version from postbox.inbox_versions where partition_key = $1",
        )
        .bind(key)
        .fetch_one(&sub.db.pool)
        .await
        .expect("version row");
        assert_eq!(Some(stored), newest, "key {key}");
    }
}

#[tokio::test]
async fn cleanup_deletes_only_old_decided_rows() {
    let sub = subscriber().await;
    // 2,500 old decided rows (more than one cleanup batch), a recent one, an old undecided one,
    // and an old one of another consumer.
    sqlx::query(
        "insert into postbox.inbox (consumer, message_id, queue, outcome, processed_at) \
         select 'billing', gen_random_uuid(), 'q', 'applied', now() - interval '2 days' \
         from generate_series(1, 2500)",
    )
    .execute(&sub.db.pool)
    .await
    .expect("old rows");
    sqlx::query(
        "insert into postbox.inbox (consumer, message_id, queue, outcome, processed_at, attempts) values \
         ('billing', gen_random_uuid(), 'q', 'applied', now(), 0), \
         ('billing', gen_random_uuid(), 'q', null, null, 3), \
         ('shipping', gen_random_uuid(), 'q', 'stale', now() - interval '2 days', 0)",
    )
    .execute(&sub.db.pool)
    .await
    .expect("other rows");
    let day = Duration::from_secs(24 * 3600);
    let deleted = postbox::inbox::cleanup(&sub.db.pool, Some("billing"), day)
        .await
        .expect("cleanup");
    assert_eq!(deleted, 2500);
    let left: Vec<(String, Option<String>)> =
        sqlx::query_as("select consumer, outcome from postbox.inbox order by consumer, outcome")
            .fetch_all(&sub.db.pool)
            .await
            .expect("rows left");
    assert_eq!(
        left,
        [
            ("billing".to_string(), Some("applied".to_string())),
            ("billing".to_string(), None),
            ("shipping".to_string(), Some("stale".to_string())),
        ]
    );
    assert_eq!(
        postbox::inbox::cleanup(&sub.db.pool, None, day)
            .await
            .expect("cleanup all"),
        1
    );
}

#[tokio::test]
async fn handlers_that_outlive_the_shutdown_timeout_roll_back() {
    let sub = subscriber().await;
    let (recorder, started, _never_released) = Recorder::gated();
    let options = sub.options().shutdown_timeout(Duration::from_millis(200));
    let consumer = sub.consumer("billing", recorder.clone(), options);
    let id = Uuid::new_v4();
    sub.send(id, relay_headers(1, None), b"{}").await;
    tokio::time::timeout(DEADLINE, started.notified())
        .await
        .expect("handler started");
    tokio::time::timeout(DEADLINE, consumer.stop())
        .await
        .expect("stops after the shutdown timeout")
        .expect("no panic");
    assert!(
        applied(&sub).await.is_empty(),
        "the handler's write rolled back"
    );
    let inbox: i64 = sqlx::query_scalar("select count(*) from postbox.inbox")
        .fetch_one(&sub.db.pool)
        .await
        .expect("count");
    assert_eq!(inbox, 0, "nothing recorded");
    wait_until("the message back in the queue", DEADLINE, || async {
        (sub.rabbit.ready(&sub.queue).await == 1).then_some(())
    })
    .await;
}

#[tokio::test]
async fn the_default_dead_letter_queue_is_declared_by_the_consumer() {
    let sub = subscriber().await;
    let options = sub
        .options()
        .dead_letter(postbox::inbox::DeadLetter::DefaultQueue);
    let recorder = Recorder {
        fail: Some(HandlerError::permanent),
        ..Recorder::default()
    };
    let consumer = sub.consumer("billing", recorder, options);
    sub.send(Uuid::new_v4(), relay_headers(1, None), b"{}")
        .await;
    stop_when(consumer, "dead-lettered", |stats| {
        stats.dead_lettered() == 1
    })
    .await;
    let dead_queue = format!("{}.dead", sub.queue);
    let in_dead_queue = sub.rabbit.ready(&dead_queue).await;
    sub.rabbit.delete_queue(&dead_queue).await;
    assert_eq!(in_dead_queue, 1);
}

#[tokio::test]
async fn a_dead_letter_that_cannot_be_published_waits_unacked_until_it_can() {
    let mut sub = subscriber().await;
    // The dead-letter exchange does not exist yet: publishing to it closes the channel.
    let exchange = format!("postbox-test-{}", Uuid::new_v4().simple());
    let options = sub
        .options()
        .dead_letter(postbox::inbox::DeadLetter::Exchange {
            exchange: exchange.clone(),
            routing_key: sub.dead_letter_queue.clone(),
        });
    let recorder = Recorder {
        fail: Some(HandlerError::permanent),
        ..Recorder::default()
    };
    let consumer = sub.consumer("billing", recorder.clone(), options);
    let id = Uuid::new_v4();
    sub.send(id, relay_headers(1, None), b"{}").await;
    wait_until("the handler failed", DEADLINE, || async {
        (recorder.runs.load(Ordering::SeqCst) == 1).then_some(())
    })
    .await;
    assert!(sub
        .dead_letters
        .drain_for(Duration::from_millis(300))
        .await
        .is_empty());
    assert_eq!(consumer.stats().dead_lettered(), 0, "not acked meanwhile");

    // The operator creates the exchange: the waiting dead letter goes out, then the ack.
    sub.rabbit
        .exchange_to(&exchange, &sub.dead_letter_queue)
        .await;
    expect_dead_letter(&mut sub, consumer, id).await;
    assert_eq!(
        recorder.runs.load(Ordering::SeqCst),
        1,
        "the handler ran once"
    );
    assert_eq!(sub.rabbit.ready(&sub.queue).await, 0);
}

#[tokio::test]
async fn two_instances_receiving_one_id_at_once_apply_it_once() {
    let sub = subscriber().await;
    let (first, started, release) = Recorder::gated();
    // One unacked delivery each, so the second copy must go to the second instance.
    let options = sub.options().prefetch(1);
    let a = sub.consumer("billing", first.clone(), options.clone());
    let id = Uuid::new_v4();
    sub.send(id, relay_headers(1, None), b"{}").await;
    tokio::time::timeout(DEADLINE, started.notified())
        .await
        .expect("first instance's handler started");
    let second = Recorder::default();
    let b = sub.consumer("billing", second.clone(), options);
    sub.send(id, relay_headers(1, None), b"{}").await;
    // The second instance's claim waits on the inbox row the first one holds.
    sub.db.until_a_session_waits_on_a_lock().await;
    release.notify_one();
    let (a_stats, b_stats) = (a.stats(), b.stats());
    wait_until("applied once, absorbed once", DEADLINE, || async {
        (a_stats.applied() == 1 && b_stats.duplicates() == 1).then_some(())
    })
    .await;
    a.stop().await.expect("stops");
    b.stop().await.expect("stops");
    assert_eq!(first.runs.load(Ordering::SeqCst), 1);
    assert_eq!(
        second.runs.load(Ordering::SeqCst),
        0,
        "the second never ran the handler"
    );
    assert_eq!(applied(&sub).await.len(), 1);
    assert_eq!(
        sub.inbox_row("billing", id).await,
        (Some("applied".into()), 1, 0)
    );
}
