//! A fake Discord gateway and REST API, written from Discord's documentation
//! (discord.com/developers/docs/topics/gateway, .../opcodes-and-status-codes, .../rate-limits,
//! .../resources/message), not from our adapter, for one bot token.
//!
//! Gateway (`ws://<addr>/?v=10&encoding=json`):
//! - On connect: op 10 Hello `{"heartbeat_interval": ms}`.
//! - op 2 Identify with the right token starts a new session and dispatches READY (`s` = 1)
//!   with `session_id` and `resume_gateway_url`; a wrong token closes with 4004.
//! - op 6 Resume with a known session replays every dispatch after the given `seq`, then
//!   RESUMED; an unknown or invalidated session gets op 9 `false`.
//! - op 1 Heartbeat is answered with op 11 ACK (unless [`FakeDiscord::set_zombie`]); the
//!   heartbeat's sequence is recorded as what Discord knows the client has seen.
//! - [`FakeDiscord::dispatch`] appends an op 0 dispatch with the next sequence number to the
//!   session's log; it is sent to the live connection, or replayed on Resume. Discord does not
//!   queue events for a bot without a session: dispatches with no session are dropped.
//! - Knobs: [`FakeDiscord::reconnect`] (op 7), [`FakeDiscord::invalidate`] (op 9).
//!
//! REST (`http://<addr>/api/v10`): `GET /gateway/bot`, `POST /channels/{id}/messages` (with
//! `message_reference`), `PATCH /channels/{id}/messages/{id}`,
//! `PUT /channels/{id}/messages/{id}/reactions/{emoji}/@me`. [`FakeDiscord::rate_limit_next`]
//! makes the next calls answer 429 with the documented JSON body (`retry_after` in seconds)
//! and `Retry-After`/`X-RateLimit-*` headers; a 429'd call is recorded as not sent.

#![warn(missing_docs)]

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, patch, post, put};
use futures::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::sync::{mpsc, watch};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, WebSocketConfig};

/// One dispatch in a session's log.
#[derive(Clone, Debug)]
pub struct Dispatch {
    /// Sequence number (`s`).
    pub seq: u64,
    /// Event name (`t`).
    pub t: String,
    /// Event data (`d`).
    pub d: Value,
}

/// One REST call that Discord executed (429s are not recorded).
#[derive(Clone, Debug)]
pub struct Sent {
    /// `POST`, `PATCH` or `PUT`.
    pub method: String,
    /// Channel id from the path.
    pub channel_id: String,
    /// Created or addressed message id.
    pub message_id: String,
    /// The JSON body (Null for reactions) or, for reactions, `{"emoji": ...}`.
    pub body: Value,
    /// When it was executed.
    pub at: Instant,
}

#[derive(Default)]
struct St {
    token: String,
    heartbeat_ms: u64,
    session: Option<(String, Vec<Dispatch>)>,
    sessions_started: u32,
    resumes: Vec<(String, u64)>,
    heartbeat_seq: Option<u64>,
    zombie: bool,
    /// Bumped per knob command: (generation, command).
    command: (u64, Option<Cmd>),
    connections: u32,
    sent: Vec<Sent>,
    limited: Vec<Instant>,
    rate_limit_next: u32,
    retry_after: f64,
    next_id: u64,
}

#[derive(Clone, Copy, Debug)]
enum Cmd {
    Reconnect,
    Invalidate(bool),
}

struct Inner {
    st: Mutex<St>,
    changed: watch::Sender<u64>,
    gateway_url: String,
}

impl Inner {
    fn st(&self) -> MutexGuard<'_, St> {
        self.st.lock().unwrap_or_else(|e| e.into_inner())
    }
    fn bump(&self) {
        self.changed.send_modify(|v| *v += 1);
    }
}

/// The running fake: gateway and REST listeners.
pub struct FakeDiscord {
    inner: Arc<Inner>,
    api_base: String,
}

