//! The admin listener: the dashboard (`GET /`), its JSON API, operator actions with an audit
//! log, `/metrics`, and health probes.
//!
//! Authentication: with no token configured (loopback only, enforced by config validation)
//! everything is open. Otherwise every route except `/`, the static assets, `/livez` and
//! `/readyz` needs `Authorization: Bearer <token>`: the admin token may do everything, the
//! read-only token (`server.admin_read_token`) may only read (GET), including `/metrics`
//! (Prometheus sends bearer tokens via `authorization` in its scrape config). The page itself
//! carries no data, so it is served without a token; its script asks for one.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::extract::{Path, Query, Request, State};
use axum::http::{Method, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use base64::Engine as _;
use concierge_protocol::{Event, now_ms};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use subtle::ConstantTimeEq;

use crate::app::App;
use crate::dashboard;
use crate::fleet::AgentRuntime;
use crate::lifecycle::Input;
use crate::metrics::state_name;

/// Largest page of events one call returns.
const MAX_PAGE: usize = 1000;
/// Most events one filtered listing examines; the answer says where to continue.
const MAX_SCAN: usize = 5000;
/// Audit entries kept (in memory and in the store's `admin:audit` record; each is also
/// logged with target `audit`).
const AUDIT_KEEP: usize = 1000;
/// The store state record holding the audit log (JSON, newest last).
const AUDIT_KEY: &str = "admin:audit";
/// Live-update streams served at once (each costs one fleet walk per tick).
const MAX_STREAMS: usize = 16;
/// How often the live stream sends changes.
const STREAM_TICK: Duration = Duration::from_secs(1);
/// Longest a single live stream stays open; the page reconnects.
const STREAM_MAX: Duration = Duration::from_secs(3600);

/// What a request may do, from its bearer token.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Read and act (admin token, or no token configured).
    Admin,
    /// Read only (`admin_read_token`).
    Read,
}

/// One operator action, as recorded.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct AuditEntry {
    /// Unix ms.
    pub at_ms: u64,
    /// Who: `admin` (token) or `open` (no token configured).
    pub actor: String,
    /// `wake`, `pause`, `resume`, `redeliver`, `drop`.
    pub action: String,
    /// The agent acted on.
    pub agent: String,
    /// Parameters and effect.
    pub detail: String,
    /// `ok` or the error.
    pub result: String,
}

/// The audit log: entries newest last, and whether the stored record was read yet.
#[derive(Default)]
struct AuditLog {
    entries: VecDeque<AuditEntry>,
    loaded: bool,
}

/// State of the admin listener: the app plus what only operators need.
pub struct Admin {
    app: Arc<App>,
    /// Async lock: recording an action writes the store record while holding it (actions are
    /// rare; this keeps stored records in order).
    audit: tokio::sync::Mutex<AuditLog>,
    streams: Arc<tokio::sync::Semaphore>,
    /// Agent ids, sorted (the fleet is fixed at start), so a fleet walk does not sort.
    ids: Vec<String>,
    /// Channels of each agent, computed once: per-row scans of every route made the fleet
    /// view quadratic (1.6 s at 10,000 agents with a route each).
    channels: HashMap<String, Vec<AgentChannel>>,
    /// Unix ms when the admin listener started (the timeline knows nothing before).
    started_at_ms: u64,
}

/// A channel that feeds an agent, and the held connection (registry key) it arrives through.
struct AgentChannel {
    kind: &'static str,
    name: String,
    /// `(channel, name)` in the connection registry; `None` for push-only channels (the
    /// platform calls our webhook ingress, nothing is held).
    held: Option<(String, String)>,
}

/// Every agent's channels from the config: webhook routes, Telegram/Slack/Discord bots,
/// WhatsApp numbers and email addresses.
fn agent_channels(config: &concierge_config::Config) -> HashMap<String, Vec<AgentChannel>> {
    use concierge_config::{SlackMode, TelegramMode};
    let mut map: HashMap<String, Vec<AgentChannel>> = HashMap::new();
    let mut add = |agent: &str, kind: &'static str, name: &str, held: Option<(&str, &str)>| {
        map.entry(agent.to_string()).or_default().push(AgentChannel {
            kind,
            name: name.to_string(),
            held: held.map(|(c, n)| (c.to_string(), n.to_string())),
        });
    };
    for (name, hook) in &config.webhooks {
        add(&hook.agent, "webhook", name, Some(("webhook", name)));
    }
    for (name, bot) in &config.telegram {
        add(&bot.agent, "telegram", name, (bot.mode == TelegramMode::Poll).then_some(("telegram", name)));
    }
    for (name, app) in &config.slack {
        add(&app.agent, "slack", name, (app.mode == SlackMode::Socket).then_some(("slack", name)));
    }
    for (name, bot) in &config.discord {
        add(&bot.agent, "discord", name, Some(("discord", name)));
    }
    for (name, number) in &config.whatsapp {
        add(&number.agent, "whatsapp", name, None);
    }
    if let Some(smtp) = &config.smtp {
        let listener = smtp.listen.to_string();
        for (address, agent) in &smtp.addresses {
            add(agent, "email", address, Some(("smtp", &listener)));
        }
    }
    map
}

