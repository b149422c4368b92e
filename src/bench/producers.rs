//! What the outbox costs an application's commits: concurrent producers committing a business
//! row plus an event, into a minimal outbox table and into `postbox.outbox` as shipped (its
//! NOTIFY trigger included, no relay running), side by side and interleaved.

use std::sync::Arc;
use std::time::{Duration, Instant};

use sqlx::{Acquire, PgPool};
use tokio::sync::Barrier;

use super::error::{BenchError, Result};
use super::report::progress_figures;
use super::{summarize, BenchOptions, CaseResult, Env};
use crate::error::Context;
use crate::outbox::Message;

/// Producer connections of the single-event case, one row each.
const CLIENTS: [u32; 2] = [16, 64];

/// Producer connections of the `enqueue_many` case.
const MANY_CLIENTS: u32 = 16;

/// Events per transaction in the `enqueue_many` case.
const MANY_EVENTS: usize = 10;

/// Connections the server must allow beyond the producers' (the bench's own pool, admin
/// sessions, whatever else runs).
const SPARE_CONNECTIONS: u32 = 10;

/// What each producer transaction writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Work {
    /// A business row and one event in the minimal outbox.
    MinimalOne,
    /// A business row and one event in `postbox.outbox`, plain SQL.
    PostboxOne,
    /// A business row and [`MANY_EVENTS`] events in the minimal outbox, one multi-row insert.
    MinimalMany,
    /// A business row and `postbox::enqueue_many` of [`MANY_EVENTS`] messages.
    PostboxMany,
}

impl Work {
    fn events(self) -> u64 {
        match self {
            Work::MinimalOne | Work::PostboxOne => 1,
            Work::MinimalMany | Work::PostboxMany => MANY_EVENTS as u64,
        }
    }
}

const CREATE_ORDERS: &str = "create table bench_orders (
    id bigint generated always as identity primary key,
    customer text not null,
    total_cents bigint not null,
    created_at timestamptz not null default now())";

const CREATE_MINIMAL: &str = "create table bench_minimal_outbox (
    id bigint generated always as identity primary key,
    message_id uuid not null default gen_random_uuid() unique,
    routing_key text not null,
    payload text not null,
    published_at timestamptz null)";

/// The producer cases: 16 and 64 clients committing single-event transactions, and 16 clients
/// committing 10 events per transaction through `enqueue_many`.
pub(super) async fn producers_cases(env: &Env, options: &BenchOptions) -> Result<Vec<CaseResult>> {
    let most = CLIENTS.iter().copied().max().unwrap_or(0).max(MANY_CLIENTS);
    check_max_connections(env, most).await?;
    let window = Duration::from_secs_f64(if options.smoke { 0.5 } else { 5.0 });
    let mut results = Vec::new();
    let shapes = CLIENTS
        .iter()
        .map(|&n| (n, Work::MinimalOne, Work::PostboxOne))
        .chain([(MANY_CLIENTS, Work::MinimalMany, Work::PostboxMany)]);
    for (clients, minimal_work, postbox_work) in shapes {
        let many = minimal_work == Work::MinimalMany;
        let (case, unit) = if many {
            (format!("producers, enqueue_many × {MANY_EVENTS}"), "rows/s")
        } else {
            (format!("producers, {clients} clients"), "tps")
        };
        let mut minimal = Vec::new();
        let mut postbox = Vec::new();
        for rep in 0..options.repetitions {
            // Interleaved, so that a noisy moment hurts both sides alike; the order alternates
            // between repetitions so that neither side always goes first.
            let order = if rep % 2 == 0 {
                [minimal_work, postbox_work]
            } else {
                [postbox_work, minimal_work]
            };
            for work in order {
                let committed = run_side(env, clients, work, window).await?;
                let rate = (committed * work.events()) as f64 / window.as_secs_f64();
                let side = match work {
                    Work::MinimalOne | Work::MinimalMany => "minimal outbox",
                    Work::PostboxOne | Work::PostboxMany => "postbox.outbox",
                };
                progress_figures(
                    options,
                    &format!("{case}, {side} #{}", rep + 1),
                    &format!("{rate:.0} {unit} ({committed} transactions)"),
                );
                match work {
                    Work::MinimalOne | Work::MinimalMany => minimal.push(rate),
                    Work::PostboxOne | Work::PostboxMany => postbox.push(rate),
                }
            }
        }
        let (minimal_median, minimal_min, minimal_max) = summarize(&mut minimal);
        let mut result = CaseResult::from_samples(case, "-", &mut postbox, unit, None);
        let ratio = result.times(minimal_median);
        let what = if many {
            format!(
                "{clients} clients, each transaction: 1 bench_orders row + {MANY_EVENTS} events \
                 (postbox: postbox::enqueue_many; minimal: one multi-row insert into \
                 bench_minimal_outbox)"
            )
        } else {
            format!(
                "{clients} clients, each transaction: 1 bench_orders row + 1 event (postbox: \
                 insert into postbox.outbox as shipped, NOTIFY trigger included; minimal: \
                 insert into bench_minimal_outbox)"
            )
        };
        result.note = format!(
            "value: postbox.outbox; minimal outbox {minimal_median:.0} {unit} \
             ({minimal_min:.0}–{minimal_max:.0}); ratio postbox ÷ minimal {ratio:.2} (target \
             ≥ 0.9); {what}; ~{} B JSON payload, synchronous_commit on, {:.1} s per side per \
             repetition, no relay running",
            payload(0, 0).len(),
            window.as_secs_f64()
        );
        results.push(result);
    }
    reset_tables(env, false).await?;
    sqlx::query("drop table if exists bench_orders")
        .execute(&env.pool)
        .await
        .context("dropping bench_orders")?;
    Ok(results)
}

