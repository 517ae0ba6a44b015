//! HMAC signatures for HTTP traffic in both directions: verifying inbound webhooks and signing
//! what Concierge POSTs (replies, wake requests).
//!
//! The main scheme is the Standard Webhooks spec: `webhook-id`, `webhook-timestamp` (Unix
//! seconds) and `webhook-signature` (space-separated `v1,<base64>` entries) over
//! `{id}.{timestamp}.{body}`, keyed by a secret written `whsec_<base64>`. The second is the
//! common "HMAC-SHA256 of the raw body, hex, in one header" used by many providers.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use hmac::{Hmac, Mac};
use sha2::Sha256;
use subtle::ConstantTimeEq;

type HmacSha256 = Hmac<Sha256>;

/// How far a Standard Webhooks timestamp may be from now, either way (replay window).
pub const TIMESTAMP_TOLERANCE_SECS: i64 = 5 * 60;

/// Why a signature did not verify. Messages never contain secrets or expected values.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SignatureError {
    /// A required header is absent.
    #[error("missing header {0}")]
    MissingHeader(&'static str),
    /// The timestamp is not an integer.
    #[error("webhook-timestamp is not a Unix timestamp")]
    BadTimestamp,
    /// The timestamp is outside the replay window.
    #[error("webhook-timestamp is {0} s away from now (tolerance {TIMESTAMP_TOLERANCE_SECS} s)")]
    Stale(i64),
    /// No signature matched.
    #[error("no signature matches")]
    Mismatch,
}

/// Decodes a Standard Webhooks secret (`whsec_<base64>`); other strings are used as raw bytes.
pub fn secret_bytes(secret: &str) -> Vec<u8> {
    match secret.strip_prefix("whsec_").map(|b| B64.decode(b)) {
        Some(Ok(bytes)) => bytes,
        _ => secret.as_bytes().to_vec(),
    }
}

fn hmac(key: &[u8], parts: &[&[u8]]) -> [u8; 32] {
    // HMAC accepts keys of any length, so construction cannot fail.
    let mut mac = HmacSha256::new_from_slice(key).expect("HMAC takes keys of any size");
    for p in parts {
        mac.update(p);
    }
    mac.finalize().into_bytes().into()
}

/// The `webhook-signature` value (`v1,<base64>`) for a message.
pub fn standard_sign(secret: &[u8], id: &str, timestamp: i64, body: &[u8]) -> String {
    let ts = timestamp.to_string();
    let mac = hmac(secret, &[id.as_bytes(), b".", ts.as_bytes(), b".", body]);
    format!("v1,{}", B64.encode(mac))
}

