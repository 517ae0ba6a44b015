//! Delivery guarantees seen from a real agent over real QUIC: resume exactly after the
//! acknowledged cursor, in order, with nothing lost and nothing handed out twice.

mod common;

use std::time::Duration;

use common::*;

fn config(dir: &std::path::Path) -> std::path::PathBuf {
    let body = format!(
        "{}\n[webhooks.in]\nagent = \"a\"\nverify = \"none\"\n",
        agent_section("a", "driver = \"none\"\npolicy = \"never\"")
    );
    write_config(dir, &Backend::Embedded, [0, 0, 0], &body)
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
    use concierge_protocol::tls::{Trust, client_config};
    let mut endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    endpoint.set_default_client_config(client_config(Trust::Pinned(proxy.cert_sha256.clone())).unwrap());
    let conn = endpoint.connect(proxy.quic.parse().unwrap(), "localhost").unwrap().await.unwrap();
    let (mut send, recv) = conn.open_bi().await.unwrap();
    let hello = concierge_protocol::ToProxy::Hello {
        version: 1,
        agent: "a".into(),
        token: TOKEN.into(),
        client: "raw".into(),
        window,
    };
    concierge_protocol::io::write_frame(&mut send, &hello).await.unwrap();
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
