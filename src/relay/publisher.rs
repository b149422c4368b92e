//! Stage 2: publish every row of a batch, without waiting for confirms in between.

use std::collections::{HashMap, HashSet};

use futures_util::StreamExt;
use lapin::options::ExchangeDeclareOptions;
use lapin::types::{FieldTable, ShortString};
use lapin::{Channel, Connection, ErrorKind};
use std::sync::Arc;

use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::batch::{Batch, Published, Sent};
use crate::amqp::message::{outgoing, Outgoing};
use crate::amqp::{self, Broker};
use crate::reconnect::until_ok;
use crate::store::outbox::ClaimedRow;

/// How often an idle publisher looks at its connection, for readiness.
const BROKER_CHECK: std::time::Duration = std::time::Duration::from_secs(1);

/// Publishes batches in the order they were claimed, on one confirm-mode channel, so the
/// broker sees each key's rows in id order.
pub(crate) struct Publisher {
    pub broker: Broker,
    /// Batches published whose confirms are not all in yet: the broker-side window.
    pub window: Arc<Semaphore>,
    stats: Arc<super::Stats>,
    /// Payloads above this are refused without trying (`relay.max_message_bytes`).
    max_message_bytes: usize,
    connection: Option<(Connection, Channel)>,
    /// A channel of its own for passive exchange declares (a failed one closes its channel).
    probe: Option<Channel>,
    /// Exchanges seen to exist on the current connection.
    known_exchanges: HashSet<String>,
}

impl Publisher {
    pub fn new(
        broker: Broker,
        window: Arc<Semaphore>,
        stats: Arc<super::Stats>,
        max_message_bytes: usize,
    ) -> Self {
        Self {
            broker,
            window,
            stats,
            max_message_bytes,
            connection: None,
            probe: None,
            known_exchanges: HashSet::new(),
        }
    }

    /// Publishes until the claimer is done (its channel closes) or `hard_stop` is cancelled.
    /// Once `shutdown` begins, waiting for the broker to come back is pointless: a batch not
    /// yet published is dropped (its rows roll back to pending) rather than held until
    /// `hard_stop`.
    pub async fn run(
        mut self,
        mut input: mpsc::Receiver<Batch>,
        out: mpsc::Sender<Published>,
        shutdown: CancellationToken,
        hard_stop: CancellationToken,
    ) {
        loop {
            // Connect at once (readiness reflects the broker before there is anything to
            // publish), and after a loss reconnect before taking the next batch.
            if !self.connected() && !self.reconnect(&mut input, &shutdown, &hard_stop).await {
                break;
            }
            let waiting_since = std::time::Instant::now();
            let batch = tokio::select! {
                _ = hard_stop.cancelled() => break,
                batch = input.recv() => match batch {
                    Some(batch) => batch,
                    None => break,
                },
                // Idle: look at the connection again, so a lost one is reported (readiness,
                // `postbox_broker_up`) and restored without waiting for work.
                _ = tokio::time::sleep(BROKER_CHECK) => {
                    self.stats.set_broker_up(self.connected());
                    continue;
                }
            };
            let got_batch = std::time::Instant::now();
            let window = tokio::select! {
                _ = hard_stop.cancelled() => break, // dropping the batch releases its rows
                permit = self.window.clone().acquire_owned() => match permit {
                    Ok(permit) => permit,
                    Err(_) => break,
                },
            };
            if !self.connected() {
                // Lost while the batch waited: hand it back rather than hold its rows through
                // the reconnect.
                batch.release(&self.stats).await;
                continue;
            }
            let Some((channel, frame_max)) = self.channel(&shutdown).await else {
                break;
            };
            let missing_exchanges = self.missing_exchanges(&batch).await;
            let got_window = std::time::Instant::now();
            let rows = batch.rows.len();
            let limits = Limits {
                max_message_bytes: self.max_message_bytes,
                frame_max,
                missing_exchanges: &missing_exchanges,
            };
            let published = publish_batch(&channel, batch, window, limits)
                .instrument(tracing::debug_span!("postbox.publish", rows))
                .await;
            tracing::trace!(
                wait_batch_ms = (got_batch - waiting_since).as_secs_f64() * 1e3,
                wait_window_ms = (got_window - got_batch).as_secs_f64() * 1e3,
                publish_ms = got_window.elapsed().as_secs_f64() * 1e3,
                "relay: published"
            );
            // The next round reconnects (closing the old connection, forgetting its probed
            // exchanges) or `channel()` reopens the channel; readiness shows a lost connection
            // now rather than then.
            if !channel.status().connected() {
                self.stats.set_broker_up(self.connected());
            }
            if out.send(published).await.is_err() {
                break;
            }
        }
        // Lets the confirmer finish once it has drained what it holds. Batches handed on still
        // wait for their confirms on this connection: keep it open until the relay says the
        // pipeline has drained (or gave up on it).
        drop(out);
        hard_stop.cancelled().await;
        self.stats.set_broker_up(false);
        if let Some((connection, _)) = self.connection.take() {
            let _ = connection.close(200, "postbox relay stopping".into()).await;
        }
    }

