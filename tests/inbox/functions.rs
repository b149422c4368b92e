//! The inbox functions inside any transaction, and the cleanup of old rows.

use super::*;

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
