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
//!
//! Then the storm (issue 7: "M sleeping agents each get an event at once"), on its own proxy:
//! M agents with the `http` wake driver pointed at a tiny HTTP server in this process. A wake
//! POST for agent X is answered 200 at once and starts an in-process SDK [`AgentClient`] for X
//! (no process per agent: the proxy is measured, not process start-up), which receives the
//! event, acks it and records the instant. One webhook per agent is then POSTed as fast as
//! `storm_connections` keep-alive connections allow. Reported: first POST -> last agent has
//! its event, and per wake from `last_wake` (`GET /api/agents/<id>`) the proxy-added overhead
//! `driver_called_after_ms + (first_delivery_after_ms - connected_after_ms)`, target p99 < 5 ms.
//! An agent without its event after `storm_limit` fails the run, naming it.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU8, AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use bytes::Bytes;
use concierge_protocol::client::{AgentClient, ClientOptions};
use serde_json::Value;
use tokio::sync::mpsc;

use super::hold::raise_nofile;
use super::http::Conn;
use super::proxy::{CpuMeter, Proxy, agent_section, delete_matching, route_section, toml_str};
use super::{Context, Report, StoreChoice, Target, bounded, histogram, random_hex};

/// Parameters of the wake scenario.
#[derive(Clone, Debug)]
pub struct Params {
    /// Wake rounds.
    pub wakes: u32,
    /// The agent's `sleep_after`.
    pub sleep_after: Duration,
    /// Size of each webhook body.
    pub body_bytes: usize,
    /// Agents woken at once in the storm phase (0 skips it).
    pub agents: usize,
    /// Webhook POSTs in flight during the storm, one keep-alive connection each.
    pub storm_connections: usize,
    /// SDK clients handshaking at once in the load generator (its CPU is shared with the proxy).
    pub connect_concurrency: usize,
    /// Every storm agent must have its event this long after the first POST, else the run fails.
    pub storm_limit: Duration,
}

impl Params {
    /// The sizes, or smoke sizes.
    pub fn defaults(quick: bool) -> Self {
        Self {
            wakes: if quick { 5 } else { 30 },
            sleep_after: Duration::from_millis(200),
            body_bytes: 1024,
            agents: if quick { 10 } else { 1000 },
            storm_connections: 64,
            connect_concurrency: 64,
            storm_limit: Duration::from_secs(if quick { 30 } else { 120 }),
        }
    }
}

/// Targets of the issue.
const TARGET_DRIVER_P99_MS: f64 = 1.0;
const TARGET_HELLO_TO_DELIVERY_P50_MS: f64 = 5.0;
/// Issue 7: proxy-added overhead per wake in a 1,000-agent storm, p99.
const TARGET_STORM_OVERHEAD_P99_MS: f64 = 5.0;

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
    if p.agents > 0 {
        storm(ctx, p, &mut report).await?;
    }
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
        "driver_called_after_ms runs from the ingress's receive instant to just before the driver call \
         (proxy wake.rs Input::DriverCalled); event_to_reply bounds the real end-to-end cost"
            .into(),
    );
    report.notes.push(
        "connected_* is dominated by starting the agent process; the proxy's share is driver_called and hello_to_first_delivery"
            .into(),
    );
    Ok(())
}

/// Per-agent state of a storm agent, as seen by the wake server and its SDK client.
const IDLE: u8 = 0;
const RUNNING: u8 = 1;
const DONE: u8 = 2;

/// How long one SDK client may take to connect, then to get its event.
const CONNECT_LIMIT: Duration = Duration::from_secs(20);
const EVENT_LIMIT: Duration = Duration::from_secs(30);
/// Body size of each storm webhook (small: the storm is about wakes, not bytes).
const STORM_BODY: usize = 256;
/// Admin API reads in flight while collecting `last_wake`.
const ADMIN_CONCURRENCY: usize = 16;

/// What the wake server and the storm's SDK clients share.
struct Storm {
    ids: Vec<String>,
    tokens: Vec<String>,
    index: HashMap<String, usize>,
    state: Vec<AtomicU8>,
    wake_posts: Vec<AtomicU32>,
    errors: Mutex<HashMap<usize, String>>,
    options: OnceLock<ClientOptions>,
    connecting: tokio::sync::Semaphore,
    clients: Mutex<Vec<AgentClient>>,
    received: mpsc::UnboundedSender<(usize, Instant)>,
}

