//! All of postbox's SQL, one file per table. Other modules call these named functions and never
//! write SQL of their own.

pub mod inbox;
pub mod inbox_streams;
pub mod inbox_versions;
pub mod operations;
pub mod outbox;
pub mod relays;

use sqlx::PgPool;

/// What the SQL layer returns: its failures are Postgres's.
pub(crate) type Result<T, E = crate::error::DatabaseError> = std::result::Result<T, E>;

/// Rows deleted per retention statement: small enough that each holds its locks briefly.
pub const CLEANUP_BATCH: i64 = 1_000;

/// Runs `batch` (a retention delete of at most [`CLEANUP_BATCH`] rows) until it deletes fewer
/// than a full batch; returns the rows deleted in all.
pub(crate) async fn drain_batches<F, Fut>(mut batch: F) -> Result<u64>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<u64>>,
{
    let mut total = 0;
    loop {
        let deleted = batch().await?;
        total += deleted;
        if deleted < CLEANUP_BATCH as u64 {
            return Ok(total);
        }
    }
}

/// Where postbox's own sessions connect, and what their session settings need.
#[derive(Debug, Clone, Copy)]
pub struct Target<'a> {
    /// The Postgres URL.
    pub url: &'a str,
    /// How long a session may sit idle in a transaction before Postgres ends it (the relay's
    /// takeover timeout: a hung relay's claimed rows go back to the others after this long).
    pub takeover_timeout: std::time::Duration,
}
/// Opens a pool of up to `max_connections` to the configured database. Relay sessions carry an
/// `application_name` (visible in `pg_stat_activity`) and `relay.takeover_timeout` as their
/// `idle_in_transaction_session_timeout`, so rows locked by a relay that hangs are freed by
/// Postgres, and the hung relay, its session gone, can no longer mark them.
/// They commit with `synchronous_commit = off`: everything a relay session writes (published,
/// retry and dead marks) can be lost in a Postgres crash without losing an event, since an
/// unmarked row is published again, so marks need not wait for the WAL flush, which on a disk
/// shared with RabbitMQ competes with the broker's own fsyncs.
pub async fn connect(target: Target<'_>, max_connections: u32) -> Result<PgPool> {
    open(target, max_connections, "off").await
}

#[cfg(feature = "cli")]
/// A one-connection pool for an operator command (`replay`, `dead retry`, `cleanup`…). Unlike
/// the relay's marks, what these commit must survive a Postgres crash once the command has
/// said it is done, so they commit synchronously.
pub async fn connect_for_command(target: Target<'_>) -> Result<PgPool> {
    open(target, 1, "on").await
}

async fn open(
    target: Target<'_>,
    max_connections: u32,
    synchronous_commit: &str,
) -> Result<PgPool> {
    let options = session_options(target, synchronous_commit)?;
    ping(target).await?;
    Ok(lazy(options, max_connections))
}

#[cfg(feature = "cli")]
/// The relay's pool without connecting yet (only the URL is checked): what `postbox run` serves
/// its health endpoints with while it waits for Postgres ([`ping`]).
pub fn connect_lazy(target: Target<'_>, max_connections: u32) -> Result<PgPool> {
    Ok(lazy(session_options(target, "off")?, max_connections))
}

/// One direct connection, closed at once: the pool would retry until its acquire timeout and
/// then report only "timed out", where this says what actually failed (refused, auth, no such
/// database).
pub async fn ping(target: Target<'_>) -> Result<()> {
    use crate::error::Context;
    let options = session_options(target, "off")?;
    let what = format!("connecting to {}", crate::redact::redact_url(target.url));
    sqlx::Connection::close(
        <sqlx::PgConnection as sqlx::Connection>::connect_with(&options)
            .await
            .context(what.clone())?,
    )
    .await
    .context(what)
}

fn session_options(
    target: Target<'_>,
    synchronous_commit: &str,
) -> Result<sqlx::postgres::PgConnectOptions> {
    use crate::error::Context;
    use std::str::FromStr;

    let idle_timeout_ms = target.takeover_timeout.as_millis().to_string();
    Ok(sqlx::postgres::PgConnectOptions::from_str(target.url)
        .context("parsing database_url")?
        .application_name("postbox")
        .options([
            (
                "idle_in_transaction_session_timeout",
                idle_timeout_ms.as_str(),
            ),
            ("synchronous_commit", synchronous_commit),
            // postbox's statements are short and run thousands of times a second; once a
            // prepared claim switches to a generic plan whose estimate crosses
            // jit_above_cost, compiling it took ~400 ms per execution (measured on a
            // 100-key backlog behind 100,000 published rows).
            ("jit", "off"),
        ]))
}

fn lazy(options: sqlx::postgres::PgConnectOptions, max_connections: u32) -> PgPool {
    sqlx::postgres::PgPoolOptions::new()
        .max_connections(max_connections)
        .acquire_timeout(std::time::Duration::from_secs(10))
        .connect_lazy_with(options)
}
