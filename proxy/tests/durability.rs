//! Promise 1 (write before ack) and promise 2 (at-least-once, in order) across crashes, store
//! outages and graceful restarts, through real processes, real QUIC and a real Redis.

mod common;

use std::time::{Duration, Instant};

use common::*;
use concierge_protocol::client::{AgentClient, ClientOptions};

const EVENTS: u64 = 200;

fn body_of(seq: u64) -> String {
    format!(r#"{{"seq":{seq},"text":"event {seq}"}}"#)
}

fn seq_of(e: &concierge_protocol::Event) -> u64 {
    let v: serde_json::Value = serde_json::from_slice(&e.data.raw).expect("event raw is the posted JSON");
    v["seq"].as_u64().expect("seq in body")
}

/// 200 webhooks answered 202 (`concurrency` in flight at once), SIGKILL right after the last
/// one, restart on the same ports and data: the agent receives exactly those 200 events, in
/// offset order 1..=200, each the body whose 202 named that offset, once each.
async fn acked_webhooks_survive_sigkill(backend: Backend, concurrency: usize) {
    use futures::StreamExt as _;
    let dir = tempfile::tempdir().unwrap();
    let ports = fixed_ports();
    let body = format!("{}{}", self_connecting_agent("a"), webhook_route("in", "a", ""));
    let config = write_config(dir.path(), &backend, ports, &body);
    let mut proxy = Proxy::start(&config);
    let http = http_client();
    let posts = futures::stream::iter(1..=EVENTS)
        .map(|seq| {
            let (proxy, http) = (&proxy, &http);
            async move {
                let key = format!("key-{seq}");
                (seq, proxy.post_with(http, "a", "in", body_of(seq), &[("Idempotency-Key", &key)]).await)
            }
        })
        .buffer_unordered(concurrency)
        .collect::<Vec<_>>()
        .await;
    // offset -> seq, from the 202s.
    let mut seq_at = vec![0u64; EVENTS as usize + 1];
    for (seq, r) in &posts {
        assert_eq!(r.status, 202, "webhook {seq}: {r:?}");
        assert_eq!(r.json["duplicate"], false, "webhook {seq}: {r:?}");
        let offset = r.json["offset"].as_u64().unwrap();
        assert!(
            (1..=EVENTS).contains(&offset) && seq_at[offset as usize] == 0,
            "offset {offset} twice or out of range"
        );
        seq_at[offset as usize] = *seq;
        if concurrency == 1 {
            assert_eq!(offset, *seq, "sequential webhooks get consecutive offsets");
        }
    }
    proxy.kill9();
    drop(http);

    let proxy = Proxy::start(&config);
    assert_eq!(proxy.quic, format!("127.0.0.1:{}", ports[0]), "restart reuses the QUIC port");
    let mut agent = proxy.connect("a").await;
    let welcome = agent.welcome();
    assert_eq!((welcome.cursor, welcome.backlog), (0, EVENTS), "{welcome:?}");
    let events = receive_n(&mut agent, EVENTS as usize, Duration::from_secs(60)).await;
    for (i, e) in events.iter().enumerate() {
        let offset = i as u64 + 1;
        assert_eq!(e.offset, offset, "offsets are 1..=200 in order");
        let seq = seq_at[offset as usize];
        assert_eq!(e.data.raw, body_of(seq).as_bytes(), "body at offset {offset}");
        assert_eq!(e.data.dedupe_key.as_deref(), Some(format!("in:key-{seq}").as_str()));
    }
    expect_no_more(&mut agent, Duration::from_secs(1)).await;
    proxy.wait_cursor("a", EVENTS, Duration::from_secs(10)).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn sigkill_after_acks_loses_nothing_embedded() {
    acked_webhooks_survive_sigkill(Backend::Embedded, 1).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn sigkill_after_acks_loses_nothing_redis() {
    let redis = Redis::start();
    acked_webhooks_survive_sigkill(Backend::Redis(redis.url()), 1).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn sigkill_after_concurrent_acks_loses_nothing_embedded() {
    acked_webhooks_survive_sigkill(Backend::Embedded, 16).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn sigkill_after_concurrent_acks_loses_nothing_redis() {
    let redis = Redis::start();
    acked_webhooks_survive_sigkill(Backend::Redis(redis.url()), 16).await;
}

/// Redis down: webhooks get 503 + Retry-After (never a 2xx), /readyz fails, nothing hangs;
/// Redis back: 202 again, and the agent receives exactly the 202'd events.
#[tokio::test(flavor = "multi_thread")]
async fn redis_outage_refuses_then_recovers() {
    let mut redis = Redis::start();
    let dir = tempfile::tempdir().unwrap();
    let body = format!("{}{}", self_connecting_agent("a"), webhook_route("in", "a", ""));
    let config = write_config(dir.path(), &Backend::Redis(redis.url()), [0, 0, 0], &body);
    let mut proxy = Proxy::start(&config);
    let http = http_client();
    // (seq, offset) of every 202.
    let mut accepted: Vec<(u64, u64)> = Vec::new();
    let mut seq = 0;
    let post = async |proxy: &Proxy, seq: &mut u64| {
        *seq += 1;
        let key = format!("key-{seq}");
        let started = Instant::now();
        let r = proxy.post_with(&http, "a", "in", body_of(*seq), &[("Idempotency-Key", &key)]).await;
        (*seq, r, started.elapsed())
    };

    for _ in 0..5 {
        let (s, r, _) = post(&proxy, &mut seq).await;
        assert_eq!(r.status, 202, "{r:?}");
        accepted.push((s, r.json["offset"].as_u64().unwrap()));
    }
    assert_eq!(proxy.admin_status("/readyz", None).await, 200);

    redis.kill9();
    for _ in 0..3 {
        let (s, r, took) = post(&proxy, &mut seq).await;
        assert_eq!(r.status, 503, "webhook {s} while Redis is down: {r:?}\nlog:\n{}", proxy.log());
        assert!(r.headers.contains_key("retry-after"), "503 carries Retry-After: {r:?}");
        assert!(r.json.get("offset").is_none(), "a refused webhook has no offset: {r:?}");
        eprintln!("503 after {took:?}");
        assert!(took < Duration::from_secs(15), "the store must not hold the request for {took:?}");
    }
    let started = Instant::now();
    assert_eq!(proxy.admin_status("/readyz", None).await, 503, "/readyz while Redis is down");
    assert!(started.elapsed() < Duration::from_secs(15), "/readyz took {:?}", started.elapsed());
    assert_eq!(proxy.admin_status("/livez", None).await, 200, "the process itself is fine");

    redis.restart();
    let ready = eventually(Duration::from_secs(30), || async {
        (proxy.admin_status("/readyz", None).await == 200).then_some(())
    })
    .await;
    assert!(ready.is_some(), "/readyz never recovered after Redis came back; log:\n{}", proxy.log());
    for _ in 0..5 {
        let (s, r, _) = post(&proxy, &mut seq).await;
        assert_eq!(r.status, 202, "webhook {s} after Redis is back: {r:?}");
        accepted.push((s, r.json["offset"].as_u64().unwrap()));
    }
    assert!(proxy.alive());

    let mut agent = proxy.connect("a").await;
    let events = receive_n(&mut agent, accepted.len(), Duration::from_secs(30)).await;
    let got: Vec<(u64, u64)> = events.iter().map(|e| (seq_of(e), e.offset)).collect();
    assert_eq!(got, accepted, "exactly the 202'd events, in order, at their acked offsets");
    expect_no_more(&mut agent, Duration::from_secs(1)).await;
}

/// SIGTERM: exit 0 within the grace, the connected agent's session ends, and after a restart
/// the acked events stay acked while the unacked ones come again.
#[tokio::test(flavor = "multi_thread")]
async fn graceful_shutdown_keeps_the_cursor() {
    let dir = tempfile::tempdir().unwrap();
    let ports = fixed_ports();
    let body = format!("{}{}", self_connecting_agent("a"), webhook_route("in", "a", ""));
    let config = write_config(dir.path(), &Backend::Embedded, ports, &body);
    let grace = Duration::from_secs(2); // write_config's shutdown_grace
    let delay = Duration::from_secs(1); // the default shutdown_delay
    let mut proxy = Proxy::start(&config);
    let http = http_client();
    for seq in 1..=10 {
        let r = proxy.post_with(&http, "a", "in", body_of(seq), &[("Idempotency-Key", &format!("k{seq}"))]).await;
        assert_eq!(r.status, 202, "{r:?}");
    }
    drop(http);
    let mut options: ClientOptions = proxy.client_options("a", TOKEN);
    options.reconnect_attempts = 1;
    let mut agent = AgentClient::connect(options).await.expect("agent connects");
    let events = receive_n_unacked(&mut agent, 10, Duration::from_secs(20)).await;
    assert_eq!(events.iter().map(|e| e.offset).collect::<Vec<_>>(), (1..=10).collect::<Vec<_>>());
    agent.ack(6);
    proxy.wait_cursor("a", 6, Duration::from_secs(10)).await;

    let started = Instant::now();
    let status = proxy.terminate();
    let took = started.elapsed();
    assert!(status.success(), "exit status {status:?}; log:\n{}", proxy.log());
    assert!(
        took < delay + grace + Duration::from_secs(1),
        "shutdown took {took:?} (delay {delay:?}, grace {grace:?}); log:\n{}",
        proxy.log()
    );

    // The session ended: next() gives up (error or end), it does not hang.
    let t = Instant::now();
    let ended = tokio::time::timeout(Duration::from_secs(25), agent.next()).await;
    eprintln!(
        "shutdown took {took:?}; session end seen after {:?}: {:?}",
        t.elapsed(),
        ended.as_ref().map(|r| r.as_ref().map(|o| o.is_some()))
    );
    match ended {
        Err(_) => panic!("the agent's session did not end after the proxy stopped"),
        Ok(Ok(Some(e))) => panic!("unexpected event {} after shutdown", e.offset),
        Ok(Ok(None)) | Ok(Err(_)) => {}
    }
    drop(agent);

    let proxy = Proxy::start(&config);
    let mut agent = proxy.connect("a").await;
    assert_eq!(agent.welcome().cursor, 6);
    let events = receive_n(&mut agent, 4, Duration::from_secs(20)).await;
    assert_eq!(events.iter().map(|e| e.offset).collect::<Vec<_>>(), vec![7, 8, 9, 10], "unacked ones only");
    for e in &events {
        assert_eq!(e.data.raw, body_of(e.offset).as_bytes());
    }
    expect_no_more(&mut agent, Duration::from_secs(1)).await;
}

/// A Redis that accepts connections but never answers (SIGSTOP) must not hold webhooks
/// forever: they get 503 within a bound, never a 2xx; after it thaws, 202 again and every
/// 202'd event reaches the agent (a 503 whose write Redis ran later may arrive too:
/// at-least-once, the sender's retry would be deduplicated).
#[tokio::test(flavor = "multi_thread")]
async fn frozen_redis_answers_503_within_a_bound() {
    let redis = Redis::start();
    let dir = tempfile::tempdir().unwrap();
    let body = format!("{}{}", self_connecting_agent("a"), webhook_route("in", "a", ""));
    let config = write_config(dir.path(), &Backend::Redis(redis.url()), [0, 0, 0], &body);
    let proxy = Proxy::start(&config);
    let http = http_client();
    let r = proxy.post_with(&http, "a", "in", body_of(1), &[("Idempotency-Key", "k1")]).await;
    assert_eq!(r.status, 202, "{r:?}");

    redis.pause();
    let started = Instant::now();
    let r = proxy.post_with(&http, "a", "in", body_of(2), &[("Idempotency-Key", "k2")]).await;
    let took = started.elapsed();
    redis.resume();
    eprintln!("frozen Redis: {} after {took:?}", r.status);
    assert_eq!(r.status, 503, "{r:?}");
    assert!(r.headers.contains_key("retry-after"), "{r:?}");
    assert!(took < Duration::from_secs(20), "the webhook was held for {took:?}");

    let ok = eventually(Duration::from_secs(30), || async {
        let r = proxy.post_with(&http, "a", "in", body_of(3), &[("Idempotency-Key", "k3")]).await;
        (r.status == 202).then_some(r)
    })
    .await
    .unwrap_or_else(|| panic!("webhooks never recovered after Redis thawed; log:\n{}", proxy.log()));
    let last = ok.json["offset"].as_u64().unwrap();
    let mut agent = proxy.connect("a").await;
    let events = receive_n(&mut agent, last as usize, Duration::from_secs(20)).await;
    let seqs: Vec<u64> = events.iter().map(seq_of).collect();
    assert_eq!(seqs.first(), Some(&1));
    assert_eq!(seqs.last(), Some(&3));
    assert!(seqs.len() <= 3, "{seqs:?}");
    expect_no_more(&mut agent, Duration::from_secs(1)).await;
}

/// An agent connected through a Redis outage (its ack fails while Redis is down) is not left
/// on a dead session: once Redis is back it resumes promptly, the failed ack is applied, and
/// new events arrive.
#[tokio::test(flavor = "multi_thread")]
async fn connected_agent_resumes_promptly_after_a_redis_outage() {
    let mut redis = Redis::start();
    let dir = tempfile::tempdir().unwrap();
    let body = format!("{}{}", self_connecting_agent("a"), webhook_route("in", "a", ""));
    let config = write_config(dir.path(), &Backend::Redis(redis.url()), [0, 0, 0], &body);
    let proxy = Proxy::start(&config);
    let http = http_client();
    let mut options = proxy.client_options("a", TOKEN);
    options.reconnect_attempts = 50;
    options.reconnect_max = Duration::from_millis(500);
    let mut agent = AgentClient::connect(options).await.expect("agent connects");
    for seq in 1..=3 {
        let r = proxy.post_with(&http, "a", "in", body_of(seq), &[("Idempotency-Key", &format!("k{seq}"))]).await;
        assert_eq!(r.status, 202, "{r:?}");
    }
    let events = receive_n_unacked(&mut agent, 3, Duration::from_secs(10)).await;
    assert_eq!(events.last().unwrap().offset, 3);

    redis.kill9();
    agent.ack(3); // fails in the store: the session cannot apply it
    tokio::time::sleep(Duration::from_millis(500)).await;
    redis.restart();
    let back = Instant::now();
    let ready = eventually(Duration::from_secs(30), || async {
        (proxy.admin_status("/readyz", None).await == 200).then_some(())
    })
    .await;
    assert!(ready.is_some(), "/readyz never recovered");
    let r = proxy.post_with(&http, "a", "in", body_of(4), &[("Idempotency-Key", "k4")]).await;
    assert_eq!(r.status, 202, "{r:?}");
    let next = receive_n(&mut agent, 1, Duration::from_secs(60)).await;
    let took = back.elapsed();
    eprintln!("event 4 arrived {took:?} after Redis came back");
    assert_eq!(next[0].offset, 4, "event 3 is not handed out twice, event 4 arrives");
    assert!(took < Duration::from_secs(10), "the agent sat on a dead session for {took:?}; log:\n{}", proxy.log());
    proxy.wait_cursor("a", 4, Duration::from_secs(10)).await;
    expect_no_more(&mut agent, Duration::from_secs(1)).await;
}

/// A chunked HTTP/1.1 body in one write: `(hex length)\r\n(data)\r\n`.
fn chunk(data: &str) -> String {
    format!("{:x}\r\n{data}\r\n", data.len())
}

/// Reads one HTTP/1.1 response with a Content-Length body; returns (status line, body).
async fn read_response(tcp: &mut tokio::net::TcpStream) -> (String, String) {
    use tokio::io::AsyncReadExt as _;
    let mut buf = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let text = String::from_utf8_lossy(&buf).into_owned();
        if let Some(end) = text.find("\r\n\r\n") {
            let length = text[..end]
                .lines()
                .find_map(|l| l.to_ascii_lowercase().strip_prefix("content-length:").map(|v| v.trim().to_string()))
                .and_then(|v| v.parse::<usize>().ok())
                .unwrap_or(0);
            if buf.len() >= end + 4 + length {
                let status = text.lines().next().unwrap_or_default().to_string();
                return (status, text[end + 4..end + 4 + length].to_string());
            }
        }
        let mut more = [0u8; 1024];
        match tokio::time::timeout_at(deadline, tcp.read(&mut more)).await {
            Err(_) => panic!("no complete response within 20 s; got {:?}", String::from_utf8_lossy(&buf)),
            Ok(Ok(0)) => panic!("connection closed mid-response; got {:?}", String::from_utf8_lossy(&buf)),
            Ok(Ok(n)) => buf.extend_from_slice(&more[..n]),
            Ok(Err(e)) => panic!("reading the response: {e}"),
        }
    }
}

/// SIGTERM is observable in order: `/readyz` fails while webhooks are still accepted for
/// `shutdown_delay`; then the webhook listener refuses new connections, yet a webhook whose
/// chunked body is still arriving gets its 202 (and its event survives the restart) while
/// the agent session and the admin listener are still up; then the agent's connection closes
/// with the reason "proxy shutting down", and the process exits 0.
#[tokio::test(flavor = "multi_thread")]
async fn shutdown_fails_readiness_first_then_finishes_in_flight_webhooks() {
    use tokio::io::AsyncWriteExt as _;
    let dir = tempfile::tempdir().unwrap();
    let ports = fixed_ports();
    let body = format!("{}{}", self_connecting_agent("a"), webhook_route("in", "a", ""));
    let config = write_config_with(dir.path(), &Backend::Embedded, ports, "shutdown_delay = \"5s\"", &body);
    let mut proxy = Proxy::start(&config);
    let http = http_client();
    let r = proxy.post_with(&http, "a", "in", body_of(1), &[("Idempotency-Key", "k1")]).await;
    assert_eq!(r.status, 202, "{r:?}");
    let (_endpoint, conn, _send, _recv) = raw_hello(&proxy, 16).await;
    let connected =
        eventually(Duration::from_secs(10), || async { (proxy.agent("a").await["connected"] == true).then_some(()) })
            .await;
    assert!(connected.is_some(), "the raw agent never attached; log:\n{}", proxy.log());

    // A webhook whose body is only half sent when SIGTERM arrives.
    let mut slow = tokio::net::TcpStream::connect(&proxy.http).await.unwrap();
    let head = "POST /hooks/a/in HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n\
                Idempotency-Key: slow\r\nTransfer-Encoding: chunked\r\n\r\n";
    let slow_body = r#"{"seq":3,"text":"arrived during shutdown"}"#;
    let (first, rest) = slow_body.split_at(10);
    slow.write_all(format!("{head}{}", chunk(first)).as_bytes()).await.unwrap();
    assert_eq!(proxy.admin_status("/readyz", None).await, 200);

    unsafe { libc::kill(proxy.child.id() as i32, libc::SIGTERM) };
    let unready = eventually(Duration::from_secs(5), || async {
        (proxy.admin_status("/readyz", None).await == 503).then_some(())
    })
    .await;
    assert!(unready.is_some(), "/readyz did not fail after SIGTERM; log:\n{}", proxy.log());
    // Readiness failed first: during the delay a new webhook is still stored.
    let r = proxy.post_with(&http, "a", "in", body_of(2), &[("Idempotency-Key", "k2")]).await;
    assert_eq!((r.status, r.json["offset"].as_u64()), (202, Some(2)), "webhook during the delay: {r:?}");
    drop(http); // its idle keep-alive connection must not hold the listener open

    // Then the webhook listener stops accepting new connections.
    let closed = eventually(Duration::from_secs(30), || async {
        tokio::net::TcpStream::connect(&proxy.http).await.is_err().then_some(())
    })
    .await;
    assert!(closed.is_some(), "the webhook listener never stopped accepting; log:\n{}", proxy.log());
    // The agent's session and the admin listener outlive the webhook listener.
    assert!(conn.close_reason().is_none(), "sessions close after the listeners: {:?}", conn.close_reason());
    assert_eq!(proxy.admin_status("/readyz", None).await, 503, "the admin listener stops last");

    // The in-flight webhook finishes: 202 with its offset, after the listener closed.
    slow.write_all(format!("{}0\r\n\r\n", chunk(rest)).as_bytes()).await.unwrap();
    let (status, answer) = read_response(&mut slow).await;
    assert!(status.starts_with("HTTP/1.1 202"), "{status} {answer}; log:\n{}", proxy.log());
    let answer: serde_json::Value = serde_json::from_str(&answer).unwrap();
    assert_eq!(answer["offset"], 3, "{answer}");

    let reason = match tokio::time::timeout(Duration::from_secs(20), conn.closed()).await {
        Ok(quinn::ConnectionError::ApplicationClosed(c)) => String::from_utf8_lossy(&c.reason).into_owned(),
        other => panic!("expected the proxy to close the session with a reason, got {other:?}"),
    };
    assert_eq!(reason, "proxy shutting down");
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(status) = proxy.child.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < deadline, "concierge did not exit after SIGTERM; log:\n{}", proxy.log());
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(status.success(), "exit status {status:?}; log:\n{}", proxy.log());

    let proxy = Proxy::start(&config);
    let mut agent = proxy.connect("a").await;
    let events = receive_n(&mut agent, 3, Duration::from_secs(20)).await;
    assert_eq!(events.iter().map(|e| e.offset).collect::<Vec<_>>(), vec![1, 2, 3]);
    assert_eq!(events[2].data.raw, slow_body.as_bytes(), "the in-flight webhook's body is stored whole");
    expect_no_more(&mut agent, Duration::from_secs(1)).await;
}

/// Runs `concierge` with `args` to its exit (killed after 30 s); returns (status, stderr).
fn run_to_exit(args: &[&std::ffi::OsStr]) -> (std::process::ExitStatus, String) {
    use std::io::Read as _;
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_concierge"))
        .args(args)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("concierge {args:?} did not exit within 30 s");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut stderr = String::new();
    child.stderr.take().unwrap().read_to_string(&mut stderr).unwrap();
    (status, stderr)
}

/// Two proxies on one embedded store would interleave writes: the second `concierge serve`
/// exits non-zero naming the store and its lock file, and the first keeps working.
#[tokio::test(flavor = "multi_thread")]
async fn a_second_proxy_on_the_same_embedded_store_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let body = format!("{}{}", self_connecting_agent("a"), webhook_route("in", "a", ""));
    let first = Proxy::start(&write_config(dir.path(), &Backend::Embedded, [0, 0, 0], &body));
    let other = tempfile::tempdir().unwrap();
    let second = write_config(other.path(), &Backend::Embedded, [0, 0, 0], &body);
    let store = dir.path().join("store.db").display().to_string();
    let text = std::fs::read_to_string(&second).unwrap();
    let own_store = other.path().join("store.db").display().to_string();
    assert!(text.contains(&own_store));
    std::fs::write(&second, text.replace(&own_store, &store)).unwrap();

    let (status, stderr) = run_to_exit(&["serve".as_ref(), "--config".as_ref(), second.as_os_str()]);
    assert!(!status.success(), "the second proxy started; stderr:\n{stderr}");
    let lock = format!("{store}.lock");
    assert!(
        stderr.lines().any(|l| l.contains(&lock) && l.contains("in use")),
        "stderr should name the lock file {lock}:\n{stderr}"
    );
    let r = first.post_with(&http_client(), "a", "in", body_of(1), &[]).await;
    assert_eq!(r.status, 202, "the first proxy still works: {r:?}");
}

/// A Redis that cannot keep the write-before-ack promise (no append-only file, evicting under
/// memory pressure) is named at start-up, in the log and in the admin API's warnings.
#[tokio::test(flavor = "multi_thread")]
async fn redis_settings_that_lose_acked_events_are_warned_about() {
    let port = free_port();
    let redis_dir = tempfile::tempdir().unwrap();
    let mut redis = std::process::Command::new("redis-server")
        .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
        .args(["--maxmemory-policy", "allkeys-lru", "--dir"])
        .arg(redis_dir.path())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("redis-server is installed");
    let up = eventually(Duration::from_secs(10), || async {
        std::net::TcpStream::connect(("127.0.0.1", port)).is_ok().then_some(())
    })
    .await;
    assert!(up.is_some(), "redis-server did not start");

    let dir = tempfile::tempdir().unwrap();
    let backend = Backend::Redis(format!("redis://127.0.0.1:{port}"));
    let proxy = Proxy::start(&write_config(dir.path(), &backend, [0, 0, 0], &self_connecting_agent("a")));
    let warnings = proxy.agents().await["warnings"].clone();
    let _ = redis.kill();
    let _ = redis.wait();
    let warnings: Vec<&str> = warnings.as_array().expect("warnings list").iter().filter_map(|w| w.as_str()).collect();
    let log = proxy.log();
    for needle in ["Redis appendonly is \"no\"", "Redis maxmemory-policy is \"allkeys-lru\""] {
        assert!(warnings.iter().any(|w| w.contains(needle)), "admin warnings lack {needle:?}: {warnings:?}");
        assert!(
            log.lines().any(|l| l.contains("WARN") && l.contains(needle)),
            "log lacks a warning with {needle:?}:\n{log}"
        );
    }
}
