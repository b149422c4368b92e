//! `postbox run`: the relay daemon.

use tokio_util::sync::CancellationToken;

use crate::amqp::Broker;
use crate::config::{redact_url, Settings};
use crate::error::Result;
use crate::reconnect::until_ok;
use crate::relay::Relay;
use crate::store;

pub(super) async fn run(settings: Settings) -> Result<()> {
    let shutdown = CancellationToken::new();
    tokio::spawn(stop_on_signal(shutdown.clone()));

    let broker = Broker::new(settings.amqp_urls());
    let relay_settings = &settings.relay;
    tracing::info!(
        database = %redact_url(&settings.database_url),
        rabbitmq = %broker.describe(),
        batch_size = relay_settings.batch_size,
        max_in_flight_batches = relay_settings.max_in_flight_batches,
        poll_interval = ?relay_settings.poll_interval,
        "postbox relay starting"
    );
    let connections = Relay::connections_needed(relay_settings);
    let Some(pool) = until_ok("postgres", &shutdown, || {
        store::connect(&settings, connections)
    })
    .await
    else {
        return Ok(()); // stopped before Postgres came up: nothing was claimed
    };
    if settings.migrate_on_start {
        store::migrate(&pool).await?;
    }
    Relay::new(pool.clone(), broker, settings.relay.clone())
        .run(shutdown)
        .await;
    pool.close().await;
    Ok(())
}

/// Cancels `shutdown` on SIGINT or SIGTERM.
async fn stop_on_signal(shutdown: CancellationToken) {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = ctrl_c => {}
                    _ = term.recv() => {}
                }
            }
            Err(error) => {
                tracing::warn!(%error, "cannot watch SIGTERM; only SIGINT stops the relay");
                let _ = ctrl_c.await;
            }
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
    tracing::info!("signal received; shutting down");
    shutdown.cancel();
}
