//! The in-memory side of each configured agent: its log head (what sessions tail), its
//! current session, and a handle to its lifecycle runner. The store stays the truth; this is
//! what lets ingress, sessions, the wake runner and the admin API meet without polling.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use concierge_config::AgentConfig;
use serde::Serialize;
use tokio::sync::{mpsc, watch};

use crate::lifecycle::{Input, State, WakeRecord};

/// What the admin API shows about an agent's lifecycle; written by its runner.
#[derive(Clone, Debug, Serialize)]
pub struct LifecycleView {
    /// Asleep / waking / awake / unreachable.
    pub state: State,
    /// The wake in progress, else the last one.
    pub last_wake: Option<WakeRecord>,
    /// Why the agent is not awake, when known.
    pub last_error: Option<String>,
    /// Milliseconds until the runner acts next (retry, sleep, coalesced wake).
    pub next_action_in_ms: Option<u64>,
}

/// A session's controls, held so a newer session or a sleep can end it.
#[derive(Clone, Debug)]
pub struct SessionControl {
    /// Unique session id.
    pub id: u64,
    /// Set to ask the session to send `Drain`.
    pub drain: watch::Sender<bool>,
    /// The QUIC connection, closed when superseded.
    pub connection: quinn::Connection,
}

/// One configured agent at run time.
pub struct AgentRuntime {
    /// Its configuration.
    pub config: AgentConfig,
    head: watch::Sender<u64>,
    cursor: AtomicU64,
    lifecycle: mpsc::UnboundedSender<Input>,
    view: Mutex<LifecycleView>,
    session: Mutex<Option<SessionControl>>,
    session_closed: watch::Sender<u64>,
    /// Operator pause: sessions deliver nothing while true (the agent may stay connected).
    paused: watch::Sender<bool>,
    /// Highest offset delivered by this process (tells redeliveries apart for metrics).
    delivered_up_to: AtomicU64,
    /// Finished wakes, newest last, for the dashboard's wake timeline.
    wake_history: Mutex<VecDeque<WakeRecord>>,
}

/// Finished wakes kept per agent for the dashboard.
const WAKE_HISTORY: usize = 50;

impl AgentRuntime {
    /// Creates the runtime; the returned receiver feeds the lifecycle runner.
    pub fn new(config: AgentConfig, head: u64, cursor: u64) -> (Arc<Self>, mpsc::UnboundedReceiver<Input>) {
        let (lifecycle, inputs) = mpsc::unbounded_channel();
        let view = LifecycleView { state: State::Asleep, last_wake: None, last_error: None, next_action_in_ms: None };
        let runtime = Arc::new(Self {
            config,
            head: watch::channel(head).0,
            cursor: AtomicU64::new(cursor),
            lifecycle,
            view: Mutex::new(view),
            session: Mutex::new(None),
            session_closed: watch::channel(0).0,
            paused: watch::channel(false).0,
            delivered_up_to: AtomicU64::new(0),
            wake_history: Mutex::new(VecDeque::new()),
        });
        (runtime, inputs)
    }

    /// The agent's id.
    pub fn id(&self) -> &str {
        &self.config.id
    }

    /// Records a newly stored offset and wakes sessions tailing the log.
    pub fn stored(&self, offset: u64, received: std::time::Instant) {
        self.head.send_if_modified(|h| {
            let advanced = offset > *h;
            *h = (*h).max(offset);
            advanced
        });
        self.input(Input::EventStored { received });
    }

    /// Highest stored offset known to this process.
    pub fn head(&self) -> u64 {
        *self.head.borrow()
    }

    /// Subscribes to head changes (sessions wait on this instead of polling the store).
    pub fn watch_head(&self) -> watch::Receiver<u64> {
        self.head.subscribe()
    }

    /// Records an acknowledged offset.
    pub fn acked(&self, cursor: u64) {
        self.cursor.fetch_max(cursor, Ordering::Relaxed);
        self.input(Input::Acked { pending: self.pending() });
    }

