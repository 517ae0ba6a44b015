//! `wake-storm` (`wake` is its old name, still accepted): the overhead the proxy adds to a
//! wake. The agent is the built-in echo agent (`concierge agent echo`) started by the `exec`
//! driver, with `sleep_after` short so it goes back to sleep quickly. Each round: POST one
//! event while the agent sleeps, wait for the echo to reach a reply sink in this process, wait
//! until the admin API says `asleep` again, then read the wake's timings from `last_wake`:
//! - `driver_called_after_ms`: event received -> driver called (proxy overhead);
//! - `first_delivery_after_ms - connected_after_ms`: agent Hello -> first event delivered
//!   (proxy overhead);
//! - `connected_after_ms`: mostly process start-up of the agent (context, not proxy overhead);
//! - event POST -> echoed reply received (end to end, for context).

use std::time::{Duration, Instant};

use anyhow::Context as _;
use bytes::Bytes;
use serde_json::Value;
use tokio::sync::mpsc;

use super::http::Conn;
use super::proxy::{Proxy, agent_section, route_section, toml_str};
use super::{Context, Report, Target, histogram, random_hex};

/// Parameters of the wake scenario.
#[derive(Clone, Debug)]
pub struct Params {
    /// Wake rounds.
    pub wakes: u32,
    /// The agent's `sleep_after`.
    pub sleep_after: Duration,
    /// Size of each webhook body.
    pub body_bytes: usize,
}

impl Params {
    /// The sizes, or smoke sizes.
    pub fn defaults(quick: bool) -> Self {
        Self { wakes: if quick { 5 } else { 30 }, sleep_after: Duration::from_millis(200), body_bytes: 1024 }
    }
}

/// Targets of the issue.
const TARGET_DRIVER_P99_MS: f64 = 1.0;
const TARGET_HELLO_TO_DELIVERY_P50_MS: f64 = 5.0;

