//! Assembles a running proxy from a [`Config`]: store, identity, fleet, listeners, runners;
//! and takes it down again in the order that keeps promise 1 (readiness first, then
//! listeners, in-flight writes finish, sessions close with a reason).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::Context as _;
use async_trait::async_trait;
use concierge_adapters::{EventSink, Ingested, SinkError};
use concierge_config::{Config, StoreBackend};
use concierge_protocol::{EventData, EventRecord};
use concierge_store::{Appended, Store, StoreOptions};
use concierge_wakeup::ConnectInfo;
use futures::StreamExt as _;
use tokio::sync::watch;
use tracing::Instrument as _;
use tracing::field::Empty;

use crate::fleet::{AgentRuntime, Fleet};
use crate::metrics::{MeteredStore, Metrics};
use crate::outbound::Outbound;
use crate::{admin, certs, channels, session, wake};

/// Webhook requests handled at once; more wait in the accept queue (backpressure).
const MAX_CONCURRENT_INGRESS: usize = 1024;

/// Everything the listeners share.
pub struct App {
    /// The validated configuration.
    pub config: Config,
    /// The durable log.
    pub store: Arc<dyn Store>,
    /// Configured agents.
    pub fleet: Fleet,
    /// Agent sends.
    pub outbound: Outbound,
    /// Frame ceiling on QUIC streams.
    pub max_frame: usize,
    /// SHA-256 of the proxy's certificate.
    pub fingerprint: String,
    /// Store settings that break promises, shown by the admin API.
    pub warnings: Vec<String>,
    /// Prometheus metrics, held-connection registry and fleet snapshot.
    pub metrics: Arc<Metrics>,
    shutting_down: AtomicBool,
}

impl App {
    /// True once shutdown began; `/readyz` fails and new sessions are refused.
    pub fn shutting_down(&self) -> bool {
        self.shutting_down.load(Ordering::Relaxed)
    }
}

/// The proxy's front door for inbound events (promise 1): `Ok` only after the durable write.
#[async_trait]
impl EventSink for App {
    async fn ingest(&self, event: EventData) -> Result<Ingested, SinkError> {
        let received = std::time::Instant::now();
        let (kind, name) = (event.channel.kind.as_str(), event.channel.name.as_str());
        let Some(agent) = self.fleet.get(&event.agent) else {
            self.metrics.ingested(kind, name, "rejected", None);
            return Err(SinkError::Rejected(format!("unknown agent {}", event.agent)));
        };
        let pending = agent.pending();
        if pending >= agent.config.max_pending {
            self.metrics.ingested(kind, name, "rejected", None);
            return Err(SinkError::Rejected(format!(
                "buffer full: agent {} has {pending} events pending",
                event.agent
            )));
        }
        agent.event_arriving(received);
        let span = tracing::info_span!("ingest", agent = %event.agent, channel = kind, route = name, offset = Empty);
        let mut event = event;
        if crate::otlp::exporting()
            && let Some(traceparent) = crate::otlp::traceparent(&span)
        {
            // Stored with the event: the replay span links to it, even after a restart.
            event.meta.push((crate::otlp::TRACEPARENT.to_owned(), traceparent));
        }
        let (kind, name) = (event.channel.kind.as_str(), event.channel.name.as_str());
        let started = std::time::Instant::now();
        let result = self.store.append(&event).instrument(span.clone()).await;
        let outcome = match &result {
            Ok(Appended::Stored(_)) => "stored",
            Ok(Appended::Duplicate(_)) => "duplicate",
            Err(_) => "unavailable",
        };
        self.metrics.ingested(kind, name, outcome, Some(started.elapsed()));
        if let Ok(a) = &result {
            span.record("offset", a.offset());
        }
        match result {
            Ok(Appended::Stored(offset)) => {
                // Before the head moves, so the session it wakes finds the event in hand.
                agent.keep_fresh(|| EventRecord {
                    offset,
                    received_at_ms: event.received_at_ms,
                    record: event.to_record(),
                });
                agent.stored(offset, received);
                Ok(Ingested { offset, duplicate: false })
            }
            Ok(Appended::Duplicate(offset)) => Ok(Ingested { offset, duplicate: true }),
            Err(e) => {
                tracing::warn!(agent = %event.agent, error = %e, "event not stored; not acknowledged");
                Err(SinkError::Unavailable(e.to_string()))
            }
        }
    }

