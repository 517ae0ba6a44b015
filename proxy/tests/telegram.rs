//! Telegram through real processes: the `concierge` binary long-polls (or receives webhooks
//! from) the fake Bot API in `concierge-loadtest`, which records what Telegram would consider
//! confirmed, so each test compares "what the platform thinks we confirmed" with "what the
//! store holds". Every wait is bounded.

mod common;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use common::*;
use concierge_loadtest::telegram::{FakeTelegram, Limits, Options};
use concierge_protocol::{ChannelRef, SendRequest, SendResult};
use serde_json::Value;

const BOT_TOKEN: &str = "123456:TEST-token_abc";

fn bot_section(name: &str, agent: &str, api_base: &str, extra: &str) -> String {
    format!(
        "[telegram.{name}]\nagent = \"{agent}\"\ntoken = \"{BOT_TOKEN}\"\napi_base = \"{api_base}\"\npoll_timeout = \"1s\"\n{extra}\n"
    )
}

/// Update ids of the stored events of `agent`, in offset order.
async fn stored_update_ids(proxy: &Proxy, agent: &str) -> Vec<i64> {
    proxy
        .events(agent)
        .await
        .iter()
        .map(|e| {
            assert_eq!(e["channel"]["kind"], "telegram", "{e}");
            let raw: Value = serde_json::from_str(e["raw"]["text"].as_str().expect("raw is JSON text")).unwrap();
            let id = raw["update_id"].as_i64().expect("raw keeps update_id");
            assert_eq!(e["dedupe_key"], format!("tg:123456:{id}"), "{e}");
            id
        })
        .collect()
}

/// Pushes `n` messages to the fake, `every` apart, returning their update ids.
fn push_stream(fake: &FakeTelegram, n: usize, every: Duration) -> tokio::task::JoinHandle<Vec<i64>> {
    let fake = fake.clone();
    tokio::spawn(async move {
        let mut ids = Vec::with_capacity(n);
        for i in 0..n {
            ids.push(fake.push_message(BOT_TOKEN, 777, 42, &format!("message {i}")));
            tokio::time::sleep(every).await;
        }
        ids
    })
}

async fn wait_confirmed(fake: &FakeTelegram, at_least: usize, within: Duration, proxy: &Proxy) {
    let ok = eventually(within, || async { (fake.confirmed(BOT_TOKEN).len() >= at_least).then_some(()) }).await;
    assert!(
        ok.is_some(),
        "fewer than {at_least} updates confirmed: {:?}; log:\n{}",
        fake.confirmed(BOT_TOKEN),
        proxy.log()
    );
}

async fn wait_all_confirmed(fake: &FakeTelegram, within: Duration, proxy: &Proxy) {
    let ok = eventually(within, || async { fake.pending(BOT_TOKEN).is_empty().then_some(()) }).await;
    assert!(ok.is_some(), "updates never confirmed: {:?}; log:\n{}", fake.pending(BOT_TOKEN), proxy.log());
}