impl FakeDiscord {
    /// Starts the fake for bot `token` with the given heartbeat interval.
    pub async fn start(token: &str, heartbeat: Duration) -> anyhow::Result<FakeDiscord> {
        let gw = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let gateway_url = format!("ws://{}", gw.local_addr()?);
        let st = St {
            token: token.to_string(),
            heartbeat_ms: u64::try_from(heartbeat.as_millis()).unwrap_or(41_250),
            retry_after: 0.3,
            next_id: 1_100_000_000_000_000_000,
            ..St::default()
        };
        let inner = Arc::new(Inner { st: Mutex::new(st), changed: watch::channel(0).0, gateway_url });
        let i = inner.clone();
        tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = gw.accept().await else { continue };
                let i = i.clone();
                tokio::spawn(async move {
                    let cfg = WebSocketConfig::default().read_buffer_size(4096).write_buffer_size(4096);
                    if let Ok(ws) = tokio_tungstenite::accept_async_with_config(tcp, Some(cfg)).await {
                        connection(i, ws).await;
                    }
                });
            }
        });
        let app = Router::new()
            .route("/api/v10/gateway/bot", get(gateway_bot))
            .route("/api/v10/channels/{cid}/messages", post(create))
            .route("/api/v10/channels/{cid}/messages/{mid}", patch(edit))
            .route("/api/v10/channels/{cid}/messages/{mid}/reactions/{emoji}/@me", put(react))
            .with_state(inner.clone());
        let rest = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let api_base = format!("http://{}/api/v10", rest.local_addr()?);
        tokio::spawn(async move {
            let _ = axum::serve(rest, app).await;
        });
        Ok(FakeDiscord { inner, api_base })
    }

    /// `gateway_url` to configure.
    pub fn gateway_url(&self) -> String {
        self.inner.gateway_url.clone()
    }

    /// `api_base` to configure.
    pub fn api_base(&self) -> String {
        self.api_base.clone()
    }

    /// Appends a dispatch to the current session; its sequence, or `None` with no session.
    pub fn dispatch(&self, t: &str, d: Value) -> Option<u64> {
        let seq = {
            let mut st = self.inner.st();
            let (_, log) = st.session.as_mut()?;
            let seq = log.last().map_or(1, |l| l.seq + 1);
            log.push(Dispatch { seq, t: t.to_string(), d });
            seq
        };
        self.inner.bump();
        Some(seq)
    }

    /// Every dispatch of the current session, READY included.
    pub fn log(&self) -> Vec<Dispatch> {
        self.inner.st().session.as_ref().map(|(_, l)| l.clone()).unwrap_or_default()
    }

    /// Current session id.
    pub fn session_id(&self) -> Option<String> {
        self.inner.st().session.as_ref().map(|(id, _)| id.clone())
    }

    /// Identifies accepted so far (sessions started).
    pub fn identifies(&self) -> u32 {
        self.inner.st().sessions_started
    }

    /// Resumes received: (session id, seq).
    pub fn resumes(&self) -> Vec<(String, u64)> {
        self.inner.st().resumes.clone()
    }

    /// WebSocket connections accepted so far.
    pub fn connections(&self) -> u32 {
        self.inner.st().connections
    }

    /// The sequence in the latest heartbeat: what Discord knows the client has seen.
    pub fn heartbeat_seq(&self) -> Option<u64> {
        self.inner.st().heartbeat_seq
    }

    /// Stops (or resumes) answering heartbeats with op 11: the client should see a zombie.
    pub fn set_zombie(&self, on: bool) {
        self.inner.st().zombie = on;
    }

    /// Sends op 7 Reconnect on the live connection.
    pub fn reconnect(&self) {
        self.command(Cmd::Reconnect);
    }

    /// Sends op 9 Invalid Session; when not `resumable` the session is forgotten.
    pub fn invalidate(&self, resumable: bool) {
        if !resumable {
            self.inner.st().session = None;
        }
        self.command(Cmd::Invalidate(resumable));
    }

    fn command(&self, c: Cmd) {
        {
            let mut st = self.inner.st();
            st.command = (st.command.0 + 1, Some(c));
        }
        self.inner.bump();
    }

    /// The next `n` REST calls answer 429 with `retry_after` seconds.
    pub fn rate_limit_next(&self, n: u32, retry_after: f64) {
        let mut st = self.inner.st();
        st.rate_limit_next = n;
        st.retry_after = retry_after;
    }

    /// REST calls executed.
    pub fn sent(&self) -> Vec<Sent> {
        self.inner.st().sent.clone()
    }

    /// When 429s were answered.
    pub fn limited(&self) -> Vec<Instant> {
        self.inner.st().limited.clone()
    }
}

type ServerWs = tokio_tungstenite::WebSocketStream<tokio::net::TcpStream>;

fn frame(d: &Dispatch) -> String {
    json!({"op": 0, "s": d.seq, "t": d.t, "d": d.d}).to_string()
}

