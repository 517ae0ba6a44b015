//! Discord: one gateway session per bot (inbound) and REST sends (outbound).
//!
//! The gateway client is our own thin one on tokio-tungstenite rather than twilight-gateway:
//! what promise 1 needs is small and must be exact — read one frame, store it, and only then
//! read the next; persist `session_id`, `resume_gateway_url` and the last *stored* sequence in
//! the store so a restarted proxy Resumes; point both the gateway and REST base at a local
//! fake; and set WebSocket buffers explicitly (4 KiB instead of tungstenite's 128 KiB default),
//! which is what keeps an idle gateway around 10 KB.
//!
//! The persisted sequence may lag behind what was stored (it is written after the event): a
//! Resume from an older sequence makes Discord replay a few dispatches, which the dedupe key
//! drops. It never runs ahead of what was stored, so nothing Discord sent is lost.
//!
//! Identify limits: before every Identify (not before a Resume) the task reads
//! `GET /gateway/bot`'s `session_start_limit` and reports `total`, `remaining` (less the
//! Identify that follows), the reset time and `max_concurrency` as connection details for the
//! operator API. With nothing remaining it opens no socket, reports `identify_budget_exhausted`
//! with the reset time, and checks again once the budget has reset. Each bot runs one shard
//! (shard 0), so `max_concurrency` (how many shards may Identify per 5 s) never lets it go
//! faster: one Identify per 5 s per bot, which is within every bucket size.
//!
//! Sends go over reqwest with our own bucket tracker (module `ratelimit`) rather than
//! twilight-http: twilight-http 0.16 can target a fake (`ClientBuilder::proxy(host, true)`,
//! fixed `/api/v10` path) and builds on rustls+ring without aws-lc or native-tls, but its
//! in-memory ratelimiter keys buckets by route path only (it ignores `X-RateLimit-Bucket`, so
//! routes sharing a bucket are counted apart), does not retry a 429, and it would add
//! twilight-model, twilight-validate and twilight-http to the adapters' build (~290 s of
//! compile units on a loaded 2-core machine; twilight-http alone 134 s, twilight-model 88 s).
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use concierge_protocol::{ChannelRef, EventData, SendRequest, SendResult};
use futures::{SinkExt, StreamExt};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use serde_json::value::RawValue;
use sha2::{Digest, Sha256};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use crate::{ChannelSender, ConnectionReporter, EventSink, http_util};

mod ratelimit;

/// Largest gateway message accepted (Discord's READY for big bots is the largest, ~ MBs).
const MAX_WS_MESSAGE: usize = 16 << 20;
/// Timeout for the handshake, Hello, and each REST call.
const CALL_TIMEOUT: Duration = Duration::from_secs(15);
/// Largest REST answer read.
const MAX_RESPONSE: usize = 1 << 20;
/// Reconnect backoff bounds.
const BACKOFF_MIN: Duration = Duration::from_secs(1);
const BACKOFF_MAX: Duration = Duration::from_secs(60);
/// The persisted sequence is written at least this often while events flow.
const PERSIST_EVERY: Duration = Duration::from_millis(200);
/// Least time between two Identify calls of one bot (Discord: 1 per 5 s per concurrency bucket).
const IDENTIFY_INTERVAL: Duration = Duration::from_secs(5);
/// Longest single 429 wait honoured for a send, and most attempts.
const MAX_RETRY_WAIT: Duration = Duration::from_secs(30);
const MAX_SEND_ATTEMPTS: u32 = 4;
/// Gateway dispatches stored as events; everything else only advances the sequence.
const STORED: &[&str] = &[
    "MESSAGE_CREATE",
    "MESSAGE_UPDATE",
    "MESSAGE_DELETE",
    "MESSAGE_REACTION_ADD",
    "MESSAGE_REACTION_REMOVE",
    "INTERACTION_CREATE",
];

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// One configured bot: who gets its events and where its gateway and REST API are.
#[derive(Clone, Debug)]
pub struct Bot {
    /// Channel name (`[discord.<name>]`).
    pub name: String,
    /// Agent receiving the events.
    pub agent: String,
    /// Bot token.
    pub token: String,
    /// Intents bitfield for Identify.
    pub intents: u32,
    /// Gateway URL used for Identify (Discord's, or a fake's).
    pub gateway_url: String,
    /// REST base including `/api/v10` (Discord's, or a fake's).
    pub api_base: String,
}

