//! A fake of the Fly Machines API, written from Fly's documentation (not from our driver), so
//! the `fly` wake driver can be tested and load-tested against something that behaves like
//! the platform.
//!
//! What it models:
//! - `GET  /v1/apps/{app}/machines/{id}`: the machine object (`id`, `name`, `state`,
//!   `region`, `instance_id`, `private_ip`, `config`, timestamps).
//! - `POST /v1/apps/{app}/machines/{id}/start`: from `stopped`/`suspended`/`created` the
//!   machine goes `starting`, then `started` after the start delay; the answer is
//!   `{"previous_state": ..., "migrated": false, "new_host": ""}`. Starting a machine that is
//!   active (or stopping) is refused with 412 `failed_precondition`.
//! - `POST /v1/apps/{app}/machines/{id}/stop`: a running machine goes `stopping`, then
//!   `stopped` after the stop delay; answers `{"ok": true}` (also when already stopped).
//! - `GET  /v1/apps/{app}/machines/{id}/wait?state=&timeout=&instance_id=`: long-polls until
//!   the state is reached (200 `{"ok": true}`) or the timeout in seconds (default and maximum
//!   60) passes (408). `state` is one of `started` (default), `stopped`, `suspended`,
//!   `destroyed`; anything else is a 400.
//! - `Authorization: Bearer <token>` on every call (401 otherwise); unknown app or machine
//!   answer 404 with `{"error": ...}`.
//!
//! Test knobs: counters of start/stop calls, [`FakeFly::fail_next_starts`] (500s), start/stop
//! delays, and a `watch` receiver per machine to observe state changes.

#![warn(missing_docs)]

use std::collections::HashMap;
use std::fmt;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::Json;
use axum::Router;
use axum::extract::{Path, Query, Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::sync::watch;

/// Longest `wait` the API allows, in seconds (also the default).
const MAX_WAIT_SECS: u64 = 60;

/// A Fly Machine state, as the API spells it; the fake moves machines between these.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum MachineState {
    /// Created but never started.
    Created,
    /// On its way from stopped/suspended to started.
    Starting,
    /// Running and reachable.
    Started,
    /// On its way from started to stopped.
    Stopping,
    /// Not running.
    Stopped,
    /// Suspended to disk; a start resumes it.
    Suspended,
}

impl MachineState {
    /// The API's spelling, used in JSON bodies and `wait?state=`.
    pub fn as_str(self) -> &'static str {
        match self {
            MachineState::Created => "created",
            MachineState::Starting => "starting",
            MachineState::Started => "started",
            MachineState::Stopping => "stopping",
            MachineState::Stopped => "stopped",
            MachineState::Suspended => "suspended",
        }
    }
}

impl fmt::Display for MachineState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

struct Machine {
    state: watch::Sender<MachineState>,
    instance_id: String,
    /// Bumped on every transition request, so a stale delayed transition does nothing.
    generation: u64,
    created_at: String,
}

struct Inner {
    token: String,
    machines: Mutex<HashMap<(String, String), Machine>>,
    starts: AtomicU64,
    stops: AtomicU64,
    fail_starts: AtomicU64,
    start_delay: Mutex<Duration>,
    stop_delay: Mutex<Duration>,
    next_instance: AtomicU64,
    shutdown: watch::Receiver<bool>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// A running fake Machines API on `127.0.0.1`; shuts down when dropped.
pub struct FakeFly {
    addr: SocketAddr,
    inner: Arc<Inner>,
    shutdown: watch::Sender<bool>,
}

impl fmt::Debug for FakeFly {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FakeFly").field("addr", &self.addr).finish_non_exhaustive()
    }
}

