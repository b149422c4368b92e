//! Publishing unprocessable messages to the dead-letter destination, with why they failed.

use lapin::options::{BasicPublishOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use std::sync::Arc;

use lapin::{BasicProperties, Channel, Confirmation, Connection};
use tokio::sync::Mutex;

use super::ConsumerError;
use super::ConsumerOptions;
use crate::amqp::confirm_channel;
use crate::contract::{
    HEADER_ATTEMPTS, HEADER_CONSUMER, HEADER_ERROR, HEADER_ORIGINAL_EXCHANGE,
    HEADER_ORIGINAL_ROUTING_KEY, HEADER_QUEUE,
};
use crate::error::{Context, InvalidSetting};

/// Why a message is dead-lettered, carried in its headers.
pub(crate) struct Cause<'a> {
    pub consumer: &'a str,
    pub queue: &'a str,
    pub exchange: &'a str,
    pub routing_key: &'a str,
    pub error: &'a str,
    pub attempts: u32,
}

/// A confirm-mode channel to the dead-letter destination. A channel-level error (an exchange
/// that does not exist, say) closes the channel; the next publish opens a new one on the same
/// connection, so fixing the topology is enough for the stuck message to go out.
pub(crate) struct DeadLetters {
    connection: Arc<Connection>,
    channel: Mutex<Channel>,
    exchange: ShortString,
    routing_key: ShortString,
}

impl DeadLetters {
    /// Opens a channel on `connection` and declares the dead-letter queue if the consumer owns
    /// it.
    pub async fn open(
        connection: Arc<Connection>,
        options: &ConsumerOptions,
        queue: &str,
    ) -> Result<Self, ConsumerError> {
        let channel = confirm_channel(&connection).await?;
        let (exchange, routing_key) = options.dead_letter_target(queue);
        let short = |value: String, setting: &'static str| {
            ShortString::try_new(value.as_str())
                .map_err(|e| InvalidSetting::new(setting, &value, e.to_string()))
        };
        let exchange = short(exchange, "consumer.dead_letter.exchange")?;
        let routing_key = short(routing_key, "consumer.dead_letter.routing_key")?;
        if !matches!(options.dead_letter, super::DeadLetter::Exchange { .. }) {
            channel
                .queue_declare(
                    routing_key.clone(),
                    QueueDeclareOptions {
                        durable: true,
                        ..QueueDeclareOptions::default()
                    },
                    FieldTable::default(),
                )
                .await
                .context(format!(
                    "declaring dead-letter queue {:?}",
                    routing_key.as_str()
                ))?;
        }
        Ok(Self {
            connection,
            channel: Mutex::new(channel),
            exchange,
            routing_key,
        })
    }

    /// Publishes the message with its original properties plus the cause headers, and waits
    /// for the broker's confirm: only then may the original be acked.
    pub async fn publish(
        &self,
        payload: &[u8],
        properties: &BasicProperties,
        cause: &Cause<'_>,
    ) -> Result<(), ConsumerError> {
        let mut headers = properties.headers().clone().unwrap_or_default();
        let text = |s: &str| AMQPValue::LongString(LongString::from(s));
        headers.insert(HEADER_ERROR.into(), text(cause.error));
        headers.insert(HEADER_CONSUMER.into(), text(cause.consumer));
        headers.insert(
            HEADER_ATTEMPTS.into(),
            AMQPValue::LongLongInt(i64::from(cause.attempts)),
        );
        headers.insert(HEADER_QUEUE.into(), text(cause.queue));
        headers.insert(HEADER_ORIGINAL_EXCHANGE.into(), text(cause.exchange));
        headers.insert(HEADER_ORIGINAL_ROUTING_KEY.into(), text(cause.routing_key));
        let properties = properties
            .clone()
            .with_headers(headers)
            .with_delivery_mode(2);
        let what = || {
            format!(
                "dead-lettering to exchange {:?} with routing key {:?}",
                self.exchange.as_str(),
                self.routing_key.as_str()
            )
        };
        // Held until the confirm is in: one dead letter in flight per channel, because lapin
        // hands a basic.return to whichever pending confirm a `multiple` ack resolves first,
        // and with two in flight one worker could take the other's return (and ack an original
        // whose dead letter the broker dropped).
        let mut channel = self.channel.lock().await;
        if !channel.status().connected() {
            *channel = confirm_channel(&self.connection).await?;
        }
        let confirmation = channel
            .basic_publish(
                self.exchange.clone(),
                self.routing_key.clone(),
                BasicPublishOptions {
                    mandatory: true,
                    immediate: false,
                },
                payload,
                properties,
            )
            .await
            .context(what())?
            .await
            .context(what())?;
        match confirmation {
            Confirmation::Ack(None) => Ok(()),
            Confirmation::Ack(Some(returned)) => Err(ConsumerError::DeadLetterRefused(format!(
                "{}: returned as unroutable ({} {})",
                what(),
                returned.reply_code,
                returned.reply_text
            ))),
            other => Err(ConsumerError::DeadLetterRefused(format!(
                "{}: {other:?}",
                what()
            ))),
        }
    }
}
