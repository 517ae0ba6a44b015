//! The proxy under test: a `concierge serve` child process with a generated configuration in a
//! temporary directory, bound to loopback ports chosen by the kernel, plus helpers for the
//! surfaces scenarios use (admin API, resident memory), the clean-up of the run's Redis keys,
//! and a private `redis-server` ([`PrivateRedis`]) for runs that need their own fsync policy.

use std::collections::VecDeque;
use std::io::{BufRead as _, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use concierge_protocol::client::ClientOptions;
use concierge_protocol::tls::Trust;
use serde_json::Value;

use super::StoreChoice;

/// Lines of the proxy's log kept for error messages.
const LOG_TAIL: usize = 200;
/// How long the proxy may take to print its ready line.
const READY_TIMEOUT: Duration = Duration::from_secs(30);

/// A running `concierge serve`.
pub struct Proxy {
    child: Child,
    /// QUIC listener agents dial.
    pub quic: SocketAddr,
    /// Webhook ingress.
    pub http: SocketAddr,
    /// Admin API.
    pub admin: SocketAddr,
    /// Certificate pin agents use.
    pub cert_sha256: String,
    log: Arc<Mutex<VecDeque<String>>>,
    store: StoreChoice,
    agents: Vec<String>,
    cleanup: Vec<String>,
    admin_client: reqwest::Client,
    _dir: tempfile::TempDir,
}

/// Writes the configuration: loopback listeners on free ports, the chosen store, then `body`
/// (agents and webhook routes).
fn config_text(dir: &Path, store: &StoreChoice, body: &str) -> String {
    let store = match store {
        StoreChoice::Embedded => {
            format!("backend = \"embedded\"\npath = {}", toml_str(&dir.join("store.db").display().to_string()))
        }
        StoreChoice::Redis(url) => format!("backend = \"redis\"\nurl = {}", toml_str(url)),
    };
    format!(
        "[server]\nquic_listen = \"127.0.0.1:0\"\nhttp_listen = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n\
         data_dir = {}\nshutdown_grace = \"2s\"\nmax_body = \"1MiB\"\n\n\
         [store]\n{store}\n# Short, so the run's dedupe keys do not pile up in a shared Redis.\ndedupe_ttl = \"1h\"\n\n{body}",
        toml_str(&dir.join("data").display().to_string()),
    )
}

/// A TOML basic string.
pub fn toml_str(s: &str) -> String {
    serde_json::Value::from(s).to_string()
}

impl Proxy {
    /// Starts `concierge serve` with `body` appended to the generated configuration; `agents`
    /// are the agent ids whose Redis keys are deleted when the proxy is dropped.
    pub fn start(concierge: &Path, store: &StoreChoice, body: &str, agents: Vec<String>) -> anyhow::Result<Proxy> {
        if !concierge.is_file() {
            anyhow::bail!(
                "the concierge binary {} does not exist; build it (cargo build --release -p concierge-proxy) or pass --concierge PATH",
                concierge.display()
            );
        }
        let dir = tempfile::Builder::new().prefix("concierge-loadtest-").tempdir().context("creating a temp dir")?;
        let config = dir.path().join("concierge.toml");
        std::fs::write(&config, config_text(dir.path(), store, body)).context("writing the configuration")?;
        let mut cmd = Command::new(concierge);
        cmd.args(["serve", "--config"]).arg(&config).stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
        // Logging on the hot path would be measured too; warnings are enough.
        let log_filter = std::env::var("CONCIERGE_LOADTEST_PROXY_LOG").unwrap_or_else(|_| "warn,quinn=error".into());
        cmd.env("RUST_LOG", log_filter);
        let mut child = cmd.spawn().with_context(|| format!("starting {}", concierge.display()))?;
        let log: Arc<Mutex<VecDeque<String>>> = Arc::default();
        let stderr = child.stderr.take().context("proxy stderr")?;
        let sink = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let mut l = sink.lock().unwrap_or_else(|e| e.into_inner());
                if l.len() == LOG_TAIL {
                    l.pop_front();
                }
                l.push_back(line);
            }
        });
        let stdout = child.stdout.take().context("proxy stdout")?;
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Ok(v) = serde_json::from_str::<Value>(&line)
                    && v["ready"] == true
                {
                    let _ = tx.send(v);
                }
            }
        });
        let mut proxy = Proxy {
            child,
            quic: "0.0.0.0:0".parse()?,
            http: "0.0.0.0:0".parse()?,
            admin: "0.0.0.0:0".parse()?,
            cert_sha256: String::new(),
            log,
            store: store.clone(),
            agents,
            cleanup: Vec::new(),
            admin_client: reqwest::Client::new(),
            _dir: dir,
        };
        let ready = match rx.recv_timeout(READY_TIMEOUT) {
            Ok(v) => v,
            Err(_) => {
                // Give stderr a moment to arrive so the error explains itself.
                std::thread::sleep(Duration::from_millis(200));
                anyhow::bail!("concierge did not print its ready line; its log:\n{}", proxy.log());
            }
        };
        let addr = |k: &str| -> anyhow::Result<SocketAddr> {
            ready[k].as_str().and_then(|s| s.parse().ok()).with_context(|| format!("ready line lacks {k}: {ready}"))
        };
        proxy.quic = addr("quic")?;
        proxy.http = addr("http")?;
        proxy.admin = addr("admin")?;
        proxy.cert_sha256 = ready["cert_sha256"].as_str().context("ready line lacks cert_sha256")?.to_string();
        Ok(proxy)
    }

    /// The last lines the proxy logged.
    pub fn log(&self) -> String {
        let l = self.log.lock().unwrap_or_else(|e| e.into_inner());
        l.iter().cloned().collect::<Vec<_>>().join("\n")
    }

    /// The proxy's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Its resident set size in KiB (0 if unreadable).
    pub fn rss_kib(&self) -> u64 {
        rss_kib(self.child.id()).unwrap_or(0)
    }

    /// Also deletes the Redis keys matching `pattern` (a `SCAN MATCH` glob) in [`Proxy::stop`]:
    /// channel state kept outside the agents' keys (`c:state:{discord:<bot>}`, ...).
    pub fn cleanup_keys(&mut self, pattern: String) {
        self.cleanup.push(pattern);
    }

    /// `GET /api/agents/<id>` -> its stored head offset (events stored so far).
    pub async fn head(&self, id: &str) -> anyhow::Result<u64> {
        let url = format!("http://{}/api/agents/{id}", self.admin);
        let v: Value = self.admin_client.get(&url).send().await?.error_for_status()?.json().await?;
        v["head"].as_u64().with_context(|| format!("no head in {v}"))
    }

    /// Errors if the proxy exited.
    pub fn check_alive(&mut self) -> anyhow::Result<()> {
        if let Some(status) = self.child.try_wait()? {
            anyhow::bail!("concierge exited ({status}); its log:\n{}", self.log());
        }
        Ok(())
    }

    /// SDK options for `agent` with `token`, pinned to this proxy's certificate.
    pub fn client_options(&self, agent: &str, token: &str, window: u32) -> ClientOptions {
        let mut o = ClientOptions::new(self.quic.to_string(), agent, token, Trust::Pinned(self.cert_sha256.clone()));
        o.window = window;
        o.reconnect_attempts = 3;
        o.client = "concierge-loadtest".into();
        o
    }

    /// `GET /api/agents` -> the entry of `id`.
    pub async fn agent(&self, id: &str) -> anyhow::Result<Value> {
        let url = format!("http://{}/api/agents", self.admin);
        let all: Value = self.admin_client.get(&url).send().await?.error_for_status()?.json().await?;
        all["agents"]
            .as_array()
            .and_then(|a| a.iter().find(|a| a["id"] == id))
            .cloned()
            .with_context(|| format!("agent {id} not listed by the admin API"))
    }

    /// Polls the admin API until `pred` holds for agent `id` (every `every`, at most `within`).
    pub async fn wait_agent(
        &self,
        id: &str,
        within: Duration,
        every: Duration,
        what: &str,
        pred: impl Fn(&Value) -> bool,
    ) -> anyhow::Result<Value> {
        let deadline = Instant::now() + within;
        loop {
            let a = self.agent(id).await?;
            if pred(&a) {
                return Ok(a);
            }
            if Instant::now() > deadline {
                anyhow::bail!("agent {id}: {what} not reached within {within:?}; last seen {a}");
            }
            tokio::time::sleep(every).await;
        }
    }

    /// Stops the proxy (SIGTERM, then SIGKILL) and deletes the run's Redis keys.
    pub async fn stop(mut self) -> anyhow::Result<()> {
        self.terminate();
        if let StoreChoice::Redis(url) = &self.store {
            for agent in std::mem::take(&mut self.agents) {
                delete_agent_keys(url, &agent).await.with_context(|| format!("deleting the Redis keys of {agent}"))?;
            }
            for pattern in std::mem::take(&mut self.cleanup) {
                delete_matching(url, &pattern).await.with_context(|| format!("deleting the Redis keys {pattern}"))?;
            }
        }
        Ok(())
    }

    fn terminate(&mut self) {
        terminate(&mut self.child, Duration::from_secs(10));
    }
}

