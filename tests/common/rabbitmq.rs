//! RabbitMQ for tests: exclusive, uniquely named queues and what a consumer of them received.

use std::time::Duration;

use futures_util::StreamExt;
use lapin::options::{BasicConsumeOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{Channel, Connection, ConnectionProperties};
use tokio::sync::mpsc;
use uuid::Uuid;

/// URL of the shared RabbitMQ.
pub fn amqp_url() -> String {
    std::env::var("POSTBOX_TEST_AMQP_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into())
}

/// One message as a consumer received it.
#[derive(Debug, Clone)]
pub struct Received {
    pub message_id: Option<String>,
    pub payload: Vec<u8>,
    pub content_type: Option<String>,
    pub headers: FieldTable,
    pub delivery_mode: Option<u8>,
}

impl Received {
    /// A header's value, if present.
    pub fn header(&self, name: &str) -> Option<&AMQPValue> {
        self.headers.inner().get(name)
    }

    /// The `x-postbox-outbox-id` header.
    pub fn outbox_id(&self) -> i64 {
        match self.header("x-postbox-outbox-id") {
            Some(AMQPValue::LongLongInt(id)) => *id,
            other => panic!("x-postbox-outbox-id header missing or mistyped: {other:?}"),
        }
    }

    /// The `x-postbox-seq` header: the message's number in its stream.
    pub fn seq(&self) -> Option<i64> {
        match self.header("x-postbox-seq")? {
            AMQPValue::LongLongInt(seq) => Some(*seq),
            other => panic!("x-postbox-seq header mistyped: {other:?}"),
        }
    }
}

/// A connection to the shared broker for declaring and consuming test queues. Queues are
/// exclusive to this connection, so the broker deletes them when the test ends, even on panic.
pub struct Rabbit {
    connection: Connection,
    channel: Channel,
}

impl Rabbit {
    pub async fn connect() -> Self {
        let connection = Connection::connect(&amqp_url(), ConnectionProperties::default())
            .await
            .expect("test RabbitMQ is reachable (is it running? see .ci/run)");
        let channel = connection.create_channel().await.expect("open channel");
        Self {
            connection,
            channel,
        }
    }

    /// Declares a uniquely named queue and returns its name.
    pub async fn queue(&self) -> String {
        let name = format!("postbox-test-{}", Uuid::new_v4().simple());
        self.channel
            .queue_declare(
                name.as_str().into(),
                QueueDeclareOptions {
                    exclusive: true,
                    ..QueueDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .expect("declare test queue");
        name
    }

    /// Declares a uniquely named queue other connections can consume (a consumer under test
    /// has its own connection). The broker deletes it once unused for 30 s.
    pub async fn shared_queue(&self) -> String {
        self.shared_queue_with(&[]).await
    }

    /// [`Rabbit::shared_queue`] with queue `arguments` on top (`x-max-length` and the like).
    pub async fn shared_queue_with(&self, extra: &[(&str, AMQPValue)]) -> String {
        let name = format!("postbox-test-{}", Uuid::new_v4().simple());
        let mut arguments = FieldTable::default();
        arguments.insert("x-expires".into(), AMQPValue::LongInt(30_000));
        for (key, value) in extra {
            arguments.insert((*key).into(), value.clone());
        }
        self.channel
            .queue_declare(
                name.as_str().into(),
                QueueDeclareOptions::default(),
                arguments,
            )
            .await
            .expect("declare shared test queue");
        name
    }

    /// Starts consuming `queue` (auto-ack); received messages arrive on the returned channel.
    pub async fn consume(&self, queue: &str) -> Inbox {
        let mut consumer = self
            .channel
            .basic_consume(
                queue.into(),
                format!("test-{}", Uuid::new_v4().simple()).as_str().into(),
                BasicConsumeOptions {
                    no_ack: true,
                    ..BasicConsumeOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .expect("consume test queue");
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Some(Ok(delivery)) = consumer.next().await {
                let props = &delivery.properties;
                let received = Received {
                    message_id: props.message_id().as_ref().map(|s| s.to_string()),
                    payload: delivery.data.clone(),
                    content_type: props.content_type().as_ref().map(|s| s.to_string()),
                    headers: props.headers().clone().unwrap_or_default(),
                    delivery_mode: *props.delivery_mode(),
                };
                if tx.send(received).is_err() {
                    break;
                }
            }
        });
        Inbox { rx }
    }

    pub fn connection(&self) -> &Connection {
        &self.connection
    }

    /// Publishes `payload` to `queue` through the default exchange, as postbox's relay would:
    /// persistent, with `message_id` (if any) and `headers`.
    pub async fn publish(
        &self,
        queue: &str,
        message_id: Option<Uuid>,
        headers: FieldTable,
        payload: &[u8],
    ) {
        let mut properties = lapin::BasicProperties::default()
            .with_delivery_mode(2)
            .with_headers(headers);
        if let Some(id) = message_id {
            properties = properties.with_message_id(id.to_string().into());
        }
        self.channel
            .basic_publish(
                "".into(),
                queue.into(),
                lapin::options::BasicPublishOptions::default(),
                payload,
                properties,
            )
            .await
            .expect("publish test message");
    }

    /// Declares the direct exchange `name` routing key `queue` to `queue`. It is auto-deleted
    /// once its binding goes with the test's exclusive queue.
    pub async fn exchange_to(&self, name: &str, queue: &str) {
        self.declare_exchange(name, queue, false).await;
    }

    /// As [`Rabbit::exchange_to`], but internal: clients may not publish to it (the broker
    /// closes the channel of one that tries).
    pub async fn internal_exchange_to(&self, name: &str, queue: &str) {
        self.declare_exchange(name, queue, true).await;
    }

    async fn declare_exchange(&self, name: &str, queue: &str, internal: bool) {
        self.channel
            .exchange_declare(
                name.into(),
                lapin::ExchangeKind::Direct,
                lapin::options::ExchangeDeclareOptions {
                    auto_delete: true,
                    internal,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .expect("declare test exchange");
        self.bind(name, queue, queue).await;
    }

    /// Binds `queue` to `exchange` with `routing_key` too.
    pub async fn bind(&self, exchange: &str, queue: &str, routing_key: &str) {
        self.channel
            .queue_bind(
                queue.into(),
                exchange.into(),
                routing_key.into(),
                lapin::options::QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .expect("bind test queue");
    }

    /// Deletes `queue` (for queues a test's code under test declared durable).
    pub async fn delete_queue(&self, queue: &str) {
        self.channel
            .queue_delete(queue.into(), lapin::options::QueueDeleteOptions::default())
            .await
            .expect("delete queue");
    }

    /// Messages ready in `queue` (not delivered to a consumer).
    pub async fn ready(&self, queue: &str) -> u32 {
        self.channel
            .queue_declare(
                queue.into(),
                QueueDeclareOptions {
                    passive: true,
                    ..QueueDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .expect("queue exists")
            .message_count()
    }
}

/// Headers postbox's relay sets: the outbox position and, if given, the partition key.
pub fn relay_headers(outbox_id: i64, partition_key: Option<&str>) -> FieldTable {
    let mut headers = FieldTable::default();
    headers.insert(
        "x-postbox-outbox-id".into(),
        AMQPValue::LongLongInt(outbox_id),
    );
    if let Some(key) = partition_key {
        headers.insert(
            "x-postbox-partition-key".into(),
            AMQPValue::LongString(key.into()),
        );
    }
    headers
}

/// Messages received from one queue.
pub struct Inbox {
    rx: mpsc::UnboundedReceiver<Received>,
}

impl Inbox {
    /// Receives until `n` messages have arrived; panics after `deadline` with how many came.
    pub async fn take(&mut self, n: usize, deadline: Duration) -> Vec<Received> {
        let mut out = Vec::with_capacity(n);
        let until = tokio::time::Instant::now() + deadline;
        while out.len() < n {
            match tokio::time::timeout_at(until, self.rx.recv()).await {
                Ok(Some(received)) => out.push(received),
                Ok(None) => panic!("consumer stopped after {} of {n} messages", out.len()),
                Err(_) => panic!(
                    "timed out after {deadline:?}: received {} of {n} messages",
                    out.len()
                ),
            }
        }
        out
    }

    /// Receives until every id in `expected` has arrived at least once; returns everything
    /// received, duplicates included. Panics after `deadline` with how many are missing.
    pub async fn until_all(
        &mut self,
        expected: &std::collections::HashSet<String>,
        deadline: Duration,
    ) -> Vec<Received> {
        let mut out = Vec::new();
        let mut missing = expected.clone();
        let until = tokio::time::Instant::now() + deadline;
        while !missing.is_empty() {
            match tokio::time::timeout_at(until, self.rx.recv()).await {
                Ok(Some(received)) => {
                    if let Some(id) = &received.message_id {
                        missing.remove(id);
                    }
                    out.push(received);
                }
                _ => panic!(
                    "after {deadline:?}: {} of {} messages never arrived",
                    missing.len(),
                    expected.len()
                ),
            }
        }
        out
    }

    /// Whatever has arrived by now, without waiting.
    pub fn received_so_far(&mut self) -> Vec<Received> {
        let mut out = Vec::new();
        while let Ok(received) = self.rx.try_recv() {
            out.push(received);
        }
        out
    }

    /// Whatever arrives within `window` (for asserting that nothing more comes).
    pub async fn drain_for(&mut self, window: Duration) -> Vec<Received> {
        let mut out = Vec::new();
        let until = tokio::time::Instant::now() + window;
        while let Ok(Some(received)) = tokio::time::timeout_at(until, self.rx.recv()).await {
            out.push(received);
        }
        out
    }
}
