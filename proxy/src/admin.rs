//! The admin listener: JSON API for operators (and the dashboard), health probes.
//! Loopback by default; when a token is configured every `/api` call must carry it.

use std::sync::Arc;

use axum::Json;
use axum::extract::{Path, Query, Request, State};
use axum::http::StatusCode;
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use base64::Engine as _;
use concierge_protocol::Event;
use serde::Deserialize;
use serde_json::{Value, json};
use subtle::ConstantTimeEq;

use crate::app::App;
use crate::lifecycle::Input;

/// Largest page of events one call returns.
const MAX_PAGE: usize = 1000;

/// Routes of the admin listener.
pub fn router(app: Arc<App>) -> axum::Router {
    let api = axum::Router::new()
        .route("/api/agents", get(agents))
        .route("/api/agents/{id}/events", get(events))
        .route("/api/agents/{id}/wake", post(wake))
        .layer(middleware::from_fn_with_state(app.clone(), require_token));
    axum::Router::new()
        .route("/livez", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .merge(api)
        .with_state(app)
}

fn error(status: StatusCode, message: impl Into<String>) -> Response {
    (status, Json(json!({ "error": message.into() }))).into_response()
}

async fn require_token(State(app): State<Arc<App>>, request: Request, next: Next) -> Response {
    if let Some(token) = &app.config.server.admin_token {
        let given = request
            .headers()
            .get(axum::http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or("");
        if !bool::from(given.as_bytes().ct_eq(token.expose().as_bytes())) {
            return error(StatusCode::UNAUTHORIZED, "admin API requires Authorization: Bearer <admin token>");
        }
    }
    next.run(request).await
}

async fn readyz(State(app): State<Arc<App>>) -> Response {
    if app.shutting_down() {
        return error(StatusCode::SERVICE_UNAVAILABLE, "shutting down");
    }
    match app.store.check_writable().await {
        Ok(()) => (StatusCode::OK, "ready\n").into_response(),
        Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, format!("store is not writable: {e}")),
    }
}

async fn agents(State(app): State<Arc<App>>) -> Response {
    let now = concierge_protocol::now_ms();
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

#[derive(Deserialize)]
struct Page {
    after: Option<u64>,
    limit: Option<usize>,
}

async fn events(State(app): State<Arc<App>>, Path(id): Path<String>, Query(page): Query<Page>) -> Response {
    if !app.fleet.contains_key(&id) {
        return error(StatusCode::NOT_FOUND, format!("unknown agent {id}"));
    }
    let limit = page.limit.unwrap_or(100).clamp(1, MAX_PAGE);
    match app.store.read(&id, page.after.unwrap_or(0), limit).await {
        Ok(events) => Json(json!({ "events": events.iter().map(event_json).collect::<Vec<_>>() })).into_response(),
        Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, format!("store: {e}")),
    }
}

/// Raw payloads are shown as text when they are UTF-8, else base64.
fn event_json(e: &Event) -> Value {
    let d = &e.data;
    let raw = match std::str::from_utf8(&d.raw) {
        Ok(text) => json!({ "text": text }),
        Err(_) => json!({ "base64": base64::engine::general_purpose::STANDARD.encode(&d.raw) }),
    };
    json!({
        "offset": e.offset,
        "channel": { "kind": d.channel.kind, "name": d.channel.name },
        "conversation": d.conversation,
        "sender": d.sender,
        "dedupe_key": d.dedupe_key,
        "received_at_ms": d.received_at_ms,
        "text": d.text,
        "content_type": d.content_type,
        "raw": raw,
        "meta": d.meta,
    })
}

async fn wake(State(app): State<Arc<App>>, Path(id): Path<String>) -> Response {
    match app.fleet.get(&id) {
        Some(agent) => {
            agent.input(Input::WakeRequested);
            tracing::info!(agent = %id, "wake requested by operator");
            (StatusCode::ACCEPTED, Json(json!({ "agent": id, "wake": "requested" }))).into_response()
        }
        None => error(StatusCode::NOT_FOUND, format!("unknown agent {id}")),
    }
}
