//! Delivery guarantees seen from a real agent over real QUIC: resume exactly after the
//! acknowledged cursor, in order, with nothing lost and nothing handed out twice.

mod common;

use std::time::Duration;

use common::*;

/// Agent `a`, which connects on its own, with the unsigned webhook route `in`.
fn agent_a() -> String {
    format!(
        "{}\n[webhooks.in]\nagent = \"a\"\nverify = \"none\"\n",
        agent_section("a", "driver = \"none\"\npolicy = \"never\"")
    )
}

fn config(dir: &std::path::Path) -> std::path::PathBuf {
    write_config(dir, &Backend::Embedded, [0, 0, 0], &agent_a())
}

async fn post_n(proxy: &Proxy, n: usize) {
    post_n_from(proxy, 1, n).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn agent_killed_mid_batch_resumes_exactly_after_its_acks() {
    let dir = tempfile::tempdir().unwrap();
    let proxy = Proxy::start(&config(dir.path()));
    post_n(&proxy, 20).await;

    let mut first = proxy.connect("a").await;
    assert_eq!(first.welcome().backlog, 20);
    for expected in 1..=10u64 {
        let e = tokio::time::timeout(Duration::from_secs(5), first.next()).await.unwrap().unwrap().unwrap();
        assert_eq!(e.offset, expected);
        assert_eq!(e.data.text.as_deref(), Some(format!("m{expected}").as_str()));
    }
    first.ack(5);
    // Let the ack reach the proxy, then "kill" the agent: the connection drops without a goodbye.
    let acked =
        eventually(Duration::from_secs(5), || async { (proxy.agent("a").await["cursor"] == 5).then_some(()) }).await;
    assert!(acked.is_some(), "ack 5 never reached the store");
    drop(first);

    let mut second = proxy.connect("a").await;
    let welcome = second.welcome();
    assert_eq!((welcome.cursor, welcome.backlog), (5, 15));
    for expected in 6..=20u64 {
        let e = tokio::time::timeout(Duration::from_secs(5), second.next()).await.unwrap().unwrap().unwrap();
        assert_eq!(e.offset, expected, "exactly the unacked events, in order");
    }
    second.ack(20);
    assert!(
        tokio::time::timeout(Duration::from_millis(300), second.next()).await.is_err(),
        "nothing beyond the log is delivered"
    );
    let a = eventually(Duration::from_secs(5), || async {
        let a = proxy.agent("a").await;
        (a["pending"] == 0).then_some(a)
    })
    .await
    .expect("all acked");
    assert_eq!(a["cursor"], 20);
}

#[tokio::test(flavor = "multi_thread")]
async fn live_events_follow_the_replay_in_order_within_the_window() {
    let dir = tempfile::tempdir().unwrap();
    let proxy = Proxy::start(&config(dir.path()));
    post_n(&proxy, 5).await;
    let mut options = proxy.client_options("a", TOKEN);
    options.window = 3; // the proxy may have at most 3 unacked events in flight
    let mut agent = concierge_protocol::client::AgentClient::connect(options).await.unwrap();
    let mut seen = Vec::new();
    for _ in 0..3 {
        seen.push(tokio::time::timeout(Duration::from_secs(5), agent.next()).await.unwrap().unwrap().unwrap().offset);
    }
    assert!(
        tokio::time::timeout(Duration::from_millis(300), agent.next()).await.is_err(),
        "a fourth event must wait for credit"
    );
    agent.ack(3);
    post_n_from(&proxy, 6, 10).await;
    while seen.len() < 10 {
        let e = tokio::time::timeout(Duration::from_secs(5), agent.next()).await.unwrap().unwrap().unwrap();
        seen.push(e.offset);
        agent.ack(e.offset);
    }
    assert_eq!(seen, (1..=10).collect::<Vec<u64>>());
}

async fn post_n_from(proxy: &Proxy, from: usize, to: usize) {
    for i in from..=to {
        let (status, _) = proxy.post("a", "in", &format!("{{\"text\":\"m{i}\"}}"), Some(&format!("k{i}"))).await;
        assert_eq!(status, 202);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_newer_session_supersedes_the_older_and_gets_the_unacked_events() {
    let dir = tempfile::tempdir().unwrap();
    let proxy = Proxy::start(&config(dir.path()));
    post_n(&proxy, 4).await;
    let mut old = proxy.connect("a").await;
    let e = tokio::time::timeout(Duration::from_secs(5), old.next()).await.unwrap().unwrap().unwrap();
    assert_eq!(e.offset, 1);
    let mut options = proxy.client_options("a", TOKEN);
    options.reconnect_attempts = 1;
    let mut new = concierge_protocol::client::AgentClient::connect(options).await.unwrap();
    for expected in 1..=4u64 {
        let e = tokio::time::timeout(Duration::from_secs(5), new.next()).await.unwrap().unwrap().unwrap();
        assert_eq!(e.offset, expected);
    }
    assert_eq!(proxy.agent("a").await["state"], "awake");
}

/// A raw protocol client: the SDK hides the case we want to provoke.
async fn raw_session(
    proxy: &Proxy,
    window: u32,
) -> (quinn::Endpoint, quinn::Connection, quinn::SendStream, concierge_protocol::io::FrameReader) {
    let (endpoint, conn, send, recv) = raw_hello(proxy, window).await;
    let mut reader = concierge_protocol::io::FrameReader::new(recv, 1 << 20);
    let welcome = reader.next::<concierge_protocol::ToAgent>().await.unwrap().unwrap();
    assert!(matches!(welcome, concierge_protocol::ToAgent::Welcome { .. }), "{welcome:?}");
    (endpoint, conn, send, reader)
}

#[tokio::test(flavor = "multi_thread")]
async fn an_ack_resent_after_reconnect_is_accepted_but_acks_beyond_the_log_are_not() {
    use concierge_protocol::{ToAgent, ToProxy};
    let dir = tempfile::tempdir().unwrap();
    let proxy = Proxy::start(&config(dir.path()));
    post_n(&proxy, 3).await;
    {
        let (_endpoint, conn, _send, mut reader) = raw_session(&proxy, 100).await;
        let Some(ToAgent::Deliver { events }) = reader.next::<ToAgent>().await.unwrap() else { panic!("no delivery") };
        assert_eq!(events.len(), 3);
        conn.close(0u32.into(), b"ack lost with the connection");
    }
    // The new session's first frame re-sends the lost ack before reading anything; with a
    // window of 1 this session has delivered at most offset 1 when the ack for 3 arrives.
    let (_endpoint, conn, mut send, _reader) = raw_session(&proxy, 1).await;
    concierge_protocol::io::write_frame(&mut send, &ToProxy::Ack { up_to: 3 }).await.unwrap();
    let cursor =
        eventually(Duration::from_secs(5), || async { (proxy.agent("a").await["cursor"] == 3).then_some(()) }).await;
    assert!(cursor.is_some(), "the re-sent ack was not applied");
    assert!(conn.close_reason().is_none(), "the session survived the ack");
    // Acking an offset that was never stored is a protocol error that names the problem.
    concierge_protocol::io::write_frame(&mut send, &ToProxy::Ack { up_to: 99 }).await.unwrap();
    let reason = tokio::time::timeout(Duration::from_secs(5), conn.closed()).await.expect("closed");
    assert!(reason.to_string().contains("the log ends at 3"), "{reason}");
}

/// Promise 5: a full buffer is explicit backpressure (429 + Retry-After), never unbounded
/// memory, loses nothing already stored, and clears once the agent acks.
#[tokio::test(flavor = "multi_thread")]
async fn a_full_buffer_answers_429_until_the_agent_acks() {
    let dir = tempfile::tempdir().unwrap();
    let body = format!(
        "[agents.a]\ntoken = \"{TOKEN}\"\nmax_pending = 3\n[agents.a.wake]\ndriver = \"none\"\npolicy = \"never\"\n\n[webhooks.in]\nagent = \"a\"\nverify = \"none\"\n"
    );
    let proxy = Proxy::start(&write_config(dir.path(), &Backend::Embedded, [0, 0, 0], &body));
    for i in 1..=3 {
        assert_eq!(proxy.post("a", "in", &format!("{{\"text\":\"m{i}\"}}"), Some(&format!("k{i}"))).await.0, 202);
    }
    let full = reqwest::Client::new()
        .post(format!("http://{}/hooks/a/in", proxy.http))
        .header("Idempotency-Key", "k4")
        .body("{\"text\":\"m4\"}")
        .send()
        .await
        .unwrap();
    assert_eq!(full.status().as_u16(), 429, "a full buffer pushes back");
    assert!(full.headers().contains_key("retry-after"), "and says when to retry");
    assert_eq!(proxy.agent("a").await["pending"], 3, "nothing beyond the cap is stored");

    let mut agent = proxy.connect("a").await;
    for expected in 1..=3u64 {
        let e = tokio::time::timeout(Duration::from_secs(5), agent.next()).await.unwrap().unwrap().unwrap();
        assert_eq!(e.offset, expected, "what was stored before the cap is all delivered");
    }
    agent.ack(3);
    let cleared =
        eventually(Duration::from_secs(5), || async { (proxy.agent("a").await["pending"] == 0).then_some(()) }).await;
    assert!(cleared.is_some(), "the ack never reached the store");
    // The platform's retry of the refused event is now accepted and delivered.
    assert_eq!(proxy.post("a", "in", "{\"text\":\"m4\"}", Some("k4")).await.0, 202);
    let e = tokio::time::timeout(Duration::from_secs(5), agent.next()).await.unwrap().unwrap().unwrap();
    assert_eq!((e.offset, e.data.text.as_deref()), (4, Some("m4")));
}

/// Waits (bounded) for a signalled proxy process to exit; returns its status.
async fn wait_exit(proxy: &mut Proxy) -> std::process::ExitStatus {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(status) = proxy.child.try_wait().unwrap() {
            return status;
        }
        assert!(std::time::Instant::now() < deadline, "concierge did not exit after SIGTERM; log:\n{}", proxy.log());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// One `AgentClient` with the default reconnect settings rides out a proxy restart on its
/// own: a reconnect that meets the stopping proxy's `Reject(ShuttingDown)` is retried with
/// backoff (not fatal), and once the successor is up the same client resumes from the
/// durable cursor and receives the next new event; the caller never reconnects.
#[tokio::test(flavor = "multi_thread")]
async fn one_client_rides_out_a_proxy_restart() {
    use concierge_protocol::client::{AgentClient, ClientOptions};
    use concierge_protocol::tls::Trust;
    let dir = tempfile::tempdir().unwrap();
    let ports = fixed_ports();
    let body = agent_a();
    let config = write_config_with(dir.path(), &Backend::Embedded, ports, "shutdown_delay = \"5s\"", &body);
    let mut proxy = Proxy::start(&config);
    post_n(&proxy, 3).await;
    let options = ClientOptions::new(proxy.quic.clone(), "a", TOKEN, Trust::Pinned(proxy.cert_sha256.clone()));
    let mut agent = AgentClient::connect(options).await.expect("agent connects");
    let first = receive_n(&mut agent, 3, Duration::from_secs(10)).await;
    assert_eq!(first.iter().map(|e| e.offset).collect::<Vec<_>>(), vec![1, 2, 3]);
    proxy.wait_cursor("a", 3, Duration::from_secs(10)).await;

    unsafe { libc::kill(proxy.child.id() as i32, libc::SIGTERM) };
    let unready = eventually(Duration::from_secs(5), || async {
        (proxy.admin_status("/readyz", None).await == 503).then_some(())
    })
    .await;
    assert!(unready.is_some(), "/readyz did not fail after SIGTERM");
    // An operator action restarts the session during the shutdown delay, so the client's
    // reconnect meets the stopping proxy and is refused with ShuttingDown.
    let r = http_client()
        .post(format!("http://{}/api/agents/a/redeliver", proxy.admin))
        .json(&serde_json::json!({ "from": 4 }))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200, "{:?}", r.text().await);
    let refused =
        eventually(Duration::from_secs(10), || async { proxy.log().contains("ShuttingDown").then_some(()) }).await;
    assert!(refused.is_some(), "the reconnect never met ShuttingDown; log:\n{}", proxy.log());
    let status = wait_exit(&mut proxy).await;
    assert!(status.success(), "{status:?}");

    let proxy = Proxy::start(&config);
    assert_eq!(proxy.quic, format!("127.0.0.1:{}", ports[0]), "restart reuses the QUIC port");
    post_n_from(&proxy, 4, 4).await;
    let next = receive_n(&mut agent, 1, Duration::from_secs(90)).await;
    assert_eq!(next[0].offset, 4, "resumed after the cursor, no event twice");
    assert_eq!(agent.welcome().cursor, 3, "the welcome of the new session");
    proxy.wait_cursor("a", 4, Duration::from_secs(10)).await;
    expect_no_more(&mut agent, Duration::from_millis(500)).await;
}

/// GET on the admin API, as JSON.
async fn admin_json(proxy: &Proxy, path: &str) -> serde_json::Value {
    let r = http_client().get(format!("http://{}{path}", proxy.admin)).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 200, "GET {path}");
    r.json().await.unwrap()
}

fn offsets(page: &serde_json::Value) -> Vec<u64> {
    page["events"].as_array().unwrap().iter().map(|e| e["offset"].as_u64().unwrap()).collect()
}

/// `/api/agents` shows what is buffered (bytes, and the oldest event's age, growing while it
/// waits; both cleared once acked), and `/events?after=&limit=` pages through the log with
/// `next_after` as the cursor of the next page.
#[tokio::test(flavor = "multi_thread")]
async fn admin_api_shows_buffered_bytes_and_age_and_pages_the_log() {
    let dir = tempfile::tempdir().unwrap();
    let proxy = Proxy::start(&config(dir.path()));
    post_n(&proxy, 5).await;

    // Bytes and age come from a periodic store snapshot: wait (bounded) for one.
    let buffered = eventually(Duration::from_secs(30), || async {
        let a = proxy.agent("a").await;
        (a["pending_bytes"].as_u64().is_some_and(|b| b > 0) && a["oldest_pending_age_ms"].is_u64()).then_some(a)
    })
    .await;
    let Some(buffered) = buffered else {
        panic!("no pending_bytes/oldest_pending_age_ms while buffered: {}", proxy.agents().await);
    };
    assert_eq!(buffered["pending"], 5, "{buffered}");
    let age = buffered["oldest_pending_age_ms"].as_u64().unwrap();
    let older = eventually(Duration::from_secs(10), || async {
        proxy.agent("a").await["oldest_pending_age_ms"].as_u64().filter(|a| *a > age)
    })
    .await;
    assert!(older.is_some(), "oldest_pending_age_ms never grew past {age}");

    let page = admin_json(&proxy, "/api/agents/a/events?after=2&limit=2").await;
    assert_eq!(offsets(&page), vec![3, 4], "{page}");
    assert_eq!(page["next_after"], 4, "{page}");
    let page = admin_json(&proxy, "/api/agents/a/events?after=4&limit=2").await;
    assert_eq!((offsets(&page), &page["next_after"]), (vec![5], &serde_json::json!(5)), "{page}");
    let page = admin_json(&proxy, "/api/agents/a/events?after=5&limit=2").await;
    assert_eq!((offsets(&page), &page["next_after"]), (vec![], &serde_json::Value::Null), "{page}");

    let mut agent = proxy.connect("a").await;
    receive_n(&mut agent, 5, Duration::from_secs(10)).await;
    let drained = eventually(Duration::from_secs(30), || async {
        let a = proxy.agent("a").await;
        (a["pending"] == 0 && a["pending_bytes"] == 0 && a["oldest_pending_age_ms"].is_null()).then_some(())
    })
    .await;
    assert!(drained.is_some(), "figures not cleared after the ack: {}", proxy.agent("a").await);
}

/// Environment of [`sigkilled_agent_child`]: proxy address, pin, agent id, events to receive
/// and the offset to ack before waiting to be killed.
const CHILD_ENV: [&str; 5] =
    ["KILL_CHILD_ADDR", "KILL_CHILD_PIN", "KILL_CHILD_AGENT", "KILL_CHILD_RECEIVE", "KILL_CHILD_ACK"];

/// A real agent process for [`agent_process_sigkilled_mid_batch`]: receives the events, acks
/// a prefix, says so on stdout, then waits to be SIGKILLed (no QUIC close ever goes out).
#[tokio::test(flavor = "multi_thread")]
#[ignore = "helper process for agent_process_sigkilled_mid_batch_*"]
async fn sigkilled_agent_child() {
    let vars: Option<Vec<String>> = CHILD_ENV.iter().map(|k| std::env::var(k).ok()).collect();
    let Some([addr, pin, agent, receive, ack]) = vars.and_then(|v| <[String; 5]>::try_from(v).ok()) else {
        return; // run by hand without the parent: nothing to do
    };
    let (receive, ack): (usize, u64) = (receive.parse().unwrap(), ack.parse().unwrap());
    let options =
        concierge_protocol::client::ClientOptions::new(addr, agent, TOKEN, concierge_protocol::tls::Trust::Pinned(pin));
    let mut client = concierge_protocol::client::AgentClient::connect(options).await.expect("child connects");
    let events = receive_n_unacked(&mut client, receive, Duration::from_secs(30)).await;
    let offsets: Vec<u64> = events.iter().map(|e| e.offset).collect();
    println!("RECEIVED {offsets:?}");
    client.ack(ack);
    println!("ACKED {ack}");
    std::future::pending::<()>().await;
}

/// A child process that does not outlive a failed test.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A real agent process receives 20 events, acks 7 and is SIGKILLed (its connection vanishes
/// without a close); a new session gets exactly 8..=20 in order, superseding the dead one.
async fn agent_process_sigkilled_mid_batch(backend: Backend, agent: &str) {
    use std::io::BufRead as _;
    let dir = tempfile::tempdir().unwrap();
    let body = format!("{}{}", self_connecting_agent(agent), webhook_route("in", agent, ""));
    let proxy = Proxy::start(&write_config(dir.path(), &backend, [0, 0, 0], &body));
    for i in 1..=20 {
        let (status, _) = proxy.post(agent, "in", &format!("{{\"text\":\"m{i}\"}}"), Some(&format!("k{i}"))).await;
        assert_eq!(status, 202);
    }
    let child = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "sigkilled_agent_child", "--ignored", "--nocapture", "--test-threads=1"])
        .envs(CHILD_ENV.iter().zip([proxy.quic.as_str(), proxy.cert_sha256.as_str(), agent, "20", "7"]))
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::inherit())
        .spawn()
        .unwrap();
    let mut child = KillOnDrop(child);
    let stdout = std::io::BufReader::new(child.0.stdout.take().unwrap());
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in stdout.lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let mut received = None;
    loop {
        let line = rx.recv_timeout(Duration::from_secs(60)).expect("the child reports its progress");
        // libtest may print "test sigkilled_agent_child ... " in front of the first line.
        if let Some(at) = line.find("RECEIVED ") {
            received = Some(line[at + "RECEIVED ".len()..].to_string());
        }
        if line.ends_with("ACKED 7") {
            break;
        }
    }
    assert_eq!(received.as_deref(), Some(format!("{:?}", (1..=20).collect::<Vec<u64>>()).as_str()));
    proxy.wait_cursor(agent, 7, Duration::from_secs(10)).await;
    child.0.kill().unwrap(); // SIGKILL
    child.0.wait().unwrap();
    assert_eq!(proxy.agent(agent).await["connected"], true, "the dead session is not noticed yet");

    let mut second = proxy.connect(agent).await;
    assert_eq!((second.welcome().cursor, second.welcome().backlog), (7, 13));
    let events = receive_n(&mut second, 13, Duration::from_secs(20)).await;
    assert_eq!(events.iter().map(|e| e.offset).collect::<Vec<_>>(), (8..=20).collect::<Vec<u64>>());
    for e in &events {
        assert_eq!(e.data.text.as_deref(), Some(format!("m{}", e.offset).as_str()));
    }
    expect_no_more(&mut second, Duration::from_millis(500)).await;
    proxy.wait_cursor(agent, 20, Duration::from_secs(10)).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn agent_process_sigkilled_mid_batch_embedded() {
    agent_process_sigkilled_mid_batch(Backend::Embedded, "a").await;
}

