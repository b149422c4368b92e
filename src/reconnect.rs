//! Retrying a connection attempt with exponential backoff until it works or shutdown begins.

use std::future::Future;
use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder};
use tokio_util::sync::CancellationToken;

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
/// Returns `None` if `shutdown` is cancelled first, abandoning an attempt under way (a connect
/// that hangs).
pub async fn until_ok<T, E, F, Fut>(
    what: &str,
    shutdown: &CancellationToken,
    attempt: F,
) -> Option<T>
where
    E: std::fmt::Display,
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, E>>,
{
    retry(what, shutdown, attempt, true).await
}

/// Like [`until_ok`], but an attempt under way always runs to its end, and one is made even if
/// `shutdown` is already cancelled: for work that must not be cut off half-done (a dead letter
/// published but not yet confirmed, an outcome being written). Only the waits between attempts
/// end at `shutdown`.
pub async fn until_ok_finishing<T, E, F, Fut>(
    what: &str,
    shutdown: &CancellationToken,
    attempt: F,
) -> Option<T>
where
    E: std::fmt::Display,
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, E>>,
{
    retry(what, shutdown, attempt, false).await
}

async fn retry<T, E, F, Fut>(
    what: &str,
    shutdown: &CancellationToken,
    mut attempt: F,
    abandon_attempts: bool,
) -> Option<T>
where
    E: std::fmt::Display,
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, E>>,
{
    let mut delays = connection_backoff();
    let mut failures = 0u32;
    loop {
        let result = if abandon_attempts {
            tokio::select! {
                _ = shutdown.cancelled() => return None,
                result = attempt() => result,
            }
        } else {
            attempt().await
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

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_finishing_attempt_runs_once_after_shutdown_and_is_not_retried() {
        let stopped = CancellationToken::new();
        stopped.cancel();
        let mut calls = 0;
        let ok = until_ok_finishing("test", &stopped, || {
            calls += 1;
            async { Ok::<_, &str>(7) }
        })
        .await;
        assert_eq!((ok, calls), (Some(7), 1));

        let mut calls = 0;
        let failed: Option<()> = until_ok_finishing("test", &stopped, || {
            calls += 1;
            async { Err("nack") }
        })
        .await;
        assert_eq!((failed, calls), (None, 1));

        // the plain form gives up without finishing (or starting) an attempt
        let abandoned = until_ok("test", &stopped, || async {
            std::future::pending::<Result<(), &str>>().await
        })
        .await;
        assert_eq!(abandoned, None);
    }
}
