//! Telegram Bot API: long polling, webhook ingress, and paced sends.
//!
//! **Client.** A thin reqwest client of our own against a configurable `api_base`, not
//! teloxide: we need exactly four methods' shapes, the raw JSON of every update byte for byte
//! (teloxide-core's `Update` is a large typed tree that re-serializes differently), and a few
//! hundred bytes of state per idle bot (a poller here is one task holding a shared client).
//! teloxide's Dispatcher is out anyway: it reads ahead of our store writes.
//!
//! **Long polling (promise 1).** One task per bot calls `getUpdates` with `offset`, `timeout`
//! and `allowed_updates`. Every update of a batch goes to the [`EventSink`] in order; only
//! when all of them are stored does the next call carry `offset = max(update_id) + 1`, which
//! is what confirms them to Telegram. If a write fails the offset stays, Telegram returns the
//! same updates again and the dedupe key `tg:<bot id>:<update_id>` drops those already stored.
//! An update that is not one of Telegram's shapes (no `update_id`, a message without a chat,
//! ...) is stored too, as meta `kind = malformed` with the error, logged, and named in the
//! poller's last error; the offset still passes its id, so one bad update never blocks or
//! loops the batch. The long-poll `timeout` is at least 1 s (0 would spin on an idle bot).
//! Errors back off exponentially (1 s to 60 s); `409 Conflict` (another poller, or a webhook is
//! set) is logged as an error and retried only every 30 s; `401`/`404` (bad token) every 5
//! minutes. Every state change (`starting`, `polling`, `backoff`, `conflict`, `unauthorized`,
//! `stopped`, with the error) goes to the [`ConnectionReporter`] as `telegram/<bot>`, which is
//! how the admin API and dashboard show it. The loop ends when the shutdown watch turns true.
//!
//! **Webhook mode.** `POST /telegram/{bot}`: the `X-Telegram-Bot-Api-Secret-Token` header is
//! compared in constant time (401 otherwise), the body bounded (413), the update stored, and
//! only then 200. A store failure is 503 and Telegram retries. A malformed update is stored as
//! `kind = malformed` and answered 200 with its error: a non-2xx would only make Telegram
//! redeliver the same bad bytes until it gives up, holding back the updates behind it.
//!
//! **Sends.** The agent's `SendRequest.body` is plain text (a `sendMessage` to the
//! conversation) or a JSON object `{"method": "...", ...parameters}` for any method in
//! [`SEND_METHODS`] (`sendMessage` with `reply_parameters`, `sendChatAction`,
//! `editMessageText`, ...); `chat_id` and the forum `message_thread_id` default to the
//! conversation. Sends are queued per chat (FIFO, at least `chat_interval` apart) and per bot
//! (at most `bot_rate` calls per second) by the shared [`crate::pacing`], so a burst is slowed,
//! never dropped; a `429` waits `parameters.retry_after` inside the chat's turn and tries again
//! (a 429 means nothing was sent).
//!
//! `SendRequest.reply_to` (the *offset* of the event answered) is not used: a sender has no
//! access to the store to map it to a Telegram `message_id`. Agents reply with a JSON body's
//! `reply_parameters.message_id`, taken from the event's meta `message_id`.

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::any;
use concierge_protocol::{Attachment, ChannelRef, EventData, SendRequest, SendResult, now_ms};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};
use tokio::sync::watch;

use crate::http_util;
use crate::pacing::{self, Pacer, Turn};
use crate::{ChannelSender, ConnectionReporter, EventSink, SinkError};

/// Telegram's API base URL.
pub const DEFAULT_API_BASE: &str = "https://api.telegram.org";
/// Header Telegram sets on webhook deliveries to the `secret_token` given to `setWebhook`.
pub const SECRET_HEADER: &str = "x-telegram-bot-api-secret-token";
/// Methods an agent may call through a JSON body: chat actions only, never methods that would
/// change how Concierge receives updates (`setWebhook`, `deleteWebhook`, `close`, `logOut`...).
pub const SEND_METHODS: &[&str] = &[
    "sendMessage",
    "sendChatAction",
    "editMessageText",
    "editMessageReplyMarkup",
    "editMessageCaption",
    "deleteMessage",
    "forwardMessage",
    "copyMessage",
    "sendPhoto",
    "sendDocument",
    "sendAudio",
    "sendVideo",
    "sendVoice",
    "sendSticker",
    "sendLocation",
    "sendPoll",
    "sendDice",
    "answerCallbackQuery",
    "setMessageReaction",
    "pinChatMessage",
    "unpinChatMessage",
];

/// Largest `getUpdates` / method response read (100 updates of a few KB each fit easily).
const MAX_RESPONSE: usize = 16 * 1024 * 1024;
/// Updates per `getUpdates` call (Telegram's maximum).
const POLL_LIMIT: u32 = 100;
/// Extra time over the long-poll timeout before a poll request is abandoned.
const POLL_SLACK: Duration = Duration::from_secs(15);
const BACKOFF_INITIAL: Duration = Duration::from_secs(1);
const BACKOFF_MAX: Duration = Duration::from_secs(60);
/// Wait after `409 Conflict`: long, because another process owns the bot until an operator acts.
const CONFLICT_BACKOFF: Duration = Duration::from_secs(30);
/// Wait after `401`/`404`: the token is wrong; only a configuration change fixes it.
const UNAUTHORIZED_BACKOFF: Duration = Duration::from_secs(300);
/// Timeout of one send call.
const SEND_TIMEOUT: Duration = Duration::from_secs(30);
/// 429 retries of one send before it is reported as `rate_limited`.
const MAX_RATE_RETRIES: u32 = 5;
/// Longest `retry_after` a send waits out itself; longer ones go back to the agent.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(60);
/// Sends waiting in one bot's queues before new ones are refused with `queue_full` (promise 5).
const MAX_QUEUED_SENDS: usize = 10_000;
/// Per-chat pacing entries kept before idle ones are pruned (see [`crate::pacing`]).
const MAX_CHAT_ENTRIES: usize = 4096;
/// Longest parse error kept in a malformed event's meta.
const MAX_ERROR_LEN: usize = 200;

