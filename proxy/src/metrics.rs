//! Prometheus metrics, the held-connection registry, and the periodic fleet snapshot that
//! both `/metrics` and the dashboard read.
//!
//! Why `prometheus-client` (not `prometheus`): it is the Prometheus project's own Rust client,
//! writes OpenMetrics text (base units, `_total` counters by construction), has typed label
//! sets and no global registry, and pulls in no protobuf stack.
//!
//! Cheap figures (counters, histograms) are updated where things happen. Expensive ones (a
//! store `stats` call per agent) are computed by [`spawn_collector`] every [`STATS_PERIOD`],
//! never at scrape time, so a scrape or a dashboard refresh costs no store round trip.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use concierge_protocol::{EventData, EventRecord, SendResult, now_ms};
use concierge_store::{Appended, Position, SendClaim, Stats, Store, StoreError};
use futures::StreamExt as _;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use serde::Serialize;
use tokio::sync::watch;
use tracing::Instrument as _;

use crate::fleet::Fleet;
use crate::lifecycle::{State, WakeRecord};

/// How often the figures of agents whose log moved are recomputed.
pub const MOVED_PERIOD: Duration = Duration::from_secs(1);
/// How often every agent's store figures are recomputed.
pub const STATS_PERIOD: Duration = Duration::from_secs(5);
/// Per-agent buffer history: one sample a minute, this many kept (two hours).
const HISTORY_SAMPLES: usize = 120;
/// Spacing of history samples.
const HISTORY_EVERY_MS: u64 = 60_000;
/// Concurrent `stats` calls while computing a snapshot (bounded load on the store).
const STATS_CONCURRENCY: usize = 32;
/// Held connections tracked at most (a bound, not a target).
const MAX_CONNECTIONS: usize = 10_000;
/// Figures kept per held connection at most.
const MAX_DETAILS: usize = 16;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct IngressLabels {
    channel: String,
    outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ChannelLabel {
    channel: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct AgentLabel {
    agent: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabel {
    outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabel {
    state: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OpLabel {
    op: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ConnectionLabels {
    channel: String,
    state: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BuildLabels {
    version: String,
}

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

/// Latency buckets from 100 µs to ~105 s (store writes, deliveries, wakes).
fn latency_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.0001, 2.0, 21))
}

/// One held platform connection (poller, socket, listener, webhook route) as operators see it.
#[derive(Clone, Debug, Serialize)]
pub struct ConnectionInfo {
    /// Channel kind (`telegram`, `slack`, `webhook`, ...).
    pub channel: String,
    /// Instance name (bot, route, listener).
    pub name: String,
    /// Free-form state (`connected`, `reconnecting`, `listening`, `failed`, ...).
    pub state: String,
    /// Unix ms of the last state change.
    pub since_ms: u64,
    /// Times the connection (re)entered `connected` after the first time.
    pub reconnects: u64,
    /// Unix ms of the last event received through it.
    pub last_event_ms: Option<u64>,
    /// Last error reported.
    pub last_error: Option<String>,
    /// Figures the adapter reports next to the state (e.g. Discord's `identify_remaining`).
    pub details: BTreeMap<String, u64>,
    /// Whether it was ever `connected` (so the next `connected` is a reconnect).
    #[serde(skip)]
    connected_before: bool,
}

/// Adapters report their held connections (pollers, listeners) into the registry.
impl concierge_adapters::ConnectionReporter for Metrics {
    fn state(&self, channel: &str, name: &str, state: &str, error: Option<&str>) {
        self.connection_state(channel, name, state);
        if let Some(e) = error {
            self.connection_error(channel, name, e);
        }
    }

    fn detail(&self, channel: &str, name: &str, key: &str, value: u64) {
        self.connection_detail(channel, name, key, value);
    }
}

/// Per-agent figures from the store, refreshed every [`STATS_PERIOD`].
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    /// Unix ms when it was computed (0 = never yet).
    pub at_ms: u64,
    /// Store figures by agent id (missing when the store failed for that agent).
    pub agents: HashMap<String, Stats>,
    /// Why the store could not be read, when it could not.
    pub store_error: Option<String>,
    /// The store's warnings (`Store::warnings`) as of the last full refresh that reached it;
    /// `None` before the first. Re-checked so a runtime change (e.g. Redis `CONFIG SET
    /// appendonly no`) shows up without a restart.
    pub store_warnings: Option<Vec<String>>,
}

/// One point of an agent's buffer history.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct Sample {
    /// Unix ms.
    pub at_ms: u64,
    /// Buffered (unacknowledged) events.
    pub pending: u64,
    /// Age of the oldest buffered event in ms (0 when none).
    pub oldest_age_ms: u64,
}

/// Every metric family, plus the connection registry and the fleet snapshot.
pub struct Metrics {
    registry: Registry,
    agent_labels: usize,
    ingress: Family<IngressLabels, Counter>,
    ack_latency: HistogramFamily<ChannelLabel>,
    buffered_events: Gauge,
    buffered_bytes: Gauge,
    agent_buffered_events: Family<AgentLabel, Gauge>,
    agent_buffered_bytes: Family<AgentLabel, Gauge>,
    oldest_buffered: Gauge<f64, AtomicU64>,
    delivered: Counter,
    redelivered: Counter,
    delivery_latency: Histogram,
    wakes: Family<OutcomeLabel, Counter>,
    wake_duration: HistogramFamily<OutcomeLabel>,
    agents: Family<StateLabel, Gauge>,
    store_latency: HistogramFamily<OpLabel>,
    store_errors: Family<OpLabel, Counter>,
    connections_gauge: Family<ConnectionLabels, Gauge>,
    connections: Mutex<BTreeMap<(String, String), ConnectionInfo>>,
    snapshot: RwLock<Arc<Snapshot>>,
    history: Mutex<HashMap<String, VecDeque<Sample>>>,
    /// Webhook refusals already added to `ingress`, by outcome (see [`Metrics::count_refusals`]).
    webhook_refused: Mutex<HashMap<&'static str, u64>>,
}

impl Metrics {
    /// Registers every family; `agent_labels` caps how many agents get per-agent series.
    pub fn new(agent_labels: u64) -> Self {
        let mut registry = Registry::default();
        let ingress = Family::<IngressLabels, Counter>::default();
        registry.register(
            "concierge_ingress_requests",
            "Inbound events by channel and outcome (stored, duplicate, rejected, unavailable)",
            ingress.clone(),
        );
        let ack_latency: HistogramFamily<ChannelLabel> = Family::new_with_constructor(latency_histogram);
        registry.register(
            "concierge_ingress_durable_ack_seconds",
            "Time from receiving an event to its durable store write (what a platform's ack waits for)",
            ack_latency.clone(),
        );
        let buffered_events = Gauge::default();
        registry.register(
            "concierge_buffered_events",
            "Events stored but not acknowledged, fleet-wide",
            buffered_events.clone(),
        );
        let buffered_bytes = Gauge::default();
        registry.register("concierge_buffered_bytes", "Bytes of buffered events, fleet-wide", buffered_bytes.clone());
        let agent_buffered_events = Family::<AgentLabel, Gauge>::default();
        registry.register(
            "concierge_agent_buffered_events",
            "Buffered events per agent (only the agents with the most, up to server.metrics_agent_labels)",
            agent_buffered_events.clone(),
        );
        let agent_buffered_bytes = Family::<AgentLabel, Gauge>::default();
        registry.register(
            "concierge_agent_buffered_bytes",
            "Buffered bytes per agent (same agents as concierge_agent_buffered_events)",
            agent_buffered_bytes.clone(),
        );
        let oldest_buffered = Gauge::<f64, AtomicU64>::default();
        registry.register(
            "concierge_buffered_oldest_event_timestamp_seconds",
            "Unix time of the oldest buffered event fleet-wide (0 when nothing is buffered)",
            oldest_buffered.clone(),
        );
        let delivered = Counter::default();
        registry.register(
            "concierge_events_delivered",
            "Events delivered to agents for the first time",
            delivered.clone(),
        );
        let redelivered = Counter::default();
        registry.register(
            "concierge_events_redelivered",
            "Events delivered again (not acknowledged before a reconnect, or rewound by an operator)",
            redelivered.clone(),
        );
        let delivery_latency = latency_histogram();
        registry.register(
            "concierge_delivery_latency_seconds",
            "End-to-end latency: event received -> first delivered to its agent",
            delivery_latency.clone(),
        );
        let wakes = Family::<OutcomeLabel, Counter>::default();
        registry.register("concierge_wakes", "Finished wakes by outcome (connected, unreachable)", wakes.clone());
        let wake_duration: HistogramFamily<OutcomeLabel> = Family::new_with_constructor(latency_histogram);
        registry.register(
            "concierge_wake_duration_seconds",
            "Wake trigger -> agent connected (or -> declared unreachable)",
            wake_duration.clone(),
        );
        let agents = Family::<StateLabel, Gauge>::default();
        registry.register("concierge_agents", "Configured agents by lifecycle state", agents.clone());
        let store_latency: HistogramFamily<OpLabel> = Family::new_with_constructor(latency_histogram);
        registry.register(
            "concierge_store_command_duration_seconds",
            "Store command latency by operation",
            store_latency.clone(),
        );
        let store_errors = Family::<OpLabel, Counter>::default();
        registry.register("concierge_store_errors", "Failed store commands by operation", store_errors.clone());
        let connections_gauge = Family::<ConnectionLabels, Gauge>::default();
        registry.register(
            "concierge_connections",
            "Held platform connections (pollers, sockets, listeners, webhook routes) by channel and state",
            connections_gauge.clone(),
        );
        let build = Family::<BuildLabels, Gauge>::default();
        build.get_or_create(&BuildLabels { version: env!("CARGO_PKG_VERSION").into() }).set(1);
        registry.register("concierge_build_info", "Build information (always 1)", build);
        Self {
            registry,
            agent_labels: usize::try_from(agent_labels).unwrap_or(usize::MAX),
            ingress,
            ack_latency,
            buffered_events,
            buffered_bytes,
            agent_buffered_events,
            agent_buffered_bytes,
            oldest_buffered,
            delivered,
            redelivered,
            delivery_latency,
            wakes,
            wake_duration,
            agents,
            store_latency,
            store_errors,
            connections_gauge,
            connections: Mutex::new(BTreeMap::new()),
            snapshot: RwLock::new(Arc::new(Snapshot::default())),
            history: Mutex::new(HashMap::new()),
            webhook_refused: Mutex::new(HashMap::new()),
        }
    }

    /// Adds webhook requests refused before reaching the sink (bad signature, too large, ...)
    /// to `concierge_ingress_requests{channel="webhook"}`: the adapter counts them
    /// process-wide, this adds what is new since the last call.
    fn count_refusals(&self) {
        let mut seen = lock(&self.webhook_refused);
        for (outcome, count) in concierge_adapters::webhook::refused_counts() {
            let before = seen.insert(outcome, count).unwrap_or(0);
            if count > before {
                self.ingress
                    .get_or_create(&IngressLabels { channel: "webhook".into(), outcome: outcome.into() })
                    .inc_by(count - before);
            }
        }
    }

    /// The exposition in OpenMetrics text format.
    pub fn encode(&self) -> String {
        self.count_refusals();
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }

    /// Records one ingest through channel `channel`/`name`: `outcome` is `stored`,
    /// `duplicate`, `rejected` or `unavailable`; `store_time` (the durable-ack latency) is
    /// given when the store was asked.
    pub fn ingested(&self, channel: &str, name: &str, outcome: &str, store_time: Option<Duration>) {
        self.ingress.get_or_create(&IngressLabels { channel: channel.into(), outcome: outcome.into() }).inc();
        if let Some(t) = store_time {
            self.ack_latency.get_or_create(&ChannelLabel { channel: channel.into() }).observe(t.as_secs_f64());
        }
        if outcome == "stored" {
            self.connection_event(channel, name);
        }
    }

    /// Records a batch written to an agent; `previously_delivered` is the highest offset this
    /// process had delivered to the agent before (those at or below it are redeliveries).
    pub fn delivered(&self, events: &[(u64, u64)], previously_delivered: u64) {
        let now = now_ms();
        for &(offset, received_at_ms) in events {
            if offset <= previously_delivered {
                self.redelivered.inc();
            } else {
                self.delivered.inc();
                self.delivery_latency.observe(now.saturating_sub(received_at_ms) as f64 / 1000.0);
            }
        }
    }

    /// Records a finished wake.
    pub fn wake_finished(&self, wake: &WakeRecord) {
        let label = OutcomeLabel { outcome: wake.outcome.into() };
        self.wakes.get_or_create(&label).inc();
        let ms = wake.connected_after_ms.unwrap_or_else(|| now_ms().saturating_sub(wake.started_at_ms) as f64);
        self.wake_duration.get_or_create(&label).observe(ms / 1000.0);
    }

    fn store_op(&self, op: &'static str, took: Duration, ok: bool) {
        let label = OpLabel { op: op.into() };
        self.store_latency.get_or_create(&label).observe(took.as_secs_f64());
        if !ok {
            self.store_errors.get_or_create(&label).inc();
        }
    }

    /// Reports a held connection's state; channels call this on every change (a registry
    /// any channel can report into, shown on the dashboard's channels view).
    pub fn connection_state(&self, channel: &str, name: &str, state: &str) {
        let mut all = lock(&self.connections);
        let key = (channel.to_string(), name.to_string());
        if !all.contains_key(&key) && all.len() >= MAX_CONNECTIONS {
            return;
        }
        let now = now_ms();
        let entry = all.entry(key).or_insert_with(|| ConnectionInfo {
            channel: channel.into(),
            name: name.into(),
            state: String::new(),
            since_ms: now,
            reconnects: 0,
            last_event_ms: None,
            last_error: None,
            details: BTreeMap::new(),
            connected_before: false,
        });
        if entry.state != state {
            if state == "connected" {
                entry.reconnects += u64::from(entry.connected_before);
                entry.connected_before = true;
            }
            entry.state = state.into();
            entry.since_ms = now;
        }
        self.recount_connections(&all);
    }

    /// Records a held connection's error (its state is reported separately).
    pub fn connection_error(&self, channel: &str, name: &str, error: &str) {
        if let Some(c) = lock(&self.connections).get_mut(&(channel.to_string(), name.to_string())) {
            c.last_error = Some(error.chars().take(500).collect());
        }
    }

    /// Records a figure of a held connection (registering it, state `starting`, if new).
    pub fn connection_detail(&self, channel: &str, name: &str, key: &str, value: u64) {
        let registered = lock(&self.connections).contains_key(&(channel.to_string(), name.to_string()));
        if !registered {
            self.connection_state(channel, name, "starting");
        }
        if let Some(c) = lock(&self.connections).get_mut(&(channel.to_string(), name.to_string()))
            && (c.details.len() < MAX_DETAILS || c.details.contains_key(key))
        {
            c.details.insert(key.to_string(), value);
        }
    }

    /// Records that an event arrived through a held connection.
    pub fn connection_event(&self, channel: &str, name: &str) {
        if let Some(c) = lock(&self.connections).get_mut(&(channel.to_string(), name.to_string())) {
            c.last_event_ms = Some(now_ms());
        }
    }

    /// Every registered connection.
    pub fn connections(&self) -> Vec<ConnectionInfo> {
        lock(&self.connections).values().cloned().collect()
    }

    /// One connection's state and last error by its registry key `(channel, name)`: a
    /// lookup, so a row of the admin API does not copy the whole registry (every webhook route
    /// is in it; with 1,000 agents copying it for each agent's page was a third to a half of
    /// the main runtime's samples while those pages were read).
    pub fn connection_status(&self, key: &(String, String)) -> Option<(String, Option<String>)> {
        lock(&self.connections).get(key).map(|c| (c.state.clone(), c.last_error.clone()))
    }

    fn recount_connections(&self, all: &BTreeMap<(String, String), ConnectionInfo>) {
        let mut counts: HashMap<ConnectionLabels, i64> = HashMap::new();
        for c in all.values() {
            *counts.entry(ConnectionLabels { channel: c.channel.clone(), state: c.state.clone() }).or_default() += 1;
        }
        self.connections_gauge.clear();
        for (labels, n) in counts {
            self.connections_gauge.get_or_create(&labels).set(n);
        }
    }

    /// The latest per-agent store figures.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.snapshot.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// An agent's buffer history (oldest first).
    pub fn history(&self, agent: &str) -> Vec<Sample> {
        lock(&self.history).get(agent).map(|h| h.iter().copied().collect()).unwrap_or_default()
    }

    /// Recomputes the snapshot and the gauges derived from it: every agent when `full`, else
    /// only the agents whose in-memory head or cursor moved since their last figures.
    pub async fn refresh(&self, store: &dyn Store, fleet: &Fleet, full: bool) {
        self.count_refusals();
        let now = now_ms();
        let mut by_state: HashMap<&'static str, i64> =
            [("asleep", 0), ("waking", 0), ("awake", 0), ("unreachable", 0)].into_iter().collect();
        for agent in fleet.values() {
            *by_state.entry(state_name(agent.view().state)).or_default() += 1;
        }
        for (state, n) in by_state {
            self.agents.get_or_create(&StateLabel { state: state.into() }).set(n);
        }
        let previous = self.snapshot();
        let moved = |id: &String| {
            let agent = &fleet[id];
            previous
                .agents
                .get(id)
                .is_none_or(|s| s.position.head != agent.head() || s.position.cursor != agent.cursor())
        };
        let ids: Vec<String> = fleet.keys().filter(|id| full || moved(id)).cloned().collect();
        if ids.is_empty() {
            return;
        }
        let results: Vec<(String, Result<Stats, StoreError>)> = futures::stream::iter(ids)
            .map(|id| async move {
                let stats = store.stats(&id).await;
                (id, stats)
            })
            .buffer_unordered(STATS_CONCURRENCY)
            .collect()
            .await;
        let mut snapshot = Snapshot { at_ms: now, ..(*previous).clone() };
        if full {
            snapshot.store_error = None;
        }
        for (id, r) in results {
            match r {
                Ok(s) => {
                    snapshot.agents.insert(id, s);
                }
                Err(e) => snapshot.store_error = Some(e.to_string()),
            }
        }
        // An unreachable store is reported as such; its settings are read once it answers.
        if full && snapshot.store_error.is_none() {
            snapshot.store_warnings = Some(store.warnings().await);
        }
        let (events, bytes) =
            snapshot.agents.values().fold((0u64, 0u64), |(e, b), s| (e + s.pending, b + s.pending_bytes));
        self.buffered_events.set(i64::try_from(events).unwrap_or(i64::MAX));
        self.buffered_bytes.set(i64::try_from(bytes).unwrap_or(i64::MAX));
        let oldest = snapshot.agents.values().filter_map(|s| s.oldest_pending_ms).min();
        self.oldest_buffered.set(oldest.map_or(0.0, |ms| ms as f64 / 1000.0));
        // Per-agent series for the agents with the most buffered events only (bounded cardinality).
        let mut top: Vec<(&String, &Stats)> = snapshot.agents.iter().filter(|(_, s)| s.pending > 0).collect();
        top.sort_by(|a, b| b.1.pending.cmp(&a.1.pending).then_with(|| a.0.cmp(b.0)));
        top.truncate(self.agent_labels);
        self.agent_buffered_events.clear();
        self.agent_buffered_bytes.clear();
        for (id, s) in top {
            let label = AgentLabel { agent: id.clone() };
            self.agent_buffered_events.get_or_create(&label).set(i64::try_from(s.pending).unwrap_or(i64::MAX));
            self.agent_buffered_bytes.get_or_create(&label).set(i64::try_from(s.pending_bytes).unwrap_or(i64::MAX));
        }
        {
            let mut history = lock(&self.history);
            for (id, s) in &snapshot.agents {
                let h = history.entry(id.clone()).or_default();
                if h.back().is_some_and(|last| now.saturating_sub(last.at_ms) < HISTORY_EVERY_MS) {
                    continue;
                }
                if h.len() >= HISTORY_SAMPLES {
                    h.pop_front();
                }
                let oldest_age_ms = s.oldest_pending_ms.map_or(0, |t| now.saturating_sub(t));
                h.push_back(Sample { at_ms: now, pending: s.pending, oldest_age_ms });
            }
        }
        *self.snapshot.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(snapshot);
    }
}

/// The snake_case name of a lifecycle state.
pub fn state_name(state: State) -> &'static str {
    match state {
        State::Asleep => "asleep",
        State::Waking => "waking",
        State::Awake => "awake",
        State::Unreachable => "unreachable",
    }
}

/// Refreshes the snapshot now and then every [`STATS_PERIOD`] (agents whose log moved every
/// [`MOVED_PERIOD`]) until shutdown.
pub fn spawn_collector(
    metrics: Arc<Metrics>,
    store: Arc<dyn Store>,
    fleet: Fleet,
    mut shutdown: watch::Receiver<bool>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(MOVED_PERIOD);
        let mut ticks: u64 = 0;
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let stop = async {
                let _ = shutdown.wait_for(|s| *s).await;
            };
            tokio::select! {
                _ = tick.tick() => {}
                _ = stop => return,
            }
            let full = ticks.is_multiple_of(STATS_PERIOD.as_secs() / MOVED_PERIOD.as_secs());
            ticks += 1;
            metrics.refresh(&*store, &fleet, full).await;
        }
    })
}

