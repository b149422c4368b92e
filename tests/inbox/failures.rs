//! Failing handlers: retries, dead letters, panics, malformed messages, Postgres refusing a
//! message.

use super::*;

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
