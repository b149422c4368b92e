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
