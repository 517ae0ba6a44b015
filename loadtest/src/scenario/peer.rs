//! Peers and ceilings measured in the same run as our figures, so ratios are honest:
//! - [`Nginx`]: a private nginx (generated config in a temp dir, loopback, free port,
//!   `daemon off`, one worker per core, access log off) answering a static 200 to any path —
//!   the cost of HTTP alone.
//! - [`redis_xadd`]: `redis-benchmark -P 16` pipelined `XADD` of 1 KiB fields — the store's
//!   ceiling on this machine; the stream key is deleted afterwards.
//! - [`Postfix`]: a private Postfix instance (config dir and queue in a temp dir under
//!   `/var/tmp`), smtpd on a loopback port, no DNS, mail discarded after queueing; its cleanup
//!   fsyncs each queue file before smtpd answers 250 (the SMTP scenario's peer).
//!
//! A missing peer is reported with its Debian install command and skipped, never fatal.

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context as _;

/// Install hints printed when a peer is missing.
pub const NGINX_HINT: &str = "apt-get install nginx (or nginx-light)";
/// Install hint for Postfix (the SMTP scenario's peer).
pub const POSTFIX_HINT: &str =
    "apt-get install postfix (Debian package; the run must be root to start a private instance)";
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
        super::proxy::terminate(&mut self.child, Duration::from_secs(5));
    }
}

/// A private Postfix instance accepting mail for `example.com` on `127.0.0.1:<port>` and
/// discarding it after queueing; stopped (`postfix -c <dir> stop`) and removed on drop.
pub struct Postfix {
    bin: std::path::PathBuf,
    etc: std::path::PathBuf,
    /// Where its smtpd listens.
    pub addr: SocketAddr,
    _dir: tempfile::TempDir,
}

impl Postfix {
    /// Starts it, or `Ok(Err(reason))` when Postfix is not installed or this is not root.
    pub fn start() -> anyhow::Result<Result<Postfix, String>> {
        let Some(bin) = find_tool("postfix") else { return Ok(Err("postfix is not installed".into())) };
        let Ok(system_master) = std::fs::read_to_string("/etc/postfix/master.cf") else {
            return Ok(Err("/etc/postfix/master.cf is missing".into()));
        };
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            return Ok(Err("a private Postfix instance needs root".into()));
        }
        // Same disk as the system spool, as a real queue would be.
        let dir = tempfile::Builder::new().prefix("concierge-postfix-").tempdir_in("/var/tmp").context("temp dir")?;
        let (etc, spool, data) = (dir.path().join("etc"), dir.path().join("spool"), dir.path().join("data"));
        for d in [&etc, &spool, &data] {
            std::fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
        }
        std::fs::set_permissions(dir.path(), std::os::unix::fs::PermissionsExt::from_mode(0o755))?;
        let chown = Command::new("chown").arg("postfix").arg(&data).stdin(Stdio::null()).output();
        anyhow::ensure!(chown.is_ok_and(|o| o.status.success()), "chown postfix {} failed", data.display());
        let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse()?;
        std::fs::write(etc.join("master.cf"), postfix_master_cf(&system_master, port))?;
        std::fs::write(etc.join("main.cf"), postfix_main_cf(dir.path()))?;
        let start = Command::new(&bin).arg("-c").arg(&etc).arg("start").stdin(Stdio::null()).output()?;
        let postfix = Postfix { bin, etc, addr, _dir: dir };
        if !start.status.success() {
            let log = std::fs::read_to_string(postfix._dir.path().join("maillog")).unwrap_or_default();
            anyhow::bail!(
                "postfix start failed: {}{}\n{log}",
                String::from_utf8_lossy(&start.stdout),
                String::from_utf8_lossy(&start.stderr)
            );
        }
        let deadline = Instant::now() + Duration::from_secs(15);
        while std::net::TcpStream::connect(addr).is_err() {
            anyhow::ensure!(Instant::now() < deadline, "Postfix did not listen on {addr} within 15 s");
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(Ok(postfix))
    }
}

impl Drop for Postfix {
    fn drop(&mut self) {
        let _ = Command::new(&self.bin).arg("-c").arg(&self.etc).arg("stop").stdin(Stdio::null()).output();
    }
}

/// The system's `master.cf` with smtpd moved to `127.0.0.1:<port>`, the other listeners
/// (submission, smtps) dropped, and no chroot (the private queue is not set up for one).
fn postfix_master_cf(system: &str, port: u16) -> String {
    let mut out = String::new();
    for line in system.lines() {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let service = line.starts_with(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit());
        if service && fields.get(1) == Some(&"inet") {
            match fields[0] {
                "smtp" => {
                    out += &format!("127.0.0.1:{port} inet n - n - - smtpd\n");
                    continue;
                }
                "submission" | "smtps" | "submissions" => continue,
                _ => {}
            }
        }
        if service && fields.len() >= 8 {
            let mut f = fields.clone();
            f[4] = "n";
            out += &f.join(" ");
        } else {
            out += line;
        }
        out.push('\n');
    }
    out
}

/// `main.cf` of the private instance: loopback only, relay for `example.com` to `discard`,
/// no DNS, no connection or rate limits.
fn postfix_main_cf(dir: &Path) -> String {
    let d = dir.display();
    format!(
        "compatibility_level = 3.6\nqueue_directory = {d}/spool\ndata_directory = {d}/data\n\
         maillog_file = {d}/maillog\nmaillog_file_prefixes = {d}\nmyhostname = mx-peer.example.net\n\
         mydomain = example.net\nmyorigin = $myhostname\ninet_interfaces = loopback-only\ninet_protocols = ipv4\n\
         mynetworks = 127.0.0.0/8\nmydestination =\nrelay_domains = example.com\nrelay_transport = discard\n\
         default_transport = discard\nlocal_transport = discard\nlocal_recipient_maps =\nalias_maps =\n\
         alias_database =\ndisable_dns_lookups = yes\nsmtp_host_lookup = native\nsmtpd_peername_lookup = no\n\
         smtpd_client_connection_count_limit = 0\nsmtpd_client_connection_rate_limit = 0\n\
         smtpd_client_message_rate_limit = 0\ndefault_process_limit = 300\nmessage_size_limit = 52428800\nbiff = no\n"
    )
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
    fn postfix_master_cf_moves_smtpd_to_loopback() {
        let system = "# comment\nsmtp      inet  n       -       y       -       -       smtpd\n\
                      submission inet n       -       y       -       -       smtpd\n\
                      pickup    unix  n       -       y       60      1       pickup\n  -o x=y\n";
        let out = postfix_master_cf(system, 2525);
        assert!(out.contains("127.0.0.1:2525 inet n - n - - smtpd\n"), "{out}");
        assert!(!out.contains("submission"), "{out}");
        assert!(out.contains("pickup unix n - n 60 1 pickup\n"), "{out}");
        assert!(out.contains("# comment\n") && out.contains("  -o x=y\n"), "{out}");
    }

    #[test]
    fn parses_redis_urls() {
        assert_eq!(redis_host_port("redis://127.0.0.1:6380"), ("127.0.0.1".into(), 6380));
        assert_eq!(redis_host_port("redis://localhost/0"), ("localhost".into(), 6379));
        assert_eq!(redis_host_port("redis://:pw@10.0.0.1:7000/2"), ("10.0.0.1".into(), 7000));
    }
}