    async fn load_state(&self, key: &str) -> Result<Option<Vec<u8>>, SinkError> {
        self.store.get_state(key).await.map_err(|e| SinkError::Unavailable(e.to_string()))
    }

    async fn save_state(&self, key: &str, value: &[u8]) -> Result<(), SinkError> {
        self.store.put_state(key, value).await.map_err(|e| SinkError::Unavailable(e.to_string()))
    }
}

/// A started proxy: its bound addresses and the means to stop it.
pub struct Running {
    /// Where agents dial.
    pub quic_addr: SocketAddr,
    /// Webhook ingress.
    pub http_addr: SocketAddr,
    /// Admin API.
    pub admin_addr: SocketAddr,
    /// Shared state (tests and the binary read it).
    pub app: Arc<App>,
    endpoint: quinn::Endpoint,
    /// Stops what takes events in (webhooks, SMTP, chat connections, new QUIC connections).
    stop_ingress: watch::Sender<bool>,
    /// Stops the admin listener and the metrics collector: last, so readiness stays observable.
    stop_admin: watch::Sender<bool>,
    /// Lifecycle runners: aborted last.
    runners: Vec<tokio::task::JoinHandle<()>>,
    /// Ingress listeners and channel connections: they finish in-flight work once stopped.
    ingress: Vec<tokio::task::JoinHandle<()>>,
    /// The admin listener and the metrics collector.
    admin: Vec<tokio::task::JoinHandle<()>>,
    /// Where the QUIC endpoint, its connections and the agent sessions run.
    _quic: QuicRuntime,
}

/// The runtime of the QUIC side. A handshake's steps run key exchange and signature code; on
/// a runtime of their own, a storm of them does not queue ahead of webhooks, lifecycle
/// runners and wake drivers (1,000 wakes at once: wake overhead p50 7.7-8.0 -> 3.9-4.5 ms,
/// Hello -> first delivery p99 ~16 -> 7.4-8.5 ms; BENCHMARKS.md).
struct QuicRuntime(Option<tokio::runtime::Runtime>);

impl QuicRuntime {
    fn start() -> anyhow::Result<QuicRuntime> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .thread_name("concierge-quic")
            .enable_all()
            .build()
            .context("starting the QUIC runtime")?;
        Ok(QuicRuntime(Some(runtime)))
    }

    fn handle(&self) -> &tokio::runtime::Handle {
        // Present until drop.
        self.0.as_ref().map(tokio::runtime::Runtime::handle).expect("the QUIC runtime lives until drop")
    }
}

impl Drop for QuicRuntime {
    /// Dropping a runtime blocks, which is not allowed inside another one: let it wind down
    /// in the background (everything on it has been closed by then).
    fn drop(&mut self) {
        if let Some(runtime) = self.0.take() {
            runtime.shutdown_background();
        }
    }
}

/// Opens the configured store.
pub async fn open_store(config: &Config) -> anyhow::Result<Arc<dyn Store>> {
    let options = StoreOptions {
        dedupe_ttl: config.store.dedupe_ttl,
        retain_acked: config.store.retain_acked,
        send_ttl: config.store.send_ttl,
    };
    Ok(match &config.store.backend {
        StoreBackend::Embedded { path } => Arc::new(concierge_store::sqlite::SqliteStore::open(path, options)?),
        StoreBackend::Redis { url } => {
            Arc::new(concierge_store::redis::RedisStore::connect(url.expose(), options).await?)
        }
    })
}

