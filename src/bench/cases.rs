//! The order the cases run in, and how each is compared with the ceiling or its pair.

use super::ceiling::ceiling_once;
use super::drain::{drain_once, history_case, plain_drain, Shape};
use super::error::Result;
use super::latency::latency_case;
use super::report::progress_figures;
use super::resources::Usage;
use super::{BenchOptions, CaseResult, Env, Report};
use crate::config::Settings;

pub(super) async fn run_all(
    env: &Env,
    settings: &Settings,
    options: &BenchOptions,
) -> Result<Report> {
    let mut report = Report {
        options: format!(
            "{} messages of {} bytes, batch {}, {} in flight, {} repetition(s)",
            options.messages,
            options.payload_size,
            options.batch_size,
            options.in_flight,
            options.repetitions
        ),
        smoke: false,
        cases: Vec::new(),
    };
    let mut ceilings = Vec::new();
    for queue_type in &options.queue_types {
        let mut ceiling = Vec::new();
        let mut drain_rates = Vec::new();
        let mut drain_usage = Usage::default();
        for rep in 0..options.repetitions {
            // Interleaved, so that a noisy moment hurts both sides alike.
            let (c, usage) = ceiling_once(env, queue_type, options).await?;
            progress_figures(
                options,
                &format!("ceiling {queue_type} #{}", rep + 1),
                &format!("{c:.0} msgs/s; {}", usage.describe()),
            );
            ceiling.push(c);
            let what = format!("drain {queue_type} #{}", rep + 1);
            let (d, usage) = plain_drain(env, settings, queue_type, options, &what).await?;
            drain_rates.push(d);
            drain_usage = usage;
        }
        let mut ceiling =
            CaseResult::from_samples("ceiling", queue_type, &mut ceiling, "msgs/s", None);
        let c_med = ceiling.value.unwrap_or(0.0);
        ceiling.ratio_to_ceiling = Some(1.0);
        ceiling.note = "raw persistent publishes, pipelined confirms, no Postgres".into();
        report.cases.push(ceiling);
        let mut drain = CaseResult::from_samples(
            "backlog drain",
            queue_type,
            &mut drain_rates,
            "rows/s",
            Some(c_med),
        );
        let d_med = drain.value.unwrap_or(0.0);
        drain.note = format!(
            "claim → publish → confirm → mark, rows committed first ({}); last run: {}",
            super::keys::backlog_shape(),
            drain_usage.describe()
        );
        report.cases.push(drain);
        ceilings.push((queue_type.clone(), c_med, d_med));
    }
    let (queue_type, ceiling, plain) = ceilings.first().cloned().unwrap_or_default();
    if options.runs("keys") {
        report
            .cases
            .extend(super::keys::keyed_drains(env, settings, &queue_type, options, ceiling).await?);
    }
    for (name, case, shape, what) in [
        (
            "relays",
            "drain, 2 relays",
            Shape {
                relays: 2,
                ..Shape::PLAIN
            },
            "two relays (own pools and connections) sharing one backlog",
        ),
        (
            "nohistory",
            "drain, no history",
            Shape {
                keep_published: false,
                ..Shape::PLAIN
            },
            "relay.keep_published = false: published rows deleted, not marked",
        ),
    ] {
        if !options.runs(name) {
            continue;
        }
        let mut rates = Vec::new();
        let mut last_usage = Usage::default();
        for rep in 0..options.repetitions {
            let (rate, usage) =
                drain_once(env, settings, &queue_type, options, shape, options.messages).await?;
            progress_figures(
                options,
                &format!("{case} {queue_type} #{}", rep + 1),
                &format!("{rate:.0} rows/s; {}", usage.describe()),
            );
            rates.push(rate);
            last_usage = usage;
        }
        let mut result =
            CaseResult::from_samples(case, &queue_type, &mut rates, "rows/s", Some(ceiling));
        result.note = format!(
            "{what}; {:.2} × the plain drain; last run: {}",
            result.times(plain),
            last_usage.describe()
        );
        report.cases.push(result);
    }
    if options.runs("claim") {
        report
            .cases
            .push(super::claim::claim_case(env, options).await?);
    }
    let queue_type = queue_type.as_str();
    if options.runs("latency") {
        report
            .cases
            .push(latency_case(env, settings, queue_type, options).await?);
    }
    if options.runs("idle") {
        report
            .cases
            .push(super::live::idle_queries(env, settings, options, options.idle_seconds).await?);
    }
    if options.runs("live") {
        report.cases.extend(
            super::live::live_cases(
                env,
                settings,
                queue_type,
                options,
                plain,
                options.live_seconds,
            )
            .await?,
        );
        report
            .cases
            .extend(super::live::live_keyed_cases(env, settings, queue_type, options).await?);
    }
    if options.soak_seconds > 0 {
        report
            .cases
            .push(super::live::soak(env, settings, options).await?);
    }
    if options.runs("dedup") {
        report
            .cases
            .push(super::inbox::dedup_case(env, options).await?);
    }
    if options.runs("consumer") {
        report
            .cases
            .extend(super::inbox::consumer_cases(env, queue_type, options).await?);
    }
    if options.runs("producers") {
        report
            .cases
            .extend(super::producers::producers_cases(env, options).await?);
    }
    // Last: the retained rows stay in the table until the bench database is dropped.
    if options.history > 0 {
        report
            .cases
            .push(history_case(env, settings, queue_type, options, ceiling, plain).await?);
    }
    Ok(report)
}
