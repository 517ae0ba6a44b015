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
//! - Identify spends one session start of the daily budget (`session_start_limit`, shown by
//!   `GET /gateway/bot`, set with [`FakeDiscord::set_session_budget`]); an Identify with no
//!   session start left is refused (Discord resets the token: close 4004) and counted in
//!   [`FakeDiscord::refused_identifies`]. The budget refills to `total` at its reset time.
//!
//! REST (`http://<addr>/api/v10`): `GET /gateway/bot`, `POST /channels/{id}/messages` (with
//! `message_reference`), `PATCH /channels/{id}/messages/{id}`,
//! `PUT /channels/{id}/messages/{id}/reactions/{emoji}/@me`. Rate limits as documented: each
//! message route has its own bucket (`X-RateLimit-Bucket`), counted separately per channel id
//! (the major parameter) in fixed windows of [`FakeDiscord::set_bucket`] (default 50 per
//! second). Every answer carries `X-RateLimit-Limit`, `-Remaining`, `-Reset` (epoch seconds),
//! `-Reset-After` (seconds) and `-Bucket`; a call on an exhausted bucket gets 429 with the
//! JSON body `{"message", "retry_after", "global": false}`, `Retry-After` and
//! `X-RateLimit-Scope: user`. Knobs: [`FakeDiscord::rate_limit_next`] (429s the headers did not
//! announce, scope `shared`), [`FakeDiscord::rate_limit_global_next`] (a global 429 with
//! `X-RateLimit-Global`). A 429'd call is recorded as not sent.

#![warn(missing_docs)]

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

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
    global_next: Option<f64>,
    next_id: u64,
    /// Per-channel bucket: requests per window.
    bucket_limit: u32,
    bucket_window: Duration,
    /// (bucket hash, channel id) -> (window end, remaining).
    windows: HashMap<(&'static str, String), (Instant, u32)>,
    budget: Budget,
    refused_identifies: u32,
}

/// The daily session-start budget.
struct Budget {
    total: u32,
    remaining: u32,
    reset_at: Instant,
    max_concurrency: u32,
}

impl Default for Budget {
    fn default() -> Self {
        Budget { total: 1000, remaining: 1000, reset_at: Instant::now() + DAY, max_concurrency: 1 }
    }
}

impl Budget {
    fn refresh(&mut self) {
        let now = Instant::now();
        if now >= self.reset_at {
            self.remaining = self.total;
            self.reset_at = now + DAY;
        }
    }
}

