//! Wires the configured channels to the proxy: what each adds to HTTP ingress, which held
//! connections it runs in the background, and which senders it binds to which agent.
//! Adding a channel means adding one arm to each of these three functions.

use std::collections::HashMap;
use std::sync::Arc;

use anyhow::Context as _;
use concierge_adapters::webhook::{self, ReplySender, ReplyTarget, Route, Verify};
use concierge_adapters::{ChannelSender, EventSink};
use concierge_config::Config;
use concierge_protocol::ChannelRef;
use tokio::sync::watch;

use crate::outbound::Bindings;

/// The client every outbound HTTP call shares. No redirects: a signed request must never be
/// re-sent to a host the configuration did not name.
pub fn http_client() -> anyhow::Result<reqwest::Client> {
    reqwest::Client::builder().redirect(reqwest::redirect::Policy::none()).build().context("building the HTTP client")
}

/// Which channel each agent may send through, and how.
pub fn senders(config: &Config, http: &reqwest::Client) -> Bindings {
    let mut bindings: Bindings = HashMap::new();
    for (name, hook) in &config.webhooks {
        if let Some(target) = reply_target(hook) {
            let sender: Arc<dyn ChannelSender> = Arc::new(ReplySender::new(http.clone(), target));
            bindings.insert((hook.agent.clone(), ChannelRef::new("webhook", name.clone())), sender);
        }
    }
    bindings
}

/// Everything the HTTP ingress listener serves.
pub fn ingress(config: &Config, sink: Arc<dyn EventSink>) -> axum::Router {
    let routes = config
        .webhooks
        .iter()
        .map(|(name, hook)| Route {
            agent: hook.agent.clone(),
            name: name.clone(),
            verify: verify(&hook.verify),
            max_body: usize::try_from(hook.max_body).unwrap_or(usize::MAX),
            reply: reply_target(hook),
        })
        .collect();
    webhook::router(routes, sink)
}

/// Held platform connections (pollers, sockets); each stops when `shutdown` turns true.
pub fn spawn_connections(
    _config: &Config,
    _http: &reqwest::Client,
    _sink: Arc<dyn EventSink>,
    _shutdown: watch::Receiver<bool>,
) -> Vec<tokio::task::JoinHandle<()>> {
    Vec::new()
}

fn verify(v: &concierge_config::Verify) -> Verify {
    match v {
        concierge_config::Verify::None => Verify::None,
        concierge_config::Verify::Standard { secret } => Verify::Standard {
            secrets: secret.expose().split_whitespace().map(concierge_adapters::signature::secret_bytes).collect(),
        },
        concierge_config::Verify::Hmac { header, secret } => {
            Verify::Hmac { header: header.clone(), secret: secret.expose().as_bytes().to_vec() }
        }
    }
}

fn reply_target(hook: &concierge_config::WebhookConfig) -> Option<ReplyTarget> {
    hook.reply_url.as_ref().map(|url| ReplyTarget {
        url: url.clone(),
        secret: hook.reply_secret.as_ref().map(|s| concierge_adapters::signature::secret_bytes(s.expose())),
    })
}
