//! `postbox inbox`: a consumer's dead letters, given another chance.

use std::io::Write;

use clap::{Args, Subcommand};
use uuid::Uuid;

use super::error::Result;
use crate::config::Settings;
use crate::error::Context;
use crate::store;

/// Options of `postbox inbox`.
#[derive(Debug, Args)]
pub struct InboxArgs {
    /// Where the consumer's inbox is.
    #[command(flatten)]
    pub database: InboxDatabase,
    /// What to do with the consumer's inbox.
    #[command(subcommand)]
    pub command: InboxCommand,
}

/// The consumer's database, which may be another than the outbox's.
#[derive(Debug, Args)]
pub struct InboxDatabase {
    /// The consumer's database (holding postbox.inbox); default: DATABASE_URL's.
    #[arg(
        long,
        global = true,
        env = "POSTBOX_INBOX_DATABASE_URL",
        hide_env_values = true,
        value_name = "URL"
    )]
    pub inbox_database_url: Option<String>,
}

impl InboxDatabase {
    /// Connects as commands connect to the outbox (a failure says what failed), after
    /// checking the URL; then says so on stderr if `consumer` has no rows there, which is
    /// most likely a mistyped name or the wrong database.
    pub(super) async fn connect(
        &self,
        settings: &Settings,
        consumer: &str,
    ) -> Result<sqlx::PgPool> {
        let mut inbox = settings.clone();
        if let Some(url) = &self.inbox_database_url {
            crate::config::check_database_url("--inbox-database-url", url)?;
            inbox.database_url = url.clone();
        }
        let pool = store::connect_for_command(inbox.database()).await?;
        if !store::inbox::has_rows(&pool, consumer).await? {
            let _ = writeln!(
                std::io::stderr(),
                "note: the inbox database has no rows of consumer {consumer:?}: is --consumer \
                 its name, and --inbox-database-url the consumer's database?"
            );
        }
        Ok(pool)
    }
}

/// `postbox inbox` subcommands.
#[derive(Debug, Subcommand)]
pub enum InboxCommand {
    /// Make dead-lettered messages undecided again, with a full set of attempts, so that their
    /// next delivery runs the handler (otherwise it is absorbed as a duplicate). Then move the
    /// dead letters back to the queue.
    ///
    /// With --id, all named messages must be dead-lettered for the consumer, or nothing changes
    /// (exit 2).
    Retry {
        /// The consumer's name.
        #[arg(long)]
        consumer: String,
        /// A dead-lettered message id (repeatable).
        #[arg(
            long = "id",
            value_name = "MESSAGE_ID",
            required_unless_present = "all",
            conflicts_with = "all"
        )]
        ids: Vec<Uuid>,
        /// Every message the consumer dead-lettered.
        #[arg(long)]
        all: bool,
    },
}

pub(super) async fn run(settings: Settings, args: InboxArgs) -> Result<()> {
    match args.command {
        InboxCommand::Retry { consumer, ids, all } => {
            let pool = args.database.connect(&settings, &consumer).await?;
            let result = retry(&pool, &consumer, (!all).then_some(ids)).await;
            pool.close().await;
            result
        }
    }
}

async fn retry(pool: &sqlx::PgPool, consumer: &str, ids: Option<Vec<Uuid>>) -> Result<()> {
    let mut tx = pool.begin().await.context("beginning the retry")?;
    let changed = crate::inbox::retry_dead_lettered(&mut *tx, consumer, ids.as_deref()).await?;
    super::dead::every_named_row(
        ids.as_deref(),
        &changed,
        &format!(
            "not a message consumer {consumer:?} dead-lettered (or its inbox row was deleted \
             by retention)"
        ),
    )?;
    tx.commit().await.context("committing the retry")?;
    let _ = writeln!(
        std::io::stdout(),
        "{} dead-lettered message(s) of consumer {consumer:?} undecided again; move them back \
         to the queue to run the handler",
        changed.len()
    );
    Ok(())
}
