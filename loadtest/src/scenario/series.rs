//! Several runs of one scenario summarized as one report: the median of every figure over the
//! runs the hypervisor left alone, and with a second binary, both measured alternately in the
//! same sitting with their ratio.
//!
//! Why: on a shared VM one run says little. The same binary gave 9.4k and 18.5k acks/s a
//! minute apart, at 32% and 3% CPU steal. A median over runs below a steal limit, and two
//! builds alternated run by run, are what make a figure reproducible with one command.
//!
//! This module only decides what to keep and how to summarize; the caller runs the scenario.

use std::fmt::Write as _;

use serde_json::Value;

use super::{Figure, Report};

/// The figure every CPU-metered scenario reports (see `StealMeter`).
const STEAL: &str = "steal_share";

/// Runs are attempted at most this many times the number asked for, so a host that never
/// quiets down ends the series instead of looping.
pub const ATTEMPTS_PER_RUN: usize = 3;

/// Whether a run counts: the steal of each of its phases (when measured; `ingest --peer` has
/// two, ours and nginx's) is within `max_steal`.
pub fn quiet_enough(report: &Report, max_steal: f64) -> bool {
    report.figures.iter().filter(|f| f.name.ends_with(STEAL)).all(|f| f.value <= max_steal)
}

/// The runs of one series: kept ones are summarized, discarded ones are listed in the notes.
#[derive(Default)]
pub struct Series {
    /// Runs within the steal limit.
    pub kept: Vec<Report>,
    /// Runs above it.
    pub discarded: Vec<Report>,
}

impl Series {
    /// Files `report` as kept or discarded.
    pub fn add(&mut self, report: Report, keep: bool) {
        if keep {
            self.kept.push(report);
        } else {
            self.discarded.push(report);
        }
    }

    /// One report: the first kept run's parameters and notes, every figure's median over the
    /// kept runs (in the first run's figure order), histograms pooled over them.
    ///
    /// When no run was quiet enough, summarizes them all instead, and says so: a figure from a
    /// noisy host, labelled, is more use than none.
    pub fn summary(&self, max_steal: f64) -> Option<Report> {
        if self.kept.is_empty() && !self.discarded.is_empty() {
            let all = Series { kept: self.discarded.clone(), discarded: Vec::new() };
            let mut out = all.summary(max_steal)?;
            out.notes.insert(
                0,
                format!(
                    "NOT COMPARABLE: no run had CPU steal within {}; these are medians of noisy runs",
                    percent(Some(max_steal))
                ),
            );
            return Some(out);
        }
        let first = self.kept.first()?;
        let mut out = Report {
            scenario: first.scenario,
            parameters: first.parameters.clone(),
            figures: Vec::new(),
            notes: Vec::new(),
            histograms: Vec::new(),
        };
        out.param("runs", self.kept.len() as u64);
        out.param("max_steal", max_steal);
        for f in &first.figures {
            let values: Vec<f64> = self.kept.iter().filter_map(|r| value(r, &f.name)).collect();
            out.figures.push(Figure { value: median(values), ..f.clone() });
        }
        for (name, h) in &first.histograms {
            let mut pooled = h.clone();
            for r in &self.kept[1..] {
                if let Some((_, other)) = r.histograms.iter().find(|(n, _)| n == name) {
                    let _ = pooled.add(other);
                }
            }
            out.histograms.push((format!("{name} (pooled over {} runs)", self.kept.len()), pooled));
        }
        let steals: Vec<String> = self.kept.iter().map(|r| percent(steal(r))).collect();
        out.notes.push(format!("median of {} runs; CPU steal per run: {}", self.kept.len(), steals.join(", ")));
        if !self.discarded.is_empty() {
            let shown: Vec<String> = self.discarded.iter().map(|r| percent(steal(r))).collect();
            out.notes.push(format!(
                "{} run(s) discarded for steal above {}: {}",
                self.discarded.len(),
                percent(Some(max_steal)),
                shown.join(", ")
            ));
        }
        let mut seen = Vec::new();
        for note in self.kept.iter().flat_map(|r| &r.notes) {
            if !seen.contains(note) && !note.contains("(steal)") {
                seen.push(note.clone());
            }
        }
        out.notes.extend(seen);
        Some(out)
    }
}

