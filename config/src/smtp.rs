//! The `[smtp]` section: the inbound SMTP server, its address map, and the outbound relay.
//! A child module of `validate`, so it reuses the same error collection and scalar parsers.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use figment::value::Value;
use serde::Deserialize;

use super::{Ctx, Got, display_key};
use crate::raw::Text;
use crate::{Secret, TlsFiles};

/// `[smtp]`: inbound mail for agents (`address -> agent`) and, with `[smtp.relay]`, replies.
#[derive(Clone, Debug)]
pub struct SmtpConfig {
    /// TCP address of the SMTP listener.
    pub listen: SocketAddr,
    /// Name announced in the greeting and EHLO reply.
    pub hostname: String,
    /// Domains this server accepts mail for (lower case).
    pub domains: Vec<String>,
    /// Full lower-case address (`name@domain`, no `+tag`) -> agent id.
    pub addresses: BTreeMap<String, String>,
    /// Largest message accepted, in bytes (announced as SIZE, enforced while reading).
    pub max_message_size: u64,
    /// Recipients per message; more get 452.
    pub max_recipients: usize,
    /// Longest command line, CRLF included.
    pub max_line_length: usize,
    /// Concurrent SMTP sessions in total; more get 421.
    pub max_connections: usize,
    /// Concurrent SMTP sessions per client IP; more get 421.
    pub max_connections_per_ip: usize,
    /// Bad commands tolerated per session before it is closed (421).
    pub max_errors: u32,
    /// Idle time allowed while waiting for a command or the next DATA bytes.
    pub command_timeout: Duration,
    /// Longest a whole session may last (slowloris bound).
    pub session_timeout: Duration,
    /// Silence kept before the greeting; clients talking into it are rejected (554).
    pub greeting_delay: Duration,
    /// STARTTLS certificate and key; `None` = STARTTLS not offered.
    pub tls: Option<TlsFiles>,
    /// Upstream MTAs whose `Authentication-Results` headers are passed through.
    pub trusted_relays: Vec<IpNet>,
    /// Only `Authentication-Results` with this authserv-id are passed through; required when
    /// `trusted_relays` is set (a header with another id may be forged by the sender).
    pub authserv_id: Option<String>,
    /// Outbound submission relay for agent replies; `None` = agents cannot send email.
    pub relay: Option<RelayConfig>,
}

/// An IP network (`10.0.0.0/8`, `::1/128`); a bare address is a single host.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IpNet {
    /// Network address.
    pub addr: IpAddr,
    /// Prefix length in bits.
    pub prefix: u8,
}

impl IpNet {
    /// Whether `ip` lies in this network (IPv4-mapped IPv6 addresses count as IPv4).
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
            v4 => v4,
        };
        match (self.addr, ip) {
            (IpAddr::V4(n), IpAddr::V4(a)) => {
                let mask = u32::MAX.checked_shl(32 - u32::from(self.prefix)).unwrap_or(0);
                u32::from(n) & mask == u32::from(a) & mask
            }
            (IpAddr::V6(n), IpAddr::V6(a)) => {
                let mask = u128::MAX.checked_shl(128 - u32::from(self.prefix)).unwrap_or(0);
                u128::from(n) & mask == u128::from(a) & mask
            }
            _ => false,
        }
    }
}

/// `[smtp.relay]`: where agent replies are submitted.
#[derive(Clone, Debug)]
pub struct RelayConfig {
    /// Relay host name or IP.
    pub host: String,
    /// Relay port (587 submission, 465 implicit TLS, 25).
    pub port: u16,
    /// How the connection to the relay is protected.
    pub tls: RelayTls,
    /// SMTP AUTH user name, when the relay requires it.
    pub username: Option<String>,
    /// SMTP AUTH password (required with `username`).
    pub password: Option<Secret>,
    /// Bound on connecting and on each SMTP exchange.
    pub timeout: Duration,
    /// Attempts per send when the relay answers 4xx or cannot be reached (at least 1).
    pub max_attempts: u32,
    /// First retry delay; doubles per attempt.
    pub backoff_initial: Duration,
    /// DKIM signing of replies (`dkim_selector`, `dkim_domain`, `dkim_key_file`), all or none.
    pub dkim: Option<DkimConfig>,
}