impl Storm {
    /// A wake POST from the proxy's `http` driver: answer at once, start agent X's client.
    fn on_wake(self: &Arc<Self>, body: &[u8]) -> axum::http::StatusCode {
        use axum::http::StatusCode;
        let Ok(v) = serde_json::from_slice::<Value>(body) else { return StatusCode::BAD_REQUEST };
        let Some(&i) = v["agent"].as_str().and_then(|a| self.index.get(a)) else { return StatusCode::NOT_FOUND };
        self.wake_posts[i].fetch_add(1, Ordering::Relaxed);
        if self.state[i].compare_exchange(IDLE, RUNNING, Ordering::AcqRel, Ordering::Acquire).is_ok() {
            let storm = self.clone();
            tokio::spawn(async move {
                if let Err(e) = storm.receive(i).await {
                    storm.errors.lock().unwrap_or_else(|e| e.into_inner()).insert(i, format!("{e:#}"));
                    // A later wake retry of the proxy may start it again.
                    storm.state[i].store(IDLE, Ordering::Release);
                }
            });
        }
        StatusCode::OK
    }

    /// Agent `i`: connect (bounded parallelism), take the event, ack it, record the instant.
    async fn receive(&self, i: usize) -> anyhow::Result<()> {
        let mut opts = self.options.get().cloned().context("woken before the proxy was ready")?;
        opts.agent = self.ids[i].clone();
        opts.token = self.tokens[i].clone();
        let mut client = {
            let _permit = self.connecting.acquire().await?;
            tokio::time::timeout(CONNECT_LIMIT, AgentClient::connect(opts))
                .await
                .map_err(|_| anyhow::anyhow!("SDK connect did not finish within {CONNECT_LIMIT:?}"))?
                .context("SDK connect")?
        };
        let event = tokio::time::timeout(EVENT_LIMIT, client.next())
            .await
            .map_err(|_| anyhow::anyhow!("connected, but no event within {EVENT_LIMIT:?}"))?
            .context("receiving")?
            .context("the session ended before an event")?;
        let at = Instant::now();
        if super::body_seq(&event.data.raw) != Some(i as u64) {
            anyhow::bail!("received someone else's event (offset {})", event.offset);
        }
        client.ack(event.offset);
        self.state[i].store(DONE, Ordering::Release);
        let _ = self.received.send((i, at));
        self.clients.lock().unwrap_or_else(|e| e.into_inner()).push(client);
        Ok(())
    }

    /// One line per agent that has no event: wake POSTs seen, client state, last error.
    fn describe_missing(&self, got: &[Option<Instant>]) -> String {
        let errors = self.errors.lock().unwrap_or_else(|e| e.into_inner());
        let missing: Vec<usize> = (0..got.len()).filter(|&i| got[i].is_none()).collect();
        let mut out: Vec<String> = missing
            .iter()
            .take(20)
            .map(|&i| {
                let state = match self.state[i].load(Ordering::Acquire) {
                    IDLE => "no client running",
                    RUNNING => "client connecting or waiting",
                    _ => "received",
                };
                format!(
                    "{}: wake POSTs received {}, {state}, last error: {}",
                    self.ids[i],
                    self.wake_posts[i].load(Ordering::Relaxed),
                    errors.get(&i).map_or("none", String::as_str)
                )
            })
            .collect();
        if missing.len() > out.len() {
            out.push(format!("... and {} more", missing.len() - out.len()));
        }
        out.join("\n")
    }
}

