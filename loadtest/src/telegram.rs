//! A fake of the Telegram Bot API, written from Telegram's documentation (core.telegram.org/bots/api),
//! not from our adapter, and recording what Telegram would consider confirmed.
//!
//! What it models:
//! - Requests `POST|GET /bot<token>/<method>`, parameters as a JSON body, a form or a query
//!   string. Answers are the Bot API envelope: `{"ok": true, "result": ...}` or
//!   `{"ok": false, "error_code": N, "description": "...", "parameters": {"retry_after": N}}`.
//!   An unknown token is `401 Unauthorized`.
//! - `getUpdates` (`offset`, `limit` 1..=100 default 100, `timeout` seconds,
//!   `allowed_updates`): "An update is considered confirmed as soon as getUpdates is called
//!   with an offset higher than its update_id": such updates are dropped from the queue and
//!   recorded as confirmed ([`FakeTelegram::confirmed`]). Without an offset the earliest
//!   unconfirmed updates are returned. With nothing to return the call blocks up to `timeout`
//!   seconds (long polling). A second `getUpdates` while one is pending terminates the earlier
//!   one with `409 Conflict: terminated by other getUpdates request; make sure that only one
//!   bot instance is running`. While a webhook is set, `getUpdates` is `409 Conflict: can't use
//!   getUpdates method while webhook is active; use deleteWebhook to delete the webhook first`.
//! - `setWebhook` (`url`, `secret_token`, `allowed_updates`) / `deleteWebhook` /
//!   `getWebhookInfo`; [`FakeTelegram::deliver_webhooks`] POSTs pending updates to the set URL
//!   with `X-Telegram-Bot-Api-Secret-Token`, confirming each one only on a 2xx answer.
//! - Outages: [`FakeTelegram::fail_polls`] answers the next getUpdates calls with an HTML
//!   `502 Bad Gateway`, as Telegram's front proxy does.
//! - `sendMessage`, `sendChatAction`, `editMessageText` (and any other `send*`/`edit*`
//!   method): recorded in [`FakeTelegram::sent`] with their parameters and time; messages get
//!   increasing `message_id`s. With [`Limits`] set, a chat (or the bot) that exceeds its rate
//!   gets `429 Too Many Requests: retry after N` with `parameters.retry_after`, and the call is
//!   not recorded (nothing was sent).
//!
//! Update ids increase but are not consecutive when [`Options::id_gaps`] is set, as on the real
//! platform ("never assume ids are gap-free").

#![warn(missing_docs)]

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, RawQuery, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::any;
use serde_json::{Map, Value, json};
use tokio::sync::Notify;

/// Most updates one `getUpdates` returns.
const MAX_LIMIT: usize = 100;
/// Longest long poll the fake holds, in seconds.
const MAX_TIMEOUT: u64 = 50;

/// Rate limits of sends, as Telegram applies them (per chat, and per bot).
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Messages allowed to one chat within `window`.
    pub per_chat: u32,
    /// Messages allowed for the whole bot within `window`.
    pub per_bot: u32,
    /// The sliding window.
    pub window: Duration,
    /// `retry_after` (seconds) given in a 429.
    pub retry_after: u64,
}

/// Behaviour knobs of the fake.
#[derive(Clone, Debug, Default)]
pub struct Options {
    /// Send rate limits; `None` = unlimited.
    pub limits: Option<Limits>,
    /// Leave gaps between consecutive update ids.
    pub id_gaps: bool,
}

/// One recorded API call that sent something.
#[derive(Clone, Debug)]
pub struct Sent {
    /// Bot API method (`sendMessage`, ...).
    pub method: String,
    /// `chat_id` as text.
    pub chat_id: String,
    /// `text`, when there is one.
    pub text: Option<String>,
    /// All parameters.
    pub params: Map<String, Value>,
    /// When the fake accepted it.
    pub at: Instant,
    /// `message_id` given to the message.
    pub message_id: i64,
}

#[derive(Default)]
struct Bot {
    /// Unconfirmed updates: (update_id, raw JSON).
    queue: VecDeque<(i64, String)>,
    next_id: i64,
    confirmed: BTreeSet<i64>,
    /// Generation of the newest getUpdates; an older pending one is terminated with 409.
    poll_generation: u64,
    polls: u64,
    conflicts: u64,
    /// Largest offset ever passed to getUpdates.
    last_offset: Option<i64>,
    allowed_updates: Option<Value>,
    webhook: Option<(String, String)>,
    sent: Vec<Sent>,
    rate_limited: u64,
    next_message_id: i64,
    /// getUpdates calls still to be answered `502 Bad Gateway`.
    failing_polls: u64,
}