impl Bot {
    fn channel(&self) -> ChannelRef {
        ChannelRef::new("discord", self.name.clone())
    }
    fn state_key(&self) -> String {
        format!("discord:{}", self.name)
    }
}

/// What survives a proxy restart so the next connection Resumes instead of Identifying.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResumeState {
    /// From READY.
    pub session_id: String,
    /// From READY: where Resume must connect.
    pub resume_gateway_url: String,
    /// Last sequence whose dispatch was stored (or needed no storing).
    pub seq: u64,
}

/// Runs the bot's gateway session until `shutdown` turns true; resume state is kept through
/// [`EventSink::save_state`], so it lives in the same store as the events.
pub fn spawn_gateway(
    http: reqwest::Client,
    bot: Bot,
    sink: Arc<dyn EventSink>,
    reporter: Arc<dyn ConnectionReporter>,
    shutdown: watch::Receiver<bool>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut g = Gateway {
            http,
            bot,
            sink,
            reporter,
            shutdown,
            state: None,
            persisted: 0,
            last_identify: None,
            budget: None,
        };
        g.run().await;
    })
}

/// Why a connection ended.
enum End {
    Shutdown,
    /// Reconnect; Resume if we still hold a session.
    Reconnect(String),
    /// The session is gone (op 9 false, 4007, 4009): Identify afresh.
    Reidentify(String),
    /// Discord refuses this bot (bad token, disallowed intents): stop and report.
    Fatal(String),
}

struct Gateway {
    http: reqwest::Client,
    bot: Bot,
    sink: Arc<dyn EventSink>,
    reporter: Arc<dyn ConnectionReporter>,
    shutdown: watch::Receiver<bool>,
    state: Option<ResumeState>,
    /// Sequence last written to the store.
    persisted: u64,
    /// When this bot last sent Identify (Discord: max_concurrency identifies per 5 s; one shard).
    last_identify: Option<Instant>,
    /// `session_start_limit` from the last `GET /gateway/bot` (less the Identify sent since).
    budget: Option<SessionBudget>,
}

/// Discord's daily session-start budget (`GET /gateway/bot` -> `session_start_limit`).
#[derive(Clone, Copy, Debug)]
struct SessionBudget {
    total: u64,
    remaining: u64,
    /// Unix ms when `remaining` refills to `total`.
    reset_at_ms: u64,
    /// Identify buckets (shard_id % max_concurrency); one shard per bot uses one.
    max_concurrency: u64,
}

#[derive(Deserialize)]
struct Payload<'a> {
    op: u8,
    #[serde(default)]
    s: Option<u64>,
    #[serde(default)]
    t: Option<&'a str>,
    #[serde(borrow, default)]
    d: Option<&'a RawValue>,
}

impl Gateway {
    fn report(&self, state: &str, error: Option<&str>) {
        self.reporter.state("discord", &self.bot.name, state, error);
    }

    async fn run(&mut self) {
        let key = self.bot.state_key();
        let mut backoff = BACKOFF_MIN;
        // Load the persisted session (retrying while the store is down: identifying instead
        // would lose whatever Discord queued for the old session).
        loop {
            match self.sink.load_state(&key).await {
                Ok(bytes) => {
                    self.state = bytes.and_then(|b| serde_json::from_slice(&b).ok());
                    self.persisted = self.state.as_ref().map_or(0, |s| s.seq);
                    break;
                }
                Err(e) => {
                    self.report("store_unavailable", Some(&e.to_string()));
                    if self.sleep(backoff).await {
                        return self.report("stopped", None);
                    }
                    backoff = (backoff * 2).min(BACKOFF_MAX);
                }
            }
        }
        if let Some(s) = &self.state {
            tracing::info!(bot = %self.bot.name, seq = s.seq, "Discord: resuming the persisted gateway session");
        }
        loop {
            let started = Instant::now();
            let end = self.connection().await;
            self.persist().await;
            match end {
                End::Shutdown => break,
                End::Fatal(why) => {
                    tracing::error!(bot = %self.bot.name, %why, "Discord gateway refused this bot; not reconnecting");
                    self.report("failed", Some(&why));
                    let _ = self.shutdown.wait_for(|s| *s).await;
                    break;
                }
                End::Reidentify(why) => {
                    tracing::warn!(bot = %self.bot.name, %why, "Discord session invalidated; identifying afresh");
                    self.state = None;
                    self.report("reconnecting", Some(&why));
                }
                End::Reconnect(why) => {
                    tracing::info!(bot = %self.bot.name, %why, "Discord gateway reconnecting");
                    self.report("reconnecting", Some(&why));
                }
            }
            if started.elapsed() > Duration::from_secs(60) {
                backoff = BACKOFF_MIN;
            }
            // Discord asks for a random 1-5 s wait before re-identifying; jitter always.
            let wait = backoff.mul_f64(0.5 + rand::random::<f64>());
            if self.sleep(wait).await {
                break;
            }
            backoff = (backoff * 2).min(BACKOFF_MAX);
        }
        self.report("stopped", None);
    }

