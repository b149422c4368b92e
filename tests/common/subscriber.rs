//! The consumer side: a database with the inbox schema only, a queue, and its dead letters.

use std::time::Duration;

use lapin::types::{AMQPValue, FieldTable};
use sqlx::PgPool;
use uuid::Uuid;

use super::*;

/// The consumer side: a database with the inbox schema only, a queue to consume, and an
/// exclusive queue the consumer's dead letters are routed to, read by `dead_letters`.
pub struct Subscriber {
    pub db: TestDb,
    pub rabbit: Rabbit,
    pub queue: String,
    pub dead_letter_queue: String,
    pub dead_letters: Inbox,
}

impl Subscriber {
    pub async fn start() -> Self {
        Self::start_with_queue_arguments(&[]).await
    }

    /// [`Subscriber::start`] with a queue declared with `arguments`.
    pub async fn start_with_queue_arguments(arguments: &[(&str, AMQPValue)]) -> Self {
        let db = TestDb::empty().await;
        postbox::migrate_parts(&db.pool, &[postbox::Part::Inbox])
            .await
            .expect("migrate inbox");
        let rabbit = Rabbit::connect().await;
        let queue = rabbit.shared_queue_with(arguments).await;
        let dead_letter_queue = rabbit.queue().await;
        let dead_letters = rabbit.consume(&dead_letter_queue).await;
        Self {
            db,
            rabbit,
            queue,
            dead_letter_queue,
            dead_letters,
        }
    }

    /// Publishes message `id` to the consumer's queue, as the relay would.
    pub async fn send(&self, id: Uuid, headers: FieldTable, payload: &[u8]) {
        self.rabbit
            .publish(&self.queue, Some(id), headers, payload)
            .await;
    }

    /// Quick retries, dead letters to the test's own queue.
    pub fn options(&self) -> postbox::inbox::ConsumerOptions {
        postbox::inbox::ConsumerOptions::default()
            .retry_initial_delay(Duration::from_millis(10))
            .retry_max_delay(Duration::from_millis(50))
            .dead_letter(postbox::inbox::DeadLetter::Exchange {
                exchange: String::new(),
                routing_key: self.dead_letter_queue.clone(),
            })
            .shutdown_timeout(Duration::from_secs(10))
    }

    /// Starts a consumer named `name` of the test's queue, writing through `pool` and
    /// connecting to the broker at `amqp_url` (either may go through a proxy).
    pub fn consumer_via<H: postbox::inbox::Handler>(
        &self,
        pool: PgPool,
        amqp_url: &str,
        name: &str,
        handler: H,
        options: postbox::inbox::ConsumerOptions,
    ) -> postbox::inbox::ConsumerHandle {
        postbox::telemetry::init();
        postbox::inbox::Consumer::builder(pool, postbox::inbox::Broker::new([amqp_url]))
            .queue(self.queue.clone())
            .name(name)
            .options(options)
            .handler(handler)
            .expect("valid consumer options")
            .spawn()
    }

    /// Starts a consumer named `name` of the test's queue.
    pub fn consumer<H: postbox::inbox::Handler>(
        &self,
        name: &str,
        handler: H,
        options: postbox::inbox::ConsumerOptions,
    ) -> postbox::inbox::ConsumerHandle {
        self.consumer_via(self.db.pool.clone(), &amqp_url(), name, handler, options)
    }

    /// `(outcome, duplicates, attempts)` of a message in the inbox.
    pub async fn inbox_row(&self, consumer: &str, message_id: Uuid) -> (Option<String>, i32, i32) {
        sqlx::query_as(
            "select outcome, duplicates, attempts from postbox.inbox \
             where consumer = $1 and message_id = $2",
        )
        .bind(consumer)
        .bind(message_id)
        .fetch_one(&self.db.pool)
        .await
        .expect("inbox row exists")
    }
}
