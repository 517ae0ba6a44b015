//! Discord through real processes: the `concierge` binary holds a real WebSocket to the fake
//! gateway in `concierge-loadtest`, whose session log is what Discord sent; each test compares
//! that log with what the store holds. Every wait is bounded.

mod common;

use std::time::Duration;

use common::*;
use concierge_loadtest::discord::FakeDiscord;
use concierge_protocol::{ChannelRef, SendRequest, SendResult};
use serde_json::{Value, json};

const TOKEN: &str = "MTAwMA.fake-discord_token";

fn bot_section(fake: &FakeDiscord) -> String {
    format!(
        "[discord.bot]\nagent = \"a\"\ntoken = \"{TOKEN}\"\ngateway_url = \"{}\"\napi_base = \"{}\"\n",
        fake.gateway_url(),
        fake.api_base()
    )
}

/// The config of every test here: agent "a" (connecting itself) and the fake's bot.
fn config_for(fake: &FakeDiscord, dir: &std::path::Path, backend: &Backend) -> std::path::PathBuf {
    let body = format!("{}{}", self_connecting_agent("a"), bot_section(fake));
    write_config(dir, backend, [0, 0, 0], &body)
}

fn message(i: u64) -> Value {
    json!({
        "id": format!("{}", 2_000_000_000_000_000_000 + i),
        "channel_id": "3000",
        "guild_id": "4000",
        "author": {"id": "5000", "username": "user"},
        "content": format!("message {i}"),
        "timestamp": "2026-11-25T13:00:00.000000+00:00",
        "edited_timestamp": null,
        "type": 0,
    })
}

/// Waits for the fake's READY (or a resume) so dispatches have a session to go to.
async fn wait_session(fake: &FakeDiscord, proxy: &Proxy) {
    let ok = eventually(Duration::from_secs(20), || async { fake.session_id() }).await;
    assert!(ok.is_some(), "the proxy never identified; log:\n{}", proxy.log());
}

/// Dedupe keys of the stored Discord events, in offset order.
async fn stored_keys(proxy: &Proxy) -> Vec<String> {
    proxy
        .events("a")
        .await
        .iter()
        .map(|e| {
            assert_eq!(e["channel"]["kind"], "discord", "{e}");
            let raw: Value = serde_json::from_str(e["raw"]["text"].as_str().expect("raw is JSON text")).unwrap();
            assert_eq!(raw["op"], 0, "the raw dispatch payload is kept: {raw}");
            e["dedupe_key"].as_str().unwrap_or_default().to_string()
        })
        .collect()
}

fn key(i: u64) -> String {
    format!("dc:bot:msg:{}", 2_000_000_000_000_000_000 + i)
}

async fn wait_stored(proxy: &Proxy, n: usize, within: Duration) -> Vec<String> {
    let got = eventually(within, || async {
        let k = stored_keys(proxy).await;
        (k.len() >= n).then_some(k)
    })
    .await;
    match got {
        Some(k) => k,
        None => panic!("fewer than {n} events stored: {}; log:\n{}", stored_keys(proxy).await.len(), proxy.log()),
    }
}

/// Streams `n` messages starting at `from`, `every` apart.
fn stream(fake: std::sync::Arc<FakeDiscord>, from: u64, n: u64, every: Duration) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        for i in from..from + n {
            // A dispatch needs a live session; the test makes sure there is one.
            let _ = fake.dispatch("MESSAGE_CREATE", message(i));
            tokio::time::sleep(every).await;
        }
    })
}

