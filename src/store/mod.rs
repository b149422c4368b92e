//! All of postbox's SQL, one file per table. Other modules call these named functions and never
//! write SQL of their own.

pub mod outbox;

use sqlx::migrate::Migrator;
use sqlx::PgPool;

use crate::error::Result;

/// The outbox schema's migrations, tracked in `postbox._migrations_outbox` so that other parts
/// (the consumer inbox) can be migrated on their own in another database.
fn outbox_migrator() -> Migrator {
    let mut migrator = sqlx::migrate!("./migrations/outbox");
    migrator.create_schema("postbox");
    migrator.dangerous_set_table_name("postbox._migrations_outbox");
    migrator
}

/// Applies the migrations that are not yet applied. Running it again is a no-op; concurrent
/// runs are serialized by an advisory lock.
pub async fn migrate(pool: &PgPool) -> Result<()> {
    outbox_migrator().run(pool).await?;
    Ok(())
}

/// Opens a pool of up to `max_connections` to the configured database. Relay sessions carry an
/// `application_name` (visible in `pg_stat_activity`) and an `idle_in_transaction_session_timeout`
/// well above the confirm timeout, so rows locked by a relay that hangs are freed by Postgres.
pub async fn connect(settings: &crate::Settings, max_connections: u32) -> Result<PgPool> {
    use crate::error::Context;
    use std::str::FromStr;

    let idle_timeout_ms = (settings.relay.confirm_timeout.as_millis() * 2 + 30_000).to_string();
    let options = sqlx::postgres::PgConnectOptions::from_str(&settings.database_url)
        .context("parsing database_url")?
        .application_name("postbox")
        .options([(
            "idle_in_transaction_session_timeout",
            idle_timeout_ms.as_str(),
        )]);
    // One direct connection first: the pool would retry until its acquire timeout and then
    // report only "timed out", where this says what actually failed (refused, auth, no such db).
    let what = format!(
        "connecting to {}",
        crate::config::redact_url(&settings.database_url)
    );
    sqlx::Connection::close(
        <sqlx::PgConnection as sqlx::Connection>::connect_with(&options)
            .await
            .context(what.clone())?,
    )
    .await
    .context(what)?;
    Ok(sqlx::postgres::PgPoolOptions::new()
        .max_connections(max_connections)
        .acquire_timeout(std::time::Duration::from_secs(10))
        .connect_lazy_with(options))
}
