//! Retry schedules, shared by the relay (failed rows) and the consumer (failed handler runs):
//! exponential backoff with jitter, a bounded number of attempts.

use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder};

/// Exponential backoff from `initial` doubling up to `max`, with jitter (up to one more base
/// delay, so many failures do not retry in lockstep); gives up after `max_attempts` failures.
#[derive(Debug, Clone)]
pub struct RetryPolicy {
    max_attempts: u32,
    initial: Duration,
    max: Duration,
    backoff: ExponentialBuilder,
}

impl RetryPolicy {
    /// The schedule described above.
    pub fn new(max_attempts: u32, initial: Duration, max: Duration) -> Self {
        Self {
            max_attempts,
            initial,
            max,
            backoff: ExponentialBuilder::new()
                .with_min_delay(initial)
                .with_max_delay(max)
                .with_jitter()
                .without_max_times(),
        }
    }

    /// Whether `failures` failed attempts are all there may be.
    pub fn exhausted(&self, failures: u32) -> bool {
        failures >= self.max_attempts
    }

    /// How long to wait after the `failures`-th failure (counting from 1).
    pub fn delay(&self, failures: u32) -> Duration {
        let index = usize::try_from(failures.max(1) - 1).unwrap_or(usize::MAX);
        self.backoff
            .build()
            .nth(index)
            .unwrap_or(Duration::from_secs(1))
    }

    /// The longest a failing item can keep coming back: the sum of all its retry delays at
    /// their jittered maximum (twice the nominal delay).
    pub fn horizon(&self) -> Duration {
        let mut delay = self.initial;
        let mut total = Duration::ZERO;
        for _ in 1..self.max_attempts {
            total = total.saturating_add(delay.min(self.max) * 2);
            delay = delay.saturating_mul(2);
        }
        total
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_double_with_jitter_and_attempts_run_out() {
        let policy = RetryPolicy::new(3, Duration::from_secs(1), Duration::from_secs(60));
        // jitter adds up to one more base delay
        assert!((Duration::from_secs(1)..=Duration::from_secs(2)).contains(&policy.delay(1)));
        assert!((Duration::from_secs(2)..=Duration::from_secs(4)).contains(&policy.delay(2)));
        assert!(!policy.exhausted(2));
        assert!(policy.exhausted(3));
        // 2 · (1 s + 2 s): two retries at most
        assert_eq!(policy.horizon(), Duration::from_secs(6));
    }
}
