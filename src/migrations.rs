//! postbox's schema: the migrations of its two parts, applied by [`migrate`] or
//! [`migrate_parts`] (and by `postbox migrate`).

use sqlx::migrate::Migrator;
use sqlx::PgPool;

/// Applying postbox's migrations failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MigrateError {
    /// Postgres could not be reached, a migration failed, or the database holds a migration
    /// this build does not know (a newer postbox migrated it) or one whose checksum differs.
    #[error("postgres: applying postbox migrations: {0}")]
    Migrations(#[from] sqlx::migrate::MigrateError),
}

impl MigrateError {
    /// Whether running the migrations again later may succeed unchanged: Postgres unreachable
    /// or restarting.
    pub fn is_transient(&self) -> bool {
        match self {
            MigrateError::Migrations(sqlx::migrate::MigrateError::Execute(source))
            | MigrateError::Migrations(sqlx::migrate::MigrateError::ExecuteMigration(source, _)) => {
                crate::error::transient(source)
            }
            MigrateError::Migrations(_) => false,
        }
    }
}

/// The independently migrated parts of postbox's schema. Each has its own migrations folder
/// and its own history table (`postbox._migrations_<part>`), so a subscriber's database can
/// carry the inbox alone and a producer's the outbox alone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Part {
    /// `postbox.outbox`: what producers and the relay need.
    Outbox,
    /// `postbox.inbox` and `postbox.inbox_versions`: what consumers need.
    Inbox,
}

impl Part {
    /// Every part, in the order `postbox migrate` applies them.
    pub const ALL: [Part; 2] = [Part::Outbox, Part::Inbox];

    fn migrator(self) -> Migrator {
        let (mut migrator, table) = match self {
            Part::Outbox => (
                sqlx::migrate!("./migrations/outbox"),
                "postbox._migrations_outbox",
            ),
            Part::Inbox => (
                sqlx::migrate!("./migrations/inbox"),
                "postbox._migrations_inbox",
            ),
        };
        migrator.create_schema("postbox");
        migrator.dangerous_set_table_name(table);
        migrator
    }
}

/// Applies every part's migrations that are not yet applied. Running it again is a no-op;
/// concurrent runs are serialized by an advisory lock.
pub async fn migrate(pool: &PgPool) -> Result<(), MigrateError> {
    migrate_parts(pool, &Part::ALL).await
}

/// Applies the pending migrations of `parts` only (a subscriber's database needs just
/// [`Part::Inbox`]).
pub async fn migrate_parts(pool: &PgPool, parts: &[Part]) -> Result<(), MigrateError> {
    for part in parts {
        part.migrator().run(pool).await?;
    }
    Ok(())
}