/// On the shared Redis (127.0.0.1:6379), under an agent id no other test uses.
#[tokio::test(flavor = "multi_thread")]
async fn agent_process_sigkilled_mid_batch_redis() {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos();
    let agent = format!("sigkill-{}-{nanos:x}", std::process::id());
    agent_process_sigkilled_mid_batch(Backend::Redis("redis://127.0.0.1:6379".into()), &agent).await;
}

/// `AgentClient::grant` changes the credit window mid-session and the proxy honours it: a
/// smaller window holds deliveries back until acks make room, a larger one releases more
/// without any ack.
#[tokio::test(flavor = "multi_thread")]
async fn a_window_granted_mid_session_is_honoured() {
    let dir = tempfile::tempdir().unwrap();
    let proxy = Proxy::start(&config(dir.path()));
    post_n(&proxy, 10).await;
    let mut options = proxy.client_options("a", TOKEN);
    options.window = 4;
    let mut agent = concierge_protocol::client::AgentClient::connect(options).await.unwrap();
    let offsets = |events: Vec<concierge_protocol::Event>| events.iter().map(|e| e.offset).collect::<Vec<_>>();
    assert_eq!(offsets(receive_n_unacked(&mut agent, 4, Duration::from_secs(5)).await), vec![1, 2, 3, 4]);
    expect_no_more(&mut agent, Duration::from_millis(300)).await;

    // Window 2 with offset 4 still in flight: room for exactly one more.
    agent.grant(2);
    agent.ack(3);
    assert_eq!(offsets(receive_n_unacked(&mut agent, 1, Duration::from_secs(5)).await), vec![5]);
    expect_no_more(&mut agent, Duration::from_millis(300)).await;

    // Window 4 with 4 and 5 in flight: two more, no ack needed.
    agent.grant(4);
    assert_eq!(offsets(receive_n_unacked(&mut agent, 2, Duration::from_secs(5)).await), vec![6, 7]);
    expect_no_more(&mut agent, Duration::from_millis(300)).await;
}