/// Stops a child we spawned: SIGTERM (a clean shutdown for the proxy and nginx alike), then
/// SIGKILL if it has not exited within `grace`.
pub fn terminate(child: &mut std::process::Child, grace: Duration) {
    if matches!(child.try_wait(), Ok(Some(_))) {
        return;
    }
    // SAFETY: plain kill(2) on the pid of a child we spawned and have not reaped.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline {
        if matches!(child.try_wait(), Ok(Some(_))) {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.terminate();
    }
}

/// Deletes every key of `agent` (the store hash-tags them `c:{agent}:...`).
pub async fn delete_agent_keys(url: &str, agent: &str) -> anyhow::Result<u64> {
    delete_matching(url, &format!("c:{{{agent}}}:*")).await
}

/// Deletes every key matching the `SCAN MATCH` glob `pattern`; returns how many.
pub async fn delete_matching(url: &str, pattern: &str) -> anyhow::Result<u64> {
    let client = redis::Client::open(url)?;
    let mut conn = client.get_multiplexed_async_connection().await?;
    let mut cursor: u64 = 0;
    let mut deleted = 0;
    loop {
        let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(pattern)
            .arg("COUNT")
            .arg(5000)
            .query_async(&mut conn)
            .await?;
        if !keys.is_empty() {
            let n: u64 = redis::cmd("UNLINK").arg(&keys).query_async(&mut conn).await?;
            deleted += n;
        }
        if next == 0 {
            return Ok(deleted);
        }
        cursor = next;
    }
}

