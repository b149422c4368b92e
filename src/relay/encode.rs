//! Turning an outbox row into an AMQP message: properties and headers. The relay owns this
//! encoding; `amqp` only carries what it produces.

use lapin::types::{AMQPValue, FieldArray, FieldTable, LongString, ShortString};
use lapin::BasicProperties;
use serde_json::Value;

use crate::amqp::Outgoing;
use crate::contract::{
    HEADER_CREATED_AT, HEADER_OUTBOX_ID, HEADER_PARTITION_KEY, HEADER_SEQ, HEADER_SOURCE,
};
use crate::store::outbox::ClaimedRow;

/// AMQP delivery mode 2: the broker writes the message to disk.
const PERSISTENT: u8 = 2;

/// Room for every property but the headers: content type (≤ 256), message id, app id,
/// delivery mode, timestamp, property flags and the content header's own fields.
const FIXED_PROPERTIES_BYTES: usize = 512;

/// Why a row can never be sent as it is (until someone changes the row or a limit): it is
/// marked dead at once, with this as its `last_error`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Unsendable {
    /// It breaks a rule of the SQL contract (see the claim's `invalid`).
    Contract(String),
    /// A column or header name longer than an AMQP short string (255 bytes).
    TooLong {
        /// `exchange`, `routing_key`, `content_type` or `header name`.
        what: &'static str,
        /// The client's reason.
        error: String,
    },
    /// `headers` is JSON but not an object.
    HeadersNotObject(String),
    /// `headers` cannot be read (nested deeper than the relay parses).
    HeadersUnreadable(String),
    /// A header number AMQP has no type for.
    HeaderNumber(String),
    /// The payload is larger than `relay.max_message_bytes`.
    PayloadTooLarge {
        /// The payload's size.
        bytes: usize,
        /// `relay.max_message_bytes`.
        max: usize,
    },
    /// Headers and properties exceed the one frame the broker allows them.
    PropertiesTooLarge {
        /// Their size (an upper bound).
        bytes: usize,
        /// The broker's `frame_max`.
        frame_max: usize,
    },
}

impl std::fmt::Display for Unsendable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("cannot be sent as AMQP: ")?;
        match self {
            Unsendable::Contract(rule) => f.write_str(rule),
            Unsendable::TooLong { what, error } => write!(f, "{what}: {error}"),
            Unsendable::HeadersNotObject(found) => {
                write!(f, "headers must be a JSON object, found {found}")
            }
            Unsendable::HeadersUnreadable(error) => f.write_str(error),
            Unsendable::HeaderNumber(n) => write!(f, "header number {n} does not fit AMQP"),
            Unsendable::PayloadTooLarge { bytes, max } => write!(
                f,
                "payload of {bytes} bytes exceeds relay.max_message_bytes ({max}); raise it only \
                 as far as the broker's max_message_size allows"
            ),
            Unsendable::PropertiesTooLarge { bytes, frame_max } => write!(
                f,
                "headers and properties take up to {bytes} bytes, more than the broker's \
                 frame_max ({frame_max} bytes) allows for them: move the data into the payload"
            ),
        }
    }
}

/// Builds the AMQP message for `row`, or says why the row cannot be sent as it is.
pub fn outgoing(row: &ClaimedRow) -> Result<Outgoing, Unsendable> {
    if let Some(invalid) = &row.invalid {
        return Err(Unsendable::Contract(invalid.clone()));
    }
    let exchange = short(&row.exchange, "exchange")?;
    let routing_key = short(&row.routing_key, "routing_key")?;
    let content_type = short(&row.content_type, "content_type")?;
    let (mut headers, mut header_bytes) = match &row.headers {
        Ok(Value::Object(map)) => table(map)?,
        Ok(other) => return Err(Unsendable::HeadersNotObject(other.to_string())),
        Err(error) => return Err(Unsendable::HeadersUnreadable(error.clone())),
    };
    // the relay's own headers, generously: name, type tag, value
    header_bytes += 4 * 64 + row.partition_key.as_ref().map_or(0, String::len);
    headers.insert(HEADER_OUTBOX_ID.into(), AMQPValue::LongLongInt(row.id));
    if let Some(seq) = row.seq {
        headers.insert(HEADER_SEQ.into(), AMQPValue::LongLongInt(seq));
    }
    if let Some(source) = row.source {
        headers.insert(
            HEADER_SOURCE.into(),
            AMQPValue::LongString(source.to_string().into()),
        );
    }
    if let Some(key) = &row.partition_key {
        headers.insert(
            HEADER_PARTITION_KEY.into(),
            AMQPValue::LongString(key.as_str().into()),
        );
    }
    headers.insert(
        HEADER_CREATED_AT.into(),
        AMQPValue::LongString(
            row.created_at
                .to_rfc3339_opts(chrono::SecondsFormat::Micros, true)
                .as_str()
                .into(),
        ),
    );
    let properties = BasicProperties::default()
        .with_message_id(row.message_id.to_string().into())
        .with_content_type(content_type)
        .with_delivery_mode(PERSISTENT)
        .with_timestamp(row.created_at.timestamp().max(0) as u64)
        .with_app_id("postbox".into())
        .with_headers(headers);
    Ok(Outgoing {
        exchange,
        routing_key,
        properties,
        properties_bytes: FIXED_PROPERTIES_BYTES + header_bytes,
    })
}

fn short(value: &str, what: &'static str) -> Result<ShortString, Unsendable> {
    ShortString::try_new(value).map_err(|e| Unsendable::TooLong {
        what,
        error: e.to_string(),
    })
}

