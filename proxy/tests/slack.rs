//! Slack through real processes: the `concierge` binary holds a real Socket Mode WebSocket to
//! the fake Slack in `concierge-loadtest` (or receives its signed Events API POSTs), and the
//! fake records which envelopes it considers acknowledged, so each test compares "what Slack
//! thinks we confirmed" with "what the store holds". Every wait is bounded.

mod common;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use common::*;
use concierge_loadtest::slack::{Call, FakeSlack, Options, Rate, post_signed, signature};
use concierge_protocol::client::AgentClient;
use concierge_protocol::{ChannelRef, SendRequest, SendResult};
use serde_json::{Value, json};

const APP_TOKEN: &str = "xapp-1-A0TEST-1-abc";
const BOT_TOKEN: &str = "xoxb-1-test";
const APP_ID: &str = "A0TEST";
const SECRET: &str = "8f742231b10e8888abcd99yyyzzz85a5";

fn app_section(api_base: &str, extra: &str) -> String {
    format!(
        "[slack.ws]\nagent = \"a\"\napp_token = \"{APP_TOKEN}\"\nbot_token = \"{BOT_TOKEN}\"\napi_base = \"{api_base}\"\n{extra}\n"
    )
}

async fn fake(options: Options) -> FakeSlack {
    let fake = FakeSlack::start(options).await.unwrap();
    fake.add_app(APP_TOKEN, BOT_TOKEN, APP_ID);
    fake
}

/// Event ids of the stored events of `agent`, in offset order; checks the dedupe key.
async fn stored_event_ids(proxy: &Proxy, agent: &str) -> Vec<String> {
    proxy
        .events(agent)
        .await
        .iter()
        .map(|e| {
            assert_eq!(e["channel"]["kind"], "slack", "{e}");
            let raw: Value = serde_json::from_str(e["raw"]["text"].as_str().expect("raw is JSON text")).unwrap();
            let id = raw["event_id"].as_str().expect("raw keeps event_id").to_string();
            assert_eq!(e["dedupe_key"], format!("slack:T0FAKE:{id}"), "{e}");
            id
        })
        .collect()
}

/// Pushes `n` channel messages, `every` apart; returns their event ids.
fn push_stream(fake: &FakeSlack, n: usize, every: Duration) -> tokio::task::JoinHandle<Vec<String>> {
    let fake = fake.clone();
    tokio::spawn(async move {
        let mut ids = Vec::with_capacity(n);
        for i in 0..n {
            ids.push(fake.push_message(APP_ID, "C0CHAN", None, &format!("message {i}")));
            tokio::time::sleep(every).await;
        }
        ids
    })
}

async fn wait_acked(fake: &FakeSlack, at_least: usize, within: Duration, proxy: &Proxy) {
    let ok = eventually(within, || async { (fake.acked().len() >= at_least).then_some(()) }).await;
    assert!(ok.is_some(), "fewer than {at_least} envelopes acked ({}); log:\n{}", fake.acked().len(), proxy.log());
}

fn sorted(v: &[String]) -> Vec<String> {
    let mut v = v.to_vec();
    v.sort();
    v
}