/// The storm phase: its own proxy with `p.agents` http-driver agents, woken all at once.
async fn storm(ctx: &Context, p: &Params, report: &mut Report) -> anyhow::Result<()> {
    let m = p.agents;
    report.param("storm_agents", m as u64);
    report.param("storm_connections", p.storm_connections as u64);
    report.param("storm_connect_concurrency", p.connect_concurrency as u64);
    report.param("storm_driver", "http -> in-process SDK client");
    report.param("storm_verify", "none");
    // Here: one UDP socket per SDK client plus the wake server's connections; the proxy
    // (inheriting the limit): one driver connection per agent.
    let want = (2 * m + 1024) as u64;
    let nofile = raise_nofile(want);
    report.param("nofile", nofile);
    if nofile < want {
        report.notes.push(format!("RLIMIT_NOFILE is {nofile}, below the ~{want} descriptors the storm needs"));
    }

    let prefix = format!("storm-{}-", random_hex(8));
    let ids: Vec<String> = (0..m).map(|i| format!("{prefix}{i:05}")).collect();
    let tokens: Vec<String> = (0..m).map(|_| random_hex(32)).collect();
    let (tx, mut received) = mpsc::unbounded_channel();
    let shared = Arc::new(Storm {
        index: ids.iter().enumerate().map(|(i, a)| (a.clone(), i)).collect(),
        ids: ids.clone(),
        tokens: tokens.clone(),
        state: (0..m).map(|_| AtomicU8::new(IDLE)).collect(),
        wake_posts: (0..m).map(|_| AtomicU32::new(0)).collect(),
        errors: Mutex::default(),
        options: OnceLock::new(),
        connecting: tokio::sync::Semaphore::new(p.connect_concurrency.max(1)),
        clients: Mutex::default(),
        received: tx,
    });
    let server_state = shared.clone();
    let app = axum::Router::new().fallback(move |body: axum::body::Bytes| {
        let s = server_state.clone();
        async move { s.on_wake(&body) }
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let wake_url = format!("http://{}/wake", listener.local_addr()?);
    let server = tokio::spawn(async move { axum::serve(listener, app).await });

    let wake = format!(
        "driver = \"http\"\nurl = {}\ntimeout = \"10s\"\npolicy = \"immediate\"\nconnect_timeout = \"30s\"",
        toml_str(&wake_url)
    );
    let mut config = String::with_capacity(m * 300);
    for (i, (id, token)) in ids.iter().zip(&tokens).enumerate() {
        config += &agent_section(id, token, 64, 1024, &wake);
        config += &route_section(&format!("s{i}"), id, "none", "");
    }
    eprintln!("wake-storm: starting a proxy with {m} http-driver agents ...");
    // No per-agent key clean-up by the proxy handle: one prefix walk below instead.
    let result = match Proxy::start(&ctx.concierge, &ctx.store, &config, Vec::new()) {
        Ok(mut proxy) => {
            let r = storm_measure(&mut proxy, &shared, &mut received, p, report).await;
            let r = r.map_err(|e| e.context(format!("wake storm failed; proxy log tail:\n{}", proxy.log())));
            close_clients(&shared).await;
            proxy.stop().await?;
            r
        }
        Err(e) => Err(e),
    };
    server.abort();
    if let StoreChoice::Redis(url) = &ctx.store {
        let deleted =
            delete_matching(url, &format!("c:{{{prefix}*")).await.context("deleting the storm's Redis keys")?;
        eprintln!("wake-storm: deleted {deleted} Redis keys under c:{{{prefix}*");
    }
    result
}

async fn close_clients(shared: &Storm) {
    let clients = std::mem::take(&mut *shared.clients.lock().unwrap_or_else(|e| e.into_inner()));
    let mut closing = tokio::task::JoinSet::new();
    for c in clients {
        closing.spawn(async move {
            let _ = tokio::time::timeout(Duration::from_secs(2), c.close()).await;
        });
    }
    let _ = tokio::time::timeout(Duration::from_secs(30), async { while closing.join_next().await.is_some() {} }).await;
}

async fn storm_measure(
    proxy: &mut Proxy,
    shared: &Arc<Storm>,
    received: &mut mpsc::UnboundedReceiver<(usize, Instant)>,
    p: &Params,
    report: &mut Report,
) -> anyhow::Result<()> {
    let m = shared.ids.len();
    let _ = shared.options.set(proxy.client_options("", "", 64));

    // Connections first, so the clock starts with the first POST, not with TCP handshakes.
    let n_conns = p.storm_connections.clamp(1, m.max(1));
    let http = proxy.http;
    let conns = bounded("connecting the storm's POST connections", Duration::from_secs(20), async {
        let mut conns = Vec::with_capacity(n_conns);
        for _ in 0..n_conns {
            conns.push(Conn::connect(http).await?);
        }
        anyhow::Ok(conns)
    })
    .await?;
    let paths: Arc<Vec<String>> =
        Arc::new(shared.ids.iter().enumerate().map(|(i, a)| format!("/hooks/{a}/s{i}")).collect());
    let next = Arc::new(AtomicUsize::new(0));
    eprintln!("wake-storm: one webhook to each of {m} sleeping agents over {n_conns} connections ...");
    let cpu = CpuMeter::start(proxy).await;
    let started = Instant::now();
    let mut posting = tokio::task::JoinSet::new();
    for mut conn in conns {
        let (paths, next) = (paths.clone(), next.clone());
        posting.spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(path) = paths.get(i) else { return anyhow::Ok(()) };
                let body = Bytes::from(super::body(i as u64, "storm", STORM_BODY));
                let a = conn.post(path, &[("content-type", "application/json")], body).await?;
                if a.status != 202 {
                    anyhow::bail!("webhook {path} answered {}: {}", a.status, String::from_utf8_lossy(&a.body));
                }
            }
        });
    }
    bounded("posting the storm's webhooks", p.storm_limit, async {
        while let Some(r) = posting.join_next().await {
            r.context("a posting task panicked")??;
        }
        anyhow::Ok(())
    })
    .await?;
    let posted = started.elapsed();

    // Every agent's event, bounded; a missing one fails the run by name.
    let deadline = started + p.storm_limit;
    let mut got: Vec<Option<Instant>> = vec![None; m];
    let mut ok = 0;
    while ok < m {
        let now = Instant::now();
        if now >= deadline {
            anyhow::bail!(
                "{} of {m} agents never received their event within {:?} of the first POST:\n{}",
                m - ok,
                p.storm_limit,
                shared.describe_missing(&got)
            );
        }
        match tokio::time::timeout((deadline - now).min(Duration::from_secs(1)), received.recv()).await {
            Ok(Some((i, at))) => {
                if got[i].replace(at).is_none() {
                    ok += 1;
                }
            }
            Ok(None) => anyhow::bail!("the storm's receipt channel closed"),
            Err(_) => proxy.check_alive()?,
        }
    }
    // cpu_*_cores: first POST -> last event received (the SDK clients run in the load generator).
    cpu.finish(report);
    let last = got.iter().flatten().max().copied().unwrap_or(started);
    let all_delivered = last.saturating_duration_since(started);
    eprintln!(
        "wake-storm: all {m} events delivered {:.1} ms after the first POST; reading last_wake ...",
        all_delivered.as_secs_f64() * 1000.0
    );

    let wakes = read_last_wakes(proxy, &shared.ids).await?;
    let us = |ms: f64| (ms.max(0.0) * 1000.0).round().max(1.0) as u64;
    let (mut driver, mut hello, mut overhead, mut agent_side) = (histogram(), histogram(), histogram(), histogram());
    for &(d, c, f) in &wakes {
        driver.saturating_record(us(d));
        hello.saturating_record(us(f - c));
        overhead.saturating_record(us(d + (f - c).max(0.0)));
        agent_side.saturating_record(us(c - d));
    }
    let ms = |h: &hdrhistogram::Histogram<u64>, q: f64| h.value_at_quantile(q) as f64 / 1000.0;
    let max = |h: &hdrhistogram::Histogram<u64>| h.max() as f64 / 1000.0;
    report.figure("storm_agents", m as f64, "count");
    report.figure("storm_wakes_ok", ok as f64, "count");
    report.figure("storm_all_delivered_ms", all_delivered.as_secs_f64() * 1000.0, "ms");
    report.figure("storm_posts_ms", posted.as_secs_f64() * 1000.0, "ms");
    report.figure("storm_driver_called_p50", ms(&driver, 0.5), "ms");
    report.figure("storm_driver_called_p99", ms(&driver, 0.99), "ms");
    report.figure("storm_driver_called_max", max(&driver), "ms");
    report.figure("storm_hello_to_first_delivery_p50", ms(&hello, 0.5), "ms");
    report.figure("storm_hello_to_first_delivery_p99", ms(&hello, 0.99), "ms");
    report.figure("storm_hello_to_first_delivery_max", max(&hello), "ms");
    report.figure("storm_overhead_p50", ms(&overhead, 0.5), "ms");
    report.figure_target("storm_overhead_p99", ms(&overhead, 0.99), "ms", Target::Below(TARGET_STORM_OVERHEAD_P99_MS));
    report.figure("storm_overhead_max", max(&overhead), "ms");
    report.figure("storm_wake_p50", ms(&agent_side, 0.5), "ms");
    report.figure("storm_wake_p99", ms(&agent_side, 0.99), "ms");
    report.histograms.push(("storm_overhead".into(), overhead));
    report.notes.push(
        "storm_overhead = driver_called_after_ms + (first_delivery_after_ms - connected_after_ms) per wake: \
         event received -> driver called, plus agent Hello -> first event delivered"
            .into(),
    );
    report.notes.push(
        "storm_wake_* is driver called -> agent Hello (connected_after_ms - driver_called_after_ms): the wake POST, \
         the in-process SDK client's QUIC handshake, and the load generator's queue for it (context, not proxy overhead)"
            .into(),
    );
    Ok(())
}