/// DKIM (Ed25519-SHA256, RFC 8463) signing settings for replies.
#[derive(Clone)]
pub struct DkimConfig {
    /// `s=`: the key is published at `<selector>._domainkey.<domain>`.
    pub selector: String,
    /// `d=`: the signing domain (lower case).
    pub domain: String,
    /// Where the key was read from.
    pub key_file: std::path::PathBuf,
    /// The Ed25519 private key (RFC 8032 seed) from the PKCS#8 file.
    pub key: DkimKey,
}

impl std::fmt::Debug for DkimConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DkimConfig")
            .field("selector", &self.selector)
            .field("domain", &self.domain)
            .field("key_file", &self.key_file)
            .finish_non_exhaustive()
    }
}

/// A 32-byte Ed25519 private key; never printed.
#[derive(Clone)]
pub struct DkimKey([u8; 32]);

impl std::fmt::Debug for DkimKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DkimKey(<redacted>)")
    }
}

impl DkimKey {
    /// The key bytes, for the signer.
    pub fn expose(&self) -> &[u8; 32] {
        &self.0
    }
}

/// Reads an Ed25519 private key from PKCS#8 PEM (`-----BEGIN PRIVATE KEY-----`), the format of
/// `openssl genpkey -algorithm ed25519`.
pub fn parse_ed25519_pkcs8_pem(pem: &str) -> Result<DkimKey, String> {
    use base64::Engine as _;
    const HINT: &str =
        "expected an Ed25519 private key in PKCS#8 PEM, as written by `openssl genpkey -algorithm ed25519`";
    let pem = pem.trim();
    let inner = pem
        .strip_prefix("-----BEGIN PRIVATE KEY-----")
        .and_then(|s| s.strip_suffix("-----END PRIVATE KEY-----"))
        .ok_or_else(|| {
            if pem.contains("RSA PRIVATE KEY") {
                format!("RSA keys are not supported (only Ed25519-SHA256 DKIM); {HINT}")
            } else {
                format!("no `-----BEGIN PRIVATE KEY-----` block; {HINT}")
            }
        })?;
    let b64: String = inner.chars().filter(|c| !c.is_whitespace()).collect();
    let der = base64::engine::general_purpose::STANDARD.decode(b64).map_err(|e| format!("bad base64 ({e}); {HINT}"))?;
    // SEQUENCE { INTEGER 0|1, SEQUENCE { OID 1.3.101.112 }, OCTET STRING { OCTET STRING (32) } ... }
    const ALG: [u8; 11] = [0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22, 0x04, 0x20];
    let ok = der.len() >= 48
        && der[0] == 0x30
        && usize::from(der[1]) == der.len() - 2
        && der[2..4] == [0x02, 0x01]
        && der[4] <= 1
        && der[5..16] == ALG;
    if !ok {
        return Err(format!("not an Ed25519 key (RSA and other algorithms are not supported); {HINT}"));
    }
    let mut seed = [0u8; 32];
    seed.copy_from_slice(&der[16..48]);
    Ok(DkimKey(seed))
}

/// Transport security towards the relay.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RelayTls {
    /// Plain TCP (local relays and test sinks only).
    None,
    /// STARTTLS, required.
    StartTls,
    /// Implicit TLS from the first byte (port 465).
    Tls,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, expecting = "a table")]
pub(crate) struct RawSmtp {
    pub listen: Option<Text>,
    pub hostname: Option<Text>,
    pub domains: Option<Vec<Text>>,
    pub addresses: Option<BTreeMap<String, Text>>,
    pub max_message_size: Option<Text>,
    pub max_recipients: Option<Text>,
    pub max_line_length: Option<Text>,
    pub max_connections: Option<Text>,
    pub max_connections_per_ip: Option<Text>,
    pub max_errors: Option<Text>,
    pub command_timeout: Option<Text>,
    pub session_timeout: Option<Text>,
    pub greeting_delay: Option<Text>,
    pub tls: Option<Value>,
    pub trusted_relays: Option<Vec<Text>>,
    pub authserv_id: Option<Text>,
    pub relay: Option<Value>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, expecting = "a table")]