/// Every kind of stored dispatch arrives once, in order, raw payload kept; a redelivered
/// message (same id, new sequence) is stored once.
#[tokio::test(flavor = "multi_thread")]
async fn dispatches_are_stored_once_in_order() {
    let fake = FakeDiscord::start(TOKEN, Duration::from_secs(1)).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let config = config_for(&fake, dir.path(), &Backend::Embedded);
    let proxy = Proxy::start(&config);
    wait_session(&fake, &proxy).await;

    for i in 0..20 {
        fake.dispatch("MESSAGE_CREATE", message(i));
    }
    fake.dispatch("MESSAGE_CREATE", message(3)); // redelivery
    fake.dispatch("TYPING_START", json!({"channel_id": "3000", "user_id": "5000"})); // not stored
    let mut edited = message(1);
    edited["content"] = json!("edited");
    edited["edited_timestamp"] = json!("2026-11-25T13:01:00.000000+00:00");
    fake.dispatch("MESSAGE_UPDATE", edited);
    fake.dispatch(
        "MESSAGE_REACTION_ADD",
        json!({"user_id": "5000", "channel_id": "3000", "message_id": "2000000000000000001", "guild_id": "4000", "emoji": {"id": null, "name": "👍"}}),
    );
    fake.dispatch("MESSAGE_DELETE", json!({"id": "2000000000000000002", "channel_id": "3000", "guild_id": "4000"}));
    fake.dispatch(
        "INTERACTION_CREATE",
        json!({"id": "6000", "application_id": "1000", "type": 2, "channel_id": "3000", "data": {"id": "7", "name": "ask"}, "user": {"id": "5000"}, "token": "tok", "version": 1}),
    );
    let keys = wait_stored(&proxy, 24, Duration::from_secs(20)).await;
    let expected: Vec<String> = (0..20).map(key).collect();
    assert_eq!(keys[..20], expected[..], "log:\n{}", proxy.log());
    assert!(keys[20].starts_with("dc:bot:upd:2000000000000000001:"), "{keys:?}");
    let tail = ["dc:bot:react+:2000000000000000001:5000:👍", "dc:bot:del:2000000000000000002", "dc:bot:int:6000"];
    assert_eq!(keys[21..], tail.map(String::from)[..]);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(stored_keys(&proxy).await.len(), 24, "nothing more stored");
    let events = proxy.events("a").await;
    assert_eq!(events[0]["conversation"], "3000");
    assert_eq!(events[0]["text"], "message 0");
    assert_eq!(fake.identifies(), 1);
}

/// No heartbeat ACK: the proxy declares the connection a zombie, reconnects and Resumes; the
/// fake replays what it missed; every dispatch is stored exactly once, in order.
#[tokio::test(flavor = "multi_thread")]
async fn zombie_connection_resumes_without_loss_or_duplicates() {
    let fake = std::sync::Arc::new(FakeDiscord::start(TOKEN, Duration::from_millis(300)).await.unwrap());
    let dir = tempfile::tempdir().unwrap();
    let config = config_for(&fake, dir.path(), &Backend::Embedded);
    let proxy = Proxy::start(&config);
    wait_session(&fake, &proxy).await;

    let pusher = stream(fake.clone(), 0, 300, Duration::from_millis(5));
    wait_stored(&proxy, 30, Duration::from_secs(20)).await;
    fake.set_zombie(true);
    let reconnected = eventually(Duration::from_secs(10), || async { (fake.connections() >= 2).then_some(()) }).await;
    assert!(reconnected.is_some(), "no reconnect after missing ACKs; log:\n{}", proxy.log());
    fake.set_zombie(false);
    pusher.await.unwrap();
    let keys = wait_stored(&proxy, 300, Duration::from_secs(30)).await;
    assert_eq!(keys, (0..300).map(key).collect::<Vec<_>>(), "log:\n{}", proxy.log());
    assert!(!fake.resumes().is_empty(), "the proxy resumed");
    assert_eq!(fake.identifies(), 1, "resumed, never re-identified; log:\n{}", proxy.log());
    assert!(proxy.log().contains("zombie"), "the zombie is logged");
}

/// SIGKILL mid-stream: the restarted proxy Resumes the same session from the persisted
/// sequence, the fake replays, and every dispatch it sent is stored exactly once.
#[tokio::test(flavor = "multi_thread")]
async fn sigkill_restart_resumes_the_persisted_session() {
    let fake = std::sync::Arc::new(FakeDiscord::start(TOKEN, Duration::from_secs(1)).await.unwrap());
    let dir = tempfile::tempdir().unwrap();
    let config = config_for(&fake, dir.path(), &Backend::Embedded);
    let mut proxy = Proxy::start(&config);
    wait_session(&fake, &proxy).await;
    let session = fake.session_id();

    let pusher = stream(fake.clone(), 0, 400, Duration::from_millis(4));
    wait_stored(&proxy, 50, Duration::from_secs(20)).await;
    proxy.kill9();
    assert!(!pusher.is_finished(), "the kill happened after the stream ended; the test proves nothing");
    let proxy = Proxy::start(&config);
    pusher.await.unwrap();
    let keys = wait_stored(&proxy, 400, Duration::from_secs(40)).await;
    assert_eq!(keys, (0..400).map(key).collect::<Vec<_>>(), "log:\n{}", proxy.log());
    assert_eq!(fake.identifies(), 1, "the restart resumed instead of identifying; log:\n{}", proxy.log());
    let resumes = fake.resumes();
    assert!(resumes.iter().any(|(id, seq)| Some(id) == session.as_ref() && *seq > 1), "{resumes:?}");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(stored_keys(&proxy).await.len(), 400, "nothing stored twice");
}

