//! `smtp`: inbound SMTP acceptance. `sessions` concurrent sessions each say EHLO once, then
//! per message send MAIL FROM / RCPT TO / DATA (pipelined, as the proxy and Postfix both
//! advertise PIPELINING), the message, and wait for the 250 after the final dot — the server's
//! word that the message is durably stored — before the next. Measures messages/s and the
//! per-message latency (MAIL FROM sent -> final 250).
//!
//! A full run (without `--quick`) measures the issue's whole matrix in one invocation: the
//! `--sessions` count and ten times as many (10 and 100 by default), and with `--store redis`
//! both `appendfsync` policies (`--appendfsync` first, then the other of `always`/`everysec`),
//! switched with `CONFIG SET` on the run's own private `redis-server` (`appendonly yes`).
//! `--quick` measures the single cell `--sessions` x `--appendfsync`. One cell keeps the plain
//! figure names (`messages_per_s`, `vs_postfix`, ...); several suffix them with the cell
//! (`messages_per_s_100s_everysec`) and print a table of rates and ratios.
//!
//! The peer, side by side in the same run: a private Postfix instance ([`super::peer::Postfix`],
//! whose cleanup fsyncs each queue file before smtpd answers 250) under the same load, measured
//! in every cell right after ours, round by round, so both see the same machine. Postfix's
//! durability equals `appendfsync always` (and the embedded store's SQLite `synchronous=FULL`),
//! so only those cells carry the issue's target (ratio >= 1); the `everysec` ratio is reported
//! without one. No Postfix (or not root): only that comparison is skipped, loudly, with the
//! install command.

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
    /// Concurrent sessions (the matrix adds ten times as many).
    pub sessions: usize,
    /// Messages per measurement (spread over the sessions).
    pub messages: usize,
    /// Size of each message's body in bytes.
    pub bytes: usize,
    /// Measurements of each server per cell, interleaved.
    pub rounds: usize,
    /// `appendfsync` of the private Redis with `--store redis` (`always`, `everysec`, `no`);
    /// the matrix adds the other of `always`/`everysec`.
    pub appendfsync: String,
    /// Also measure Postfix (when installed and root).
    pub peer: bool,
    /// Measure the whole matrix (session counts x fsync policies), not one cell.
    pub matrix: bool,
}

impl Params {
    /// The full-size matrix, or one smoke-size cell.
    pub fn defaults(quick: bool) -> Self {
        Self {
            sessions: 10,
            messages: if quick { 200 } else { 4000 },
            bytes: 10 * 1024,
            rounds: 1,
            appendfsync: "always".into(),
            peer: true,
            matrix: !quick,
        }
    }

    /// The cells to measure, in order: (sessions, `appendfsync` with Redis).
    pub fn cells(&self, redis: bool) -> Vec<Cell> {
        let sessions = self.sessions.max(1);
        let counts = if self.matrix { vec![sessions, sessions * 10] } else { vec![sessions] };
        let mut fsyncs = vec![Some(self.appendfsync.clone())];
        if self.matrix {
            for other in ["always", "everysec"] {
                if self.appendfsync != other {
                    fsyncs.push(Some(other.to_string()));
                }
            }
        }
        if !redis {
            fsyncs = vec![None];
        }
        fsyncs.iter().flat_map(|f| counts.iter().map(|&s| Cell { sessions: s, appendfsync: f.clone() })).collect()
    }
}

/// One measurement setting of the matrix.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Cell {
    /// Concurrent sessions.
    pub sessions: usize,
    /// Redis `appendfsync`, or `None` for the embedded store.
    pub appendfsync: Option<String>,
}

impl Cell {
    /// Figure-name suffix: `_100s_everysec`, or `_100s` for the embedded store.
    fn suffix(&self) -> String {
        match &self.appendfsync {
            Some(f) => format!("_{}s_{f}", self.sessions),
            None => format!("_{}s", self.sessions),
        }
    }

    /// Whether our durability equals Postfix's (fsync before 250), so the target applies.
    fn equal_durability(&self) -> bool {
        self.appendfsync.as_deref().is_none_or(|f| f == "always")
    }
}

/// The issue's target: at least Postfix's rate at equal durability.
const TARGET_VS_POSTFIX: f64 = 1.0;
const RCPT: &str = "support@example.com";

