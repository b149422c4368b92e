//! Claim time with a backlog behind one key: the relay's numbering and claim statements with a
//! small and a large backlog of one partition key. Numbering reads only unnumbered rows from
//! the front and the claim only due rows in id order, so neither should see what lies behind
//! the batch it takes.

use std::time::{Duration, Instant};

use sqlx::{AssertSqlSafe, Connection as _, PgConnection};

use super::error::Result;
use super::report::{progress, progress_figures};
use super::{quantile, BenchOptions, CaseResult, Env};
use crate::error::Context;
use crate::store::outbox;

/// Rows numbered and claimed per round, as a relay at the default batch size does.
const BATCH: u32 = 500;

/// Rounds at most per backlog. Each round numbers the next `BATCH` rows, so the smaller backlog
/// has only so many rounds of full numbering in it (20 at 10,000): both backlogs run the same
/// number of rounds, each numbering a full batch, so the two medians time the same work.
const MAX_ROUNDS: u64 = 20;

/// The backlog's one partition key and routing key (nothing is published: claims roll back).
const HOT_KEY: &str = "hot";
const ROUTING_KEY: &str = "postbox-bench-claim";

/// What one backlog's rounds measured.
struct Measured {
    backlog: u64,
    /// Per round: numbering + claim, numbering alone, claim alone (begin included).
    rounds: Vec<Duration>,
    numbering: Vec<Duration>,
    claims: Vec<Duration>,
    /// Whether every round numbered and claimed a full batch.
    full: bool,
    /// Shared buffers (hit + read) EXPLAIN (ANALYZE, BUFFERS) counted for each statement.
    numbering_buffers: Option<u64>,
    claim_buffers: Option<u64>,
}

impl Measured {
    fn median_ms(samples: &[Duration]) -> f64 {
        let mut sorted = samples.to_vec();
        sorted.sort();
        quantile(&sorted, 0.5).as_secs_f64() * 1e3
    }
}

/// `postbox.number_rows(500)` then a claim of 500 rows (rolled back, releasing the locks),
/// timed per round with `options.claim_backlogs` pending rows of one key; the median of the
/// larger backlog and its ratio to the smaller's.
pub(super) async fn claim_case(env: &Env, options: &BenchOptions) -> Result<CaseResult> {
    let (small, large) = options.claim_backlogs;
    let rounds = (small / u64::from(BATCH)).clamp(1, MAX_ROUNDS);
    let at_small = measure(env, options, small, rounds).await?;
    let at_large = measure(env, options, large, rounds).await;
    // The bench's later cases expect an outbox without these rows, whatever happened.
    reset(env).await?;
    let at_large = at_large?;
    let (small_ms, large_ms) = (
        Measured::median_ms(&at_small.rounds),
        Measured::median_ms(&at_large.rounds),
    );
    let ratio = if small_ms > 0.0 {
        large_ms / small_ms
    } else {
        0.0
    };
    let buffers = |m: &Measured| {
        let show = |b: Option<u64>| b.map_or("?".to_string(), |b| b.to_string());
        format!(
            "{} (numbering) + {} (claim)",
            show(m.numbering_buffers),
            show(m.claim_buffers)
        )
    };
    let parts = |m: &Measured| {
        format!(
            "numbering {:.2} + claim {:.2}",
            Measured::median_ms(&m.numbering),
            Measured::median_ms(&m.claims)
        )
    };
    let full = if at_small.full && at_large.full {
        "every round numbered and claimed a full batch"
    } else {
        "NOT every round numbered and claimed a full batch"
    };
    progress_figures(
        options,
        "claim",
        &format!(
            "{small_ms:.2} ms at {} ({}), {large_ms:.2} ms at {} ({}): {ratio:.2} ×",
            at_small.backlog,
            parts(&at_small),
            at_large.backlog,
            parts(&at_large)
        ),
    );
    let mut sorted = at_large.rounds.clone();
    sorted.sort();
    let ms = |d: Option<&Duration>| d.map_or(0.0, |d| d.as_secs_f64() * 1e3);
    let note = format!(
        "select postbox.number_rows({BATCH}), then store::outbox::claim of {BATCH} in a \
         transaction rolled back; median of {rounds} rounds on one connection, each numbering \
         the next {BATCH}: {large_ms:.2} ms ({}) with {} pending rows behind one key, \
         {small_ms:.2} ms ({}) with {}; {} ÷ {} = {ratio:.2} (target ≤ 1.5); {full}; \
         shared buffers per EXPLAIN (ANALYZE, BUFFERS) of a pass before the rounds (rolled \
         back; plans on stderr): {} at {}, {} at {}",
        parts(&at_large),
        at_large.backlog,
        parts(&at_small),
        at_small.backlog,
        short(at_large.backlog),
        short(at_small.backlog),
        buffers(&at_small),
        short(at_small.backlog),
        buffers(&at_large),
        short(at_large.backlog),
    );
    Ok(CaseResult::single(
        format!("claim, {} behind one key", short(at_large.backlog)),
        "-",
        large_ms,
        "ms p50",
        note,
    )
    .with_range(ms(sorted.first()), ms(sorted.last())))
}

