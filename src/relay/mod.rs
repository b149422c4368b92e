//! The relay: a pipeline of four stages joined by bounded channels, data flowing one way.
//!
//! ```text
//!  LISTEN/NOTIFY, poll ──wake──▶ claimer ──Batch──▶ publisher ──Published──▶ confirmer ──Decided──▶ completer
//!                                  ▲                                                                │
//!                                  └──────────────────────── slot freed (wake) ───────────────────────┘
//! ```
//!
//! A batch is claimed with `FOR UPDATE SKIP LOCKED` inside a transaction that stays open until
//! the completer commits its outcome, so the row locks *are* the claim: a crashed relay's
//! connection drops and its rows are free again at once, and a relay whose session is gone
//! cannot mark anything. Up to `max_in_flight_batches` batches are in flight, so the next batch
//! is claimed and published while the previous one waits for confirms and its mark.

mod batch;
mod broker_state;
mod channels;
mod claimer;
mod completer;
mod confirmer;
pub(crate) mod encode;
mod error;
mod events;
mod heartbeat;
mod listener;
pub(crate) mod options;
mod publisher;
mod retention;
mod retry;
mod sleeper;

pub use crate::amqp::Broker;
pub use crate::retry::RetryPolicy;
pub use error::RelayError;
pub use options::RelayOptions;
pub use retention::cleanup;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use sqlx::PgPool;
use tokio::sync::{mpsc, Notify, Semaphore};
use tokio_util::sync::CancellationToken;

use crate::retention::VacuumAfter;
use crate::store::operations::HotTable;
use broker_state::BrokerState;
use claimer::Claimer;
use completer::Completer;
use confirmer::Confirmer;
use publisher::Publisher;

/// Claims in progress at once.
const CLAIMERS: usize = 2;

/// Running totals of what the relay did, readable while it runs (its state is [`Health`]).
#[derive(Debug, Default)]
pub struct Stats {
    claims: AtomicU64,
    batches: AtomicU64,
    published: AtomicU64,
    retried: AtomicU64,
    dead: AtomicU64,
    released: AtomicU64,
    sleeps: AtomicU64,
    wakes: AtomicU64,
}

/// The relay's links to the outside, as they are now: what readiness reports, and what the
/// claimer waits on (it claims nothing while the broker is away or blocks publishing).
#[derive(Debug, Default)]
pub struct Health {
    broker: BrokerState,
    listening: AtomicBool,
}

impl Health {
    /// Whether the publisher holds an open broker connection (it connects at start). While
    /// it does not, the relay claims nothing, so its rows stay free for other relays.
    pub fn broker_connected(&self) -> bool {
        self.broker.connected()
    }

    /// Whether the broker blocks publishing on the relay's connection (a memory or disk alarm).
    /// While it does, the relay claims nothing, and confirms it waited for in vain do not count
    /// as failed attempts.
    pub fn broker_blocked(&self) -> bool {
        self.broker.blocked()
    }

    fn set_listening(&self, listening: bool) {
        self.listening.store(listening, Ordering::Relaxed);
    }

    /// Whether the relay is listening for commits (LISTEN). While it is not, new rows are
    /// found by the poll only, up to `relay.poll_interval` late.
    pub fn listening(&self) -> bool {
        self.listening.load(Ordering::Relaxed)
    }
}

impl Stats {
    fn record(&self, published: u64, retried: u64, dead: u64, released: u64) {
        self.batches.fetch_add(1, Ordering::Relaxed);
        self.published.fetch_add(published, Ordering::Relaxed);
        self.retried.fetch_add(retried, Ordering::Relaxed);
        self.dead.fetch_add(dead, Ordering::Relaxed);
        self.released.fetch_add(released, Ordering::Relaxed);
    }

    fn record_claim(&self) {
        self.claims.fetch_add(1, Ordering::Relaxed);
    }

    /// Claim statements run, including those that found nothing to claim.
    pub fn claims(&self) -> u64 {
        self.claims.load(Ordering::Relaxed)
    }

    /// Batches completed (marked or released).
    pub fn batches(&self) -> u64 {
        self.batches.load(Ordering::Relaxed)
    }

    /// Rows confirmed by the broker and marked published.
    pub fn published(&self) -> u64 {
        self.published.load(Ordering::Relaxed)
    }

    /// Failed attempts that were scheduled for a retry.
    pub fn retried(&self) -> u64 {
        self.retried.load(Ordering::Relaxed)
    }

    /// Rows marked dead.
    pub fn dead(&self) -> u64 {
        self.dead.load(Ordering::Relaxed)
    }

    /// Rows given back unmarked (connection lost, shutdown), to be claimed again.
    pub fn released(&self) -> u64 {
        self.released.load(Ordering::Relaxed)
    }

