//! End to end through real processes: webhook -> durable store -> exec wake of the built-in
//! echo agent -> QUIC delivery -> ack -> reply POSTed to the route's reply_url.

mod common;

use std::time::Duration;

use common::*;

/// A Standard Webhooks secret (the spec's example format: `whsec_` + base64).
const REPLY_SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

/// Checks every reply the sink received the way a receiving server would: with the adapters'
/// Standard Webhooks verification and the route's `reply_secret` (and refuses another secret).
fn assert_replies_signed(sink: &Sink) {
    use concierge_adapters::signature::{secret_bytes, standard_verify};
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64;
    let received = sink.received.lock().unwrap().clone();
    assert!(!received.is_empty());
    for (headers, body) in &received {
        let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
        let (id, ts, sig) = (header("webhook-id"), header("webhook-timestamp"), header("webhook-signature"));
        let verified = standard_verify(&[secret_bytes(REPLY_SECRET)], id, ts, sig, body.as_bytes(), now);
        assert!(verified.is_ok(), "reply {body} does not verify: {verified:?} (headers {headers:?})");
        let other = secret_bytes("whsec_c29tZSBvdGhlciBzZWNyZXQgb2YgMjQgYnl0ZXM=");
        assert!(standard_verify(&[other], id, ts, sig, body.as_bytes(), now).is_err(), "any secret verifies");
    }
}

async fn webhook_to_woken_echo_agent_and_back(backend: Backend) {
    webhook_to_woken_echo_agent_and_back_with(backend, None).await;
}

/// `reply_secret`: when set on the route, every reply must carry a valid signature.
async fn webhook_to_woken_echo_agent_and_back_with(backend: Backend, reply_secret: Option<&str>) {
    let dir = tempfile::tempdir().unwrap();
    let sink = Sink::start().await;
    let secret_line = reply_secret.map(|s| format!("reply_secret = \"{s}\"\n")).unwrap_or_default();
    let body = format!(
        "{}\n[webhooks.demo]\nagent = \"echo\"\nverify = \"none\"\nreply_url = \"{}\"\n{secret_line}",
        agent_section("echo", &echo_wake("sleep_after = \"30s\"")),
        sink.url
    );
    let config = write_config(dir.path(), &backend, [0, 0, 0], &body);
    let proxy = Proxy::start(&config);
    assert_eq!(proxy.agent("echo").await["state"], "asleep");

    let (status, ack) = proxy.post("echo", "demo", r#"{"text":"hello"}"#, Some("m-1")).await;
    assert_eq!(status, 202, "{ack}");
    let offset = ack["offset"].as_u64().unwrap();

    let replies = sink.wait_for(1, Duration::from_secs(20)).await;
    assert_eq!(replies.len(), 1, "one echoed reply; proxy log:\n{}", proxy.log());
    assert_eq!(replies[0]["body"], "echo: hello");
    assert_eq!(replies[0]["conversation"], "demo");
    assert_eq!(replies[0]["reply_to"], offset);

    // The agent acked: the cursor moved and nothing is pending.
    let agent = eventually(Duration::from_secs(10), || async {
        let a = proxy.agent("echo").await;
        (a["cursor"] == offset && a["pending"] == 0).then_some(a)
    })
    .await
    .unwrap_or_else(|| panic!("cursor never reached {offset}: {}", proxy.log()));
    assert_eq!(agent["state"], "awake");
    let wake = &agent["last_wake"];
    assert_eq!(wake["outcome"], "connected");
    assert!(wake["connected_after_ms"].as_f64().unwrap() > 0.0);
    assert!(wake["first_delivery_after_ms"].as_f64().unwrap() >= wake["connected_after_ms"].as_f64().unwrap());

    // A second message goes to the already-awake agent: still exactly one reply each.
    let (status, _) = proxy.post("echo", "demo", r#"{"text":"again"}"#, Some("m-2")).await;
    assert_eq!(status, 202);
    let replies = sink.wait_for(2, Duration::from_secs(10)).await;
    assert_eq!(replies.len(), 2);
    assert_eq!(replies[1]["body"], "echo: again");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(sink.bodies().len(), 2, "no duplicate replies");
    // Both events were drained by the session that one wake brought up.
    let drained = eventually(Duration::from_secs(5), || async {
        let n = proxy.agent("echo").await["last_wake"]["events_drained"].as_u64();
        (n == Some(2)).then_some(())
    })
    .await;
    assert!(drained.is_some(), "wake record: {}", proxy.agent("echo").await["last_wake"]);
    match reply_secret {
        Some(_) => assert_replies_signed(&sink),
        None => {
            let received = sink.received.lock().unwrap();
            assert!(received.iter().all(|(h, _)| !h.contains_key("webhook-signature")), "unsigned route");
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn end_to_end_on_the_embedded_store() {
    webhook_to_woken_echo_agent_and_back(Backend::Embedded).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn end_to_end_on_redis() {
    let redis = Redis::start();
    webhook_to_woken_echo_agent_and_back(Backend::Redis(redis.url())).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn end_to_end_with_a_signed_reply() {
    webhook_to_woken_echo_agent_and_back_with(Backend::Embedded, Some(REPLY_SECRET)).await;
}
