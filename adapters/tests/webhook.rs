//! The webhook channel over real HTTP: axum served on a loopback socket, driven with reqwest.
//! The sink is a test double of the proxy's store door: it records what it was given, assigns
//! offsets, dedupes by key, and can be switched to fail.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use concierge_adapters::signature::{self, SignatureError};
use concierge_adapters::webhook::{self, ReplyTarget, Route, Verify};
use concierge_adapters::{EventSink, Ingested, SinkError};
use concierge_protocol::{ChannelRef, EventData, SendRequest, SendResult, now_ms};
use serde_json::Value;

const OK: u8 = 0;
const UNAVAILABLE: u8 = 1;
const REJECTED: u8 = 2;

#[derive(Default)]
struct TestSink {
    events: Mutex<Vec<EventData>>,
    seen: Mutex<HashMap<String, u64>>,
    mode: AtomicU8,
}

impl TestSink {
    fn events(&self) -> Vec<EventData> {
        self.events.lock().unwrap().clone()
    }
    fn set_mode(&self, mode: u8) {
        self.mode.store(mode, Ordering::SeqCst);
    }
}

#[async_trait]
impl EventSink for TestSink {
    async fn ingest(&self, event: EventData) -> Result<Ingested, SinkError> {
        match self.mode.load(Ordering::SeqCst) {
            UNAVAILABLE => {
                return Err(SinkError::Unavailable("redis: connection refused at 10.0.0.7".into()));
            }
            REJECTED => return Err(SinkError::Rejected("buffer full".into())),
            _ => {}
        }
        let mut events = self.events.lock().unwrap();
        let mut seen = self.seen.lock().unwrap();
        if let Some(key) = &event.dedupe_key
            && let Some(&offset) = seen.get(&format!("{}/{key}", event.agent))
        {
            return Ok(Ingested { offset, duplicate: true });
        }
        // Offsets start at 100 so a test can tell "the sink's offset" from a count.
        let offset = 100 + events.len() as u64;
        if let Some(key) = &event.dedupe_key {
            seen.insert(format!("{}/{key}", event.agent), offset);
        }
        events.push(event);
        Ok(Ingested { offset, duplicate: false })
    }
}

const OLD_SECRET: &[u8] = b"old-secret-bytes";
const NEW_SECRET: &[u8] = b"new-secret-bytes";
const HMAC_SECRET: &[u8] = b"hmac-secret-bytes";
const LIMIT: usize = 1024;

fn routes() -> Vec<Route> {
    vec![
        Route {
            agent: "ada".into(),
            name: "orders".into(),
            verify: Verify::Standard { secrets: vec![OLD_SECRET.to_vec(), NEW_SECRET.to_vec()] },
            max_body: 64 * 1024,
            reply: None,
        },
        Route {
            agent: "ada".into(),
            name: "github".into(),
            verify: Verify::Hmac { header: "X-Hub-Signature-256".into(), secret: HMAC_SECRET.to_vec() },
            max_body: 64 * 1024,
            reply: None,
        },
        Route { agent: "ada".into(), name: "small".into(), verify: Verify::None, max_body: LIMIT, reply: None },
        Route { agent: "bob".into(), name: "private".into(), verify: Verify::None, max_body: LIMIT, reply: None },
    ]
}

async fn serve(app: axum::Router) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    addr
}

async fn start() -> (String, Arc<TestSink>) {
    let sink = Arc::new(TestSink::default());
    let addr = serve(webhook::router(routes(), sink.clone())).await;
    (format!("http://{addr}"), sink)
}

fn now_secs() -> i64 {
    (now_ms() / 1000) as i64
}

/// A request to the standard route signed with `secret` at `ts`.
fn standard(base: &str, secret: &[u8], id: &str, ts: i64, body: &'static [u8]) -> reqwest::RequestBuilder {
    let mut req = reqwest::Client::new().post(format!("{base}/hooks/ada/orders")).body(body);
    for (name, value) in signature::standard_headers(secret, id, ts, body) {
        req = req.header(name, value);
    }
    req
}

