//! Turns a received message into one event per recipient agent: raw MIME kept byte for byte,
//! the normalized part parsed with mail-parser (headers, bodies, attachments by reference).

use std::net::IpAddr;

use concierge_protocol::{Attachment, ChannelRef, EventData, now_ms};
use mail_parser::{Address, HeaderValue, MessageParser, MimeHeaders};
use sha2::{Digest, Sha256};

use super::session::Envelope;

/// Who may vouch for `Authentication-Results` headers.
#[derive(Clone, Debug, Default)]
pub struct TrustPolicy {
    /// Whether the connecting peer is a configured trusted relay.
    pub trusted_peer: bool,
    /// Only headers with this authserv-id are passed through; `None` passes none (a relay
    /// that does not strip them would otherwise pass on headers the sender forged).
    pub authserv_id: Option<String>,
}

/// The threading facts of a message, as header-ready strings (`<id>`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Threading {
    /// Own Message-ID.
    pub message_id: Option<String>,
    /// In-Reply-To ids.
    pub in_reply_to: Vec<String>,
    /// References ids, oldest first.
    pub references: Vec<String>,
}

impl Threading {
    /// The thread root: first of References, else In-Reply-To, else the message itself.
    pub fn root(&self) -> Option<&String> {
        self.references.first().or(self.in_reply_to.first()).or(self.message_id.as_ref())
    }
}

/// Events for every agent among the envelope's recipients, one per agent.
pub fn events(envelope: &Envelope, peer: IpAddr, trust: &TrustPolicy) -> Vec<EventData> {
    let raw = &envelope.data;
    let parsed = MessageParser::default().parse(raw);
    let digest = hex::encode(Sha256::digest(raw));
    let mut common: Vec<(String, String)> = Vec::new();
    let mut threading = Threading::default();
    let mut sender = None;
    let mut text = None;
    let mut attachments = Vec::new();
    if let Some(m) = parsed.as_ref() {
        threading = Threading {
            message_id: m.message_id().map(bracket),
            in_reply_to: ids(m.in_reply_to()),
            references: ids(m.references()),
        };
        if let Some(id) = &threading.message_id {
            common.push(("message_id".into(), id.clone()));
        }
        if !threading.in_reply_to.is_empty() {
            common.push(("in_reply_to".into(), threading.in_reply_to.join(" ")));
        }
        if !threading.references.is_empty() {
            common.push(("references".into(), threading.references.join(" ")));
        }
        if let Some(s) = m.subject() {
            common.push(("subject".into(), s.to_string()));
        }
        if let Some(from) = m.from().and_then(Address::first) {
            if let Some(a) = from.address() {
                sender = Some(a.to_string());
                common.push(("from".into(), a.to_string()));
            }
            if let Some(n) = from.name() {
                common.push(("from_name".into(), n.to_string()));
            }
        }
        for (key, list) in [("to", m.to()), ("cc", m.cc()), ("reply_to", m.reply_to())] {
            let addrs: Vec<&str> = list.map(|l| l.iter().filter_map(|a| a.address()).collect()).unwrap_or_default();
            if !addrs.is_empty() {
                common.push((key.into(), addrs.join(", ")));
            }
        }
        if let Some(d) = m.date() {
            common.push(("date".into(), d.to_rfc3339()));
        }
        text = m.body_text(0).map(|t| t.into_owned());
        if m.html_body_count() > 0
            && m.html_part(0).is_some_and(|p| p.is_text_html())
            && let Some(h) = m.body_html(0)
        {
            common.push(("html".into(), h.into_owned()));
        }
        for &id in &m.attachments {
            let Some(part) = m.parts.get(id as usize) else { continue };
            attachments.push(Attachment {
                reference: format!("mime-part:{id}"),
                content_type: part.content_type().map(|c| match c.subtype() {
                    Some(sub) => format!("{}/{}", c.ctype(), sub),
                    None => c.ctype().to_string(),
                }),
                name: part.attachment_name().map(str::to_string),
                size: Some(part.contents().len() as u64),
            });
        }
        if let (true, Some(want)) = (trust.trusted_peer, trust.authserv_id.as_deref()) {
            for (name, value) in m.headers_raw() {
                if !name.eq_ignore_ascii_case("Authentication-Results") {
                    continue;
                }
                let value = value.split_whitespace().collect::<Vec<_>>().join(" ");
                let authserv = value.split(';').next().unwrap_or_default().trim();
                let authserv = authserv.split_whitespace().next().unwrap_or_default();
                if want.eq_ignore_ascii_case(authserv) {
                    common.push(("authentication_results".into(), value));
                }
            }
        }
    } else {
        common.push(("parse_error".into(), "message headers could not be parsed".into()));
    }
    let synthetic = format!("<{}@concierge.invalid>", &digest[..32]);
    let conversation = threading.root().cloned().unwrap_or_else(|| synthetic.clone());
    let dedupe_key = match &threading.message_id {
        Some(id) => format!("message-id:{id}"),
        None => format!("sha256:{digest}"),
    };
    common.push(("envelope_from".into(), envelope.mail_from.clone()));
    common.push(("peer".into(), peer.to_string()));
    common.push(("helo".into(), envelope.helo.clone()));
    common.push(("tls".into(), envelope.tls.to_string()));

    let received_at_ms = now_ms();
    let mut out: Vec<EventData> = Vec::new();
    for r in &envelope.recipients {
        if let Some(e) = out.iter_mut().find(|e| e.agent == r.agent) {
            // Same agent through another address: one event, every address noted.
            e.meta.push(("rcpt".into(), r.original.clone()));
            if let Some(t) = &r.tag {
                e.meta.push(("tag".into(), t.clone()));
            }
            continue;
        }
        let mut meta = common.clone();
        meta.push(("rcpt".into(), r.original.clone()));
        if let Some(t) = &r.tag {
            meta.push(("tag".into(), t.clone()));
        }
        out.push(EventData {
            agent: r.agent.clone(),
            channel: ChannelRef::new("email", r.address.clone()),
            conversation: conversation.clone(),
            sender: sender.clone().or_else(|| Some(envelope.mail_from.clone()).filter(|s| !s.is_empty())),
            dedupe_key: Some(dedupe_key.clone()),
            received_at_ms,
            text: text.clone(),
            attachments: attachments.clone(),
            content_type: "message/rfc822".into(),
            raw: raw.clone(),
            meta,
        });
    }
    out
}

fn bracket(id: &str) -> String {
    let id = id.trim().trim_start_matches('<').trim_end_matches('>');
    format!("<{id}>")
}

fn ids(v: &HeaderValue<'_>) -> Vec<String> {
    match v {
        HeaderValue::Text(t) => t.split_whitespace().map(bracket).collect(),
        HeaderValue::TextList(l) => l.iter().map(|t| bracket(t)).collect(),
        _ => Vec::new(),
    }
}