/// One bot's identity: the config name, its agent, and where its API is.
#[derive(Clone)]
pub struct Bot {
    /// Name from the configuration; the event's channel name.
    pub name: String,
    /// The agent that receives this bot's updates.
    pub agent: String,
    /// `<bot id>:<secret>`; it appears only in request URLs, never in logs or errors.
    pub token: String,
    /// Bot API base URL without a trailing slash.
    pub api_base: String,
}

impl fmt::Debug for Bot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Bot")
            .field("name", &self.name)
            .field("agent", &self.agent)
            .field("token", &"[redacted]")
            .field("api_base", &self.api_base)
            .finish()
    }
}

impl Bot {
    /// The public numeric bot id (the token's part before `:`), stable across config renames,
    /// so it keys deduplication.
    pub fn id(&self) -> &str {
        self.token.split_once(':').map_or(self.name.as_str(), |(id, _)| id)
    }

    fn url(&self, method: &str) -> String {
        format!("{}/bot{}/{method}", self.api_base, self.token)
    }

    fn channel(&self) -> ChannelRef {
        ChannelRef::new("telegram", self.name.clone())
    }
}

// ---- Bot API calls ------------------------------------------------------------------------

/// What a Bot API call can fail with. Messages never contain the token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ApiError {
    /// No HTTP answer. `sent` is false when the request surely never left (connect failed).
    Transport {
        /// Whether the request may have reached Telegram.
        sent: bool,
        /// What happened.
        message: String,
    },
    /// Telegram answered `ok: false`.
    Api {
        /// `error_code` (the HTTP status, by Telegram's convention).
        code: i64,
        /// `description`.
        description: String,
        /// `parameters.retry_after` on 429.
        retry_after: Option<u64>,
        /// `parameters.migrate_to_chat_id` when a group became a supergroup.
        migrate_to_chat_id: Option<i64>,
    },
    /// The answer was not the Bot API's JSON envelope.
    Decode(String),
}

impl fmt::Display for ApiError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ApiError::Transport { message, .. } => write!(f, "transport error: {message}"),
            ApiError::Api { code, description, .. } => write!(f, "Telegram error {code}: {description}"),
            ApiError::Decode(m) => write!(f, "unexpected answer from Telegram: {m}"),
        }
    }
}

#[derive(Deserialize)]
struct Envelope<'a> {
    ok: bool,
    #[serde(borrow)]
    result: Option<&'a RawValue>,
    error_code: Option<i64>,
    description: Option<String>,
    parameters: Option<ResponseParameters>,
}

#[derive(Deserialize)]
struct ResponseParameters {
    retry_after: Option<u64>,
    migrate_to_chat_id: Option<i64>,
}

/// Calls `method` with a JSON body and hands the raw `result` to `f`.
async fn call<T>(
    http: &reqwest::Client,
    bot: &Bot,
    method: &str,
    params: &impl Serialize,
    timeout: Duration,
    f: impl FnOnce(&RawValue) -> Result<T, String>,
) -> Result<T, ApiError> {
    let resp = http.post(bot.url(method)).json(params).timeout(timeout).send().await.map_err(|e| {
        ApiError::Transport { sent: !(e.is_connect() || e.is_builder()), message: e.without_url().to_string() }
    })?;
    let status = resp.status();
    let body = http_util::read_response(resp, MAX_RESPONSE)
        .await
        .map_err(|message| ApiError::Transport { sent: true, message })?;
    let env: Envelope<'_> = serde_json::from_slice(&body)
        .map_err(|e| ApiError::Decode(format!("HTTP {status}, body is not a Bot API response: {e}")))?;
    if env.ok {
        let result = env.result.ok_or_else(|| ApiError::Decode("ok without result".into()))?;
        return f(result).map_err(ApiError::Decode);
    }
    Err(ApiError::Api {
        code: env.error_code.unwrap_or(i64::from(status.as_u16())),
        description: env.description.unwrap_or_default(),
        retry_after: env.parameters.as_ref().and_then(|p| p.retry_after),
        migrate_to_chat_id: env.parameters.as_ref().and_then(|p| p.migrate_to_chat_id),
    })
}

/// `setWebhook`: points Telegram at `url` with `secret_token`, for the given update kinds.
pub async fn set_webhook(
    http: &reqwest::Client,
    bot: &Bot,
    url: &str,
    secret_token: &str,
    allowed_updates: &[String],
) -> Result<(), ApiError> {
    let params = serde_json::json!({ "url": url, "secret_token": secret_token, "allowed_updates": allowed_updates });
    call(http, bot, "setWebhook", &params, SEND_TIMEOUT, |_| Ok(())).await
}

/// Calls `setWebhook` until it succeeds (at most 10 attempts, backing off), logging failures.
pub fn spawn_set_webhook(
    http: reqwest::Client,
    bot: Bot,
    url: String,
    secret_token: String,
    allowed_updates: Vec<String>,
    mut shutdown: watch::Receiver<bool>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut backoff = Backoff::new();
        for attempt in 1..=10 {
            match set_webhook(&http, &bot, &url, &secret_token, &allowed_updates).await {
                Ok(()) => {
                    tracing::info!(bot = %bot.name, "telegram webhook set");
                    return;
                }
                Err(e) => tracing::error!(bot = %bot.name, attempt, error = %e, "setWebhook failed"),
            }
            tokio::select! {
                _ = tokio::time::sleep(backoff.next()) => {}
                _ = shutdown.changed() => return,
            }
        }
        tracing::error!(bot = %bot.name, "giving up on setWebhook after 10 attempts; set the webhook by hand");
    })
}

// ---- long polling -------------------------------------------------------------------------

