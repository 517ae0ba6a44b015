//! Slack: Socket Mode (a held WebSocket), the HTTP Events API, and Web API sends.
//!
//! **Client.** A thin Socket Mode client of our own (reqwest for `apps.connections.open`,
//! tokio-tungstenite for the socket), not slack-morphism: its Socket Mode listener acks each
//! envelope itself before or independently of our handler's store write, and hands handlers
//! typed events re-serialized from its own model, so neither ack-after-store (promise 1) nor
//! the raw payload byte for byte could be kept. The WebSocket read/write buffers are set to
//! 4 KiB explicitly (tungstenite's default read buffer is 128 KiB per socket).
//!
//! **Socket Mode (promise 1).** One task per app opens a socket, then reads one envelope at a
//! time: `events_api`, `interactive` and `slash_commands` envelopes go to the [`EventSink`] and
//! only when the write returned is `{"envelope_id": ...}` sent back. A failed write leaves the
//! envelope unacked; Slack redelivers it (with `retry_attempt`) and the dedupe key
//! `slack:<team or app>:<event_id>` drops copies already stored. On `disconnect` with
//! `refresh_requested` or `warning` the replacement socket is opened first (and its `hello` read) and the old one
//! closed after, so there is no gap; 30 s of silence is answered with a ping and 60 s drops
//! the socket (a peer gone without FIN); `link_disabled` stops the loop and is reported as
//! `disabled`. Other failures reconnect with capped exponential backoff (1 s to 30 s).
//!
//! **Events API.** `POST /slack/{name}`: `X-Slack-Signature` is `v0=hex(HMAC-SHA256(secret,
//! "v0:{ts}:{body}"))`, compared in constant time, and `X-Slack-Request-Timestamp` must be
//! within 5 minutes; otherwise 401 and nothing is parsed or stored. `url_verification` is
//! answered with its challenge; an `event_callback` is stored and only then answered 200
//! (503 on a store failure, so Slack retries). `X-Slack-Retry-Num`/`-Reason` go to `meta`.
//! Form-encoded requests (interactive `payload=<JSON>`, slash commands) are stored the same
//! way, with the form body as `raw`; their dedupe key uses `trigger_id`.
//!
//! **Events.** Conversation = `<channel>:<thread_ts>`, or `<channel>:<ts>` for a message that
//! is not in a thread (a reply to it starts the thread). `raw` is the envelope's `payload`
//! (Socket Mode) or the request body (Events API), byte for byte.
//!
//! **Sends.** A plain-text body is `chat.postMessage` to the conversation's channel with its
//! `thread_ts`; a JSON object `{"method": "chat.postMessage" | "chat.update" |
//! "reactions.add", ...arguments}` is sent as given, `channel` (and for `chat.postMessage`
//! `thread_ts`) defaulting to the conversation's. Sends are queued per channel
//! ([`crate::pacing`]): calls to one channel leave in the order they came, `chat.postMessage`
//! at least `chat_interval` apart (default 1 s: Slack allows about one message per second per
//! channel), and every call of the app takes one of [`APP_RATE`] slots per second, so a burst
//! is slowed, never dropped, and one busy channel does not hold up another. A 429 waits
//! `Retry-After` (at most 5 times, each at most 60 s) inside the channel's turn, so it holds
//! back that channel's later sends too; a 429 means nothing was sent. Beyond 10,000 queued
//! sends per app new ones are refused with `queue_full` (retryable: nothing was sent). Slack's
//! `error` codes become `SendResult` codes: `channel_not_found`, `not_in_channel`,
//! `unauthorized` (bad token), `rate_limited`.

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::header::CONTENT_TYPE;
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use concierge_protocol::{ChannelRef, EventData, SendRequest, SendResult, now_ms};
use futures::{SinkExt as _, StreamExt as _};
use hmac::{Hmac, Mac};
use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::{Map, Value};
use sha2::Sha256;
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use crate::http_util;
use crate::pacing::{self, Pacer, Turn};
use crate::{ChannelSender, ConnectionReporter, EventSink};

/// Slack's Web API base URL.
pub const DEFAULT_API_BASE: &str = "https://slack.com/api";
/// Methods an agent may call through a JSON body (chat actions only).
pub const SEND_METHODS: &[&str] = &["chat.postMessage", "chat.update", "reactions.add"];
/// Header carrying the Events API request signature.
pub const SIGNATURE_HEADER: &str = "x-slack-signature";
/// Header carrying the Events API request timestamp (Unix seconds).
pub const TIMESTAMP_HEADER: &str = "x-slack-request-timestamp";
/// Oldest (or most future) request timestamp accepted: Slack's documented replay window.
pub const SIGNATURE_WINDOW_SECS: u64 = 300;

