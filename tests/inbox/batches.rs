//! Batches: one inbox statement for many messages, deciding as one-by-one runs would.

use super::*;

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
