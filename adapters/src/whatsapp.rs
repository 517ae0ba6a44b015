//! WhatsApp Business Cloud API: webhook ingress (`GET`/`POST /whatsapp/{name}`) and sends
//! through the Graph API.
//!
//! **Verification.** `GET` with `hub.mode=subscribe`, `hub.verify_token` and `hub.challenge`:
//! the challenge is echoed (200, text/plain) when the token matches (constant time), 403
//! otherwise.
//!
//! **Notifications.** `POST` bodies are verified first: `X-Hub-Signature-256` is
//! `sha256=<hex HMAC-SHA256 of the raw body keyed by the app secret>` (401 when wrong,
//! missing, or bare hex without the `sha256=` prefix Meta always sends; nothing is parsed or
//! stored). One body may carry several entries, changes,
//! messages and statuses: each becomes one event, stored in body order, and only when every
//! one of them is stored is the answer 200. If a write fails the answer is 503 (429 for
//! backpressure) and Meta redelivers the whole body; what was already stored is dropped by
//! the dedupe keys (`wa:<wamid>` for messages, `wa:status:<wamid>:<status>` for statuses).
//!
//! **Malformed items.** Meta redelivers any non-200 answer for days, and a redelivery carries
//! the same bytes, so answering non-200 for one malformed message would block its whole batch
//! without ever succeeding. So a malformed item (a message without `id`/`from`, a change that
//! is not an object, ...) does not fail the batch: it is stored as an event with meta
//! `("kind", "malformed")`, its raw bytes and the parse error (dedupe on the SHA-256 of its
//! bytes), logged with its position, and listed in the 200 answer's `malformed` array. A body
//! that is not a JSON object at all is 400.
//!
//! **Events.** `raw` is the message (or status) object exactly as it appears in the body;
//! the surrounding context (phone number id, the contact's profile name) goes to `meta`.
//! Messages: conversation and sender = the customer's `from`. Statuses (`sent`, `delivered`,
//! `read`, `failed`) are events with meta `("kind", "status")` and conversation = the
//! recipient, so an agent sees delivery of its own messages. Other webhook fields (template
//! status updates, ...) are stored with meta `("kind", <field>)`.
//!
//! **Sends.** `POST {graph_base}/{version}/{phone_number_id}/messages` with the bearer token.
//! A plain-text body is a text message to the conversation; a JSON object with a `type` is
//! sent as the message object (templates, interactive, replies with `context.message_id`),
//! with `messaging_product` and `to` filled in when absent. Graph errors map to codes:
//! `131047` (more than 24 hours since the customer last wrote) is `window_closed`, so the
//! agent can fall back to a template; rate limits are `rate_limited` (retryable).
//! `SendRequest.reply_to` (an event *offset*) is not used: a sender cannot look events up in
//! the store; a reply quotes the message with `context.message_id` = the event's meta `wamid`.

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::header::CONTENT_TYPE;
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::any;
use concierge_protocol::{Attachment, ChannelRef, EventData, SendRequest, SendResult, now_ms};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

use crate::http_util;
use crate::signature;
use crate::{ChannelSender, EventSink};

/// Header carrying Meta's body signature.
pub const SIGNATURE_HEADER: &str = "x-hub-signature-256";
/// Graph error code: the 24-hour customer service window is closed (re-engagement message).
pub const WINDOW_CLOSED: i64 = 131047;
/// Timeout of one Graph send.
const SEND_TIMEOUT: Duration = Duration::from_secs(30);
/// Largest Graph response read.
const MAX_RESPONSE: usize = 1024 * 1024;
/// Longest error text quoted from a malformed item.
const MAX_ERROR_LEN: usize = 200;

/// One configured Cloud API phone number.
#[derive(Clone)]
pub struct Number {
    /// Name from the configuration: channel name and URL segment.
    pub name: String,
    /// The agent that receives its messages.
    pub agent: String,
    /// Key of `X-Hub-Signature-256`.
    pub app_secret: Vec<u8>,
    /// Expected `hub.verify_token`.
    pub verify_token: String,
}

impl fmt::Debug for Number {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Number").field("name", &self.name).field("agent", &self.agent).finish_non_exhaustive()
    }
}

struct Shared {
    numbers: HashMap<String, Number>,
    sink: Arc<dyn EventSink>,
    max_body: usize,
}

