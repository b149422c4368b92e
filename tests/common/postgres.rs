//! Postgres for tests: a database of its own per test, settings pointing at it, the wake-up keys.

use std::time::Duration;

use postbox::Settings;
use sqlx::postgres::PgPoolOptions;
use sqlx::{AssertSqlSafe, PgPool};
use uuid::Uuid;

use super::*;

/// Admin URL of the shared Postgres server (its `postgres` database).
pub fn admin_database_url() -> String {
    std::env::var("POSTBOX_TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into())
}

/// A database of its own for one test, dropped when the test ends.
pub struct TestDb {
    pub name: String,
    pub url: String,
    pub pool: PgPool,
}

impl TestDb {
    /// A new empty database.
    pub async fn empty() -> Self {
        let name = format!("postbox_test_{}", Uuid::new_v4().simple());
        let admin = PgPoolOptions::new()
            .max_connections(1)
            .connect(&admin_database_url())
            .await
            .expect("test Postgres is reachable (is it running? see .ci/run)");
        sqlx::query(AssertSqlSafe(format!("create database {name}")))
            .execute(&admin)
            .await
            .expect("create test database");
        admin.close().await;
        let url = database_url_for(&name);
        let pool = PgPoolOptions::new()
            .max_connections(8)
            .connect(&url)
            .await
            .expect("connect test database");
        Self { name, url, pool }
    }

    /// A new database with the postbox schema applied.
    pub async fn migrated() -> Self {
        let db = Self::empty().await;
        postbox::migrate(&db.pool).await.expect("migrate");
        db
    }

    /// Counts rows of `postbox.outbox` matching `condition` (a SQL boolean expression).
    pub async fn count(&self, condition: &str) -> i64 {
        sqlx::query_scalar(AssertSqlSafe(format!(
            "select count(*) from postbox.outbox where {condition}"
        )))
        .fetch_one(&self.pool)
        .await
        .expect("count outbox rows")
    }

    /// Waits (up to 20 s) until some session of this database waits on a lock.
    pub async fn until_a_session_waits_on_a_lock(&self) {
        wait_until(
            "a session waiting on a lock",
            Duration::from_secs(20),
            || async {
                let waiting: i64 = sqlx::query_scalar(
                    "select count(*) from pg_stat_activity \
                 where datname = current_database() and wait_event_type = 'Lock'",
                )
                .fetch_one(&self.pool)
                .await
                .ok()?;
                (waiting > 0).then_some(())
            },
        )
        .await;
    }

    /// Pending rows claimed (row-locked) by some session right now. Read with `pgrowlocks`,
    /// which takes no row lock: a probe by `FOR UPDATE SKIP LOCKED` would lock the free rows
    /// for a moment, and a relay claiming then would skip them.
    pub async fn locked_rows(&self) -> i64 {
        sqlx::query("create extension if not exists pgrowlocks")
            .execute(&self.pool)
            .await
            .expect("pgrowlocks (Postgres contrib) is available");
        sqlx::query_scalar(
            "select count(*) from postbox.outbox o \
             join pgrowlocks('postbox.outbox') l on l.locked_row = o.ctid \
             where o.published_at is null and o.dead_at is null",
        )
        .fetch_one(&self.pool)
        .await
        .expect("count locked rows")
    }

    /// Relay settings for this database with quick, test-friendly timings.
    pub fn settings(&self) -> Settings {
        settings_for(&self.url)
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let name = self.name.clone();
        // Drop runs outside async context; a short-lived thread with its own runtime does the
        // cleanup without blocking the test's runtime.
        let _ = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build();
            if let Ok(runtime) = runtime {
                runtime.block_on(async {
                    if let Ok(admin) = PgPoolOptions::new()
                        .max_connections(1)
                        .connect(&admin_database_url())
                        .await
                    {
                        let _ = sqlx::query(AssertSqlSafe(format!(
                            "drop database if exists {name} with (force)"
                        )))
                        .execute(&admin)
                        .await;
                    }
                });
            }
        })
        .join();
    }
}

/// The admin URL with its database replaced by `name`.
pub fn database_url_for(name: &str) -> String {
    let mut url = url::Url::parse(&admin_database_url()).expect("admin URL parses");
    url.set_path(name);
    url.to_string()
}

/// Settings for a relay on `database_url` with quick test timings.
pub fn settings_for(database_url: &str) -> Settings {
    let mut settings = Settings::default();
    settings.database_url = database_url.to_string();
    settings.amqp_url = amqp_url();
    settings.relay.poll_interval = Duration::from_millis(200);
    settings.relay.retry_initial_delay = Duration::from_millis(100);
    settings.relay.retry_max_delay = Duration::from_secs(1);
    settings.relay.shutdown_timeout = Duration::from_secs(10);
    settings
}

/// Takes every wake-up key in share mode on `connection`, as a sleeping relay does: from then
/// on, commits into the outbox notify.
pub async fn hold_the_wakeup_keys(connection: &mut sqlx::PgConnection) {
    sqlx::query(
        "select count(pg_advisory_lock_shared(-1084948806, k)) \
         from generate_series(0, 255) k",
    )
    .execute(connection)
    .await
    .expect("take the wake-up keys");
}
