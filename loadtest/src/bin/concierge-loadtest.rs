//! `concierge-loadtest`: the benchmark scenarios of the core issue, each against its own
//! `concierge serve` process on loopback. Prints a table; with `--json`, one JSON object as
//! the last line of stdout.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};
use concierge_loadtest::scenario::{self, Context, Report, StoreChoice};

/// Benchmarks Concierge: replay throughput, warm-path (e2e) latency, wake overhead, ingest
/// rate, fleet-view API latency, memory per held connection, and per-channel ingest (SMTP with
/// Postfix alongside, Telegram, Slack, Discord, WhatsApp) against the platform fakes.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    /// The `concierge` binary to start (default: next to this binary).
    #[arg(long, global = true)]
    concierge: Option<PathBuf>,
    /// Store backend of the proxy under test.
    #[arg(long, global = true, value_enum, default_value_t = Store::Redis)]
    store: Store,
    /// Redis URL for `--store redis` (agent ids are unique per run; their keys are deleted after).
    #[arg(long, global = true, default_value = "redis://127.0.0.1:6379")]
    redis_url: String,
    /// Shrink every scenario to a smoke size (CI).
    #[arg(long, global = true)]
    quick: bool,
    /// Print one JSON object as the last line of stdout.
    #[arg(long, global = true)]
    json: bool,
    /// Also write a self-contained HTML report (SVG plots) and the JSON into this directory.
    #[arg(long, global = true, value_name = "DIR")]
    report: Option<PathBuf>,
    /// Run the scenario this many times and report the median of each figure over the runs
    /// whose CPU steal is within --max-steal (at most 3x as many attempts).
    #[arg(long, global = true, default_value_t = 1)]
    runs: usize,
    /// A second `concierge` binary measured the same way, alternated run by run with the
    /// first; the report gives both medians and their ratio.
    #[arg(long, global = true, value_name = "BINARY")]
    versus: Option<PathBuf>,
    /// With --runs or --versus: runs (pairs, with --versus) where the hypervisor stole more
    /// than this share of the CPU are measured again instead of counted.
    #[arg(long, global = true, default_value_t = 0.05)]
    max_steal: f64,
    #[command(subcommand)]
    scenario: Scenario,
}

#[derive(Clone, Copy, ValueEnum)]
enum Store {
    Redis,
    Embedded,
}