/// An agent section: token, window, buffer cap, then the `[agents.<id>.wake]` table.
pub fn agent_section(id: &str, token: &str, window: u32, max_pending: u64, wake: &str) -> String {
    format!(
        "[agents.{id}]\ntoken = {}\nwindow = {window}\nmax_pending = {max_pending}\n\n[agents.{id}.wake]\n{wake}\n\n",
        toml_str(token)
    )
}

/// A webhook route section.
pub fn route_section(route: &str, agent: &str, verify: &str, extra: &str) -> String {
    format!("[webhooks.{route}]\nagent = {}\nverify = \"{verify}\"\n{extra}\n\n", toml_str(agent))
}

/// `VmRSS` of `pid` in KiB.
pub fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status.lines().find_map(|l| l.strip_prefix("VmRSS:"))?.split_whitespace().next()?.parse().ok()
}

/// A free loopback TCP port (bound, then released: the caller binds it next).
pub fn free_port() -> anyhow::Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0").context("finding a free port")?;
    Ok(l.local_addr()?.port())
}

/// A private `redis-server` on a free loopback port with its data in a temp dir, killed on
/// drop: for runs that set their own durability (`appendonly yes` with an `appendfsync`
/// policy, or no persistence at all) without touching a shared Redis.
pub struct PrivateRedis {
    child: Child,
    /// Its loopback port.
    pub port: u16,
    _dir: tempfile::TempDir,
}

