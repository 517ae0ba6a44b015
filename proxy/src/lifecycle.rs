//! The agent lifecycle as a pure state machine: `Asleep -> Waking -> Awake -> Asleep`, plus
//! `Unreachable` after the wake attempts are exhausted.
//!
//! No I/O and no clock of its own: the runner ([`crate::wake`]) feeds [`Input`]s with the
//! current instant, performs the returned [`Action`]s, and calls back at [`Lifecycle::deadline`].
//! That keeps every rule of promise 6 (single-flight, retries with backoff, done only when the
//! agent actually connected) testable without sockets or sleeps.

use std::time::{Duration, Instant};

use serde::Serialize;

/// What operators see.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum State {
    /// Not connected; events buffer; a wake may be scheduled (coalescing).
    Asleep,
    /// A wake is in progress (driver called, waiting for the agent to connect, or backing off).
    Waking,
    /// The agent holds a session.
    Awake,
    /// Wake attempts are exhausted; events keep buffering and retries continue slowly.
    Unreachable,
}

/// When to wake on new events.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Policy {
    /// Wake on the first pending event.
    Immediate,
    /// Gather events for this long, then wake once.
    Coalesce(Duration),
    /// Never wake; the agent connects on its own schedule.
    Never,
}

/// Knobs of the machine, from the agent's configuration.
#[derive(Clone, Debug)]
pub struct Settings {
    /// When to wake.
    pub policy: Policy,
    /// After the driver returned, the agent must connect within this.
    pub connect_timeout: Duration,
    /// Attempts before the agent is declared unreachable.
    pub max_attempts: u32,
    /// First retry delay; doubles per attempt.
    pub backoff_initial: Duration,
    /// Ceiling of the retry delay.
    pub backoff_max: Duration,
    /// Retry period once unreachable.
    pub unreachable_retry: Duration,
    /// Put the agent to sleep after this long idle with nothing pending.
    pub sleep_after: Option<Duration>,
}

/// Something that happened.
#[derive(Clone, Debug, PartialEq)]
pub enum Input {
    /// An authenticated event is on its way to the store. An asleep agent with the
    /// `immediate` policy is woken now, so its start-up overlaps the durable write instead of
    /// following it (the write is a store round trip; a cold start is far longer, and the
    /// agent only ever receives what the store holds). The price is a wake for an event the
    /// store then refuses or finds to be a duplicate: the agent finds nothing new and goes
    /// back to sleep after `sleep_after`.
    EventArriving {
        /// When the event reached the proxy.
        received: Instant,
    },
    /// A new event was stored for this agent; `received` is when ingress got it, where a
    /// wake's timings start.
    EventStored {
        /// When the event reached the proxy.
        received: Instant,
    },
    /// The runner is calling the driver now (recorded where it happens, not when decided).
    DriverCalled {
        /// When the call started.
        at: Instant,
    },
    /// An operator asked for a wake now.
    WakeRequested,
    /// The driver's `wake` call finished.
    DriverReturned(Result<(), DriverFailure>),
    /// The driver's `sleep` call finished.
    SleepReturned(Result<(), DriverFailure>),
    /// The agent opened a session.
    Connected {
        /// When the session was installed (stamped there: under load the runner sees the input
        /// later, and a wake's timings must not absorb that queueing).
        at: Instant,
    },
    /// The agent's (last) session closed.
    Disconnected,
    /// A batch of events was delivered to the session.
    Delivered {
        /// Events in the batch.
        events: u64,
        /// When the batch was written (stamped by the session, as for `Connected`).
        at: Instant,
    },
    /// The agent acknowledged events; `pending` are left.
    Acked {
        /// Events still pending after the ack.
        pending: u64,
    },
    /// The agent said it has nothing to do.
    Idle,
    /// The deadline returned by [`Lifecycle::deadline`] passed.
    Timer,
}

/// A driver error as the machine needs it.
#[derive(Clone, Debug, PartialEq)]
pub struct DriverFailure {
    /// Shown to operators.
    pub message: String,
    /// Whether trying again can help.
    pub retryable: bool,
}

/// Something the runner must do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// Call the driver's `wake` (at most one call in flight: single-flight).
    CallDriver {
        /// 1-based attempt number within this wake.
        attempt: u32,
    },
    /// Ask the connected agent to drain, then call the driver's `sleep`.
    Sleep,
}

