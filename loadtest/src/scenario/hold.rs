//! `hold`: K idle agent QUIC sessions (SDK [`AgentClient`]s of agents with driver `none`,
//! policy `never`) held together with K idle platform connections, in two halves, each
//! against a proxy of its own; the proxy's resident memory (`VmRSS`) at each step, per
//! connection.
//! - SMTP: K inbound sessions (connected, greeted, `EHLO` answered, then silent). Each is a
//!   socket plus a session task and its buffers inside `concierge serve`.
//! - Slack: K apps, each an agent's own, each holding one Socket Mode WebSocket to the fake
//!   Slack ([`crate::slack`]), which sends nothing: the connection the proxy keeps open on the
//!   agent's behalf, and the most expensive of the held chat connections per the channel
//!   scenarios (Discord gateway, Telegram long poll).
//!
//! File descriptors: the SDK opens one UDP socket per client, so this process needs about
//! K + 100 descriptors and the proxy about K + 100 (one per SMTP session or Slack socket; QUIC
//! is one UDP socket); [`raise_nofile`] lifts the soft (and, when permitted, the hard) limit
//! before the proxy is spawned, which inherits it. The SMTP sessions and the fake Slack are
//! held by a helper process (this binary re-executed with [`HOLDER_ENV`]), so no process
//! needs 2K descriptors.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use concierge_protocol::client::AgentClient;
use tokio::io::{AsyncBufReadExt as _, AsyncWriteExt as _, BufReader};
use tokio::net::TcpStream;

use super::channel::{wait_listening, wait_until};
use super::proxy::{Proxy, agent_section, free_port, rss_kib, toml_str};
use super::smtp::expect;
use super::{Context, Report, Target, bounded, random_hex};

/// The target: 10k agent sessions + 10k platform connections in under 1 GiB.
const TARGET_TOTAL_MIB: f64 = 1024.0;

/// Parameters of the hold scenario.
#[derive(Clone, Debug)]
pub struct Params {
    /// Idle agent QUIC sessions.
    pub agents: usize,
    /// Idle SMTP sessions.
    pub smtp: usize,
    /// Idle Slack Socket Mode sockets (0 skips that half).
    pub slack: usize,
    /// Connections being opened at once.
    pub connect_concurrency: usize,
    /// Pause before each RSS reading, so the proxy's allocations settle.
    pub settle: Duration,
}

impl Params {
    /// The sizes, or smoke sizes.
    pub fn defaults(quick: bool) -> Self {
        Self {
            agents: if quick { 200 } else { 10_000 },
            smtp: if quick { 200 } else { 10_000 },
            slack: if quick { 200 } else { 10_000 },
            connect_concurrency: 64,
            settle: Duration::from_millis(if quick { 300 } else { 2000 }),
        }
    }
}

/// Raises `RLIMIT_NOFILE` to at least `want` (the hard limit too when permitted; otherwise
/// as far as the hard limit allows). Returns the resulting soft limit.
pub fn raise_nofile(want: u64) -> u64 {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit writes into the struct we pass.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return 0;
    }
    if lim.rlim_cur >= want {
        return lim.rlim_cur;
    }
    let raised = libc::rlimit { rlim_cur: want, rlim_max: lim.rlim_max.max(want) };
    // SAFETY: setrlimit reads the struct we pass.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
        return want;
    }
    let capped = libc::rlimit { rlim_cur: lim.rlim_max, rlim_max: lim.rlim_max };
    // SAFETY: as above.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &capped) } == 0 {
        return lim.rlim_max;
    }
    lim.rlim_cur
}

