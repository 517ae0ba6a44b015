//! The agent SDK: what an agent backend embeds to receive its events and send replies.
//!
//! One background task owns the QUIC connection and the session stream. It reconnects with
//! backoff when the connection drops, resumes from the proxy's cursor (authoritative, so an
//! agent that slept without local state resumes exactly), re-sends the latest ack, and skips
//! events this client already handed out in the same epoch, so a network blip does not make
//! the application see an event twice. Sends run on their own streams and are retried with
//! the same idempotency key, so a retry returns the recorded result instead of sending again.

use std::net::{SocketAddr, ToSocketAddrs};
use std::time::Duration;

use tokio::sync::{mpsc, watch};

use crate::event::{Event, EventRecord};
use crate::frame::{DEFAULT_MAX_FRAME, RejectCode, SendRequest, SendResult, ToAgent, ToProxy};
use crate::io::{FrameReader, IoError, write_frame};
use crate::tls::{Trust, client_config, udp_socket};

/// How to reach and authenticate to the proxy.
#[derive(Clone)]
pub struct ClientOptions {
    /// `host:port` of the proxy's QUIC listener.
    pub addr: String,
    /// Name the proxy's certificate is checked against (ignored when pinned).
    pub server_name: String,
    /// This agent's id.
    pub agent: String,
    /// This agent's secret token.
    pub token: String,
    /// How to trust the proxy's certificate.
    pub trust: Trust,
    /// Events the proxy may have in flight unacknowledged.
    pub window: u32,
    /// Largest frame accepted from the proxy.
    pub max_frame: usize,
    /// Free-form description shown in the proxy's logs.
    pub client: String,
    /// First reconnect delay; doubles up to `reconnect_max`.
    pub reconnect_initial: Duration,
    /// Ceiling of the reconnect delay.
    pub reconnect_max: Duration,
    /// Give up after this many consecutive failed reconnects.
    pub reconnect_attempts: u32,
}

impl std::fmt::Debug for ClientOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientOptions")
            .field("addr", &self.addr)
            .field("server_name", &self.server_name)
            .field("agent", &self.agent)
            .field("token", &"[redacted]")
            .field("window", &self.window)
            .finish_non_exhaustive()
    }
}

impl ClientOptions {
    /// Options with sensible defaults for everything but identity and trust.
    pub fn new(addr: impl Into<String>, agent: impl Into<String>, token: impl Into<String>, trust: Trust) -> Self {
        Self {
            addr: addr.into(),
            server_name: "localhost".into(),
            agent: agent.into(),
            token: token.into(),
            trust,
            window: 1024,
            max_frame: DEFAULT_MAX_FRAME,
            client: format!("concierge-sdk/{}", env!("CARGO_PKG_VERSION")),
            reconnect_initial: Duration::from_millis(100),
            reconnect_max: Duration::from_secs(5),
            reconnect_attempts: 20,
        }
    }

    /// Options from the environment a wake driver provides: `CONCIERGE_CONNECT`,
    /// `CONCIERGE_AGENT`, `CONCIERGE_TOKEN`, `CONCIERGE_SERVER_NAME`, and
    /// `CONCIERGE_CERT_SHA256` (a pin; without it the system's web PKI roots are not bundled,
    /// so a pin is required).
    pub fn from_env() -> Result<Self, ClientError> {
        let var = |name: &'static str| {
            std::env::var(name).map_err(|_| ClientError::Config(format!("environment variable {name} is not set")))
        };
        let pin = var("CONCIERGE_CERT_SHA256")?;
        let mut opts =
            Self::new(var("CONCIERGE_CONNECT")?, var("CONCIERGE_AGENT")?, var("CONCIERGE_TOKEN")?, Trust::Pinned(pin));
        if let Ok(name) = std::env::var("CONCIERGE_SERVER_NAME") {
            opts.server_name = name;
        }
        Ok(opts)
    }
}

/// What the proxy said when the session opened.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Welcome {
    /// Session id, for correlating logs.
    pub session: String,
    /// Log epoch; a change means the proxy's store lost events.
    pub epoch: u64,
    /// Last acknowledged offset at connect time.
    pub cursor: u64,
    /// Events waiting at connect time.
    pub backlog: u64,
}