/// Serves `GET` (verification) and `POST` (notifications) on `/whatsapp/{name}`.
pub fn router(numbers: Vec<Number>, sink: Arc<dyn EventSink>, max_body: usize) -> Router {
    let numbers = numbers.into_iter().map(|n| (n.name.clone(), n)).collect();
    Router::new().route("/whatsapp/{name}", any(handle)).with_state(Arc::new(Shared { numbers, sink, max_body }))
}

async fn handle(
    State(shared): State<Arc<Shared>>,
    Path(name): Path<String>,
    Query(query): Query<HashMap<String, String>>,
    method: Method,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let Some(number) = shared.numbers.get(&name) else {
        return http_util::error(
            StatusCode::NOT_FOUND,
            format!("unknown whatsapp number '{}'", http_util::echo(&name)),
            None,
        );
    };
    match method {
        Method::GET => verify_subscription(number, &query),
        Method::POST => notification(&shared, number, &headers, body).await,
        _ => http_util::error(StatusCode::METHOD_NOT_ALLOWED, "GET (verification) or POST only", None),
    }
}

/// The `GET` handshake Meta performs when the webhook URL is configured.
fn verify_subscription(number: &Number, query: &HashMap<String, String>) -> Response {
    let mode = query.get("hub.mode").map(String::as_str);
    let token = query.get("hub.verify_token").map(String::as_str).unwrap_or_default();
    let challenge = query.get("hub.challenge");
    match (mode, challenge) {
        (Some("subscribe"), Some(challenge))
            if http_util::secret_eq(token.as_bytes(), number.verify_token.as_bytes()) =>
        {
            let mut r = challenge.clone().into_response();
            r.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("text/plain"));
            r
        }
        _ => http_util::error(StatusCode::FORBIDDEN, "verification failed: wrong hub.mode or hub.verify_token", None),
    }
}

/// A malformed item of a notification, as reported in the answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Malformed {
    /// Where it is, e.g. `entry[0].changes[1].value.messages[2]`.
    pub at: String,
    /// What is wrong with it.
    pub error: String,
}

/// The 200 answer's body.
#[derive(Debug, Default, Serialize)]
struct Outcome {
    stored: u64,
    duplicates: u64,
    malformed: Vec<Malformed>,
}

async fn notification(shared: &Shared, number: &Number, headers: &HeaderMap, body: Body) -> Response {
    let body = match http_util::read_request_body(body, headers, shared.max_body).await {
        Ok(b) => b,
        Err(r) => return r,
    };
    let given = headers.get(SIGNATURE_HEADER).and_then(|v| v.to_str().ok());
    // Meta always sends the `sha256=` prefix; a bare hex value is not its format, so refuse it.
    let verified = match given {
        Some(v) if !v.trim_start().starts_with("sha256=") => Err("the value is not `sha256=<hex>`".to_string()),
        _ => signature::body_verify_hex(&number.app_secret, given, SIGNATURE_HEADER, &body).map_err(|e| e.to_string()),
    };
    if let Err(e) = verified {
        tracing::debug!(number = %number.name, error = %e, "whatsapp webhook signature rejected");
        return http_util::error(
            StatusCode::UNAUTHORIZED,
            format!("X-Hub-Signature-256 verification failed: {e}"),
            None,
        );
    }
    let events = match notification_events(number, &body, now_ms()) {
        Ok(events) => events,
        Err(e) => return http_util::error(StatusCode::BAD_REQUEST, e, None),
    };
    let mut outcome = Outcome::default();
    for item in events {
        if let Some(m) = &item.malformed {
            tracing::warn!(number = %number.name, at = %m.at, error = %m.error, "malformed item in a whatsapp notification; stored as kind=malformed");
        }
        match shared.sink.ingest(item.event).await {
            Ok(i) if i.duplicate => outcome.duplicates += 1,
            Ok(_) => outcome.stored += 1,
            Err(e) => {
                tracing::warn!(number = %number.name, error = %e, "whatsapp notification not fully stored; answering non-200 so Meta redelivers");
                return http_util::sink_error(&e);
            }
        }
        outcome.malformed.extend(item.malformed);
    }
    (StatusCode::OK, axum::Json(outcome)).into_response()
}

/// One event from a notification, and why it is malformed when it is.
#[derive(Debug)]
pub struct Item {
    /// The event to store.
    pub event: EventData,
    /// Set for items stored as `kind = malformed`.
    pub malformed: Option<Malformed>,
}

