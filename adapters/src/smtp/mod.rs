//! Email: an inbound SMTP server (protocol logic in [`session`], I/O here) that answers 250
//! only once a message is durable for every recipient agent, and threaded replies sent
//! through a submission relay ([`reply`]).

pub mod dkim;
pub mod message;
pub mod reply;
pub mod session;

use std::collections::{HashMap, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, watch};
use tokio::time::Instant;

use crate::{EventSink, SinkError};
pub use message::{Threading, TrustPolicy};
pub use session::{AddressBook, Envelope, Output, Recipient, Session, SessionConfig, StoreOutcome};

/// Bytes read from a client at a time; with the line limit this bounds a session's buffer.
const READ_CHUNK: usize = 8 * 1024;

/// Everything one SMTP listener needs besides its socket and sink.
#[derive(Clone)]
pub struct ServerSettings {
    /// Protocol settings shared by sessions.
    pub session: Arc<SessionConfig>,
    /// Concurrent sessions in total.
    pub max_connections: usize,
    /// Concurrent sessions per client IP.
    pub max_connections_per_ip: usize,
    /// Idle bound while waiting for client input.
    pub command_timeout: Duration,
    /// Bound on a whole session.
    pub session_timeout: Duration,
    /// Silence before the greeting; clients that talk into it are rejected.
    pub greeting_delay: Duration,
    /// STARTTLS server configuration, when a certificate is configured.
    pub tls: Option<Arc<rustls::ServerConfig>>,
    /// Whether a peer is a trusted relay whose `Authentication-Results` are passed through.
    pub trusted_peer: Arc<dyn Fn(IpAddr) -> bool + Send + Sync>,
    /// Only `Authentication-Results` with this authserv-id are passed through; `None` = none.
    pub authserv_id: Option<String>,
}

/// Loads a PEM certificate chain and key into a STARTTLS server config (rustls with ring).
pub fn tls_config(cert: &Path, key: &Path) -> Result<Arc<rustls::ServerConfig>, String> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let chain = CertificateDer::pem_file_iter(cert)
        .and_then(|i| i.collect::<Result<Vec<_>, _>>())
        .map_err(|e| format!("reading certificate {}: {e}", cert.display()))?;
    if chain.is_empty() {
        return Err(format!("{} holds no certificate", cert.display()));
    }
    let key = PrivateKeyDer::from_pem_file(key).map_err(|e| format!("reading private key {}: {e}", key.display()))?;
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .map_err(|e| format!("certificate and key do not form a usable identity: {e}"))?;
    Ok(Arc::new(config))
}

/// Counts sessions per client IP; a guard gives its slot back when dropped.
#[derive(Default)]
struct PerIp(Mutex<HashMap<IpAddr, usize>>);

struct IpSlot(Arc<PerIp>, IpAddr);

impl PerIp {
    fn acquire(self: &Arc<Self>, ip: IpAddr, max: usize) -> Option<IpSlot> {
        let mut map = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let n = map.entry(ip).or_insert(0);
        if *n >= max {
            return None;
        }
        *n += 1;
        Some(IpSlot(self.clone(), ip))
    }
}

impl Drop for IpSlot {
    fn drop(&mut self) {
        let mut map = self.0.0.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = map.get_mut(&self.1) {
            *n -= 1;
            if *n == 0 {
                map.remove(&self.1);
            }
        }
    }
}

