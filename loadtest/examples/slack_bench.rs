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

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use concierge_loadtest::bench::{BenchProxy as Proxy, Redis, default_concierge};
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