#[derive(Deserialize)]
struct Top<'a> {
    #[serde(borrow, default)]
    entry: Vec<&'a RawValue>,
}

#[derive(Deserialize)]
struct Entry<'a> {
    #[serde(default)]
    id: Option<Value>,
    #[serde(borrow, default)]
    changes: Vec<&'a RawValue>,
}

#[derive(Deserialize)]
struct Change<'a> {
    field: String,
    #[serde(borrow)]
    value: &'a RawValue,
}

#[derive(Deserialize)]
struct ChangeValue<'a> {
    #[serde(default)]
    metadata: Option<Metadata>,
    #[serde(default)]
    contacts: Vec<Contact>,
    #[serde(borrow, default)]
    messages: Vec<&'a RawValue>,
    #[serde(borrow, default)]
    statuses: Vec<&'a RawValue>,
}

#[derive(Deserialize, Default)]
struct Metadata {
    display_phone_number: Option<String>,
    phone_number_id: Option<String>,
}

#[derive(Deserialize)]
struct Contact {
    wa_id: Option<String>,
    profile: Option<Profile>,
}

#[derive(Deserialize)]
struct Profile {
    name: Option<String>,
}

/// Splits a verified notification body into events, in body order. `Err` only when the body
/// is not a JSON object with an `entry` array; smaller defects become malformed items.
pub fn notification_events(number: &Number, body: &[u8], now: u64) -> Result<Vec<Item>, String> {
    let text = std::str::from_utf8(body).map_err(|_| "body is not UTF-8".to_string())?;
    let top: Top<'_> = serde_json::from_str(text)
        .map_err(|e| format!("body is not a WhatsApp notification (an object with an entry array): {e}"))?;
    let mut items = Vec::new();
    for (i, entry_raw) in top.entry.iter().enumerate() {
        let at = format!("entry[{i}]");
        let entry: Entry<'_> = match serde_json::from_str(entry_raw.get()) {
            Ok(e) => e,
            Err(e) => {
                items.push(malformed(number, entry_raw.get(), at, e.to_string(), now));
                continue;
            }
        };
        let account = entry.id.as_ref().map(|v| v.to_string().trim_matches('"').to_string());
        for (j, change_raw) in entry.changes.iter().enumerate() {
            let at = format!("{at}.changes[{j}]");
            let change: Change<'_> = match serde_json::from_str(change_raw.get()) {
                Ok(c) => c,
                Err(e) => {
                    items.push(malformed(number, change_raw.get(), at, e.to_string(), now));
                    continue;
                }
            };
            if change.field != "messages" {
                let mut event = base_event(number, change_raw.get(), &change.field, now);
                event.dedupe_key = Some(format!("wa:{}:{}", change.field, sha256_hex(change_raw.get())));
                event.conversation = account.clone().unwrap_or_default();
                items.push(Item { event, malformed: None });
                continue;
            }
            let value: ChangeValue<'_> = match serde_json::from_str(change.value.get()) {
                Ok(v) => v,
                Err(e) => {
                    items.push(malformed(number, change.value.get(), format!("{at}.value"), e.to_string(), now));
                    continue;
                }
            };
            let metadata = value.metadata.unwrap_or_default();
            for (k, m) in value.messages.iter().enumerate() {
                let at = format!("{at}.value.messages[{k}]");
                items.push(match message_event(number, m.get(), &metadata, &value.contacts, now) {
                    Ok(event) => Item { event, malformed: None },
                    Err(e) => malformed(number, m.get(), at, e, now),
                });
            }
            for (k, s) in value.statuses.iter().enumerate() {
                let at = format!("{at}.value.statuses[{k}]");
                items.push(match status_event(number, s.get(), &metadata, now) {
                    Ok(event) => Item { event, malformed: None },
                    Err(e) => malformed(number, s.get(), at, e, now),
                });
            }
        }
    }
    Ok(items)
}

fn sha256_hex(s: &str) -> String {
    hex::encode(Sha256::digest(s.as_bytes()))
}

fn base_event(number: &Number, raw: &str, kind: &str, now: u64) -> EventData {
    EventData {
        agent: number.agent.clone(),
        channel: ChannelRef::new("whatsapp", number.name.clone()),
        conversation: String::new(),
        sender: None,
        dedupe_key: None,
        received_at_ms: now,
        text: None,
        attachments: Vec::new(),
        content_type: "application/json".into(),
        raw: raw.as_bytes().to_vec(),
        meta: vec![("kind".into(), kind.chars().take(64).collect())],
    }
}