/// Promise 1 with the store failing mid-stream: while Redis is down the offset does not move
/// (Telegram keeps the updates), and once it is back every update is stored exactly once.
#[tokio::test(flavor = "multi_thread")]
async fn offset_is_not_advanced_while_the_store_is_down() {
    let mut redis = Redis::start();
    let fake = FakeTelegram::start(Options { id_gaps: true, ..Options::default() }).await.unwrap();
    fake.add_bot(BOT_TOKEN);
    let dir = tempfile::tempdir().unwrap();
    let body = format!("{}{}", self_connecting_agent("a"), bot_section("bot", "a", &fake.api_base, ""));
    let config = write_config(dir.path(), &Backend::Redis(redis.url()), [0, 0, 0], &body);
    let proxy = Proxy::start(&config);

    let pusher = push_stream(&fake, 150, Duration::from_millis(10));
    wait_confirmed(&fake, 20, Duration::from_secs(20), &proxy).await;
    redis.kill9();
    // A batch fully stored just before the kill may still be confirmed; after that, nothing.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let confirmed_down = fake.confirmed(BOT_TOKEN);
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(fake.confirmed(BOT_TOKEN), confirmed_down, "updates were confirmed while the store was down");
    let pending = fake.pending(BOT_TOKEN);
    assert!(!pending.is_empty(), "updates pushed during the outage wait at Telegram");
    let last_offset = fake.last_offset(BOT_TOKEN).unwrap_or(0);
    assert!(last_offset <= pending[0], "offset {last_offset} moved past unstored update {}", pending[0]);

    redis.restart();
    let pushed = pusher.await.unwrap();
    wait_all_confirmed(&fake, Duration::from_secs(90), &proxy).await;
    let stored = stored_update_ids(&proxy, "a").await;
    assert_eq!(stored, pushed, "every update stored once, in order (log:\n{})", proxy.log());
    let confirmed: Vec<i64> = fake.confirmed(BOT_TOKEN);
    assert_eq!(confirmed, pushed, "the fake confirmed exactly what was pushed");
}

/// SIGKILL during a stream: after the restart everything the fake considers confirmed is in
/// the store, and nothing is stored twice.
#[tokio::test(flavor = "multi_thread")]
async fn sigkill_during_a_stream_loses_no_confirmed_update() {
    let fake = FakeTelegram::start(Options { id_gaps: true, ..Options::default() }).await.unwrap();
    fake.add_bot(BOT_TOKEN);
    let dir = tempfile::tempdir().unwrap();
    let body = format!("{}{}", self_connecting_agent("a"), bot_section("bot", "a", &fake.api_base, ""));
    let config = write_config(dir.path(), &Backend::Embedded, [0, 0, 0], &body);
    let mut proxy = Proxy::start(&config);

    let pusher = push_stream(&fake, 500, Duration::from_millis(4));
    wait_confirmed(&fake, 50, Duration::from_secs(20), &proxy).await;
    proxy.kill9();
    let confirmed_at_kill: BTreeSet<i64> = fake.confirmed(BOT_TOKEN).into_iter().collect();
    assert!(!pusher.is_finished(), "the kill happened after the stream ended; the test proves nothing");

    let proxy = Proxy::start(&config);
    let pushed = pusher.await.unwrap();
    wait_all_confirmed(&fake, Duration::from_secs(60), &proxy).await;
    let stored = stored_update_ids(&proxy, "a").await;
    let stored_set: BTreeSet<i64> = stored.iter().copied().collect();
    assert_eq!(stored_set.len(), stored.len(), "an update was stored twice: {stored:?}");
    assert!(confirmed_at_kill.is_subset(&stored_set), "confirmed before the kill but not stored");
    assert_eq!(stored, pushed, "all updates stored once, in order");
}

