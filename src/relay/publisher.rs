//! Stage 2: publish every row of a batch, without waiting for confirms in between.

use std::collections::{HashMap, HashSet};

use futures_util::StreamExt;
use lapin::options::ExchangeDeclareOptions;
use lapin::types::{FieldTable, ShortString};
use lapin::{Channel, Connection, ErrorKind};
use std::sync::Arc;

use tokio::sync::{mpsc, Semaphore};
use tokio_util::sync::{CancellationToken, DropGuard};
use tracing::Instrument;

use super::batch::{Batch, ChannelLease, Decided, Published, Sent, WindowSlot};
use crate::amqp::Outgoing;
use crate::amqp::{self, Broker};
use crate::reconnect::until_ok;
use crate::relay::encode::outgoing;
use crate::store::outbox::ClaimedRow;

/// How often an idle publisher looks at its connection, for readiness.
const BROKER_CHECK: std::time::Duration = std::time::Duration::from_secs(1);

/// Publishes batches in the order they were claimed, each on a confirm-mode channel of its own
/// while it is in flight (see [`WindowSlot`]). A batch's rows go out on one channel in the
/// order claimed (each stream's in number order); a stream may be in several batches at once,
/// and consumers restore its order from the numbers should the broker receive them out of it.
pub(crate) struct Publisher {
    pub broker: Broker,
    /// Batches published whose confirms are not all in yet: the broker-side window.
    pub window: Arc<Semaphore>,
    stats: Arc<super::Stats>,
    /// Payloads above this are refused without trying (`relay.max_message_bytes`).
    max_message_bytes: usize,
    /// How long a batch may wait on a broker that blocks publishing before it is given back,
    /// and the longest a channel may take to open (`relay.confirm_timeout`).
    block_timeout: std::time::Duration,
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

impl Publisher {
    pub fn new(
        broker: Broker,
        window: Arc<Semaphore>,
        stats: Arc<super::Stats>,
        settings: &crate::relay::RelayOptions,
    ) -> Self {
        let (returns_tx, returns_rx) = mpsc::unbounded_channel();
        Self {
            broker,
            window,
            stats,
            max_message_bytes: settings.max_message_bytes,
            block_timeout: settings.confirm_timeout,
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

    /// Publishes until the claimer is done (its channel closes) or `hard_stop` is cancelled.
    /// Once `shutdown` begins, waiting for the broker to come back is pointless: batches not
    /// yet published are given back rather than held until `hard_stop`. A batch it cannot
    /// publish goes to the completer undecided (`give_back`), which releases its rows: the
    /// publisher writes nothing to Postgres.
    pub async fn run(
        mut self,
        mut input: mpsc::Receiver<Batch>,
        out: mpsc::Sender<Published>,
        give_back: mpsc::Sender<Decided>,
        shutdown: CancellationToken,
        hard_stop: CancellationToken,
    ) {
        loop {
            // Connect at once (readiness reflects the broker before there is anything to
            // publish), and after a loss reconnect before taking the next batch.
            if !self.connected()
                && !self
                    .reconnect(&mut input, &give_back, &shutdown, &hard_stop)
                    .await
            {
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
                    self.stats.broker.set_connected(self.connected());
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
            if !self.stats.broker.usable() || !self.connected() {
                // Lost or blocked while the batch waited: hand it back rather than hold its
                // rows through the reconnect or the alarm.
                hand_back(&give_back, batch).await;
                continue;
            }
            let block_changes = self.stats.broker.block_changes();
            let stats = self.stats.clone();
            let block_timeout = self.block_timeout;
            let attempt = async {
                // Without reconnecting: a connection lost since the check above is the next
                // round's to restore, after this batch's rows are given back.
                let (lease, frame_max) = self.channel(&shutdown, false).await?;
                let missing_exchanges = self.missing_exchanges(&batch).await;
                let limits = Limits {
                    max_message_bytes: self.max_message_bytes,
                    frame_max,
                    missing_exchanges: &missing_exchanges,
                };
                let channel = lease.channel.clone()?;
                let sent = publish_rows(&channel, &batch, limits)
                    .instrument(tracing::debug_span!(
                        "postbox.publish",
                        rows = batch.rows.len()
                    ))
                    .await;
                Some((lease, sent))
            };
            // lapin writes nothing while the broker blocks publishing (a resource alarm), so
            // reopening a channel, probing an exchange or publishing can wait for as long as
            // the alarm lasts: once the broker has blocked for a confirm timeout, give up and
            // give the rows back without counting an attempt (writes lapin queued may still go
            // out later: duplicates, with the same message ids). Without a block, writes wait
            // as long as the connection lives.
            let written = tokio::select! {
                _ = hard_stop.cancelled() => break,
                written = attempt => written,
                _ = blocked_for(&stats, block_timeout, block_changes) => {
                    tracing::warn!(
                        rows = batch.rows.len(),
                        "relay: the broker blocks publishing; the batch goes back to pending without using an attempt"
                    );
                    hand_back(&give_back, batch).await;
                    continue;
                }
            };
            let Some((lease, sent)) = written else {
                // The connection went away: the rows go back, and the next round reconnects
                // (or stops).
                hand_back(&give_back, batch).await;
                continue;
            };
            let written_at = std::time::Instant::now();
            let channel_connected = lease
                .channel
                .as_ref()
                .is_some_and(|c| c.status().connected());
            let published = Published {
                batch,
                sent,
                published_at: written_at,
                block_changes,
                window: WindowSlot {
                    channel: lease,
                    _permit: window,
                },
            };
            tracing::trace!(
                wait_batch_ms = (got_batch - waiting_since).as_secs_f64() * 1e3,
                wait_and_publish_ms = (written_at - got_batch).as_secs_f64() * 1e3,
                "relay: published"
            );
            // The next round reconnects (closing the old connection, forgetting its probed
            // exchanges) or `channel()` reopens the channel; readiness shows a lost connection
            // now rather than then.
            if !channel_connected {
                self.stats.broker.set_connected(self.connected());
            }
            if out.send(published).await.is_err() {
                break;
            }
        }
        // Stopping without a broker: give back what was claimed and never published.
        if !hard_stop.is_cancelled() {
            input.close();
            while let Some(batch) = input.recv().await {
                hand_back(&give_back, batch).await;
            }
        }
        // Lets the confirmer finish once it has drained what it holds. Batches handed on still
        // wait for their confirms on this connection: keep it open until the relay says the
        // pipeline has drained (or gave up on it).
        drop(out);
        drop(give_back);
        hard_stop.cancelled().await;
        self.stats.broker.set_connected(false);
        self.watcher = None;
        if let Some(connection) = self.connection.take() {
            amqp::close(&connection, "postbox relay stopping").await;
        }
    }

    /// Connects, or reconnects after a loss, handing back every batch that arrives meanwhile
    /// (claimed before the loss was seen): other relays may have a broker to publish them to,
    /// and this one claims nothing until it is connected. False if the relay stops first.
    async fn reconnect(
        &mut self,
        input: &mut mpsc::Receiver<Batch>,
        give_back: &mpsc::Sender<Decided>,
        shutdown: &CancellationToken,
        hard_stop: &CancellationToken,
    ) -> bool {
        self.stats.broker.set_connected(false);
        let connect = self.channel(shutdown, true);
        tokio::pin!(connect);
        loop {
            tokio::select! {
                // The connection first: once it is up, a batch claimed because of it is for
                // the main loop to publish, not to give back.
                biased;
                _ = hard_stop.cancelled() => return false,
                channel = &mut connect => {
                    let Some((mut lease, _)) = channel else {
                        return false;
                    };
                    // Unused: back to the idle ones.
                    lease.reusable = true;
                    return true;
                }
                batch = input.recv() => match batch {
                    Some(batch) => hand_back(give_back, batch).await,
                    None => return false,
                },
            }
        }
    }

    /// Whether the current connection is open.
    fn connected(&self) -> bool {
        self.connection
            .as_ref()
            .is_some_and(|connection| connection.status().connected())
    }

    /// A channel for one batch, with the connection's negotiated frame size: an idle one, or
    /// a new one. When the connection is gone: `None` at once unless `reconnect`, else
    /// reconnecting (with backoff, across nodes) until `stop` is cancelled (then `None`).
    async fn channel(
        &mut self,
        stop: &CancellationToken,
        reconnect: bool,
    ) -> Option<(ChannelLease, usize)> {
        let lease = |publisher: &Self, channel: Channel| ChannelLease {
            generation: publisher.generation,
            channel: Some(channel),
            back: publisher.returns_tx.clone(),
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
                match tokio::time::timeout(self.block_timeout, open).await {
                    Ok(Ok(channel)) => return Some((lease(self, channel), frame_max)),
                    Ok(Err(error)) => tracing::warn!(%error, "rabbitmq: could not open a channel"),
                    Err(_) => {
                        tracing::warn!(timeout = ?self.block_timeout, "rabbitmq: opening a channel timed out")
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
            self.stats.broker.set_connected(false);
        }
        if !reconnect {
            return None;
        }
        let broker = &self.broker;
        let (connection, channel) = until_ok("rabbitmq", stop, || async {
            let connection = broker.connect("postbox relay").await?;
            let channel = amqp::confirm_channel(&connection).await?;
            Ok((connection, channel))
        })
        .await?;
        let frame_max = frame_max(&connection);
        let watcher = CancellationToken::new();
        tokio::spawn(watch_connection(
            connection.events_listener(),
            connection.status().clone(),
            self.stats.clone(),
            watcher.clone(),
        ));
        self.watcher = Some(watcher.drop_guard());
        self.connection = Some(connection);
        self.generation += 1;
        self.stats.broker.set_connected(true);
        Some((lease(self, channel), frame_max))
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
        let Some(connection) = &self.connection else {
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

/// Follows the current connection's events until it fails or is replaced (`stop`): a failed
/// connection stops the claimer at once (the publisher reconnects when it next looks, within
/// `BROKER_CHECK`), and a broker that blocks publishers (a memory or disk alarm) stops it too,
/// until the broker lifts the block.
async fn watch_connection(
    events: impl futures_util::Stream<Item = lapin::Event>,
    status: lapin::ConnectionStatus,
    stats: Arc<super::Stats>,
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
                stats.broker.set_connected(false);
                return;
            }
            lapin::Event::ConnectionBlocked(reason) => {
                tracing::warn!(%reason, "rabbitmq: the broker blocks publishing (resource alarm); the relay claims nothing until it lifts");
                stats.broker.set_blocked(true);
            }
            lapin::Event::ConnectionUnblocked => {
                tracing::info!("rabbitmq: the broker unblocked publishing");
                stats.broker.set_blocked(false);
            }
            _ => {}
        }
    }
}

/// Returns once the broker has blocked publishing for `timeout` (checked every `timeout`)
/// since it had `block_changes` changes; never while it does not block.
async fn blocked_for(stats: &super::Stats, timeout: std::time::Duration, block_changes: u64) {
    loop {
        tokio::time::sleep(timeout).await;
        if stats.broker.blocked_since(block_changes) {
            return;
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

/// Sends `batch` to the completer undecided: it releases the rows and tells the other relays.
/// Should the completer be gone (the relay is stopping), dropping the batch rolls it back,
/// which releases the rows as well.
async fn hand_back(give_back: &mpsc::Sender<Decided>, batch: Batch) {
    let now = std::time::Instant::now();
    let _ = give_back
        .send(Decided {
            batch,
            completions: Vec::new(),
            published_at: now,
            confirmed_at: now,
        })
        .await;
}

/// Publishes each row (mandatory, persistent) and collects the pending confirms.
async fn publish_rows(channel: &Channel, batch: &Batch, limits: Limits<'_>) -> Vec<Sent> {
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
    sent
}
