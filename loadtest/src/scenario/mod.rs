//! Benchmark scenarios of the `concierge-loadtest` binary (the core issue's performance
//! section): each starts its own `concierge serve` process on loopback with a generated
//! configuration, drives it through its public surfaces only (webhook ingress, the agent SDK
//! over QUIC, the admin API) and returns a [`Report`] of figures.
//!
//! - [`replay`]: buffer N events for a sleeping agent, then time one SDK agent draining them.
//! - [`e2e`]: open-loop webhooks at a fixed rate to a connected agent; webhook -> agent
//!   latency measured from the *scheduled* send time (no coordinated omission).
//! - [`wake_storm`]: the proxy-added wake overhead, read from the admin API's `last_wake` timings.
//! - [`ingest`]: signed webhooks at fixed concurrency; durable-ack rate and latency.
//! - [`fleet`]: many agents with buffered events; latency of the dashboard's admin API.
//! - [`hold`]: K idle agent QUIC sessions + K idle SMTP sessions; proxy RSS per connection.
//!
//! Per channel, against the platform fakes of this crate (shared plumbing in [`channel`]):
//! - [`smtp`]: SMTP sessions delivering messages; accepted messages/s and latency, with a
//!   private Postfix measured side by side when installed.
//! - [`telegram`], [`slack`], [`discord`]: burst ingest rate, serial latency probe, and the
//!   proxy's memory per idle long poll / Socket Mode socket / gateway.
//! - [`whatsapp`]: signed Graph webhooks, several messages per POST; durable-ack rate and latency.

pub mod channel;
pub mod discord;
pub mod e2e;
pub mod fleet;
pub mod hold;
pub mod html;
pub mod http;
pub mod ingest;
pub mod peer;
pub mod proxy;
pub mod replay;
pub mod series;
pub mod slack;
pub mod smtp;
pub mod telegram;
pub mod wake_storm;
pub mod whatsapp;

use std::fmt::Write as _;
use std::path::PathBuf;
use std::time::Duration;

use hdrhistogram::Histogram;
use serde::Serialize;
use serde_json::{Map, Value};

/// Which store the proxy under test uses.
#[derive(Clone, Debug)]
pub enum StoreChoice {
    /// Redis at this URL (shared; agent ids are unique per run and their keys deleted after).
    Redis(String),
    /// The embedded SQLite store, in the run's temporary directory.
    Embedded,
}

impl StoreChoice {
    /// `redis` or `embedded`.
    pub fn name(&self) -> &'static str {
        match self {
            StoreChoice::Redis(_) => "redis",
            StoreChoice::Embedded => "embedded",
        }
    }
}

/// What every scenario needs to know.
#[derive(Clone, Debug)]
pub struct Context {
    /// The `concierge` binary to start.
    pub concierge: PathBuf,
    /// Store backend of the proxy under test.
    pub store: StoreChoice,
    /// Smoke size: every scenario shrinks so all of them run in well under a minute.
    pub quick: bool,
}

/// One measured number.
#[derive(Clone, Debug, Serialize)]
pub struct Figure {
    /// Stable, machine-readable name (`replay_events_per_s`).
    pub name: String,
    /// The value.
    pub value: f64,
    /// Unit (`events/s`, `ms`, `MB/s`, `count`).
    pub unit: String,
    /// Target from the issue, for the human table only (`< 2`, `>= 200000`).
    #[serde(skip)]
    pub target: Option<Target>,
}

/// A performance target a figure is compared against in the human table.
#[derive(Clone, Copy, Debug)]
pub enum Target {
    /// The value must be at least this.
    AtLeast(f64),
    /// The value must be below this.
    Below(f64),
}

impl Target {
    fn describe(self, value: f64) -> String {
        match self {
            Target::AtLeast(t) if value >= t => format!(">= {} (met)", num(t)),
            Target::AtLeast(t) => format!(">= {} (MISSED: {:.0}% of target)", num(t), value / t * 100.0),
            Target::Below(t) if value < t => format!("< {} (met)", num(t)),
            Target::Below(t) => format!("< {} (MISSED: {:.1}x the target)", num(t), value / t),
        }
    }
}