    pub(crate) fn record_sleep(&self) {
        self.sleeps.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn record_wake(&self) {
        self.wakes.fetch_add(1, Ordering::Relaxed);
    }

    /// Times the relay fell asleep: with nothing to claim, it asked producers' commits to
    /// notify it (it took its wake-up keys).
    pub fn sleeps(&self) -> u64 {
        self.sleeps.load(Ordering::Relaxed)
    }

    /// Times the relay woke to work and gave its wake-up keys back.
    pub fn wakes(&self) -> u64 {
        self.wakes.load(Ordering::Relaxed)
    }
}

/// A relay running on its own task (from [`Relay::spawn`]).
pub type RelayHandle = crate::running::Running<Stats>;

/// The outbox relay. Build it with [`Relay::new`], then [`Relay::run`] or [`Relay::spawn`] it.
///
/// ```no_run
/// # async fn example(pool: sqlx::PgPool) -> Result<(), postbox::relay::RelayError> {
/// use postbox::relay::{Broker, Relay, RelayOptions};
///
/// let options = RelayOptions::default().batch_size(200);
/// // The pool needs Relay::connections_needed(&options) connections.
/// let broker = Broker::new(["amqp://guest:guest@127.0.0.1:5672/%2f"]);
/// let relay = Relay::new(pool, broker, options)?.spawn();
/// // ... on shutdown:
/// relay.stop().await.ok();
/// # Ok(()) }
/// ```
pub struct Relay {
    pool: PgPool,
    broker: Broker,
    settings: RelayOptions,
    stats: Arc<Stats>,
    health: Arc<Health>,
}

impl Relay {
    /// A relay over the outbox in `pool`'s database, publishing to `broker`. The pool needs
    /// [`Relay::connections_needed`] connections (each open batch holds one). Fails, naming
    /// the setting, when an option is invalid.
    pub fn new(pool: PgPool, broker: Broker, options: RelayOptions) -> Result<Self, RelayError> {
        options.validate()?;
        broker.check()?;
        Ok(Self {
            pool,
            broker,
            settings: options,
            stats: Arc::default(),
            health: Arc::default(),
        })
    }

    /// Database connections a relay with `settings` uses: up to three open batches per broker
    /// window slot (one being published or confirmed, one claimed and waiting, one being
    /// marked), one the LISTEN connection holds for good, and two for the idle poll,
    /// heartbeats, release announcements and retention, so these never wait behind batches.
    /// Besides these, the relay holds one connection of its own while it sleeps (its wake-up
    /// keys).
    pub fn connections_needed(settings: &RelayOptions) -> u32 {
        3 * settings.max_in_flight_batches + 3
    }

    /// Runs the relay on its own task; stop it with [`RelayHandle::stop`].
    pub fn spawn(self) -> RelayHandle {
        RelayHandle::spawn(self.stats(), |shutdown| self.run(shutdown))
    }

    /// Counters that stay readable while the relay runs.
    pub fn stats(&self) -> Arc<Stats> {
        self.stats.clone()
    }

    /// The relay's links to the broker and to Postgres notifications, readable while it runs
    /// (take it before [`Relay::spawn`]).
    pub fn health(&self) -> Arc<Health> {
        self.health.clone()
    }