/// Webhook mode: Concierge calls setWebhook itself; deliveries with a wrong or missing secret
/// token are refused and store nothing; good ones are stored before the 200.
#[tokio::test(flavor = "multi_thread")]
async fn webhook_mode_checks_the_secret_token() {
    let fake = FakeTelegram::start(Options::default()).await.unwrap();
    fake.add_bot(BOT_TOKEN);
    let dir = tempfile::tempdir().unwrap();
    let ports = fixed_ports();
    let extra = format!(
        "mode = \"webhook\"\nwebhook_secret = \"s3cret-Token_1\"\nset_webhook = true\npublic_url = \"http://127.0.0.1:{}\"\nallowed_updates = [\"message\", \"callback_query\"]",
        ports[1]
    );
    let body = format!("{}{}", self_connecting_agent("a"), bot_section("hook", "a", &fake.api_base, &extra));
    let config = write_config(dir.path(), &Backend::Embedded, ports, &body);
    let proxy = Proxy::start(&config);

    let webhook = eventually(Duration::from_secs(10), || async { fake.webhook(BOT_TOKEN) }).await;
    let (url, secret) = webhook.unwrap_or_else(|| panic!("setWebhook never called; log:\n{}", proxy.log()));
    assert_eq!(url, format!("http://127.0.0.1:{}/telegram/hook", ports[1]));
    assert_eq!(secret, "s3cret-Token_1");
    assert_eq!(fake.allowed_updates(BOT_TOKEN), Some(serde_json::json!(["message", "callback_query"])));

    let http = http_client();
    let update = r#"{"update_id":5,"message":{"message_id":1,"chat":{"id":9,"type":"private"},"text":"forged"}}"#;
    for headers in [vec![("X-Telegram-Bot-Api-Secret-Token", "wrong")], vec![]] {
        let mut req = http.post(&url).header("content-type", "application/json").body(update);
        for (k, v) in headers {
            req = req.header(k, v);
        }
        let r = req.send().await.unwrap();
        assert_eq!(r.status().as_u16(), 401);
        let json: Value = r.json().await.unwrap();
        assert!(json["error"].as_str().unwrap().contains("Secret-Token"), "{json}");
    }
    assert!(proxy.events("a").await.is_empty(), "a refused delivery stored something");

    let ids: Vec<i64> = (0..5).map(|i| fake.push_message(BOT_TOKEN, 9, 9, &format!("hi {i}"))).collect();
    let statuses = fake.deliver_webhooks(BOT_TOKEN).await;
    assert_eq!(statuses, vec![200; 5], "log:\n{}", proxy.log());
    assert_eq!(fake.confirmed(BOT_TOKEN), ids);
    assert_eq!(stored_update_ids(&proxy, "a").await, ids);
    let events = proxy.events("a").await;
    assert_eq!(events[0]["conversation"], "9");
    assert_eq!(events[0]["text"], "hi 0");
}

/// A second poller on the same token makes Telegram answer 409: it is reported in the log and
/// backed off, not retried in a hot loop.
#[tokio::test(flavor = "multi_thread")]
async fn conflict_is_reported_and_backed_off() {
    let fake = FakeTelegram::start(Options::default()).await.unwrap();
    fake.add_bot(BOT_TOKEN);
    let dir = tempfile::tempdir().unwrap();
    let body = format!("{}{}", self_connecting_agent("a"), bot_section("bot", "a", &fake.api_base, ""));
    let config = write_config(dir.path(), &Backend::Embedded, [0, 0, 0], &body);
    let proxy = Proxy::start(&config);
    let ok = eventually(Duration::from_secs(10), || async { (fake.polls(BOT_TOKEN) >= 1).then_some(()) }).await;
    assert!(ok.is_some(), "the proxy never polled; log:\n{}", proxy.log());

    // A rival poller: each of its long polls terminates the proxy's pending one with 409.
    let http = http_client();
    let url = format!("{}/bot{BOT_TOKEN}/getUpdates", fake.api_base);
    let started = Instant::now();
    let mut rival_polls = 0;
    while started.elapsed() < Duration::from_secs(4) {
        let _ = http.post(&url).json(&serde_json::json!({"timeout": 1})).send().await;
        rival_polls += 1;
    }
    let log = proxy.log();
    assert!(log.contains("409 Conflict"), "the conflict is reported; log:\n{log}");
    let proxy_polls = fake.polls(BOT_TOKEN) - rival_polls;
    assert!(proxy_polls <= 4, "the proxy polled {proxy_polls} times in 4 s of conflict: a hot loop");
}

/// The admin API's entry for held connection `channel`/`name` (`GET /api/channels`).
async fn connection(proxy: &Proxy, channel: &str, name: &str) -> Option<Value> {
    let r = http_client().get(format!("http://{}/api/channels", proxy.admin)).send().await.ok()?;
    let json: Value = r.json().await.ok()?;
    json["connections"].as_array()?.iter().find(|c| c["channel"] == channel && c["name"] == name).cloned()
}