/// Largest WebSocket message accepted (Slack payloads are well under this).
const MAX_WS_MESSAGE: usize = 4 * 1024 * 1024;
const BACKOFF_INITIAL: Duration = Duration::from_secs(1);
const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// Wait after `invalid_auth` and similar: only a configuration change fixes it.
const UNAUTHORIZED_BACKOFF: Duration = Duration::from_secs(300);
/// Silence after which the socket is pinged; a second one in a row drops it.
const IDLE_PING: Duration = Duration::from_secs(30);
/// Timeout of one Web API call or WebSocket handshake.
const CALL_TIMEOUT: Duration = Duration::from_secs(30);
/// Largest Web API response read.
const MAX_RESPONSE: usize = 1024 * 1024;
/// 429 retries of one send before it is reported as `rate_limited`.
const MAX_RATE_RETRIES: u32 = 5;
/// Longest `Retry-After` a send waits out itself.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(60);
/// Most Web API calls per second of one app, every method and channel together. Slack
/// publishes its limits per method, not per app: `chat.postMessage` about 1 per second per
/// channel "while also maintaining a workspace-wide limit" whose number it does not publish,
/// `chat.update` and `reactions.add` Tier 3 (50+ per minute, sporadic bursts welcome). Ten per
/// second lets ten channels post at their documented 1/s at the same time (more than an agent's
/// conversations need), while a runaway agent spraying many channels becomes a steady stream
/// instead of a spike into that unpublished cap. Tier 3 bursts are not paced 1.2 s apart; if
/// Slack objects, its 429 `Retry-After` is the authority and is waited out.
pub const APP_RATE: u32 = 10;
/// Default least time between two `chat.postMessage` calls to one channel (Slack: 1 per second).
pub const DEFAULT_CHAT_INTERVAL: Duration = Duration::from_secs(1);
/// Sends waiting in one app's queues before new ones are refused with `queue_full`.
const MAX_QUEUED_SENDS: usize = 10_000;
/// Per-channel pacing entries kept before idle ones are pruned.
const MAX_CHANNEL_ENTRIES: usize = 4096;

/// One Slack app's identity and credentials.
#[derive(Clone)]
pub struct App {
    /// Name from the configuration; the event's channel name and URL segment.
    pub name: String,
    /// The agent that receives this app's events.
    pub agent: String,
    /// `xapp-...` for Socket Mode; never logged.
    pub app_token: String,
    /// `xoxb-...` for sends; never logged.
    pub bot_token: String,
    /// Events API signing secret; never logged.
    pub signing_secret: Vec<u8>,
    /// Web API base URL without a trailing slash.
    pub api_base: String,
}

impl fmt::Debug for App {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("App").field("name", &self.name).field("agent", &self.agent).finish_non_exhaustive()
    }
}

impl App {
    fn channel(&self) -> ChannelRef {
        ChannelRef::new("slack", self.name.clone())
    }
}

// ---- payloads -> events -------------------------------------------------------------------

/// Turns one Events API payload (an `event_callback`, or an interactive / slash command
/// payload) into an event; `raw` is kept as given.
pub fn payload_event(app: &App, raw: &str, meta: Vec<(String, String)>, now: u64) -> Result<EventData, String> {
    let v: Value = serde_json::from_str(raw).map_err(|e| format!("payload is not JSON: {e}"))?;
    let obj = v.as_object().ok_or("payload is not a JSON object")?;
    let s = |o: &Map<String, Value>, k: &str| o.get(k).and_then(Value::as_str).map(str::to_string);
    let scope = s(obj, "team_id")
        .or_else(|| obj.get("team").and_then(Value::as_object).and_then(|t| s(t, "id")))
        .or_else(|| s(obj, "api_app_id"))
        .unwrap_or_else(|| app.name.clone());
    let empty = Map::new();
    let event = obj.get("event").and_then(Value::as_object).unwrap_or(&empty);
    // Edits carry the edited message in `message`, deletes the old one in `previous_message`;
    // reactions point at `item`.
    let inner = event.get("message").or_else(|| event.get("previous_message")).and_then(Value::as_object);
    let item = event.get("item").and_then(Value::as_object);
    let channel = s(event, "channel")
        .or_else(|| item.and_then(|i| s(i, "channel")))
        .or_else(|| s(obj, "channel_id"))
        .or_else(|| obj.get("channel").and_then(Value::as_object).and_then(|c| s(c, "id")))
        .unwrap_or_default();
    let thread = inner
        .and_then(|m| s(m, "thread_ts").or_else(|| s(m, "ts")))
        .or_else(|| s(event, "thread_ts"))
        .or_else(|| s(event, "ts"))
        .or_else(|| item.and_then(|i| s(i, "ts")));
    let conversation = match thread {
        Some(t) if !channel.is_empty() => format!("{channel}:{t}"),
        _ => channel,
    };
    let sender = s(event, "user")
        .or_else(|| inner.and_then(|m| s(m, "user")))
        .or_else(|| s(obj, "user_id"))
        .or_else(|| obj.get("user").and_then(Value::as_object).and_then(|u| s(u, "id")));
    let text = s(event, "text").or_else(|| inner.and_then(|m| s(m, "text"))).or_else(|| s(obj, "text"));
    let dedupe = s(obj, "event_id").or_else(|| s(obj, "trigger_id")).map(|id| format!("slack:{scope}:{id}"));
    let mut meta = meta;
    if let Some(kind) = s(event, "type").or_else(|| s(obj, "type")).or_else(|| s(obj, "command")) {
        meta.push(("kind".into(), kind));
    }
    if let Some(sub) = s(event, "subtype") {
        meta.push(("subtype".into(), sub));
    }
    Ok(EventData {
        agent: app.agent.clone(),
        channel: app.channel(),
        conversation,
        sender,
        dedupe_key: dedupe,
        received_at_ms: now,
        text,
        attachments: Vec::new(),
        content_type: "application/json".into(),
        raw: raw.as_bytes().to_vec(),
        meta,
    })
}

