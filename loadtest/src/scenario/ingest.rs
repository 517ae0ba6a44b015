//! `ingest`: signed (Standard Webhooks, `verify = "standard"`) 1 KiB webhooks at a fixed
//! concurrency, each worker on its own keep-alive connection, closed loop. Measures the
//! durable-ack rate (202/s) and the ack latency distribution; counts every other answer.
//! Agents are asleep (policy `never`), so only the write path is measured.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use bytes::Bytes;
use concierge_adapters::signature;

use super::e2e::base64_random;
use super::http::Conn;
use super::peer::{NGINX_HINT, Nginx, REDIS_BENCHMARK_HINT, redis_xadd};
use super::proxy::{CpuMeter, Proxy, agent_section, route_section, toml_str};
use super::{Context, Report, StoreChoice, Target, bounded, histogram, random_hex, record};

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
    /// Also measure the peers in the same run: nginx static 200 under the same load, and
    /// `redis-benchmark` pipelined XADD.
    pub peer: bool,
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
            peer: false,
        }
    }
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
    report.param("peer", p.peer);

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
    if p.peer {
        peers(ctx, p, &signature::secret_bytes(&secret), &mut report).await?;
    }
    Ok(report)
}

/// Target from the issue: durable signed ingest at least 40% of nginx's static-200 rate.
const TARGET_VS_NGINX: f64 = 0.40;

/// The peers, after the proxy stopped so they have the machine to themselves as it had.
async fn peers(ctx: &Context, p: &Params, key: &[u8], report: &mut Report) -> anyhow::Result<()> {
    let ours = report.figures.iter().find(|f| f.name == "acks_per_s").map_or(0.0, |f| f.value);
    match Nginx::start()? {
        None => {
            let msg = format!("PEER SKIPPED: nginx is not installed ({NGINX_HINT}); no nginx comparison in this run");
            eprintln!("\n*** {msg} ***\n");
            report.notes.push(msg);
        }
        Some(nginx) => {
            eprintln!("ingest: same load against nginx (static 200) at {} ...", nginx.addr);
            let steal = super::StealMeter::start();
            let r = load(nginx.addr, &["/hooks/peer/in0".to_string()], key, p, 200).await;
            steal.finish(report, "nginx_");
            drop(nginx);
            let r = r.context("loading nginx")?;
            let secs = p.duration.as_secs_f64();
            let rate = r.acked as f64 / secs;
            report.figure("nginx_static200_per_s", rate, "200/s");
            report.latency("nginx_latency", &r.latencies, None);
            report.figure("nginx_errors", r.errors as f64, "count");
            if rate > 0.0 {
                report.figure_target("ingest_vs_nginx", ours / rate, "ratio", Target::AtLeast(TARGET_VS_NGINX));
            }
            if let Some(e) = r.first_error {
                report.notes.push(format!("nginx: first error: {e}"));
            }
        }
    }
    let url = match &ctx.store {
        StoreChoice::Redis(url) => url.clone(),
        StoreChoice::Embedded => "redis://127.0.0.1:6379".to_string(),
    };
    let n = if ctx.quick { 20_000 } else { 200_000 };
    eprintln!("ingest: redis-benchmark -P 16 -n {n} XADD (1 KiB) against {url} ...");
    match redis_xadd(&url, n, p.body_bytes, &format!("bench-stream-{}", random_hex(10))).await {
        Ok(Some(rate)) => {
            report.figure("redis_xadd_p16_per_s", rate, "XADD/s");
            if rate > 0.0 {
                report.figure("ingest_vs_redis_xadd", ours / rate, "ratio");
            }
        }
        Ok(None) => {
            let msg = format!("PEER SKIPPED: redis-benchmark is not installed ({REDIS_BENCHMARK_HINT})");
            eprintln!("\n*** {msg} ***\n");
            report.notes.push(msg);
        }
        Err(e) => {
            let msg = format!("PEER FAILED: redis-benchmark XADD against {url}: {e:#}");
            eprintln!("\n*** {msg} ***\n");
            report.notes.push(msg);
        }
    }
    Ok(())
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
    let paths: Vec<String> = (0..agents.len()).map(|i| format!("/hooks/{}/in{i}", agents[i])).collect();
    let r = load(proxy.http, &paths, &key, p, 202).await?;
    cpu.finish(report);
    proxy.check_alive()?;
    let secs = p.duration.as_secs_f64();
    report.figure("acks_per_s", r.acked as f64 / secs, "202/s");
    report.figure("mb_per_s", r.acked as f64 * p.body_bytes as f64 / secs / 1e6, "MB/s");
    report.latency("ack_latency", &r.latencies, None);
    report.figure("errors", r.errors as f64, "count");
    if let Some(e) = r.first_error {
        report.notes.push(format!("first error: {e}"));
    }
    Ok(())
}

