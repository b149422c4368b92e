//! Settings: built-in defaults, then a TOML file, then the environment.
//!
//! Environment variables: `DATABASE_URL` and `AMQP_URL` as most tools use them, and every
//! setting as `POSTBOX_<NAME>` or `POSTBOX_<SECTION>__<NAME>` (`POSTBOX_RELAY__BATCH_SIZE=1000`),
//! which wins over both.

#[cfg(feature = "cli")]
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
    /// A dead keyed row parks its stream: consumers hold the stream's later messages until an
    /// operator releases the row (its number is then skipped) or retries it (`false`: released
    /// at once, so consumers move on past it).
    pub dead_rows_park_keys: bool,
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

#[cfg(feature = "cli")]
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
    #[cfg(feature = "cli")]
    /// Loads defaults, then `file` if given, then the environment, and validates the result.
    /// A key in `file` that is not a setting is an error (a misspelt setting would otherwise be
    /// ignored without a word); a `POSTBOX_…` variable that is not one is logged as a warning.
    pub fn load(file: Option<&Path>) -> Result<Self> {
        let mut builder = config::Config::builder()
            .add_source(config::File::from_str(DEFAULTS, config::FileFormat::Toml));
        if let Some(file) = file {
            let contents = config::Config::builder()
                .add_source(config::File::from(file).format(config::FileFormat::Toml))
                .build()
                .map_err(|error| file_error(file, error))?;
            let keys = keys(&contents);
            for key in keys.iter().filter(|key| OBSOLETE.contains(&key.as_str())) {
                tracing::warn!(
                    setting = %key,
                    file = %file.display(),
                    "obsolete setting, ignored (see the upgrade notes)"
                );
            }
            if let Some(key) = keys
                .into_iter()
                .find(|key| !known_keys().contains(key) && !OBSOLETE.contains(&key.as_str()))
            {
                return Err(Error::UnknownSetting {
                    name: key,
                    origin: file.display().to_string(),
                });
            }
            builder = builder.add_source(contents);
        }
        // The usual variables, below their `POSTBOX_` names.
        let plain: config::Map<String, String> = ["DATABASE_URL", "AMQP_URL"]
            .into_iter()
            .filter_map(|var| Some((var.to_owned(), std::env::var(var).ok()?)))
            .collect();
        for var in unknown_environment() {
            tracing::warn!(
                variable = %var,
                "not a postbox setting, ignored (settings are POSTBOX_<NAME> or \
                 POSTBOX_<SECTION>__<NAME>, such as POSTBOX_RELAY__BATCH_SIZE)"
            );
        }
        let settings: Settings = builder
            .add_source(config::Environment::default().source(Some(plain)))
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
        check_database_url("database_url", &self.database_url)?;
        for url in self.amqp_urls() {
            check_url("amqp_url", url, &["amqp", "amqps"])?;
            if let Err(error) = url.parse::<lapin::uri::AMQPUri>() {
                return Err(invalid(
                    "amqp_url",
                    redact_url(url),
                    &format!("an AMQP URI ({})", without_password(&error, url)),
                ));
            }
        }
        if self.amqp_urls().next().is_none() {
            return Err(invalid(
                "amqp_url",
                "",
                "at least one amqp:// or amqps:// URL",
            ));
        }
        if !self.metrics_addr.trim().is_empty() {
            parse_addr(&self.metrics_addr)?;
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
        // Far enough for any real setting, near enough that no deadline computed from one
        // overflows.
        const LONGEST: Duration = Duration::from_secs(100 * 365 * 24 * 3600);
        for (setting, value) in [
            ("readiness_max_lag", self.readiness_max_lag),
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

    /// The RabbitMQ URLs, in the order they are tried.
    pub fn amqp_urls(&self) -> impl Iterator<Item = &str> {
        self.amqp_url
            .split(',')
            .map(str::trim)
            .filter(|url| !url.is_empty())
    }
}

#[cfg(feature = "cli")]
/// The dotted names of every setting (`relay.batch_size`), from the defaults.
fn known_keys() -> Vec<String> {
    config::Config::builder()
        .add_source(config::File::from_str(DEFAULTS, config::FileFormat::Toml))
        .build()
        .map(|defaults| keys(&defaults))
        .unwrap_or_default()
}

#[cfg(feature = "cli")]
/// Settings earlier versions had: accepted in a file with a warning, and ignored.
/// `relay.max_rows_per_key` capped a key's rows per batch; stream numbers made it unnecessary.
const OBSOLETE: &[&str] = &["relay.max_rows_per_key"];

#[cfg(feature = "cli")]
/// The dotted names of the leaf values in `config`.
fn keys(config: &config::Config) -> Vec<String> {
    fn walk(prefix: &str, table: config::Map<String, config::Value>, out: &mut Vec<String>) {
        for (name, value) in table {
            let key = if prefix.is_empty() {
                name
            } else {
                format!("{prefix}.{name}")
            };
            match value.kind {
                config::ValueKind::Table(table) => walk(&key, table, out),
                _ => out.push(key),
            }
        }
    }
    let mut out = Vec::new();
    if let Ok(table) = config::Source::collect(config) {
        walk("", table, &mut out);
    }
    out
}

#[cfg(feature = "cli")]
/// `POSTBOX_…` variables that name no setting (nor one of the CLI's own options).
fn unknown_environment() -> Vec<String> {
    let mut known: Vec<String> = known_keys()
        .iter()
        .map(|key| format!("POSTBOX_{}", key.replace('.', "__").to_uppercase()))
        .collect();
    known.extend(["POSTBOX_CONFIG".into(), "POSTBOX_INBOX_DATABASE_URL".into()]);
    let mut unknown: Vec<String> = std::env::vars_os()
        .filter_map(|(name, _)| name.into_string().ok())
        .filter(|name| name.starts_with("POSTBOX_") && !known.contains(name))
        .collect();
    unknown.sort();
    unknown
}

#[cfg(feature = "cli")]
/// A configuration file that does not parse, said without quoting the file: its lines may hold
/// passwords.
fn file_error(file: &Path, error: config::ConfigError) -> Error {
    match error {
        config::ConfigError::FileParse { cause, .. } => {
            // TOML errors quote the offending line between the position and the message.
            let reason: Vec<String> = cause
                .to_string()
                .lines()
                .filter(|line| {
                    !line
                        .trim_start()
                        .starts_with(|c: char| c.is_ascii_digit() || c == '|')
                })
                .map(str::trim)
                .filter(|line| !line.is_empty())
                .map(str::to_owned)
                .collect();
            Error::ConfigFile {
                path: file.display().to_string(),
                reason: reason.join("; "),
            }
        }
        other => Error::ConfigFile {
            path: file.display().to_string(),
            reason: other.to_string(),
        },
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
    // No host is fine: Postgres then connects through its Unix socket (`?host=/run/postgresql`).
    match url::Url::parse(value) {
        Ok(url) if schemes.contains(&url.scheme()) => Ok(()),
        _ => Err(invalid(setting, redact_url(value), &expected)),
    }
}

/// Checks `url`, the value of `setting`, as sqlx parses a Postgres URL.
pub fn check_database_url(setting: &'static str, url: &str) -> Result<()> {
    check_url(setting, url, &["postgres", "postgresql"])?;
    match <sqlx::postgres::PgConnectOptions as std::str::FromStr>::from_str(url) {
        Ok(_) => Ok(()),
        Err(error) => Err(invalid(
            setting,
            redact_url(url),
            &format!(
                "a Postgres URL ({})",
                without_password(&error.to_string(), url)
            ),
        )),
    }
}

/// `message` with the password of `url` (if any) masked: parser errors may quote it.
fn without_password(message: &str, url: &str) -> String {
    let password = url::Url::parse(url).ok().and_then(|url| {
        let query = url
            .query_pairs()
            .find(|(key, _)| key.eq_ignore_ascii_case("password"))
            .map(|(_, value)| value.into_owned());
        url.password().map(str::to_owned).or(query)
    });
    match password {
        Some(password) if !password.is_empty() => message.replace(&password, "***"),
        _ => message.to_owned(),
    }
}

/// Replaces the password in a URL with `***`, so URLs can be logged and shown in errors.
/// Text that does not parse as a URL is returned with everything between `:` and `@` masked.
pub fn redact_url(value: &str) -> String {
    match url::Url::parse(value) {
        Ok(mut url) => {
            if url.password().is_some() {
                // Setting a password only fails for URLs that cannot have one, which have none.
                let _ = url.set_password(Some("***"));
            }
            // libpq and sqlx also take the password as a query parameter.
            let pairs: Vec<(String, String)> = url
                .query_pairs()
                .map(|(key, value)| {
                    let value = if key.eq_ignore_ascii_case("password") {
                        "***".to_owned()
                    } else {
                        value.into_owned()
                    };
                    (key.into_owned(), value)
                })
                .collect();
            if pairs
                .iter()
                .any(|(key, _)| key.eq_ignore_ascii_case("password"))
            {
                url.query_pairs_mut().clear().extend_pairs(pairs);
            }
            url.to_string()
        }
        Err(_) => {
            let masked = match (value.rfind('@'), value.find("://")) {
                (Some(at), Some(scheme)) => match value[scheme + 3..at].find(':') {
                    Some(colon) => {
                        format!("{}:***{}", &value[..scheme + 3 + colon], &value[at..])
                    }
                    None => value.to_string(),
                },
                _ => value.to_string(),
            };
            mask_password_parameter(&masked)
        }
    }
}

/// `password=…` in text that is not a URL masked up to the next `&`.
fn mask_password_parameter(value: &str) -> String {
    let lower = value.to_ascii_lowercase();
    match lower.find("password=") {
        Some(start) => {
            let from = start + "password=".len();
            let end = value[from..].find('&').map_or(value.len(), |n| from + n);
            format!("{}***{}", &value[..from], &value[end..])
        }
        None => value.to_string(),
    }
}

/// Parses `metrics_addr`: `host:port`, or a bare `port` / `:port` meaning loopback.
pub fn parse_addr(value: &str) -> Result<std::net::SocketAddr> {
    let value = value.trim();
    let port_only = value.strip_prefix(':').unwrap_or(value);
    let parsed = match port_only.parse::<u16>() {
        Ok(port) => Ok(std::net::SocketAddr::from(([127, 0, 0, 1], port))),
        // A name (localhost:9187) resolves to its first address.
        Err(_) => std::net::ToSocketAddrs::to_socket_addrs(value)
            .map(|mut addrs| addrs.next())
            .map_err(|e| e.to_string())
            .and_then(|addr| addr.ok_or_else(|| "the name has no address".to_string())),
    };
    parsed.map_err(|e| Error::Config {
        setting: "metrics_addr",
        value: value.into(),
        reason: format!("expected host:port or a port (loopback), such as 127.0.0.1:9187: {e}"),
    })
}

#[cfg(all(test, feature = "cli"))]
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
        assert_eq!(
            redact_url("postgres://app@db/app?sslmode=require&password=s3cr3t"),
            "postgres://app@db/app?sslmode=require&password=***"
        );
        assert!(!redact_url("postgres://app@db:x/app?Password=s3cr3t&a=b").contains("s3cr3t"));
    }

    fn defaults() -> Settings {
        config::Config::builder()
            .add_source(config::File::from_str(DEFAULTS, config::FileFormat::Toml))
            .build()
            .and_then(|c| c.try_deserialize())
            .unwrap()
    }

    #[test]
    fn urls_are_checked_as_the_clients_parse_them() {
        let mut settings = defaults();
        settings.database_url = "postgres:///app?host=/var/run/postgresql".into();
        settings.validate().unwrap();
        settings.database_url = "postgres://app:s3cr3t@db/app?sslmode=bogus".into();
        let error = settings.validate().unwrap_err().to_string();
        assert!(
            error.contains("database_url") && error.contains("sslmode"),
            "{error}"
        );
        assert!(!error.contains("s3cr3t"), "{error}");
        let mut settings = defaults();
        settings.amqp_url = "amqp://guest:s3cr3t@host/%2f?heartbeat=abc".into();
        let error = settings.validate().unwrap_err().to_string();
        assert!(error.contains("amqp_url"), "{error}");
        assert!(!error.contains("s3cr3t"), "{error}");
    }

    #[test]
    fn durations_no_deadline_can_hold_are_refused() {
        let mut settings = defaults();
        settings.relay.poll_interval = Duration::from_secs(500_000_000_000 * 365 * 86400);
        let error = settings.validate().unwrap_err().to_string();
        assert!(error.contains("relay.poll_interval"), "{error}");
        let mut settings = defaults();
        settings.relay.takeover_timeout = Duration::from_secs(30 * 86400);
        let error = settings.validate().unwrap_err().to_string();
        assert!(error.contains("relay.takeover_timeout"), "{error}");
    }

    #[test]
    fn the_known_settings_are_those_with_defaults() {
        let known = known_keys();
        assert!(known.contains(&"relay.batch_size".to_string()));
        assert!(known.contains(&"database_url".to_string()));
        assert_eq!(known.len(), 21, "{known:?}");
        assert!(!known.contains(&"relay.max_rows_per_key".to_string()));
    }

    #[test]
    fn an_obsolete_setting_in_a_file_is_ignored_not_refused() {
        let dir = std::env::temp_dir().join(format!("postbox-config-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("postbox.toml");
        std::fs::write(&file, "[relay]\nmax_rows_per_key = 5\nbatch_size = 100\n").unwrap();
        let settings = Settings::load(Some(&file));
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(settings.unwrap().relay.batch_size, 100);
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
