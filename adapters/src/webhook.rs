//! Inbound webhooks (`POST /hooks/{agent}/{route}`) and the reply sender that POSTs an agent's
//! answers to a configured URL.
//!
//! Inbound, in order: find the route (404), bound the body by `Content-Length` and again while
//! reading (413), verify the signature on the exact raw bytes (401), build the event, hand it to
//! the [`EventSink`] and answer 202 only once the sink says it is durable (promise 1). Every
//! response is a JSON object; errors are `{"error": "..."}`.
//!
//! Status mapping for sink failures: [`SinkError::Unavailable`] is 503 with `Retry-After: 1`
//! (the store is down; the sender redelivers). [`SinkError::Rejected`] is 429 with
//! `Retry-After`, because the proxy rejects only for backpressure (a full per-agent buffer), and
//! 429 is what webhook senders understand as "slow down and retry"; a 4xx other than 429 would
//! make many providers drop the delivery for good.
//!
//! The HTTP-free steps (verification, header filtering, event building) are plain functions so
//! they are unit-tested without sockets.

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use axum::Json;
use axum::Router;
use axum::body::{Body, HttpBody};
use axum::extract::rejection::PathRejection;
use axum::extract::{Path, State};
use axum::http::header::{ALLOW, CONNECTION, CONTENT_LENGTH, CONTENT_TYPE, RETRY_AFTER};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::any;
use concierge_protocol::{ChannelRef, EventData, SendRequest, SendResult, now_ms};
use serde::{Deserialize, Serialize};

use crate::signature;
use crate::{EventSink, Ingested, SinkError};

/// Longest accepted value for identity headers (`x-conversation-id`, `x-sender`, dedupe ids,
/// `content-type`): they become addresses and keys, so they are refused rather than truncated.
const MAX_ID_LEN: usize = 256;
/// Longest header value copied into `meta`; longer values are truncated (meta is informational).
const MAX_META_VALUE_LEN: usize = 256;
/// How many extra request headers are copied into `meta`.
const MAX_META_HEADERS: usize = 16;
/// How long a sender may take to deliver the body once the headers are in (slow-loris bound).
const BODY_READ_TIMEOUT: Duration = Duration::from_secs(30);
/// `Retry-After` seconds when the store is unavailable.
const UNAVAILABLE_RETRY_AFTER_SECS: u64 = 1;
/// `Retry-After` seconds when the proxy applies backpressure (buffer full).
const BACKPRESSURE_RETRY_AFTER_SECS: u64 = 5;
/// Timeout of one reply POST, connection included.
const REPLY_TIMEOUT: Duration = Duration::from_secs(10);
/// How much of a refusing receiver's body is quoted in the send error.
const REPLY_ERROR_BODY_LEN: usize = 512;

/// How a route authenticates its senders; chosen per route so each provider can use its scheme.
#[derive(Clone)]
pub enum Verify {
    /// No verification: only for trusted networks or senders that cannot sign.
    None,
    /// Standard Webhooks (`webhook-id`/`-timestamp`/`-signature`); several secrets allow rotation.
    Standard {
        /// Decoded secrets (see [`signature::secret_bytes`]); any one of them may match.
        secrets: Vec<Vec<u8>>,
    },
    /// Hex HMAC-SHA256 of the raw body in one header (GitHub-style, `sha256=` prefix optional).
    Hmac {
        /// Name of the header carrying the signature (case-insensitive).
        header: String,
        /// The shared secret.
        secret: Vec<u8>,
    },
}

impl fmt::Debug for Verify {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Verify::None => f.write_str("None"),
            Verify::Standard { secrets } => {
                f.debug_struct("Standard").field("secrets", &format_args!("<{} redacted>", secrets.len())).finish()
            }
            Verify::Hmac { header, .. } => {
                f.debug_struct("Hmac").field("header", header).field("secret", &format_args!("<redacted>")).finish()
            }
        }
    }
}

/// Where an agent's replies on a webhook route are POSTed, so agents can answer webhook senders.
#[derive(Clone)]
pub struct ReplyTarget {
    /// The receiver's URL.
    pub url: String,
    /// When set, replies carry Standard Webhooks signature headers made with this secret.
    pub secret: Option<Vec<u8>>,
}

impl fmt::Debug for ReplyTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ReplyTarget")
            .field("url", &redact_url(&self.url))
            .field("secret", &format_args!("{}", if self.secret.is_some() { "<redacted>" } else { "none" }))
            .finish()
    }
}

/// One configured webhook endpoint of one agent; its name is also the event's channel name.
#[derive(Clone)]
pub struct Route {
    /// The agent that owns this route (isolation: other agents' paths never reach it).
    pub agent: String,
    /// Route name, the last path segment; also the conversation when the sender names none.
    pub name: String,
    /// How senders are authenticated.
    pub verify: Verify,
    /// Largest accepted body in bytes (promise 5).
    pub max_body: usize,
    /// Where replies on this route go, if agents may answer.
    pub reply: Option<ReplyTarget>,
}