    /// Sleeps, returning true if shutdown was requested meanwhile.
    async fn sleep(&mut self, d: Duration) -> bool {
        if *self.shutdown.borrow() {
            return true;
        }
        tokio::select! {
            _ = tokio::time::sleep(d) => false,
            _ = self.shutdown.changed() => true,
        }
    }

    /// Writes the last stored sequence if it moved (errors only delay it: see module comment).
    async fn persist(&mut self) {
        let Some(s) = &self.state else { return };
        if s.seq == self.persisted {
            return;
        }
        let Ok(bytes) = serde_json::to_vec(s) else { return };
        match self.sink.save_state(&self.bot.state_key(), &bytes).await {
            Ok(()) => self.persisted = s.seq,
            Err(e) => tracing::warn!(bot = %self.bot.name, error = %e, "Discord resume state not persisted yet"),
        }
    }

    async fn connection(&mut self) -> End {
        // Identify pacing and the daily budget are waited out before connecting, not on an
        // open socket (which would have to heartbeat meanwhile).
        if self.state.is_none() {
            if let Some(wait) = self.last_identify.and_then(|t| IDENTIFY_INTERVAL.checked_sub(t.elapsed()))
                && self.sleep(wait).await
            {
                return End::Shutdown;
            }
            if let Some(end) = Box::pin(self.identify_budget()).await {
                return end;
            }
        }
        let base = self.state.as_ref().map_or(self.bot.gateway_url.clone(), |s| s.resume_gateway_url.clone());
        let url = format!("{}/?v=10&encoding=json", base.trim_end_matches('/'));
        // Boxed: the handshake future (TLS included) is large, and an idle gateway task should
        // not carry its state for the connection's lifetime.
        let connect = Box::pin(tokio_tungstenite::connect_async_with_config(
            url.as_str(),
            Some(http_util::ws_config(MAX_WS_MESSAGE)),
            true,
        ));
        let mut ws = match tokio::time::timeout(CALL_TIMEOUT, connect).await {
            Err(_) => return End::Reconnect("gateway handshake timed out".into()),
            Ok(Err(e)) => return End::Reconnect(format!("gateway handshake: {e}")),
            Ok(Ok((ws, _))) => ws,
        };
        // Hello.
        let interval = match tokio::time::timeout(CALL_TIMEOUT, ws.next()).await {
            Ok(Some(Ok(Message::Text(t)))) => match hello_interval(t.as_str()) {
                Some(i) => i,
                None => return End::Reconnect("first gateway message was not Hello".into()),
            },
            Ok(Some(Ok(Message::Close(f)))) => return close_end(f.as_ref()),
            _ => return End::Reconnect("no Hello from the gateway".into()),
        };
        let hello = match &self.state {
            Some(s) => {
                serde_json::json!({"op": 6, "d": {"token": self.bot.token, "session_id": s.session_id, "seq": s.seq}})
            }
            None => {
                self.last_identify = Some(Instant::now());
                serde_json::json!({"op": 2, "d": {
                    "token": self.bot.token,
                    "intents": self.bot.intents,
                    "properties": {"os": std::env::consts::OS, "browser": "concierge", "device": "concierge"},
                }})
            }
        };
        if let Err(e) = ws.send(Message::text(hello.to_string())).await {
            return End::Reconnect(format!("sending Identify/Resume: {e}"));
        }
        if self.state.is_none()
            && let Some(b) = &mut self.budget
        {
            // Discord counts the Identify when it arrives; show it until the next check.
            b.remaining = b.remaining.saturating_sub(1);
            self.report_budget();
        }
        let end = self.pump(&mut ws, interval).await;
        // A close code other than 1000/1001 keeps the session resumable.
        let frame = CloseFrame { code: CloseCode::Library(4000), reason: "reconnecting".into() };
        let _ = tokio::time::timeout(Duration::from_secs(2), ws.close(Some(frame))).await;
        end
    }