// ---- Socket Mode --------------------------------------------------------------------------

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// Why a socket could not be opened.
#[derive(Debug)]
enum OpenError {
    /// Slack refused the token; retrying soon will not help.
    Auth(String),
    /// Anything else; back off and retry.
    Other(String),
}

impl fmt::Display for OpenError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            OpenError::Auth(m) | OpenError::Other(m) => f.write_str(m),
        }
    }
}

#[derive(Deserialize)]
struct OpenAnswer {
    ok: bool,
    url: Option<String>,
    error: Option<String>,
}

/// `apps.connections.open`, then the WebSocket handshake to the URL it returned.
async fn open_socket(http: &reqwest::Client, app: &App) -> Result<Ws, OpenError> {
    let resp = http
        .post(format!("{}/apps.connections.open", app.api_base))
        .bearer_auth(&app.app_token)
        // Called once per socket lifetime (hours): pooling the HTTP connection would keep an
        // idle one per app, which with 1,000 apps costs more than the sockets themselves.
        .header(reqwest::header::CONNECTION, "close")
        .timeout(CALL_TIMEOUT)
        .send()
        .await
        .map_err(|e| OpenError::Other(format!("apps.connections.open: {}", e.without_url())))?;
    let status = resp.status();
    let body = http_util::read_response(resp, MAX_RESPONSE).await.map_err(OpenError::Other)?;
    let answer: OpenAnswer = serde_json::from_slice(&body)
        .map_err(|e| OpenError::Other(format!("apps.connections.open answered {status} without Slack's JSON: {e}")))?;
    let url = match answer {
        OpenAnswer { ok: true, url: Some(url), .. } => url,
        OpenAnswer { error, .. } => {
            let e = error.unwrap_or_else(|| "no url".into());
            let m = format!("apps.connections.open: {e}");
            return Err(if is_auth_error(&e) { OpenError::Auth(m) } else { OpenError::Other(m) });
        }
    };
    let connect =
        tokio_tungstenite::connect_async_with_config(url.as_str(), Some(http_util::ws_config(MAX_WS_MESSAGE)), true);
    match tokio::time::timeout(CALL_TIMEOUT, connect).await {
        Err(_) => Err(OpenError::Other("WebSocket handshake timed out".into())),
        Ok(Err(e)) => Err(OpenError::Other(format!("WebSocket handshake: {e}"))),
        Ok(Ok((ws, _))) => Ok(ws),
    }
}

/// Waits (bounded) for a new socket's first message, which Slack makes `hello`.
async fn await_hello(ws: &mut Ws) -> Result<(), String> {
    let first = tokio::time::timeout(CALL_TIMEOUT, async {
        loop {
            match ws.next().await {
                Some(Ok(Message::Text(t))) => return Ok(t),
                Some(Ok(Message::Close(_))) | None => return Err("closed before hello".to_string()),
                Some(Ok(_)) => continue,
                Some(Err(e)) => return Err(format!("read before hello: {e}")),
            }
        }
    })
    .await
    .map_err(|_| "no hello within the call timeout".to_string())??;
    match serde_json::from_str::<Value>(first.as_str()) {
        Ok(v) if v.get("type").and_then(Value::as_str) == Some("hello") => Ok(()),
        _ => Err("first message was not hello".to_string()),
    }
}

fn is_auth_error(e: &str) -> bool {
    matches!(e, "invalid_auth" | "not_authed" | "account_inactive" | "token_revoked" | "not_allowed_token_type")
}

