//! The SDK's first connect, against a scripted proxy over real QUIC: the proxy is not under
//! test here, and a script is the only way to end a session at an exact moment (before the
//! agent has read its Welcome), which the real proxy does only when a race goes one way.

use std::time::Duration;

use concierge_protocol::client::{AgentClient, ClientError, ClientOptions};
use concierge_protocol::io::{FrameReader, write_frame};
use concierge_protocol::tls::{Trust, fingerprint, server_config};
use concierge_protocol::{RejectCode, ToAgent, ToProxy};
use rustls::pki_types::PrivateKeyDer;

/// A QUIC endpoint with a fresh self-signed certificate, and the pin that trusts it.
fn scripted_proxy() -> (quinn::Endpoint, String) {
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".into()]).expect("certificate");
    let key = PrivateKeyDer::Pkcs8(cert.signing_key.serialize_der().into());
    let config = server_config(vec![cert.cert.der().clone()], key).expect("server config");
    let endpoint = quinn::Endpoint::server(config, "127.0.0.1:0".parse().unwrap()).expect("endpoint");
    (endpoint, fingerprint(cert.cert.der()))
}

/// Accepts one connection and reads its Hello.
async fn accept_hello(endpoint: &quinn::Endpoint) -> (quinn::Connection, quinn::SendStream) {
    let connection = endpoint.accept().await.expect("a connection").await.expect("handshake");
    let (send, recv) = connection.accept_bi().await.expect("the session stream");
    let hello = FrameReader::new(recv, 1 << 20).next::<ToProxy>().await.expect("a frame");
    assert!(matches!(hello, Some(ToProxy::Hello { .. })), "{hello:?}");
    (connection, send)
}

fn options(endpoint: &quinn::Endpoint, pin: String) -> ClientOptions {
    let addr = endpoint.local_addr().unwrap().to_string();
    let mut opts = ClientOptions::new(addr, "a", "token", Trust::Pinned(pin));
    opts.reconnect_initial = Duration::from_millis(10);
    opts
}

/// A proxy that ends the session before the agent read its Welcome ("log position moved;
/// reconnect") gets a second connect, and `connect` returns that session.
#[tokio::test]
async fn a_session_ended_before_its_welcome_is_opened_again() {
    let (endpoint, pin) = scripted_proxy();
    let opts = options(&endpoint, pin);
    let proxy = tokio::spawn(async move {
        let (first, _send) = accept_hello(&endpoint).await;
        first.close(7u32.into(), b"log position moved; reconnect");
        let (second, mut send) = accept_hello(&endpoint).await;
        let welcome = ToAgent::Welcome { session: "second".into(), epoch: 1, cursor: 0, backlog: 0 };
        write_frame(&mut send, &welcome).await.expect("Welcome sent");
        (endpoint, second, send)
    });
    let client = tokio::time::timeout(Duration::from_secs(10), AgentClient::connect(opts))
        .await
        .expect("connect returns")
        .expect("connect succeeds on the second session");
    assert_eq!(client.welcome().session, "second");
    let _keep_open = proxy.await.unwrap();
}

/// A refusal is final: `connect` returns it after one attempt.
#[tokio::test]
async fn a_rejected_first_session_is_an_error_at_once() {
    let (endpoint, pin) = scripted_proxy();
    let opts = options(&endpoint, pin);
    let proxy = tokio::spawn(async move {
        let (connection, mut send) = accept_hello(&endpoint).await;
        let reject = ToAgent::Reject { code: RejectCode::Unauthorized, message: "no".into() };
        write_frame(&mut send, &reject).await.expect("Reject sent");
        let again = tokio::time::timeout(Duration::from_millis(500), endpoint.accept()).await;
        (endpoint, connection, again.is_ok())
    });
    let result = tokio::time::timeout(Duration::from_secs(10), AgentClient::connect(opts)).await.expect("returns");
    assert!(matches!(result, Err(ClientError::Rejected { code: RejectCode::Unauthorized, .. })), "{:?}", result.err());
    let (_endpoint, _connection, connected_again) = proxy.await.unwrap();
    assert!(!connected_again, "a rejected agent must not try again");
}