/// Runs the SMTP listener until `shutdown` turns true; sessions then get 421 (a message being
/// stored finishes first, so its sender gets the true answer).
pub async fn serve(
    listener: TcpListener,
    settings: Arc<ServerSettings>,
    sink: Arc<dyn EventSink>,
    mut shutdown: watch::Receiver<bool>,
) {
    let global = Arc::new(Semaphore::new(settings.max_connections));
    let per_ip = Arc::new(PerIp::default());
    let mut sessions = tokio::task::JoinSet::new();
    loop {
        let accepted = tokio::select! {
            _ = shutdown.wait_for(|s| *s) => break,
            Some(_) = sessions.join_next(), if !sessions.is_empty() => continue,
            r = listener.accept() => r,
        };
        let (stream, addr) = match accepted {
            Ok(x) => x,
            Err(e) => {
                // Out of file descriptors and the like: back off instead of spinning.
                tracing::warn!(error = %e, "SMTP accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let ip = addr.ip();
        let Ok(permit) = global.clone().try_acquire_owned() else {
            tracing::warn!(peer = %ip, limit = settings.max_connections, "SMTP connection refused: global connection cap");
            let _ = stream.try_write(b"421 4.7.0 Too many connections; try again later\r\n");
            continue;
        };
        let Some(slot) = per_ip.acquire(ip, settings.max_connections_per_ip) else {
            tracing::warn!(peer = %ip, limit = settings.max_connections_per_ip, "SMTP connection refused: per-IP connection cap");
            let _ = stream.try_write(b"421 4.7.0 Too many connections from your address; try again later\r\n");
            continue;
        };
        let (settings, sink, shutdown) = (settings.clone(), sink.clone(), shutdown.clone());
        sessions.spawn(async move {
            let _permit = permit;
            let _slot = slot;
            let _ = stream.set_nodelay(true);
            handle(stream, addr, settings, sink, shutdown).await;
        });
    }
    // Sessions see the same shutdown signal; give them a moment to answer 421 or finish a store.
    let _ = tokio::time::timeout(Duration::from_secs(5), async { while sessions.join_next().await.is_some() {} }).await;
}

enum Conn {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::server::TlsStream<TcpStream>>),
    Gone,
}

impl Conn {
    async fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            Conn::Plain(s) => s.read(buf).await,
            Conn::Tls(s) => s.read(buf).await,
            Conn::Gone => Ok(0),
        }
    }

    async fn write_all(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        match self {
            Conn::Plain(s) => s.write_all(bytes).await,
            Conn::Tls(s) => {
                s.write_all(bytes).await?;
                s.flush().await
            }
            Conn::Gone => Ok(()),
        }
    }

    async fn shutdown(&mut self) {
        let _ = match self {
            Conn::Plain(s) => s.shutdown().await,
            Conn::Tls(s) => s.shutdown().await,
            Conn::Gone => Ok(()),
        };
    }
}

enum Flow {
    Continue,
    Close,
}

async fn handle(
    stream: TcpStream,
    addr: SocketAddr,
    settings: Arc<ServerSettings>,
    sink: Arc<dyn EventSink>,
    mut shutdown: watch::Receiver<bool>,
) {
    let ip = addr.ip();
    let deadline = Instant::now() + settings.session_timeout;
    let mut session = Session::new(settings.session.clone(), ip, false);
    let mut conn = Conn::Plain(stream);
    let mut buf = vec![0u8; READ_CHUNK];
    tracing::debug!(peer = %addr, "SMTP session opened");

    // Pre-greeting silence: a client that talks first is not a well-behaved MTA.
    if !settings.greeting_delay.is_zero() {
        match tokio::time::timeout(settings.greeting_delay, conn.read(&mut buf)).await {
            Err(_) => {}
            Ok(Ok(0)) | Ok(Err(_)) => return,
            Ok(Ok(n)) => {
                let outputs = session.receive(&buf[..n]);
                let _ = run(&mut conn, &mut session, outputs, &settings, &sink, ip).await;
                conn.shutdown().await;
                return;
            }
        }
    }
    let greeting = session.greeting();
    if let Flow::Close = run(&mut conn, &mut session, vec![greeting], &settings, &sink, ip).await {
        return;
    }
    loop {
        let idle = Instant::now() + settings.command_timeout;
        let read = tokio::select! {
            r = tokio::time::timeout_at(idle.min(deadline), conn.read(&mut buf)) => Some(r),
            stop = shutdown.wait_for(|s| *s) => {
                drop(stop);
                None
            }
        };
        let Some(read) = read else {
            let bye = session.shutting_down();
            let _ = run(&mut conn, &mut session, vec![bye, Output::Close], &settings, &sink, ip).await;
            return;
        };
        let n = match read {
            Err(_) if Instant::now() >= deadline => {
                tracing::warn!(peer = %addr, in_data = session.in_data(), limit = ?settings.session_timeout, "SMTP session exceeded session_timeout; closing");
                let bye = session.timeout();
                let _ = run(&mut conn, &mut session, vec![bye, Output::Close], &settings, &sink, ip).await;
                return;
            }
            Err(_) => {
                tracing::info!(peer = %addr, in_data = session.in_data(), "SMTP session timed out");
                let bye = session.timeout();
                let _ = run(&mut conn, &mut session, vec![bye, Output::Close], &settings, &sink, ip).await;
                return;
            }
            Ok(Err(e)) => {
                tracing::debug!(peer = %addr, error = %e, "SMTP read failed");
                return;
            }
            Ok(Ok(0)) => {
                tracing::debug!(peer = %addr, "SMTP client closed the connection");
                return;
            }
            Ok(Ok(n)) => n,
        };
        let outputs = session.receive(&buf[..n]);
        if let Flow::Close = run(&mut conn, &mut session, outputs, &settings, &sink, ip).await {
            return;
        }
    }
}