/// Op 9 Invalid Session (not resumable): the proxy identifies afresh, says so in the log, and
/// stores what the new session sends.
#[tokio::test(flavor = "multi_thread")]
async fn invalid_session_reidentifies() {
    let fake = FakeDiscord::start(TOKEN, Duration::from_secs(1)).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let config = config_for(&fake, dir.path(), &Backend::Embedded);
    let proxy = Proxy::start(&config);
    wait_session(&fake, &proxy).await;
    fake.dispatch("MESSAGE_CREATE", message(0));
    wait_stored(&proxy, 1, Duration::from_secs(10)).await;
    fake.invalidate(false);
    let again = eventually(Duration::from_secs(15), || async {
        (fake.identifies() >= 2 && fake.session_id().is_some()).then_some(())
    })
    .await;
    assert!(again.is_some(), "no fresh Identify; log:\n{}", proxy.log());
    fake.dispatch("MESSAGE_CREATE", message(1));
    let keys = wait_stored(&proxy, 2, Duration::from_secs(10)).await;
    assert_eq!(keys, vec![key(0), key(1)]);
    assert!(proxy.log().contains("identifying afresh"), "log:\n{}", proxy.log());
}

/// Sends: a reply carries `message_reference`, edits and reactions go through, a 429 is waited
/// out, and a retried idempotency key sends nothing twice.
#[tokio::test(flavor = "multi_thread")]
async fn sends_reply_edit_react_and_wait_out_429() {
    let fake = FakeDiscord::start(TOKEN, Duration::from_secs(1)).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let config = config_for(&fake, dir.path(), &Backend::Embedded);
    let proxy = Proxy::start(&config);
    let agent = proxy.connect("a").await;
    let req = |k: &str, body: &str| SendRequest {
        idempotency_key: k.into(),
        channel: ChannelRef::new("discord", "bot"),
        conversation: "3000".into(),
        body: body.into(),
        reply_to: None,
    };
    let r = agent.send(req("plain", "hello")).await.unwrap();
    let SendResult::Ok { platform_ids } = r else { panic!("{r:?}") };
    assert_eq!(platform_ids.len(), 1);
    let r = agent.send(req("reply", r#"{"content":"re","reply_to_message_id":"2000000000000000001"}"#)).await.unwrap();
    assert!(matches!(r, SendResult::Ok { .. }), "{r:?}");
    fake.rate_limit_next(2, 0.4);
    let started = std::time::Instant::now();
    let r = agent
        .send(req("edit", &format!(r#"{{"edit_message_id":"{}","content":"edited"}}"#, platform_ids[0])))
        .await
        .unwrap();
    assert!(matches!(r, SendResult::Ok { .. }), "{r:?}");
    assert!(
        started.elapsed() >= Duration::from_millis(800),
        "two 429s of 0.4 s were waited out: {:?}",
        started.elapsed()
    );
    let r = agent.send(req("react", r#"{"react_message_id":"2000000000000000001","emoji":"👍"}"#)).await.unwrap();
    assert!(matches!(r, SendResult::Ok { .. }), "{r:?}");
    let again =
        agent.send(req("reply", r#"{"content":"re","reply_to_message_id":"2000000000000000001"}"#)).await.unwrap();
    assert!(matches!(again, SendResult::Ok { .. }), "{again:?}");
    let bad = agent.send(req("empty", r#"{"content":""}"#)).await.unwrap();
    assert!(matches!(&bad, SendResult::Err { code, .. } if code == "bad_request"), "{bad:?}");

    let sent = fake.sent();
    assert_eq!(sent.len(), 4, "{sent:?}");
    assert_eq!(sent[0].body["content"], "hello");
    assert_eq!(sent[1].body["message_reference"]["message_id"], "2000000000000000001");
    assert_eq!((sent[2].method.as_str(), sent[2].message_id.as_str()), ("PATCH", platform_ids[0].as_str()));
    assert_eq!((sent[3].method.as_str(), sent[3].body["emoji"].as_str()), ("PUT", Some("👍")));
    assert_eq!(fake.limited().len(), 2);
}

/// Op 7 Reconnect mid-stream: the proxy reconnects and Resumes; nothing lost or duplicated.
#[tokio::test(flavor = "multi_thread")]
async fn reconnect_request_resumes_without_loss_or_duplicates() {
    let fake = std::sync::Arc::new(FakeDiscord::start(TOKEN, Duration::from_secs(1)).await.unwrap());
    let dir = tempfile::tempdir().unwrap();
    let config = config_for(&fake, dir.path(), &Backend::Embedded);
    let proxy = Proxy::start(&config);
    wait_session(&fake, &proxy).await;
    let pusher = stream(fake.clone(), 0, 200, Duration::from_millis(5));
    wait_stored(&proxy, 30, Duration::from_secs(20)).await;
    fake.reconnect();
    pusher.await.unwrap();
    let keys = wait_stored(&proxy, 200, Duration::from_secs(30)).await;
    assert_eq!(keys, (0..200).map(key).collect::<Vec<_>>(), "log:\n{}", proxy.log());
    assert_eq!(fake.resumes().len(), 1, "one Resume after op 7; log:\n{}", proxy.log());
    assert_eq!(fake.identifies(), 1);
}

/// SIGKILL while idle: the session and sequence were persisted without further traffic, so the
/// restart Resumes and gets what was dispatched while the proxy was down.
#[tokio::test(flavor = "multi_thread")]
async fn sigkill_while_idle_resumes_and_gets_what_was_missed() {
    let fake = FakeDiscord::start(TOKEN, Duration::from_secs(1)).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let config = config_for(&fake, dir.path(), &Backend::Embedded);
    let mut proxy = Proxy::start(&config);
    wait_session(&fake, &proxy).await;
    for i in 0..5 {
        fake.dispatch("MESSAGE_CREATE", message(i));
    }
    wait_stored(&proxy, 5, Duration::from_secs(10)).await;
    tokio::time::sleep(Duration::from_millis(600)).await;
    proxy.kill9();
    for i in 5..10 {
        fake.dispatch("MESSAGE_CREATE", message(i));
    }
    let proxy = Proxy::start(&config);
    let keys = wait_stored(&proxy, 10, Duration::from_secs(20)).await;
    assert_eq!(keys, (0..10).map(key).collect::<Vec<_>>(), "log:\n{}", proxy.log());
    assert_eq!(fake.identifies(), 1, "resumed after the restart; log:\n{}", proxy.log());
    assert_eq!(
        fake.resumes().last().map(|r| r.1),
        Some(6),
        "resumed from the last stored sequence (READY=1, 5 messages)"
    );
}

/// Promise 1 with the store failing mid-stream: a dispatch that cannot be stored makes the
/// proxy reconnect and Resume from the last stored sequence, so once Redis is back every
/// dispatch is stored exactly once, in order.
#[tokio::test(flavor = "multi_thread")]
async fn store_outage_resumes_from_the_last_stored_sequence() {
    let mut redis = Redis::start();
    let fake = std::sync::Arc::new(FakeDiscord::start(TOKEN, Duration::from_secs(1)).await.unwrap());
    let dir = tempfile::tempdir().unwrap();
    let config = config_for(&fake, dir.path(), &Backend::Redis(redis.url()));
    let proxy = Proxy::start(&config);
    wait_session(&fake, &proxy).await;
    let pusher = stream(fake.clone(), 0, 150, Duration::from_millis(10));
    wait_stored(&proxy, 20, Duration::from_secs(20)).await;
    redis.kill9();
    assert!(!pusher.is_finished(), "the outage began after the stream ended; the test proves nothing");
    tokio::time::sleep(Duration::from_secs(2)).await;
    redis.restart();
    pusher.await.unwrap();
    let keys = wait_stored(&proxy, 150, Duration::from_secs(60)).await;
    assert_eq!(keys, (0..150).map(key).collect::<Vec<_>>(), "log:\n{}", proxy.log());
    assert!(!fake.resumes().is_empty(), "resumed after the outage; log:\n{}", proxy.log());
    assert_eq!(fake.identifies(), 1, "the session survived the outage");
    assert!(proxy.log().contains("event not stored"), "the outage reached the adapter; log:\n{}", proxy.log());
}

/// The held connection `discord/bot` as `/api/channels` shows it.
async fn channel_info(proxy: &Proxy) -> Value {
    let r = http_client().get(format!("http://{}/api/channels", proxy.admin)).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let v: Value = r.json().await.unwrap();
    let all = v["connections"].as_array().cloned().unwrap_or_default();
    all.into_iter().find(|c| c["channel"] == "discord" && c["name"] == "bot").unwrap_or(Value::Null)
}

fn send_req(k: &str, channel: &str, body: &str) -> SendRequest {
    SendRequest {
        idempotency_key: k.into(),
        channel: ChannelRef::new("discord", "bot"),
        conversation: channel.into(),
        body: body.into(),
        reply_to: None,
    }
}

/// Rate limit buckets from the headers: 8 sends into a bucket of 3 per 300 ms arrive once
/// each, in order, with the limiter waiting on `Remaining: 0` (at most one 429 seen by the
/// fake), while sends to another channel (another major parameter) are not held back.
#[tokio::test(flavor = "multi_thread")]
async fn sends_wait_for_their_bucket_without_blocking_other_channels() {
    let fake = FakeDiscord::start(TOKEN, Duration::from_secs(1)).await.unwrap();
    fake.set_bucket(3, Duration::from_millis(300));
    let dir = tempfile::tempdir().unwrap();
    let config = config_for(&fake, dir.path(), &Backend::Embedded);
    let proxy = Proxy::start(&config);
    let agent = proxy.connect("a").await;
    let started = std::time::Instant::now();
    let busy = async {
        for i in 0..8 {
            let r = agent.send(send_req(&format!("a{i}"), "3000", &format!("busy {i}"))).await.unwrap();
            assert!(matches!(r, SendResult::Ok { .. }), "send {i}: {r:?}; log:\n{}", proxy.log());
        }
    };
    let other = async {
        // Start once channel 3000 has used up its first window.
        tokio::time::sleep(Duration::from_millis(120)).await;
        let t = std::time::Instant::now();
        for i in 0..2 {
            let r = agent.send(send_req(&format!("b{i}"), "3001", &format!("other {i}"))).await.unwrap();
            assert!(matches!(r, SendResult::Ok { .. }), "{r:?}");
        }
        t.elapsed()
    };
    let ((), other_took) = tokio::join!(busy, other);
    let total = started.elapsed();

    let sent = fake.sent();
    let busy: Vec<_> = sent.iter().filter(|s| s.channel_id == "3000").collect();
    let contents: Vec<&str> = busy.iter().map(|s| s.body["content"].as_str().unwrap_or("")).collect();
    assert_eq!(contents, (0..8).map(|i| format!("busy {i}")).collect::<Vec<_>>(), "once each, in order");
    assert!(total >= Duration::from_millis(600), "8 sends at 3 per 300 ms take two waits: {total:?}");
    assert!(fake.limited().len() <= 1, "the limiter waited instead of collecting 429s: {:?}", fake.limited());
    // The 4th send waited for the window instead of going (and bouncing) at once.
    assert!(busy[3].at - busy[2].at >= Duration::from_millis(150), "{:?}", busy[3].at - busy[2].at);
    let others: Vec<_> = sent.iter().filter(|s| s.channel_id == "3001").collect();
    assert_eq!(others.len(), 2);
    // Channel 3001 went while 3000 waited for its second window (which opens at >= 300 ms).
    assert!(others[0].at < busy[3].at, "channel 3001 waited for 3000's bucket ({other_took:?})");
    assert!(others[1].at < busy[6].at, "channel 3001 was done while 3000 still waited ({other_took:?})");

    // A global 429 holds back every route of the bot, not just the one that got it.
    fake.rate_limit_global_next(0.5);
    let first = agent.send(send_req("g0", "3002", "global 0"));
    let second = async {
        tokio::time::sleep(Duration::from_millis(100)).await;
        agent.send(send_req("g1", "3003", "global 1")).await
    };
    let (r0, r1) = tokio::join!(first, second);
    assert!(matches!(r0.unwrap(), SendResult::Ok { .. }) && matches!(r1.unwrap(), SendResult::Ok { .. }));
    let limited_at = *fake.limited().last().expect("the global 429 was answered");
    let sent = fake.sent();
    let other = sent.iter().find(|s| s.channel_id == "3003").expect("sent to 3003");
    assert!(
        other.at - limited_at >= Duration::from_millis(400),
        "channel 3003 waited out the global limit: {:?}",
        other.at - limited_at
    );
}

/// The daily session-start budget of `GET /gateway/bot` is on `/api/channels` and counts
/// down with each Identify, matching what the fake has left.
#[tokio::test(flavor = "multi_thread")]
async fn identify_budget_is_reported_and_counts_down() {
    let fake = FakeDiscord::start(TOKEN, Duration::from_secs(1)).await.unwrap();
    fake.set_session_budget(1000, 40, Duration::from_secs(3600), 1);
    let dir = tempfile::tempdir().unwrap();
    let config = config_for(&fake, dir.path(), &Backend::Embedded);
    let proxy = Proxy::start(&config);
    wait_session(&fake, &proxy).await;
    let remaining = |c: &Value| c["details"]["identify_remaining"].as_u64();
    let c = eventually(Duration::from_secs(10), || async {
        let c = channel_info(&proxy).await;
        (remaining(&c) == Some(39)).then_some(c)
    })
    .await
    .unwrap_or_else(|| panic!("{}", channel_info_now(&fake)));
    assert_eq!(fake.session_starts_remaining(), 39);
    assert_eq!(c["details"]["identify_total"], 1000);
    assert_eq!(c["details"]["identify_max_concurrency"], 1);
    let reset = c["details"]["identify_reset_at_ms"].as_u64().unwrap();
    let in_an_hour = concierge_protocol::now_ms() + 3_600_000;
    assert!(reset.abs_diff(in_an_hour) < 60_000, "reset {reset} vs {in_an_hour}");

    fake.invalidate(false);
    let again = eventually(Duration::from_secs(20), || async {
        (remaining(&channel_info(&proxy).await) == Some(38)).then_some(())
    })
    .await;
    assert!(again.is_some(), "{}; log:\n{}", channel_info(&proxy).await, proxy.log());
    assert_eq!((fake.session_starts_remaining(), fake.identifies()), (38, 2));
}

fn channel_info_now(fake: &FakeDiscord) -> String {
    format!("the budget never showed; fake has {} left", fake.session_starts_remaining())
}

/// With no session start left the gateway does not connect or Identify; the channel state
/// says why and when the budget resets; once it has, the bot identifies.
#[tokio::test(flavor = "multi_thread")]
async fn exhausted_identify_budget_is_waited_out_and_explained() {
    let fake = FakeDiscord::start(TOKEN, Duration::from_secs(1)).await.unwrap();
    fake.set_session_budget(1000, 0, Duration::from_secs(3), 1);
    let dir = tempfile::tempdir().unwrap();
    let config = config_for(&fake, dir.path(), &Backend::Embedded);
    let proxy = Proxy::start(&config);
    let c = eventually(Duration::from_secs(10), || async {
        let c = channel_info(&proxy).await;
        (c["state"] == "identify_budget_exhausted").then_some(c)
    })
    .await;
    let c = c.unwrap_or_else(|| panic!("state never said so; log:\n{}", proxy.log()));
    let why = c["last_error"].as_str().unwrap_or_default();
    assert!(why.contains("budget exhausted") && why.contains("resets at 20"), "{why}");
    assert_eq!(c["details"]["identify_remaining"], 0);
    assert_eq!((fake.identifies(), fake.connections(), fake.refused_identifies()), (0, 0, 0));
    // After the reset the budget refills (1000) and the bot identifies once.
    wait_session(&fake, &proxy).await;
    assert_eq!((fake.identifies(), fake.refused_identifies()), (1, 0));
    let c = eventually(Duration::from_secs(10), || async {
        let c = channel_info(&proxy).await;
        (c["state"] == "connected").then_some(c)
    })
    .await
    .unwrap_or_else(|| panic!("not connected; log:\n{}", proxy.log()));
    assert_eq!(c["details"]["identify_remaining"], 999);
}
