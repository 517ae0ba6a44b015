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
use std::sync::{Arc, Mutex};
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
/// Audit entries kept in memory (they are also logged with target `audit`).
const AUDIT_KEEP: usize = 1000;
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
#[derive(Clone, Debug, Serialize)]
pub struct AuditEntry {
    /// Unix ms.
    pub at_ms: u64,
    /// Who: `admin` (token) or `open` (no token configured).
    pub actor: &'static str,
    /// `wake`, `pause`, `resume`, `redeliver`, `drop`.
    pub action: &'static str,
    /// The agent acted on.
    pub agent: String,
    /// Parameters and effect.
    pub detail: String,
    /// `ok` or the error.
    pub result: String,
}

/// State of the admin listener: the app plus what only operators need.
pub struct Admin {
    app: Arc<App>,
    audit: Mutex<VecDeque<AuditEntry>>,
    streams: Arc<tokio::sync::Semaphore>,
    /// Agent ids, sorted (the fleet is fixed at start), so a fleet walk does not sort.
    ids: Vec<String>,
    /// Webhook routes of each agent, computed once: per-row scans of every route made the
    /// fleet view quadratic (1.6 s at 10,000 agents with a route each).
    routes: HashMap<String, Vec<String>>,
}

impl Admin {
    fn record(&self, action: &'static str, agent: &str, detail: String, result: &Result<(), String>) {
        let actor = if self.app.config.server.admin_token.is_some() { "admin" } else { "open" };
        let result = match result {
            Ok(()) => "ok".to_string(),
            Err(e) => e.clone(),
        };
        tracing::info!(target: "audit", actor, action, agent, %detail, %result, "operator action");
        let mut log = self.audit.lock().unwrap_or_else(|e| e.into_inner());
        if log.len() >= AUDIT_KEEP {
            log.pop_front();
        }
        log.push_back(AuditEntry { at_ms: now_ms(), actor, action, agent: agent.to_string(), detail, result });
    }
}

