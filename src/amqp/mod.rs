//! RabbitMQ: connecting (with failover across cluster nodes) and confirm-mode channels.

use std::sync::atomic::{AtomicUsize, Ordering};

use lapin::options::ConfirmSelectOptions;
use lapin::types::ShortString;
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};

use crate::error::{BrokerError, Context};
use crate::redact::redact_url;

/// One message ready to publish, its pieces checked so publishing it cannot fail on our side.
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

/// The broker's nodes, tried in turn: after a failure the next attempt starts at the node after
/// the one that failed, so a dead node does not hold the relay back.
#[derive(Debug)]
pub struct Broker {
    urls: Vec<String>,
    next: AtomicUsize,
}

impl Broker {
    /// A broker reachable at any of `urls` (at least one).
    pub fn new(urls: impl IntoIterator<Item = impl Into<String>>) -> Self {
        Self {
            urls: urls.into_iter().map(Into::into).collect(),
            next: AtomicUsize::new(0),
        }
    }

    /// Refuses a broker without a node: it would retry connecting to nothing for good.
    pub(crate) fn check(&self) -> Result<(), crate::error::InvalidSetting> {
        if self.urls.is_empty() {
            return Err(crate::error::InvalidSetting::new(
                "amqp_url",
                "",
                "expected at least one amqp:// or amqps:// URL (Broker::new was given none)",
            ));
        }
        Ok(())
    }

    /// The nodes' URLs without passwords, for logs.
    pub fn describe(&self) -> String {
        self.urls
            .iter()
            .map(|u| redact_url(u))
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// Connects to the first node that answers, starting after the last one that failed.
    pub async fn connect(&self, name: &str) -> Result<Connection, BrokerError> {
        let mut last_error = None;
        for _ in 0..self.urls.len().max(1) {
            let index = self.next.load(Ordering::Relaxed) % self.urls.len().max(1);
            let Some(url) = self.urls.get(index) else {
                break;
            };
            let properties = ConnectionProperties::default().with_connection_name(name.into());
            match Connection::connect(url, properties)
                .await
                .context(format!("connecting to {}", redact_url(url)))
            {
                Ok(connection) => {
                    tracing::info!(node = %redact_url(url), "rabbitmq: connected");
                    return Ok(connection);
                }
                Err(error) => {
                    self.next.store(index + 1, Ordering::Relaxed);
                    last_error = Some(error);
                }
            }
        }
        Err(last_error.unwrap_or_else(|| {
            let none = std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "no amqp:// URL given (amqp_url)",
            );
            BrokerError::new("connecting", none.into())
        }))
    }
}

/// Closes `connection`, waiting a little for the broker's close-ok: a connection the broker
/// blocks (lapin then writes nothing, not even the close) or a dead one never gets it, and a
/// shutdown must not wait for an alarm to clear.
pub async fn close(connection: &Connection, reason: &str) {
    let closing = connection.close(200, reason.into());
    let _ = tokio::time::timeout(std::time::Duration::from_secs(2), closing).await;
}

/// Opens a channel with publisher confirms enabled.
pub async fn confirm_channel(connection: &Connection) -> Result<Channel, BrokerError> {
    let channel = connection
        .create_channel()
        .await
        .context("opening a channel")?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .context("enabling publisher confirms")?;
    Ok(channel)
}

/// Publishes `messages` (mandatory) in the given order without waiting for each one to reach
/// the socket before queueing the next, and returns their pending confirms in the same order.
///
/// lapin's `basic_publish` assigns the delivery tag and queues the frames on its first poll,
/// then waits until its I/O thread has written them. Awaiting each publish in turn costs a
/// hand-off between the two threads per message; polling each one once here, message by
/// message, queues the whole batch in order (the broker sees it in that order), and the writes
/// are then awaited together. After a publish fails at once (the channel is gone) nothing more
/// is queued: the result is shorter than the input, and the caller treats the rest as unsent.
pub async fn publish_in_order<'a>(
    channel: &Channel,
    messages: impl IntoIterator<Item = (Outgoing, &'a [u8])>,
) -> Vec<lapin::Result<lapin::PublisherConfirm>> {
    use std::future::Future;
    use std::pin::Pin;
    use std::task::Poll;

    type Confirm = lapin::Result<lapin::PublisherConfirm>;
    enum Queued<'p> {
        Done(Confirm),
        Writing(Pin<Box<dyn Future<Output = Confirm> + Send + 'p>>),
    }
    let mut queued = Vec::new();
    for (message, payload) in messages {
        let mut publish = Box::pin(channel.basic_publish(
            message.exchange,
            message.routing_key,
            lapin::options::BasicPublishOptions {
                mandatory: true,
                immediate: false,
            },
            payload,
            message.properties,
        ));
        match std::future::poll_fn(|cx| Poll::Ready(publish.as_mut().poll(cx))).await {
            Poll::Ready(result) => {
                let failed = result.is_err();
                queued.push(Queued::Done(result));
                if failed {
                    break;
                }
            }
            Poll::Pending => queued.push(Queued::Writing(publish)),
        }
    }
    let mut results = Vec::with_capacity(queued.len());
    for entry in queued {
        results.push(match entry {
            Queued::Done(result) => result,
            Queued::Writing(publish) => publish.await,
        });
    }
    results
}
