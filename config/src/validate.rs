//! Turns TOML text (+ environment overrides) into a validated [`Config`], collecting every
//! problem as a [`ConfigError`] that names the origin and the full key path.

use std::collections::BTreeMap;
use std::io::Read;
use std::net::SocketAddr;
use std::path::{Component, Path, PathBuf};
use std::time::Duration;

use figment::error::{Actual, Kind};
use figment::providers::{Env, Format, Toml};
use figment::value::{Dict, Map, Value};
use figment::{Figment, Metadata, Profile, Provider};
use serde::de::DeserializeOwned;

#[path = "smtp.rs"]
pub(crate) mod smtp;

use crate::raw::{RawAgent, RawServer, RawStore, RawTls, RawWake, RawWebhook, Text};
use crate::{
    AgentConfig, Config, ConfigError, ConfigErrors, DriverConfig, Secret, ServerConfig, StoreBackend, StoreConfig,
    TlsFiles, Verify, WakeConfig, WakePolicy, WebhookConfig,
};

// Channel sections live in their own files; as children of this module they share `Ctx`.
#[path = "discord.rs"]
pub(crate) mod discord;
#[path = "slack.rs"]
pub(crate) mod slack;
#[path = "telegram.rs"]
pub(crate) mod telegram;
#[path = "telemetry.rs"]
pub(crate) mod telemetry;
#[path = "whatsapp.rs"]
pub(crate) mod whatsapp;

const ENV_PREFIX: &str = "CONCIERGE_";
/// Secret files larger than this are refused (a token is never this big; `/dev/zero` is).
const MAX_SECRET_FILE: u64 = 64 * 1024;
const SECTIONS: &[&str] =
    &["server", "tls", "store", "agents", "webhooks", "telegram", "whatsapp", "slack", "smtp", "discord", "telemetry"];

pub(crate) fn load_text(
    text: &str,
    origin: &str,
    source: PathBuf,
    base: &Path,
    env: bool,
) -> Result<Config, ConfigErrors> {
    // Syntax first, with our own parser call: figment's message quotes the offending line,
    // which may be `token = "...`.
    if let Err(e) = toml::from_str::<toml::Table>(text) {
        let key = e.span().map(|s| line_col(text, s.start)).unwrap_or_default();
        let msg = e.message().lines().map(str::trim).filter(|l| !l.is_empty()).collect::<Vec<_>>().join("; ");
        return Err(ConfigErrors(vec![ConfigError {
            origin: origin.to_string(),
            key,
            problem: format!("invalid TOML: {msg}"),
        }]));
    }

    let mut figment = Figment::from(Toml::string(text));
    if env {
        figment = figment.merge(EnvOverrides::new());
    }
    let mut cx = Ctx { figment: &figment, origin, base, errors: Vec::new() };
    let root: Dict = match figment.extract() {
        Ok(root) => root,
        Err(e) => {
            cx.figment_error("", e);
            return Err(ConfigErrors(cx.errors));
        }
    };
    let config = cx.config(&root, source);
    if cx.errors.is_empty() { Ok(config) } else { Err(ConfigErrors(cx.errors)) }
}

/// `CONCIERGE_*` overrides: figment's `Env::prefixed("CONCIERGE_").split("__")` for the key
/// mapping (and its metadata, so errors can name the variable), restricted to names with a
/// `__` (every setting lives in a section; this keeps `CONCIERGE_ECHO_TOKEN` and friends out).
/// Values stay plain strings — figment would turn a token `007` into the integer 7 — unless
/// they look like an array or a table (`[a, b]`, `{K = "v"}`).
struct EnvOverrides(Env);

impl EnvOverrides {
    fn new() -> Self {
        EnvOverrides(Env::prefixed(ENV_PREFIX).filter(|k| k.as_str().contains("__")).split("__"))
    }
}

impl Provider for EnvOverrides {
    fn metadata(&self) -> Metadata {
        self.0.metadata()
    }

    fn data(&self) -> Result<Map<Profile, Dict>, figment::Error> {
        let mut root = Dict::new();
        for (key, raw) in self.0.iter() {
            let value = if raw.trim_start().starts_with(['[', '{']) {
                let Ok(v) = raw.parse::<Value>();
                v
            } else {
                Value::from(raw)
            };
            let parts: Vec<&str> = key.as_str().split('.').collect();
            insert_nested(&mut root, &parts, value);
        }
        Ok(Profile::Default.collect(root))
    }
}

fn insert_nested(dict: &mut Dict, parts: &[&str], value: Value) {
    match parts {
        [] => {}
        [last] => {
            dict.insert((*last).to_string(), value);
        }
        [first, rest @ ..] => {
            let entry = dict.entry((*first).to_string()).or_insert_with(|| Value::from(Dict::new()));
            if entry.as_dict().is_none() {
                *entry = Value::from(Dict::new());
            }
            if let Value::Dict(_, inner) = entry {
                insert_nested(inner, rest, value);
            }
        }
    }
}

fn line_col(text: &str, offset: usize) -> String {
    let mut o = offset.min(text.len());
    while !text.is_char_boundary(o) {
        o -= 1;
    }
    let before = &text[..o];
    let line = before.matches('\n').count() + 1;
    let col = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    format!("line {line}, column {col}")
}

/// Outcome of resolving a `x` / `x_env` / `x_file` triple.
enum Got {
    /// None of the keys is set.
    Missing,
    /// Set but unusable; the error is already recorded.
    Bad,
    Found(Secret),
}

struct Ctx<'a> {
    figment: &'a Figment,
    origin: &'a str,
    base: &'a Path,
    errors: Vec<ConfigError>,
}

