//! Wires the configured channels to the proxy: what each adds to HTTP ingress, which held
//! connections it runs in the background, and which senders it binds to which agent.
//! Adding a channel means adding one arm to each of these three functions.

use std::collections::HashMap;
use std::sync::Arc;

use anyhow::Context as _;
use concierge_adapters::webhook::{self, ReplySender, ReplyTarget, Route, Verify};
use concierge_adapters::{ChannelSender, ConnectionReporter, EventSink};
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
    email_senders(config, &mut bindings);
    for (name, bot) in &config.discord {
        let sender = concierge_adapters::discord::DiscordSender::new(http.clone(), discord_bot(name, bot));
        bindings.insert((bot.agent.clone(), ChannelRef::new("discord", name.clone())), Arc::new(sender));
    }
    chat_senders(config, http, &mut bindings);
    for (name, app) in &config.slack {
        let pacing = concierge_adapters::slack::Pacing { chat_interval: app.chat_interval, ..Default::default() };
        let sender = concierge_adapters::slack::SlackSender::new(http.clone(), &slack_app(name, app), pacing);
        bindings.insert((app.agent.clone(), ChannelRef::new("slack", name.clone())), Arc::new(sender));
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
    let slack_apps = config
        .slack
        .iter()
        .filter(|(_, a)| a.mode == concierge_config::SlackMode::Events)
        .map(|(name, a)| slack_app(name, a))
        .collect();
    let max_body = usize::try_from(config.server.max_body).unwrap_or(usize::MAX);
    webhook::router(routes, sink.clone())
        .merge(concierge_adapters::slack::router(slack_apps, sink.clone(), max_body))
        .merge(chat_ingress(config, sink))
}

