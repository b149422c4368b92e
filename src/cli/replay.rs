//! `postbox replay`: publish retained events again, with their original message ids.

use std::io::Write;

use chrono::{DateTime, Utc};
use clap::{ArgGroup, Args};

use super::error::{Error, Result};
use crate::config::Settings;
use crate::store::{self, operations};

/// Options of `postbox replay`.
#[derive(Debug, Args)]
#[command(group(ArgGroup::new("range").required(true).multiple(true).args(["from_id", "since"])))]
pub struct ReplayArgs {
    /// First outbox id to replay (inclusive).
    #[arg(long, requires = "to_id", value_name = "ID")]
    pub from_id: Option<i64>,
    /// Last outbox id to replay (inclusive).
    #[arg(long, requires = "from_id", value_name = "ID")]
    pub to_id: Option<i64>,
    /// Events written at or after this time: RFC 3339 (2026-11-23T10:00:00Z) or a duration ago (2h).
    #[arg(long, value_parser = super::parse_when, value_name = "TIME")]
    pub since: Option<DateTime<Utc>>,
    /// Events written before this time (same forms as --since).
    #[arg(long, requires = "since", value_parser = super::parse_when, value_name = "TIME")]
    pub until: Option<DateTime<Utc>>,
    /// Only events with this routing key.
    #[arg(long, value_name = "KEY")]
    pub routing_key: Option<String>,
    /// Say how many events would be replayed, change nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Rows made pending per statement: each batch commits on its own, so the relay starts
    /// publishing while a long replay is still being queued.
    #[arg(long, default_value_t = 5_000, value_parser = clap::value_parser!(i64).range(1..))]
    pub batch_size: i64,
}

/// Said when a command that reads published rows finds none and the configuration deletes them.
pub(super) const NO_HISTORY: &str = "note: relay.keep_published is false in this configuration: \
     relays delete rows as they publish them, so only rows published while it was true can be \
     found here";

pub(super) async fn run(settings: Settings, args: ReplayArgs) -> Result<()> {
    if let (Some(from), Some(to)) = (args.from_id, args.to_id) {
        if to < from {
            return Err(Error::Setting(crate::error::InvalidSetting::new(
                "--to-id",
                to.to_string(),
                format!("expected an id at least --from-id ({from})"),
            )));
        }
    }
    if let (Some(since), Some(until)) = (args.since, args.until) {
        if until <= since {
            return Err(Error::Setting(crate::error::InvalidSetting::new(
                "--until",
                until.to_rfc3339(),
                format!("expected a time after --since ({})", since.to_rfc3339()),
            )));
        }
    }
    let selection = operations::Selection {
        from_id: args.from_id,
        to_id: args.to_id,
        since: args.since,
        until: args.until,
        routing_key: args.routing_key,
    };
    let pool = store::connect_for_command(settings.database()).await?;
    let started = operations::now(&pool).await?;
    let count = operations::count_replayable(&pool, &selection).await?;
    let mut out = std::io::stdout();
    let _ = writeln!(
        out,
        "{count} published event(s) retained in the range will be replayed with their original \
         message ids"
    );
    if count == 0 && !settings.relay.keep_published {
        let _ = writeln!(out, "{NO_HISTORY}");
    }
    if args.dry_run || count == 0 {
        if args.dry_run {
            let _ = writeln!(out, "dry run: nothing changed");
        }
        pool.close().await;
        return Ok(());
    }
    let mut queued = 0;
    let mut after_id = i64::MIN;
    // Each batch commits on its own and wakes the relays (an UPDATE fires no insert trigger),
    // so publishing starts while a long replay is still being queued.
    while let (n, Some(last)) =
        operations::replay_batch(&pool, &selection, started, after_id, args.batch_size).await?
    {
        queued += n;
        after_id = last;
        operations::wake_relays(&pool).await?;
    }
    pool.close().await;
    let _ = writeln!(
        out,
        "{queued} event(s) pending again; the relay publishes them (consumers with an inbox \
         absorb the ones they already processed)"
    );
    Ok(())
}