impl fmt::Debug for Route {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Route")
            .field("agent", &self.agent)
            .field("name", &self.name)
            .field("verify", &self.verify)
            .field("max_body", &self.max_body)
            .field("reply", &self.reply)
            .finish()
    }
}

/// Hides the query string, which often carries a token.
fn redact_url(url: &str) -> String {
    match url.split_once('?') {
        Some((base, _)) => format!("{base}?<redacted>"),
        None => url.to_string(),
    }
}

struct Shared {
    /// agent -> route name -> route.
    routes: HashMap<String, HashMap<String, Route>>,
    sink: Arc<dyn EventSink>,
}

/// Serves `POST /hooks/{agent}/{route}` for `routes`, storing events through `sink`.
///
/// The router has no fallback of its own (so the proxy can merge it with other routers); paths
/// under `/hooks` that match no route get a JSON 404. If two routes share an agent and name,
/// the first wins and a warning is logged (configuration validation should prevent it).
pub fn router(routes: Vec<Route>, sink: Arc<dyn EventSink>) -> Router {
    let mut by_agent: HashMap<String, HashMap<String, Route>> = HashMap::new();
    for mut route in routes {
        if let Verify::Hmac { header, .. } = &mut route.verify {
            *header = header.trim().to_ascii_lowercase();
            if axum::http::HeaderName::from_bytes(header.as_bytes()).is_err() {
                tracing::warn!(agent = %route.agent, route = %route.name, "webhook route's signature header is not a valid header name; every request will fail verification");
            }
        }
        if matches!(&route.verify, Verify::Standard { secrets } if secrets.is_empty()) {
            tracing::warn!(agent = %route.agent, route = %route.name, "webhook route has no secrets; every request will fail verification");
        }
        let agent_routes = by_agent.entry(route.agent.clone()).or_default();
        if agent_routes.contains_key(&route.name) {
            tracing::warn!(agent = %route.agent, route = %route.name, "duplicate webhook route ignored");
            continue;
        }
        agent_routes.insert(route.name.clone(), route);
    }
    let shared = Arc::new(Shared { routes: by_agent, sink });
    Router::new()
        .route("/hooks/{agent}/{route}", any(handle))
        // matchit refuses a catch-all next to the parameters, so each near miss is spelled out.
        .route("/hooks", any(unknown_path))
        .route("/hooks/", any(unknown_path))
        .route("/hooks/{agent}", any(unknown_path))
        .route("/hooks/{agent}/", any(unknown_path))
        .route("/hooks/{agent}/{route}/", any(unknown_path))
        .route("/hooks/{agent}/{route}/{*rest}", any(unknown_path))
        .with_state(shared)
}

/// An HTTP error answer: status, message for the `error` field, optional `Retry-After`.
#[derive(Debug, PartialEq, Eq)]
struct HookError {
    status: StatusCode,
    message: String,
    retry_after: Option<u64>,
    close: bool,
}

impl HookError {
    fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Self { status, message: message.into(), retry_after: None, close: false }
    }
}

impl IntoResponse for HookError {
    fn into_response(self) -> Response {
        let mut response = (self.status, Json(serde_json::json!({ "error": self.message }))).into_response();
        if let Some(secs) = self.retry_after {
            response.headers_mut().insert(RETRY_AFTER, HeaderValue::from(secs));
        }
        if self.close {
            // The body was not read; closing tells the client not to reuse the connection.
            response.headers_mut().insert(CONNECTION, HeaderValue::from_static("close"));
        }
        if self.status == StatusCode::METHOD_NOT_ALLOWED {
            response.headers_mut().insert(ALLOW, HeaderValue::from_static("POST"));
        }
        response
    }
}

/// Shortens attacker-supplied text before echoing it in an error message.
fn echo(s: &str) -> String {
    let mut out: String = s.chars().take(64).collect();
    if out.len() < s.len() {
        out.push('…');
    }
    out
}

async fn unknown_path() -> HookError {
    count_refused(StatusCode::NOT_FOUND);
    HookError::new(StatusCode::NOT_FOUND, "unknown webhook path; expected POST /hooks/{agent}/{route}")
}

/// Outcomes of webhook requests refused before they reach the sink (which counts the rest).
const REFUSED_OUTCOMES: [&str; 7] =
    ["bad_request", "unauthorized", "unknown_route", "method_not_allowed", "timeout", "too_large", "refused"];

