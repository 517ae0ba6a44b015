//! `e2e` (warm-path latency; `latency` is its old name, still accepted): one connected SDK
//! agent; signed 1 KiB webhooks sent open-loop at a fixed rate. Every request has a scheduled
//! send time computed from the start (`start + i / rate`); latencies are measured from that
//! time, not from when the request actually left, so a stall of the proxy shows up in full
//! instead of silently slowing the sender (coordinated omission). Events are matched to
//! requests by a sequence number in the body. Reports webhook-sent -> agent-received and
//! webhook-sent -> HTTP 202.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use bytes::Bytes;
use concierge_adapters::signature;
use concierge_protocol::client::AgentClient;
use tokio::sync::Semaphore;

use super::http::Conn;
use super::proxy::{CpuMeter, Proxy, agent_section, route_section, toml_str};
use super::{Context, Report, bounded, histogram, random_hex, record};

/// Parameters of the e2e scenario.
#[derive(Clone, Debug)]
pub struct Params {
    /// Webhooks per second.
    pub rate: u64,
    /// Measured duration.
    pub duration: Duration,
    /// Size of each webhook body.
    pub body_bytes: usize,
    /// Most requests in flight (keep-alive connections opened on demand up to this).
    pub connections: usize,
    /// The agent acks after every this many events.
    pub ack_every: u64,
    /// Requests sent (at the same rate) before measuring, to warm connections and caches.
    pub warmup: u64,
}

impl Params {
    /// The sizes, or smoke sizes.
    pub fn defaults(quick: bool) -> Self {
        Self {
            rate: 1000,
            duration: Duration::from_secs(if quick { 2 } else { 10 }),
            body_bytes: 1024,
            connections: 64,
            ack_every: 1,
            warmup: if quick { 100 } else { 500 },
        }
    }
}

/// Target of the issue: p99 webhook -> agent below 2 ms.
const TARGET_P99_MS: f64 = 2.0;

struct Timings {
    /// When the agent received sequence i.
    received: Vec<Option<Instant>>,
    /// When the 202 for sequence i arrived, or the status if it was not a 202.
    answered: Vec<Option<Result<Instant, u16>>>,
    /// When the request for sequence i actually started (timer slop and queueing excluded).
    sent: Vec<Option<Instant>>,
}

/// Runs the scenario.
pub async fn run(ctx: &Context, p: &Params) -> anyhow::Result<Report> {
    let mut report = Report::new("e2e", ctx);
    report.param("rate_per_s", p.rate);
    report.param("duration_s", p.duration.as_secs_f64());
    report.param("body_bytes", p.body_bytes as u64);
    report.param("max_connections", p.connections as u64);
    report.param("ack_every", p.ack_every);
    report.param("warmup_requests", p.warmup);
    report.param("verify", "standard");

    let agent = format!("bench-{}", random_hex(10));
    let token = random_hex(32);
    let secret = format!("whsec_{}", base64_random());
    let measured = (p.rate as f64 * p.duration.as_secs_f64()).round() as u64;
    let config =
        agent_section(&agent, &token, 4096, (p.warmup + measured) * 2 + 1024, "driver = \"none\"\npolicy = \"never\"")
            + &route_section("lat", &agent, "standard", &format!("secret = {}", toml_str(&secret)));
    let mut proxy = Proxy::start(&ctx.concierge, &ctx.store, &config, vec![agent.clone()])?;
    let result = measure(&mut proxy, &agent, &token, &secret, p, measured, &mut report).await;
    let result = result.map_err(|e| e.context(format!("e2e failed; proxy log tail:\n{}", proxy.log())));
    proxy.stop().await?;
    result?;
    Ok(report)
}

