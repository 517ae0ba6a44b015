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

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use concierge_loadtest::bench::{BenchProxy as Proxy, default_concierge};
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

/// The agent's stored head, from the admin API (0 while it cannot be read).
async fn head(proxy: &Proxy, http: &reqwest::Client) -> u64 {
    match http.get(format!("http://{}/api/agents/a", proxy.admin)).send().await {
        Ok(r) => r.json::<serde_json::Value>().await.ok().and_then(|v| v["head"].as_u64()).unwrap_or(0),
        Err(_) => 0,
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
    let proxy = Proxy::start(&a.concierge, "embedded", None, &bot_section(0, &fake))?;
    let http = reqwest::Client::new();
    wait_until(Duration::from_secs(10), async || fake.session_id().is_some()).await?;
    let started = Instant::now();
    for i in 0..a.events {
        let d = json!({"id": (3_000_000_000_000_000_000u64 + i).to_string(), "channel_id": "3000", "guild_id": "4000",
            "author": {"id": "5000"}, "content": format!("message {i}"), "timestamp": "2026-11-25T13:00:00+00:00"});
        fake.dispatch("MESSAGE_CREATE", d);
    }
    let n = a.events;
    wait_until(Duration::from_secs(600), async || head(&proxy, &http).await >= n).await?;
    let took = started.elapsed();
    println!(
        "discord gateway, 1 shard, embedded store: {n} dispatches in {took:.2?} = {:.0} events/s",
        n as f64 / took.as_secs_f64()
    );
    Ok(())
}

async fn many_gateways(a: &Args) -> anyhow::Result<()> {
    let baseline = Proxy::start(&a.concierge, "embedded", None, "")?;
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
    let proxy = Proxy::start(&a.concierge, "embedded", None, &channels)?;
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
