//! `postbox reconcile`: check a consumer's inbox against the outbox it consumes.

use std::io::Write;
use std::time::Duration;

use chrono::{DateTime, Utc};
use clap::Args;
use serde::Serialize;
use uuid::Uuid;

use super::error::Result;
use crate::config::Settings;
use crate::store::inbox::{self, Unsettled};
use crate::store::{self, operations};

/// Options of `postbox reconcile`.
#[derive(Debug, Args)]
pub struct ReconcileArgs {
    /// Where the consumer's inbox is (the outbox is DATABASE_URL's).
    #[command(flatten)]
    pub database: super::inbox::InboxDatabase,
    /// The consumer's name in postbox.inbox.
    #[arg(long, value_name = "NAME")]
    pub consumer: String,
    /// Only events with this routing key (what the consumer's queue receives).
    #[arg(long, value_name = "KEY")]
    pub routing_key: Option<String>,
    /// Events published more recently than this may still be on their way: not counted.
    #[arg(long, default_value = "5m", value_parser = humantime::parse_duration, value_name = "DURATION")]
    pub grace: Duration,
    /// Only events written at or after this time: RFC 3339 or a duration ago (24h).
    #[arg(long, value_parser = super::parse_when, value_name = "TIME")]
    pub since: Option<DateTime<Utc>>,
    /// List at most this many ids of each kind.
    #[arg(long, default_value_t = 20)]
    pub limit: usize,
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

#[derive(Serialize, Default)]
struct Report {
    consumer: String,
    published_checked: u64,
    missing_count: u64,
    missing: Vec<Uuid>,
    failing_count: u64,
    failing: Vec<Uuid>,
    waiting_count: u64,
    waiting: Vec<Uuid>,
    duplicated_count: u64,
    duplicated: Vec<Duplicated>,
}

#[derive(Serialize)]
struct Duplicated {
    message_id: Uuid,
    duplicates: i32,
}

impl Report {
    /// Counts every unsettled id, listing the first `limit` of each kind.
    fn add(&mut self, unsettled: Vec<(Uuid, Unsettled)>, limit: usize) {
        fn note<T>(count: &mut u64, listed: &mut Vec<T>, item: T, limit: usize) {
            *count += 1;
            if listed.len() < limit {
                listed.push(item);
            }
        }
        for (id, state) in unsettled {
            match state {
                Unsettled::Missing => note(&mut self.missing_count, &mut self.missing, id, limit),
                Unsettled::Failing => note(&mut self.failing_count, &mut self.failing, id, limit),
                Unsettled::Waiting => note(&mut self.waiting_count, &mut self.waiting, id, limit),
                Unsettled::Duplicated(duplicates) => note(
                    &mut self.duplicated_count,
                    &mut self.duplicated,
                    Duplicated {
                        message_id: id,
                        duplicates,
                    },
                    limit,
                ),
            }
        }
    }
}

/// Outbox ids compared per round trip to the inbox database.
const PAGE: i64 = 10_000;

/// What `postbox reconcile` found.
pub(super) enum Reconciled {
    /// Every published message was processed.
    Clean,
    /// Some were not (the report says which): exit 3.
    Unprocessed,
}

pub(super) async fn run(settings: Settings, args: ReconcileArgs) -> Result<Reconciled> {
    if !settings.relay.keep_published {
        let _ = writeln!(std::io::stderr(), "{}", super::replay::NO_HISTORY);
    }
    let inbox_pool = args.database.connect(&settings, &args.consumer).await?;
    let outbox_pool = store::connect_for_command(settings.database()).await?;
    let selection = operations::Selection {
        since: args.since,
        routing_key: args.routing_key.clone(),
        ..operations::Selection::default()
    };
    // The outbox database's clock, the one that wrote published_at. A grace longer than
    // history can hold checks nothing rather than overflowing.
    let now = operations::now(&outbox_pool).await?;
    let published_before = chrono::Duration::from_std(args.grace)
        .ok()
        .and_then(|grace| now.checked_sub_signed(grace))
        .filter(|before| *before > DateTime::UNIX_EPOCH)
        .unwrap_or(DateTime::UNIX_EPOCH);
    let mut report = Report {
        consumer: args.consumer.clone(),
        ..Report::default()
    };
    let mut after_id = 0;
    loop {
        let page =
            operations::published_ids(&outbox_pool, &selection, published_before, after_id, PAGE)
                .await?;
        let Some(&(last, _)) = page.last() else {
            break;
        };
        after_id = last;
        report.published_checked += page.len() as u64;
        let ids: Vec<Uuid> = page.iter().map(|(_, id)| *id).collect();
        report.add(
            inbox::unsettled(&inbox_pool, &args.consumer, &ids).await?,
            args.limit,
        );
    }
    outbox_pool.close().await;
    inbox_pool.close().await;

    let text = if args.json {
        serde_json::to_string_pretty(&report).unwrap_or_default()
    } else {
        render(&report)
    };
    let _ = writeln!(std::io::stdout(), "{text}");
    let unprocessed = report.missing_count + report.failing_count + report.waiting_count;
    if unprocessed > 0 {
        let _ = writeln!(
            std::io::stderr(),
            "postbox: reconcile: {unprocessed} published message(s) were never processed by \
             consumer {:?} ({} never received, {} failing, {} held for their turn)",
            report.consumer,
            report.missing_count,
            report.failing_count,
            report.waiting_count
        );
        return Ok(Reconciled::Unprocessed);
    }
    Ok(Reconciled::Clean)
}

fn render(report: &Report) -> String {
    let mut out = format!(
        "consumer {:?}: {} published message(s) checked\n  never processed: {}\n",
        report.consumer, report.published_checked, report.missing_count
    );
    for id in &report.missing {
        out.push_str(&format!("    {id}\n"));
    }
    out.push_str(&format!(
        "  received, handler failing (being retried): {}\n",
        report.failing_count
    ));
    for id in &report.failing {
        out.push_str(&format!("    {id}\n"));
    }
    out.push_str(&format!(
        "  received, held until an earlier number of its stream is applied: {}\n",
        report.waiting_count
    ));
    for id in &report.waiting {
        out.push_str(&format!("    {id}\n"));
    }
    out.push_str(&format!(
        "  delivered more than once (absorbed by the inbox): {}\n",
        report.duplicated_count
    ));
    for d in &report.duplicated {
        out.push_str(&format!(
            "    {}  {} duplicate(s)\n",
            d.message_id, d.duplicates
        ));
    }
    out.trim_end().to_string()
}