/// Carries out the session's outputs in order: writes, stores, TLS upgrades, close.
async fn run(
    conn: &mut Conn,
    session: &mut Session,
    outputs: Vec<Output>,
    settings: &ServerSettings,
    sink: &Arc<dyn EventSink>,
    ip: IpAddr,
) -> Flow {
    let mut pending: VecDeque<Output> = outputs.into();
    let mut out = String::new();
    while let Some(o) = pending.pop_front() {
        match o {
            Output::Reply(r) => out.push_str(&r),
            Output::Deliver(envelope) => {
                // Answers so far go out first; the 250 follows only after the durable write.
                if !out.is_empty() && conn.write_all(std::mem::take(&mut out).as_bytes()).await.is_err() {
                    return Flow::Close;
                }
                let outcome = deliver(&envelope, ip, settings, sink).await;
                pending.extend(session.stored(outcome));
            }
            Output::StartTls => {
                if conn.write_all(std::mem::take(&mut out).as_bytes()).await.is_err() {
                    return Flow::Close;
                }
                let (Some(tls), Conn::Plain(_)) = (settings.tls.as_ref(), &*conn) else { return Flow::Close };
                let Conn::Plain(stream) = std::mem::replace(conn, Conn::Gone) else { return Flow::Close };
                let acceptor = tokio_rustls::TlsAcceptor::from(tls.clone());
                match tokio::time::timeout(settings.command_timeout, acceptor.accept(stream)).await {
                    Ok(Ok(s)) => {
                        *conn = Conn::Tls(Box::new(s));
                        session.tls_started();
                    }
                    Ok(Err(e)) => {
                        tracing::info!(peer = %ip, error = %e, "SMTP STARTTLS handshake failed");
                        return Flow::Close;
                    }
                    Err(_) => {
                        tracing::info!(peer = %ip, "SMTP STARTTLS handshake timed out");
                        return Flow::Close;
                    }
                }
            }
            Output::Close => {
                let _ = conn.write_all(out.as_bytes()).await;
                conn.shutdown().await;
                return Flow::Close;
            }
        }
    }
    if !out.is_empty() && conn.write_all(out.as_bytes()).await.is_err() {
        return Flow::Close;
    }
    if session.is_closed() { Flow::Close } else { Flow::Continue }
}

/// Stores the message once per recipient agent (deduplicated by Message-ID); `Stored` only
/// when every agent's copy is durable.
async fn deliver(
    envelope: &Envelope,
    ip: IpAddr,
    settings: &ServerSettings,
    sink: &Arc<dyn EventSink>,
) -> StoreOutcome {
    let trust = TrustPolicy { trusted_peer: (settings.trusted_peer)(ip), authserv_id: settings.authserv_id.clone() };
    let events = message::events(envelope, ip, &trust);
    let message_id = events
        .first()
        .and_then(|e| e.meta.iter().find(|(k, _)| k == "message_id").map(|(_, v)| v.clone()))
        .unwrap_or_default();
    for event in events {
        let agent = event.agent.clone();
        match sink.ingest(event).await {
            Ok(ingested) => tracing::info!(
                peer = %ip, agent, offset = ingested.offset, duplicate = ingested.duplicate,
                size = envelope.data.len(), message_id, "email stored"
            ),
            Err(SinkError::Unavailable(e)) => {
                tracing::warn!(peer = %ip, agent, error = %e, "email not stored; answering 451");
                return StoreOutcome::Unavailable;
            }
            Err(SinkError::Rejected(e)) => {
                tracing::warn!(peer = %ip, agent, error = %e, "email refused by the proxy; answering 452");
                return StoreOutcome::Full;
            }
        }
    }
    StoreOutcome::Stored
}
