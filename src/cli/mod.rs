//! The `postbox` command line: one file per subcommand.

mod bench;
mod cleanup;
mod dead;
mod error;
mod inbox;
mod migrate;
mod reconcile;
#[cfg(test)]
mod reference;
mod replay;
mod run;
mod settings;
mod status;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

pub use error::Error;

/// Exit code for success.
pub const EXIT_OK: u8 = 0;
/// Exit code when the work failed (a database or broker error, say).
pub const EXIT_FAILURE: u8 = 1;
/// Exit code for a bad command line or bad configuration: fix the input, do not retry.
pub const EXIT_USAGE: u8 = 2;
/// Exit code when `postbox reconcile` finds published messages a consumer never processed.
pub const EXIT_DISCREPANCY: u8 = 3;

/// Parses a point in time: RFC 3339, or a duration meaning that long ago (`2h`, `7d`).
fn parse_when(value: &str) -> Result<chrono::DateTime<chrono::Utc>, String> {
    if let Ok(time) = chrono::DateTime::parse_from_rfc3339(value) {
        return Ok(time.with_timezone(&chrono::Utc));
    }
    let ago = humantime::parse_duration(value).map_err(|_| {
        format!(
            "expected an RFC 3339 time (2026-11-23T10:00:00Z) or a duration ago (2h): {value:?}"
        )
    })?;
    chrono::Duration::from_std(ago)
        .ok()
        .and_then(|ago| chrono::Utc::now().checked_sub_signed(ago))
        .ok_or_else(|| format!("{value:?} ago is before any time this program can represent"))
}

/// postbox: a transactional outbox relay for Postgres and RabbitMQ.
///
/// Applications insert events into postbox.outbox in the same transaction as their business
/// rows; `postbox run` publishes them to RabbitMQ with publisher confirms and marks them sent.
#[derive(Debug, Parser)]
#[command(version, propagate_version = true)]
pub struct Cli {
    /// TOML configuration file. Environment variables (DATABASE_URL, AMQP_URL, POSTBOX_...)
    /// override it.
    #[arg(
        long,
        short,
        global = true,
        env = "POSTBOX_CONFIG",
        value_name = "FILE"
    )]
    pub config: Option<PathBuf>,

    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the relay: publish committed outbox rows to RabbitMQ until SIGINT/SIGTERM.
    ///
    /// Applies pending migrations first unless migrate_on_start is false. Waits (with backoff)
    /// for Postgres and RabbitMQ if they are not reachable yet. Exits 0 after a graceful stop.
    Run(run::RunArgs),
    /// Create or upgrade the postbox schema in the database, then exit. Safe to run repeatedly.
    ///
    /// Applies the outbox part (postbox.outbox) and the inbox part (postbox.inbox,
    /// postbox.inbox_versions); each keeps its own history, so `--part inbox` prepares a
    /// subscriber's database on its own.
    Migrate(migrate::MigrateArgs),
    /// Measure the relay against RabbitMQ's own ceiling, on the machine it runs on, in one run.
    ///
    /// Creates (and afterwards drops) a database `postbox_bench_*` on the configured Postgres
    /// server and `postbox-bench-*` queues on the broker. Prints a markdown table.
    Bench(bench::BenchArgs),
    /// Show the outbox's figures (pending, retrying, dead, published, lag) and, where the
    /// database has an inbox, each consumer's. Exit 0; use --json in scripts.
    Status(status::StatusArgs),
    /// List dead rows or make them pending again.
    Dead(dead::DeadArgs),
    /// Delete old published outbox rows now (and, if asked, old inbox rows), in small batches.
    ///
    /// The relay does the same every relay.cleanup_interval. Pending and dead rows are never
    /// deleted.
    Cleanup(cleanup::CleanupArgs),
    /// Publish retained events again, with their original message ids (consumers with an
    /// inbox absorb what they already processed). Says how many first; --dry-run stops there.
    ///
    /// The rows become pending again and the running relay publishes them. Rows already
    /// deleted by retention cannot be replayed.
    Replay(replay::ReplayArgs),
    /// Work with a consumer's inbox: give its dead-lettered messages another chance.
    Inbox(inbox::InboxArgs),
    /// Compare a consumer's inbox with the outbox: published messages it never processed
    /// (exit 3 if any) and messages delivered to it more than once.
    Reconcile(reconcile::ReconcileArgs),
}

/// Prints a fatal error for the user; never panics, even when stderr is closed.
fn report(error: &Error) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "postbox: {error}");
}

impl Cli {
    /// Runs the parsed command and returns the process exit code.
    pub async fn execute(self) -> ExitCode {
        let settings = match settings::load(self.config.as_deref()) {
            Ok(settings) => settings,
            Err(error) => {
                report(&error);
                return ExitCode::from(EXIT_USAGE);
            }
        };
        let result = match self.command {
            Command::Run(args) => run::run(settings, args).await.map(|()| EXIT_OK),
            Command::Migrate(args) => migrate::run(settings, args).await.map(|()| EXIT_OK),
            Command::Bench(args) => bench::run(settings, args).await.map(|()| EXIT_OK),
            Command::Status(args) => status::run(settings, args).await.map(|()| EXIT_OK),
            Command::Dead(args) => dead::run(settings, args).await.map(|()| EXIT_OK),
            Command::Cleanup(args) => cleanup::run(settings, args).await.map(|()| EXIT_OK),
            Command::Replay(args) => replay::run(settings, args).await.map(|()| EXIT_OK),
            Command::Inbox(args) => inbox::run(settings, args).await.map(|()| EXIT_OK),
            Command::Reconcile(args) => {
                reconcile::run(settings, args)
                    .await
                    .map(|found| match found {
                        reconcile::Reconciled::Clean => EXIT_OK,
                        reconcile::Reconciled::Unprocessed => EXIT_DISCREPANCY,
                    })
            }
        };
        match result {
            Ok(code) => ExitCode::from(code),
            Err(error) => {
                report(&error);
                ExitCode::from(error.exit_code())
            }
        }
    }
}
