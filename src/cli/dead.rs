//! `postbox dead`: list dead rows, and give them another chance.

use std::io::Write;

use clap::{Args, Subcommand};

use super::error::{Error, Result};
use crate::config::Settings;
use crate::error::Context;
use crate::store::{self, operations};

/// Options of `postbox dead`.
#[derive(Debug, Args)]
pub struct DeadArgs {
    /// What to do with dead rows.
    #[command(subcommand)]
    pub command: DeadCommand,
}

/// `postbox dead` subcommands.
#[derive(Debug, Subcommand)]
pub enum DeadCommand {
    /// List dead rows, oldest first, with their last error.
    List {
        /// Show at most this many.
        #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(i64).range(1..))]
        limit: i64,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Make dead rows pending again, with a full set of attempts and their message ids kept.
    ///
    /// With --id, all named rows must be dead, or nothing changes (exit 2).
    Retry {
        /// A dead row's id (repeatable).
        #[arg(
            long = "id",
            value_name = "ID",
            required_unless_present = "all",
            conflicts_with = "all"
        )]
        ids: Vec<i64>,
        /// Every dead row.
        #[arg(long)]
        all: bool,
    },
    /// Let parked keys move on: their dead rows stay dead (unpublished), the later rows of the
    /// key are published. With --id, all named rows must be dead and unreleased (exit 2).
    #[command(group(clap::ArgGroup::new("rows").required(true).args(["ids", "key", "all"])))]
    Release {
        /// A dead row's id (repeatable).
        #[arg(long = "id", value_name = "ID", conflicts_with_all = ["key", "all"])]
        ids: Vec<i64>,
        /// Every dead row of this partition key.
        #[arg(long, value_name = "KEY", conflicts_with = "all")]
        key: Option<String>,
        /// Every dead row.
        #[arg(long)]
        all: bool,
    },
}

pub(super) async fn run(settings: Settings, args: DeadArgs) -> Result<()> {
    let pool = store::connect_for_command(settings.database()).await?;
    let result = match args.command {
        DeadCommand::List { limit, json } => list(&pool, limit, json).await,
        DeadCommand::Retry { ids, all } => retry(&pool, (!all).then_some(ids)).await,
        DeadCommand::Release { ids, key, .. } => release(&pool, ids, key).await,
    };
    pool.close().await;
    result
}

async fn list(pool: &sqlx::PgPool, limit: i64, json: bool) -> Result<()> {
    let rows = operations::dead(pool, limit).await?;
    let text = if json {
        serde_json::to_string_pretty(&rows).unwrap_or_default()
    } else if rows.is_empty() {
        "no dead rows".to_string()
    } else {
        rows.iter()
            .map(|r| {
                format!(
                    "{}  {}  exchange={:?} routing_key={:?} key={}  attempts={}  dead_at={}\n    {}",
                    r.id,
                    r.message_id,
                    r.exchange,
                    r.routing_key,
                    r.partition_key.as_deref().unwrap_or("-"),
                    r.attempts,
                    r.dead_at
                        .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true))
                        .unwrap_or_default(),
                    r.last_error.as_deref().unwrap_or("")
                )
            })
            .collect::<Vec<_>>()
            .join("\n")
    };
    let _ = writeln!(std::io::stdout(), "{text}");
    Ok(())
}

async fn retry(pool: &sqlx::PgPool, ids: Option<Vec<i64>>) -> Result<()> {
    let mut tx = pool.begin().await.context("beginning the retry")?;
    let revived = operations::retry_dead(&mut *tx, ids.as_deref()).await?;
    every_named_row(
        ids.as_deref(),
        &revived,
        "not a dead row (no such id, or pending or published)",
    )?;
    operations::wake_relays(&mut *tx).await?;
    tx.commit().await.context("committing the retry")?;
    let listed: Vec<String> = revived.iter().map(i64::to_string).collect();
    let _ = writeln!(
        std::io::stdout(),
        "{} dead row(s) pending again{}{}",
        revived.len(),
        if listed.is_empty() { "" } else { ": " },
        listed.join(", ")
    );
    Ok(())
}

async fn release(pool: &sqlx::PgPool, ids: Vec<i64>, key: Option<String>) -> Result<()> {
    let mut tx = pool.begin().await.context("beginning the release")?;
    let ids = (!ids.is_empty()).then_some(ids);
    let released = operations::release_dead(&mut *tx, ids.as_deref(), key.as_deref()).await?;
    every_named_row(ids.as_deref(), &released, "not a dead, unreleased row")?;
    operations::wake_relays(&mut *tx).await?;
    tx.commit().await.context("committing the release")?;
    let _ = writeln!(
        std::io::stdout(),
        "{} dead row(s) released; their keys move on",
        released.len()
    );
    Ok(())
}

/// With `--id`, all named rows must have changed; otherwise the caller's transaction is
/// dropped (rolled back) and the error names the others.
pub(super) fn every_named_row<T: PartialEq + std::fmt::Display>(
    named: Option<&[T]>,
    changed: &[T],
    why: &str,
) -> Result<()> {
    let missing: Vec<String> = named
        .unwrap_or_default()
        .iter()
        .filter(|id| !changed.contains(id))
        .map(T::to_string)
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    Err(Error::Setting(crate::error::InvalidSetting::new(
        "--id",
        missing.join(", "),
        format!("{why}; nothing was changed"),
    )))
}
