//! DKIM signing of outbound replies: Ed25519-SHA256 (RFC 8463) with relaxed/relaxed
//! canonicalization (RFC 6376 §3.4.2 and §3.4.4). Our own, because lettre's `dkim` feature
//! pulls the `rsa` crate (RUSTSEC-2023-0071); RSA signing is not offered.
//!
//! The signature covers the body and, of From, To, Cc, Subject, Date, Message-ID, In-Reply-To
//! and References, those the message has (the last instance of each). The DNS record to
//! publish at `<selector>._domainkey.<domain>` is [`DkimSigner::dns_record`].

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use ed25519_dalek::{Signer as _, SigningKey};
use sha2::{Digest, Sha256};

/// Header fields signed when present, in this order.
pub const SIGNED_HEADERS: [&str; 8] =
    ["from", "to", "cc", "subject", "date", "message-id", "in-reply-to", "references"];

/// Signs messages for one `d=` domain and selector.
#[derive(Clone)]
pub struct DkimSigner {
    domain: String,
    selector: String,
    key: SigningKey,
}

impl std::fmt::Debug for DkimSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DkimSigner").field("domain", &self.domain).field("selector", &self.selector).finish()
    }
}

impl DkimSigner {
    /// A signer from the 32-byte Ed25519 private key (the RFC 8032 seed).
    pub fn new(domain: &str, selector: &str, seed: &[u8; 32]) -> Self {
        Self { domain: domain.to_ascii_lowercase(), selector: selector.to_string(), key: SigningKey::from_bytes(seed) }
    }

    /// The TXT record for `<selector>._domainkey.<domain>`: `v=DKIM1; k=ed25519; p=<public key>`.
    pub fn dns_record(&self) -> String {
        format!("v=DKIM1; k=ed25519; p={}", B64.encode(self.key.verifying_key().as_bytes()))
    }

    /// The DNS name the record belongs at.
    pub fn dns_name(&self) -> String {
        format!("{}._domainkey.{}", self.selector, self.domain)
    }

    /// `message` (CRLF line endings) with a `DKIM-Signature` header prepended; `timestamp` is
    /// the `t=` tag (seconds since the epoch).
    pub fn sign(&self, message: &[u8], timestamp: u64) -> Vec<u8> {
        let (head, body) = split(message);
        let fields = header_fields(head);
        let mut used = vec![false; fields.len()];
        let mut names = Vec::new();
        let mut hasher = Sha256::new();
        for name in SIGNED_HEADERS {
            // The last not-yet-signed instance (RFC 6376 §5.4.2).
            let Some(i) = (0..fields.len()).rev().find(|&i| !used[i] && fields[i].0.eq_ignore_ascii_case(name)) else {
                continue;
            };
            used[i] = true;
            names.push(name);
            hasher.update(relaxed_header(fields[i].1));
            hasher.update(b"\r\n");
        }
        let body_hash = B64.encode(Sha256::digest(relaxed_body(body)));
        let unsigned = format!(
            "DKIM-Signature: v=1; a=ed25519-sha256; c=relaxed/relaxed; d={}; s={};\r\n\tt={timestamp}; h={};\r\n\tbh={body_hash};\r\n\tb=",
            self.domain,
            self.selector,
            names.join(":"),
        );
        // The signature header itself, b= empty and without its CRLF, ends the hashed data.
        hasher.update(relaxed_header(unsigned.as_bytes()));
        let signature = self.key.sign(&hasher.finalize());
        let mut out = Vec::with_capacity(message.len() + unsigned.len() + 96);
        out.extend_from_slice(unsigned.as_bytes());
        out.extend_from_slice(B64.encode(signature.to_bytes()).as_bytes());
        out.extend_from_slice(b"\r\n");
        out.extend_from_slice(message);
        out
    }
}

/// Header section (each field with its CRLF) and body (after the empty line).
fn split(message: &[u8]) -> (&[u8], &[u8]) {
    if message.starts_with(b"\r\n") {
        return (&[], &message[2..]);
    }
    match message.windows(4).position(|w| w == b"\r\n\r\n") {
        Some(i) => (&message[..i + 2], &message[i + 4..]),
        None => (message, &[]),
    }
}

/// `(name, whole field without its final CRLF)`, continuation lines included.
fn header_fields(head: &[u8]) -> Vec<(&str, &[u8])> {
    let mut out: Vec<(&str, &[u8])> = Vec::new();
    let mut start = 0;
    let mut i = 0;
    while i < head.len() {
        let end = head[i..].windows(2).position(|w| w == b"\r\n").map_or(head.len(), |p| i + p);
        let next = (end + 2).min(head.len());
        let continues = matches!(head.get(next), Some(b' ' | b'\t'));
        if !continues {
            let field = &head[start..end];
            let name = field.iter().position(|&b| b == b':').map_or(field, |c| &field[..c]);
            if let Ok(name) = std::str::from_utf8(name) {
                out.push((name.trim_end_matches([' ', '\t']), field));
            }
            start = next;
        }
        i = next;
    }
    out
}