impl FakeFly {
    /// Starts the fake on an ephemeral port, accepting only `token` as bearer token.
    pub async fn start(token: &str) -> std::io::Result<FakeFly> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let (shutdown, shutdown_rx) = watch::channel(false);
        let inner = Arc::new(Inner {
            token: token.to_string(),
            machines: Mutex::new(HashMap::new()),
            starts: AtomicU64::new(0),
            stops: AtomicU64::new(0),
            fail_starts: AtomicU64::new(0),
            start_delay: Mutex::new(Duration::from_millis(200)),
            stop_delay: Mutex::new(Duration::from_millis(100)),
            next_instance: AtomicU64::new(1),
            shutdown: shutdown_rx.clone(),
        });
        let machine = "/v1/apps/{app}/machines/{id}";
        let router = Router::new()
            .route(machine, get(get_machine))
            .route(&format!("{machine}/start"), post(start_machine))
            .route(&format!("{machine}/stop"), post(stop_machine))
            .route(&format!("{machine}/wait"), get(wait_machine))
            .layer(middleware::from_fn_with_state(Arc::clone(&inner), auth))
            .with_state(Arc::clone(&inner));
        let mut stop = shutdown_rx;
        tokio::spawn(async move {
            let signal = async move {
                let _ = stop.wait_for(|down| *down).await;
            };
            if let Err(err) = axum::serve(listener, router).with_graceful_shutdown(signal).await {
                tracing::warn!(%err, "fake fly server stopped");
            }
        });
        Ok(FakeFly { addr, inner, shutdown })
    }

    /// Base URL to configure as the driver's `api_base`.
    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Adds a stopped machine (and its app, if new).
    pub fn add_machine(&self, app: &str, id: &str) {
        self.add_machine_in(app, id, MachineState::Stopped);
    }

    /// Adds a machine in a given state, for tests that start from `started` or `suspended`.
    pub fn add_machine_in(&self, app: &str, id: &str, state: MachineState) {
        let n = self.inner.next_instance.fetch_add(1, Ordering::Relaxed);
        let machine = Machine {
            state: watch::channel(state).0,
            // Fly's instance ids are 26-character ULIDs; keep the length.
            instance_id: format!("01FAKE{n:020}"),
            generation: 0,
            created_at: now_rfc3339ish(),
        };
        lock(&self.inner.machines).insert((app.to_string(), id.to_string()), machine);
    }

    /// The machine's current state, or `None` if it does not exist.
    pub fn state(&self, app: &str, id: &str) -> Option<MachineState> {
        lock(&self.inner.machines).get(&key(app, id)).map(|m| *m.state.borrow())
    }

    /// A receiver that sees every state change of the machine, for tests that observe order.
    pub fn watch(&self, app: &str, id: &str) -> Option<watch::Receiver<MachineState>> {
        lock(&self.inner.machines).get(&key(app, id)).map(|m| m.state.subscribe())
    }

    /// The machine's version id (`instance_id`), as the API reports it.
    pub fn instance_id(&self, app: &str, id: &str) -> Option<String> {
        lock(&self.inner.machines).get(&key(app, id)).map(|m| m.instance_id.clone())
    }

    /// Authorized `start` calls on existing machines, failed ones included.
    pub fn starts(&self) -> u64 {
        self.inner.starts.load(Ordering::SeqCst)
    }

    /// Authorized `stop` calls on existing machines.
    pub fn stops(&self) -> u64 {
        self.inner.stops.load(Ordering::SeqCst)
    }

    /// Makes the next `n` start calls answer 500 without changing any machine.
    pub fn fail_next_starts(&self, n: u64) {
        self.inner.fail_starts.store(n, Ordering::SeqCst);
    }

    /// How long `starting` lasts before `started` (default 200 ms).
    pub fn set_start_delay(&self, delay: Duration) {
        *lock(&self.inner.start_delay) = delay;
    }

    /// How long `stopping` lasts before `stopped` (default 100 ms).
    pub fn set_stop_delay(&self, delay: Duration) {
        *lock(&self.inner.stop_delay) = delay;
    }
}

impl Drop for FakeFly {
    fn drop(&mut self) {
        let _ = self.shutdown.send(true);
    }
}

fn key(app: &str, id: &str) -> (String, String) {
    (app.to_string(), id.to_string())
}

fn now_rfc3339ish() -> String {
    // Only shape matters to clients; seconds since the epoch keep this dependency-free.
    let secs = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    format!("@{secs}")
}

fn error(status: StatusCode, message: impl Into<String>) -> Response {
    (status, Json(json!({ "error": message.into() }))).into_response()
}

async fn auth(State(inner): State<Arc<Inner>>, request: Request, next: Next) -> Response {
    let given = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    if given != Some(inner.token.as_str()) {
        return error(StatusCode::UNAUTHORIZED, "You must be authenticated to view this.");
    }
    next.run(request).await
}

/// Which part of a machine's path does not exist.
#[derive(Debug, Clone, Copy)]
enum NotFound {
    App,
    Machine,
}

impl IntoResponse for NotFound {
    fn into_response(self) -> Response {
        match self {
            NotFound::App => error(StatusCode::NOT_FOUND, "app not found"),
            NotFound::Machine => error(StatusCode::NOT_FOUND, "machine not found"),
        }
    }
}

/// Looks up a machine; unknown app or machine become a 404, like the API answers.
fn find<'a>(
    machines: &'a mut HashMap<(String, String), Machine>,
    app: &str,
    id: &str,
) -> Result<&'a mut Machine, NotFound> {
    if !machines.keys().any(|(a, _)| a == app) {
        return Err(NotFound::App);
    }
    machines.get_mut(&key(app, id)).ok_or(NotFound::Machine)
}

fn machine_json(app: &str, id: &str, m: &Machine) -> Value {
    json!({
        "id": id,
        "name": format!("{app}-{id}"),
        "state": m.state.borrow().as_str(),
        "region": "fake",
        "instance_id": m.instance_id,
        "private_ip": "fdaa:0:0:0:0:0:0:2",
        "config": { "image": "fake/agent:latest" },
        "image_ref": { "registry": "fake", "repository": "agent", "tag": "latest" },
        "created_at": m.created_at,
        "updated_at": now_rfc3339ish(),
    })
}

async fn get_machine(State(inner): State<Arc<Inner>>, Path((app, id)): Path<(String, String)>) -> Response {
    let mut machines = lock(&inner.machines);
    match find(&mut machines, &app, &id) {
        Ok(m) => Json(machine_json(&app, &id, m)).into_response(),
        Err(missing) => missing.into_response(),
    }
}

