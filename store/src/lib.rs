//! The durable per-agent event log behind promise 1 (write before ack) and promise 3
//! (outbound at most once).
//!
//! Every backend passes the same conformance suite (`tests/conformance.rs`). Offsets are
//! per agent, start at 1 and increase by one per stored event; a duplicate (same dedupe key
//! within its TTL) is not stored again and reports the offset of the original.

use std::time::Duration;

use async_trait::async_trait;
use concierge_protocol::{Event, EventData, EventRecord, SendResult};

pub mod redis;
pub mod sqlite;

pub use self::redis::RedisStore;
pub use self::sqlite::SqliteStore;

/// Result of appending an event.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Appended {
    /// Durably stored at this offset.
    Stored(u64),
    /// Same dedupe key already stored at this offset; nothing written.
    Duplicate(u64),
}

impl Appended {
    /// The offset of the stored event, new or original.
    pub fn offset(self) -> u64 {
        match self {
            Appended::Stored(o) | Appended::Duplicate(o) => o,
        }
    }
}

/// Where an agent's log stands.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Position {
    /// Changes whenever the backend lost this agent's log, so an agent can detect a gap.
    pub epoch: u64,
    /// Highest offset the agent acknowledged (0 = none).
    pub cursor: u64,
    /// Highest offset stored (0 = none).
    pub head: u64,
}

/// What the operations surface shows per agent.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    /// Events stored but not yet acknowledged.
    pub pending: u64,
    /// Bytes of those events (`EventData::size_hint`).
    pub pending_bytes: u64,
    /// `received_at_ms` of the oldest pending event.
    pub oldest_pending_ms: Option<u64>,
    /// Current position.
    pub position: Position,
}

/// State of an idempotency key for an outbound send.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SendClaim {
    /// The caller now owns the key and must send, then call `finish_send`.
    Claimed,
    /// A previous send with this key finished; here is what it returned.
    Done(SendResult),
    /// A previous send with this key started and never finished (crash or in flight):
    /// its outcome is unknown, so sending again could duplicate.
    InFlight,
}

/// Why a store operation failed. Callers must treat every error as "not durable".
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The backend could not be reached or refused the write.
    #[error("store unavailable: {0}")]
    Unavailable(String),
    /// Stored data could not be decoded.
    #[error("stored data is corrupt: {0}")]
    Corrupt(String),
    /// The store is misconfigured or locked by another process.
    #[error("{0}")]
    Config(String),
    /// The request cannot be applied to the log as it stands (e.g. rewinding past retention).
    #[error("{0}")]
    Rejected(String),
}

/// Tunables shared by both backends.
#[derive(Clone, Debug)]
pub struct StoreOptions {
    /// How long a dedupe key suppresses redeliveries.
    pub dedupe_ttl: Duration,
    /// Acknowledged events kept per agent for replay from the dashboard.
    pub retain_acked: u64,
    /// How long the result of an outbound send is remembered for its idempotency key.
    pub send_ttl: Duration,
}

impl Default for StoreOptions {
    fn default() -> Self {
        Self { dedupe_ttl: Duration::from_secs(7 * 86400), retain_acked: 0, send_ttl: Duration::from_secs(86400) }
    }
}

/// A durable per-agent event log. Every method returning `Ok` is durable before it returns.
#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// Dedupes and appends one event (the agent is `event.agent`).
    async fn append(&self, event: &EventData) -> Result<Appended, StoreError>;

    /// Events with offset in `(after, ..]`, at most `limit`, in offset order, still encoded
    /// (the delivery path forwards them as they are). Acked events still retained are included.
    async fn read_records(&self, agent: &str, after: u64, limit: usize) -> Result<Vec<EventRecord>, StoreError>;

    /// [`Store::read_records`], decoded: for the admin API and tests.
    async fn read(&self, agent: &str, after: u64, limit: usize) -> Result<Vec<Event>, StoreError> {
        self.read_records(agent, after, limit)
            .await?
            .iter()
            .map(|r| r.decode().map_err(|e| StoreError::Corrupt(format!("agent {agent:?} offset {}: {e}", r.offset))))
            .collect()
    }

    /// Advances the cursor to `up_to` (never backwards, never past head) and trims acked
    /// events beyond the retention. Returns the new cursor.
    async fn ack(&self, agent: &str, up_to: u64) -> Result<u64, StoreError>;

    /// Moves the cursor back to `to` so events `to+1..=cursor` are delivered again (operator
    /// "redeliver from offset"). Fails with `Rejected` when `to` is past the cursor or those
    /// events are no longer retained (`retain_acked`). Returns the new cursor.
    async fn rewind(&self, agent: &str, to: u64) -> Result<u64, StoreError>;

    /// Removes the given pending events (operator "drop selected events"): they are never
    /// delivered, stop counting as pending, and the cursor moves over any run of them right
    /// after it. Offsets already acked, unknown or dropped before are ignored. Returns how many
    /// events were dropped now.
    async fn drop_events(&self, agent: &str, offsets: &[u64]) -> Result<u64, StoreError>;

    /// Epoch, cursor and head of an agent's log (creating the epoch on first use).
    async fn position(&self, agent: &str) -> Result<Position, StoreError>;

    /// Pending count, bytes and oldest age.
    async fn stats(&self, agent: &str) -> Result<Stats, StoreError>;

    /// Claims an idempotency key before sending (promise 3).
    async fn claim_send(&self, agent: &str, key: &str) -> Result<SendClaim, StoreError>;

    /// Records the outcome of a claimed send.
    async fn finish_send(&self, agent: &str, key: &str, result: &SendResult) -> Result<(), StoreError>;

    /// Proves the store accepts durable writes now (for `/readyz`).
    async fn check_writable(&self) -> Result<(), StoreError>;

    /// A small named record (e.g. a Discord gateway's resume state), `None` if never written.
    async fn get_state(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        Err(StoreError::Unavailable(format!("this store keeps no state records (asked for {key:?})")))
    }

    /// Durably replaces the small named record `key` (kept until overwritten).
    async fn put_state(&self, key: &str, value: &[u8]) -> Result<(), StoreError> {
        let _ = value;
        Err(StoreError::Unavailable(format!("this store keeps no state records (writing {key:?})")))
    }

    /// Warnings about settings that break the promises (Redis AOF off, eviction on).
    async fn warnings(&self) -> Vec<String> {
        Vec::new()
    }
}

/// A fresh random non-zero epoch (0 would read as "no epoch").
pub(crate) fn new_epoch() -> u64 {
    rand::random::<u64>().max(1)
}

/// Both backends store send results as postcard-encoded `SendResult`s.
pub(crate) fn encode_result(result: &SendResult) -> Result<Vec<u8>, StoreError> {
    postcard::to_stdvec(result).map_err(|e| StoreError::Corrupt(format!("cannot encode send result: {e}")))
}

/// Inverse of [`encode_result`].
pub(crate) fn decode_result(bytes: &[u8]) -> Result<SendResult, StoreError> {
    postcard::from_bytes(bytes).map_err(|e| StoreError::Corrupt(format!("stored send result: {e}")))
}