/// Why the SDK gave up or a call failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Options are incomplete or invalid.
    #[error("client configuration: {0}")]
    Config(String),
    /// The proxy refused the session; retrying will not help unless the code is `ShuttingDown`.
    #[error("proxy rejected the session ({code:?}): {message}")]
    Rejected {
        /// Machine-readable reason.
        code: RejectCode,
        /// The proxy's explanation.
        message: String,
    },
    /// The proxy could not be reached or the connection broke.
    #[error("connection: {0}")]
    Connection(String),
    /// The proxy broke the protocol.
    #[error("protocol: {0}")]
    Protocol(String),
    /// The client was closed.
    #[error("client closed")]
    Closed,
}

impl ClientError {
    /// Whether reconnecting cannot help: bad options, or a refusal other than "shutting down"
    /// (a proxy restarting answers that until it stops, and its successor will accept).
    pub fn is_permanent(&self) -> bool {
        match self {
            ClientError::Config(_) => true,
            ClientError::Rejected { code, .. } => *code != RejectCode::ShuttingDown,
            _ => false,
        }
    }
}

impl From<IoError> for ClientError {
    fn from(e: IoError) -> Self {
        match e {
            IoError::Frame(f) => ClientError::Protocol(f.to_string()),
            other => ClientError::Connection(other.to_string()),
        }
    }
}

enum Command {
    Ack(u64),
    Credit(u32),
    Idle,
    Close,
}

/// What the connection task hands to the application side. Events travel a whole `Deliver`
/// frame at a time (one channel hand-off per batch, not per event, on the replay hot path),
/// still encoded: the application's task decodes each as it takes it, so the connection task
/// keeps reading and acking meanwhile.
enum Incoming {
    Events(std::collections::VecDeque<EventRecord>),
    Drain(String),
    Fatal(Box<ClientError>),
}

