//! The relay's broker connection and its channels: connecting (and reconnecting across
//! nodes), a pool of confirm-mode channels lent to one batch at a time, and the probe that
//! finds missing exchanges before a publish to one closes a channel.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use futures_util::StreamExt;
use lapin::options::ExchangeDeclareOptions;
use lapin::types::{FieldTable, ShortString};
use lapin::{Channel, Connection, ErrorKind};
use tokio::sync::mpsc;
use tokio_util::sync::{CancellationToken, DropGuard};

use super::Health;
use crate::amqp::{self, Broker};
use crate::reconnect::until_ok;
use crate::store::outbox::ClaimedRow;

/// The current connection and its channels. Connection state is reported to `health.broker`
/// (readiness, `postbox_broker_up`, the claimer's pause during an alarm).
pub(crate) struct Channels {
    broker: Broker,
    health: Arc<Health>,
    /// The longest a channel may take to open (`relay.confirm_timeout`).
    open_timeout: std::time::Duration,
    connection: Option<Connection>,
    /// Counts connections, so channels of an earlier one are told apart.
    generation: u64,
    /// Open channels of the current connection, not lent to a batch.
    idle: Vec<Channel>,
    /// Where lent channels come back, with their connection's generation.
    returns_tx: mpsc::UnboundedSender<(u64, Channel)>,
    returns_rx: mpsc::UnboundedReceiver<(u64, Channel)>,
    /// A channel of its own for passive exchange declares (a failed one closes its channel).
    probe: Option<Channel>,
    /// Exchanges seen to exist on the current connection.
    known_exchanges: HashSet<String>,
    /// Stops the current connection's event watcher when the connection is replaced.
    watcher: Option<DropGuard>,
}

impl Channels {
    pub fn new(broker: Broker, health: Arc<Health>, open_timeout: std::time::Duration) -> Self {
        let (returns_tx, returns_rx) = mpsc::unbounded_channel();
        Self {
            broker,
            health,
            open_timeout,
            connection: None,
            generation: 0,
            idle: Vec::new(),
            returns_tx,
            returns_rx,
            probe: None,
            known_exchanges: HashSet::new(),
            watcher: None,
        }
    }

    /// Closes the connection (on stop), after which nothing reports on it.
    pub async fn close(&mut self) {
        self.health.broker.set_connected(false);
        self.watcher = None;
        if let Some(connection) = self.connection.take() {
            amqp::close(&connection, "postbox relay stopping").await;
        }
    }

    /// Whether the current connection is open.
    pub fn connected(&self) -> bool {
        self.connection
            .as_ref()
            .is_some_and(|connection| connection.status().connected())
    }

    /// A channel for one batch, with the connection's negotiated frame size: an idle one, or
    /// a new one. When the connection is gone: `None` at once unless `reconnect`, else
    /// reconnecting (with backoff, across nodes) until `stop` is cancelled (then `None`).
    pub async fn channel(
        &mut self,
        stop: &CancellationToken,
        reconnect: bool,
    ) -> Option<(ChannelLease, usize)> {
        let lease = |channels: &Self, channel: Channel| ChannelLease {
            generation: channels.generation,
            channel: Some(channel),
            back: channels.returns_tx.clone(),
            reusable: false,
        };
        if let Some(connection) = &self.connection {
            if connection.status().connected() {
                let frame_max = frame_max(connection);
                while let Ok((generation, channel)) = self.returns_rx.try_recv() {
                    if generation == self.generation {
                        self.idle.push(channel);
                    }
                }
                let mut closed = false;
                while let Some(channel) = self.idle.pop() {
                    if channel.status().connected() {
                        return Some((lease(self, channel), frame_max));
                    }
                    closed = true;
                }
                if closed {
                    // Whatever closed the channel (a broker-side channel error), exchanges may
                    // have changed meanwhile: probe them again.
                    tracing::warn!("rabbitmq: channel closed by the broker; opening a new one");
                    self.known_exchanges.clear();
                    self.probe = None;
                }
                // Bounded: a half-dead connection may never answer the open. A connection that
                // cannot open a channel is replaced (with the reconnect's backoff), rather than
                // claiming and giving back batch after batch.
                let open = amqp::confirm_channel(connection);
                match tokio::time::timeout(self.open_timeout, open).await {
                    Ok(Ok(channel)) => return Some((lease(self, channel), frame_max)),
                    Ok(Err(error)) => tracing::warn!(%error, "rabbitmq: could not open a channel"),
                    Err(_) => {
                        tracing::warn!(timeout = ?self.open_timeout, "rabbitmq: opening a channel timed out")
                    }
                }
            }
            if connection.status().connected() {
                tracing::warn!("rabbitmq: replacing a connection that opens no channel");
            } else {
                tracing::warn!("rabbitmq: connection lost; reconnecting");
            }
            self.watcher = None; // its events no longer say anything about the broker
            self.idle.clear();
            self.known_exchanges.clear();
            self.probe = None;
            if let Some(connection) = self.connection.take() {
                amqp::close(&connection, "postbox relay reconnecting").await;
            }
            self.health.broker.set_connected(false);
        }
        if !reconnect {
            return None;
        }
        let broker = &self.broker;
        let (connection, channel) = until_ok("rabbitmq", stop, || async {
            let connection = broker.connect("postbox relay").await?;
            let channel = amqp::confirm_channel(&connection).await?;
            Ok::<_, crate::error::BrokerError>((connection, channel))
        })
        .await?;
        let frame_max = frame_max(&connection);
        let watcher = CancellationToken::new();
        tokio::spawn(watch_connection(
            connection.events_listener(),
            connection.status().clone(),
            self.health.clone(),
            watcher.clone(),
        ));
        self.watcher = Some(watcher.drop_guard());
        self.connection = Some(connection);
        self.generation += 1;
        self.health.broker.set_connected(true);
        Some((lease(self, channel), frame_max))
    }