struct Status {
    reporter: Arc<dyn ConnectionReporter>,
    name: String,
    last: Option<(&'static str, Option<String>)>,
}

impl Status {
    fn set(&mut self, state: &'static str, error: Option<String>) {
        let next = (state, error);
        if self.last.as_ref() != Some(&next) {
            self.reporter.state("slack", &self.name, next.0, next.1.as_deref());
            self.last = Some(next);
        }
    }
}

/// Starts the Socket Mode loop of `app`; it reports to `reporter` as `slack/<name>` and ends
/// when `shutdown` turns true or Slack disables the link.
pub fn spawn_socket(
    http: reqwest::Client,
    app: App,
    sink: Arc<dyn EventSink>,
    reporter: Arc<dyn ConnectionReporter>,
    shutdown: watch::Receiver<bool>,
) -> tokio::task::JoinHandle<()> {
    let mut status = Status { reporter, name: app.name.clone(), last: None };
    status.set("starting", None);
    tokio::spawn(socket_loop(http, app, sink, status, shutdown))
}

/// What ended one socket's read loop.
enum Ended {
    Shutdown,
    Disabled,
    Lost(String),
}

async fn socket_loop(
    http: reqwest::Client,
    app: App,
    sink: Arc<dyn EventSink>,
    mut status: Status,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut backoff = BACKOFF_INITIAL;
    tracing::info!(app = %app.name, agent = %app.agent, "slack socket mode started");
    loop {
        if *shutdown.borrow() {
            break;
        }
        status.set("connecting", None);
        let opened = tokio::select! {
            r = open_socket(&http, &app) => r,
            _ = shutdown.changed() => break,
        };
        let delay = match opened {
            Ok(ws) => match read_socket(&http, &app, ws, sink.as_ref(), &mut status, &mut shutdown, &mut backoff).await
            {
                Ended::Shutdown => break,
                Ended::Disabled => {
                    tracing::error!(app = %app.name, "slack disabled this Socket Mode link (link_disabled); not reconnecting");
                    status.set("disabled", Some("Slack sent disconnect: link_disabled".into()));
                    return;
                }
                Ended::Lost(e) => {
                    tracing::warn!(app = %app.name, error = %e, "slack socket lost; reconnecting");
                    status.set("backoff", Some(e));
                    next_backoff(&mut backoff)
                }
            },
            Err(OpenError::Auth(e)) => {
                tracing::error!(app = %app.name, error = %e, "slack rejects the app token; check [slack.{}].app_token", app.name);
                status.set("unauthorized", Some(e));
                UNAUTHORIZED_BACKOFF
            }
            Err(OpenError::Other(e)) => {
                tracing::warn!(app = %app.name, error = %e, "slack socket could not be opened");
                status.set("backoff", Some(e));
                next_backoff(&mut backoff)
            }
        };
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = shutdown.changed() => break,
        }
    }
    status.set("stopped", None);
    tracing::info!(app = %app.name, "slack socket mode stopped");
}

/// Returns the current delay and doubles it for next time, capped.
fn next_backoff(backoff: &mut Duration) -> Duration {
    let d = *backoff;
    *backoff = (*backoff * 2).min(BACKOFF_MAX);
    d
}

#[derive(Deserialize)]
struct Envelope<'a> {
    #[serde(rename = "type")]
    kind: String,
    envelope_id: Option<String>,
    #[serde(borrow)]
    payload: Option<&'a RawValue>,
    reason: Option<String>,
    retry_attempt: Option<u64>,
    retry_reason: Option<String>,
}