/// A channel of a fleet row with the state of its held connection: the registry's state
/// (`connected`, `listening`, `reconnecting`, `failed`, ...), `starting` before the adapter
/// first reported, or `push` when nothing is held (the platform calls the ingress).
#[derive(Clone, Serialize)]
struct ChannelRow<'a> {
    kind: &'static str,
    name: &'a str,
    state: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    last_error: Option<String>,
}

impl Admin {
    /// Records an action: in memory, in the store's audit record, and as an `audit` log line.
    async fn record(&self, action: &'static str, agent: &str, detail: String, result: &Result<(), String>) {
        let actor = if self.app.config.server.admin_token.is_some() { "admin" } else { "open" };
        let result = match result {
            Ok(()) => "ok".to_string(),
            Err(e) => e.clone(),
        };
        tracing::info!(target: "audit", actor, action, agent, %detail, %result, "operator action");
        let entry = AuditEntry {
            at_ms: now_ms(),
            actor: actor.into(),
            action: action.into(),
            agent: agent.to_string(),
            detail,
            result,
        };
        let mut log = self.audit_log().await;
        log.entries.push_back(entry);
        while log.entries.len() > AUDIT_KEEP {
            log.entries.pop_front();
        }
        if !log.loaded {
            // The stored record could not be read: writing now would replace older entries.
            tracing::warn!(key = AUDIT_KEY, "audit entry kept in memory only: the stored audit log is unreadable");
            return;
        }
        match serde_json::to_vec(&log.entries) {
            Ok(bytes) => {
                if let Err(e) = self.app.store.put_state(AUDIT_KEY, &bytes).await {
                    tracing::warn!(key = AUDIT_KEY, error = %e, "audit entry kept in memory only: store write failed");
                }
            }
            Err(e) => tracing::warn!(key = AUDIT_KEY, error = %e, "cannot encode the audit log"),
        }
    }

    /// The audit log, read from the store first if that has not succeeded yet (stored entries
    /// go before any recorded while the store was unreadable).
    async fn audit_log(&self) -> tokio::sync::MutexGuard<'_, AuditLog> {
        let mut log = self.audit.lock().await;
        if !log.loaded {
            match self.app.store.get_state(AUDIT_KEY).await {
                Ok(None) => log.loaded = true,
                Ok(Some(bytes)) => match serde_json::from_slice::<VecDeque<AuditEntry>>(&bytes) {
                    Ok(mut stored) => {
                        stored.extend(log.entries.drain(..));
                        while stored.len() > AUDIT_KEEP {
                            stored.pop_front();
                        }
                        log.entries = stored;
                        log.loaded = true;
                    }
                    Err(e) => {
                        // Keep it unloaded so the corrupt record is not overwritten silently.
                        tracing::warn!(key = AUDIT_KEY, error = %e, "the stored audit log is corrupt; not overwriting it")
                    }
                },
                Err(e) => tracing::warn!(key = AUDIT_KEY, error = %e, "cannot read the stored audit log yet"),
            }
        }
        log
    }
}