    /// Events stored but not acknowledged, as known to this process (cheap, for backpressure).
    pub fn pending(&self) -> u64 {
        self.head().saturating_sub(self.cursor.load(Ordering::Relaxed))
    }

    /// Feeds the lifecycle runner.
    pub fn input(&self, input: Input) {
        let _ = self.lifecycle.send(input);
    }

    /// Snapshot for the admin API.
    pub fn view(&self) -> LifecycleView {
        lock(&self.view).clone()
    }

    /// Written by the runner after each step; a wake replaced by a newer one joins the history.
    pub fn set_view(&self, view: LifecycleView) {
        let previous = std::mem::replace(&mut *lock(&self.view), view.clone());
        if let Some(old) = previous.last_wake
            && view.last_wake.as_ref().is_none_or(|new| new.started_at_ms != old.started_at_ms)
        {
            let mut history = lock(&self.wake_history);
            if history.len() >= WAKE_HISTORY {
                history.pop_front();
            }
            history.push_back(old);
        }
    }

    /// Finished wakes before the current or last one (oldest first).
    pub fn wake_history(&self) -> Vec<WakeRecord> {
        lock(&self.wake_history).iter().cloned().collect()
    }

    /// Highest acknowledged offset known to this process.
    pub fn cursor(&self) -> u64 {
        self.cursor.load(Ordering::Relaxed)
    }

    /// Records an operator rewind (the cursor moved back): pending work may wake the agent.
    pub fn rewound(&self, cursor: u64) {
        self.cursor.store(cursor, Ordering::Relaxed);
        self.input(Input::EventStored { received: std::time::Instant::now() });
    }

    /// Records a delivered batch ending at `last`; returns the previous high-water mark.
    pub fn note_delivered(&self, last: u64) -> u64 {
        self.delivered_up_to.fetch_max(last, Ordering::Relaxed)
    }

    /// Pauses or resumes delivery; returns whether it changed.
    pub fn set_paused(&self, paused: bool) -> bool {
        self.paused.send_if_modified(|p| std::mem::replace(p, paused) != paused)
    }

    /// Whether delivery is paused by an operator.
    pub fn paused(&self) -> bool {
        *self.paused.borrow()
    }

    /// Subscribes to pause changes (sessions resume delivery on this).
    pub fn watch_paused(&self) -> watch::Receiver<bool> {
        self.paused.subscribe()
    }

    /// Installs a new session, closing the one it supersedes.
    pub fn attach(&self, control: SessionControl) {
        let previous = lock(&self.session).replace(control);
        match previous {
            Some(old) => old.connection.close(2u32.into(), b"superseded by a newer session"),
            None => self.input(Input::Connected { at: std::time::Instant::now() }),
        }
    }

    /// Removes a session if it is still the current one.
    pub fn detach(&self, id: u64) {
        let mut current = lock(&self.session);
        if current.as_ref().is_some_and(|c| c.id == id) {
            *current = None;
            drop(current);
            self.session_closed.send_replace(id);
            self.input(Input::Disconnected);
        }
    }

    /// Whether a session is attached.
    pub fn connected(&self) -> bool {
        lock(&self.session).is_some()
    }

    /// Asks the current session to drain; returns false when none is attached.
    pub fn request_drain(&self) -> bool {
        match lock(&self.session).as_ref() {
            Some(c) => {
                c.drain.send_replace(true);
                true
            }
            None => false,
        }
    }

    /// Closes the current session (shutdown, or a drain the agent ignored).
    pub fn close_session(&self, reason: &'static str) {
        if let Some(c) = lock(&self.session).as_ref() {
            c.connection.close(1u32.into(), reason.as_bytes());
        }
    }

    /// Notified with the session id whenever the current session detaches.
    pub fn watch_detach(&self) -> watch::Receiver<u64> {
        self.session_closed.subscribe()
    }
}

/// Poisoning only follows a panic elsewhere; the data (plain snapshots) is still usable.
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// All configured agents by id.
pub type Fleet = HashMap<String, Arc<AgentRuntime>>;