/// Waits until `telegram/bot` is in `state` (bounded), returning its entry.
async fn wait_connection_state(proxy: &Proxy, state: &str, within: Duration) -> Value {
    let found =
        eventually(within, || async { connection(proxy, "telegram", "bot").await.filter(|c| c["state"] == state) })
            .await;
    match found {
        Some(c) => c,
        None => panic!(
            "telegram/bot never {state}: {:?}; log:\n{}",
            connection(proxy, "telegram", "bot").await,
            proxy.log()
        ),
    }
}

/// A 409 (a rival poller) shows on the admin API as the bot's `conflict` state with
/// Telegram's error text, and once the rival is gone the poller is back to `polling`.
#[tokio::test(flavor = "multi_thread")]
async fn conflict_is_shown_on_the_admin_api_until_it_clears() {
    let fake = FakeTelegram::start(Options::default()).await.unwrap();
    fake.add_bot(BOT_TOKEN);
    let dir = tempfile::tempdir().unwrap();
    let body = format!("{}{}", self_connecting_agent("a"), bot_section("bot", "a", &fake.api_base, ""));
    let config = write_config(dir.path(), &Backend::Embedded, [0, 0, 0], &body);
    let proxy = Proxy::start(&config);
    wait_connection_state(&proxy, "polling", Duration::from_secs(10)).await;

    // A rival poller terminates the proxy's pending long poll with 409 until it stops.
    let rival = {
        let url = format!("{}/bot{BOT_TOKEN}/getUpdates", fake.api_base);
        tokio::spawn(async move {
            let http = http_client();
            let started = Instant::now();
            while started.elapsed() < Duration::from_secs(3) {
                let _ = http.post(&url).json(&serde_json::json!({"timeout": 1})).send().await;
            }
        })
    };
    let conflict = wait_connection_state(&proxy, "conflict", Duration::from_secs(10)).await;
    let error = conflict["last_error"].as_str().unwrap_or_default();
    assert!(error.contains("409") && error.contains("terminated by other getUpdates request"), "{conflict}");
    rival.await.unwrap();

    // The poller retries a conflict every 30 s; the next try finds no rival.
    wait_connection_state(&proxy, "polling", Duration::from_secs(45)).await;
    assert!(proxy.log().contains("409 Conflict"), "the conflict is logged too");
}

fn reply(chat: &str, i: usize) -> SendRequest {
    SendRequest {
        idempotency_key: format!("reply-{chat}-{i}"),
        channel: ChannelRef::new("telegram", "bot"),
        conversation: chat.into(),
        body: format!("reply {i}"),
        reply_to: None,
    }
}