/// `last_wake` timings `(driver_called, connected, first_delivery)` of every agent, from
/// `GET /api/agents/<id>` with bounded concurrency; each agent's first delivery must be
/// recorded within a few seconds.
async fn read_last_wakes(proxy: &Proxy, ids: &[String]) -> anyhow::Result<Vec<(f64, f64, f64)>> {
    let client = reqwest::Client::new();
    let sem = Arc::new(tokio::sync::Semaphore::new(ADMIN_CONCURRENCY));
    let mut tasks = tokio::task::JoinSet::new();
    for id in ids {
        let (client, sem) = (client.clone(), sem.clone());
        let url = format!("http://{}/api/agents/{id}", proxy.admin);
        let id = id.clone();
        tasks.spawn(async move {
            let _permit = sem.acquire_owned().await?;
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                let v: Value = client.get(&url).send().await?.error_for_status()?.json().await?;
                let w = &v["last_wake"];
                let field = |k: &str| w[k].as_f64();
                if w["outcome"] == "connected"
                    && let (Some(d), Some(c), Some(f)) =
                        (field("driver_called_after_ms"), field("connected_after_ms"), field("first_delivery_after_ms"))
                {
                    return anyhow::Ok((d, c, f));
                }
                if Instant::now() > deadline {
                    anyhow::bail!("agent {id}: last_wake lacks a connected wake with its first delivery: {w}");
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        });
    }
    let limit = Duration::from_secs(60) + Duration::from_millis(10 * ids.len() as u64);
    bounded("reading last_wake of the storm's agents", limit, async {
        let mut out = Vec::with_capacity(ids.len());
        while let Some(r) = tasks.join_next().await {
            out.push(r.context("an admin read task panicked")??);
        }
        anyhow::Ok(out)
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_agents_are_named_with_their_state() {
        let (tx, _rx) = mpsc::unbounded_channel();
        let ids: Vec<String> = (0..3).map(|i| format!("a{i}")).collect();
        let storm = Storm {
            index: ids.iter().enumerate().map(|(i, a)| (a.clone(), i)).collect(),
            tokens: vec![String::new(); 3],
            ids,
            state: (0..3).map(|_| AtomicU8::new(IDLE)).collect(),
            wake_posts: (0..3).map(|_| AtomicU32::new(0)).collect(),
            errors: Mutex::default(),
            options: OnceLock::new(),
            connecting: tokio::sync::Semaphore::new(1),
            clients: Mutex::default(),
            received: tx,
        };
        storm.wake_posts[2].store(2, Ordering::Relaxed);
        storm.errors.lock().unwrap().insert(2, "SDK connect: refused".into());
        let text = storm.describe_missing(&[None, Some(Instant::now()), None]);
        assert!(text.contains("a0: wake POSTs received 0, no client running, last error: none"), "{text}");
        assert!(text.contains("a2: wake POSTs received 2") && text.contains("SDK connect: refused"), "{text}");
        assert!(!text.contains("a1"), "{text}");
    }
}
