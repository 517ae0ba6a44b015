//! Plumbing shared by the per-channel scenarios ([`super::smtp`], [`super::telegram`],
//! [`super::slack`], [`super::discord`], [`super::whatsapp`]): bounded waits, a serial latency
//! probe (one event at a time, so the figure is the channel's path, not a queue), and the
//! proxy's resident memory per held platform connection.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;

use super::proxy::{Proxy, agent_section};
use super::{Context, Report, histogram, record};

/// Polls `done` every 5 ms until it holds, at most `within` (naming `what` in the error);
/// returns how long it took.
pub async fn wait_until(what: &str, within: Duration, mut done: impl AsyncFnMut() -> bool) -> anyhow::Result<Duration> {
    let started = Instant::now();
    while !done().await {
        if started.elapsed() > within {
            anyhow::bail!("{what}: not reached within {within:?}");
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    Ok(started.elapsed())
}

/// Waits (bounded) until something accepts TCP connections at `addr`.
pub async fn wait_listening(addr: SocketAddr, within: Duration) -> anyhow::Result<()> {
    wait_until(&format!("a listener at {addr}"), within, async || tokio::net::TcpStream::connect(addr).await.is_ok())
        .await
        .map(|_| ())
}

/// How often the latency probe checks whether an event is stored.
pub const PROBE_POLL: Duration = Duration::from_micros(50);

/// The serial latency probe: for each of `n` events, `push(i)` then poll `stored(i)` every
/// [`PROBE_POLL`] until it holds (at most `limit` per event). Runs on a blocking thread, so
/// the polling interval is not rounded up to the async runtime's 1 ms timer; `stored` may
/// block on async work with `tokio::runtime::Handle::block_on`. The figure is push -> stored
/// as observed, so it includes up to one polling interval (plus the check's own time).
pub async fn probe_latency<P, S>(n: usize, limit: Duration, push: P, mut stored: S) -> anyhow::Result<Histogram<u64>>
where
    P: Fn(usize) + Send + 'static,
    S: FnMut(usize) -> bool + Send + 'static,
{
    tokio::task::spawn_blocking(move || {
        let mut h = histogram();
        for i in 0..n {
            let started = Instant::now();
            push(i);
            while !stored(i) {
                if started.elapsed() > limit {
                    anyhow::bail!("latency probe: event {i} not stored within {limit:?}");
                }
                std::thread::sleep(PROBE_POLL);
            }
            record(&mut h, started.elapsed());
        }
        Ok(h)
    })
    .await?
}

/// Resident memory of a proxy holding no platform connection: `concierge serve` with only
/// agent `agent` configured, read after `settle`, in KiB. The per-connection figure is the
/// difference to a proxy holding them, divided by their number ([`idle_memory`]).
pub async fn baseline_rss(ctx: &Context, agent: &str, settle: Duration) -> anyhow::Result<u64> {
    let config = agent_config(agent);
    let proxy = Proxy::start(&ctx.concierge, &ctx.store, &config, vec![agent.to_string()])?;
    tokio::time::sleep(settle).await;
    let rss = proxy.rss_kib();
    proxy.stop().await?;
    anyhow::ensure!(rss > 0, "could not read the baseline proxy's VmRSS");
    Ok(rss)
}

/// Raises `RLIMIT_NOFILE` for `connections` held platform connections (fakes here, sockets
/// in the proxy, which inherits the limit) before the proxy is spawned; returns the soft limit.
pub fn raise_nofile_for(connections: usize) -> u64 {
    super::hold::raise_nofile((connections * 4 + 1024) as u64)
}

/// The section of the one agent every channel scenario delivers to: asleep (driver `none`,
/// policy `never`), so only the ingest path is measured.
pub fn agent_config(agent: &str) -> String {
    agent_section(agent, &super::random_hex(32), 256, 1_000_000_000, "driver = \"none\"\npolicy = \"never\"")
}

/// Records the memory figures of `held` idle connections of kind `what` (`poller`, `socket`,
/// `gateway`): baseline and loaded RSS in MiB, and KiB per connection.
pub fn idle_memory(report: &mut Report, what: &str, held: usize, base_kib: u64, with_kib: u64) {
    report.figure(&format!("{what}s_held"), held as f64, "count");
    report.figure("proxy_rss_baseline", base_kib as f64 / 1024.0, "MiB");
    report.figure(&format!("proxy_rss_with_{what}s"), with_kib as f64 / 1024.0, "MiB");
    let per = if held == 0 { 0.0 } else { with_kib.saturating_sub(base_kib) as f64 / held as f64 };
    report.figure(&format!("rss_per_idle_{what}"), per, "KiB");
}