/// The three Standard Webhooks headers for a message Concierge sends.
pub fn standard_headers(secret: &[u8], id: &str, timestamp: i64, body: &[u8]) -> [(&'static str, String); 3] {
    [
        ("webhook-id", id.to_string()),
        ("webhook-timestamp", timestamp.to_string()),
        ("webhook-signature", standard_sign(secret, id, timestamp, body)),
    ]
}

/// Verifies a Standard Webhooks message against any of `secrets` (several allow rotation).
pub fn standard_verify(
    secrets: &[Vec<u8>],
    id: Option<&str>,
    timestamp: Option<&str>,
    signature: Option<&str>,
    body: &[u8],
    now_secs: i64,
) -> Result<(), SignatureError> {
    let id = id.ok_or(SignatureError::MissingHeader("webhook-id"))?;
    let ts_text = timestamp.ok_or(SignatureError::MissingHeader("webhook-timestamp"))?;
    let signature = signature.ok_or(SignatureError::MissingHeader("webhook-signature"))?;
    let ts: i64 = ts_text.trim().parse().map_err(|_| SignatureError::BadTimestamp)?;
    let skew = ts.saturating_sub(now_secs);
    // `unsigned_abs`: `abs` overflows (panics in debug) for a timestamp of i64::MIN.
    if skew.unsigned_abs() > TIMESTAMP_TOLERANCE_SECS.unsigned_abs() {
        return Err(SignatureError::Stale(skew));
    }
    let mut matched = false;
    for secret in secrets {
        let expected = hmac(secret, &[id.as_bytes(), b".", ts_text.trim().as_bytes(), b".", body]);
        for entry in signature.split_whitespace() {
            let Some(b64) = entry.strip_prefix("v1,") else { continue };
            let Ok(given) = B64.decode(b64) else { continue };
            // Compare every candidate so timing reveals nothing about which one matched.
            matched |= bool::from(given.ct_eq(&expected));
        }
    }
    if matched { Ok(()) } else { Err(SignatureError::Mismatch) }
}

/// Hex HMAC-SHA256 of the body, as carried by single-header schemes (`sha256=` prefix optional).
pub fn body_sign_hex(secret: &[u8], body: &[u8]) -> String {
    hex::encode(hmac(secret, &[body]))
}

/// Verifies a single-header hex HMAC-SHA256 of the body, with or without a `sha256=` prefix.
pub fn body_verify_hex(
    secret: &[u8],
    header: Option<&str>,
    header_name: &'static str,
    body: &[u8],
) -> Result<(), SignatureError> {
    let value = header.ok_or(SignatureError::MissingHeader(header_name))?.trim();
    let value = value.strip_prefix("sha256=").unwrap_or(value);
    let given = hex::decode(value).map_err(|_| SignatureError::Mismatch)?;
    let expected = hmac(secret, &[body]);
    if bool::from(given.ct_eq(&expected)) { Ok(()) } else { Err(SignatureError::Mismatch) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn standard_round_trip_and_rotation() {
        let old = secret_bytes("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw");
        let new = b"second".to_vec();
        let sig = standard_sign(&new, "msg_1", 1000, b"{}");
        assert_eq!(standard_verify(&[old.clone(), new], Some("msg_1"), Some("1000"), Some(&sig), b"{}", 1010), Ok(()));
        assert_eq!(
            standard_verify(&[old], Some("msg_1"), Some("1000"), Some(&sig), b"{}", 1010),
            Err(SignatureError::Mismatch)
        );
    }

    #[test]
    fn standard_rejects_tampering_staleness_and_missing_headers() {
        let k = vec![b"k".to_vec()];
        let sig = standard_sign(&k[0], "id", 1000, b"body");
        assert_eq!(
            standard_verify(&k, Some("id"), Some("1000"), Some(&sig), b"bodY", 1000),
            Err(SignatureError::Mismatch)
        );
        assert_eq!(
            standard_verify(&k, Some("id2"), Some("1000"), Some(&sig), b"body", 1000),
            Err(SignatureError::Mismatch)
        );
        assert_eq!(
            standard_verify(&k, Some("id"), Some("1000"), Some(&sig), b"body", 1000 + 301),
            Err(SignatureError::Stale(-301))
        );
        assert_eq!(
            standard_verify(&k, Some("id"), Some("x"), Some(&sig), b"body", 1000),
            Err(SignatureError::BadTimestamp)
        );
        assert_eq!(
            standard_verify(&k, None, Some("1000"), Some(&sig), b"body", 1000),
            Err(SignatureError::MissingHeader("webhook-id"))
        );
    }

    #[test]
    fn known_vector_from_the_spec_format() {
        // Computed independently with Python's hmac module:
        // base64(hmac_sha256(b"secret", b"id.1.{}")).
        let sig = standard_sign(b"secret", "id", 1, b"{}");
        assert_eq!(sig, "v1,490pAcC1LQ1k1cOcmH0da199+A88OKCj0Io4WnJlp68=");
    }

    #[test]
    fn hex_body_scheme() {
        let sig = body_sign_hex(b"s", b"payload");
        assert_eq!(body_verify_hex(b"s", Some(&format!("sha256={sig}")), "x-sig", b"payload"), Ok(()));
        assert_eq!(body_verify_hex(b"s", Some(&sig), "x-sig", b"payloaD"), Err(SignatureError::Mismatch));
        assert_eq!(body_verify_hex(b"s", Some("zz"), "x-sig", b"payload"), Err(SignatureError::Mismatch));
        assert_eq!(body_verify_hex(b"s", None, "x-sig", b"payload"), Err(SignatureError::MissingHeader("x-sig")));
    }
}
