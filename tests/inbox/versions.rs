//! State semantics and order: late and stale events, versions per source and from a header, the
//! relay → consumer path in key order.

use super::*;

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