/// Refused requests by outcome (index into [`REFUSED_OUTCOMES`]), process-wide: the sink never
/// sees them, so the proxy reads these to count them in its ingress metric.
static REFUSED: [AtomicU64; REFUSED_OUTCOMES.len()] = [const { AtomicU64::new(0) }; REFUSED_OUTCOMES.len()];

fn count_refused(status: StatusCode) {
    let outcome = match status {
        StatusCode::BAD_REQUEST => 0,
        StatusCode::UNAUTHORIZED => 1,
        StatusCode::NOT_FOUND => 2,
        StatusCode::METHOD_NOT_ALLOWED => 3,
        StatusCode::REQUEST_TIMEOUT => 4,
        StatusCode::PAYLOAD_TOO_LARGE => 5,
        _ => 6,
    };
    REFUSED[outcome].fetch_add(1, Ordering::Relaxed);
}

/// Webhook requests refused before reaching the sink since the process started, as
/// `(outcome, count)`: `unauthorized` (401, signature), `too_large` (413), `bad_request` (400),
/// `unknown_route` (404), `method_not_allowed` (405), `timeout` (408, slow body), `refused`.
pub fn refused_counts() -> Vec<(&'static str, u64)> {
    REFUSED_OUTCOMES.iter().zip(&REFUSED).map(|(o, n)| (*o, n.load(Ordering::Relaxed))).collect()
}

#[derive(Serialize)]
struct Accepted {
    offset: u64,
    duplicate: bool,
}

async fn handle(
    State(shared): State<Arc<Shared>>,
    path: Result<Path<(String, String)>, PathRejection>,
    method: Method,
    headers: HeaderMap,
    body: Body,
) -> Response {
    match handle_inner(&shared, path, method, headers, body).await {
        Ok(Ingested { offset, duplicate }) => {
            (StatusCode::ACCEPTED, Json(Accepted { offset, duplicate })).into_response()
        }
        Err(e) => {
            // 503 and 429 come from the sink, which counted them already.
            if !matches!(e.status, StatusCode::SERVICE_UNAVAILABLE | StatusCode::TOO_MANY_REQUESTS) {
                count_refused(e.status);
            }
            e.into_response()
        }
    }
}

async fn handle_inner(
    shared: &Shared,
    path: Result<Path<(String, String)>, PathRejection>,
    method: Method,
    headers: HeaderMap,
    body: Body,
) -> Result<Ingested, HookError> {
    let Ok(Path((agent, name))) = path else {
        return Err(HookError::new(StatusCode::NOT_FOUND, "unknown webhook path (not valid UTF-8)"));
    };
    let route = find_route(&shared.routes, &agent, &name)?;
    if method != Method::POST {
        return Err(HookError::new(StatusCode::METHOD_NOT_ALLOWED, "webhooks accept POST only"));
    }
    let body = read_body(body, &headers, route.max_body).await?;
    let now = now_ms();
    if let Err(e) = verify(&route.verify, &headers, &body, (now / 1000) as i64) {
        tracing::debug!(agent = %route.agent, route = %route.name, error = %e.message, "webhook verification failed");
        return Err(e);
    }
    let event = build_event(route, &headers, body, now)?;
    match shared.sink.ingest(event).await {
        Ok(ingested) => Ok(ingested),
        Err(SinkError::Unavailable(detail)) => {
            tracing::warn!(agent = %route.agent, route = %route.name, %detail, "webhook not stored: store unavailable");
            Err(HookError {
                retry_after: Some(UNAVAILABLE_RETRY_AFTER_SECS),
                ..HookError::new(StatusCode::SERVICE_UNAVAILABLE, "event store unavailable; retry later")
            })
        }
        Err(SinkError::Rejected(detail)) => {
            tracing::warn!(agent = %route.agent, route = %route.name, %detail, "webhook not stored: rejected");
            Err(HookError {
                retry_after: Some(BACKPRESSURE_RETRY_AFTER_SECS),
                ..HookError::new(
                    StatusCode::TOO_MANY_REQUESTS,
                    "the proxy is not accepting events for this agent right now (backpressure); retry later",
                )
            })
        }
    }
}

/// Finds the route, naming which part of the path is unknown.
fn find_route<'a>(
    routes: &'a HashMap<String, HashMap<String, Route>>,
    agent: &str,
    name: &str,
) -> Result<&'a Route, HookError> {
    let Some(agent_routes) = routes.get(agent) else {
        return Err(HookError::new(StatusCode::NOT_FOUND, format!("unknown agent '{}'", echo(agent))));
    };
    agent_routes.get(name).ok_or_else(|| {
        HookError::new(StatusCode::NOT_FOUND, format!("unknown route '{}' for agent '{}'", echo(name), echo(agent)))
    })
}

fn too_large(max: usize) -> HookError {
    HookError::new(StatusCode::PAYLOAD_TOO_LARGE, format!("body exceeds this route's limit of {max} bytes"))
}