/// Runs the scenario.
pub async fn run(ctx: &Context, p: &Params) -> anyhow::Result<Report> {
    let mut report = Report::new("wake-storm", ctx);
    report.param("wakes", p.wakes);
    report.param("sleep_after_ms", p.sleep_after.as_millis() as u64);
    report.param("body_bytes", p.body_bytes as u64);
    report.param("driver", "exec: concierge agent echo");

    // The reply sink: every echoed reply lands here with its arrival time.
    let (tx, mut replies) = mpsc::unbounded_channel::<(Instant, Value)>();
    let app = axum::Router::new().fallback(move |body: axum::body::Bytes| {
        let tx = tx.clone();
        async move {
            let now = Instant::now();
            if let Ok(v) = serde_json::from_slice::<Value>(&body) {
                let _ = tx.send((now, v));
            }
            "ok"
        }
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let sink_url = format!("http://{}/replies", listener.local_addr()?);
    let sink = tokio::spawn(async move { axum::serve(listener, app).await });

    let agent = format!("bench-{}", random_hex(10));
    let token = random_hex(32);
    let wake = format!(
        "driver = \"exec\"\ncommand = [{}, \"agent\", \"echo\"]\nenv = {{ CONCIERGE_TOKEN = {}, RUST_LOG = \"warn\" }}\n\
         settle = \"200ms\"\nconnect_timeout = \"10s\"\npolicy = \"immediate\"\nsleep_after = \"{}ms\"",
        toml_str(&ctx.concierge.display().to_string()),
        toml_str(&token),
        p.sleep_after.as_millis()
    );
    let config = agent_section(&agent, &token, 256, 10_000, &wake)
        + &route_section("wake", &agent, "none", &format!("reply_url = {}", toml_str(&sink_url)));
    let mut proxy = Proxy::start(&ctx.concierge, &ctx.store, &config, vec![agent.clone()])?;
    let result = measure(&mut proxy, &agent, p, &mut replies, &mut report).await;
    let result = result.map_err(|e| e.context(format!("wake failed; proxy log tail:\n{}", proxy.log())));
    proxy.stop().await?;
    sink.abort();
    result?;
    Ok(report)
}

async fn measure(
    proxy: &mut Proxy,
    agent: &str,
    p: &Params,
    replies: &mut mpsc::UnboundedReceiver<(Instant, Value)>,
    report: &mut Report,
) -> anyhow::Result<()> {
    let asleep = |a: &Value| a["state"] == "asleep" && a["connected"] != true;
    let mut driver = histogram();
    let mut hello_to_delivery = histogram();
    let mut connected = histogram();
    let mut first_delivery = histogram();
    let mut total = histogram();
    let mut cycle = histogram();
    let path = format!("/hooks/{agent}/wake");
    let mut conn = Conn::connect(proxy.http).await?;
    let us = |ms: f64| (ms * 1000.0).round().max(1.0) as u64;
    for round in 0..p.wakes {
        proxy.wait_agent(agent, Duration::from_secs(30), Duration::from_millis(20), "asleep", asleep).await?;
        proxy.check_alive()?;
        let text = format!("wake {round}");
        let body = Bytes::from(super::body(u64::from(round), &text, p.body_bytes));
        let wall_before = concierge_protocol::now_ms();
        let sent = Instant::now();
        let answer = conn.post(&path, &[("content-type", "application/json")], body).await?;
        if answer.status != 202 {
            anyhow::bail!("wake POST answered {}: {}", answer.status, String::from_utf8_lossy(&answer.body));
        }
        let expected = format!("echo: {text}");
        let replied = tokio::time::timeout(Duration::from_secs(30), async {
            while let Some((at, v)) = replies.recv().await {
                if v["body"] == expected.as_str() {
                    return Some(at);
                }
            }
            None
        })
        .await
        .ok()
        .flatten()
        .with_context(|| format!("round {round}: no echoed reply within 30 s"))?;
        let a =
            proxy.wait_agent(agent, Duration::from_secs(30), Duration::from_millis(20), "asleep again", asleep).await?;
        let w = &a["last_wake"];
        let started = w["started_at_ms"].as_u64().unwrap_or(0);
        if started + 5 < wall_before || w["outcome"] != "connected" {
            anyhow::bail!("round {round}: last_wake is not this round's successful wake: {w}");
        }
        let field = |k: &str| w[k].as_f64().with_context(|| format!("round {round}: last_wake lacks {k}: {w}"));
        let (d, c, f) =
            (field("driver_called_after_ms")?, field("connected_after_ms")?, field("first_delivery_after_ms")?);
        driver.saturating_record(us(d));
        connected.saturating_record(us(c));
        first_delivery.saturating_record(us(f));
        hello_to_delivery.saturating_record(us(f - c));
        super::record(&mut total, replied.saturating_duration_since(sent));
        super::record(&mut cycle, sent.elapsed());
        eprintln!(
            "wake {round}: driver {d:.3} ms, connected {c:.1} ms, first delivery {f:.1} ms, reply {:.1} ms",
            replied.saturating_duration_since(sent).as_secs_f64() * 1000.0
        );
    }
    let ms = |h: &hdrhistogram::Histogram<u64>, q: f64| h.value_at_quantile(q) as f64 / 1000.0;
    report.figure("wakes", driver.len() as f64, "count");
    report.figure("driver_called_p50", ms(&driver, 0.5), "ms");
    report.figure_target("driver_called_p99", ms(&driver, 0.99), "ms", Target::Below(TARGET_DRIVER_P99_MS));
    report.figure_target(
        "hello_to_first_delivery_p50",
        ms(&hello_to_delivery, 0.5),
        "ms",
        Target::Below(TARGET_HELLO_TO_DELIVERY_P50_MS),
    );
    report.figure("hello_to_first_delivery_p99", ms(&hello_to_delivery, 0.99), "ms");
    report.figure("connected_p50", ms(&connected, 0.5), "ms");
    report.figure("connected_p99", ms(&connected, 0.99), "ms");
    report.figure("first_delivery_p50", ms(&first_delivery, 0.5), "ms");
    report.figure("event_to_reply_p50", ms(&total, 0.5), "ms");
    report.figure("event_to_reply_p99", ms(&total, 0.99), "ms");
    report.figure("cycle_p50", ms(&cycle, 0.5), "ms");
    report.notes.push(
        "driver_called_after_ms is stamped by the proxy's lifecycle with the trigger's own instant (lifecycle.rs attempt_now), \
         so it reads ~0 by construction; event_to_reply bounds the real end-to-end cost"
            .into(),
    );
    report.notes.push(
        "connected_* is dominated by starting the agent process; the proxy's share is driver_called and hello_to_first_delivery"
            .into(),
    );
    Ok(())
}
