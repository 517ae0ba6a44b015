//! A fake of the WhatsApp Business Cloud API, written from Meta's documentation
//! (developers.facebook.com/docs/whatsapp/cloud-api), not from our adapter.
//!
//! Two halves:
//! - **Webhooks out** ([`FakeWhatsApp::deliver`]): builds notifications in Meta's shape
//!   (`{"object": "whatsapp_business_account", "entry": [{"id", "changes": [{"field":
//!   "messages", "value": {"messaging_product", "metadata", "contacts", "messages",
//!   "statuses"}}]}]}`), signs the exact body (`X-Hub-Signature-256: sha256=<hex HMAC-SHA256
//!   keyed by the app secret>`), POSTs it, and redelivers the same bytes on any non-200 answer
//!   (bounded attempts), recording every attempt. [`FakeWhatsApp::verify`] performs the `GET`
//!   subscription handshake (`hub.mode`, `hub.verify_token`, `hub.challenge`).
//! - **Graph API in**: `POST /{version}/{phone_number_id}/messages` with
//!   `Authorization: Bearer <token>` (190 `OAuthException` otherwise). Accepted messages are
//!   recorded and answered `{"messaging_product": "whatsapp", "contacts": [{"input", "wa_id"}],
//!   "messages": [{"id": "wamid...."}]}`. A recipient whose window was closed with
//!   [`FakeWhatsApp::close_window`] gets error `131047` (re-engagement message); with a rate
//!   limit set, excess sends get `130429`.

#![warn(missing_docs)]

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use serde_json::{Value, json};

/// One accepted Graph send.
#[derive(Clone, Debug)]
pub struct GraphSend {
    /// The phone number id in the URL.
    pub phone_number_id: String,
    /// The message object as posted.
    pub body: Value,
    /// The wamid given to it.
    pub wamid: String,
    /// When it was accepted.
    pub at: Instant,
}

/// One webhook delivery attempt.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Attempt {
    /// HTTP status (0 = no answer).
    pub status: u16,
    /// The answer's body.
    pub body: String,
}

#[derive(Default)]
struct Graph {
    sends: Vec<GraphSend>,
    closed: HashSet<String>,
    refused: u64,
}

struct Inner {
    access_token: String,
    graph: Mutex<Graph>,
    /// Most accepted sends per second, `None` = unlimited.
    rate: Option<u32>,
    seq: AtomicU64,
}

/// A running fake: the Graph API server and the webhook sender.
#[derive(Clone)]
pub struct FakeWhatsApp {
    inner: Arc<Inner>,
    app_secret: Vec<u8>,
    client: reqwest::Client,
    /// Base URL to configure as `graph_base`.
    pub graph_base: String,
}

