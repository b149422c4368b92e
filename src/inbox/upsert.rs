//! The versioned upsert: write a row only if the incoming version is newer than the stored one.

use std::sync::Arc;

use sqlx::postgres::PgArguments;
use sqlx::query::Query;
use sqlx::{AssertSqlSafe, Postgres};

/// Builds `INSERT … ON CONFLICT (key) DO UPDATE … WHERE target.version < EXCLUDED.version`
/// for a read model: a late event never overwrites newer state, even one that bypasses the
/// inbox's own stale check (a different key, a replay into a rebuilt table).
///
/// Parameters bind in order: the key columns, the version, then the other columns. The
/// statement affects 0 rows when the stored version is the same or newer.
///
/// ```no_run
/// # async fn example(tx: &mut sqlx::PgConnection) -> Result<(), sqlx::Error> {
/// use postbox::inbox::VersionedUpsert;
///
/// let upsert = VersionedUpsert::new("accounts", &["account_id"], "version", &["balance"]);
/// // insert into "accounts" as target ("account_id", "version", "balance") values ($1, $2, $3)
/// // on conflict ("account_id") do update set "version" = excluded."version",
/// //     "balance" = excluded."balance" where target."version" < excluded."version"
/// let applied = upsert.query().bind("acc-1").bind(42_i64).bind(100_i64)
///     .execute(&mut *tx).await?.rows_affected() == 1;
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct VersionedUpsert {
    sql: Arc<str>,
}

impl VersionedUpsert {
    /// The upsert into `table` (optionally `schema.table`), whose row identity is `key` (a
    /// unique constraint's columns), versioned by `version`, also setting `columns`. Names
    /// are quoted as identifiers, so they are never interpreted as SQL.
    pub fn new(table: &str, key: &[&str], version: &str, columns: &[&str]) -> Self {
        let table = table.split('.').map(quote).collect::<Vec<_>>().join(".");
        let version = quote(version);
        let all: Vec<String> = key
            .iter()
            .map(|c| quote(c))
            .chain([version.clone()])
            .chain(columns.iter().map(|c| quote(c)))
            .collect();
        let placeholders: Vec<String> = (1..=all.len()).map(|i| format!("${i}")).collect();
        let updates: Vec<String> = std::iter::once(&version)
            .chain(all.iter().skip(key.len() + 1))
            .map(|c| format!("{c} = excluded.{c}"))
            .collect();
        let sql = format!(
            "insert into {table} as target ({}) values ({}) on conflict ({}) do update set {} \
             where target.{version} < excluded.{version}",
            all.join(", "),
            placeholders.join(", "),
            all[..key.len()].join(", "),
            updates.join(", "),
        );
        Self { sql: sql.into() }
    }

    /// The statement's text.
    pub fn sql(&self) -> &str {
        &self.sql
    }

    /// The statement, ready for `.bind(…)` calls in parameter order.
    pub fn query(&self) -> Query<'static, Postgres, PgArguments> {
        sqlx::query(AssertSqlSafe(self.sql.clone()))
    }
}

fn quote(identifier: &str) -> String {
    format!("\"{}\"", identifier.replace('"', "\"\""))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builds_the_guarded_upsert_with_quoted_names() {
        let upsert = VersionedUpsert::new("app.accounts", &["id"], "version", &["balance", "a\"b"]);
        assert_eq!(
            upsert.sql(),
            "insert into \"app\".\"accounts\" as target (\"id\", \"version\", \"balance\", \"a\"\"b\") \
             values ($1, $2, $3, $4) on conflict (\"id\") do update set \"version\" = excluded.\"version\", \
             \"balance\" = excluded.\"balance\", \"a\"\"b\" = excluded.\"a\"\"b\" \
             where target.\"version\" < excluded.\"version\""
        );
    }
}
