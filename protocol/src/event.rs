//! The normalized event envelope every channel produces and every agent consumes.

use serde::{Deserialize, Serialize};

/// Which held connection an event came through, and which one a reply goes out on.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ChannelRef {
    /// Channel family: `webhook`, `telegram`, `slack`, `discord`, `whatsapp`, `email`.
    pub kind: String,
    /// Instance name from the configuration (a webhook route, a bot name).
    pub name: String,
}

impl ChannelRef {
    /// Shorthand used by adapters and tests.
    pub fn new(kind: impl Into<String>, name: impl Into<String>) -> Self {
        Self { kind: kind.into(), name: name.into() }
    }
}

impl std::fmt::Display for ChannelRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.kind, self.name)
    }
}

/// A file carried by an event, kept by reference so events stay small.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attachment {
    /// Platform file id or URL the agent can fetch.
    pub reference: String,
    /// MIME type when the platform says.
    pub content_type: Option<String>,
    /// Original file name when known.
    pub name: Option<String>,
    /// Size in bytes when known.
    pub size: Option<u64>,
}

/// Everything an adapter knows about an inbound event; the store assigns the offset.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EventData {
    /// The agent the event belongs to.
    pub agent: String,
    /// The channel it arrived on; replies go back through it.
    pub channel: ChannelRef,
    /// Chat / channel+thread / email thread root / webhook route: replies address this.
    pub conversation: String,
    /// Platform identity of the sender, when there is one.
    pub sender: Option<String>,
    /// Platform redeliveries carry the same key and are stored once.
    pub dedupe_key: Option<String>,
    /// Milliseconds since the Unix epoch when Concierge received it.
    pub received_at_ms: u64,
    /// Normalized text body, where the platform has one.
    pub text: Option<String>,
    /// Files attached to the event.
    pub attachments: Vec<Attachment>,
    /// Content type of `raw` (`application/json`, `message/rfc822`, ...).
    pub content_type: String,
    /// The platform's payload byte for byte, so the agent never loses fidelity.
    #[serde(with = "serde_bytes")]
    pub raw: Vec<u8>,
    /// Small platform facts worth keeping (retry counters, verified headers), secrets removed.
    pub meta: Vec<(String, String)>,
}

/// A stored event: its per-agent offset plus what the adapter produced.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    /// Per-agent, strictly increasing; the agent acks up to it.
    pub offset: u64,
    /// The event itself.
    pub data: EventData,
}

/// A stored event still in its stored encoding: what the store returns and what `Deliver`
/// carries, so the proxy forwards events without decoding and re-encoding each one.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EventRecord {
    /// Per-agent offset.
    pub offset: u64,
    /// Copy of `EventData::received_at_ms`, for latency metrics without decoding.
    pub received_at_ms: u64,
    /// `EventData::to_record()` bytes.
    #[serde(with = "serde_bytes")]
    pub record: Vec<u8>,
}

impl EventRecord {
    /// Decodes the event, naming the offset if the bytes are bad.
    pub fn decode(&self) -> Result<Event, RecordError> {
        Ok(Event { offset: self.offset, data: EventData::from_record(&self.record)? })
    }
}

/// Stored records begin with this byte so the encoding can evolve without a migration.
pub const RECORD_VERSION: u8 = 1;

/// Why a stored record could not be read back.
#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    /// The record was written by a newer Concierge (or is not a record at all).
    #[error("stored record has unknown version {0} (this build reads version {RECORD_VERSION})")]
    UnknownVersion(u8),
    /// The record is empty.
    #[error("stored record is empty")]
    Empty,
    /// The bytes do not decode.
    #[error("stored record is corrupt: {0}")]
    Corrupt(#[from] postcard::Error),
}

impl EventData {
    /// Versioned, stable binary form used by every store backend.
    pub fn to_record(&self) -> Vec<u8> {
        // Sized up front: growing by doubling and then copying behind the version byte cost
        // several reallocations and a second copy of the body per ingested event.
        let meta: usize = self.meta.iter().map(|(k, v)| k.len() + v.len() + 4).sum();
        let mut out = Vec::with_capacity(self.size_hint() + meta + self.agent.len() + 128);
        out.push(RECORD_VERSION);
        // Serializing owned plain data into a Vec cannot fail.
        postcard::to_extend(self, out).expect("event data always serializes")
    }

    /// Inverse of [`EventData::to_record`].
    pub fn from_record(bytes: &[u8]) -> Result<Self, RecordError> {
        match bytes.split_first() {
            None => Err(RecordError::Empty),
            Some((&RECORD_VERSION, rest)) => Ok(postcard::from_bytes(rest)?),
            Some((&v, _)) => Err(RecordError::UnknownVersion(v)),
        }
    }

    /// Bytes this event costs in a buffer: what operators see as "buffered bytes".
    pub fn size_hint(&self) -> usize {
        self.raw.len() + self.text.as_ref().map_or(0, String::len) + self.conversation.len() + 64
    }
}

/// Milliseconds since the Unix epoch, the timestamp unit used on the wire and in the store.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn sample() -> EventData {
        EventData {
            agent: "a".into(),
            channel: ChannelRef::new("webhook", "demo"),
            conversation: "c".into(),
            sender: Some("s".into()),
            dedupe_key: Some("k".into()),
            received_at_ms: 7,
            text: Some("hi".into()),
            attachments: vec![],
            content_type: "application/json".into(),
            raw: b"{\"x\":1}".to_vec(),
            meta: vec![("retry".into(), "1".into())],
        }
    }

    #[test]
    fn record_round_trips() {
        let e = sample();
        assert_eq!(EventData::from_record(&e.to_record()).unwrap(), e);
    }

    #[test]
    fn unknown_record_version_is_named() {
        let mut r = sample().to_record();
        r[0] = 9;
        let err = EventData::from_record(&r).unwrap_err().to_string();
        assert!(err.contains("unknown version 9"), "{err}");
        assert!(matches!(EventData::from_record(&[]), Err(RecordError::Empty)));
        assert!(matches!(EventData::from_record(&[RECORD_VERSION, 0xff]), Err(RecordError::Corrupt(_))));
    }
}