    /// Runs until `shutdown` is cancelled, then stops claiming and lets in-flight batches
    /// finish for up to `shutdown_timeout`; batches still unfinished are rolled back, so their
    /// rows go back to pending without using an attempt. Returns once every stage has stopped.
    pub async fn run(self, shutdown: CancellationToken) {
        let settings = self.settings;
        let in_flight = settings.max_in_flight_batches as usize;
        let wake = Arc::new(Notify::new());
        let hard_stop = CancellationToken::new();
        let (claimed_tx, claimed_rx) = mpsc::channel(2 * in_flight);
        let (published_tx, published_rx) = mpsc::channel(in_flight);
        let (decided_tx, decided_rx) = mpsc::channel(2 * in_flight);

        let listener = tokio::spawn(listener::listen(
            self.pool.clone(),
            wake.clone(),
            self.health.clone(),
            shutdown.clone(),
        ));
        // Deletes old published rows (a zero retention keeps them), and vacuums after every
        // round where it vacuums: marking leaves a dead row version behind each row too.
        let retention_pool = self.pool.clone();
        let older_than = settings.retention;
        let cleaner = tokio::spawn(crate::retention::run(
            self.pool.clone(),
            HotTable::Outbox,
            settings.vacuum,
            VacuumAfter::EveryRound,
            settings.cleanup_interval,
            shutdown.clone(),
            (!older_than.is_zero()).then_some(move || {
                let pool = retention_pool.clone();
                async move { retention::cleanup(&pool, older_than).await }
            }),
        ));
        // Claimed batches waiting for the broker window are locked already, so the next
        // publish never waits for a claim; marked batches free their slot.
        let slots = Arc::new(Semaphore::new(3 * in_flight));
        let heartbeat = tokio::spawn(heartbeat::run(
            self.pool.clone(),
            settings.heartbeat_interval,
            self.stats.clone(),
            slots.clone(),
            3 * in_flight,
            shutdown.clone(),
        ));
        let claimer = Claimer {
            pool: self.pool.clone(),
            batch_size: settings.batch_size,
            poll_interval: settings.poll_interval,
            slots,
            total_slots: 3 * in_flight,
            wake: wake.clone(),
            stats: self.stats.clone(),
            health: self.health.clone(),
            scan: claimer::Scan::default(),
            sleeper: tokio::sync::Mutex::default(),
        };
        // Two claims run at once so the publisher never waits for one: they take disjoint rows
        // (SKIP LOCKED). A stream's rows may be in both; their numbers say the order, which
        // consumers restore should the broker receive them out of it.
        let claimer = Arc::new(claimer);
        // Only the first claimer polls when idle: an idle relay sends one probe per poll.
        let claimers: Vec<_> = (0..CLAIMERS)
            .map(|n| {
                let claimer = claimer
                    .clone()
                    .run(claimed_tx.clone(), n == 0, shutdown.clone());
                tokio::spawn(claimer)
            })
            .collect();
        drop(claimed_tx);
        let window = Arc::new(Semaphore::new(in_flight));
        let publisher = Publisher::new(self.broker, window, self.health.clone(), &settings);
        let publisher = tokio::spawn(publisher.run(
            claimed_rx,
            published_tx,
            decided_tx.clone(),
            shutdown.clone(),
            hard_stop.clone(),
        ));
        let confirmer = Confirmer {
            confirm_timeout: settings.confirm_timeout,
            policy: RetryPolicy::from_settings(&settings),
            health: self.health.clone(),
        };
        let confirmer = tokio::spawn(confirmer.run(published_rx, decided_tx, hard_stop.clone()));
        let mut completer = tokio::spawn(
            Completer {
                pool: self.pool.clone(),
                wake,
                stats: self.stats.clone(),
                keep_published: settings.keep_published,
                park_keys: settings.dead_rows_park_keys,
            }
            .run(decided_rx),
        );

        shutdown.cancelled().await;
        tracing::info!("relay: stopping; finishing in-flight batches");
        const STRAGGLERS: std::time::Duration = std::time::Duration::from_secs(10);
        // The completer ends once everything upstream has drained.
        let drained = tokio::time::timeout(settings.shutdown_timeout, &mut completer)
            .await
            .is_ok();
        if !drained {
            tracing::warn!(
                timeout = ?settings.shutdown_timeout,
                "relay: in-flight batches did not finish in time; releasing them"
            );
        }
        hard_stop.cancel();
        // A stage stuck on a stalled Postgres or broker (no reset, no answer) must not keep the
        // process from exiting: past this, what is left is aborted; its transactions end with
        // their connections, and rows still locked go to other relays (takeover_timeout).
        let deadline = tokio::time::Instant::now() + STRAGGLERS;
        let stages = (!drained)
            .then_some(("completer", completer))
            .into_iter()
            .chain(claimers.into_iter().map(|claimer| ("claimer", claimer)))
            .chain([
                ("listener", listener),
                ("retention", cleaner),
                ("heartbeat", heartbeat),
                ("publisher", publisher),
                ("confirmer", confirmer),
            ]);
        for (stage, mut task) in stages {
            match tokio::time::timeout_at(deadline, &mut task).await {
                Ok(Ok(())) => {}
                Ok(Err(error)) => tracing::error!(stage, %error, "relay: a stage failed"),
                Err(_) => {
                    tracing::warn!(stage, timeout = ?STRAGGLERS, "relay: a stage did not stop in time; aborting it");
                    task.abort();
                }
            }
        }
        tracing::info!("relay: stopped");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_relay_without_a_broker_node_is_refused_naming_the_setting() {
        // Lazy: nothing connects until the relay runs.
        let pool = || PgPool::connect_lazy("postgres://postgres@127.0.0.1:1/none").expect("URL");
        match Relay::new(
            pool(),
            Broker::new(Vec::<String>::new()),
            RelayOptions::default(),
        ) {
            Err(RelayError::Options(invalid)) => assert_eq!(invalid.setting, "amqp_url"),
            Err(other) => panic!("expected a setting error, got {other}"),
            Ok(_) => panic!("expected the relay to be refused"),
        }
        let broker = Broker::new(["amqp://guest:guest@127.0.0.1:1/%2f"]);
        assert!(Relay::new(pool(), broker, RelayOptions::default()).is_ok());
    }
}