/// Schedules `to` after `delay`, unless another transition was requested meanwhile.
fn transition_later(
    inner: &Arc<Inner>,
    app: String,
    id: String,
    generation: u64,
    from: MachineState,
    to: MachineState,
    delay: Duration,
) {
    let inner = Arc::clone(inner);
    tokio::spawn(async move {
        tokio::time::sleep(delay).await;
        let mut machines = lock(&inner.machines);
        if let Some(m) = machines.get_mut(&(app, id)) {
            // Copy the state out first: a live borrow would block `send_replace`.
            let current = *m.state.borrow();
            if m.generation == generation && current == from {
                m.state.send_replace(to);
            }
        }
    });
}

async fn start_machine(State(inner): State<Arc<Inner>>, Path((app, id)): Path<(String, String)>) -> Response {
    let mut machines = lock(&inner.machines);
    let m = match find(&mut machines, &app, &id) {
        Ok(m) => m,
        Err(missing) => return missing.into_response(),
    };
    inner.starts.fetch_add(1, Ordering::SeqCst);
    let failing = inner.fail_starts.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1)).is_ok();
    if failing {
        return error(StatusCode::INTERNAL_SERVER_ERROR, "internal error (injected by the fake)");
    }
    let previous = *m.state.borrow();
    match previous {
        MachineState::Stopped | MachineState::Suspended | MachineState::Created => {
            m.generation += 1;
            m.state.send_replace(MachineState::Starting);
            let delay = *lock(&inner.start_delay);
            let generation = m.generation;
            drop(machines);
            transition_later(&inner, app, id, generation, MachineState::Starting, MachineState::Started, delay);
            Json(json!({ "previous_state": previous.as_str(), "migrated": false, "new_host": "" })).into_response()
        }
        MachineState::Started | MachineState::Starting => {
            error(StatusCode::PRECONDITION_FAILED, "failed_precondition: machine still active, refusing to start")
        }
        MachineState::Stopping => error(
            StatusCode::PRECONDITION_FAILED,
            format!("failed_precondition: unable to start machine from current state: '{previous}'"),
        ),
    }
}

async fn stop_machine(State(inner): State<Arc<Inner>>, Path((app, id)): Path<(String, String)>) -> Response {
    let mut machines = lock(&inner.machines);
    let m = match find(&mut machines, &app, &id) {
        Ok(m) => m,
        Err(missing) => return missing.into_response(),
    };
    inner.stops.fetch_add(1, Ordering::SeqCst);
    let previous = *m.state.borrow();
    if matches!(previous, MachineState::Started | MachineState::Starting) {
        m.generation += 1;
        m.state.send_replace(MachineState::Stopping);
        let delay = *lock(&inner.stop_delay);
        let generation = m.generation;
        drop(machines);
        transition_later(&inner, app, id, generation, MachineState::Stopping, MachineState::Stopped, delay);
    }
    Json(json!({ "ok": true })).into_response()
}

/// Query of `wait`: all optional, as in the API.
#[derive(Debug, Deserialize)]
struct WaitQuery {
    state: Option<String>,
    timeout: Option<u64>,
    instance_id: Option<String>,
}

async fn wait_machine(
    State(inner): State<Arc<Inner>>,
    Path((app, id)): Path<(String, String)>,
    Query(query): Query<WaitQuery>,
) -> Response {
    let wanted = query.state.as_deref().unwrap_or("started").to_string();
    if !matches!(wanted.as_str(), "started" | "stopped" | "suspended" | "destroyed") {
        return error(StatusCode::BAD_REQUEST, format!("invalid state {wanted:?}"));
    }
    let timeout = Duration::from_secs(query.timeout.unwrap_or(MAX_WAIT_SECS).min(MAX_WAIT_SECS));
    let mut rx = {
        let mut machines = lock(&inner.machines);
        match find(&mut machines, &app, &id) {
            Ok(m) => {
                if let Some(given) = &query.instance_id
                    && *given != m.instance_id
                {
                    return error(StatusCode::BAD_REQUEST, "instance_id does not match the machine's version");
                }
                m.state.subscribe()
            }
            Err(missing) => return missing.into_response(),
        }
    };
    let mut shutdown = inner.shutdown.clone();
    let reached = async { rx.wait_for(|s| s.as_str() == wanted).await.is_ok() };
    tokio::select! {
        outcome = tokio::time::timeout(timeout, reached) => match outcome {
            Ok(true) => Json(json!({ "ok": true })).into_response(),
            // The machine was removed while we waited.
            Ok(false) => error(StatusCode::NOT_FOUND, "machine not found"),
            Err(_) => error(
                StatusCode::REQUEST_TIMEOUT,
                format!("deadline_exceeded: machine did not reach state {wanted} within {}s", timeout.as_secs()),
            ),
        },
        _ = shutdown.wait_for(|down| *down) => error(StatusCode::SERVICE_UNAVAILABLE, "shutting down"),
    }
}