/// The declared `Content-Length`, if present and numeric.
fn content_length(headers: &HeaderMap) -> Option<u64> {
    headers.get(CONTENT_LENGTH)?.to_str().ok()?.trim().parse().ok()
}

/// Reads the body, refusing by `Content-Length` before reading and by count while reading, so
/// at most `max` bytes (plus the chunk in hand) are ever buffered.
async fn read_body(mut body: Body, headers: &HeaderMap, max: usize) -> Result<Vec<u8>, HookError> {
    let declared = content_length(headers);
    if declared.is_some_and(|n| n > max as u64) {
        return Err(HookError { close: true, ..too_large(max) });
    }
    let read = async {
        let mut buf = Vec::with_capacity(declared.map_or(0, |n| n as usize).min(max));
        while let Some(frame) = std::future::poll_fn(|cx| std::pin::Pin::new(&mut body).poll_frame(cx)).await {
            let frame = frame.map_err(|e| {
                HookError::new(StatusCode::BAD_REQUEST, format!("could not read the request body: {e}"))
            })?;
            let Ok(data) = frame.into_data() else {
                continue;
            }; // trailers carry no body bytes
            if buf.len().saturating_add(data.len()) > max {
                return Err(HookError { close: true, ..too_large(max) });
            }
            buf.extend_from_slice(&data);
        }
        Ok(buf)
    };
    match tokio::time::timeout(BODY_READ_TIMEOUT, read).await {
        Ok(result) => result,
        Err(_) => Err(HookError {
            close: true,
            ..HookError::new(
                StatusCode::REQUEST_TIMEOUT,
                format!("request body not received within {} s", BODY_READ_TIMEOUT.as_secs()),
            )
        }),
    }
}

/// A header as text: `Ok(None)` when absent, 401 when present but not visible ASCII.
fn signature_header<'a>(headers: &'a HeaderMap, name: &str) -> Result<Option<&'a str>, HookError> {
    match headers.get(name) {
        None => Ok(None),
        Some(v) => v
            .to_str()
            .map(Some)
            .map_err(|_| HookError::new(StatusCode::UNAUTHORIZED, format!("header {name} is not valid ASCII text"))),
    }
}

/// Checks the route's signature scheme against the exact raw body; errors are 401s naming what
/// failed (never an expected value).
fn verify(verify: &Verify, headers: &HeaderMap, body: &[u8], now_secs: i64) -> Result<(), HookError> {
    let unauthorized = |e: signature::SignatureError| {
        HookError::new(StatusCode::UNAUTHORIZED, format!("signature verification failed: {e}"))
    };
    match verify {
        Verify::None => Ok(()),
        Verify::Standard { secrets } => signature::standard_verify(
            secrets,
            signature_header(headers, "webhook-id")?,
            signature_header(headers, "webhook-timestamp")?,
            signature_header(headers, "webhook-signature")?,
            body,
            now_secs,
        )
        .map_err(unauthorized),
        Verify::Hmac { header, secret } => {
            // Presence is checked here so the message names the configured header;
            // `body_verify_hex` wants a `&'static str` name it only uses for that message.
            let Some(value) = signature_header(headers, header)? else {
                return Err(HookError::new(
                    StatusCode::UNAUTHORIZED,
                    format!("signature verification failed: missing header {header}"),
                ));
            };
            signature::body_verify_hex(secret, Some(value), "signature", body).map_err(unauthorized)
        }
    }
}

/// An identity header as UTF-8 text of at most [`MAX_ID_LEN`] bytes; 400 otherwise.
/// Empty (or all-blank) values count as absent.
fn id_header(headers: &HeaderMap, name: &str) -> Result<Option<String>, HookError> {
    let Some(value) = headers.get(name) else {
        return Ok(None);
    };
    let text = std::str::from_utf8(value.as_bytes())
        .map_err(|_| HookError::new(StatusCode::BAD_REQUEST, format!("header {name} is not valid UTF-8")))?
        .trim();
    if text.len() > MAX_ID_LEN {
        return Err(HookError::new(
            StatusCode::BAD_REQUEST,
            format!("header {name} is longer than {MAX_ID_LEN} bytes"),
        ));
    }
    Ok((!text.is_empty()).then(|| text.to_string()))
}

/// The sender's delivery id: `webhook-id`, else `Idempotency-Key`.
fn delivery_id(headers: &HeaderMap) -> Result<Option<String>, HookError> {
    match id_header(headers, "webhook-id")? {
        Some(id) => Ok(Some(id)),
        None => id_header(headers, "idempotency-key"),
    }
}

