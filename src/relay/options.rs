//! The relay's options: what a service embedding the relay sets, and what the `[relay]`
//! section of `postbox run`'s configuration maps onto.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::error::InvalidSetting;
use crate::Vacuum;

/// How the relay claims, publishes and retries. Start from `RelayOptions::default()` and change
/// what you need with the methods named after the fields:
///
/// ```
/// use std::time::Duration;
/// use postbox::relay::RelayOptions;
///
/// let options = RelayOptions::default()
///     .batch_size(1_000)
///     .retention(Duration::from_secs(3 * 24 * 3600));
/// assert!(options.validate().is_ok());
/// ```
///
/// In the configuration file these are the `[relay]` section; a missing key keeps its default.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct RelayOptions {
    /// Rows claimed and published per batch: 1 to 10,000.
    pub batch_size: u32,
    /// Batches published and still awaiting their confirms (the broker window). Up to three
    /// times as many are open in Postgres, so the next batches are claimed while earlier ones are
    /// confirmed and marked. 1 to 64.
    pub max_in_flight_batches: u32,
    /// Fallback poll when no notification arrives (LISTEN/NOTIFY wakes the relay normally).
    /// Above zero.
    #[serde(with = "humantime_serde")]
    pub poll_interval: Duration,
    /// How long a batch may wait for its publisher confirms before its rows count as failed.
    /// Above zero.
    #[serde(with = "humantime_serde")]
    pub confirm_timeout: Duration,
    /// Payloads larger than this many bytes are marked dead without being sent (a broker
    /// refuses messages above its `max_message_size`, by closing the channel). The default,
    /// 16 MiB, is RabbitMQ 4's `max_message_size`; 3.x allows 128 MiB. 1 to 536,870,912
    /// (RabbitMQ's hard limit, 512 MiB).
    pub max_message_bytes: usize,
    /// How long rows claimed by a relay that stopped responding (paused, partitioned, hung with
    /// its connection open) stay locked: Postgres ends such a session after this long idle in
    /// its transaction, and other relays take its rows. At least 2 × `confirm_timeout` + 1s,
    /// since a batch's transaction sits idle while it waits for a window slot and its confirms;
    /// at most 24d 20h 31m 23s 647ms (Postgres's longest timeout).
    #[serde(with = "humantime_serde")]
    pub takeover_timeout: Duration,
    /// Failed attempts after which a row is marked dead: 1 to 2,147,483,647.
    pub max_attempts: u32,
    /// A dead keyed row parks its stream: consumers hold the stream's later messages until an
    /// operator releases the row (its number is then skipped) or retries it (`false`: released
    /// at once, so consumers move on past it).
    pub dead_rows_park_keys: bool,
    /// Backoff before the first retry of a failed row; doubles per attempt, with jitter.
    /// Above zero.
    #[serde(with = "humantime_serde")]
    pub retry_initial_delay: Duration,
    /// Upper bound of the retry backoff: at least `retry_initial_delay`.
    #[serde(with = "humantime_serde")]
    pub retry_max_delay: Duration,
    /// On SIGTERM, how long in-flight batches may take to finish before they are released.
    #[serde(with = "humantime_serde")]
    pub shutdown_timeout: Duration,
    /// Whether published rows stay in the outbox (`published_at` set) until `retention` deletes
    /// them. `false`: each row is deleted by the statement that would mark it, which saves
    /// Postgres about a third of its work per row but leaves no history: nothing to replay or
    /// reconcile, and a producer's retry with the same message id after the publish enqueues it
    /// again.
    pub keep_published: bool,
    /// Published rows older than this are deleted (replay can reach back this far); `0s` keeps
    /// them forever.
    #[serde(with = "humantime_serde")]
    pub retention: Duration,
    /// How often the relay deletes published rows older than `retention`. Above zero.
    #[serde(with = "humantime_serde")]
    pub cleanup_interval: Duration,
    /// Whether the relay runs `VACUUM` on the outbox after each cleanup round: `auto` (when
    /// autovacuum is off for the table), `always` or `never`.
    pub vacuum: Vacuum,
    /// How often the relay refreshes its row in `postbox.relays`. Above zero.
    #[serde(with = "humantime_serde")]
    pub heartbeat_interval: Duration,
}

impl Default for RelayOptions {
    fn default() -> Self {
        Self {
            batch_size: 500,
            max_in_flight_batches: 4,
            poll_interval: Duration::from_secs(2),
            confirm_timeout: Duration::from_secs(30),
            max_message_bytes: 16 * 1024 * 1024,
            takeover_timeout: Duration::from_secs(90),
            max_attempts: 10,
            dead_rows_park_keys: true,
            retry_initial_delay: Duration::from_secs(1),
            retry_max_delay: Duration::from_secs(5 * 60),
            shutdown_timeout: Duration::from_secs(30),
            keep_published: true,
            retention: Duration::from_secs(7 * 24 * 3600),
            cleanup_interval: Duration::from_secs(5 * 60),
            vacuum: Vacuum::Auto,
            heartbeat_interval: Duration::from_secs(10),
        }
    }
}

impl RelayOptions {
    setters! {
        batch_size: u32,
        max_in_flight_batches: u32,
        poll_interval: Duration,
        confirm_timeout: Duration,
        max_message_bytes: usize,
        takeover_timeout: Duration,
        max_attempts: u32,
        dead_rows_park_keys: bool,
        retry_initial_delay: Duration,
        retry_max_delay: Duration,
        shutdown_timeout: Duration,
        keep_published: bool,
        retention: Duration,
        cleanup_interval: Duration,
        vacuum: Vacuum,
        heartbeat_interval: Duration,
    }

