//! Runs every benchmark scenario of `concierge-loadtest` in `--quick` mode against a real
//! `concierge` binary and checks that each printed one JSON report with figures.
//!
//! The `concierge` binary belongs to another package, so Cargo does not build it for this
//! test: it is looked up next to this package's binary (`target/<profile>/concierge`). Build it
//! first with `cargo build -p concierge-proxy` (same profile as the test); a missing binary
//! fails the test with that instruction rather than skipping it.
//!
//! Scenarios run one at a time (a lock), since they are load tests on a possibly small machine.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::time::Instant;

use concierge_loadtest::scenario::proxy::PrivateRedis;
use serde_json::Value;

static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

fn loadtest() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_concierge-loadtest"))
}

fn concierge() -> PathBuf {
    let exe = loadtest();
    let dir = exe.parent().expect("the loadtest binary has a directory");
    let path = dir.join("concierge");
    assert!(
        path.is_file(),
        "the concierge binary is missing at {}: build it first with `cargo build -p concierge-proxy` \
         (same profile as this test), then rerun",
        path.display()
    );
    path
}

/// A `redis-server` of the test's own on a free port, without persistence (removed on drop),
/// so the smoke test does not depend on, or write to, a shared Redis.
fn redis() -> PrivateRedis {
    PrivateRedis::start(None).expect("redis-server must be installed for the redis smoke tests")
}

/// Runs one scenario with `--quick --json` and returns its report (the last stdout line).
fn run(scenario: &str, store: &[&str]) -> Value {
    run_with(scenario, store, &[])
}

/// [`run`] with extra arguments after the scenario name.
fn run_with(scenario: &str, store: &[&str], extra: &[&str]) -> Value {
    let _guard = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let concierge = concierge();
    let started = Instant::now();
    let output = Command::new(loadtest())
        .arg(scenario)
        .args(extra)
        .args(["--quick", "--json", "--concierge"])
        .arg(&concierge)
        .args(store)
        .stdin(Stdio::null())
        .output()
        .expect("run concierge-loadtest");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{scenario} failed ({}):\nstdout:\n{stdout}\nstderr:\n{stderr}", output.status);
    let last = stdout.lines().last().unwrap_or("");
    let report: Value = serde_json::from_str(last)
        .unwrap_or_else(|e| panic!("{scenario}: the last line is not JSON ({e}): {last:?}\nstdout:\n{stdout}"));
    assert_eq!(report["scenario"], scenario, "{report}");
    assert!(report["parameters"].is_object(), "{report}");
    assert!(report["machine"]["cores"].as_u64().unwrap_or(0) >= 1, "{report}");
    assert!(report["machine"]["model"].is_string(), "{report}");
    let figures = report["figures"].as_array().expect("figures is an array");
    assert!(!figures.is_empty(), "{scenario}: no figures: {report}");
    for f in figures {
        assert!(f["name"].is_string() && f["unit"].is_string(), "{f}");
        let v = f["value"].as_f64().unwrap_or(f64::NAN);
        assert!(v.is_finite() && v >= 0.0, "{scenario}: figure {f} is not a finite non-negative number");
    }
    eprintln!("{scenario} {store:?}: ok in {:?}", started.elapsed());
    report
}

fn figure(report: &Value, name: &str) -> f64 {
    report["figures"]
        .as_array()
        .and_then(|f| f.iter().find(|f| f["name"] == name))
        .and_then(|f| f["value"].as_f64())
        .unwrap_or_else(|| panic!("figure {name} missing: {report}"))
}

#[test]
fn replay_embedded() {
    let r = run("replay", &["--store", "embedded"]);
    assert!(figure(&r, "replay_events_per_s") > 0.0);
}

#[test]
fn replay_redis() {
    let redis = redis();
    let r = run("replay", &["--store", "redis", "--redis-url", &redis.url()]);
    assert!(figure(&r, "replay_events_per_s") > 0.0);
}

#[test]
fn e2e_embedded() {
    let r = run("e2e", &["--store", "embedded"]);
    assert!(figure(&r, "webhook_to_agent_count") > 0.0);
    assert_eq!(figure(&r, "acked_but_not_received"), 0.0, "{r}");
}

