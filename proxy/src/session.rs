//! The QUIC side: accepts agent connections, authenticates the session stream, delivers the
//! agent's log within its credit window, applies acks, and serves each send on its own stream.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use concierge_protocol::frame::{SUPPORTED_VERSIONS, encode_into};
use concierge_protocol::io::{FrameReader, IoError, write_encoded, write_frame};
use concierge_protocol::{EventRecord, RejectCode, SendResult, ToAgent, ToProxy};
use tokio::sync::watch;
use tracing::Instrument as _;
use tracing::field::Empty;

use crate::app::App;
use crate::fleet::{AgentRuntime, SessionControl};
use crate::lifecycle::Input;

/// Most events per `Deliver` frame; also bounded by bytes so frames stay under the ceiling.
const MAX_BATCH: usize = 512;
/// The agent must say Hello this quickly after opening the connection.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);

static NEXT_SESSION: AtomicU64 = AtomicU64::new(1);

/// Accepts connections until shutdown.
pub async fn serve(app: Arc<App>, endpoint: quinn::Endpoint, mut shutdown: watch::Receiver<bool>) {
    loop {
        let incoming = tokio::select! {
            i = endpoint.accept() => match i { Some(i) => i, None => return },
            _ = shutdown.wait_for(|s| *s) => return,
        };
        let app = app.clone();
        tokio::spawn(async move {
            let remote = incoming.remote_address();
            match incoming.await {
                Ok(conn) => connection(app, conn).await,
                Err(e) => tracing::debug!(%remote, error = %e, "QUIC handshake failed"),
            }
        });
    }
}

async fn connection(app: Arc<App>, conn: quinn::Connection) {
    let remote = conn.remote_address();
    let (mut send, recv) = match tokio::time::timeout(HELLO_TIMEOUT, conn.accept_bi()).await {
        Ok(Ok(streams)) => streams,
        Ok(Err(e)) => return tracing::debug!(%remote, error = %e, "connection closed before the session stream"),
        Err(_) => return conn.close(3u32.into(), b"no session stream"),
    };
    let mut reader = FrameReader::new(recv, app.max_frame);
    let accepted = tokio::time::timeout(HELLO_TIMEOUT, hello(&app, &mut reader))
        .await
        .unwrap_or_else(|_| Err((RejectCode::BadHello, format!("no Hello within {HELLO_TIMEOUT:?}"))));
    let (agent, window) = match accepted {
        Ok(accepted) => accepted,
        Err((code, message)) => {
            tracing::info!(%remote, ?code, %message, "session rejected");
            let _ = write_frame(&mut send, &ToAgent::Reject { code, message }).await;
            // Closing the connection discards unsent stream data: let the Reject go out first.
            let _ = send.finish();
            let _ = tokio::time::timeout(Duration::from_secs(1), send.stopped()).await;
            return conn.close(4u32.into(), b"rejected");
        }
    };
    let id = NEXT_SESSION.fetch_add(1, Ordering::Relaxed);
    let (drain_tx, drain_rx) = watch::channel(false);
    agent.attach(SessionControl { id, drain: drain_tx, connection: conn.clone() });
    tracing::info!(agent = agent.id(), session = id, %remote, "agent connected");
    let sends = tokio::spawn(serve_sends(app.clone(), agent.clone(), conn.clone()));
    let result = deliver(&app, &agent, id, window, &mut send, &mut reader, drain_rx).await;
    match &result {
        Ok(()) => tracing::info!(agent = agent.id(), session = id, "session ended"),
        Err(e) => tracing::info!(agent = agent.id(), session = id, error = %e, "session ended"),
    }
    match &result {
        Err(SessionError::Protocol(message)) => conn.close(5u32.into(), message.as_bytes()),
        // Without the store the session delivers nothing and drops acks: close it so the agent
        // reconnects (and resumes from the durable cursor) instead of idling on a dead session.
        Err(SessionError::Store(_)) => conn.close(6u32.into(), b"event store unavailable; reconnect"),
        _ => {}
    }
    agent.detach(id);
    // Sends already accepted finish on their own; new ones end with the connection.
    let _ = tokio::time::timeout(Duration::from_secs(30), conn.closed()).await;
    sends.abort();
}

/// Reads and checks `Hello`; the error is what `Reject` says.
async fn hello(app: &App, reader: &mut FrameReader) -> Result<(Arc<AgentRuntime>, u32), (RejectCode, String)> {
    let frame =
        reader.next::<ToProxy>().await.map_err(|e| (RejectCode::BadHello, format!("could not read Hello: {e}")))?;
    let Some(ToProxy::Hello { version, agent, token, client, window }) = frame else {
        return Err((RejectCode::BadHello, "the first frame on the session stream must be Hello".into()));
    };
    if !SUPPORTED_VERSIONS.contains(&version) {
        return Err((
            RejectCode::UnsupportedVersion,
            format!("protocol version {version} is not supported; supported versions: {SUPPORTED_VERSIONS:?}"),
        ));
    }
    if app.shutting_down() {
        return Err((RejectCode::ShuttingDown, "the proxy is shutting down; reconnect shortly".into()));
    }
    // Unknown agent and wrong token get the same answer: no probing for agent ids.
    match app.fleet.get(&agent) {
        Some(a) if a.config.token_matches(&token) => {
            tracing::debug!(%agent, %client, window, "hello accepted");
            Ok((a.clone(), window))
        }
        _ => Err((RejectCode::Unauthorized, "unknown agent or wrong token".into())),
    }
}

