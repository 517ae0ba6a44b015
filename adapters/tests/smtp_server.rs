//! The SMTP listener (`smtp::serve`) over a real socket with a sink that can fail one agent's
//! write: a message for two agents is answered 250 only when both copies are durable, and the
//! sender's retry after a 451 leaves exactly one event per agent.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use concierge_adapters::smtp::{self, AddressBook, ServerSettings, SessionConfig};
use concierge_adapters::{EventSink, Ingested, SinkError};
use concierge_protocol::EventData;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};

/// Stores events deduplicated on (agent, dedupe key), as the real stores do; fails the next
/// `fail` ingests for agent `failing`.
#[derive(Default)]
struct FlakySink {
    failing: String,
    fail: AtomicU32,
    stored: Mutex<Vec<EventData>>,
    seen: Mutex<HashMap<String, u64>>,
    /// Every ingest call, as (agent, dedupe key), failed ones included.
    calls: Mutex<Vec<(String, String)>>,
}

#[async_trait]
impl EventSink for FlakySink {
    async fn ingest(&self, event: EventData) -> Result<Ingested, SinkError> {
        let key = event.dedupe_key.clone().unwrap_or_default();
        self.calls.lock().unwrap().push((event.agent.clone(), key.clone()));
        if event.agent == self.failing
            && self.fail.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1)).is_ok()
        {
            return Err(SinkError::Unavailable("store write failed (injected)".into()));
        }
        let mut seen = self.seen.lock().unwrap();
        if let Some(&offset) = seen.get(&format!("{}/{key}", event.agent)) {
            return Ok(Ingested { offset, duplicate: true });
        }
        let mut stored = self.stored.lock().unwrap();
        let offset = stored.len() as u64;
        seen.insert(format!("{}/{key}", event.agent), offset);
        stored.push(event);
        Ok(Ingested { offset, duplicate: false })
    }
}

fn settings() -> Arc<ServerSettings> {
    Arc::new(ServerSettings {
        session: Arc::new(SessionConfig {
            hostname: "mx.test".into(),
            max_message_size: 100_000,
            max_recipients: 10,
            max_line_length: 1000,
            max_errors: 5,
            starttls: false,
            addresses: AddressBook::new([
                ("support@example.com".to_string(), "helpdesk".to_string()),
                ("sales@example.com".to_string(), "sales".to_string()),
            ]),
        }),
        max_connections: 10,
        max_connections_per_ip: 10,
        command_timeout: Duration::from_secs(10),
        session_timeout: Duration::from_secs(30),
        greeting_delay: Duration::ZERO,
        tls: None,
        trusted_peer: Arc::new(|_| false),
        authserv_id: None,
    })
}

/// One reply line, bounded.
async fn next(r: &mut BufReader<TcpStream>) -> String {
    let mut line = String::new();
    tokio::time::timeout(Duration::from_secs(10), r.read_line(&mut line)).await.expect("reply in time").unwrap();
    line
}

/// Sends one pipelined transaction and returns the reply to the final dot.
async fn send_once(port: u16, message: &str) -> String {
    let stream = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    let mut r = BufReader::new(stream);
    assert!(next(&mut r).await.starts_with("220"));
    r.get_mut()
        .write_all(
            b"HELO client.test\r\nMAIL FROM:<a@client.test>\r\nRCPT TO:<support@example.com>\r\n\
              RCPT TO:<support+x@example.com>\r\nRCPT TO:<sales@example.com>\r\nDATA\r\n",
        )
        .await
        .unwrap();
    for want in ["250", "250", "250", "250", "250", "354"] {
        let got = next(&mut r).await;
        assert!(got.starts_with(want), "expected {want}, got {got:?}");
    }
    r.get_mut().write_all(format!("{message}.\r\nQUIT\r\n").as_bytes()).await.unwrap();
    let answer = next(&mut r).await;
    assert!(next(&mut r).await.starts_with("221"));
    answer
}

#[tokio::test]
async fn second_agent_failing_once_gives_451_and_the_retry_stores_once_per_agent() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let sink = Arc::new(FlakySink { failing: "sales".into(), fail: AtomicU32::new(1), ..FlakySink::default() });
    let (stop, shutdown) = tokio::sync::watch::channel(false);
    let server = tokio::spawn(smtp::serve(listener, settings(), sink.clone(), shutdown));
    let message = "From: a@client.test\r\nMessage-ID: <two@client.test>\r\nSubject: both\r\n\r\nhello\r\n";

    // helpdesk's copy is written, sales's fails: the sender must keep the message.
    let first = send_once(port, message).await;
    assert!(first.starts_with("451 4.3.0"), "{first}");
    assert_eq!(sink.stored.lock().unwrap().len(), 1, "helpdesk's copy went in before sales failed");

    let retry = send_once(port, message).await;
    assert!(retry.starts_with("250 2.0.0"), "{retry}");
    let stored = sink.stored.lock().unwrap().clone();
    let agents: Vec<&str> = stored.iter().map(|e| e.agent.as_str()).collect();
    assert_eq!(agents, ["helpdesk", "sales"], "one event per agent, none twice");
    // One event for helpdesk despite two addresses; both are noted.
    let rcpts: Vec<&str> = stored[0].meta.iter().filter(|(k, _)| k == "rcpt").map(|(_, v)| v.as_str()).collect();
    assert_eq!(rcpts, ["support@example.com", "support+x@example.com"]);
    // The retry offered helpdesk the same dedupe key (the Message-ID), which is why it was
    // not stored twice.
    let calls = sink.calls.lock().unwrap().clone();
    let key = "message-id:<two@client.test>".to_string();
    assert_eq!(
        calls,
        [
            ("helpdesk".to_string(), key.clone()),
            ("sales".to_string(), key.clone()),
            ("helpdesk".to_string(), key.clone()),
            ("sales".to_string(), key)
        ]
    );
    stop.send(true).unwrap();
    tokio::time::timeout(Duration::from_secs(10), server).await.expect("server stops").unwrap();
}