/// True for header names that may carry credentials; such headers never reach `meta`.
fn is_secret_header(name: &str) -> bool {
    let name = name.to_ascii_lowercase();
    if name == "idempotency-key" || name.ends_with("-idempotency-key") {
        return false;
    }
    const MARKERS: &[&str] = &[
        "auth",
        "cookie",
        "signature",
        "token",
        "secret",
        "key",
        "password",
        "passwd",
        "credential",
        "session",
        "csrf",
        "xsrf",
        "private",
    ];
    MARKERS.iter().any(|m| name.contains(m))
}

/// Request headers worth keeping as event facts: `x-*` and `user-agent`, minus secrets and the
/// ones already represented as event fields; at most [`MAX_META_HEADERS`], values truncated.
fn meta_headers(headers: &HeaderMap) -> Vec<(String, String)> {
    headers
        .iter()
        .filter(|(name, _)| {
            let name = name.as_str();
            (name.starts_with("x-") || name == "user-agent")
                && name != "x-conversation-id"
                && name != "x-sender"
                && !is_secret_header(name)
        })
        .take(MAX_META_HEADERS)
        .map(|(name, value)| {
            (name.as_str().to_string(), truncate_utf8(&String::from_utf8_lossy(value.as_bytes()), MAX_META_VALUE_LEN))
        })
        .collect()
}

/// At most `max` bytes of `s`, cut on a character boundary.
fn truncate_utf8(s: &str, max: usize) -> String {
    let mut end = s.len().min(max);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s[..end].to_string()
}

/// Normalized text: a `text/*` body that is valid UTF-8, or the top-level string field `text`
/// of a JSON object body (JSON content types, or no content type at all).
fn extract_text(content_type: Option<&str>, body: &[u8]) -> Option<String> {
    let essence = content_type.map(|ct| ct.split(';').next().unwrap_or("").trim().to_ascii_lowercase());
    match essence.as_deref() {
        Some(ct) if ct.starts_with("text/") => String::from_utf8(body.to_vec()).ok(),
        None => json_text(body),
        Some(ct) if ct == "application/json" || ct.ends_with("+json") => json_text(body),
        Some(_) => None,
    }
}

fn json_text(body: &[u8]) -> Option<String> {
    #[derive(Deserialize)]
    struct WithText {
        #[serde(default)]
        text: Option<serde_json::Value>,
    }
    // Only an object counts: serde would also read a struct from a JSON array, positionally.
    if body.trim_ascii_start().first() != Some(&b'{') {
        return None;
    }
    match serde_json::from_slice::<WithText>(body).ok()?.text? {
        serde_json::Value::String(s) => Some(s),
        _ => None,
    }
}

/// Builds the event for a verified request (pure: no I/O), or a 400 for unusable headers.
/// The body moves into the event's `raw` (no copy: it is the largest part of the event).
fn build_event(route: &Route, headers: &HeaderMap, body: Vec<u8>, received_at_ms: u64) -> Result<EventData, HookError> {
    let id = delivery_id(headers)?;
    let conversation = id_header(headers, "x-conversation-id")?.unwrap_or_else(|| route.name.clone());
    let sender = id_header(headers, "x-sender")?;
    let declared_type = id_header(headers, CONTENT_TYPE.as_str())?;
    let text = extract_text(declared_type.as_deref(), &body);
    let mut meta = Vec::with_capacity(2 + MAX_META_HEADERS);
    if let Some(id) = &id {
        meta.push(("webhook-id".to_string(), id.clone()));
    }
    meta.push(("content-length".to_string(), body.len().to_string()));
    meta.extend(meta_headers(headers));
    Ok(EventData {
        agent: route.agent.clone(),
        channel: ChannelRef::new("webhook", route.name.clone()),
        conversation,
        sender,
        dedupe_key: id.map(|id| format!("{}:{id}", route.name)),
        received_at_ms,
        text,
        attachments: Vec::new(),
        content_type: declared_type.unwrap_or_else(|| "application/octet-stream".to_string()),
        raw: body,
        meta,
    })
}

/// The JSON body of a reply POST.
#[derive(Serialize)]
struct ReplyBody<'a> {
    agent: &'a str,
    channel: &'a ChannelRef,
    conversation: &'a str,
    body: &'a str,
    reply_to: Option<u64>,
    idempotency_key: &'a str,
}