/// Status, headers and JSON body; fails the test if the body is not JSON.
async fn answer(req: reqwest::RequestBuilder) -> (StatusCode, reqwest::header::HeaderMap, Value) {
    let resp = req.send().await.expect("request failed");
    let status = resp.status();
    let headers = resp.headers().clone();
    let text = resp.text().await.unwrap();
    let json = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{status}: body is not JSON ({e}): {text:?}"));
    (status, headers, json)
}

fn error_of(json: &Value) -> &str {
    json["error"].as_str().unwrap_or_else(|| panic!("no error field in {json}"))
}

#[tokio::test]
async fn valid_standard_signature_is_stored_then_acknowledged_with_its_offset() {
    let (base, sink) = start().await;
    let body: &'static [u8] = br#"{"text":"ship it","order":{"id":7}}"#;
    let req = standard(&base, NEW_SECRET, "msg_2kVx", now_secs(), body)
        .header("content-type", "application/json")
        .header("authorization", "Bearer s3cret")
        .header("x-api-key", "k3y-value-123")
        .header("x-conversation-id", "order-7")
        .header("x-sender", "shop")
        .header("x-request-id", "req-1")
        .header("user-agent", "shop-hooks/1.0");
    let (status, _, json) = answer(req).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{json}");
    assert_eq!(json, serde_json::json!({"offset": 100, "duplicate": false}));

    let events = sink.events();
    assert_eq!(events.len(), 1);
    let e = &events[0];
    assert_eq!(e.agent, "ada");
    assert_eq!(e.channel, ChannelRef::new("webhook", "orders"));
    assert_eq!(e.conversation, "order-7");
    assert_eq!(e.sender.as_deref(), Some("shop"));
    assert_eq!(e.dedupe_key.as_deref(), Some("orders:msg_2kVx"));
    assert_eq!(e.text.as_deref(), Some("ship it"));
    assert_eq!(e.content_type, "application/json");
    assert_eq!(e.raw, body, "raw bytes must be identical");
    assert!(e.attachments.is_empty());
    assert!(e.received_at_ms.abs_diff(now_ms()) < 60_000);
    assert!(e.meta.contains(&("webhook-id".into(), "msg_2kVx".into())), "{:?}", e.meta);
    assert!(e.meta.contains(&("content-length".into(), body.len().to_string())), "{:?}", e.meta);
    assert!(e.meta.contains(&("x-request-id".into(), "req-1".into())), "{:?}", e.meta);
    assert!(e.meta.contains(&("user-agent".into(), "shop-hooks/1.0".into())), "{:?}", e.meta);
    let everything = format!("{e:?}");
    for secret in ["s3cret", "k3y-value-123", "authorization", "x-api-key", "webhook-signature"] {
        assert!(!everything.contains(secret), "{secret} reached the event: {everything}");
    }

    // The old secret still verifies (rotation), and without x-conversation-id the route is it.
    let (status, _, json) = answer(standard(&base, OLD_SECRET, "msg_3", now_secs(), b"plain")).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{json}");
    assert_eq!(json["offset"], 101);
    let e = &sink.events()[1];
    assert_eq!(e.conversation, "orders");
    assert_eq!(e.content_type, "application/octet-stream");
    assert_eq!(e.text, None);
}