/// Fails unless the server accepts `clients` producer connections with room to spare.
async fn check_max_connections(env: &Env, clients: u32) -> Result<()> {
    let setting: String = sqlx::query_scalar("show max_connections")
        .fetch_one(&env.pool)
        .await
        .context("reading max_connections")?;
    let allowed: u32 = setting.trim().parse().unwrap_or(0);
    let needed = clients + SPARE_CONNECTIONS;
    if allowed < needed {
        return Err(BenchError::Setting(crate::error::InvalidSetting::new(
            "max_connections (Postgres server)",
            setting,
            format!(
                "the producers case opens {clients} connections at once and needs \
                 max_connections ≥ {needed}; raise it in postgresql.conf (restart needed) or \
                 leave out the producers case"
            ),
        )));
    }
    Ok(())
}

/// Recreates the business table and the minimal outbox (`with_minimal`), empties
/// `postbox.outbox`, and vacuums and analyzes them, so that neither side inherits the other's
/// rows, dead tuples or statistics (autovacuum is off on the bench server).
async fn reset_tables(env: &Env, with_minimal: bool) -> Result<()> {
    let mut statements = vec![
        "drop table if exists bench_orders",
        "drop table if exists bench_minimal_outbox",
        CREATE_ORDERS,
    ];
    if with_minimal {
        statements.push(CREATE_MINIMAL);
    }
    statements.push("truncate postbox.outbox");
    for statement in statements {
        sqlx::query(statement)
            .execute(&env.pool)
            .await
            .context("resetting the producers case's tables")?;
    }
    let vacuum = if with_minimal {
        "vacuum analyze bench_orders, bench_minimal_outbox, postbox.outbox"
    } else {
        "vacuum analyze bench_orders, postbox.outbox"
    };
    sqlx::query(vacuum)
        .execute(&env.pool)
        .await
        .context("vacuuming the producers case's tables")?;
    // Best effort: a checkpoint due in one side's window would slow only that side.
    let _ = sqlx::query("checkpoint").execute(&env.pool).await;
    Ok(())
}

