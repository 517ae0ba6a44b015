//! `ingest`: signed (Standard Webhooks, `verify = "standard"`) 1 KiB webhooks at a fixed
//! concurrency, each worker on its own keep-alive connection, closed loop. Measures the
//! durable-ack rate (202/s) and the ack latency distribution; counts every other answer.
//! Agents are asleep (policy `never`), so only the write path is measured.

use std::time::{Duration, Instant};

use anyhow::Context as _;
use bytes::Bytes;
use concierge_adapters::signature;

use super::http::Conn;
use super::latency::base64_random;
use super::proxy::{CpuMeter, Proxy, agent_section, route_section, toml_str};
use super::{Context, Report, bounded, histogram, random_hex, record};

/// Parameters of the ingest scenario.
#[derive(Clone, Debug)]
pub struct Params {
    /// Concurrent requests (one keep-alive connection each).
    pub concurrency: usize,
    /// Measured duration.
    pub duration: Duration,
    /// Excluded from the figures, before the measured duration.
    pub warmup: Duration,
    /// Size of each webhook body.
    pub body_bytes: usize,
    /// Agents the workers spread over (round-robin); 1 is the single-stream worst case.
    pub agents: usize,
}

impl Params {
    /// The sizes, or smoke sizes.
    pub fn defaults(quick: bool) -> Self {
        Self {
            concurrency: 64,
            duration: Duration::from_secs(if quick { 2 } else { 10 }),
            warmup: Duration::from_millis(if quick { 200 } else { 1000 }),
            body_bytes: 1024,
            agents: 1,
        }
    }
}

struct WorkerResult {
    latencies: hdrhistogram::Histogram<u64>,
    acked: u64,
    errors: u64,
    first_error: Option<String>,
}

/// Runs the scenario.
pub async fn run(ctx: &Context, p: &Params) -> anyhow::Result<Report> {
    let mut report = Report::new("ingest", ctx);
    report.param("concurrency", p.concurrency as u64);
    report.param("duration_s", p.duration.as_secs_f64());
    report.param("warmup_s", p.warmup.as_secs_f64());
    report.param("body_bytes", p.body_bytes as u64);
    report.param("agents", p.agents as u64);
    report.param("verify", "standard");

    let run_id = random_hex(10);
    let secret = format!("whsec_{}", base64_random());
    let agents: Vec<String> = (0..p.agents.max(1)).map(|i| format!("bench-{run_id}-{i}")).collect();
    let mut config = String::new();
    for (i, a) in agents.iter().enumerate() {
        config += &agent_section(a, &random_hex(32), 256, 1_000_000_000, "driver = \"none\"\npolicy = \"never\"");
        config += &route_section(&format!("in{i}"), a, "standard", &format!("secret = {}", toml_str(&secret)));
    }
    let mut proxy = Proxy::start(&ctx.concierge, &ctx.store, &config, agents.clone())?;
    let result = measure(&mut proxy, &agents, &secret, p, &mut report).await;
    let result = result.map_err(|e| e.context(format!("ingest failed; proxy log tail:\n{}", proxy.log())));
    proxy.stop().await?;
    result?;
    Ok(report)
}

async fn measure(
    proxy: &mut Proxy,
    agents: &[String],
    secret: &str,
    p: &Params,
    report: &mut Report,
) -> anyhow::Result<()> {
    let key = signature::secret_bytes(secret);
    eprintln!("ingest: {} workers for {:?} (+{:?} warm-up) ...", p.concurrency, p.duration, p.warmup);
    let cpu = CpuMeter::start(proxy).await;
    let begin = Instant::now();
    let measure_from = begin + p.warmup;
    let end = measure_from + p.duration;
    let mut workers = tokio::task::JoinSet::new();
    for w in 0..p.concurrency.max(1) {
        let path = format!("/hooks/{}/in{}", agents[w % agents.len()], w % agents.len());
        let key = key.clone();
        let http = proxy.http;
        let size = p.body_bytes;
        workers.spawn(async move {
            let mut r = WorkerResult { latencies: histogram(), acked: 0, errors: 0, first_error: None };
            let mut conn = Conn::connect(http).await?;
            let mut i = 0u64;
            loop {
                let started = Instant::now();
                if started >= end {
                    return anyhow::Ok(r);
                }
                i += 1;
                let body = super::body((w as u64) << 40 | i, "ingest", size);
                let id = format!("msg_{w}_{i}");
                let ts = (concierge_protocol::now_ms() / 1000) as i64;
                let sig = signature::standard_sign(&key, &id, ts, &body);
                let ts = ts.to_string();
                let headers = [
                    ("content-type", "application/json"),
                    ("webhook-id", id.as_str()),
                    ("webhook-timestamp", ts.as_str()),
                    ("webhook-signature", sig.as_str()),
                ];
                let answer = conn.post(&path, &headers, Bytes::from(body)).await;
                let done = Instant::now();
                let counted = started >= measure_from && done <= end;
                match answer {
                    Ok(a) if a.status == 202 => {
                        if counted {
                            r.acked += 1;
                            record(&mut r.latencies, done - started);
                        }
                    }
                    Ok(a) => {
                        r.errors += 1;
                        r.first_error
                            .get_or_insert_with(|| format!("HTTP {}: {}", a.status, String::from_utf8_lossy(&a.body)));
                    }
                    Err(e) => {
                        r.errors += 1;
                        r.first_error.get_or_insert_with(|| format!("{e:#}"));
                        conn = Conn::connect(http).await?;
                    }
                }
            }
        });
    }
    let mut latencies = histogram();
    let (mut acked, mut errors, mut first_error) = (0u64, 0u64, None);
    let limit = p.warmup + p.duration + Duration::from_secs(60);
    bounded("the ingest workers", limit, async {
        while let Some(r) = workers.join_next().await {
            let r = r.context("worker panicked")??;
            latencies.add(&r.latencies).context("merging histograms")?;
            acked += r.acked;
            errors += r.errors;
            if first_error.is_none() {
                first_error = r.first_error;
            }
        }
        anyhow::Ok(())
    })
    .await?;
    cpu.finish(report);
    proxy.check_alive()?;
    let secs = p.duration.as_secs_f64();
    report.figure("acks_per_s", acked as f64 / secs, "202/s");
    report.figure("mb_per_s", acked as f64 * p.body_bytes as f64 / secs / 1e6, "MB/s");
    report.latency("ack_latency", &latencies, None);
    report.figure("errors", errors as f64, "count");
    if let Some(e) = first_error {
        report.notes.push(format!("first error: {e}"));
    }
    Ok(())
}
