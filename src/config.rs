//! Settings: built-in defaults, then a TOML file, then the environment.
//!
//! Environment variables: `DATABASE_URL` and `AMQP_URL` as most tools use them, and every
//! setting as `POSTBOX_<SECTION>__<NAME>` (`POSTBOX_RELAY__BATCH_SIZE=1000`), which wins over both.

use std::path::Path;
use std::time::Duration;

use serde::Deserialize;

use crate::error::{Error, Result};

/// All of postbox's settings. See README "Configuration" for each one's meaning and default.
#[derive(Debug, Clone, Deserialize)]
pub struct Settings {
    /// Postgres connection URL of the database holding `postbox.outbox`.
    pub database_url: String,
    /// RabbitMQ URL, or several separated by commas (cluster nodes, tried in turn on failure).
    pub amqp_url: String,
    /// Apply pending migrations when `postbox run` starts.
    pub migrate_on_start: bool,
    /// Where `postbox run` serves `/metrics`, `/healthz` and `/readyz`: `host:port`, or a port
    /// alone for loopback. Empty: no listener.
    pub metrics_addr: String,
    /// `/readyz` fails while the oldest due pending row is older than this; `0s`: no lag check.
    #[serde(with = "humantime_serde")]
    pub readiness_max_lag: Duration,
    /// The relay's tuning.
    pub relay: RelaySettings,
}

/// How the relay claims, publishes and retries.
#[derive(Debug, Clone, Deserialize)]
pub struct RelaySettings {
    /// Rows claimed and published per batch.
    pub batch_size: u32,
    /// Batches published and still awaiting their confirms (the broker window). Up to three
    /// times as many are open in Postgres, so the next batches are claimed while earlier ones are
    /// confirmed and marked.
    pub max_in_flight_batches: u32,
    /// Fallback poll when no notification arrives (LISTEN/NOTIFY wakes the relay normally).
    #[serde(with = "humantime_serde")]
    pub poll_interval: Duration,
    /// How long a batch may wait for its publisher confirms before its rows count as failed.
    #[serde(with = "humantime_serde")]
    pub confirm_timeout: Duration,
    /// Payloads larger than this many bytes are marked dead without being sent (a broker
    /// refuses messages above its `max_message_size`, by closing the channel). The default,
    /// 16 MiB, is RabbitMQ 4's `max_message_size`; 3.x allows 128 MiB.
    pub max_message_bytes: usize,
    /// How long rows claimed by a relay that stopped responding (paused, partitioned, hung with
    /// its connection open) stay locked: Postgres ends such a session after this long idle in
    /// its transaction, and other relays take its rows. At least 2 × `confirm_timeout` + 1s,
    /// since a batch's transaction sits idle while it waits for a window slot and its confirms.
    #[serde(with = "humantime_serde")]
    pub takeover_timeout: Duration,
    /// Failed attempts after which a row is marked dead.
    pub max_attempts: u32,
    /// A dead row parks its partition key: the key's later rows wait until an operator
    /// releases or retries it (`false`: they go on, out of order with the dead one).
    pub dead_rows_park_keys: bool,
    /// Rows of one partition key a batch may carry. `1` (the default): a key has one message
    /// in flight at a time, so a failed row is always retried before its key's next row goes
    /// out. More: faster for keys with many events at once, but if a row fails after a later
    /// row of its key in the same batch was confirmed, the retry arrives after that row.
    pub max_rows_per_key: u32,
    /// Backoff before the first retry of a failed row; doubles per attempt, with jitter.
    #[serde(with = "humantime_serde")]
    pub retry_initial_delay: Duration,
    /// Upper bound of the retry backoff.
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
    /// How often the relay deletes published rows older than `retention`.
    #[serde(with = "humantime_serde")]
    pub cleanup_interval: Duration,
    /// Whether the relay runs `VACUUM` on the outbox after each cleanup round.
    pub vacuum: Vacuum,
    /// How often the relay refreshes its row in `postbox.relays`.
    #[serde(with = "humantime_serde")]
    pub heartbeat_interval: Duration,
}

/// When the relay vacuums the outbox itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Vacuum {
    /// Only where autovacuum is off for the table (nothing else would reclaim dead rows).
    Auto,
    /// After every cleanup round.
    Always,
    /// Never: autovacuum (or the operator) takes care of it.
    Never,
}

const DEFAULTS: &str = r#"
database_url = "postgres://postgres@127.0.0.1:5432/postgres"
amqp_url = "amqp://guest:guest@127.0.0.1:5672/%2f"
migrate_on_start = true
metrics_addr = ""
readiness_max_lag = "0s"

[relay]
batch_size = 500
max_in_flight_batches = 4
poll_interval = "2s"
confirm_timeout = "30s"
max_attempts = 10
max_message_bytes = 16777216
takeover_timeout = "90s"
dead_rows_park_keys = true
max_rows_per_key = 1
retry_initial_delay = "1s"
retry_max_delay = "5m"
shutdown_timeout = "30s"
keep_published = true
retention = "7d"
cleanup_interval = "5m"
heartbeat_interval = "10s"
vacuum = "auto"
"#;