#[test]
fn wake_storm_embedded() {
    let r = run("wake-storm", &["--store", "embedded"]);
    assert_eq!(figure(&r, "wakes"), 5.0, "{r}");
    // The storm phase, at --quick size: every agent got its event, and the figures exist.
    assert_eq!(figure(&r, "storm_agents"), 10.0, "{r}");
    assert_eq!(figure(&r, "storm_wakes_ok"), 10.0, "{r}");
    assert!(figure(&r, "storm_all_delivered_ms") > 0.0, "{r}");
    for name in ["storm_driver_called", "storm_hello_to_first_delivery", "storm_overhead"] {
        let (p50, p99, max) = (
            figure(&r, &format!("{name}_p50")),
            figure(&r, &format!("{name}_p99")),
            figure(&r, &format!("{name}_max")),
        );
        assert!(p50 > 0.0 && p50 <= p99 && p99 <= max, "{name}: p50 {p50} p99 {p99} max {max}: {r}");
    }
    assert!(figure(&r, "storm_wake_p99") > 0.0, "{r}");
}

/// The names are the scenarios' names; the old ones stay accepted as aliases.
#[test]
fn old_scenario_names_are_aliases() {
    for (old, new) in [("latency", "e2e"), ("wake", "wake-storm")] {
        let out = Command::new(loadtest()).args([old, "--help"]).output().expect("run concierge-loadtest");
        assert!(out.status.success(), "{old} --help failed: {}", String::from_utf8_lossy(&out.stderr));
        let help = String::from_utf8_lossy(&out.stdout);
        assert!(help.contains(new), "`{old} --help` does not name {new}: {help}");
    }
}

/// `smtp`: messages accepted through real SMTP sessions; the Postfix comparison appears when
/// Postfix is installed and the test runs as root, and is otherwise skipped with a note.
#[test]
fn smtp_redis() {
    let r = run("smtp", &["--store", "redis"]);
    assert!(figure(&r, "messages_per_s") > 0.0, "{r}");
    assert!(figure(&r, "message_latency_count") >= 200.0, "{r}");
    assert_eq!(figure(&r, "errors"), 0.0, "{r}");
    if postfix_usable() {
        assert!(figure(&r, "postfix_messages_per_s") > 0.0, "{r}");
        assert!(figure(&r, "vs_postfix") > 0.0, "{r}");
    } else {
        let notes = r["notes"].to_string();
        assert!(notes.contains("PEER SKIPPED") && notes.contains("apt-get install postfix"), "{r}");
        assert!(!r["figures"].to_string().contains("vs_postfix"), "{r}");
        eprintln!("postfix not usable here: only our side of smtp was checked");
    }
}

#[test]
fn smtp_embedded_without_peer() {
    let r = run_with("smtp", &["--store", "embedded"], &["--no-peer", "--messages", "100"]);
    assert!(figure(&r, "messages_per_s") > 0.0, "{r}");
    assert!(!r.to_string().contains("postfix_messages_per_s"), "{r}");
}

#[test]
fn telegram_embedded() {
    let r = run("telegram", &["--store", "embedded"]);
    assert!(figure(&r, "updates_per_s") > 0.0, "{r}");
    assert_eq!(figure(&r, "update_to_confirmed_count"), 20.0, "{r}");
    assert_eq!(figure(&r, "pollers_held"), 10.0, "{r}");
    assert!(figure(&r, "proxy_rss_with_pollers") > 0.0, "{r}");
    figure(&r, "rss_per_idle_poller");
    assert!(figure(&r, "fan_in_updates_per_s") > 0.0, "{r}");
}

#[test]
fn slack_redis() {
    let redis = redis();
    let r = run("slack", &["--store", "redis", "--redis-url", &redis.url()]);
    assert!(figure(&r, "events_per_s") > 0.0, "{r}");
    assert_eq!(figure(&r, "sockets_held"), 10.0, "{r}");
    figure(&r, "rss_per_idle_socket");
}

#[test]
fn discord_embedded() {
    let r = run("discord", &["--store", "embedded"]);
    assert!(figure(&r, "events_per_s") > 0.0, "{r}");
    assert_eq!(figure(&r, "dispatch_to_stored_count"), 20.0, "{r}");
    assert_eq!(figure(&r, "gateways_held"), 5.0, "{r}");
    figure(&r, "rss_per_idle_gateway");
}

#[test]
fn whatsapp_embedded() {
    let r = run("whatsapp", &["--store", "embedded"]);
    let posts = figure(&r, "posts_per_s");
    assert!(posts > 0.0, "{r}");
    let messages = figure(&r, "messages_per_s");
    assert!((messages - posts * 10.0).abs() <= 1e-6 * messages, "10 messages per POST: {r}");
    assert!(figure(&r, "ack_latency_count") > 0.0, "{r}");
    assert_eq!(figure(&r, "errors"), 0.0, "{r}");
}