/// 100 rapid replies to one chat: paced (and 429 `retry_after` honoured), all delivered, none
/// twice (idempotency keys), in order; and a burst of 100 concurrent ones queued, not dropped.
#[tokio::test(flavor = "multi_thread")]
async fn hundred_rapid_replies_are_paced_in_order_and_once() {
    const N: usize = 100;
    const INTERVAL: Duration = Duration::from_millis(30);
    let limits = Limits { per_chat: 25, per_bot: 1000, window: Duration::from_secs(1), retry_after: 1 };
    let fake = FakeTelegram::start(Options { limits: Some(limits), ..Options::default() }).await.unwrap();
    fake.add_bot(BOT_TOKEN);
    let dir = tempfile::tempdir().unwrap();
    let body = format!(
        "{}{}",
        self_connecting_agent("a"),
        bot_section("bot", "a", &fake.api_base, "chat_interval = \"30ms\"\nbot_rate = 30")
    );
    let config = write_config(dir.path(), &Backend::Embedded, [0, 0, 0], &body);
    let proxy = Proxy::start(&config);
    let agent = proxy.connect("a").await;

    // Phase 1, order kept: the agent fires each reply the moment the previous one returns,
    // far faster than the chat may receive them; the proxy spaces them.
    let started = Instant::now();
    let mut results = Vec::with_capacity(N);
    for i in 0..N {
        results.push(agent.send(reply("555", i)).await.unwrap());
    }
    let took = started.elapsed();
    for (i, r) in results.iter().enumerate() {
        assert!(matches!(r, SendResult::Ok { platform_ids } if platform_ids.len() == 1), "reply {i}: {r:?}");
    }
    let sent = fake.sent(BOT_TOKEN);
    let texts: Vec<&str> = sent.iter().map(|s| s.text.as_deref().unwrap_or("")).collect();
    let want: Vec<String> = (0..N).map(|i| format!("reply {i}")).collect();
    assert_eq!(texts, want, "all delivered once, in order");
    assert!(sent.iter().all(|s| s.chat_id == "555" && s.method == "sendMessage"));
    let min_gap = sent.windows(2).map(|w| w[1].at.duration_since(w[0].at)).min().unwrap();
    assert!(min_gap >= INTERVAL - Duration::from_millis(2), "two messages {min_gap:?} apart");
    assert!(fake.rate_limited(BOT_TOKEN) > 0, "the fake's 429 was exercised");
    assert!(took >= INTERVAL * (N as u32 - 1), "100 replies took only {took:?}");
    eprintln!("{N} ordered replies in {took:?}, min gap {min_gap:?}, {} answered 429", fake.rate_limited(BOT_TOKEN));

    // Retries with the same keys return the recorded results and send nothing.
    for i in [0, 50, 99] {
        let again = agent.send(reply("555", i)).await.unwrap();
        assert_eq!(again, results[i], "reply {i} retried");
    }
    assert_eq!(fake.sent(BOT_TOKEN).len(), N, "a retried key sent again");

    // Phase 2, a burst: 100 replies to another chat all at once. They queue in the proxy
    // (slowed, not dropped) and each is delivered exactly once. Sends on independent streams
    // have no order among themselves, so only the set is compared.
    let started = Instant::now();
    let burst = futures::future::join_all((0..N).map(|i| agent.send(reply("556", i)))).await;
    let took = started.elapsed();
    assert!(burst.iter().all(|r| matches!(r, Ok(SendResult::Ok { .. }))), "{burst:?}");
    let sent: Vec<_> = fake.sent(BOT_TOKEN).into_iter().filter(|s| s.chat_id == "556").collect();
    let mut texts: Vec<String> = sent.iter().filter_map(|s| s.text.clone()).collect();
    texts.sort_by_key(|t| t.trim_start_matches("reply ").parse::<usize>().unwrap_or(usize::MAX));
    assert_eq!(texts, want, "every burst reply delivered exactly once");
    let min_gap = sent.windows(2).map(|w| w[1].at.duration_since(w[0].at)).min().unwrap();
    assert!(min_gap >= INTERVAL - Duration::from_millis(2), "two burst messages {min_gap:?} apart");
    assert!(took >= INTERVAL * (N as u32 - 1), "the burst took only {took:?}");
    eprintln!("{N} burst replies in {took:?}, min gap {min_gap:?}");

    // Structured sends: a chat action and an edit go through; a forbidden method does not.
    let structured = |key: &str, body: &str| SendRequest {
        idempotency_key: key.into(),
        channel: ChannelRef::new("telegram", "bot"),
        conversation: "555".into(),
        body: body.into(),
        reply_to: None,
    };
    let r = agent.send(structured("typing", r#"{"method":"sendChatAction","action":"typing"}"#)).await.unwrap();
    assert_eq!(r, SendResult::Ok { platform_ids: vec![] });
    let r =
        agent.send(structured("edit", r#"{"method":"editMessageText","message_id":1,"text":"edited"}"#)).await.unwrap();
    assert!(matches!(r, SendResult::Ok { .. }), "{r:?}");
    let r = agent.send(structured("evil", r#"{"method":"deleteWebhook"}"#)).await.unwrap();
    assert!(matches!(&r, SendResult::Err { code, retryable: false, .. } if code == "bad_request"), "{r:?}");
    let methods: Vec<String> = fake.sent(BOT_TOKEN).iter().skip(2 * N).map(|s| s.method.clone()).collect();
    assert_eq!(methods, ["sendChatAction", "editMessageText"]);
}
