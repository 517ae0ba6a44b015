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
use std::time::{Duration, Instant};

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

/// A `redis-server` of the test's own on a free port (removed on drop), so the smoke test
/// does not depend on, or write to, a shared Redis.
struct Redis {
    child: std::process::Child,
    port: u16,
    _dir: tempfile::TempDir,
}

impl Redis {
    fn start() -> Redis {
        let dir = tempfile::tempdir().unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server must be installed for the redis smoke test");
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "redis-server did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
        Redis { child, port, _dir: dir }
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
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
    let redis = Redis::start();
    let r = run("replay", &["--store", "redis", "--redis-url", &redis.url()]);
    assert!(figure(&r, "replay_events_per_s") > 0.0);
}

#[test]
fn latency_embedded() {
    let r = run("latency", &["--store", "embedded"]);
    assert!(figure(&r, "webhook_to_agent_count") > 0.0);
    assert_eq!(figure(&r, "acked_but_not_received"), 0.0, "{r}");
}

#[test]
fn wake_embedded() {
    let r = run("wake", &["--store", "embedded"]);
    assert_eq!(figure(&r, "wakes"), 5.0, "{r}");
}

#[test]
fn ingest_embedded() {
    let r = run("ingest", &["--store", "embedded"]);
    assert!(figure(&r, "acks_per_s") > 0.0);
}

#[test]
fn ingest_redis() {
    let redis = Redis::start();
    let r = run("ingest", &["--store", "redis", "--redis-url", &redis.url()]);
    assert!(figure(&r, "acks_per_s") > 0.0);
}

#[test]
fn fleet_redis() {
    let redis = Redis::start();
    let r = run("fleet", &["--store", "redis", "--redis-url", &redis.url()]);
    assert_eq!(figure(&r, "events_filled"), 20_000.0, "{r}");
    assert!(figure(&r, "api_fleet_count") > 0.0);
}

#[test]
fn hold_redis() {
    let redis = Redis::start();
    let r = run("hold", &["--store", "redis", "--redis-url", &redis.url()]);
    assert_eq!(figure(&r, "agents_held"), 200.0, "{r}");
    assert_eq!(figure(&r, "smtp_sessions_held"), 200.0, "{r}");
    assert!(figure(&r, "proxy_rss_total") > 0.0);
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
    let redis = Redis::start();
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