/// Promise 1 with the store failing mid-stream: while Redis is down no envelope is acked (the
/// fake redelivers them with `retry_attempt`), and once it is back each event is stored once.
#[tokio::test(flavor = "multi_thread")]
async fn envelopes_are_not_acked_while_the_store_is_down() {
    let mut redis = Redis::start();
    let fake = fake(Options { max_attempts: 40, ..Options::default() }).await;
    let dir = tempfile::tempdir().unwrap();
    let body = format!("{}{}", self_connecting_agent("a"), app_section(&fake.api_base, ""));
    let config = write_config(dir.path(), &Backend::Redis(redis.url()), [0, 0, 0], &body);
    let proxy = Proxy::start(&config);

    let pusher = push_stream(&fake, 150, Duration::from_millis(10));
    wait_acked(&fake, 20, Duration::from_secs(20), &proxy).await;
    redis.kill9();
    // An envelope stored just before the kill may still be acked; after that, nothing.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let acked_down = fake.acked();
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert_eq!(fake.acked(), acked_down, "envelopes were acked while the store was down");
    assert!(fake.unacked() > 0, "events pushed during the outage wait at Slack");
    assert!(!pusher.is_finished() || fake.envelopes_sent() > 150, "no redelivery was exercised");

    redis.restart();
    let pushed = pusher.await.unwrap();
    let ok = eventually(Duration::from_secs(90), || async { (fake.unacked() == 0).then_some(()) }).await;
    assert!(ok.is_some(), "{} envelopes never acked; log:\n{}", fake.unacked(), proxy.log());
    assert!(fake.abandoned().is_empty(), "Slack gave up on {:?}", fake.abandoned());
    assert!(fake.envelopes_sent() > pushed.len() as u64, "the outage caused redeliveries");
    let stored = stored_event_ids(&proxy, "a").await;
    assert_eq!(sorted(&stored), sorted(&pushed), "every event stored exactly once (log:\n{})", proxy.log());
    assert_eq!(sorted(&fake.acked()), sorted(&pushed), "each envelope acked exactly once");
    let events = proxy.events("a").await;
    assert!(events.iter().any(|e| e.to_string().contains("retry_attempt")), "retry fields kept in meta");
}