/// POSTs an agent's reply to `target` (signed when it has a secret; `webhook-id` is the
/// idempotency key so the receiver can dedupe retries) and maps the outcome to a [`SendResult`].
///
/// 2xx is `Ok` with the `webhook-id` as platform id; 429 is `rate_limited` (retryable); other
/// 4xx are `rejected` (not retryable); 5xx is `upstream_error` (retryable); network failures and
/// timeouts are `unreachable` (retryable). The client's redirect policy applies as configured.
pub async fn send_reply(client: &reqwest::Client, agent: &str, target: &ReplyTarget, req: &SendRequest) -> SendResult {
    let payload = ReplyBody {
        agent,
        channel: &req.channel,
        conversation: &req.conversation,
        body: &req.body,
        reply_to: req.reply_to,
        idempotency_key: &req.idempotency_key,
    };
    let bytes = match serde_json::to_vec(&payload) {
        Ok(b) => b,
        Err(e) => {
            return SendResult::err("invalid_request", format!("could not encode the reply: {e}"), false);
        }
    };
    let id = req.idempotency_key.as_str();
    if HeaderValue::from_str(id).is_err() {
        return SendResult::err(
            "invalid_request",
            "the idempotency key cannot be sent as a webhook-id header (must be visible ASCII)",
            false,
        );
    }
    let mut request = client.post(&target.url).timeout(REPLY_TIMEOUT).header(CONTENT_TYPE, "application/json");
    match &target.secret {
        Some(secret) => {
            let ts = (now_ms() / 1000) as i64;
            for (name, value) in signature::standard_headers(secret, id, ts, &bytes) {
                request = request.header(name, value);
            }
        }
        None => request = request.header("webhook-id", id),
    }
    let response = match request.body(bytes).send().await {
        Ok(r) => r,
        Err(e) => return transport_error(e),
    };
    let status = response.status();
    if status.is_success() {
        return SendResult::Ok { platform_ids: vec![id.to_string()] };
    }
    let excerpt = body_excerpt(response).await;
    let message = format!("receiver answered {status}: {excerpt}");
    if status == reqwest::StatusCode::TOO_MANY_REQUESTS {
        SendResult::err("rate_limited", message, true)
    } else if status.is_server_error() {
        SendResult::err("upstream_error", message, true)
    } else {
        SendResult::err("rejected", message, false)
    }
}

/// Maps a reqwest failure; its URL is stripped because URLs may carry tokens.
fn transport_error(e: reqwest::Error) -> SendResult {
    let builder = e.is_builder();
    let connect = e.is_connect();
    let timeout = e.is_timeout();
    let e = e.without_url();
    if builder {
        SendResult::err("invalid_target", format!("the reply URL is not usable: {e}"), false)
    } else if connect {
        SendResult::err("unreachable", format!("could not connect to the receiver; nothing was sent: {e}"), true)
    } else if timeout {
        SendResult::err(
            "unreachable",
            format!(
                "no answer within {} s; outcome unknown, the receiver may have got the request: {e}",
                REPLY_TIMEOUT.as_secs()
            ),
            true,
        )
    } else {
        SendResult::err(
            "unreachable",
            format!("connection failed during the request; outcome unknown, the receiver may have got it: {e}"),
            true,
        )
    }
}

/// The first [`REPLY_ERROR_BODY_LEN`] bytes of an error answer, reading no more than that.
async fn body_excerpt(mut response: reqwest::Response) -> String {
    let mut buf = Vec::new();
    while buf.len() < REPLY_ERROR_BODY_LEN {
        match response.chunk().await {
            Ok(Some(chunk)) => buf.extend_from_slice(&chunk),
            Ok(None) | Err(_) => break,
        }
    }
    buf.truncate(REPLY_ERROR_BODY_LEN);
    String::from_utf8_lossy(&buf).into_owned()
}

/// Sends an agent's replies on a webhook route to the route's `reply_url`.
pub struct ReplySender {
    client: reqwest::Client,
    target: ReplyTarget,
}

impl ReplySender {
    /// Binds a reply target; the client should not follow redirects (signed bodies must not move hosts).
    pub fn new(client: reqwest::Client, target: ReplyTarget) -> Self {
        Self { client, target }
    }
}