/// A poller's last reported state, so only changes reach the [`ConnectionReporter`].
struct Status {
    reporter: Arc<dyn ConnectionReporter>,
    bot: String,
    last: Option<(&'static str, Option<String>)>,
}

impl Status {
    fn set(&mut self, state: &'static str, error: Option<String>) {
        let now = Some((state, error));
        if self.last != now {
            self.last = now;
            if let Some((state, error)) = &self.last {
                self.reporter.state("telegram", &self.bot, state, error.as_deref());
            }
        }
    }
}

/// Long-poll settings of one bot.
#[derive(Clone, Debug)]
pub struct PollOptions {
    /// `allowed_updates` (empty = Telegram's default set; always sent, because an omitted list
    /// means "keep whatever was set last").
    pub allowed_updates: Vec<String>,
    /// `timeout` of `getUpdates`, whole seconds.
    pub timeout: Duration,
}

struct Backoff {
    next: Duration,
}

impl Backoff {
    fn new() -> Self {
        Backoff { next: BACKOFF_INITIAL }
    }
    fn reset(&mut self) {
        self.next = BACKOFF_INITIAL;
    }
    /// The delay to wait now, with ±20 % jitter so many bots do not retry in lockstep.
    fn next(&mut self) -> Duration {
        self.next_jittered(rand::random::<f64>())
    }
    /// [`Backoff::next`] with the random draw `r` in `[0, 1)` given: the base delay doubles
    /// from 1 s up to 60 s, and the result is that base times `0.8 + 0.4 r`.
    fn next_jittered(&mut self, r: f64) -> Duration {
        let d = self.next;
        self.next = (self.next * 2).min(BACKOFF_MAX);
        d.mul_f64(0.8 + r.clamp(0.0, 1.0) * 0.4)
    }
}

/// Starts the long-poll loop of one bot; it stops when `shutdown` turns true.
pub fn spawn_poller(
    http: reqwest::Client,
    bot: Bot,
    options: PollOptions,
    sink: Arc<dyn EventSink>,
    reporter: Arc<dyn ConnectionReporter>,
    shutdown: watch::Receiver<bool>,
) -> tokio::task::JoinHandle<()> {
    let mut status = Status { reporter, bot: bot.name.clone(), last: None };
    status.set("starting", None);
    tokio::spawn(poll_loop(http, bot, options, sink, status, shutdown))
}

#[derive(Serialize)]
struct GetUpdates<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    offset: Option<i64>,
    limit: u32,
    timeout: u64,
    allowed_updates: &'a [String],
}

async fn poll_loop(
    http: reqwest::Client,
    bot: Bot,
    options: PollOptions,
    sink: Arc<dyn EventSink>,
    mut status: Status,
    mut shutdown: watch::Receiver<bool>,
) {
    // No offset on the first call: Telegram returns every unconfirmed update, so a restart
    // picks up exactly what the previous process had not confirmed.
    let mut offset: Option<i64> = None;
    let mut backoff = Backoff::new();
    let timeout = options.timeout + POLL_SLACK;
    tracing::info!(bot = %bot.name, agent = %bot.agent, "telegram long polling started");
    loop {
        if *shutdown.borrow() {
            break;
        }
        let params = GetUpdates {
            offset,
            limit: POLL_LIMIT,
            // Never 0: a short poll returns at once on an idle bot and the loop would spin.
            timeout: options.timeout.as_secs().max(1),
            allowed_updates: &options.allowed_updates,
        };
        let polled = tokio::select! {
            r = call(&http, &bot, "getUpdates", &params, timeout, |raw| {
                serde_json::from_str::<Vec<Box<RawValue>>>(raw.get()).map_err(|e| format!("result is not an array of updates: {e}"))
            }) => r,
            _ = shutdown.changed() => break,
        };
        let delay = match polled {
            Ok(updates) if updates.is_empty() => {
                backoff.reset();
                status.set("polling", None);
                None
            }
            Ok(updates) => match store_batch(&bot, &updates, sink.as_ref()).await {
                Ok(Batch { next_offset: Some(next), malformed }) => {
                    backoff.reset();
                    offset = Some(next);
                    // Shown as the connection's last error on the admin API until a newer one.
                    status.set("polling", malformed_report(&malformed));
                    None
                }
                Ok(Batch { next_offset: None, malformed }) => {
                    // Updates without an update_id are stored (as malformed, deduplicated by
                    // their bytes) but can never be confirmed; back off rather than spin.
                    tracing::error!(bot = %bot.name, "getUpdates returned only updates without update_id");
                    let why = malformed_report(&malformed).unwrap_or_default();
                    status.set("backoff", Some(format!("no update of the batch has an update_id; {why}")));
                    Some(backoff.next())
                }
                Err(e) => {
                    tracing::warn!(bot = %bot.name, error = %e, "telegram updates not stored; offset not advanced, Telegram will redeliver");
                    status.set("backoff", Some(e.to_string()));
                    Some(backoff.next())
                }
            },
            Err(e) => {
                let (state, delay) = poll_error_delay(&bot, &e, &mut backoff);
                status.set(state, Some(e.to_string()));
                Some(delay)
            }
        };
        if let Some(delay) = delay {
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = shutdown.changed() => break,
            }
        }
    }
    status.set("stopped", None);
    tracing::info!(bot = %bot.name, "telegram long polling stopped");
}

/// Logs a failed `getUpdates`; says which state the poller is in and how long to wait.
fn poll_error_delay(bot: &Bot, e: &ApiError, backoff: &mut Backoff) -> (&'static str, Duration) {
    match e {
        ApiError::Api { code: 409, .. } => {
            tracing::error!(bot = %bot.name, error = %e, "telegram 409 Conflict: another process polls this bot token, or a webhook is set; retrying every {}s", CONFLICT_BACKOFF.as_secs());
            ("conflict", CONFLICT_BACKOFF)
        }
        ApiError::Api { code: 401 | 404, .. } => {
            tracing::error!(bot = %bot.name, error = %e, "telegram rejects the bot token; check [telegram.{}].token", bot.name);
            ("unauthorized", UNAUTHORIZED_BACKOFF)
        }
        ApiError::Api { code: 429, retry_after, .. } => {
            tracing::warn!(bot = %bot.name, error = %e, "telegram rate-limits getUpdates");
            ("backoff", Duration::from_secs(retry_after.unwrap_or(5).clamp(1, 300)))
        }
        _ => {
            let d = backoff.next();
            tracing::warn!(bot = %bot.name, error = %e, retry_in_ms = d.as_millis() as u64, "getUpdates failed");
            ("backoff", d)
        }
    }
}

/// What storing one `getUpdates` batch found.
#[derive(Debug, PartialEq)]
struct Batch {
    /// `max(update_id) + 1`, `None` if no update had an id.
    next_offset: Option<i64>,
    /// `update <id>: <error>` for each update stored as `kind = malformed`.
    malformed: Vec<String>,
}

