//! Peers and ceilings measured in the same run as our figures, so ratios are honest:
//! - [`Nginx`]: a private nginx (generated config in a temp dir, loopback, free port,
//!   `daemon off`, one worker per core, access log off) answering a static 200 to any path —
//!   the cost of HTTP alone.
//! - [`redis_xadd`]: `redis-benchmark -P 16` pipelined `XADD` of 1 KiB fields — the store's
//!   ceiling on this machine; the stream key is deleted afterwards.
//!
//! A missing peer is reported with its Debian install command and skipped, never fatal.

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context as _;

/// Install hints printed when a peer is missing.
pub const NGINX_HINT: &str = "apt-get install nginx (or nginx-light)";
/// Install hint for redis-benchmark.
pub const REDIS_BENCHMARK_HINT: &str = "apt-get install redis-tools";

/// Finds an executable on `PATH` or in the sbin directories (Debian installs nginx there).
pub fn find_tool(name: &str) -> Option<std::path::PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/usr/local/sbin", "/sbin"].iter().map(std::path::PathBuf::from))
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// A private nginx answering 200 on loopback; stopped on drop.
pub struct Nginx {
    child: Child,
    /// Where it listens.
    pub addr: SocketAddr,
    _dir: tempfile::TempDir,
}

impl Nginx {
    /// Starts nginx, or `Ok(None)` if it is not installed.
    pub fn start() -> anyhow::Result<Option<Nginx>> {
        let Some(bin) = find_tool("nginx") else { return Ok(None) };
        let dir = tempfile::Builder::new().prefix("concierge-nginx-").tempdir().context("creating a temp dir")?;
        let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse()?;
        let conf = config(dir.path(), addr);
        std::fs::write(dir.path().join("nginx.conf"), conf).context("writing nginx.conf")?;
        let mut child = Command::new(&bin)
            .arg("-p")
            .arg(dir.path())
            .arg("-c")
            .arg(dir.path().join("nginx.conf"))
            .arg("-e")
            .arg(dir.path().join("error.log"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(addr).is_err() {
            if let Some(status) = child.try_wait()? {
                let log = std::fs::read_to_string(dir.path().join("error.log")).unwrap_or_default();
                anyhow::bail!("nginx exited ({status}): {log}");
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                anyhow::bail!("nginx did not listen on {addr} within 10 s");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(Some(Nginx { child, addr, _dir: dir }))
    }
}

fn config(dir: &Path, addr: SocketAddr) -> String {
    let d = dir.display();
    format!(
        "daemon off;\nmaster_process on;\nworker_processes auto;\npid {d}/nginx.pid;\nerror_log {d}/error.log warn;\n\
         events {{ worker_connections 4096; }}\n\
         http {{\n  access_log off;\n  client_body_temp_path {d}/body;\n  proxy_temp_path {d}/proxy;\n\
           fastcgi_temp_path {d}/fastcgi;\n  uwsgi_temp_path {d}/uwsgi;\n  scgi_temp_path {d}/scgi;\n\
           keepalive_requests 10000000;\n  keepalive_timeout 120s;\n  client_max_body_size 1m;\n\
           client_body_buffer_size 16k;\n\
           server {{\n    listen {addr};\n    location / {{ return 200 \"ok\"; }}\n  }}\n}}\n"
    )
}

impl Drop for Nginx {
    fn drop(&mut self) {
        // SIGTERM to the master is nginx's fast shutdown; it stops its workers.
        // SAFETY: plain kill(2) on the pid of a child we spawned and have not reaped.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Host and port of a `redis://host:port[/db]` URL.
pub fn redis_host_port(url: &str) -> (String, u16) {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let rest = rest.rsplit_once('@').map_or(rest, |(_, r)| r);
    let hostport = rest.split('/').next().unwrap_or("127.0.0.1:6379");
    match hostport.rsplit_once(':') {
        Some((h, p)) => (h.to_string(), p.parse().unwrap_or(6379)),
        None => (hostport.to_string(), 6379),
    }
}

/// Runs `redis-benchmark -P 16 -n <n> -q XADD <key> '*' f <value of value_bytes>` against
/// `url`, deletes the key, and returns requests per second; `Ok(None)` if the tool is missing.
pub async fn redis_xadd(url: &str, n: u64, value_bytes: usize, key: &str) -> anyhow::Result<Option<f64>> {
    let Some(bin) = find_tool("redis-benchmark") else { return Ok(None) };
    let (host, port) = redis_host_port(url);
    let value = "x".repeat(value_bytes.max(1));
    let out = tokio::process::Command::new(bin)
        .args(["-h", &host, "-p", &port.to_string(), "-P", "16", "-c", "50", "-n", &n.to_string(), "-q"])
        .args(["XADD", key, "*", "f", &value])
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(Duration::from_secs(120), out).await.context("redis-benchmark timed out")??;
    // Delete the stream whatever happened.
    let client = redis::Client::open(url)?;
    let mut conn = client.get_multiplexed_async_connection().await?;
    let _: u64 = redis::cmd("DEL").arg(key).query_async(&mut conn).await?;
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    anyhow::ensure!(out.status.success(), "redis-benchmark failed: {text}{}", String::from_utf8_lossy(&out.stderr));
    // `-q` prints `XADD ...: 123456.78 requests per second, p50=...` after \r-separated progress.
    let rate = text
        .split(['\r', '\n'])
        .filter_map(|l| l.split_once(" requests per second").map(|(head, _)| head))
        .filter_map(|head| head.rsplit(' ').next()?.parse::<f64>().ok())
        .next_back()
        .with_context(|| format!("no rate in redis-benchmark output: {text:?}"))?;
    Ok(Some(rate))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_redis_urls() {
        assert_eq!(redis_host_port("redis://127.0.0.1:6380"), ("127.0.0.1".into(), 6380));
        assert_eq!(redis_host_port("redis://localhost/0"), ("localhost".into(), 6379));
        assert_eq!(redis_host_port("redis://:pw@10.0.0.1:7000/2"), ("10.0.0.1".into(), 7000));
    }
}