#[tokio::test]
async fn bad_standard_signatures_are_401_and_reach_nothing() {
    let (base, sink) = start().await;
    let body: &'static [u8] = b"{\"text\":\"hi\"}";
    let now = now_secs();

    // Tampered body: signed over one body, another one sent.
    let mut tampered = reqwest::Client::new().post(format!("{base}/hooks/ada/orders")).body("{\"text\":\"hI\"}");
    for (name, value) in signature::standard_headers(NEW_SECRET, "m1", now, body) {
        tampered = tampered.header(name, value);
    }
    let sig = signature::standard_sign(NEW_SECRET, "m1", now, body);
    let cases: Vec<(&str, reqwest::RequestBuilder, &str)> = vec![
        ("tampered body", tampered, "no signature matches"),
        ("wrong secret", standard(&base, b"not-the-secret", "m2", now, body), "no signature matches"),
        ("stale timestamp", standard(&base, NEW_SECRET, "m3", now - 301, body), "tolerance 300 s"),
        ("future timestamp", standard(&base, NEW_SECRET, "m4", now + 3600, body), "tolerance 300 s"),
        ("extreme timestamp", standard(&base, NEW_SECRET, "m5", i64::MIN, body), "tolerance 300 s"),
        (
            "missing webhook-id",
            reqwest::Client::new()
                .post(format!("{base}/hooks/ada/orders"))
                .header("webhook-timestamp", now.to_string())
                .header("webhook-signature", sig.clone())
                .body(body),
            "missing header webhook-id",
        ),
        (
            "missing webhook-timestamp",
            reqwest::Client::new()
                .post(format!("{base}/hooks/ada/orders"))
                .header("webhook-id", "m1")
                .header("webhook-signature", sig.clone())
                .body(body),
            "missing header webhook-timestamp",
        ),
        (
            "missing webhook-signature",
            reqwest::Client::new()
                .post(format!("{base}/hooks/ada/orders"))
                .header("webhook-id", "m1")
                .header("webhook-timestamp", now.to_string())
                .body(body),
            "missing header webhook-signature",
        ),
        (
            "no headers at all",
            reqwest::Client::new().post(format!("{base}/hooks/ada/orders")).body(body),
            "missing header",
        ),
    ];
    for (what, req, fragment) in cases {
        let (status, _, json) = answer(req).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{what}: {json}");
        let message = error_of(&json);
        assert!(message.contains(fragment), "{what}: {message}");
        assert!(!message.contains(&sig[3..]), "{what}: leaks a signature");
    }
    assert!(sink.events().is_empty(), "nothing may reach the sink on failure");
}

#[test]
fn extreme_timestamps_do_not_overflow_in_signature_check() {
    let k = vec![b"k".to_vec()];
    let ts = i64::MIN;
    let sig = signature::standard_sign(&k[0], "id", ts, b"");
    let got = signature::standard_verify(&k, Some("id"), Some(&ts.to_string()), Some(&sig), b"", 1_700_000_000);
    assert!(matches!(got, Err(SignatureError::Stale(_))), "{got:?}");
}

