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
}

/// Builds the AMQP message for `row`, or says why the row cannot be sent as it is.
pub fn outgoing(row: &ClaimedRow) -> Result<Outgoing, String> {
    let exchange = short(&row.exchange, "exchange")?;
    let routing_key = short(&row.routing_key, "routing_key")?;
    let content_type = short(&row.content_type, "content_type")?;
    let mut headers = match &row.headers {
        Value::Object(map) => table(map)?,
        other => return Err(format!("headers must be a JSON object, found {other}")),
    };
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
    })
}

fn short(value: &str, column: &str) -> Result<ShortString, String> {
    ShortString::try_new(value).map_err(|e| format!("{column}: {e}"))
}

fn table(map: &serde_json::Map<String, Value>) -> Result<FieldTable, String> {
    let mut table = FieldTable::default();
    for (name, value) in map {
        let name = ShortString::try_new(name.as_str()).map_err(|e| format!("header name: {e}"))?;
        table.insert(name, amqp_value(value)?);
    }
    Ok(table)
}

fn amqp_value(value: &Value) -> Result<AMQPValue, String> {
    Ok(match value {
        Value::Null => AMQPValue::Void,
        Value::Bool(b) => AMQPValue::Boolean(*b),
        Value::Number(n) => match (n.as_i64(), n.as_f64()) {
            (Some(i), _) => AMQPValue::LongLongInt(i),
            (None, Some(f)) => AMQPValue::Double(f),
            (None, None) => return Err(format!("header number {n} does not fit AMQP")),
        },
        Value::String(s) => AMQPValue::LongString(LongString::from(s.as_str())),
        Value::Array(items) => AMQPValue::FieldArray(FieldArray::from(
            items
                .iter()
                .map(amqp_value)
                .collect::<Result<Vec<_>, _>>()?,
        )),
        Value::Object(map) => AMQPValue::FieldTable(table(map)?),
    })
}