/// One side: `clients` connections committing `work` transactions as fast as they can for
/// `window`; returns the transactions committed within it.
async fn run_side(env: &Env, clients: u32, work: Work, window: Duration) -> Result<u64> {
    let with_minimal = matches!(work, Work::MinimalOne | Work::MinimalMany);
    reset_tables(env, with_minimal).await?;
    let pool = env.pool_of(clients).await?;
    let barrier = Arc::new(Barrier::new(clients as usize));
    let producers: Vec<_> = (0..clients)
        .map(|producer| {
            tokio::spawn(produce(
                pool.clone(),
                barrier.clone(),
                producer,
                work,
                window,
            ))
        })
        .collect();
    let mut committed = 0;
    let mut failure = None;
    for producer in producers {
        match producer.await {
            Ok(Ok(n)) => committed += n,
            Ok(Err(error)) => failure = failure.or(Some(error)),
            Err(error) => {
                failure = failure.or(Some(BenchError::Failed(format!(
                    "a bench producer task failed: {error}"
                ))))
            }
        }
    }
    pool.close().await;
    match failure {
        Some(error) => Err(error),
        // Even a smoke run's window commits many: none means the producers never got going.
        None if committed == 0 => Err(BenchError::Failed(format!(
            "bench producers ({work:?}, {clients} clients) committed nothing in {:.1} s",
            window.as_secs_f64()
        ))),
        None => Ok(committed),
    }
}

/// One producer: connects, waits for the others, then commits transactions until `window`
/// has passed; counts those whose commit returned within it.
async fn produce(
    pool: PgPool,
    barrier: Arc<Barrier>,
    producer: u32,
    work: Work,
    window: Duration,
) -> Result<u64> {
    let mut connection = pool
        .acquire()
        .await
        .context("connecting a bench producer")?;
    let payloads: Vec<String> = (0..MANY_EVENTS)
        .map(|i| payload(producer, i as u64))
        .collect();
    let messages: Vec<Message> = payloads
        .iter()
        .map(|p| Message::text("orders", p.as_str()).content_type("application/json"))
        .collect();
    barrier.wait().await;
    let deadline = Instant::now() + window;
    let mut committed = 0u64;
    let mut seq = 0u64;
    while Instant::now() < deadline {
        seq += 1;
        let mut tx = connection
            .begin()
            .await
            .context("beginning a producer transaction")?;
        sqlx::query("insert into bench_orders (customer, total_cents) values ($1, $2)")
            .bind(format!("customer-{producer}"))
            .bind((seq % 100_000) as i64 * 100 + 99)
            .execute(&mut *tx)
            .await
            .context("inserting a business row")?;
        match work {
            Work::MinimalOne => {
                sqlx::query(
                    "insert into bench_minimal_outbox (routing_key, payload) values ('orders', $1)",
                )
                .bind(&payloads[0])
                .execute(&mut *tx)
                .await
                .context("inserting into the minimal outbox")?;
            }
            Work::PostboxOne => {
                sqlx::query(
                    "insert into postbox.outbox (routing_key, payload) values ('orders', $1)",
                )
                .bind(&payloads[0])
                .execute(&mut *tx)
                .await
                .context("inserting into postbox.outbox")?;
            }
            Work::MinimalMany => {
                sqlx::query(
                    "insert into bench_minimal_outbox (routing_key, payload) \
                     select 'orders', p from unnest($1::text[]) as p",
                )
                .bind(&payloads)
                .execute(&mut *tx)
                .await
                .context("inserting into the minimal outbox")?;
            }
            Work::PostboxMany => {
                crate::outbox::enqueue_many(&mut *tx, &messages).await?;
            }
        }
        tx.commit()
            .await
            .context("committing a producer transaction")?;
        if Instant::now() <= deadline {
            committed += 1;
        }
    }
    Ok(committed)
}

/// A JSON event of about 200 bytes.
fn payload(producer: u32, event: u64) -> String {
    let head = format!(
        r#"{{"type":"order.created","order_id":"{producer:04}-{event:08}","customer":"customer-{producer:04}","total_cents":12999,"currency":"EUR","items":[{{"sku":"SKU-000123","qty":1}}],"note":""#
    );
    let pad = 200usize.saturating_sub(head.len() + 2);
    format!("{head}{}\"}}", "x".repeat(pad))
}
