//! `postbox status`: the outbox's and inbox's figures, for a person or (`--json`) a script.

use std::io::Write;

use clap::Args;
use serde::Serialize;

use super::error::Result;
use crate::config::Settings;
use crate::store::{self, operations};

/// Options of `postbox status`.
#[derive(Debug, Args)]
pub struct StatusArgs {
    /// Print JSON (the fields of postbox.outbox_status at the top level, consumers under
    /// "inbox") instead of text.
    #[arg(long)]
    pub json: bool,
}

#[derive(Serialize)]
struct Status {
    /// `None` in a database that has the inbox alone.
    #[serde(flatten)]
    outbox: Option<Outbox>,
    inbox: Vec<operations::InboxSummary>,
}

#[derive(Serialize)]
struct Outbox {
    #[serde(flatten)]
    status: operations::OutboxStatus,
    streams: operations::Streams,
    relays_alive: i64,
}

pub(super) async fn run(settings: Settings, args: StatusArgs) -> Result<()> {
    let pool = store::connect_for_command(settings.database()).await?;
    let outbox = if operations::has_relation(&pool, "postbox.outbox").await? {
        Some(Outbox {
            status: operations::status(&pool).await?,
            streams: operations::streams(&pool, settings.relay.dead_rows_park_keys).await?,
            relays_alive: store::relays::alive(&pool).await?,
        })
    } else {
        None
    };
    let status = Status {
        outbox,
        inbox: operations::inbox_summary(&pool).await?,
    };
    pool.close().await;
    let text = if args.json {
        // Plain numbers, strings and timestamps: serializing cannot fail.
        serde_json::to_string_pretty(&status).unwrap_or_default()
    } else {
        render(&status)
    };
    // A closed stdout (`postbox status | head`) is the reader's choice, not an error.
    let _ = writeln!(std::io::stdout(), "{text}");
    Ok(())
}

fn render(status: &Status) -> String {
    let mut out = match &status.outbox {
        Some(outbox) => render_outbox(outbox),
        None => "outbox\n  none in this database (it has the inbox alone)\n".to_string(),
    };
    render_inbox(&status.inbox, &mut out);
    out.trim_end().to_string()
}

fn render_outbox(outbox: &Outbox) -> String {
    let o = &outbox.status;
    let last = o
        .last_published_at
        .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true))
        .unwrap_or_else(|| "never".into());
    let mut out = format!(
        "outbox\n  pending    {:>10}  (due {}, scheduled {}, retrying {})\n  dead       {:>10}\n  \
         published  {:>10}  (retained; last {last})\n  lag        {:>10.1} s  (age of the oldest due pending row)\n",
        o.pending, o.pending_due, o.scheduled, o.retrying, o.dead, o.published,
        o.oldest_pending_age_seconds
    );
    {
        let streams = &outbox.streams;
        out.push_str(&format!(
            "  keyed      {:>10}  (pending in {} streams; {} not numbered yet)\n  parked     {:>10}  \
             (streams whose consumers wait for a dead row's number; see postbox dead list)\n",
            streams.keyed_rows_pending,
            streams.keyed_streams_pending,
            streams.keyed_rows_unnumbered,
            streams.parked_streams
        ));
    }
    out.push_str(&format!(
        "  relays     {:>10}  (alive)\n",
        outbox.relays_alive
    ));
    out
}

fn render_inbox(inbox: &[operations::InboxSummary], out: &mut String) {
    if !inbox.is_empty() {
        out.push_str(&format!(
            "inbox\n  {:<24} {:>10} {:>8} {:>14} {:>10} {:>8} {:>11} {:>8} {:>8}\n",
            "consumer",
            "applied",
            "stale",
            "dead-lettered",
            "discarded",
            "failing",
            "duplicates",
            "waiting",
            "skipped"
        ));
        for c in inbox {
            out.push_str(&format!(
                "  {:<24} {:>10} {:>8} {:>14} {:>10} {:>8} {:>11} {:>8} {:>8}\n",
                c.consumer,
                c.applied,
                c.stale,
                c.dead_lettered,
                c.discarded,
                c.failing,
                c.duplicates,
                c.waiting,
                c.skipped
            ));
            if c.waiting_streams > 0 {
                out.push_str(&format!(
                    "  {:<24} {} stream(s) hold messages for a missing number, the longest for \
                     {:.0} s (postbox.inbox_waiting_streams)\n",
                    "", c.waiting_streams, c.longest_wait_seconds
                ));
            }
        }
    }
}