    /// GET /gateway/bot before Identify: reports the daily session-start budget and, when it
    /// is spent, waits (no socket open) until its reset and checks again. An unanswered check
    /// lets the Identify go: Discord enforces the budget itself.
    async fn identify_budget(&mut self) -> Option<End> {
        loop {
            let resp = self
                .http
                .get(format!("{}/gateway/bot", self.bot.api_base))
                .header("Authorization", format!("Bot {}", self.bot.token))
                // Once per Identify: an idle pooled connection per bot would outweigh the gateway.
                .header("Connection", "close")
                .timeout(CALL_TIMEOUT)
                .send()
                .await;
            let Ok(resp) = resp else { return None };
            if resp.status() == reqwest::StatusCode::UNAUTHORIZED {
                return Some(End::Fatal("GET /gateway/bot: 401 Unauthorized (bad bot token)".into()));
            }
            let body = http_util::read_response(resp, MAX_RESPONSE).await.ok()?;
            let v: Value = serde_json::from_slice(&body).ok()?;
            let limit = v.get("session_start_limit")?;
            let num = |k: &str| limit.get(k).and_then(Value::as_u64);
            let remaining = num("remaining")?;
            let reset_after = num("reset_after").unwrap_or(60_000).min(86_400_000);
            let budget = SessionBudget {
                total: num("total").unwrap_or(0),
                remaining,
                reset_at_ms: concierge_protocol::now_ms().saturating_add(reset_after),
                max_concurrency: num("max_concurrency").unwrap_or(1),
            };
            tracing::info!(bot = %self.bot.name, remaining, total = budget.total, "Discord session starts left today");
            self.budget = Some(budget);
            self.report_budget();
            if remaining > 0 {
                return None;
            }
            let at = std::time::UNIX_EPOCH + Duration::from_millis(budget.reset_at_ms);
            let msg = format!(
                "daily session-start budget exhausted ({} per day): not identifying until it resets at {} (in {} s)",
                budget.total,
                humantime::format_rfc3339_seconds(at),
                reset_after / 1000
            );
            tracing::warn!(bot = %self.bot.name, "{msg}");
            self.report("identify_budget_exhausted", Some(&msg));
            if self.sleep(Duration::from_millis(reset_after.max(1000))).await {
                return Some(End::Shutdown);
            }
        }
    }

    /// Publishes the last known session-start budget on the operator API.
    fn report_budget(&self) {
        let Some(b) = self.budget else { return };
        let name = &self.bot.name;
        for (key, value) in [
            ("identify_total", b.total),
            ("identify_remaining", b.remaining),
            ("identify_reset_at_ms", b.reset_at_ms),
            ("identify_max_concurrency", b.max_concurrency),
        ] {
            self.reporter.detail("discord", name, key, value);
        }
    }

    /// Reads frames one at a time; a dispatch is stored before the next frame is read.
    async fn pump(&mut self, ws: &mut Ws, interval: Duration) -> End {
        let mut hb = Heartbeat::new(interval);
        let mut last_persist = tokio::time::Instant::now();
        loop {
            // A stored-but-unpersisted sequence is written within PERSIST_EVERY, idle or not.
            let dirty = self.state.as_ref().is_some_and(|s| s.seq != self.persisted);
            let msg = tokio::select! {
                _ = self.shutdown.changed() => return End::Shutdown,
                _ = tokio::time::sleep_until(last_persist + PERSIST_EVERY), if dirty => {
                    self.persist().await;
                    last_persist = tokio::time::Instant::now();
                    continue;
                }
                _ = hb.due() => {
                    if let Err(end) = hb.beat(ws, self.seq()).await { return end; }
                    continue;
                }
                m = ws.next() => m,
            };
            let text = match msg {
                None => return End::Reconnect("gateway closed the connection".into()),
                Some(Err(e)) => return End::Reconnect(format!("gateway read: {e}")),
                Some(Ok(Message::Text(t))) => t,
                Some(Ok(Message::Close(f))) => return close_end(f.as_ref()),
                Some(Ok(_)) => continue,
            };
            let Ok(p) = serde_json::from_str::<Payload>(text.as_str()) else {
                tracing::warn!(bot = %self.bot.name, "ignoring a gateway message that is not a JSON payload");
                continue;
            };
            match p.op {
                0 => {
                    if let Err(end) = self.dispatch(ws, &mut hb, &p, text.as_str()).await {
                        return end;
                    }
                    // A new session (READY) is persisted at once: a restart must find it.
                    if self.persisted == 0 || last_persist.elapsed() >= PERSIST_EVERY {
                        self.persist().await;
                        last_persist = tokio::time::Instant::now();
                    }
                }
                1 => {
                    if let Err(end) = hb.send(ws, self.seq()).await {
                        return end;
                    }
                }
                11 => hb.acked = true,
                7 => return End::Reconnect("gateway asked to reconnect (op 7)".into()),
                9 => {
                    let resumable = p.d.is_some_and(|d| d.get() == "true");
                    return if resumable {
                        End::Reconnect("invalid session, resumable (op 9)".into())
                    } else {
                        End::Reidentify("invalid session, not resumable (op 9)".into())
                    };
                }
                _ => {}
            }
        }
    }