/// Runs the scenario.
pub async fn run(ctx: &Context, p: &Params) -> anyhow::Result<Report> {
    let mut report = Report::new("smtp", ctx);
    let redis_store = matches!(ctx.store, StoreChoice::Redis(_));
    let cells = p.cells(redis_store);
    let max_sessions = cells.iter().map(|c| c.sessions).max().unwrap_or(1);
    let mut counts: Vec<String> = Vec::new();
    for c in &cells {
        if !counts.contains(&c.sessions.to_string()) {
            counts.push(c.sessions.to_string());
        }
    }
    let sessions: serde_json::Value =
        if cells.len() > 1 { counts.join(",").into() } else { (p.sessions as u64).into() };
    report.param("sessions", sessions);
    report.param("messages", p.messages as u64);
    report.param("bytes", p.bytes as u64);
    report.param("rounds", p.rounds as u64);
    let run_id = random_hex(10);
    let agent = format!("smtp-{run_id}");

    // Redis: a private one with the AOF on; each cell sets its fsync policy with CONFIG SET.
    let redis = if redis_store {
        let first = cells.first().and_then(|c| c.appendfsync.clone()).unwrap_or_else(|| p.appendfsync.clone());
        let mut fsyncs: Vec<&str> = cells.iter().filter_map(|c| c.appendfsync.as_deref()).collect();
        fsyncs.dedup();
        report.param("redis", format!("private, appendonly yes, appendfsync {}", fsyncs.join(" then ")));
        Some(PrivateRedis::start(Some(&first))?)
    } else {
        None
    };
    let store = match &redis {
        Some(r) => StoreChoice::Redis(r.url()),
        None => StoreChoice::Embedded,
    };
    let port = free_port()?;
    let cap = max_sessions + 100;
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
        let mut table = Vec::new();
        for cell in &cells {
            if let (Some(r), Some(f)) = (&redis, &cell.appendfsync) {
                set_appendfsync(&r.url(), f).await?;
            }
            let cp = Params { sessions: cell.sessions, ..p.clone() };
            let suffix = if cells.len() > 1 { cell.suffix() } else { String::new() };
            let row =
                measure_cell(&mut load, &mut proxy, ours, postfix.as_ref(), &cp, cell, &suffix, &mut report).await?;
            table.push((cell.clone(), row));
        }
        if cells.len() > 1 {
            let mut lines = vec![format!(
                "{:>8}  {:>11}  {:>12}  {:>12}  {:>7}",
                "sessions", "appendfsync", "ours msg/s", "postfix msg/s", "ratio"
            )];
            for (cell, (ours, peer)) in &table {
                let peer_s = peer.map_or("-".to_string(), |r| format!("{r:.0}"));
                let ratio = peer.filter(|r| *r > 0.0).map_or("-".to_string(), |r| format!("{:.2}", ours / r));
                let fsync = cell.appendfsync.as_deref().unwrap_or("(embedded)");
                lines.push(format!("{:>8}  {fsync:>11}  {ours:>12.0}  {peer_s:>12}  {ratio:>7}", cell.sessions));
            }
            eprintln!("\nsmtp matrix:\n{}\n", lines.join("\n"));
            report.notes.extend(lines.iter().map(|l| format!("matrix: {l}")));
        }
        anyhow::ensure!(table.iter().all(|(_, (r, _))| *r > 0.0), "no message was accepted in some cell");
        anyhow::Ok(())
    }
    .await;
    let result = result.map_err(|e| e.context(format!("smtp failed; proxy log tail:\n{}", proxy.log())));
    proxy.stop().await?;
    drop(redis);
    result?;
    Ok(report)
}

/// Sets the private Redis's `appendfsync` and reads it back.
async fn set_appendfsync(url: &str, policy: &str) -> anyhow::Result<()> {
    let client = redis::Client::open(url).context("redis url")?;
    let mut conn = client.get_multiplexed_async_connection().await.context("connecting to the private redis")?;
    let () = redis::cmd("CONFIG")
        .arg("SET")
        .arg("appendfsync")
        .arg(policy)
        .query_async(&mut conn)
        .await
        .context("CONFIG SET appendfsync")?;
    let got: Vec<String> = redis::cmd("CONFIG").arg("GET").arg("appendfsync").query_async(&mut conn).await?;
    anyhow::ensure!(got.get(1).map(String::as_str) == Some(policy), "appendfsync is {got:?}, wanted {policy}");
    Ok(())
}