/// Routes of the admin listener.
pub fn router(app: Arc<App>) -> axum::Router {
    let mut ids: Vec<String> = app.fleet.keys().cloned().collect();
    ids.sort();
    let by_agent = agent_channels(&app.config);
    let admin = Arc::new(Admin {
        app,
        audit: tokio::sync::Mutex::new(AuditLog::default()),
        streams: Arc::new(tokio::sync::Semaphore::new(MAX_STREAMS)),
        ids,
        channels: by_agent,
        started_at_ms: now_ms(),
    });
    // Read the stored audit log now rather than at the first look or action.
    if let Ok(runtime) = tokio::runtime::Handle::try_current() {
        let admin = admin.clone();
        runtime.spawn(async move { drop(admin.audit_log().await) });
    }
    let api = axum::Router::new()
        .route("/api/agents", get(agents))
        .route("/api/agents/{id}", get(agent_detail))
        .route("/api/agents/{id}/events", get(events))
        .route("/api/agents/{id}/events/{offset}", get(event_detail))
        .route("/api/agents/{id}/wake", post(wake))
        .route("/api/agents/{id}/pause", post(pause))
        .route("/api/agents/{id}/resume", post(resume))
        .route("/api/agents/{id}/redeliver", post(redeliver))
        .route("/api/agents/{id}/drop", post(drop_events))
        .route("/api/fleet", get(fleet))
        .route("/api/events/stream", get(stream))
        .route("/api/channels", get(channels))
        .route("/api/audit", get(audit))
        .route("/api/whoami", get(whoami))
        .route("/metrics", get(metrics))
        .layer(middleware::from_fn_with_state(admin.clone(), require_token));
    axum::Router::new()
        .route("/livez", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .merge(dashboard::routes())
        .merge(api)
        .with_state(admin)
}

fn error(status: StatusCode, message: impl Into<String>) -> Response {
    (status, Json(json!({ "error": message.into() }))).into_response()
}

fn matches(given: &str, token: &concierge_config::Secret) -> bool {
    bool::from(given.as_bytes().ct_eq(token.expose().as_bytes()))
}

async fn require_token(State(admin): State<Arc<Admin>>, mut request: Request, next: Next) -> Response {
    let server = &admin.app.config.server;
    let role = match &server.admin_token {
        None => Role::Admin,
        Some(token) => {
            let given = request
                .headers()
                .get(header::AUTHORIZATION)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.strip_prefix("Bearer "))
                .unwrap_or("");
            if matches(given, token) {
                Role::Admin
            } else if server.admin_read_token.as_ref().is_some_and(|t| matches(given, t)) {
                Role::Read
            } else {
                return error(StatusCode::UNAUTHORIZED, "admin API requires Authorization: Bearer <admin token>");
            }
        }
    };
    if role == Role::Read && !matches!(*request.method(), Method::GET | Method::HEAD) {
        return error(StatusCode::FORBIDDEN, "the read-only token cannot perform actions");
    }
    request.extensions_mut().insert(role);
    next.run(request).await
}

async fn readyz(State(admin): State<Arc<Admin>>) -> Response {
    let app = &admin.app;
    if app.shutting_down() {
        return error(StatusCode::SERVICE_UNAVAILABLE, "shutting down");
    }
    match app.store.check_writable().await {
        Ok(()) => (StatusCode::OK, "ready\n").into_response(),
        Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, format!("store is not writable: {e}")),
    }
}

async fn metrics(State(admin): State<Arc<Admin>>) -> Response {
    ([(header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")], admin.app.metrics.encode())
        .into_response()
}

async fn whoami(axum::Extension(role): axum::Extension<Role>) -> Response {
    Json(json!({ "role": role, "can_act": role == Role::Admin })).into_response()
}

/// Every agent with its figures, for scripts: answered like `/api/fleet` from memory (state,
/// counts, cursor, head) and the periodic snapshot (bytes, oldest age, epoch; see
/// `stats_at_ms`), so it costs no store round trip (one `stats` call per agent took ~1 s at
/// 10,000 agents).
async fn agents(State(admin): State<Arc<Admin>>) -> Response {
    /// Serialized straight from the rows, like [`FleetAnswer`].
    #[derive(Serialize)]
    struct AgentsAnswer<'a> {
        agents: &'a [Row<'a>],
        warnings: Value,
        stats_at_ms: u64,
    }
    let rows = fleet_rows(&admin);
    let status = status(&admin.app);
    Json(AgentsAnswer {
        agents: &rows,
        warnings: status["warnings"].clone(),
        stats_at_ms: status["stats_at_ms"].as_u64().unwrap_or(0),
    })
    .into_response()
}

/// One fleet-view row: live lifecycle and in-memory counts, bytes and age from the snapshot.
/// Serialized straight to the answer: building a `Value` map per row cost most of a
/// `/api/fleet` request at 10,000 agents.
#[derive(Clone, Serialize)]
struct Row<'a> {
    id: &'a str,
    state: crate::lifecycle::State,
    connected: bool,
    paused: bool,
    pending: u64,
    pending_bytes: Option<u64>,
    oldest_pending_age_ms: Option<u64>,
    cursor: u64,
    head: u64,
    /// The log's epoch as of the snapshot.
    epoch: Option<u64>,
    last_wake: Option<crate::lifecycle::WakeRecord>,
    last_error: Option<String>,
    next_action_in_ms: Option<u64>,
    policy: String,
    driver: &'static str,
    channels: Vec<ChannelRow<'a>>,
}