    fn seq(&self) -> Option<u64> {
        self.state.as_ref().map(|s| s.seq)
    }

    /// Handles one dispatch: READY/RESUMED bookkeeping, or store-then-advance the sequence.
    async fn dispatch(&mut self, ws: &mut Ws, hb: &mut Heartbeat, p: &Payload<'_>, raw: &str) -> Result<(), End> {
        let (Some(seq), Some(t)) = (p.s, p.t) else { return Ok(()) };
        match t {
            "READY" => {
                let d: Value = p.d.and_then(|d| serde_json::from_str(d.get()).ok()).unwrap_or(Value::Null);
                let session_id = d.get("session_id").and_then(Value::as_str).unwrap_or_default().to_string();
                let resume = d.get("resume_gateway_url").and_then(Value::as_str).unwrap_or(&self.bot.gateway_url);
                self.state = Some(ResumeState { session_id, resume_gateway_url: resume.to_string(), seq });
                self.persisted = 0;
                tracing::info!(bot = %self.bot.name, "Discord gateway identified (READY)");
                self.report("connected", None);
                return Ok(());
            }
            "RESUMED" => {
                tracing::info!(bot = %self.bot.name, "Discord gateway session resumed");
                self.report("connected", None);
            }
            _ if STORED.contains(&t) => {
                let Some(event) = self.event(t, p.d, raw) else {
                    tracing::warn!(bot = %self.bot.name, kind = t, seq, "malformed dispatch kept out of the store");
                    self.advance(seq);
                    return Ok(());
                };
                // Keep heartbeating while the store works; read nothing else meanwhile.
                let ingest = self.sink.ingest(event);
                tokio::pin!(ingest);
                let result = loop {
                    tokio::select! {
                        r = &mut ingest => break r,
                        _ = hb.due() => hb.beat(ws, self.state.as_ref().map(|s| s.seq)).await?,
                    }
                };
                if let Err(e) = result {
                    // Not stored: reconnect and Resume from the last stored sequence, so
                    // Discord replays this dispatch.
                    self.report("store_unavailable", Some(&e.to_string()));
                    return Err(End::Reconnect(format!("event not stored: {e}")));
                }
            }
            _ => {}
        }
        self.advance(seq);
        Ok(())
    }

    fn advance(&mut self, seq: u64) {
        if let Some(s) = &mut self.state {
            s.seq = s.seq.max(seq);
        }
    }

    fn event(&self, t: &str, d: Option<&RawValue>, raw: &str) -> Option<EventData> {
        let d: Value = serde_json::from_str(d?.get()).ok()?;
        let s = |v: &Value, k: &str| v.get(k).and_then(Value::as_str).map(str::to_string);
        let channel_id = s(&d, "channel_id")?;
        let (dedupe, sender, text) = match t {
            "MESSAGE_CREATE" => {
                (format!("msg:{}", s(&d, "id")?), d.get("author").and_then(|a| s(a, "id")), s(&d, "content"))
            }
            "MESSAGE_UPDATE" => {
                let digest = hex::encode(&Sha256::digest(d.to_string().as_bytes())[..12]);
                (format!("upd:{}:{digest}", s(&d, "id")?), d.get("author").and_then(|a| s(a, "id")), s(&d, "content"))
            }
            "MESSAGE_DELETE" => (format!("del:{}", s(&d, "id")?), None, None),
            "MESSAGE_REACTION_ADD" | "MESSAGE_REACTION_REMOVE" => {
                let emoji = d.get("emoji")?;
                let e = s(emoji, "id").or_else(|| s(emoji, "name"))?;
                let sign = if t == "MESSAGE_REACTION_ADD" { "+" } else { "-" };
                let user = s(&d, "user_id")?;
                (format!("react{sign}:{}:{user}:{e}", s(&d, "message_id")?), Some(user), s(emoji, "name"))
            }
            "INTERACTION_CREATE" => {
                let user =
                    d.get("member").and_then(|m| m.get("user")).or_else(|| d.get("user")).and_then(|u| s(u, "id"));
                let text = d.get("data").and_then(|x| s(x, "name").or_else(|| s(x, "custom_id")));
                (format!("int:{}", s(&d, "id")?), user, text)
            }
            _ => return None,
        };
        let mut meta = vec![("dispatch".to_string(), t.to_string())];
        if let Some(g) = s(&d, "guild_id") {
            meta.push(("guild_id".into(), g));
        }
        Some(EventData {
            agent: self.bot.agent.clone(),
            channel: self.bot.channel(),
            conversation: channel_id,
            sender,
            dedupe_key: Some(format!("dc:{}:{dedupe}", self.bot.name)),
            received_at_ms: concierge_protocol::now_ms(),
            text,
            attachments: Vec::new(),
            content_type: "application/json".into(),
            raw: raw.as_bytes().to_vec(),
            meta,
        })
    }
}