/// Held platform connections (pollers, sockets); each reports its state to `reporter` and
/// stops when `shutdown` turns true.
pub fn spawn_connections(
    config: &Config,
    http: &reqwest::Client,
    sink: Arc<dyn EventSink>,
    reporter: Arc<dyn ConnectionReporter>,
    shutdown: watch::Receiver<bool>,
) -> Vec<tokio::task::JoinHandle<()>> {
    let mut tasks = Vec::new();
    tasks.extend(chat_connections(config, http, sink.clone(), reporter.clone(), shutdown.clone()));
    for (name, app) in config.slack.iter().filter(|(_, a)| a.mode == concierge_config::SlackMode::Socket) {
        let (sink, reporter) = (sink.clone(), reporter.clone());
        tasks.push(concierge_adapters::slack::spawn_socket(
            http.clone(),
            slack_app(name, app),
            sink,
            reporter,
            shutdown.clone(),
        ));
    }
    for (name, bot) in &config.discord {
        let (b, sink, reporter) = (discord_bot(name, bot), sink.clone(), reporter.clone());
        tasks.push(concierge_adapters::discord::spawn_gateway(http.clone(), b, sink, reporter, shutdown.clone()));
    }
    tasks.extend(email_listener(config, sink.clone(), reporter, shutdown.clone()));
    tasks
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

/// Email: one sender per configured address (its From), when a relay is configured.
fn email_senders(config: &Config, bindings: &mut Bindings) {
    use concierge_adapters::smtp::reply::{EmailSender, RelaySettings, RelayTls};
    let Some(smtp) = &config.smtp else { return };
    let Some(relay) = &smtp.relay else { return };
    let settings = Arc::new(RelaySettings {
        host: relay.host.clone(),
        port: relay.port,
        tls: match relay.tls {
            concierge_config::RelayTls::None => RelayTls::None,
            concierge_config::RelayTls::StartTls => RelayTls::StartTls,
            concierge_config::RelayTls::Tls => RelayTls::Tls,
        },
        credentials: relay.username.clone().zip(relay.password.as_ref().map(|p| p.expose().to_string())),
        timeout: relay.timeout,
        max_attempts: relay.max_attempts,
        backoff_initial: relay.backoff_initial,
        hello_name: smtp.hostname.clone(),
        dkim: relay.dkim.as_ref().map(|d| {
            let signer = concierge_adapters::smtp::dkim::DkimSigner::new(&d.domain, &d.selector, d.key.expose());
            tracing::info!(record = %signer.dns_record(), name = %signer.dns_name(), "DKIM signing of email replies on");
            signer
        }),
    });
    for (address, agent) in &smtp.addresses {
        let sender: Arc<dyn ChannelSender> = Arc::new(EmailSender::new(settings.clone(), address.clone()));
        bindings.insert((agent.clone(), ChannelRef::new("email", address.clone())), sender);
    }
}

/// Email: the inbound SMTP listener, a held connection that stops on `shutdown`.
fn email_listener(
    config: &Config,
    sink: Arc<dyn EventSink>,
    reporter: Arc<dyn ConnectionReporter>,
    shutdown: watch::Receiver<bool>,
) -> Option<tokio::task::JoinHandle<()>> {
    use concierge_adapters::smtp::{self, AddressBook, ServerSettings, SessionConfig};
    let smtp = config.smtp.as_ref()?;
    let tls = match &smtp.tls {
        None => None,
        Some(files) => match smtp::tls_config(&files.cert, &files.key) {
            Ok(t) => Some(t),
            Err(e) => {
                tracing::error!(error = %e, "SMTP STARTTLS disabled: the certificate could not be loaded");
                None
            }
        },
    };
    let trusted = smtp.trusted_relays.clone();
    let settings = Arc::new(ServerSettings {
        session: Arc::new(SessionConfig {
            hostname: smtp.hostname.clone(),
            max_message_size: usize::try_from(smtp.max_message_size).unwrap_or(usize::MAX),
            max_recipients: smtp.max_recipients,
            max_line_length: smtp.max_line_length,
            max_errors: smtp.max_errors,
            starttls: tls.is_some(),
            addresses: AddressBook::new(smtp.addresses.clone()),
        }),
        max_connections: smtp.max_connections,
        max_connections_per_ip: smtp.max_connections_per_ip,
        command_timeout: smtp.command_timeout,
        session_timeout: smtp.session_timeout,
        greeting_delay: smtp.greeting_delay,
        tls,
        trusted_peer: Arc::new(move |ip| trusted.iter().any(|n| n.contains(ip))),
        authserv_id: smtp.authserv_id.clone(),
    });
    // Bound synchronously so a taken port is reported at start-up, next to the other listeners.
    let name = smtp.listen.to_string();
    let listener = match std::net::TcpListener::bind(smtp.listen)
        .and_then(|l| l.set_nonblocking(true).map(|()| l))
        .and_then(tokio::net::TcpListener::from_std)
    {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(listen = %smtp.listen, error = %e, "SMTP listener could not bind; email is not received");
            reporter.state("smtp", &name, "failed", Some(&e.to_string()));
            return None;
        }
    };
    tracing::info!(listen = %smtp.listen, "SMTP listener ready");
    reporter.state("smtp", &name, "listening", None);
    Some(tokio::spawn(async move {
        smtp::serve(listener, settings, sink, shutdown).await;
        reporter.state("smtp", &name, "stopped", None);
    }))
}

fn slack_app(name: &str, app: &concierge_config::SlackConfig) -> concierge_adapters::slack::App {
    concierge_adapters::slack::App {
        name: name.to_string(),
        agent: app.agent.clone(),
        app_token: app.app_token.as_ref().map(|t| t.expose().to_string()).unwrap_or_default(),
        bot_token: app.bot_token.expose().to_string(),
        signing_secret: app.signing_secret.as_ref().map(|s| s.expose().as_bytes().to_vec()).unwrap_or_default(),
        api_base: app.api_base.clone(),
    }
}

fn discord_bot(name: &str, bot: &concierge_config::DiscordConfig) -> concierge_adapters::discord::Bot {
    concierge_adapters::discord::Bot {
        name: name.to_string(),
        agent: bot.agent.clone(),
        token: bot.token.expose().to_string(),
        intents: bot.intent_bits,
        gateway_url: bot.gateway_url.clone(),
        api_base: bot.api_base.clone(),
    }
}