/// What a scenario measured.
#[derive(Clone, Debug)]
pub struct Report {
    /// Scenario name.
    pub scenario: &'static str,
    /// Parameters the run used (sizes, rates, store).
    pub parameters: Map<String, Value>,
    /// The measurements.
    pub figures: Vec<Figure>,
    /// Remarks worth printing under the table (warnings, anomalies).
    pub notes: Vec<String>,
    /// Latency distributions (µs) worth plotting in the HTML report, with a title each.
    pub histograms: Vec<(String, Histogram<u64>)>,
}

impl Report {
    /// An empty report for `scenario`, recording the store in the parameters.
    pub fn new(scenario: &'static str, ctx: &Context) -> Self {
        let mut parameters = Map::new();
        parameters.insert("store".into(), ctx.store.name().into());
        parameters.insert("quick".into(), ctx.quick.into());
        Self { scenario, parameters, figures: Vec::new(), notes: Vec::new(), histograms: Vec::new() }
    }

    /// Records a parameter.
    pub fn param(&mut self, name: &str, value: impl Into<Value>) {
        self.parameters.insert(name.into(), value.into());
    }

    /// Records a figure.
    pub fn figure(&mut self, name: &str, value: f64, unit: &str) {
        self.figures.push(Figure { name: name.into(), value, unit: unit.into(), target: None });
    }

    /// Records a figure with a target.
    pub fn figure_target(&mut self, name: &str, value: f64, unit: &str, target: Target) {
        self.figures.push(Figure { name: name.into(), value, unit: unit.into(), target: Some(target) });
    }

    /// Records p50/p90/p99/p99.9/max (and the count) of a histogram of microseconds, in ms.
    /// The histogram is kept for the HTML report's plot.
    pub fn latency(&mut self, prefix: &str, h: &Histogram<u64>, p99_target_ms: Option<f64>) {
        self.histograms.push((prefix.to_string(), h.clone()));
        let ms = |us: u64| us as f64 / 1000.0;
        self.figure(&format!("{prefix}_count"), h.len() as f64, "count");
        self.figure(&format!("{prefix}_p50"), ms(h.value_at_quantile(0.50)), "ms");
        self.figure(&format!("{prefix}_p90"), ms(h.value_at_quantile(0.90)), "ms");
        match p99_target_ms {
            Some(t) => {
                self.figure_target(&format!("{prefix}_p99"), ms(h.value_at_quantile(0.99)), "ms", Target::Below(t))
            }
            None => self.figure(&format!("{prefix}_p99"), ms(h.value_at_quantile(0.99)), "ms"),
        }
        self.figure(&format!("{prefix}_p999"), ms(h.value_at_quantile(0.999)), "ms");
        self.figure(&format!("{prefix}_max"), ms(h.max()), "ms");
    }

    /// The machine-readable form: one JSON object.
    pub fn to_json(&self) -> Value {
        let machine = machine();
        serde_json::json!({
            "scenario": self.scenario,
            "parameters": self.parameters,
            "machine": { "cores": machine.cores, "model": machine.model },
            "figures": self.figures,
            "notes": self.notes,
        })
    }

    /// The human form: a table of figures with their targets.
    pub fn to_table(&self) -> String {
        let machine = machine();
        let mut out = String::new();
        let _ = writeln!(out, "scenario: {}   machine: {} cores, {}", self.scenario, machine.cores, machine.model);
        let params: Vec<String> = self.parameters.iter().map(|(k, v)| format!("{k}={v}")).collect();
        let _ = writeln!(out, "parameters: {}", params.join(" "));
        let width = self.figures.iter().map(|f| f.name.len()).max().unwrap_or(6).max(6);
        let _ = writeln!(out, "{:<width$}  {:>14}  {:<10}  target", "figure", "value", "unit");
        let _ = writeln!(out, "{}", "-".repeat(width + 2 + 14 + 2 + 10 + 2 + 30));
        for f in &self.figures {
            let target = f.target.map(|t| t.describe(f.value)).unwrap_or_default();
            let _ = writeln!(out, "{:<width$}  {:>14}  {:<10}  {target}", f.name, num(f.value), f.unit);
        }
        for n in &self.notes {
            let _ = writeln!(out, "note: {n}");
        }
        out
    }
}

