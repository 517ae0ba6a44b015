//! Chat-channel ingest benchmarks against the fakes, through a real `concierge serve` process:
//! - Telegram long polling, one bot: updates/s from "queued at the fake" to "confirmed by the
//!   next getUpdates" (so every one is durably stored).
//! - 1,000 bots long-polling at once: resident memory per idle poller (VmRSS of the concierge
//!   process with 1,000 bots minus with none), then one update to every bot.
//! - WhatsApp webhook ingest: signed notifications/s and messages/s.
//!
//! ```text
//! cargo build --release -p concierge-proxy
//! cargo run --release -p concierge-loadtest --example telegram_bench -- \
//!     [--store embedded|redis] [--updates 20000] [--bots 1000] [--notifications 10000] [--concierge PATH]
//! ```
//! `--store redis` starts a private `redis-server` (AOF, `appendfsync always`) in a temp dir.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use concierge_loadtest::bench::{BenchProxy as Proxy, Redis, default_concierge};
use concierge_loadtest::telegram::{FakeTelegram, Options};
use concierge_loadtest::whatsapp::{FakeWhatsApp, notification, text_message};

struct Args {
    store: String,
    updates: usize,
    bots: usize,
    notifications: usize,
    concierge: PathBuf,
}

fn args() -> anyhow::Result<Args> {
    let mut a = Args {
        store: "embedded".into(),
        updates: 20_000,
        bots: 1000,
        notifications: 10_000,
        concierge: default_concierge(),
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let value = it.next().with_context(|| format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--store" => a.store = value,
            "--updates" => a.updates = value.parse()?,
            "--bots" => a.bots = value.parse()?,
            "--notifications" => a.notifications = value.parse()?,
            "--concierge" => a.concierge = value.into(),
            other => bail!("unknown flag {other}"),
        }
    }
    Ok(a)
}

fn bot_token(i: usize) -> String {
    format!("{}:BENCH-token-{i}", 1_000_000 + i)
}

