//! Typed Concierge configuration.
//!
//! A TOML file plus `CONCIERGE_*` environment overrides (`CONCIERGE_SERVER__HTTP_LISTEN=...`,
//! `CONCIERGE_STORE__BACKEND=redis`: `__` separates key path segments) are deserialized into
//! raw serde structs that reject unknown keys, then validated into the resolved types below.
//! Validation collects every problem it finds; each is reported as
//! `<file>: <key.path>: <problem>` (or `environment variable CONCIERGE_...: <key.path>: ...`
//! when the offending value came from the environment).
//!
//! Secrets (`token`, `secret`, `api_token`, `admin_token`, the Redis URL, ...) may be given
//! inline, as `x_env = "VAR"` (read at load time) or `x_file = "path"`; they are held in
//! [`Secret`], which never prints its value, and no error message ever contains one.
//!
//! Only environment variables whose name after `CONCIERGE_` contains `__` are overrides, so
//! variables such as `CONCIERGE_ECHO_TOKEN` (referenced by `token_env`) or `CONCIERGE_CONFIG`
//! are not mistaken for configuration keys. Override values are taken as plain strings (a
//! token `007` stays `007`); a value starting with `[` or `{` is parsed as an array/table.

mod example;
mod raw;
mod validate;

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

pub use example::EXAMPLE;
pub use validate::discord::DiscordConfig;
pub use validate::slack::{SlackConfig, SlackMode};
pub use validate::smtp::{DkimConfig, DkimKey, IpNet, RelayConfig, RelayTls, SmtpConfig, parse_ed25519_pkcs8_pem};
pub use validate::telegram::{TelegramConfig, TelegramMode};
pub use validate::telemetry::TelemetryConfig;
pub use validate::whatsapp::WhatsAppConfig;

/// A secret string (token, signing key, password-bearing URL): kept out of `Debug`/`Display`
/// so it never reaches logs, error messages or the dashboard.
#[derive(Clone)]
pub struct Secret(String);

impl Secret {
    /// Wraps a resolved secret value (used by loaders and by tests of other crates).
    pub fn new(value: impl Into<String>) -> Self {
        Secret(value.into())
    }

