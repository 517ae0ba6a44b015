//! Promise 5 (bounded everything; bad input gets a clear error and never loses other data):
//! hostile QUIC peers speaking raw frames, malformed send streams, oversized and misaddressed
//! webhooks, and broken configuration files.

mod common;

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::*;
use concierge_protocol::client::AgentClient;
use concierge_protocol::frame::{DEFAULT_MAX_FRAME, encode};
use concierge_protocol::io::{FrameReader, IoError};
use concierge_protocol::tls::{Trust, client_config};
use concierge_protocol::{ChannelRef, RejectCode, SendRequest, SendResult, ToAgent, ToProxy};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const MAX_FRAME: usize = 65536;
const T: Duration = Duration::from_secs(10);

/// A proxy with a small frame ceiling, a well-behaved agent `good` (connected through the SDK)
/// and an agent `bad` whose credentials the hostile raw clients use.
async fn setup(dir: &Path) -> (Proxy, AgentClient) {
    let body = format!(
        "{}{}{}{}",
        self_connecting_agent("good"),
        self_connecting_agent("bad"),
        webhook_route("good-hook", "good", ""),
        webhook_route("bad-hook", "bad", ""),
    );
    let config = write_config_with(dir, &Backend::Embedded, [0, 0, 0], &format!("max_frame = {MAX_FRAME}"), &body);
    let proxy = Proxy::start(&config);
    let good = proxy.connect("good").await;
    (proxy, good)
}