fn telegram_bot(name: &str, bot: &concierge_config::TelegramConfig) -> concierge_adapters::telegram::Bot {
    concierge_adapters::telegram::Bot {
        name: name.to_string(),
        agent: bot.agent.clone(),
        token: bot.token.expose().to_string(),
        api_base: bot.api_base.clone(),
    }
}

/// Telegram and WhatsApp senders: one per bot / phone number, bound to its agent.
fn chat_senders(config: &Config, http: &reqwest::Client, bindings: &mut Bindings) {
    use concierge_adapters::{telegram, whatsapp};
    for (name, bot) in &config.telegram {
        let pacing = telegram::Pacing { chat_interval: bot.chat_interval, bot_rate: bot.bot_rate };
        let sender = telegram::TelegramSender::new(http.clone(), telegram_bot(name, bot), pacing);
        bindings.insert((bot.agent.clone(), ChannelRef::new("telegram", name.clone())), Arc::new(sender));
    }
    for (name, wa) in &config.whatsapp {
        let target = whatsapp::SendTarget {
            graph_base: wa.graph_base.clone(),
            api_version: wa.api_version.clone(),
            phone_number_id: wa.phone_number_id.clone(),
            access_token: wa.access_token.expose().to_string(),
        };
        let sender = whatsapp::WhatsAppSender::new(http.clone(), target);
        bindings.insert((wa.agent.clone(), ChannelRef::new("whatsapp", name.clone())), Arc::new(sender));
    }
}

/// `POST /telegram/{bot}` for webhook-mode bots and `GET|POST /whatsapp/{name}`.
fn chat_ingress(config: &Config, sink: Arc<dyn EventSink>) -> axum::Router {
    use concierge_adapters::{telegram, whatsapp};
    let max_body = usize::try_from(config.server.max_body).unwrap_or(usize::MAX);
    let bots = config
        .telegram
        .iter()
        .filter(|(_, b)| b.mode == concierge_config::TelegramMode::Webhook)
        .map(|(name, b)| telegram::WebhookBot {
            bot: telegram_bot(name, b),
            secret: b.webhook_secret.as_ref().map(|s| s.expose().to_string()).unwrap_or_default(),
        })
        .collect();
    let numbers = config
        .whatsapp
        .iter()
        .map(|(name, w)| whatsapp::Number {
            name: name.clone(),
            agent: w.agent.clone(),
            app_secret: w.app_secret.expose().as_bytes().to_vec(),
            verify_token: w.verify_token.expose().to_string(),
        })
        .collect();
    telegram::router(bots, sink.clone(), max_body).merge(whatsapp::router(numbers, sink, max_body))
}

/// Telegram long pollers (one task per bot) and start-up `setWebhook` calls.
fn chat_connections(
    config: &Config,
    http: &reqwest::Client,
    sink: Arc<dyn EventSink>,
    reporter: Arc<dyn ConnectionReporter>,
    shutdown: watch::Receiver<bool>,
) -> Vec<tokio::task::JoinHandle<()>> {
    use concierge_adapters::telegram;
    use concierge_config::TelegramMode;
    let mut tasks = Vec::new();
    for (name, bot) in &config.telegram {
        match bot.mode {
            TelegramMode::Poll => {
                let options =
                    telegram::PollOptions { allowed_updates: bot.allowed_updates.clone(), timeout: bot.poll_timeout };
                let b = telegram_bot(name, bot);
                let (sink, reporter) = (sink.clone(), reporter.clone());
                tasks.push(telegram::spawn_poller(http.clone(), b, options, sink, reporter, shutdown.clone()));
            }
            TelegramMode::Webhook if bot.set_webhook => {
                let (Some(public), Some(secret)) = (&bot.public_url, &bot.webhook_secret) else { continue };
                tasks.push(telegram::spawn_set_webhook(
                    http.clone(),
                    telegram_bot(name, bot),
                    format!("{public}/telegram/{name}"),
                    secret.expose().to_string(),
                    bot.allowed_updates.clone(),
                    shutdown.clone(),
                ));
            }
            TelegramMode::Webhook => {}
        }
    }
    tasks
}