fn row<'a>(admin: &'a Admin, agent: &'a AgentRuntime, snapshot: &crate::metrics::Snapshot, now: u64) -> Row<'a> {
    let view = agent.view();
    let stats = snapshot.agents.get(agent.id());
    Row {
        id: agent.id(),
        state: view.state,
        connected: agent.connected(),
        paused: agent.paused(),
        // Head minus cursor is live; the store's count also leaves out dropped events, so it
        // wins while the snapshot is as new as the in-memory position.
        pending: stats
            .filter(|s| s.position.head == agent.head() && s.position.cursor == agent.cursor())
            .map_or_else(|| agent.pending(), |s| s.pending),
        pending_bytes: stats.map(|s| s.pending_bytes),
        oldest_pending_age_ms: stats.and_then(|s| s.oldest_pending_ms).map(|t| now.saturating_sub(t)),
        cursor: agent.cursor(),
        head: agent.head(),
        epoch: stats.map(|s| s.position.epoch),
        last_wake: view.last_wake,
        last_error: view.last_error,
        next_action_in_ms: view.next_action_in_ms,
        policy: agent.config.wake.policy.to_string(),
        driver: agent.config.wake.driver.name(),
        channels: admin.channels.get(agent.id()).map_or_else(Vec::new, |all| {
            all.iter()
                .map(|c| {
                    let (state, last_error) = match &c.held {
                        None => ("push".to_string(), None),
                        Some(key) => {
                            admin.app.metrics.connection_status(key).unwrap_or_else(|| ("starting".to_string(), None))
                        }
                    };
                    ChannelRow { kind: c.kind, name: &c.name, state, last_error }
                })
                .collect()
        }),
    }
}

/// A fleet answer: `/api/fleet`, and each live-stream message (without `can_act`).
#[derive(Serialize)]
struct FleetAnswer<'a> {
    totals: Value,
    status: Value,
    #[serde(skip_serializing_if = "Option::is_none")]
    can_act: Option<bool>,
    agents: &'a [Row<'a>],
}

fn totals(rows: &[Row<'_>]) -> Value {
    let mut by_state: HashMap<&str, u64> = HashMap::new();
    let (mut pending, mut bytes, mut oldest, mut connected) = (0u64, 0u64, 0u64, 0u64);
    for r in rows {
        *by_state.entry(state_name(r.state)).or_default() += 1;
        pending += r.pending;
        bytes += r.pending_bytes.unwrap_or(0);
        oldest = oldest.max(r.oldest_pending_age_ms.unwrap_or(0));
        connected += u64::from(r.connected);
    }
    json!({
        "agents": rows.len(),
        "pending": pending,
        "pending_bytes": bytes,
        "oldest_pending_age_ms": oldest,
        "connected": connected,
        "by_state": by_state,
    })
}

fn fleet_rows(admin: &Admin) -> Vec<Row<'_>> {
    let app = &admin.app;
    let snapshot = app.metrics.snapshot();
    let now = now_ms();
    admin.ids.iter().map(|id| row(admin, &app.fleet[id], &snapshot, now)).collect()
}

fn status(app: &App) -> Value {
    let snapshot = app.metrics.snapshot();
    // Re-checked on the snapshot timer; the start-up check until the first one.
    let mut warnings = snapshot.store_warnings.clone().unwrap_or_else(|| app.warnings.clone());
    if let Some(e) = &snapshot.store_error {
        warnings.push(format!("the store cannot be read: {e}"));
    }
    json!({
        "warnings": warnings,
        "store_reachable": snapshot.store_error.is_none(),
        "stats_at_ms": snapshot.at_ms,
        "now_ms": now_ms(),
    })
}

/// The fleet view: answered from memory and the periodic snapshot (no store round trip).
async fn fleet(State(admin): State<Arc<Admin>>, axum::Extension(role): axum::Extension<Role>) -> Response {
    let rows = fleet_rows(&admin);
    Json(FleetAnswer {
        totals: totals(&rows),
        status: status(&admin.app),
        can_act: Some(role == Role::Admin),
        agents: &rows,
    })
    .into_response()
}

/// Server-sent events: a full `fleet` message, then `delta` messages carrying only changed rows.
async fn stream(State(admin): State<Arc<Admin>>) -> Response {
    let Ok(permit) = admin.streams.clone().try_acquire_owned() else {
        return error(StatusCode::SERVICE_UNAVAILABLE, "too many live streams; poll /api/fleet instead");
    };
    struct Tick {
        admin: Arc<Admin>,
        last: HashMap<String, String>,
        first: bool,
        started: tokio::time::Instant,
        _permit: tokio::sync::OwnedSemaphorePermit,
    }
    let start =
        Tick { admin, last: HashMap::new(), first: true, started: tokio::time::Instant::now(), _permit: permit };
    let events = futures::stream::unfold(start, |mut t| async move {
        if !t.first {
            tokio::time::sleep(STREAM_TICK).await;
        }
        if t.admin.app.shutting_down() || t.started.elapsed() > STREAM_MAX {
            return None;
        }
        let rows = fleet_rows(&t.admin);
        let totals = totals(&rows);
        let mut changed = Vec::new();
        for r in rows {
            // Ages and countdowns change every tick; compare the rest.
            let mut key = r.clone();
            key.oldest_pending_age_ms = None;
            key.next_action_in_ms = None;
            let text = serde_json::to_string(&key).unwrap_or_default();
            if t.last.get(r.id) != Some(&text) {
                t.last.insert(r.id.to_string(), text);
                changed.push(r);
            }
        }
        let kind = if t.first { "fleet" } else { "delta" };
        t.first = false;
        let body = FleetAnswer { totals, status: status(&t.admin.app), can_act: None, agents: &changed };
        let event = SseEvent::default().event(kind).data(serde_json::to_string(&body).unwrap_or_default());
        Some((Ok::<_, std::convert::Infallible>(event), t))
    });
    Sse::new(events).keep_alive(KeepAlive::default()).into_response()
}