    /// The secret value itself, for the one place that must use it (signing, auth, connect).
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

/// The whole validated configuration: what the proxy runs with.
#[derive(Clone, Debug)]
pub struct Config {
    /// Where the configuration came from (the file path, or `load_str`'s origin), for messages.
    pub source: PathBuf,
    /// Listeners, limits and identity of this proxy.
    pub server: ServerConfig,
    /// Certificate files for the QUIC listener; `None` = generate a self-signed dev cert in `data_dir`.
    pub tls: Option<TlsFiles>,
    /// Where events, cursors and send results are kept durably.
    pub store: StoreConfig,
    /// Agents by id: who may connect, and how each is woken.
    pub agents: BTreeMap<String, AgentConfig>,
    /// Inbound webhook routes by route name (URL `/hooks/<agent>/<route>`).
    pub webhooks: BTreeMap<String, WebhookConfig>,
    /// Telegram bots by name (`[telegram.<bot>]`).
    pub telegram: BTreeMap<String, TelegramConfig>,
    /// WhatsApp Business Cloud API numbers by name (`[whatsapp.<name>]`).
    pub whatsapp: BTreeMap<String, WhatsAppConfig>,
    /// Slack apps by name (`[slack.<name>]`).
    pub slack: BTreeMap<String, SlackConfig>,
    /// Inbound SMTP server and outbound relay (`[smtp]`); `None` = no email channel.
    pub smtp: Option<SmtpConfig>,
    /// Discord bots by name (`[discord.<bot>]`), each one gateway session.
    pub discord: BTreeMap<String, DiscordConfig>,
    /// Span export (`[telemetry]`); `otlp_endpoint: None` (the default) = no export.
    pub telemetry: TelemetryConfig,
}

/// The `[server]` section: listeners, limits and identity of this proxy.
#[derive(Clone, Debug)]
pub struct ServerConfig {
    /// UDP address of the QUIC listener agents dial.
    pub quic_listen: SocketAddr,
    /// TCP address of the HTTP webhook ingress.
    pub http_listen: SocketAddr,
    /// TCP address of the admin API, dashboard and metrics (loopback unless a token is set).
    pub admin_listen: SocketAddr,
    /// Bearer token for the admin listener; always present when `admin_listen` is not loopback.
    pub admin_token: Option<Secret>,
    /// Bearer token that may read the admin API, dashboard and metrics but perform no action.
    pub admin_read_token: Option<Secret>,
    /// Most agents given their own label on per-agent metrics (fleet totals are always exported).
    pub metrics_agent_labels: u64,
    /// `host:port` that agents are told to dial (may differ from `quic_listen` behind NAT).
    pub public_addr: String,
    /// TLS server name agents verify.
    pub server_name: String,
    /// Directory for the embedded store and generated dev certificates (absolute).
    pub data_dir: PathBuf,
    /// Largest agent-protocol frame in bytes (frames carry a u32 length, so at most u32::MAX).
    pub max_frame: u64,
    /// Default webhook body limit in bytes.
    pub max_body: u64,
    /// How long shutdown waits for in-flight work before closing.
    pub shutdown_grace: Duration,
    /// How long shutdown keeps accepting after `/readyz` fails, so load balancers notice first.
    pub shutdown_delay: Duration,
}

/// The `[tls]` section: PEM files for the QUIC listener (absolute paths, checked to exist).
#[derive(Clone, Debug)]
pub struct TlsFiles {
    /// PEM certificate chain.
    pub cert: PathBuf,
    /// PEM private key.
    pub key: PathBuf,
}

/// The `[store]` section: durability backend and retention.
#[derive(Clone, Debug)]
pub struct StoreConfig {
    /// Which store holds events.
    pub backend: StoreBackend,
    /// How long dedupe keys are remembered (platform redelivery window).
    pub dedupe_ttl: Duration,
    /// Acked events kept per agent for replay from the dashboard.
    pub retain_acked: u64,
    /// How long idempotent-send results are remembered.
    pub send_ttl: Duration,
}

/// Store backend choice: zero-setup single node, or shared Redis for production/scale-out.
#[derive(Clone, Debug)]
pub enum StoreBackend {
    /// SQLite file on local disk (absolute path).
    Embedded {
        /// Database file.
        path: PathBuf,
    },
    /// Redis (or Redis Cluster); the URL may carry a password, hence a secret.
    Redis {
        /// `redis://`, `rediss://` or `unix://` URL.
        url: Secret,
    },
}

/// One `[agents.<id>]` entry: how an agent authenticates and how it is woken.
#[derive(Clone)]
pub struct AgentConfig {
    /// Agent id (`[A-Za-z0-9_-]{1,64}`), as used in Hello and webhook URLs.
    pub id: String,
    /// SHA-256 of the agent's token: the plain token need not stay in memory.
    pub token_sha256: [u8; 32],
    /// Most unacknowledged events in flight to this agent; caps the credit the agent asks for.
    pub window: u32,
    /// Buffer cap per agent, in events (promise 5: bounded everything).
    pub max_pending: u64,
    /// Wake driver and policy.
    pub wake: WakeConfig,
}

impl AgentConfig {
    /// Whether `token` is this agent's token (SHA-256, then a constant-time comparison).
    pub fn token_matches(&self, token: &str) -> bool {
        use sha2::Digest;
        use subtle::ConstantTimeEq;
        let digest: [u8; 32] = sha2::Sha256::digest(token.as_bytes()).into();
        digest.ct_eq(&self.token_sha256).into()
    }
}

impl fmt::Debug for AgentConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AgentConfig")
            .field("id", &self.id)
            .field("token_sha256", &"[redacted]")
            .field("window", &self.window)
            .field("max_pending", &self.max_pending)
            .field("wake", &self.wake)
            .finish()
    }
}

/// `[agents.<id>.wake]`: how and when an agent's compute is started and stopped.
#[derive(Clone, Debug)]
pub struct WakeConfig {
    /// Which driver starts/stops the agent.
    pub driver: DriverConfig,
    /// When buffered events trigger a wake.
    pub policy: WakePolicy,
    /// After the driver returns, the agent must connect within this (promise 6: wake is verified).
    pub connect_timeout: Duration,
    /// Wake attempts before the agent is marked unreachable (at least 1).
    pub max_attempts: u32,
    /// First retry delay.
    pub backoff_initial: Duration,
    /// Retry delay cap (at least `backoff_initial`).
    pub backoff_max: Duration,
    /// Retry period once attempts are exhausted.
    pub unreachable_retry: Duration,
    /// Idle time after which an awake agent is put to sleep; `None` = never.
    pub sleep_after: Option<Duration>,
}

/// A wake driver and its settings.
#[derive(Clone)]
pub enum DriverConfig {
    /// No driver: the agent connects on its own.
    None,
    /// Run a local command (`docker start`, `systemctl start`, a script, the echo agent).
    Exec {
        /// Program and arguments (non-empty).
        command: Vec<String>,
        /// Extra environment for the command.
        env: BTreeMap<String, String>,
        /// How long wake waits for the command to exit before treating it as a running daemon.
        settle: Duration,
        /// Command that stops the agent, if it can be stopped.
        stop_command: Option<Vec<String>>,
    },
    /// POST to a URL (serverless platforms).
    Http {
        /// `http(s)://` URL to POST to.
        url: String,
        /// Signs the POST when set.
        secret: Option<Secret>,
        /// Request timeout.
        timeout: Duration,
    },
    /// Fly Machines API start/stop/wait.
    Fly {
        /// API base URL (configurable so tests can use a fake).
        api_base: String,
        /// Fly app name.
        app: String,
        /// Machine id.
        machine: String,
        /// Fly API token.
        api_token: Secret,
        /// How long to wait for the machine to reach `started`.
        wait_timeout: Duration,
    },
}

