//! Plumbing shared by the per-channel benchmark examples (`examples/*_bench.rs`): a private
//! `redis-server`, a `concierge serve` process with one agent and the channels under test, and
//! its resident memory.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

/// `target/<profile>/concierge`, next to the running example's `examples/` directory.
pub fn default_concierge() -> PathBuf {
    let exe = std::env::current_exe().unwrap_or_default();
    exe.parent().and_then(Path::parent).map(|p| p.join("concierge")).unwrap_or_else(|| "concierge".into())
}

/// A private `redis-server` with AOF and `appendfsync always`, killed on drop.
pub struct Redis {
    child: Child,
    /// Its loopback port.
    pub port: u16,
    _dir: tempfile::TempDir,
}

impl Redis {
    /// Starts it on a free port and waits until it accepts connections (bounded).
    pub fn start() -> anyhow::Result<Redis> {
        let dir = tempfile::tempdir()?;
        let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "yes"])
            .args(["--appendfsync", "always", "--dir"])
            .arg(dir.path())
            .stdout(Stdio::null())
            .spawn()
            .context("starting redis-server")?;
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            if Instant::now() > deadline {
                bail!("redis-server did not start");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(Redis { child, port, _dir: dir })
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A `concierge serve` with agent `a` (token `bench-token-0123456789`, no wake) and the given
/// channel sections, on loopback ports; killed on drop.
pub struct BenchProxy {
    child: Child,
    /// Webhook ingress address.
    pub http: String,
    /// Admin API address.
    pub admin: String,
    _dir: tempfile::TempDir,
}

impl BenchProxy {
    /// Starts it on the embedded store, or on `redis` when `store` is `"redis"`.
    pub fn start(bin: &Path, store: &str, redis: Option<&Redis>, channels: &str) -> anyhow::Result<BenchProxy> {
        let dir = tempfile::tempdir()?;
        let store = match (store, redis) {
            ("redis", Some(r)) => format!("backend = \"redis\"\nurl = \"redis://127.0.0.1:{}\"", r.port),
            _ => format!("backend = \"embedded\"\npath = \"{}\"", dir.path().join("store.db").display()),
        };
        let config = format!(
            "[server]\nquic_listen = \"127.0.0.1:0\"\nhttp_listen = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\ndata_dir = \"{}\"\nmax_body = \"4MiB\"\n\n[store]\n{store}\n\n[agents.a]\ntoken = \"bench-token-0123456789\"\nmax_pending = 100000000\n[agents.a.wake]\ndriver = \"none\"\npolicy = \"never\"\n\n{channels}",
            dir.path().join("data").display()
        );
        let path = dir.path().join("concierge.toml");
        std::fs::write(&path, config)?;
        let mut child = Command::new(bin)
            .args(["serve", "--config"])
            .arg(&path)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        let stdout = child.stdout.take().context("stdout")?;
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line)?;
        // The ready line (JSON with the listeners' addresses) says the proxy is up.
        let ready: serde_json::Value = serde_json::from_str(&line).with_context(|| format!("ready line: {line}"))?;
        let http = ready["http"].as_str().context("http address")?.to_string();
        let admin = ready["admin"].as_str().context("admin address")?.to_string();
        Ok(BenchProxy { child, http, admin, _dir: dir })
    }

    /// Resident set size in KiB (`VmRSS` of `/proc/<pid>/status`).
    pub fn rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap_or_default();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    }
}

impl Drop for BenchProxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