fn not_found(id: &str) -> Response {
    error(StatusCode::NOT_FOUND, format!("unknown agent {id}"))
}

/// The agent view: its row, live store figures, wake history and buffer history.
async fn agent_detail(State(admin): State<Arc<Admin>>, Path(id): Path<String>) -> Response {
    let app = &admin.app;
    let Some(agent) = app.fleet.get(&id) else {
        return not_found(&id);
    };
    let mut out = json!(row(&admin, agent, &app.metrics.snapshot(), now_ms()));
    match app.store.stats(&id).await {
        Ok(s) => {
            out["pending"] = json!(s.pending);
            out["pending_bytes"] = json!(s.pending_bytes);
            out["oldest_pending_age_ms"] = json!(s.oldest_pending_ms.map(|t| now_ms().saturating_sub(t)));
            out["cursor"] = json!(s.position.cursor);
            out["head"] = json!(s.position.head);
            out["epoch"] = json!(s.position.epoch);
        }
        Err(e) => out["store_error"] = json!(e.to_string()),
    }
    out["first_retained"] = match app.store.read(&id, 0, 1).await {
        Ok(first) => json!(first.first().map(|e| e.offset)),
        Err(_) => Value::Null,
    };
    let w = &agent.config.wake;
    out["wake_settings"] = json!({
        "connect_timeout_ms": w.connect_timeout.as_millis() as u64,
        "max_attempts": w.max_attempts,
        "backoff_initial_ms": w.backoff_initial.as_millis() as u64,
        "backoff_max_ms": w.backoff_max.as_millis() as u64,
        "unreachable_retry_ms": w.unreachable_retry.as_millis() as u64,
        "sleep_after_ms": w.sleep_after.map(|d| d.as_millis() as u64),
    });
    out["retain_acked"] = json!(app.config.store.retain_acked);
    out["wake_history"] = json!(agent.wake_history());
    out["state_changes"] = json!(agent.state_changes());
    out["arrivals"] = json!(agent.arrivals());
    out["started_at_ms"] = json!(admin.started_at_ms);
    out["buffer_history"] = json!(app.metrics.history(&id));
    Json(out).into_response()
}

#[derive(Deserialize)]
struct Page {
    after: Option<u64>,
    limit: Option<usize>,
    channel: Option<String>,
    conversation: Option<String>,
    since_ms: Option<u64>,
    until_ms: Option<u64>,
    dedupe_key: Option<String>,
}

impl Page {
    fn filtered(&self) -> bool {
        self.channel.is_some()
            || self.conversation.is_some()
            || self.since_ms.is_some()
            || self.until_ms.is_some()
            || self.dedupe_key.is_some()
    }

    fn keeps(&self, e: &Event) -> bool {
        let d = &e.data;
        let channel = format!("{}/{}", d.channel.kind, d.channel.name);
        self.channel.as_deref().is_none_or(|c| c.is_empty() || channel.contains(c))
            && self.conversation.as_deref().is_none_or(|c| c.is_empty() || d.conversation.contains(c))
            && self.since_ms.is_none_or(|t| d.received_at_ms >= t)
            && self.until_ms.is_none_or(|t| d.received_at_ms <= t)
            && self.dedupe_key.as_deref().is_none_or(|k| k.is_empty() || d.dedupe_key.as_deref() == Some(k))
    }
}