impl PrivateRedis {
    /// Starts it with `appendfsync` = `fsync` (`always`, `everysec`, `no`), or without the AOF
    /// when `fsync` is `None`, and waits (bounded) until it accepts connections.
    pub fn start(fsync: Option<&str>) -> anyhow::Result<PrivateRedis> {
        let dir = tempfile::Builder::new().prefix("concierge-redis-").tempdir().context("creating a temp dir")?;
        let port = free_port()?;
        let mut cmd = Command::new("redis-server");
        cmd.args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", ""]);
        match fsync {
            Some(policy) => cmd.args(["--appendonly", "yes", "--appendfsync", policy]),
            None => cmd.args(["--appendonly", "no"]),
        };
        let mut child = cmd
            .arg("--dir")
            .arg(dir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting redis-server (Debian: apt-get install redis-server)")?;
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            if let Some(status) = child.try_wait()? {
                anyhow::bail!("redis-server exited ({status})");
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                anyhow::bail!("redis-server did not listen on 127.0.0.1:{port} within 10 s");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(PrivateRedis { child, port, _dir: dir })
    }

    /// `redis://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }
}

impl Drop for PrivateRedis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// User + system CPU time of process `pid` so far (from `/proc/<pid>/stat`), if readable.
pub fn cpu_time(pid: u32) -> Option<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command (which may contain spaces) start after the last ')'.
    let rest = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // `state` is field 3 overall, i.e. index 0 here; utime and stime are fields 14 and 15.
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    // SAFETY: sysconf has no preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    let ticks = if ticks > 0 { ticks as u64 } else { 100 };
    Some(Duration::from_secs_f64((utime + stime) as f64 / ticks as f64))
}

/// The pid of the Redis server at `url` (`INFO server` -> `process_id`), when it is local.
pub async fn redis_pid(url: &str) -> Option<u32> {
    let client = redis::Client::open(url).ok()?;
    let mut conn = client.get_multiplexed_async_connection().await.ok()?;
    let info: String = redis::cmd("INFO").arg("server").query_async(&mut conn).await.ok()?;
    let pid: u32 = info.lines().find_map(|l| l.strip_prefix("process_id:"))?.trim().parse().ok()?;
    // Only meaningful if that process is on this machine (and visible to us).
    std::path::Path::new(&format!("/proc/{pid}/stat")).exists().then_some(pid)
}

/// CPU used by the proxy, this load generator and (for a local Redis) Redis over a phase.
pub struct CpuMeter {
    pids: Vec<(&'static str, u32, Duration)>,
    started: Instant,
    steal: super::StealMeter,
}

impl CpuMeter {
    /// Starts measuring.
    pub async fn start(proxy: &Proxy) -> CpuMeter {
        let mut pids = vec![("proxy", proxy.child.id()), ("loadgen", std::process::id())];
        if let StoreChoice::Redis(url) = &proxy.store
            && let Some(pid) = redis_pid(url).await
        {
            pids.push(("redis", pid));
        }
        let pids = pids.into_iter().map(|(n, p)| (n, p, cpu_time(p).unwrap_or_default())).collect();
        CpuMeter { pids, started: Instant::now(), steal: super::StealMeter::start() }
    }

    /// Adds `cpu_<name>_cores` figures (average cores busy since `start`) and `steal_share`.
    pub fn finish(self, report: &mut super::Report) {
        let wall = self.started.elapsed().as_secs_f64();
        self.steal.finish(report, "");
        for (name, pid, before) in self.pids {
            if let Some(after) = cpu_time(pid) {
                let used = after.saturating_sub(before).as_secs_f64();
                report.figure(&format!("cpu_{name}_cores"), used / wall, "cores");
            }
        }
    }
}
