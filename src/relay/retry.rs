//! What becomes of a failed row: retry after a backoff, or dead. Pure decisions, so they are
//! tested without a broker.

use crate::relay::RelayOptions;
use crate::retry::RetryPolicy;
use crate::store::outbox::Completion;

impl RetryPolicy {
    /// The relay's policy, from its settings.
    pub fn from_settings(settings: &RelayOptions) -> Self {
        Self::new(
            settings.max_attempts,
            settings.retry_initial_delay,
            settings.retry_max_delay,
        )
    }

    /// The completion for a row that failed with `error` after `attempts_before` earlier
    /// failed attempts.
    pub fn after_failure(&self, attempts_before: i32, error: String) -> Completion {
        let failures = u32::try_from(attempts_before)
            .unwrap_or(0)
            .saturating_add(1);
        if self.exhausted(failures) {
            return Completion::Dead { error };
        }
        Completion::Retry {
            error,
            retry_after: self.delay(failures),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

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