impl Settings {
    /// Loads defaults, then `file` if given, then the environment, and validates the result.
    pub fn load(file: Option<&Path>) -> Result<Self> {
        let mut builder = config::Config::builder()
            .add_source(config::File::from_str(DEFAULTS, config::FileFormat::Toml));
        if let Some(file) = file {
            builder = builder.add_source(config::File::from(file).format(config::FileFormat::Toml));
        }
        for (var, key) in [("DATABASE_URL", "database_url"), ("AMQP_URL", "amqp_url")] {
            if let Ok(value) = std::env::var(var) {
                builder = builder.set_override(key, value)?;
            }
        }
        let settings: Settings = builder
            .add_source(
                config::Environment::with_prefix("POSTBOX")
                    .prefix_separator("_")
                    .separator("__")
                    .try_parsing(true),
            )
            .build()?
            .try_deserialize()?;
        settings.validate()?;
        Ok(settings)
    }

    /// Checks every value and names the first bad one: the setting, the value and what is allowed.
    pub fn validate(&self) -> Result<()> {
        check_url(
            "database_url",
            &self.database_url,
            &["postgres", "postgresql"],
        )?;
        for url in self.amqp_urls() {
            check_url("amqp_url", url, &["amqp", "amqps"])?;
        }
        if self.amqp_urls().next().is_none() {
            return Err(invalid(
                "amqp_url",
                "",
                "at least one amqp:// or amqps:// URL",
            ));
        }
        if !self.metrics_addr.trim().is_empty() {
            crate::metrics::parse_addr(&self.metrics_addr)?;
        }
        let relay = &self.relay;
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
        if !(1..=relay.batch_size).contains(&relay.max_rows_per_key) {
            return Err(invalid(
                "relay.max_rows_per_key",
                relay.max_rows_per_key,
                "a whole number from 1 to relay.batch_size",
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
        if relay.max_attempts == 0 {
            return Err(invalid("relay.max_attempts", 0, "at least 1"));
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
        if relay.retry_max_delay < relay.retry_initial_delay {
            return Err(invalid(
                "relay.retry_max_delay",
                humantime::format_duration(relay.retry_max_delay),
                "at least relay.retry_initial_delay",
            ));
        }
        Ok(())
    }

    /// The RabbitMQ URLs, in the order they are tried.
    pub fn amqp_urls(&self) -> impl Iterator<Item = &str> {
        self.amqp_url
            .split(',')
            .map(str::trim)
            .filter(|url| !url.is_empty())
    }
}

fn invalid(setting: &'static str, value: impl ToString, allowed: &str) -> Error {
    Error::Config {
        setting,
        value: value.to_string(),
        reason: format!("expected {allowed}"),
    }
}

fn check_url(setting: &'static str, value: &str, schemes: &[&str]) -> Result<()> {
    let expected = format!(
        "a URL starting with {}",
        schemes
            .iter()
            .map(|s| format!("{s}://"))
            .collect::<Vec<_>>()
            .join(" or ")
    );
    match url::Url::parse(value) {
        Ok(url) if schemes.contains(&url.scheme()) && url.host_str().is_some() => Ok(()),
        _ => Err(invalid(setting, redact_url(value), &expected)),
    }
}

/// Replaces the password in a URL with `***`, so URLs can be logged and shown in errors.
/// Text that does not parse as a URL is returned with everything between `:` and `@` masked.
pub fn redact_url(value: &str) -> String {
    match url::Url::parse(value) {
        Ok(mut url) if url.password().is_some() => {
            // Setting a password only fails for URLs that cannot have one, which have none.
            let _ = url.set_password(Some("***"));
            url.to_string()
        }
        Ok(url) => url.to_string(),
        Err(_) => match (value.rfind('@'), value.find("://")) {
            (Some(at), Some(scheme)) => match value[scheme + 3..at].find(':') {
                Some(colon) => format!("{}:***{}", &value[..scheme + 3 + colon], &value[at..]),
                None => value.to_string(),
            },
            _ => value.to_string(),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redacts_passwords() {
        assert_eq!(
            redact_url("amqp://guest:secret@host:5672/%2f"),
            "amqp://guest:***@host:5672/%2f"
        );
        assert_eq!(
            redact_url("postgres://app:s3cr3t@db/app"),
            "postgres://app:***@db/app"
        );
        assert!(!redact_url("postgres://app:pa ss@db:x/app").contains("pa ss"));
    }

    #[test]
    fn defaults_are_valid() {
        let settings: Settings = config::Config::builder()
            .add_source(config::File::from_str(DEFAULTS, config::FileFormat::Toml))
            .build()
            .and_then(|c| c.try_deserialize())
            .unwrap();
        settings.validate().unwrap();
        assert_eq!(settings.relay.batch_size, 500);
    }

    #[test]
    fn takeover_timeout_must_cover_a_window_wait_and_the_confirms() {
        let mut settings: Settings = config::Config::builder()
            .add_source(config::File::from_str(DEFAULTS, config::FileFormat::Toml))
            .build()
            .and_then(|c| c.try_deserialize())
            .unwrap();
        settings.relay.confirm_timeout = Duration::from_secs(30);
        settings.relay.takeover_timeout = Duration::from_secs(60);
        let error = settings.validate().unwrap_err().to_string();
        assert!(error.contains("relay.takeover_timeout"), "{error}");
        settings.relay.takeover_timeout = Duration::from_secs(61);
        settings.validate().unwrap();
        // a confirm timeout too long to double is an error, not a panic
        settings.relay.confirm_timeout = Duration::MAX;
        assert!(settings.validate().is_err());
    }
}
