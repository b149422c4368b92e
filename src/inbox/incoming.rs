//! A delivery as the handler sees it: typed accessors over the AMQP message postbox published.

use lapin::message::Delivery;
use lapin::types::AMQPValue;
use lapin::BasicProperties;
use serde::de::DeserializeOwned;
use uuid::Uuid;

use super::HandlerError;
use crate::contract::{
    HEADER_OUTBOX_ID, HEADER_PARTITION_KEY, HEADER_SEQ, HEADER_SKIP, HEADER_SOURCE,
};

/// One message being processed.
#[derive(Debug, Clone)]
pub struct Incoming {
    pub(crate) message_id: Uuid,
    pub(crate) queue: String,
    pub(crate) exchange: String,
    pub(crate) routing_key: String,
    pub(crate) redelivered: bool,
    pub(crate) properties: BasicProperties,
    pub(crate) payload: Vec<u8>,
    pub(crate) attempt: u32,
    /// Taken from the waiting messages because its turn came (not a delivery).
    pub(crate) its_turn: bool,
}

impl Incoming {
    /// Reads what postbox needs from a delivery: its message id must be a UUID.
    pub(crate) fn parse(queue: &str, delivery: &mut Delivery) -> Result<Self, String> {
        let message_id = match delivery.properties.message_id() {
            None => return Err("the message has no message_id property".into()),
            Some(id) => Uuid::parse_str(id.as_str())
                .map_err(|e| format!("message_id {:?} is not a UUID: {e}", id.as_str()))?,
        };
        Ok(Self {
            message_id,
            queue: queue.to_string(),
            exchange: delivery.exchange.to_string(),
            routing_key: delivery.routing_key.to_string(),
            redelivered: delivery.redelivered,
            properties: delivery.properties.clone(),
            payload: std::mem::take(&mut delivery.data),
            attempt: 1,
            its_turn: false,
        })
    }

    /// A message held in `postbox.inbox_waiting` whose turn came, and why its stored properties
    /// could not be read back, if they could not (it then carries only what its stream says).
    pub(crate) fn from_waiting(
        stream: &crate::store::inbox_streams::StreamKey,
        waiting: crate::store::inbox_streams::Waiting,
    ) -> (Self, Option<String>) {
        let parsed: Result<BasicProperties, _> = serde_json::from_str(&waiting.properties);
        let failure = parsed.as_ref().err().map(|e| {
            format!(
                "the stored properties of message {} do not parse: {e}",
                waiting.message_id
            )
        });
        // Unreadable properties: what the stream says of the message, so it can still be
        // dead-lettered with its body and take its turn.
        let properties = parsed.unwrap_or_else(|_| {
            let mut headers = lapin::types::FieldTable::default();
            headers.insert(HEADER_SEQ.into(), AMQPValue::LongLongInt(waiting.seq));
            headers.insert(
                HEADER_PARTITION_KEY.into(),
                AMQPValue::LongString(stream.partition_key.as_str().into()),
            );
            headers.insert(
                HEADER_SOURCE.into(),
                AMQPValue::LongString(stream.source.as_str().into()),
            );
            BasicProperties::default()
                .with_message_id(waiting.message_id.to_string().into())
                .with_headers(headers)
        });
        let incoming = Self {
            message_id: waiting.message_id,
            queue: waiting.queue,
            exchange: stream.exchange.clone(),
            routing_key: stream.routing_key.clone(),
            redelivered: false,
            properties,
            payload: waiting.payload,
            attempt: 1,
            its_turn: true,
        };
        (incoming, failure)
    }

    /// The message id (the producer's `postbox.outbox.message_id`).
    pub fn message_id(&self) -> Uuid {
        self.message_id
    }

    /// The queue it was consumed from.
    pub fn queue(&self) -> &str {
        &self.queue
    }

    /// The exchange it was published to (`""` for the default exchange).
    pub fn exchange(&self) -> &str {
        &self.exchange
    }

    /// Its routing key.
    pub fn routing_key(&self) -> &str {
        &self.routing_key
    }

