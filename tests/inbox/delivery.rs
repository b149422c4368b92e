//! Effectively once: duplicates, several consumers, a crash between commit and ack, shutdown.

use super::*;

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
