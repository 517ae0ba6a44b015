//! Discord gateway benchmarks against the fake, through a real `concierge serve` process:
//! - One shard: dispatches/s from "queued at the fake" to "stored" (the agent's head offset),
//!   with the adapter reading each dispatch only after the previous one is stored.
//! - 1,000 gateways at once (one fake per bot): resident memory per idle gateway (VmRSS of the
//!   concierge process with N bots minus with none).
//!
//! ```text
//! cargo build --release -p concierge-proxy
//! cargo run --release -p concierge-loadtest --example discord_bench -- [--events 20000] [--bots 1000] [--concierge PATH]
//! ```

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use concierge_loadtest::discord::FakeDiscord;
use serde_json::json;

struct Args {
    events: u64,
    bots: usize,
    concierge: PathBuf,
}

fn args() -> anyhow::Result<Args> {
    let mut a = Args { events: 20_000, bots: 1000, concierge: default_concierge() };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let value = it.next().with_context(|| format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--events" => a.events = value.parse()?,
            "--bots" => a.bots = value.parse()?,
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

struct Proxy {
    child: Child,
    admin: String,
    _dir: tempfile::TempDir,
}

impl Proxy {
    fn start(bin: &Path, channels: &str) -> anyhow::Result<Proxy> {
        let dir = tempfile::tempdir()?;
        let config = format!(
            "[server]\nquic_listen = \"127.0.0.1:0\"\nhttp_listen = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\ndata_dir = \"{}\"\n\n[store]\nbackend = \"embedded\"\npath = \"{}\"\n\n[agents.a]\ntoken = \"bench-token-0123456789\"\nmax_pending = 100000000\n[agents.a.wake]\ndriver = \"none\"\npolicy = \"never\"\n\n{channels}",
            dir.path().join("data").display(),
            dir.path().join("store.db").display()
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
        let ready: serde_json::Value = serde_json::from_str(&line).with_context(|| format!("ready line: {line}"))?;
        let admin = ready["admin"].as_str().context("admin address")?.to_string();
        Ok(Proxy { child, admin, _dir: dir })
    }

    fn rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap_or_default();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    }

    async fn head(&self, http: &reqwest::Client) -> u64 {
        let r = http.get(format!("http://{}/api/agents/a", self.admin)).send().await;
        match r {
            Ok(r) => r.json::<serde_json::Value>().await.ok().and_then(|v| v["head"].as_u64()).unwrap_or(0),
            Err(_) => 0,
        }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn token(i: usize) -> String {
    format!("BENCH.token-{i}")
}

fn bot_section(i: usize, fake: &FakeDiscord) -> String {
    format!(
        "[discord.b{i}]\nagent = \"a\"\ntoken = \"{}\"\ngateway_url = \"{}\"\napi_base = \"{}\"\n",
        token(i),
        fake.gateway_url(),
        fake.api_base()
    )
}

async fn wait_until(within: Duration, mut f: impl AsyncFnMut() -> bool) -> anyhow::Result<Duration> {
    let started = Instant::now();
    while !f().await {
        if started.elapsed() > within {
            bail!("not done within {within:?}");
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    Ok(started.elapsed())
}

async fn one_shard(a: &Args) -> anyhow::Result<()> {
    let fake = FakeDiscord::start(&token(0), Duration::from_secs(41)).await?;
    let proxy = Proxy::start(&a.concierge, &bot_section(0, &fake))?;
    let http = reqwest::Client::new();
    wait_until(Duration::from_secs(10), async || fake.session_id().is_some()).await?;
    let started = Instant::now();
    for i in 0..a.events {
        let d = json!({"id": (3_000_000_000_000_000_000u64 + i).to_string(), "channel_id": "3000", "guild_id": "4000",
            "author": {"id": "5000"}, "content": format!("message {i}"), "timestamp": "2026-11-25T13:00:00+00:00"});
        fake.dispatch("MESSAGE_CREATE", d);
    }
    let n = a.events;
    wait_until(Duration::from_secs(600), async || proxy.head(&http).await >= n).await?;
    let took = started.elapsed();
    println!(
        "discord gateway, 1 shard, embedded store: {n} dispatches in {took:.2?} = {:.0} events/s",
        n as f64 / took.as_secs_f64()
    );
    Ok(())
}

async fn many_gateways(a: &Args) -> anyhow::Result<()> {
    let baseline = Proxy::start(&a.concierge, "")?;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let rss_base = baseline.rss_kib();
    drop(baseline);
    let mut fakes = Vec::with_capacity(a.bots);
    let mut channels = String::new();
    for i in 0..a.bots {
        let fake = FakeDiscord::start(&token(i), Duration::from_secs(41)).await?;
        channels.push_str(&bot_section(i, &fake));
        fakes.push(fake);
    }
    let proxy = Proxy::start(&a.concierge, &channels)?;
    wait_until(Duration::from_secs(120), async || fakes.iter().all(|f| f.session_id().is_some())).await?;
    tokio::time::sleep(Duration::from_secs(5)).await;
    let rss = proxy.rss_kib();
    let per = (rss.saturating_sub(rss_base) * 1024) / a.bots as u64;
    println!(
        "discord, {} idle gateways: VmRSS {rss} KiB vs {rss_base} KiB with none = {:.1} KB per gateway",
        a.bots,
        per as f64 / 1000.0
    );
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let a = args()?;
    one_shard(&a).await?;
    many_gateways(&a).await?;
    Ok(())
}