impl FakeWhatsApp {
    /// Starts the Graph API fake; webhooks are signed with `app_secret`, sends must carry
    /// `access_token`; `rate` caps accepted sends per second (130429 beyond it).
    pub async fn start(app_secret: &str, access_token: &str, rate: Option<u32>) -> anyhow::Result<FakeWhatsApp> {
        let inner = Arc::new(Inner {
            access_token: access_token.to_string(),
            graph: Mutex::default(),
            rate,
            seq: AtomicU64::new(0),
        });
        let app = Router::new().route("/{version}/{phone}/messages", post(messages)).with_state(inner.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let graph_base = format!("http://{}", listener.local_addr()?);
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        let client = reqwest::Client::builder().timeout(Duration::from_secs(30)).build()?;
        Ok(FakeWhatsApp { inner, app_secret: app_secret.as_bytes().to_vec(), client, graph_base })
    }

    fn graph(&self) -> MutexGuard<'_, Graph> {
        self.inner.graph.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Sends accepted so far, in order.
    pub fn sends(&self) -> Vec<GraphSend> {
        self.graph().sends.clone()
    }

    /// Sends refused with an error so far.
    pub fn refused(&self) -> u64 {
        self.graph().refused
    }

    /// Marks `wa_id`'s 24-hour customer service window as closed: free-form sends to it fail
    /// with 131047.
    pub fn close_window(&self, wa_id: &str) {
        self.graph().closed.insert(wa_id.to_string());
    }

    /// `X-Hub-Signature-256` for `body` with this fake's app secret.
    pub fn signature(&self, body: &[u8]) -> String {
        format!("sha256={}", concierge_adapters::signature::body_sign_hex(&self.app_secret, body))
    }

    /// POSTs `body` to `url` signed with `signature` (`None` = the correct one), redelivering
    /// the same bytes on non-200 up to `attempts` times, `retry_delay` apart, as Meta does.
    pub async fn deliver_with(
        &self,
        url: &str,
        body: &str,
        signature: Option<&str>,
        attempts: u32,
        retry_delay: Duration,
    ) -> Vec<Attempt> {
        let sig = signature.map_or_else(|| self.signature(body.as_bytes()), str::to_string);
        let mut out = Vec::new();
        for i in 0..attempts.max(1) {
            if i > 0 {
                tokio::time::sleep(retry_delay).await;
            }
            let r = self
                .client
                .post(url)
                .header("content-type", "application/json")
                .header("X-Hub-Signature-256", &sig)
                .body(body.to_string())
                .send()
                .await;
            let attempt = match r {
                Ok(r) => {
                    let status = r.status().as_u16();
                    Attempt { status, body: r.text().await.unwrap_or_default() }
                }
                Err(e) => Attempt { status: 0, body: e.to_string() },
            };
            let done = attempt.status == 200;
            out.push(attempt);
            if done {
                break;
            }
        }
        out
    }

    /// Signs and POSTs `body` to `url`, redelivering on non-200 (at most 5 attempts, 200 ms apart).
    pub async fn deliver(&self, url: &str, body: &str) -> Vec<Attempt> {
        self.deliver_with(url, body, None, 5, Duration::from_millis(200)).await
    }

    /// The `GET` verification handshake: returns (status, body).
    pub async fn verify(&self, url: &str, verify_token: &str, challenge: &str) -> (u16, String) {
        let r = self
            .client
            .get(url)
            .query(&[("hub.mode", "subscribe"), ("hub.verify_token", verify_token), ("hub.challenge", challenge)])
            .send()
            .await;
        match r {
            Ok(r) => (r.status().as_u16(), r.text().await.unwrap_or_default()),
            Err(e) => (0, e.to_string()),
        }
    }
}

/// A text message object as it appears in `value.messages[]`.
pub fn text_message(from: &str, wamid: &str, text: &str) -> Value {
    json!({"from": from, "id": wamid, "timestamp": "1700000000", "type": "text", "text": {"body": text}})
}

/// A status object as it appears in `value.statuses[]`.
pub fn status(wamid: &str, recipient: &str, status: &str) -> Value {
    json!({"id": wamid, "status": status, "timestamp": "1700000001", "recipient_id": recipient,
        "conversation": {"id": "CONV", "origin": {"type": "service"}},
        "pricing": {"billable": true, "pricing_model": "CBP", "category": "service"}})
}

/// A notification body in Meta's shape: one entry, one `messages` change carrying `messages`
/// and `statuses` for `phone_number_id`.
pub fn notification(phone_number_id: &str, messages: Vec<Value>, statuses: Vec<Value>) -> String {
    let contacts: Vec<Value> = messages
        .iter()
        .filter_map(|m| m.get("from").and_then(Value::as_str))
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .map(|wa| json!({"profile": {"name": format!("Customer {wa}")}, "wa_id": wa}))
        .collect();
    let mut value = json!({
        "messaging_product": "whatsapp",
        "metadata": {"display_phone_number": "15550001234", "phone_number_id": phone_number_id},
    });
    if !messages.is_empty() {
        value["contacts"] = Value::Array(contacts);
        value["messages"] = Value::Array(messages);
    }
    if !statuses.is_empty() {
        value["statuses"] = Value::Array(statuses);
    }
    json!({"object": "whatsapp_business_account", "entry": [{"id": "102290129340398", "changes": [{"value": value, "field": "messages"}]}]})
        .to_string()
}

fn graph_error(status: StatusCode, code: i64, message: &str, details: &str) -> Response {
    let body = json!({"error": {"message": message, "type": "OAuthException", "code": code,
        "error_data": {"messaging_product": "whatsapp", "details": details}, "fbtrace_id": "AbCdEf"}});
    (status, axum::Json(body)).into_response()
}

async fn messages(
    State(inner): State<Arc<Inner>>,
    Path((_version, phone)): Path<(String, String)>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let auth = headers.get("authorization").and_then(|v| v.to_str().ok()).unwrap_or_default();
    if auth != format!("Bearer {}", inner.access_token) {
        return graph_error(StatusCode::UNAUTHORIZED, 190, "Invalid OAuth access token.", "");
    }
    let Ok(msg) = serde_json::from_slice::<Value>(&body) else {
        return graph_error(StatusCode::BAD_REQUEST, 100, "Invalid parameter", "body is not JSON");
    };
    if msg.get("messaging_product").and_then(Value::as_str) != Some("whatsapp") {
        return graph_error(StatusCode::BAD_REQUEST, 100, "Invalid parameter", "messaging_product is required");
    }
    let Some(to) = msg.get("to").and_then(Value::as_str).map(str::to_string) else {
        return graph_error(StatusCode::BAD_REQUEST, 100, "Invalid parameter", "to is required");
    };
    let mut graph = inner.graph.lock().unwrap_or_else(|e| e.into_inner());
    let is_template = msg.get("type").and_then(Value::as_str) == Some("template");
    if graph.closed.contains(&to) && !is_template {
        graph.refused += 1;
        return graph_error(
            StatusCode::BAD_REQUEST,
            131047,
            "(#131047) Re-engagement message",
            "Message failed to send because more than 24 hours have passed since the customer last replied to this number.",
        );
    }
    let now = Instant::now();
    if let Some(rate) = inner.rate {
        let recent = graph.sends.iter().rev().take_while(|s| now.duration_since(s.at) < Duration::from_secs(1)).count();
        if recent as u32 >= rate {
            graph.refused += 1;
            return graph_error(
                StatusCode::BAD_REQUEST,
                130429,
                "(#130429) Rate limit hit",
                "Cloud API message throughput has been reached.",
            );
        }
    }
    let n = inner.seq.fetch_add(1, Ordering::Relaxed);
    let wamid = format!("wamid.FAKE{n:012}");
    graph.sends.push(GraphSend { phone_number_id: phone, body: msg, wamid: wamid.clone(), at: now });
    (
        StatusCode::OK,
        axum::Json(json!({"messaging_product": "whatsapp", "contacts": [{"input": to, "wa_id": to}], "messages": [{"id": wamid}]})),
    )
        .into_response()
}
