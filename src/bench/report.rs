//! The bench report: a markdown table for people, JSON for scripts.

use serde::Serialize;

/// One measured case.
#[derive(Debug, Clone, Serialize)]
pub struct CaseResult {
    /// Case name, e.g. "ceiling" or "drain".
    pub case: String,
    /// Queue type the case ran against.
    pub queue_type: String,
    /// Median of the repetitions (msgs/s for throughput cases, ms for latency cases); `None`
    /// in a smoke run, which measures nothing.
    pub value: Option<f64>,
    /// Smallest repetition.
    pub min: Option<f64>,
    /// Largest repetition.
    pub max: Option<f64>,
    /// Unit of `value`.
    pub unit: String,
    /// Ratio to the ceiling of the same queue type, where that means something.
    pub ratio_to_ceiling: Option<f64>,
    /// Extra detail (p99, max latency...).
    pub note: String,
}

impl CaseResult {
    /// The median and range of `samples` (sorted in place) in `unit`, with their ratio to
    /// `ceiling` when one is given; the note is left for the caller.
    pub(crate) fn from_samples(
        case: impl Into<String>,
        queue_type: impl Into<String>,
        samples: &mut [f64],
        unit: &str,
        ceiling: Option<f64>,
    ) -> Self {
        let (value, min, max) = super::summarize(samples);
        Self {
            case: case.into(),
            queue_type: queue_type.into(),
            value: Some(value),
            min: Some(min),
            max: Some(max),
            unit: unit.into(),
            ratio_to_ceiling: ceiling.filter(|c| *c > 0.0).map(|c| value / c),
            note: String::new(),
        }
    }

    /// One figure, measured once (its range is itself until [`CaseResult::with_range`]).
    pub(crate) fn single(
        case: impl Into<String>,
        queue_type: impl Into<String>,
        value: f64,
        unit: &str,
        note: String,
    ) -> Self {
        Self {
            case: case.into(),
            queue_type: queue_type.into(),
            value: Some(value),
            min: Some(value),
            max: Some(value),
            unit: unit.into(),
            ratio_to_ceiling: None,
            note,
        }
    }

    /// The same with the range `min`–`max` the value summarizes (a latency case's fastest
    /// and slowest event, say).
    pub(crate) fn with_range(self, min: f64, max: f64) -> Self {
        Self {
            min: Some(min),
            max: Some(max),
            ..self
        }
    }

    /// This case's value as a multiple of `base` (0 when there is no base).
    pub(crate) fn times(&self, base: f64) -> f64 {
        match self.value {
            Some(value) if base > 0.0 => value / base,
            _ => 0.0,
        }
    }
}

/// Everything one `postbox bench` run measured.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Report {
    /// The options the run used, as text.
    pub options: String,
    /// A smoke run (`--quick`): every case ran, at a size too small for its figures to mean
    /// anything, so there are none.
    pub smoke: bool,
    /// The cases, in the order they ran.
    pub cases: Vec<CaseResult>,
}

impl Report {
    /// Drops every figure, for a smoke run: over a few batches a rate is start-up and timer
    /// noise (a "ceiling" of two million messages a second), not a measurement, and a figure
    /// printed is a figure someone quotes. What remains says which cases ran.
    pub(crate) fn without_figures(&mut self) {
        self.smoke = true;
        for case in &mut self.cases {
            case.value = None;
            case.min = None;
            case.max = None;
            case.ratio_to_ceiling = None;
            case.note = "smoke run: ran, not measured".into();
        }
    }

    /// The report as a markdown table.
    pub fn markdown(&self) -> String {
        let mut out = if self.smoke {
            format!(
                "postbox bench, smoke run (--quick): no rates; every case ran at a size too \
                 small to measure: {}\n\n",
                self.options
            )
        } else {
            format!("postbox bench: {}\n\n", self.options)
        };
        out.push_str("| case | queue | median | min–max | unit | × ceiling | note |\n");
        out.push_str("|---|---|---:|---:|---|---:|---|\n");
        let figure = |v: Option<f64>| v.map(|v| format!("{v:.1}")).unwrap_or_default();
        for c in &self.cases {
            let range = match (c.min, c.max) {
                (Some(min), Some(max)) => format!("{min:.1}–{max:.1}"),
                _ => String::new(),
            };
            out.push_str(&format!(
                "| {} | {} | {} | {} | {} | {} | {} |\n",
                c.case,
                c.queue_type,
                figure(c.value),
                range,
                c.unit,
                c.ratio_to_ceiling
                    .map(|r| format!("{r:.2}"))
                    .unwrap_or_default(),
                c.note
            ));
        }
        out
    }
}

pub(super) fn progress(line: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "bench: {line}");
}

/// A progress line with what a case measured (`what: figures`); in a smoke run only that
/// `what` ran, since its figures measure nothing.
pub(super) fn progress_figures(options: &super::BenchOptions, what: &str, figures: &str) {
    if options.smoke {
        progress(&format!("{what}: ran (smoke run, not measured)"));
    } else {
        progress(&format!("{what}: {figures}"));
    }
}