/// Runs the scenario.
pub async fn run(ctx: &Context, p: &Params) -> anyhow::Result<Report> {
    let mut report = Report::new("hold", ctx);
    report.param("agents", p.agents as u64);
    report.param("smtp_sessions", p.smtp as u64);
    report.param("slack_sockets", p.slack as u64);
    report.param("connect_concurrency", p.connect_concurrency as u64);

    // Here: one UDP socket per SDK client; the proxy (inheriting it): one socket per SMTP
    // session or Slack socket.
    let want = (p.agents.max(p.smtp).max(p.slack) + 1024) as u64;
    let nofile = raise_nofile(want);
    report.param("nofile", nofile);
    if nofile < want {
        report.notes.push(format!(
            "RLIMIT_NOFILE is {nofile}, below the ~{want} descriptors this run needs; raise it (ulimit -n) or shrink --agents/--smtp/--slack"
        ));
    }

    let run_id = random_hex(10);
    let agents: Vec<(String, String)> =
        (0..p.agents.max(1)).map(|i| (format!("hold-{run_id}-{i}"), random_hex(32))).collect();
    let base = with_smtp(ctx, &agents, p, &mut report).await?;
    if p.slack > 0 {
        with_slack(ctx, &agents, base, p, &mut report).await?;
    }
    report.notes.push(
        "RSS deltas include allocator slack; the SDK opens one UDP socket per agent client (loadgen side only)".into(),
    );
    Ok(report)
}

/// The agents' sections: asleep and never woken, so only the held sessions cost.
fn agents_config(agents: &[(String, String)]) -> String {
    agents
        .iter()
        .map(|(id, token)| agent_section(id, token, 64, 1_000_000, "driver = \"none\"\npolicy = \"never\""))
        .collect()
}

/// The first half: agents, then SMTP sessions. Returns the proxy's baseline RSS (KiB).
async fn with_smtp(ctx: &Context, agents: &[(String, String)], p: &Params, report: &mut Report) -> anyhow::Result<u64> {
    let smtp_port = free_port()?;
    let mut config = format!(
        "[smtp]\nlisten = \"127.0.0.1:{smtp_port}\"\nhostname = \"mx.example.com\"\ndomains = [\"example.com\"]\n\
         greeting_delay = \"0s\"\nmax_connections = {cap}\nmax_connections_per_ip = {cap}\n\n\
         [smtp.addresses]\nsupport = {}\n\n",
        toml_str(&agents[0].0),
        cap = p.smtp + 100,
    );
    config += &agents_config(agents);
    let ids = agents.iter().map(|(a, _)| a.clone()).collect();
    let mut proxy = Proxy::start(&ctx.concierge, &ctx.store, &config, ids)?;
    let smtp_addr: SocketAddr = format!("127.0.0.1:{smtp_port}").parse()?;
    let result = measure_smtp(&mut proxy, agents, smtp_addr, p, report).await;
    let result = result.map_err(|e| e.context(format!("hold (SMTP) failed; proxy log tail:\n{}", proxy.log())));
    proxy.stop().await?;
    result
}