impl Ctx<'_> {
    // ---- error reporting -------------------------------------------------------------

    fn err(&mut self, key: &str, problem: impl Into<String>) {
        let origin = self.origin_of(key);
        let e = ConfigError { origin, key: key.to_string(), problem: problem.into() };
        if !self.errors.contains(&e) {
            self.errors.push(e);
        }
    }

    /// The file, or the environment variable, that supplied `key` (or its nearest parent).
    fn origin_of(&self, key: &str) -> String {
        let mut k = key;
        while !k.is_empty() {
            if let Some(md) = self.figment.find_metadata(k) {
                if md.name.contains("environment variable") {
                    let var = format!("{ENV_PREFIX}{}", k.replace('.', "__").to_ascii_uppercase());
                    // `key` itself is missing and its nearest table exists only in the environment.
                    return if k == key {
                        format!("environment variable {var}")
                    } else {
                        format!("environment variables {var}__*")
                    };
                }
                break;
            }
            k = match k.rfind('.') {
                Some(i) => &k[..i],
                None => "",
            };
        }
        self.origin.to_string()
    }

    /// Maps figment/serde errors (relative to `prefix`) into our form. Values are never
    /// quoted (they may be secrets): only their type.
    fn figment_error(&mut self, prefix: &str, err: figment::Error) {
        for e in err {
            let mut path: Vec<String> = prefix.split('.').filter(|s| !s.is_empty()).map(String::from).collect();
            path.extend(e.path.iter().cloned());
            let problem = match &e.kind {
                Kind::UnknownField(field, allowed) => {
                    // figment already appends the key itself to the path; serde alone does not.
                    if path.last() != Some(field) {
                        path.push(field.clone());
                    }
                    unknown_key(field, allowed)
                }
                Kind::MissingField(field) => {
                    path.push(field.to_string());
                    "required key is missing".to_string()
                }
                Kind::DuplicateField(field) => {
                    path.push(field.to_string());
                    "key is given more than once".to_string()
                }
                Kind::InvalidType(actual, expected) | Kind::InvalidValue(actual, expected) => {
                    format!("expected {expected}, found {}", type_name(actual))
                }
                Kind::InvalidLength(len, expected) => {
                    format!("expected {expected}, found {len} elements")
                }
                Kind::UnknownVariant(v, expected) => {
                    format!("unknown value {v:?}; expected one of: {}", expected.join(", "))
                }
                Kind::Message(m) => m.clone(),
                other => other.to_string(),
            };
            self.err(&path.join("."), problem);
        }
    }

    /// Deserializes one table; `None` (errors recorded) if it does not fit the schema.
    /// Reads a channel section (`[<section>.<name>]` tables), building each instance with
    /// `build` and refusing a token that another instance already owns: one owner per platform
    /// connection (Telegram answers 409, Slack and Discord split the stream).
    pub(super) fn channel_table<R, C>(
        &mut self,
        spec: &ChannelTable<'_>,
        v: Option<&Value>,
        mut build: impl FnMut(&mut Self, &str, &str, R) -> C,
        token: impl Fn(&C) -> Option<&str>,
    ) -> BTreeMap<String, C>
    where
        R: DeserializeOwned + Default,
    {
        let mut out = BTreeMap::new();
        let Some(v) = v else { return out };
        let Some(dict) = v.as_dict() else {
            self.err(spec.section, format!("expected a table of {} ([{}.<name>])", spec.instances, spec.section));
            return out;
        };
        let mut owners: BTreeMap<String, String> = BTreeMap::new();
        for (name, value) in dict {
            let path = display_key(spec.section, name);
            if !valid_name(name) {
                self.err(&path, "invalid name: use 1 to 64 characters from A-Z, a-z, 0-9, `_` and `-`");
                continue;
            }
            let Some(raw) = self.section::<R>(&path, Some(value)) else { continue };
            let instance = build(self, &path, name, raw);
            if let Some(t) = token(&instance).filter(|t| !t.is_empty()) {
                if let Some(first) = owners.get(t) {
                    self.err(
                        &format!("{path}.{}", spec.token_key),
                        format!(
                            "the same {} is already configured for {}: {}",
                            spec.token_kind,
                            display_key(spec.section, first),
                            spec.why_one_owner
                        ),
                    );
                    continue;
                }
                owners.insert(t.to_string(), name.clone());
            }
            out.insert(name.clone(), instance);
        }
        out
    }

    fn section<T: DeserializeOwned + Default>(&mut self, key: &str, v: Option<&Value>) -> Option<T> {
        let Some(v) = v else {
            return Some(T::default());
        };
        if v.as_dict().is_none() {
            // serde would accept an array for a struct (positional fields); a section is a table.
            self.err(key, format!("expected a table, found {}", value_type(v)));
            return None;
        }
        // serde stops at the first problem; an unknown key cannot affect the others, so report
        // it, drop it and retry, so that every unknown key and every bad value is reported.
        let mut dict = v.as_dict().cloned().unwrap_or_default();
        loop {
            match T::deserialize(&Value::from(dict.clone())) {
                Ok(t) => return Some(t),
                Err(e) => {
                    let unknown = match &e.kind {
                        Kind::UnknownField(f, _) if e.count() == 1 && e.path.len() == 1 && e.path[0] == *f => {
                            Some(f.clone())
                        }
                        _ => None,
                    };
                    self.figment_error(key, e);
                    match unknown {
                        Some(f) if dict.remove(&f).is_some() => continue,
                        _ => return None,
                    }
                }
            }
        }
    }

    // ---- scalar helpers ----------------------------------------------------------------

    fn addr(&mut self, key: &str, t: Option<&Text>, default: &str) -> SocketAddr {
        let fallback: SocketAddr = default.parse().unwrap_or(SocketAddr::from(([127, 0, 0, 1], 0)));
        let Some(t) = t else { return fallback };
        match t.as_str().trim().parse() {
            Ok(a) => a,
            Err(_) => {
                self.err(
                    key,
                    format!(
                        "invalid socket address {:?}: expected IP:port such as \"127.0.0.1:8080\" or \"[::1]:8080\" (an IP address, not a host name)",
                        t.as_str()
                    ),
                );
                fallback
            }
        }
    }

    fn duration(&mut self, key: &str, t: Option<&Text>, default: Duration, allow_zero: bool) -> Duration {
        match t {
            None => default,
            Some(t) => self.parse_duration_at(key, t.as_str(), allow_zero).unwrap_or(default),
        }
    }

    fn opt_duration(&mut self, key: &str, t: Option<&Text>) -> Option<Duration> {
        t.and_then(|t| self.parse_duration_at(key, t.as_str(), false))
    }

    fn parse_duration_at(&mut self, key: &str, s: &str, allow_zero: bool) -> Option<Duration> {
        match parse_duration(s) {
            Ok(d) if d.is_zero() && !allow_zero => {
                self.err(key, "must be greater than zero");
                None
            }
            Ok(d) => Some(d),
            Err(e) => {
                self.err(key, e);
                None
            }
        }
    }

    fn size(&mut self, key: &str, t: Option<&Text>, default: u64, min: u64, max: u64) -> u64 {
        let Some(t) = t else { return default };
        match parse_size(t.as_str()) {
            Ok(n) if n < min || n > max => {
                self.err(key, format!("{n} bytes is out of range: must be between {min} and {max} bytes"));
                default
            }
            Ok(n) => n,
            Err(e) => {
                self.err(key, e);
                default
            }
        }
    }

    fn uint(&mut self, key: &str, t: Option<&Text>, default: u64, min: u64, max: u64) -> u64 {
        let Some(t) = t else { return default };
        match t.as_str().trim().parse::<u64>() {
            Ok(n) if (min..=max).contains(&n) => n,
            _ => {
                self.err(key, format!("invalid number {:?}: expected a whole number from {min} to {max}", t.as_str()));
                default
            }
        }
    }

    fn string(&mut self, key: &str, t: Option<&Text>, default: &str) -> String {
        let Some(t) = t else {
            return default.to_string();
        };
        let s = t.as_str().trim();
        if s.is_empty() {
            self.err(key, "must not be empty");
            return default.to_string();
        }
        s.to_string()
    }

    fn required_string(&mut self, key: &str, t: Option<&Text>, why: &str) -> String {
        match t {
            None => {
                self.err(key, format!("required {why}"));
                String::new()
            }
            Some(_) => self.string(key, t, ""),
        }
    }

    fn choice(&mut self, key: &str, t: Option<&Text>, options: &[&'static str]) -> Option<&'static str> {
        let Some(t) = t else { return options.first().copied() };
        let s = t.as_str().trim();
        match options.iter().find(|o| o.eq_ignore_ascii_case(s)) {
            Some(o) => Some(*o),
            None => {
                let list = options.iter().map(|o| format!("\"{o}\"")).collect::<Vec<_>>().join(", ");
                self.err(key, format!("unknown value {s:?}; expected one of: {list}"));
                None
            }
        }
    }

    /// An `http://` or `https://` URL. The value is not echoed: URLs may carry credentials.
    fn http_url(&mut self, key: &str, t: &Text) -> String {
        let s = t.as_str().trim();
        let rest = s.strip_prefix("http://").or_else(|| s.strip_prefix("https://"));
        match rest {
            Some(rest)
                if !rest.is_empty()
                    && !rest.starts_with('/')
                    && !s.chars().any(|c| c.is_whitespace() || c.is_control()) =>
            {
                s.to_string()
            }
            _ => {
                self.err(key, "must be an http:// or https:// URL with a host");
                String::new()
            }
        }
    }

    fn resolve(&self, p: &str) -> PathBuf {
        let p = Path::new(p);
        let joined = if p.is_absolute() { p.to_path_buf() } else { self.base.join(p) };
        joined.components().filter(|c| !matches!(c, Component::CurDir)).collect()
    }

    fn path(&mut self, key: &str, t: Option<&Text>, default: &str) -> PathBuf {
        let s = self.string(key, t, default);
        self.resolve(&s)
    }

    fn existing_file(&mut self, key: &str, t: Option<&Text>) -> PathBuf {
        let Some(t) = t else {
            self.err(key, "required when [tls] is present");
            return PathBuf::new();
        };
        let p = self.path(key, Some(t), "");
        match std::fs::metadata(&p) {
            Ok(m) if m.is_file() => {}
            Ok(_) => self.err(key, format!("{} is not a file", p.display())),
            Err(e) => self.err(key, format!("cannot read {}: {e}", p.display())),
        }
        p
    }

    /// Resolves `<table>.<name>` / `<name>_env` / `<name>_file` (at most one may be set).
    fn secret(
        &mut self,
        table: &str,
        name: &str,
        inline: Option<&Text>,
        env: Option<&Text>,
        file: Option<&Text>,
    ) -> Got {
        let keys = [name.to_string(), format!("{name}_env"), format!("{name}_file")];
        let present: Vec<&String> = [inline.is_some(), env.is_some(), file.is_some()]
            .iter()
            .zip(&keys)
            .filter(|(p, _)| **p)
            .map(|(_, k)| k)
            .collect();
        if present.len() > 1 {
            self.err(
                &format!("{table}.{}", present[1]),
                format!(
                    "conflicts with `{table}.{}`: set exactly one of `{}`, `{}` or `{}`",
                    present[0], keys[0], keys[1], keys[2]
                ),
            );
            return Got::Bad;
        }
        if let Some(v) = inline {
            if v.as_str().is_empty() {
                self.err(&format!("{table}.{}", keys[0]), "must not be empty");
                return Got::Bad;
            }
            return Got::Found(Secret::new(v.as_str()));
        }
        if let Some(var) = env {
            let key = format!("{table}.{}", keys[1]);
            let var = var.as_str().trim();
            if var.is_empty() || var.contains(['=', '\0']) {
                self.err(&key, format!("{var:?} is not a valid environment variable name"));
                return Got::Bad;
            }
            return match std::env::var(var) {
                Ok(v) if v.is_empty() => {
                    self.err(&key, format!("environment variable {var} is empty"));
                    Got::Bad
                }
                Ok(v) => Got::Found(Secret::new(v)),
                Err(std::env::VarError::NotPresent) => {
                    self.err(&key, format!("environment variable {var} is not set"));
                    Got::Bad
                }
                Err(std::env::VarError::NotUnicode(_)) => {
                    self.err(&key, format!("environment variable {var} is not valid UTF-8"));
                    Got::Bad
                }
            };
        }
        if let Some(f) = file {
            let key = format!("{table}.{}", keys[2]);
            if f.as_str().trim().is_empty() {
                self.err(&key, "must not be empty");
                return Got::Bad;
            }
            let path = self.resolve(f.as_str());
            return match read_secret_file(&path) {
                Ok(v) => Got::Found(Secret::new(v)),
                Err(e) => {
                    self.err(&key, e);
                    Got::Bad
                }
            };
        }
        Got::Missing
    }

    // ---- sections --------------------------------------------------------------------

    fn config(&mut self, root: &Dict, source: PathBuf) -> Config {
        for key in root.keys() {
            if !SECTIONS.contains(&key.as_str()) {
                let problem = unknown_key(key, SECTIONS);
                self.err(&display_key("", key), problem);
            }
        }
        let server = self.server(root.get("server"));
        let tls = self.tls(root.get("tls"));
        let store = self.store(root.get("store"), &server.data_dir);
        let (agents, agent_ids) = self.agents(root.get("agents"));
        let webhooks = self.webhooks(root.get("webhooks"), &agent_ids, server.max_body);
        let telegram = self.telegram(root.get("telegram"), &agent_ids);
        let whatsapp = self.whatsapp(root.get("whatsapp"), &agent_ids);
        let slack = self.slack(root.get("slack"), &agent_ids);
        let smtp = self.smtp(root.get("smtp"), &agent_ids, &server.server_name);
        let discord = self.discord(root.get("discord"), &agent_ids);
        let telemetry = self.telemetry(root.get("telemetry"));
        Config { source, server, tls, store, agents, webhooks, telegram, whatsapp, slack, smtp, discord, telemetry }
    }

    fn server(&mut self, v: Option<&Value>) -> ServerConfig {
        let raw: RawServer = self.section("server", v).unwrap_or_default();
        let quic_listen = self.addr("server.quic_listen", raw.quic_listen.as_ref(), "127.0.0.1:4433");
        let http_listen = self.addr("server.http_listen", raw.http_listen.as_ref(), "127.0.0.1:8080");
        let admin_listen = self.addr("server.admin_listen", raw.admin_listen.as_ref(), "127.0.0.1:9090");
        let admin_token = match self.secret(
            "server",
            "admin_token",
            raw.admin_token.as_ref(),
            raw.admin_token_env.as_ref(),
            raw.admin_token_file.as_ref(),
        ) {
            Got::Found(s) => Some(s),
            Got::Bad => None,
            Got::Missing => {
                if !admin_listen.ip().is_loopback() {
                    self.err(
                        "server.admin_token",
                        format!(
                            "required because server.admin_listen ({admin_listen}) is not a loopback address: set admin_token, admin_token_env or admin_token_file"
                        ),
                    );
                }
                None
            }
        };
        let admin_read_token = match self.secret(
            "server",
            "admin_read_token",
            raw.admin_read_token.as_ref(),
            raw.admin_read_token_env.as_ref(),
            raw.admin_read_token_file.as_ref(),
        ) {
            Got::Found(s) => {
                if admin_token.is_none() {
                    self.err(
                        "server.admin_read_token",
                        "requires server.admin_token: without it every admin action would be open to anyone",
                    );
                }
                Some(s)
            }
            Got::Bad | Got::Missing => None,
        };
        let metrics_agent_labels =
            self.uint("server.metrics_agent_labels", raw.metrics_agent_labels.as_ref(), 100, 0, 100_000);
        let public_addr = match raw.public_addr.as_ref() {
            None => quic_listen.to_string(),
            Some(t) => {
                let s = t.as_str().trim();
                if valid_host_port(s) {
                    s.to_string()
                } else {
                    self.err(
                        "server.public_addr",
                        format!("invalid address {s:?}: expected host:port such as \"agents.example.com:4433\""),
                    );
                    quic_listen.to_string()
                }
            }
        };
        let server_name = self.string("server.server_name", raw.server_name.as_ref(), "localhost");
        if server_name.chars().any(|c| c.is_whitespace() || c.is_control() || c == '/') {
            self.err(
                "server.server_name",
                format!("invalid TLS server name {server_name:?}: expected a DNS name or IP address"),
            );
        }
        let data_dir = self.path("server.data_dir", raw.data_dir.as_ref(), "./concierge-data");
        let max_frame =
            self.size("server.max_frame", raw.max_frame.as_ref(), 8 * 1024 * 1024, 1024, u64::from(u32::MAX));
        let max_body = self.size("server.max_body", raw.max_body.as_ref(), 1024 * 1024, 1, u64::MAX);
        let shutdown_grace =
            self.duration("server.shutdown_grace", raw.shutdown_grace.as_ref(), Duration::from_secs(10), true);
        // Load balancers poll readiness every second or so: keep serving that long after
        // `/readyz` fails, so they stop routing here before the listeners close.
        let shutdown_delay =
            self.duration("server.shutdown_delay", raw.shutdown_delay.as_ref(), Duration::from_secs(1), true);
        ServerConfig {
            quic_listen,
            http_listen,
            admin_listen,
            admin_token,
            admin_read_token,
            metrics_agent_labels,
            public_addr,
            server_name,
            data_dir,
            max_frame,
            max_body,
            shutdown_grace,
            shutdown_delay,
        }
    }

    fn tls(&mut self, v: Option<&Value>) -> Option<TlsFiles> {
        v?;
        let raw: RawTls = self.section("tls", v)?;
        let cert = self.existing_file("tls.cert", raw.cert.as_ref());
        let key = self.existing_file("tls.key", raw.key.as_ref());
        Some(TlsFiles { cert, key })
    }

    fn store(&mut self, v: Option<&Value>, data_dir: &Path) -> StoreConfig {
        let raw: RawStore = self.section("store", v).unwrap_or_default();
        let backend = match self.choice("store.backend", raw.backend.as_ref(), &["embedded", "redis"]) {
            Some("redis") => {
                if raw.path.is_some() {
                    self.err("store.path", "only valid with backend = \"embedded\"");
                }
                let url = match self.secret(
                    "store",
                    "url",
                    raw.url.as_ref(),
                    raw.url_env.as_ref(),
                    raw.url_file.as_ref(),
                ) {
                    Got::Found(url) => {
                        let s = url.expose().trim();
                        let ok = ["redis://", "rediss://", "unix://", "redis+unix://"]
                            .iter()
                            .any(|p| s.len() > p.len() && s.starts_with(p));
                        if !ok {
                            self.err(
                                "store.url",
                                "must be a redis://, rediss:// or unix:// URL (value not shown: it may hold a password)",
                            );
                        }
                        url
                    }
                    Got::Bad => Secret::new(""),
                    Got::Missing => {
                        self.err("store.url", "required when backend = \"redis\": set url, url_env or url_file");
                        Secret::new("")
                    }
                };
                StoreBackend::Redis { url }
            }
            other => {
                if other.is_some() {
                    for (k, present) in [
                        ("url", raw.url.is_some()),
                        ("url_env", raw.url_env.is_some()),
                        ("url_file", raw.url_file.is_some()),
                    ] {
                        if present {
                            self.err(&format!("store.{k}"), "only valid with backend = \"redis\"");
                        }
                    }
                }
                let default = data_dir.join("store.db");
                let path = match raw.path.as_ref() {
                    None => default,
                    Some(t) => self.path("store.path", Some(t), ""),
                };
                StoreBackend::Embedded { path }
            }
        };
        let dedupe_ttl =
            self.duration("store.dedupe_ttl", raw.dedupe_ttl.as_ref(), Duration::from_secs(7 * 86400), false);
        let retain_acked = self.uint("store.retain_acked", raw.retain_acked.as_ref(), 0, 0, u64::MAX);
        let send_ttl = self.duration("store.send_ttl", raw.send_ttl.as_ref(), Duration::from_secs(86400), false);
        StoreConfig { backend, dedupe_ttl, retain_acked, send_ttl }
    }

    fn agents(&mut self, v: Option<&Value>) -> (BTreeMap<String, AgentConfig>, Vec<String>) {
        let mut agents = BTreeMap::new();
        let mut ids = Vec::new();
        let Some(v) = v else { return (agents, ids) };
        let Some(dict) = v.as_dict() else {
            self.err("agents", "expected a table of agents ([agents.<id>])");
            return (agents, ids);
        };
        for (id, value) in dict {
            ids.push(id.clone());
            let path = display_key("agents", id);
            if !valid_name(id) {
                self.err(&path, "invalid agent id: use 1 to 64 characters from A-Z, a-z, 0-9, `_` and `-`");
                continue;
            }
            let Some(raw) = self.section::<RawAgent>(&path, Some(value)) else {
                continue;
            };
            if let Some(agent) = self.agent(&path, id, raw) {
                agents.insert(id.clone(), agent);
            }
        }
        (agents, ids)
    }

    fn agent(&mut self, path: &str, id: &str, raw: RawAgent) -> Option<AgentConfig> {
        let token_sha256 = self.agent_token(path, &raw);
        let window = self.uint(&format!("{path}.window"), raw.window.as_ref(), 1024, 1, 65536);
        let max_pending = self.uint(&format!("{path}.max_pending"), raw.max_pending.as_ref(), 100_000, 1, u64::MAX);
        let wake_path = format!("{path}.wake");
        let raw_wake: RawWake = self.section(&wake_path, raw.wake.as_ref()).unwrap_or_default();
        let wake = self.wake(&wake_path, raw_wake);
        Some(AgentConfig {
            id: id.to_string(),
            token_sha256: token_sha256.unwrap_or([0; 32]),
            window: u32::try_from(window).unwrap_or(1024),
            max_pending,
            wake,
        })
    }

    fn agent_token(&mut self, path: &str, raw: &RawAgent) -> Option<[u8; 32]> {
        const NAMES: &str = "`token`, `token_env`, `token_file` or `token_sha256`";
        let others = [
            ("token", raw.token.is_some()),
            ("token_env", raw.token_env.is_some()),
            ("token_file", raw.token_file.is_some()),
        ];
        if let Some(hex_text) = raw.token_sha256.as_ref() {
            if let Some((other, _)) = others.iter().find(|(_, p)| *p) {
                self.err(
                    &format!("{path}.token_sha256"),
                    format!("conflicts with `{path}.{other}`: set exactly one of {NAMES}"),
                );
                return None;
            }
            let mut out = [0u8; 32];
            return match hex::decode_to_slice(hex_text.as_str().trim(), &mut out) {
                Ok(()) => Some(out),
                Err(_) => {
                    self.err(
                        &format!("{path}.token_sha256"),
                        "must be 64 hexadecimal characters (the SHA-256 of the token)",
                    );
                    None
                }
            };
        }
        match self.secret(path, "token", raw.token.as_ref(), raw.token_env.as_ref(), raw.token_file.as_ref()) {
            Got::Found(token) => {
                use sha2::Digest;
                Some(sha2::Sha256::digest(token.expose().as_bytes()).into())
            }
            Got::Bad => None,
            Got::Missing => {
                self.err(&format!("{path}.token"), format!("required: set one of {NAMES}"));
                None
            }
        }
    }

    fn wake(&mut self, p: &str, raw: RawWake) -> WakeConfig {
        let k = |name: &str| format!("{p}.{name}");
        let driver = self.choice(&k("driver"), raw.driver.as_ref(), &["none", "exec", "http", "fly"]);
        if let Some(driver) = driver {
            let specific = [
                ("command", raw.command.is_some(), "exec"),
                ("env", raw.env.is_some(), "exec"),
                ("settle", raw.settle.is_some(), "exec"),
                ("stop_command", raw.stop_command.is_some(), "exec"),
                ("url", raw.url.is_some(), "http"),
                ("secret", raw.secret.is_some(), "http"),
                ("secret_env", raw.secret_env.is_some(), "http"),
                ("secret_file", raw.secret_file.is_some(), "http"),
                ("timeout", raw.timeout.is_some(), "http"),
                ("api_base", raw.api_base.is_some(), "fly"),
                ("app", raw.app.is_some(), "fly"),
                ("machine", raw.machine.is_some(), "fly"),
                ("api_token", raw.api_token.is_some(), "fly"),
                ("api_token_env", raw.api_token_env.is_some(), "fly"),
                ("api_token_file", raw.api_token_file.is_some(), "fly"),
                ("wait_timeout", raw.wait_timeout.is_some(), "fly"),
            ];
            for (name, present, owner) in specific {
                if present && owner != driver {
                    self.err(&k(name), format!("only valid with driver = \"{owner}\" (this driver is \"{driver}\")"));
                }
            }
        }

        let policy = match raw.policy.as_ref() {
            None => WakePolicy::Immediate,
            Some(t) => match parse_policy(t.as_str()) {
                Ok(p) => p,
                Err(e) => {
                    self.err(&k("policy"), e);
                    WakePolicy::Immediate
                }
            },
        };
        let connect_timeout =
            self.duration(&k("connect_timeout"), raw.connect_timeout.as_ref(), Duration::from_secs(30), false);
        let max_attempts = self.uint(&k("max_attempts"), raw.max_attempts.as_ref(), 5, 1, u64::from(u32::MAX));
        let backoff_initial =
            self.duration(&k("backoff_initial"), raw.backoff_initial.as_ref(), Duration::from_millis(500), false);
        let backoff_max = self.duration(&k("backoff_max"), raw.backoff_max.as_ref(), Duration::from_secs(30), false);
        if backoff_max < backoff_initial {
            self.err(
                &k("backoff_max"),
                format!("must be at least backoff_initial ({})", humantime::format_duration(backoff_initial)),
            );
        }
        let unreachable_retry =
            self.duration(&k("unreachable_retry"), raw.unreachable_retry.as_ref(), Duration::from_secs(300), false);
        let sleep_after = self.opt_duration(&k("sleep_after"), raw.sleep_after.as_ref());

        let driver = match driver {
            Some("exec") => {
                let command = match raw.command.as_deref() {
                    None => {
                        self.err(
                            &k("command"),
                            "required for driver = \"exec\" (e.g. [\"concierge\", \"agent\", \"echo\"])",
                        );
                        Vec::new()
                    }
                    Some(c) => self.command(&k("command"), c),
                };
                let mut env = BTreeMap::new();
                for (name, value) in raw.env.unwrap_or_default() {
                    let key = format!("{}.{name}", k("env"));
                    if name.is_empty() || name.contains(['=', '\0']) {
                        self.err(&key, "invalid environment variable name");
                    } else if value.as_str().contains('\0') {
                        self.err(&key, "value must not contain a NUL character");
                    } else {
                        env.insert(name, value.0);
                    }
                }
                let settle = self.duration(&k("settle"), raw.settle.as_ref(), Duration::from_secs(2), true);
                let stop_command = raw.stop_command.as_deref().map(|c| self.command(&k("stop_command"), c));
                DriverConfig::Exec { command, env, settle, stop_command }
            }
            Some("http") => {
                let url = match raw.url.as_ref() {
                    None => {
                        self.err(&k("url"), "required for driver = \"http\"");
                        String::new()
                    }
                    Some(t) => self.http_url(&k("url"), t),
                };
                let secret = match self.secret(
                    p,
                    "secret",
                    raw.secret.as_ref(),
                    raw.secret_env.as_ref(),
                    raw.secret_file.as_ref(),
                ) {
                    Got::Found(s) => Some(s),
                    Got::Bad | Got::Missing => None,
                };
                let timeout = self.duration(&k("timeout"), raw.timeout.as_ref(), Duration::from_secs(10), false);
                DriverConfig::Http { url, secret, timeout }
            }
            Some("fly") => {
                let api_base = match raw.api_base.as_ref() {
                    None => "https://api.machines.dev".to_string(),
                    Some(t) => self.http_url(&k("api_base"), t),
                };
                let app = self.required_string(&k("app"), raw.app.as_ref(), "for driver = \"fly\"");
                let machine = self.required_string(&k("machine"), raw.machine.as_ref(), "for driver = \"fly\"");
                let api_token = match self.secret(
                    p,
                    "api_token",
                    raw.api_token.as_ref(),
                    raw.api_token_env.as_ref(),
                    raw.api_token_file.as_ref(),
                ) {
                    Got::Found(s) => s,
                    Got::Bad => Secret::new(""),
                    Got::Missing => {
                        self.err(
                            &k("api_token"),
                            "required for driver = \"fly\": set api_token, api_token_env or api_token_file",
                        );
                        Secret::new("")
                    }
                };
                let wait_timeout =
                    self.duration(&k("wait_timeout"), raw.wait_timeout.as_ref(), Duration::from_secs(60), false);
                DriverConfig::Fly { api_base, app, machine, api_token, wait_timeout }
            }
            _ => DriverConfig::None,
        };

        WakeConfig {
            driver,
            policy,
            connect_timeout,
            max_attempts: u32::try_from(max_attempts).unwrap_or(5),
            backoff_initial,
            backoff_max,
            unreachable_retry,
            sleep_after,
        }
    }

    fn command(&mut self, key: &str, parts: &[Text]) -> Vec<String> {
        if parts.is_empty() || parts[0].as_str().trim().is_empty() {
            self.err(key, "must be a non-empty array whose first element names the program");
        }
        if parts.iter().any(|p| p.as_str().contains('\0')) {
            self.err(key, "arguments must not contain a NUL character");
        }
        parts.iter().map(|p| p.0.clone()).collect()
    }

    fn webhooks(
        &mut self,
        v: Option<&Value>,
        agent_ids: &[String],
        default_max_body: u64,
    ) -> BTreeMap<String, WebhookConfig> {
        let mut hooks = BTreeMap::new();
        let Some(v) = v else { return hooks };
        let Some(dict) = v.as_dict() else {
            self.err("webhooks", "expected a table of routes ([webhooks.<route>])");
            return hooks;
        };
        for (route, value) in dict {
            let path = display_key("webhooks", route);
            if !valid_name(route) {
                self.err(&path, "invalid route name: use 1 to 64 characters from A-Z, a-z, 0-9, `_` and `-`");
                continue;
            }
            let Some(raw) = self.section::<RawWebhook>(&path, Some(value)) else {
                continue;
            };
            hooks.insert(route.clone(), self.webhook(&path, route, raw, agent_ids, default_max_body));
        }
        hooks
    }

    fn webhook(
        &mut self,
        p: &str,
        route: &str,
        raw: RawWebhook,
        agent_ids: &[String],
        default_max_body: u64,
    ) -> WebhookConfig {
        let k = |name: &str| format!("{p}.{name}");
        let agent = match raw.agent.as_ref() {
            None => {
                self.err(&k("agent"), "required: the id of the agent that receives this route's events");
                String::new()
            }
            Some(t) => {
                let a = t.as_str().trim().to_string();
                if !agent_ids.contains(&a) {
                    let known = if agent_ids.is_empty() {
                        "no agents are configured".to_string()
                    } else {
                        let ids: Vec<String> = agent_ids.iter().map(|id| display_key("", id)).collect();
                        format!("configured agents: {}", ids.join(", "))
                    };
                    self.err(&k("agent"), format!("unknown agent {a:?}; {known}"));
                }
                a
            }
        };
        let verify_kind = self.choice(&k("verify"), raw.verify.as_ref(), &["none", "standard", "hmac"]);
        if verify_kind != Some("hmac") && raw.hmac_header.is_some() {
            self.err(&k("hmac_header"), "only valid with verify = \"hmac\"");
        }
        let secret_keys = [
            ("secret", raw.secret.is_some()),
            ("secret_env", raw.secret_env.is_some()),
            ("secret_file", raw.secret_file.is_some()),
        ];
        let verify = match verify_kind {
            Some("none") => {
                for (name, present) in secret_keys {
                    if present {
                        self.err(
                            &k(name),
                            "set, but verify = \"none\" would ignore it: set verify = \"standard\" or \"hmac\", or remove it",
                        );
                    }
                }
                Verify::None
            }
            Some(kind) => {
                let secret = match self.secret(
                    p,
                    "secret",
                    raw.secret.as_ref(),
                    raw.secret_env.as_ref(),
                    raw.secret_file.as_ref(),
                ) {
                    Got::Found(s) => s,
                    Got::Bad => Secret::new(""),
                    Got::Missing => {
                        self.err(
                            &k("secret"),
                            format!("required for verify = \"{kind}\": set secret, secret_env or secret_file"),
                        );
                        Secret::new("")
                    }
                };
                if kind == "hmac" {
                    let header =
                        self.string(&k("hmac_header"), raw.hmac_header.as_ref(), "x-signature").to_ascii_lowercase();
                    if !header.chars().all(is_header_char) {
                        self.err(&k("hmac_header"), format!("invalid HTTP header name {header:?}"));
                    }
                    Verify::Hmac { header, secret }
                } else {
                    Verify::Standard { secret }
                }
            }
            None => Verify::None,
        };
        let max_body = self.size(&k("max_body"), raw.max_body.as_ref(), default_max_body, 1, u64::MAX);
        let reply_url = raw.reply_url.as_ref().map(|t| self.http_url(&k("reply_url"), t));
        let reply_secret = match self.secret(
            p,
            "reply_secret",
            raw.reply_secret.as_ref(),
            raw.reply_secret_env.as_ref(),
            raw.reply_secret_file.as_ref(),
        ) {
            Got::Found(s) => {
                if reply_url.is_none() {
                    self.err(&k("reply_secret"), "set, but there is no reply_url to sign for");
                }
                Some(s)
            }
            Got::Bad | Got::Missing => None,
        };
        WebhookConfig { route: route.to_string(), agent, verify, max_body, reply_url, reply_secret }
    }
}

// ---- free helpers ------------------------------------------------------------------------

/// `parent.child`, with the child quoted when it is not a plain identifier.
fn display_key(parent: &str, child: &str) -> String {
    let child = if !child.is_empty() && child.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-') {
        child.to_string()
    } else {
        format!("{child:?}")
    };
    if parent.is_empty() { child } else { format!("{parent}.{child}") }
}