/// A connected agent. Dropping it closes the connection.
pub struct AgentClient {
    incoming: mpsc::Receiver<Incoming>,
    /// Events of the current batch not yet returned by `next`.
    ready: std::collections::VecDeque<EventRecord>,
    commands: mpsc::UnboundedSender<Command>,
    connection: watch::Receiver<Option<quinn::Connection>>,
    welcome: watch::Receiver<Welcome>,
    max_frame: usize,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Drop for AgentClient {
    /// Dropping without `close` ends the connection at once, like a crashed agent: unacked
    /// events are redelivered to the next session.
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

struct Session {
    connection: quinn::Connection,
    send: quinn::SendStream,
    reader: FrameReader,
    welcome: Welcome,
}

impl AgentClient {
    /// Connects and opens the session; fails fast if the proxy cannot be reached or rejects it.
    pub async fn connect(opts: ClientOptions) -> Result<Self, ClientError> {
        let endpoint = endpoint(&opts)?;
        let session = first_session(&endpoint, &opts).await?;
        // Batches, not events: a few in flight keep the pipeline full; the window bounds memory.
        let (incoming_tx, incoming) = mpsc::channel(4);
        let (commands, commands_rx) = mpsc::unbounded_channel();
        let (conn_tx, connection) = watch::channel(Some(session.connection.clone()));
        let (welcome_tx, welcome) = watch::channel(session.welcome.clone());
        let max_frame = opts.max_frame;
        let task = tokio::spawn(drive(endpoint, opts, session, incoming_tx, commands_rx, conn_tx, welcome_tx));
        Ok(Self { incoming, ready: Default::default(), commands, connection, welcome, max_frame, task: Some(task) })
    }

    /// What the proxy said on the most recent (re)connect.
    pub fn welcome(&self) -> Welcome {
        self.welcome.borrow().clone()
    }

    /// The next event in offset order; `Ok(None)` when the proxy asked this agent to drain
    /// (ack what you hold and exit) or the client was closed. An event that does not decode is
    /// a `Protocol` error naming its offset; the following call returns the next event.
    pub async fn next(&mut self) -> Result<Option<Event>, ClientError> {
        loop {
            if let Some(record) = self.ready.pop_front() {
                let event = record.decode().map_err(|e| {
                    ClientError::Protocol(format!("event at offset {} does not decode: {e}", record.offset))
                })?;
                return Ok(Some(event));
            }
            match self.incoming.recv().await {
                Some(Incoming::Events(batch)) => self.ready = batch,
                Some(Incoming::Drain(reason)) => {
                    tracing::info!(%reason, "proxy asked this agent to drain");
                    return Ok(None);
                }
                Some(Incoming::Fatal(e)) => return Err(*e),
                None => return Ok(None),
            }
        }
    }

    /// Marks every event up to `offset` processed; the proxy will not deliver them again.
    pub fn ack(&self, offset: u64) {
        let _ = self.commands.send(Command::Ack(offset));
    }

    /// Changes how many events the proxy may have in flight unacknowledged (at least 1, at
    /// most the agent's configured window), e.g. to slow down while the agent is busy. It
    /// applies from the next delivery and is kept across reconnects.
    pub fn grant(&self, window: u32) {
        let _ = self.commands.send(Command::Credit(window.max(1)));
    }

    /// Tells the proxy there is nothing to do, so it may put this agent to sleep.
    pub fn idle(&self) {
        let _ = self.commands.send(Command::Idle);
    }

    /// Sends through one of this agent's channels. Connection failures are retried with the
    /// same idempotency key, so the platform sees at most one send.
    pub async fn send(&self, request: SendRequest) -> Result<SendResult, ClientError> {
        let mut connection = self.connection.clone();
        let mut last_error = ClientError::Closed;
        for _ in 0..5 {
            let current = connection.borrow_and_update().clone();
            let Some(conn) = current else {
                // Reconnecting: wait for the next connection (or the client's end).
                if tokio::time::timeout(Duration::from_secs(30), connection.changed())
                    .await
                    .map_or(true, |r| r.is_err())
                {
                    return Err(last_error);
                }
                continue;
            };
            match send_once(&conn, &request, self.max_frame).await {
                Ok(result) => return Ok(result),
                Err(ClientError::Connection(e)) => {
                    last_error = ClientError::Connection(e);
                    let _ = tokio::time::timeout(Duration::from_secs(30), connection.changed()).await;
                }
                Err(other) => return Err(other),
            }
        }
        Err(last_error)
    }

    /// Closes the session cleanly after flushing pending acks.
    pub async fn close(mut self) {
        let _ = self.commands.send(Command::Close);
        if let Some(task) = self.task.take() {
            let _ = tokio::time::timeout(Duration::from_secs(5), task).await;
        }
    }
}

async fn send_once(
    conn: &quinn::Connection,
    request: &SendRequest,
    max_frame: usize,
) -> Result<SendResult, ClientError> {
    let (mut send, recv) = conn.open_bi().await.map_err(|e| ClientError::Connection(e.to_string()))?;
    write_frame(&mut send, &ToProxy::Send(request.clone())).await?;
    send.finish().map_err(|e| ClientError::Connection(e.to_string()))?;
    let mut reader = FrameReader::new(recv, max_frame);
    match reader.next::<ToAgent>().await? {
        Some(ToAgent::SendResult(result)) => Ok(result),
        Some(other) => Err(ClientError::Protocol(format!("expected SendResult, got {other:?}"))),
        None => Err(ClientError::Connection("send stream closed without a result".into())),
    }
}

fn endpoint(opts: &ClientOptions) -> Result<quinn::Endpoint, ClientError> {
    let config = client_config(opts.trust.clone()).map_err(|e| ClientError::Config(e.to_string()))?;
    let bind: SocketAddr = if resolve(&opts.addr)?.is_ipv6() { "[::]:0" } else { "0.0.0.0:0" }
        .parse()
        .map_err(|_| ClientError::Config("bind address".into()))?;
    let socket = udp_socket(bind).map_err(|e| ClientError::Connection(format!("cannot open UDP socket: {e}")))?;
    let runtime =
        quinn::default_runtime().ok_or_else(|| ClientError::Config("the agent SDK needs a Tokio runtime".into()))?;
    let mut endpoint = quinn::Endpoint::new(quinn::EndpointConfig::default(), None, socket, runtime)
        .map_err(|e| ClientError::Connection(format!("cannot open the QUIC endpoint: {e}")))?;
    endpoint.set_default_client_config(config);
    Ok(endpoint)
}

fn resolve(addr: &str) -> Result<SocketAddr, ClientError> {
    addr.to_socket_addrs()
        .map_err(|e| ClientError::Config(format!("cannot resolve {addr}: {e}")))?
        .next()
        .ok_or_else(|| ClientError::Config(format!("{addr} resolves to no address")))
}

/// The first session. A proxy that cannot be reached, or refuses, is an error at once; one
/// that was reached but ended the session before its Welcome could be read is tried again
/// with the reconnect backoff, as a later reconnect would be. A proxy does that on purpose:
/// a session started from a position another replica has since moved closes with "log
/// position moved; reconnect", possibly before the agent has read its Welcome.
async fn first_session(endpoint: &quinn::Endpoint, opts: &ClientOptions) -> Result<Session, ClientError> {
    let mut delay = opts.reconnect_initial;
    let mut attempt = 1;
    loop {
        let connection = handshake(endpoint, opts).await?;
        match hello(connection, opts).await {
            Err(e) if !e.is_permanent() && attempt < opts.reconnect_attempts => {
                tracing::debug!(error = %e, attempt, "session ended before its Welcome; connecting again");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(opts.reconnect_max);
                attempt += 1;
            }
            result => return result,
        }
    }
}

async fn open_session(endpoint: &quinn::Endpoint, opts: &ClientOptions) -> Result<Session, ClientError> {
    hello(handshake(endpoint, opts).await?, opts).await
}

/// A QUIC connection to the proxy.
async fn handshake(endpoint: &quinn::Endpoint, opts: &ClientOptions) -> Result<quinn::Connection, ClientError> {
    let addr = resolve(&opts.addr)?;
    let connecting = endpoint
        .connect(addr, &opts.server_name)
        .map_err(|e| ClientError::Connection(format!("cannot connect to {addr}: {e}")))?;
    let connection = tokio::time::timeout(Duration::from_secs(10), connecting)
        .await
        .map_err(|_| ClientError::Connection(format!("handshake with {addr} timed out")))?
        .map_err(|e| ClientError::Connection(format!("handshake with {addr}: {e}")))?;
    Ok(connection)
}

/// Opens the session stream on `connection`: Hello, then the proxy's Welcome or Reject.
async fn hello(connection: quinn::Connection, opts: &ClientOptions) -> Result<Session, ClientError> {
    let (mut send, recv) = connection.open_bi().await.map_err(|e| ClientError::Connection(e.to_string()))?;
    let hello = ToProxy::Hello {
        version: 1,
        agent: opts.agent.clone(),
        token: opts.token.clone(),
        client: opts.client.clone(),
        window: opts.window,
    };
    write_frame(&mut send, &hello).await?;
    let mut reader = FrameReader::new(recv, opts.max_frame);
    let welcome = match tokio::time::timeout(Duration::from_secs(10), reader.next::<ToAgent>()).await {
        Err(_) => return Err(ClientError::Connection("no answer to Hello within 10 s".into())),
        Ok(frame) => match frame? {
            Some(ToAgent::Welcome { session, epoch, cursor, backlog }) => Welcome { session, epoch, cursor, backlog },
            Some(ToAgent::Reject { code, message }) => return Err(ClientError::Rejected { code, message }),
            Some(other) => return Err(ClientError::Protocol(format!("expected Welcome, got {other:?}"))),
            None => return Err(ClientError::Connection("proxy closed the session before Welcome".into())),
        },
    };
    Ok(Session { connection, send, reader, welcome })
}

/// Owns the session: forwards events, writes acks, reconnects.
async fn drive(
    endpoint: quinn::Endpoint,
    mut opts: ClientOptions,
    mut session: Session,
    incoming: mpsc::Sender<Incoming>,
    mut commands: mpsc::UnboundedReceiver<Command>,
    connection: watch::Sender<Option<quinn::Connection>>,
    welcome: watch::Sender<Welcome>,
) {
    let mut epoch = session.welcome.epoch;
    let mut handed_up_to = session.welcome.cursor;
    let mut latest_ack = 0u64;
    loop {
        // Run one session until it breaks or the client closes.
        let outcome: Result<bool, ClientError> = async {
            loop {
                tokio::select! {
                    frame = session.reader.next::<ToAgent>() => match frame? {
                        Some(ToAgent::Deliver { events }) => {
                            // Skips what was already handed to the application before a reconnect.
                            let batch: std::collections::VecDeque<EventRecord> =
                                events.into_iter().filter(|r| r.offset > handed_up_to).collect();
                            if let Some(last) = batch.back() {
                                handed_up_to = last.offset;
                            }
                            if !batch.is_empty() && incoming.send(Incoming::Events(batch)).await.is_err() {
                                return Ok(true);
                            }
                        }
                        Some(ToAgent::Drain { reason }) => {
                            let _ = incoming.send(Incoming::Drain(reason)).await;
                        }
                        Some(other) => return Err(ClientError::Protocol(format!("unexpected frame on session stream: {other:?}"))),
                        None => return Err(ClientError::Connection("proxy closed the session".into())),
                    },
                    command = commands.recv() => match command {
                        Some(Command::Ack(up_to)) => {
                            latest_ack = latest_ack.max(up_to);
                            write_frame(&mut session.send, &ToProxy::Ack { up_to }).await?;
                        }
                        Some(Command::Credit(window)) => {
                            opts.window = window; // the next Hello asks for it too
                            write_frame(&mut session.send, &ToProxy::Credit { window }).await?;
                        }
                        Some(Command::Idle) => write_frame(&mut session.send, &ToProxy::Idle).await?,
                        Some(Command::Close) | None => {
                            let _ = session.send.finish();
                            // Give the proxy a moment to read the final acks before closing.
                            let _ = tokio::time::timeout(Duration::from_secs(2), session.send.stopped()).await;
                            session.connection.close(0u32.into(), b"client closed");
                            return Ok(true);
                        }
                    },
                }
            }
        }
        .await;
        if matches!(outcome, Ok(true)) {
            endpoint.wait_idle().await;
            return;
        }
        if let Err(e) = &outcome {
            if superseded(&session.connection) {
                // Another process took over this agent: reconnecting would take it back.
                let message = "a newer session of this agent took over".to_string();
                let _ = incoming
                    .send(Incoming::Fatal(Box::new(ClientError::Rejected { code: RejectCode::Superseded, message })))
                    .await;
                return;
            }
            tracing::warn!(error = %e, "session lost; reconnecting");
        }
        let _ = connection.send(None);
        // Reconnect with capped exponential backoff.
        let mut delay = opts.reconnect_initial;
        let mut attempt = 0;
        session = loop {
            attempt += 1;
            match open_session(&endpoint, &opts).await {
                Ok(s) => break s,
                Err(e) if e.is_permanent() => {
                    let _ = incoming.send(Incoming::Fatal(Box::new(e))).await;
                    return;
                }
                Err(e) if attempt >= opts.reconnect_attempts => {
                    let _ = incoming.send(Incoming::Fatal(Box::new(e))).await;
                    return;
                }
                Err(e) => {
                    tracing::debug!(error = %e, attempt, "reconnect failed");
                    let jitter = rand::random_range(0..=delay.as_millis() as u64 / 4 + 1);
                    tokio::time::sleep(delay + Duration::from_millis(jitter)).await;
                    delay = (delay * 2).min(opts.reconnect_max);
                }
            }
        };
        if session.welcome.epoch != epoch {
            tracing::warn!(
                old = epoch,
                new = session.welcome.epoch,
                "proxy log epoch changed: events may have been lost"
            );
            epoch = session.welcome.epoch;
            handed_up_to = session.welcome.cursor;
            latest_ack = 0;
        } else if latest_ack > session.welcome.cursor {
            let _ = write_frame(&mut session.send, &ToProxy::Ack { up_to: latest_ack }).await;
        }
        let _ = connection.send(Some(session.connection.clone()));
        let _ = welcome.send(session.welcome.clone());
    }
}

/// The proxy closes a connection with application code 2 when a newer session replaced it.
fn superseded(connection: &quinn::Connection) -> bool {
    matches!(connection.close_reason(), Some(quinn::ConnectionError::ApplicationClosed(c)) if c.error_code == quinn::VarInt::from_u32(2))
}
