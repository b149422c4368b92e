//! `postbox bench`: measure the relay against the broker's ceiling on this machine.

use std::path::PathBuf;

use clap::Args;

use super::error::{Error, Result};
use crate::bench::{self, BenchOptions};
use crate::config::Settings;

/// Options of `postbox bench`.
#[derive(Debug, Args)]
pub struct BenchArgs {
    /// Messages per throughput case (the 1- and 4-key drains hold at least 20,000 per key).
    #[arg(long, default_value_t = 100_000, value_parser = clap::value_parser!(u32).range(1..=i64::from(i32::MAX)))]
    pub messages: u32,
    /// Payload size in bytes (at most `relay.max_message_bytes`).
    #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u32).range(0..=i64::from(i32::MAX)))]
    pub payload_size: u32,
    /// Relay batch size (also the ceiling's publish window per batch).
    #[arg(long, default_value_t = 500)]
    pub batch_size: u32,
    /// Batches in flight (also the ceiling's window, in batches).
    #[arg(long, default_value_t = 4)]
    pub in_flight: u32,
    /// Queue type: classic, quorum or both.
    #[arg(long, default_value = "both", value_parser = ["classic", "quorum", "both"])]
    pub queue_type: String,
    /// Runs per throughput case; the median and min–max are reported.
    #[arg(long, default_value_t = 3)]
    pub repetitions: u32,
    /// Also run the retention soak for this many seconds: producers commit --soak-rate rows/s
    /// while the relay publishes and deletes rows older than 5 s; reports the outbox's size.
    #[arg(long, default_value_t = 0, value_name = "SECONDS")]
    pub soak: u32,
    /// Rows per second committed during the soak.
    #[arg(long, default_value_t = 2_000)]
    pub soak_rate: u32,
    /// Also drain with this many published rows retained in the outbox (e.g. 10000000), against
    /// the plain drain: claiming must not slow down as history grows. The fill takes a while
    /// (generate_series, about a minute per few million rows here).
    #[arg(long, default_value_t = 0, value_name = "ROWS")]
    pub history: u64,
    /// Which cases to run, comma-separated (default: all). drain: the broker ceiling and the
    /// plain drain, which always run (the others are measured against them). keys: drains over
    /// 1, 4 and 100 partition keys, each against an unkeyed drain of the same backlog. claim: the
    /// relay's numbering and claim with 10,000 and with 1,000,000 rows pending behind one key.
    /// relays, nohistory: the drain with two relays, without history. latency, idle: a single
    /// event into an idle relay, an idle relay's queries. live: commits at 25, 50 and 90 % of the
    /// drain rate, and 4 writers each committing its own key as fast as they can. dedup,
    /// consumer: the inbox claim alone, consumers end to end with stream ordering on. producers:
    /// 16 and 64 connections committing a business row plus one event, into postbox.outbox and
    /// into a minimal outbox table, and 16 committing 10 events each through enqueue_many
    /// (needs Postgres max_connections ≥ 74).
    #[arg(long, value_delimiter = ',', value_parser = bench::CASES)]
    pub cases: Vec<String>,
    /// A smoke run (CI): every selected case at a small size (2,000 messages, claim backlogs of
    /// 1,000 and 10,000 rows), one repetition, classic queue only, short idle and live windows.
    /// At that size a rate is start-up noise, so no figures are reported: only which cases ran.
    #[arg(long)]
    pub quick: bool,
    /// Also write the results as JSON to this file.
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,
}

pub(super) async fn run(settings: Settings, args: BenchArgs) -> Result<()> {
    let mut options = BenchOptions {
        messages: args.messages,
        payload_size: args.payload_size as usize,
        batch_size: args.batch_size,
        in_flight: args.in_flight,
        queue_types: match args.queue_type.as_str() {
            "both" => vec!["classic".into(), "quorum".into()],
            other => vec![other.to_string()],
        },
        repetitions: args.repetitions.max(1),
        latency_samples: 50,
        idle_seconds: 10,
        live_seconds: 5.0,
        soak_seconds: args.soak,
        soak_rate: args.soak_rate.max(1),
        history: args.history,
        cases: if args.cases.is_empty() {
            bench::CASES.iter().map(|c| c.to_string()).collect()
        } else {
            args.cases
        },
        rows_per_key: 20_000,
        claim_backlogs: (10_000, 1_000_000),
        smoke: false,
    };
    if args.quick {
        options.messages = 2_000;
        options.repetitions = 1;
        options.queue_types = vec!["classic".into()];
        options.latency_samples = 5;
        options.idle_seconds = 3;
        options.live_seconds = 1.0;
        options.rows_per_key = 0;
        options.claim_backlogs = (1_000, 10_000);
        options.smoke = true;
    }
    let mut check = settings.clone();
    check.relay.batch_size = options.batch_size;
    check.relay.max_in_flight_batches = options.in_flight;
    check.validate()?;
    // Rows the relay refuses would only be retried until the case times out.
    if options.payload_size > settings.relay.max_message_bytes {
        return Err(Error::Setting(crate::error::InvalidSetting::new(
            "--payload-size",
            options.payload_size.to_string(),
            format!(
                "at most relay.max_message_bytes ({}) for the relay to publish it",
                settings.relay.max_message_bytes
            ),
        )));
    }
    let report = bench::run(&settings, &options).await?;
    {
        use std::io::Write;
        // A closed stdout (`postbox bench | head`) is the reader's choice, not an error.
        let _ = writeln!(std::io::stdout(), "{}", report.markdown());
    }
    if let Some(path) = args.json {
        // The report is plain numbers and strings: serializing it cannot fail.
        let json = serde_json::to_string_pretty(&report).unwrap_or_default();
        std::fs::write(&path, json).map_err(|source| Error::Io {
            context: format!("writing the bench report to {}", path.display()),
            source,
        })?;
    }
    Ok(())
}
