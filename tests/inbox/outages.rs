//! Postgres outages mid-stream, and running the whole pipeline twice.

use super::*;

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
