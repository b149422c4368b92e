//! `postbox migrate`: apply the schema and exit.

use clap::Args;

use crate::config::Settings;
use crate::error::Result;
use crate::redact::redact_url;
use crate::store::{self, Part};

/// Options of `postbox migrate`.
#[derive(Debug, Args)]
pub struct MigrateArgs {
    /// Apply only this part (repeatable): `outbox` for a producer's database, `inbox` for a
    /// subscriber's. Default: both, which is harmless where one is unused.
    #[arg(long = "part", value_enum, value_name = "PART")]
    pub parts: Vec<Part>,
}

pub(super) async fn run(settings: Settings, args: MigrateArgs) -> Result<()> {
    let parts = if args.parts.is_empty() {
        Part::ALL.to_vec()
    } else {
        args.parts
    };
    let pool = store::connect_for_command(settings.database()).await?;
    store::migrate_parts(&pool, &parts).await?;
    tracing::info!(database = %redact_url(&settings.database_url), ?parts, "postbox schema is up to date");
    pool.close().await;
    Ok(())
}