pub(crate) struct RawSmtpTls {
    pub cert: Option<Text>,
    pub key: Option<Text>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, expecting = "a table")]
pub(crate) struct RawRelay {
    pub host: Option<Text>,
    pub port: Option<Text>,
    pub tls: Option<Text>,
    pub username: Option<Text>,
    pub password: Option<Text>,
    pub password_env: Option<Text>,
    pub password_file: Option<Text>,
    pub timeout: Option<Text>,
    pub max_attempts: Option<Text>,
    pub backoff_initial: Option<Text>,
    pub dkim_selector: Option<Text>,
    pub dkim_domain: Option<Text>,
    pub dkim_key_file: Option<Text>,
}

impl Ctx<'_> {
    /// Validates `[smtp]`; `agent_ids` are the configured agents addresses may name.
    pub(super) fn smtp(&mut self, v: Option<&Value>, agent_ids: &[String], server_name: &str) -> Option<SmtpConfig> {
        v?;
        let raw: RawSmtp = self.section("smtp", v)?;
        let listen = self.addr("smtp.listen", raw.listen.as_ref(), "127.0.0.1:2525");
        let hostname = self.string("smtp.hostname", raw.hostname.as_ref(), server_name);
        if !valid_domain(&hostname) {
            self.err(
                "smtp.hostname",
                format!("invalid host name {hostname:?}: expected a DNS name such as \"mx.example.com\""),
            );
        }
        let mut domains = Vec::new();
        match raw.domains.as_deref() {
            None | Some([]) => {
                self.err("smtp.domains", "required: the domains mail is accepted for, e.g. [\"example.com\"]")
            }
            Some(list) => {
                for (i, d) in list.iter().enumerate() {
                    let d = d.as_str().trim().to_ascii_lowercase();
                    if valid_domain(&d) {
                        domains.push(d);
                    } else {
                        self.err(&format!("smtp.domains[{i}]"), format!("invalid domain {d:?}"));
                    }
                }
            }
        }
        let addresses = self.smtp_addresses(raw.addresses.as_ref(), &domains, agent_ids);
        let max_message_size =
            self.size("smtp.max_message_size", raw.max_message_size.as_ref(), 25 * 1024 * 1024, 1024, 1 << 30);
        let max_recipients = self.uint("smtp.max_recipients", raw.max_recipients.as_ref(), 100, 1, 10_000) as usize;
        let max_line_length =
            self.uint("smtp.max_line_length", raw.max_line_length.as_ref(), 2048, 512, 65536) as usize;
        let max_connections =
            self.uint("smtp.max_connections", raw.max_connections.as_ref(), 1000, 1, 1_000_000) as usize;
        let max_connections_per_ip =
            self.uint("smtp.max_connections_per_ip", raw.max_connections_per_ip.as_ref(), 20, 1, 1_000_000) as usize;
        let max_errors = self.uint("smtp.max_errors", raw.max_errors.as_ref(), 10, 1, 1000) as u32;
        let command_timeout =
            self.duration("smtp.command_timeout", raw.command_timeout.as_ref(), Duration::from_secs(300), false);
        let session_timeout =
            self.duration("smtp.session_timeout", raw.session_timeout.as_ref(), Duration::from_secs(1800), false);
        let greeting_delay =
            self.duration("smtp.greeting_delay", raw.greeting_delay.as_ref(), Duration::from_millis(300), true);
        if greeting_delay >= command_timeout {
            self.err("smtp.greeting_delay", "must be shorter than smtp.command_timeout");
        }
        let tls = match raw.tls.as_ref() {
            None => None,
            Some(v) => self.section::<RawSmtpTls>("smtp.tls", Some(v)).map(|t| TlsFiles {
                cert: self.existing_file("smtp.tls.cert", t.cert.as_ref()),
                key: self.existing_file("smtp.tls.key", t.key.as_ref()),
            }),
        };
        let mut trusted_relays = Vec::new();
        for (i, t) in raw.trusted_relays.unwrap_or_default().iter().enumerate() {
            match parse_net(t.as_str()) {
                Some(n) => trusted_relays.push(n),
                None => self.err(
                    &format!("smtp.trusted_relays[{i}]"),
                    format!("invalid network {:?}: expected an IP address or CIDR such as \"10.0.0.0/8\"", t.as_str()),
                ),
            }
        }
        let authserv_id = raw
            .authserv_id
            .as_ref()
            .map(|t| self.string("smtp.authserv_id", Some(t), "").trim().to_string())
            .filter(|id| !id.is_empty());
        // A trusted relay that does not strip Authentication-Results would otherwise pass on
        // ones the original sender forged; only the relay's own authserv-id is believable.
        if !trusted_relays.is_empty() && raw.authserv_id.is_none() {
            self.err(
                "smtp.authserv_id",
                "required with smtp.trusted_relays: the authserv-id your relays write in \
                 Authentication-Results (e.g. \"mx.example.com\"); only those headers are passed through",
            );
        }
        let relay = raw.relay.as_ref().and_then(|v| self.relay(v));
        Some(SmtpConfig {
            listen,
            hostname,
            domains,
            addresses,
            max_message_size,
            max_recipients,
            max_line_length,
            max_connections,
            max_connections_per_ip,
            max_errors,
            command_timeout,
            session_timeout,
            greeting_delay,
            tls,
            trusted_relays,
            authserv_id,
            relay,
        })
    }

    fn smtp_addresses(
        &mut self,
        raw: Option<&BTreeMap<String, Text>>,
        domains: &[String],
        agent_ids: &[String],
    ) -> BTreeMap<String, String> {
        let mut out = BTreeMap::new();
        let Some(raw) = raw.filter(|r| !r.is_empty()) else {
            self.err(
                "smtp.addresses",
                "required: map each address to an agent, e.g. \"support@example.com\" = \"helpdesk\"",
            );
            return out;
        };
        for (address, agent) in raw {
            let key = display_key("smtp.addresses", address);
            let agent = agent.as_str().trim().to_string();
            if !agent_ids.contains(&agent) {
                self.err(&key, format!("unknown agent {agent:?}; addresses must name a configured [agents.<id>]"));
                continue;
            }
            let lower = address.trim().to_lowercase();
            // A bare local part applies to every configured domain.
            let full: Vec<String> = match lower.rsplit_once('@') {
                None => domains.iter().map(|d| format!("{lower}@{d}")).collect(),
                Some((_, domain)) => {
                    if !domains.iter().any(|d| d == domain) {
                        self.err(&key, format!("domain {domain:?} is not listed in smtp.domains"));
                        continue;
                    }
                    vec![lower.clone()]
                }
            };
            let local = lower.split('@').next().unwrap_or_default();
            if local.is_empty()
                || local.contains('+')
                || local.chars().any(|c| c.is_whitespace() || c.is_control() || "<>\",;:\\".contains(c))
            {
                self.err(
                    &key,
                    "invalid local part: must be non-empty, without `+` (used for sub-addressing), spaces or <>\",;:\\",
                );
                continue;
            }
            for a in full {
                if let Some(previous) = out.insert(a.clone(), agent.clone()).filter(|p| *p != agent) {
                    self.err(&key, format!("address {a} is already mapped to agent {previous:?}"));
                }
            }
        }
        out
    }

    fn relay(&mut self, v: &Value) -> Option<RelayConfig> {
        let raw: RawRelay = self.section("smtp.relay", Some(v))?;
        let host = self.required_string("smtp.relay.host", raw.host.as_ref(), "(the submission relay's host name)");
        let tls = match self.choice("smtp.relay.tls", raw.tls.as_ref(), &["starttls", "tls", "none"]) {
            Some("tls") => RelayTls::Tls,
            Some("none") => RelayTls::None,
            _ => RelayTls::StartTls,
        };
        let default_port = match tls {
            RelayTls::Tls => 465,
            _ => 587,
        };
        let port = self.uint("smtp.relay.port", raw.port.as_ref(), default_port, 1, 65535) as u16;
        let username = raw.username.as_ref().map(|t| self.string("smtp.relay.username", Some(t), ""));
        let password = match self.secret(
            "smtp.relay",
            "password",
            raw.password.as_ref(),
            raw.password_env.as_ref(),
            raw.password_file.as_ref(),
        ) {
            Got::Found(s) => Some(s),
            Got::Bad => None,
            Got::Missing => {
                if username.is_some() {
                    self.err(
                        "smtp.relay.password",
                        "required with username: set password, password_env or password_file",
                    );
                }
                None
            }
        };
        if password.is_some() && username.is_none() {
            self.err("smtp.relay.username", "required with password");
        }
        let timeout = self.duration("smtp.relay.timeout", raw.timeout.as_ref(), Duration::from_secs(30), false);
        let max_attempts = self.uint("smtp.relay.max_attempts", raw.max_attempts.as_ref(), 4, 1, 20) as u32;
        let backoff_initial =
            self.duration("smtp.relay.backoff_initial", raw.backoff_initial.as_ref(), Duration::from_secs(1), false);
        let dkim = self.dkim(&raw);
        Some(RelayConfig { host, port, tls, username, password, timeout, max_attempts, backoff_initial, dkim })
    }

    fn dkim(&mut self, raw: &RawRelay) -> Option<DkimConfig> {
        let given = [
            ("dkim_selector", &raw.dkim_selector),
            ("dkim_domain", &raw.dkim_domain),
            ("dkim_key_file", &raw.dkim_key_file),
        ];
        if given.iter().all(|(_, v)| v.is_none()) {
            return None;
        }
        let mut missing = false;
        for (name, v) in given {
            if v.is_none() {
                self.err(
                    &format!("smtp.relay.{name}"),
                    "required with the other dkim_* settings (DKIM needs selector, domain and key file)",
                );
                missing = true;
            }
        }
        if missing {
            return None;
        }
        let selector = self.string("smtp.relay.dkim_selector", raw.dkim_selector.as_ref(), "");
        if !valid_domain(&selector) || selector.contains(|c: char| !c.is_ascii()) {
            self.err(
                "smtp.relay.dkim_selector",
                format!("invalid selector {selector:?}: expected DNS labels such as \"mail2026\""),
            );
        }
        let domain = self.string("smtp.relay.dkim_domain", raw.dkim_domain.as_ref(), "").trim().to_ascii_lowercase();
        if !valid_domain(&domain) || !domain.contains('.') || domain.contains(|c: char| !c.is_ascii()) {
            self.err(
                "smtp.relay.dkim_domain",
                format!("invalid domain {domain:?}: expected the signing domain, e.g. \"example.com\""),
            );
        }
        let key_file = self.path("smtp.relay.dkim_key_file", raw.dkim_key_file.as_ref(), "");
        let key = match std::fs::read_to_string(&key_file) {
            Ok(pem) => match parse_ed25519_pkcs8_pem(&pem) {
                Ok(k) => Some(k),
                Err(e) => {
                    self.err("smtp.relay.dkim_key_file", format!("{}: {e}", key_file.display()));
                    None
                }
            },
            Err(e) => {
                self.err("smtp.relay.dkim_key_file", format!("cannot read {}: {e}", key_file.display()));
                None
            }
        };
        Some(DkimConfig { selector, domain, key_file, key: key? })
    }
}