/// The AMQP table for a JSON object, and the bytes it takes encoded (AMQP 0-9-1 field table:
/// a length, then per entry a short-string name and a type-tagged value).
fn table(map: &serde_json::Map<String, Value>) -> Result<(FieldTable, usize), Unsendable> {
    let mut table = FieldTable::default();
    let mut bytes = 4;
    for (name, value) in map {
        let name = short(name, "header name")?;
        let (value, value_bytes) = amqp_value(value)?;
        bytes += 1 + name.as_str().len() + value_bytes;
        table.insert(name, value);
    }
    Ok((table, bytes))
}

/// The AMQP value for a JSON value, and its encoded size including the type tag.
fn amqp_value(value: &Value) -> Result<(AMQPValue, usize), Unsendable> {
    Ok(match value {
        Value::Null => (AMQPValue::Void, 1),
        Value::Bool(b) => (AMQPValue::Boolean(*b), 2),
        Value::Number(n) => match (n.as_i64(), n.as_f64()) {
            (Some(i), _) => (AMQPValue::LongLongInt(i), 9),
            (None, Some(f)) => (AMQPValue::Double(f), 9),
            (None, None) => return Err(Unsendable::HeaderNumber(n.to_string())),
        },
        Value::String(s) => (
            AMQPValue::LongString(LongString::from(s.as_str())),
            5 + s.len(),
        ),
        Value::Array(items) => {
            let mut values = Vec::with_capacity(items.len());
            let mut bytes = 5;
            for item in items {
                let (value, value_bytes) = amqp_value(item)?;
                bytes += value_bytes;
                values.push(value);
            }
            (AMQPValue::FieldArray(FieldArray::from(values)), bytes)
        }
        Value::Object(map) => {
            let (table, bytes) = table(map)?;
            (AMQPValue::FieldTable(table), 1 + bytes)
        }
    })
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;
    use serde_json::{Map, Value};

    use super::*;

    /// Any JSON a `jsonb` column can hold: odd numbers, long and non-ASCII names and strings,
    /// nesting.
    fn json() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(Value::from),
            any::<u64>().prop_map(Value::from),
            any::<f64>()
                .prop_filter("JSON has no NaN or infinity", |f| f.is_finite())
                .prop_map(Value::from),
            ".{0,300}".prop_map(Value::String),
        ];
        leaf.prop_recursive(4, 64, 8, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..8).prop_map(Value::Array),
                prop::collection::btree_map(".{0,300}", inner, 0..8)
                    .prop_map(|m| Value::Object(m.into_iter().collect::<Map<_, _>>())),
            ]
        })
    }

    fn row() -> impl Strategy<Value = ClaimedRow> {
        (
            (".{0,300}", ".{0,300}", ".{0,300}"),
            proptest::option::of(".{0,300}"),
            prop::collection::btree_map(".{0,300}", json(), 0..6),
            prop::collection::vec(any::<u8>(), 0..4096),
            (any::<i64>(), any::<i32>(), any::<i64>()),
        )
            .prop_map(
                |((exchange, routing_key, content_type), partition_key, headers, payload, nums)| {
                    ClaimedRow {
                        id: nums.0,
                        message_id: uuid::Uuid::from_u64_pair(nums.0 as u64, nums.2 as u64),
                        exchange,
                        routing_key,
                        partition_key,
                        seq: None,
                        payload,
                        invalid: None,
                        content_type,
                        headers: Ok(Value::Object(headers.into_iter().collect())),
                        created_at: chrono::DateTime::from_timestamp_micros(nums.2 >> 12)
                            .unwrap_or_default(),
                        attempts: nums.1,
                        source: Some(uuid::Uuid::from_u64_pair(nums.2 as u64, nums.0 as u64)),
                    }
                },
            )
    }

    fn encoded_len(table: &FieldTable) -> usize {
        let serializer = lapin::types::generation::gen_field_table(table);
        cookie_factory::gen_simple(serializer, Vec::new())
            .map(|bytes| bytes.len())
            .unwrap_or(usize::MAX)
    }

    proptest! {
        /// No row content panics; a row is refused exactly when an AMQP short string (exchange,
        /// routing key, content type, header name) would exceed 255 bytes; and the size
        /// estimate the relay checks against the broker's frame size is never short.
        #[test]
        fn any_row_becomes_a_message_or_a_reason(row in row()) {
            let too_long = |s: &str| s.len() > 255;
            let names_too_long = row.headers.as_ref().is_ok_and(names_too_long);
            let expect_refusal = too_long(&row.exchange)
                || too_long(&row.routing_key)
                || too_long(&row.content_type)
                || names_too_long;
            match outgoing(&row) {
                Ok(message) => {
                    prop_assert!(!expect_refusal);
                    prop_assert_eq!(message.exchange.as_str(), row.exchange.as_str());
                    prop_assert_eq!(message.routing_key.as_str(), row.routing_key.as_str());
                    let headers = message.properties.headers().clone().unwrap_or_default();
                    prop_assert!(encoded_len(&headers) + 256 <= message.properties_bytes);
                }
                Err(reason) => {
                    prop_assert!(expect_refusal, "refused without cause: {}", reason);
                    prop_assert!(!reason.to_string().is_empty());
                }
            }
        }
    }

    fn names_too_long(value: &Value) -> bool {
        match value {
            Value::Object(map) => map.iter().any(|(k, v)| k.len() > 255 || names_too_long(v)),
            Value::Array(items) => items.iter().any(names_too_long),
            _ => false,
        }
    }
}