/// A session starts reading from the cursor this proxy knows while it asks the store for the
/// authoritative one. When another replica moved the cursor meanwhile (the agent acked there),
/// those early reads are discarded: delivery resumes exactly after the store's cursor.
#[tokio::test(flavor = "multi_thread")]
async fn a_session_resumes_from_the_stores_cursor_when_another_replica_moved_it() {
    use concierge_protocol::{ToAgent, ToProxy};
    let redis = Redis::start();
    let body = agent_a();
    let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    // Acked events stay in the log (retained for redelivery), so reading from a stale cursor
    // would find them.
    let config = |dir: &std::path::Path| {
        let path = write_config(dir, &Backend::Redis(redis.url()), [0, 0, 0], &body);
        let text = std::fs::read_to_string(&path).unwrap().replace("[store]\n", "[store]\nretain_acked = 100\n");
        std::fs::write(&path, text).unwrap();
        path
    };
    let a = Proxy::start(&config(dir_a.path()));
    post_n(&a, 6).await;
    // Replica B starts after the events are stored, so it knows the head; the agent acks 4 there.
    let b = Proxy::start(&config(dir_b.path()));
    {
        let (_endpoint, conn, mut send, mut reader) = raw_session(&b, 100).await;
        let Some(ToAgent::Deliver { events }) = reader.next::<ToAgent>().await.unwrap() else { panic!("no delivery") };
        assert_eq!(events.first().map(|e| e.offset), Some(1));
        concierge_protocol::io::write_frame(&mut send, &ToProxy::Ack { up_to: 4 }).await.unwrap();
        let acked =
            eventually(Duration::from_secs(5), || async { (b.agent("a").await["cursor"] == 4).then_some(()) }).await;
        assert!(acked.is_some(), "replica B did not store the ack");
        conn.close(0u32.into(), b"moving to another replica");
    }
    assert_eq!(a.agent("a").await["cursor"], 0, "replica A has not seen the ack");
    let (_endpoint, _conn, _send, mut reader) = raw_session(&a, 100).await;
    let mut offsets = Vec::new();
    while offsets.len() < 2 {
        match tokio::time::timeout(Duration::from_secs(5), reader.next::<ToAgent>()).await.unwrap().unwrap() {
            Some(ToAgent::Deliver { events }) => offsets.extend(events.iter().map(|e| e.offset)),
            other => panic!("expected Deliver, got {other:?}"),
        }
    }
    assert_eq!(offsets, [5, 6], "exactly the events after the store's cursor");
}

