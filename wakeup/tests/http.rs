//! The `http` driver against a real (tiny) HTTP server.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use concierge_adapters::signature::standard_verify;
use concierge_wakeup::{ConnectInfo, DriverStatus, HttpDriver, HttpOptions, WakeDriver, WakeRequest};

const SECRET: &[u8] = b"wake-secret";

fn request() -> WakeRequest {
    WakeRequest {
        agent: "agent-1".to_string(),
        reason: "slack mention".to_string(),
        pending: 3,
        connect: ConnectInfo {
            addr: "proxy.example:4433".to_string(),
            server_name: "proxy.example".to_string(),
            cert_sha256: None,
        },
    }
}

/// Records every request and answers from a script (then 200).
#[derive(Clone, Default)]
struct Recorder {
    seen: Arc<Mutex<Vec<(HeaderMap, Bytes)>>>,
    script: Arc<Mutex<VecDeque<(StatusCode, String)>>>,
}

impl Recorder {
    fn seen(&self) -> Vec<(HeaderMap, Bytes)> {
        self.seen.lock().expect("lock").clone()
    }
}

async fn handler(State(rec): State<Recorder>, headers: HeaderMap, body: Bytes) -> (StatusCode, String) {
    rec.seen.lock().expect("lock").push((headers, body));
    rec.script.lock().expect("lock").pop_front().unwrap_or((StatusCode::OK, "woken".to_string()))
}

async fn serve(script: Vec<(StatusCode, String)>) -> (String, Recorder) {
    let rec = Recorder { script: Arc::new(Mutex::new(script.into())), ..Recorder::default() };
    let app = Router::new().route("/wake", post(handler)).with_state(rec.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move { axum::serve(listener, app).await });
    (format!("http://{addr}/wake"), rec)
}

fn driver(url: &str, secret: Option<&[u8]>, timeout: Duration) -> HttpDriver {
    HttpDriver::new(HttpOptions {
        url: url.to_string(),
        secret: secret.map(<[u8]>::to_vec),
        timeout,
        client: concierge_wakeup::http_client().expect("client"),
    })
    .expect("valid options")
}

fn now() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).expect("clock").as_secs() as i64
}

fn header<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

#[tokio::test]
async fn signed_post_verifies_and_carries_the_wake_request() {
    let (url, rec) = serve(vec![]).await;
    let d = driver(&url, Some(SECRET), Duration::from_secs(5));
    d.wake(&request()).await.expect("wake ok");
    let seen = rec.seen();
    assert_eq!(seen.len(), 1);
    let (headers, body) = &seen[0];
    assert_eq!(
        standard_verify(
            &[SECRET.to_vec()],
            header(headers, "webhook-id"),
            header(headers, "webhook-timestamp"),
            header(headers, "webhook-signature"),
            body,
            now(),
        ),
        Ok(())
    );
    assert!(header(headers, "webhook-id").is_some_and(|id| id.starts_with("wake_")));
    assert_eq!(header(headers, "content-type"), Some("application/json"));
    let json: serde_json::Value = serde_json::from_slice(body).expect("json body");
    assert_eq!(
        json,
        serde_json::json!({
            "agent": "agent-1",
            "reason": "slack mention",
            "pending": 3,
            "connect": { "addr": "proxy.example:4433", "server_name": "proxy.example", "cert_sha256": null },
        })
    );
    // A wrong secret does not verify: the signature really covers the body.
    assert!(
        standard_verify(
            &[b"other".to_vec()],
            header(headers, "webhook-id"),
            header(headers, "webhook-timestamp"),
            header(headers, "webhook-signature"),
            body,
            now(),
        )
        .is_err()
    );
    // Http cannot sleep, and says so.
    assert!(!d.can_sleep());
    assert!(d.sleep("agent-1").await.is_err_and(|e| !e.retryable));
    assert_eq!(d.status("agent-1").await, Ok(DriverStatus::Unknown));
}

#[tokio::test]
async fn without_a_secret_the_request_is_unsigned() {
    let (url, rec) = serve(vec![]).await;
    driver(&url, None, Duration::from_secs(5)).wake(&request()).await.expect("wake ok");
    let seen = rec.seen();
    assert!(seen[0].0.get("webhook-signature").is_none());
}