/// Reads envelopes one at a time, storing each before acking it, until the socket ends.
async fn read_socket(
    http: &reqwest::Client,
    app: &App,
    mut ws: Ws,
    sink: &dyn EventSink,
    status: &mut Status,
    shutdown: &mut watch::Receiver<bool>,
    backoff: &mut Duration,
) -> Ended {
    let mut pinged = false;
    loop {
        let msg = tokio::select! {
            m = tokio::time::timeout(IDLE_PING, ws.next()) => match m {
                Ok(m) => {
                    pinged = false;
                    m
                }
                // A socket that died silently (no FIN) would otherwise be waited on forever.
                Err(_) if pinged => return Ended::Lost(format!("no traffic from Slack for {}s", 2 * IDLE_PING.as_secs())),
                Err(_) => {
                    pinged = true;
                    if let Err(e) = ws.send(Message::Ping(Vec::new().into())).await {
                        return Ended::Lost(format!("ping could not be sent: {e}"));
                    }
                    continue;
                }
            },
            _ = shutdown.changed() => {
                let _ = ws.close(None).await;
                return Ended::Shutdown;
            }
        };
        let text = match msg {
            None => return Ended::Lost("socket closed".into()),
            Some(Err(e)) => return Ended::Lost(format!("socket error: {e}")),
            Some(Ok(Message::Text(t))) => t,
            Some(Ok(Message::Close(f))) => return Ended::Lost(format!("socket closed by Slack: {f:?}")),
            Some(Ok(_)) => continue,
        };
        let env: Envelope = match serde_json::from_str(text.as_str()) {
            Ok(e) => e,
            Err(e) => {
                tracing::warn!(app = %app.name, error = %e, "ignoring a Socket Mode message that is not an envelope");
                continue;
            }
        };
        match env.kind.as_str() {
            "hello" => {
                *backoff = BACKOFF_INITIAL;
                status.set("connected", None);
            }
            "disconnect" => match env.reason.as_deref() {
                Some("link_disabled") => {
                    let _ = ws.close(None).await;
                    return Ended::Disabled;
                }
                reason => {
                    // Open the replacement first: no gap in which events have nowhere to go.
                    tracing::info!(app = %app.name, reason = ?reason, "slack asks for a new socket; opening it before closing this one");
                    // "Open" means Slack said `hello` on it: only then does it deliver there.
                    match open_socket(http, app).await {
                        Ok(mut next) => {
                            if let Err(e) = await_hello(&mut next).await {
                                let _ = ws.close(None).await;
                                return Ended::Lost(format!("replacement socket: {e}"));
                            }
                            let _ = ws.close(None).await;
                            ws = next;
                        }
                        Err(e) => {
                            let _ = ws.close(None).await;
                            return Ended::Lost(format!("replacement socket could not be opened: {e}"));
                        }
                    }
                }
            },
            "events_api" | "interactive" | "slash_commands" => {
                let (Some(id), Some(payload)) = (env.envelope_id.as_deref(), env.payload) else {
                    tracing::warn!(app = %app.name, kind = %env.kind, "envelope without envelope_id or payload ignored");
                    continue;
                };
                let mut meta = vec![("envelope_type".to_string(), env.kind.clone())];
                if let Some(n) = env.retry_attempt {
                    meta.push(("retry_attempt".into(), n.to_string()));
                }
                if let Some(r) = env.retry_reason.as_ref().filter(|r| !r.is_empty()) {
                    meta.push(("retry_reason".into(), r.clone()));
                }
                match payload_event(app, payload.get(), meta, now_ms()) {
                    Ok(event) => {
                        if let Err(e) = sink.ingest(event).await {
                            // Not acked: Slack redelivers it; the dedupe key drops copies.
                            tracing::warn!(app = %app.name, error = %e, "slack envelope not stored; not acked, Slack will redeliver");
                            status.set("degraded", Some(e.to_string()));
                            continue;
                        }
                        status.set("connected", None);
                    }
                    // Unparseable payloads would be redelivered forever: ack and log them.
                    Err(e) => tracing::error!(app = %app.name, error = %e, "skipping a malformed slack payload"),
                }
                let ack = serde_json::json!({ "envelope_id": id }).to_string();
                if let Err(e) = ws.send(Message::text(ack)).await {
                    return Ended::Lost(format!("ack could not be sent: {e}"));
                }
            }
            other => tracing::debug!(app = %app.name, kind = %other, "ignoring Socket Mode message"),
        }
    }
}

// ---- Events API ---------------------------------------------------------------------------

struct Shared {
    apps: HashMap<String, App>,
    sink: Arc<dyn EventSink>,
    max_body: usize,
}

/// Serves `POST /slack/{name}` for Events API apps.
pub fn router(apps: Vec<App>, sink: Arc<dyn EventSink>, max_body: usize) -> Router {
    let apps = apps.into_iter().map(|a| (a.name.clone(), a)).collect();
    Router::new().route("/slack/{name}", post(events)).with_state(Arc::new(Shared { apps, sink, max_body }))
}

/// Checks a v0 signature over `v0:{ts}:{body}` and the 5-minute window around `now_secs`.
pub fn verify_signature(secret: &[u8], headers: &HeaderMap, body: &[u8], now_secs: u64) -> Result<(), &'static str> {
    let h = |n: &str| headers.get(n).and_then(|v| v.to_str().ok()).map(str::trim);
    let ts = h(TIMESTAMP_HEADER).ok_or("missing X-Slack-Request-Timestamp")?;
    let ts_n: u64 = ts.parse().map_err(|_| "X-Slack-Request-Timestamp is not a number")?;
    if ts_n.abs_diff(now_secs) > SIGNATURE_WINDOW_SECS {
        return Err("X-Slack-Request-Timestamp is outside the 5-minute window");
    }
    let given =
        h(SIGNATURE_HEADER).and_then(|s| s.strip_prefix("v0=")).ok_or("missing or malformed X-Slack-Signature")?;
    let given = hex::decode(given).map_err(|_| "X-Slack-Signature is not hex")?;
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).map_err(|_| "bad signing secret")?;
    mac.update(b"v0:");
    mac.update(ts.as_bytes());
    mac.update(b":");
    mac.update(body);
    mac.verify_slice(&given).map_err(|_| "X-Slack-Signature does not match")
}