/// Stores a batch in order, malformed updates included (as `kind = malformed`, so one bad
/// update neither blocks the batch nor is lost). Any sink failure stops the batch: the offset
/// must not move past it.
async fn store_batch(bot: &Bot, updates: &[Box<RawValue>], sink: &dyn EventSink) -> Result<Batch, SinkError> {
    let mut max_id: Option<i64> = None;
    let mut malformed = Vec::new();
    for raw in updates {
        let (id, event) = match update_event(bot, raw.get(), now_ms()) {
            Ok((id, event)) => (Some(id), event),
            Err(e) => {
                let (id, event) = malformed_event(bot, raw.get().as_bytes(), &e, now_ms());
                let at = id.map_or_else(|| "without update_id".to_string(), |id| id.to_string());
                tracing::warn!(bot = %bot.name, update = %at, error = %e, "malformed telegram update; stored as kind=malformed");
                malformed.push(format!("update {at}: {e}"));
                (id, event)
            }
        };
        sink.ingest(event).await?;
        if let Some(id) = id {
            max_id = Some(max_id.map_or(id, |m| m.max(id)));
        }
    }
    Ok(Batch { next_offset: max_id.map(|m| m.saturating_add(1)), malformed })
}

/// The poller's error text for a batch with malformed updates (the first few named).
fn malformed_report(malformed: &[String]) -> Option<String> {
    const NAMED: usize = 3;
    let (first, rest) = malformed.split_at(malformed.len().min(NAMED));
    let more = if rest.is_empty() { String::new() } else { format!("; and {} more", rest.len()) };
    (!first.is_empty()).then(|| {
        format!("{} malformed update(s) stored as kind=malformed: {}{more}", malformed.len(), first.join("; "))
    })
}

// ---- updates -> events --------------------------------------------------------------------

fn id_text(v: &Value) -> Option<String> {
    match v {
        Value::Number(n) => Some(n.to_string()),
        Value::String(s) => Some(s.clone()),
        _ => None,
    }
}

/// Update kinds whose payload is a `Message`, which always has a `chat`.
const MESSAGE_KINDS: &[&str] = &[
    "message",
    "edited_message",
    "channel_post",
    "edited_channel_post",
    "business_message",
    "edited_business_message",
];

/// Turns one raw update into an event: `(update_id, event)`. The raw JSON is kept as given.
/// `Err` names what is wrong; the caller stores it with [`malformed_event`].
pub fn update_event(bot: &Bot, raw: &str, now: u64) -> Result<(i64, EventData), String> {
    let v: Value = serde_json::from_str(raw).map_err(|e| format!("update is not JSON: {e}"))?;
    let obj = v.as_object().ok_or("update is not a JSON object")?;
    let id = obj.get("update_id").and_then(Value::as_i64).ok_or("update has no integer update_id")?;
    let (kind, payload) = obj
        .iter()
        .find(|(k, _)| k.as_str() != "update_id")
        .map(|(k, v)| (k.as_str(), v))
        .ok_or("update has nothing besides its update_id")?;
    if !payload.is_object() {
        return Err(format!("update field {:?} is not an object", http_util::echo(kind)));
    }
    // The message the update is about: itself, or the one a button was pressed under.
    let message = match kind {
        "callback_query" => payload.get("message"),
        "inline_query" | "chosen_inline_result" | "poll" | "poll_answer" | "shipping_query" | "pre_checkout_query" => {
            None
        }
        _ => Some(payload),
    };
    let chat_id = message.and_then(|m| m.get("chat")).and_then(|c| c.get("id")).and_then(id_text);
    if MESSAGE_KINDS.contains(&kind) && chat_id.is_none() {
        return Err(format!("{kind} has no chat.id (every Telegram message belongs to a chat)"));
    }
    let from = payload.get("from").or_else(|| payload.get("user")).and_then(|u| u.get("id")).and_then(id_text);
    let thread = message
        .filter(|m| m.get("is_topic_message").and_then(Value::as_bool) == Some(true))
        .and_then(|m| m.get("message_thread_id"))
        .and_then(Value::as_i64);
    // Private chats have the user's id as chat id, so `from` is a usable fallback address.
    let mut conversation = chat_id.clone().or_else(|| from.clone()).unwrap_or_default();
    if let Some(t) = thread {
        conversation = format!("{conversation}:{t}");
    }
    let sender =
        from.or_else(|| message.and_then(|m| m.get("sender_chat")).and_then(|c| c.get("id")).and_then(id_text));
    let text_of = |m: &Value| m.get("text").or_else(|| m.get("caption")).and_then(Value::as_str).map(str::to_string);
    let text = match kind {
        "callback_query" => payload.get("data").and_then(Value::as_str).map(str::to_string),
        "inline_query" | "chosen_inline_result" => payload.get("query").and_then(Value::as_str).map(str::to_string),
        "poll" => payload.get("question").and_then(Value::as_str).map(str::to_string),
        _ => message.and_then(text_of),
    };
    let attachments = if kind == "callback_query" { Vec::new() } else { message.map(attachments).unwrap_or_default() };
    let mut meta = vec![
        ("kind".to_string(), kind.to_string()),
        ("update_id".to_string(), id.to_string()),
        ("bot_id".to_string(), bot.id().to_string()),
    ];
    if let Some(mid) = message.and_then(|m| m.get("message_id")).and_then(id_text) {
        meta.push(("message_id".into(), mid));
    }
    if let Some(t) = message.and_then(|m| m.get("chat")).and_then(|c| c.get("type")).and_then(Value::as_str) {
        meta.push(("chat_type".into(), t.to_string()));
    }
    if let Some(u) = payload.get("from").and_then(|f| f.get("username")).and_then(Value::as_str) {
        meta.push(("username".into(), u.chars().take(64).collect()));
    }
    let event = EventData {
        agent: bot.agent.clone(),
        channel: bot.channel(),
        conversation,
        sender,
        dedupe_key: Some(format!("tg:{}:{id}", bot.id())),
        received_at_ms: now,
        text,
        attachments,
        content_type: "application/json".into(),
        raw: raw.as_bytes().to_vec(),
        meta,
    };
    Ok((id, event))
}