#[derive(Clone, Subcommand)]
enum Scenario {
    /// Buffer N events for a sleeping agent, then time one agent draining them.
    Replay {
        /// Events to buffer (default 100000; 2000 with --quick).
        #[arg(long)]
        events: Option<u64>,
        /// Credit window the agent grants.
        #[arg(long, default_value_t = 4096)]
        window: u32,
        /// Cumulative ack every this many events.
        #[arg(long, default_value_t = 256)]
        ack_every: u64,
        /// Concurrent connections filling the buffer.
        #[arg(long, default_value_t = 64)]
        fill_concurrency: usize,
        /// Webhook body size in bytes.
        #[arg(long, default_value_t = 1024)]
        body_bytes: usize,
    },
    /// Open-loop webhooks at a fixed rate to a connected agent; webhook -> agent latency.
    #[command(name = "e2e", alias = "latency")]
    E2e {
        /// Webhooks per second.
        #[arg(long, default_value_t = 1000)]
        rate: u64,
        /// Measured duration, e.g. 10s (default 10s; 2s with --quick).
        #[arg(long, value_parser = humantime_duration)]
        duration: Option<Duration>,
        /// Most requests in flight.
        #[arg(long, default_value_t = 64)]
        connections: usize,
        /// The agent acks after every this many events.
        #[arg(long, default_value_t = 1)]
        ack_every: u64,
        /// Webhook body size in bytes.
        #[arg(long, default_value_t = 1024)]
        body_bytes: usize,
    },
    /// Wake overhead: exec driver starting the built-in echo agent, repeatedly; then a storm of
    /// M http-driver agents each getting one event at once (in-process SDK agents).
    #[command(alias = "wake")]
    WakeStorm {
        /// Wake rounds (default 30; 5 with --quick).
        #[arg(long)]
        wakes: Option<u32>,
        /// The agent's sleep_after.
        #[arg(long, value_parser = humantime_duration, default_value = "200ms")]
        sleep_after: Duration,
        /// Agents woken at once in the storm (default 1000; 10 with --quick; 0 skips the storm).
        #[arg(long)]
        agents: Option<usize>,
        /// Webhook POSTs in flight during the storm, one keep-alive connection each.
        #[arg(long, default_value_t = 64)]
        storm_connections: usize,
    },
    /// Signed webhooks at fixed concurrency: durable-ack rate and latency.
    Ingest {
        /// Concurrent requests, one keep-alive connection each.
        #[arg(long, default_value_t = 64)]
        concurrency: usize,
        /// Measured duration, e.g. 10s (default 10s; 2s with --quick).
        #[arg(long, value_parser = humantime_duration)]
        duration: Option<Duration>,
        /// Agents the workers spread over.
        #[arg(long, default_value_t = 1)]
        agents: usize,
        /// Webhook body size in bytes.
        #[arg(long, default_value_t = 1024)]
        body_bytes: usize,
        /// Also measure peers in the same run: nginx static 200 under the same load and
        /// redis-benchmark pipelined XADD (a missing peer is skipped, loudly).
        #[arg(long)]
        peer: bool,
    },
    /// Many agents with buffered events: latency of /api/fleet, /api/agents, /metrics.
    Fleet {
        /// Agents (default 10000; 200 with --quick).
        #[arg(long)]
        agents: Option<usize>,
        /// Events buffered over them, 64-256 bytes each (default 1000000; 20000 with --quick).
        #[arg(long)]
        events: Option<u64>,
        /// Concurrent connections filling the buffers.
        #[arg(long, default_value_t = 64)]
        fill_concurrency: usize,
        /// Timed requests per endpoint (default 50; 20 with --quick).
        #[arg(long)]
        requests: Option<usize>,
        /// Keep the proxy up this long after measuring, e.g. 120s (to open the dashboard).
        #[arg(long, value_parser = humantime_duration, default_value = "0s")]
        hold: Duration,
    },
    /// K idle agent QUIC sessions + K idle SMTP sessions, then K agent sessions + K idle Slack
    /// Socket Mode sockets: proxy resident memory per connection.
    Hold {
        /// Idle agent sessions (default 10000; 200 with --quick).
        #[arg(long)]
        agents: Option<usize>,
        /// Idle SMTP sessions after EHLO (default 10000; 200 with --quick).
        #[arg(long)]
        smtp: Option<usize>,
        /// Idle Slack Socket Mode sockets, one app each, against the fake (default 10000; 200
        /// with --quick; 0 skips that half).
        #[arg(long)]
        slack: Option<usize>,
        /// Connections opened at once.
        #[arg(long, default_value_t = 64)]
        connect_concurrency: usize,
    },
    /// SMTP sessions delivering messages (250 after the final dot = stored): messages/s and
    /// latency, with a private Postfix measured side by side when installed (root).
    Smtp {
        /// Concurrent sessions; a full run (no --quick) also measures 10x this many.
        #[arg(long, default_value_t = 10)]
        sessions: usize,
        /// Messages per measurement (default 4000; 200 with --quick).
        #[arg(long)]
        messages: Option<usize>,
        /// Message body size in bytes.
        #[arg(long, default_value_t = 10240)]
        bytes: usize,
        /// Measurements of each server, interleaved (ours, Postfix, ours, ...).
        #[arg(long, default_value_t = 1)]
        rounds: usize,
        /// `appendfsync` of the private redis-server used with --store redis.
        #[arg(long, default_value = "always", value_parser = ["always", "everysec", "no"])]
        appendfsync: String,
        /// Skip the Postfix comparison.
        #[arg(long)]
        no_peer: bool,
    },
    /// Telegram long polling against the fake: updates/s, update -> confirmed latency, memory
    /// per idle poller.
    Telegram {
        /// Updates queued at once to one bot (default 20000; 300 with --quick).
        #[arg(long)]
        updates: Option<usize>,
        /// Updates sent one at a time for the latency probe (default 500; 20 with --quick).
        #[arg(long)]
        probe: Option<usize>,
        /// Bots long-polling at once for the memory figure, 0 to skip (default 1000; 10 with --quick).
        #[arg(long, visible_alias = "bots")]
        connections: Option<usize>,
    },
    /// Slack Socket Mode against the fake: events/s, memory per idle socket.
    Slack {
        /// Events queued at once on one socket (default 20000; 300 with --quick).
        #[arg(long)]
        events: Option<usize>,
        /// Apps (one idle socket each) for the memory figure, 0 to skip (default 1000; 10 with --quick).
        #[arg(long, visible_alias = "connections")]
        apps: Option<usize>,
    },
    /// Discord gateway against the fake: dispatches/s, dispatch -> stored latency, memory per
    /// idle gateway.
    Discord {
        /// Dispatches queued at once on one shard (default 20000; 200 with --quick).
        #[arg(long)]
        events: Option<u64>,
        /// Dispatches sent one at a time for the latency probe (default 500; 20 with --quick).
        #[arg(long)]
        probe: Option<usize>,
        /// Gateways (bots) held at once for the memory figure, 0 to skip (default 1000; 5 with --quick).
        #[arg(long, visible_alias = "bots")]
        connections: Option<usize>,
    },
    /// Signed WhatsApp webhooks (several messages per POST) at fixed concurrency: durable-ack
    /// rate and latency.
    Whatsapp {
        /// Concurrent POSTs, one keep-alive connection each.
        #[arg(long, default_value_t = 32)]
        concurrency: usize,
        /// Text messages per notification.
        #[arg(long, default_value_t = 10)]
        messages_per_post: usize,
        /// Measured duration, e.g. 10s (default 10s; 2s with --quick).
        #[arg(long, value_parser = humantime_duration)]
        duration: Option<Duration>,
    },
}