    /// Whether the broker delivered it before (to this or another consumer).
    pub fn redelivered(&self) -> bool {
        self.redelivered
    }

    /// This run's number: 1 for the first, more after failed runs.
    pub fn attempt(&self) -> u32 {
        self.attempt
    }

    /// Its ordering key (the outbox row's `partition_key`), if it has one.
    pub fn partition_key(&self) -> Option<&str> {
        self.header_str(HEADER_PARTITION_KEY)
    }

    /// The outbox it came from (`x-postbox-source`), if postbox published it: outbox
    /// positions are comparable only between messages of one source.
    pub fn source(&self) -> Option<&str> {
        self.header_str(HEADER_SOURCE)
    }

    /// Its number in its stream (`x-postbox-seq`: the messages of its partition key to its
    /// exchange and routing key, from its outbox), if postbox published it with a key.
    pub fn seq(&self) -> Option<i64> {
        self.header_i64(HEADER_SEQ).filter(|seq| *seq > 0)
    }

    /// Whether it is a skip message (`x-postbox-skip`): it stands in its stream for a row the
    /// relay released, and never reaches a handler.
    pub fn is_skip(&self) -> bool {
        self.header(HEADER_SKIP).is_some()
    }

    /// Its outbox position (the outbox row's `id`), if postbox published it.
    pub fn outbox_id(&self) -> Option<i64> {
        self.header_i64(HEADER_OUTBOX_ID)
    }

    /// The producer's trace context, if the message carries a valid `traceparent`.
    pub fn traceparent(&self) -> Option<crate::trace::TraceParent> {
        self.header_str(crate::trace::HEADER)
            .and_then(crate::trace::TraceParent::parse)
    }

    /// The raw payload.
    pub fn payload(&self) -> &[u8] {
        &self.payload
    }

    /// The payload deserialized from JSON. A payload that does not fit `T` is a
    /// [malformed](super::FailureKind::Malformed) failure: with `?`, the consumer applies its
    /// malformed-message policy instead of retrying.
    pub fn json<T: DeserializeOwned>(&self) -> Result<T, HandlerError> {
        serde_json::from_slice(&self.payload).map_err(|error| {
            HandlerError::malformed(format!(
                "payload of message {} is not the expected JSON: {error}",
                self.message_id
            ))
        })
    }

    /// The payload as UTF-8 text, if it is.
    pub fn text(&self) -> Option<&str> {
        std::str::from_utf8(&self.payload).ok()
    }

    /// Its content type.
    pub fn content_type(&self) -> Option<&str> {
        self.properties.content_type().as_ref().map(|s| s.as_str())
    }

    /// All AMQP properties, headers included.
    pub fn properties(&self) -> &BasicProperties {
        &self.properties
    }

    /// A header's raw value.
    pub fn header(&self, name: &str) -> Option<&AMQPValue> {
        self.properties.headers().as_ref()?.inner().get(name)
    }

    /// A string header's value.
    pub fn header_str(&self, name: &str) -> Option<&str> {
        match self.header(name)? {
            AMQPValue::LongString(s) => std::str::from_utf8(s.as_bytes()).ok(),
            AMQPValue::ShortString(s) => Some(s.as_str()),
            _ => None,
        }
    }

    /// An integer header's value; a string holding an integer counts too.
    pub fn header_i64(&self, name: &str) -> Option<i64> {
        Some(match self.header(name)? {
            AMQPValue::ShortShortInt(v) => i64::from(*v),
            AMQPValue::ShortShortUInt(v) => i64::from(*v),
            AMQPValue::ShortInt(v) => i64::from(*v),
            AMQPValue::ShortUInt(v) => i64::from(*v),
            AMQPValue::LongInt(v) => i64::from(*v),
            AMQPValue::LongUInt(v) => i64::from(*v),
            AMQPValue::LongLongInt(v) => *v,
            AMQPValue::Timestamp(v) => i64::try_from(*v).ok()?,
            AMQPValue::LongString(_) | AMQPValue::ShortString(_) => {
                self.header_str(name)?.trim().parse().ok()?
            }
            _ => return None,
        })
    }
}
