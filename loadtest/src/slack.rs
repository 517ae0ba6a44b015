//! A fake of Slack, written from Slack's documentation (api.slack.com/apis/socket-mode,
//! api.slack.com/apis/events-api, api.slack.com/authentication/verifying-requests-from-slack,
//! api.slack.com/docs/rate-limits), not from our adapter, and recording what Slack would
//! consider acknowledged.
//!
//! What it models:
//! - `POST /api/apps.connections.open` with `Authorization: Bearer xapp-...`: `{"ok": true,
//!   "url": "ws://.../link?app=..."}` pointing at the fake's own WebSocket server, or
//!   `{"ok": false, "error": "invalid_auth"}` for an unknown token.
//! - Socket Mode: each new socket first receives `{"type": "hello", ...}`. Queued events go
//!   out as `{"type": "events_api", "envelope_id", "payload": {"team_id", "api_app_id",
//!   "event", "event_id", "type": "event_callback", ...}, "accepts_response_payload": false,
//!   "retry_attempt", "retry_reason"}`, spread round-robin over the app's open sockets (as
//!   Slack does). An envelope counts as acknowledged only when `{"envelope_id": ...}` comes
//!   back ([`FakeSlack::acked`]); otherwise it is redelivered after [`Options::redeliver_after`]
//!   (3 s, as Slack) with `retry_attempt` + 1 and `retry_reason: "timeout"`, at most
//!   [`Options::max_attempts`] times. [`FakeSlack::disconnect`] sends `{"type": "disconnect",
//!   "reason": "refresh_requested"}` (or another reason) and closes those sockets after
//!   [`Options::disconnect_grace`] unless the client closed them first.
//! - Events API ([`FakeSlack::deliver_http`]): POSTs the `event_callback` body signed with
//!   `X-Slack-Signature: v0=hex(HMAC-SHA256(secret, "v0:{ts}:{body}"))` and
//!   `X-Slack-Request-Timestamp`, retrying non-2xx answers with `X-Slack-Retry-Num` and
//!   `X-Slack-Retry-Reason: http_error` (Slack retries three times).
//! - Web API `chat.postMessage`, `chat.update`, `reactions.add` with `Authorization: Bearer
//!   xoxb-...`: recorded in [`FakeSlack::calls`]; channels registered with
//!   [`FakeSlack::forbid_channel`] answer `channel_not_found` / `not_in_channel`. With
//!   [`Options::rate`] set, calls beyond it get HTTP 429 with `Retry-After` and are not
//!   recorded as calls (nothing was posted), only in [`FakeSlack::throttled`] with their
//!   arrival instant, so tests can check what a client did after a 429.

#![warn(missing_docs)]

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use futures::{SinkExt as _, StreamExt as _};
use hmac::{Hmac, Mac};
use serde_json::{Map, Value, json};
use sha2::Sha256;
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

/// Web API rate limit: at most `calls` per `window`, then 429 with `Retry-After: retry_after`.
#[derive(Clone, Copy, Debug)]
pub struct Rate {
    /// Calls allowed within `window`.
    pub calls: u32,
    /// The sliding window.
    pub window: Duration,
    /// Seconds given in `Retry-After`.
    pub retry_after: u64,
}

/// Behaviour knobs of the fake.
#[derive(Clone, Debug)]
pub struct Options {
    /// Unacked envelopes are redelivered after this long (Slack: 3 s).
    pub redeliver_after: Duration,
    /// Deliveries of one envelope before Slack gives up on it.
    pub max_attempts: u32,
    /// After a `disconnect`, how long the fake keeps the old socket open.
    pub disconnect_grace: Duration,
    /// Web API rate limit; `None` = unlimited.
    pub rate: Option<Rate>,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            redeliver_after: Duration::from_secs(3),
            max_attempts: 4,
            disconnect_grace: Duration::from_secs(10),
            rate: None,
        }
    }
}

/// One recorded Web API call that changed something.
#[derive(Clone, Debug)]
pub struct Call {
    /// `chat.postMessage`, `chat.update` or `reactions.add`.
    pub method: String,
    /// Arguments as posted.
    pub args: Map<String, Value>,
    /// When the fake accepted it (for [`FakeSlack::throttled`]: when it answered 429).
    pub at: Instant,
}

