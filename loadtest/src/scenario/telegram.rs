//! `telegram`: Telegram long polling against the fake Bot API ([`crate::telegram`]), through
//! a real `concierge serve`. An update counts as stored when the fake sees it confirmed: the
//! adapter calls the next `getUpdates` with a higher offset only after the durable write.
//! - One bot: a burst of `updates` queued at once -> updates/s until all are confirmed; then
//!   a serial probe (one update at a time): queued -> confirmed latency.
//! - `bots` bots long-polling at once: the proxy's resident memory per idle poller (VmRSS with
//!   the bots minus a proxy with none), then one update to every bot -> fan-in updates/s.

use std::time::Duration;

use super::channel::{agent_config, baseline_rss, idle_memory, probe_latency, raise_nofile_for, wait_until};
use super::proxy::Proxy;
use super::{Context, Report, random_hex};
use crate::telegram::{FakeTelegram, Options};

/// Parameters of the telegram scenario.
#[derive(Clone, Debug)]
pub struct Params {
    /// Updates queued at once for the one-bot rate.
    pub updates: usize,
    /// Updates sent one at a time for the latency probe.
    pub probe: usize,
    /// Bots long-polling at once for the memory figure (0 skips it).
    pub bots: usize,
    /// Pause before each RSS reading, so the proxy's allocations settle.
    pub settle: Duration,
}

impl Params {
    /// The examples' sizes, or smoke sizes.
    pub fn defaults(quick: bool) -> Self {
        Self {
            updates: if quick { 300 } else { 20_000 },
            probe: if quick { 20 } else { 500 },
            bots: if quick { 10 } else { 1000 },
            settle: Duration::from_millis(if quick { 300 } else { 3000 }),
        }
    }
}

fn bot_token(i: usize) -> String {
    format!("{}:BENCH-token-{i}", 1_000_000 + i)
}

fn bot_section(i: usize, agent: &str, api_base: &str, poll_timeout: &str) -> String {
    format!(
        "[telegram.b{i}]\nagent = \"{agent}\"\ntoken = \"{}\"\napi_base = \"{api_base}\"\n\
         poll_timeout = \"{poll_timeout}\"\n\n",
        bot_token(i)
    )
}

/// Runs the scenario.
pub async fn run(ctx: &Context, p: &Params) -> anyhow::Result<Report> {
    let mut report = Report::new("telegram", ctx);
    report.param("updates", p.updates as u64);
    report.param("probe", p.probe as u64);
    report.param("bots", p.bots as u64);
    report.param("mode", "poll");
    let agent = format!("tg-{}", random_hex(10));
    one_bot(ctx, p, &agent, &mut report).await?;
    if p.bots > 0 {
        many_bots(ctx, p, &agent, &mut report).await?;
    }
    Ok(report)
}

async fn one_bot(ctx: &Context, p: &Params, agent: &str, report: &mut Report) -> anyhow::Result<()> {
    let fake = FakeTelegram::start(Options::default()).await?;
    let token = bot_token(0);
    fake.add_bot(&token);
    let config = agent_config(agent) + &bot_section(0, agent, &fake.api_base, "30s");
    let mut proxy = Proxy::start(&ctx.concierge, &ctx.store, &config, vec![agent.to_string()])?;
    let result = async {
        // Let the poller settle into an idle long poll, then queue everything at once.
        wait_until("the first getUpdates", Duration::from_secs(20), async || fake.polls(&token) >= 1).await?;
        eprintln!("telegram: {} updates to one bot ...", p.updates);
        for i in 0..p.updates {
            fake.push_message(&token, 777, 42, &format!("update {i}"));
        }
        let limit = Duration::from_secs(60) + Duration::from_millis(20 * p.updates as u64);
        let took = wait_until("all updates confirmed", limit, async || fake.pending(&token).is_empty()).await?;
        proxy.check_alive()?;
        let confirmed = fake.confirmed(&token).len();
        anyhow::ensure!(confirmed >= p.updates, "{confirmed} of {} updates confirmed", p.updates);
        report.figure("updates", p.updates as f64, "count");
        report.figure("updates_per_s", p.updates as f64 / took.as_secs_f64(), "updates/s");

        eprintln!("telegram: latency probe, {} updates one at a time ...", p.probe);
        let (f, t) = (fake.clone(), token.clone());
        let push = move |i: usize| {
            f.push_message(&t, 777, 42, &format!("probe {i}"));
        };
        let (f, t) = (fake.clone(), token.clone());
        let h = probe_latency(p.probe, Duration::from_secs(10), push, move |_| f.pending(&t).is_empty()).await?;
        report.latency("update_to_confirmed", &h, None);
        anyhow::Ok(())
    }
    .await;
    let result = result.map_err(|e| e.context(format!("telegram (one bot) failed; proxy log tail:\n{}", proxy.log())));
    proxy.stop().await?;
    result
}

async fn many_bots(ctx: &Context, p: &Params, agent: &str, report: &mut Report) -> anyhow::Result<()> {
    report.param("nofile", raise_nofile_for(p.bots));
    let base = baseline_rss(ctx, agent, p.settle).await?;
    let fake = FakeTelegram::start(Options::default()).await?;
    let mut config = agent_config(agent);
    for i in 0..p.bots {
        fake.add_bot(&bot_token(i));
        config += &bot_section(i, agent, &fake.api_base, "50s");
    }
    let mut proxy = Proxy::start(&ctx.concierge, &ctx.store, &config, vec![agent.to_string()])?;
    let tokens: Vec<String> = (0..p.bots).map(bot_token).collect();
    let result = async {
        eprintln!("telegram: {} bots long-polling ...", p.bots);
        let limit = Duration::from_secs(60) + Duration::from_millis(20 * p.bots as u64);
        wait_until("every bot polling", limit, async || tokens.iter().all(|t| fake.polls(t) >= 1)).await?;
        tokio::time::sleep(p.settle).await;
        proxy.check_alive()?;
        idle_memory(report, "poller", p.bots, base, proxy.rss_kib());
        // One update to every bot at once: how long until all are stored and confirmed.
        for t in &tokens {
            fake.push_message(t, 1, 1, "hello");
        }
        let took = wait_until("one update per bot confirmed", limit, async || {
            tokens.iter().all(|t| fake.pending(t).is_empty())
        })
        .await?;
        report.figure("fan_in_updates_per_s", p.bots as f64 / took.as_secs_f64(), "updates/s");
        anyhow::Ok(())
    }
    .await;
    let result =
        result.map_err(|e| e.context(format!("telegram (many bots) failed; proxy log tail:\n{}", proxy.log())));
    proxy.stop().await?;
    result
}