struct Inner {
    bots: Mutex<HashMap<String, Bot>>,
    /// Woken on every new update and every new poll.
    changed: Notify,
    options: Options,
    seq: AtomicU64,
}

/// A running fake Bot API server on a loopback port.
#[derive(Clone)]
pub struct FakeTelegram {
    inner: Arc<Inner>,
    /// Base URL to configure as `api_base` (`http://127.0.0.1:PORT`).
    pub api_base: String,
}

impl FakeTelegram {
    /// Starts the fake on a free loopback port.
    pub async fn start(options: Options) -> anyhow::Result<FakeTelegram> {
        let inner = Arc::new(Inner { bots: Mutex::default(), changed: Notify::new(), options, seq: AtomicU64::new(0) });
        let app = Router::new().route("/{bot}/{method}", any(handle)).with_state(inner.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let api_base = format!("http://{}", listener.local_addr()?);
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Ok(FakeTelegram { inner, api_base })
    }

    fn bots(&self) -> MutexGuard<'_, HashMap<String, Bot>> {
        self.inner.bots.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Registers a bot token (unknown tokens get 401).
    pub fn add_bot(&self, token: &str) {
        self.bots().entry(token.to_string()).or_insert_with(|| Bot { next_id: 100_000, ..Bot::default() });
    }

    /// Queues an update whose body (without `update_id`) is `payload`, e.g.
    /// `{"message": {...}}`; returns its `update_id`. A payload carrying its own `update_id`
    /// replaces the generated one in the JSON (a broken update, for tests) while the fake
    /// still orders and confirms it by the generated id.
    pub fn push_update(&self, token: &str, payload: &Value) -> i64 {
        let id = {
            let mut bots = self.bots();
            let bot = bots.entry(token.to_string()).or_insert_with(|| Bot { next_id: 100_000, ..Bot::default() });
            let gap = if self.inner.options.id_gaps {
                1 + (self.inner.seq.fetch_add(1, Ordering::Relaxed) % 3) as i64
            } else {
                1
            };
            bot.next_id += gap;
            let id = bot.next_id;
            let mut obj = Map::new();
            obj.insert("update_id".into(), Value::from(id));
            if let Value::Object(p) = payload {
                obj.extend(p.clone());
            }
            bot.queue.push_back((id, Value::Object(obj).to_string()));
            id
        };
        self.inner.changed.notify_waiters();
        id
    }

    /// Queues a text message from user `from` in chat `chat`; returns its `update_id`.
    pub fn push_message(&self, token: &str, chat: i64, from: i64, text: &str) -> i64 {
        let n = self.inner.seq.fetch_add(1, Ordering::Relaxed) as i64;
        let payload = json!({"message": {
            "message_id": n + 1,
            "from": {"id": from, "is_bot": false, "first_name": "Test", "username": format!("user{from}")},
            "chat": {"id": chat, "type": if chat > 0 { "private" } else { "supergroup" }},
            "date": 1_700_000_000 + n,
            "text": text,
        }});
        self.push_update(token, &payload)
    }

    /// Update ids Telegram considers confirmed (a later getUpdates had a higher offset, or a
    /// webhook delivery got 2xx), ascending.
    pub fn confirmed(&self, token: &str) -> Vec<i64> {
        self.bots().get(token).map(|b| b.confirmed.iter().copied().collect()).unwrap_or_default()
    }

    /// Update ids still waiting for confirmation, in order.
    pub fn pending(&self, token: &str) -> Vec<i64> {
        self.bots().get(token).map(|b| b.queue.iter().map(|(id, _)| *id).collect()).unwrap_or_default()
    }

    /// Every update queued so far, confirmed or not, as `(update_id, raw JSON)` in order.
    pub fn raw_pending(&self, token: &str) -> Vec<(i64, String)> {
        self.bots().get(token).map(|b| b.queue.iter().cloned().collect()).unwrap_or_default()
    }

    /// The largest `offset` any getUpdates call carried.
    pub fn last_offset(&self, token: &str) -> Option<i64> {
        self.bots().get(token).and_then(|b| b.last_offset)
    }

    /// How many getUpdates calls arrived.
    pub fn polls(&self, token: &str) -> u64 {
        self.bots().get(token).map_or(0, |b| b.polls)
    }

    /// How many getUpdates calls were answered 409.
    pub fn conflicts(&self, token: &str) -> u64 {
        self.bots().get(token).map_or(0, |b| b.conflicts)
    }

    /// The `allowed_updates` of the last getUpdates or setWebhook that had one.
    pub fn allowed_updates(&self, token: &str) -> Option<Value> {
        self.bots().get(token).and_then(|b| b.allowed_updates.clone())
    }

    /// The webhook `(url, secret_token)` set by `setWebhook`.
    pub fn webhook(&self, token: &str) -> Option<(String, String)> {
        self.bots().get(token).and_then(|b| b.webhook.clone())
    }

    /// Sends accepted for this bot, in order.
    pub fn sent(&self, token: &str) -> Vec<Sent> {
        self.bots().get(token).map(|b| b.sent.clone()).unwrap_or_default()
    }

    /// Makes the next `n` getUpdates calls fail with `502 Bad Gateway` (an HTML page, as the
    /// front proxy of api.telegram.org answers during an outage); 0 ends the outage.
    pub fn fail_polls(&self, token: &str, n: u64) {
        if let Some(b) = self.bots().get_mut(token) {
            b.failing_polls = n;
        }
    }

    /// How many sends were refused with 429.
    pub fn rate_limited(&self, token: &str) -> u64 {
        self.bots().get(token).map_or(0, |b| b.rate_limited)
    }

    /// POSTs every pending update to the bot's webhook, in order, as Telegram does; an update
    /// is confirmed only on a 2xx answer, and delivery stops at the first failure (Telegram
    /// retries it later). Returns the statuses seen.
    pub async fn deliver_webhooks(&self, token: &str) -> Vec<u16> {
        let Some((url, secret)) = self.webhook(token) else { return Vec::new() };
        let client = reqwest::Client::builder().timeout(Duration::from_secs(30)).build().unwrap_or_default();
        let mut statuses = Vec::new();
        for (id, raw) in self.raw_pending(token) {
            let mut req = client.post(&url).header("content-type", "application/json").body(raw);
            if !secret.is_empty() {
                req = req.header("X-Telegram-Bot-Api-Secret-Token", &secret);
            }
            let status = req.send().await.map(|r| r.status().as_u16()).unwrap_or(0);
            statuses.push(status);
            if !(200..300).contains(&status) {
                break;
            }
            let mut bots = self.bots();
            if let Some(bot) = bots.get_mut(token) {
                bot.queue.retain(|(q, _)| *q != id);
                bot.confirmed.insert(id);
            }
        }
        statuses
    }
}

fn api_error(status: StatusCode, description: &str, retry_after: Option<u64>) -> Response {
    let mut body = json!({"ok": false, "error_code": status.as_u16(), "description": description});
    if let Some(r) = retry_after {
        body["parameters"] = json!({ "retry_after": r });
    }
    (status, axum::Json(body)).into_response()
}

fn ok(result: Value) -> Response {
    (StatusCode::OK, axum::Json(json!({"ok": true, "result": result}))).into_response()
}

/// Parameters from the query string, then a JSON or form body.
fn params(query: Option<&str>, headers: &HeaderMap, body: &[u8]) -> Map<String, Value> {
    let mut out = Map::new();
    let form = |s: &str, out: &mut Map<String, Value>| {
        for pair in s.split('&').filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            let v = v.replace('+', " ");
            let v = percent_decode(&v);
            // Form values that are JSON (numbers, arrays) are read as such, as Telegram does.
            out.insert(k.to_string(), serde_json::from_str(&v).unwrap_or(Value::String(v)));
        }
    };
    if let Some(q) = query {
        form(q, &mut out);
    }
    let ct = headers.get("content-type").and_then(|v| v.to_str().ok()).unwrap_or_default();
    if ct.starts_with("application/json") {
        if let Ok(Value::Object(m)) = serde_json::from_slice(body) {
            out.extend(m);
        }
    } else if ct.starts_with("application/x-www-form-urlencoded") {
        form(&String::from_utf8_lossy(body), &mut out);
    }
    out
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && i + 2 < bytes.len()
            && let Ok(b) = u8::from_str_radix(std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap_or("zz"), 16)
        {
            out.push(b);
            i += 3;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn int(v: Option<&Value>) -> Option<i64> {
    match v? {
        Value::Number(n) => n.as_i64(),
        Value::String(s) => s.parse().ok(),
        _ => None,
    }
}

fn chat_text(v: Option<&Value>) -> String {
    match v {
        Some(Value::Number(n)) => n.to_string(),
        Some(Value::String(s)) => s.clone(),
        _ => String::new(),
    }
}

async fn handle(
    State(inner): State<Arc<Inner>>,
    Path((bot, method)): Path<(String, String)>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let Some(token) = bot.strip_prefix("bot").map(str::to_string) else {
        return api_error(StatusCode::NOT_FOUND, "Not Found", None);
    };
    if !inner.bots.lock().unwrap_or_else(|e| e.into_inner()).contains_key(&token) {
        return api_error(StatusCode::UNAUTHORIZED, "Unauthorized", None);
    }
    let p = params(query.as_deref(), &headers, &body);
    match method.as_str() {
        "getUpdates" => get_updates(&inner, &token, &p).await,
        "setWebhook" => {
            let url = p.get("url").and_then(Value::as_str).unwrap_or_default().to_string();
            let secret = p.get("secret_token").and_then(Value::as_str).unwrap_or_default().to_string();
            let mut bots = inner.bots.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(b) = bots.get_mut(&token) {
                if let Some(a) = p.get("allowed_updates") {
                    b.allowed_updates = Some(a.clone());
                }
                b.webhook = (!url.is_empty()).then_some((url, secret));
            }
            drop(bots);
            inner.changed.notify_waiters();
            ok(Value::Bool(true))
        }
        "deleteWebhook" => {
            if let Some(b) = inner.bots.lock().unwrap_or_else(|e| e.into_inner()).get_mut(&token) {
                b.webhook = None;
            }
            ok(Value::Bool(true))
        }
        "getWebhookInfo" => {
            let bots = inner.bots.lock().unwrap_or_else(|e| e.into_inner());
            let b = bots.get(&token);
            let url = b.and_then(|b| b.webhook.as_ref()).map(|w| w.0.clone()).unwrap_or_default();
            let pending = b.map_or(0, |b| b.queue.len());
            ok(json!({"url": url, "has_custom_certificate": false, "pending_update_count": pending}))
        }
        "getMe" => ok(json!({"id": int(Some(&Value::from(token.split(':').next().unwrap_or("0")))).unwrap_or(0),
            "is_bot": true, "first_name": "Fake", "username": "fake_bot"})),
        m if m.starts_with("send") || m.starts_with("edit") => send(&inner, &token, m, p),
        m if ["deleteMessage", "answerCallbackQuery", "setMessageReaction", "pinChatMessage"].contains(&m) => {
            ok(Value::Bool(true))
        }
        _ => api_error(StatusCode::NOT_FOUND, "Not Found: method not found", None),
    }
}

async fn get_updates(inner: &Inner, token: &str, p: &Map<String, Value>) -> Response {
    let offset = int(p.get("offset"));
    let limit = int(p.get("limit")).map_or(MAX_LIMIT, |l| l.clamp(1, MAX_LIMIT as i64) as usize);
    let timeout = int(p.get("timeout")).map_or(0, |t| t.clamp(0, MAX_TIMEOUT as i64) as u64);
    let generation = {
        let mut bots = inner.bots.lock().unwrap_or_else(|e| e.into_inner());
        let Some(bot) = bots.get_mut(token) else {
            return api_error(StatusCode::UNAUTHORIZED, "Unauthorized", None);
        };
        bot.polls += 1;
        if bot.failing_polls > 0 {
            bot.failing_polls -= 1;
            let page = "<html>\r\n<head><title>502 Bad Gateway</title></head>\r\n<body>\r\n<center><h1>502 Bad Gateway</h1></center>\r\n<hr><center>nginx</center>\r\n</body>\r\n</html>\r\n";
            return (StatusCode::BAD_GATEWAY, [("content-type", "text/html")], page).into_response();
        }
        if bot.webhook.is_some() {
            bot.conflicts += 1;
            return api_error(
                StatusCode::CONFLICT,
                "Conflict: can't use getUpdates method while webhook is active; use deleteWebhook to delete the webhook first",
                None,
            );
        }
        if let Some(a) = p.get("allowed_updates") {
            bot.allowed_updates = Some(a.clone());
        }
        if let Some(o) = offset {
            bot.last_offset = Some(bot.last_offset.map_or(o, |l| l.max(o)));
            if o < 0 {
                // "-offset update from the end of the queue; all previous updates are forgotten".
                let keep = o.unsigned_abs() as usize;
                while bot.queue.len() > keep {
                    if let Some((id, _)) = bot.queue.pop_front() {
                        bot.confirmed.insert(id);
                    }
                }
            } else {
                while bot.queue.front().is_some_and(|(id, _)| *id < o) {
                    if let Some((id, _)) = bot.queue.pop_front() {
                        bot.confirmed.insert(id);
                    }
                }
            }
        }
        bot.poll_generation += 1;
        bot.poll_generation
    };
    // A newer poll terminates this one.
    inner.changed.notify_waiters();
    let deadline = Instant::now() + Duration::from_secs(timeout);
    loop {
        let notified = inner.changed.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        {
            let mut bots = inner.bots.lock().unwrap_or_else(|e| e.into_inner());
            let Some(bot) = bots.get_mut(token) else {
                return api_error(StatusCode::UNAUTHORIZED, "Unauthorized", None);
            };
            if bot.poll_generation != generation {
                bot.conflicts += 1;
                return api_error(
                    StatusCode::CONFLICT,
                    "Conflict: terminated by other getUpdates request; make sure that only one bot instance is running",
                    None,
                );
            }
            let from = offset.filter(|o| *o >= 0).unwrap_or(i64::MIN);
            let updates: Vec<Value> = bot
                .queue
                .iter()
                .filter(|(id, _)| *id >= from)
                .take(limit)
                .filter_map(|(_, raw)| serde_json::from_str(raw).ok())
                .collect();
            if !updates.is_empty() {
                return ok(Value::Array(updates));
            }
        }
        let now = Instant::now();
        if now >= deadline {
            return ok(Value::Array(Vec::new()));
        }
        let _ = tokio::time::timeout(deadline - now, notified).await;
    }
}

fn send(inner: &Inner, token: &str, method: &str, p: Map<String, Value>) -> Response {
    let mut bots = inner.bots.lock().unwrap_or_else(|e| e.into_inner());
    let Some(bot) = bots.get_mut(token) else {
        return api_error(StatusCode::UNAUTHORIZED, "Unauthorized", None);
    };
    let chat_id = chat_text(p.get("chat_id"));
    if chat_id.is_empty() && !p.contains_key("inline_message_id") {
        return api_error(StatusCode::BAD_REQUEST, "Bad Request: chat_id is empty", None);
    }
    if method == "sendMessage" && p.get("text").and_then(Value::as_str).is_none_or(str::is_empty) {
        return api_error(StatusCode::BAD_REQUEST, "Bad Request: message text is empty", None);
    }
    let now = Instant::now();
    if let Some(l) = inner.options.limits
        && method != "sendChatAction"
    {
        let recent = |chat: Option<&str>| {
            bot.sent
                .iter()
                .rev()
                .take_while(|s| now.duration_since(s.at) < l.window)
                .filter(|s| s.method != "sendChatAction" && chat.is_none_or(|c| c == s.chat_id))
                .count() as u32
        };
        if recent(Some(&chat_id)) >= l.per_chat || recent(None) >= l.per_bot {
            bot.rate_limited += 1;
            return api_error(
                StatusCode::TOO_MANY_REQUESTS,
                &format!("Too Many Requests: retry after {}", l.retry_after),
                Some(l.retry_after),
            );
        }
    }
    if method == "sendChatAction" {
        bot.sent.push(Sent { method: method.into(), chat_id, text: None, params: p, at: now, message_id: 0 });
        return ok(Value::Bool(true));
    }
    let message_id = if method.starts_with("edit") {
        int(p.get("message_id")).unwrap_or(0)
    } else {
        bot.next_message_id += 1;
        bot.next_message_id
    };
    let text = p.get("text").and_then(Value::as_str).map(str::to_string);
    let chat = p.get("chat_id").cloned().unwrap_or(Value::Null);
    bot.sent.push(Sent { method: method.into(), chat_id, text: text.clone(), params: p, at: now, message_id });
    ok(json!({"message_id": message_id, "date": 1_700_000_000, "chat": {"id": chat, "type": "private"}, "text": text}))
}