/// `v0=<hex>` for `body` at `ts`: what Slack sends (used by fakes and tests).
pub fn sign(secret: &[u8], ts: u64, body: &[u8]) -> String {
    let mut mac = match Hmac::<Sha256>::new_from_slice(secret) {
        Ok(m) => m,
        Err(_) => return String::new(),
    };
    mac.update(format!("v0:{ts}:").as_bytes());
    mac.update(body);
    format!("v0={}", hex::encode(mac.finalize().into_bytes()))
}

fn now_secs() -> u64 {
    now_ms() / 1000
}

async fn events(
    State(shared): State<Arc<Shared>>,
    Path(name): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let Some(app) = shared.apps.get(&name) else {
        return http_util::error(
            StatusCode::NOT_FOUND,
            format!("unknown slack app '{}'", http_util::echo(&name)),
            None,
        );
    };
    let body = match http_util::read_request_body(body, &headers, shared.max_body).await {
        Ok(b) => b,
        Err(r) => return r,
    };
    if let Err(e) = verify_signature(&app.signing_secret, &headers, &body, now_secs()) {
        return http_util::error(StatusCode::UNAUTHORIZED, e, None);
    }
    let Ok(text) = std::str::from_utf8(&body) else {
        return http_util::error(StatusCode::BAD_REQUEST, "body is not UTF-8", None);
    };
    let is_form = headers
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/x-www-form-urlencoded"));
    if is_form {
        return form(&shared, app, &headers, text).await;
    }
    let v: Value = match serde_json::from_str(text) {
        Ok(v) => v,
        Err(_) => return http_util::error(StatusCode::BAD_REQUEST, "body is neither JSON nor a form", None),
    };
    match v.get("type").and_then(Value::as_str) {
        Some("url_verification") => {
            let challenge = v.get("challenge").and_then(Value::as_str).unwrap_or_default().to_string();
            let mut r = challenge.into_response();
            r.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("text/plain"));
            r
        }
        Some("event_callback") => {
            let event = match payload_event(app, text, retry_meta(&headers, "events_http"), now_ms()) {
                Ok(e) => e,
                Err(e) => return http_util::error(StatusCode::BAD_REQUEST, e, None),
            };
            match shared.sink.ingest(event).await {
                Ok(_) => StatusCode::OK.into_response(),
                Err(e) => http_util::sink_error(&e),
            }
        }
        _ => StatusCode::OK.into_response(),
    }
}

/// `X-Slack-Retry-Num`/`-Reason` as event meta.
fn retry_meta(headers: &HeaderMap, envelope_type: &str) -> Vec<(String, String)> {
    let mut meta = vec![("envelope_type".to_string(), envelope_type.to_string())];
    for (header, key) in [("x-slack-retry-num", "retry_attempt"), ("x-slack-retry-reason", "retry_reason")] {
        if let Some(v) = headers.get(header).and_then(|v| v.to_str().ok()) {
            meta.push((key.into(), http_util::echo(v)));
        }
    }
    meta
}

/// A form-encoded request: an interactive payload (`payload=<JSON>`) or a slash command
/// (`command`, `text`, `channel_id`, ...). The body is kept as sent; 200 only after the write.
async fn form(shared: &Shared, app: &App, headers: &HeaderMap, body: &str) -> Response {
    let Ok(fields) = serde_urlencoded::from_str::<Vec<(String, String)>>(body) else {
        return http_util::error(StatusCode::BAD_REQUEST, "malformed form body", None);
    };
    let (json, kind) = match fields.iter().find(|(k, _)| k == "payload") {
        Some((_, payload)) => (payload.clone(), "interactive"),
        None => {
            let map: Map<String, Value> = fields.into_iter().map(|(k, v)| (k, Value::String(v))).collect();
            (Value::Object(map).to_string(), "slash_commands")
        }
    };
    let mut event = match payload_event(app, &json, retry_meta(headers, kind), now_ms()) {
        Ok(e) => e,
        Err(e) => return http_util::error(StatusCode::BAD_REQUEST, e, None),
    };
    event.raw = body.as_bytes().to_vec();
    event.content_type = "application/x-www-form-urlencoded".into();
    match shared.sink.ingest(event).await {
        Ok(_) => StatusCode::OK.into_response(),
        Err(e) => http_util::sink_error(&e),
    }
}

// ---- sends --------------------------------------------------------------------------------

/// Pacing of one app's sends (see the module comment).
#[derive(Clone, Copy, Debug)]
pub struct Pacing {
    /// Least time between two `chat.postMessage` calls to one channel (zero: order only).
    pub chat_interval: Duration,
    /// Most Web API calls per second for the whole app.
    pub app_rate: u32,
}