/// Events after `after`, optionally filtered; a filtered listing examines at most
/// [`MAX_SCAN`] events and returns `next_after` to continue from.
async fn events(State(admin): State<Arc<Admin>>, Path(id): Path<String>, Query(page): Query<Page>) -> Response {
    let app = &admin.app;
    if !app.fleet.contains_key(&id) {
        return not_found(&id);
    }
    let limit = page.limit.unwrap_or(100).clamp(1, MAX_PAGE);
    let mut after = page.after.unwrap_or(0);
    if !page.filtered() {
        return match app.store.read(&id, after, limit).await {
            Ok(events) => {
                let next = events.last().map(|e| e.offset);
                Json(json!({ "events": events.iter().map(event_json).collect::<Vec<_>>(), "next_after": next }))
                    .into_response()
            }
            Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, format!("store: {e}")),
        };
    }
    let mut found = Vec::new();
    let mut scanned = 0;
    let mut exhausted = false;
    while found.len() < limit && scanned < MAX_SCAN {
        let batch = match app.store.read(&id, after, MAX_PAGE.min(MAX_SCAN - scanned)).await {
            Ok(b) => b,
            Err(e) => return error(StatusCode::SERVICE_UNAVAILABLE, format!("store: {e}")),
        };
        let Some(last) = batch.last() else {
            exhausted = true;
            break;
        };
        after = last.offset;
        scanned += batch.len();
        for e in &batch {
            if page.keeps(e) {
                found.push(event_json(e));
                if found.len() >= limit {
                    after = e.offset;
                    break;
                }
            }
        }
    }
    Json(json!({ "events": found, "next_after": (!exhausted).then_some(after), "scanned": scanned })).into_response()
}

async fn event_detail(State(admin): State<Arc<Admin>>, Path((id, offset)): Path<(String, u64)>) -> Response {
    let app = &admin.app;
    let Some(agent) = app.fleet.get(&id) else {
        return not_found(&id);
    };
    match app.store.read(&id, offset.saturating_sub(1), 1).await {
        Ok(events) => match events.into_iter().find(|e| e.offset == offset) {
            Some(e) => {
                let mut out = event_json(&e);
                let cursor = agent.cursor();
                out["status"] = json!(if offset <= cursor { "acknowledged" } else { "pending" });
                out["delivered_by_this_process"] = json!(offset <= agent.delivered_up_to());
                // Every time this process wrote the event to the agent (a count above 1 means
                // it was redelivered: not acknowledged before a reconnect, or rewound).
                let (deliveries, complete) = agent.deliveries_of(offset);
                out["delivery_attempts"] = json!(deliveries.len());
                out["deliveries"] = json!(deliveries);
                out["delivery_attempts_complete"] = json!(complete);
                if let Some(text) = out["raw"]["text"].as_str()
                    && let Ok(parsed) = serde_json::from_str::<Value>(text)
                {
                    out["raw_pretty"] = json!(serde_json::to_string_pretty(&parsed).unwrap_or_default());
                }
                Json(out).into_response()
            }
            None => error(StatusCode::NOT_FOUND, format!("agent {id} has no retained event at offset {offset}")),
        },
        Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, format!("store: {e}")),
    }
}

/// Header-like names that may carry credentials: their values are never shown.
fn secret_name(name: &str) -> bool {
    let n = name.to_ascii_lowercase();
    ["authorization", "cookie", "token", "secret", "signature", "password", "api-key", "apikey", "auth"]
        .iter()
        .any(|s| n.contains(s))
}

/// Raw payloads are shown as text when they are UTF-8, else base64; secret meta is redacted.
fn event_json(e: &Event) -> Value {
    let d = &e.data;
    let raw = match std::str::from_utf8(&d.raw) {
        Ok(text) => json!({ "text": text }),
        Err(_) => json!({ "base64": base64::engine::general_purpose::STANDARD.encode(&d.raw) }),
    };
    let meta: Vec<(&str, &str)> =
        d.meta.iter().map(|(k, v)| (k.as_str(), if secret_name(k) { "[redacted]" } else { v.as_str() })).collect();
    json!({
        "offset": e.offset,
        "channel": { "kind": d.channel.kind, "name": d.channel.name },
        "conversation": d.conversation,
        "sender": d.sender,
        "dedupe_key": d.dedupe_key,
        "received_at_ms": d.received_at_ms,
        "text": d.text,
        "content_type": d.content_type,
        "size": d.size_hint(),
        "attachments": d.attachments.len(),
        "raw": raw,
        "meta": meta,
    })
}

async fn channels(State(admin): State<Arc<Admin>>) -> Response {
    let app = &admin.app;
    let routes: Vec<Value> = app
        .config
        .webhooks
        .iter()
        .map(|(name, h)| {
            json!({
                "route": name,
                "agent": h.agent,
                "path": format!("/hooks/{}/{name}", h.agent),
                "verify": match h.verify {
                    concierge_config::Verify::None => "none",
                    concierge_config::Verify::Standard { .. } => "standard",
                    concierge_config::Verify::Hmac { .. } => "hmac",
                },
                "replies": h.reply_url.is_some(),
            })
        })
        .collect();
    Json(json!({ "connections": app.metrics.connections(), "webhooks": routes })).into_response()
}