fn valid_name(s: &str) -> bool {
    (1..=64).contains(&s.len()) && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
}

fn valid_host_port(s: &str) -> bool {
    let Some((host, port)) = s.rsplit_once(':') else {
        return false;
    };
    let host_ok =
        !host.is_empty() && !host.chars().any(|c| c.is_whitespace() || c.is_control() || c == '/' || c == '@');
    // Port 0 is allowed: it mirrors a `quic_listen` port 0 (the port actually bound).
    host_ok && port.parse::<u16>().is_ok()
}

fn is_header_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || "!#$%&'*+-.^_`|~".contains(c)
}

fn value_type(v: &Value) -> &'static str {
    match v {
        Value::String(..) | Value::Char(..) => "a string",
        Value::Bool(..) => "a boolean",
        Value::Num(..) => "a number",
        Value::Empty(..) => "an empty value",
        Value::Dict(..) => "a table",
        Value::Array(..) => "an array",
    }
}

fn type_name(a: &Actual) -> &'static str {
    match a {
        Actual::Bool(_) => "a boolean",
        Actual::Unsigned(_) | Actual::Signed(_) => "an integer",
        Actual::Float(_) => "a float",
        Actual::Char(_) | Actual::Str(_) => "a string",
        Actual::Bytes(_) => "bytes",
        Actual::Seq => "an array",
        Actual::Map => "a table",
        Actual::Unit | Actual::Option => "an empty value",
        _ => "a value of another type",
    }
}