/// An update [`update_event`] refused, kept with meta `kind = malformed` and `error`, so the
/// agent sees it and it never blocks the updates behind it. Deduplicated on its `update_id`
/// when it has one (the same key a good update would get), otherwise on its bytes' SHA-256.
pub fn malformed_event(bot: &Bot, raw: &[u8], error: &str, now: u64) -> (Option<i64>, EventData) {
    let json = serde_json::from_slice::<Value>(raw).ok();
    let id = json.as_ref().and_then(|v| v.get("update_id")).and_then(Value::as_i64);
    let dedupe_key = match id {
        Some(id) => format!("tg:{}:{id}", bot.id()),
        None => format!("tg:{}:malformed:{}", bot.id(), hex::encode(Sha256::digest(raw))),
    };
    let mut meta = vec![
        ("kind".to_string(), "malformed".to_string()),
        ("error".to_string(), error.chars().take(MAX_ERROR_LEN).collect()),
        ("bot_id".to_string(), bot.id().to_string()),
    ];
    if let Some(id) = id {
        meta.push(("update_id".into(), id.to_string()));
    }
    let content_type = if json.is_some() { "application/json" } else { "application/octet-stream" };
    let event = EventData {
        agent: bot.agent.clone(),
        channel: bot.channel(),
        conversation: String::new(),
        sender: None,
        dedupe_key: Some(dedupe_key),
        received_at_ms: now,
        text: None,
        attachments: Vec::new(),
        content_type: content_type.into(),
        raw: raw.to_vec(),
        meta,
    };
    (id, event)
}

/// Files of a message, by Telegram `file_id` (the agent fetches them with `getFile`).
fn attachments(m: &Value) -> Vec<Attachment> {
    let mut out = Vec::new();
    let file = |f: &Value| -> Option<Attachment> {
        Some(Attachment {
            reference: f.get("file_id")?.as_str()?.to_string(),
            content_type: f.get("mime_type").and_then(Value::as_str).map(str::to_string),
            name: f.get("file_name").and_then(Value::as_str).map(str::to_string),
            size: f.get("file_size").and_then(Value::as_u64),
        })
    };
    // `photo` is an array of sizes; the last is the largest.
    if let Some(p) = m.get("photo").and_then(Value::as_array).and_then(|a| a.last()).and_then(file) {
        out.push(Attachment { content_type: p.content_type.or(Some("image/jpeg".into())), ..p });
    }
    for key in ["document", "audio", "video", "voice", "video_note", "animation", "sticker"] {
        if let Some(a) = m.get(key).and_then(file) {
            out.push(a);
        }
    }
    out
}

// ---- webhook mode -------------------------------------------------------------------------

/// One bot served in webhook mode.
#[derive(Clone)]
pub struct WebhookBot {
    /// The bot.
    pub bot: Bot,
    /// Expected `X-Telegram-Bot-Api-Secret-Token`.
    pub secret: String,
}

struct WebhookShared {
    bots: HashMap<String, WebhookBot>,
    sink: Arc<dyn EventSink>,
    max_body: usize,
}

/// Serves `POST /telegram/{bot}` for `bots`, answering 200 only after the durable write.
pub fn router(bots: Vec<WebhookBot>, sink: Arc<dyn EventSink>, max_body: usize) -> Router {
    let bots = bots.into_iter().map(|b| (b.bot.name.clone(), b)).collect();
    Router::new().route("/telegram/{bot}", any(webhook)).with_state(Arc::new(WebhookShared { bots, sink, max_body }))
}

async fn webhook(
    State(shared): State<Arc<WebhookShared>>,
    Path(name): Path<String>,
    method: Method,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let Some(hook) = shared.bots.get(&name) else {
        return http_util::error(
            StatusCode::NOT_FOUND,
            format!("unknown telegram bot '{}'", http_util::echo(&name)),
            None,
        );
    };
    if method != Method::POST {
        return http_util::error(StatusCode::METHOD_NOT_ALLOWED, "telegram webhooks accept POST only", None);
    }
    let given = headers.get(SECRET_HEADER).map(|v| v.as_bytes()).unwrap_or_default();
    if !http_util::secret_eq(given, hook.secret.as_bytes()) {
        tracing::debug!(bot = %name, "telegram webhook with a wrong secret token");
        return http_util::error(StatusCode::UNAUTHORIZED, "missing or wrong X-Telegram-Bot-Api-Secret-Token", None);
    }
    let body = match http_util::read_request_body(body, &headers, shared.max_body).await {
        Ok(b) => b,
        Err(r) => return r,
    };
    // A malformed update is stored (kind=malformed) and answered 200: Telegram would
    // otherwise redeliver the same bytes for as long as it keeps the update, failing each time.
    let parsed = std::str::from_utf8(&body)
        .map_err(|_| "update is not UTF-8 JSON".to_string())
        .and_then(|text| update_event(&hook.bot, text, now_ms()));
    let (event, malformed) = match parsed {
        Ok((_, event)) => (event, None),
        Err(e) => {
            tracing::warn!(bot = %name, error = %e, "malformed telegram webhook update; stored as kind=malformed");
            (malformed_event(&hook.bot, &body, &e, now_ms()).1, Some(e))
        }
    };
    match shared.sink.ingest(event).await {
        Ok(i) => {
            let answer =
                serde_json::json!({"ok": true, "offset": i.offset, "duplicate": i.duplicate, "malformed": malformed});
            (StatusCode::OK, axum::Json(answer)).into_response()
        }
        Err(e) => {
            tracing::warn!(bot = %name, error = %e, "telegram update not stored; answering non-2xx so Telegram retries");
            http_util::sink_error(&e)
        }
    }
}

// ---- sends --------------------------------------------------------------------------------

/// Pacing of one bot's sends (Telegram: about 1 message/s per chat, 30/s per bot).
#[derive(Clone, Copy, Debug)]
pub struct Pacing {
    /// Least time between two messages to one chat.
    pub chat_interval: Duration,
    /// Most calls per second for the whole bot.
    pub bot_rate: u32,
}

impl Default for Pacing {
    fn default() -> Self {
        Pacing { chat_interval: Duration::from_secs(1), bot_rate: 30 }
    }
}

/// Performs an agent's sends through one bot, queued and paced.
pub struct TelegramSender {
    http: reqwest::Client,
    bot: Bot,
    /// Per chat: FIFO turns `chat_interval` apart; per bot: calls `1 / bot_rate` apart.
    pacer: Pacer,
}

