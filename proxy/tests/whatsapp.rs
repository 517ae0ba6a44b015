//! WhatsApp Business Cloud API through real processes: the fake in `concierge-loadtest` signs
//! and POSTs notifications in Meta's shape (redelivering on non-200) and serves the Graph
//! API the proxy sends through. Every wait is bounded.

mod common;

use std::sync::atomic::Ordering;
use std::time::Duration;

use common::*;
use concierge_adapters::whatsapp;
use concierge_loadtest::whatsapp::{FakeWhatsApp, notification, status, text_message};
use concierge_protocol::{ChannelRef, SendRequest, SendResult};
use concierge_store::Store;
use serde_json::Value;

const APP_SECRET: &str = "app-secret-0123";
const VERIFY_TOKEN: &str = "verify-me-please";
const ACCESS_TOKEN: &str = "EAAG-access-token";
const PHONE_ID: &str = "106540352242922";

fn number_section(graph_base: &str) -> String {
    format!(
        "[whatsapp.wa]\nagent = \"a\"\napp_secret = \"{APP_SECRET}\"\nverify_token = \"{VERIFY_TOKEN}\"\naccess_token = \"{ACCESS_TOKEN}\"\nphone_number_id = \"{PHONE_ID}\"\ngraph_base = \"{graph_base}\"\n"
    )
}

async fn start(backend: Backend) -> (FakeWhatsApp, Proxy, String, tempfile::TempDir) {
    let fake = FakeWhatsApp::start(APP_SECRET, ACCESS_TOKEN, None).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let body = format!("{}{}", self_connecting_agent("a"), number_section(&fake.graph_base));
    let config = write_config(dir.path(), &backend, [0, 0, 0], &body);
    let proxy = Proxy::start(&config);
    let url = format!("http://{}/whatsapp/wa", proxy.http);
    (fake, proxy, url, dir)
}

fn meta<'a>(event: &'a Value, key: &str) -> Option<&'a str> {
    event["meta"].as_array()?.iter().find(|p| p[0] == key).and_then(|p| p[1].as_str())
}

/// The GET handshake, then bad and missing signatures: refused, nothing stored.
#[tokio::test(flavor = "multi_thread")]
async fn verification_and_signatures() {
    let (fake, proxy, url, _dir) = start(Backend::Embedded).await;
    assert_eq!(fake.verify(&url, VERIFY_TOKEN, "1158201444").await, (200, "1158201444".to_string()));
    assert_eq!(fake.verify(&url, "wrong", "1158201444").await.0, 403);

    let body = notification(PHONE_ID, vec![text_message("4915550001", "wamid.FORGED", "hi")], vec![]);
    let other = FakeWhatsApp::start("another-secret", ACCESS_TOKEN, None).await.unwrap();
    let forged = other.signature(body.as_bytes());
    for sig in [forged.as_str(), "sha256=00", "", "garbage"] {
        let attempts = fake.deliver_with(&url, &body, Some(sig), 1, Duration::ZERO).await;
        assert_eq!(attempts[0].status, 401, "signature {sig:?}: {attempts:?}");
    }
    // A correct signature over different bytes is still wrong.
    let tampered = body.replace("hi", "ho");
    let attempts = fake.deliver_with(&url, &tampered, Some(&fake.signature(body.as_bytes())), 1, Duration::ZERO).await;
    assert_eq!(attempts[0].status, 401);
    // The right HMAC without the `sha256=` prefix Meta always sends is not Meta's format.
    let signature = fake.signature(body.as_bytes());
    let bare = signature.trim_start_matches("sha256=");
    let attempts = fake.deliver_with(&url, &body, Some(bare), 1, Duration::ZERO).await;
    assert_eq!(attempts[0].status, 401, "bare hex: {attempts:?}");
    assert!(attempts[0].body.contains("sha256="), "{attempts:?}");
    // No header at all.
    let r =
        http_client().post(&url).header("content-type", "application/json").body(body.clone()).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 401);
    let answer: Value = r.json().await.unwrap();
    assert!(answer["error"].as_str().unwrap_or_default().contains("missing header"), "{answer}");
    assert!(proxy.events("a").await.is_empty(), "a refused notification stored something");

    let attempts = fake.deliver(&url, &body).await;
    assert_eq!(attempts.len(), 1);
    assert_eq!(attempts[0].status, 200, "{attempts:?}");
    let events = proxy.events("a").await;
    assert_eq!(events.len(), 1);
    assert_eq!(events[0]["dedupe_key"], "wa:wamid.FORGED");
    assert_eq!(events[0]["conversation"], "4915550001");
    assert_eq!(events[0]["text"], "hi");
    assert_eq!(meta(&events[0], "contact_name"), Some("Customer 4915550001"));
}

