//! The retry policy: pure decisions, so they are tested without a broker.

use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder};

use crate::config::RelaySettings;
use crate::store::outbox::Completion;

/// Decides what becomes of a failed row: retry after a backoff, or dead.
#[derive(Debug, Clone)]
pub struct RetryPolicy {
    max_attempts: u32,
    backoff: ExponentialBuilder,
}

impl RetryPolicy {
    /// The policy the settings describe.
    pub fn from_settings(settings: &RelaySettings) -> Self {
        Self::new(
            settings.max_attempts,
            settings.retry_initial_delay,
            settings.retry_max_delay,
        )
    }

    /// Exponential backoff from `initial` doubling up to `max`, with jitter; dead after
    /// `max_attempts` failed attempts.
    pub fn new(max_attempts: u32, initial: Duration, max: Duration) -> Self {
        Self {
            max_attempts,
            backoff: ExponentialBuilder::new()
                .with_min_delay(initial)
                .with_max_delay(max)
                .with_jitter()
                .without_max_times(),
        }
    }

    /// The completion for a row that failed with `error` after `attempts_before` earlier
    /// failed attempts.
    pub fn after_failure(&self, attempts_before: i32, error: String) -> Completion {
        let attempts = u32::try_from(attempts_before)
            .unwrap_or(0)
            .saturating_add(1);
        if attempts >= self.max_attempts {
            return Completion::Dead { error };
        }
        let retry_after = self
            .backoff
            .build()
            .nth(attempts as usize - 1)
            .unwrap_or(Duration::from_secs(1));
        Completion::Retry { error, retry_after }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backs_off_then_gives_up() {
        let policy = RetryPolicy::new(3, Duration::from_secs(1), Duration::from_secs(60));
        let delay = |attempts| match policy.after_failure(attempts, "x".into()) {
            Completion::Retry { retry_after, .. } => retry_after,
            other => panic!("expected a retry, got {other:?}"),
        };
        // jitter adds up to one more base delay
        assert!((Duration::from_secs(1)..=Duration::from_secs(2)).contains(&delay(0)));
        assert!((Duration::from_secs(2)..=Duration::from_secs(4)).contains(&delay(1)));
        assert_eq!(
            policy.after_failure(2, "boom".into()),
            Completion::Dead {
                error: "boom".into()
            }
        );
    }
}
