//! `smtp`: inbound SMTP acceptance. `sessions` concurrent sessions each say EHLO once, then
//! per message send MAIL FROM / RCPT TO / DATA (pipelined, as the proxy and Postfix both
//! advertise PIPELINING), the message, and wait for the 250 after the final dot — the server's
//! word that the message is durably stored — before the next. Measures messages/s and the
//! per-message latency (MAIL FROM sent -> final 250).
//!
//! The peer, side by side in the same run: a private Postfix instance ([`super::peer::Postfix`],
//! whose cleanup fsyncs each queue file before smtpd answers 250) under the same load, rounds
//! interleaved (ours, Postfix, ours, ...) so both see the same machine. With `--store redis`
//! the proxy uses a private `redis-server` with `appendonly yes` and `appendfsync always`
//! (or `--appendfsync everysec`), so the ratio is at equal durability; with the embedded store
//! SQLite commits with `synchronous=FULL`. No Postfix (or not root): only that comparison is
//! skipped, loudly, with the install command.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use hdrhistogram::Histogram;
use tokio::io::{AsyncBufReadExt as _, AsyncWriteExt as _, BufReader};
use tokio::net::TcpStream;

use super::channel::{agent_config, wait_listening};
use super::peer::{POSTFIX_HINT, Postfix};
use super::proxy::{PrivateRedis, Proxy, free_port, toml_str};
use super::{Context, Report, StoreChoice, Target, bounded, histogram, random_hex, record};

/// Parameters of the smtp scenario.
#[derive(Clone, Debug)]
pub struct Params {
    /// Concurrent sessions.
    pub sessions: usize,
    /// Messages per measurement (spread over the sessions).
    pub messages: usize,
    /// Size of each message's body in bytes.
    pub bytes: usize,
    /// Measurements of each server, interleaved.
    pub rounds: usize,
    /// `appendfsync` of the private Redis with `--store redis` (`always`, `everysec`).
    pub appendfsync: String,
    /// Also measure Postfix (when installed and root).
    pub peer: bool,
}

impl Params {
    /// The script's sizes, or smoke sizes.
    pub fn defaults(quick: bool) -> Self {
        Self {
            sessions: 10,
            messages: if quick { 200 } else { 4000 },
            bytes: 10 * 1024,
            rounds: 1,
            appendfsync: "always".into(),
            peer: true,
        }
    }
}

/// The target: at least Postfix's rate at equal durability.
const TARGET_VS_POSTFIX: f64 = 1.0;
const RCPT: &str = "support@example.com";

