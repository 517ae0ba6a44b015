//! A configured certificate (`[tls] cert`/`key`) instead of the generated development one:
//! agents trust it through a CA (`Trust::Roots`, checking the server name) or by pin, and
//! the fingerprint the proxy prints is the leaf's SHA-256.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use concierge_protocol::client::{AgentClient, ClientError, ClientOptions};
use concierge_protocol::tls::Trust;
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
use sha2::{Digest as _, Sha256};

const SERVER_NAME: &str = "agents.concierge.test";

/// A CA and a leaf for [`SERVER_NAME`] signed by it.
struct Pki {
    ca_der: Vec<u8>,
    leaf_der: Vec<u8>,
    leaf_pem: String,
    leaf_key_pem: String,
}

fn ca_params(name: &str) -> CertificateParams {
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.distinguished_name.push(DnType::CommonName, name);
    params
}

fn pki() -> Pki {
    let ca_key = KeyPair::generate().unwrap();
    let params = ca_params("Concierge test CA");
    let ca = params.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(params, ca_key);
    let leaf_key = KeyPair::generate().unwrap();
    let leaf = CertificateParams::new(vec![SERVER_NAME.to_string()]).unwrap().signed_by(&leaf_key, &issuer).unwrap();
    Pki {
        ca_der: ca.der().to_vec(),
        leaf_der: leaf.der().to_vec(),
        leaf_pem: leaf.pem(),
        leaf_key_pem: leaf_key.serialize_pem(),
    }
}

fn roots(ca_der: &[u8]) -> Trust {
    let mut store = rustls::RootCertStore::empty();
    store.add(rustls::pki_types::CertificateDer::from(ca_der.to_vec())).unwrap();
    Trust::Roots(Arc::new(store))
}

fn options(proxy: &Proxy, trust: Trust, server_name: &str) -> ClientOptions {
    let mut o = ClientOptions::new(proxy.quic.clone(), "a", TOKEN, trust);
    o.server_name = server_name.to_string();
    o.reconnect_attempts = 1;
    o
}

/// Connects and expects the handshake to be refused; returns the error text.
async fn refused(opts: ClientOptions) -> String {
    match tokio::time::timeout(Duration::from_secs(20), AgentClient::connect(opts)).await {
        Err(_) => panic!("the refused handshake hung"),
        Ok(Ok(_)) => panic!("the handshake was accepted"),
        Ok(Err(e @ ClientError::Connection(_))) => e.to_string(),
        Ok(Err(other)) => panic!("expected a connection (handshake) error, got {other}"),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_configured_certificate_is_trusted_through_its_ca_and_its_pin() {
    let pki = pki();
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = (dir.path().join("leaf.pem"), dir.path().join("leaf-key.pem"));
    std::fs::write(&cert, &pki.leaf_pem).unwrap();
    std::fs::write(&key, &pki.leaf_key_pem).unwrap();
    let body = format!(
        "[tls]\ncert = \"{}\"\nkey = \"{}\"\n\n{}{}",
        cert.display(),
        key.display(),
        self_connecting_agent("a"),
        webhook_route("in", "a", "")
    );
    let server = format!("server_name = \"{SERVER_NAME}\"");
    let proxy = Proxy::start(&write_config_with(dir.path(), &Backend::Embedded, [0, 0, 0], &server, &body));

    // The printed fingerprint is the configured leaf's SHA-256, and no dev certificate was made.
    let leaf_sha256 = hex::encode(Sha256::digest(&pki.leaf_der));
    assert_eq!(proxy.cert_sha256, leaf_sha256, "the fingerprint on stdout");
    let logged =
        eventually(Duration::from_secs(10), || async { proxy.log().contains(&leaf_sha256).then_some(()) }).await;
    assert!(logged.is_some(), "the fingerprint in the log:\n{}", proxy.log());
    assert!(!dir.path().join("data").join("dev-cert.pem").exists(), "no development certificate");

    // Trusted through the CA, with the right server name: a working session.
    let mut agent = AgentClient::connect(options(&proxy, roots(&pki.ca_der), SERVER_NAME)).await.expect("CA trust");
    let (status, _) = proxy.post("a", "in", r#"{"text":"over the CA-verified session"}"#, Some("k1")).await;
    assert_eq!(status, 202);
    let events = receive_n(&mut agent, 1, Duration::from_secs(10)).await;
    assert_eq!(events[0].data.text.as_deref(), Some("over the CA-verified session"));
    agent.close().await;

    // Trusted by pin (the server name is not checked then).
    let pinned = AgentClient::connect(options(&proxy, Trust::Pinned(leaf_sha256.clone()), "anything")).await;
    pinned.expect("the printed pin is accepted").close().await;

    // Refused: a wrong server name, a CA that did not sign the leaf, a wrong pin.
    let e = refused(options(&proxy, roots(&pki.ca_der), "other.concierge.test")).await;
    assert!(e.contains("not valid for name") || e.contains("NotValidForName"), "{e}");
    let stranger = ca_params("Some other CA").self_signed(&KeyPair::generate().unwrap()).unwrap();
    let e = refused(options(&proxy, roots(stranger.der()), SERVER_NAME)).await;
    assert!(e.to_lowercase().contains("issuer") || e.contains("UnknownIssuer"), "{e}");
    let e = refused(options(&proxy, Trust::Pinned("00".repeat(32)), SERVER_NAME)).await;
    assert!(e.contains("does not match the pinned SHA-256"), "{e}");
}
