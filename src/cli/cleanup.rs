//! `postbox cleanup`: retention now, instead of waiting for the relay's next round.

use std::io::Write;
use std::time::Duration;

use clap::Args;

use super::error::Result;
use crate::config::Settings;
use crate::store;

/// Options of `postbox cleanup`.
#[derive(Debug, Args)]
pub struct CleanupArgs {
    /// Delete published outbox rows older than this (default: relay.retention).
    #[arg(long, value_parser = humantime::parse_duration, value_name = "DURATION")]
    pub older_than: Option<Duration>,
    /// Also delete decided inbox rows (all consumers) older than this (0s: none, as for the
    /// outbox). Must exceed the longest time a message can come back: a duplicate arriving
    /// after its row is gone is applied again.
    #[arg(long, value_parser = humantime::parse_duration, value_name = "DURATION")]
    pub inbox_older_than: Option<Duration>,
}

pub(super) async fn run(settings: Settings, args: CleanupArgs) -> Result<()> {
    let pool = store::connect_for_command(settings.database()).await?;
    let older_than = args.older_than.unwrap_or(settings.relay.retention);
    let mut report = Vec::new();
    if !crate::store::operations::has_relation(&pool, "postbox.outbox").await? {
        report.push("outbox: none in this database; nothing deleted".to_string());
    } else if older_than.is_zero() {
        report.push("outbox: retention is 0s (keep forever); nothing deleted".to_string());
    } else {
        let deleted = crate::relay::cleanup(&pool, older_than).await?;
        report.push(format!(
            "outbox: {deleted} published row(s) older than {} deleted",
            humantime::format_duration(older_than)
        ));
    }
    if args.inbox_older_than.is_some_and(|d| d.is_zero()) {
        report.push("inbox: 0s means keep forever; nothing deleted".to_string());
    } else if let Some(inbox_older_than) = args.inbox_older_than {
        let deleted = crate::inbox::cleanup(&pool, None, inbox_older_than).await?;
        report.push(format!(
            "inbox: {deleted} decided row(s) older than {} deleted",
            humantime::format_duration(inbox_older_than)
        ));
    }
    pool.close().await;
    let _ = writeln!(std::io::stdout(), "{}", report.join("\n"));
    Ok(())
}