/// Runs the scenario.
pub async fn run(ctx: &Context, p: &Params) -> anyhow::Result<Report> {
    let mut report = Report::new("smtp", ctx);
    report.param("sessions", p.sessions as u64);
    report.param("messages", p.messages as u64);
    report.param("bytes", p.bytes as u64);
    report.param("rounds", p.rounds as u64);
    let run_id = random_hex(10);
    let agent = format!("smtp-{run_id}");

    // Redis: a private one with the AOF fsync policy the comparison needs.
    let redis = match &ctx.store {
        StoreChoice::Redis(_) => {
            report.param("redis", format!("private, appendonly yes, appendfsync {}", p.appendfsync));
            Some(PrivateRedis::start(Some(&p.appendfsync))?)
        }
        StoreChoice::Embedded => None,
    };
    let store = match &redis {
        Some(r) => StoreChoice::Redis(r.url()),
        None => StoreChoice::Embedded,
    };
    let port = free_port()?;
    let cap = p.sessions + 100;
    let config = agent_config(&agent)
        + &format!(
            "[smtp]\nlisten = \"127.0.0.1:{port}\"\nhostname = \"mx.example.com\"\ndomains = [\"example.com\"]\n\
             greeting_delay = \"0s\"\nmax_connections = {cap}\nmax_connections_per_ip = {cap}\n\n\
             [smtp.addresses]\nsupport = {}\n\n",
            toml_str(&agent)
        );
    let mut proxy = Proxy::start(&ctx.concierge, &store, &config, vec![agent.clone()])?;
    let ours: SocketAddr = format!("127.0.0.1:{port}").parse()?;
    let result = async {
        wait_listening(ours, Duration::from_secs(20)).await?;
        let postfix = if p.peer { start_postfix(&mut report) } else { None };
        if let Some(pf) = &postfix {
            report.param("peer", format!("postfix at {}", pf.addr));
        }
        let mut load = Load { run_id: run_id.clone(), batch: 0 };
        // Warm-up of both, not counted.
        let warm = Params { messages: (p.messages / 10).max(p.sessions), ..p.clone() };
        load.measure(ours, &warm).await?;
        if let Some(pf) = &postfix {
            load.measure(pf.addr, &warm).await?;
        }
        let (mut ours_h, mut peer_h) = (histogram(), histogram());
        let (mut ours_rates, mut peer_rates) = (Vec::new(), Vec::new());
        let (mut ours_errors, mut peer_errors) = (0, 0);
        for round in 1..=p.rounds.max(1) {
            eprintln!("smtp: round {round}: {} messages x {} bytes, {} sessions ...", p.messages, p.bytes, p.sessions);
            let r = load.measure(ours, p).await?;
            proxy.check_alive()?;
            ours_h.add(&r.latencies).context("merging histograms")?;
            ours_rates.push(r.rate());
            ours_errors += r.failed;
            if let Some(e) = r.first_error {
                report.notes.push(format!("concierge, round {round}: {e}"));
            }
            if let Some(pf) = &postfix {
                let r = load.measure(pf.addr, p).await?;
                peer_h.add(&r.latencies).context("merging histograms")?;
                peer_rates.push(r.rate());
                peer_errors += r.failed;
                if let Some(e) = r.first_error {
                    report.notes.push(format!("postfix, round {round}: {e}"));
                }
            }
        }
        let ours_rate = mean(&ours_rates);
        report.figure("messages_per_s", ours_rate, "messages/s");
        report.latency("message_latency", &ours_h, None);
        report.figure("errors", ours_errors as f64, "count");
        if postfix.is_some() {
            let peer_rate = mean(&peer_rates);
            report.figure("postfix_messages_per_s", peer_rate, "messages/s");
            report.latency("postfix_message_latency", &peer_h, None);
            report.figure("postfix_errors", peer_errors as f64, "count");
            if peer_rate > 0.0 {
                report.figure_target("vs_postfix", ours_rate / peer_rate, "ratio", Target::AtLeast(TARGET_VS_POSTFIX));
            }
            if p.rounds > 1 {
                let rounds: Vec<String> =
                    ours_rates.iter().zip(&peer_rates).map(|(o, f)| format!("{o:.0}/{f:.0}")).collect();
                report.notes.push(format!("messages/s per round, ours/postfix: {}", rounds.join(" ")));
            }
        }
        anyhow::ensure!(ours_rates.iter().all(|r| *r > 0.0), "no message was accepted");
        anyhow::Ok(())
    }
    .await;
    let result = result.map_err(|e| e.context(format!("smtp failed; proxy log tail:\n{}", proxy.log())));
    proxy.stop().await?;
    drop(redis);
    result?;
    Ok(report)
}

/// Starts the peer, or records loudly why it is skipped (not installed, not root) or failed.
fn start_postfix(report: &mut Report) -> Option<Postfix> {
    let msg = match Postfix::start() {
        Ok(Ok(pf)) => return Some(pf),
        Ok(Err(why)) => format!("PEER SKIPPED: {why} ({POSTFIX_HINT}); no Postfix comparison in this run"),
        Err(e) => format!("PEER FAILED: starting a private Postfix: {e:#}; no Postfix comparison in this run"),
    };
    eprintln!("\n*** {msg} ***\n");
    report.notes.push(msg);
    None
}

fn mean(v: &[f64]) -> f64 {
    if v.is_empty() { 0.0 } else { v.iter().sum::<f64>() / v.len() as f64 }
}

/// What one measurement counted.
struct Measured {
    latencies: Histogram<u64>,
    accepted: usize,
    /// Messages not accepted (their session failed).
    failed: usize,
    first_error: Option<String>,
    took: Duration,
}

impl Measured {
    fn rate(&self) -> f64 {
        self.accepted as f64 / self.took.as_secs_f64().max(1e-9)
    }
}

