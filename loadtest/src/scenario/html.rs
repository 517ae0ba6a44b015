//! `--report DIR`: a self-contained HTML page (inline CSS and SVG, no external assets) with
//! the parameters, the figures, a histogram of every latency distribution the scenario
//! recorded and a bar chart of its throughput figures, written next to the report's JSON.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::Context as _;
use hdrhistogram::Histogram;

use super::{Report, machine, num};

/// Buckets of a latency histogram plot (log-spaced between the smallest and largest value).
const BUCKETS: usize = 48;

/// Writes `<scenario>-<unix seconds>.html` and `.json` into `dir` (created if needed);
/// returns the HTML path.
pub fn write(dir: &Path, report: &Report) -> anyhow::Result<PathBuf> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating the report directory {}", dir.display()))?;
    let stamp = concierge_protocol::now_ms() / 1000;
    let base = dir.join(format!("{}-{stamp}", report.scenario));
    let json = serde_json::to_string_pretty(&report.to_json())?;
    std::fs::write(base.with_extension("json"), &json).context("writing the JSON report")?;
    let html_path = base.with_extension("html");
    std::fs::write(&html_path, render(report, &json)).context("writing the HTML report")?;
    Ok(html_path)
}

/// Escapes text for HTML element content and attribute values.
fn esc(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

/// The whole page.
pub fn render(report: &Report, json: &str) -> String {
    let m = machine();
    let mut o = String::new();
    let title = format!("concierge-loadtest: {}", report.scenario);
    let _ = write!(
        o,
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{t}</title>\n<style>\
         body{{font:14px system-ui,sans-serif;margin:2em;max-width:1000px;color:#222}}\
         table{{border-collapse:collapse;margin:1em 0}}td,th{{border:1px solid #ccc;padding:3px 8px;text-align:left}}\
         td.n{{text-align:right;font-variant-numeric:tabular-nums}}.miss{{color:#b00;font-weight:bold}}.met{{color:#070}}\
         svg{{background:#fafafa;border:1px solid #ddd;margin:.5em 0}}pre{{background:#f4f4f4;padding:1em;overflow:auto}}\
         </style></head><body>\n<h1>{t}</h1>\n<p>Machine: {} cores, {}</p>\n",
        m.cores,
        esc(&m.model),
        t = esc(&title),
    );
    o += "<h2>Parameters</h2>\n<table>";
    for (k, v) in &report.parameters {
        let _ = write!(o, "<tr><th>{}</th><td>{}</td></tr>", esc(k), esc(&v.to_string()));
    }
    o += "</table>\n<h2>Figures</h2>\n<table><tr><th>figure</th><th>value</th><th>unit</th><th>target</th></tr>";
    for f in &report.figures {
        let target = f.target.map(|t| t.describe(f.value)).unwrap_or_default();
        let class = if target.contains("MISSED") { "miss" } else { "met" };
        let _ = write!(
            o,
            "<tr><td>{}</td><td class=\"n\">{}</td><td>{}</td><td class=\"{class}\">{}</td></tr>",
            esc(&f.name),
            num(f.value),
            esc(&f.unit),
            esc(&target)
        );
    }
    o += "</table>\n";
    for n in &report.notes {
        // A multi-line note is a table (`--versus`): keep its columns.
        match n.split_once('\n') {
            Some((title, table)) => {
                let _ = writeln!(o, "<p><b>note:</b> {}</p><pre>{}</pre>", esc(title), esc(table));
            }
            None => {
                let _ = writeln!(o, "<p><b>note:</b> {}</p>", esc(n));
            }
        }
    }
    let rates: Vec<(&str, f64, &str)> = report
        .figures
        .iter()
        // Rates of things (events, requests, connections); byte rates would not share a scale.
        .filter(|f| f.unit.ends_with("/s") && !f.unit.contains("B/s") && f.value.is_finite())
        .map(|f| (f.name.as_str(), f.value, f.unit.as_str()))
        .collect();
    if !rates.is_empty() {
        o += "<h2>Throughput</h2>\n";
        o += &bar_chart(&rates);
    }
    if !report.histograms.is_empty() {
        o += "<h2>Latency distributions</h2>\n";
        for (name, h) in &report.histograms {
            let _ = writeln!(o, "<h3>{}</h3>", esc(name));
            o += &histogram_svg(h);
        }
    }
    let _ = write!(o, "<h2>JSON</h2>\n<pre>{}</pre>\n</body></html>\n", esc(json));
    o
}

/// Horizontal bars, one per figure, scaled to the largest.
pub fn bar_chart(rows: &[(&str, f64, &str)]) -> String {
    let (w, row_h, label_w) = (900.0, 26.0, 260.0);
    let h = row_h * rows.len() as f64 + 10.0;
    let max = rows.iter().map(|r| r.1).fold(0.0f64, f64::max).max(f64::MIN_POSITIVE);
    let mut o = format!("<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" role=\"img\">");
    for (i, (name, v, unit)) in rows.iter().enumerate() {
        let y = 5.0 + i as f64 * row_h;
        let bw = (w - label_w - 160.0) * (v / max);
        let _ = write!(
            o,
            "<text x=\"4\" y=\"{ty}\" font-size=\"12\">{n}</text>\
             <rect x=\"{label_w}\" y=\"{y}\" width=\"{bw:.1}\" height=\"{bh}\" fill=\"#4878a8\"/>\
             <text x=\"{vx:.1}\" y=\"{ty}\" font-size=\"12\">{val} {u}</text>",
            ty = y + 16.0,
            n = esc(name),
            bh = row_h - 6.0,
            vx = label_w + bw + 6.0,
            val = num(*v),
            u = esc(unit),
        );
    }
    o += "</svg>\n";
    o
}

/// Counts of a histogram of microseconds in log-spaced buckets, as (upper bound µs, count).
pub fn buckets(h: &Histogram<u64>) -> Vec<(f64, u64)> {
    if h.is_empty() {
        return Vec::new();
    }
    let lo = (h.min().max(1) as f64).ln();
    let hi = (h.max().max(h.min() + 1) as f64).ln();
    let step = (hi - lo) / BUCKETS as f64;
    let mut out: Vec<(f64, u64)> = (1..=BUCKETS).map(|i| ((lo + step * i as f64).exp(), 0)).collect();
    for v in h.iter_recorded() {
        let x = (v.value_iterated_to().max(1) as f64).ln();
        let i = (((x - lo) / step).floor().max(0.0) as usize).min(BUCKETS - 1);
        out[i].1 += v.count_at_value();
    }
    out
}

/// A bar histogram (log-spaced latency buckets on x, count on y) with p50/p99 markers.
pub fn histogram_svg(h: &Histogram<u64>) -> String {
    let b = buckets(h);
    if b.is_empty() {
        return "<p>(no samples)</p>\n".into();
    }
    let (w, hgt, left, bottom) = (900.0, 260.0, 50.0, 40.0);
    let plot_w = w - left - 30.0;
    let plot_h = hgt - bottom - 10.0;
    let max = b.iter().map(|x| x.1).max().unwrap_or(1).max(1) as f64;
    let bw = plot_w / b.len() as f64;
    let mut o = format!("<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{hgt}\" role=\"img\">");
    for (i, (_, count)) in b.iter().enumerate() {
        let bh = plot_h * (*count as f64 / max);
        let _ = write!(
            o,
            "<rect x=\"{:.1}\" y=\"{:.1}\" width=\"{:.1}\" height=\"{bh:.1}\" fill=\"#4878a8\"><title>{count}</title></rect>",
            left + i as f64 * bw,
            10.0 + plot_h - bh,
            (bw - 1.0).max(1.0),
        );
    }
    // x labels: bucket bounds every 8 buckets, in ms.
    let lower = h.min().max(1) as f64;
    for i in (0..=b.len()).step_by(8) {
        let bound = if i == 0 { lower } else { b[i - 1].0 };
        let _ = write!(
            o,
            "<text x=\"{:.1}\" y=\"{:.1}\" font-size=\"11\" text-anchor=\"middle\">{}</text>",
            left + i as f64 * bw,
            hgt - bottom + 16.0,
            num(bound / 1000.0)
        );
    }
    let _ = write!(
        o,
        "<text x=\"{:.1}\" y=\"{:.1}\" font-size=\"12\" text-anchor=\"middle\">latency, ms (log scale)</text>\
         <text x=\"4\" y=\"20\" font-size=\"11\">{}</text><text x=\"4\" y=\"{:.1}\" font-size=\"11\">0</text>",
        left + plot_w / 2.0,
        hgt - 6.0,
        max as u64,
        10.0 + plot_h,
    );
    // Percentile markers.
    let (lo, hi) = ((lower).ln(), b[b.len() - 1].0.ln());
    for (q, label, color) in [(0.5, "p50", "#070"), (0.99, "p99", "#b60"), (0.999, "p99.9", "#b00")] {
        let v = (h.value_at_quantile(q).max(1) as f64).ln();
        let x = left + plot_w * ((v - lo) / (hi - lo).max(f64::MIN_POSITIVE)).clamp(0.0, 1.0);
        let _ = write!(
            o,
            "<line x1=\"{x:.1}\" x2=\"{x:.1}\" y1=\"10\" y2=\"{:.1}\" stroke=\"{color}\" stroke-dasharray=\"4 3\"/>\
             <text x=\"{:.1}\" y=\"22\" font-size=\"11\" fill=\"{color}\">{label} {} ms</text>",
            10.0 + plot_h,
            x + 3.0,
            num(h.value_at_quantile(q) as f64 / 1000.0)
        );
    }
    o += "</svg>\n";
    o
}

#[cfg(test)]
mod tests {
    use super::super::{Context, StoreChoice, histogram, record};
    use super::*;

    #[test]
    fn renders_a_self_contained_page() {
        let ctx = Context { concierge: "x".into(), store: StoreChoice::Embedded, quick: true };
        let mut r = Report::new("ingest", &ctx);
        r.figure("acks_per_s", 1234.0, "202/s");
        let mut h = histogram();
        for us in [100u64, 200, 300, 5000, 90_000] {
            record(&mut h, std::time::Duration::from_micros(us));
        }
        r.latency("ack_latency", &h, Some(2.0));
        let page = render(&r, "{}");
        assert!(page.starts_with("<!DOCTYPE html>"));
        assert_eq!(page.matches("<svg").count(), 2, "one bar chart, one histogram");
        assert!(!page.contains("http://") || page.matches("http://").count() == page.matches("xmlns=").count());
        assert_eq!(buckets(&h).iter().map(|b| b.1).sum::<u64>(), 5);
    }

    #[test]
    fn a_side_by_side_note_keeps_its_columns() {
        let ctx = Context { concierge: "x".into(), store: StoreChoice::Embedded, quick: true };
        let mut r = Report::new("ingest", &ctx);
        r.notes.push("side by side with <b>:\n  figure   this\n  acks     1.0".into());
        let page = render(&r, "{}");
        assert!(
            page.contains("<p><b>note:</b> side by side with &lt;b&gt;:</p><pre>  figure   this\n  acks     1.0</pre>")
        );
    }
}