/// Starts every part of the proxy.
pub async fn start(config: Config) -> anyhow::Result<Running> {
    let metrics = Arc::new(Metrics::new(config.server.metrics_agent_labels));
    let store: Arc<dyn Store> = Arc::new(MeteredStore::new(open_store(&config).await?, metrics.clone()));
    let warnings = store.warnings().await;
    for w in &warnings {
        tracing::warn!("store: {w}");
    }
    let identity = match &config.tls {
        Some(files) => certs::load(&files.cert, &files.key)?,
        None => certs::dev(&config.server.data_dir, &config.server.server_name)?,
    };
    let fingerprint = identity.fingerprint.clone();
    let server_config = concierge_protocol::tls::server_config(identity.chain, identity.key)?;
    let socket = concierge_protocol::tls::udp_socket(config.server.quic_listen)
        .with_context(|| format!("binding QUIC on {}", config.server.quic_listen))?;
    let quic = QuicRuntime::start()?;
    let endpoint = {
        // quinn spawns the endpoint's and every connection's tasks where it is created.
        let _inside = quic.handle().enter();
        let runtime = quinn::default_runtime().context("no async runtime for QUIC")?;
        quinn::Endpoint::new(quinn::EndpointConfig::default(), Some(server_config), socket, runtime)
            .with_context(|| format!("starting QUIC on {}", config.server.quic_listen))?
    };
    let quic_addr = endpoint.local_addr()?;

    let mut fleet = Fleet::new();
    let mut inputs = Vec::new();
    // Positions are read concurrently: one round trip each, and fleets have thousands of agents.
    let positions: Vec<_> = futures::stream::iter(config.agents.keys())
        .map(|id| {
            let store = &store;
            async move {
                let position = store.position(id).await;
                position.with_context(|| format!("reading the log position of agent {id}"))
            }
        })
        .buffered(64)
        .collect()
        .await;
    for ((id, agent), position) in config.agents.iter().zip(positions) {
        let position = position?;
        let (runtime, rx) = AgentRuntime::new(agent.clone(), position.head, position.cursor);
        fleet.insert(id.clone(), runtime.clone());
        inputs.push((runtime, rx));
    }

    let http = channels::http_client()?;
    let bindings = channels::senders(&config, &http);
    let app = Arc::new(App {
        outbound: Outbound::new(store.clone(), bindings),
        max_frame: config.server.max_frame as usize,
        store,
        fleet,
        fingerprint: fingerprint.clone(),
        warnings,
        metrics: metrics.clone(),
        shutting_down: AtomicBool::new(false),
        config,
    });

    let (stop_ingress, shutdown_rx) = watch::channel(false);
    let (stop_admin, admin_rx) = watch::channel(false);
    let mut runners = Vec::new();
    let mut tasks = Vec::new();
    let mut admin_tasks = Vec::new();

    let public = if app.config.server.public_addr.ends_with(":0") {
        quic_addr.to_string()
    } else {
        app.config.server.public_addr.clone()
    };
    let connect = ConnectInfo {
        addr: public,
        server_name: app.config.server.server_name.clone(),
        cert_sha256: Some(fingerprint),
    };
    let wake_http = concierge_wakeup::http_client().map_err(|e| anyhow::anyhow!(e.message))?;
    for (runtime, rx) in inputs {
        let driver = wake::driver(&runtime.config, &wake_http)
            .map_err(|e| anyhow::anyhow!("agent {}: wake driver: {}", runtime.id(), e.message))?;
        runners.push(wake::spawn(runtime, rx, driver, connect.clone(), metrics.clone(), app.store.clone()));
    }
    for name in app.config.webhooks.keys() {
        metrics.connection_state("webhook", name, "listening");
    }
    admin_tasks.push(crate::metrics::spawn_collector(
        metrics.clone(),
        app.store.clone(),
        app.fleet.clone(),
        admin_rx.clone(),
    ));

    let sink = app.clone() as Arc<dyn EventSink>;
    let reporter = metrics.clone() as Arc<dyn concierge_adapters::ConnectionReporter>;
    tasks.extend(channels::spawn_connections(&app.config, &http, sink.clone(), reporter, shutdown_rx.clone()));
    // Worst-case ingress memory is concurrent requests x max_body: bound the former too.
    let ingress = channels::ingress(&app.config, sink)
        .layer(tower::limit::GlobalConcurrencyLimitLayer::new(MAX_CONCURRENT_INGRESS));
    let http_listener = tokio::net::TcpListener::bind(app.config.server.http_listen)
        .await
        .with_context(|| format!("binding webhook ingress on {}", app.config.server.http_listen))?;
    let http_addr = http_listener.local_addr()?;
    tasks.push(serve_http(http_listener, ingress, shutdown_rx.clone()));

    let admin_listener = tokio::net::TcpListener::bind(app.config.server.admin_listen)
        .await
        .with_context(|| format!("binding the admin API on {}", app.config.server.admin_listen))?;
    let admin_addr = admin_listener.local_addr()?;
    admin_tasks.push(serve_http(admin_listener, admin::router(app.clone()), admin_rx));

    tasks.push(quic.handle().spawn(session::serve(app.clone(), endpoint.clone(), shutdown_rx)));
    Ok(Running {
        quic_addr,
        http_addr,
        admin_addr,
        app,
        endpoint,
        stop_ingress,
        stop_admin,
        runners,
        ingress: tasks,
        admin: admin_tasks,
        _quic: quic,
    })
}