    /// Connects, or reconnects after a loss, handing back every batch that arrives meanwhile
    /// (claimed before the loss was seen): other relays may have a broker to publish them to,
    /// and this one claims nothing until it is connected. False if the relay stops first.
    async fn reconnect(
        &mut self,
        input: &mut mpsc::Receiver<Batch>,
        shutdown: &CancellationToken,
        hard_stop: &CancellationToken,
    ) -> bool {
        self.stats.set_broker_up(false);
        let stats = self.stats.clone();
        let connect = self.channel(shutdown);
        tokio::pin!(connect);
        loop {
            tokio::select! {
                _ = hard_stop.cancelled() => return false,
                channel = &mut connect => return channel.is_some(),
                batch = input.recv() => match batch {
                    Some(batch) => batch.release(&stats).await,
                    None => return false,
                },
            }
        }
    }

    /// Whether the current connection is open.
    fn connected(&self) -> bool {
        self.connection
            .as_ref()
            .is_some_and(|(connection, _)| connection.status().connected())
    }

    /// The open channel and the connection's negotiated frame size, reconnecting (with
    /// backoff, across nodes) when there is none; `None` if `stop` is cancelled first.
    async fn channel(&mut self, stop: &CancellationToken) -> Option<(Channel, usize)> {
        if let Some((connection, channel)) = &self.connection {
            if connection.status().connected() && channel.status().connected() {
                return Some((channel.clone(), frame_max(connection)));
            }
            // Whatever closed the channel (a broker-side channel error, or the connection),
            // exchanges may have changed meanwhile: probe them again.
            self.known_exchanges.clear();
            self.probe = None;
            if connection.status().connected() {
                tracing::warn!("rabbitmq: channel closed by the broker; opening a new one");
                if let Ok(channel) = amqp::confirm_channel(connection).await {
                    let frame_max = frame_max(connection);
                    self.connection = self.connection.take().map(|(c, _)| (c, channel.clone()));
                    return Some((channel, frame_max));
                }
            }
            tracing::warn!("rabbitmq: connection lost; reconnecting");
            if let Some((connection, _)) = self.connection.take() {
                let _ = connection
                    .close(200, "postbox relay reconnecting".into())
                    .await;
            }
            self.stats.set_broker_up(false);
        }
        let broker = &self.broker;
        let pair = until_ok("rabbitmq", stop, || async {
            let connection = broker.connect("postbox relay").await?;
            let channel = amqp::confirm_channel(&connection).await?;
            Ok((connection, channel))
        })
        .await?;
        let channel = (pair.1.clone(), frame_max(&pair.0));
        tokio::spawn(watch_connection(
            pair.0.events_listener(),
            self.stats.clone(),
        ));
        self.connection = Some(pair);
        self.stats.set_broker_up(true);
        Some(channel)
    }
}

