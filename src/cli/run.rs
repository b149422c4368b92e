//! `postbox run`: the relay daemon.

use tokio_util::sync::CancellationToken;

use super::error::{Error, Result};
use crate::amqp::Broker;
use crate::config::Settings;
use crate::metrics;
use crate::reconnect::until_ok;
use crate::redact::redact_url;
use crate::relay::Relay;
use crate::store;

/// Options of `postbox run`.
#[derive(Debug, clap::Args)]
pub struct RunArgs {
    /// Serve /metrics, /healthz and /readyz here: host:port, or a port alone for loopback
    /// (overrides metrics_addr).
    #[arg(long, env = "POSTBOX_METRICS_ADDR", value_name = "ADDR")]
    pub metrics_addr: Option<String>,
}

pub(super) async fn run(mut settings: Settings, args: RunArgs) -> Result<()> {
    if let Some(addr) = args.metrics_addr {
        settings.metrics_addr = addr;
        settings.validate()?;
    }
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
    // The pool connects on first use: the health endpoints answer (and a taken port fails the
    // start) while Postgres is still unreachable; /readyz says so.
    let pool = store::connect_lazy(settings.database(), connections)?;
    let relay = Relay::new(pool.clone(), broker, settings.relay.clone())?;
    // A connection of its own for the probes: they must not queue behind the relay's
    // heartbeat, poll, cleanup or a long VACUUM for the pool's spare connection.
    let probe_pool = store::connect_lazy(settings.database(), 1)?;
    let server = match settings.metrics_addr.trim() {
        "" => None,
        addr => Some(
            serve_metrics(
                addr,
                &settings,
                probe_pool.clone(),
                relay.health(),
                &shutdown,
            )
            .await?,
        ),
    };
    if until_ok("postgres", &shutdown, || store::ping(settings.database()))
        .await
        .is_none()
    {
        // stopped before Postgres came up: nothing was claimed
        shutdown.cancel();
        if let Some(server) = server {
            let _ = server.await;
        }
        probe_pool.close().await;
        return Ok(());
    }
    let migrated = if settings.migrate_on_start {
        crate::migrate(&pool).await
    } else {
        Ok(())
    };
    if migrated.is_ok() {
        relay.run(shutdown.clone()).await;
    }
    shutdown.cancel();
    if let Some(server) = server {
        let _ = server.await;
    }
    // Closed, not dropped: each session ends with a Terminate, not a reset socket in the log.
    probe_pool.close().await;
    pool.close().await;
    Ok(migrated?)
}

/// Binds the operator's listener and serves it until `shutdown`.
async fn serve_metrics(
    addr: &str,
    settings: &Settings,
    pool: sqlx::PgPool,
    health: std::sync::Arc<crate::relay::Health>,
    shutdown: &CancellationToken,
) -> Result<tokio::task::JoinHandle<()>> {
    let addr = crate::config::parse_addr(addr)?;
    let handle = metrics::install()?;
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| Error::Io {
            context: format!("binding the metrics listener on {addr}"),
            source,
        })?;
    tracing::info!(%addr, "serving /metrics, /healthz and /readyz");
    let probe = metrics::Probe {
        pool,
        health,
        max_lag: (!settings.readiness_max_lag.is_zero()).then_some(settings.readiness_max_lag),
        park_keys: settings.relay.dead_rows_park_keys,
        handle,
    };
    let shutdown = shutdown.clone();
    Ok(tokio::spawn(async move {
        if let Err(error) = metrics::serve(listener, probe, shutdown).await {
            tracing::error!(%error, "metrics listener failed");
        }
    }))
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
