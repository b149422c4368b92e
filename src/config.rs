//! Settings: built-in defaults, then a TOML file, then the environment.
//!
//! Environment variables: `DATABASE_URL` and `AMQP_URL` as most tools use them, and every
//! setting as `POSTBOX_<NAME>` or `POSTBOX_<SECTION>__<NAME>` (`POSTBOX_RELAY__BATCH_SIZE=1000`),
//! which wins over both.

#[cfg(feature = "cli")]
use std::path::Path;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::redact::{redact_url, without_password};
use crate::relay::options::{invalid, LONGEST};
use crate::relay::RelayOptions;

/// All of postbox's settings. See README "Configuration" for each one's meaning and default.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default)]
#[non_exhaustive]
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
    pub relay: RelayOptions,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            database_url: "postgres://postgres@127.0.0.1:5432/postgres".into(),
            amqp_url: "amqp://guest:guest@127.0.0.1:5672/%2f".into(),
            migrate_on_start: true,
            metrics_addr: String::new(),
            readiness_max_lag: Duration::ZERO,
            relay: RelayOptions::default(),
        }
    }
}

impl Settings {
    #[cfg(feature = "cli")]
    /// Loads defaults, then `file` if given, then the environment, and validates the result.
    /// A key in `file` that is not a setting is an error (a misspelt setting would otherwise be
    /// ignored without a word); a `POSTBOX_…` variable that is not one is logged as a warning.
    pub fn load(file: Option<&Path>) -> Result<Self> {
        let mut builder = config::Config::builder().add_source(defaults()?);
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
        // Far enough for any real setting, near enough that no deadline computed from one
        // overflows.
        if self.readiness_max_lag > LONGEST {
            return Err(invalid(
                "readiness_max_lag",
                humantime::format_duration(self.readiness_max_lag),
                "a duration of at most 100 years",
            ));
        }
        self.relay.validate()?;
        Ok(())
    }

    /// A relay with these settings: connects to the database (Postgres must be reachable; the
    /// broker is connected when the relay starts).
    pub async fn relay(&self) -> Result<crate::Relay> {
        let pool = crate::store::connect(
            self.database(),
            crate::Relay::connections_needed(&self.relay),
        )
        .await?;
        crate::Relay::new(
            pool,
            crate::relay::Broker::new(self.amqp_urls()),
            self.relay.clone(),
        )
    }

    /// Where postbox's own Postgres sessions connect.
    pub(crate) fn database(&self) -> crate::store::Target<'_> {
        crate::store::Target {
            url: &self.database_url,
            takeover_timeout: self.relay.takeover_timeout,
        }
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
    defaults()
        .map(|defaults| keys(&defaults))
        .unwrap_or_default()
}

/// The defaults (`Settings::default()`, defined in code once) as the loader's first source.
#[cfg(feature = "cli")]
fn defaults() -> Result<config::Config> {
    Ok(config::Config::try_from(&Settings::default())?)
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

    /// The defaults as the loader reads them (written out from `Settings::default()`, then
    /// read back).
    fn loaded_defaults() -> Settings {
        config::Config::builder()
            .add_source(super::defaults().expect("defaults"))
            .build()
            .and_then(|c| c.try_deserialize())
            .unwrap()
    }

    #[test]
    fn urls_are_checked_as_the_clients_parse_them() {
        let mut settings = loaded_defaults();
        settings.database_url = "postgres:///app?host=/var/run/postgresql".into();
        settings.validate().unwrap();
        settings.database_url = "postgres://app:s3cr3t@db/app?sslmode=bogus".into();
        let error = settings.validate().unwrap_err().to_string();
        assert!(
            error.contains("database_url") && error.contains("sslmode"),
            "{error}"
        );
        assert!(!error.contains("s3cr3t"), "{error}");
        let mut settings = loaded_defaults();
        settings.amqp_url = "amqp://guest:s3cr3t@host/%2f?heartbeat=abc".into();
        let error = settings.validate().unwrap_err().to_string();
        assert!(error.contains("amqp_url"), "{error}");
        assert!(!error.contains("s3cr3t"), "{error}");
    }

    #[test]
    fn durations_no_deadline_can_hold_are_refused() {
        let mut settings = loaded_defaults();
        settings.relay.poll_interval = Duration::from_secs(500_000_000_000 * 365 * 86400);
        let error = settings.validate().unwrap_err().to_string();
        assert!(error.contains("relay.poll_interval"), "{error}");
        let mut settings = loaded_defaults();
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
        let settings = loaded_defaults();
        settings.validate().unwrap();
        assert_eq!(settings.relay.batch_size, 500);
        assert_eq!(settings.relay.retention, Duration::from_secs(7 * 24 * 3600));
        assert_eq!(settings.relay.vacuum, crate::Vacuum::Auto);
    }

    #[test]
    fn takeover_timeout_must_cover_a_window_wait_and_the_confirms() {
        let mut settings = loaded_defaults();
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
