//! `postbox migrate`: apply the schema and exit.

use clap::Args;

use super::error::Result;
use crate::config::Settings;
use crate::redact::redact_url;
use crate::store;
use crate::{migrate_parts, Part};

/// A part of the schema, as the command line names it.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum PartArg {
    /// `postbox.outbox`: what producers and the relay need.
    Outbox,
    /// The inbox tables: what consumers need.
    Inbox,
}

impl From<PartArg> for Part {
    fn from(part: PartArg) -> Self {
        match part {
            PartArg::Outbox => Part::Outbox,
            PartArg::Inbox => Part::Inbox,
        }
    }
}

/// Options of `postbox migrate`.
#[derive(Debug, Args)]
pub struct MigrateArgs {
    /// Apply only this part (repeatable): `outbox` for a producer's database, `inbox` for a
    /// subscriber's. Default: both, which is harmless where one is unused.
    #[arg(long = "part", value_enum, value_name = "PART")]
    pub parts: Vec<PartArg>,
}

pub(super) async fn run(settings: Settings, args: MigrateArgs) -> Result<()> {
    let parts: Vec<Part> = if args.parts.is_empty() {
        Part::ALL.to_vec()
    } else {
        args.parts.into_iter().map(Part::from).collect()
    };
    let pool = store::connect_for_command(settings.database()).await?;
    migrate_parts(&pool, &parts).await?;
    tracing::info!(database = %redact_url(&settings.database_url), ?parts, "postbox schema is up to date");
    pool.close().await;
    Ok(())
}
