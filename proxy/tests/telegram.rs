//! Telegram through real processes: the `concierge` binary long-polls (or receives webhooks
//! from) the fake Bot API in `concierge-loadtest`, which records what Telegram would consider
//! confirmed, so each test compares "what the platform thinks we confirmed" with "what the
//! store holds". Every wait is bounded.

mod common;

use std::collections::BTreeSet;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use concierge_adapters::{ConnectionReporter, telegram};
use concierge_loadtest::telegram::{FakeTelegram, Limits, Options};
use concierge_protocol::{ChannelRef, EventData, SendRequest, SendResult};
use serde_json::{Value, json};

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

/// The value of meta `key` of an admin API event.
fn meta<'a>(event: &'a Value, key: &str) -> Option<&'a str> {
    event["meta"].as_array()?.iter().find(|p| p[0] == key).and_then(|p| p[1].as_str())
}

/// A batch of good and malformed updates: all stored in order (the bad ones as
/// kind=malformed), reported on the admin API and in the log, and confirmed, so they are not
/// fetched again; a batch of only bad updates is confirmed too. Also checks that poll mode
/// sends the configured `allowed_updates` on getUpdates, and that there is a single poller.
#[tokio::test(flavor = "multi_thread")]
async fn malformed_updates_in_a_polled_batch_are_stored_reported_and_confirmed() {
    let fake = FakeTelegram::start(Options { id_gaps: true, ..Options::default() }).await.unwrap();
    fake.add_bot(BOT_TOKEN);
    let good_1 = fake.push_message(BOT_TOKEN, 777, 42, "good 1");
    let no_chat = fake.push_update(BOT_TOKEN, &json!({"message": {"message_id": 9, "text": "no chat"}}));
    let no_id =
        fake.push_update(BOT_TOKEN, &json!({"update_id": "x", "message": {"message_id": 10, "chat": {"id": 777}}}));
    let good_2 = fake.push_message(BOT_TOKEN, 777, 42, "good 2");
    let dir = tempfile::tempdir().unwrap();
    let extra = "allowed_updates = [\"message\", \"edited_message\"]";
    let body = format!("{}{}", self_connecting_agent("a"), bot_section("bot", "a", &fake.api_base, extra));
    let config = write_config(dir.path(), &Backend::Embedded, [0, 0, 0], &body);
    let proxy = Proxy::start(&config);

    wait_all_confirmed(&fake, Duration::from_secs(20), &proxy).await;
    assert_eq!(fake.confirmed(BOT_TOKEN), [good_1, no_chat, no_id, good_2]);
    let events = proxy.events("a").await;
    let kinds: Vec<&str> = events.iter().map(|e| meta(e, "kind").unwrap_or_default()).collect();
    assert_eq!(kinds, ["message", "malformed", "malformed", "message"], "log:\n{}", proxy.log());
    assert_eq!((events[0]["text"].as_str(), events[3]["text"].as_str()), (Some("good 1"), Some("good 2")));
    assert_eq!(events[1]["dedupe_key"], format!("tg:123456:{no_chat}"));
    assert!(meta(&events[1], "error").unwrap_or_default().contains("no chat.id"), "{}", events[1]);
    assert!(events[1]["raw"]["text"].as_str().unwrap_or_default().contains("no chat"), "raw kept: {}", events[1]);
    assert!(events[2]["dedupe_key"].as_str().unwrap_or_default().starts_with("tg:123456:malformed:"));
    assert!(meta(&events[2], "error").unwrap_or_default().contains("update_id"), "{}", events[2]);
    let reported = eventually(Duration::from_secs(10), || async {
        connection(&proxy, "telegram", "bot").await.filter(|c| {
            c["last_error"].as_str().is_some_and(|e| e.contains("2 malformed update(s) stored as kind=malformed"))
        })
    })
    .await;
    let Some(reported) = reported else {
        panic!("no malformed report: {:?}", connection(&proxy, "telegram", "bot").await);
    };
    assert_eq!(reported["state"], "polling", "{reported}");
    assert!(reported["last_error"].as_str().unwrap().contains(&format!("update {no_chat}: ")), "{reported}");
    assert!(proxy.log().contains("malformed telegram update"), "{}", proxy.log());

    // A batch of nothing but bad updates still moves the offset past them.
    let bad = [
        fake.push_update(BOT_TOKEN, &json!({"edited_message": {"message_id": 1, "text": "no chat"}})),
        fake.push_update(BOT_TOKEN, &json!({"message": 5})),
    ];
    wait_all_confirmed(&fake, Duration::from_secs(20), &proxy).await;
    assert_eq!(fake.confirmed(BOT_TOKEN)[4..], bad);
    let events = proxy.events("a").await;
    let kinds: Vec<&str> = events.iter().map(|e| meta(e, "kind").unwrap_or_default()).collect();
    assert_eq!(kinds[4..], ["malformed", "malformed"]);
    assert_eq!(events.len(), 6, "each stored once");

    assert_eq!(fake.allowed_updates(BOT_TOKEN), Some(json!(["message", "edited_message"])), "sent on getUpdates");
    assert_eq!(fake.conflicts(BOT_TOKEN), 0, "a single poller");
}

