//! Retrying a connection attempt with exponential backoff until it works or shutdown begins.

use std::future::Future;
use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder};
use tokio_util::sync::CancellationToken;

use crate::error::Result;

/// Backoff between connection attempts: 100 ms doubling to 10 s, with jitter so that many relays
/// restarting together do not reconnect in lockstep.
pub fn connection_backoff() -> impl Iterator<Item = Duration> {
    ExponentialBuilder::new()
        .with_min_delay(Duration::from_millis(100))
        .with_max_delay(Duration::from_secs(10))
        .with_jitter()
        .without_max_times()
        .build()
}

/// Calls `attempt` until it succeeds, logging each failure with the delay before the next try.
/// Returns `None` if `shutdown` is cancelled first.
pub async fn until_ok<T, F, Fut>(
    what: &str,
    shutdown: &CancellationToken,
    mut attempt: F,
) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T>>,
{
    let mut delays = connection_backoff();
    let mut failures = 0u32;
    loop {
        let result = tokio::select! {
            _ = shutdown.cancelled() => return None,
            result = attempt() => result,
        };
        match result {
            Ok(value) => {
                if failures > 0 {
                    tracing::info!(failures, "{what}: ok again");
                }
                return Some(value);
            }
            Err(error) => {
                failures += 1;
                let delay = delays.next().unwrap_or(Duration::from_secs(10));
                tracing::warn!(%error, retry_in = ?delay, failures, "{what}: failed");
                tokio::select! {
                    _ = shutdown.cancelled() => return None,
                    _ = tokio::time::sleep(delay) => {}
                }
            }
        }
    }
}