impl Publisher {
    /// The exchanges `batch` names that the broker says do not exist, with its reason. A
    /// publish to a missing exchange makes the broker close the channel, failing every confirm
    /// in flight on it, batch after batch; probed first (a passive declare on a channel of its
    /// own, once per exchange and connection), it fails only the rows that name it, as a
    /// counted attempt. If the probe cannot run (the connection is gone), nothing is reported
    /// and the publish itself meets the outage.
    async fn missing_exchanges(&mut self, batch: &Batch) -> HashMap<String, String> {
        let mut missing = HashMap::new();
        let Some((connection, _)) = &self.connection else {
            return missing;
        };
        for row in &batch.rows {
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

/// Follows a connection's events until it fails: a failed connection stops the claimer at once
/// (the publisher reconnects when it next looks, within `BROKER_CHECK`), and a broker that
/// blocks publishers (a memory or disk alarm) is logged, since confirms stop meanwhile.
async fn watch_connection(
    events: impl futures_util::Stream<Item = lapin::Event>,
    stats: Arc<super::Stats>,
) {
    futures_util::pin_mut!(events);
    while let Some(event) = events.next().await {
        match event {
            lapin::Event::Error(error) => {
                tracing::warn!(%error, "rabbitmq: connection failed");
                stats.set_broker_up(false);
                return;
            }
            lapin::Event::ConnectionBlocked(reason) => {
                tracing::warn!(%reason, "rabbitmq: the broker blocks publishing on this connection (resource alarm); confirms wait until it lifts")
            }
            lapin::Event::ConnectionUnblocked => {
                tracing::info!("rabbitmq: the broker unblocked publishing")
            }
            _ => {}
        }
    }
}

fn frame_max(connection: &Connection) -> usize {
    usize::try_from(connection.configuration().frame_max()).unwrap_or(usize::MAX)
}

/// What the broker accepts. A message beyond either limit makes the broker close the channel
/// or the connection, which would fail the whole batch again and again: such a row is refused
/// up front instead, and it alone is marked dead.
#[derive(Clone, Copy)]
struct Limits<'a> {
    max_message_bytes: usize,
    /// The properties (headers included) travel in one frame of at most this many bytes.
    frame_max: usize,
    /// Exchanges the broker said do not exist (a failed attempt, not a refusal: the exchange
    /// may be created later).
    missing_exchanges: &'a HashMap<String, String>,
}

impl Limits<'_> {
    fn check(&self, row: &ClaimedRow, message: &Outgoing) -> Result<(), String> {
        if row.payload.len() > self.max_message_bytes {
            return Err(format!(
                "payload of {} bytes exceeds relay.max_message_bytes ({}); raise it only as far \
                 as the broker's max_message_size allows",
                row.payload.len(),
                self.max_message_bytes
            ));
        }
        if message.properties_bytes > self.frame_max {
            return Err(format!(
                "headers and properties take up to {} bytes, more than the broker's frame_max \
                 ({} bytes) allows for them: move the data into the payload",
                message.properties_bytes, self.frame_max
            ));
        }
        Ok(())
    }
}

/// Publishes each row (mandatory, persistent) and collects the pending confirms.
async fn publish_batch(
    channel: &Channel,
    batch: Batch,
    window: OwnedSemaphorePermit,
    limits: Limits<'_>,
) -> Published {
    // Rows that cannot go out are decided here; the others are published in row order.
    let mut decided: Vec<Option<Sent>> = Vec::with_capacity(batch.rows.len());
    let mut messages = Vec::with_capacity(batch.rows.len());
    for row in &batch.rows {
        if let Some(reason) = limits.missing_exchanges.get(&row.exchange) {
            decided.push(Some(Sent::Failed(format!(
                "exchange {:?} does not exist ({reason}); declare it, or fix the row's exchange",
                row.exchange
            ))));
            continue;
        }
        match outgoing(row).and_then(|message| {
            limits.check(row, &message)?;
            Ok(message)
        }) {
            Ok(message) => {
                decided.push(None);
                messages.push((message, row.payload.as_slice()));
            }
            Err(reason) => decided.push(Some(Sent::Refused(format!(
                "cannot be sent as AMQP: {reason}"
            )))),
        }
    }
    let mut results = amqp::publish_in_order(channel, messages).await.into_iter();
    let mut logged = false;
    let mut sent = Vec::with_capacity(batch.rows.len());
    for (row, decided) in batch.rows.iter().zip(decided) {
        if let Some(decided) = decided {
            sent.push(decided);
            continue;
        }
        sent.push(match results.next() {
            Some(Ok(confirm)) => Sent::Confirm(confirm),
            Some(Err(error)) => {
                if !logged {
                    logged = true;
                    tracing::warn!(id = row.id, %error, "relay: publish failed; the batch's unsent rows go back to pending");
                }
                // A channel or connection that failed is the connection's fault, not the row's.
                match error.kind() {
                    ErrorKind::InvalidChannelState(..)
                    | ErrorKind::InvalidConnectionState(..)
                    | ErrorKind::IOError(..) => Sent::Released,
                    _ => Sent::Failed(format!("publish failed: {error}")),
                }
            }
            // not queued: an earlier publish failed at once
            None => Sent::Released,
        });
    }
    Published {
        batch,
        sent,
        published_at: std::time::Instant::now(),
        window,
    }
}
