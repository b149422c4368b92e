//! Backlogs committed as applications commit them, by concurrent writers a few rows per
//! transaction; and the keyed drains over 1, 4 and 100 partition keys, each against an unkeyed
//! drain of the same backlog.

use super::drain::{drain_once, Shape};
use super::error::Result;
use super::report::progress_figures;
use super::resources::Usage;
use super::{summarize, BenchOptions, CaseResult, Env};
use crate::error::Context;

/// Writers committing a backlog at once, each on its own connection.
const WRITERS: u32 = 4;

/// Rows per writer transaction: a request commits a few events of one aggregate at a time.
pub(super) const ROWS_PER_TRANSACTION: u32 = 10;

/// How a drain's backlog is committed, for the notes.
pub(super) fn backlog_shape() -> String {
    format!("by {WRITERS} writers at once, {ROWS_PER_TRANSACTION} rows per transaction")
}

/// The keyed drains: partition keys, and whether the case holds at least
/// `options.rows_per_key` rows per key (100 keys at 20,000 each would be 2 M rows).
const KEYED: [(u32, bool); 3] = [(1, true), (4, true), (100, false)];

/// Commits `rows` rows to `routing_key` the way applications do: [`WRITERS`] writers at once,
/// each on its own connection, [`ROWS_PER_TRANSACTION`] rows per transaction, so a key's rows
/// interleave with other keys' rows in id order and commit order. Transaction `t` writes
/// partition key `k<t mod keys>` (no key when `keys` is 0); writers take transactions in turn,
/// so with 4 keys each writer commits its own key, and with 1 key all four write the same one
/// and their commits race, as requests on one aggregate's events do.
pub(super) async fn commit_backlog(
    env: &Env,
    routing_key: &str,
    rows: u32,
    keys: u32,
    payload_size: usize,
) -> Result<()> {
    let pool = env.pool_of(WRITERS).await?;
    let transactions = rows.div_ceil(ROWS_PER_TRANSACTION);
    let writers = (0..WRITERS).map(|writer| {
        let pool = &pool;
        async move {
            let mut connection = pool.acquire().await.context("connecting a bench writer")?;
            for t in (writer..transactions).step_by(WRITERS as usize) {
                let n = ROWS_PER_TRANSACTION.min(rows - t * ROWS_PER_TRANSACTION);
                let key = (keys > 0).then(|| format!("k{}", t % keys));
                // One statement: its own transaction.
                sqlx::query(
                    "insert into postbox.outbox (routing_key, payload, partition_key)
                     select $1, repeat('x', $2), $3 from generate_series(1, $4)",
                )
                .bind(routing_key)
                .bind(payload_size as i32)
                .bind(key)
                .bind(n as i32)
                .execute(&mut *connection)
                .await
                .context("committing the backlog")?;
            }
            Result::Ok(())
        }
    });
    let committed = futures_util::future::try_join_all(writers).await;
    pool.close().await;
    committed.map(|_| ())
}

/// Drains over 1, 4 and 100 partition keys. Each run is paired with an unkeyed drain of the
/// same number of rows committed the same way, just before it: the ratio compares like with
/// like (backlog size, commit shape, table state), and a noisy moment hurts both sides alike.
pub(super) async fn keyed_drains(
    env: &Env,
    settings: &crate::config::Settings,
    queue_type: &str,
    options: &BenchOptions,
    ceiling: f64,
) -> Result<Vec<CaseResult>> {
    let mut results = Vec::new();
    for (keys, per_key) in KEYED {
        let rows = if per_key {
            options
                .messages
                .max(options.rows_per_key.saturating_mul(keys))
        } else {
            options.messages
        };
        let over = match keys {
            1 => "1 key".to_string(),
            _ => format!("{keys} keys"),
        };
        let case = format!("drain, {over}");
        let mut keyed = Vec::new();
        let mut plain = Vec::new();
        let mut last_usage = Usage::default();
        for rep in 0..options.repetitions {
            let (rate, usage) =
                drain_once(env, settings, queue_type, options, Shape::PLAIN, rows).await?;
            progress_figures(
                options,
                &format!("{case}: unkeyed pair {queue_type} #{}", rep + 1),
                &format!("{rate:.0} rows/s; {}", usage.describe()),
            );
            plain.push(rate);
            let shape = Shape {
                keys,
                ..Shape::PLAIN
            };
            let (rate, usage) = drain_once(env, settings, queue_type, options, shape, rows).await?;
            progress_figures(
                options,
                &format!("{case} {queue_type} #{}", rep + 1),
                &format!("{rate:.0} rows/s; {}", usage.describe()),
            );
            keyed.push(rate);
            last_usage = usage;
        }
        let (plain, _, _) = summarize(&mut plain);
        let mut result =
            CaseResult::from_samples(case, queue_type, &mut keyed, "rows/s", Some(ceiling));
        result.note = format!(
            "{rows} rows over {over}, {} per key, committed {}, numbered per \
             stream{}; {:.2} × the plain drain (target ≥ 0.8): {plain:.0} rows/s for the same \
             rows unkeyed, committed the same way, drained just before each run; last run: {}",
            rows / keys,
            backlog_shape(),
            if per_key {
                format!(" (max(--messages, {} × keys) rows)", options.rows_per_key)
            } else {
                String::new()
            },
            result.times(plain),
            last_usage.describe()
        );
        results.push(result);
    }
    Ok(results)
}
