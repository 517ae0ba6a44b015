//! Agent replies by email: a JSON send body becomes a threaded message built with lettre and
//! submitted to the configured relay. The Message-ID derives from the idempotency key, so it
//! is fixed before the first attempt and every retry carries the same one.
//!
//! Send body (`SendRequest.body`), as produced by `concierge_protocol::email::reply_body`:
//! `{"to": ["a@x"], "cc": [], "subject": "<parent subject>", "in_reply_to": "<parent id>",
//!   "references": ["<parent references...>"], "text": "...", "html": "..."}`.
//! `subject` is the parent's subject (one `Re:` is added); `references` are the parent's
//! References (the parent's Message-ID is appended).

use std::time::Duration;

use async_trait::async_trait;
use concierge_protocol::{SendRequest, SendResult};
use lettre::message::{Mailbox, MultiPart, SinglePart, header::ContentType};
use lettre::transport::smtp::authentication::{Credentials, Mechanism};
use lettre::transport::smtp::client::{AsyncSmtpConnection, TlsParameters};
use lettre::transport::smtp::extension::ClientId;
use lettre::{Address, Message};
use serde::Deserialize;
use sha2::{Digest, Sha256};

use crate::ChannelSender;

/// Most recipients one reply may name (bounded like everything else).
const MAX_REPLY_RECIPIENTS: usize = 50;

/// How the relay connection is protected.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RelayTls {
    /// Plain TCP (local relays, test sinks).
    None,
    /// STARTTLS, required.
    StartTls,
    /// Implicit TLS (port 465).
    Tls,
}

/// Where and how replies are submitted.
#[derive(Clone, Debug)]
pub struct RelaySettings {
    /// Relay host.
    pub host: String,
    /// Relay port.
    pub port: u16,
    /// Transport security.
    pub tls: RelayTls,
    /// SMTP AUTH user and password.
    pub credentials: Option<(String, String)>,
    /// Bound on each phase (connect, TLS, AUTH, transaction).
    pub timeout: Duration,
    /// Attempts when the relay answers 4xx or cannot be reached.
    pub max_attempts: u32,
    /// First retry delay; doubles per attempt.
    pub backoff_initial: Duration,
    /// Name sent in EHLO.
    pub hello_name: String,
    /// Signs every reply when a DKIM key is configured.
    pub dkim: Option<crate::smtp::dkim::DkimSigner>,
}

/// Sends one agent address's replies through the relay.
pub struct EmailSender {
    relay: std::sync::Arc<RelaySettings>,
    /// The agent's address: the From of every reply, the domain of every Message-ID.
    from: String,
}

impl EmailSender {
    /// A sender for the agent reachable at `from`.
    pub fn new(relay: std::sync::Arc<RelaySettings>, from: String) -> Self {
        Self { relay, from }
    }
}

#[derive(Deserialize)]
#[serde(untagged)]
enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