fn hello_interval(text: &str) -> Option<Duration> {
    let v: Value = serde_json::from_str(text).ok()?;
    if v.get("op").and_then(Value::as_u64) != Some(10) {
        return None;
    }
    let ms = v.get("d")?.get("heartbeat_interval")?.as_u64()?;
    Some(Duration::from_millis(ms.clamp(100, 600_000)))
}

/// Maps a gateway close to what to do next (Discord's documented close codes).
fn close_end(frame: Option<&CloseFrame>) -> End {
    let code = frame.map_or(1005, |f| u16::from(f.code));
    let reason = frame.map(|f| f.reason.to_string()).unwrap_or_default();
    let why = format!("gateway closed with {code} {reason}");
    match code {
        4004 => End::Fatal(format!("{why} (authentication failed: check the bot token)")),
        4010..=4013 => End::Fatal(why),
        4014 => End::Fatal(format!(
            "{why} (disallowed intents: enable privileged intents such as MESSAGE_CONTENT in the Developer Portal)"
        )),
        4007 | 4009 => End::Reidentify(why),
        _ => End::Reconnect(why),
    }
}

/// Heartbeat timer with a jittered first beat and zombie detection (no ACK since the last beat).
struct Heartbeat {
    interval: Duration,
    next: tokio::time::Instant,
    acked: bool,
}

impl Heartbeat {
    fn new(interval: Duration) -> Self {
        let first = interval.mul_f64(rand::random::<f64>());
        Self { interval, next: tokio::time::Instant::now() + first, acked: true }
    }

    async fn due(&self) {
        tokio::time::sleep_until(self.next).await;
    }

    async fn beat(&mut self, ws: &mut Ws, seq: Option<u64>) -> Result<(), End> {
        if !self.acked {
            return Err(End::Reconnect("zombie connection: no heartbeat ACK".into()));
        }
        self.send(ws, seq).await?;
        self.acked = false;
        self.next = tokio::time::Instant::now() + self.interval;
        Ok(())
    }

    async fn send(&mut self, ws: &mut Ws, seq: Option<u64>) -> Result<(), End> {
        let d = seq.map_or("null".to_string(), |s| s.to_string());
        ws.send(Message::text(format!("{{\"op\":1,\"d\":{d}}}")))
            .await
            .map_err(|e| End::Reconnect(format!("sending heartbeat: {e}")))
    }
}

// ---------------------------------------------------------------------------------------
// Sends

/// Sends for one bot over REST: create (with reply reference), edit, react; Discord's rate
/// limit buckets are tracked per bot (see [`ratelimit`]) so sends wait instead of hitting 429s.
pub struct DiscordSender {
    http: reqwest::Client,
    bot: Bot,
    limits: ratelimit::Limiter,
}

impl DiscordSender {
    /// A sender for `bot`, sharing the proxy's HTTP client.
    pub fn new(http: reqwest::Client, bot: Bot) -> Self {
        Self { http, bot, limits: ratelimit::Limiter::default() }
    }
}

/// Structured send bodies (JSON objects); a body that is not a JSON object is plain text.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct Structured {
    content: Option<String>,
    reply_to_message_id: Option<String>,
    edit_message_id: Option<String>,
    react_message_id: Option<String>,
    emoji: Option<String>,
}