/// What a closed-loop load phase counted.
pub struct LoadResult {
    /// Latencies (µs) of the answers counted.
    pub latencies: hdrhistogram::Histogram<u64>,
    /// Answers with the expected status inside the measured window.
    pub acked: u64,
    /// Other answers and transport errors.
    pub errors: u64,
    /// The first of those, for the notes.
    pub first_error: Option<String>,
}

/// `p.concurrency` closed-loop workers, one keep-alive connection each, POST signed webhooks
/// to `paths` (round-robin by worker) at `http` for the warm-up plus the measured duration;
/// answers with status `ok` inside the measured window are counted.
pub async fn load(http: SocketAddr, paths: &[String], key: &[u8], p: &Params, ok: u16) -> anyhow::Result<LoadResult> {
    let (paths, key, size) = (paths.to_vec(), key.to_vec(), p.body_bytes);
    let make = move |w: usize, i: u64| {
        let body = super::body((w as u64) << 40 | i, "ingest", size);
        let id = format!("msg_{w}_{i}");
        let ts = (concierge_protocol::now_ms() / 1000) as i64;
        let sig = signature::standard_sign(&key, &id, ts, &body);
        Request {
            path: paths[w % paths.len()].clone(),
            headers: vec![
                ("content-type", "application/json".into()),
                ("webhook-id", id),
                ("webhook-timestamp", ts.to_string()),
                ("webhook-signature", sig),
            ],
            body: Bytes::from(body),
        }
    };
    let shape = Shape { concurrency: p.concurrency, warmup: p.warmup, duration: p.duration };
    closed_loop(http, &shape, ok, Arc::new(make)).await
}

/// The size and length of a closed-loop load phase.
#[derive(Clone, Copy, Debug)]
pub struct Shape {
    /// Workers, one keep-alive connection each.
    pub concurrency: usize,
    /// Excluded from the figures, before the measured duration.
    pub warmup: Duration,
    /// Measured duration.
    pub duration: Duration,
}

/// One request of a closed-loop worker.
pub struct Request {
    /// Path to POST to.
    pub path: String,
    /// Headers to send.
    pub headers: Vec<(&'static str, String)>,
    /// The body.
    pub body: Bytes,
}

/// Makes request `i` of worker `w`.
pub type MakeRequest = Arc<dyn Fn(usize, u64) -> Request + Send + Sync>;

/// `shape.concurrency` closed-loop workers, one keep-alive connection each, POST what `make`
/// builds to `http` for the warm-up plus the measured duration; answers with status `ok`
/// inside the measured window are counted, every other answer or transport error is an error.
pub async fn closed_loop(http: SocketAddr, shape: &Shape, ok: u16, make: MakeRequest) -> anyhow::Result<LoadResult> {
    let begin = Instant::now();
    let measure_from = begin + shape.warmup;
    let end = measure_from + shape.duration;
    let mut workers = tokio::task::JoinSet::new();
    for w in 0..shape.concurrency.max(1) {
        let make = make.clone();
        workers.spawn(async move {
            let mut r = LoadResult { latencies: histogram(), acked: 0, errors: 0, first_error: None };
            let mut conn = Conn::connect(http).await?;
            let mut i = 0u64;
            loop {
                if Instant::now() >= end {
                    return anyhow::Ok(r);
                }
                i += 1;
                let req = make(w, i);
                let headers: Vec<(&str, &str)> = req.headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
                let started = Instant::now();
                let answer = conn.post(&req.path, &headers, req.body).await;
                let done = Instant::now();
                let counted = started >= measure_from && done <= end;
                match answer {
                    Ok(a) if a.status == ok => {
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
    let mut total = LoadResult { latencies: histogram(), acked: 0, errors: 0, first_error: None };
    let limit = shape.warmup + shape.duration + Duration::from_secs(60);
    bounded("the load workers", limit, async {
        while let Some(r) = workers.join_next().await {
            let r = r.context("worker panicked")??;
            total.latencies.add(&r.latencies).context("merging histograms")?;
            total.acked += r.acked;
            total.errors += r.errors;
            if total.first_error.is_none() {
                total.first_error = r.first_error;
            }
        }
        anyhow::Ok(())
    })
    .await?;
    Ok(total)
}
