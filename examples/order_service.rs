//! An order service: writes an `orders` row and its `order.created` event in one transaction.
//!
//! ```sh
//! cargo run --example order_service -- 3      # place 3 orders
//! ```
//!
//! Run `postbox run` beside it (same DATABASE_URL) and the events arrive in the `orders` queue.
//! Settings: DATABASE_URL (default postgres://postgres@127.0.0.1:5432/postgres) and AMQP_URL
//! (used only to declare the `orders` queue so the events have somewhere to go).

use anyhow::Context;
use lapin::options::QueueDeclareOptions;
use lapin::types::FieldTable;
use postbox::{enqueue, Message};
use serde::Serialize;
use sqlx::postgres::PgPoolOptions;

#[derive(Serialize)]
struct OrderCreated {
    order_id: i64,
    customer: String,
    total_cents: i64,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let database_url = std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into());
    let amqp_url = std::env::var("AMQP_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into());
    let orders: i64 = match std::env::args().nth(1) {
        Some(n) => n
            .parse()
            .context("the argument is the number of orders to place")?,
        None => 1,
    };

    let pool = PgPoolOptions::new()
        .max_connections(2)
        .connect(&database_url)
        .await
        .context("connecting to Postgres")?;
    postbox::migrate(&pool).await?;
    sqlx::query(
        "create table if not exists orders (
            id bigint generated always as identity primary key,
            customer text not null,
            total_cents bigint not null,
            created_at timestamptz not null default now())",
    )
    .execute(&pool)
    .await?;

    // The relay publishes with the mandatory flag: make sure the events have a queue to land in.
    let connection = lapin::Connection::connect(&amqp_url, lapin::ConnectionProperties::default())
        .await
        .context("connecting to RabbitMQ")?;
    let channel = connection.create_channel().await?;
    channel
        .queue_declare(
            "orders".into(),
            QueueDeclareOptions {
                durable: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await?;

    for n in 0..orders {
        let customer = format!("customer-{}", n % 3);
        let total_cents = 1_000 + n * 250;

        // One transaction: the order and its event commit together or not at all.
        let mut tx = pool.begin().await?;
        let order_id: i64 = sqlx::query_scalar(
            "insert into orders (customer, total_cents) values ($1, $2) returning id",
        )
        .bind(&customer)
        .bind(total_cents)
        .fetch_one(&mut *tx)
        .await?;
        let event = OrderCreated {
            order_id,
            customer: customer.clone(),
            total_cents,
        };
        let message = Message::json("orders", &event)?
            .partition_key(format!("order-{order_id}"))
            .deterministic_id(["order.created", &order_id.to_string()])
            .header("type", "order.created");
        let enqueued = enqueue(&mut *tx, &message).await?;
        tx.commit().await?;
        println!(
            "order {order_id} placed; event {} (outbox id {:?})",
            enqueued.message_id, enqueued.id
        );
    }
    Ok(())
}