/// A number printed with as many decimals as its size deserves.
fn num(v: f64) -> String {
    if v.abs() >= 1000.0 || v.fract() == 0.0 {
        format!("{v:.0}")
    } else if v.abs() >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.3}")
    }
}

/// The machine a report was measured on.
#[derive(Clone, Debug)]
pub struct Machine {
    /// Logical CPUs available to this process.
    pub cores: usize,
    /// `model name` from `/proc/cpuinfo`, else `unknown`.
    pub model: String,
}

/// Cores and CPU model of this machine.
pub fn machine() -> Machine {
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|text| {
            text.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_string())
        })
        .unwrap_or_else(|| "unknown".into());
    Machine { cores, model }
}

/// Share of CPU time the hypervisor gave to other guests (`steal` in `/proc/stat`) during a
/// phase: on a shared VM this is what makes two runs of the same binary disagree, so every
/// report states it rather than leaving the reader to guess.
pub struct StealMeter {
    before: Option<CpuTicks>,
}

/// Above this share of stolen CPU a run's figures say more about the host than about us.
const STEAL_WARNING: f64 = 0.05;

impl StealMeter {
    /// Starts measuring (nothing is recorded where `/proc/stat` cannot be read).
    pub fn start() -> StealMeter {
        StealMeter { before: read_cpu_ticks() }
    }

    /// Adds `<phase>steal_share`, and a note when the host took more than 5%.
    pub fn finish(self, report: &mut Report, phase: &str) {
        if let Some(after) = read_cpu_ticks() {
            self.finish_with(report, phase, after);
        }
    }

    fn finish_with(self, report: &mut Report, phase: &str, after: CpuTicks) {
        let Some(before) = self.before else { return };
        let Some(share) = steal_share(before, after) else { return };
        report.figure(&format!("{phase}steal_share"), share, "ratio");
        if share > STEAL_WARNING {
            let during = if phase.is_empty() {
                String::new()
            } else {
                format!(" during the {} phase", phase.trim_end_matches('_'))
            };
            report.notes.push(format!(
                "the hypervisor took {:.0}% of this machine's CPU{during} (steal): figures of this run are not comparable with a quiet run",
                share * 100.0
            ));
        }
    }
}

/// Cumulative (steal, all) jiffies of the whole machine.
#[derive(Clone, Copy, Debug, PartialEq)]
struct CpuTicks {
    steal: u64,
    total: u64,
}

fn read_cpu_ticks() -> Option<CpuTicks> {
    parse_cpu_ticks(&std::fs::read_to_string("/proc/stat").ok()?)
}

/// Parses the aggregate `cpu` line: user nice system idle iowait irq softirq steal [guest..].
/// Guest time is already counted in user and nice, so only the first eight fields add up.
fn parse_cpu_ticks(stat: &str) -> Option<CpuTicks> {
    let line = stat.lines().find(|l| l.starts_with("cpu "))?;
    let fields: Vec<u64> = line.split_whitespace().skip(1).take(8).map(|f| f.parse().ok()).collect::<Option<_>>()?;
    (fields.len() == 8).then(|| CpuTicks { steal: fields[7], total: fields.iter().sum() })
}

fn steal_share(before: CpuTicks, after: CpuTicks) -> Option<f64> {
    let total = after.total.checked_sub(before.total).filter(|&t| t > 0)?;
    Some(after.steal.saturating_sub(before.steal) as f64 / total as f64)
}

/// A fresh histogram of microseconds (1 µs .. 1 h, 3 significant digits).
pub fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("valid histogram bounds")
}

/// Records a duration in microseconds (at least 1, so sub-µs values are kept).
pub fn record(h: &mut Histogram<u64>, d: Duration) {
    h.saturating_record((d.as_micros() as u64).max(1));
}