#[tokio::test]
async fn hmac_route_accepts_good_and_refuses_bad_signatures() {
    let (base, sink) = start().await;
    let body = br#"{"action":"opened"}"#;
    let good = format!("sha256={}", signature::body_sign_hex(HMAC_SECRET, body));
    let url = format!("{base}/hooks/ada/github");
    let client = reqwest::Client::new();

    let (status, _, json) = answer(
        client
            .post(&url)
            .header("x-hub-signature-256", &good)
            .header("x-github-delivery", "d-1")
            .header("content-type", "application/json")
            .body(&body[..]),
    )
    .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{json}");
    let events = sink.events();
    assert_eq!(events.len(), 1);
    assert_eq!(events[0].raw, body);
    assert_eq!(events[0].dedupe_key, None, "no webhook-id nor Idempotency-Key");
    assert!(!format!("{:?}", events[0]).contains(&good[7..]), "signature header copied into the event");
    assert!(events[0].meta.contains(&("x-github-delivery".into(), "d-1".into())));

    let bad = format!("sha256={}", signature::body_sign_hex(b"other", body));
    for (what, req, fragment) in [
        ("wrong secret", client.post(&url).header("x-hub-signature-256", bad).body(&body[..]), "no signature matches"),
        (
            "tampered",
            client.post(&url).header("x-hub-signature-256", &good).body(&br#"{"action":"closed"}"#[..]),
            "no signature matches",
        ),
        ("missing", client.post(&url).body(&body[..]), "missing header x-hub-signature-256"),
        ("not hex", client.post(&url).header("x-hub-signature-256", "sha256=zz").body(&body[..]), "no signature"),
    ] {
        let (status, _, json) = answer(req).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{what}: {json}");
        assert!(error_of(&json).contains(fragment), "{what}: {json}");
    }
    assert_eq!(sink.events().len(), 1);
}

#[tokio::test]
async fn bodies_over_the_limit_are_413_by_length_and_while_streaming() {
    let (base, sink) = start().await;
    let url = format!("{base}/hooks/ada/small");
    let client = reqwest::Client::new();

    let (status, _, json) = answer(client.post(&url).body(vec![b'a'; LIMIT + 1])).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE, "{json}");
    assert!(error_of(&json).contains(&format!("limit of {LIMIT} bytes")), "{json}");

    // Chunked: no Content-Length, so the limit is enforced while reading.
    let chunks = (0..8).map(|_| Ok::<_, std::io::Error>(Bytes::from(vec![b'b'; 256])));
    let streamed = reqwest::Body::wrap_stream(futures::stream::iter(chunks));
    let (status, _, json) = answer(client.post(&url).body(streamed)).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE, "{json}");
    assert!(error_of(&json).contains(&format!("limit of {LIMIT} bytes")), "{json}");
    assert!(sink.events().is_empty());

    // Exactly at the limit is fine, chunked or not.
    let (status, _, json) = answer(client.post(&url).body(vec![b'c'; LIMIT])).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{json}");
    let chunks = (0..4).map(|_| Ok::<_, std::io::Error>(Bytes::from(vec![b'd'; LIMIT / 4])));
    let streamed = reqwest::Body::wrap_stream(futures::stream::iter(chunks));
    let (status, _, json) = answer(client.post(&url).body(streamed)).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{json}");
    let events = sink.events();
    assert_eq!(events.len(), 2);
    assert_eq!(events[1].raw, vec![b'd'; LIMIT]);
    assert!(events[1].meta.contains(&("content-length".into(), LIMIT.to_string())));
}

#[tokio::test]
async fn unknown_agent_route_or_another_agents_route_is_404() {
    let (base, sink) = start().await;
    let client = reqwest::Client::new();
    for (path, fragment) in [
        ("/hooks/nobody/orders", "unknown agent 'nobody'"),
        ("/hooks/ada/nothing", "unknown route 'nothing' for agent 'ada'"),
        // Isolation: bob's route is not reachable under ada, nor ada's under bob.
        ("/hooks/ada/private", "unknown route 'private' for agent 'ada'"),
        ("/hooks/bob/small", "unknown route 'small' for agent 'bob'"),
        ("/hooks/ada", "unknown webhook path"),
        ("/hooks/ada/", "unknown webhook path"),
        ("/hooks/ada/small/", "unknown webhook path"),
        ("/hooks/ada/small/extra", "unknown webhook path"),
        ("/hooks/ada/small/extra/more", "unknown webhook path"),
        ("/hooks/", "unknown webhook path"),
        ("/hooks", "unknown webhook path"),
        ("/hooks/%FF/small", "unknown webhook path"),
    ] {
        let (status, _, json) = answer(client.post(format!("{base}{path}")).body("x")).await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{path}: {json}");
        assert!(error_of(&json).contains(fragment), "{path}: {json}");
    }
    let (status, headers, json) = answer(client.get(format!("{base}/hooks/ada/small"))).await;
    assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED, "{json}");
    assert_eq!(headers["allow"], "POST");
    assert!(sink.events().is_empty());
}

#[tokio::test]
async fn store_unavailable_is_503_and_backpressure_is_429_both_with_retry_after() {
    let (base, sink) = start().await;
    let client = reqwest::Client::new();
    let url = format!("{base}/hooks/ada/small");

    sink.set_mode(UNAVAILABLE);
    let (status, headers, json) = answer(client.post(&url).body("hello")).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{json}");
    assert_eq!(headers["retry-after"], "1");
    assert!(!error_of(&json).contains("10.0.0.7"), "internal detail leaked: {json}");

    sink.set_mode(REJECTED);
    let (status, headers, json) = answer(client.post(&url).body("hello")).await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS, "{json}");
    assert!(headers.contains_key("retry-after"));
    assert!(sink.events().is_empty());

    sink.set_mode(OK);
    let (status, _, _) = answer(client.post(&url).body("hello")).await;
    assert_eq!(status, StatusCode::ACCEPTED);
}