/// One batch: several messages (one malformed) and a status. The good ones and the status are
/// stored, the bad one is reported (and kept, marked malformed), and the answer is 200.
#[tokio::test(flavor = "multi_thread")]
async fn a_batch_with_one_malformed_message_stores_the_rest() {
    let (fake, proxy, url, _dir) = start(Backend::Embedded).await;
    let mut broken = text_message("4915550002", "unused", "no id");
    broken.as_object_mut().unwrap().remove("id");
    let body = notification(
        PHONE_ID,
        vec![text_message("4915550001", "wamid.A", "first"), broken, text_message("4915550003", "wamid.C", "third")],
        vec![status("wamid.OURS", "4915550001", "delivered")],
    );
    let attempts = fake.deliver(&url, &body).await;
    assert_eq!(attempts.len(), 1, "{attempts:?}");
    assert_eq!(attempts[0].status, 200);
    let answer: Value = serde_json::from_str(&attempts[0].body).unwrap();
    assert_eq!(answer["stored"], 4, "{answer}");
    let malformed = answer["malformed"].as_array().unwrap();
    assert_eq!(malformed.len(), 1, "{answer}");
    assert_eq!(malformed[0]["at"], "entry[0].changes[0].value.messages[1]");
    assert!(malformed[0]["error"].as_str().unwrap().contains("id"), "{answer}");
    assert!(proxy.log().contains("malformed item in a whatsapp notification"), "{}", proxy.log());

    let events = proxy.events("a").await;
    let kinds: Vec<_> = events.iter().map(|e| meta(e, "kind").unwrap_or_default().to_string()).collect();
    assert_eq!(kinds, ["message", "malformed", "message", "status"]);
    assert_eq!(events[0]["text"], "first");
    assert_eq!(events[2]["text"], "third");
    assert_eq!(meta(&events[3], "status"), Some("delivered"));
    assert_eq!(events[3]["conversation"], "4915550001");
    // Raw bytes are the message object exactly as Meta sent it.
    assert!(body.contains(events[0]["raw"]["text"].as_str().unwrap()));

    // Meta redelivers the same body: nothing is stored twice.
    let attempts = fake.deliver(&url, &body).await;
    let answer: Value = serde_json::from_str(&attempts[0].body).unwrap();
    assert_eq!((answer["stored"].as_u64(), answer["duplicates"].as_u64()), (Some(0), Some(4)), "{answer}");
    assert_eq!(proxy.events("a").await.len(), 4);
}

/// Promise 1: with the store down the answer is non-200, Meta redelivers, and once the store
/// is back the redelivery is stored once.
#[tokio::test(flavor = "multi_thread")]
async fn store_outage_gets_non_200_and_the_redelivery_is_stored_once() {
    let mut redis = Redis::start();
    let (fake, proxy, url, _dir) = start(Backend::Redis(redis.url())).await;
    let first = notification(PHONE_ID, vec![text_message("4915550001", "wamid.1", "before")], vec![]);
    assert_eq!(fake.deliver(&url, &first).await[0].status, 200);

    redis.kill9();
    let batch = notification(
        PHONE_ID,
        (2..=4).map(|i| text_message("4915550001", &format!("wamid.{i}"), &format!("during {i}"))).collect(),
        vec![],
    );
    let delivery = {
        let fake = fake.clone();
        let url = url.clone();
        let batch = batch.clone();
        tokio::spawn(async move { fake.deliver_with(&url, &batch, None, 40, Duration::from_millis(250)).await })
    };
    tokio::time::sleep(Duration::from_secs(2)).await;
    redis.restart();
    let attempts = delivery.await.unwrap();
    let statuses: Vec<u16> = attempts.iter().map(|a| a.status).collect();
    assert_eq!(statuses.last(), Some(&200), "{statuses:?}; log:\n{}", proxy.log());
    assert!(statuses.len() > 1 && statuses[..statuses.len() - 1].iter().all(|s| *s == 503), "{statuses:?}");

    let events = proxy.events("a").await;
    let keys: Vec<&str> = events.iter().map(|e| e["dedupe_key"].as_str().unwrap()).collect();
    assert_eq!(keys, ["wa:wamid.1", "wa:wamid.2", "wa:wamid.3", "wa:wamid.4"], "each stored once, in order");
}