fn serve_http(
    listener: tokio::net::TcpListener,
    router: axum::Router,
    mut shutdown: watch::Receiver<bool>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let stop = async move {
            let _ = shutdown.wait_for(|s| *s).await;
        };
        if let Err(e) = axum::serve(listener, router).with_graceful_shutdown(stop).await {
            tracing::error!(error = %e, "HTTP listener failed");
        }
    })
}

impl Running {
    /// Stops in an order a load balancer and the agents can observe:
    /// 1. `/readyz` fails (new sessions are refused with `ShuttingDown`) while everything else
    ///    keeps serving for `server.shutdown_delay`, so balancers stop routing here first;
    /// 2. the ingress listeners stop accepting and their in-flight requests (durable writes)
    ///    finish, bounded by `server.shutdown_grace`;
    /// 3. agent sessions close with the reason "proxy shutting down" and flush their last ack;
    /// 4. the admin listener stops last, and the lifecycle runners are aborted.
    pub async fn shutdown(self) {
        let server = &self.app.config.server;
        let (delay, grace) = (server.shutdown_delay, server.shutdown_grace);
        self.app.shutting_down.store(true, Ordering::Relaxed);
        tracing::info!(?delay, "shutting down: readiness fails now, listeners stop after the delay");
        tokio::time::sleep(delay).await;

        let _ = self.stop_ingress.send(true);
        if tokio::time::timeout(grace, futures::future::join_all(self.ingress)).await.is_err() {
            tracing::warn!(?grace, "in-flight requests did not finish within the shutdown grace");
        }

        for agent in self.app.fleet.values() {
            agent.close_session(SHUTDOWN_REASON);
        }
        self.endpoint.close(1u32.into(), SHUTDOWN_REASON.as_bytes());
        // A session detaches only after persisting its last ack.
        let detached = async {
            for agent in self.app.fleet.values() {
                let mut detach = agent.watch_detach();
                while agent.connected() {
                    if detach.changed().await.is_err() {
                        break;
                    }
                }
            }
            self.endpoint.wait_idle().await;
        };
        if tokio::time::timeout(grace, detached).await.is_err() {
            tracing::warn!(?grace, "agent sessions did not close within the shutdown grace");
        }

        let _ = self.stop_admin.send(true);
        let _ = tokio::time::timeout(grace, futures::future::join_all(self.admin)).await;
        for r in self.runners {
            r.abort();
        }
    }
}

/// What agents read as the close reason when the proxy stops.
pub const SHUTDOWN_REASON: &str = "proxy shutting down";
