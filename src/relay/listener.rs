//! Wakes the claimer when a transaction that wrote to the outbox commits (LISTEN/NOTIFY).

use std::sync::Arc;

use sqlx::postgres::PgListener;
use sqlx::PgPool;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use super::Health;
use crate::contract::NOTIFY_CHANNEL;
use crate::error::Context;
use crate::reconnect::until_ok;

/// Listens until `stop`; reconnects on its own. After every (re)connect it wakes the claimer
/// once, since notifications sent while it was away are lost. `health` shows whether it listens.
pub(crate) async fn listen(
    pool: PgPool,
    wake: Arc<Notify>,
    health: Arc<Health>,
    stop: CancellationToken,
) {
    loop {
        health.set_listening(false);
        let connect = || async {
            let mut listener = PgListener::connect_with(&pool)
                .await
                .context("connecting the notification listener")?;
            // A lost connection comes back as `Ok(None)` at once, and this loop reconnects (not
            // sqlx inside `try_recv`), so that `listening` is false while it is away.
            listener.eager_reconnect(false);
            listener
                .listen(NOTIFY_CHANNEL)
                .await
                .context("LISTEN postbox_outbox")?;
            Ok::<_, crate::error::DatabaseError>(listener)
        };
        let Some(mut listener) = until_ok("postgres listener", &stop, connect).await else {
            return;
        };
        health.set_listening(true);
        wake.notify_one();
        loop {
            let received = tokio::select! {
                _ = stop.cancelled() => {
                    health.set_listening(false);
                    return;
                }
                received = listener.try_recv() => received,
            };
            match received {
                Ok(Some(_)) => wake.notify_one(),
                // The wake-up comes once LISTEN holds again.
                Ok(None) => {
                    tracing::warn!("postgres listener: connection lost; reconnecting");
                    break;
                }
                Err(error) => {
                    tracing::warn!(%error, "postgres listener: failed; reconnecting");
                    break;
                }
            }
        }
    }
}