async fn audit(State(admin): State<Arc<Admin>>) -> Response {
    let log = admin.audit_log().await;
    let entries: Vec<&AuditEntry> = log.entries.iter().rev().collect();
    Json(json!({ "entries": entries, "stored": log.loaded })).into_response()
}

// ---------------------------------------------------------------------------------------
// Actions: each is recorded in the audit log, successful or not.

async fn wake(State(admin): State<Arc<Admin>>, Path(id): Path<String>) -> Response {
    let Some(agent) = admin.app.fleet.get(&id) else {
        return not_found(&id);
    };
    agent.input(Input::WakeRequested);
    admin.record("wake", &id, format!("state was {}", state_name(agent.view().state)), &Ok(())).await;
    (StatusCode::ACCEPTED, Json(json!({ "agent": id, "wake": "requested" }))).into_response()
}

async fn pause(State(admin): State<Arc<Admin>>, Path(id): Path<String>) -> Response {
    set_paused(&admin, id, true).await
}

async fn resume(State(admin): State<Arc<Admin>>, Path(id): Path<String>) -> Response {
    set_paused(&admin, id, false).await
}

async fn set_paused(admin: &Admin, id: String, paused: bool) -> Response {
    let Some(agent) = admin.app.fleet.get(&id) else {
        return not_found(&id);
    };
    let changed = agent.set_paused(paused);
    let action = if paused { "pause" } else { "resume" };
    admin
        .record(action, &id, if changed { "delivery ".to_string() + action + "d" } else { "no change".into() }, &Ok(()))
        .await;
    Json(json!({ "agent": id, "paused": paused, "changed": changed })).into_response()
}

#[derive(Deserialize)]
struct Redeliver {
    /// First offset to deliver again.
    from: u64,
}

/// Moves the agent's delivery start back to `from` (within retained events) and restarts its
/// session so it resumes from there.
async fn redeliver(State(admin): State<Arc<Admin>>, Path(id): Path<String>, Json(body): Json<Redeliver>) -> Response {
    let app = &admin.app;
    let Some(agent) = app.fleet.get(&id) else {
        return not_found(&id);
    };
    if body.from == 0 {
        return error(StatusCode::BAD_REQUEST, "offsets start at 1");
    }
    let detail = format!("from offset {}", body.from);
    match app.store.rewind(&id, body.from - 1).await {
        Ok(cursor) => {
            agent.rewound(cursor);
            agent.moved_by_operator();
            admin.record("redeliver", &id, detail, &Ok(())).await;
            Json(json!({ "agent": id, "cursor": cursor })).into_response()
        }
        Err(e) => {
            admin.record("redeliver", &id, detail, &Err(e.to_string())).await;
            let status = match e {
                concierge_store::StoreError::Rejected(_) => StatusCode::CONFLICT,
                _ => StatusCode::SERVICE_UNAVAILABLE,
            };
            error(status, e.to_string())
        }
    }
}

/// Most offsets one drop names, and most pending events a filtered drop examines.
const MAX_DROP: usize = 10_000;

#[derive(Deserialize)]
struct Drop {
    /// Drop every pending event up to and including this offset (acknowledged for the agent).
    up_to: Option<u64>,
    /// Drop exactly these pending events.
    offsets: Option<Vec<u64>>,
    /// Drop the pending events matching this filter (the event list's fields), among the
    /// first [`MAX_DROP`] pending events.
    filter: Option<Page>,
    /// Only count what would be dropped.
    #[serde(default)]
    preview: bool,
}

/// Pending offsets of `id` matching `filter`, among the first [`MAX_DROP`] pending events;
/// also whether every pending event was examined.
async fn matching_pending(app: &App, id: &str, cursor: u64, filter: &Page) -> Result<(Vec<u64>, bool), Response> {
    let (mut after, mut scanned, mut found) = (cursor, 0, Vec::new());
    while scanned < MAX_DROP {
        let batch = app
            .store
            .read(id, after, MAX_PAGE.min(MAX_DROP - scanned))
            .await
            .map_err(|e| error(StatusCode::SERVICE_UNAVAILABLE, format!("store: {e}")))?;
        let Some(last) = batch.last() else { return Ok((found, true)) };
        after = last.offset;
        scanned += batch.len();
        found.extend(batch.iter().filter(|e| e.offset > cursor && filter.keeps(e)).map(|e| e.offset));
    }
    Ok((found, false))
}

