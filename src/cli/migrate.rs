//! `postbox migrate`: apply the schema and exit.

use crate::config::{redact_url, Settings};
use crate::error::Result;
use crate::store;

pub(super) async fn run(settings: Settings) -> Result<()> {
    let pool = store::connect(&settings, 1).await?;
    store::migrate(&pool).await?;
    tracing::info!(database = %redact_url(&settings.database_url), "postbox schema is up to date");
    pool.close().await;
    Ok(())
}