/// Measures one cell, ours and (when running) Postfix's, interleaved per round; records the
/// figures with `suffix` and returns (our rate, Postfix's rate).
#[allow(clippy::too_many_arguments)]
async fn measure_cell(
    load: &mut Load,
    proxy: &mut Proxy,
    ours: SocketAddr,
    postfix: Option<&Postfix>,
    p: &Params,
    cell: &Cell,
    suffix: &str,
    report: &mut Report,
) -> anyhow::Result<(f64, Option<f64>)> {
    let fsync = cell.appendfsync.as_deref().map(|f| format!(", appendfsync {f}")).unwrap_or_default();
    // Warm-up of both, not counted.
    let warm = Params { messages: (p.messages / 10).max(p.sessions), ..p.clone() };
    load.measure(ours, &warm).await?;
    if let Some(pf) = postfix {
        load.measure(pf.addr, &warm).await?;
    }
    let (mut ours_h, mut peer_h) = (histogram(), histogram());
    let (mut ours_rates, mut peer_rates) = (Vec::new(), Vec::new());
    let (mut ours_errors, mut peer_errors) = (0, 0);
    for round in 1..=p.rounds.max(1) {
        eprintln!(
            "smtp: {} sessions{fsync}, round {round}: {} messages x {} bytes ...",
            p.sessions, p.messages, p.bytes
        );
        let r = load.measure(ours, p).await?;
        proxy.check_alive()?;
        ours_h.add(&r.latencies).context("merging histograms")?;
        ours_rates.push(r.rate());
        ours_errors += r.failed;
        if let Some(e) = r.first_error {
            report.notes.push(format!("concierge, {} sessions{fsync}, round {round}: {e}", p.sessions));
        }
        if let Some(pf) = postfix {
            let r = load.measure(pf.addr, p).await?;
            peer_h.add(&r.latencies).context("merging histograms")?;
            peer_rates.push(r.rate());
            peer_errors += r.failed;
            if let Some(e) = r.first_error {
                report.notes.push(format!("postfix, {} sessions, round {round}: {e}", p.sessions));
            }
        }
    }
    let ours_rate = mean(&ours_rates);
    report.figure(&format!("messages_per_s{suffix}"), ours_rate, "messages/s");
    report.latency(&format!("message_latency{suffix}"), &ours_h, None);
    report.figure(&format!("errors{suffix}"), ours_errors as f64, "count");
    anyhow::ensure!(ours_rates.iter().all(|r| *r > 0.0), "no message was accepted ({} sessions{fsync})", p.sessions);
    if postfix.is_none() {
        return Ok((ours_rate, None));
    }
    let peer_rate = mean(&peer_rates);
    report.figure(&format!("postfix_messages_per_s{suffix}"), peer_rate, "messages/s");
    report.latency(&format!("postfix_message_latency{suffix}"), &peer_h, None);
    report.figure(&format!("postfix_errors{suffix}"), peer_errors as f64, "count");
    if peer_rate > 0.0 {
        let name = format!("vs_postfix{suffix}");
        if cell.equal_durability() {
            report.figure_target(&name, ours_rate / peer_rate, "ratio", Target::AtLeast(TARGET_VS_POSTFIX));
        } else {
            report.figure(&name, ours_rate / peer_rate, "ratio");
        }
    }
    if p.rounds > 1 {
        let rounds: Vec<String> = ours_rates.iter().zip(&peer_rates).map(|(o, f)| format!("{o:.0}/{f:.0}")).collect();
        report.notes.push(format!("messages/s per round{suffix}, ours/postfix: {}", rounds.join(" ")));
    }
    Ok((ours_rate, Some(peer_rate)))
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_run_covers_the_issue_matrix_and_quick_one_cell() {
        let cell = |s: usize, f: Option<&str>| Cell { sessions: s, appendfsync: f.map(str::to_string) };
        let full = Params::defaults(false);
        assert_eq!(
            full.cells(true),
            [
                cell(10, Some("always")),
                cell(100, Some("always")),
                cell(10, Some("everysec")),
                cell(100, Some("everysec"))
            ]
        );
        assert_eq!(full.cells(false), [cell(10, None), cell(100, None)]);
        let everysec_first = Params { appendfsync: "everysec".into(), ..full };
        assert_eq!(everysec_first.cells(true)[2], cell(10, Some("always")));
        let quick = Params::defaults(true);
        assert_eq!(quick.cells(true), [cell(10, Some("always"))]);
        assert!(cell(100, Some("always")).equal_durability() && cell(10, None).equal_durability());
        assert!(!cell(10, Some("everysec")).equal_durability());
        assert_eq!(cell(100, Some("everysec")).suffix(), "_100s_everysec");
    }
}
