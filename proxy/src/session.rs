//! The QUIC side: accepts agent connections, authenticates the session stream, delivers the
//! agent's log within its credit window, applies acks, and serves each send on its own stream.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use concierge_protocol::frame::{SUPPORTED_VERSIONS, encode_into};
use concierge_protocol::io::{FrameReader, IoError, write_encoded, write_frame};
use concierge_protocol::{EventRecord, RejectCode, SendResult, ToAgent, ToProxy};
use concierge_store::Position;
use tokio::sync::watch;
use tracing::Instrument as _;

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
        let remote = incoming.remote_address();
        // Accepting runs the TLS server's first flight (key exchange, certificate signature)
        // while holding quinn's endpoint lock, which the endpoint's datagram routing needs too.
        // On a blocking thread, a storm of handshakes cannot park the async workers that serve
        // webhooks and live sessions; one at a time, since the lock serializes them anyway.
        let connecting = match tokio::task::spawn_blocking(move || incoming.accept()).await {
            Ok(Ok(connecting)) => connecting,
            Ok(Err(e)) => {
                tracing::debug!(%remote, error = %e, "QUIC connection not accepted");
                continue;
            }
            Err(e) => {
                tracing::warn!(%remote, error = %e, "QUIC accept task failed");
                continue;
            }
        };
        let app = app.clone();
        tokio::spawn(async move {
            match connecting.await {
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
    agent.attach(SessionControl { id, drain: drain_tx, connection: conn.clone(), fresh: Default::default() });
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
        // The agent may hold events it would otherwise not have been sent: it reconnects and
        // resumes from the store's position.
        Err(SessionError::Moved(_)) => conn.close(7u32.into(), b"log position moved; reconnect"),
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
    /// A warm start's position went stale before the agent connected.
    #[error("log position moved: {0}")]
    Moved(String),
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
    let Start { position, ahead, check } = start(app, agent).await?;
    let welcome = ToAgent::Welcome {
        session: format!("{session:x}"),
        epoch: position.epoch,
        cursor: position.cursor,
        backlog: position.head.saturating_sub(position.cursor),
    };
    write_frame(send, &welcome).await?;
    let (acks, acks_rx) = watch::channel(position.cursor);
    let result =
        stream_events(app, agent, session, window, position, ahead, check, send, reader, drain, &acks, acks_rx).await;
    let latest = *acks.borrow();
    // Usually the companion persisted it already: writing the same cursor again would double
    // the store's ack work per session (a whole script call per woken agent in a storm).
    if latest > position.cursor.max(agent.cursor()) {
        match app.store.ack(agent.id(), latest).await {
            Ok(cursor) => agent.acked(cursor),
            Err(e) => {
                tracing::warn!(agent = agent.id(), error = %e, "could not persist the final ack; those events will be redelivered")
            }
        }
    }
    result
}

/// Where a session starts: what its Welcome states, the events already in hand and, for a
/// warm start, the store's own answer still to come, which must agree with it.
struct Start {
    position: Position,
    ahead: ReadAhead,
    check: Option<tokio::task::JoinHandle<Result<Position, concierge_store::StoreError>>>,
}

/// A woken agent starts from what was read while it booted ([`crate::warm_start`]): no store
/// round trip before its first event; the store's position is checked alongside delivery.
/// Otherwise the first reads start from the cursor this process knows, alongside the store's
/// answer, so the first event costs one store round trip, not two; a different authoritative
/// cursor (another replica acked, an operator moved it) discards them.
async fn start(app: &App, agent: &AgentRuntime) -> Result<Start, SessionError> {
    let known = agent.cursor();
    if let Some(warm) = agent.warm_start.take(known) {
        let (store, id) = (app.store.clone(), agent.id().to_string());
        let check = tokio::spawn(async move { store.position(&id).await });
        // Events stored since the wake began are tailed like any others.
        let position = Position { head: warm.position.head.max(agent.head()), ..warm.position };
        return Ok(Start {
            position,
            ahead: ReadAhead::holding(warm.position.cursor, warm.events),
            check: Some(check),
        });
    }
    let mut ahead = ReadAhead::new(known);
    ahead.start_reads(app, agent.id(), agent.head());
    let position = app.store.position(agent.id()).await?;
    if position.cursor != known {
        ahead = ReadAhead::new(position.cursor);
    }
    Ok(Start { position, ahead, check: None })
}

/// A warm start stated `stated`; the store answered `answer`. They must agree on the epoch and
/// the cursor, which may also be this session's own latest persisted ack.
fn agrees(stated: Position, answer: Position, persisted: u64) -> Result<(), SessionError> {
    if answer.epoch == stated.epoch && (answer.cursor == stated.cursor || answer.cursor == persisted) {
        return Ok(());
    }
    Err(SessionError::Moved(format!(
        "the session started at epoch {} cursor {} but the store says epoch {} cursor {}",
        stated.epoch, stated.cursor, answer.epoch, answer.cursor
    )))
}

#[allow(clippy::too_many_arguments)]
async fn stream_events(
    app: &App,
    agent: &AgentRuntime,
    session: u64,
    window: u32,
    start: Position,
    mut ahead: ReadAhead,
    mut check: Option<tokio::task::JoinHandle<Result<Position, concierge_store::StoreError>>>,
    send: &mut quinn::SendStream,
    reader: &mut FrameReader,
    mut drain: watch::Receiver<bool>,
    acks: &watch::Sender<u64>,
    acks_rx: watch::Receiver<u64>,
) -> Result<(), SessionError> {
    let mut acked = start.cursor;
    let mut sent = acked;
    // The agent's initial credit, capped by the configured window (a bound on proxy memory).
    let cap = u64::from(agent.config.window.max(1));
    let mut window = u64::from(window).clamp(1, cap);
    let mut head = agent.watch_head();
    let mut paused = agent.watch_paused();
    let mut draining = false;
    let persist = persist_acks(app, agent, acks_rx);
    tokio::pin!(persist);
    loop {
        let delivering = !draining && !*paused.borrow_and_update();
        // Keep store reads in flight whatever the window, so the next events are in hand when
        // the agent's ack opens it (reading only then put a store round trip per ack on the
        // replay's critical path).
        if delivering {
            ahead.take_fresh(agent, session);
            ahead.start_reads(app, agent.id(), *head.borrow_and_update());
        }
        // Deliver what is in hand, within the window.
        while delivering && sent - acked < window && !ahead.ready.is_empty() {
            let room = (window - (sent - acked)).min(MAX_BATCH as u64) as usize;
            let events = ahead.take(room, app.max_frame / 2);
            let Some(last) = events.last().map(|e| e.offset) else { break };
            // Replay span: its agent + offset range links it to the ingest spans of those offsets.
            let span = tracing::debug_span!("replay", agent = agent.id(), session, from = sent + 1, to = last);
            if crate::otlp::exporting() {
                link_to_ingest(&span, &events);
            }
            let timings: Vec<(u64, u64)> = events.iter().map(|e| (e.offset, e.received_at_ms)).collect();
            // Presized: records plus their per-event framing (offset, time, length varints).
            let size = events.iter().map(|e| e.record.len() + 24).sum::<usize>() + 16;
            let frame = encode_into(&ToAgent::Deliver { events }, Vec::with_capacity(size));
            ahead.start_reads(app, agent.id(), *head.borrow());
            write_encoded(send, frame).instrument(span).await?;
            sent = last;
            app.metrics.delivered(&timings, agent.note_delivered(session, &timings));
            agent.input(Input::Delivered { events: timings.len() as u64, at: std::time::Instant::now() });
        }
        tokio::select! {
            read = ahead.finished(), if ahead.reading() => ahead.arrived(read?, sent),
            answer = async { check.as_mut().expect("polled only while set").await }, if check.is_some() => {
                check = None;
                let answer = answer.map_err(|e| SessionError::Io(format!("store position task failed: {e}")))??;
                agrees(start, answer, agent.cursor())?;
            }
            frame = reader.next::<ToProxy>() => match frame? {
                Some(ToProxy::Credit { window: w }) => window = u64::from(w).clamp(1, cap),
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
                            ahead.skip_to(acked);
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

/// Events per store read. Reads are pipelined, so a read's cost (Redis building the reply,
/// the client parsing it) overlaps the next one's.
const READ_CHUNK: usize = 256;
/// Reads in flight at once, and events held (in hand plus in flight): bounds a session's memory.
const READS_IN_FLIGHT: usize = 2;
const MAX_AHEAD: usize = 4 * READ_CHUNK;

/// Events read from the store ahead of delivery, whatever the agent's window, so the next
/// events are in hand when its ack opens the window (reading only then put a store round trip
/// per ack on the replay's critical path). Reads run on their own tasks, so they overlap the
/// write to the agent and each other.
///
/// A read after another one starts where the first will end if it comes back full (offsets are
/// dense but for operator drops). When a read comes back short (end of the log, drops, or the
/// byte budget) the reads behind it may have started past a gap, so they are discarded.
struct ReadAhead {
    /// Read, not yet delivered, in offset order.
    ready: std::collections::VecDeque<EventRecord>,
    /// Everything up to here was read (or found absent: dropped by an operator).
    read_to: u64,
    /// Reads in flight, oldest first.
    reading: std::collections::VecDeque<Read>,
}

/// One store read in flight: events after `after`, at most `asked`, started when the log's
/// head was `head`.
struct Read {
    task: tokio::task::JoinHandle<Result<Vec<EventRecord>, SessionError>>,
    after: u64,
    asked: usize,
    head: u64,
}

impl Drop for ReadAhead {
    fn drop(&mut self) {
        self.discard_reads();
    }
}

impl ReadAhead {
    fn new(cursor: u64) -> Self {
        Self { ready: Default::default(), read_to: cursor, reading: Default::default() }
    }

    /// Starts with `events` (read earlier, in offset order, the first one after `cursor`) in hand.
    fn holding(cursor: u64, events: Vec<EventRecord>) -> Self {
        let read_to = events.last().map_or(cursor, |e| e.offset);
        Self { ready: events.into(), read_to, reading: Default::default() }
    }

    fn reading(&self) -> bool {
        !self.reading.is_empty()
    }

    /// Starts reads while there is room ahead and the log holds events not yet asked for.
    fn start_reads(&mut self, app: &App, agent: &str, head: u64) {
        while self.reading.len() < READS_IN_FLIGHT {
            let asked: usize = self.reading.iter().map(|r| r.asked).sum();
            if self.ready.len() + asked + READ_CHUNK > MAX_AHEAD {
                return;
            }
            let after = match self.reading.back() {
                // Only behind a read expected to come back full.
                Some(previous) if previous.after + previous.asked as u64 <= previous.head => {
                    previous.after + previous.asked as u64
                }
                Some(_) => return,
                None => self.read_to,
            };
            if after >= head {
                return;
            }
            let (store, id, budget) = (app.store.clone(), agent.to_string(), app.max_frame / 2);
            let task = tokio::spawn(async move { read_batch(&*store, &id, after, READ_CHUNK, budget).await });
            self.reading.push_back(Read { task, after, asked: READ_CHUNK, head });
        }
    }

    /// Takes the events this process just stored that continue where reading got to, when no
    /// store read is in flight (one would return them too); the rest is read from the store.
    fn take_fresh(&mut self, agent: &AgentRuntime, session: u64) {
        if self.reading() || self.ready.len() >= MAX_AHEAD {
            return;
        }
        let events = agent.take_fresh(session, self.read_to, MAX_AHEAD - self.ready.len());
        if let Some(last) = events.last() {
            self.read_to = last.offset;
            self.ready.extend(events);
        }
    }

    /// Waits for the oldest read in flight (only polled while [`ReadAhead::reading`]).
    async fn finished(&mut self) -> Result<(Vec<EventRecord>, Read), SessionError> {
        let Some(read) = self.reading.front_mut() else { return std::future::pending().await };
        let result = (&mut read.task).await;
        let read = self.reading.pop_front().expect("the front read was just awaited");
        let events = result.map_err(|e| SessionError::Io(format!("store read task failed: {e}")))??;
        Ok((events, read))
    }

    /// Takes in what a read returned, skipping anything already delivered or in hand.
    fn arrived(&mut self, (events, read): (Vec<EventRecord>, Read), sent: u64) {
        if events.len() < read.asked {
            self.discard_reads();
        }
        match events.last() {
            Some(last) => self.read_to = self.read_to.max(last.offset),
            // Everything after `after` up to that head was dropped by an operator: nothing to
            // deliver until the head moves (the agent's next ack moves the cursor over them).
            None => self.read_to = self.read_to.max(read.head),
        }
        let floor = self.ready.back().map_or(sent, |e| e.offset.max(sent));
        self.ready.extend(events.into_iter().filter(|e| e.offset > floor));
    }

    fn discard_reads(&mut self) {
        for read in self.reading.drain(..) {
            read.task.abort();
        }
    }

    /// The agent acked beyond what was delivered (a re-sent ack after a reconnect).
    fn skip_to(&mut self, acked: u64) {
        while self.ready.front().is_some_and(|e| e.offset <= acked) {
            self.ready.pop_front();
        }
        self.read_to = self.read_to.max(acked);
    }

    /// Up to `room` events from the front, at most `budget` bytes (but at least one), so the
    /// frame stays under the ceiling.
    fn take(&mut self, room: usize, budget: usize) -> Vec<EventRecord> {
        let count = within_budget(self.ready.iter().take(room), budget);
        self.ready.drain(..count).collect()
    }
}

/// How many of `events`, from the front, fit in `budget` bytes of frame (at least one, when
/// there is one, so an event larger than the budget still goes out alone).
fn within_budget<'a>(events: impl Iterator<Item = &'a EventRecord>, budget: usize) -> usize {
    let mut bytes = 0;
    let mut count = 0;
    for e in events {
        bytes += e.record.len() + 32;
        if bytes > budget && count > 0 {
            break;
        }
        count += 1;
    }
    count
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

/// Reads up to `room` events after `after`, capped at `budget` bytes so a frame stays under
/// the ceiling.
async fn read_batch(
    store: &dyn concierge_store::Store,
    agent: &str,
    after: u64,
    room: usize,
    budget: usize,
) -> Result<Vec<EventRecord>, SessionError> {
    let mut events = store.read_records(agent, after, room).await?;
    events.truncate(within_budget(events.iter(), budget));
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

#[cfg(test)]
mod tests {
    use super::*;

    fn records(sizes: &[usize]) -> Vec<EventRecord> {
        sizes
            .iter()
            .enumerate()
            .map(|(i, &n)| EventRecord { offset: i as u64 + 1, received_at_ms: 0, record: vec![0; n] })
            .collect()
    }

    #[test]
    fn a_frame_takes_what_fits_and_an_oversized_event_goes_alone() {
        // Each event costs its bytes plus 32 of framing.
        assert_eq!(within_budget(records(&[68, 68, 68]).iter(), 200), 2);
        assert_eq!(within_budget(records(&[68, 68, 68]).iter(), 300), 3);
        assert_eq!(within_budget(records(&[1000, 10]).iter(), 200), 1, "an oversized first event still goes out");
        assert_eq!(within_budget(records(&[]).iter(), 200), 0);
    }
}