#[async_trait::async_trait]
impl crate::ChannelSender for ReplySender {
    async fn send(&self, agent: &str, request: &SendRequest) -> SendResult {
        send_reply(&self.client, agent, &self.target, request).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(verify: Verify) -> Route {
        Route { agent: "ada".into(), name: "orders".into(), verify, max_body: 1024, reply: None }
    }

    fn headers(pairs: &[(&str, &[u8])]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (name, value) in pairs {
            h.append(
                axum::http::HeaderName::from_bytes(name.as_bytes()).unwrap(),
                HeaderValue::from_bytes(value).unwrap(),
            );
        }
        h
    }

    #[test]
    fn debug_never_prints_secrets() {
        let mut r = route(Verify::Standard { secrets: vec![b"topsecret1".to_vec(), b"topsecret2".to_vec()] });
        r.reply =
            Some(ReplyTarget { url: "https://x.test/r?token=tok123".into(), secret: Some(b"replysecret".to_vec()) });
        let hmac = route(Verify::Hmac { header: "x-sig".into(), secret: b"hmacsecret".to_vec() });
        let text = format!("{r:?} {hmac:?}");
        for secret in ["topsecret", "replysecret", "hmacsecret", "tok123"] {
            assert!(!text.contains(secret), "{secret} leaked in {text}");
        }
        assert!(text.contains("orders") && text.contains("x-sig"), "{text}");
    }

    #[test]
    fn secret_headers_are_recognised() {
        for name in [
            "authorization",
            "proxy-authorization",
            "cookie",
            "x-api-key",
            "x-hub-signature-256",
            "x-telegram-bot-api-secret-token",
            "X-Auth-User",
            "x-amz-security-token",
        ] {
            assert!(is_secret_header(name), "{name}");
        }
        for name in ["idempotency-key", "x-idempotency-key", "x-request-id", "user-agent", "x-github-event"] {
            assert!(!is_secret_header(name), "{name}");
        }
    }

    #[test]
    fn meta_keeps_x_headers_and_user_agent_only_without_secrets_bounded() {
        let long = vec![b'v'; 1000];
        let mut pairs: Vec<(String, Vec<u8>)> = vec![
            ("user-agent".into(), b"curl/8".to_vec()),
            ("x-api-key".into(), b"k".to_vec()),
            ("authorization".into(), b"Bearer s".to_vec()),
            ("accept".into(), b"*/*".to_vec()),
            ("x-long".into(), long),
            ("x-latin1".into(), vec![b'a', 0xe9]),
            ("x-sender".into(), b"bob".to_vec()),
        ];
        for i in 0..30 {
            pairs.push((format!("x-extra-{i}"), b"1".to_vec()));
        }
        let refs: Vec<(&str, &[u8])> = pairs.iter().map(|(n, v)| (n.as_str(), v.as_slice())).collect();
        let meta = meta_headers(&headers(&refs));
        assert_eq!(meta.len(), MAX_META_HEADERS);
        let names: Vec<&str> = meta.iter().map(|(n, _)| n.as_str()).collect();
        assert!(names.contains(&"user-agent") && names.contains(&"x-long"), "{names:?}");
        for gone in ["x-api-key", "authorization", "accept", "x-sender"] {
            assert!(!names.contains(&gone), "{gone} in {names:?}");
        }
        let long_value = &meta.iter().find(|(n, _)| n == "x-long").unwrap().1;
        assert_eq!(long_value.len(), MAX_META_VALUE_LEN);
        assert_eq!(meta.iter().find(|(n, _)| n == "x-latin1").unwrap().1, "a\u{fffd}");
    }

    #[test]
    fn text_comes_from_text_bodies_and_json_text_fields() {
        assert_eq!(extract_text(Some("text/plain; charset=utf-8"), b"hi"), Some("hi".into()));
        assert_eq!(extract_text(Some("TEXT/markdown"), b"# t"), Some("# t".into()));
        assert_eq!(extract_text(Some("text/plain"), &[0xff]), None);
        assert_eq!(extract_text(Some("application/json"), br#"{"text":"yo","n":1}"#), Some("yo".into()));
        assert_eq!(extract_text(Some("application/cloudevents+json"), br#"{"text":"ce"}"#), Some("ce".into()));
        assert_eq!(extract_text(None, br#"{"text":"bare"}"#), Some("bare".into()));
        assert_eq!(extract_text(Some("application/json"), br#"{"text":5}"#), None);
        assert_eq!(extract_text(Some("application/json"), br#"{"a":{"text":"nested"}}"#), None);
        assert_eq!(extract_text(Some("application/json"), br#"["text"]"#), None);
        assert_eq!(extract_text(Some("application/json"), b"not json"), None);
        assert_eq!(extract_text(Some("application/octet-stream"), br#"{"text":"x"}"#), None);
        assert_eq!(extract_text(Some("application/json"), b""), None);
    }

    #[test]
    fn event_fields_from_headers_and_body() {
        let body = br#"{"text":"hello","x":1}"#.to_vec();
        let h = headers(&[
            ("content-type", b"application/json"),
            ("webhook-id", b"msg_1"),
            ("idempotency-key", b"ignored-when-webhook-id"),
            ("x-conversation-id", b"thread-9"),
            ("x-sender", b"bob"),
            ("x-request-id", b"r1"),
        ]);
        let e = build_event(&route(Verify::None), &h, body.clone(), 42).unwrap();
        assert_eq!(e.agent, "ada");
        assert_eq!(e.channel, ChannelRef::new("webhook", "orders"));
        assert_eq!(e.conversation, "thread-9");
        assert_eq!(e.sender.as_deref(), Some("bob"));
        assert_eq!(e.dedupe_key.as_deref(), Some("orders:msg_1"));
        assert_eq!(e.received_at_ms, 42);
        assert_eq!(e.text.as_deref(), Some("hello"));
        assert_eq!(e.content_type, "application/json");
        assert_eq!(e.raw, body.to_vec());
        assert!(e.attachments.is_empty());
        assert_eq!(
            &e.meta[..2],
            &[("webhook-id".into(), "msg_1".into()), ("content-length".into(), body.len().to_string())]
        );
        assert!(e.meta.contains(&("x-request-id".into(), "r1".into())));
    }

    #[test]
    fn event_defaults_and_idempotency_key_fallback() {
        let e = build_event(&route(Verify::None), &headers(&[("idempotency-key", b"ik")]), Vec::new(), 1).unwrap();
        assert_eq!(e.dedupe_key.as_deref(), Some("orders:ik"));
        assert_eq!(e.conversation, "orders");
        assert_eq!(e.sender, None);
        assert_eq!(e.content_type, "application/octet-stream");
        assert_eq!(e.text, None);
        assert_eq!(e.meta, vec![("webhook-id".into(), "ik".into()), ("content-length".into(), "0".into())]);
        let e = build_event(&route(Verify::None), &headers(&[("webhook-id", b"  ")]), Vec::new(), 1).unwrap();
        assert_eq!(e.dedupe_key, None);
    }

    #[test]
    fn overlong_or_invalid_identity_headers_are_400() {
        let long = vec![b'c'; MAX_ID_LEN + 1];
        for (name, value) in
            [("x-conversation-id", long.as_slice()), ("x-sender", &[0xff, 0xfe][..]), ("webhook-id", long.as_slice())]
        {
            let err = build_event(&route(Verify::None), &headers(&[(name, value)]), Vec::new(), 1).unwrap_err();
            assert_eq!(err.status, StatusCode::BAD_REQUEST);
            assert!(err.message.contains(name), "{}", err.message);
        }
        let exact = vec![b'c'; MAX_ID_LEN];
        let e = build_event(&route(Verify::None), &headers(&[("x-conversation-id", &exact)]), Vec::new(), 1).unwrap();
        assert_eq!(e.conversation.len(), MAX_ID_LEN);
        let utf8 = "conversación".as_bytes();
        let e = build_event(&route(Verify::None), &headers(&[("x-conversation-id", utf8)]), Vec::new(), 1).unwrap();
        assert_eq!(e.conversation, "conversación");
    }

    #[test]
    fn verification_names_what_failed() {
        let secret = b"s3".to_vec();
        let standard = Verify::Standard { secrets: vec![secret.clone()] };
        let sig = signature::standard_sign(&secret, "id1", 1000, b"body");
        let good =
            headers(&[("webhook-id", b"id1"), ("webhook-timestamp", b"1000"), ("webhook-signature", sig.as_bytes())]);
        assert_eq!(verify(&standard, &good, b"body", 1000), Ok(()));
        let err = verify(&standard, &good, b"bodY", 1000).unwrap_err();
        assert_eq!(err.status, StatusCode::UNAUTHORIZED);
        assert!(err.message.contains("no signature matches"), "{}", err.message);
        assert!(!err.message.contains(&sig[3..]), "leaks the signature");
        let err = verify(&standard, &headers(&[("webhook-id", b"id1")]), b"body", 1000).unwrap_err();
        assert!(err.message.contains("missing header webhook-timestamp"), "{}", err.message);
        let weird = headers(&[("webhook-id", b"id1"), ("webhook-timestamp", b"1000"), ("webhook-signature", &[0xff])]);
        let err = verify(&standard, &weird, b"body", 1000).unwrap_err();
        assert!(err.message.contains("webhook-signature is not valid ASCII"), "{}", err.message);

        let hmac = Verify::Hmac { header: "x-sig".into(), secret: secret.clone() };
        let hex = signature::body_sign_hex(&secret, b"body");
        assert_eq!(verify(&hmac, &headers(&[("x-sig", hex.as_bytes())]), b"body", 0), Ok(()));
        let err = verify(&hmac, &headers(&[]), b"body", 0).unwrap_err();
        assert!(err.message.contains("missing header x-sig"), "{}", err.message);
        assert_eq!(verify(&Verify::None, &headers(&[]), b"", 0), Ok(()));
        // A misconfigured header name never matches and never panics.
        let odd = Verify::Hmac { header: "bad header\n".into(), secret };
        let err = verify(&odd, &headers(&[("x-sig", hex.as_bytes())]), b"body", 0).unwrap_err();
        assert_eq!(err.status, StatusCode::UNAUTHORIZED);
    }

    #[test]
    fn helpers_are_bounded() {
        assert_eq!(truncate_utf8("ééé", 3), "é");
        assert_eq!(truncate_utf8("abc", 10), "abc");
        assert_eq!(echo(&"a".repeat(100)).chars().count(), 65);
        assert_eq!(redact_url("https://h/p?token=1"), "https://h/p?<redacted>");
    }
}