fn valid_domain(d: &str) -> bool {
    !d.is_empty()
        && d.len() <= 253
        && d.split('.').all(|l| {
            !l.is_empty() && l.len() <= 63 && l.chars().all(|c| c.is_alphanumeric() || c == '-') && !l.starts_with('-')
        })
}

fn parse_net(s: &str) -> Option<IpNet> {
    let s = s.trim();
    let (addr, prefix) = match s.split_once('/') {
        Some((a, p)) => (a.parse::<IpAddr>().ok()?, Some(p.parse::<u8>().ok()?)),
        None => (s.parse::<IpAddr>().ok()?, None),
    };
    let max = if addr.is_ipv4() { 32 } else { 128 };
    let prefix = prefix.unwrap_or(max);
    (prefix <= max).then_some(IpNet { addr, prefix })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn networks() {
        let n = parse_net("10.0.0.0/8").unwrap();
        assert!(n.contains("10.1.2.3".parse().unwrap()));
        assert!(!n.contains("11.0.0.1".parse().unwrap()));
        assert!(n.contains("::ffff:10.9.9.9".parse().unwrap()));
        assert!(parse_net("127.0.0.1").unwrap().contains("127.0.0.1".parse().unwrap()));
        assert!(parse_net("0.0.0.0/0").unwrap().contains("8.8.8.8".parse().unwrap()));
        assert!(parse_net("::1").unwrap().contains("::1".parse().unwrap()));
        assert!(parse_net("10.0.0.0/33").is_none());
        assert!(parse_net("example.com").is_none());
    }

    const AGENT: &str = "[agents.helpdesk]\ntoken = \"t0123456789\"\n";

    #[test]
    fn smtp_section_loads_with_defaults() {
        let c = crate::load_str(
            &format!("{AGENT}[smtp]\ndomains = [\"Example.com\"]\n[smtp.addresses]\nsupport = \"helpdesk\"\n\"Sales@example.com\" = \"helpdesk\"\n[smtp.relay]\nhost = \"smtp.example.com\"\n"),
            "c.toml",
        )
        .unwrap();
        let smtp = c.smtp.unwrap();
        assert_eq!(smtp.domains, ["example.com"]);
        assert_eq!(smtp.addresses.get("support@example.com").map(String::as_str), Some("helpdesk"));
        assert_eq!(smtp.addresses.get("sales@example.com").map(String::as_str), Some("helpdesk"));
        assert_eq!(smtp.max_message_size, 25 * 1024 * 1024);
        let relay = smtp.relay.unwrap();
        assert_eq!((relay.port, relay.tls), (587, RelayTls::StartTls));
    }

    #[test]
    fn smtp_errors_name_file_and_key() {
        let err = crate::load_str(
            &format!("{AGENT}[smtp]\ndomains = [\"example.com\"]\nmax_recipients = 0\n[smtp.addresses]\nsupport = \"ghost\"\n\"x@other.org\" = \"helpdesk\"\n\"a+b\" = \"helpdesk\"\n[smtp.relay]\nhost = \"h\"\nusername = \"u\"\n"),
            "c.toml",
        )
        .unwrap_err()
        .to_string();
        for want in [
            "c.toml: smtp.addresses.support: unknown agent \"ghost\"",
            "c.toml: smtp.addresses.\"x@other.org\": domain \"other.org\" is not listed",
            "c.toml: smtp.addresses.\"a+b\": invalid local part",
            "c.toml: smtp.max_recipients:",
            "c.toml: smtp.relay.password: required with username",
        ] {
            assert!(err.contains(want), "missing {want:?} in:\n{err}");
        }
        let err =
            crate::load_str(&format!("{AGENT}[smtp]\nlisten = \"127.0.0.1:25\"\n"), "c.toml").unwrap_err().to_string();
        assert!(err.contains("c.toml: smtp.domains: required"), "{err}");
        assert!(err.contains("c.toml: smtp.addresses: required"), "{err}");
    }

    #[test]
    fn trusted_relays_need_an_authserv_id() {
        let base = format!("{AGENT}[smtp]\ndomains = [\"example.com\"]\ntrusted_relays = [\"10.0.0.0/8\"]\n");
        let tail = "[smtp.addresses]\nsupport = \"helpdesk\"\n";
        let err = crate::load_str(&format!("{base}{tail}"), "c.toml").unwrap_err().to_string();
        assert!(err.contains("c.toml: smtp.authserv_id: required with smtp.trusted_relays"), "{err}");
        let c = crate::load_str(&format!("{base}authserv_id = \"mx.example.com\"\n{tail}"), "c.toml").unwrap();
        assert_eq!(c.smtp.unwrap().authserv_id.as_deref(), Some("mx.example.com"));
    }

    /// RFC 8410 §10.3's Ed25519 private key.
    const ED25519_PEM: &str = "-----BEGIN PRIVATE KEY-----\nMC4CAQAwBQYDK2VwBCIEINTuctv5E1hK1bbY8fdp+K06/nwoy/HU++CXqI9EdVhC\n-----END PRIVATE KEY-----\n";

    #[test]
    fn dkim_settings() {
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("dkim.pem");
        std::fs::write(&key, ED25519_PEM).unwrap();
        let base = format!(
            "{AGENT}[smtp]\ndomains = [\"example.com\"]\n[smtp.addresses]\nsupport = \"helpdesk\"\n[smtp.relay]\nhost = \"h\"\n"
        );
        let c = crate::load_str(
            &format!(
                "{base}dkim_selector = \"mail\"\ndkim_domain = \"Example.com\"\ndkim_key_file = \"{}\"\n",
                key.display()
            ),
            "c.toml",
        )
        .unwrap();
        let dkim = c.smtp.unwrap().relay.unwrap().dkim.unwrap();
        assert_eq!((dkim.selector.as_str(), dkim.domain.as_str()), ("mail", "example.com"));
        assert_eq!(hex::encode(dkim.key.expose()), "d4ee72dbf913584ad5b6d8f1f769f8ad3afe7c28cbf1d4fbe097a88f44755842");
        assert!(!format!("{dkim:?}").contains("d4ee"));

        let err = crate::load_str(&format!("{base}dkim_selector = \"mail\"\n"), "c.toml").unwrap_err().to_string();
        assert!(err.contains("c.toml: smtp.relay.dkim_domain: required with the other dkim_* settings"), "{err}");
        assert!(err.contains("c.toml: smtp.relay.dkim_key_file: required"), "{err}");

        let rsa = dir.path().join("rsa.pem");
        std::fs::write(&rsa, "-----BEGIN RSA PRIVATE KEY-----\nMIIB\n-----END RSA PRIVATE KEY-----\n").unwrap();
        let err = crate::load_str(
            &format!("{base}dkim_selector = \"a b\"\ndkim_domain = \"nodot\"\ndkim_key_file = \"{}\"\n", rsa.display()),
            "c.toml",
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("c.toml: smtp.relay.dkim_selector: invalid selector"), "{err}");
        assert!(err.contains("c.toml: smtp.relay.dkim_domain: invalid domain"), "{err}");
        assert!(err.contains("RSA keys are not supported"), "{err}");
        let err = crate::load_str(
            &format!(
                "{base}dkim_selector = \"s\"\ndkim_domain = \"example.com\"\ndkim_key_file = \"/nonexistent/k.pem\"\n"
            ),
            "c.toml",
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("c.toml: smtp.relay.dkim_key_file: cannot read /nonexistent/k.pem"), "{err}");
        // An RSA key in PKCS#8 (`BEGIN PRIVATE KEY`) is refused by its algorithm.
        assert!(
            parse_ed25519_pkcs8_pem(
                "-----BEGIN PRIVATE KEY-----\nMIIEvQIBADANBgkqhkiG9w0BAQEFAASC\n-----END PRIVATE KEY-----"
            )
            .unwrap_err()
            .contains("not an Ed25519 key")
        );
    }

    #[test]
    fn domains() {
        assert!(valid_domain("example.com"));
        assert!(valid_domain("localhost"));
        assert!(!valid_domain("a..b"));
        assert!(!valid_domain("a b"));
        assert!(!valid_domain(""));
    }
}