/// Adds the second binary's medians and the ratio of each figure (ours / theirs) to `ours`:
/// to the notes as a table (so the human table and the HTML report show it) and as JSON.
pub fn compare(ours: &mut Report, theirs: &Report, binary: &str) -> Value {
    let mut rows = Vec::new();
    let mut table = format!("side by side with {binary} (runs alternated):\n");
    let _ = writeln!(table, "  {:<36} {:>14} {:>14} {:>8}", "figure", "this", "versus", "ratio");
    for f in &ours.figures {
        let Some(other) = value(theirs, &f.name) else { continue };
        let ratio = (other != 0.0).then(|| f.value / other);
        let _ = writeln!(
            table,
            "  {:<36} {:>14.4} {:>14.4} {:>8}",
            f.name,
            f.value,
            other,
            ratio.map_or("-".into(), |r| format!("{r:.3}"))
        );
        rows.push(serde_json::json!({ "name": f.name, "unit": f.unit, "value": other, "ratio": ratio }));
    }
    ours.notes.push(table.trim_end().to_string());
    serde_json::json!({ "concierge": binary, "parameters": theirs.parameters, "figures": rows, "notes": theirs.notes })
}

fn value(report: &Report, name: &str) -> Option<f64> {
    report.figures.iter().find(|f| f.name == name).map(|f| f.value).filter(|v| v.is_finite())
}

fn steal(report: &Report) -> Option<f64> {
    value(report, STEAL)
}

fn percent(share: Option<f64>) -> String {
    share.map_or("not measured".into(), |s| format!("{:.1}%", s * 100.0))
}

/// The median (mean of the middle two for an even count); NaN when there is nothing.
fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    match values.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => values[n / 2],
        n => (values[n / 2 - 1] + values[n / 2]) / 2.0,
    }
}

#[cfg(test)]
mod tests {
    use serde_json::Map;

    use super::*;

    fn run(acks: f64, steal: Option<f64>) -> Report {
        let mut r =
            Report { scenario: "ingest", parameters: Map::new(), figures: vec![], notes: vec![], histograms: vec![] };
        if let Some(s) = steal {
            r.figure(STEAL, s, "ratio");
        }
        r.figure("acks_per_s", acks, "202/s");
        let mut h = super::super::histogram();
        h.record(acks as u64).unwrap();
        r.histograms.push(("ack_latency".into(), h));
        r
    }

    #[test]
    fn runs_above_the_steal_limit_do_not_count() {
        assert!(quiet_enough(&run(1.0, Some(0.05)), 0.05));
        assert!(!quiet_enough(&run(1.0, Some(0.051)), 0.05));
        assert!(quiet_enough(&run(1.0, None), 0.05), "no steal measured (hold): every run counts");
        let mut peer = run(1.0, Some(0.0));
        peer.figure("nginx_steal_share", 0.2, "ratio");
        assert!(!quiet_enough(&peer, 0.05), "a noisy peer phase spoils the ratio");
    }

    #[test]
    fn the_summary_is_the_median_of_kept_runs_and_names_the_discarded() {
        let mut s = Series::default();
        for (acks, steal) in [(20_000.0, 0.01), (9_000.0, 0.30), (25_000.0, 0.0), (22_000.0, 0.02), (21_000.0, 0.03)] {
            let r = run(acks, Some(steal));
            let keep = quiet_enough(&r, 0.05);
            s.add(r, keep);
        }
        let summary = s.summary(0.05).unwrap();
        assert_eq!(value(&summary, "acks_per_s"), Some(21_500.0), "median of 20k, 25k, 22k, 21k");
        assert_eq!(summary.parameters["runs"], 4);
        assert!(
            summary.notes.iter().any(|n| n.contains("1 run(s) discarded") && n.contains("30.0%")),
            "{:?}",
            summary.notes
        );
        assert_eq!(summary.histograms[0].1.len(), 4, "histograms pooled over the kept runs");
        assert!(Series::default().summary(0.05).is_none(), "no runs, nothing to summarize");
        let mut noisy = Series::default();
        noisy.add(run(9_000.0, Some(0.3)), false);
        noisy.add(run(11_000.0, Some(0.2)), false);
        let summary = noisy.summary(0.05).unwrap();
        assert_eq!(value(&summary, "acks_per_s"), Some(10_000.0));
        assert!(summary.notes[0].starts_with("NOT COMPARABLE"), "{:?}", summary.notes);
    }

    #[test]
    fn a_comparison_gives_each_figures_ratio() {
        let mut ours = run(24_000.0, Some(0.0));
        let theirs = run(20_000.0, Some(0.0));
        let json = compare(&mut ours, &theirs, "/tmp/base");
        let acks = json["figures"].as_array().unwrap().iter().find(|f| f["name"] == "acks_per_s").unwrap();
        assert_eq!(acks["ratio"], 1.2);
        assert_eq!(acks["value"], 20_000.0);
        assert!(ours.notes.last().unwrap().contains("side by side with /tmp/base"));
    }
}