/// 24 random bytes, base64: a Standard Webhooks secret.
pub fn base64_random() -> String {
    use base64::Engine as _;
    let bytes: [u8; 24] = rand::random();
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

async fn measure(
    proxy: &mut Proxy,
    agent: &str,
    token: &str,
    secret: &str,
    p: &Params,
    measured: u64,
    report: &mut Report,
) -> anyhow::Result<()> {
    let total = (p.warmup + measured) as usize;
    let timings = Arc::new(Mutex::new(Timings {
        received: vec![None; total],
        answered: vec![None; total],
        sent: vec![None; total],
    }));

    // The agent: records when each sequence number arrives.
    let mut client = AgentClient::connect(proxy.client_options(agent, token, 4096)).await.context("agent connect")?;
    let receiver = {
        let timings = timings.clone();
        let ack_every = p.ack_every.max(1);
        tokio::spawn(async move {
            let mut got = 0usize;
            let mut since_ack = 0;
            let mut unmatched = 0u64;
            while got < total {
                let Some(event) = client.next().await? else { break };
                let now = Instant::now();
                match super::body_seq(&event.data.raw).filter(|&s| (s as usize) < total) {
                    Some(seq) => {
                        let mut t = timings.lock().unwrap_or_else(|e| e.into_inner());
                        if t.received[seq as usize].is_none() {
                            t.received[seq as usize] = Some(now);
                            got += 1;
                        }
                    }
                    None => unmatched += 1,
                }
                since_ack += 1;
                if since_ack >= ack_every {
                    client.ack(event.offset);
                    since_ack = 0;
                }
            }
            anyhow::Ok((client, unmatched))
        })
    };

    // The open-loop sender.
    let key = signature::secret_bytes(secret);
    let timings_for_sender = timings.clone();
    let path: Arc<str> = format!("/hooks/{agent}/lat").into();
    let pool: Arc<Mutex<Vec<Conn>>> = Arc::default();
    let permits = Arc::new(Semaphore::new(p.connections.max(1)));
    let interval = Duration::from_secs_f64(1.0 / p.rate.max(1) as f64);
    eprintln!("e2e: {} warm-up + {measured} requests at {}/s ...", p.warmup, p.rate);
    let cpu = CpuMeter::start(proxy).await;
    let start = Instant::now() + Duration::from_millis(20);
    // The schedule runs on a thread of its own: tokio's timer has 1 ms granularity, which would
    // add up to a millisecond of generator lag to every request; a thread's sleep is accurate to
    // tens of microseconds, and the request itself runs on the runtime.
    let runtime = tokio::runtime::Handle::current();
    let (handles_tx, mut handles) = tokio::sync::mpsc::unbounded_channel();
    let http = proxy.http;
    let size = p.body_bytes;
    let scheduler = std::thread::spawn(move || {
        for i in 0..total {
            let scheduled = start + interval.mul_f64(i as f64);
            let now = Instant::now();
            if scheduled > now {
                std::thread::sleep(scheduled - now);
            }
            let r = Request {
                i,
                http,
                size,
                pool: pool.clone(),
                permits: permits.clone(),
                timings: timings_for_sender.clone(),
                path: path.clone(),
                key: key.clone(),
            };
            if handles_tx.send(runtime.spawn(r.run())).is_err() {
                return;
            }
        }
    });
    let mut send_errors = 0u64;
    while let Some(h) = handles.recv().await {
        if h.await.context("request task panicked")?.is_err() {
            send_errors += 1;
        }
    }
    let send_span = start.elapsed();
    cpu.finish(report);
    scheduler.join().map_err(|_| anyhow::anyhow!("the scheduler thread panicked"))?;
    // Everything acknowledged must arrive; wait a bounded time for the stragglers.
    let (client, unmatched) = match bounded("agent receiving every event", Duration::from_secs(30), async {
        receiver.await.context("receiver panicked")?
    })
    .await
    {
        Ok(r) => (Some(r.0), r.1),
        Err(e) => {
            report.notes.push(format!("{e:#}"));
            (None, 0)
        }
    };
    if let Some(c) = client {
        c.close().await;
    }

    let t = timings.lock().unwrap_or_else(|e| e.into_inner());
    let mut to_agent = histogram();
    let mut to_202 = histogram();
    let mut from_send = histogram();
    let mut send_lag = histogram();
    let (mut lost, mut http_errors) = (0u64, 0u64);
    for i in p.warmup as usize..total {
        let scheduled = start + interval.mul_f64(i as f64);
        match t.answered[i] {
            Some(Ok(at)) => record(&mut to_202, at.saturating_duration_since(scheduled)),
            _ => http_errors += 1,
        }
        if let Some(sent) = t.sent[i] {
            record(&mut send_lag, sent.saturating_duration_since(scheduled));
            if let Some(at) = t.received[i] {
                record(&mut from_send, at.saturating_duration_since(sent));
            }
        }
        match t.received[i] {
            Some(at) => record(&mut to_agent, at.saturating_duration_since(scheduled)),
            None if matches!(t.answered[i], Some(Ok(_))) => lost += 1,
            None => {}
        }
    }
    report.figure("achieved_rate_per_s", total as f64 / send_span.as_secs_f64(), "req/s");
    report.latency("webhook_to_agent", &to_agent, Some(TARGET_P99_MS));
    report.latency("webhook_to_202", &to_202, None);
    // For reading the figures above: how late the generator itself started requests (tokio's
    // 1 ms timer, task scheduling on a shared machine), and the latency from the actual start.
    report.latency("generator_send_lag", &send_lag, None);
    report.latency("actual_send_to_agent", &from_send, None);
    report.figure("http_errors", http_errors as f64, "count");
    report.figure("acked_but_not_received", lost as f64, "count");
    if send_errors > 0 || unmatched > 0 {
        report.notes.push(format!("{send_errors} requests failed at the HTTP level; {unmatched} unmatched events"));
    }
    Ok(())
}

/// One scheduled webhook.
struct Request {
    i: usize,
    http: std::net::SocketAddr,
    size: usize,
    pool: Arc<Mutex<Vec<Conn>>>,
    permits: Arc<Semaphore>,
    timings: Arc<Mutex<Timings>>,
    path: Arc<str>,
    key: Vec<u8>,
}

impl Request {
    async fn run(self) -> anyhow::Result<()> {
        let i = self.i;
        let _permit = self.permits.acquire_owned().await?;
        let conn = self.pool.lock().unwrap_or_else(|e| e.into_inner()).pop();
        let mut conn = match conn {
            Some(c) => c,
            None => Conn::connect(self.http).await?,
        };
        let body = super::body(i as u64, "latency", self.size);
        let id = format!("msg_{i}");
        let ts = (concierge_protocol::now_ms() / 1000) as i64;
        let sig = signature::standard_sign(&self.key, &id, ts, &body);
        let ts = ts.to_string();
        let headers = [
            ("content-type", "application/json"),
            ("webhook-id", id.as_str()),
            ("webhook-timestamp", ts.as_str()),
            ("webhook-signature", sig.as_str()),
        ];
        let sent = Instant::now();
        let answer = conn.post(&self.path, &headers, Bytes::from(body)).await;
        let now = Instant::now();
        let status = answer.as_ref().map(|a| a.status).unwrap_or(0);
        {
            let mut t = self.timings.lock().unwrap_or_else(|e| e.into_inner());
            t.answered[i] = Some(if status == 202 { Ok(now) } else { Err(status) });
            t.sent[i] = Some(sent);
        }
        if answer.is_ok() {
            self.pool.lock().unwrap_or_else(|e| e.into_inner()).push(conn);
        }
        answer.map(|_| ())
    }
}