/// "1M", "10k": a backlog's size in a case name.
fn short(rows: u64) -> String {
    match rows {
        r if r >= 1_000_000 && r % 1_000_000 == 0 => format!("{}M", r / 1_000_000),
        r if r >= 1_000 && r % 1_000 == 0 => format!("{}k", r / 1_000),
        r => r.to_string(),
    }
}

/// Empties the outbox and forgets the hot key's stream.
async fn reset(env: &Env) -> Result<()> {
    sqlx::query("truncate postbox.outbox")
        .execute(&env.pool)
        .await
        .context("emptying the outbox")?;
    sqlx::query("delete from postbox.outbox_streams where partition_key = $1")
        .bind(HOT_KEY)
        .execute(&env.pool)
        .await
        .context("forgetting the hot key's stream")?;
    Ok(())
}

/// `backlog` pending rows of one key in an empty outbox, then `rounds` rounds timed.
async fn measure(env: &Env, options: &BenchOptions, backlog: u64, rounds: u64) -> Result<Measured> {
    reset(env).await?;
    progress(&format!("claim: committing {backlog} rows behind one key"));
    sqlx::query(
        "insert into postbox.outbox (routing_key, payload, partition_key)
         select $1, repeat('x', $2), $3 from generate_series(1, $4)",
    )
    .bind(ROUTING_KEY)
    .bind(options.payload_size as i32)
    .bind(HOT_KEY)
    .bind(i64::try_from(backlog).unwrap_or(i64::MAX))
    .execute(&env.pool)
    .await
    .context("filling the backlog behind one key")?;
    sqlx::query("vacuum analyze postbox.outbox")
        .execute(&env.pool)
        .await
        .context("vacuum after filling")?;
    // One connection for every round, as a relay's pooled connection: its statements are
    // prepared once, and TCP_NODELAY is on (see `Env::pool_of`).
    let pool = env.pool_of(1).await?;
    let measured = async {
        let mut connection = pool.acquire().await.context("connecting to claim")?;
        let (numbering_buffers, claim_buffers) =
            explain(env, options, &mut connection, backlog).await?;
        let mut measured = Measured {
            backlog,
            rounds: Vec::new(),
            numbering: Vec::new(),
            claims: Vec::new(),
            full: true,
            numbering_buffers,
            claim_buffers,
        };
        for _ in 0..rounds {
            let start = Instant::now();
            let numbered = outbox::number(&mut *connection, BATCH).await?;
            let numbering = start.elapsed();
            let mut tx = connection.begin().await.context("starting a claim")?;
            let claimed = outbox::claim(&mut tx, BATCH, 0).await?;
            let round = start.elapsed();
            tx.rollback().await.context("rolling a claim back")?;
            measured.full &= numbered == Some(u64::from(BATCH)) && claimed.len() == BATCH as usize;
            measured.rounds.push(round);
            measured.numbering.push(numbering);
            measured.claims.push(round.saturating_sub(numbering));
        }
        Result::Ok(measured)
    }
    .await;
    pool.close().await;
    measured
}