impl TelegramSender {
    /// A sender for `bot`; `http` should not follow redirects.
    pub fn new(http: reqwest::Client, bot: Bot, pacing: Pacing) -> Self {
        let limits = pacing::Limits {
            key_interval: pacing.chat_interval,
            call_interval: Some(pacing::per_second(pacing.bot_rate)),
            max_queued: MAX_QUEUED_SENDS,
            max_keys: MAX_CHAT_ENTRIES,
        };
        TelegramSender { http, bot, pacer: Pacer::new(limits) }
    }

    /// Calls `call` in its chat's turn, waiting out 429s inside the turn.
    async fn send_paced(&self, call: &Call, turn: Turn<'_>) -> Result<Vec<String>, ApiError> {
        let mut attempt = 0;
        loop {
            turn.call_slot().await;
            let r = call_method(&self.http, &self.bot, &call.method, &call.params).await;
            if let Err(ApiError::Api { code: 429, retry_after, .. }) = &r {
                let wait = Duration::from_secs(retry_after.unwrap_or(1).max(1));
                attempt += 1;
                if attempt <= MAX_RATE_RETRIES && wait <= MAX_RETRY_AFTER {
                    tracing::debug!(bot = %self.bot.name, retry_after_s = wait.as_secs(), "telegram 429; waiting");
                    tokio::time::sleep(wait).await;
                    continue;
                }
            }
            turn.sent();
            return r;
        }
    }
}

async fn call_method(
    http: &reqwest::Client,
    bot: &Bot,
    method: &str,
    params: &Map<String, Value>,
) -> Result<Vec<String>, ApiError> {
    call(http, bot, method, params, SEND_TIMEOUT, |raw| {
        let v: Value = serde_json::from_str(raw.get()).map_err(|e| e.to_string())?;
        let id = |m: &Value| m.get("message_id").and_then(id_text);
        Ok(match &v {
            Value::Array(items) => items.iter().filter_map(id).collect(),
            other => id(other).into_iter().collect(),
        })
    })
    .await
}

/// One Bot API call derived from an agent's send.
#[derive(Debug, PartialEq)]
struct Call {
    method: String,
    params: Map<String, Value>,
    /// The chat whose queue it joins.
    chat_key: String,
    /// Whether it counts as a message for per-chat pacing (chat actions do not).
    paced: bool,
}

/// `conversation` is `<chat id>` or `<chat id>:<message_thread_id>`.
fn split_conversation(conversation: &str) -> (Value, Option<i64>) {
    let (chat, thread) = match conversation.rsplit_once(':') {
        Some((c, t)) if t.parse::<i64>().is_ok() => (c, t.parse::<i64>().ok()),
        _ => (conversation, None),
    };
    let chat = chat.parse::<i64>().map(Value::from).unwrap_or_else(|_| Value::from(chat));
    (chat, thread)
}

/// Builds the API call for a send, or the error to give the agent.
fn build_call(request: &SendRequest) -> Result<Call, SendResult> {
    let structured = request
        .body
        .trim_start()
        .starts_with('{')
        .then(|| serde_json::from_str::<Map<String, Value>>(&request.body).ok())
        .flatten()
        .filter(|m| m.get("method").is_some_and(Value::is_string));
    let (method, mut params) = match structured {
        Some(mut m) => {
            let method = m.remove("method").and_then(|v| v.as_str().map(str::to_string)).unwrap_or_default();
            (method, m)
        }
        None => {
            if request.body.is_empty() {
                return Err(SendResult::err("bad_request", "empty message body", false));
            }
            let mut m = Map::new();
            m.insert("text".into(), Value::from(request.body.clone()));
            ("sendMessage".to_string(), m)
        }
    };
    if !SEND_METHODS.contains(&method.as_str()) {
        return Err(SendResult::err(
            "bad_request",
            format!("method {:?} is not allowed; allowed: {}", http_util::echo(&method), SEND_METHODS.join(", ")),
            false,
        ));
    }
    let (chat, thread) = split_conversation(&request.conversation);
    let addressed_elsewhere = params.contains_key("inline_message_id") || method == "answerCallbackQuery";
    if !addressed_elsewhere && !params.contains_key("chat_id") {
        if request.conversation.is_empty() {
            return Err(SendResult::err("bad_request", "no conversation (chat id) to send to", false));
        }
        params.insert("chat_id".into(), chat);
        if let Some(t) = thread
            && method.starts_with("send")
        {
            params.entry("message_thread_id").or_insert(Value::from(t));
        }
    }
    let chat_key = params.get("chat_id").and_then(id_text).unwrap_or_default();
    let paced = method != "sendChatAction" && method != "answerCallbackQuery";
    Ok(Call { method, params, chat_key, paced })
}

/// Maps a failed call to the agent's error, `retryable` only when nothing can have been sent.
fn send_error(e: ApiError) -> SendResult {
    match e {
        ApiError::Transport { sent: false, message } => {
            SendResult::err("unavailable", format!("Telegram not reachable, nothing sent: {message}"), true)
        }
        ApiError::Transport { sent: true, message } => SendResult::err(
            "outcome_unknown",
            format!("no answer from Telegram; the message may or may not have been sent: {message}"),
            false,
        ),
        ApiError::Decode(m) => SendResult::err("outcome_unknown", m, false),
        ApiError::Api { code: 429, retry_after, description, .. } => {
            SendResult::err("rate_limited", format!("{description} (retry after {} s)", retry_after.unwrap_or(1)), true)
        }
        ApiError::Api { code, description, migrate_to_chat_id: Some(to), .. } => SendResult::err(
            "chat_migrated",
            format!("Telegram error {code}: {description}; the group is now supergroup {to}: send there"),
            false,
        ),
        ApiError::Api { code: 400, description, .. } => SendResult::err("bad_request", description, false),
        ApiError::Api { code: 401 | 404, description, .. } => {
            SendResult::err("unauthorized", format!("Telegram rejects the bot token: {description}"), false)
        }
        ApiError::Api { code: 403, description, .. } => SendResult::err("forbidden", description, false),
        ApiError::Api { code, description, .. } if code >= 500 => SendResult::err(
            "platform_error",
            format!("Telegram error {code}: {description}; the outcome is unknown"),
            false,
        ),
        ApiError::Api { code, description, .. } => {
            SendResult::err("platform_error", format!("Telegram error {code}: {description}"), false)
        }
    }
}

