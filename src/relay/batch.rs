//! What travels down the pipeline: a claimed batch, then its publishes, then its decisions.

use std::time::Instant;

use lapin::PublisherConfirm;
use sqlx::{Postgres, Transaction};
use tokio::sync::OwnedSemaphorePermit;

use super::channels::ChannelLease;
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
    Failed(PublishFailure),
    /// The row can never be sent as it is (not valid AMQP, beyond the broker's limits): dead
    /// at once, since retrying cannot help until someone changes the row or the limits.
    Refused(super::encode::Unsendable),
    /// Not published because of the connection or shutdown: goes back without using an attempt.
    Released,
}

/// Why the broker did not take a row: a failed attempt, retried with backoff.
#[derive(Debug)]
pub(crate) enum PublishFailure {
    /// The row's exchange does not exist (a passive declare said so).
    MissingExchange {
        /// The exchange the row names.
        exchange: String,
        /// The broker's answer.
        reason: String,
    },
    /// The publish itself failed.
    Publish(lapin::Error),
}

impl std::fmt::Display for PublishFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PublishFailure::MissingExchange { exchange, reason } => write!(
                f,
                "exchange {exchange:?} does not exist ({reason}); declare it, or fix the row's \
                 exchange"
            ),
            PublishFailure::Publish(error) => write!(f, "publish failed: {error}"),
        }
    }
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

/// A batch whose fate is decided; the completer writes it.
pub(crate) struct Decided {
    pub batch: Batch,
    /// The rows to update; rows not listed are released as they are.
    pub completions: Vec<(i64, Completion)>,
    pub published_at: Instant,
    pub confirmed_at: Instant,
}