impl Default for Pacing {
    fn default() -> Self {
        Pacing { chat_interval: DEFAULT_CHAT_INTERVAL, app_rate: APP_RATE }
    }
}

/// Performs an agent's sends through one Slack app's bot token, queued and paced per channel.
pub struct SlackSender {
    http: reqwest::Client,
    api_base: String,
    bot_token: String,
    pacer: Pacer,
}

impl SlackSender {
    /// A sender for `app` sharing the proxy's HTTP client.
    pub fn new(http: reqwest::Client, app: &App, pacing: Pacing) -> Self {
        let limits = pacing::Limits {
            key_interval: pacing.chat_interval,
            call_interval: Some(pacing::per_second(pacing.app_rate)),
            max_queued: MAX_QUEUED_SENDS,
            max_keys: MAX_CHANNEL_ENTRIES,
        };
        SlackSender {
            http,
            api_base: app.api_base.clone(),
            bot_token: app.bot_token.clone(),
            pacer: Pacer::new(limits),
        }
    }

    /// Calls `method` in its channel's turn, waiting out 429s inside the turn.
    async fn call(&self, method: &str, args: &Map<String, Value>, turn: &Turn<'_>) -> SendResult {
        let url = format!("{}/{method}", self.api_base);
        for _ in 0..=MAX_RATE_RETRIES {
            turn.call_slot().await;
            let sent = self.http.post(&url).bearer_auth(&self.bot_token).json(args).timeout(CALL_TIMEOUT).send().await;
            let resp = match sent {
                Ok(r) => r,
                Err(e) if e.is_connect() => {
                    return err("unavailable", format!("Slack unreachable: {}", e.without_url()), true);
                }
                Err(e) => return err("unknown_outcome", format!("Slack call failed: {}", e.without_url()), false),
            };
            if resp.status() == StatusCode::TOO_MANY_REQUESTS {
                let wait = resp
                    .headers()
                    .get("retry-after")
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.trim().parse::<u64>().ok())
                    .map_or(Duration::from_secs(1), Duration::from_secs);
                if wait > MAX_RETRY_AFTER {
                    return err("rate_limited", format!("Slack asks to wait {}s", wait.as_secs()), true);
                }
                tracing::debug!(method = %method, wait_s = wait.as_secs(), "slack 429; waiting");
                tokio::time::sleep(wait).await;
                continue;
            }
            let status = resp.status();
            let body = match http_util::read_response(resp, MAX_RESPONSE).await {
                Ok(b) => b,
                Err(e) => return err("unknown_outcome", e, false),
            };
            return answer(status, &body);
        }
        err("rate_limited", format!("Slack kept answering 429 after {MAX_RATE_RETRIES} waits"), true)
    }
}

fn err(code: &str, message: impl Into<String>, retryable: bool) -> SendResult {
    SendResult::Err { code: code.into(), message: message.into(), retryable }
}

/// Builds `(method, arguments)` from the agent's body and the conversation.
pub fn build_call(conversation: &str, body: &str) -> Result<(String, Map<String, Value>), SendResult> {
    let (channel, thread) = match conversation.split_once(':') {
        Some((c, t)) => (c, Some(t).filter(|t| !t.is_empty())),
        None => (conversation, None),
    };
    let structured = body.trim_start().starts_with('{');
    let (method, mut args) = if structured {
        let Ok(Value::Object(mut args)) = serde_json::from_str::<Value>(body) else {
            return Err(err("bad_request", "body starts with '{' but is not a JSON object", false));
        };
        let method = match args.remove("method") {
            Some(Value::String(m)) => m,
            _ => return Err(err("bad_request", "a JSON body needs \"method\"", false)),
        };
        if !SEND_METHODS.contains(&method.as_str()) {
            return Err(err("bad_request", format!("method must be one of {}", SEND_METHODS.join(", ")), false));
        }
        (method, args)
    } else {
        let mut args = Map::new();
        args.insert("text".into(), Value::String(body.to_string()));
        ("chat.postMessage".to_string(), args)
    };
    if !args.contains_key("channel") {
        if channel.is_empty() {
            return Err(err("bad_request", "no channel: the conversation is empty and the body names none", false));
        }
        args.insert("channel".into(), Value::String(channel.to_string()));
    }
    if let Some(t) = thread.filter(|_| method == "chat.postMessage" && !args.contains_key("thread_ts")) {
        args.insert("thread_ts".into(), Value::String(t.to_string()));
    }
    Ok((method, args))
}