fn unknown_key(field: &str, allowed: &[&str]) -> String {
    let mut msg = String::from("unknown key");
    if let Some(best) = allowed.iter().filter(|a| edit_distance(field, a) <= 2).min_by_key(|a| edit_distance(field, a))
    {
        msg.push_str(&format!(" (did you mean `{best}`?)"));
    }
    msg.push_str("; allowed keys: ");
    msg.push_str(&allowed.join(", "));
    msg
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1; b.len() + 1];
        for (j, cb) in b.iter().enumerate() {
            let cost = usize::from(ca != *cb);
            cur[j + 1] = (prev[j] + cost).min(prev[j + 1] + 1).min(cur[j] + 1);
        }
        prev = cur;
    }
    prev[b.len()]
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s.trim())
        .map_err(|e| format!("invalid duration {s:?}: {e}; examples: \"500ms\", \"30s\", \"10m\", \"7d\""))
}

fn parse_policy(s: &str) -> Result<WakePolicy, String> {
    let t = s.trim();
    match t.to_ascii_lowercase().as_str() {
        "immediate" => return Ok(WakePolicy::Immediate),
        "never" => return Ok(WakePolicy::Never),
        _ => {}
    }
    let inner = t.get(..9).filter(|p| p.eq_ignore_ascii_case("coalesce(")).and_then(|_| t[9..].strip_suffix(')'));
    match inner {
        Some(inner) => match parse_duration(inner) {
            Ok(d) if d.is_zero() => Err("coalesce duration must be greater than zero".into()),
            Ok(d) => Ok(WakePolicy::Coalesce(d)),
            Err(e) => Err(format!("in policy {t:?}: {e}")),
        },
        None => Err(format!(
            "invalid policy {t:?}: expected \"immediate\", \"never\" or \"coalesce(<duration>)\" such as \"coalesce(30s)\""
        )),
    }
}