/// Poisoning only follows a panic elsewhere; the data (plain maps) is still usable.
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// A [`Store`] that times every command, counts failures and opens a `store` span per call.
pub struct MeteredStore {
    inner: Arc<dyn Store>,
    metrics: Arc<Metrics>,
}

impl MeteredStore {
    /// Wraps `inner`; every call is recorded in `metrics`.
    pub fn new(inner: Arc<dyn Store>, metrics: Arc<Metrics>) -> Self {
        Self { inner, metrics }
    }

    async fn timed<T>(
        &self,
        op: &'static str,
        agent: &str,
        f: impl Future<Output = Result<T, StoreError>>,
    ) -> Result<T, StoreError> {
        let started = Instant::now();
        let result = f.instrument(tracing::debug_span!("store", op, agent)).await;
        self.metrics.store_op(op, started.elapsed(), result.is_ok());
        result
    }
}

#[async_trait]
impl Store for MeteredStore {
    async fn append(&self, event: &EventData) -> Result<Appended, StoreError> {
        self.timed("append", &event.agent, self.inner.append(event)).await
    }
    async fn read_records(&self, agent: &str, after: u64, limit: usize) -> Result<Vec<EventRecord>, StoreError> {
        self.timed("read", agent, self.inner.read_records(agent, after, limit)).await
    }
    async fn ack(&self, agent: &str, up_to: u64) -> Result<u64, StoreError> {
        self.timed("ack", agent, self.inner.ack(agent, up_to)).await
    }
    async fn rewind(&self, agent: &str, to: u64) -> Result<u64, StoreError> {
        self.timed("rewind", agent, self.inner.rewind(agent, to)).await
    }
    async fn drop_events(&self, agent: &str, offsets: &[u64]) -> Result<u64, StoreError> {
        self.timed("drop_events", agent, self.inner.drop_events(agent, offsets)).await
    }
    async fn position(&self, agent: &str) -> Result<Position, StoreError> {
        self.timed("position", agent, self.inner.position(agent)).await
    }
    async fn stats(&self, agent: &str) -> Result<Stats, StoreError> {
        self.timed("stats", agent, self.inner.stats(agent)).await
    }
    async fn claim_send(&self, agent: &str, key: &str) -> Result<SendClaim, StoreError> {
        self.timed("claim_send", agent, self.inner.claim_send(agent, key)).await
    }
    async fn finish_send(&self, agent: &str, key: &str, result: &SendResult) -> Result<(), StoreError> {
        self.timed("finish_send", agent, self.inner.finish_send(agent, key, result)).await
    }
    async fn check_writable(&self) -> Result<(), StoreError> {
        self.timed("check_writable", "", self.inner.check_writable()).await
    }
    async fn get_state(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        self.timed("get_state", "", self.inner.get_state(key)).await
    }
    async fn put_state(&self, key: &str, value: &[u8]) -> Result<(), StoreError> {
        self.timed("put_state", "", self.inner.put_state(key, value)).await
    }
    async fn warnings(&self) -> Vec<String> {
        self.inner.warnings().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connection_registry_counts_states_and_reconnects() {
        let m = Metrics::new(10);
        m.connection_state("telegram", "bot1", "connecting");
        m.connection_state("telegram", "bot1", "connected");
        m.connection_state("telegram", "bot1", "reconnecting");
        m.connection_state("telegram", "bot1", "connected");
        m.connection_state("webhook", "hook", "listening");
        m.connection_error("telegram", "bot1", "409 conflict");
        let all = m.connections();
        assert_eq!(all.len(), 2);
        let bot = all.iter().find(|c| c.name == "bot1").unwrap();
        assert_eq!((bot.state.as_str(), bot.reconnects), ("connected", 1));
        assert_eq!(bot.last_error.as_deref(), Some("409 conflict"));
        let text = m.encode();
        assert!(text.contains("concierge_connections{channel=\"telegram\",state=\"connected\"} 1"), "{text}");
        assert!(!text.contains("state=\"reconnecting\""), "stale states are removed: {text}");
    }

    #[test]
    fn redeliveries_are_told_apart() {
        let m = Metrics::new(10);
        let now = now_ms();
        m.delivered(&[(1, now), (2, now), (3, now)], 1);
        let text = m.encode();
        assert!(text.contains("concierge_events_delivered_total 2"), "{text}");
        assert!(text.contains("concierge_events_redelivered_total 1"), "{text}");
        assert!(text.contains("concierge_delivery_latency_seconds_count 2"), "{text}");
    }
}
