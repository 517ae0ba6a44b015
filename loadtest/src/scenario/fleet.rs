//! `fleet`: the operations issue's performance check. N sleeping agents (driver `none`, policy
//! `never`), each with an unsigned webhook route; M small events (64-256 bytes) spread over
//! them through the webhook ingress; then the admin API is timed: `GET /api/fleet` (what the
//! dashboard's fleet view reads, target < 200 ms), `GET /api/agents` (the scripts' list, served
//! from the same in-memory figures and snapshot, same target), `GET /metrics`, and the first message of the live
//! stream (`/api/events/stream`). Also reports the proxy's resident memory.
//!
//! Redis keys: agent ids share a per-run prefix (`fleet-<random>-`); every key under it is
//! deleted at the end with one `SCAN MATCH` walk (not one walk per agent).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use bytes::Bytes;
use serde_json::Value;

use super::http::Conn;
use super::proxy::{CpuMeter, Proxy, agent_section, delete_matching, route_section, rss_kib};
use super::{Context, Report, StoreChoice, bounded, histogram, random_hex, record};

/// Parameters of the fleet scenario.
#[derive(Clone, Debug)]
pub struct Params {
    /// Configured agents.
    pub agents: usize,
    /// Events buffered, spread round-robin over the agents.
    pub events: u64,
    /// Concurrent connections filling the buffers.
    pub fill_concurrency: usize,
    /// Longest the fill may take; the figures say how many events it reached.
    pub fill_limit: Duration,
    /// Timed requests to `/api/fleet` and `/metrics`.
    pub requests: usize,
    /// Timed requests to `/api/agents`.
    pub agents_requests: usize,
    /// Keep the proxy running this long after measuring (for a browser measurement).
    pub hold: Duration,
}

impl Params {
    /// The sizes, or smoke sizes.
    pub fn defaults(quick: bool) -> Self {
        Self {
            agents: if quick { 200 } else { 10_000 },
            events: if quick { 20_000 } else { 1_000_000 },
            fill_concurrency: 64,
            fill_limit: Duration::from_secs(if quick { 60 } else { 600 }),
            requests: if quick { 20 } else { 50 },
            agents_requests: if quick { 20 } else { 50 },
            hold: Duration::ZERO,
        }
    }
}

/// Target of the issue: the fleet view's API answers in under 200 ms.
const TARGET_FLEET_MS: f64 = 200.0;

/// Body sizes cycle through 64..=256 bytes.
fn body_size(seq: u64) -> usize {
    64 + (seq.wrapping_mul(37) % 193) as usize
}

/// Runs the scenario.
pub async fn run(ctx: &Context, p: &Params) -> anyhow::Result<Report> {
    let mut report = Report::new("fleet", ctx);
    report.param("agents", p.agents as u64);
    report.param("events", p.events);
    report.param("body_bytes", "64-256");
    report.param("fill_concurrency", p.fill_concurrency as u64);
    report.param("requests", p.requests as u64);

    let prefix = format!("fleet-{}-", random_hex(8));
    let agents: Vec<String> = (0..p.agents.max(1)).map(|i| format!("{prefix}{i:05}")).collect();
    let mut config = String::with_capacity(agents.len() * 256);
    for (i, a) in agents.iter().enumerate() {
        config += &agent_section(a, &random_hex(32), 256, p.events + 1024, "driver = \"none\"\npolicy = \"never\"");
        config += &route_section(&format!("r{i}"), a, "none", "");
    }
    let started = Instant::now();
    // No per-agent key clean-up by the proxy handle: one prefix walk below instead.
    let proxy = Proxy::start(&ctx.concierge, &ctx.store, &config, Vec::new());
    let result = match proxy {
        Ok(mut proxy) => {
            report.figure("proxy_start_ms", started.elapsed().as_secs_f64() * 1000.0, "ms");
            let r = measure(&mut proxy, &agents, p, &mut report).await;
            let r = r.map_err(|e| e.context(format!("fleet failed; proxy log tail:\n{}", proxy.log())));
            proxy.stop().await?;
            r
        }
        Err(e) => Err(e),
    };
    if let StoreChoice::Redis(url) = &ctx.store {
        let deleted = delete_matching(url, &format!("c:{{{prefix}*")).await.context("deleting the run's Redis keys")?;
        eprintln!("fleet: deleted {deleted} Redis keys under c:{{{prefix}*");
    }
    result?;
    Ok(report)
}

