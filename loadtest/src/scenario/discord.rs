//! `discord`: the Discord gateway against the fake ([`crate::discord`]), through a real
//! `concierge serve`. A dispatch counts as stored when the agent's head offset (admin API)
//! covers it; the adapter reads the next dispatch only after the previous one is stored.
//! - One shard: a burst of `events` `MESSAGE_CREATE` dispatches queued at once -> events/s
//!   until all are stored; then a serial probe (one dispatch at a time): queued -> stored
//!   latency (the check is an admin API request, so the polling interval is that request's
//!   round trip, a fraction of a millisecond).
//! - `bots` gateways at once (one fake per bot): the proxy's resident memory per idle gateway
//!   (VmRSS with the gateways minus a proxy with none).

use std::sync::Arc;
use std::time::Duration;

use serde_json::json;

use super::channel::{agent_config, baseline_rss, idle_memory, probe_latency, raise_nofile_for, wait_until};
use super::proxy::Proxy;
use super::{Context, Report, random_hex};
use crate::discord::FakeDiscord;

/// Parameters of the discord scenario.
#[derive(Clone, Debug)]
pub struct Params {
    /// Dispatches queued at once for the one-shard rate.
    pub events: u64,
    /// Dispatches sent one at a time for the latency probe.
    pub probe: usize,
    /// Gateways (bots) held at once for the memory figure (0 skips it).
    pub bots: usize,
    /// Pause before each RSS reading, so the proxy's allocations settle.
    pub settle: Duration,
}

impl Params {
    /// The examples' sizes, or smoke sizes.
    pub fn defaults(quick: bool) -> Self {
        Self {
            events: if quick { 200 } else { 20_000 },
            probe: if quick { 20 } else { 500 },
            bots: if quick { 5 } else { 1000 },
            settle: Duration::from_millis(if quick { 300 } else { 5000 }),
        }
    }
}

fn token(i: usize) -> String {
    format!("BENCH.token-{i}")
}

fn bot_section(name: &str, i: usize, agent: &str, fake: &FakeDiscord) -> String {
    format!(
        "[discord.{name}]\nagent = \"{agent}\"\ntoken = \"{}\"\ngateway_url = \"{}\"\napi_base = \"{}\"\n\n",
        token(i),
        fake.gateway_url(),
        fake.api_base()
    )
}

fn message(i: u64) -> serde_json::Value {
    json!({"id": (3_000_000_000_000_000_000u64 + i).to_string(), "channel_id": "3000", "guild_id": "4000",
        "author": {"id": "5000"}, "content": format!("message {i}"), "timestamp": "2026-11-25T13:00:00+00:00"})
}

/// Runs the scenario.
pub async fn run(ctx: &Context, p: &Params) -> anyhow::Result<Report> {
    let mut report = Report::new("discord", ctx);
    report.param("events", p.events);
    report.param("probe", p.probe as u64);
    report.param("bots", p.bots as u64);
    let run_id = random_hex(10);
    let agent = format!("discord-{run_id}");
    one_shard(ctx, p, &agent, &run_id, &mut report).await?;
    if p.bots > 0 {
        many_gateways(ctx, p, &agent, &run_id, &mut report).await?;
    }
    Ok(report)
}

async fn one_shard(ctx: &Context, p: &Params, agent: &str, run_id: &str, report: &mut Report) -> anyhow::Result<()> {
    let fake = Arc::new(FakeDiscord::start(&token(0), Duration::from_secs(41)).await?);
    let config = agent_config(agent) + &bot_section(&format!("d{run_id}-0"), 0, agent, &fake);
    let mut proxy = Proxy::start(&ctx.concierge, &ctx.store, &config, vec![agent.to_string()])?;
    // The gateway session (state key `discord:<bot>`) lives outside the agent's keys.
    proxy.cleanup_keys(format!("c:state:*{run_id}*"));
    let result = async {
        wait_until("the gateway session", Duration::from_secs(20), async || fake.session_id().is_some()).await?;
        eprintln!("discord: {} dispatches through one shard ...", p.events);
        let start = proxy.head(agent).await?;
        for i in 0..p.events {
            fake.dispatch("MESSAGE_CREATE", message(i));
        }
        let want = start + p.events;
        let limit = Duration::from_secs(60) + Duration::from_millis(20 * p.events);
        let took =
            wait_until("all dispatches stored", limit, async || proxy.head(agent).await.is_ok_and(|h| h >= want))
                .await?;
        proxy.check_alive()?;
        report.figure("events", p.events as f64, "count");
        report.figure("events_per_s", p.events as f64 / took.as_secs_f64(), "events/s");

        eprintln!("discord: latency probe, {} dispatches one at a time ...", p.probe);
        let f = fake.clone();
        let push = move |i: usize| {
            f.dispatch("MESSAGE_CREATE", message(1_000_000 + i as u64));
        };
        let handle = tokio::runtime::Handle::current();
        let client = reqwest::Client::new();
        let url = format!("http://{}/api/agents/{agent}", proxy.admin);
        let stored = move |i: usize| {
            let head = handle.block_on(async {
                let v: serde_json::Value = client.get(&url).send().await.ok()?.json().await.ok()?;
                v["head"].as_u64()
            });
            head.is_some_and(|h| h > want + i as u64)
        };
        let h = probe_latency(p.probe, Duration::from_secs(10), push, stored).await?;
        report.latency("dispatch_to_stored", &h, None);
        anyhow::Ok(())
    }
    .await;
    let result = result.map_err(|e| e.context(format!("discord (one shard) failed; proxy log tail:\n{}", proxy.log())));
    proxy.stop().await?;
    result
}

async fn many_gateways(
    ctx: &Context,
    p: &Params,
    agent: &str,
    run_id: &str,
    report: &mut Report,
) -> anyhow::Result<()> {
    report.param("nofile", raise_nofile_for(p.bots));
    let base = baseline_rss(ctx, agent, p.settle).await?;
    let mut fakes = Vec::with_capacity(p.bots);
    let mut config = agent_config(agent);
    for i in 0..p.bots {
        let fake = FakeDiscord::start(&token(i), Duration::from_secs(41)).await?;
        config += &bot_section(&format!("g{run_id}-{i}"), i, agent, &fake);
        fakes.push(fake);
    }
    let mut proxy = Proxy::start(&ctx.concierge, &ctx.store, &config, vec![agent.to_string()])?;
    proxy.cleanup_keys(format!("c:state:*{run_id}*"));
    let result = async {
        eprintln!("discord: {} gateways ...", p.bots);
        let limit = Duration::from_secs(60) + Duration::from_millis(50 * p.bots as u64);
        wait_until("every gateway session", limit, async || fakes.iter().all(|f| f.session_id().is_some())).await?;
        tokio::time::sleep(p.settle).await;
        proxy.check_alive()?;
        idle_memory(report, "gateway", p.bots, base, proxy.rss_kib());
        anyhow::Ok(())
    }
    .await;
    let result =
        result.map_err(|e| e.context(format!("discord (many gateways) failed; proxy log tail:\n{}", proxy.log())));
    proxy.stop().await?;
    result
}