async fn connection(inner: Arc<Inner>, ws: ServerWs) {
    let (mut tx, mut rx) = ws.split();
    let hb = {
        let mut st = inner.st();
        st.connections += 1;
        st.heartbeat_ms
    };
    if tx.send(Message::text(json!({"op": 10, "d": {"heartbeat_interval": hb}}).to_string())).await.is_err() {
        return;
    }
    // First payload: Identify or Resume.
    let first = match tokio::time::timeout(Duration::from_secs(10), rx.next()).await {
        Ok(Some(Ok(Message::Text(t)))) => serde_json::from_str::<Value>(t.as_str()).unwrap_or(Value::Null),
        _ => return,
    };
    let d = first.get("d").cloned().unwrap_or(Value::Null);
    let token_ok = d.get("token").and_then(Value::as_str) == Some(inner.st().token.as_str());
    if !token_ok {
        let _ = tx
            .send(Message::Close(Some(CloseFrame {
                code: CloseCode::Library(4004),
                reason: "Authentication failed.".into(),
            })))
            .await;
        return;
    }
    let mut cursor: u64;
    let mut session_id: String;
    let mut resumed = false;
    match first.get("op").and_then(Value::as_u64) {
        Some(2) => {
            let mut st = inner.st();
            st.sessions_started += 1;
            session_id = format!("fake-session-{}", st.sessions_started);
            let ready = Dispatch {
                seq: 1,
                t: "READY".into(),
                d: json!({
                    "v": 10,
                    "user": {"id": "1000", "username": "concierge-test", "discriminator": "0", "bot": true},
                    "guilds": [],
                    "session_id": session_id,
                    "resume_gateway_url": inner.gateway_url,
                    "application": {"id": "1000", "flags": 0},
                }),
            };
            st.session = Some((session_id.clone(), vec![ready]));
            cursor = 0;
        }
        Some(6) => {
            let sid = d.get("session_id").and_then(Value::as_str).unwrap_or_default().to_string();
            let seq = d.get("seq").and_then(Value::as_u64).unwrap_or(0);
            let known = {
                let mut st = inner.st();
                st.resumes.push((sid.clone(), seq));
                st.session.as_ref().is_some_and(|(id, log)| *id == sid && log.last().is_some_and(|l| l.seq >= seq))
            };
            if !known {
                let _ = tx.send(Message::text(json!({"op": 9, "d": false}).to_string())).await;
                return;
            }
            session_id = sid;
            cursor = seq;
            resumed = true;
        }
        _ => {
            let _ = tx
                .send(Message::Close(Some(CloseFrame {
                    code: CloseCode::Library(4003),
                    reason: "Not authenticated.".into(),
                })))
                .await;
            return;
        }
    }
    // Reader: heartbeats in, ACKs out through the writer.
    let (out_tx, mut out_rx) = mpsc::channel::<Message>(16);
    let reader_inner = inner.clone();
    let reader = tokio::spawn(async move {
        while let Some(Ok(m)) = rx.next().await {
            let Message::Text(t) = m else {
                if matches!(m, Message::Close(_)) {
                    break;
                }
                continue;
            };
            let v: Value = serde_json::from_str(t.as_str()).unwrap_or(Value::Null);
            if v.get("op").and_then(Value::as_u64) == Some(1) {
                let zombie = {
                    let mut st = reader_inner.st();
                    if let Some(s) = v.get("d").and_then(Value::as_u64) {
                        st.heartbeat_seq = Some(s);
                    }
                    st.zombie
                };
                if !zombie && out_tx.send(Message::text(r#"{"op":11}"#)).await.is_err() {
                    break;
                }
            }
        }
    });
    let mut changed = inner.changed.subscribe();
    let mut seen_cmd = inner.st().command.0;
    loop {
        // Send what the log holds past the cursor.
        let (pending, cmd) = {
            let st = inner.st();
            let pending: Vec<Dispatch> = match &st.session {
                Some((id, log)) if *id == session_id => log.iter().filter(|d| d.seq > cursor).cloned().collect(),
                _ => Vec::new(),
            };
            let cmd = if st.command.0 != seen_cmd { st.command.1 } else { None };
            seen_cmd = st.command.0;
            (pending, cmd)
        };
        for d in &pending {
            if tx.send(Message::text(frame(d))).await.is_err() {
                reader.abort();
                return;
            }
            cursor = d.seq;
        }
        if resumed {
            resumed = false;
            // RESUMED closes the replay; it takes the next sequence in the log.
            let seq = {
                let mut st = inner.st();
                match st.session.as_mut() {
                    Some((_, log)) => {
                        let seq = log.last().map_or(1, |l| l.seq + 1);
                        log.push(Dispatch { seq, t: "RESUMED".into(), d: json!({}) });
                        Some(seq)
                    }
                    None => None,
                }
            };
            if seq.is_some() {
                continue;
            }
        }
        match cmd {
            Some(Cmd::Reconnect) => {
                let _ = tx.send(Message::text(r#"{"op":7,"d":null}"#)).await;
            }
            Some(Cmd::Invalidate(r)) => {
                let _ = tx.send(Message::text(json!({"op": 9, "d": r}).to_string())).await;
                session_id = String::new();
            }
            None => {}
        }
        tokio::select! {
            r = changed.changed() => if r.is_err() { break },
            m = out_rx.recv() => match m {
                Some(m) => if tx.send(m).await.is_err() { break },
                None => break,
            },
        }
    }
    reader.abort();
}

// ---- REST -----------------------------------------------------------------------------

fn error(status: StatusCode, code: u32, message: &str) -> Response {
    (status, axum::Json(json!({"message": message, "code": code}))).into_response()
}

/// Auth and the 429 knob shared by every route; `Some` is the answer to give instead.
fn gate(inner: &Inner, headers: &HeaderMap) -> Option<Response> {
    let mut st = inner.st();
    let auth = headers.get("authorization").and_then(|v| v.to_str().ok()).unwrap_or("");
    if auth != format!("Bot {}", st.token) {
        return Some(error(StatusCode::UNAUTHORIZED, 0, "401: Unauthorized"));
    }
    if st.rate_limit_next > 0 {
        st.rate_limit_next -= 1;
        st.limited.push(Instant::now());
        let ra = st.retry_after;
        let body = json!({"message": "You are being rate limited.", "retry_after": ra, "global": false});
        let mut r = (StatusCode::TOO_MANY_REQUESTS, axum::Json(body)).into_response();
        let h = r.headers_mut();
        for (k, v) in [
            ("retry-after", format!("{}", ra.ceil() as u64)),
            ("x-ratelimit-limit", "5".into()),
            ("x-ratelimit-remaining", "0".into()),
            ("x-ratelimit-reset-after", format!("{ra:.3}")),
            ("x-ratelimit-bucket", "fakebucket".into()),
            ("x-ratelimit-scope", "user".into()),
        ] {
            if let Ok(v) = v.parse() {
                h.insert(k, v);
            }
        }
        return Some(r);
    }
    None
}

async fn gateway_bot(State(inner): State<Arc<Inner>>, headers: HeaderMap) -> Response {
    if let Some(r) = gate(&inner, &headers) {
        return r;
    }
    let started = inner.st().sessions_started;
    axum::Json(json!({
        "url": inner.gateway_url,
        "shards": 1,
        "session_start_limit": {"total": 1000, "remaining": 1000u32.saturating_sub(started), "reset_after": 86_400_000, "max_concurrency": 1},
    }))
    .into_response()
}

fn record(inner: &Inner, method: &str, channel_id: String, message_id: Option<String>, body: Value) -> (String, Value) {
    let mut st = inner.st();
    let id = message_id.unwrap_or_else(|| {
        st.next_id += 1;
        st.next_id.to_string()
    });
    st.sent.push(Sent {
        method: method.into(),
        channel_id: channel_id.clone(),
        message_id: id.clone(),
        body: body.clone(),
        at: Instant::now(),
    });
    let message = json!({
        "id": id, "channel_id": channel_id, "type": if body.get("message_reference").is_some() { 19 } else { 0 },
        "content": body.get("content").cloned().unwrap_or(Value::Null),
        "message_reference": body.get("message_reference").cloned().unwrap_or(Value::Null),
        "author": {"id": "1000", "username": "concierge-test", "bot": true},
    });
    (id, message)
}

async fn create(State(inner): State<Arc<Inner>>, Path(cid): Path<String>, headers: HeaderMap, body: Bytes) -> Response {
    if let Some(r) = gate(&inner, &headers) {
        return r;
    }
    let Ok(body) = serde_json::from_slice::<Value>(&body) else {
        return error(StatusCode::BAD_REQUEST, 50109, "The request body contains invalid JSON.");
    };
    if body.get("content").and_then(Value::as_str).is_none_or(str::is_empty) {
        return error(StatusCode::BAD_REQUEST, 50006, "Cannot send an empty message");
    }
    let (_, message) = record(&inner, "POST", cid, None, body);
    axum::Json(message).into_response()
}

async fn edit(
    State(inner): State<Arc<Inner>>,
    Path((cid, mid)): Path<(String, String)>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if let Some(r) = gate(&inner, &headers) {
        return r;
    }
    let Ok(body) = serde_json::from_slice::<Value>(&body) else {
        return error(StatusCode::BAD_REQUEST, 50109, "The request body contains invalid JSON.");
    };
    let (_, message) = record(&inner, "PATCH", cid, Some(mid), body);
    axum::Json(message).into_response()
}

async fn react(
    State(inner): State<Arc<Inner>>,
    Path((cid, mid, emoji)): Path<(String, String, String)>,
    headers: HeaderMap,
) -> Response {
    if let Some(r) = gate(&inner, &headers) {
        return r;
    }
    record(&inner, "PUT", cid, Some(mid), json!({"emoji": emoji}));
    StatusCode::NO_CONTENT.into_response()
}