#[tokio::test]
async fn redelivery_is_acknowledged_as_duplicate_with_the_same_offset() {
    let (base, sink) = start().await;
    let ts = now_secs();
    let first = answer(standard(&base, NEW_SECRET, "msg_dup", ts, b"once")).await;
    let again = answer(standard(&base, NEW_SECRET, "msg_dup", ts, b"once")).await;
    assert_eq!(first.0, StatusCode::ACCEPTED);
    assert_eq!(first.2, serde_json::json!({"offset": 100, "duplicate": false}));
    assert_eq!(again.0, StatusCode::ACCEPTED);
    assert_eq!(again.2, serde_json::json!({"offset": 100, "duplicate": true}));
    assert_eq!(sink.events().len(), 1);

    // Idempotency-Key is the fallback key, and two routes never collide on the same id.
    let client = reqwest::Client::new();
    let url = format!("{base}/hooks/ada/small");
    let a = answer(client.post(&url).header("idempotency-key", "msg_dup").body("x")).await;
    let b = answer(client.post(&url).header("idempotency-key", "msg_dup").body("x")).await;
    assert_eq!(a.2, serde_json::json!({"offset": 101, "duplicate": false}));
    assert_eq!(b.2, serde_json::json!({"offset": 101, "duplicate": true}));
    assert_eq!(sink.events()[1].dedupe_key.as_deref(), Some("small:msg_dup"));
}

#[tokio::test]
async fn odd_input_gets_json_answers_and_never_panics() {
    let (base, sink) = start().await;
    let client = reqwest::Client::new();
    let url = format!("{base}/hooks/ada/small");
    let binary = reqwest::header::HeaderValue::from_bytes(&[b'a', 0xff, 0x80, b'z']).unwrap();
    let huge = "h".repeat(32 * 1024);

    // Empty body.
    let (status, _, json) = answer(client.post(&url)).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{json}");
    // Non-UTF-8 values in informational headers are kept lossily.
    let (status, _, json) = answer(client.post(&url).header("x-weird", binary.clone()).body("b")).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{json}");
    // ...but identity headers must be real text of bounded size.
    for (name, value) in [
        ("x-conversation-id", binary.clone()),
        ("x-sender", reqwest::header::HeaderValue::from_str(&huge).unwrap()),
        ("idempotency-key", reqwest::header::HeaderValue::from_str(&huge).unwrap()),
        ("content-type", binary.clone()),
    ] {
        let (status, _, json) = answer(client.post(&url).header(name, value).body("b")).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{name}: {json}");
        assert!(error_of(&json).contains(name), "{json}");
    }
    // Huge informational header: accepted, truncated in meta.
    let (status, _, json) = answer(client.post(&url).header("x-big", huge.as_str()).body("b")).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{json}");
    let big = sink.events().last().unwrap().meta.iter().find(|(n, _)| n == "x-big").unwrap().1.clone();
    assert!(big.len() <= 256);
    // Non-ASCII signature header on a signed route.
    let (status, _, json) = answer(
        client
            .post(format!("{base}/hooks/ada/orders"))
            .header("webhook-id", "x")
            .header("webhook-timestamp", now_secs().to_string())
            .header("webhook-signature", binary)
            .body("b"),
    )
    .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{json}");
    // Non-JSON body declared as JSON: stored, no text.
    let (status, _, _) =
        answer(client.post(&url).header("content-type", "application/json").body(&b"\xff{not json"[..])).await;
    assert_eq!(status, StatusCode::ACCEPTED);
    assert_eq!(sink.events().last().unwrap().text, None);
    // Non-UTF-8 text/* body: stored byte for byte, no text.
    let (status, _, _) = answer(client.post(&url).header("content-type", "text/plain").body(&b"caf\xe9"[..])).await;
    assert_eq!(status, StatusCode::ACCEPTED);
    let last = sink.events().last().unwrap().clone();
    assert_eq!((last.raw.as_slice(), last.text), (&b"caf\xe9"[..], None));
}

