//! The in-memory side of each configured agent: its log head (what sessions tail), its
//! current session, and a handle to its lifecycle runner. The store stays the truth; this is
//! what lets ingress, sessions, the wake runner and the admin API meet without polling.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
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
#[derive(Debug)]
pub struct SessionControl {
    /// Unique session id.
    pub id: u64,
    /// Set to ask the session to send `Drain`.
    pub drain: watch::Sender<bool>,
    /// The QUIC connection, closed when superseded.
    pub connection: quinn::Connection,
    /// Events stored while this session is attached, for it to deliver without a store read.
    pub fresh: crate::fresh::Fresh,
}

/// One configured agent at run time.
pub struct AgentRuntime {
    /// Its configuration.
    pub config: AgentConfig,
    head: watch::Sender<u64>,
    cursor: AtomicU64,
    lifecycle: mpsc::UnboundedSender<Input>,
    view: Mutex<LifecycleView>,
    /// Whether the published state is `Asleep`: lets ingest tell the runner about an arriving
    /// event only when that can start a wake, not once per event for an awake agent.
    asleep: AtomicBool,
    session: Mutex<Option<SessionControl>>,
    session_closed: watch::Sender<u64>,
    /// The next session's start, read from the store while the agent wakes.
    pub warm_start: crate::warm_start::Slot,
    /// Operator pause: sessions deliver nothing while true (the agent may stay connected).
    paused: watch::Sender<bool>,
    /// Highest offset delivered by this process (tells redeliveries apart for metrics).
    delivered_up_to: AtomicU64,
    /// Recent deliveries (offset ranges per session), for the event view's delivery attempts.
    deliveries: Mutex<Deliveries>,
    /// Finished wakes, newest last, for the dashboard's wake timeline.
    wake_history: Mutex<VecDeque<WakeRecord>>,
    /// Lifecycle state changes `(unix ms, new state)`, newest last, for the timeline's
    /// asleep/awake periods.
    state_changes: Mutex<VecDeque<(u64, State)>>,
    /// Events stored per minute `(minute start, unix ms; count)`, newest last, for the
    /// timeline's event arrivals.
    arrivals: Mutex<VecDeque<(u64, u64)>>,
}

/// A lifecycle state change, as the wake timeline draws it.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct StateChange {
    /// Unix ms.
    pub at_ms: u64,
    /// The state entered.
    pub state: State,
}

/// Events stored during one minute.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct Arrivals {
    /// Unix ms of the minute's start.
    pub minute_ms: u64,
    /// Events stored in it.
    pub events: u64,
}

/// Finished wakes kept per agent for the dashboard.
const WAKE_HISTORY: usize = 50;
/// State changes kept per agent for the timeline.
const STATE_HISTORY: usize = 200;
/// Minutes of event arrivals kept per agent (three hours, the timeline's span).
const ARRIVAL_MINUTES: usize = 180;

/// Delivered offset ranges kept per agent (a bound on memory: 32 bytes each).
const DELIVERY_HISTORY: usize = 256;
/// Consecutive batches of one session within this long share a range (one entry, one time).
const DELIVERY_MERGE_MS: u64 = 1000;

/// One delivery of consecutive offsets `from..=to` in one session.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct Delivery {
    /// The session that delivered them.
    pub session: u64,
    /// First offset.
    pub from: u64,
    /// Last offset.
    pub to: u64,
    /// Unix ms when the first batch of the range was written to the agent.
    pub at_ms: u64,
    /// Unix ms when the last batch of the range was written.
    pub last_at_ms: u64,
}

/// Bounded delivery history of one agent.
#[derive(Default)]
struct Deliveries {
    ranges: VecDeque<Delivery>,
    /// Highest offset of a range dropped from the history: counts at or below it may be short.
    forgotten_up_to: u64,
}

impl Deliveries {
    /// Adds a batch, merging it into the last range when it continues it.
    fn note(&mut self, session: u64, from: u64, to: u64, now: u64) {
        if let Some(last) = self.ranges.back_mut()
            && last.session == session
            && last.to + 1 == from
            && now.saturating_sub(last.last_at_ms) < DELIVERY_MERGE_MS
        {
            last.to = to;
            last.last_at_ms = now;
            return;
        }
        if self.ranges.len() >= DELIVERY_HISTORY
            && let Some(old) = self.ranges.pop_front()
        {
            self.forgotten_up_to = self.forgotten_up_to.max(old.to);
        }
        self.ranges.push_back(Delivery { session, from, to, at_ms: now, last_at_ms: now });
    }