#[async_trait::async_trait]
impl ChannelSender for TelegramSender {
    async fn send(&self, _agent: &str, request: &SendRequest) -> SendResult {
        let call = match build_call(request) {
            Ok(c) => c,
            Err(e) => return e,
        };
        // Chat actions (`paced: false`) keep their place in the chat's queue but neither wait
        // for nor count toward `chat_interval`.
        let Ok(turn) = self.pacer.turn(&call.chat_key, call.paced).await else {
            return SendResult::err(
                "queue_full",
                format!("more than {MAX_QUEUED_SENDS} sends are queued for this bot; nothing sent"),
                true,
            );
        };
        match self.send_paced(&call, turn).await {
            Ok(platform_ids) => SendResult::Ok { platform_ids },
            Err(e) => {
                tracing::debug!(bot = %self.bot.name, error = %e, "telegram send failed");
                send_error(e)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bot() -> Bot {
        Bot { name: "b".into(), agent: "a".into(), token: "42:SECRET".into(), api_base: "http://x".into() }
    }

    fn req(conversation: &str, body: &str) -> SendRequest {
        SendRequest {
            idempotency_key: "k".into(),
            channel: ChannelRef::new("telegram", "b"),
            conversation: conversation.into(),
            body: body.into(),
            reply_to: None,
        }
    }

    #[test]
    fn message_update_becomes_an_event_with_raw_kept() {
        let raw = r#"{"update_id": 7, "message": {"message_id": 3, "from": {"id": 5, "username": "ann"},
            "chat": {"id": -100, "type": "supergroup"}, "is_topic_message": true, "message_thread_id": 9,
            "text": "hi", "photo": [{"file_id": "s"}, {"file_id": "L", "file_size": 10}]}}"#;
        let (id, e) = update_event(&bot(), raw, 1).unwrap();
        assert_eq!(id, 7);
        assert_eq!(e.raw, raw.as_bytes());
        assert_eq!(e.conversation, "-100:9");
        assert_eq!(e.sender.as_deref(), Some("5"));
        assert_eq!(e.text.as_deref(), Some("hi"));
        assert_eq!(e.dedupe_key.as_deref(), Some("tg:42:7"));
        assert_eq!(e.channel, ChannelRef::new("telegram", "b"));
        assert_eq!(e.attachments.len(), 1);
        assert_eq!(e.attachments[0].reference, "L");
        assert!(e.meta.contains(&("kind".into(), "message".into())));
        assert!(e.meta.contains(&("username".into(), "ann".into())));
    }

    #[test]
    fn callback_and_edited_updates() {
        let raw = r#"{"update_id":8,"callback_query":{"id":"q","from":{"id":5},"data":"yes",
            "message":{"message_id":1,"chat":{"id":77,"type":"private"}}}}"#;
        let (_, e) = update_event(&bot(), raw, 1).unwrap();
        assert_eq!((e.conversation.as_str(), e.text.as_deref()), ("77", Some("yes")));
        let raw = r#"{"update_id":9,"edited_message":{"message_id":1,"chat":{"id":77},"text":"fixed",
            "message_thread_id":4}}"#;
        let (_, e) = update_event(&bot(), raw, 1).unwrap();
        assert_eq!(e.conversation, "77", "a thread id outside a forum topic is not part of the conversation");
        assert!(e.meta.contains(&("kind".into(), "edited_message".into())));
        let raw = r#"{"update_id":10,"inline_query":{"id":"i","from":{"id":5},"query":"q"}}"#;
        assert_eq!(update_event(&bot(), raw, 1).unwrap().1.conversation, "5");
    }

    #[test]
    fn malformed_updates_are_errors_not_panics() {
        for raw in ["", "[]", "{}", r#"{"update_id":"x"}"#, "not json"] {
            assert!(update_event(&bot(), raw, 1).is_err(), "{raw}");
        }
    }

    #[test]
    fn plain_text_is_send_message_to_the_conversation() {
        let c = build_call(&req("-100:9", "hello")).unwrap();
        assert_eq!(c.method, "sendMessage");
        assert_eq!(c.params["chat_id"], -100);
        assert_eq!(c.params["message_thread_id"], 9);
        assert_eq!(c.params["text"], "hello");
        assert_eq!(c.chat_key, "-100");
        assert!(c.paced);
        let c = build_call(&req("@channel", "{not a method}")).unwrap();
        assert_eq!((c.method.as_str(), &c.params["chat_id"]), ("sendMessage", &Value::from("@channel")));
    }

    #[test]
    fn json_bodies_select_allowed_methods() {
        let c = build_call(&req("5", r#"{"method":"sendChatAction","action":"typing"}"#)).unwrap();
        assert_eq!((c.method.as_str(), c.paced), ("sendChatAction", false));
        assert_eq!(c.params["chat_id"], 5);
        let c = build_call(&req("5", r#"{"method":"editMessageText","message_id":3,"text":"t"}"#)).unwrap();
        assert_eq!(c.params["message_id"], 3);
        let c = build_call(&req(
            "5",
            r#"{"method":"sendMessage","text":"r","reply_parameters":{"message_id":3},"chat_id":6}"#,
        ))
        .unwrap();
        assert_eq!(c.params["chat_id"], 6, "an explicit chat_id wins");
        assert_eq!(c.params["reply_parameters"]["message_id"], 3);
        match build_call(&req("5", r#"{"method":"deleteWebhook"}"#)) {
            Err(SendResult::Err { code, retryable, .. }) => {
                assert_eq!((code.as_str(), retryable), ("bad_request", false))
            }
            other => panic!("{other:?}"),
        }
        assert!(build_call(&req("5", "")).is_err());
        assert!(build_call(&req("", "x")).is_err());
    }

    #[test]
    fn errors_are_retryable_only_when_nothing_was_sent() {
        let api =
            |code, retry_after| ApiError::Api { code, description: "d".into(), retry_after, migrate_to_chat_id: None };
        let check = |e, want: (&str, bool)| match send_error(e) {
            SendResult::Err { code, retryable, .. } => assert_eq!((code.as_str(), retryable), want),
            other => panic!("{other:?}"),
        };
        check(api(429, Some(3)), ("rate_limited", true));
        check(api(400, None), ("bad_request", false));
        check(api(403, None), ("forbidden", false));
        check(api(401, None), ("unauthorized", false));
        check(api(502, None), ("platform_error", false));
        check(ApiError::Transport { sent: false, message: "refused".into() }, ("unavailable", true));
        check(ApiError::Transport { sent: true, message: "timeout".into() }, ("outcome_unknown", false));
        check(
            ApiError::Api {
                code: 400,
                description: "migrated".into(),
                retry_after: None,
                migrate_to_chat_id: Some(-1),
            },
            ("chat_migrated", false),
        );
    }

    #[test]
    fn debug_hides_the_token() {
        assert!(!format!("{:?}", bot()).contains("SECRET"));
    }

    #[test]
    fn backoff_doubles_up_to_the_cap_with_bounded_jitter() {
        let mut b = Backoff::new();
        let bases: Vec<u64> = (0..9).map(|_| b.next_jittered(0.5).as_millis() as u64).collect();
        assert_eq!(bases, [1_000, 2_000, 4_000, 8_000, 16_000, 32_000, 60_000, 60_000, 60_000]);
        for r in [0.0, 0.25, 0.999_999, 7.0, -1.0] {
            let mut b = Backoff::new();
            let d = b.next_jittered(r);
            assert!(d >= Duration::from_millis(800) && d <= Duration::from_millis(1200), "r={r}: {d:?}");
        }
        let mut b = Backoff::new();
        for _ in 0..20 {
            let d = b.next();
            assert!(d >= BACKOFF_INITIAL.mul_f64(0.8) && d <= BACKOFF_MAX.mul_f64(1.2), "{d:?}");
        }
        b.reset();
        assert_eq!(b.next_jittered(0.5), BACKOFF_INITIAL);
    }

    #[test]
    fn updates_that_are_not_one_of_telegrams_kinds_are_errors() {
        for (raw, why) in [
            (r#"{"update_id":1}"#, "nothing besides"),
            (r#"{"update_id":1,"message":5}"#, "not an object"),
            (r#"{"update_id":1,"message":{"message_id":2,"text":"no chat"}}"#, "no chat.id"),
            (r#"{"update_id":1,"channel_post":{"message_id":2,"chat":{}}}"#, "no chat.id"),
        ] {
            let e = update_event(&bot(), raw, 1).unwrap_err();
            assert!(e.contains(why), "{raw}: {e}");
        }
        // A kind this version does not know yet is stored as that kind, not as malformed.
        let (_, e) = update_event(&bot(), r#"{"update_id":2,"future_kind":{"from":{"id":5}}}"#, 1).unwrap();
        assert!(e.meta.contains(&("kind".into(), "future_kind".into())));
    }

    #[test]
    fn malformed_events_keep_the_bytes_and_dedupe_on_the_update_id_when_there_is_one() {
        let raw = br#"{"update_id":7,"message":{"text":"no chat"}}"#;
        let (id, e) = malformed_event(&bot(), raw, "message has no chat.id", 1);
        assert_eq!((id, e.dedupe_key.as_deref()), (Some(7), Some("tg:42:7")));
        assert_eq!(e.raw, raw);
        assert!(e.meta.contains(&("kind".into(), "malformed".into())));
        assert!(e.meta.contains(&("error".into(), "message has no chat.id".into())));
        let (id, e) = malformed_event(&bot(), b"\xff not json", "x", 1);
        assert_eq!(id, None);
        assert!(e.dedupe_key.as_deref().unwrap().starts_with("tg:42:malformed:"));
        assert_eq!(e.content_type, "application/octet-stream");
        let (_, again) = malformed_event(&bot(), b"\xff not json", "x", 2);
        assert_eq!(e.dedupe_key, again.dedupe_key, "the same bytes dedupe");
    }

    /// Records what it is given; the poller's batch logic is what is under test.
    #[derive(Default)]
    struct Recorder(std::sync::Mutex<Vec<EventData>>);

    #[async_trait::async_trait]
    impl EventSink for Recorder {
        async fn ingest(&self, event: EventData) -> Result<crate::Ingested, SinkError> {
            let mut events = self.0.lock().unwrap();
            events.push(event);
            Ok(crate::Ingested { offset: events.len() as u64, duplicate: false })
        }
    }

    fn raws(updates: &[&str]) -> Vec<Box<RawValue>> {
        updates.iter().map(|u| RawValue::from_string(u.to_string()).unwrap()).collect()
    }

    #[tokio::test]
    async fn a_batch_stores_malformed_updates_too_and_the_offset_passes_every_id() {
        let sink = Recorder::default();
        let batch = raws(&[
            r#"{"update_id":10,"message":{"message_id":1,"chat":{"id":5},"text":"good"}}"#,
            r#"{"update_id":13,"message":{"message_id":2,"text":"no chat"}}"#,
            r#"{"update_id":"x","message":{"message_id":3,"chat":{"id":5}}}"#,
            r#"{"update_id":12,"message":{"message_id":4,"chat":{"id":5},"text":"good too"}}"#,
        ]);
        let out = store_batch(&bot(), &batch, &sink).await.unwrap();
        assert_eq!(out.next_offset, Some(14), "past the malformed update 13 as well");
        assert_eq!(out.malformed.len(), 2, "{:?}", out.malformed);
        assert!(out.malformed[0].starts_with("update 13: message has no chat.id"), "{:?}", out.malformed);
        assert!(out.malformed[1].starts_with("update without update_id:"), "{:?}", out.malformed);
        let kinds: Vec<String> = sink
            .0
            .lock()
            .unwrap()
            .iter()
            .map(|e| e.meta.iter().find(|(k, _)| k == "kind").unwrap().1.clone())
            .collect();
        assert_eq!(kinds, ["message", "malformed", "malformed", "message"], "all stored, in order");
        let report = malformed_report(&out.malformed).unwrap();
        assert!(report.starts_with("2 malformed update(s) stored as kind=malformed: update 13"), "{report}");

        // Only bad updates, all with ids: still confirmed, so they are not fetched forever.
        let out = store_batch(&bot(), &raws(&[r#"{"update_id":20}"#, r#"{"update_id":21,"message":1}"#]), &sink)
            .await
            .unwrap();
        assert_eq!(out.next_offset, Some(22));
        // No id at all: stored, but there is nothing to confirm them with.
        let out = store_batch(&bot(), &raws(&["5", r#"{"message":{}}"#]), &sink).await.unwrap();
        assert_eq!((out.next_offset, out.malformed.len()), (None, 2));
        assert_eq!(sink.0.lock().unwrap().len(), 8);
    }
}
