//! Wake drivers: how Concierge starts (and, where it can, stops) a sleeping agent's compute.
//!
//! A driver only *starts and stops compute*. It never decides that a wake succeeded: the
//! proxy's lifecycle counts a wake as done only when the agent has dialled in over QUIC
//! (promise 6, "Wake is verified"), and it owns retries with backoff and single-flight.
//! Drivers therefore have two duties: be honest about errors (with a `retryable` flag the
//! lifecycle can act on) and never block forever (every call is bounded by a timeout).
//!
//! Drivers: [`ExecDriver`] (a local command), [`HttpDriver`] (a signed POST to a URL) and
//! [`FlyDriver`] (the Fly Machines API). Each takes a plain options struct; the proxy maps its
//! configuration onto them.

#![warn(missing_docs)]

use async_trait::async_trait;

mod exec;
mod fly;
mod http;
mod util;

pub use exec::{ExecDriver, ExecOptions};
pub use fly::{FlyDriver, FlyOptions};
pub use http::{HttpDriver, HttpOptions};
pub use util::http_client;

/// Where and how the woken agent dials back in, handed to the driver so it can pass it on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectInfo {
    /// `host:port` of the proxy's QUIC listener that agents dial.
    pub addr: String,
    /// TLS server name the agent must verify.
    pub server_name: String,
    /// Hex SHA-256 pin of a development certificate, when the proxy generated one.
    pub cert_sha256: Option<String>,
}

/// Everything a driver knows about one wake: who, why, how much is waiting, where to dial.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WakeRequest {
    /// Agent id, as configured in the proxy.
    pub agent: String,
    /// Human-readable reason (e.g. "telegram message", "admin: wake now").
    pub reason: String,
    /// Number of buffered events waiting for the agent.
    pub pending: u64,
    /// How the agent reaches the proxy once awake.
    pub connect: ConnectInfo,
}

/// A driver failure, with whether trying again later may help (the lifecycle backs off and
/// retries retryable errors; a non-retryable one is a configuration problem to surface).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct WakeError {
    /// What went wrong, for logs and the dashboard. Never contains secrets.
    pub message: String,
    /// Whether the same call may succeed later (timeouts, 5xx) or not (bad config, 4xx).
    pub retryable: bool,
}

impl WakeError {
    /// A transient failure the lifecycle should retry with backoff.
    pub fn retryable(message: impl Into<String>) -> Self {
        WakeError { message: message.into(), retryable: true }
    }

    /// A failure that retrying will not fix (wrong credentials, missing program, 4xx).
    pub fn permanent(message: impl Into<String>) -> Self {
        WakeError { message: message.into(), retryable: false }
    }

    /// The answer of drivers that cannot stop compute, so callers get a clear reason.
    pub fn unsupported(kind: &str, what: &str) -> Self {
        WakeError::permanent(format!("{kind} driver does not support {what}"))
    }
}

/// What a driver can tell about an agent's compute, so the lifecycle can verify a sleep.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DriverStatus {
    /// The compute is running (it may not have connected yet).
    Running,
    /// The compute is not running.
    Stopped,
    /// The driver cannot tell (no way to observe it, or a transitional state).
    Unknown,
}

/// Starts (and optionally stops) an agent's compute; the lifecycle verifies the outcome.
#[async_trait]
pub trait WakeDriver: Send + Sync + 'static {
    /// Short name of the driver kind ("exec", "http", "fly"), for logs and the dashboard.
    fn kind(&self) -> &'static str;

    /// Asks for the agent's compute to be started. `Ok` means "the request was accepted",
    /// not "the agent is up": only its QUIC connection proves that.
    async fn wake(&self, req: &WakeRequest) -> Result<(), WakeError>;

    /// Whether [`WakeDriver::sleep`] can actually stop compute, so `sleep_after` is only
    /// applied to agents whose driver supports it.
    fn can_sleep(&self) -> bool {
        false
    }

    /// Stops the agent's compute; drivers that cannot return a non-retryable error.
    async fn sleep(&self, _agent: &str) -> Result<(), WakeError> {
        Err(WakeError::unsupported(self.kind(), "sleep"))
    }

    /// Reports whether the agent's compute is running, so a sleep can be verified.
    async fn status(&self, _agent: &str) -> Result<DriverStatus, WakeError> {
        Ok(DriverStatus::Unknown)
    }
}