/// EXPLAIN (ANALYZE, BUFFERS) of the numbering and of the claim, in a transaction rolled back
/// (so the rounds start from the same state at either size); prints both plans and returns
/// the shared buffers each touched. The claim's text is read back from `pg_stat_activity`
/// after `store::outbox::claim` ran it, so the plan is that of the statement the relay sends,
/// not of a copy that could drift from it; should that fail, the claim's plan is reported
/// missing and the rounds are timed all the same.
async fn explain(
    env: &Env,
    options: &BenchOptions,
    connection: &mut PgConnection,
    backlog: u64,
) -> Result<(Option<u64>, Option<u64>)> {
    let mut tx = connection.begin().await.context("starting to explain")?;
    let numbering: Vec<String> = sqlx::query_scalar(AssertSqlSafe(format!(
        "explain (analyze, buffers) select postbox.number_rows({BATCH})"
    )))
    .fetch_all(&mut *tx)
    .await
    .context("explaining the numbering")?;
    let pid: i32 = sqlx::query_scalar("select pg_backend_pid()")
        .fetch_one(&mut *tx)
        .await
        .context("reading the claiming session's pid")?;
    outbox::claim(&mut tx, BATCH, 0).await?;
    let text: Option<String> =
        sqlx::query_scalar("select query from pg_stat_activity where pid = $1")
            .bind(pid)
            .fetch_optional(&env.pool)
            .await
            .context("reading the claim's text")?
            .flatten();
    let claim = match text.filter(|t| t.to_lowercase().contains("from postbox.outbox")) {
        Some(text) => {
            sqlx::query_scalar(AssertSqlSafe(format!("explain (analyze, buffers) {text}")))
                .bind(i64::from(BATCH))
                .bind(0_i64)
                .fetch_all(&mut *tx)
                .await
                .map_err(|e| e.to_string())
        }
        None => {
            Err("pg_stat_activity does not show the claim as the session's last statement".into())
        }
    };
    tx.rollback()
        .await
        .context("rolling the explained claim back")?;
    // Not in a smoke run: a plan holds timings, and a smoke run reports none.
    let print_plan = |what: &str, plan: &[String]| {
        if options.smoke {
            return;
        }
        progress(&format!("EXPLAIN (ANALYZE, BUFFERS), {what} at {backlog}:"));
        for line in plan {
            progress(&format!("  {line}"));
        }
    };
    print_plan("numbering", &numbering);
    let claim = match claim {
        Ok(plan) => {
            print_plan("claim", &plan);
            Some(plan)
        }
        Err(reason) => {
            progress(&format!("claim at {backlog}: no plan: {reason}"));
            None
        }
    };
    Ok((
        top_buffers(&numbering),
        claim.as_deref().and_then(top_buffers),
    ))
}

/// Shared buffers (hit + read) of a text plan's top node, which counts its children's and,
/// for a function call, the statements the function ran: the line right under the first.
fn top_buffers(plan: &[String]) -> Option<u64> {
    let line = plan.get(1)?.trim().strip_prefix("Buffers:")?;
    let shared = line
        .split(',')
        .find_map(|part| part.trim().strip_prefix("shared "))?;
    Some(
        shared
            .split_whitespace()
            .filter_map(|field| match field.split_once('=') {
                Some(("hit" | "read", n)) => n.parse::<u64>().ok(),
                _ => None,
            })
            .sum(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_top_nodes_shared_buffers_are_hit_plus_read() {
        let plan = [
            "Limit  (cost=0.42..1.2 rows=500 width=8) (actual time=0.1..0.9 rows=500 loops=1)"
                .to_string(),
            "  Buffers: shared hit=120 read=3 dirtied=2, temp read=1".to_string(),
            "  ->  Index Scan using outbox_pending_idx on outbox".to_string(),
        ];
        assert_eq!(top_buffers(&plan), Some(123));
        assert_eq!(top_buffers(&plan[..1]), None);
    }

    #[test]
    fn backlog_sizes_read_short() {
        assert_eq!(short(1_000_000), "1M");
        assert_eq!(short(10_000), "10k");
        assert_eq!(short(1_500), "1500");
    }
}