/// `disconnect`/`refresh_requested` mid-stream: the replacement socket is opened, the old
/// one closed, and every event is stored and acked exactly once.
#[tokio::test(flavor = "multi_thread")]
async fn refresh_requested_loses_and_duplicates_nothing() {
    let fake = fake(Options::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let body = format!("{}{}", self_connecting_agent("a"), app_section(&fake.api_base, ""));
    let config = write_config(dir.path(), &Backend::Embedded, [0, 0, 0], &body);
    let proxy = Proxy::start(&config);

    let pusher = push_stream(&fake, 400, Duration::from_millis(5));
    wait_acked(&fake, 50, Duration::from_secs(20), &proxy).await;
    fake.disconnect(APP_ID, "refresh_requested");
    let one = eventually(Duration::from_secs(8), || async {
        (fake.connections_opened() == 2 && fake.open_sockets(APP_ID) == 1).then_some(())
    })
    .await;
    assert!(
        one.is_some(),
        "the old socket was not replaced (opened {}); log:\n{}",
        fake.connections_opened(),
        proxy.log()
    );
    assert_eq!(fake.peak_sockets(APP_ID), 2, "the replacement was not open before the old socket closed");
    assert!(!pusher.is_finished(), "the refresh happened after the stream ended; the test proves nothing");
    let pushed = pusher.await.unwrap();
    let ok = eventually(Duration::from_secs(30), || async { (fake.unacked() == 0).then_some(()) }).await;
    assert!(ok.is_some(), "{} envelopes never acked; log:\n{}", fake.unacked(), proxy.log());
    let stored = stored_event_ids(&proxy, "a").await;
    let unique: BTreeSet<&String> = stored.iter().collect();
    assert_eq!(unique.len(), stored.len(), "an event was stored twice");
    assert_eq!(sorted(&stored), sorted(&pushed), "every event stored once");
    assert_eq!(fake.acked().len(), pushed.len(), "each envelope acked exactly once");
}

/// The admin API's state of held connection `slack/ws` (`GET /api/channels`).
async fn connection_state(proxy: &Proxy) -> Option<String> {
    let r = http_client().get(format!("http://{}/api/channels", proxy.admin)).send().await.ok()?;
    let json: Value = r.json().await.ok()?;
    let c = json["connections"].as_array()?.iter().find(|c| c["channel"] == "slack" && c["name"] == "ws")?.clone();
    c["state"].as_str().map(str::to_string)
}

/// `disconnect`/`link_disabled` stops the connection for good and shows as `disabled`.
#[tokio::test(flavor = "multi_thread")]
async fn link_disabled_stops_and_is_reported() {
    let fake = fake(Options { disconnect_grace: Duration::from_millis(200), ..Options::default() }).await;
    let dir = tempfile::tempdir().unwrap();
    let body = format!("{}{}", self_connecting_agent("a"), app_section(&fake.api_base, ""));
    let config = write_config(dir.path(), &Backend::Embedded, [0, 0, 0], &body);
    let proxy = Proxy::start(&config);
    let up = eventually(Duration::from_secs(10), || async {
        (connection_state(&proxy).await.as_deref() == Some("connected")).then_some(())
    })
    .await;
    assert!(up.is_some(), "never connected: {:?}; log:\n{}", connection_state(&proxy).await, proxy.log());
    fake.disconnect(APP_ID, "link_disabled");
    let off = eventually(Duration::from_secs(10), || async {
        (connection_state(&proxy).await.as_deref() == Some("disabled")).then_some(())
    })
    .await;
    assert!(off.is_some(), "not reported disabled: {:?}; log:\n{}", connection_state(&proxy).await, proxy.log());
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(fake.connections_opened(), 1, "reconnected after link_disabled");
    assert_eq!(fake.open_sockets(APP_ID), 0);
}

/// Events API: a bad or stale signature is 401 and stores nothing; `url_verification` is
/// answered; a signed `event_callback` is stored once, a retry of it dropped by dedupe.
#[tokio::test(flavor = "multi_thread")]
async fn events_api_checks_signatures() {
    let fake = fake(Options::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let extra = format!("mode = \"events\"\nsigning_secret = \"{SECRET}\"");
    let body = format!("{}{}", self_connecting_agent("a"), app_section(&fake.api_base, &extra));
    let config = write_config(dir.path(), &Backend::Embedded, [0, 0, 0], &body);
    let proxy = Proxy::start(&config);
    let url = format!("http://{}/slack/ws", proxy.http);
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();

    let event = json!({"type": "event_callback", "team_id": "T0FAKE", "event_id": "Ev0BAD",
        "event": {"type": "message", "channel": "C1", "ts": "1.1", "text": "forged"}})
    .to_string();
    assert_eq!(post_signed(&url, b"wrong-secret", now, event.as_bytes(), 0).await, [401]);
    assert_eq!(post_signed(&url, SECRET.as_bytes(), now - 600, event.as_bytes(), 0).await, [401], "stale timestamp");
    let unsigned = http_client().post(&url).body(event.clone()).send().await.unwrap();
    assert_eq!(unsigned.status().as_u16(), 401);
    assert!(proxy.events("a").await.is_empty(), "a badly signed event was stored");

    let challenge = json!({"token": "x", "challenge": "3eZbrw1aBm2rZgRNFdxV2595E9CY3gmdALWMmHkvFXO7tYXAYM8P", "type": "url_verification"}).to_string();
    let r = http_client()
        .post(&url)
        .header("x-slack-request-timestamp", now.to_string())
        .header("x-slack-signature", signature(SECRET.as_bytes(), now, challenge.as_bytes()))
        .body(challenge)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    assert_eq!(r.text().await.unwrap(), "3eZbrw1aBm2rZgRNFdxV2595E9CY3gmdALWMmHkvFXO7tYXAYM8P");

    let statuses = fake
        .deliver_http(&url, SECRET.as_bytes(), APP_ID, json!({"type": "app_mention", "channel": "C1", "ts": "2.2", "thread_ts": "1.1", "user": "U1", "text": "<@U0BOT> hi"}))
        .await;
    assert_eq!(statuses, [200]);
    assert_eq!(post_signed(&url, SECRET.as_bytes(), now, event.as_bytes(), 1).await, [200]);
    assert_eq!(post_signed(&url, SECRET.as_bytes(), now, event.as_bytes(), 1).await, [200], "a retry is answered 200");
    // A slash command arrives form-encoded; it is stored with its body as sent.
    let form = "command=%2Fdeploy&text=prod&channel_id=C9&user_id=U7&team_id=T0FAKE&trigger_id=13345224609.738474920.8088930838d88f008e0";
    let r = http_client()
        .post(&url)
        .header("content-type", "application/x-www-form-urlencoded")
        .header("x-slack-request-timestamp", now.to_string())
        .header("x-slack-signature", signature(SECRET.as_bytes(), now, form.as_bytes()))
        .body(form)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let events = proxy.events("a").await;
    assert_eq!(events.len(), 3, "{events:?}");
    assert_eq!(events[0]["conversation"], "C1:1.1", "a thread reply belongs to its thread");
    assert_eq!(
        (events[2]["conversation"].as_str(), events[2]["text"].as_str()),
        (Some("C9"), Some("prod")),
        "{}",
        events[2]
    );
    assert!(events[2].to_string().contains("command=%2Fdeploy"), "form body kept as sent: {}", events[2]);
}

fn send(key: &str, conversation: &str, body: &str) -> SendRequest {
    SendRequest {
        idempotency_key: key.into(),
        channel: ChannelRef::new("slack", "ws"),
        conversation: conversation.into(),
        body: body.into(),
        reply_to: None,
    }
}

/// Sends `bodies` (conversation, text) concurrently, each started `stagger` after the previous
/// so the proxy receives them in this order; returns the results in the same order.
async fn burst(agent: &AgentClient, key: &str, bodies: &[(&str, String)], stagger: Duration) -> Vec<SendResult> {
    let sends = bodies.iter().enumerate().map(|(i, (conversation, text))| async move {
        tokio::time::sleep(stagger * i as u32).await;
        agent.send(send(&format!("{key}{i}"), conversation, text)).await.expect("send answered")
    });
    futures::future::join_all(sends).await
}

/// Texts and arrival instants of the fake's accepted calls to `channel`, in arrival order.
fn arrivals(calls: &[Call], channel: &str) -> Vec<(String, Instant)> {
    calls
        .iter()
        .filter(|c| c.args["channel"] == channel)
        .map(|c| (c.args["text"].as_str().unwrap_or_default().to_string(), c.at))
        .collect()
}

/// A burst into two channels with `chat_interval = "200ms"`: each channel's messages reach
/// Slack in the order the agent sent them and at least 200 ms apart, while the two channels
/// are paced independently (interleaved, not one queue).
#[tokio::test(flavor = "multi_thread")]
async fn sends_are_paced_per_channel_and_channels_interleave() {
    let fake = fake(Options::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let body = format!("{}{}", self_connecting_agent("a"), app_section(&fake.api_base, "chat_interval = \"200ms\""));
    let config = write_config(dir.path(), &Backend::Embedded, [0, 0, 0], &body);
    let proxy = Proxy::start(&config);
    let agent = proxy.connect("a").await;

    let order = ["a0", "b0", "a1", "b1", "a2", "b2", "a3", "a4", "a5"];
    let bodies: Vec<(&str, String)> =
        order.iter().map(|t| (if t.starts_with('a') { "C0AAA:1.1" } else { "C0BBB" }, t.to_string())).collect();
    let results = burst(&agent, "p", &bodies, Duration::from_millis(25)).await;
    assert!(results.iter().all(|r| matches!(r, SendResult::Ok { .. })), "{results:?}");

    let calls = fake.calls();
    assert_eq!(calls.len(), order.len(), "{calls:?}");
    let a = arrivals(&calls, "C0AAA");
    let b = arrivals(&calls, "C0BBB");
    let texts = |v: &[(String, Instant)]| v.iter().map(|(t, _)| t.clone()).collect::<Vec<_>>();
    assert_eq!(texts(&a), ["a0", "a1", "a2", "a3", "a4", "a5"], "channel A out of order");
    assert_eq!(texts(&b), ["b0", "b1", "b2"], "channel B out of order");
    for (name, seq) in [("A", &a), ("B", &b)] {
        for w in seq.windows(2) {
            let gap = w[1].1 - w[0].1;
            assert!(gap >= Duration::from_millis(190), "channel {name}: {} only {gap:?} after {}", w[1].0, w[0].0);
        }
    }
    // One shared queue would need 8 gaps of 200 ms (1.6 s); per channel, A's 5 gaps set the pace.
    let first = calls.iter().map(|c| c.at).min().unwrap();
    let last = calls.iter().map(|c| c.at).max().unwrap();
    assert!(last - first < Duration::from_millis(1400), "channels were serialized: {:?}", last - first);
    assert!(b.last().unwrap().1 < a.last().unwrap().1, "channel B waited behind channel A");
}

/// Replies land in their thread; a 429 is waited out inside the channel's turn, so the sends
/// queued behind it wait too and the order holds; a retried idempotency key sends nothing
/// again, and Slack's errors come back as clear codes.
#[tokio::test(flavor = "multi_thread")]
async fn sends_thread_wait_out_429_and_are_not_duplicated() {
    let rate = Rate { calls: 4, window: Duration::from_secs(1), retry_after: 1 };
    let fake = fake(Options { rate: Some(rate), ..Options::default() }).await;
    fake.forbid_channel("C0GONE", "channel_not_found");
    fake.forbid_channel("C0OUT", "not_in_channel");
    let dir = tempfile::tempdir().unwrap();
    // No per-channel spacing: only the app-wide rate (10/s) paces, so the fake's 4/s limit bites.
    let body = format!("{}{}", self_connecting_agent("a"), app_section(&fake.api_base, "chat_interval = \"0s\""));
    let config = write_config(dir.path(), &Backend::Embedded, [0, 0, 0], &body);
    let proxy = Proxy::start(&config);
    let agent = proxy.connect("a").await;

    const N: usize = 10;
    let bodies: Vec<(&str, String)> = (0..N).map(|i| ("C0CHAN:1700000000.000100", format!("reply {i}"))).collect();
    let results = burst(&agent, "r", &bodies, Duration::from_millis(20)).await;
    assert!(
        results.iter().all(|r| matches!(r, SendResult::Ok { platform_ids } if platform_ids.len() == 1)),
        "{results:?}"
    );
    let throttled = fake.throttled();
    assert!(!throttled.is_empty(), "the fake's 429 was exercised");
    let calls = fake.calls();
    assert_eq!(calls.len(), N);
    for (i, c) in calls.iter().enumerate() {
        assert_eq!(c.method, "chat.postMessage");
        assert_eq!(c.args["channel"], "C0CHAN");
        assert_eq!(c.args["thread_ts"], "1700000000.000100", "reply {i} not in its thread");
        assert_eq!(c.args["text"], format!("reply {i}"), "order lost around a 429");
    }
    // Retry-After: 1 holds the whole channel: nothing reaches Slack for it within the second.
    for t in &throttled {
        let early: Vec<_> = calls
            .iter()
            .chain(throttled.iter())
            .filter(|c| c.at > t.at && c.at - t.at < Duration::from_millis(950))
            .map(|c| c.args["text"].clone())
            .collect();
        assert!(early.is_empty(), "{early:?} sent during the Retry-After of {}", t.args["text"]);
    }
    for i in [0, 5, 9] {
        let again =
            agent.send(send(&format!("r{i}"), "C0CHAN:1700000000.000100", &format!("reply {i}"))).await.unwrap();
        assert_eq!(again, results[i], "reply {i} retried");
    }
    assert_eq!(fake.calls().len(), N, "a retried key sent again");

    let r = agent
        .send(send(
            "react",
            "C0CHAN:1700000000.000100",
            r#"{"method":"reactions.add","name":"eyes","timestamp":"1700000000.000100"}"#,
        ))
        .await
        .unwrap();
    assert_eq!(r, SendResult::Ok { platform_ids: vec![] });
    let r = agent.send(send("gone", "C0GONE:1.1", "hello")).await.unwrap();
    assert!(matches!(&r, SendResult::Err { code, retryable: false, .. } if code == "channel_not_found"), "{r:?}");
    let r = agent.send(send("out", "C0OUT", "hello")).await.unwrap();
    assert!(matches!(&r, SendResult::Err { code, retryable: false, .. } if code == "not_in_channel"), "{r:?}");
    let r = agent.send(send("evil", "C0CHAN", r#"{"method":"apps.uninstall"}"#)).await.unwrap();
    assert!(matches!(&r, SendResult::Err { code, retryable: false, .. } if code == "bad_request"), "{r:?}");
}
