//! `replay`: N events buffered for one sleeping agent (policy `never`, driver `none`), then one
//! SDK agent connects with a large window and drains them, acking cumulatively. Measures
//! connect -> all N received (events/s, MB/s of raw bodies) and connect -> all acked.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use bytes::Bytes;
use concierge_protocol::client::AgentClient;

use super::http::Conn;
use super::proxy::{CpuMeter, Proxy, agent_section, route_section};
use super::{Context, Report, Target, bounded, random_hex};

/// Parameters of the replay scenario.
#[derive(Clone, Debug)]
pub struct Params {
    /// Events buffered before the agent connects.
    pub events: u64,
    /// Size of each webhook body.
    pub body_bytes: usize,
    /// Credit window the agent grants.
    pub window: u32,
    /// The agent acks cumulatively every this many events.
    pub ack_every: u64,
    /// Concurrent connections filling the buffer.
    pub fill_concurrency: usize,
}

impl Params {
    /// The sizes, or smoke sizes.
    pub fn defaults(quick: bool) -> Self {
        Self {
            events: if quick { 2_000 } else { 100_000 },
            body_bytes: 1024,
            window: 4096,
            ack_every: 256,
            fill_concurrency: 64,
        }
    }
}

/// Target of the issue: 200k events/s replayed.
const TARGET_EVENTS_PER_S: f64 = 200_000.0;

/// Runs the scenario.
pub async fn run(ctx: &Context, p: &Params) -> anyhow::Result<Report> {
    let mut report = Report::new("replay", ctx);
    report.param("events", p.events);
    report.param("body_bytes", p.body_bytes as u64);
    report.param("window", p.window);
    report.param("ack_every", p.ack_every);
    report.param("fill_concurrency", p.fill_concurrency as u64);

    let agent = format!("bench-{}", random_hex(10));
    let token = random_hex(32);
    let config = agent_section(&agent, &token, p.window, p.events + 1024, "driver = \"none\"\npolicy = \"never\"")
        + &route_section("fill", &agent, "none", "");
    let mut proxy = Proxy::start(&ctx.concierge, &ctx.store, &config, vec![agent.clone()])?;
    let result = measure(&mut proxy, &agent, &token, p, &mut report).await;
    let result = result.map_err(|e| e.context(format!("replay failed; proxy log tail:\n{}", proxy.log())));
    proxy.stop().await?;
    result?;
    Ok(report)
}

async fn measure(proxy: &mut Proxy, agent: &str, token: &str, p: &Params, report: &mut Report) -> anyhow::Result<()> {
    // Fill (unsigned, no idempotency key: no dedupe keys, just appends).
    let path = format!("/hooks/{agent}/fill");
    eprintln!("replay: buffering {} events of {} bytes ...", p.events, p.body_bytes);
    let filled = bounded("filling the buffer", Duration::from_secs(600), fill(proxy.http, &path, p)).await?;
    report.figure("fill_events_per_s", p.events as f64 / filled.as_secs_f64(), "events/s");
    proxy.check_alive()?;
    let a = proxy.agent(agent).await?;
    let pending = a["pending"].as_u64().unwrap_or(0);
    if pending != p.events {
        anyhow::bail!("expected {} events pending after the fill, the admin API says {pending}: {a}", p.events);
    }

    // Replay.
    eprintln!("replay: connecting the agent ...");
    let options = proxy.client_options(agent, token, p.window);
    let cpu = CpuMeter::start(proxy).await;
    let started = Instant::now();
    let drained = bounded("the replay", Duration::from_secs(600), async {
        let mut client = AgentClient::connect(options).await.context("agent connect")?;
        let connected = started.elapsed();
        let mut first = None;
        let mut received = 0u64;
        let mut bytes = 0u64;
        let mut last_offset = 0u64;
        let mut since_ack = 0u64;
        while received < p.events {
            let Some(event) = client.next().await.context("receiving")? else {
                anyhow::bail!("the session ended after {received} of {} events", p.events);
            };
            if first.is_none() {
                first = Some(started.elapsed());
            }
            if event.offset <= last_offset {
                anyhow::bail!("offset {} after {last_offset}: out of order or duplicated", event.offset);
            }
            last_offset = event.offset;
            received += 1;
            bytes += event.data.raw.len() as u64;
            since_ack += 1;
            if since_ack >= p.ack_every {
                client.ack(last_offset);
                since_ack = 0;
            }
        }
        let all_received = started.elapsed();
        client.ack(last_offset);
        Ok((client, connected, first.unwrap_or_default(), all_received, bytes, last_offset))
    })
    .await?;
    let (client, connected, first, all_received, bytes, last_offset) = drained;
    // Acked: the proxy's cursor reached the last offset (polled, so within ~2 ms).
    proxy
        .wait_agent(agent, Duration::from_secs(60), Duration::from_millis(2), "all acked", |a| {
            a["cursor"].as_u64() == Some(last_offset)
        })
        .await?;
    let all_acked = started.elapsed();
    client.close().await;
    cpu.finish(report);

    let secs = all_received.as_secs_f64();
    report.figure_target(
        "replay_events_per_s",
        p.events as f64 / secs,
        "events/s",
        Target::AtLeast(TARGET_EVENTS_PER_S),
    );
    report.figure("replay_mb_per_s", bytes as f64 / secs / 1e6, "MB/s");
    report.figure("replay_seconds", secs, "s");
    report.figure("connect_ms", connected.as_secs_f64() * 1000.0, "ms");
    report.figure("first_event_ms", first.as_secs_f64() * 1000.0, "ms");
    report.figure("all_acked_ms", all_acked.as_secs_f64() * 1000.0, "ms");
    report.figure("replay_acked_events_per_s", p.events as f64 / all_acked.as_secs_f64(), "events/s");
    report.notes.push("replay_mb_per_s counts raw webhook bodies only (not envelopes or framing)".into());
    Ok(())
}

/// POSTs `p.events` bodies over `p.fill_concurrency` keep-alive connections; returns the time.
async fn fill(addr: std::net::SocketAddr, path: &str, p: &Params) -> anyhow::Result<Duration> {
    let next = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let mut workers = tokio::task::JoinSet::new();
    for _ in 0..p.fill_concurrency.max(1) {
        let next = next.clone();
        let path = path.to_string();
        let (events, size) = (p.events, p.body_bytes);
        workers.spawn(async move {
            let mut conn = Conn::connect(addr).await?;
            loop {
                let seq = next.fetch_add(1, Ordering::Relaxed);
                if seq >= events {
                    return anyhow::Ok(());
                }
                let body = Bytes::from(super::body(seq, "replay", size));
                let answer = conn.post(&path, &[("content-type", "application/json")], body).await?;
                if answer.status != 202 {
                    anyhow::bail!("fill POST answered {}: {}", answer.status, String::from_utf8_lossy(&answer.body));
                }
            }
        });
    }
    while let Some(r) = workers.join_next().await {
        r.context("fill worker panicked")??;
    }
    Ok(started.elapsed())
}