impl DriverConfig {
    /// The driver's name as written in the configuration (`none`, `exec`, `http`, `fly`).
    pub fn name(&self) -> &'static str {
        match self {
            DriverConfig::None => "none",
            DriverConfig::Exec { .. } => "exec",
            DriverConfig::Http { .. } => "http",
            DriverConfig::Fly { .. } => "fly",
        }
    }
}

// Manual Debug: exec `env` values may carry credentials, so only their names are shown.
impl fmt::Debug for DriverConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DriverConfig::None => f.write_str("None"),
            DriverConfig::Exec { command, env, settle, stop_command } => f
                .debug_struct("Exec")
                .field("command", command)
                .field("env", &env.keys().collect::<Vec<_>>())
                .field("settle", settle)
                .field("stop_command", stop_command)
                .finish(),
            DriverConfig::Http { url, secret, timeout } => {
                f.debug_struct("Http").field("url", url).field("secret", secret).field("timeout", timeout).finish()
            }
            DriverConfig::Fly { api_base, app, machine, api_token, wait_timeout } => f
                .debug_struct("Fly")
                .field("api_base", api_base)
                .field("app", app)
                .field("machine", machine)
                .field("api_token", api_token)
                .field("wait_timeout", wait_timeout)
                .finish(),
        }
    }
}

/// When buffered events wake an agent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WakePolicy {
    /// Wake on the first event (chat).
    Immediate,
    /// Never wake; the agent connects on its own schedule.
    Never,
    /// Gather events for this long, then wake once (e.g. email).
    Coalesce(Duration),
}

impl fmt::Display for WakePolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            WakePolicy::Immediate => f.write_str("immediate"),
            WakePolicy::Never => f.write_str("never"),
            WakePolicy::Coalesce(d) => write!(f, "coalesce({})", humantime::format_duration(*d)),
        }
    }
}

/// One `[webhooks.<route>]` entry: an inbound webhook route for an agent.
#[derive(Clone, Debug)]
pub struct WebhookConfig {
    /// Route name (`[A-Za-z0-9_-]{1,64}`); the URL is `/hooks/<agent>/<route>`.
    pub route: String,
    /// Agent that receives the events (a configured agent).
    pub agent: String,
    /// How inbound requests are authenticated.
    pub verify: Verify,
    /// Body limit in bytes for this route.
    pub max_body: u64,
    /// Where the agent's sends through this route are POSTed, if anywhere.
    pub reply_url: Option<String>,
    /// Signs reply POSTs when set.
    pub reply_secret: Option<Secret>,
}

/// Webhook request verification.
#[derive(Clone, Debug)]
pub enum Verify {
    /// Accept unsigned requests.
    None,
    /// Standard Webhooks signatures; the secret may be a space-separated list (rotation).
    Standard {
        /// One or more `whsec_...` secrets, space-separated.
        secret: Secret,
    },
    /// Hex HMAC-SHA256 of the body in one header.
    Hmac {
        /// Lower-case header name carrying the signature.
        header: String,
        /// HMAC key.
        secret: Secret,
    },
}

/// One configuration problem, naming where it is and what is wrong (never a secret value).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{}", self.render())]
pub struct ConfigError {
    /// The file (or `environment variable CONCIERGE_...`) the offending value came from.
    pub origin: String,
    /// Full dotted key path (`agents.echo.wake.sleep_after`); for TOML syntax errors the
    /// position (`line 3, column 9`); empty when the whole file is concerned.
    pub key: String,
    /// What is wrong, and what would be accepted.
    pub problem: String,
}

impl ConfigError {
    fn render(&self) -> String {
        if self.key.is_empty() {
            format!("{}: {}", self.origin, self.problem)
        } else {
            format!("{}: {}: {}", self.origin, self.key, self.problem)
        }
    }
}

/// Every problem found while loading (validation does not stop at the first).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

/// Loads `path` and applies `CONCIERGE_*` environment overrides. Relative paths in the file
/// (`data_dir`, `store.path`, `tls.*`, `*_file`) are resolved against the file's directory.
pub fn load(path: &Path) -> Result<Config, ConfigErrors> {
    let origin = path.display().to_string();
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) => {
            return Err(ConfigErrors(vec![ConfigError {
                origin,
                key: String::new(),
                problem: format!("cannot read configuration file: {e}"),
            }]));
        }
    };
    let base = std::path::absolute(path).ok().and_then(|p| p.parent().map(Path::to_path_buf)).unwrap_or_default();
    validate::load_text(&text, &origin, path.to_path_buf(), &base, true)
}

/// Loads configuration from a string without environment overrides (tests, embedded configs).
/// `origin` names the source in messages. Relative paths are resolved against the current
/// directory. `*_env` references are still read from the process environment.
pub fn load_str(toml: &str, origin: &str) -> Result<Config, ConfigErrors> {
    let base = std::env::current_dir().unwrap_or_default();
    validate::load_text(toml, origin, PathBuf::from(origin), &base, false)
}