fn malformed(number: &Number, raw: &str, at: String, error: String, now: u64) -> Item {
    let error: String = error.chars().take(MAX_ERROR_LEN).collect();
    let mut event = base_event(number, raw, "malformed", now);
    event.dedupe_key = Some(format!("wa:malformed:{}", sha256_hex(raw)));
    event.meta.push(("error".into(), error.clone()));
    event.meta.push(("at".into(), at.clone()));
    Item { event, malformed: Some(Malformed { at, error }) }
}

fn str_at<'v>(v: &'v Value, path: &[&str]) -> Option<&'v str> {
    path.iter().try_fold(v, |v, k| v.get(k))?.as_str()
}

fn metadata_meta(meta: &mut Vec<(String, String)>, metadata: &Metadata) {
    if let Some(id) = &metadata.phone_number_id {
        meta.push(("phone_number_id".into(), id.clone()));
    }
    if let Some(n) = &metadata.display_phone_number {
        meta.push(("display_phone_number".into(), n.clone()));
    }
}

/// One inbound message: `id` (wamid) and `from` are required.
fn message_event(
    number: &Number,
    raw: &str,
    metadata: &Metadata,
    contacts: &[Contact],
    now: u64,
) -> Result<EventData, String> {
    let v: Value = serde_json::from_str(raw).map_err(|e| e.to_string())?;
    let wamid = str_at(&v, &["id"]).filter(|s| !s.is_empty()).ok_or("message has no id (wamid)")?;
    let from = str_at(&v, &["from"]).filter(|s| !s.is_empty()).ok_or("message has no from")?;
    let kind = str_at(&v, &["type"]).unwrap_or("unknown");
    let text = match kind {
        "text" => str_at(&v, &["text", "body"]),
        "button" => str_at(&v, &["button", "text"]),
        "interactive" => str_at(&v, &["interactive", "button_reply", "title"])
            .or_else(|| str_at(&v, &["interactive", "list_reply", "title"])),
        "reaction" => str_at(&v, &["reaction", "emoji"]),
        other => str_at(&v, &[other, "caption"]),
    }
    .map(str::to_string);
    let mut attachments = Vec::new();
    if let Some(media) = v.get(kind).filter(|_| ["image", "audio", "video", "document", "sticker"].contains(&kind))
        && let Some(id) = str_at(media, &["id"])
    {
        attachments.push(Attachment {
            reference: id.to_string(),
            content_type: str_at(media, &["mime_type"]).map(str::to_string),
            name: str_at(media, &["filename"]).map(str::to_string),
            size: None,
        });
    }
    let mut event = base_event(number, raw, "message", now);
    event.conversation = from.to_string();
    event.sender = Some(from.to_string());
    event.dedupe_key = Some(format!("wa:{wamid}"));
    event.text = text;
    event.attachments = attachments;
    event.meta.push(("type".into(), kind.chars().take(64).collect()));
    event.meta.push(("wamid".into(), wamid.to_string()));
    metadata_meta(&mut event.meta, metadata);
    if let Some(name) = contacts
        .iter()
        .find(|c| c.wa_id.as_deref() == Some(from))
        .and_then(|c| c.profile.as_ref())
        .and_then(|p| p.name.as_ref())
    {
        event.meta.push(("contact_name".into(), name.chars().take(128).collect()));
    }
    if let Some(ctx) = str_at(&v, &["context", "id"]) {
        event.meta.push(("context_id".into(), ctx.to_string()));
    }
    Ok(event)
}

/// One status of a message the business sent: `id` and `status` are required.
fn status_event(number: &Number, raw: &str, metadata: &Metadata, now: u64) -> Result<EventData, String> {
    let v: Value = serde_json::from_str(raw).map_err(|e| e.to_string())?;
    let wamid = str_at(&v, &["id"]).filter(|s| !s.is_empty()).ok_or("status has no id (wamid)")?;
    let status = str_at(&v, &["status"]).filter(|s| !s.is_empty()).ok_or("status has no status")?;
    let mut event = base_event(number, raw, "status", now);
    event.conversation = str_at(&v, &["recipient_id"]).unwrap_or_default().to_string();
    event.dedupe_key = Some(format!("wa:status:{wamid}:{status}"));
    event.meta.push(("status".into(), status.chars().take(32).collect()));
    event.meta.push(("wamid".into(), wamid.to_string()));
    metadata_meta(&mut event.meta, metadata);
    if let Some(err) = v.get("errors").and_then(|e| e.get(0)) {
        if let Some(code) = err.get("code").and_then(Value::as_i64) {
            event.meta.push(("error_code".into(), code.to_string()));
        }
        if let Some(title) = str_at(err, &["title"]) {
            event.meta.push(("error_title".into(), title.chars().take(MAX_ERROR_LEN).collect()));
        }
    }
    Ok(event)
}

