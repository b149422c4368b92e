//! The message builder producers fill in before enqueueing.

use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::{Map, Value};
use uuid::Uuid;

use super::id::deterministic_id;
use super::InvalidMessage;

/// A message body: text is stored as written in `payload`, bytes in `payload_bytes`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Payload {
    /// UTF-8 text: JSON, XML, CSV...
    Text(String),
    /// Anything else (protobuf, Avro, compressed data...).
    Bytes(Vec<u8>),
}

/// One event to enqueue into `postbox.outbox`. Build with [`Message::json`], [`Message::text`]
/// or [`Message::bytes`], then chain the optional parts.
///
/// ```
/// # fn main() -> Result<(), postbox::outbox::InvalidMessage> {
/// use postbox::Message;
/// let message = Message::json("orders", &serde_json::json!({"order_id": 42}))?
///     .exchange("events")
///     .partition_key("order-42")
///     .deterministic_id(["order.created", "42"])
///     .header("type", "order.created");
/// # Ok(()) }
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct Message {
    pub(crate) message_id: Option<Uuid>,
    pub(crate) exchange: String,
    pub(crate) routing_key: String,
    pub(crate) partition_key: Option<String>,
    pub(crate) payload: Payload,
    pub(crate) content_type: String,
    pub(crate) headers: Map<String, Value>,
    pub(crate) available_at: Option<DateTime<Utc>>,
    pub(crate) delay: Option<Duration>,
}

/// The longest field name in `headers`, nested objects included: AMQP carries each as a short
/// string.
fn longest_name(headers: &Map<String, Value>) -> Option<&str> {
    fn nested(value: &Value) -> Option<&str> {
        match value {
            Value::Object(map) => longest_name(map),
            Value::Array(items) => items.iter().filter_map(nested).max_by_key(|n| n.len()),
            _ => None,
        }
    }
    headers
        .iter()
        .flat_map(|(name, value)| [Some(name.as_str()), nested(value)])
        .flatten()
        .max_by_key(|name| name.len())
}

impl Message {
    /// Checks the rules of the SQL contract that Postgres does not enforce on insert (the
    /// relay would refuse such a row, marking it dead): AMQP short strings of at most 255
    /// bytes, a content type, and a routing key when the exchange is the default one.
    pub(crate) fn check(&self) -> Result<(), InvalidMessage> {
        let refuse = |reason: String| Err(InvalidMessage::new(reason));
        for (what, value) in [
            ("exchange", &self.exchange),
            ("routing key", &self.routing_key),
            ("content type", &self.content_type),
        ] {
            if value.len() > 255 {
                return refuse(format!(
                    "{what} of {} bytes is longer than AMQP allows (255 bytes)",
                    value.len()
                ));
            }
        }
        if let Some(name) = longest_name(&self.headers).filter(|name| name.len() > 255) {
            return refuse(format!(
                "header name of {} bytes is longer than AMQP allows (255 bytes)",
                name.len()
            ));
        }
        if self.content_type.is_empty() {
            return refuse("content type must not be empty".into());
        }
        if self.exchange.is_empty() && self.routing_key.is_empty() {
            return refuse(
                "routing key must not be empty when the exchange is the default one (\"\"), \
                 which routes by queue name"
                    .into(),
            );
        }
        Ok(())
    }

    fn new(routing_key: impl Into<String>, payload: Payload, content_type: &str) -> Self {
        Self {
            message_id: None,
            exchange: String::new(),
            routing_key: routing_key.into(),
            partition_key: None,
            payload,
            content_type: content_type.to_string(),
            headers: Map::new(),
            available_at: None,
            delay: None,
        }
    }

    /// A message whose body is `value` serialized as JSON (`application/json`).
    pub fn json<T: Serialize + ?Sized>(
        routing_key: impl Into<String>,
        value: &T,
    ) -> Result<Self, InvalidMessage> {
        let body = serde_json::to_string(value)
            .map_err(|e| InvalidMessage::new(format!("payload does not serialize to JSON: {e}")))?;
        Ok(Self::new(
            routing_key,
            Payload::Text(body),
            "application/json",
        ))
    }

    /// A message whose body is `text` as is (`text/plain` unless [`Message::content_type`] says otherwise).
    pub fn text(routing_key: impl Into<String>, text: impl Into<String>) -> Self {
        Self::new(routing_key, Payload::Text(text.into()), "text/plain")
    }

    /// A message whose body is `bytes` as is (`application/octet-stream` unless told otherwise).
    pub fn bytes(routing_key: impl Into<String>, bytes: impl Into<Vec<u8>>) -> Self {
        Self::new(
            routing_key,
            Payload::Bytes(bytes.into()),
            "application/octet-stream",
        )
    }

    /// The exchange to publish to; the default `""` routes by queue name.
    pub fn exchange(mut self, exchange: impl Into<String>) -> Self {
        self.exchange = exchange.into();
        self
    }

    /// The ordering key (an aggregate's id, say): the relay numbers the messages sharing it and
    /// a destination in the order their transactions committed, and consumers apply them in
    /// that order (header `x-postbox-seq`).
    pub fn partition_key(mut self, key: impl Into<String>) -> Self {
        self.partition_key = Some(key.into());
        self
    }

    /// The AMQP content type.
    pub fn content_type(mut self, content_type: impl Into<String>) -> Self {
        self.content_type = content_type.into();
        self
    }

    /// Adds an AMQP header (strings, numbers, booleans, arrays and objects are carried over).
    pub fn header(mut self, name: impl Into<String>, value: impl Into<Value>) -> Self {
        self.headers.insert(name.into(), value.into());
        self
    }

    /// The W3C trace context of the code writing the event (`traceparent`, as your tracing
    /// system formats it). It travels as the `traceparent` header; the consumer library
    /// continues the trace in its handler span. A malformed value is refused, naming it.
    pub fn traceparent(self, value: &str) -> Result<Self, InvalidMessage> {
        if crate::trace::TraceParent::parse(value).is_none() {
            return Err(InvalidMessage::new(format!(
                "traceparent {value:?} is not a W3C version-00 trace context \
                 (00-<32 hex>-<16 hex>-<2 hex>)"
            )));
        }
        Ok(self.header(crate::trace::HEADER, value.trim()))
    }

    /// An explicit message id. Without one, the producer draws a time-ordered UUIDv7 (rows
    /// written from SQL get the column default).
    pub fn message_id(mut self, id: Uuid) -> Self {
        self.message_id = Some(id);
        self
    }

    /// A message id derived from business key fields (see [`crate::deterministic_id`]), so that
    /// enqueueing the same event again is a no-op.
    pub fn deterministic_id<I, S>(self, fields: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        self.message_id(deterministic_id(fields))
    }

    /// Publish no earlier than `at`.
    pub fn available_at(mut self, at: DateTime<Utc>) -> Self {
        self.available_at = Some(at);
        self.delay = None;
        self
    }

    /// Publish no earlier than `delay` after the enqueueing transaction's start (database clock).
    pub fn delay(mut self, delay: Duration) -> Self {
        self.delay = Some(delay);
        self.available_at = None;
        self
    }

    /// The explicit message id, if one was set.
    pub fn id(&self) -> Option<Uuid> {
        self.message_id
    }
}