const DAY: Duration = Duration::from_secs(86_400);
/// Bucket hashes of the message routes (opaque strings, as Discord's are).
const CREATE_BUCKET: &str = "80c17d2f203122d936070c88c8d10f33";
const EDIT_BUCKET: &str = "3a7e6c51b4f1e2d0a9c8b7f6e5d4c3b2";
const REACT_BUCKET: &str = "f2e4d6c8a0b1c3d5e7f9a1b3c5d7e9f1";

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
            bucket_limit: 50,
            bucket_window: Duration::from_secs(1),
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

    /// The next `n` REST calls answer 429 with `retry_after` seconds (scope `shared`: a limit
    /// the bucket headers did not announce).
    pub fn rate_limit_next(&self, n: u32, retry_after: f64) {
        let mut st = self.inner.st();
        st.rate_limit_next = n;
        st.retry_after = retry_after;
    }

    /// The next REST call answers a global 429 (`"global": true`) with `retry_after` seconds.
    pub fn rate_limit_global_next(&self, retry_after: f64) {
        self.inner.st().global_next = Some(retry_after);
    }

    /// Each message route allows `limit` calls per channel per `window` (fixed windows that
    /// start with a window's first call).
    pub fn set_bucket(&self, limit: u32, window: Duration) {
        let mut st = self.inner.st();
        st.bucket_limit = limit.max(1);
        st.bucket_window = window;
        st.windows.clear();
    }

    /// Sets the daily session-start budget: `remaining` of `total`, refilled after `reset_after`.
    pub fn set_session_budget(&self, total: u32, remaining: u32, reset_after: Duration, max_concurrency: u32) {
        self.inner.st().budget = Budget { total, remaining, reset_at: Instant::now() + reset_after, max_concurrency };
    }

    /// Session starts left today (what `GET /gateway/bot` reports now).
    pub fn session_starts_remaining(&self) -> u32 {
        let mut st = self.inner.st();
        st.budget.refresh();
        st.budget.remaining
    }

    /// Identifies refused because the budget was spent.
    pub fn refused_identifies(&self) -> u32 {
        self.inner.st().refused_identifies
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
    // Discord's answer to a bad token, and to an Identify past the daily budget (it resets the
    // token of a bot that does that).
    let auth_failed =
        Message::Close(Some(CloseFrame { code: CloseCode::Library(4004), reason: "Authentication failed.".into() }));
    if !token_ok {
        let _ = tx.send(auth_failed).await;
        return;
    }
    let mut cursor: u64;
    let mut session_id: String;
    let mut resumed = false;
    match first.get("op").and_then(Value::as_u64) {
        Some(2) => {
            let spent = {
                let mut st = inner.st();
                st.budget.refresh();
                st.refused_identifies += u32::from(st.budget.remaining == 0);
                st.budget.remaining == 0
            };
            if spent {
                let _ = tx.send(auth_failed).await;
                return;
            }
            let mut st = inner.st();
            st.budget.remaining = st.budget.remaining.saturating_sub(1);
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

fn auth(st: &St, headers: &HeaderMap) -> Option<Response> {
    let auth = headers.get("authorization").and_then(|v| v.to_str().ok()).unwrap_or("");
    (auth != format!("Bot {}", st.token)).then(|| error(StatusCode::UNAUTHORIZED, 0, "401: Unauthorized"))
}

fn set_headers(r: &mut Response, pairs: &[(&str, String)]) {
    let h = r.headers_mut();
    for (k, v) in pairs {
        if let (Ok(k), Ok(v)) = (axum::http::HeaderName::from_bytes(k.as_bytes()), v.parse()) {
            h.insert(k, v);
        }
    }
}

/// A 429 as documented: JSON body, `Retry-After` (whole seconds) and the scope header.
fn too_many(retry_after: f64, global: bool, scope: &str, mut extra: Vec<(&str, String)>) -> Response {
    let body = json!({"message": "You are being rate limited.", "retry_after": retry_after, "global": global});
    let mut r = (StatusCode::TOO_MANY_REQUESTS, axum::Json(body)).into_response();
    extra.push(("retry-after", format!("{}", retry_after.ceil() as u64)));
    extra.push(("x-ratelimit-scope", scope.into()));
    if global {
        extra.push(("x-ratelimit-global", "true".into()));
    }
    set_headers(&mut r, &extra);
    r
}

/// Auth, the 429 knobs and the channel's bucket, shared by the message routes: `Err` is the
/// answer to give instead, `Ok` the rate limit headers for the answer.
fn gate(
    inner: &Inner,
    headers: &HeaderMap,
    bucket: &'static str,
    channel: &str,
) -> Result<Vec<(&'static str, String)>, Box<Response>> {
    let mut st = inner.st();
    if let Some(r) = auth(&st, headers) {
        return Err(Box::new(r));
    }
    let now = Instant::now();
    if let Some(ra) = st.global_next.take() {
        st.limited.push(now);
        return Err(Box::new(too_many(ra, true, "global", Vec::new())));
    }
    let (limit, window) = (st.bucket_limit, st.bucket_window);
    let (reset_at, remaining) = {
        let w = st.windows.entry((bucket, channel.to_string())).or_insert((now, limit));
        if w.0 <= now {
            *w = (now + window, limit);
        }
        *w
    };
    // Rounded up to the millisecond: a client waiting this long finds the window over.
    let reset_after = (reset_at.saturating_duration_since(now).as_secs_f64() * 1000.0).ceil() / 1000.0;
    let reset_epoch = (SystemTime::now() + reset_at.saturating_duration_since(now))
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64());
    let announced = |remaining: u32| {
        vec![
            ("x-ratelimit-limit", limit.to_string()),
            ("x-ratelimit-remaining", remaining.to_string()),
            ("x-ratelimit-reset", format!("{reset_epoch:.3}")),
            ("x-ratelimit-reset-after", format!("{reset_after:.3}")),
            ("x-ratelimit-bucket", bucket.to_string()),
        ]
    };
    if st.rate_limit_next > 0 {
        st.rate_limit_next -= 1;
        st.limited.push(now);
        let ra = st.retry_after;
        return Err(Box::new(too_many(ra, false, "shared", announced(remaining))));
    }
    if remaining == 0 {
        st.limited.push(now);
        return Err(Box::new(too_many(reset_after, false, "user", announced(0))));
    }
    if let Some(w) = st.windows.get_mut(&(bucket, channel.to_string())) {
        w.1 -= 1;
    }
    Ok(announced(remaining - 1))
}

fn with_headers(mut r: Response, pairs: &[(&str, String)]) -> Response {
    set_headers(&mut r, pairs);
    r
}

async fn gateway_bot(State(inner): State<Arc<Inner>>, headers: HeaderMap) -> Response {
    let mut st = inner.st();
    if let Some(r) = auth(&st, &headers) {
        return r;
    }
    st.budget.refresh();
    let b = &st.budget;
    let reset_after = u64::try_from(b.reset_at.saturating_duration_since(Instant::now()).as_millis()).unwrap_or(0);
    axum::Json(json!({
        "url": inner.gateway_url,
        "shards": 1,
        "session_start_limit": {
            "total": b.total, "remaining": b.remaining, "reset_after": reset_after, "max_concurrency": b.max_concurrency,
        },
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
    let limits = match gate(&inner, &headers, CREATE_BUCKET, &cid) {
        Ok(l) => l,
        Err(r) => return *r,
    };
    let Ok(body) = serde_json::from_slice::<Value>(&body) else {
        return with_headers(error(StatusCode::BAD_REQUEST, 50109, "The request body contains invalid JSON."), &limits);
    };
    if body.get("content").and_then(Value::as_str).is_none_or(str::is_empty) {
        return with_headers(error(StatusCode::BAD_REQUEST, 50006, "Cannot send an empty message"), &limits);
    }
    let (_, message) = record(&inner, "POST", cid, None, body);
    with_headers(axum::Json(message).into_response(), &limits)
}

async fn edit(
    State(inner): State<Arc<Inner>>,
    Path((cid, mid)): Path<(String, String)>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let limits = match gate(&inner, &headers, EDIT_BUCKET, &cid) {
        Ok(l) => l,
        Err(r) => return *r,
    };
    let Ok(body) = serde_json::from_slice::<Value>(&body) else {
        return with_headers(error(StatusCode::BAD_REQUEST, 50109, "The request body contains invalid JSON."), &limits);
    };
    let (_, message) = record(&inner, "PATCH", cid, Some(mid), body);
    with_headers(axum::Json(message).into_response(), &limits)
}

async fn react(
    State(inner): State<Arc<Inner>>,
    Path((cid, mid, emoji)): Path<(String, String, String)>,
    headers: HeaderMap,
) -> Response {
    let limits = match gate(&inner, &headers, REACT_BUCKET, &cid) {
        Ok(l) => l,
        Err(r) => return *r,
    };
    record(&inner, "PUT", cid, Some(mid), json!({"emoji": emoji}));
    with_headers(StatusCode::NO_CONTENT.into_response(), &limits)
}