/// Relaxed header canonicalization (RFC 6376 §3.4.2) of one field, without a CRLF: name in
/// lower case, unfolded, runs of WSP as one SP, no WSP at the end or around the colon.
pub fn relaxed_header(field: &[u8]) -> Vec<u8> {
    let colon = field.iter().position(|&b| b == b':').unwrap_or(field.len());
    let mut out: Vec<u8> = field[..colon]
        .iter()
        .filter(|b| !matches!(b, b' ' | b'\t' | b'\r' | b'\n'))
        .map(u8::to_ascii_lowercase)
        .collect();
    out.push(b':');
    // WSP right after the colon is dropped, a run of WSP before a later character is one SP,
    // trailing WSP is never written.
    let (mut started, mut pending_space) = (false, false);
    for &b in field.get(colon + 1..).unwrap_or_default() {
        match b {
            b'\r' | b'\n' => {}
            b' ' | b'\t' => pending_space = started,
            _ => {
                if pending_space {
                    out.push(b' ');
                }
                (started, pending_space) = (true, false);
                out.push(b);
            }
        }
    }
    out
}

/// Relaxed body canonicalization (RFC 6376 §3.4.4): runs of WSP as one SP, no WSP at line ends,
/// no empty lines at the end, and a non-empty body ends with CRLF.
pub fn relaxed_body(body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(body.len());
    let mut empty_run = 0usize;
    // A final line without its CRLF still counts as a line.
    for raw in body.split_inclusive(|&b| b == b'\n') {
        let line = raw.strip_suffix(b"\n").unwrap_or(raw);
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        let mut canon = Vec::with_capacity(line.len());
        let mut pending_space = false;
        for &b in line {
            if b == b' ' || b == b'\t' {
                pending_space = true;
            } else {
                if pending_space {
                    canon.push(b' ');
                }
                pending_space = false;
                canon.push(b);
            }
        }
        if canon.is_empty() {
            empty_run += 1;
            continue;
        }
        for _ in 0..empty_run {
            out.extend_from_slice(b"\r\n");
        }
        empty_run = 0;
        out.extend_from_slice(&canon);
        out.extend_from_slice(b"\r\n");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// RFC 6376 §3.4.5's example, relaxed/relaxed.
    #[test]
    fn rfc6376_canonicalization_example() {
        let message = b"A: X\r\nB : Y\t\r\n\tZ  \r\n\r\n C \r\nD \t E\r\n\r\n\r\n";
        let (head, body) = split(message);
        let fields = header_fields(head);
        assert_eq!(fields.len(), 2);
        assert_eq!(relaxed_header(fields[0].1), b"a:X");
        assert_eq!(relaxed_header(fields[1].1), b"b:Y Z");
        assert_eq!(fields[1].0, "B");
        assert_eq!(relaxed_body(body), b" C\r\nD E\r\n");
    }

    #[test]
    fn body_edge_cases() {
        assert_eq!(relaxed_body(b""), b"");
        assert_eq!(relaxed_body(b"\r\n\r\n"), b"");
        assert_eq!(relaxed_body(b"x"), b"x\r\n");
        assert_eq!(relaxed_body(b"a\r\n\r\nb  \r\n\r\n"), b"a\r\n\r\nb\r\n");
        // RFC 6376 §3.4.3: an empty simple body hashes as CRLF, an empty relaxed one as nothing.
        assert_eq!(B64.encode(Sha256::digest(relaxed_body(b""))), "47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU=");
    }

    #[test]
    fn header_whitespace_around_colon_and_value() {
        assert_eq!(relaxed_header(b"Subject :   Re:  hello \t"), b"subject:Re: hello");
        assert_eq!(relaxed_header(b"References: <a@x>\r\n <b@x>"), b"references:<a@x> <b@x>");
        assert_eq!(relaxed_header(b"X:"), b"x:");
    }

    #[test]
    fn signs_the_present_headers_last_instance_first() {
        let signer = DkimSigner::new("Example.com", "sel", &[7u8; 32]);
        let msg = b"From: a@example.com\r\nTo: b@example.org\r\nSubject: one\r\nSubject: two\r\n\r\nhi\r\n";
        let signed = String::from_utf8(signer.sign(msg, 1_700_000_000)).unwrap();
        assert!(signed.starts_with("DKIM-Signature: v=1; a=ed25519-sha256; c=relaxed/relaxed; d=example.com; s=sel;"));
        assert!(signed.contains("h=from:to:subject;"), "{signed}");
        assert!(
            signed.ends_with(
                "\r\nFrom: a@example.com\r\nTo: b@example.org\r\nSubject: one\r\nSubject: two\r\n\r\nhi\r\n"
            )
        );
        assert!(signer.dns_record().starts_with("v=DKIM1; k=ed25519; p="));
        assert_eq!(signer.dns_name(), "sel._domainkey.example.com");
    }

    /// Whether python3 can import dkimpy (with PyNaCl for Ed25519); tries pip once.
    fn dkimpy() -> bool {
        let ok = || {
            std::process::Command::new("python3")
                .args(["-c", "import dkim, nacl.signing"])
                .output()
                .is_ok_and(|o| o.status.success())
        };
        ok() || {
            let _ =
                std::process::Command::new("python3").args(["-m", "pip", "install", "-q", "dkimpy", "pynacl"]).output();
            ok()
        }
    }

    /// dkimpy verifies `message` against `record` (served for any DNS name it asks).
    fn verify_with_dkimpy(message: &[u8], record: &str) -> String {
        let script = r#"
import sys, dkim
record = sys.argv[1].encode()
def dns(name, timeout=5):
    return record if name.startswith(b"sel._domainkey.example.com") else None
msg = sys.stdin.buffer.read()
print("pass" if dkim.verify(msg, dnsfunc=dns) else "fail")
"#;
        let mut child = std::process::Command::new("python3")
            .args(["-c", script, record])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        use std::io::Write as _;
        child.stdin.take().unwrap().write_all(message).unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success(), "dkimpy: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    /// A threaded reply built like `EmailSender` builds it, signed, verified by dkimpy; any
    /// change to a signed header or the body fails, re-folding whitespace does not (relaxed).
    #[test]
    fn dkimpy_verifies_signed_replies() {
        if !dkimpy() {
            // dkimpy present but unusable (no PyNaCl) is a broken setup, not a reason to skip.
            let importable = std::process::Command::new("python3")
                .args(["-c", "import dkim"])
                .output()
                .is_ok_and(|o| o.status.success());
            assert!(!importable, "dkimpy is installed but `import nacl.signing` fails: pip install pynacl");
            eprintln!("SKIPPED: python3 with dkimpy and pynacl unavailable (scripts/test installs them)");
            return;
        }
        let request = concierge_protocol::SendRequest {
            idempotency_key: "k1".into(),
            channel: concierge_protocol::ChannelRef::new("email", "support@example.com"),
            conversation: "<root@client.example>".into(),
            body: serde_json::json!({
                "to": ["Alice Example <alice@client.example>"],
                "cc": "bob@client.example",
                "subject": "Re:  Order   #42 ",
                "in_reply_to": "<p2@client.example>",
                "references": ["<root@client.example> <p1@client.example>"],
                "text": "Thanks!\n\nTrailing spaces   \n\tand tabs\n\n\n",
            })
            .to_string(),
            reply_to: Some(3),
        };
        let reply = crate::smtp::reply::build("helpdesk", "support@example.com", &request).unwrap();
        let signer = DkimSigner::new("example.com", "sel", &[42u8; 32]);
        let signed = signer.sign(&reply.bytes, 1_764_000_000);
        let text = String::from_utf8(signed.clone()).unwrap();
        assert!(text.contains("h=from:to:cc:subject:date:message-id:in-reply-to:references;"), "{text}");
        assert_eq!(verify_with_dkimpy(&signed, &signer.dns_record()), "pass", "{text}");

        // Relaxed canonicalization: extra spaces in a signed header and at line ends still verify.
        let refolded = text.replacen("Subject: ", "Subject:   ", 1).replacen("Thanks!\r\n", "Thanks!  \r\n", 1);
        assert_eq!(verify_with_dkimpy(refolded.as_bytes(), &signer.dns_record()), "pass");
        // Any real change fails.
        for (from, to) in
            [("Thanks!", "Thanks?"), ("Subject: Re: Order", "Subject: Re: Order!"), ("p2@client", "p3@client")]
        {
            let tampered = text.replacen(from, to, 1);
            assert_ne!(tampered, text, "{from}");
            assert_eq!(verify_with_dkimpy(tampered.as_bytes(), &signer.dns_record()), "fail", "{from} -> {to}");
        }
        // The wrong key fails.
        let other = DkimSigner::new("example.com", "sel", &[43u8; 32]);
        assert_eq!(verify_with_dkimpy(&signed, &other.dns_record()), "fail");
    }
}
