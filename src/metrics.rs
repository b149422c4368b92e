//! The operator's HTTP listener: Prometheus metrics (`/metrics`), liveness (`/healthz`) and
//! readiness (`/readyz`).
//!
//! The relay and the consumer record through the `metrics` facade wherever the work happens;
//! this module installs the Prometheus recorder and serves what it renders. Without it the
//! facade's calls cost next to nothing.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use serde_json::json;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use crate::relay::Health;
use crate::store::operations;

/// Histogram buckets for latencies, in seconds.
const SECONDS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];
/// Histogram buckets for batch sizes, in rows.
const ROWS: &[f64] = &[
    1.0, 10.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0,
];

/// The metrics listener failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MetricsError {
    /// The Prometheus recorder could not be installed (another one is installed already).
    #[error("metrics: installing the Prometheus recorder: {0}")]
    Recorder(String),
    /// Serving the endpoints failed.
    #[error("metrics: serving the endpoints: {0}")]
    Serve(#[source] std::io::Error),
}

/// Installs the process-wide Prometheus recorder; call once, before the relay starts.
pub fn install() -> Result<PrometheusHandle, MetricsError> {
    PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), SECONDS)
        .and_then(|b| b.set_buckets_for_metric(Matcher::Suffix("_rows".into()), ROWS))
        .and_then(|b| b.install_recorder())
        .map_err(|e| MetricsError::Recorder(e.to_string()))
}

/// What the endpoints look at.
#[derive(Clone)]
pub struct Probe {
    /// The outbox database.
    pub pool: PgPool,
    /// The relay's links to the broker and to Postgres notifications.
    pub health: Arc<Health>,
    /// Readiness fails while the oldest due pending row is older than this (`None`: no check).
    pub max_lag: Option<Duration>,
    /// Whether dead rows park their streams (`relay.dead_rows_park_keys`): such rows are
    /// counted in `postbox_parked_streams`.
    pub park_keys: bool,
    /// The recorder's handle.
    pub handle: PrometheusHandle,
}

/// Serves the endpoints on `listener` until `shutdown`.
pub async fn serve(
    listener: tokio::net::TcpListener,
    probe: Probe,
    shutdown: CancellationToken,
) -> Result<(), MetricsError> {
    let app = Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(ready))
        .with_state(probe);
    axum::serve(listener, app)
        .with_graceful_shutdown(async move { shutdown.cancelled().await })
        .await
        .map_err(MetricsError::Serve)
}

/// The backlog gauges, read when scraped.
async fn metrics(State(probe): State<Probe>) -> Response {
    match tokio::time::timeout(
        Duration::from_secs(5),
        operations::backlog(&probe.pool, probe.park_keys),
    )
    .await
    {
        Ok(Ok(backlog)) => {
            metrics::gauge!("postbox_database_up").set(1.0);
            metrics::gauge!("postbox_pending_rows").set(backlog.pending as f64);
            metrics::gauge!("postbox_dead_rows").set(backlog.dead as f64);
            metrics::gauge!("postbox_parked_streams").set(backlog.parked as f64);
            metrics::gauge!("postbox_lag_seconds").set(backlog.oldest_pending_age_seconds);
        }
        _ => metrics::gauge!("postbox_database_up").set(0.0),
    }
    metrics::gauge!("postbox_broker_up").set(f64::from(u8::from(probe.health.broker_connected())));
    metrics::gauge!("postbox_broker_blocked")
        .set(f64::from(u8::from(probe.health.broker_blocked())));
    metrics::gauge!("postbox_listener_up").set(f64::from(u8::from(probe.health.listening())));
    probe.handle.render().into_response()
}

/// Ready when Postgres answers, the broker connection is up (and not blocked by an alarm), the relay listens for commits and
/// (if configured) the backlog's oldest due row is younger than `max_lag`; otherwise 503, with
/// every check's result.
async fn ready(State(probe): State<Probe>) -> Response {
    let backlog = tokio::time::timeout(
        Duration::from_secs(2),
        operations::backlog(&probe.pool, probe.park_keys),
    )
    .await;
    let (database, lag) = match backlog {
        Ok(Ok(backlog)) => (Ok(()), Some(backlog.oldest_pending_age_seconds)),
        Ok(Err(error)) => (Err(error.to_string()), None),
        Err(_) => (Err("no answer within 2s".to_string()), None),
    };
    let broker = if !probe.health.broker_connected() {
        Err("not connected".to_string())
    } else if probe.health.broker_blocked() {
        Err("the broker blocks publishing (resource alarm)".to_string())
    } else {
        Ok(())
    };
    let listener = if probe.health.listening() {
        Ok(())
    } else {
        Err("not listening for commits; new rows wait for the poll".to_string())
    };
    let lag_check = match (probe.max_lag, lag) {
        (Some(max), Some(lag)) if lag > max.as_secs_f64() => Err(format!(
            "oldest due pending row is {lag:.1}s old, above {:.1}s",
            max.as_secs_f64()
        )),
        _ => Ok(()),
    };
    let ready = database.is_ok() && broker.is_ok() && listener.is_ok() && lag_check.is_ok();
    let show = |check: &std::result::Result<(), String>| match check {
        Ok(()) => json!("ok"),
        Err(reason) => json!(reason),
    };
    let body = json!({
        "ready": ready,
        "checks": {
            "database": show(&database),
            "broker": show(&broker),
            "listener": show(&listener),
            "lag": show(&lag_check),
        },
        "lag_seconds": lag,
    });
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(body)).into_response()
}

#[cfg(test)]
mod tests {
    use crate::config::parse_addr;

    #[test]
    fn metrics_addresses() {
        assert_eq!(parse_addr("9187").unwrap().to_string(), "127.0.0.1:9187");
        assert_eq!(parse_addr(":9187").unwrap().to_string(), "127.0.0.1:9187");
        assert_eq!(
            parse_addr("0.0.0.0:9187").unwrap().to_string(),
            "0.0.0.0:9187"
        );
        assert_eq!(parse_addr("localhost:9187").unwrap().port(), 9187);
        let error = parse_addr("nonsense").unwrap_err().to_string();
        assert!(error.contains("metrics_addr"), "{error}");
    }
}
