//! Frames of agent protocol v1 and their length-prefixed encoding, with no I/O.
//!
//! On every stream a frame is a big-endian `u32` length followed by the postcard encoding of
//! [`ToProxy`] or [`ToAgent`]. A length above the configured maximum is a protocol error before
//! any of the body is buffered, so a hostile peer cannot make either side allocate.

use serde::{Deserialize, Serialize};

use crate::event::{ChannelRef, EventRecord};

/// The protocol versions this build speaks; `Hello` with another one is rejected naming these.
pub const SUPPORTED_VERSIONS: &[u32] = &[1];
/// ALPN identifier both sides require, so a stray QUIC client fails the handshake cleanly.
pub const ALPN: &[u8] = b"concierge/1";
/// Default frame ceiling; configurable on both sides.
pub const DEFAULT_MAX_FRAME: usize = 8 * 1024 * 1024;

/// Frames an agent sends to the proxy.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum ToProxy {
    /// First frame on the session stream.
    Hello {
        /// Protocol version the agent speaks.
        version: u32,
        /// Agent id from the proxy's configuration.
        agent: String,
        /// The agent's secret token.
        token: String,
        /// Free-form client description for logs and the dashboard.
        client: String,
        /// Initial credit: unacked events the proxy may send before any `Credit` frame.
        window: u32,
    },
    /// Changes the window of unacknowledged events the proxy may have in flight.
    Credit {
        /// Maximum number of delivered-but-unacked events.
        window: u32,
    },
    /// Cumulative: every event with offset `<= up_to` is processed.
    Ack {
        /// Highest processed offset.
        up_to: u64,
    },
    /// Nothing to do; the proxy may put this agent to sleep.
    Idle,
    /// First and only frame on a send stream.
    Send(SendRequest),
}

/// Frames the proxy sends to an agent.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum ToAgent {
    /// The session is accepted.
    Welcome {
        /// Unique id of this session, for logs.
        session: String,
        /// Changes when the store lost this agent's stream, so the agent can detect a gap.
        epoch: u64,
        /// Last acknowledged offset; delivery resumes after it.
        cursor: u64,
        /// Number of events waiting to be delivered.
        backlog: u64,
    },
    /// The session is refused; the connection closes after this frame.
    Reject {
        /// Machine-readable reason.
        code: RejectCode,
        /// Human-readable explanation.
        message: String,
    },
    /// Events in offset order, in their stored encoding (the SDK decodes them).
    Deliver {
        /// One or more events, each offset higher than the last delivered.
        events: Vec<EventRecord>,
    },
    /// Finish what is in hand, ack it and disconnect: the proxy is about to stop this agent.
    Drain {
        /// Why, for logs.
        reason: String,
    },
    /// The outcome of a `Send`, the only frame on a send stream's reply side.
    SendResult(SendResult),
}

/// Why a session was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum RejectCode {
    /// The version in `Hello` is not spoken here.
    UnsupportedVersion,
    /// Unknown agent or wrong token (deliberately not distinguished).
    Unauthorized,
    /// The first frame was not a `Hello` or was malformed.
    BadHello,
    /// Another session of the same agent took over.
    Superseded,
    /// The proxy is shutting down.
    ShuttingDown,
}

/// An agent's request to send through one of its channels.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SendRequest {
    /// A retry with the same key returns the recorded result instead of sending again.
    pub idempotency_key: String,
    /// Channel to send on; it must be bound to the agent.
    pub channel: ChannelRef,
    /// Conversation to address (copied from the event being answered).
    pub conversation: String,
    /// Message body (text, or JSON for structured sends).
    pub body: String,
    /// Offset of the event being answered, so adapters can thread the reply.
    pub reply_to: Option<u64>,
}

/// What happened to a send.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum SendResult {
    /// Sent; the platform's ids for what was created.
    Ok {
        /// Platform message ids (may be empty when the platform returns none).
        platform_ids: Vec<String>,
    },
    /// Not sent, or outcome unknown.
    Err {
        /// Machine-readable code (`channel_not_bound`, `rate_limited`, ...).
        code: String,
        /// Human-readable explanation.
        message: String,
        /// Whether sending again with a new idempotency key could succeed.
        retryable: bool,
    },
}

impl SendResult {
    /// Builds an error result.
    pub fn err(code: &str, message: impl Into<String>, retryable: bool) -> Self {
        SendResult::Err { code: code.into(), message: message.into(), retryable }
    }
}