impl OneOrMany {
    fn into_vec(self) -> Vec<String> {
        match self {
            OneOrMany::One(s) => vec![s],
            OneOrMany::Many(v) => v,
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ReplyBody {
    to: OneOrMany,
    #[serde(default)]
    cc: Option<OneOrMany>,
    #[serde(default)]
    subject: Option<String>,
    #[serde(default)]
    in_reply_to: Option<String>,
    #[serde(default)]
    references: Option<OneOrMany>,
    #[serde(default)]
    text: Option<String>,
    #[serde(default)]
    html: Option<String>,
}

/// A built reply: what goes on the wire, to whom, and its Message-ID.
#[derive(Debug)]
pub struct BuiltReply {
    /// The RFC 5322 message, CRLF line endings.
    pub bytes: Vec<u8>,
    /// Envelope recipients (To and Cc).
    pub recipients: Vec<Address>,
    /// The Message-ID, `<...>`.
    pub message_id: String,
}

/// The Message-ID for a send: a function of agent and idempotency key, so retries reuse it.
pub fn message_id(agent: &str, idempotency_key: &str, from: &str) -> String {
    let digest = Sha256::new().chain_update(agent).chain_update([0u8]).chain_update(idempotency_key).finalize();
    let domain = from.rsplit_once('@').map_or("concierge.invalid", |(_, d)| d);
    format!("<{}.concierge@{domain}>", &hex::encode(digest)[..32])
}

/// `Re: <subject>` with exactly one `Re:` whatever the parent had.
pub fn reply_subject(parent: &str) -> String {
    let s = one_line(parent);
    let mut rest = s.trim();
    loop {
        let lower = rest.get(..3).map(str::to_ascii_lowercase);
        match lower.as_deref() {
            Some("re:") => rest = rest[3..].trim_start(),
            _ => break,
        }
    }
    format!("Re: {rest}")
}

/// Line endings normalised to CRLF (bare CR and bare LF both become CRLF).
pub fn crlf(text: &str) -> String {
    text.replace("\r\n", "\n").replace('\r', "\n").replace('\n', "\r\n")
}

fn one_line(s: &str) -> String {
    s.chars().map(|c| if c == '\r' || c == '\n' { ' ' } else { c }).collect()
}

fn msg_id(s: &str) -> Option<String> {
    let s = s.trim();
    let inner = s.strip_prefix('<').and_then(|x| x.strip_suffix('>')).unwrap_or(s);
    let ok = !inner.is_empty()
        && inner.len() <= 512
        && inner.contains('@')
        && inner.chars().all(|c| c.is_ascii_graphic() && c != '<' && c != '>');
    ok.then(|| format!("<{inner}>"))
}

/// Builds the reply for `agent` from `request` (see the module docs for the body).
pub fn build(agent: &str, from: &str, request: &SendRequest) -> Result<BuiltReply, String> {
    let body: ReplyBody = serde_json::from_str(&request.body).map_err(|e| {
        format!("email send body must be JSON {{\"to\", \"subject\", \"in_reply_to\", \"references\", \"text\"}}: {e}")
    })?;
    let from_box: Mailbox = from.parse().map_err(|e| format!("agent address {from} is not usable as From: {e}"))?;
    let to = body.to.into_vec();
    let cc = body.cc.map(OneOrMany::into_vec).unwrap_or_default();
    if to.is_empty() {
        return Err("`to` names no recipient".into());
    }
    if to.len() + cc.len() > MAX_REPLY_RECIPIENTS {
        return Err(format!("at most {MAX_REPLY_RECIPIENTS} recipients per reply"));
    }
    let message_id = message_id(agent, &request.idempotency_key, from);
    let mut builder = Message::builder().from(from_box).message_id(Some(message_id.clone())).date_now();
    let mut recipients = Vec::new();
    for (field, list) in [("to", &to), ("cc", &cc)] {
        for a in list {
            let mailbox: Mailbox = one_line(a).parse().map_err(|e| format!("`{field}` address {a:?}: {e}"))?;
            recipients.push(mailbox.email.clone());
            builder = if field == "to" { builder.to(mailbox) } else { builder.cc(mailbox) };
        }
    }
    builder = builder.subject(match body.subject.as_deref() {
        Some(s) if body.in_reply_to.is_some() => reply_subject(s),
        Some(s) => one_line(s),
        None => String::new(),
    });
    let mut references: Vec<String> = Vec::new();
    for r in body.references.map(OneOrMany::into_vec).unwrap_or_default() {
        for id in r.split_whitespace() {
            references.push(msg_id(id).ok_or_else(|| format!("`references` holds an invalid Message-ID {id:?}"))?);
        }
    }
    if let Some(parent) = body.in_reply_to.as_deref() {
        let parent = msg_id(parent).ok_or_else(|| format!("`in_reply_to` is not a Message-ID: {parent:?}"))?;
        if references.last() != Some(&parent) {
            references.push(parent.clone());
        }
        builder = builder.in_reply_to(parent);
    }
    if !references.is_empty() {
        builder = builder.references(references.join(" "));
    }
    let text = body.text.as_deref().map(crlf);
    let html = body.html.as_deref().map(crlf);
    let message = match (text, html) {
        (Some(t), Some(h)) => builder.multipart(MultiPart::alternative_plain_html(t, h)),
        (Some(t), None) => builder.singlepart(SinglePart::builder().header(ContentType::TEXT_PLAIN).body(t)),
        (None, Some(h)) => builder.singlepart(SinglePart::builder().header(ContentType::TEXT_HTML).body(h)),
        (None, None) => return Err("the reply needs `text` or `html`".into()),
    }
    .map_err(|e| format!("cannot build the message: {e}"))?;
    Ok(BuiltReply { bytes: message.formatted(), recipients, message_id })
}

/// Why one attempt failed.
enum Failure {
    /// Nothing was accepted and a later attempt may work (4xx, unreachable).
    Retry(String),
    /// The relay refused for good (5xx, TLS or credential problems).
    Permanent(String),
    /// The connection broke during the transaction: the relay may have the message.
    Unknown(String),
}

impl EmailSender {
    async fn attempt(&self, envelope: &lettre::address::Envelope, reply: &BuiltReply) -> Result<(), Failure> {
        let r = &self.relay;
        let hello = ClientId::Domain(r.hello_name.clone());
        let tls_params = || {
            TlsParameters::new_rustls(r.host.clone()).map_err(|e| Failure::Permanent(format!("relay TLS setup: {e}")))
        };
        let wrapper = match r.tls {
            RelayTls::Tls => Some(tls_params()?),
            _ => None,
        };
        let classify = |e: lettre::transport::smtp::Error, phase: &str| {
            if e.is_permanent() || e.is_tls() || certificate_error(&e) {
                Failure::Permanent(format!("relay {phase}: {e}"))
            } else {
                Failure::Retry(format!("relay {phase}: {e}"))
            }
        };
        let connect =
            AsyncSmtpConnection::connect_tokio1((r.host.as_str(), r.port), Some(r.timeout), &hello, wrapper, None);
        let mut conn = match tokio::time::timeout(r.timeout, connect).await {
            Err(_) => return Err(Failure::Retry("relay connect timed out".into())),
            Ok(Err(e)) => return Err(classify(e, "connect")),
            Ok(Ok(c)) => c,
        };
        if r.tls == RelayTls::StartTls {
            if !conn.can_starttls() {
                conn.abort().await;
                return Err(Failure::Permanent(
                    "relay does not offer STARTTLS (tls = \"starttls\" requires it)".into(),
                ));
            }
            match tokio::time::timeout(r.timeout, conn.starttls(tls_params()?, &hello)).await {
                Err(_) => return Err(Failure::Retry("relay STARTTLS timed out".into())),
                Ok(Err(e)) => return Err(classify(e, "STARTTLS")),
                Ok(Ok(())) => {}
            }
        }
        if let Some((user, pass)) = &r.credentials {
            let creds = Credentials::new(user.clone(), pass.clone());
            match tokio::time::timeout(r.timeout, conn.auth(&[Mechanism::Plain, Mechanism::Login], &creds)).await {
                Err(_) => return Err(Failure::Retry("relay AUTH timed out".into())),
                Ok(Err(e)) => {
                    conn.abort().await;
                    return Err(classify(e, "AUTH"));
                }
                Ok(Ok(_)) => {}
            }
        }
        match tokio::time::timeout(r.timeout * 2, conn.send(envelope, &reply.bytes)).await {
            Err(_) => Err(Failure::Unknown("relay did not answer the transaction in time".into())),
            Ok(Ok(_)) => {
                let _ = tokio::time::timeout(r.timeout, conn.quit()).await;
                Ok(())
            }
            Ok(Err(e)) if e.is_transient() => {
                conn.abort().await;
                Err(Failure::Retry(format!("relay answered {e}")))
            }
            Ok(Err(e)) if e.is_permanent() => {
                conn.abort().await;
                Err(Failure::Permanent(format!("relay refused the message: {e}")))
            }
            Ok(Err(e)) => Err(Failure::Unknown(format!("relay connection failed during the transaction: {e}"))),
        }
    }
}

/// Whether `e` comes from the relay's certificate failing verification (lettre reports it as
/// a connection error): a setup problem that retrying cannot fix.
fn certificate_error(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut next = Some(e);
    while let Some(err) = next {
        let inner = err
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref())
            .map(|i| i as &(dyn std::error::Error + 'static));
        for candidate in [Some(err), inner].into_iter().flatten() {
            if let Some(tls) = candidate.downcast_ref::<rustls::Error>() {
                return matches!(tls, rustls::Error::InvalidCertificate(_) | rustls::Error::NoCertificatesPresented);
            }
        }
        next = err.source();
    }
    false
}

#[async_trait]
impl ChannelSender for EmailSender {
    async fn send(&self, agent: &str, request: &SendRequest) -> SendResult {
        let mut reply = match build(agent, &self.from, request) {
            Ok(r) => r,
            Err(e) => return SendResult::err("bad_request", e, false),
        };
        if let Some(signer) = &self.relay.dkim {
            let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
            reply.bytes = signer.sign(&reply.bytes, now);
        }
        let from: Option<Address> = self.from.parse().ok();
        let envelope = match lettre::address::Envelope::new(from, reply.recipients.clone()) {
            Ok(e) => e,
            Err(e) => return SendResult::err("bad_request", format!("envelope: {e}"), false),
        };
        let mut delay = self.relay.backoff_initial;
        let attempts = self.relay.max_attempts.max(1);
        for attempt in 1..=attempts {
            match self.attempt(&envelope, &reply).await {
                Ok(()) => {
                    tracing::info!(agent, message_id = %reply.message_id, attempt, "email reply submitted to the relay");
                    return SendResult::Ok { platform_ids: vec![reply.message_id] };
                }
                Err(Failure::Permanent(e)) => {
                    tracing::warn!(agent, message_id = %reply.message_id, error = %e, "email reply refused");
                    return SendResult::err("rejected", e, false);
                }
                Err(Failure::Unknown(e)) => {
                    tracing::warn!(agent, message_id = %reply.message_id, error = %e, "email reply outcome unknown");
                    return SendResult::err("outcome_unknown", e, false);
                }
                Err(Failure::Retry(e)) => {
                    tracing::info!(agent, message_id = %reply.message_id, attempt, error = %e, "email reply deferred; retrying");
                    if attempt == attempts {
                        return SendResult::err(
                            "relay_unavailable",
                            format!("not sent after {attempts} attempts: {e}"),
                            true,
                        );
                    }
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(60));
                }
            }
        }
        SendResult::err("relay_unavailable", "no attempt was made", true)
    }
}