fn send(key: &str, to: &str, body: &str) -> SendRequest {
    SendRequest {
        idempotency_key: key.into(),
        channel: ChannelRef::new("whatsapp", "wa"),
        conversation: to.into(),
        body: body.into(),
        reply_to: None,
    }
}

/// Sends reach the Graph API with the bearer token; a closed 24-hour window is its own error
/// code; a retried idempotency key does not send again.
#[tokio::test(flavor = "multi_thread")]
async fn sends_through_the_graph_api() {
    let (fake, proxy, _url, _dir) = start(Backend::Embedded).await;
    let agent = proxy.connect("a").await;
    let r = agent.send(send("k1", "4915550001", "hello")).await.unwrap();
    let SendResult::Ok { platform_ids } = &r else { panic!("{r:?}; log:\n{}", proxy.log()) };
    let sends = fake.sends();
    assert_eq!(sends.len(), 1);
    assert_eq!(platform_ids, &vec![sends[0].wamid.clone()]);
    assert_eq!(sends[0].phone_number_id, PHONE_ID);
    assert_eq!(sends[0].body["to"], "4915550001");
    assert_eq!(sends[0].body["text"]["body"], "hello");
    assert_eq!(agent.send(send("k1", "4915550001", "hello")).await.unwrap(), r, "recorded result");
    assert_eq!(fake.sends().len(), 1, "a retried key sent again");

    let reply = r#"{"type":"text","text":{"body":"re"},"context":{"message_id":"wamid.A"}}"#;
    assert!(matches!(agent.send(send("k2", "4915550001", reply)).await.unwrap(), SendResult::Ok { .. }));
    assert_eq!(fake.sends()[1].body["context"]["message_id"], "wamid.A");

    fake.close_window("4915550009");
    let r = agent.send(send("k3", "4915550009", "too late")).await.unwrap();
    match &r {
        SendResult::Err { code, retryable, message } => {
            assert_eq!((code.as_str(), *retryable), ("window_closed", false), "{message}");
            assert!(message.contains("template"), "{message}");
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(fake.sends().len(), 2);
}

/// Promise 1 with the store failing exactly mid-batch: a notification of 5 messages whose 3rd
/// write fails gets 503 with the first 2 stored; Meta's redelivery of the same bytes, once the
/// store works, stores the other 3 and finds the first 2 duplicates.
#[tokio::test(flavor = "multi_thread")]
async fn a_store_failing_mid_batch_gets_503_and_the_redelivery_stores_the_rest_once() {
    let dir = tempfile::tempdir().unwrap();
    let store = FailingStore::open(dir.path(), 2);
    let number = whatsapp::Number {
        name: "wa".into(),
        agent: "a".into(),
        app_secret: APP_SECRET.as_bytes().to_vec(),
        verify_token: VERIFY_TOKEN.into(),
    };
    let app = whatsapp::router(vec![number], store.clone(), 1 << 20);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/whatsapp/wa", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    let fake = FakeWhatsApp::start(APP_SECRET, ACCESS_TOKEN, None).await.unwrap();
    let wamids: Vec<String> = (1..=5).map(|i| format!("wamid.{i}")).collect();
    let body = notification(
        PHONE_ID,
        wamids.iter().map(|w| text_message("4915550001", w, &format!("text {w}"))).collect(),
        vec![],
    );
    let stored_keys = || async {
        let events = store.store.read("a", 0, 100).await.unwrap();
        events.into_iter().map(|e| e.data.dedupe_key.unwrap_or_default()).collect::<Vec<String>>()
    };

    let attempts = fake.deliver_with(&url, &body, None, 1, Duration::ZERO).await;
    assert_eq!(attempts[0].status, 503, "{attempts:?}");
    assert_eq!(stored_keys().await, ["wa:wamid.1", "wa:wamid.2"], "the writes before the failure");

    store.failing.store(false, Ordering::SeqCst);
    let attempts = fake.deliver(&url, &body).await;
    assert_eq!(attempts.len(), 1, "{attempts:?}");
    assert_eq!(attempts[0].status, 200, "{attempts:?}");
    let answer: Value = serde_json::from_str(&attempts[0].body).unwrap();
    assert_eq!((answer["stored"].as_u64(), answer["duplicates"].as_u64()), (Some(3), Some(2)), "{answer}");
    let want: Vec<String> = wamids.iter().map(|w| format!("wa:{w}")).collect();
    assert_eq!(stored_keys().await, want, "each stored once, in body order");
}
