//! The consumer library against the real Postgres and RabbitMQ: effectively-once processing,
//! duplicates, a crash between commit and ack, retries and dead letters, malformed messages,
//! stale events, and the relay → consumer path end to end.

#[path = "../common/mod.rs"]
mod common;

mod batches;
mod delivery;
mod failures;
mod functions;
mod outages;
mod versions;

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