// ---- send_reply against a test receiver ----

#[derive(Clone, Default)]
struct Receiver {
    seen: Arc<Mutex<Vec<(HeaderMap, Bytes)>>>,
    status: Arc<Mutex<StatusCode>>,
    reply_body: Arc<Mutex<String>>,
}

async fn receive(State(r): State<Receiver>, headers: HeaderMap, body: Bytes) -> (StatusCode, String) {
    r.seen.lock().unwrap().push((headers, body));
    (*r.status.lock().unwrap(), r.reply_body.lock().unwrap().clone())
}

async fn receiver() -> (String, Receiver) {
    let r = Receiver::default();
    *r.status.lock().unwrap() = StatusCode::OK;
    let app = axum::Router::new().route("/reply", axum::routing::post(receive)).with_state(r.clone());
    let addr = serve(app).await;
    (format!("http://{addr}/reply"), r)
}

fn send_request(key: &str) -> SendRequest {
    SendRequest {
        idempotency_key: key.into(),
        channel: ChannelRef::new("webhook", "orders"),
        conversation: "order-7".into(),
        body: "shipped \u{1f4e6}".into(),
        reply_to: Some(100),
    }
}

#[tokio::test]
async fn send_reply_posts_signed_fields_and_maps_2xx_to_ok() {
    let (url, r) = receiver().await;
    let secret = b"reply-secret".to_vec();
    let target = ReplyTarget { url, secret: Some(secret.clone()) };
    let client = reqwest::Client::new();
    let got = webhook::send_reply(&client, "ada", &target, &send_request("idem-1")).await;
    assert_eq!(got, SendResult::Ok { platform_ids: vec!["idem-1".into()] });

    let seen = r.seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 1);
    let (headers, body) = &seen[0];
    let h = |name: &str| headers.get(name).map(|v| v.to_str().unwrap());
    assert_eq!(h("webhook-id"), Some("idem-1"));
    assert_eq!(h("content-type"), Some("application/json"));
    signature::standard_verify(
        &[secret],
        h("webhook-id"),
        h("webhook-timestamp"),
        h("webhook-signature"),
        body,
        now_secs(),
    )
    .expect("the receiver can verify the reply");
    let json: Value = serde_json::from_slice(body).unwrap();
    assert_eq!(
        json,
        serde_json::json!({
            "agent": "ada",
            "channel": {"kind": "webhook", "name": "orders"},
            "conversation": "order-7",
            "body": "shipped \u{1f4e6}",
            "reply_to": 100,
            "idempotency_key": "idem-1",
        })
    );

    // Without a secret: unsigned, but still carries webhook-id for receiver-side dedupe.
    let unsigned = ReplyTarget { url: target.url.clone(), secret: None };
    let got = webhook::send_reply(&client, "ada", &unsigned, &send_request("idem-2")).await;
    assert_eq!(got, SendResult::Ok { platform_ids: vec!["idem-2".into()] });
    let seen = r.seen.lock().unwrap().clone();
    assert_eq!(seen[1].0["webhook-id"], "idem-2");
    assert!(!seen[1].0.contains_key("webhook-signature"));
}

fn err_parts(result: SendResult) -> (String, String, bool) {
    match result {
        SendResult::Err { code, message, retryable } => (code, message, retryable),
        ok => panic!("expected an error, got {ok:?}"),
    }
}