/// A live session gets the events its own replica just stored from memory, but an event
/// another replica stored in between is not there: the gap sends the session to the store,
/// and the agent still gets every event once, in offset order.
#[tokio::test(flavor = "multi_thread")]
async fn a_live_session_reads_the_store_for_an_event_another_replica_stored_in_between() {
    let redis = Redis::start();
    let body = agent_a();
    let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let a = Proxy::start(&write_config(dir_a.path(), &Backend::Redis(redis.url()), [0, 0, 0], &body));
    let b = Proxy::start(&write_config(dir_b.path(), &Backend::Redis(redis.url()), [0, 0, 0], &body));
    let mut agent = a.connect("a").await;
    post_n_from(&a, 1, 1).await;
    assert_eq!(receive_n(&mut agent, 1, Duration::from_secs(5)).await[0].offset, 1);
    post_n_from(&b, 2, 2).await; // offset 2, stored by replica B: replica A never held it
    post_n_from(&a, 3, 4).await; // offsets 3 and 4, handed to A's session in memory
    let got = receive_n(&mut agent, 3, Duration::from_secs(5)).await;
    let texts: Vec<_> = got.iter().map(|e| e.data.text.clone().unwrap_or_default()).collect();
    assert_eq!(got.iter().map(|e| e.offset).collect::<Vec<_>>(), vec![2, 3, 4], "2 read from the store, then 3, 4");
    assert_eq!(texts, ["m2", "m3", "m4"]);
    expect_no_more(&mut agent, Duration::from_millis(300)).await;
}

