//! The documentation's SQL runs: every ```sql block in README.md and the manual (docs/) is
//! executed, in the order of its page, against a database of the page's own where postbox's
//! schema is migrated and the examples' `orders` table exists. Blocks meant to be read rather
//! than pasted (fragments, placeholders) are fenced ```pgsql instead.

mod common;

use std::path::{Path, PathBuf};

use common::TestDb;
use sqlx::AssertSqlSafe;

/// The application table the examples write their business rows into.
const ORDERS: &str = "create table orders (id bigint primary key, customer_id bigint not null, \
                      total numeric not null, status text not null default 'new')";

/// README.md and every page under docs/.
fn pages() -> Vec<PathBuf> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if path.is_dir() {
                walk(&path, out);
            } else if path.extension().is_some_and(|ext| ext == "md") {
                out.push(path);
            }
        }
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut pages = vec![root.join("README.md")];
    walk(&root.join("docs"), &mut pages);
    pages.sort();
    pages
}

/// The page's ```sql blocks, each with the line its fence opens on.
fn sql_blocks(text: &str) -> Vec<(usize, String)> {
    let mut blocks = Vec::new();
    let mut open: Option<(usize, String)> = None;
    for (number, line) in text.lines().enumerate() {
        let fence = line.trim_start();
        match open.as_mut() {
            None if fence.trim_end() == "```sql" => open = Some((number + 1, String::new())),
            None => {}
            Some(_) if fence.starts_with("```") => blocks.extend(open.take()),
            Some((_, sql)) => {
                sql.push_str(line);
                sql.push('\n');
            }
        }
    }
    blocks
}

#[tokio::test]
async fn every_sql_example_in_the_docs_runs() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut failures = Vec::new();
    let mut ran = 0;
    for page in pages() {
        let text = std::fs::read_to_string(&page).expect("read a documentation page");
        let blocks = sql_blocks(&text);
        if blocks.is_empty() {
            continue;
        }
        let name = page
            .strip_prefix(root)
            .unwrap_or(&page)
            .display()
            .to_string();
        let db = TestDb::migrated().await;
        sqlx::raw_sql(ORDERS)
            .execute(&db.pool)
            .await
            .expect("create the examples' orders table");
        for (line, sql) in blocks {
            ran += 1;
            if let Err(error) = sqlx::raw_sql(AssertSqlSafe(sql.clone()))
                .execute(&db.pool)
                .await
            {
                failures.push(format!("{name}:{line}: {error}\n{sql}"));
            }
        }
    }
    assert!(
        failures.is_empty(),
        "documented SQL that does not run:\n\n{}",
        failures.join("\n")
    );
    // The SQL contract is documented with runnable examples; none found means the test reads
    // the wrong files.
    assert!(ran >= 10, "only {ran} SQL blocks found in the docs");
}

#[test]
fn the_block_parser_finds_sql_and_skips_other_fences() {
    let text =
        "intro\n```sql\nselect 1;\n```\n```pgsql\nselect <id>;\n```\n  ```sql\nselect 2;\n  ```\n";
    let blocks = sql_blocks(text);
    assert_eq!(
        blocks,
        vec![
            (2, "select 1;\n".to_string()),
            (8, "select 2;\n".to_string())
        ]
    );
}
