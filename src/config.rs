//! Settings: the database and broker to use, the metrics listener and the relay's options, with
//! their defaults (`Settings::default()`) and checks. The `postbox` command loads them from a
//! file and the environment (`cli::settings`, feature `cli`).

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::error::InvalidSetting;
use crate::redact::{redact_url, without_password};
use crate::relay::options::{invalid, LONGEST};
use crate::relay::RelayOptions;

/// All of postbox's settings. The manual's configuration reference (`docs/configuration.md`,
/// generated from these definitions) lists each with its default and environment variable.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
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
    /// Checks every value and names the first bad one: the setting, the value and what is allowed.
    pub fn validate(&self) -> Result<(), InvalidSetting> {
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
    pub async fn connect_relay(&self) -> Result<crate::Relay, crate::relay::RelayError> {
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

fn check_url(setting: &'static str, value: &str, schemes: &[&str]) -> Result<(), InvalidSetting> {
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
pub fn check_database_url(setting: &'static str, url: &str) -> Result<(), InvalidSetting> {
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
pub fn parse_addr(value: &str) -> Result<std::net::SocketAddr, InvalidSetting> {
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
    parsed.map_err(|e| {
        InvalidSetting::new(
            "metrics_addr",
            value,
            format!("expected host:port or a port (loopback), such as 127.0.0.1:9187: {e}"),
        )
    })
}