    /// Deliveries that included `offset` (oldest first) and whether the list is complete.
    fn of(&self, offset: u64) -> (Vec<Delivery>, bool) {
        let hits = self.ranges.iter().filter(|d| d.from <= offset && offset <= d.to).copied().collect();
        (hits, offset > self.forgotten_up_to)
    }
}

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
            asleep: AtomicBool::new(true),
            session: Mutex::new(None),
            session_closed: watch::channel(0).0,
            warm_start: Default::default(),
            paused: watch::channel(false).0,
            delivered_up_to: AtomicU64::new(0),
            deliveries: Mutex::new(Deliveries::default()),
            wake_history: Mutex::new(VecDeque::new()),
            state_changes: Mutex::new(VecDeque::new()),
            arrivals: Mutex::new(VecDeque::new()),
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
        let minute = concierge_protocol::now_ms() / 60_000 * 60_000;
        {
            let mut arrivals = lock(&self.arrivals);
            match arrivals.back_mut() {
                Some((m, n)) if *m == minute => *n += 1,
                _ => {
                    if arrivals.len() >= ARRIVAL_MINUTES {
                        arrivals.pop_front();
                    }
                    arrivals.push_back((minute, 1));
                }
            }
        }
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

    /// An authenticated event for this agent is being stored (see [`Input::EventArriving`]).
    /// A stale hint is harmless: the machine ignores the input unless it is really asleep, and
    /// the stored event wakes the agent in any case.
    pub fn event_arriving(&self, received: std::time::Instant) {
        if self.asleep.load(Ordering::Relaxed) {
            self.input(Input::EventArriving { received });
        }
    }

    /// Snapshot for the admin API.
    pub fn view(&self) -> LifecycleView {
        lock(&self.view).clone()
    }

    /// Written by the runner after each step; a wake replaced by a newer one joins the history.
    pub fn set_view(&self, view: LifecycleView) {
        self.asleep.store(view.state == State::Asleep, Ordering::Relaxed);
        let previous = std::mem::replace(&mut *lock(&self.view), view.clone());
        if previous.state != view.state {
            let mut changes = lock(&self.state_changes);
            if changes.len() >= STATE_HISTORY {
                changes.pop_front();
            }
            changes.push_back((concierge_protocol::now_ms(), view.state));
        }
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

    /// Lifecycle state changes since start (oldest first; the agent starts asleep).
    pub fn state_changes(&self) -> Vec<StateChange> {
        lock(&self.state_changes).iter().map(|&(at_ms, state)| StateChange { at_ms, state }).collect()
    }

    /// Events stored per minute, recent minutes only (oldest first).
    pub fn arrivals(&self) -> Vec<Arrivals> {
        lock(&self.arrivals).iter().map(|&(minute_ms, events)| Arrivals { minute_ms, events }).collect()
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

    /// Records a batch (`(offset, received_at_ms)` in offset order) written to the agent by
    /// `session`; returns the previous high-water mark (offsets at or below it are redeliveries).
    pub fn note_delivered(&self, session: u64, events: &[(u64, u64)]) -> u64 {
        let (Some(&(from, _)), Some(&(to, _))) = (events.first(), events.last()) else {
            return self.delivered_up_to();
        };
        lock(&self.deliveries).note(session, from, to, concierge_protocol::now_ms());
        self.delivered_up_to.fetch_max(to, Ordering::Relaxed)
    }

    /// Highest offset delivered by this process.
    pub fn delivered_up_to(&self) -> u64 {
        self.delivered_up_to.load(Ordering::Relaxed)
    }

    /// Deliveries by this process that included `offset` (oldest first), and whether that list
    /// is complete (false when older ranges were dropped from the bounded history).
    pub fn deliveries_of(&self, offset: u64) -> (Vec<Delivery>, bool) {
        lock(&self.deliveries).of(offset)
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

    /// Hands a just-stored event to the attached session, if any (see [`crate::fresh`]); the
    /// record is encoded only when there is one.
    pub fn keep_fresh(&self, event: impl FnOnce() -> concierge_protocol::EventRecord) {
        if let Some(c) = lock(&self.session).as_mut() {
            c.fresh.push(event());
        }
    }

    /// The just-stored events that directly follow `after`, if `session` is still attached.
    pub fn take_fresh(&self, session: u64, after: u64, room: usize) -> Vec<concierge_protocol::EventRecord> {
        match lock(&self.session).as_mut() {
            Some(c) if c.id == session => c.fresh.take_after(after, room),
            _ => Vec::new(),
        }
    }

    /// An operator rewound or dropped events: a prepared start or a live session would go on
    /// from the old position, so both are dropped (the agent reconnects and replays).
    pub fn moved_by_operator(&self) {
        self.warm_start.discard();
        if let Some(c) = lock(&self.session).as_mut() {
            c.fresh.clear();
        }
        self.close_session("delivery position changed by an operator");
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deliveries_merge_per_session_and_count_redeliveries() {
        let mut d = Deliveries::default();
        d.note(1, 1, 3, 1_000);
        d.note(1, 4, 5, 1_200);
        d.note(2, 1, 5, 9_000);
        assert_eq!(d.ranges.len(), 2, "a continued batch of the same session joins its range");
        let (hits, complete) = d.of(4);
        assert_eq!(hits.iter().map(|h| h.session).collect::<Vec<_>>(), [1, 2]);
        assert!(complete);
        assert!(d.of(6).0.is_empty());
        for i in 0..DELIVERY_HISTORY as u64 {
            d.note(3, 10 + 2 * i, 10 + 2 * i, 20_000);
        }
        assert_eq!(d.ranges.len(), DELIVERY_HISTORY);
        assert!(!d.of(4).1, "a dropped range makes older counts incomplete");
    }
}