/// A random lowercase hex string of `n` characters (unique agent ids, tokens).
pub fn random_hex(n: usize) -> String {
    use rand::Rng as _;
    let mut rng = rand::rng();
    (0..n).map(|_| char::from_digit(rng.random_range(0..16), 16).unwrap_or('0')).collect()
}

/// Offset of the 10-digit sequence number in every body [`body`] makes.
const SEQ_AT: usize = 8;

/// A JSON webhook body of exactly `size` bytes (at least 64) carrying a sequence number at a
/// fixed position (so receivers find it without parsing) and a `text` the echo agent answers.
pub fn body(seq: u64, text: &str, size: usize) -> Vec<u8> {
    let head = format!("{{\"seq\":\"{seq:010}\",\"text\":{},\"pad\":\"", serde_json::Value::from(text));
    let mut out = head.into_bytes();
    let tail = b"\"}";
    let fill = size.max(64).saturating_sub(out.len() + tail.len());
    out.resize(out.len() + fill, b'x');
    out.extend_from_slice(tail);
    out
}

/// The sequence number of a body made by [`body`].
pub fn body_seq(raw: &[u8]) -> Option<u64> {
    std::str::from_utf8(raw.get(SEQ_AT..SEQ_AT + 10)?).ok()?.parse().ok()
}

/// Waits for `fut` at most `limit`, naming `what` in the error.
pub async fn bounded<T>(
    what: &str,
    limit: Duration,
    fut: impl std::future::Future<Output = anyhow::Result<T>>,
) -> anyhow::Result<T> {
    match tokio::time::timeout(limit, fut).await {
        Ok(r) => r,
        Err(_) => anyhow::bail!("{what} did not finish within {limit:?}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn steal_is_the_share_of_all_cpu_time_between_two_readings() {
        let before = parse_cpu_ticks("cpu  100 0 50 800 0 0 0 50 7 0\ncpu0 1 2 3 4 5 6 7 8 9 10\n").unwrap();
        assert_eq!(before, CpuTicks { steal: 50, total: 1000 });
        let after = parse_cpu_ticks("cpu  200 0 100 1500 0 0 0 200 0 0\n").unwrap();
        assert_eq!(steal_share(before, after), Some(0.15));
        assert_eq!(steal_share(after, after), None, "no time passed: no share");
        assert_eq!(parse_cpu_ticks("cpu  1 2 3\n"), None, "a kernel without a steal field");
    }

    #[test]
    fn a_run_with_much_steal_says_so() {
        let ctx_free = |share: f64| {
            let mut r =
                Report { scenario: "t", parameters: Map::new(), figures: vec![], notes: vec![], histograms: vec![] };
            let before = CpuTicks { steal: 0, total: 0 };
            StealMeter { before: Some(before) }.finish_with(
                &mut r,
                "nginx_",
                CpuTicks { steal: (share * 1000.0) as u64, total: 1000 },
            );
            r
        };
        let quiet = ctx_free(0.01);
        assert_eq!(quiet.figures[0].name, "nginx_steal_share");
        assert!(quiet.notes.is_empty());
        let noisy = ctx_free(0.2);
        assert!(noisy.notes[0].contains("20%") && noisy.notes[0].contains("nginx phase"), "{:?}", noisy.notes);
    }

    #[test]
    fn body_has_exact_size_and_readable_seq() {
        let b = body(42, "hello", 1024);
        assert_eq!(b.len(), 1024);
        assert_eq!(body_seq(&b), Some(42));
        let v: Value = serde_json::from_slice(&b).unwrap();
        assert_eq!(v["text"], "hello");
        assert_eq!(v["seq"], "0000000042");
    }

    #[test]
    fn targets_describe_misses() {
        assert!(Target::Below(2.0).describe(1.0).contains("met"));
        assert!(Target::Below(2.0).describe(4.0).contains("2.0x"));
        assert!(Target::AtLeast(200.0).describe(100.0).contains("50%"));
    }
}
