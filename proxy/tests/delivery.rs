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
    for i in 1..=n {
        let (status, _) = proxy.post("a", "in", &format!("{{\"text\":\"m{i}\"}}"), Some(&format!("k{i}"))).await;
        assert_eq!(status, 202);
    }
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
