//! Channel adapters. Each module turns one platform's traffic into [`EventData`] handed to an
//! [`EventSink`], and performs the agent's sends on that platform. Adapters know nothing of
//! the proxy: the sink is the only way in, and it answers only after the event is durable.

use async_trait::async_trait;
use concierge_protocol::{EventData, SendRequest, SendResult};

pub mod discord;
mod http_util;
pub mod pacing;
pub mod signature;
pub mod slack;
pub mod smtp;
pub mod telegram;
pub mod webhook;
pub mod whatsapp;

/// What the sink did with an event.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ingested {
    /// The event's offset in its agent's log.
    pub offset: u64,
    /// True when this was a redelivery of an already stored event.
    pub duplicate: bool,
}

/// Why the sink did not take an event; the adapter must not acknowledge it to the platform.
#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    /// The store could not make it durable; the platform should redeliver later.
    #[error("store unavailable: {0}")]
    Unavailable(String),
    /// The proxy refuses it (unknown agent, buffer full); redelivery may or may not help.
    #[error("rejected: {0}")]
    Rejected(String),
}

/// The proxy's door for inbound events: `Ok` means durably stored (promise 1).
#[async_trait]
pub trait EventSink: Send + Sync + 'static {
    /// Stores one event durably (deduplicated by its dedupe key) and wakes its agent as needed.
    async fn ingest(&self, event: EventData) -> Result<Ingested, SinkError>;

    /// Reads a small durable record an adapter keeps across restarts (Discord resume state).
    async fn load_state(&self, key: &str) -> Result<Option<Vec<u8>>, SinkError> {
        Err(SinkError::Unavailable(format!("this sink keeps no state records ({key:?})")))
    }

    /// Durably replaces that record; `Ok` only once it is stored.
    async fn save_state(&self, key: &str, value: &[u8]) -> Result<(), SinkError> {
        let _ = value;
        Err(SinkError::Unavailable(format!("this sink keeps no state records ({key:?})")))
    }
}

/// Where a held connection (poller, socket, listener) reports its health for the operator's
/// API and dashboard; the proxy implements it over its metrics registry. Events received are
/// counted by the sink, so only state changes are reported here.
pub trait ConnectionReporter: Send + Sync + 'static {
    /// Connection `channel`/`name` is now in `state` (`polling`, `conflict`, `stopped`, ...);
    /// `error` says why when it is not healthy.
    fn state(&self, channel: &str, name: &str, state: &str, error: Option<&str>);

    /// Connection `channel`/`name` reports a figure operators should see next to its state
    /// (e.g. Discord's session starts left); `value` replaces the previous one under `key`.
    fn detail(&self, channel: &str, name: &str, key: &str, value: u64) {
        let _ = (channel, name, key, value);
    }
}

/// Performs an agent's sends on one channel instance. Idempotency (promise 3) and binding
/// checks (promise 4) are the caller's job; an implementation only sends and reports, with
/// `retryable` set only when sending again cannot duplicate what the platform already has.
#[async_trait]
pub trait ChannelSender: Send + Sync + 'static {
    /// Sends `request` on behalf of `agent`.
    async fn send(&self, agent: &str, request: &SendRequest) -> SendResult;
}