// ---- sends --------------------------------------------------------------------------------

/// Where and as whom a number sends.
#[derive(Clone)]
pub struct SendTarget {
    /// Graph base URL without a trailing slash.
    pub graph_base: String,
    /// API version segment (`v23.0`).
    pub api_version: String,
    /// Business phone number id.
    pub phone_number_id: String,
    /// Bearer token.
    pub access_token: String,
}

impl fmt::Debug for SendTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SendTarget")
            .field("graph_base", &self.graph_base)
            .field("api_version", &self.api_version)
            .field("phone_number_id", &self.phone_number_id)
            .field("access_token", &"[redacted]")
            .finish()
    }
}

/// Performs an agent's sends through one phone number.
pub struct WhatsAppSender {
    http: reqwest::Client,
    target: SendTarget,
}

impl WhatsAppSender {
    /// A sender for `target`; `http` should not follow redirects.
    pub fn new(http: reqwest::Client, target: SendTarget) -> Self {
        WhatsAppSender { http, target }
    }
}

/// The Graph message object for a send.
fn message_body(request: &SendRequest) -> Result<Map<String, Value>, SendResult> {
    if request.conversation.is_empty() {
        return Err(SendResult::err("bad_request", "no conversation (recipient wa_id) to send to", false));
    }
    let structured = request
        .body
        .trim_start()
        .starts_with('{')
        .then(|| serde_json::from_str::<Map<String, Value>>(&request.body).ok())
        .flatten()
        .filter(|m| m.get("type").is_some_and(Value::is_string));
    let mut m = match structured {
        Some(m) => m,
        None => {
            if request.body.is_empty() {
                return Err(SendResult::err("bad_request", "empty message body", false));
            }
            let mut m = Map::new();
            m.insert("recipient_type".into(), Value::from("individual"));
            m.insert("type".into(), Value::from("text"));
            m.insert("text".into(), serde_json::json!({ "preview_url": false, "body": request.body }));
            m
        }
    };
    m.entry("messaging_product").or_insert(Value::from("whatsapp"));
    m.entry("to").or_insert(Value::from(request.conversation.clone()));
    Ok(m)
}

/// Maps a Graph error to the agent's error code; Graph errors mean the message was not accepted.
pub fn graph_error(code: i64, message: &str, details: Option<&str>) -> SendResult {
    let text = match details {
        Some(d) if !d.is_empty() => format!("{message} ({d}) [Graph code {code}]"),
        _ => format!("{message} [Graph code {code}]"),
    };
    match code {
        WINDOW_CLOSED => SendResult::err(
            "window_closed",
            format!("the 24-hour customer service window is closed; send an approved template instead: {text}"),
            false,
        ),
        4 | 80007 | 130429 | 131048 | 131056 => SendResult::err("rate_limited", text, true),
        1 | 2 | 131000 | 131016 | 133004 => SendResult::err("platform_error", text, true),
        0 | 190 => SendResult::err("unauthorized", text, false),
        3 | 10 | 200..=299 | 131005 => SendResult::err("forbidden", text, false),
        131026 => SendResult::err("undeliverable", text, false),
        131042 => SendResult::err("payment_required", text, false),
        132000..=132999 => SendResult::err("template_error", text, false),
        _ => SendResult::err("bad_request", text, false),
    }
}

