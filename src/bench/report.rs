//! The bench report: a markdown table for people, JSON for scripts.

use serde::Serialize;

/// One measured case.
#[derive(Debug, Clone, Serialize)]
pub struct CaseResult {
    /// Case name, e.g. "ceiling" or "drain".
    pub case: String,
    /// Queue type the case ran against.
    pub queue_type: String,
    /// Median of the repetitions (msgs/s for throughput cases, ms for latency cases).
    pub value: f64,
    /// Smallest repetition.
    pub min: f64,
    /// Largest repetition.
    pub max: f64,
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
            value,
            min,
            max,
            unit: unit.into(),
            ratio_to_ceiling: ceiling.filter(|c| *c > 0.0).map(|c| value / c),
            note: String::new(),
        }
    }

    /// This case's value as a multiple of `base` (0 when there is no base).
    pub(crate) fn times(&self, base: f64) -> f64 {
        if base > 0.0 {
            self.value / base
        } else {
            0.0
        }
    }
}

/// Everything one `postbox bench` run measured.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Report {
    /// The options the run used, as text.
    pub options: String,
    /// The cases, in the order they ran.
    pub cases: Vec<CaseResult>,
}

impl Report {
    /// The report as a markdown table.
    pub fn markdown(&self) -> String {
        let mut out = format!("postbox bench: {}\n\n", self.options);
        out.push_str("| case | queue | median | min–max | unit | × ceiling | note |\n");
        out.push_str("|---|---|---:|---:|---|---:|---|\n");
        for c in &self.cases {
            out.push_str(&format!(
                "| {} | {} | {:.1} | {:.1}–{:.1} | {} | {} | {} |\n",
                c.case,
                c.queue_type,
                c.value,
                c.min,
                c.max,
                c.unit,
                c.ratio_to_ceiling
                    .map(|r| format!("{r:.2}"))
                    .unwrap_or_else(|| "".into()),
                c.note
            ));
        }
        out
    }
}
