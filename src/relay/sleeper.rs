//! Asking to be woken: producers' commits notify only while a relay sleeps.
//!
//! Postgres serializes the commits of notifying transactions on one lock, held through each
//! commit's WAL flush, so a `NOTIFY` per commit throttles the application. The outbox trigger
//! therefore notifies only when a relay asked for it: a sleeping relay holds every one of
//! [`WAKEUP_KEYS`](crate::contract::WAKEUP_KEYS) advisory keys in share mode, and a producer's insert tries to take its own key
//! (its backend pid modulo [`WAKEUP_KEYS`](crate::contract::WAKEUP_KEYS)) exclusively for the rest of its transaction. The try fails
//! only while a relay sleeps (or, rarely, while another producer with the same key is inside its
//! transaction): then the producer notifies. A busy relay holds nothing, and its commits pay
//! nothing.
//!
//! Falling asleep cannot miss a commit: taking the keys in share mode waits for every producer
//! that took its key exclusively (and so did not notify) to commit or roll back, and the relay
//! claims once more after that. Advisory locks are not versioned, so this holds for producers in
//! `REPEATABLE READ` too.

use sqlx::{PgConnection, PgPool};

use crate::contract::{WAKEUP_KEYS, WAKEUP_NAMESPACE};
use crate::error::Context;
use crate::store::Result;

/// How long falling asleep may wait for one producer's transaction: a producer that stays in
/// its transaction longer leaves the relay awake (it polls), rather than stuck falling asleep.
const LOCK_TIMEOUT: &str = "1s";

/// A relay's wake-up keys, on a connection of their own (session-level locks belong to it).
#[derive(Default)]
pub(crate) struct Sleeper {
    connection: Option<PgConnection>,
    asleep: bool,
}

impl Sleeper {
    /// Takes the wake-up keys, after every producer that inserted without notifying has ended
    /// its transaction. Returns true when it fell asleep just now: the caller claims once more
    /// (for those producers' rows) before it waits. False when asleep already, or when the keys
    /// could not be taken (the relay then relies on its poll, and says why).
    pub async fn sleep(&mut self, pool: &PgPool) -> bool {
        if self.asleep {
            return false;
        }
        match self.take(pool).await {
            Ok(()) => {
                self.asleep = true;
                true
            }
            Err(error) => {
                tracing::warn!(%error, "relay: could not ask producers to wake it; polling instead");
                self.forget().await;
                false
            }
        }
    }

    async fn take(&mut self, pool: &PgPool) -> Result<()> {
        if self.connection.is_none() {
            let mut connection = pool
                .acquire()
                .await
                .context("connecting for the wake-up keys")?
                .detach();
            sqlx::query(sqlx::AssertSqlSafe(format!(
                "set lock_timeout = '{LOCK_TIMEOUT}'"
            )))
            .execute(&mut connection)
            .await
            .context("setting the wake-up connection's lock timeout")?;
            self.connection = Some(connection);
        }
        let Some(connection) = self.connection.as_mut() else {
            return Ok(());
        };
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "select count(pg_advisory_lock_shared({WAKEUP_NAMESPACE}, k)) \
             from generate_series(0, {}) k",
            WAKEUP_KEYS - 1
        )))
        .execute(connection)
        .await
        .context("taking the wake-up keys")?;
        Ok(())
    }

    /// Gives the keys back: the relay is busy and needs no notifications. Returns whether it
    /// was asleep.
    pub async fn wake(&mut self) -> bool {
        if !self.asleep {
            return false;
        }
        self.asleep = false;
        let released = match self.connection.as_mut() {
            Some(connection) => sqlx::query("select pg_advisory_unlock_all()")
                .execute(connection)
                .await
                .context("giving back the wake-up keys")
                .map(|_| ()),
            None => Ok(()),
        };
        if let Err(error) = released {
            tracing::debug!(%error, "relay: could not give back the wake-up keys");
            self.forget().await;
        }
        true
    }

    /// Drops the connection (and the keys with it).
    async fn forget(&mut self) {
        self.asleep = false;
        if let Some(connection) = self.connection.take() {
            let _ = sqlx::Connection::close(connection).await;
        }
    }
}