#[tokio::test]
async fn server_errors_are_retried_in_the_driver_with_the_same_id() {
    let (url, rec) = serve(vec![
        (StatusCode::INTERNAL_SERVER_ERROR, "warming up".into()),
        (StatusCode::BAD_GATEWAY, "still warming".into()),
    ])
    .await;
    let d = driver(&url, Some(SECRET), Duration::from_secs(5));
    d.wake(&request()).await.expect("third attempt succeeds");
    let seen = rec.seen();
    assert_eq!(seen.len(), 3);
    let ids: Vec<_> = seen.iter().map(|(h, _)| header(h, "webhook-id").map(str::to_owned)).collect();
    assert!(ids.iter().all(|id| id.is_some() && *id == ids[0]), "{ids:?}");
}

#[tokio::test]
async fn persistent_server_errors_are_retryable_and_quote_the_body() {
    let long_body = format!("upstream exploded {}", "x".repeat(4000));
    let (url, rec) = serve(vec![(StatusCode::SERVICE_UNAVAILABLE, long_body.clone()); 5]).await;
    let err = driver(&url, None, Duration::from_secs(5)).wake(&request()).await.expect_err("all fail");
    assert!(err.retryable, "{err:?}");
    assert!(err.message.contains("503") && err.message.contains("upstream exploded"), "{}", err.message);
    assert!(err.message.len() < 700, "body quote is bounded: {}", err.message.len());
    assert_eq!(rec.seen().len(), 3, "two retries, then the lifecycle takes over");
}

#[tokio::test]
async fn client_errors_are_permanent_and_not_retried() {
    let (url, rec) = serve(vec![(StatusCode::BAD_REQUEST, "unknown agent".into())]).await;
    let err = driver(&url, None, Duration::from_secs(5)).wake(&request()).await.expect_err("400");
    assert!(!err.retryable, "{err:?}");
    assert!(err.message.contains("400") && err.message.contains("unknown agent"), "{}", err.message);
    assert_eq!(rec.seen().len(), 1);
}

#[tokio::test]
async fn a_server_that_never_answers_is_a_retryable_timeout() {
    // Accepts connections and never answers.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((socket, _)) = listener.accept().await {
            held.push(socket);
        }
    });
    let d = driver(&format!("http://{addr}/wake"), Some(SECRET), Duration::from_millis(500));
    let started = Instant::now();
    let result = tokio::time::timeout(Duration::from_secs(5), d.wake(&request())).await.expect("bounded");
    let err = result.expect_err("times out");
    assert!(err.retryable, "{err:?}");
    assert!(err.message.contains("timed out"), "{}", err.message);
    assert!(started.elapsed() < Duration::from_secs(2), "took {:?}", started.elapsed());
}

#[tokio::test]
async fn connection_refused_is_retryable() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    drop(listener);
    let err = driver(&format!("http://{addr}/wake?token=hush"), None, Duration::from_secs(3))
        .wake(&request())
        .await
        .expect_err("nothing listens");
    assert!(err.retryable, "{err:?}");
    assert!(!err.message.contains("hush"), "query strings stay out of messages: {}", err.message);
}

#[tokio::test]
async fn invalid_urls_are_rejected_at_construction() {
    for url in ["not a url", "ftp://example.com/wake"] {
        let err = HttpDriver::new(HttpOptions {
            url: url.into(),
            secret: None,
            timeout: Duration::from_secs(1),
            client: concierge_wakeup::http_client().expect("client"),
        })
        .expect_err(url);
        assert!(!err.retryable);
    }
}

/// Drivers built with one client share its keep-alive connections: agents woken through the
/// same orchestrator do not each open a connection (what a client per driver did).
#[tokio::test]
async fn drivers_sharing_a_client_reuse_its_connections() {
    use axum::extract::ConnectInfo;
    use std::net::SocketAddr;
    let peers: Arc<Mutex<Vec<SocketAddr>>> = Arc::default();
    let seen = peers.clone();
    let app = Router::new().route(
        "/wake",
        post(move |ConnectInfo(peer): ConnectInfo<SocketAddr>| async move {
            seen.lock().expect("lock").push(peer);
            "woken"
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let url = format!("http://{}/wake", listener.local_addr().expect("addr"));
    tokio::spawn(async move { axum::serve(listener, app.into_make_service_with_connect_info::<SocketAddr>()).await });

    let client = concierge_wakeup::http_client().expect("client");
    for agent in 0..5 {
        let driver = HttpDriver::new(HttpOptions {
            url: url.clone(),
            secret: None,
            timeout: Duration::from_secs(5),
            client: client.clone(),
        })
        .expect("valid options");
        let mut req = request();
        req.agent = format!("agent-{agent}");
        driver.wake(&req).await.expect("woken");
    }
    let peers = peers.lock().expect("lock").clone();
    assert_eq!(peers.len(), 5, "one wake request per agent");
    assert!(peers.iter().all(|p| *p == peers[0]), "every wake used the first connection: {peers:?}");
}