/// A stored event the SDK cannot decode (written by a newer build, or damaged) is an error
/// naming its offset from `next`, and the events after it still arrive: one bad record does
/// not stall the agent's log.
#[tokio::test(flavor = "multi_thread")]
async fn an_event_that_does_not_decode_is_named_and_the_next_ones_still_arrive() {
    let redis = Redis::start();
    let body = agent_a();
    let dir = tempfile::tempdir().unwrap();
    let proxy = Proxy::start(&write_config(dir.path(), &Backend::Redis(redis.url()), [0, 0, 0], &body));
    post_n_from(&proxy, 1, 1).await;
    // Offset 2: an entry whose record has an unknown version byte (0x09).
    let cli = |args: &[&str]| {
        let out = std::process::Command::new("redis-cli").args(["-p", &redis.port.to_string()]).args(args).output();
        assert!(out.expect("redis-cli runs").status.success(), "redis-cli {args:?}");
    };
    cli(&["XADD", "c:{a}:evt", "0-2", "e", "1234 10 0\n\tgarbage"]);
    cli(&["HINCRBY", "c:{a}:meta", "head", "1"]);
    post_n_from(&proxy, 3, 3).await;

    let mut agent = proxy.connect("a").await;
    let within = Duration::from_secs(5);
    assert_eq!(tokio::time::timeout(within, agent.next()).await.unwrap().unwrap().unwrap().offset, 1);
    let err = tokio::time::timeout(within, agent.next()).await.unwrap().expect_err("offset 2 does not decode");
    let err = err.to_string();
    assert!(err.contains("offset 2") && err.contains("unknown version 9"), "{err}");
    let third = tokio::time::timeout(within, agent.next()).await.unwrap().unwrap().unwrap();
    assert_eq!((third.offset, third.data.text.as_deref()), (3, Some("m3")));
}

/// Store reads run ahead of delivery, two at a time, the second starting where the first ends
/// if it comes back full. With a small frame ceiling every read is cut short by its byte
/// budget, so the read behind it must be discarded and redone from where the first really
/// ended: every event arrives once, in order, with no gap.
#[tokio::test(flavor = "multi_thread")]
async fn reads_cut_short_by_the_frame_budget_lose_and_repeat_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let proxy =
        Proxy::start(&write_config_with(dir.path(), &Backend::Embedded, [0, 0, 0], "max_frame = 4096", &agent_a()));
    post_n(&proxy, 600).await;
    let mut options = proxy.client_options("a", TOKEN);
    options.window = 1000;
    let mut agent = concierge_protocol::client::AgentClient::connect(options).await.unwrap();
    let got = receive_n(&mut agent, 600, Duration::from_secs(30)).await;
    let offsets: Vec<u64> = got.iter().map(|e| e.offset).collect();
    assert_eq!(offsets, (1..=600).collect::<Vec<u64>>());
    expect_no_more(&mut agent, Duration::from_millis(300)).await;
}
