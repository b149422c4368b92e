//! `postbox reconcile`: check a consumer's inbox against the outbox it consumes.

use std::io::Write;
use std::time::Duration;

use chrono::{DateTime, Utc};
use clap::Args;
use serde::Serialize;
use uuid::Uuid;

use crate::config::{redact_url, Settings};
use crate::error::{Context, Error, Result};
use crate::store::{self, inbox, operations};

/// Options of `postbox reconcile`.
#[derive(Debug, Args)]
pub struct ReconcileArgs {
    /// The consumer's database (holding postbox.inbox); the outbox is DATABASE_URL's.
    #[arg(
        long,
        env = "POSTBOX_INBOX_DATABASE_URL",
        hide_env_values = true,
        value_name = "URL"
    )]
    pub inbox_database_url: String,
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

#[derive(Serialize)]
struct Report {
    consumer: String,
    published_checked: u64,
    missing_count: usize,
    missing: Vec<Uuid>,
    duplicated_count: usize,
    duplicated: Vec<Duplicated>,
}

#[derive(Serialize)]
struct Duplicated {
    message_id: Uuid,
    duplicates: i32,
}

/// Outbox ids compared per round trip to the inbox database.
const PAGE: i64 = 10_000;

pub(super) async fn run(settings: Settings, args: ReconcileArgs) -> Result<()> {
    let outbox_pool = store::connect_for_command(&settings).await?;
    let inbox_pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(1)
        .connect(&args.inbox_database_url)
        .await
        .context(format!(
            "connecting to the inbox database {}",
            redact_url(&args.inbox_database_url)
        ))?;
    let selection = operations::Selection {
        since: args.since,
        routing_key: args.routing_key.clone(),
        ..operations::Selection::default()
    };
    // A grace longer than history can hold checks nothing rather than overflowing.
    let published_before = chrono::Duration::from_std(args.grace)
        .ok()
        .and_then(|grace| Utc::now().checked_sub_signed(grace))
        .unwrap_or(chrono::DateTime::<Utc>::MIN_UTC);
    let mut after_id = 0;
    let mut checked = 0u64;
    let mut missing = Vec::new();
    loop {
        let page =
            operations::published_ids(&outbox_pool, &selection, published_before, after_id, PAGE)
                .await?;
        let Some(&(last, _)) = page.last() else {
            break;
        };
        after_id = last;
        checked += page.len() as u64;
        let ids: Vec<Uuid> = page.iter().map(|(_, id)| *id).collect();
        missing.extend(inbox::missing(&inbox_pool, &args.consumer, &ids).await?);
    }
    let limit = i64::try_from(args.limit).unwrap_or(i64::MAX);
    let (duplicated_count, duplicated) =
        inbox::duplicated(&inbox_pool, &args.consumer, limit).await?;
    outbox_pool.close().await;
    inbox_pool.close().await;

    let report = Report {
        consumer: args.consumer.clone(),
        published_checked: checked,
        missing_count: missing.len(),
        missing: missing.iter().take(args.limit).copied().collect(),
        duplicated_count: usize::try_from(duplicated_count).unwrap_or(usize::MAX),
        duplicated: duplicated
            .iter()
            .map(|&(message_id, duplicates)| Duplicated {
                message_id,
                duplicates,
            })
            .collect(),
    };
    let text = if args.json {
        serde_json::to_string_pretty(&report).unwrap_or_default()
    } else {
        render(&report)
    };
    let _ = writeln!(std::io::stdout(), "{text}");
    if report.missing_count > 0 {
        return Err(Error::Discrepancy(format!(
            "{} published message(s) were never processed by consumer {:?}",
            report.missing_count, report.consumer
        )));
    }
    Ok(())
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