async fn measure_smtp(
    proxy: &mut Proxy,
    agents: &[(String, String)],
    smtp: SocketAddr,
    p: &Params,
    report: &mut Report,
) -> anyhow::Result<u64> {
    let pid = proxy.pid();
    // The SMTP listener binds after the ready line on some builds; wait until it answers.
    wait_listening(smtp, Duration::from_secs(20)).await?;
    tokio::time::sleep(p.settle).await;
    let base = rss_kib(pid).context("reading the proxy's VmRSS")?;
    let mine_before = rss_kib(std::process::id()).unwrap_or(0);

    let (clients, agents_connect) = connect_agents(proxy, agents, p.connect_concurrency).await?;
    tokio::time::sleep(p.settle).await;
    proxy.check_alive()?;
    let after_agents = rss_kib(pid).context("reading the proxy's VmRSS")?;

    // SMTP sessions, idle after EHLO, held by a child process of ours: the SDK's one UDP
    // socket per agent already takes K descriptors here, and an unprivileged process cannot
    // raise its hard RLIMIT_NOFILE (20000 on the reference machine) to hold 2K + K.
    eprintln!("hold: opening {} SMTP sessions (in a helper process) ...", p.smtp);
    let started = Instant::now();
    let mut holder = Holder::start(&format!("smtp,{smtp},{},{}", p.smtp, p.connect_concurrency))?;
    let limit = Duration::from_secs(60) + Duration::from_millis(10 * p.smtp as u64);
    let held = bounded("opening the SMTP sessions", limit, holder.held()).await?;
    let smtp_connect = started.elapsed();
    tokio::time::sleep(p.settle).await;
    proxy.check_alive()?;
    let after_smtp = rss_kib(pid).context("reading the proxy's VmRSS")?;
    let mine_after = rss_kib(std::process::id()).unwrap_or(0);

    report.figure("proxy_rss_baseline", mib(base), "MiB");
    report.figure("proxy_rss_with_agents", mib(after_agents), "MiB");
    report.figure_target("proxy_rss_total", mib(after_smtp), "MiB", Target::Below(TARGET_TOTAL_MIB));
    report.figure("rss_per_agent_session", per(after_agents.saturating_sub(base), clients.len()), "KiB");
    report.figure("rss_per_smtp_session", per(after_smtp.saturating_sub(after_agents), held), "KiB");
    report.figure("rss_per_connection", per(after_smtp.saturating_sub(base), clients.len() + held), "KiB");
    report.figure("agents_held", clients.len() as f64, "count");
    report.figure("smtp_sessions_held", held as f64, "count");
    report.figure("agents_connect_per_s", clients.len() as f64 / agents_connect.as_secs_f64().max(1e-9), "conn/s");
    report.figure("smtp_connect_per_s", held as f64 / smtp_connect.as_secs_f64().max(1e-9), "conn/s");
    report.figure("loadgen_rss_added", mib(mine_after.saturating_sub(mine_before)), "MiB");

    holder.stop().await;
    close_agents(clients).await?;
    Ok(base)
}