struct Pending {
    app: String,
    event_id: String,
    payload: Value,
    attempts: u32,
    next_at: Instant,
}

#[derive(Default)]
struct State_ {
    /// app token -> app id.
    apps: HashMap<String, String>,
    bot_tokens: HashSet<String>,
    /// Open sockets: (id, app id, outbound queue).
    sockets: Vec<(u64, String, mpsc::UnboundedSender<Message>)>,
    pending: HashMap<String, Pending>,
    /// event ids acked, in ack order (an event acked twice appears twice).
    acked: Vec<String>,
    /// Envelopes sent (first deliveries and redeliveries).
    sent: u64,
    /// Envelopes given up after `max_attempts`.
    abandoned: Vec<String>,
    calls: Vec<Call>,
    /// Calls answered 429, with their arguments and arrival instant.
    throttled: Vec<Call>,
    rate_window: Vec<Instant>,
    rate_limited: u64,
    forbidden: HashMap<String, &'static str>,
    round_robin: usize,
    connections_opened: u64,
    /// Most sockets open at once, per app id.
    peak: HashMap<String, usize>,
}

struct Inner {
    state: Mutex<State_>,
    options: Options,
    seq: AtomicU64,
    ws_addr: String,
}

/// A running fake Slack (Web API + Socket Mode server) on loopback ports.
#[derive(Clone)]
pub struct FakeSlack {
    inner: Arc<Inner>,
    /// Base URL to configure as `api_base` (`http://127.0.0.1:PORT/api`).
    pub api_base: String,
}

impl FakeSlack {
    /// Starts the fake on free loopback ports.
    pub async fn start(options: Options) -> anyhow::Result<FakeSlack> {
        let ws_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let ws_addr = ws_listener.local_addr()?.to_string();
        let inner = Arc::new(Inner { state: Mutex::default(), options, seq: AtomicU64::new(1), ws_addr });
        let app = Router::new().route("/api/{method}", post(web_api)).with_state(inner.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let api_base = format!("http://{}/api", listener.local_addr()?);
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        tokio::spawn(accept_sockets(ws_listener, inner.clone()));
        tokio::spawn(redeliver(Arc::downgrade(&inner)));
        Ok(FakeSlack { inner, api_base })
    }

    fn state(&self) -> MutexGuard<'_, State_> {
        lock(&self.inner)
    }

    /// Registers an app: its app-level token (`xapp-...`), bot token (`xoxb-...`) and app id.
    pub fn add_app(&self, app_token: &str, bot_token: &str, app_id: &str) {
        let mut s = self.state();
        s.apps.insert(app_token.to_string(), app_id.to_string());
        s.bot_tokens.insert(bot_token.to_string());
    }

    /// Queues an `event_callback` for `app_id` whose `event` is `event`; returns its `event_id`.
    pub fn push_event(&self, app_id: &str, event: Value) -> String {
        let n = self.inner.seq.fetch_add(1, Ordering::Relaxed);
        let event_id = format!("Ev{n:010}");
        let payload = event_callback(app_id, &event_id, event, n);
        lock(&self.inner).pending.insert(
            format!("env-{n}"),
            Pending {
                app: app_id.to_string(),
                event_id: event_id.clone(),
                payload,
                attempts: 0,
                next_at: Instant::now(),
            },
        );
        event_id
    }

    /// Queues a channel message `text` in `channel` (optionally in `thread_ts`); returns its `event_id`.
    pub fn push_message(&self, app_id: &str, channel: &str, thread_ts: Option<&str>, text: &str) -> String {
        let n = self.inner.seq.fetch_add(1, Ordering::Relaxed);
        let mut event = json!({"type": "message", "channel": channel, "user": "U0USER", "text": text,
            "ts": format!("1700000000.{n:06}"), "channel_type": "channel"});
        if let (Some(t), Some(obj)) = (thread_ts, event.as_object_mut()) {
            obj.insert("thread_ts".into(), Value::String(t.to_string()));
        }
        self.push_event(app_id, event)
    }

