//! Slack Socket Mode ingest benchmarks against the fake, through a real `concierge serve`
//! process holding real WebSockets:
//! - One app, one socket: events/s from "queued at the fake" to "acked by the proxy" (each
//!   ack is sent only after the durable write, so acked = stored).
//! - 1,000 apps, one idle socket each: resident memory per idle socket (VmRSS of the
//!   concierge process with 1,000 sockets minus with none).
//!
//! ```text
//! cargo build --release -p concierge-proxy
//! cargo run --release -p concierge-loadtest --example slack_bench -- \
//!     [--store embedded|redis] [--events 20000] [--apps 1000] [--concierge PATH]
//! ```
//! The fake's redelivery timer is raised to 60 s here so that a queue of 20,000 envelopes
//! sent at once measures ingest, not redelivery (real Slack sends events as they happen).

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use concierge_loadtest::slack::{FakeSlack, Options};

struct Args {
    store: String,
    events: usize,
    apps: usize,
    concierge: PathBuf,
}

fn args() -> anyhow::Result<Args> {
    let mut a = Args { store: "embedded".into(), events: 20_000, apps: 1000, concierge: default_concierge() };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let value = it.next().with_context(|| format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--store" => a.store = value,
            "--events" => a.events = value.parse()?,
            "--apps" => a.apps = value.parse()?,
            "--concierge" => a.concierge = value.into(),
            other => bail!("unknown flag {other}"),
        }
    }
    Ok(a)
}

/// `target/<profile>/concierge`, next to this example's `examples/` directory.
fn default_concierge() -> PathBuf {
    let exe = std::env::current_exe().unwrap_or_default();
    exe.parent().and_then(Path::parent).map(|p| p.join("concierge")).unwrap_or_else(|| "concierge".into())
}

struct Redis {
    child: Child,
    port: u16,
    _dir: tempfile::TempDir,
}

impl Redis {
    fn start() -> anyhow::Result<Redis> {
        let dir = tempfile::tempdir()?;
        let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "yes"])
            .args(["--appendfsync", "always", "--dir"])
            .arg(dir.path())
            .stdout(Stdio::null())
            .spawn()
            .context("starting redis-server")?;
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            if Instant::now() > deadline {
                bail!("redis-server did not start");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(Redis { child, port, _dir: dir })
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

struct Proxy {
    child: Child,
    _dir: tempfile::TempDir,
}

impl Proxy {
    fn start(bin: &Path, store: &str, redis: Option<&Redis>, channels: &str) -> anyhow::Result<Proxy> {
        let dir = tempfile::tempdir()?;
        let store = match (store, redis) {
            ("redis", Some(r)) => format!("backend = \"redis\"\nurl = \"redis://127.0.0.1:{}\"", r.port),
            _ => format!("backend = \"embedded\"\npath = \"{}\"", dir.path().join("store.db").display()),
        };
        let config = format!(
            "[server]\nquic_listen = \"127.0.0.1:0\"\nhttp_listen = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\ndata_dir = \"{}\"\nmax_body = \"4MiB\"\n\n[store]\n{store}\n\n[agents.a]\ntoken = \"bench-token-0123456789\"\nmax_pending = 100000000\n[agents.a.wake]\ndriver = \"none\"\npolicy = \"never\"\n\n{channels}",
            dir.path().join("data").display()
        );
        let path = dir.path().join("concierge.toml");
        std::fs::write(&path, config)?;
        let mut child = Command::new(bin)
            .args(["serve", "--config"])
            .arg(&path)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        let stdout = child.stdout.take().context("stdout")?;
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line)?;
        // The ready line (JSON with the listeners' addresses) says the proxy is up.
        let _: serde_json::Value = serde_json::from_str(&line).with_context(|| format!("ready line: {line}"))?;
        Ok(Proxy { child, _dir: dir })
    }

    /// Resident set size in KiB (`VmRSS` of `/proc/<pid>/status`).
    fn rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap_or_default();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn wait_until(within: Duration, mut f: impl FnMut() -> bool) -> anyhow::Result<Duration> {
    let started = Instant::now();
    while !f() {
        if started.elapsed() > within {
            bail!("not done within {within:?}");
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    Ok(started.elapsed())
}

fn app_section(i: usize, api_base: &str) -> String {
    format!(
        "[slack.s{i}]\nagent = \"a\"\napp_token = \"xapp-1-A{i}-bench\"\nbot_token = \"xoxb-bench-{i}\"\napi_base = \"{api_base}\"\n"
    )
}

fn add_app(fake: &FakeSlack, i: usize) {
    fake.add_app(&format!("xapp-1-A{i}-bench"), &format!("xoxb-bench-{i}"), &format!("A{i}"));
}

fn bench_options() -> Options {
    Options { redeliver_after: Duration::from_secs(60), max_attempts: 3, ..Options::default() }
}

async fn one_socket(a: &Args, redis: Option<&Redis>) -> anyhow::Result<f64> {
    let fake = FakeSlack::start(bench_options()).await?;
    add_app(&fake, 0);
    let proxy = Proxy::start(&a.concierge, &a.store, redis, &app_section(0, &fake.api_base))?;
    wait_until(Duration::from_secs(10), || fake.open_sockets("A0") == 1).await?;
    let started = Instant::now();
    for i in 0..a.events {
        fake.push_message("A0", "C0BENCH", None, &format!("event {i}"));
    }
    wait_until(Duration::from_secs(600), || fake.unacked() == 0).await?;
    let took = started.elapsed();
    if fake.acked().len() != a.events {
        bail!("{} of {} events acked", fake.acked().len(), a.events);
    }
    let rate = a.events as f64 / took.as_secs_f64();
    println!("slack socket mode, 1 socket, {} store: {} events in {took:.2?} = {rate:.0} events/s", a.store, a.events);
    drop(proxy);
    Ok(rate)
}

async fn many_sockets(a: &Args, redis: Option<&Redis>) -> anyhow::Result<(u64, u64)> {
    let fake = FakeSlack::start(bench_options()).await?;
    let baseline = Proxy::start(&a.concierge, &a.store, redis, "")?;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let rss_base = baseline.rss_kib();
    drop(baseline);

    let mut channels = String::new();
    for i in 0..a.apps {
        add_app(&fake, i);
        channels.push_str(&app_section(i, &fake.api_base));
    }
    let proxy = Proxy::start(&a.concierge, &a.store, redis, &channels)?;
    let ids: Vec<String> = (0..a.apps).map(|i| format!("A{i}")).collect();
    wait_until(Duration::from_secs(120), || ids.iter().all(|id| fake.open_sockets(id) == 1)).await?;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let rss = proxy.rss_kib();
    let per = (rss.saturating_sub(rss_base) * 1024) / a.apps as u64;
    println!(
        "{} idle Slack sockets: concierge VmRSS {rss} KiB vs {rss_base} KiB with none = {per} bytes per idle socket",
        a.apps
    );
    Ok((rss_base, rss))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let a = args()?;
    let redis = if a.store == "redis" { Some(Redis::start()?) } else { None };
    let rate = one_socket(&a, redis.as_ref()).await?;
    let (base, with) = many_sockets(&a, redis.as_ref()).await?;
    println!(
        "{}",
        serde_json::json!({
            "store": a.store,
            "slack_events_per_s_one_socket": rate.round(),
            "sockets": a.apps,
            "rss_kib_no_sockets": base,
            "rss_kib_with_sockets": with,
            "bytes_per_idle_socket": (with.saturating_sub(base) * 1024) / a.apps as u64,
        })
    );
    Ok(())
}
