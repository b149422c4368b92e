//! What travels down the pipeline: a claimed batch, then its publishes, then its decisions.

use std::time::Instant;

use lapin::PublisherConfirm;
use sqlx::{Postgres, Transaction};
use tokio::sync::OwnedSemaphorePermit;

use crate::store::outbox::{ClaimedRow, Completion};

/// Rows claimed in one transaction. The transaction holds their row locks until the completer
/// commits it; dropping the batch rolls back and releases the rows untouched.
pub(crate) struct Batch {
    pub tx: Transaction<'static, Postgres>,
    pub rows: Vec<ClaimedRow>,
    pub claimed_at: Instant,
    /// One of the open-batch slots (each holds a database connection), given back once the
    /// batch is marked.
    pub permit: OwnedSemaphorePermit,
}

/// What publishing did with one row.
pub(crate) enum Sent {
    /// Handed to the broker; the confirm is still to come.
    Confirm(PublisherConfirm),
    /// The broker refused the publish: counts as a failed attempt.
    Failed(String),
    /// The row can never be sent as it is (not valid AMQP, beyond the broker's limits): dead
    /// at once, since retrying cannot help until someone changes the row or the limits.
    Refused(String),
    /// Not published because of the connection or shutdown: goes back without using an attempt.
    Released,
}

/// A batch whose rows have all been handed to the broker (or not).
pub(crate) struct Published {
    pub batch: Batch,
    pub sent: Vec<Sent>,
    pub published_at: Instant,
    /// The broker's block changes when publishing began ([`super::BrokerState::block_changes`]).
    pub block_changes: u64,
    /// One of the `max_in_flight_batches` broker-window slots with the channel the batch went
    /// out on, given back as soon as the batch's confirms are in: marking it does not hold up
    /// the next publish.
    pub window: WindowSlot,
}

/// A broker-window slot: its permit, and the channel its batch was published on. Each batch in
/// flight has a channel to itself, because lapin hands a `basic.return` to whichever confirm a
/// `multiple` ack resolves first: an ack spanning two batches on one channel could put one
/// batch's return on the other's confirm, and the returned row would be decided (published)
/// before its return was seen.
pub(crate) struct WindowSlot {
    // Held for their drop, in this order: the channel goes back before the permit lets the
    // next batch in.
    pub channel: ChannelLease,
    pub _permit: OwnedSemaphorePermit,
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

/// A batch whose fate is decided; the completer writes it.
pub(crate) struct Decided {
    pub batch: Batch,
    /// The rows to update; rows not listed are released as they are.
    pub completions: Vec<(i64, Completion)>,
    pub published_at: Instant,
    pub confirmed_at: Instant,
}