/// Routes of the admin listener.
pub fn router(app: Arc<App>) -> axum::Router {
    let mut ids: Vec<String> = app.fleet.keys().cloned().collect();
    ids.sort();
    let mut routes: HashMap<String, Vec<String>> = HashMap::new();
    for (name, hook) in &app.config.webhooks {
        routes.entry(hook.agent.clone()).or_default().push(name.clone());
    }
    let admin = Arc::new(Admin {
        app,
        audit: Mutex::new(VecDeque::new()),
        streams: Arc::new(tokio::sync::Semaphore::new(MAX_STREAMS)),
        ids,
        routes,
    });
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

/// Live figures straight from the store (one `stats` call per agent): kept for scripts and
/// tests; the dashboard uses `/api/fleet`, which answers from memory.
async fn agents(State(admin): State<Arc<Admin>>) -> Response {
    let app = &admin.app;
    let now = now_ms();
    let mut ids: Vec<&String> = app.fleet.keys().collect();
    ids.sort();
    let mut out = Vec::with_capacity(ids.len());
    for id in ids {
        let agent = &app.fleet[id];
        let view = agent.view();
        let stats = match app.store.stats(id).await {
            Ok(s) => s,
            Err(e) => return error(StatusCode::SERVICE_UNAVAILABLE, format!("store: {e}")),
        };
        out.push(json!({
            "id": id,
            "state": view.state,
            "connected": agent.connected(),
            "paused": agent.paused(),
            "pending": stats.pending,
            "pending_bytes": stats.pending_bytes,
            "oldest_pending_age_ms": stats.oldest_pending_ms.map(|t| now.saturating_sub(t)),
            "cursor": stats.position.cursor,
            "head": stats.position.head,
            "epoch": stats.position.epoch,
            "last_wake": view.last_wake,
            "last_error": view.last_error,
            "next_action_in_ms": view.next_action_in_ms,
        }));
    }
    Json(json!({ "agents": out, "warnings": app.warnings })).into_response()
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
    last_wake: Option<crate::lifecycle::WakeRecord>,
    last_error: Option<String>,
    next_action_in_ms: Option<u64>,
    policy: String,
    driver: &'static str,
    channels: &'a [String],
}

fn row<'a>(admin: &'a Admin, agent: &'a AgentRuntime, snapshot: &crate::metrics::Snapshot, now: u64) -> Row<'a> {
    let view = agent.view();
    let stats = snapshot.agents.get(agent.id());
    Row {
        id: agent.id(),
        state: view.state,
        connected: agent.connected(),
        paused: agent.paused(),
        pending: agent.pending(),
        pending_bytes: stats.map(|s| s.pending_bytes),
        oldest_pending_age_ms: stats.and_then(|s| s.oldest_pending_ms).map(|t| now.saturating_sub(t)),
        cursor: agent.cursor(),
        head: agent.head(),
        last_wake: view.last_wake,
        last_error: view.last_error,
        next_action_in_ms: view.next_action_in_ms,
        policy: agent.config.wake.policy.to_string(),
        driver: agent.config.wake.driver.name(),
        channels: admin.routes.get(agent.id()).map_or(&[], Vec::as_slice),
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
    let mut warnings = app.warnings.clone();
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
                out["delivered_by_this_process"] = json!(offset <= agent.note_delivered(0));
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
    let log = admin.audit.lock().unwrap_or_else(|e| e.into_inner());
    let entries: Vec<&AuditEntry> = log.iter().rev().collect();
    Json(json!({ "entries": entries })).into_response()
}

// ---------------------------------------------------------------------------------------
// Actions: each is recorded in the audit log, successful or not.

async fn wake(State(admin): State<Arc<Admin>>, Path(id): Path<String>) -> Response {
    let Some(agent) = admin.app.fleet.get(&id) else {
        return not_found(&id);
    };
    agent.input(Input::WakeRequested);
    admin.record("wake", &id, format!("state was {}", state_name(agent.view().state)), &Ok(()));
    (StatusCode::ACCEPTED, Json(json!({ "agent": id, "wake": "requested" }))).into_response()
}

async fn pause(State(admin): State<Arc<Admin>>, Path(id): Path<String>) -> Response {
    set_paused(&admin, id, true)
}

async fn resume(State(admin): State<Arc<Admin>>, Path(id): Path<String>) -> Response {
    set_paused(&admin, id, false)
}

fn set_paused(admin: &Admin, id: String, paused: bool) -> Response {
    let Some(agent) = admin.app.fleet.get(&id) else {
        return not_found(&id);
    };
    let changed = agent.set_paused(paused);
    let action = if paused { "pause" } else { "resume" };
    admin.record(
        action,
        &id,
        if changed { "delivery ".to_string() + action + "d" } else { "no change".into() },
        &Ok(()),
    );
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
            agent.close_session("delivery position changed by an operator");
            admin.record("redeliver", &id, detail, &Ok(()));
            Json(json!({ "agent": id, "cursor": cursor })).into_response()
        }
        Err(e) => {
            admin.record("redeliver", &id, detail, &Err(e.to_string()));
            let status = match e {
                concierge_store::StoreError::Rejected(_) => StatusCode::CONFLICT,
                _ => StatusCode::SERVICE_UNAVAILABLE,
            };
            error(status, e.to_string())
        }
    }
}

#[derive(Deserialize)]
struct Drop {
    /// Drop every pending event up to and including this offset.
    up_to: u64,
    /// Only count what would be dropped.
    #[serde(default)]
    preview: bool,
}

/// Drops pending events up to an offset by acknowledging them on the agent's behalf (they
/// stay readable within `retain_acked`, so a drop can be undone with redeliver).
async fn drop_events(State(admin): State<Arc<Admin>>, Path(id): Path<String>, Json(body): Json<Drop>) -> Response {
    let app = &admin.app;
    let Some(agent) = app.fleet.get(&id) else {
        return not_found(&id);
    };
    let position = match app.store.position(&id).await {
        Ok(p) => p,
        Err(e) => return error(StatusCode::SERVICE_UNAVAILABLE, format!("store: {e}")),
    };
    let target = body.up_to.min(position.head);
    let count = target.saturating_sub(position.cursor);
    if body.preview {
        return Json(json!({ "agent": id, "would_drop": count, "cursor": position.cursor, "up_to": target }))
            .into_response();
    }
    let detail = format!("up to offset {target} ({count} events)");
    match app.store.ack(&id, target).await {
        Ok(cursor) => {
            agent.acked(cursor);
            if count > 0 {
                agent.close_session("delivery position changed by an operator");
            }
            admin.record("drop", &id, detail, &Ok(()));
            Json(json!({ "agent": id, "dropped": count, "cursor": cursor })).into_response()
        }
        Err(e) => {
            admin.record("drop", &id, detail, &Err(e.to_string()));
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
