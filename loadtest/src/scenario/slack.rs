//! `slack`: Slack Socket Mode against the fake ([`crate::slack`]), through a real
//! `concierge serve` holding real WebSockets. The proxy acks each envelope only after the
//! durable write, so acked = stored.
//! - One app, one socket: a burst of `events` queued at once -> events/s until all are acked
//!   (the fake's redelivery timer is raised to 60 s so a large burst measures ingest, not
//!   redelivery). No latency figure: the fake sends queued envelopes on a 20 ms tick, which
//!   would dominate any per-event latency measured from the queueing.
//! - `apps` apps, one idle socket each: the proxy's resident memory per idle socket (VmRSS with
//!   the sockets minus a proxy with none).

use std::time::Duration;

use super::channel::{agent_config, baseline_rss, idle_memory, raise_nofile_for, wait_until};
use super::proxy::Proxy;
use super::{Context, Report, random_hex};
use crate::slack::{FakeSlack, Options};

/// Parameters of the slack scenario.
#[derive(Clone, Debug)]
pub struct Params {
    /// Events queued at once for the one-socket rate.
    pub events: usize,
    /// Apps (one idle socket each) for the memory figure (0 skips it).
    pub apps: usize,
    /// Pause before each RSS reading, so the proxy's allocations settle.
    pub settle: Duration,
}

impl Params {
    /// The examples' sizes, or smoke sizes.
    pub fn defaults(quick: bool) -> Self {
        Self {
            events: if quick { 300 } else { 20_000 },
            apps: if quick { 10 } else { 1000 },
            settle: Duration::from_millis(if quick { 300 } else { 3000 }),
        }
    }
}

pub(super) fn app_section(i: usize, agent: &str, api_base: &str) -> String {
    format!(
        "[slack.s{i}]\nagent = \"{agent}\"\napp_token = \"xapp-1-A{i}-bench\"\nbot_token = \"xoxb-bench-{i}\"\n\
         api_base = \"{api_base}\"\n\n"
    )
}

pub(super) fn add_app(fake: &FakeSlack, i: usize) {
    fake.add_app(&format!("xapp-1-A{i}-bench"), &format!("xoxb-bench-{i}"), &format!("A{i}"));
}

pub(super) fn fake_options() -> Options {
    Options { redeliver_after: Duration::from_secs(60), max_attempts: 3, ..Options::default() }
}

/// Runs the scenario.
pub async fn run(ctx: &Context, p: &Params) -> anyhow::Result<Report> {
    let mut report = Report::new("slack", ctx);
    report.param("events", p.events as u64);
    report.param("apps", p.apps as u64);
    report.param("mode", "socket");
    let agent = format!("slack-{}", random_hex(10));
    one_socket(ctx, p, &agent, &mut report).await?;
    if p.apps > 0 {
        many_sockets(ctx, p, &agent, &mut report).await?;
    }
    Ok(report)
}

async fn one_socket(ctx: &Context, p: &Params, agent: &str, report: &mut Report) -> anyhow::Result<()> {
    let fake = FakeSlack::start(fake_options()).await?;
    add_app(&fake, 0);
    let config = agent_config(agent) + &app_section(0, agent, &fake.api_base);
    let mut proxy = Proxy::start(&ctx.concierge, &ctx.store, &config, vec![agent.to_string()])?;
    let result = async {
        wait_until("the socket open", Duration::from_secs(20), async || fake.open_sockets("A0") == 1).await?;
        eprintln!("slack: {} events through one socket ...", p.events);
        for i in 0..p.events {
            fake.push_message("A0", "C0BENCH", None, &format!("event {i}"));
        }
        let limit = Duration::from_secs(60) + Duration::from_millis(20 * p.events as u64);
        let took = wait_until("all events acked", limit, async || fake.unacked() == 0).await?;
        proxy.check_alive()?;
        let acked = fake.acked().len();
        anyhow::ensure!(acked == p.events, "{acked} of {} events acked", p.events);
        report.figure("events", p.events as f64, "count");
        report.figure("events_per_s", p.events as f64 / took.as_secs_f64(), "events/s");
        report.notes.push("no per-event latency: the fake Slack sends queued envelopes on a 20 ms tick".into());
        anyhow::Ok(())
    }
    .await;
    let result = result.map_err(|e| e.context(format!("slack (one socket) failed; proxy log tail:\n{}", proxy.log())));
    proxy.stop().await?;
    result
}

async fn many_sockets(ctx: &Context, p: &Params, agent: &str, report: &mut Report) -> anyhow::Result<()> {
    report.param("nofile", raise_nofile_for(p.apps));
    let base = baseline_rss(ctx, agent, p.settle).await?;
    let fake = FakeSlack::start(fake_options()).await?;
    let mut config = agent_config(agent);
    for i in 0..p.apps {
        add_app(&fake, i);
        config += &app_section(i, agent, &fake.api_base);
    }
    let mut proxy = Proxy::start(&ctx.concierge, &ctx.store, &config, vec![agent.to_string()])?;
    let ids: Vec<String> = (0..p.apps).map(|i| format!("A{i}")).collect();
    let result = async {
        eprintln!("slack: {} apps, one socket each ...", p.apps);
        let limit = Duration::from_secs(60) + Duration::from_millis(50 * p.apps as u64);
        wait_until("every socket open", limit, async || ids.iter().all(|id| fake.open_sockets(id) == 1)).await?;
        tokio::time::sleep(p.settle).await;
        proxy.check_alive()?;
        idle_memory(report, "socket", p.apps, base, proxy.rss_kib());
        anyhow::Ok(())
    }
    .await;
    let result =
        result.map_err(|e| e.context(format!("slack (many sockets) failed; proxy log tail:\n{}", proxy.log())));
    proxy.stop().await?;
    result
}
