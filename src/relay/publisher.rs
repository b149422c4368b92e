//! Stage 2: publish every row of a batch, without waiting for confirms in between.

use std::collections::HashMap;

use lapin::{Channel, ErrorKind};
use std::sync::Arc;

use tokio::sync::{mpsc, Semaphore};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::batch::{Batch, Decided, PublishFailure, Published, Sent, WindowSlot};
use super::channels::Channels;
use crate::amqp::Outgoing;
use crate::amqp::{self, Broker};
use crate::relay::encode::{outgoing, Unsendable};
use crate::store::outbox::ClaimedRow;

/// How often an idle publisher looks at its connection, for readiness.
const BROKER_CHECK: std::time::Duration = std::time::Duration::from_secs(1);

/// Publishes batches in the order they were claimed, each on a confirm-mode channel of its own
/// while it is in flight (see [`WindowSlot`]). A batch's rows go out on one channel in the
/// order claimed (each stream's in number order); a stream may be in several batches at once,
/// and consumers restore its order from the numbers should the broker receive them out of it.
pub(crate) struct Publisher {
    /// Batches published whose confirms are not all in yet: the broker-side window.
    pub window: Arc<Semaphore>,
    health: Arc<super::Health>,
    /// Payloads above this are refused without trying (`relay.max_message_bytes`).
    max_message_bytes: usize,
    /// How long a batch may wait on a broker that blocks publishing before it is given back,
    /// and the longest a channel may take to open (`relay.confirm_timeout`).
    block_timeout: std::time::Duration,
    /// The broker connection and the channels lent to batches.
    channels: Channels,
}

impl Publisher {
    pub fn new(
        broker: Broker,
        window: Arc<Semaphore>,
        health: Arc<super::Health>,
        settings: &crate::relay::RelayOptions,
    ) -> Self {
        Self {
            channels: Channels::new(broker, health.clone(), settings.confirm_timeout),
            window,
            health,
            max_message_bytes: settings.max_message_bytes,
            block_timeout: settings.confirm_timeout,
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
            if !self.channels.connected()
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
                    self.health.broker.set_connected(self.channels.connected());
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
            if !self.health.broker.usable() || !self.channels.connected() {
                // Lost or blocked while the batch waited: hand it back rather than hold its
                // rows through the reconnect or the alarm.
                hand_back(&give_back, batch).await;
                continue;
            }
            let block_changes = self.health.broker.block_changes();
            let health = self.health.clone();
            let block_timeout = self.block_timeout;
            let attempt = async {
                // Without reconnecting: a connection lost since the check above is the next
                // round's to restore, after this batch's rows are given back.
                let (lease, frame_max) = self.channels.channel(&shutdown, false).await?;
                let missing_exchanges = self.channels.missing_exchanges(&batch.rows).await;
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
                _ = blocked_for(&health, block_timeout, block_changes) => {
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
                self.health.broker.set_connected(self.channels.connected());
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
        self.channels.close().await;
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
        self.health.broker.set_connected(false);
        let connect = self.channels.channel(shutdown, true);
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
}

/// Returns once the broker has blocked publishing for `timeout` (checked every `timeout`)
/// since it had `block_changes` changes; never while it does not block.
async fn blocked_for(health: &super::Health, timeout: std::time::Duration, block_changes: u64) {
    loop {
        tokio::time::sleep(timeout).await;
        if health.broker.blocked_since(block_changes) {
            return;
        }
    }
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
    fn check(&self, row: &ClaimedRow, message: &Outgoing) -> Result<(), Unsendable> {
        if row.payload.len() > self.max_message_bytes {
            return Err(Unsendable::PayloadTooLarge {
                bytes: row.payload.len(),
                max: self.max_message_bytes,
            });
        }
        if message.properties_bytes > self.frame_max {
            return Err(Unsendable::PropertiesTooLarge {
                bytes: message.properties_bytes,
                frame_max: self.frame_max,
            });
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
            decided.push(Some(Sent::Failed(PublishFailure::MissingExchange {
                exchange: row.exchange.clone(),
                reason: reason.clone(),
            })));
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
            Err(reason) => decided.push(Some(Sent::Refused(reason))),
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
                    _ => Sent::Failed(PublishFailure::Publish(error)),
                }
            }
            // not queued: an earlier publish failed at once
            None => Sent::Released,
        });
    }
    sent
}
