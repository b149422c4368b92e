//! Turning an outbox row into an AMQP message: properties and headers.

use lapin::types::{AMQPValue, FieldArray, FieldTable, LongString, ShortString};
use lapin::BasicProperties;
use serde_json::Value;

use crate::store::outbox::ClaimedRow;

/// Header carrying the row's outbox position (replay address, per-key order check).
pub const HEADER_OUTBOX_ID: &str = "x-postbox-outbox-id";
/// Header carrying the row's partition key, when it has one.
pub const HEADER_PARTITION_KEY: &str = "x-postbox-partition-key";
/// Header carrying when the row was written (RFC 3339, microseconds).
pub const HEADER_CREATED_AT: &str = "x-postbox-created-at";

/// AMQP delivery mode 2: the broker writes the message to disk.
const PERSISTENT: u8 = 2;

/// The AMQP pieces of one row, checked so publishing it cannot fail on our side.
pub struct Outgoing {
    /// Exchange, as an AMQP short string.
    pub exchange: ShortString,
    /// Routing key, as an AMQP short string.
    pub routing_key: ShortString,
    /// Persistent properties with message id, content type, timestamp and headers.
    pub properties: BasicProperties,
    /// Bytes the properties take on the wire (an upper bound): they travel in one frame, which
    /// the broker's `frame_max` limits.
    pub properties_bytes: usize,
}

/// Room for every property but the headers: content type (≤ 256), message id, app id,
/// delivery mode, timestamp, property flags and the content header's own fields.
const FIXED_PROPERTIES_BYTES: usize = 512;

/// Builds the AMQP message for `row`, or says why the row cannot be sent as it is.
pub fn outgoing(row: &ClaimedRow) -> Result<Outgoing, String> {
    let exchange = short(&row.exchange, "exchange")?;
    let routing_key = short(&row.routing_key, "routing_key")?;
    let content_type = short(&row.content_type, "content_type")?;
    let (mut headers, mut header_bytes) = match &row.headers {
        Value::Object(map) => table(map)?,
        other => return Err(format!("headers must be a JSON object, found {other}")),
    };
    // the relay's own headers, generously: name, type tag, value
    header_bytes += 3 * 64 + row.partition_key.as_ref().map_or(0, String::len);
    headers.insert(HEADER_OUTBOX_ID.into(), AMQPValue::LongLongInt(row.id));
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

fn short(value: &str, column: &str) -> Result<ShortString, String> {
    ShortString::try_new(value).map_err(|e| format!("{column}: {e}"))
}

/// The AMQP table for a JSON object, and the bytes it takes encoded (AMQP 0-9-1 field table:
/// a length, then per entry a short-string name and a type-tagged value).
fn table(map: &serde_json::Map<String, Value>) -> Result<(FieldTable, usize), String> {
    let mut table = FieldTable::default();
    let mut bytes = 4;
    for (name, value) in map {
        let name = ShortString::try_new(name.as_str()).map_err(|e| format!("header name: {e}"))?;
        let (value, value_bytes) = amqp_value(value)?;
        bytes += 1 + name.as_str().len() + value_bytes;
        table.insert(name, value);
    }
    Ok((table, bytes))
}

/// The AMQP value for a JSON value, and its encoded size including the type tag.
fn amqp_value(value: &Value) -> Result<(AMQPValue, usize), String> {
    Ok(match value {
        Value::Null => (AMQPValue::Void, 1),
        Value::Bool(b) => (AMQPValue::Boolean(*b), 2),
        Value::Number(n) => match (n.as_i64(), n.as_f64()) {
            (Some(i), _) => (AMQPValue::LongLongInt(i), 9),
            (None, Some(f)) => (AMQPValue::Double(f), 9),
            (None, None) => return Err(format!("header number {n} does not fit AMQP")),
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
