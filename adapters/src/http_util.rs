//! Small HTTP helpers shared by the platform adapters: JSON error answers, bounded body reads
//! in both directions, constant-time secret comparison, and the WebSocket limits of the held
//! sockets (Slack, Discord).

use std::time::Duration;

use axum::Json;
use axum::body::{Body, Bytes};
use axum::http::header::{CONTENT_LENGTH, RETRY_AFTER};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::SinkError;

/// How long a sender may take to deliver a request body once the headers are in.
const BODY_READ_TIMEOUT: Duration = Duration::from_secs(30);

/// A JSON error answer (`{"error": "..."}`), optionally with `Retry-After`.
pub(crate) fn error(status: StatusCode, message: impl Into<String>, retry_after: Option<u64>) -> Response {
    let mut r = (status, Json(serde_json::json!({ "error": message.into() }))).into_response();
    if let Some(secs) = retry_after {
        r.headers_mut().insert(RETRY_AFTER, HeaderValue::from(secs));
    }
    r
}

/// The answer for a sink failure: 503 when the store is down, 429 for backpressure. Both make
/// Telegram and Meta redeliver later.
pub(crate) fn sink_error(e: &SinkError) -> Response {
    match e {
        SinkError::Unavailable(_) => {
            error(StatusCode::SERVICE_UNAVAILABLE, "event store unavailable; retry later", Some(1))
        }
        SinkError::Rejected(_) => error(
            StatusCode::TOO_MANY_REQUESTS,
            "the proxy is not accepting events for this agent right now (backpressure); retry later",
            Some(5),
        ),
    }
}

/// Reads a request body of at most `max` bytes (by `Content-Length` first, then while reading).
pub(crate) async fn read_request_body(body: Body, headers: &HeaderMap, max: usize) -> Result<Bytes, Response> {
    let too_large = || error(StatusCode::PAYLOAD_TOO_LARGE, format!("body exceeds the limit of {max} bytes"), None);
    let declared = headers.get(CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.trim().parse::<u64>().ok());
    if declared.is_some_and(|n| n > max as u64) {
        return Err(too_large());
    }
    match tokio::time::timeout(BODY_READ_TIMEOUT, axum::body::to_bytes(body, max)).await {
        Err(_) => Err(error(StatusCode::REQUEST_TIMEOUT, "request body not received in time", None)),
        Ok(Err(_)) => Err(too_large()),
        Ok(Ok(b)) => Ok(b),
    }
}

/// Reads a platform response body of at most `max` bytes; longer bodies are an error.
pub(crate) async fn read_response(mut resp: reqwest::Response, max: usize) -> Result<Vec<u8>, String> {
    let mut out = Vec::new();
    while let Some(chunk) = resp.chunk().await.map_err(|e| e.without_url().to_string())? {
        if out.len() + chunk.len() > max {
            return Err(format!("response larger than {max} bytes"));
        }
        out.extend_from_slice(&chunk);
    }
    Ok(out)
}

/// Compares two secrets in constant time, length included (both are hashed first).
pub(crate) fn secret_eq(given: &[u8], expected: &[u8]) -> bool {
    let a: [u8; 32] = Sha256::digest(given).into();
    let b: [u8; 32] = Sha256::digest(expected).into();
    a.ct_eq(&b).into()
}

/// Shortens attacker-supplied text before echoing it in an error message.
pub(crate) fn echo(s: &str) -> String {
    let mut out: String = s.chars().take(64).collect();
    if out.len() < s.len() {
        out.push('…');
    }
    out
}

/// Read and write buffer of every held WebSocket: tungstenite's default read buffer is
/// 128 KiB per socket, which would dominate the memory of an idle connection.
const WS_BUFFER: usize = 4096;

/// The WebSocket limits of a held platform socket: small explicit buffers, and messages and
/// frames bounded by `max_message` (the platform's largest documented payload).
pub fn ws_config(max_message: usize) -> tokio_tungstenite::tungstenite::protocol::WebSocketConfig {
    tokio_tungstenite::tungstenite::protocol::WebSocketConfig::default()
        .read_buffer_size(WS_BUFFER)
        .write_buffer_size(WS_BUFFER)
        .max_write_buffer_size(max_message)
        .max_message_size(Some(max_message))
        .max_frame_size(Some(max_message))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secret_comparison() {
        assert!(secret_eq(b"abc", b"abc"));
        assert!(!secret_eq(b"abc", b"abd"));
        assert!(!secret_eq(b"abc", b"abcd"));
        assert!(!secret_eq(b"", b"x"));
    }
}