/// Everything that can be wrong with a frame.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum FrameError {
    /// The length prefix exceeds the ceiling.
    #[error("frame of {len} bytes exceeds the maximum frame size of {max} bytes")]
    TooLarge {
        /// Announced length.
        len: usize,
        /// Configured ceiling.
        max: usize,
    },
    /// The stream ended inside a frame.
    #[error("stream ended inside a frame ({have} of {need} bytes received)")]
    Truncated {
        /// Bytes received of the frame (prefix included).
        have: usize,
        /// Bytes the frame needed.
        need: usize,
    },
    /// The body is not a valid frame.
    #[error("malformed frame: {0}")]
    Malformed(String),
}

/// Encodes a frame with its length prefix.
pub fn encode<T: Serialize>(frame: &T) -> Vec<u8> {
    encode_into(frame, Vec::new())
}

/// [`encode`] into `buf` (cleared first): a caller that knows about how large the frame is
/// presizes it, so a half-megabyte `Deliver` is not copied by a dozen reallocations.
pub fn encode_into<T: Serialize>(frame: &T, mut buf: Vec<u8>) -> Vec<u8> {
    buf.clear();
    buf.extend_from_slice(&[0; 4]);
    // Frames are plain owned data; serializing into a Vec cannot fail.
    let mut out = postcard::to_extend(frame, buf).expect("frames always serialize");
    let len = (out.len() - 4) as u32;
    out[..4].copy_from_slice(&len.to_be_bytes());
    out
}

/// Incremental decoder: push bytes as they arrive, pop whole frames.
///
/// Pure state machine, so the framing rules are tested without sockets.
#[derive(Debug)]
pub struct Decoder {
    buf: Vec<u8>,
    max: usize,
}

impl Decoder {
    /// A decoder that refuses frames longer than `max` bytes.
    pub fn new(max: usize) -> Self {
        Self { buf: Vec::new(), max }
    }

    /// Appends received bytes.
    pub fn push(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// Length of the next frame body, once the prefix is here; errors on oversize.
    pub fn pending_len(&self) -> Result<Option<usize>, FrameError> {
        if self.buf.len() < 4 {
            return Ok(None);
        }
        let len = u32::from_be_bytes([self.buf[0], self.buf[1], self.buf[2], self.buf[3]]) as usize;
        if len > self.max {
            return Err(FrameError::TooLarge { len, max: self.max });
        }
        Ok(Some(len))
    }

    /// The next complete frame, if one is buffered.
    pub fn next_frame<T: serde::de::DeserializeOwned>(&mut self) -> Result<Option<T>, FrameError> {
        let Some(len) = self.pending_len()? else { return Ok(None) };
        if self.buf.len() < 4 + len {
            return Ok(None);
        }
        let frame = postcard::from_bytes(&self.buf[4..4 + len]).map_err(|e| FrameError::Malformed(e.to_string()));
        self.buf.drain(..4 + len);
        frame.map(Some)
    }

    /// Call at end of stream: errors if a partial frame is left over.
    pub fn finish(&self) -> Result<(), FrameError> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let need = match self.pending_len()? {
            Some(len) => 4 + len,
            None => 4,
        };
        Err(FrameError::Truncated { have: self.buf.len(), need })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hello() -> ToProxy {
        ToProxy::Hello { version: 1, agent: "a".into(), token: "t".into(), client: "test".into(), window: 8 }
    }

    #[test]
    fn frames_round_trip_byte_by_byte() {
        let frames = vec![hello(), ToProxy::Credit { window: 64 }, ToProxy::Ack { up_to: 9 }, ToProxy::Idle];
        let mut bytes = Vec::new();
        for f in &frames {
            bytes.extend(encode(f));
        }
        let mut d = Decoder::new(1024);
        let mut got = Vec::new();
        for b in bytes {
            d.push(&[b]);
            while let Some(f) = d.next_frame::<ToProxy>().unwrap() {
                got.push(f);
            }
        }
        assert_eq!(got, frames);
        d.finish().unwrap();
    }

    #[test]
    fn oversized_frame_is_refused_from_its_prefix() {
        let mut d = Decoder::new(16);
        d.push(&1000u32.to_be_bytes());
        assert_eq!(d.next_frame::<ToProxy>(), Err(FrameError::TooLarge { len: 1000, max: 16 }));
    }

    #[test]
    fn malformed_and_truncated_frames_are_named() {
        let mut d = Decoder::new(1024);
        d.push(&[0, 0, 0, 2, 0xff, 0xff]);
        assert!(matches!(d.next_frame::<ToProxy>(), Err(FrameError::Malformed(_))));
        let mut d = Decoder::new(1024);
        let f = encode(&hello());
        d.push(&f[..f.len() - 1]);
        assert_eq!(d.next_frame::<ToProxy>(), Ok(None));
        let err = d.finish().unwrap_err();
        assert!(err.to_string().contains("stream ended inside a frame"), "{err}");
    }
}