/// One wake, from trigger to first delivery, for metrics and the dashboard.
#[derive(Clone, Debug, Serialize)]
pub struct WakeRecord {
    /// Why the wake started (`event`, `operator`, `retry`).
    pub reason: &'static str,
    /// Unix ms when the wake was triggered.
    pub started_at_ms: u64,
    /// Attempts made so far.
    pub attempts: u32,
    /// Trigger -> first driver call.
    pub driver_called_after_ms: Option<f64>,
    /// Trigger -> agent connected.
    pub connected_after_ms: Option<f64>,
    /// Trigger -> first event delivered.
    pub first_delivery_after_ms: Option<f64>,
    /// Events delivered during the session this wake brought up.
    pub events_drained: u64,
    /// `in_progress`, `connected`, `unreachable`.
    pub outcome: &'static str,
    /// Last driver or verification error.
    pub error: Option<String>,
    #[serde(skip)]
    started: Option<Instant>,
}

impl WakeRecord {
    fn new(reason: &'static str, now: Instant) -> Self {
        Self {
            reason,
            started_at_ms: concierge_protocol::now_ms(),
            attempts: 0,
            driver_called_after_ms: None,
            connected_after_ms: None,
            first_delivery_after_ms: None,
            events_drained: 0,
            outcome: "in_progress",
            error: None,
            started: Some(now),
        }
    }

