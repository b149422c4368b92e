//! Settings for the `postbox` command: built-in defaults (`Settings::default()`), then a TOML
//! file, then the environment.
//!
//! Environment variables: `DATABASE_URL` and `AMQP_URL` as most tools use them, and every
//! setting as `POSTBOX_<NAME>` or `POSTBOX_<SECTION>__<NAME>` (`POSTBOX_RELAY__BATCH_SIZE=1000`),
//! which wins over both.

use std::path::Path;

use super::error::{Error, Result};
use crate::config::Settings;

/// Loads defaults, then `file` if given, then the environment, and validates the result.
/// A key in `file` that is not a setting is an error (serde's `deny_unknown_fields` on the
/// settings types: a misspelt setting would otherwise be ignored without a word); a
/// `POSTBOX_…` variable that is not one is logged as a warning and ignored, because the
/// environment is shared (Kubernetes, for one, sets `POSTBOX_SERVICE_HOST` and the like for a
/// service named `postbox`).
pub(crate) fn load(file: Option<&Path>) -> Result<Settings> {
    let mut builder = config::Config::builder().add_source(defaults()?);
    if let Some(file) = file {
        let contents = config::Config::builder()
            .add_source(config::File::from(file).format(config::FileFormat::Toml))
            .build()
            .map_err(|error| file_error(file, error))?;
        let contents = without_obsolete(&contents, file)?;
        // The file on the defaults alone first, so that a key or value it gets wrong is
        // reported as the file's (serde refuses unknown keys).
        config::Config::builder()
            .add_source(defaults()?)
            .add_source(contents.clone())
            .build()
            .and_then(|config| config.try_deserialize::<Settings>())
            .map_err(|error| file_error(file, error))?;
        builder = builder.add_source(contents);
    }
    // The usual variables, below their `POSTBOX_` names.
    let plain: config::Map<String, String> = ["DATABASE_URL", "AMQP_URL"]
        .into_iter()
        .filter_map(|var| Some((var.to_owned(), std::env::var(var).ok()?)))
        .collect();
    let settings: Settings = builder
        .add_source(config::Environment::default().source(Some(plain)))
        .add_source(
            config::Environment::with_prefix("POSTBOX")
                .prefix_separator("_")
                .separator("__")
                .try_parsing(true)
                .source(Some(postbox_environment())),
        )
        .build()?
        .try_deserialize()?;
    settings.validate()?;
    Ok(settings)
}

/// Every setting: its dotted name (`relay.batch_size`) and its environment variable
/// (`POSTBOX_RELAY__BATCH_SIZE`), from the defaults.
pub(crate) fn names() -> Vec<(String, String)> {
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
    let mut keys = Vec::new();
    if let Ok(table) = defaults().and_then(|defaults| Ok(config::Source::collect(&defaults)?)) {
        walk("", table, &mut keys);
    }
    keys.sort();
    keys.into_iter()
        .map(|key| {
            let var = format!("POSTBOX_{}", key.replace('.', "__").to_uppercase());
            (key, var)
        })
        .collect()
}

/// The defaults (`Settings::default()`, defined in code once) as the loader's first source.
fn defaults() -> Result<config::Config> {
    Ok(config::Config::try_from(&Settings::default())?)
}

/// Settings earlier versions had: accepted in a file with a warning, and ignored.
/// `relay.max_rows_per_key` capped a key's rows per batch; stream numbers made it unnecessary.
const OBSOLETE: &[(&str, &str)] = &[("relay", "max_rows_per_key")];

/// The file's settings without the obsolete ones, each of which is logged.
fn without_obsolete(contents: &config::Config, file: &Path) -> Result<Table> {
    let mut table = config::Source::collect(contents)?;
    for (section, name) in OBSOLETE {
        let kind = table.get_mut(*section).map(|value| &mut value.kind);
        if let Some(config::ValueKind::Table(section_table)) = kind {
            if section_table.remove(*name).is_some() {
                tracing::warn!(
                    setting = %format!("{section}.{name}"),
                    file = %file.display(),
                    "obsolete setting, ignored (see the upgrade notes)"
                );
            }
        }
    }
    Ok(Table(table))
}

/// A configuration source that is a table already read.
#[derive(Debug, Clone)]
struct Table(config::Map<String, config::Value>);

impl config::Source for Table {
    fn clone_into_box(&self) -> Box<dyn config::Source + Send + Sync> {
        Box::new(self.clone())
    }

    fn collect(
        &self,
    ) -> std::result::Result<config::Map<String, config::Value>, config::ConfigError> {
        Ok(self.0.clone())
    }
}

/// The `POSTBOX_…` variables that name a setting; the others (but the command's own
/// `POSTBOX_CONFIG` and `POSTBOX_INBOX_DATABASE_URL`) are logged and left out.
fn postbox_environment() -> config::Map<String, String> {
    let known: Vec<String> = names().into_iter().map(|(_, var)| var).collect();
    let mut found = config::Map::new();
    let mut unknown = Vec::new();
    for (name, value) in std::env::vars_os() {
        let (Ok(name), Ok(value)) = (name.into_string(), value.into_string()) else {
            continue;
        };
        if !name.starts_with("POSTBOX_") {
            continue;
        }
        if known.contains(&name) {
            found.insert(name, value);
        } else if !["POSTBOX_CONFIG", "POSTBOX_INBOX_DATABASE_URL"].contains(&name.as_str()) {
            unknown.push(name);
        }
    }
    unknown.sort();
    for var in unknown {
        tracing::warn!(
            variable = %var,
            "not a postbox setting, ignored (settings are POSTBOX_<NAME> or \
             POSTBOX_<SECTION>__<NAME>, such as POSTBOX_RELAY__BATCH_SIZE)"
        );
    }
    found
}

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

#[cfg(test)]
mod tests {
    use std::time::Duration;

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
        let known: Vec<String> = names().into_iter().map(|(key, _)| key).collect();
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
        let settings = load(Some(&file));
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