/// Posts events `range` to the good agent and checks it receives exactly them, in order.
async fn good_agent_gets(proxy: &Proxy, good: &mut AgentClient, range: std::ops::RangeInclusive<u64>) {
    let http = http_client();
    for seq in range.clone() {
        let r = proxy.post_with(&http, "good", "good-hook", format!(r#"{{"seq":{seq}}}"#), &[]).await;
        assert_eq!(r.status, 202, "{r:?}");
        assert_eq!(r.json["offset"], seq, "{r:?}");
    }
    let events = receive_n(good, range.clone().count(), Duration::from_secs(20)).await;
    for (e, seq) in events.iter().zip(range) {
        assert_eq!(e.offset, seq);
        assert_eq!(e.data.raw, format!(r#"{{"seq":{seq}}}"#).as_bytes());
    }
}

struct Raw {
    _endpoint: quinn::Endpoint,
    conn: quinn::Connection,
}

async fn raw_connect(proxy: &Proxy) -> Raw {
    let mut endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    endpoint.set_default_client_config(client_config(Trust::Pinned(proxy.cert_sha256.clone())).unwrap());
    let connecting = endpoint.connect(proxy.quic.parse().unwrap(), "localhost").unwrap();
    let conn = tokio::time::timeout(T, connecting).await.expect("handshake in time").expect("QUIC handshake");
    Raw { _endpoint: endpoint, conn }
}

fn hello(agent: &str, version: u32) -> ToProxy {
    ToProxy::Hello { version, agent: agent.into(), token: TOKEN.into(), client: "raw-test".into(), window: 16 }
}

/// Opens the session stream, writes `bytes` (then FIN when `fin`) and reads the proxy's
/// first frame; the stream halves are returned so they stay open.
async fn first_frame(
    raw: &Raw,
    bytes: &[u8],
    fin: bool,
) -> (Result<Option<ToAgent>, IoError>, quinn::SendStream, FrameReader) {
    let (mut send, recv) = raw.conn.open_bi().await.unwrap();
    send.write_all(bytes).await.unwrap();
    if fin {
        send.finish().unwrap();
    }
    let mut reader = FrameReader::new(recv, DEFAULT_MAX_FRAME);
    let frame = tokio::time::timeout(T, reader.next::<ToAgent>()).await.expect("the proxy answers in time");
    (frame, send, reader)
}

/// Expects a `Reject` with `code` whose message contains every one of `needles`, then the
/// connection closing.
async fn expect_reject(raw: &Raw, bytes: &[u8], fin: bool, code: RejectCode, needles: &[&str]) -> String {
    let (frame, _send, _reader) = first_frame(raw, bytes, fin).await;
    let message = match frame {
        Ok(Some(ToAgent::Reject { code: got, message })) => {
            assert_eq!(got, code, "{message}");
            message
        }
        other => panic!("expected Reject {code:?}, got {other:?}"),
    };
    for n in needles {
        assert!(message.contains(n), "reject message {message:?} should name {n:?}");
    }
    let closed = tokio::time::timeout(T, raw.conn.closed()).await.expect("connection closes after a Reject");
    assert!(matches!(closed, quinn::ConnectionError::ApplicationClosed(_)), "{closed:?}");
    message
}

/// A session of `bad` that got its Welcome.
async fn valid_session(proxy: &Proxy) -> (Raw, quinn::SendStream, FrameReader) {
    let raw = raw_connect(proxy).await;
    let (frame, send, reader) = first_frame(&raw, &encode(&hello("bad", 1)), false).await;
    assert!(matches!(frame, Ok(Some(ToAgent::Welcome { .. }))), "{frame:?}");
    (raw, send, reader)
}

/// The reason the proxy gave when it closed the connection.
async fn close_reason(conn: &quinn::Connection) -> String {
    match tokio::time::timeout(T, conn.closed()).await.expect("the proxy closes the connection") {
        quinn::ConnectionError::ApplicationClosed(c) => String::from_utf8_lossy(&c.reason).into_owned(),
        other => panic!("expected an application close with a reason, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn hostile_session_streams_are_refused_and_harm_no_one() {
    let dir = tempfile::tempdir().unwrap();
    let (mut proxy, mut good) = setup(dir.path()).await;
    good_agent_gets(&proxy, &mut good, 1..=5).await;

    // Slow peers run alongside: a partial Hello without FIN, and a connection with no stream.
    let slow_hello = {
        let raw = raw_connect(&proxy).await;
        tokio::spawn(async move {
            let bytes = encode(&hello("bad", 1));
            let (mut send, recv) = raw.conn.open_bi().await.unwrap();
            send.write_all(&bytes[..bytes.len() / 2]).await.unwrap();
            let mut reader = FrameReader::new(recv, DEFAULT_MAX_FRAME);
            let frame = tokio::time::timeout(Duration::from_secs(20), reader.next::<ToAgent>()).await;
            drop(send);
            frame.map(|f| f.map_err(|e| e.to_string()))
        })
    };
    let no_stream = {
        let raw = raw_connect(&proxy).await;
        tokio::spawn(async move { tokio::time::timeout(Duration::from_secs(20), raw.conn.closed()).await })
    };

    // (a) unsupported version: the reject names the supported ones.
    let raw = raw_connect(&proxy).await;
    let message = expect_reject(&raw, &encode(&hello("bad", 99)), false, RejectCode::UnsupportedVersion, &["99"]).await;
    assert!(message.contains("supported versions: [1]"), "{message}");

    // (b) a first frame that is not Hello.
    let raw = raw_connect(&proxy).await;
    expect_reject(&raw, &encode(&ToProxy::Ack { up_to: 1 }), false, RejectCode::BadHello, &["Hello"]).await;

    // (c) garbage inside a valid length prefix.
    let raw = raw_connect(&proxy).await;
    let garbage = [0, 0, 0, 6, 0xff, 0xfe, 0xfd, 0xfc, 0xfb, 0xfa];
    expect_reject(&raw, &garbage, false, RejectCode::BadHello, &["malformed"]).await;

    // (d) a length prefix above max_frame is refused from the prefix alone: only 4 KiB of the
    // announced 2 GiB are sent, and sending more fails once the proxy gives up on the stream.
    let raw = raw_connect(&proxy).await;
    let mut oversize = 0x7fff_ffffu32.to_be_bytes().to_vec();
    oversize.extend(vec![0u8; 4096]);
    let (frame, mut send, _reader) = first_frame(&raw, &oversize, false).await;
    match frame {
        Ok(Some(ToAgent::Reject { code, message })) => {
            assert_eq!(code, RejectCode::BadHello);
            assert!(message.contains("maximum frame size") && message.contains(&MAX_FRAME.to_string()), "{message}");
        }
        other => panic!("expected a Reject for the oversized frame, got {other:?}"),
    }
    let more = tokio::time::timeout(Duration::from_secs(15), send.write_all(&vec![0u8; 8 * 1024 * 1024])).await;
    assert!(matches!(more, Ok(Err(_))), "the proxy must not keep reading an oversized frame: {more:?}");

    // (e) a truncated Hello, then FIN.
    let raw = raw_connect(&proxy).await;
    let bytes = encode(&hello("bad", 1));
    expect_reject(&raw, &bytes[..bytes.len() - 3], true, RejectCode::BadHello, &["stream ended inside a frame"]).await;

    // (f) protocol errors inside a valid session close the connection with a reason.
    let cases: Vec<(Vec<u8>, &str)> = vec![
        (garbage.to_vec(), "malformed"),
        (0x00ff_ffffu32.to_be_bytes().to_vec(), "maximum frame size"),
        (encode(&hello("bad", 1)), "unexpected frame on the session stream: Hello"),
        (encode(&ToProxy::Ack { up_to: 1_000 }), "Ack up to 1000"),
    ];
    for (bytes, needle) in cases {
        let (raw, mut send, _reader) = valid_session(&proxy).await;
        send.write_all(&bytes).await.unwrap();
        let reason = close_reason(&raw.conn).await;
        assert!(reason.contains(needle), "close reason {reason:?} should name {needle:?}");
    }
    // A session ended by a protocol error leaves no session behind.
    let detached = eventually(T, || async { (proxy.agent("bad").await["connected"] == false).then_some(()) }).await;
    assert!(detached.is_some(), "the broken session is detached");

    // The slow peers were cut off by the Hello timeout.
    let slow = slow_hello.await.unwrap().expect("a partial Hello is answered within the Hello timeout");
    match slow {
        Ok(Some(ToAgent::Reject { code: RejectCode::BadHello, message })) => {
            assert!(message.contains("no Hello within"), "{message}")
        }
        other => panic!("expected a Reject for the stalled Hello, got {other:?}"),
    }
    let closed = no_stream.await.unwrap().expect("a connection without a session stream is closed");
    assert!(matches!(closed, quinn::ConnectionError::ApplicationClosed(_)), "{closed:?}");

    // (g) the good agent kept its session and receives what came before and after, in order.
    good_agent_gets(&proxy, &mut good, 6..=10).await;
    expect_no_more(&mut good, Duration::from_millis(500)).await;
    assert!(proxy.alive(), "the proxy survived; log:\n{}", proxy.log());
    assert_eq!(proxy.agent("good").await["connected"], true);
}

#[tokio::test(flavor = "multi_thread")]
async fn malformed_send_streams_get_an_error_and_the_session_survives() {
    let dir = tempfile::tempdir().unwrap();
    let (mut proxy, mut good) = setup(dir.path()).await;
    good_agent_gets(&proxy, &mut good, 1..=3).await;
    let (raw, _session_send, mut session) = valid_session(&proxy).await;

    let send_stream = async |bytes: &[u8]| -> SendResult {
        let (mut send, recv) = raw.conn.open_bi().await.unwrap();
        // The proxy may answer (and stop reading) before all bytes are in: a failed write is fine.
        let _ = send.write_all(bytes).await;
        let _ = send.finish();
        let mut reader = FrameReader::new(recv, DEFAULT_MAX_FRAME);
        match tokio::time::timeout(T, reader.next::<ToAgent>()).await.expect("a send stream is answered") {
            Ok(Some(ToAgent::SendResult(r))) => r,
            other => panic!("expected a SendResult, got {other:?}"),
        }
    };
    let protocol_error = |r: SendResult, needle: &str| match r {
        SendResult::Err { code, message, retryable } => {
            assert_eq!(code, "protocol", "{message}");
            assert!(message.contains(needle), "{message:?} should name {needle:?}");
            assert!(!retryable);
        }
        ok => panic!("a malformed send was performed: {ok:?}"),
    };
    protocol_error(send_stream(&[0, 0, 0, 4, 0xff, 0xff, 0xff, 0xff]).await, "malformed");
    protocol_error(send_stream(&0x00ff_ffffu32.to_be_bytes()).await, "maximum frame size");
    protocol_error(send_stream(&encode(&ToProxy::Idle)).await, "expected Send");
    let valid = encode(&ToProxy::Send(SendRequest {
        idempotency_key: "k1".into(),
        channel: ChannelRef::new("webhook", "good-hook"),
        conversation: "c".into(),
        body: "hi".into(),
        reply_to: None,
    }));
    protocol_error(send_stream(&valid[..valid.len() - 2]).await, "stream ended inside a frame");
    // A well-formed send on the same connection still gets its answer (another agent's route:
    // not bound).
    match send_stream(&valid).await {
        SendResult::Err { code, .. } => assert_eq!(code, "channel_not_bound"),
        ok => panic!("bad sent through good's route: {ok:?}"),
    }

    // The session stream is still up: a new event for `bad` is delivered on it.
    assert!(raw.conn.close_reason().is_none(), "{:?}", raw.conn.close_reason());
    let r = proxy.post_with(&http_client(), "bad", "bad-hook", r#"{"x":1}"#, &[]).await;
    assert_eq!(r.status, 202);
    match tokio::time::timeout(T, session.next::<ToAgent>()).await.expect("delivery in time") {
        Ok(Some(ToAgent::Deliver { events })) => {
            assert_eq!(events.len(), 1);
            assert_eq!(events[0].decode().unwrap().data.raw, br#"{"x":1}"#);
        }
        other => panic!("expected a Deliver on the surviving session, got {other:?}"),
    }
    assert_eq!(proxy.agent("bad").await["connected"], true);

    good_agent_gets(&proxy, &mut good, 4..=6).await;
    expect_no_more(&mut good, Duration::from_millis(500)).await;
    assert!(proxy.alive(), "the proxy survived; log:\n{}", proxy.log());
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_webhooks_are_refused_and_store_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let body = format!("{}{}", self_connecting_agent("a"), webhook_route("small", "a", "max_body = 1024"));
    let config = write_config(dir.path(), &Backend::Embedded, [0, 0, 0], &body);
    let proxy = Proxy::start(&config);
    let http = http_client();

    let big = format!(r#"{{"pad":"{}"}}"#, "x".repeat(2000));
    let r = proxy.post_with(&http, "a", "small", big.clone(), &[]).await;
    assert_eq!(r.status, 413, "{r:?}");
    assert!(r.json["error"].as_str().unwrap().contains("1024"), "{r:?}");

    // Chunked, so there is no Content-Length to refuse by: the limit holds while reading.
    let mut tcp = tokio::net::TcpStream::connect(&proxy.http).await.unwrap();
    let mut request =
        b"POST /hooks/a/small HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
            .to_vec();
    for chunk in big.as_bytes().chunks(500) {
        request.extend(format!("{:x}\r\n", chunk.len()).as_bytes());
        request.extend(chunk);
        request.extend(b"\r\n");
    }
    request.extend(b"0\r\n\r\n");
    let _ = tcp.write_all(&request).await;
    let mut answer = vec![0u8; 1024];
    let n = tokio::time::timeout(T, tcp.read(&mut answer)).await.expect("answer in time").unwrap();
    let answer = String::from_utf8_lossy(&answer[..n]);
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");

    for (agent, route) in [("ghost", "small"), ("a", "ghost"), ("ghost", "ghost")] {
        let r = proxy.post_with(&http, agent, route, "{}", &[]).await;
        assert_eq!(r.status, 404, "/hooks/{agent}/{route}: {r:?}");
    }
    let r = http.get(format!("http://{}/hooks/a/small", proxy.http)).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 405);

    assert!(proxy.events("a").await.is_empty(), "nothing was stored");
    assert_eq!(proxy.agent("a").await["head"], 0);

    // Exactly at the limit is fine.
    let exact = format!(r#"{{"pad":"{}"}}"#, "y".repeat(1024 - 10));
    assert_eq!(exact.len(), 1024);
    let r = proxy.post_with(&http, "a", "small", exact.clone(), &[]).await;
    assert_eq!((r.status, r.json["offset"].as_u64()), (202, Some(1)), "{r:?}");
    let stored = proxy.events("a").await;
    assert_eq!(stored.len(), 1);
    assert_eq!(stored[0]["raw"]["text"], exact);
}

/// Runs the binary, killing it if it is still running after `within`.
fn run_bounded(args: &[&str], config: &Path, within: Duration) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_concierge"))
        .args(args)
        .arg(config)
        .env_remove("CONCIERGE_TEST_UNSET_VAR")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + within;
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            panic!(
                "concierge {args:?} {} still running after {within:?}; stderr:\n{}",
                config.display(),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().unwrap()
}

const SECRET: &str = "supersecret-xyz";

fn base(dir: &Path) -> String {
    format!(
        "[server]\nquic_listen = \"127.0.0.1:0\"\nhttp_listen = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\ndata_dir = \"{}\"\n",
        dir.join("data").display()
    )
}

#[test]
fn bad_config_files_are_refused_naming_file_and_key() {
    let dir = tempfile::tempdir().unwrap();
    let base = base(dir.path());
    let agent = format!("[agents.a]\ntoken = \"{SECRET}\"\n[agents.a.wake]\ndriver = \"none\"\npolicy = \"never\"\n");
    let cases: Vec<(&str, String, &str)> = vec![
        ("unknown-key", format!("{base}bogus_setting = 1\n{agent}"), "server.bogus_setting"),
        ("bad-duration", format!("{base}shutdown_grace = \"soon\"\n{agent}"), "server.shutdown_grace"),
        (
            "unknown-agent",
            format!("{base}{agent}[webhooks.h]\nagent = \"ghost\"\nverify = \"none\"\n"),
            "webhooks.h.agent",
        ),
        ("unset-env", format!("{base}[agents.a]\ntoken_env = \"CONCIERGE_TEST_UNSET_VAR\"\n"), "agents.a.token_env"),
        ("invalid-toml", format!("{base}[agents.a\ntoken = \"{SECRET}\"\n"), "invalid TOML"),
        // A secret next to another error never appears in the message.
        ("secret-unterminated", format!("{base}[agents.a]\ntoken = \"{SECRET}\nwindow = 5\n"), "invalid TOML"),
        ("secret-trailing", format!("{base}[agents.a]\ntoken = \"{SECRET}\" x\n"), "invalid TOML"),
        ("secret-conflict", format!("{base}[agents.a]\ntoken = \"{SECRET}\"\ntoken_env = \"X\"\n"), "agents.a.token"),
        ("secret-array", format!("{base}[agents.a]\ntoken = [\"{SECRET}\"]\n"), "agents.a.token"),
        ("secret-table", format!("{base}[agents.a]\ntoken = {{ value = \"{SECRET}\" }}\n"), "agents.a.token"),
        (
            "secret-bad-window",
            format!("{base}[agents.a]\ntoken = \"{SECRET}\"\nwindow = \"lots\"\n"),
            "agents.a.window",
        ),
        ("secret-admin", format!("{base}admin_token = [\"{SECRET}\"]\n{agent}"), "server.admin_token"),
    ];
    for (name, text, key) in &cases {
        let path = dir.path().join(format!("{name}.toml"));
        std::fs::write(&path, text).unwrap();
        let file = path.display().to_string();
        let check = run_bounded(&["check-config"], &path, Duration::from_secs(20));
        let stderr = String::from_utf8_lossy(&check.stderr);
        let stdout = String::from_utf8_lossy(&check.stdout);
        assert!(!check.status.success(), "{name}: check-config accepted it; stdout:\n{stdout}");
        let line = stderr
            .lines()
            .find(|l| l.contains(&file) && l.contains(key))
            .unwrap_or_else(|| panic!("{name}: stderr should name {file} and {key}:\n{stderr}"));
        assert!(!stderr.contains(SECRET) && !stdout.contains(SECRET), "{name}: the secret leaked:\n{stderr}");

        let serve = run_bounded(&["serve", "--config"], &path, Duration::from_secs(20));
        let serve_err = String::from_utf8_lossy(&serve.stderr);
        assert!(!serve.status.success(), "{name}: serve started with a broken config");
        assert!(serve_err.contains(line), "{name}: serve should say {line:?}; it said:\n{serve_err}");
        assert!(!serve_err.contains(SECRET), "{name}: serve leaked the secret:\n{serve_err}");
    }
}

#[test]
fn an_unreachable_redis_url_does_not_leak_its_password() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port(); // nothing listens here
    let text = format!(
        "{}[store]\nbackend = \"redis\"\nurl = \"redis://:{SECRET}@127.0.0.1:{port}/0\"\n[agents.a]\ntoken = \"t-0123456789\"\n",
        base(dir.path())
    );
    let path = dir.path().join("redis.toml");
    std::fs::write(&path, text).unwrap();
    let serve = run_bounded(&["serve", "--config"], &path, Duration::from_secs(30));
    let stderr = String::from_utf8_lossy(&serve.stderr);
    assert!(!serve.status.success(), "serve started without its store");
    assert!(stderr.contains("Redis"), "{stderr}");
    assert!(!stderr.contains(SECRET), "the Redis password leaked:\n{stderr}");
}