#[async_trait::async_trait]
impl ChannelSender for SlackSender {
    async fn send(&self, _agent: &str, request: &SendRequest) -> SendResult {
        let (method, args) = match build_call(&request.conversation, &request.body) {
            Ok(c) => c,
            Err(e) => return e,
        };
        // One queue per channel; only messages are spaced, reactions and edits keep their place.
        let channel = match args.get("channel") {
            Some(Value::String(c)) => c.clone(),
            Some(other) => other.to_string(),
            None => String::new(),
        };
        let Ok(turn) = self.pacer.turn(&channel, method == "chat.postMessage").await else {
            return err(
                "queue_full",
                format!("more than {MAX_QUEUED_SENDS} sends are queued for this Slack app; nothing sent"),
                true,
            );
        };
        let result = self.call(&method, &args, &turn).await;
        turn.sent();
        result
    }
}

/// Maps a Web API answer to a `SendResult`.
fn answer(status: StatusCode, body: &[u8]) -> SendResult {
    let Ok(v) = serde_json::from_slice::<Value>(body) else {
        return err("platform_error", format!("Slack answered {status} without JSON"), !status.is_server_error());
    };
    if v.get("ok").and_then(Value::as_bool) == Some(true) {
        let ids = v.get("ts").and_then(Value::as_str).map(|t| vec![t.to_string()]).unwrap_or_default();
        return SendResult::Ok { platform_ids: ids };
    }
    let e = v.get("error").and_then(Value::as_str).unwrap_or("unknown_error");
    match e {
        "channel_not_found" => {
            err("channel_not_found", "Slack: channel_not_found (wrong id, or the bot cannot see it)", false)
        }
        "not_in_channel" => err("not_in_channel", "Slack: not_in_channel (invite the bot to the channel)", false),
        "ratelimited" => err("rate_limited", "Slack: ratelimited", true),
        e if is_auth_error(e) => err("unauthorized", format!("Slack rejects the bot token: {e}"), false),
        e => err("platform_error", format!("Slack error: {}", http_util::echo(e)), false),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn app() -> App {
        App {
            name: "w".into(),
            agent: "a".into(),
            app_token: String::new(),
            bot_token: String::new(),
            signing_secret: b"s3cret".to_vec(),
            api_base: String::new(),
        }
    }

    #[test]
    fn signature_window_and_match() {
        let body = br#"{"type":"event_callback"}"#;
        let now = 1_700_000_000;
        let mut h = HeaderMap::new();
        h.insert(TIMESTAMP_HEADER, HeaderValue::from(now));
        h.insert(SIGNATURE_HEADER, HeaderValue::from_str(&sign(b"s3cret", now, body)).unwrap());
        assert!(verify_signature(b"s3cret", &h, body, now + 10).is_ok());
        assert!(verify_signature(b"other", &h, body, now).is_err());
        assert!(verify_signature(b"s3cret", &h, b"{}", now).is_err());
        assert!(verify_signature(b"s3cret", &h, body, now + 301).is_err());
    }

    #[test]
    fn conversations_follow_threads() {
        let root = r#"{"team_id":"T1","event_id":"Ev1","event":{"type":"message","channel":"C1","ts":"1.1","user":"U1","text":"hi"}}"#;
        let e = payload_event(&app(), root, vec![], 0).unwrap();
        assert_eq!((e.conversation.as_str(), e.dedupe_key.as_deref()), ("C1:1.1", Some("slack:T1:Ev1")));
        let reply = r#"{"team_id":"T1","event_id":"Ev2","event":{"type":"message","channel":"C1","ts":"1.5","thread_ts":"1.1"}}"#;
        assert_eq!(payload_event(&app(), reply, vec![], 0).unwrap().conversation, "C1:1.1");
        let (m, args) = build_call("C1:1.1", "hello").unwrap();
        assert_eq!((m.as_str(), args["thread_ts"].as_str()), ("chat.postMessage", Some("1.1")));
        let (m, args) = build_call("C1:1.1", r#"{"method":"reactions.add","name":"eyes","timestamp":"1.1"}"#).unwrap();
        assert_eq!((m.as_str(), args.get("thread_ts"), args["channel"].as_str()), ("reactions.add", None, Some("C1")));
        assert!(build_call("C1", r#"{"method":"apps.uninstall"}"#).is_err());
    }

    #[test]
    fn errors_map_with_retryability() {
        let code = |b: &str| match answer(StatusCode::OK, b.as_bytes()) {
            SendResult::Err { code, retryable, .. } => (code, retryable),
            SendResult::Ok { .. } => ("ok".into(), false),
        };
        assert_eq!(code(r#"{"ok":false,"error":"channel_not_found"}"#), ("channel_not_found".into(), false));
        assert_eq!(code(r#"{"ok":false,"error":"not_in_channel"}"#), ("not_in_channel".into(), false));
        assert_eq!(code(r#"{"ok":false,"error":"invalid_auth"}"#), ("unauthorized".into(), false));
        assert_eq!(code(r#"{"ok":false,"error":"ratelimited"}"#), ("rate_limited".into(), true));
    }
}