async fn measure(proxy: &mut Proxy, agents: &[String], p: &Params, report: &mut Report) -> anyhow::Result<()> {
    // Fill.
    eprintln!("fleet: buffering {} events over {} agents ...", p.events, agents.len());
    let paths: Arc<Vec<String>> =
        Arc::new(agents.iter().enumerate().map(|(i, a)| format!("/hooks/{a}/r{i}")).collect());
    let cpu = CpuMeter::start(proxy).await;
    let (filled, took) =
        bounded("filling the buffers", p.fill_limit + Duration::from_secs(60), fill(proxy.http, paths, p)).await?;
    cpu.finish(report);
    report.figure("events_filled", filled as f64, "count");
    report.figure("fill_events_per_s", filled as f64 / took.as_secs_f64(), "events/s");
    if filled < p.events {
        report.notes.push(format!("the fill stopped at its time limit: {filled} of {} events", p.events));
    }
    proxy.check_alive()?;

    // Wait for the periodic snapshot to carry the bytes of every agent (the counts are live).
    let client = reqwest::Client::new();
    let fleet_url = format!("http://{}/api/fleet", proxy.admin);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let v: Value = client.get(&fleet_url).send().await?.error_for_status()?.json().await?;
        let t = &v["totals"];
        let listed = v["agents"].as_array().map_or(0, Vec::len);
        let complete = v["agents"].as_array().is_some_and(|a| a.iter().all(|r| r["pending_bytes"].is_u64()));
        if t["pending"].as_u64() == Some(filled) && listed == agents.len() && complete {
            report.figure("fleet_total_pending_bytes", t["pending_bytes"].as_u64().unwrap_or(0) as f64, "bytes");
            break;
        }
        if Instant::now() > deadline {
            anyhow::bail!(
                "/api/fleet did not show {filled} events over {} agents with bytes: totals {t}",
                agents.len()
            );
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }

    // Time the endpoints, one request at a time on a keep-alive connection.
    eprintln!("fleet: timing /api/fleet, /metrics, /api/agents ...");
    let (fleet_h, fleet_bytes) = time_get(&client, &fleet_url, p.requests).await?;
    report.latency("api_fleet", &fleet_h, Some(TARGET_FLEET_MS));
    report.figure("api_fleet_response_bytes", fleet_bytes as f64, "bytes");
    let metrics_url = format!("http://{}/metrics", proxy.admin);
    let (metrics_h, metrics_bytes) = time_get(&client, &metrics_url, p.requests).await?;
    report.latency("metrics", &metrics_h, None);
    report.figure("metrics_response_bytes", metrics_bytes as f64, "bytes");
    let agents_url = format!("http://{}/api/agents", proxy.admin);
    let (agents_h, _) = time_get(&client, &agents_url, p.agents_requests).await?;
    report.latency("api_agents", &agents_h, Some(TARGET_FLEET_MS));
    let first = first_stream_message(&client, &format!("http://{}/api/events/stream", proxy.admin)).await?;
    report.figure("stream_first_message_ms", first.as_secs_f64() * 1000.0, "ms");
    if let Some(kb) = rss_kib(proxy.pid()) {
        report.figure("proxy_rss_mb", kb as f64 / 1024.0, "MB");
    }
    proxy.check_alive()?;

    if !p.hold.is_zero() {
        let prefix = agents[0].strip_suffix("00000").unwrap_or_default();
        eprintln!("fleet: holding the proxy for {:?}; dashboard at http://{}/", p.hold, proxy.admin);
        eprintln!(
            "fleet: browser timing: node --experimental-websocket loadtest/scripts/fleet-page.mjs http://{}/ http://{} {prefix}",
            proxy.admin, proxy.http
        );
        tokio::time::sleep(p.hold).await;
    }
    report.notes.push(
        "api_agents (for scripts) answers from memory and the periodic snapshot, like /api/fleet; the dashboard reads /api/fleet and the stream"
            .into(),
    );
    Ok(())
}

/// POSTs up to `p.events` bodies over `p.fill_concurrency` keep-alive connections, at most for
/// `p.fill_limit`; returns the events acknowledged and the time taken.
async fn fill(addr: std::net::SocketAddr, paths: Arc<Vec<String>>, p: &Params) -> anyhow::Result<(u64, Duration)> {
    let next = Arc::new(AtomicU64::new(0));
    let acked = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let stop_at = started + p.fill_limit;
    let mut workers = tokio::task::JoinSet::new();
    for _ in 0..p.fill_concurrency.max(1) {
        let (next, acked, paths) = (next.clone(), acked.clone(), paths.clone());
        let events = p.events;
        workers.spawn(async move {
            let mut conn = Conn::connect(addr).await?;
            loop {
                let seq = next.fetch_add(1, Ordering::Relaxed);
                if seq >= events || Instant::now() >= stop_at {
                    return anyhow::Ok(());
                }
                let path = &paths[(seq % paths.len() as u64) as usize];
                let body = Bytes::from(super::body(seq, "fleet", body_size(seq)));
                let answer = conn.post(path, &[("content-type", "application/json")], body).await?;
                if answer.status != 202 {
                    anyhow::bail!("fill POST answered {}: {}", answer.status, String::from_utf8_lossy(&answer.body));
                }
                acked.fetch_add(1, Ordering::Relaxed);
            }
        });
    }
    while let Some(r) = workers.join_next().await {
        r.context("fill worker panicked")??;
    }
    Ok((acked.load(Ordering::Relaxed), started.elapsed()))
}

/// `n` sequential GETs of `url` (after two untimed warm-ups): latency histogram (whole body
/// read) and the size of the last body.
async fn time_get(
    client: &reqwest::Client,
    url: &str,
    n: usize,
) -> anyhow::Result<(hdrhistogram::Histogram<u64>, usize)> {
    let mut h = histogram();
    let mut size = 0;
    for i in 0..n + 2 {
        let started = Instant::now();
        let body = client.get(url).send().await?.error_for_status()?.bytes().await?;
        if i >= 2 {
            record(&mut h, started.elapsed());
        }
        size = body.len();
    }
    Ok((h, size))
}

/// Time from request to the end of the first server-sent event (the full `fleet` message).
async fn first_stream_message(client: &reqwest::Client, url: &str) -> anyhow::Result<Duration> {
    let started = Instant::now();
    let mut response = client.get(url).send().await?.error_for_status()?;
    let mut buf = Vec::new();
    bounded("the first live-stream message", Duration::from_secs(30), async {
        while let Some(chunk) = response.chunk().await? {
            buf.extend_from_slice(&chunk);
            if buf.windows(2).any(|w| w == b"\n\n") {
                return Ok(started.elapsed());
            }
        }
        anyhow::bail!("the live stream ended before its first message")
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn body_sizes_stay_small() {
        let sizes: Vec<usize> = (0..1000).map(body_size).collect();
        assert!(sizes.iter().all(|s| (64..=256).contains(s)));
        assert!(sizes.iter().any(|&s| s > 200));
        assert_eq!(super::super::body(7, "fleet", body_size(7)).len(), body_size(7));
    }
}