/// Whether the smtp scenario can start its Postfix peer here (installed, and root).
fn postfix_usable() -> bool {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    root && std::path::Path::new("/usr/sbin/postfix").is_file()
        && std::path::Path::new("/etc/postfix/master.cf").is_file()
}

#[test]
fn ingest_embedded() {
    let r = run("ingest", &["--store", "embedded"]);
    assert!(figure(&r, "acks_per_s") > 0.0);
}

/// `--runs` and `--versus`: two binaries alternated, medians and ratios in one report. The
/// same binary on both sides, so every ratio exists and is positive.
#[test]
fn ingest_series_versus_embedded() {
    let concierge = concierge();
    let versus = concierge.to_str().unwrap();
    let r = run_with("ingest", &["--store", "embedded"], &["--runs", "2", "--versus", versus, "--max-steal", "1"]);
    assert_eq!(r["parameters"]["runs"], 2, "{r}");
    assert!(r["notes"].as_array().unwrap().iter().any(|n| n.as_str().unwrap().contains("median of 2 runs")), "{r}");
    let theirs = r["versus"]["figures"].as_array().expect("the versus binary's figures");
    let acks = theirs.iter().find(|f| f["name"] == "acks_per_s").expect("acks_per_s side by side");
    assert!(acks["value"].as_f64().unwrap() > 0.0 && acks["ratio"].as_f64().unwrap() > 0.0, "{acks}");
}

#[test]
fn ingest_redis() {
    let redis = redis();
    let r = run("ingest", &["--store", "redis", "--redis-url", &redis.url()]);
    assert!(figure(&r, "acks_per_s") > 0.0);
}

#[test]
fn fleet_redis() {
    let redis = redis();
    let r = run("fleet", &["--store", "redis", "--redis-url", &redis.url()]);
    assert_eq!(figure(&r, "events_filled"), 20_000.0, "{r}");
    assert!(figure(&r, "api_fleet_count") > 0.0);
}

#[test]
fn hold_redis() {
    let redis = redis();
    let r = run("hold", &["--store", "redis", "--redis-url", &redis.url()]);
    assert_eq!(figure(&r, "agents_held"), 200.0, "{r}");
    assert_eq!(figure(&r, "smtp_sessions_held"), 200.0, "{r}");
    assert!(figure(&r, "proxy_rss_total") > 0.0);
    assert_eq!(figure(&r, "slack_sockets_held"), 200.0, "{r}");
    assert_eq!(figure(&r, "slack_agents_held"), 200.0, "{r}");
    assert!(figure(&r, "proxy_rss_total_slack") > figure(&r, "proxy_rss_with_slack_sockets"), "{r}");
}

/// Whether nginx is installed where the harness looks for it.
fn nginx_installed() -> bool {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin".into(), "/usr/local/sbin".into()])
        .any(|d| d.join("nginx").is_file())
}

/// `ingest --peer`: with nginx the comparison figures appear; without it the run still
/// succeeds and says the comparison was skipped.
#[test]
fn ingest_peer_redis() {
    let redis = redis();
    let r = run_with("ingest", &["--store", "redis", "--redis-url", &redis.url()], &["--peer"]);
    assert!(figure(&r, "acks_per_s") > 0.0);
    if nginx_installed() {
        assert!(figure(&r, "nginx_static200_per_s") > 0.0, "{r}");
        assert!(figure(&r, "ingest_vs_nginx") > 0.0, "{r}");
    } else {
        eprintln!("nginx not installed: only checking that ingest --peer still succeeds");
    }
}

/// `--report DIR` writes a self-contained HTML page and the JSON.
#[test]
fn report_writes_html_and_json() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_str().unwrap();
    run_with("ingest", &["--store", "embedded"], &["--report", d]);
    let files: Vec<PathBuf> = std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().path()).collect();
    let html = files.iter().find(|p| p.extension().is_some_and(|e| e == "html")).expect("an HTML report");
    let json = files.iter().find(|p| p.extension().is_some_and(|e| e == "json")).expect("a JSON report");
    let page = std::fs::read_to_string(html).unwrap();
    assert!(page.starts_with("<!DOCTYPE html>") && page.contains("<svg"), "{page}");
    assert!(!page.contains("<script src") && !page.contains("<link "), "no external assets");
    let v: Value = serde_json::from_str(&std::fs::read_to_string(json).unwrap()).unwrap();
    assert_eq!(v["scenario"], "ingest");
}
