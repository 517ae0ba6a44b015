//! Frame I/O over QUIC streams: the thin async edge around [`crate::frame::Decoder`].

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::frame::{Decoder, FrameError, encode};

/// Why reading or writing a frame failed.
#[derive(Debug, thiserror::Error)]
pub enum IoError {
    /// The peer sent something that is not a valid frame.
    #[error(transparent)]
    Frame(#[from] FrameError),
    /// The stream failed (connection lost, reset by the peer).
    #[error("stream read failed: {0}")]
    Read(#[from] quinn::ReadError),
    /// The stream could not be written.
    #[error("stream write failed: {0}")]
    Write(#[from] quinn::WriteError),
    /// The stream was already finished or reset.
    #[error("stream closed: {0}")]
    Closed(#[from] quinn::ClosedStream),
}

/// Reads whole frames from a receive stream, at most `max` bytes each.
pub struct FrameReader {
    recv: quinn::RecvStream,
    decoder: Decoder,
}

impl FrameReader {
    /// Wraps a stream with the configured frame ceiling.
    pub fn new(recv: quinn::RecvStream, max: usize) -> Self {
        Self { recv, decoder: Decoder::new(max) }
    }

    /// The next frame; `Ok(None)` when the peer finished the stream cleanly between frames.
    pub async fn next<T: DeserializeOwned>(&mut self) -> Result<Option<T>, IoError> {
        loop {
            if let Some(frame) = self.decoder.next_frame()? {
                return Ok(Some(frame));
            }
            // Checks the length prefix as soon as it arrives, before buffering the body.
            self.decoder.pending_len()?;
            match self.recv.read_chunk(256 * 1024, true).await? {
                Some(chunk) => self.decoder.push(&chunk.bytes),
                None => {
                    self.decoder.finish()?;
                    return Ok(None);
                }
            }
        }
    }

    /// Gives the stream back, e.g. to stop it with an error code.
    pub fn into_inner(self) -> quinn::RecvStream {
        self.recv
    }
}

/// Writes one frame.
pub async fn write_frame<T: Serialize>(send: &mut quinn::SendStream, frame: &T) -> Result<(), IoError> {
    write_encoded(send, encode(frame)).await
}

/// Writes a frame already encoded (`frame::encode_into`); quinn takes the buffer as it is
/// instead of copying it.
pub async fn write_encoded(send: &mut quinn::SendStream, frame: Vec<u8>) -> Result<(), IoError> {
    send.write_chunk(bytes::Bytes::from(frame)).await?;
    Ok(())
}