#[async_trait::async_trait]
impl ChannelSender for WhatsAppSender {
    async fn send(&self, _agent: &str, request: &SendRequest) -> SendResult {
        let body = match message_body(request) {
            Ok(b) => b,
            Err(e) => return e,
        };
        let t = &self.target;
        let url = format!("{}/{}/{}/messages", t.graph_base, t.api_version, t.phone_number_id);
        let resp = match self.http.post(url).bearer_auth(&t.access_token).json(&body).timeout(SEND_TIMEOUT).send().await
        {
            Ok(r) => r,
            Err(e) if e.is_connect() => {
                return SendResult::err(
                    "unavailable",
                    format!("Graph API not reachable, nothing sent: {}", e.without_url()),
                    true,
                );
            }
            Err(e) => {
                return SendResult::err(
                    "outcome_unknown",
                    format!(
                        "no answer from the Graph API; the message may or may not have been sent: {}",
                        e.without_url()
                    ),
                    false,
                );
            }
        };
        let status = resp.status();
        let bytes = match http_util::read_response(resp, MAX_RESPONSE).await {
            Ok(b) => b,
            Err(e) => return SendResult::err("outcome_unknown", e, false),
        };
        let v: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        if status.is_success() {
            let ids = v
                .get("messages")
                .and_then(Value::as_array)
                .map(|a| a.iter().filter_map(|m| str_at(m, &["id"]).map(str::to_string)).collect())
                .unwrap_or_default();
            return SendResult::Ok { platform_ids: ids };
        }
        match v.get("error").and_then(|e| e.get("code")).and_then(Value::as_i64) {
            Some(code) => {
                let err = &v["error"];
                let message = str_at(err, &["message"]).unwrap_or("Graph API error");
                graph_error(code, message, str_at(err, &["error_data", "details"]))
            }
            None if status.is_server_error() => SendResult::err(
                "platform_error",
                format!("Graph API answered HTTP {status}; the outcome is unknown"),
                false,
            ),
            None => SendResult::err("bad_request", format!("Graph API answered HTTP {status}"), false),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn number() -> Number {
        Number { name: "wa".into(), agent: "a".into(), app_secret: b"s".to_vec(), verify_token: "v".into() }
    }

    const BODY: &str = r#"{"object":"whatsapp_business_account","entry":[{"id":"WABA","changes":[{"field":"messages","value":{
        "messaging_product":"whatsapp","metadata":{"display_phone_number":"15550001","phone_number_id":"123"},
        "contacts":[{"profile":{"name":"Ann"},"wa_id":"4915"}],
        "messages":[{"from":"4915","id":"wamid.A","timestamp":"1","type":"text","text":{"body":"hi"}},
                    {"from":"4915","timestamp":"2","type":"text","text":{"body":"no id"}},
                    {"from":"4915","id":"wamid.C","type":"image","image":{"id":"MEDIA","mime_type":"image/png","caption":"pic"},
                     "context":{"id":"wamid.X"}}],
        "statuses":[{"id":"wamid.OUT","status":"delivered","timestamp":"3","recipient_id":"4915"}]}}]}]}"#;

    #[test]
    fn a_batch_splits_into_events_and_keeps_raw_slices() {
        let items = notification_events(&number(), BODY.as_bytes(), 1).unwrap();
        assert_eq!(items.len(), 4);
        let a = &items[0].event;
        assert_eq!(a.dedupe_key.as_deref(), Some("wa:wamid.A"));
        assert_eq!(
            (a.conversation.as_str(), a.sender.as_deref(), a.text.as_deref()),
            ("4915", Some("4915"), Some("hi"))
        );
        assert!(BODY.contains(std::str::from_utf8(&a.raw).unwrap()), "raw is a byte-exact slice of the body");
        assert!(a.meta.contains(&("contact_name".into(), "Ann".into())));
        assert!(a.meta.contains(&("phone_number_id".into(), "123".into())));
        let bad = &items[1];
        assert_eq!(bad.malformed.as_ref().unwrap().at, "entry[0].changes[0].value.messages[1]");
        assert!(bad.event.meta.contains(&("kind".into(), "malformed".into())));
        let c = &items[2].event;
        assert_eq!(c.attachments[0].reference, "MEDIA");
        assert_eq!(c.text.as_deref(), Some("pic"));
        assert!(c.meta.contains(&("context_id".into(), "wamid.X".into())));
        let s = &items[3].event;
        assert!(s.meta.contains(&("kind".into(), "status".into())));
        assert_eq!(s.dedupe_key.as_deref(), Some("wa:status:wamid.OUT:delivered"));
        assert_eq!(s.conversation, "4915");
    }

    #[test]
    fn every_message_of_every_change_of_every_entry_in_body_order() {
        let change = |wamids: [&str; 2]| {
            let messages: Vec<Value> = wamids
                .iter()
                .map(|w| serde_json::json!({"from": "4915", "id": w, "type": "text", "text": {"body": w}}))
                .collect();
            serde_json::json!({"field": "messages", "value": {"metadata": {"phone_number_id": "123"}, "messages": messages}})
        };
        let body = serde_json::json!({"object": "whatsapp_business_account", "entry": [
            {"id": "W1", "changes": [change(["wamid.1", "wamid.2"]), change(["wamid.3", "wamid.4"])]},
            {"id": "W2", "changes": [change(["wamid.5", "wamid.6"]), change(["wamid.7", "wamid.8"])]},
        ]})
        .to_string();
        let items = notification_events(&number(), body.as_bytes(), 1).unwrap();
        let keys: Vec<&str> = items.iter().map(|i| i.event.dedupe_key.as_deref().unwrap_or_default()).collect();
        let want: Vec<String> = (1..=8).map(|i| format!("wa:wamid.{i}")).collect();
        assert_eq!(keys, want);
        assert!(items.iter().all(|i| i.malformed.is_none()));
        assert_eq!(items[7].event.text.as_deref(), Some("wamid.8"));
    }

    #[test]
    fn structural_defects() {
        assert!(notification_events(&number(), b"[1]", 1).is_err());
        assert!(notification_events(&number(), b"nope", 1).is_err());
        assert!(notification_events(&number(), b"{}", 1).unwrap().is_empty());
        let items = notification_events(&number(), br#"{"entry":[5,{"changes":[{"nofield":1}]}]}"#, 1).unwrap();
        let at: Vec<_> = items.iter().map(|i| i.malformed.as_ref().unwrap().at.clone()).collect();
        assert_eq!(at, ["entry[0]", "entry[1].changes[0]"]);
        let items = notification_events(
            &number(),
            br#"{"entry":[{"id":"W","changes":[{"field":"message_template_status_update","value":{"event":"APPROVED"}}]}]}"#,
            1,
        )
        .unwrap();
        assert!(items[0].event.meta.contains(&("kind".into(), "message_template_status_update".into())));
        assert!(items[0].malformed.is_none());
    }

    #[test]
    fn verification_handshake() {
        let q = |mode: &str, token: &str| {
            HashMap::from([
                ("hub.mode".to_string(), mode.to_string()),
                ("hub.verify_token".to_string(), token.to_string()),
                ("hub.challenge".to_string(), "1158201444".to_string()),
            ])
        };
        assert_eq!(verify_subscription(&number(), &q("subscribe", "v")).status(), StatusCode::OK);
        assert_eq!(verify_subscription(&number(), &q("subscribe", "w")).status(), StatusCode::FORBIDDEN);
        assert_eq!(verify_subscription(&number(), &q("unsubscribe", "v")).status(), StatusCode::FORBIDDEN);
        assert_eq!(verify_subscription(&number(), &HashMap::new()).status(), StatusCode::FORBIDDEN);
    }

    fn req(body: &str) -> SendRequest {
        SendRequest {
            idempotency_key: "k".into(),
            channel: ChannelRef::new("whatsapp", "wa"),
            conversation: "4915".into(),
            body: body.into(),
            reply_to: None,
        }
    }

    #[test]
    fn send_bodies() {
        let m = message_body(&req("hello")).unwrap();
        assert_eq!(m["to"], "4915");
        assert_eq!(m["type"], "text");
        assert_eq!(m["text"]["body"], "hello");
        assert_eq!(m["messaging_product"], "whatsapp");
        let m =
            message_body(&req(r#"{"type":"text","text":{"body":"r"},"context":{"message_id":"wamid.A"}}"#)).unwrap();
        assert_eq!(m["context"]["message_id"], "wamid.A");
        assert_eq!(m["to"], "4915");
        let m = message_body(&req("{not json")).unwrap();
        assert_eq!(m["text"]["body"], "{not json");
        assert!(message_body(&req("")).is_err());
    }

    #[test]
    fn graph_errors_map_to_codes() {
        let check = |code, want: (&str, bool)| match graph_error(code, "m", None) {
            SendResult::Err { code, retryable, .. } => assert_eq!((code.as_str(), retryable), want),
            other => panic!("{other:?}"),
        };
        check(131047, ("window_closed", false));
        check(130429, ("rate_limited", true));
        check(131056, ("rate_limited", true));
        check(190, ("unauthorized", false));
        check(100, ("bad_request", false));
        check(131026, ("undeliverable", false));
        check(131016, ("platform_error", true));
    }
}