fn bot_section(i: usize, api_base: &str, poll_timeout: &str) -> String {
    format!(
        "[telegram.b{i}]\nagent = \"a\"\ntoken = \"{}\"\napi_base = \"{api_base}\"\npoll_timeout = \"{poll_timeout}\"\n",
        bot_token(i)
    )
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

async fn one_bot(a: &Args, redis: Option<&Redis>) -> anyhow::Result<f64> {
    let fake = FakeTelegram::start(Options::default()).await?;
    let token = bot_token(0);
    fake.add_bot(&token);
    let proxy = Proxy::start(&a.concierge, &a.store, redis, &bot_section(0, &fake.api_base, "30s"))?;
    // Let the poller settle into an idle long poll, then queue everything at once.
    wait_until(Duration::from_secs(10), || fake.polls(&token) >= 1).await?;
    for i in 0..a.updates {
        fake.push_message(&token, 777, 42, &format!("update {i}"));
    }
    let took = wait_until(Duration::from_secs(600), || fake.pending(&token).is_empty()).await?;
    let rate = a.updates as f64 / took.as_secs_f64();
    println!(
        "telegram long polling, 1 bot, {} store: {} updates in {took:.2?} = {rate:.0} updates/s",
        a.store, a.updates
    );
    drop(proxy);
    Ok(rate)
}

async fn many_bots(a: &Args, redis: Option<&Redis>) -> anyhow::Result<(u64, u64, f64)> {
    let fake = FakeTelegram::start(Options::default()).await?;
    let baseline = Proxy::start(&a.concierge, &a.store, redis, "")?;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let rss_base = baseline.rss_kib();
    drop(baseline);

    let mut channels = String::new();
    for i in 0..a.bots {
        fake.add_bot(&bot_token(i));
        channels.push_str(&bot_section(i, &fake.api_base, "50s"));
    }
    let proxy = Proxy::start(&a.concierge, &a.store, redis, &channels)?;
    let tokens: Vec<String> = (0..a.bots).map(bot_token).collect();
    wait_until(Duration::from_secs(60), || tokens.iter().all(|t| fake.polls(t) >= 1)).await?;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let rss_bots = proxy.rss_kib();
    let per_bot = (rss_bots.saturating_sub(rss_base) * 1024) / a.bots as u64;
    println!(
        "{} idle bots long-polling: concierge VmRSS {rss_bots} KiB vs {rss_base} KiB with none = {per_bot} bytes per idle poller",
        a.bots
    );
    // One update to every bot at once: how long until all are stored and confirmed.
    let started = Instant::now();
    for t in &tokens {
        fake.push_message(t, 1, 1, "hello");
    }
    wait_until(Duration::from_secs(300), || tokens.iter().all(|t| fake.pending(t).is_empty())).await?;
    let took = started.elapsed();
    let rate = a.bots as f64 / took.as_secs_f64();
    println!("one update to each of {} bots: all confirmed in {took:.2?} ({rate:.0} updates/s)", a.bots);
    Ok((rss_base, rss_bots, rate))
}

async fn whatsapp(a: &Args, redis: Option<&Redis>, per_body: usize) -> anyhow::Result<f64> {
    let fake = FakeWhatsApp::start("bench-secret", "bench-token", None).await?;
    let section = format!(
        "[whatsapp.wa]\nagent = \"a\"\napp_secret = \"bench-secret\"\nverify_token = \"v\"\naccess_token = \"bench-token\"\nphone_number_id = \"1065\"\ngraph_base = \"{}\"\n",
        fake.graph_base
    );
    let proxy = Proxy::start(&a.concierge, &a.store, redis, &section)?;
    let url = format!("http://{}/whatsapp/wa", proxy.http);
    let n = a.notifications / per_body;
    let bodies: Arc<Vec<(String, String)>> = Arc::new(
        (0..n)
            .map(|i| {
                let msgs = (0..per_body)
                    .map(|j| text_message("4915550001", &format!("wamid.B{i}-{j}"), &format!("message {i}/{j}")))
                    .collect();
                let body = notification("1065", msgs, vec![]);
                let sig = fake.signature(body.as_bytes());
                (body, sig)
            })
            .collect(),
    );
    let client = reqwest::Client::builder().timeout(Duration::from_secs(30)).build()?;
    let next = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let workers: Vec<_> = (0..32)
        .map(|_| {
            let (client, url, bodies, next) = (client.clone(), url.clone(), bodies.clone(), next.clone());
            tokio::spawn(async move {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some((body, sig)) = bodies.get(i) else { return Ok::<_, anyhow::Error>(()) };
                    let r = client
                        .post(&url)
                        .header("content-type", "application/json")
                        .header("X-Hub-Signature-256", sig)
                        .body(body.clone())
                        .send()
                        .await?;
                    if r.status() != 200 {
                        bail!("notification {i}: HTTP {}", r.status());
                    }
                }
            })
        })
        .collect();
    for w in workers {
        w.await??;
    }
    let took = started.elapsed();
    let rate = (n * per_body) as f64 / took.as_secs_f64();
    println!(
        "whatsapp webhooks, {} store, {per_body} message(s) per POST, 32 connections: {} messages in {took:.2?} = {rate:.0} messages/s ({:.0} POSTs/s)",
        a.store,
        n * per_body,
        n as f64 / took.as_secs_f64()
    );
    Ok(rate)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let a = args()?;
    let redis = if a.store == "redis" { Some(Redis::start()?) } else { None };
    let tg = one_bot(&a, redis.as_ref()).await?;
    let (base, bots, fan_in) = many_bots(&a, redis.as_ref()).await?;
    let wa1 = whatsapp(&a, redis.as_ref(), 1).await?;
    let wa10 = whatsapp(&a, redis.as_ref(), 10).await?;
    println!(
        "{}",
        serde_json::json!({
            "store": a.store,
            "telegram_updates_per_s_one_bot": tg.round(),
            "bots": a.bots,
            "rss_kib_no_bots": base,
            "rss_kib_with_bots": bots,
            "bytes_per_idle_poller": (bots.saturating_sub(base) * 1024) / a.bots as u64,
            "fan_in_updates_per_s": fan_in.round(),
            "whatsapp_messages_per_s_1_per_post": wa1.round(),
            "whatsapp_messages_per_s_10_per_post": wa10.round(),
        })
    );
    Ok(())
}