    /// The exchanges that `rows` name that the broker says do not exist, with its reason. A
    /// publish to a missing exchange makes the broker close the channel, failing every confirm
    /// in flight on it, batch after batch; probed first (a passive declare on a channel of its
    /// own, once per exchange and connection), it fails only the rows that name it, as a
    /// counted attempt. If the probe cannot run (the connection is gone), nothing is reported
    /// and the publish itself meets the outage.
    pub async fn missing_exchanges(&mut self, rows: &[ClaimedRow]) -> HashMap<String, String> {
        let mut missing = HashMap::new();
        let Some(connection) = &self.connection else {
            return missing;
        };
        for row in rows {
            let name = row.exchange.as_str();
            if name.is_empty() || self.known_exchanges.contains(name) || missing.contains_key(name)
            {
                continue;
            }
            let probe = match &self.probe {
                Some(probe) if probe.status().connected() => probe.clone(),
                _ => match connection.create_channel().await {
                    Ok(probe) => {
                        self.probe = Some(probe.clone());
                        probe
                    }
                    Err(_) => return missing,
                },
            };
            let Ok(exchange) = ShortString::try_new(name) else {
                continue; // refused later as not valid AMQP
            };
            let declared = probe
                .exchange_declare(
                    exchange,
                    lapin::ExchangeKind::Direct,
                    ExchangeDeclareOptions {
                        passive: true,
                        ..ExchangeDeclareOptions::default()
                    },
                    FieldTable::default(),
                )
                .await;
            match declared {
                Ok(()) => {
                    self.known_exchanges.insert(name.to_string());
                }
                Err(error) if matches!(error.kind(), ErrorKind::ProtocolError(..)) => {
                    missing.insert(name.to_string(), error.to_string());
                }
                Err(_) => return missing,
            }
        }
        missing
    }
}

/// Follows the current connection's events until it fails or is replaced (`stop`): a failed
/// connection stops the claimer at once (the publisher reconnects when it next looks, within
/// `BROKER_CHECK`), and a broker that blocks publishers (a memory or disk alarm) stops it too,
/// until the broker lifts the block.
async fn watch_connection(
    events: impl futures_util::Stream<Item = lapin::Event>,
    status: lapin::ConnectionStatus,
    health: Arc<Health>,
    stop: CancellationToken,
) {
    futures_util::pin_mut!(events);
    loop {
        let event = tokio::select! {
            _ = stop.cancelled() => return,
            event = events.next() => event,
        };
        let Some(event) = event else {
            return;
        };
        if stop.is_cancelled() {
            return; // a newer connection speaks for the broker now
        }
        match event {
            // Channel errors come this way too (a passive declare of a missing exchange
            // closes its channel): only a failed connection matters here.
            lapin::Event::Error(error) if status.connected() => {
                tracing::debug!(%error, "rabbitmq: channel error");
            }
            lapin::Event::Error(error) => {
                tracing::warn!(%error, "rabbitmq: connection failed");
                health.broker.set_connected(false);
                return;
            }
            lapin::Event::ConnectionBlocked(reason) => {
                tracing::warn!(%reason, "rabbitmq: the broker blocks publishing (resource alarm); the relay claims nothing until it lifts");
                health.broker.set_blocked(true);
            }
            lapin::Event::ConnectionUnblocked => {
                tracing::info!("rabbitmq: the broker unblocked publishing");
                health.broker.set_blocked(false);
            }
            _ => {}
        }
    }
}

fn frame_max(connection: &Connection) -> usize {
    usize::try_from(connection.configuration().frame_max()).unwrap_or(usize::MAX)
}

/// A confirm-mode channel lent to one batch. Dropped, it goes back to the publisher if it was
/// declared `reusable` (every publish on it written and confirmed); otherwise it is retired:
/// confirms still owed on it (a publish abandoned mid-way, a confirm that timed out) could
/// arrive with a later batch's and carry its returns off to confirms nobody awaits.
pub(crate) struct ChannelLease {
    /// Which connection the channel belongs to (a reconnect makes the old ones useless).
    pub generation: u64,
    pub channel: Option<lapin::Channel>,
    pub back: tokio::sync::mpsc::UnboundedSender<(u64, lapin::Channel)>,
    pub reusable: bool,
}

impl Drop for ChannelLease {
    fn drop(&mut self) {
        let Some(channel) = self.channel.take() else {
            return;
        };
        if self.reusable {
            // The publisher has stopped when this fails: nothing to give back to.
            let _ = self.back.send((self.generation, channel));
            return;
        }
        // Closed once what it owes is settled: a close sent at once would overtake publishes
        // lapin still holds, which the broker would then see on a closed channel.
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move {
                let settle = std::time::Duration::from_secs(30);
                let _ = tokio::time::timeout(settle, channel.wait_for_confirms()).await;
                let close = channel.close(200, "postbox: retired".into());
                let _ = tokio::time::timeout(std::time::Duration::from_secs(2), close).await;
            });
        }
    }
}