#[async_trait]
impl ChannelSender for DiscordSender {
    async fn send(&self, _agent: &str, request: &SendRequest) -> SendResult {
        let channel = request.conversation.as_str();
        if channel.is_empty() || !channel.bytes().all(|b| b.is_ascii_digit()) {
            return SendResult::err("bad_conversation", format!("not a Discord channel id: {channel:?}"), false);
        }
        let body = request.body.trim_start();
        let s: Structured = if body.starts_with('{') {
            match serde_json::from_str(body) {
                Ok(s) => s,
                Err(e) => {
                    return SendResult::err(
                        "bad_body",
                        format!(
                            "JSON send body: {e} (fields: content, reply_to_message_id, edit_message_id, react_message_id, emoji)"
                        ),
                        false,
                    );
                }
            }
        } else {
            Structured { content: Some(request.body.clone()), ..Structured::default() }
        };
        let Ok(mut url) = reqwest::Url::parse(&self.bot.api_base) else {
            return SendResult::err("bad_config", "api_base is not a URL", false);
        };
        let (method, template, json) = {
            let Ok(mut seg) = url.path_segments_mut() else {
                return SendResult::err("bad_config", "api_base cannot take a path", false);
            };
            seg.pop_if_empty().extend(["channels", channel, "messages"]);
            if let Some(mid) = &s.react_message_id {
                let Some(emoji) = &s.emoji else {
                    return SendResult::err("bad_body", "react_message_id needs emoji", false);
                };
                seg.extend([mid.as_str(), "reactions", emoji.as_str(), "@me"]);
                (reqwest::Method::PUT, "/channels/{channel_id}/messages/{message_id}/reactions/{emoji}/@me", None)
            } else if let Some(mid) = &s.edit_message_id {
                seg.push(mid);
                let json = serde_json::json!({ "content": s.content });
                (reqwest::Method::PATCH, "/channels/{channel_id}/messages/{message_id}", Some(json))
            } else {
                let Some(content) = &s.content else {
                    return SendResult::err("bad_body", "nothing to send: no content", false);
                };
                let mut j = serde_json::json!({ "content": content });
                if let Some(r) = &s.reply_to_message_id {
                    j["message_reference"] = serde_json::json!({ "message_id": r, "fail_if_not_exists": false });
                }
                (reqwest::Method::POST, "/channels/{channel_id}/messages", Some(j))
            }
        };
        let route = ratelimit::Route { method: method.to_string(), template, major: channel.to_string() };
        self.call(&route, method, url, json).await
    }
}