    fn since(&self, now: Instant) -> Option<f64> {
        self.started.map(|s| now.saturating_duration_since(s).as_secs_f64() * 1000.0)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Timer {
    None,
    /// Coalescing window ends: wake.
    Coalesce,
    /// Backoff over: next attempt.
    Retry,
    /// Driver returned but the agent has not connected yet.
    ConnectTimeout,
    /// Idle long enough: put to sleep.
    SleepAfter,
    /// The last sleep did not stick (the compute still runs, and costs): try it again.
    SleepRetry,
}

/// The lifecycle of one agent.
#[derive(Debug)]
pub struct Lifecycle {
    settings: Settings,
    state: State,
    timer: Timer,
    deadline: Option<Instant>,
    attempt: u32,
    driver_in_flight: bool,
    /// A new wake began while an old driver call was still running: call again when it returns.
    call_when_returned: bool,
    /// The current session was brought up by the last wake, so its deliveries count there.
    session_from_wake: bool,
    pending: bool,
    sleeping_requested: bool,
    /// Sleeps in a row that failed (drives the sleep retry backoff).
    sleep_failures: u32,
    current: Option<WakeRecord>,
    last: Option<WakeRecord>,
    last_error: Option<String>,
}

impl Lifecycle {
    /// A new agent starts asleep; `pending` says whether events are already buffered.
    pub fn new(settings: Settings, pending: bool) -> Self {
        Self {
            settings,
            state: State::Asleep,
            timer: Timer::None,
            deadline: None,
            attempt: 0,
            driver_in_flight: false,
            call_when_returned: false,
            session_from_wake: false,
            pending,
            sleeping_requested: false,
            sleep_failures: 0,
            current: None,
            last: None,
            last_error: None,
        }
    }

    /// Current state.
    pub fn state(&self) -> State {
        self.state
    }

    /// When the runner must feed [`Input::Timer`].
    pub fn deadline(&self) -> Option<Instant> {
        self.deadline
    }

    /// The wake in progress, else the last one.
    pub fn last_wake(&self) -> Option<&WakeRecord> {
        self.current.as_ref().or(self.last.as_ref())
    }

    /// Why the agent is not awake, when there is a reason.
    pub fn last_error(&self) -> Option<&str> {
        self.last_error.as_deref()
    }

    /// Call at start-up so buffered events left from before a restart get delivered.
    pub fn start(&mut self, now: Instant) -> Vec<Action> {
        if self.pending { self.on_event(now) } else { Vec::new() }
    }

    /// Advances the machine.
    pub fn handle(&mut self, input: Input, now: Instant) -> Vec<Action> {
        match input {
            Input::EventArriving { received } => match (self.state, self.settings.policy) {
                (State::Asleep, Policy::Immediate) => self.begin_wake("event", received.min(now)),
                // Nothing is pending yet: coalescing and sleep timers wait for the stored event.
                _ => Vec::new(),
            },
            Input::EventStored { received } => {
                self.pending = true;
                self.on_event(received.min(now))
            }
            Input::DriverCalled { at } => {
                if let Some(w) = self.current.as_mut().filter(|w| w.driver_called_after_ms.is_none()) {
                    w.driver_called_after_ms = w.since(at);
                }
                Vec::new()
            }
            Input::WakeRequested => match self.state {
                State::Asleep | State::Unreachable => self.begin_wake("operator", now),
                State::Waking if self.timer == Timer::Retry => self.attempt_now(),
                _ => Vec::new(),
            },
            Input::DriverReturned(result) => self.on_driver_returned(result, now),
            Input::SleepReturned(result) => {
                let Err(e) = result else {
                    self.sleep_failures = 0;
                    return Vec::new();
                };
                self.last_error = Some(format!("sleep failed: {}", e.message));
                // Asleep for us but still running (and billed) on the platform: try again,
                // backing off, unless the agent is needed again meanwhile.
                if e.retryable && self.state == State::Asleep && !self.pending && self.timer == Timer::None {
                    self.sleep_failures += 1;
                    let delay = backoff(self.settings.backoff_initial, self.settings.backoff_max, self.sleep_failures);
                    self.set_timer(Timer::SleepRetry, Some(now + delay));
                }
                Vec::new()
            }
            Input::Connected { at } => self.on_connected(at.min(now), now),
            Input::Disconnected => self.on_disconnected(now),
            Input::Delivered { events, at } => {
                if let Some(w) = self.last.as_mut().filter(|_| self.session_from_wake) {
                    if w.first_delivery_after_ms.is_none() {
                        w.first_delivery_after_ms = w.since(at.min(now));
                    }
                    w.events_drained += events;
                }
                self.rearm_sleep(now);
                Vec::new()
            }
            Input::Acked { pending } => {
                self.pending = pending > 0;
                self.rearm_sleep(now);
                Vec::new()
            }
            Input::Idle => {
                if self.state == State::Awake
                    && !self.pending
                    && self.settings.sleep_after.is_some()
                    && !self.sleeping_requested
                {
                    self.sleeping_requested = true;
                    self.set_timer(Timer::None, None);
                    return vec![Action::Sleep];
                }
                Vec::new()
            }
            Input::Timer => self.on_timer(now),
        }
    }

    fn on_event(&mut self, now: Instant) -> Vec<Action> {
        match (self.state, self.settings.policy) {
            (State::Asleep, Policy::Immediate) => self.begin_wake("event", now),
            (State::Asleep, Policy::Coalesce(window)) if self.timer != Timer::Coalesce => {
                self.set_timer(Timer::Coalesce, Some(now + window));
                Vec::new()
            }
            (State::Awake, _) => {
                self.rearm_sleep(now);
                Vec::new()
            }
            // Waking: single-flight, the wake in progress covers this event.
            // Unreachable: keep buffering; the periodic retry will come.
            _ => Vec::new(),
        }
    }

    fn begin_wake(&mut self, reason: &'static str, now: Instant) -> Vec<Action> {
        self.state = State::Waking;
        self.attempt = 0;
        self.current = Some(WakeRecord::new(reason, now));
        self.attempt_now()
    }

    fn attempt_now(&mut self) -> Vec<Action> {
        if self.driver_in_flight {
            // Single-flight: the running call's result belongs to an earlier wake.
            self.call_when_returned = true;
            return Vec::new();
        }
        self.attempt += 1;
        self.driver_in_flight = true;
        self.set_timer(Timer::None, None);
        if let Some(w) = self.current.as_mut() {
            w.attempts += 1;
        }
        vec![Action::CallDriver { attempt: self.attempt }]
    }

    fn on_driver_returned(&mut self, result: Result<(), DriverFailure>, now: Instant) -> Vec<Action> {
        self.driver_in_flight = false;
        if std::mem::take(&mut self.call_when_returned) {
            // That result answered a previous wake; this wake has not called the driver yet.
            return if self.state == State::Waking { self.attempt_now() } else { Vec::new() };
        }
        if self.state != State::Waking {
            return Vec::new(); // the agent connected before the driver returned, or was woken otherwise
        }
        match result {
            Ok(()) => {
                // The driver's word is not enough (promise 6): wait for the agent itself.
                self.set_timer(Timer::ConnectTimeout, Some(now + self.settings.connect_timeout));
                Vec::new()
            }
            Err(failure) => self.attempt_failed(failure.message, failure.retryable, now),
        }
    }

    fn attempt_failed(&mut self, message: String, retryable: bool, now: Instant) -> Vec<Action> {
        if let Some(w) = self.current.as_mut() {
            w.error = Some(message.clone());
        }
        self.last_error = Some(message);
        if retryable && self.attempt < self.settings.max_attempts {
            let delay = backoff(self.settings.backoff_initial, self.settings.backoff_max, self.attempt);
            self.set_timer(Timer::Retry, Some(now + delay));
            return Vec::new();
        }
        self.state = State::Unreachable;
        if let Some(mut w) = self.current.take() {
            w.outcome = "unreachable";
            self.last = Some(w);
        }
        self.set_timer(Timer::Retry, Some(now + self.settings.unreachable_retry));
        Vec::new()
    }

    /// `at` is when the session was installed; `now` drives the timers.
    fn on_connected(&mut self, at: Instant, now: Instant) -> Vec<Action> {
        self.state = State::Awake;
        self.sleeping_requested = false;
        self.last_error = None;
        self.session_from_wake = self.current.is_some();
        if let Some(mut w) = self.current.take() {
            w.connected_after_ms = w.since(at);
            w.outcome = "connected";
            w.error = None;
            self.last = Some(w);
        }
        self.set_timer(Timer::None, None);
        self.rearm_sleep(now);
        Vec::new()
    }

    fn on_disconnected(&mut self, now: Instant) -> Vec<Action> {
        if self.state != State::Awake {
            return Vec::new();
        }
        self.state = State::Asleep;
        self.set_timer(Timer::None, None);
        self.sleeping_requested = false;
        self.session_from_wake = false;
        if self.pending {
            // The agent went away with work left (crash, network, or events that arrived
            // while it drained): wake it again per policy.
            return self.on_event(now);
        }
        Vec::new()
    }

    fn on_timer(&mut self, now: Instant) -> Vec<Action> {
        let timer = std::mem::replace(&mut self.timer, Timer::None);
        self.deadline = None;
        match (timer, self.state) {
            (Timer::Coalesce, State::Asleep) => self.begin_wake("event", now),
            (Timer::Retry, State::Waking) => self.attempt_now(),
            (Timer::Retry, State::Unreachable) => {
                self.state = State::Waking;
                self.attempt = self.settings.max_attempts.saturating_sub(1);
                self.current = Some(WakeRecord::new("retry", now));
                self.attempt_now()
            }
            (Timer::ConnectTimeout, State::Waking) => {
                let message = format!(
                    "driver reported success but the agent did not connect within {:?}",
                    self.settings.connect_timeout
                );
                self.attempt_failed(message, true, now)
            }
            (Timer::SleepAfter, State::Awake) if !self.pending => {
                self.sleeping_requested = true;
                vec![Action::Sleep]
            }
            (Timer::SleepRetry, State::Asleep) if !self.pending => vec![Action::Sleep],
            _ => Vec::new(),
        }
    }

    fn rearm_sleep(&mut self, now: Instant) {
        if self.state != State::Awake || self.sleeping_requested {
            return;
        }
        match self.settings.sleep_after {
            Some(after) if !self.pending => self.set_timer(Timer::SleepAfter, Some(now + after)),
            _ => self.set_timer(Timer::None, None),
        }
    }

    fn set_timer(&mut self, timer: Timer, deadline: Option<Instant>) {
        self.timer = timer;
        self.deadline = deadline;
    }
}

/// Exponential backoff with up to 25% jitter, so a fleet of agents does not retry in lockstep.
pub fn backoff(initial: Duration, max: Duration, attempt: u32) -> Duration {
    let base = initial.saturating_mul(1u32 << attempt.saturating_sub(1).min(16)).min(max);
    let jitter = rand::random_range(0..=base.as_millis() as u64 / 4);
    base + Duration::from_millis(jitter)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(policy: Policy) -> Settings {
        Settings {
            policy,
            connect_timeout: Duration::from_secs(10),
            max_attempts: 3,
            backoff_initial: Duration::from_millis(100),
            backoff_max: Duration::from_secs(1),
            unreachable_retry: Duration::from_secs(60),
            sleep_after: Some(Duration::from_secs(30)),
        }
    }

    fn fail(retryable: bool) -> Input {
        Input::DriverReturned(Err(DriverFailure { message: "boom".into(), retryable }))
    }

    #[test]
    fn events_while_waking_produce_one_driver_call() {
        let t = Instant::now();
        let mut m = Lifecycle::new(settings(Policy::Immediate), false);
        assert_eq!(m.handle(Input::EventStored { received: t }, t), vec![Action::CallDriver { attempt: 1 }]);
        for _ in 0..100 {
            assert!(m.handle(Input::EventStored { received: t }, t).is_empty());
        }
        assert!(m.handle(Input::WakeRequested, t).is_empty());
        assert_eq!(m.state(), State::Waking);
    }

    #[test]
    fn driver_success_is_not_enough_without_a_connection() {
        let t = Instant::now();
        let mut m = Lifecycle::new(settings(Policy::Immediate), false);
        m.handle(Input::EventStored { received: t }, t);
        assert!(m.handle(Input::DriverReturned(Ok(())), t).is_empty());
        assert_eq!(m.state(), State::Waking);
        assert_eq!(m.deadline(), Some(t + Duration::from_secs(10)));
        let t2 = t + Duration::from_secs(10);
        assert!(m.handle(Input::Timer, t2).is_empty(), "backs off before retrying");
        assert!(m.last_error().unwrap().contains("did not connect"));
        let retry_at = m.deadline().unwrap();
        assert!(retry_at > t2 && retry_at <= t2 + Duration::from_millis(125));
        assert_eq!(m.handle(Input::Timer, retry_at), vec![Action::CallDriver { attempt: 2 }]);
    }

    #[test]
    fn failures_back_off_then_become_unreachable_and_keep_retrying() {
        let t = Instant::now();
        let mut m = Lifecycle::new(settings(Policy::Immediate), false);
        m.handle(Input::EventStored { received: t }, t);
        let mut now = t;
        for attempt in 2..=3 {
            m.handle(fail(true), now);
            now = m.deadline().unwrap();
            assert_eq!(m.handle(Input::Timer, now), vec![Action::CallDriver { attempt }]);
        }
        m.handle(fail(true), now);
        assert_eq!(m.state(), State::Unreachable);
        assert_eq!(m.last_wake().unwrap().outcome, "unreachable");
        assert_eq!(m.deadline(), Some(now + Duration::from_secs(60)));
        assert!(m.handle(Input::EventStored { received: now }, now).is_empty(), "events buffer while unreachable");
        let later = now + Duration::from_secs(60);
        assert_eq!(m.handle(Input::Timer, later).len(), 1, "periodic retry continues");
        m.handle(Input::Connected { at: later }, later);
        assert_eq!(m.state(), State::Awake);
        assert_eq!(m.last_wake().unwrap().outcome, "connected");
    }

    #[test]
    fn an_arriving_event_wakes_an_immediate_agent_before_it_is_stored_and_only_once() {
        let t = Instant::now();
        let later = t + Duration::from_millis(3);
        let mut m = Lifecycle::new(settings(Policy::Immediate), false);
        assert_eq!(m.handle(Input::EventArriving { received: t }, t), vec![Action::CallDriver { attempt: 1 }]);
        assert_eq!(m.state(), State::Waking);
        assert!(m.handle(Input::EventStored { received: t }, later).is_empty(), "the wake in progress covers it");
        m.handle(Input::DriverCalled { at: t + Duration::from_millis(1) }, later);
        assert_eq!(m.last_wake().and_then(|w| w.driver_called_after_ms), Some(1.0), "timed from arrival");

        // Coalescing, `never` and awake agents wait for the stored event.
        let mut coalescing = Lifecycle::new(settings(Policy::Coalesce(Duration::from_secs(30))), false);
        assert!(coalescing.handle(Input::EventArriving { received: t }, t).is_empty());
        assert_eq!(coalescing.deadline(), None, "no window opens for an event not yet stored");
        let mut never = Lifecycle::new(settings(Policy::Never), false);
        assert!(never.handle(Input::EventArriving { received: t }, t).is_empty());
        let mut awake = Lifecycle::new(settings(Policy::Immediate), false);
        awake.handle(Input::Connected { at: t }, t);
        let sleep_at = awake.deadline();
        assert!(awake.handle(Input::EventArriving { received: later }, later).is_empty());
        assert_eq!((awake.state(), awake.deadline()), (State::Awake, sleep_at));
    }

    #[test]
    fn an_early_wake_whose_event_was_never_stored_puts_the_agent_back_to_sleep() {
        let t = Instant::now();
        let mut m = Lifecycle::new(settings(Policy::Immediate), false);
        m.handle(Input::EventArriving { received: t }, t);
        m.handle(Input::DriverReturned(Ok(())), t);
        m.handle(Input::Connected { at: t }, t);
        assert_eq!(m.deadline(), Some(t + Duration::from_secs(30)), "nothing pending: the sleep timer runs");
        assert_eq!(m.handle(Input::Timer, t + Duration::from_secs(30)), vec![Action::Sleep]);
    }

    #[test]
    fn non_retryable_failure_is_unreachable_at_once() {
        let t = Instant::now();
        let mut m = Lifecycle::new(settings(Policy::Immediate), false);
        m.handle(Input::EventStored { received: t }, t);
        m.handle(fail(false), t);
        assert_eq!(m.state(), State::Unreachable);
    }

    #[test]
    fn coalesce_gathers_then_wakes_once() {
        let t = Instant::now();
        let mut m = Lifecycle::new(settings(Policy::Coalesce(Duration::from_secs(30))), false);
        assert!(m.handle(Input::EventStored { received: t }, t).is_empty());
        assert!(
            m.handle(Input::EventStored { received: t + Duration::from_secs(10) }, t + Duration::from_secs(10))
                .is_empty()
        );
        assert_eq!(m.deadline(), Some(t + Duration::from_secs(30)), "the window is not extended by later events");
        assert_eq!(m.handle(Input::Timer, t + Duration::from_secs(30)), vec![Action::CallDriver { attempt: 1 }]);
    }

    #[test]
    fn never_policy_waits_for_the_agent_but_operators_can_wake() {
        let t = Instant::now();
        let mut m = Lifecycle::new(settings(Policy::Never), false);
        assert!(m.handle(Input::EventStored { received: t }, t).is_empty());
        assert_eq!(m.state(), State::Asleep);
        assert_eq!(m.handle(Input::WakeRequested, t).len(), 1);
        m.handle(Input::Connected { at: t }, t);
        assert_eq!(m.state(), State::Awake);
    }

    #[test]
    fn wake_timings_are_recorded() {
        let t = Instant::now();
        let mut m = Lifecycle::new(settings(Policy::Immediate), false);
        m.handle(Input::EventStored { received: t }, t + Duration::from_millis(1));
        m.handle(Input::DriverCalled { at: t + Duration::from_millis(2) }, t + Duration::from_millis(2));
        // Inputs reach the runner late (here 7 ms); the timings use when things happened.
        let late = Duration::from_millis(7);
        m.handle(Input::Connected { at: t + Duration::from_millis(40) }, t + Duration::from_millis(40) + late);
        m.handle(
            Input::Delivered { events: 3, at: t + Duration::from_millis(45) },
            t + Duration::from_millis(45) + late,
        );
        m.handle(
            Input::Delivered { events: 2, at: t + Duration::from_millis(50) },
            t + Duration::from_millis(50) + late,
        );
        let w = m.last_wake().unwrap();
        assert_eq!(w.driver_called_after_ms, Some(2.0), "measured from receipt to the real call");
        assert_eq!(w.connected_after_ms, Some(40.0));
        assert_eq!(w.first_delivery_after_ms, Some(45.0));
        assert_eq!(w.events_drained, 5, "every batch of the woken session counts");
    }

    #[test]
    fn idle_awake_agent_is_put_to_sleep_and_pending_work_rewakes() {
        let t = Instant::now();
        let mut m = Lifecycle::new(settings(Policy::Immediate), true);
        assert_eq!(m.start(t).len(), 1);
        m.handle(Input::Connected { at: t }, t);
        assert_eq!(m.deadline(), None, "nothing to sleep on while events are pending");
        m.handle(Input::Acked { pending: 0 }, t);
        let at = m.deadline().unwrap();
        assert_eq!(at, t + Duration::from_secs(30));
        assert_eq!(m.handle(Input::Timer, at), vec![Action::Sleep]);
        m.handle(Input::EventStored { received: at }, at);
        // The first wake's driver call is still running (the agent connected before it
        // returned): the new wake calls the driver as soon as that stale call returns.
        assert!(m.handle(Input::Disconnected, at).is_empty());
        assert_eq!(m.state(), State::Waking);
        let stale = Input::DriverReturned(Err(DriverFailure { message: "killed".into(), retryable: true }));
        assert_eq!(m.handle(stale, at), vec![Action::CallDriver { attempt: 1 }]);
        assert_eq!(m.last_error(), None, "the stale failure is not this wake's");
        assert!(m.handle(Input::DriverReturned(Ok(())), at).is_empty());
        assert_eq!(m.deadline(), Some(at + Duration::from_secs(10)), "now waiting for the agent to connect");
    }

    #[test]
    fn a_sleep_that_did_not_stick_is_retried_with_backoff_until_it_does() {
        let t = Instant::now();
        let mut m = Lifecycle::new(settings(Policy::Immediate), false);
        m.handle(Input::Connected { at: t }, t);
        assert_eq!(m.handle(Input::Idle, t), vec![Action::Sleep]);
        m.handle(Input::Disconnected, t);
        let still_running = || DriverFailure { message: "reported sleep but still running".into(), retryable: true };
        m.handle(Input::SleepReturned(Err(still_running())), t);
        assert_eq!(m.state(), State::Asleep);
        assert!(m.last_error().unwrap().contains("still running"));
        let first = m.deadline().expect("a sleep retry is scheduled");
        assert_eq!(m.handle(Input::Timer, first), vec![Action::Sleep]);
        m.handle(Input::SleepReturned(Err(still_running())), first);
        let second = m.deadline().unwrap();
        assert!(second - first > first - t, "the retries back off");
        assert_eq!(m.handle(Input::Timer, second), vec![Action::Sleep]);
        m.handle(Input::SleepReturned(Ok(())), second);
        assert_eq!(m.deadline(), None, "a sleep that sticks ends the retries");

        // Work arriving meanwhile wins: the agent is woken, not put to sleep again.
        let mut m = Lifecycle::new(settings(Policy::Immediate), false);
        m.handle(Input::Connected { at: t }, t);
        m.handle(Input::Idle, t);
        m.handle(Input::Disconnected, t);
        m.handle(Input::SleepReturned(Err(still_running())), t);
        let retry = m.deadline().unwrap();
        assert_eq!(m.handle(Input::EventStored { received: t }, t), vec![Action::CallDriver { attempt: 1 }]);
        assert_ne!(m.handle(Input::Timer, retry), vec![Action::Sleep]);
    }

    #[test]
    fn crash_with_pending_work_rewakes_and_clean_exit_sleeps() {
        let t = Instant::now();
        let mut m = Lifecycle::new(settings(Policy::Immediate), false);
        m.handle(Input::Connected { at: t }, t);
        m.handle(Input::EventStored { received: t }, t);
        assert_eq!(m.handle(Input::Disconnected, t).len(), 1);
        let mut m = Lifecycle::new(settings(Policy::Immediate), false);
        m.handle(Input::Connected { at: t }, t);
        assert!(m.handle(Input::Disconnected, t).is_empty());
        assert_eq!(m.state(), State::Asleep);
    }

    #[test]
    fn backoff_grows_and_is_capped() {
        let i = Duration::from_millis(100);
        let max = Duration::from_secs(1);
        assert!(backoff(i, max, 1) < Duration::from_millis(126));
        assert!(backoff(i, max, 3) >= Duration::from_millis(400));
        assert!(backoff(i, max, 30) <= Duration::from_millis(1250));
    }
}
