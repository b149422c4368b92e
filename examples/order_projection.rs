//! A subscriber: keeps an `order_summaries` read model from the `order.created` events that
//! `order_service` writes and `postbox run` publishes, each event applied exactly once.
//!
//! ```sh
//! cargo run --example order_projection      # Ctrl-C to stop
//! ```
//!
//! The inbox (`postbox.inbox`) makes redeliveries harmless; the versioned upsert keeps a late
//! event from overwriting a newer summary. Settings: SUBSCRIBER_DATABASE_URL (default
//! DATABASE_URL, then postgres://postgres@127.0.0.1:5432/postgres) and AMQP_URL.

use anyhow::Context;
use postbox::inbox::{Consumer, Handler, HandlerError, Incoming, VersionedUpsert};
use serde::Deserialize;
use std::str::FromStr;

use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{Postgres, Transaction};

#[derive(Deserialize)]
struct OrderCreated {
    order_id: i64,
    customer: String,
    total_cents: i64,
}

struct OrderSummaries {
    upsert: VersionedUpsert,
}

impl Handler for OrderSummaries {
    async fn handle(
        &self,
        tx: &mut Transaction<'_, Postgres>,
        message: &Incoming,
    ) -> Result<(), HandlerError> {
        // A payload that does not fit is malformed: dead-lettered, not retried.
        let event: OrderCreated = message.json()?;
        // The outbox position orders a key's events; a replayed older event changes nothing.
        let version = message
            .outbox_id()
            .ok_or_else(|| HandlerError::permanent("not published by postbox: no outbox id"))?;
        let applied = self
            .upsert
            .query()
            .bind(event.order_id)
            .bind(version)
            .bind(&event.customer)
            .bind(event.total_cents)
            .execute(&mut **tx)
            .await?
            .rows_affected();
        println!(
            "order {} ({} cents for {}): {}",
            event.order_id,
            event.total_cents,
            event.customer,
            if applied == 1 {
                "summarized"
            } else {
                "older than what we have"
            }
        );
        Ok(())
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    postbox::telemetry::init();
    let database_url = std::env::var("SUBSCRIBER_DATABASE_URL")
        .or_else(|_| std::env::var("DATABASE_URL"))
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into());
    let amqp_url = std::env::var("AMQP_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into());

    let connect = PgConnectOptions::from_str(&database_url).context("parsing the database URL")?;
    let pool = PgPoolOptions::new()
        .max_connections(4)
        .connect_with(connect)
        .await
        .context("connecting to Postgres")?;
    // A subscriber's database needs only the inbox part of the schema.
    postbox::migrate_parts(&pool, &[postbox::Part::Inbox]).await?;
    sqlx::query(
        "create table if not exists order_summaries (
            order_id bigint primary key,
            version bigint not null,
            customer text not null,
            total_cents bigint not null)",
    )
    .execute(&pool)
    .await?;

    let handler = OrderSummaries {
        upsert: VersionedUpsert::new(
            "order_summaries",
            &["order_id"],
            "version",
            &["customer", "total_cents"],
        ),
    };
    let broker = postbox::inbox::Broker::new([amqp_url]);
    let consumer = Consumer::builder(pool, broker)
        .queue("orders")
        .name("order-projection")
        .handler(handler)?
        .spawn();
    tokio::signal::ctrl_c().await?;
    let stats = consumer.stats();
    consumer.stop().await?;
    println!(
        "applied {}, duplicates {}, stale {}, dead-lettered {}",
        stats.applied(),
        stats.duplicates(),
        stats.stale(),
        stats.dead_lettered()
    );
    Ok(())
}