/// The second half: a proxy whose every agent has a Slack app with its socket open to the
/// fake (held by a helper process), then the agents' sessions. `base` is the first half's
/// baseline (the same agents, nothing connected), for the per-socket figure.
async fn with_slack(
    ctx: &Context,
    agents: &[(String, String)],
    base: u64,
    p: &Params,
    report: &mut Report,
) -> anyhow::Result<()> {
    eprintln!("hold: {} Slack apps, one socket each, to the fake (in a helper process) ...", p.slack);
    let limit = Duration::from_secs(60) + Duration::from_millis(20 * p.slack as u64);
    let mut holder = Holder::start(&format!("slack,{},{}", p.slack, limit.as_secs()))?;
    let api_base = bounded("starting the fake Slack", Duration::from_secs(20), holder.url()).await?;
    let mut config = agents_config(agents);
    for i in 0..p.slack {
        config += &super::slack::app_section(i, &agents[i % agents.len()].0, &api_base);
    }
    let ids = agents.iter().map(|(a, _)| a.clone()).collect();
    let mut proxy = Proxy::start(&ctx.concierge, &ctx.store, &config, ids)?;
    let pid = proxy.pid();
    let result = async {
        let started = Instant::now();
        let held = bounded("opening the Slack sockets", limit, holder.held()).await?;
        let opened = started.elapsed();
        tokio::time::sleep(p.settle).await;
        proxy.check_alive()?;
        let with_sockets = rss_kib(pid).context("reading the proxy's VmRSS")?;
        let (clients, _) = connect_agents(&proxy, agents, p.connect_concurrency).await?;
        tokio::time::sleep(p.settle).await;
        proxy.check_alive()?;
        let total = rss_kib(pid).context("reading the proxy's VmRSS")?;
        report.figure("proxy_rss_with_slack_sockets", mib(with_sockets), "MiB");
        report.figure_target("proxy_rss_total_slack", mib(total), "MiB", Target::Below(TARGET_TOTAL_MIB));
        report.figure("rss_per_slack_socket", per(with_sockets.saturating_sub(base), held), "KiB");
        report.figure("slack_sockets_held", held as f64, "count");
        report.figure("slack_agents_held", clients.len() as f64, "count");
        report.figure("slack_open_per_s", held as f64 / opened.as_secs_f64().max(1e-9), "conn/s");
        close_agents(clients).await
    }
    .await;
    holder.stop().await;
    let result = result.map_err(|e| e.context(format!("hold (Slack) failed; proxy log tail:\n{}", proxy.log())));
    proxy.stop().await?;
    result
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

fn per(delta_kib: u64, n: usize) -> f64 {
    if n == 0 { 0.0 } else { delta_kib as f64 / n as f64 }
}

/// Connects one SDK client per agent, `concurrency` at a time; returns them and the time taken.
async fn connect_agents(
    proxy: &Proxy,
    agents: &[(String, String)],
    concurrency: usize,
) -> anyhow::Result<(Vec<AgentClient>, Duration)> {
    eprintln!("hold: connecting {} agents ...", agents.len());
    let started = Instant::now();
    let sem = Arc::new(tokio::sync::Semaphore::new(concurrency.max(1)));
    let mut tasks = tokio::task::JoinSet::new();
    for (i, (id, token)) in agents.iter().enumerate() {
        let opts = proxy.client_options(id, token, 64);
        let sem = sem.clone();
        tasks.spawn(async move {
            let _permit = sem.acquire_owned().await?;
            let c = AgentClient::connect(opts).await.with_context(|| format!("agent {i} connecting"))?;
            anyhow::Ok(c)
        });
    }
    let limit = Duration::from_secs(60) + Duration::from_millis(20 * agents.len() as u64);
    let clients = bounded("connecting the agents", limit, async {
        let mut clients = Vec::with_capacity(agents.len());
        while let Some(r) = tasks.join_next().await {
            clients.push(r.context("connect task panicked")??);
        }
        anyhow::Ok(clients)
    })
    .await?;
    Ok((clients, started.elapsed()))
}

async fn close_agents(clients: Vec<AgentClient>) -> anyhow::Result<()> {
    eprintln!("hold: closing {} agents ...", clients.len());
    bounded("closing the agents", Duration::from_secs(60), async {
        let mut closing = tokio::task::JoinSet::new();
        for c in clients {
            closing.spawn(async move {
                // Bounded: a close that waits on a slow peer must not hold the run.
                let _ = tokio::time::timeout(Duration::from_secs(2), c.close()).await;
            });
        }
        while closing.join_next().await.is_some() {}
        anyhow::Ok(())
    })
    .await
}

/// Environment variable that turns `concierge-loadtest` into the hold's helper process:
/// `smtp,<addr>,<sessions>,<concurrency>` or `slack,<apps>,<limit in seconds>`.
pub const HOLDER_ENV: &str = "CONCIERGE_LOADTEST_HOLDER";

/// The helper process holding one half's platform connections. It speaks in lines on its
/// stdout (`url <api base>`, `held <n>`, `error <message>`) and stops when its stdin closes.
struct Holder {
    child: tokio::process::Child,
    stdout: tokio::io::Lines<BufReader<tokio::process::ChildStdout>>,
}

impl Holder {
    fn start(spec: &str) -> anyhow::Result<Holder> {
        let exe = std::env::current_exe().context("locating concierge-loadtest")?;
        let mut child = tokio::process::Command::new(exe)
            .env(HOLDER_ENV, spec)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .context("starting the holder process")?;
        let stdout = BufReader::new(child.stdout.take().context("holder stdout")?).lines();
        Ok(Holder { child, stdout })
    }

    /// The next line, which must start with `word` (an `error` line fails with its message).
    async fn expect(&mut self, word: &str) -> anyhow::Result<String> {
        let line = self.stdout.next_line().await?.context("the holder process exited without a word")?;
        if let Some(rest) = line.strip_prefix(word).and_then(|r| r.strip_prefix(' ')) {
            return Ok(rest.to_string());
        }
        anyhow::bail!("holder process: {}", line.strip_prefix("error ").unwrap_or(&line))
    }

    /// Waits for `held <n>`.
    async fn held(&mut self) -> anyhow::Result<usize> {
        self.expect("held").await?.trim().parse().context("holder count")
    }

    /// Waits for `url <api base>` (the fake Slack's).
    async fn url(&mut self) -> anyhow::Result<String> {
        self.expect("url").await
    }

    /// Closes its stdin (it then drops what it holds and exits) and reaps it.
    async fn stop(mut self) {
        drop(self.child.stdin.take());
        if tokio::time::timeout(Duration::from_secs(10), self.child.wait()).await.is_err() {
            let _ = self.child.kill().await;
        }
    }
}

/// Body of the helper process (see [`HOLDER_ENV`]).
pub async fn holder_main(spec: &str) -> anyhow::Result<()> {
    match spec.split_once(',') {
        Some(("smtp", rest)) => hold_smtp(rest).await,
        Some(("slack", rest)) => hold_slack(rest).await,
        _ => anyhow::bail!("unknown holder spec {spec:?}"),
    }
}

/// Waits until the parent closes our stdin.
async fn until_stdin_closes() {
    let mut sink = Vec::new();
    let _ = tokio::io::AsyncReadExt::read_to_end(&mut tokio::io::stdin(), &mut sink).await;
}

/// Opens the SMTP sessions, prints `held <n>`, holds them until stdin closes. `spec` is
/// `<addr>,<sessions>,<concurrency>`.
async fn hold_smtp(spec: &str) -> anyhow::Result<()> {
    let mut parts = spec.split(',');
    let addr: SocketAddr = parts.next().unwrap_or_default().parse().context("holder address")?;
    let n: usize = parts.next().unwrap_or_default().parse().context("holder count")?;
    let concurrency: usize = parts.next().unwrap_or("64").parse().unwrap_or(64);
    raise_nofile(n as u64 + 256);
    let sem = Arc::new(tokio::sync::Semaphore::new(concurrency.max(1)));
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..n {
        let sem = sem.clone();
        tasks.spawn(async move {
            let _permit = sem.acquire_owned().await?;
            smtp_idle(addr).await.with_context(|| format!("SMTP session {i}"))
        });
    }
    let mut sessions = Vec::with_capacity(n);
    let mut first_error = None;
    while let Some(r) = tasks.join_next().await {
        match r.context("SMTP task panicked").and_then(|r| r) {
            Ok(s) => sessions.push(s),
            Err(e) => {
                first_error.get_or_insert(e);
            }
        }
    }
    match first_error {
        Some(e) => println!("error {e:#}"),
        None => println!("held {}", sessions.len()),
    }
    until_stdin_closes().await;
    drop(sessions);
    Ok(())
}

/// Starts the fake Slack with `<apps>` apps, prints `url <api base>`, then `held <apps>` once
/// every app's socket is open (or `error` after `<limit>` seconds), and serves until stdin
/// closes. Descriptors: one per socket plus the proxy's pooled Web API connections.
async fn hold_slack(spec: &str) -> anyhow::Result<()> {
    let (n, limit) = spec.split_once(',').context("holder spec: <apps>,<limit seconds>")?;
    let n: usize = n.parse().context("holder app count")?;
    let limit = Duration::from_secs(limit.parse().context("holder limit")?);
    raise_nofile(2 * n as u64 + 256);
    let fake = crate::slack::FakeSlack::start(super::slack::fake_options()).await?;
    for i in 0..n {
        super::slack::add_app(&fake, i);
    }
    println!("url {}", fake.api_base);
    match wait_until("every Slack socket open", limit, async || fake.open_sockets_total() >= n).await {
        Ok(_) => println!("held {}", fake.open_sockets_total()),
        Err(e) => println!("error {e:#} ({} of {n} open)", fake.open_sockets_total()),
    }
    until_stdin_closes().await;
    Ok(())
}

/// Opens an SMTP session, reads the greeting, says EHLO, reads the answer; returns the idle
/// connection.
async fn smtp_idle(addr: SocketAddr) -> anyhow::Result<BufReader<TcpStream>> {
    let stream = TcpStream::connect(addr).await?;
    let mut r = BufReader::with_capacity(1024, stream);
    expect(&mut r, "220").await?;
    r.get_mut().write_all(b"EHLO hold.test\r\n").await?;
    expect(&mut r, "250").await?;
    Ok(r)
}