fn humantime_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (number, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit() && c != '.').unwrap_or(s.len()));
    let n: f64 = number.parse().map_err(|_| format!("invalid duration {s:?}: expected e.g. 10s, 500ms"))?;
    let secs = match unit {
        "ms" => n / 1000.0,
        "s" | "" => n,
        "m" => n * 60.0,
        _ => return Err(format!("invalid duration unit in {s:?}: use ms, s or m")),
    };
    Ok(Duration::from_secs_f64(secs))
}

fn default_concierge() -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|p| p.parent().map(|d| d.join("concierge")))
        .unwrap_or_else(|| PathBuf::from("concierge"))
}

fn main() -> ExitCode {
    // The `hold` scenario's helper process (holds idle SMTP sessions or the fake Slack's
    // sockets; see scenario::hold).
    if let Ok(spec) = std::env::var(scenario::hold::HOLDER_ENV) {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build();
        return match rt.map_err(anyhow::Error::from).and_then(|rt| rt.block_on(scenario::hold::holder_main(&spec))) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                println!("error {e:#}");
                ExitCode::FAILURE
            }
        };
    }
    let cli = Cli::parse();
    let ctx = Context {
        concierge: cli.concierge.clone().unwrap_or_else(default_concierge),
        store: match cli.store {
            Store::Redis => StoreChoice::Redis(cli.redis_url.clone()),
            Store::Embedded => StoreChoice::Embedded,
        },
        quick: cli.quick,
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let versus = cli.versus.clone().map(|concierge| Context { concierge, ..ctx.clone() });
    let series = cli.runs > 1 || versus.is_some();
    let measured = if series {
        runtime.block_on(run_series(&ctx, versus.as_ref(), &cli.scenario, cli.runs.max(1), cli.max_steal))
    } else {
        runtime.block_on(run(&ctx, cli.scenario.clone())).map(|r| (r, None))
    };
    match measured {
        Ok((report, versus)) => {
            print!("{}", report.to_table());
            if let Some(dir) = &cli.report {
                match scenario::html::write(dir, &report) {
                    Ok(path) => eprintln!("report: {}", path.display()),
                    Err(e) => {
                        eprintln!("error: writing the report: {e:#}");
                        return ExitCode::FAILURE;
                    }
                }
            }
            if cli.json {
                let mut json = report.to_json();
                if let Some(v) = versus {
                    json["versus"] = v;
                }
                println!("{json}");
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// `runs` measurements (with `versus`, pairs alternated, each binary first in turn), retried
/// while the host steals more than `max_steal`; the medians, and the comparison as JSON.
async fn run_series(
    ctx: &Context,
    versus: Option<&Context>,
    s: &Scenario,
    runs: usize,
    max_steal: f64,
) -> anyhow::Result<(Report, Option<serde_json::Value>)> {
    use scenario::series::{ATTEMPTS_PER_RUN, Series, quiet_enough};
    let (mut ours, mut theirs) = (Series::default(), Series::default());
    for attempt in 0..runs * ATTEMPTS_PER_RUN {
        if ours.kept.len() >= runs {
            break;
        }
        eprintln!("run {} ({} kept of {runs}) ...", attempt + 1, ours.kept.len());
        let Some(other) = versus else {
            let r = run(ctx, s.clone()).await?;
            let keep = quiet_enough(&r, max_steal);
            ours.add(r, keep);
            continue;
        };
        let (a, b) = if attempt % 2 == 0 {
            let a = run(ctx, s.clone()).await?;
            (a, run(other, s.clone()).await?)
        } else {
            let b = run(other, s.clone()).await?;
            (run(ctx, s.clone()).await?, b)
        };
        let keep = quiet_enough(&a, max_steal) && quiet_enough(&b, max_steal);
        ours.add(a, keep);
        theirs.add(b, keep);
    }
    let mut report = ours.summary(max_steal).ok_or_else(|| anyhow::anyhow!("no run completed"))?;
    let compared = match (versus, theirs.summary(max_steal)) {
        (Some(other), Some(their)) => {
            Some(scenario::series::compare(&mut report, &their, &other.concierge.display().to_string()))
        }
        _ => None,
    };
    Ok((report, compared))
}

async fn run(ctx: &Context, s: Scenario) -> anyhow::Result<Report> {
    let q = ctx.quick;
    match s {
        Scenario::Replay { events, window, ack_every, fill_concurrency, body_bytes } => {
            let mut p = scenario::replay::Params::defaults(q);
            p.events = events.unwrap_or(p.events);
            p.window = window;
            p.ack_every = ack_every.max(1);
            p.fill_concurrency = fill_concurrency.max(1);
            p.body_bytes = body_bytes;
            scenario::replay::run(ctx, &p).await
        }
        Scenario::E2e { rate, duration, connections, ack_every, body_bytes } => {
            let mut p = scenario::e2e::Params::defaults(q);
            p.rate = rate.max(1);
            p.duration = duration.unwrap_or(p.duration);
            p.connections = connections.max(1);
            p.ack_every = ack_every.max(1);
            p.body_bytes = body_bytes;
            scenario::e2e::run(ctx, &p).await
        }
        Scenario::WakeStorm { wakes, sleep_after, agents, storm_connections } => {
            let mut p = scenario::wake_storm::Params::defaults(q);
            p.wakes = wakes.unwrap_or(p.wakes).max(1);
            p.sleep_after = sleep_after;
            p.agents = agents.unwrap_or(p.agents);
            p.storm_connections = storm_connections.max(1);
            scenario::wake_storm::run(ctx, &p).await
        }
        Scenario::Ingest { concurrency, duration, agents, body_bytes, peer } => {
            let mut p = scenario::ingest::Params::defaults(q);
            p.concurrency = concurrency.max(1);
            p.duration = duration.unwrap_or(p.duration);
            p.agents = agents.max(1);
            p.body_bytes = body_bytes;
            p.peer = peer;
            scenario::ingest::run(ctx, &p).await
        }
        Scenario::Fleet { agents, events, fill_concurrency, requests, hold } => {
            let mut p = scenario::fleet::Params::defaults(q);
            p.agents = agents.unwrap_or(p.agents).max(1);
            p.events = events.unwrap_or(p.events);
            p.fill_concurrency = fill_concurrency.max(1);
            p.requests = requests.unwrap_or(p.requests).max(1);
            p.hold = hold;
            scenario::fleet::run(ctx, &p).await
        }
        Scenario::Hold { agents, smtp, slack, connect_concurrency } => {
            let mut p = scenario::hold::Params::defaults(q);
            p.agents = agents.unwrap_or(p.agents).max(1);
            p.smtp = smtp.unwrap_or(p.smtp);
            p.slack = slack.unwrap_or(p.slack);
            p.connect_concurrency = connect_concurrency.max(1);
            scenario::hold::run(ctx, &p).await
        }
        Scenario::Smtp { sessions, messages, bytes, rounds, appendfsync, no_peer } => {
            let mut p = scenario::smtp::Params::defaults(q);
            p.sessions = sessions.max(1);
            p.messages = messages.unwrap_or(p.messages).max(1);
            p.bytes = bytes.max(100);
            p.rounds = rounds.max(1);
            p.appendfsync = appendfsync;
            p.peer = !no_peer;
            scenario::smtp::run(ctx, &p).await
        }
        Scenario::Telegram { updates, probe, connections } => {
            let mut p = scenario::telegram::Params::defaults(q);
            p.updates = updates.unwrap_or(p.updates).max(1);
            p.probe = probe.unwrap_or(p.probe).max(1);
            p.bots = connections.unwrap_or(p.bots);
            scenario::telegram::run(ctx, &p).await
        }
        Scenario::Slack { events, apps } => {
            let mut p = scenario::slack::Params::defaults(q);
            p.events = events.unwrap_or(p.events).max(1);
            p.apps = apps.unwrap_or(p.apps);
            scenario::slack::run(ctx, &p).await
        }
        Scenario::Discord { events, probe, connections } => {
            let mut p = scenario::discord::Params::defaults(q);
            p.events = events.unwrap_or(p.events).max(1);
            p.probe = probe.unwrap_or(p.probe).max(1);
            p.bots = connections.unwrap_or(p.bots);
            scenario::discord::run(ctx, &p).await
        }
        Scenario::Whatsapp { concurrency, messages_per_post, duration } => {
            let mut p = scenario::whatsapp::Params::defaults(q);
            p.concurrency = concurrency.max(1);
            p.messages_per_post = messages_per_post.max(1);
            p.duration = duration.unwrap_or(p.duration);
            scenario::whatsapp::run(ctx, &p).await
        }
    }
}