#[tokio::test]
async fn send_reply_maps_4xx_5xx_and_429() {
    let (url, r) = receiver().await;
    let target = ReplyTarget { url, secret: None };
    let client = reqwest::Client::new();

    *r.status.lock().unwrap() = StatusCode::UNPROCESSABLE_ENTITY;
    *r.reply_body.lock().unwrap() = format!("bad conversation{}", "!".repeat(2000));
    let (code, message, retryable) = err_parts(webhook::send_reply(&client, "ada", &target, &send_request("k1")).await);
    assert_eq!((code.as_str(), retryable), ("rejected", false));
    assert!(message.contains("422") && message.contains("bad conversation"), "{message}");
    assert!(message.len() < 512 + 100, "body excerpt must be bounded: {} bytes", message.len());

    *r.status.lock().unwrap() = StatusCode::BAD_GATEWAY;
    *r.reply_body.lock().unwrap() = "try later".into();
    let (code, message, retryable) = err_parts(webhook::send_reply(&client, "ada", &target, &send_request("k2")).await);
    assert_eq!((code.as_str(), retryable), ("upstream_error", true));
    assert!(message.contains("502") && message.contains("try later"), "{message}");

    *r.status.lock().unwrap() = StatusCode::TOO_MANY_REQUESTS;
    let (code, _, retryable) = err_parts(webhook::send_reply(&client, "ada", &target, &send_request("k3")).await);
    assert_eq!((code.as_str(), retryable), ("rate_limited", true));
}

#[tokio::test]
async fn send_reply_unreachable_says_whether_the_outcome_is_unknown() {
    let client = reqwest::Client::new();
    // Nothing listens on a port we bound and released: the request was never sent.
    let closed = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap().local_addr().unwrap();
    let target = ReplyTarget { url: format!("http://{closed}/reply?token=hush"), secret: None };
    let (code, message, retryable) = err_parts(webhook::send_reply(&client, "ada", &target, &send_request("k")).await);
    assert_eq!((code.as_str(), retryable), ("unreachable", true));
    assert!(message.contains("nothing was sent"), "{message}");
    assert!(!message.contains("hush"), "URL (and its token) leaked: {message}");

    // A receiver that reads the request and hangs up without answering: outcome unknown.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        use tokio::io::AsyncReadExt;
        while let Ok((mut socket, _)) = listener.accept().await {
            let mut buf = vec![0u8; 64 * 1024];
            let _ = socket.read(&mut buf).await;
            drop(socket);
        }
    });
    let target = ReplyTarget { url: format!("http://{addr}/reply"), secret: None };
    let (code, message, retryable) = err_parts(webhook::send_reply(&client, "ada", &target, &send_request("k")).await);
    assert_eq!((code.as_str(), retryable), ("unreachable", true));
    assert!(message.contains("outcome unknown"), "{message}");

    let bad = ReplyTarget { url: "not a url".into(), secret: None };
    let (code, _, retryable) = err_parts(webhook::send_reply(&client, "ada", &bad, &send_request("k")).await);
    assert_eq!((code.as_str(), retryable), ("invalid_target", false));
}

#[tokio::test]
async fn send_reply_times_out_after_ten_seconds_with_outcome_unknown() {
    // Accepts and never answers.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((socket, _)) = listener.accept().await {
            held.push(socket);
        }
    });
    let target = ReplyTarget { url: format!("http://{addr}/reply"), secret: None };
    let started = std::time::Instant::now();
    let result = webhook::send_reply(&reqwest::Client::new(), "ada", &target, &send_request("k")).await;
    let elapsed = started.elapsed();
    let (code, message, retryable) = err_parts(result);
    assert_eq!((code.as_str(), retryable), ("unreachable", true));
    assert!(message.contains("outcome unknown") && message.contains("10 s"), "{message}");
    assert!(elapsed >= Duration::from_secs(10) && elapsed < Duration::from_secs(20), "{elapsed:?}");
}

#[tokio::test]
async fn send_reply_refuses_keys_that_cannot_be_a_header() {
    let (url, r) = receiver().await;
    let target = ReplyTarget { url, secret: None };
    let (code, _, retryable) =
        err_parts(webhook::send_reply(&reqwest::Client::new(), "ada", &target, &send_request("line\nbreak")).await);
    assert_eq!((code.as_str(), retryable), ("invalid_request", false));
    assert!(r.seen.lock().unwrap().is_empty());
}