/// Promise 1 in webhook mode: with the store down the delivery gets 503 (non-2xx, so Telegram
/// retries) and nothing more is confirmed; once it is back the redelivery is stored once. A
/// malformed update is stored as kind=malformed and answered 200, so Telegram does not retry
/// it forever.
#[tokio::test(flavor = "multi_thread")]
async fn webhook_store_outage_gets_503_then_the_redelivery_is_stored_once() {
    let mut redis = Redis::start();
    let fake = FakeTelegram::start(Options::default()).await.unwrap();
    fake.add_bot(BOT_TOKEN);
    let dir = tempfile::tempdir().unwrap();
    let ports = fixed_ports();
    let extra = format!(
        "mode = \"webhook\"\nwebhook_secret = \"s3cret\"\nset_webhook = true\npublic_url = \"http://127.0.0.1:{}\"",
        ports[1]
    );
    let body = format!("{}{}", self_connecting_agent("a"), bot_section("hook", "a", &fake.api_base, &extra));
    let config = write_config(dir.path(), &Backend::Redis(redis.url()), ports, &body);
    let proxy = Proxy::start(&config);
    let webhook = eventually(Duration::from_secs(10), || async { fake.webhook(BOT_TOKEN) }).await;
    assert!(webhook.is_some(), "setWebhook never called; log:\n{}", proxy.log());

    let before: Vec<i64> = (0..2).map(|i| fake.push_message(BOT_TOKEN, 9, 9, &format!("before {i}"))).collect();
    assert_eq!(fake.deliver_webhooks(BOT_TOKEN).await, [200, 200], "log:\n{}", proxy.log());

    redis.kill9();
    let during: Vec<i64> = (0..3).map(|i| fake.push_message(BOT_TOKEN, 9, 9, &format!("during {i}"))).collect();
    for _ in 0..2 {
        assert_eq!(fake.deliver_webhooks(BOT_TOKEN).await, [503], "log:\n{}", proxy.log());
    }
    assert_eq!(fake.confirmed(BOT_TOKEN), before, "nothing confirmed while the store is down");
    assert_eq!(fake.pending(BOT_TOKEN), during);

    redis.restart();
    let redelivered = eventually(Duration::from_secs(30), || async {
        let statuses = fake.deliver_webhooks(BOT_TOKEN).await;
        fake.pending(BOT_TOKEN).is_empty().then_some(statuses)
    })
    .await;
    assert!(redelivered.is_some(), "redelivery never accepted: {:?}; log:\n{}", fake.pending(BOT_TOKEN), proxy.log());
    let all: Vec<i64> = before.iter().chain(&during).copied().collect();
    assert_eq!(stored_update_ids(&proxy, "a").await, all, "each stored once, in order");

    // Malformed: stored, 200, and a redelivery of the same bytes is a duplicate.
    let bad = fake.push_update(BOT_TOKEN, &json!({"message": {"message_id": 7, "text": "no chat"}}));
    assert_eq!(fake.deliver_webhooks(BOT_TOKEN).await, [200]);
    assert_eq!(fake.confirmed(BOT_TOKEN).last(), Some(&bad));
    let url = format!("http://127.0.0.1:{}/telegram/hook", ports[1]);
    let post =
        |body: String| http_client().post(&url).header("X-Telegram-Bot-Api-Secret-Token", "s3cret").body(body).send();
    let r = post(format!(r#"{{"update_id":{bad},"message":{{"message_id":7,"text":"no chat"}}}}"#)).await.unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let answer: Value = r.json().await.unwrap();
    assert_eq!(answer["duplicate"], true, "{answer}");
    assert!(answer["malformed"].as_str().unwrap_or_default().contains("no chat.id"), "{answer}");
    let r = post("not json at all".into()).await.unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let events = proxy.events("a").await;
    let kinds: Vec<&str> = events.iter().map(|e| meta(e, "kind").unwrap_or_default()).collect();
    assert_eq!(kinds, ["message", "message", "message", "message", "message", "malformed", "malformed"]);
    assert_eq!(events[5]["dedupe_key"], format!("tg:123456:{bad}"));
}

/// Records a poller's state changes.
#[derive(Default)]
struct States(Mutex<Vec<(String, Option<String>)>>);

impl ConnectionReporter for States {
    fn state(&self, _channel: &str, _name: &str, state: &str, error: Option<&str>) {
        self.0.lock().unwrap().push((state.to_string(), error.map(str::to_string)));
    }
}

/// Promise 1 with the store failing exactly mid-batch: of a batch of 5 the first 2 are stored
/// and the 3rd fails; the offset does not move and Telegram keeps all 5. Once the store works,
/// the re-fetched batch gives 2 duplicates and 3 new events, and the offset becomes max + 1.
#[tokio::test(flavor = "multi_thread")]
async fn a_store_failing_mid_batch_keeps_the_offset_and_the_refetch_stores_the_rest_once() {
    let fake = FakeTelegram::start(Options { id_gaps: true, ..Options::default() }).await.unwrap();
    fake.add_bot(BOT_TOKEN);
    let ids: Vec<i64> = (0..5).map(|i| fake.push_message(BOT_TOKEN, 777, 42, &format!("m{i}"))).collect();
    let dir = tempfile::tempdir().unwrap();
    let store = FailingStore::open(dir.path(), 2);
    let states = Arc::new(States::default());
    let bot = telegram::Bot {
        name: "bot".into(),
        agent: "a".into(),
        token: BOT_TOKEN.into(),
        api_base: fake.api_base.clone(),
    };
    let options = telegram::PollOptions { allowed_updates: vec![], timeout: Duration::from_secs(1) };
    let (stop, shutdown) = tokio::sync::watch::channel(false);
    let poller = telegram::spawn_poller(reqwest::Client::new(), bot, options, store.clone(), states.clone(), shutdown);

    // The batch is fetched, fails at its 3rd write, and is fetched (and fails) again.
    let refetched = eventually(Duration::from_secs(15), || async { (fake.polls(BOT_TOKEN) >= 2).then_some(()) }).await;
    assert!(refetched.is_some(), "the batch was not fetched again; states {:?}", states.0.lock().unwrap());
    let update_ids = |events: Vec<EventData>| -> Vec<i64> {
        events.iter().map(|e| serde_json::from_slice::<Value>(&e.raw).unwrap()["update_id"].as_i64().unwrap()).collect()
    };
    assert_eq!(update_ids(store.stored("a").await), ids[..2], "the writes before the failure are stored");
    assert_eq!(fake.last_offset(BOT_TOKEN), None, "an offset was sent past an unstored update");
    assert!(fake.confirmed(BOT_TOKEN).is_empty());
    assert_eq!(fake.pending(BOT_TOKEN), ids, "Telegram keeps the whole batch");
    let backoff = states.0.lock().unwrap().iter().find(|(s, _)| s == "backoff").cloned();
    assert!(
        backoff.as_ref().and_then(|(_, e)| e.as_deref()).is_some_and(|e| e.contains("injected")),
        "the failure is reported: {backoff:?}"
    );

    store.failing.store(false, Ordering::SeqCst);
    let done = eventually(Duration::from_secs(20), || async { fake.pending(BOT_TOKEN).is_empty().then_some(()) }).await;
    assert!(done.is_some(), "never confirmed after the store came back: {:?}", fake.pending(BOT_TOKEN));
    assert_eq!(update_ids(store.stored("a").await), ids, "each stored once, in order");
    assert_eq!(store.duplicates.load(Ordering::SeqCst), 2, "the 2 stored before the failure came again");
    assert_eq!(fake.last_offset(BOT_TOKEN), Some(ids[4] + 1), "offset = max(update_id) + 1");
    assert_eq!(fake.confirmed(BOT_TOKEN), ids);

    stop.send(true).unwrap();
    tokio::time::timeout(Duration::from_secs(10), poller).await.expect("the poller stops").unwrap();
}

/// Telegram answering `502 Bad Gateway` (HTML) is backed off, not retried in a hot loop, shown
/// on the admin API, and polling resumes once the outage ends.
#[tokio::test(flavor = "multi_thread")]
async fn bad_gateway_answers_are_backed_off() {
    let fake = FakeTelegram::start(Options::default()).await.unwrap();
    fake.add_bot(BOT_TOKEN);
    let dir = tempfile::tempdir().unwrap();
    let body = format!("{}{}", self_connecting_agent("a"), bot_section("bot", "a", &fake.api_base, ""));
    let config = write_config(dir.path(), &Backend::Embedded, [0, 0, 0], &body);
    let proxy = Proxy::start(&config);
    wait_connection_state(&proxy, "polling", Duration::from_secs(10)).await;

    fake.fail_polls(BOT_TOKEN, 1_000);
    let failing = wait_connection_state(&proxy, "backoff", Duration::from_secs(10)).await;
    assert!(failing["last_error"].as_str().unwrap_or_default().contains("502"), "{failing}");
    // Backoff 1 s, 2 s, 4 s (±20 %): at most 3 more polls in 3 s; a hot loop makes hundreds.
    let (polls, started) = (fake.polls(BOT_TOKEN), Instant::now());
    while started.elapsed() < Duration::from_secs(3) {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let during = fake.polls(BOT_TOKEN) - polls;
    assert!(during <= 3, "{during} getUpdates calls in 3 s of 502s: a hot loop");

    fake.fail_polls(BOT_TOKEN, 0);
    let id = fake.push_message(BOT_TOKEN, 777, 42, "after the outage");
    wait_all_confirmed(&fake, Duration::from_secs(20), &proxy).await;
    assert_eq!(stored_update_ids(&proxy, "a").await, [id]);
    wait_connection_state(&proxy, "polling", Duration::from_secs(10)).await;
}

/// The bot-wide rate holds across chats: 30 replies to 30 different chats at once (so
/// per-chat pacing never applies) are spaced `1 / bot_rate` apart, and a fake allowing just
/// over `bot_rate` per second never answers 429.
#[tokio::test(flavor = "multi_thread")]
async fn bot_rate_spaces_sends_across_chats() {
    const N: usize = 30;
    let limits = Limits { per_chat: 1_000, per_bot: 11, window: Duration::from_secs(1), retry_after: 1 };
    let fake = FakeTelegram::start(Options { limits: Some(limits), ..Options::default() }).await.unwrap();
    fake.add_bot(BOT_TOKEN);
    let dir = tempfile::tempdir().unwrap();
    let extra = "chat_interval = \"1ms\"\nbot_rate = 10";
    let body = format!("{}{}", self_connecting_agent("a"), bot_section("bot", "a", &fake.api_base, extra));
    let config = write_config(dir.path(), &Backend::Embedded, [0, 0, 0], &body);
    let proxy = Proxy::start(&config);
    let agent = proxy.connect("a").await;

    let results = futures::future::join_all((0..N).map(|i| agent.send(reply(&format!("{}", 1_000 + i), i)))).await;
    assert!(results.iter().all(|r| matches!(r, Ok(SendResult::Ok { .. }))), "{results:?}");
    let sent = fake.sent(BOT_TOKEN);
    let chats: BTreeSet<&str> = sent.iter().map(|s| s.chat_id.as_str()).collect();
    assert_eq!((sent.len(), chats.len()), (N, N), "one message to each chat");
    assert_eq!(fake.rate_limited(BOT_TOKEN), 0, "the bot-wide limit was exceeded");
    // Slots are 100 ms apart; only the first and last arrival can be late or early.
    let span = sent[N - 1].at.duration_since(sent[0].at);
    assert!(span >= Duration::from_millis(100 * (N as u64 - 1) - 50), "{N} sends across chats within {span:?}");
}
