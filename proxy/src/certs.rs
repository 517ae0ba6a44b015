//! The proxy's TLS identity: a configured certificate, or a self-signed development
//! certificate generated once and kept in the data directory so its fingerprint (which
//! agents pin) survives restarts.

use std::path::Path;

use anyhow::Context as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};

/// Certificate chain, key, and the SHA-256 fingerprint of the leaf.
pub struct Identity {
    /// Leaf first.
    pub chain: Vec<CertificateDer<'static>>,
    /// Private key.
    pub key: PrivateKeyDer<'static>,
    /// Hex SHA-256 of the leaf, what agents pin.
    pub fingerprint: String,
}

/// Loads PEM files.
pub fn load(cert: &Path, key: &Path) -> anyhow::Result<Identity> {
    let chain = CertificateDer::pem_file_iter(cert)
        .with_context(|| format!("reading certificate {}", cert.display()))?
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("parsing certificate {}", cert.display()))?;
    let leaf = chain.first().with_context(|| format!("{} holds no certificate", cert.display()))?;
    let fingerprint = concierge_protocol::tls::fingerprint(leaf);
    let key = PrivateKeyDer::from_pem_file(key).with_context(|| format!("reading private key {}", key.display()))?;
    Ok(Identity { chain, key, fingerprint })
}

/// Loads the development certificate from `dir`, generating it on first use.
pub fn dev(dir: &Path, server_name: &str) -> anyhow::Result<Identity> {
    let cert_path = dir.join("dev-cert.pem");
    let key_path = dir.join("dev-key.pem");
    if !cert_path.exists() || !key_path.exists() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating data directory {}", dir.display()))?;
        let mut names = vec!["localhost".to_string(), server_name.to_string()];
        names.dedup();
        let generated = rcgen::generate_simple_self_signed(names).context("generating the development certificate")?;
        std::fs::write(&cert_path, generated.cert.pem()).with_context(|| format!("writing {}", cert_path.display()))?;
        write_private(&key_path, generated.signing_key.serialize_pem().as_bytes())?;
        tracing::info!(path = %cert_path.display(), "generated a self-signed development certificate");
    }
    load(&cert_path, &key_path)
}

fn write_private(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("writing {}", path.display()))?;
    f.write_all(bytes).with_context(|| format!("writing {}", path.display()))
}