    /// Event ids Slack considers acknowledged, in ack order (repeated if acked twice).
    pub fn acked(&self) -> Vec<String> {
        self.state().acked.clone()
    }

    /// Envelopes not yet acknowledged.
    pub fn unacked(&self) -> usize {
        self.state().pending.len()
    }

    /// Envelope deliveries made (including redeliveries).
    pub fn envelopes_sent(&self) -> u64 {
        self.state().sent
    }

    /// Event ids Slack gave up on after `max_attempts` unacked deliveries.
    pub fn abandoned(&self) -> Vec<String> {
        self.state().abandoned.clone()
    }

    /// Sockets currently open for `app_id`.
    pub fn open_sockets(&self, app_id: &str) -> usize {
        self.state().sockets.iter().filter(|(_, a, tx)| a == app_id && !tx.is_closed()).count()
    }

    /// Sockets currently open, all apps together.
    pub fn open_sockets_total(&self) -> usize {
        self.state().sockets.iter().filter(|(_, _, tx)| !tx.is_closed()).count()
    }

    /// Most sockets `app_id` had open at the same time (2 during a gapless refresh).
    pub fn peak_sockets(&self, app_id: &str) -> usize {
        self.state().peak.get(app_id).copied().unwrap_or(0)
    }

    /// Successful `apps.connections.open` calls.
    pub fn connections_opened(&self) -> u64 {
        self.state().connections_opened
    }

    /// Sends `disconnect` with `reason` to every socket of `app_id`, closing them after the grace.
    pub fn disconnect(&self, app_id: &str, reason: &str) {
        let msg = json!({"type": "disconnect", "reason": reason, "debug_info": {"host": "fake-slack"}}).to_string();
        let targets: Vec<_> =
            self.state().sockets.iter().filter(|(_, a, _)| a == app_id).map(|(_, _, tx)| tx.clone()).collect();
        let grace = self.inner.options.disconnect_grace;
        for tx in targets {
            let _ = tx.send(Message::text(msg.clone()));
            tokio::spawn(async move {
                tokio::time::sleep(grace).await;
                let _ = tx.send(Message::Close(None));
            });
        }
    }

    /// Makes Web API calls to `channel` fail with `error` (`channel_not_found`, `not_in_channel`).
    pub fn forbid_channel(&self, channel: &str, error: &'static str) {
        self.state().forbidden.insert(channel.to_string(), error);
    }

    /// Accepted Web API calls, in order.
    pub fn calls(&self) -> Vec<Call> {
        self.state().calls.clone()
    }

    /// Web API calls answered 429.
    pub fn rate_limited(&self) -> u64 {
        self.state().rate_limited
    }

    /// The Web API calls answered 429 (nothing posted), in arrival order; `at` is the arrival.
    pub fn throttled(&self) -> Vec<Call> {
        self.state().throttled.clone()
    }

    /// Delivers one `event_callback` over the Events API to `url`, signed with `secret`;
    /// retries non-2xx answers up to three times. Returns every attempt's HTTP status (0 = no answer).
    pub async fn deliver_http(&self, url: &str, secret: &[u8], app_id: &str, event: Value) -> Vec<u16> {
        let n = self.inner.seq.fetch_add(1, Ordering::Relaxed);
        let body = event_callback(app_id, &format!("Ev{n:010}"), event, n).to_string();
        let ts = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
        post_signed(url, secret, ts, body.as_bytes(), 3).await
    }
}

/// POSTs `body` signed with `secret` at time `ts`, with up to `retries` retries on non-2xx.
pub async fn post_signed(url: &str, secret: &[u8], ts: u64, body: &[u8], retries: u32) -> Vec<u16> {
    let client = reqwest::Client::new();
    let mut statuses = Vec::new();
    for attempt in 0..=retries {
        let mut req = client
            .post(url)
            .header("content-type", "application/json")
            .header("x-slack-request-timestamp", ts.to_string())
            .header("x-slack-signature", signature(secret, ts, body))
            .body(body.to_vec());
        if attempt > 0 {
            req = req.header("x-slack-retry-num", attempt.to_string()).header("x-slack-retry-reason", "http_error");
        }
        let status = req.send().await.map_or(0, |r| r.status().as_u16());
        statuses.push(status);
        if (200..300).contains(&status) {
            break;
        }
    }
    statuses
}