/// Bytes: an integer, or a number with a unit: B, KB/MB/GB/TB (powers of 1000) or
/// KiB/MiB/GiB/TiB (powers of 1024); case-insensitive, spaces allowed before the unit.
pub(crate) fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let bad =
        || format!("invalid size {s:?}: expected a number of bytes or a size such as \"64KiB\", \"8MiB\" or \"1MB\"");
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    if num.is_empty() {
        return Err(bad());
    }
    let n: u64 = num.parse().map_err(|_| format!("invalid size {s:?}: number too large"))?;
    let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "kb" => 1_000,
        "mb" => 1_000_000,
        "gb" => 1_000_000_000,
        "tb" => 1_000_000_000_000,
        "kib" => 1 << 10,
        "mib" => 1 << 20,
        "gib" => 1 << 30,
        "tib" => 1 << 40,
        _ => return Err(bad()),
    };
    n.checked_mul(mult).ok_or_else(|| format!("invalid size {s:?}: too large"))
}

fn read_secret_file(path: &Path) -> Result<String, String> {
    let file = std::fs::File::open(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let mut buf = Vec::new();
    file.take(MAX_SECRET_FILE + 1).read_to_end(&mut buf).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    if buf.len() as u64 > MAX_SECRET_FILE {
        return Err(format!(
            "{} is larger than {} KiB; expected a file holding just the secret",
            path.display(),
            MAX_SECRET_FILE / 1024
        ));
    }
    let mut s = String::from_utf8(buf).map_err(|_| format!("{} is not valid UTF-8", path.display()))?;
    let trimmed = s.trim_end_matches(['\n', '\r']).len();
    s.truncate(trimmed);
    if s.is_empty() {
        return Err(format!("{} is empty", path.display()));
    }
    Ok(s)
}

/// How a channel section is named and which of its secrets must have a single owner.
pub(super) struct ChannelTable<'a> {
    /// Top-level key, e.g. `telegram`.
    pub(super) section: &'a str,
    /// What the tables are, for "expected a table of ...".
    pub(super) instances: &'a str,
    /// Key of the token that must be unique, e.g. `token`.
    pub(super) token_key: &'a str,
    /// What that token is called in messages, e.g. `bot token`.
    pub(super) token_kind: &'a str,
    /// Why a second owner is refused.
    pub(super) why_one_owner: &'a str,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("8MiB"), Ok(8 * 1024 * 1024));
        assert_eq!(parse_size("64KiB"), Ok(64 * 1024));
        assert_eq!(parse_size("1MB"), Ok(1_000_000));
        assert_eq!(parse_size("1 gib"), Ok(1 << 30));
        assert_eq!(parse_size("512"), Ok(512));
        assert!(parse_size("").is_err());
        assert!(parse_size("MiB").is_err());
        assert!(parse_size("1.5MiB").is_err());
        assert!(parse_size("-1").is_err());
        assert!(parse_size("99999999999999999999").is_err());
        assert!(parse_size("18446744073709551615KiB").is_err());
        assert!(parse_size("5 parsecs").is_err());
    }

    #[test]
    fn policies() {
        assert_eq!(parse_policy("immediate"), Ok(WakePolicy::Immediate));
        assert_eq!(parse_policy("never"), Ok(WakePolicy::Never));
        assert_eq!(parse_policy("coalesce(30s)"), Ok(WakePolicy::Coalesce(Duration::from_secs(30))));
        assert_eq!(parse_policy(" coalesce( 2m ) "), Ok(WakePolicy::Coalesce(Duration::from_secs(120))));
        assert!(parse_policy("coalesce(0s)").is_err());
        assert!(parse_policy("coalesce(30s").is_err());
        assert!(parse_policy("coalesce()").is_err());
        assert!(parse_policy("sometimes").is_err());
        assert!(parse_policy("coalesceé").is_err());
        assert_eq!(WakePolicy::Coalesce(Duration::from_secs(30)).to_string(), "coalesce(30s)");
    }

    #[test]
    fn line_col_is_safe_on_any_offset() {
        assert_eq!(line_col("a\nbé\nc", 5), "line 2, column 3");
        assert_eq!(line_col("é", 1), "line 1, column 1");
        assert_eq!(line_col("", 10), "line 1, column 1");
    }

    #[test]
    fn host_port() {
        assert!(valid_host_port("agents.example.com:4433"));
        assert!(valid_host_port("[::1]:4433"));
        assert!(!valid_host_port("agents.example.com"));
        assert!(!valid_host_port(":4433"));
        assert!(valid_host_port("host:0"));
        assert!(!valid_host_port("host:99999"));
    }
}