impl DiscordSender {
    async fn call(
        &self,
        route: &ratelimit::Route,
        method: reqwest::Method,
        url: reqwest::Url,
        json: Option<Value>,
    ) -> SendResult {
        // Sends of one route (channel) go one at a time, in order, each waiting for its bucket.
        let _turn = match self.limits.turn(route).await {
            Ok(turn) => turn,
            Err(full) => return SendResult::err("queue_full", full.to_string(), true),
        };
        for _ in 1..=MAX_SEND_ATTEMPTS {
            let ticket = match self.limits.acquire(route, MAX_RETRY_WAIT).await {
                Ok(t) => t,
                Err(wait) => {
                    let secs = wait.as_secs_f64();
                    return SendResult::err("rate_limited", format!("Discord asks to wait {secs:.1} s"), true);
                }
            };
            let mut req = self
                .http
                .request(method.clone(), url.clone())
                .header("Authorization", format!("Bot {}", self.bot.token))
                .timeout(CALL_TIMEOUT);
            req = match &json {
                Some(j) => req.json(j),
                None => req.header("Content-Length", "0"),
            };
            let resp = match req.send().await {
                Ok(r) => r,
                Err(e) if e.is_connect() => {
                    return SendResult::err("unreachable", format!("Discord API: {}", e.without_url()), true);
                }
                Err(e) => {
                    return SendResult::err("unknown_outcome", format!("Discord API: {}", e.without_url()), false);
                }
            };
            let status = resp.status();
            let headers = resp.headers().clone();
            let body = http_util::read_response(resp, MAX_RESPONSE).await.unwrap_or_default();
            let v: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
            let answer = ratelimit::Answer::parse(status.as_u16(), &headers, &v);
            ticket.answer(&answer);
            if status.is_success() {
                let ids = v.get("id").and_then(Value::as_str).map(|s| vec![s.to_string()]).unwrap_or_default();
                return SendResult::Ok { platform_ids: ids };
            }
            let message = v.get("message").and_then(Value::as_str).unwrap_or("").to_string();
            if status == reqwest::StatusCode::TOO_MANY_REQUESTS {
                // Nothing was created; the limiter now holds the bucket (or the bot) back.
                let wait_ms = answer.retry_after.map_or(0, |d| d.as_millis() as u64);
                tracing::info!(bot = %self.bot.name, wait_ms, global = answer.global, scope = ?answer.scope, "Discord 429: waiting");
                continue;
            }
            let code = match status.as_u16() {
                401 => "unauthorized",
                403 => "forbidden",
                404 => "not_found",
                400 => "bad_request",
                _ => "platform_error",
            };
            // 4xx: Discord created nothing, but the same request fails the same way.
            return SendResult::err(code, format!("Discord answered {status}: {message}"), false);
        }
        SendResult::err("rate_limited", "Discord kept answering 429", true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gateway() -> Gateway {
        let (_tx, shutdown) = watch::channel(false);
        struct NoSink;
        #[async_trait]
        impl EventSink for NoSink {
            async fn ingest(&self, _: EventData) -> Result<crate::Ingested, crate::SinkError> {
                Err(crate::SinkError::Unavailable("test".into()))
            }
        }
        struct NoReport;
        impl ConnectionReporter for NoReport {
            fn state(&self, _: &str, _: &str, _: &str, _: Option<&str>) {}
        }
        let bot = Bot {
            name: "bot".into(),
            agent: "a".into(),
            token: "t".into(),
            intents: 0,
            gateway_url: "ws://x".into(),
            api_base: "http://x".into(),
        };
        Gateway {
            http: reqwest::Client::new(),
            bot,
            sink: Arc::new(NoSink),
            reporter: Arc::new(NoReport),
            shutdown,
            state: None,
            persisted: 0,
            last_identify: None,
            budget: None,
        }
    }

    #[test]
    fn close_codes_map_to_documented_actions() {
        let f = |c: u16| CloseFrame { code: CloseCode::from(c), reason: "".into() };
        assert!(matches!(close_end(Some(&f(4004))), End::Fatal(m) if m.contains("token")));
        assert!(matches!(close_end(Some(&f(4014))), End::Fatal(m) if m.contains("MESSAGE_CONTENT")));
        assert!(matches!(close_end(Some(&f(4009))), End::Reidentify(_)));
        assert!(matches!(close_end(Some(&f(4007))), End::Reidentify(_)));
        assert!(matches!(close_end(Some(&f(4000))), End::Reconnect(_)));
        assert!(matches!(close_end(None), End::Reconnect(_)));
    }

    #[test]
    fn dedupe_keys_and_conversation() {
        let g = gateway();
        let ev = |t: &str, d: &str| g.event(t, Some(&RawValue::from_string(d.to_string()).unwrap()), "raw");
        let m = ev("MESSAGE_CREATE", r#"{"id":"1","channel_id":"2","author":{"id":"3"},"content":"hi"}"#).unwrap();
        assert_eq!(m.dedupe_key.as_deref(), Some("dc:bot:msg:1"));
        assert_eq!((m.conversation.as_str(), m.sender.as_deref(), m.text.as_deref()), ("2", Some("3"), Some("hi")));
        assert_eq!(m.raw, b"raw");
        let e1 = ev("MESSAGE_UPDATE", r#"{"id":"1","channel_id":"2","content":"a"}"#).unwrap();
        let e2 = ev("MESSAGE_UPDATE", r#"{"id":"1","channel_id":"2","content":"b"}"#).unwrap();
        assert_ne!(e1.dedupe_key, e2.dedupe_key, "two different edits are two events");
        let r = ev(
            "MESSAGE_REACTION_ADD",
            r#"{"user_id":"9","channel_id":"2","message_id":"1","emoji":{"id":null,"name":"x"}}"#,
        )
        .unwrap();
        assert_eq!(r.dedupe_key.as_deref(), Some("dc:bot:react+:1:9:x"));
        assert!(ev("MESSAGE_CREATE", r#"{"channel_id":"2"}"#).is_none(), "no id, no event");
        assert!(ev("MESSAGE_CREATE", r#"[1]"#).is_none());
    }

    #[test]
    fn hello_is_parsed_and_bounded() {
        assert_eq!(hello_interval(r#"{"op":10,"d":{"heartbeat_interval":41250}}"#), Some(Duration::from_millis(41250)));
        assert_eq!(hello_interval(r#"{"op":10,"d":{"heartbeat_interval":1}}"#), Some(Duration::from_millis(100)));
        assert_eq!(hello_interval(r#"{"op":0,"d":{}}"#), None);
    }
}