/// Slack's v0 request signature: `v0=hex(HMAC-SHA256(secret, "v0:{ts}:{body}"))`.
pub fn signature(secret: &[u8], ts: u64, body: &[u8]) -> String {
    let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(secret) else { return String::new() };
    mac.update(format!("v0:{ts}:").as_bytes());
    mac.update(body);
    format!("v0={}", hex::encode(mac.finalize().into_bytes()))
}

fn event_callback(app_id: &str, event_id: &str, event: Value, n: u64) -> Value {
    json!({
        "token": "verification-token-unused",
        "team_id": "T0FAKE",
        "api_app_id": app_id,
        "event": event,
        "type": "event_callback",
        "event_id": event_id,
        "event_time": 1_700_000_000 + n,
        "authorizations": [{"team_id": "T0FAKE", "user_id": "U0BOT", "is_bot": true}],
        "is_ext_shared_channel": false,
    })
}

fn lock(inner: &Inner) -> MutexGuard<'_, State_> {
    inner.state.lock().unwrap_or_else(|e| e.into_inner())
}

fn ws_config() -> WebSocketConfig {
    WebSocketConfig::default().read_buffer_size(4096).write_buffer_size(4096)
}

// tungstenite's handshake callback type fixes the large `Err` (an HTTP error response).
#[allow(clippy::result_large_err)]
async fn accept_sockets(listener: tokio::net::TcpListener, inner: Arc<Inner>) {
    while let Ok((tcp, _)) = listener.accept().await {
        let inner = inner.clone();
        tokio::spawn(async move {
            let mut app_id = String::new();
            let callback = |req: &tokio_tungstenite::tungstenite::handshake::server::Request, resp| {
                app_id = req.uri().query().and_then(|q| q.strip_prefix("app=")).unwrap_or_default().to_string();
                Ok(resp)
            };
            let Ok(ws) = tokio_tungstenite::accept_hdr_async_with_config(tcp, callback, Some(ws_config())).await else {
                return;
            };
            serve_socket(ws, app_id, inner).await;
        });
    }
}

async fn serve_socket(
    ws: tokio_tungstenite::WebSocketStream<tokio::net::TcpStream>,
    app_id: String,
    inner: Arc<Inner>,
) {
    let (mut write, mut read) = ws.split();
    let (tx, mut rx) = mpsc::unbounded_channel::<Message>();
    let id = inner.seq.fetch_add(1, Ordering::Relaxed);
    let hello = json!({"type": "hello", "num_connections": 1, "connection_info": {"app_id": app_id},
        "debug_info": {"host": "fake-slack", "approximate_connection_time": 18060}});
    let _ = tx.send(Message::text(hello.to_string()));
    {
        let mut s = lock(&inner);
        s.sockets.push((id, app_id.clone(), tx));
        let open = s.sockets.iter().filter(|(_, a, t)| *a == app_id && !t.is_closed()).count();
        let peak = s.peak.entry(app_id).or_default();
        *peak = (*peak).max(open);
    }
    let writer = tokio::spawn(async move {
        while let Some(m) = rx.recv().await {
            let close = matches!(m, Message::Close(_));
            if write.send(m).await.is_err() || close {
                break;
            }
        }
    });
    while let Some(Ok(msg)) = read.next().await {
        let Message::Text(t) = msg else {
            if matches!(msg, Message::Close(_)) {
                break;
            }
            continue;
        };
        let Ok(v) = serde_json::from_str::<Value>(t.as_str()) else { continue };
        if let Some(env) = v.get("envelope_id").and_then(Value::as_str) {
            let mut s = lock(&inner);
            if let Some(p) = s.pending.remove(env) {
                s.acked.push(p.event_id);
            }
        }
    }
    lock(&inner).sockets.retain(|(sid, _, _)| *sid != id);
    writer.abort();
}

