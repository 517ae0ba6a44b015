//! Small helpers shared by the drivers: error text that never leaks secrets, bounded body reads.

use std::error::Error as StdError;

/// The HTTP client the `http` and `fly` drivers take. Build one and give it to every driver:
/// its pool then lets the wakes of agents behind one orchestrator reuse keep-alive (and TLS)
/// connections, where a client per driver opened a new connection for every wake (a
/// 1,000-agent storm: 1,000 TCP handshakes) and kept its own TLS setup per agent.
pub fn http_client() -> Result<reqwest::Client, crate::WakeError> {
    reqwest::Client::builder()
        // A redirected POST silently turns into a GET: refuse instead.
        .redirect(reqwest::redirect::Policy::none())
        .user_agent(concat!("concierge-wakeup/", env!("CARGO_PKG_VERSION")))
        .build()
        .map_err(|err| {
            crate::WakeError::permanent(format!("cannot build the wake drivers' HTTP client: {}", reqwest_error(err)))
        })
}

/// Renders an error and its sources as one line ("a: b: c"), skipping repeated messages.
pub(crate) fn error_chain(err: &(dyn StdError + 'static)) -> String {
    let mut out = err.to_string();
    let mut source = err.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = s.source();
    }
    out
}

/// Describes a reqwest failure without its URL (which may carry credentials in the query).
pub(crate) fn reqwest_error(err: reqwest::Error) -> String {
    error_chain(&err.without_url())
}

/// A URL as it may appear in messages: scheme, host, port and path, never query or user info.
pub(crate) fn display_url(url: &reqwest::Url) -> String {
    let mut shown = format!("{}://{}", url.scheme(), url.host_str().unwrap_or("?"));
    if let Some(port) = url.port() {
        shown.push_str(&format!(":{port}"));
    }
    shown.push_str(url.path());
    shown
}

/// Reads at most `max` bytes of a response body (the rest is discarded with the response),
/// so a misbehaving server cannot make a driver buffer an unbounded error page.
pub(crate) async fn body_prefix(mut resp: reqwest::Response, max: usize) -> Vec<u8> {
    let mut out = Vec::new();
    while out.len() < max {
        match resp.chunk().await {
            Ok(Some(chunk)) => {
                let take = chunk.len().min(max - out.len());
                out.extend_from_slice(&chunk[..take]);
            }
            Ok(None) | Err(_) => break,
        }
    }
    out
}

/// Lossy text of at most `max` bytes, trimmed, for inclusion in an error message.
pub(crate) fn snippet(bytes: &[u8], max: usize) -> String {
    let cut = &bytes[..bytes.len().min(max)];
    String::from_utf8_lossy(cut).trim().to_string()
}