    /// Checks every value and names the first bad one: the setting (as the configuration file
    /// writes it), the value and what is allowed.
    pub fn validate(&self) -> Result<(), InvalidSetting> {
        let relay = self;
        if !(1..=10_000).contains(&relay.batch_size) {
            return Err(invalid(
                "relay.batch_size",
                relay.batch_size,
                "a whole number from 1 to 10000",
            ));
        }
        if !(1..=64).contains(&relay.max_in_flight_batches) {
            return Err(invalid(
                "relay.max_in_flight_batches",
                relay.max_in_flight_batches,
                "a whole number from 1 to 64",
            ));
        }
        if !(1..=512 * 1024 * 1024).contains(&relay.max_message_bytes) {
            return Err(invalid(
                "relay.max_message_bytes",
                relay.max_message_bytes,
                "a whole number of bytes from 1 to 536870912 (RabbitMQ's hard limit, 512 MiB)",
            ));
        }
        // A claimed batch's transaction idles while the batch waits for a broker-window slot
        // (up to one confirm_timeout) and then for its own confirms (another).
        let least = relay
            .confirm_timeout
            .checked_mul(2)
            .and_then(|d| d.checked_add(Duration::from_secs(1)));
        if least.is_none_or(|least| relay.takeover_timeout < least) {
            return Err(invalid(
                "relay.takeover_timeout",
                humantime::format_duration(relay.takeover_timeout),
                "at least 2 × relay.confirm_timeout + 1s (a claimed batch may wait one \
                 confirm_timeout for a window slot and another for its own confirms)",
            ));
        }
        // `attempts` is a Postgres integer.
        if relay.max_attempts == 0 || relay.max_attempts > i32::MAX as u32 {
            return Err(invalid(
                "relay.max_attempts",
                relay.max_attempts,
                "a whole number from 1 to 2147483647",
            ));
        }
        for (setting, value) in [
            ("relay.poll_interval", relay.poll_interval),
            ("relay.confirm_timeout", relay.confirm_timeout),
            ("relay.retry_initial_delay", relay.retry_initial_delay),
            ("relay.retry_max_delay", relay.retry_max_delay),
            ("relay.cleanup_interval", relay.cleanup_interval),
            ("relay.heartbeat_interval", relay.heartbeat_interval),
        ] {
            if value.is_zero() {
                return Err(invalid(
                    setting,
                    humantime::format_duration(value),
                    "a duration above zero, such as \"500ms\" or \"2s\"",
                ));
            }
        }
        for (setting, value) in [
            ("relay.poll_interval", relay.poll_interval),
            ("relay.confirm_timeout", relay.confirm_timeout),
            ("relay.retry_initial_delay", relay.retry_initial_delay),
            ("relay.retry_max_delay", relay.retry_max_delay),
            ("relay.shutdown_timeout", relay.shutdown_timeout),
            ("relay.retention", relay.retention),
            ("relay.cleanup_interval", relay.cleanup_interval),
            ("relay.heartbeat_interval", relay.heartbeat_interval),
        ] {
            if value > LONGEST {
                return Err(invalid(
                    setting,
                    humantime::format_duration(value),
                    "a duration of at most 100 years",
                ));
            }
        }
        // Postgres's idle_in_transaction_session_timeout, which enforces it, is an int of ms.
        if relay.takeover_timeout > Duration::from_millis(i32::MAX as u64) {
            return Err(invalid(
                "relay.takeover_timeout",
                humantime::format_duration(relay.takeover_timeout),
                "at most 24d 20h 31m 23s 647ms (Postgres's longest \
                 idle_in_transaction_session_timeout)",
            ));
        }
        if relay.retry_max_delay < relay.retry_initial_delay {
            return Err(invalid(
                "relay.retry_max_delay",
                humantime::format_duration(relay.retry_max_delay),
                "at least relay.retry_initial_delay",
            ));
        }
        Ok(())
    }
}

/// Far enough for any real setting, near enough that no deadline computed from one overflows.
pub(crate) const LONGEST: Duration = Duration::from_secs(100 * 365 * 24 * 3600);

/// A setting's value is not allowed: names the setting, the value and what is.
pub(crate) fn invalid(
    setting: &'static str,
    value: impl ToString,
    allowed: &str,
) -> InvalidSetting {
    InvalidSetting::new(setting, value, format!("expected {allowed}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_setters_set() {
        let options = RelayOptions::default()
            .batch_size(200)
            .retention(Duration::from_secs(60));
        options.validate().expect("valid");
        assert_eq!((options.batch_size, options.max_attempts), (200, 10));
        assert_eq!(options.retention, Duration::from_secs(60));
    }

    #[test]
    fn invalid_options_name_the_setting() {
        let setting = |options: RelayOptions| match options.validate() {
            Err(InvalidSetting { setting, .. }) => setting,
            other => panic!("expected a setting error, got {other:?}"),
        };
        let defaults = RelayOptions::default;
        assert_eq!(setting(defaults().batch_size(0)), "relay.batch_size");
        assert_eq!(
            setting(defaults().max_in_flight_batches(65)),
            "relay.max_in_flight_batches"
        );
        assert_eq!(
            setting(defaults().poll_interval(Duration::ZERO)),
            "relay.poll_interval"
        );
        assert_eq!(
            setting(defaults().retry_initial_delay(Duration::from_secs(600))),
            "relay.retry_max_delay"
        );
    }
}