/// Sends due envelopes every 50 ms until the fake is dropped.
async fn redeliver(inner: std::sync::Weak<Inner>) {
    loop {
        tokio::time::sleep(Duration::from_millis(20)).await;
        let Some(inner) = inner.upgrade() else { return };
        let now = Instant::now();
        let mut s = lock(&inner);
        let mut due: Vec<String> = s.pending.iter().filter(|(_, p)| p.next_at <= now).map(|(k, _)| k.clone()).collect();
        due.sort_by_key(|k| k.trim_start_matches("env-").parse::<u64>().unwrap_or(0));
        for env in due {
            let Some(app) = s.pending.get(&env).map(|p| p.app.clone()) else { continue };
            let live: Vec<mpsc::UnboundedSender<Message>> =
                s.sockets.iter().filter(|(_, a, tx)| *a == app && !tx.is_closed()).map(|(_, _, t)| t.clone()).collect();
            if live.is_empty() {
                continue;
            }
            s.round_robin = s.round_robin.wrapping_add(1);
            let tx = live[s.round_robin % live.len()].clone();
            let max = inner.options.max_attempts;
            let Some(p) = s.pending.get_mut(&env) else { continue };
            if p.attempts >= max {
                if let Some(p) = s.pending.remove(&env) {
                    s.abandoned.push(p.event_id);
                }
                continue;
            }
            let msg = json!({"envelope_id": env, "type": "events_api", "payload": p.payload,
                "accepts_response_payload": false, "retry_attempt": p.attempts,
                "retry_reason": if p.attempts == 0 { "" } else { "timeout" }});
            p.attempts += 1;
            p.next_at = now + inner.options.redeliver_after;
            s.sent += 1;
            let _ = tx.send(Message::text(msg.to_string()));
        }
    }
}

async fn web_api(
    State(inner): State<Arc<Inner>>,
    Path(method): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let token = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or_default()
        .to_string();
    let mut s = lock(&inner);
    if method == "apps.connections.open" {
        let Some(app_id) = s.apps.get(&token).cloned() else {
            return axum::Json(json!({"ok": false, "error": "invalid_auth"})).into_response();
        };
        s.connections_opened += 1;
        let url = format!("ws://{}/link?app={app_id}", inner.ws_addr);
        return axum::Json(json!({"ok": true, "url": url})).into_response();
    }
    if !["chat.postMessage", "chat.update", "reactions.add"].contains(&method.as_str()) {
        return axum::Json(json!({"ok": false, "error": "unknown_method"})).into_response();
    }
    if !s.bot_tokens.contains(&token) {
        return axum::Json(json!({"ok": false, "error": if token.is_empty() { "not_authed" } else { "invalid_auth" }}))
            .into_response();
    }
    if let Some(rate) = inner.options.rate {
        let now = Instant::now();
        s.rate_window.retain(|t| now.duration_since(*t) < rate.window);
        if s.rate_window.len() >= rate.calls as usize {
            s.rate_limited += 1;
            let args = serde_json::from_slice::<Map<String, Value>>(&body).unwrap_or_default();
            s.throttled.push(Call { method: method.clone(), args, at: now });
            return (StatusCode::TOO_MANY_REQUESTS, [("retry-after", rate.retry_after.to_string())]).into_response();
        }
        s.rate_window.push(now);
    }
    let Ok(Value::Object(args)) = serde_json::from_slice::<Value>(&body) else {
        return axum::Json(json!({"ok": false, "error": "invalid_json"})).into_response();
    };
    let channel = args.get("channel").and_then(Value::as_str).unwrap_or_default().to_string();
    if channel.is_empty() {
        return axum::Json(json!({"ok": false, "error": "channel_not_found"})).into_response();
    }
    if let Some(e) = s.forbidden.get(&channel) {
        return axum::Json(json!({"ok": false, "error": e})).into_response();
    }
    let n = inner.seq.fetch_add(1, Ordering::Relaxed);
    let ts = match method.as_str() {
        "chat.update" => args.get("ts").and_then(Value::as_str).unwrap_or_default().to_string(),
        _ => format!("1800000000.{n:06}"),
    };
    s.calls.push(Call { method: method.clone(), args, at: Instant::now() });
    if method == "reactions.add" {
        return axum::Json(json!({"ok": true})).into_response();
    }
    axum::Json(json!({"ok": true, "channel": channel, "ts": ts})).into_response()
}