/// The load generator; `batch` makes every Message-ID of the run unique (the proxy dedupes
/// on it).
struct Load {
    run_id: String,
    batch: u64,
}

impl Load {
    async fn measure(&mut self, addr: SocketAddr, p: &Params) -> anyhow::Result<Measured> {
        self.batch += 1;
        let sessions = p.sessions.max(1);
        let per = p.messages.div_ceil(sessions);
        let started = Instant::now();
        let mut tasks = tokio::task::JoinSet::new();
        for s in 0..sessions {
            let tag = format!("{}.{}.{s}", self.run_id, self.batch);
            let size = p.bytes;
            tasks.spawn(async move { session(addr, per, size, &tag).await });
        }
        let mut m =
            Measured { latencies: histogram(), accepted: 0, failed: 0, first_error: None, took: Duration::ZERO };
        let limit = Duration::from_secs(120) + Duration::from_millis(50 * p.messages as u64);
        bounded("the SMTP sessions", limit, async {
            while let Some(r) = tasks.join_next().await {
                let (h, ok, err) = r.context("session task panicked")?;
                m.latencies.add(&h).context("merging histograms")?;
                m.accepted += ok;
                if let Some(e) = err {
                    m.failed += per - ok;
                    m.first_error.get_or_insert(e);
                }
            }
            anyhow::Ok(())
        })
        .await?;
        m.took = started.elapsed();
        Ok(m)
    }
}

/// One session delivering `count` messages of about `size` bytes; returns the latencies, how
/// many were accepted, and the error that ended it early, if any.
async fn session(addr: SocketAddr, count: usize, size: usize, tag: &str) -> (Histogram<u64>, usize, Option<String>) {
    let mut h = histogram();
    let mut ok = 0;
    let r = async {
        let stream = TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        let mut r = BufReader::new(stream);
        expect(&mut r, "220").await?;
        r.get_mut().write_all(b"EHLO bench.test\r\n").await?;
        expect(&mut r, "250").await?;
        let line = format!("{}\r\n", "x".repeat(98));
        let body_lines = size / line.len();
        for n in 0..count {
            let started = Instant::now();
            let envelope = format!("MAIL FROM:<bench@bench.test>\r\nRCPT TO:<{RCPT}>\r\nDATA\r\n");
            r.get_mut().write_all(envelope.as_bytes()).await?;
            expect(&mut r, "250").await?;
            expect(&mut r, "250").await?;
            expect(&mut r, "354").await?;
            let mut msg = format!(
                "From: bench@bench.test\r\nTo: {RCPT}\r\nMessage-ID: <{tag}.{n}@bench.test>\r\nSubject: bench\r\n\r\n"
            );
            msg.reserve(body_lines * line.len() + 3);
            for _ in 0..body_lines {
                msg.push_str(&line);
            }
            msg.push_str(".\r\n");
            r.get_mut().write_all(msg.as_bytes()).await?;
            expect(&mut r, "250").await?;
            record(&mut h, started.elapsed());
            ok += 1;
        }
        r.get_mut().write_all(b"QUIT\r\n").await?;
        let _ = tokio::time::timeout(Duration::from_secs(2), expect(&mut r, "221")).await;
        anyhow::Ok(())
    }
    .await;
    (h, ok, r.err().map(|e| format!("{e:#}")))
}

/// Reads one (possibly multi-line) SMTP reply, bounded, and checks its code.
pub async fn expect(r: &mut BufReader<TcpStream>, code: &str) -> anyhow::Result<()> {
    let mut all = String::new();
    for _ in 0..64 {
        let mut line = String::new();
        let n = tokio::time::timeout(Duration::from_secs(30), r.read_line(&mut line))
            .await
            .context("SMTP reply timed out")??;
        anyhow::ensure!(n > 0, "server closed the connection after {all:?}");
        all.push_str(&line);
        if line.as_bytes().get(3) != Some(&b'-') {
            anyhow::ensure!(all.starts_with(code), "expected {code}, got {all:?}");
            return Ok(());
        }
    }
    anyhow::bail!("SMTP reply too long")
}
