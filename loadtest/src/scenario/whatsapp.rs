//! `whatsapp`: WhatsApp Cloud API webhooks into the proxy's `POST /whatsapp/<name>` endpoint:
//! notifications in Meta's shape (built by [`crate::whatsapp::notification`]), each carrying
//! `messages_per_post` text messages with unique wamids, signed over the exact body
//! (`X-Hub-Signature-256: sha256=<hex HMAC-SHA256 keyed by the app secret>`), POSTed by
//! `concurrency` closed-loop workers on keep-alive connections. The proxy answers 200 only
//! when every message of the body is stored, so 200/s is the durable ack rate; messages/s is
//! that times the batch size. The agent sleeps (policy `never`): only the write path counts.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use bytes::Bytes;

use super::channel::agent_config;
use super::ingest::{Request, Shape, closed_loop};
use super::proxy::{CpuMeter, Proxy};
use super::{Context, Report, random_hex};
use crate::whatsapp::{FakeWhatsApp, notification, text_message};

/// Parameters of the whatsapp scenario.
#[derive(Clone, Debug)]
pub struct Params {
    /// Concurrent POSTs (one keep-alive connection each).
    pub concurrency: usize,
    /// Text messages in each notification.
    pub messages_per_post: usize,
    /// Measured duration.
    pub duration: Duration,
    /// Excluded from the figures, before the measured duration.
    pub warmup: Duration,
}

impl Params {
    /// Full sizes, or smoke sizes.
    pub fn defaults(quick: bool) -> Self {
        Self {
            concurrency: 32,
            messages_per_post: 10,
            duration: Duration::from_secs(if quick { 2 } else { 10 }),
            warmup: Duration::from_millis(if quick { 200 } else { 1000 }),
        }
    }
}

const APP_SECRET: &str = "bench-app-secret";
const ACCESS_TOKEN: &str = "bench-access-token";
const PHONE_NUMBER_ID: &str = "1065";

/// Runs the scenario.
pub async fn run(ctx: &Context, p: &Params) -> anyhow::Result<Report> {
    let mut report = Report::new("whatsapp", ctx);
    report.param("concurrency", p.concurrency as u64);
    report.param("messages_per_post", p.messages_per_post as u64);
    report.param("duration_s", p.duration.as_secs_f64());
    report.param("warmup_s", p.warmup.as_secs_f64());
    report.param("signature", "X-Hub-Signature-256");

    let run_id = random_hex(10);
    let agent = format!("wa-{run_id}");
    // The fake signs bodies with the app secret (and would answer the proxy's Graph sends).
    let fake = FakeWhatsApp::start(APP_SECRET, ACCESS_TOKEN, None).await?;
    let config = agent_config(&agent)
        + &format!(
            "[whatsapp.wa]\nagent = \"{agent}\"\napp_secret = \"{APP_SECRET}\"\nverify_token = \"v\"\n\
             access_token = \"{ACCESS_TOKEN}\"\nphone_number_id = \"{PHONE_NUMBER_ID}\"\ngraph_base = \"{}\"\n\n",
            fake.graph_base
        );
    let mut proxy = Proxy::start(&ctx.concierge, &ctx.store, &config, vec![agent.clone()])?;
    let result = measure(&mut proxy, &fake, &run_id, p, &mut report).await;
    let result = result.map_err(|e| e.context(format!("whatsapp failed; proxy log tail:\n{}", proxy.log())));
    proxy.stop().await?;
    result?;
    Ok(report)
}

async fn measure(
    proxy: &mut Proxy,
    fake: &FakeWhatsApp,
    run_id: &str,
    p: &Params,
    report: &mut Report,
) -> anyhow::Result<()> {
    let per_post = p.messages_per_post.max(1);
    let (fake, run_id) = (fake.clone(), run_id.to_string());
    let make = move |w: usize, i: u64| {
        let msgs = (0..per_post)
            .map(|j| text_message("4915550001", &format!("wamid.{run_id}.{w}.{i}.{j}"), &format!("message {i}/{j}")))
            .collect();
        let body = notification(PHONE_NUMBER_ID, msgs, vec![]);
        let sig = fake.signature(body.as_bytes());
        Request {
            path: "/whatsapp/wa".into(),
            headers: vec![("content-type", "application/json".into()), ("x-hub-signature-256", sig)],
            body: Bytes::from(body),
        }
    };
    eprintln!(
        "whatsapp: {} workers, {per_post} messages per POST, for {:?} (+{:?} warm-up) ...",
        p.concurrency, p.duration, p.warmup
    );
    let shape = Shape { concurrency: p.concurrency, warmup: p.warmup, duration: p.duration };
    let cpu = CpuMeter::start(proxy).await;
    let r = closed_loop(proxy.http, &shape, 200, Arc::new(make)).await.context("loading the proxy")?;
    cpu.finish(report);
    proxy.check_alive()?;
    let secs = p.duration.as_secs_f64();
    report.figure("posts_per_s", r.acked as f64 / secs, "200/s");
    report.figure("messages_per_s", (r.acked * per_post as u64) as f64 / secs, "messages/s");
    report.latency("ack_latency", &r.latencies, None);
    report.figure("errors", r.errors as f64, "count");
    if let Some(e) = r.first_error {
        report.notes.push(format!("first error: {e}"));
    }
    anyhow::ensure!(r.acked > 0, "no notification was acknowledged with 200");
    Ok(())
}
