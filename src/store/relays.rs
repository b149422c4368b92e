//! SQL for `postbox.relays`: a relay's registration and heartbeat.

use std::time::Duration;

use sqlx::PgPool;
use uuid::Uuid;

use super::Result;
use crate::error::Context;

// Registering also forgets relays that stopped heartbeating a day ago (killed, not stopped).
const REGISTER: &str = r#"
with forget as (
    delete from postbox.relays where heartbeat_at < now() - interval '1 day'
)
insert into postbox.relays (id, hostname, pid, version, heartbeat_interval_ms)
values ($1, $2, $3, $4, $5)
"#;

/// Announces a relay.
pub async fn register(pool: &PgPool, id: Uuid, heartbeat_interval: Duration) -> Result<()> {
    let hostname = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .or_else(|_| std::env::var("HOSTNAME"))
        .unwrap_or_else(|_| "unknown".into());
    sqlx::query(REGISTER)
        .bind(id)
        .bind(hostname)
        .bind(i32::try_from(std::process::id()).unwrap_or(i32::MAX))
        .bind(env!("CARGO_PKG_VERSION"))
        .bind(i64::try_from(heartbeat_interval.as_millis()).unwrap_or(i64::MAX))
        .execute(pool)
        .await
        .context("registering the relay in postbox.relays")?;
    Ok(())
}

/// Refreshes a relay's heartbeat and figures. Returns false if the relay's row is gone
/// (deleted by an operator, or forgotten after a long stall): it must register again.
pub async fn heartbeat(pool: &PgPool, id: Uuid, open_batches: i32, published: i64) -> Result<bool> {
    let result = sqlx::query(
        "update postbox.relays set heartbeat_at = now(), open_batches = $2, published = $3 \
         where id = $1",
    )
    .bind(id)
    .bind(open_batches)
    .bind(published)
    .execute(pool)
    .await
    .context("heartbeating in postbox.relays")?;
    Ok(result.rows_affected() > 0)
}

/// Removes a relay that stops cleanly.
pub async fn deregister(pool: &PgPool, id: Uuid) -> Result<()> {
    sqlx::query("delete from postbox.relays where id = $1")
        .bind(id)
        .execute(pool)
        .await
        .context("removing the relay from postbox.relays")?;
    Ok(())
}

#[cfg(feature = "cli")]
/// Relays alive now.
pub async fn alive(pool: &PgPool) -> Result<i64> {
    sqlx::query_scalar("select count(*) from postbox.relays_alive")
        .fetch_one(pool)
        .await
        .context("reading postbox.relays_alive")
}