#[derive(Debug, thiserror::Error)]
enum SessionError {
    #[error("protocol error: {0}")]
    Protocol(String),
    #[error("{0}")]
    Io(String),
    #[error("store: {0}")]
    Store(#[from] concierge_store::StoreError),
}

impl From<IoError> for SessionError {
    fn from(e: IoError) -> Self {
        match e {
            IoError::Frame(f) => SessionError::Protocol(f.to_string()),
            other => SessionError::Io(other.to_string()),
        }
    }
}

/// Welcome, then replay from the cursor and tail the log within the credit window.
///
/// Two things keep replay fast: the next batch is read from the store while the current one
/// is written to the agent, and acks are persisted by a companion future, so delivery never
/// waits for the store's ack. Every exit flushes the latest ack.
async fn deliver(
    app: &App,
    agent: &AgentRuntime,
    session: u64,
    window: u32,
    send: &mut quinn::SendStream,
    reader: &mut FrameReader,
    drain: watch::Receiver<bool>,
) -> Result<(), SessionError> {
    let position = app.store.position(agent.id()).await?;
    let welcome = ToAgent::Welcome {
        session: format!("{session:x}"),
        epoch: position.epoch,
        cursor: position.cursor,
        backlog: position.head.saturating_sub(position.cursor),
    };
    write_frame(send, &welcome).await?;
    let (acks, acks_rx) = watch::channel(position.cursor);
    let result = stream_events(app, agent, session, window, position.cursor, send, reader, drain, &acks, acks_rx).await;
    let latest = *acks.borrow();
    if latest > position.cursor {
        match app.store.ack(agent.id(), latest).await {
            Ok(cursor) => agent.acked(cursor),
            Err(e) => {
                tracing::warn!(agent = agent.id(), error = %e, "could not persist the final ack; those events will be redelivered")
            }
        }
    }
    result
}

#[allow(clippy::too_many_arguments)]
async fn stream_events(
    app: &App,
    agent: &AgentRuntime,
    session: u64,
    window: u32,
    cursor: u64,
    send: &mut quinn::SendStream,
    reader: &mut FrameReader,
    mut drain: watch::Receiver<bool>,
    acks: &watch::Sender<u64>,
    acks_rx: watch::Receiver<u64>,
) -> Result<(), SessionError> {
    let mut acked = cursor;
    let mut sent = cursor;
    // The agent's initial credit, capped by the configured window (a bound on proxy memory).
    let cap = u64::from(agent.config.window.max(1));
    let mut window = u64::from(window).clamp(1, cap);
    let mut head = agent.watch_head();
    let mut paused = agent.watch_paused();
    let mut draining = false;
    let mut prefetched: Option<Vec<EventRecord>> = None;
    let persist = persist_acks(app, agent, acks_rx);
    tokio::pin!(persist);
    loop {
        // Fill the window from the log (nothing while an operator paused delivery).
        while !draining && !*paused.borrow_and_update() && sent < *head.borrow_and_update() && sent - acked < window {
            let head_seen = *head.borrow();
            let room = (window - (sent - acked)).min(MAX_BATCH as u64) as usize;
            // Replay span: its agent + offset range links it to the ingest spans of those offsets.
            let span = tracing::debug_span!("replay", agent = agent.id(), session, from = sent + 1, to = Empty);
            let events = match prefetched.take() {
                Some(batch) => batch,
                None => read_batch(app, agent.id(), sent, room).instrument(span.clone()).await?,
            };
            let Some(last) = events.last().map(|e| e.offset) else {
                // Everything after `sent` was dropped by an operator: nothing to deliver
                // until the head moves (the agent's next ack moves the cursor over them).
                sent = sent.max(head_seen);
                break;
            };
            span.record("to", last);
            if crate::otlp::exporting() {
                link_to_ingest(&span, &events);
            }
            let timings: Vec<(u64, u64)> = events.iter().map(|e| (e.offset, e.received_at_ms)).collect();
            let next_room = (window.saturating_sub(last - acked)).min(MAX_BATCH as u64) as usize;
            // Presized: records plus their per-event framing (offset, time, length varints).
            let size = events.iter().map(|e| e.record.len() + 24).sum::<usize>() + 16;
            let frame = encode_into(&ToAgent::Deliver { events }, Vec::with_capacity(size));
            if last < agent.head() && next_room > 0 {
                let (written, next) = tokio::join!(
                    write_encoded(send, frame).instrument(span.clone()),
                    read_batch(app, agent.id(), last, next_room)
                );
                written?;
                prefetched = Some(next?).filter(|b| !b.is_empty());
            } else {
                write_encoded(send, frame).instrument(span).await?;
            }
            sent = last;
            app.metrics.delivered(&timings, agent.note_delivered(session, &timings));
            agent.input(Input::Delivered { events: timings.len() as u64, at: std::time::Instant::now() });
        }
        tokio::select! {
            frame = reader.next::<ToProxy>() => match frame? {
                Some(ToProxy::Credit { window: w }) => {
                    window = u64::from(w).clamp(1, cap);
                    prefetched = None; // sized for the old window
                }
                Some(ToProxy::Ack { up_to }) => {
                    // An agent may ack beyond this session's deliveries: after a reconnect the
                    // SDK re-sends an ack whose first copy was lost with the old connection.
                    // Beyond the stored head, though, it acks events that do not exist.
                    let head = agent.head();
                    if up_to > head {
                        return Err(SessionError::Protocol(format!("Ack up to {up_to} but the log ends at {head}")));
                    }
                    if up_to > acked {
                        acked = up_to;
                        acks.send_replace(up_to);
                        if acked > sent {
                            sent = acked;
                            prefetched = None; // starts at or before what is now acked
                        }
                    }
                }
                Some(ToProxy::Idle) => agent.input(Input::Idle),
                Some(other) => return Err(SessionError::Protocol(format!("unexpected frame on the session stream: {}", frame_name(&other)))),
                None => return Ok(()),
            },
            failed = &mut persist => return failed,
            changed = head.changed() => if changed.is_err() { return Ok(()) },
            changed = paused.changed() => if changed.is_err() { return Ok(()) },
            changed = drain.changed(), if !draining => {
                let asked = changed.is_ok() && *drain.borrow();
                // A dropped sender means this session was superseded: stop delivering too.
                draining = asked || changed.is_err();
                if asked {
                    write_frame(send, &ToAgent::Drain { reason: "the proxy is putting this agent to sleep".into() }).await?;
                }
            }
        }
    }
}

/// Persists acks as they come, always the latest one; returns only when the store fails.
async fn persist_acks(app: &App, agent: &AgentRuntime, mut acks: watch::Receiver<u64>) -> Result<(), SessionError> {
    while acks.changed().await.is_ok() {
        let up_to = *acks.borrow_and_update();
        let cursor = app.store.ack(agent.id(), up_to).await?;
        agent.acked(cursor);
    }
    // The session is ending; it flushes the last ack itself.
    std::future::pending().await
}

/// Links the replay span to the ingest span of each event (the `traceparent` stored in its
/// meta). Decodes every record, so it runs only while spans are exported.
fn link_to_ingest(span: &tracing::Span, events: &[EventRecord]) {
    let decoded: Vec<_> = events.iter().filter_map(|e| e.decode().ok()).collect();
    let traceparents = decoded
        .iter()
        .filter_map(|e| e.data.meta.iter().find(|(k, _)| k == crate::otlp::TRACEPARENT).map(|(_, v)| v.as_str()));
    crate::otlp::link_to_ingest(span, traceparents);
}

/// Reads up to `room` events after `after`, capped so the frame stays under the ceiling.
async fn read_batch(app: &App, agent: &str, after: u64, room: usize) -> Result<Vec<EventRecord>, SessionError> {
    let mut events = app.store.read_records(agent, after, room).await?;
    let budget = app.max_frame / 2;
    let mut bytes = 0;
    let keep = events
        .iter()
        .position(|e| {
            bytes += e.record.len() + 32;
            bytes > budget
        })
        .unwrap_or(events.len())
        .max(1);
    events.truncate(keep);
    Ok(events)
}

fn frame_name(frame: &ToProxy) -> &'static str {
    match frame {
        ToProxy::Hello { .. } => "Hello",
        ToProxy::Credit { .. } => "Credit",
        ToProxy::Ack { .. } => "Ack",
        ToProxy::Idle => "Idle",
        ToProxy::Send(_) => "Send",
    }
}

/// Each further bidi stream carries one Send.
async fn serve_sends(app: Arc<App>, agent: Arc<AgentRuntime>, conn: quinn::Connection) {
    while let Ok((mut send, recv)) = conn.accept_bi().await {
        let app = app.clone();
        let agent = agent.clone();
        tokio::spawn(async move {
            let mut reader = FrameReader::new(recv, app.max_frame);
            let result = match reader.next::<ToProxy>().await {
                Ok(Some(ToProxy::Send(request))) => app.outbound.send(agent.id(), request).await,
                Ok(Some(other)) => SendResult::err(
                    "protocol",
                    format!("expected Send on a send stream, got {}", frame_name(&other)),
                    false,
                ),
                Ok(None) => return,
                Err(e) => SendResult::err("protocol", e.to_string(), false),
            };
            let _ = write_frame(&mut send, &ToAgent::SendResult(result)).await;
            let _ = send.finish();
        });
    }
}