/// Describes a filter for the audit log.
fn describe(filter: &Page) -> String {
    let mut parts = Vec::new();
    for (name, value) in
        [("channel", &filter.channel), ("conversation", &filter.conversation), ("dedupe_key", &filter.dedupe_key)]
    {
        if let Some(v) = value.as_deref().filter(|v| !v.is_empty()) {
            parts.push(format!("{name} contains {v:?}"));
        }
    }
    if let Some(t) = filter.since_ms {
        parts.push(format!("received at or after {t} ms"));
    }
    if let Some(t) = filter.until_ms {
        parts.push(format!("received at or before {t} ms"));
    }
    if parts.is_empty() { "every pending event".into() } else { parts.join(", ") }
}

/// Drops pending events, in one of three ways: `up_to` acknowledges a prefix on the agent's
/// behalf (the events stay readable within `retain_acked`, so redeliver undoes it);
/// `offsets` or `filter` remove exactly those pending events from the log (`Store::drop_events`:
/// never delivered, no longer counted). `preview` only counts.
async fn drop_events(State(admin): State<Arc<Admin>>, Path(id): Path<String>, Json(body): Json<Drop>) -> Response {
    let app = &admin.app;
    let Some(agent) = app.fleet.get(&id) else {
        return not_found(&id);
    };
    let position = match app.store.position(&id).await {
        Ok(p) => p,
        Err(e) => return error(StatusCode::SERVICE_UNAVAILABLE, format!("store: {e}")),
    };
    let (offsets, detail, complete) = match (body.up_to, body.offsets, body.filter) {
        (Some(up_to), None, None) => return drop_prefix(&admin, agent, &id, position, up_to, body.preview).await,
        (None, Some(mut offsets), None) => {
            if offsets.len() > MAX_DROP {
                return error(StatusCode::BAD_REQUEST, format!("at most {MAX_DROP} offsets per drop"));
            }
            offsets.sort_unstable();
            offsets.dedup();
            offsets.retain(|&o| o > position.cursor && o <= position.head);
            let shown: Vec<String> = offsets.iter().take(20).map(u64::to_string).collect();
            let more = if offsets.len() > 20 { ", …" } else { "" };
            (offsets.clone(), format!("offsets {}{more}", shown.join(", ")), true)
        }
        (None, None, Some(filter)) => match matching_pending(app, &id, position.cursor, &filter).await {
            Ok((offsets, complete)) => (offsets, format!("filter: {}", describe(&filter)), complete),
            Err(response) => return response,
        },
        _ => return error(StatusCode::BAD_REQUEST, "give exactly one of up_to, offsets or filter"),
    };
    if body.preview {
        return Json(json!({
            "agent": id,
            "would_drop": offsets.len(),
            "offsets": offsets,
            "complete": complete,
            "cursor": position.cursor,
        }))
        .into_response();
    }
    match app.store.drop_events(&id, &offsets).await {
        Ok(dropped) => {
            // The cursor moves over dropped events right after it; a live session may hold
            // dropped events in flight, so it restarts and replays from the store.
            if let Ok(p) = app.store.position(&id).await {
                agent.acked(p.cursor);
            }
            if dropped > 0 {
                agent.moved_by_operator();
            }
            admin.record("drop", &id, format!("{detail} ({dropped} events)"), &Ok(())).await;
            Json(json!({ "agent": id, "dropped": dropped, "complete": complete })).into_response()
        }
        Err(e) => {
            admin.record("drop", &id, detail, &Err(e.to_string())).await;
            error(StatusCode::SERVICE_UNAVAILABLE, e.to_string())
        }
    }
}

/// `drop` with `up_to`: acknowledges the pending events up to an offset.
async fn drop_prefix(
    admin: &Admin,
    agent: &AgentRuntime,
    id: &str,
    position: concierge_store::Position,
    up_to: u64,
    preview: bool,
) -> Response {
    let target = up_to.min(position.head);
    let count = target.saturating_sub(position.cursor);
    if preview {
        return Json(json!({ "agent": id, "would_drop": count, "cursor": position.cursor, "up_to": target }))
            .into_response();
    }
    let detail = format!("up to offset {target} ({count} events)");
    match admin.app.store.ack(id, target).await {
        Ok(cursor) => {
            agent.acked(cursor);
            if count > 0 {
                agent.moved_by_operator();
            }
            admin.record("drop", id, detail, &Ok(())).await;
            Json(json!({ "agent": id, "dropped": count, "cursor": cursor })).into_response()
        }
        Err(e) => {
            admin.record("drop", id, detail, &Err(e.to_string())).await;
            error(StatusCode::SERVICE_UNAVAILABLE, e.to_string())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credential_names_are_redacted() {
        for name in ["Authorization", "x-api-key", "X-Hub-Signature-256", "webhook-secret", "Cookie"] {
            assert!(secret_name(name), "{name}");
        }
        for name in ["user-agent", "content-length", "webhook-id", "x-request-id"] {
            assert!(!secret_name(name), "{name}");
        }
    }
}
