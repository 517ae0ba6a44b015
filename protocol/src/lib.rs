//! Agent <-> proxy protocol v1: event envelope, frames, framing, TLS trust, and the agent SDK.

pub mod client;
pub mod email;
pub mod event;
pub mod frame;
pub mod io;
pub mod tls;

pub use event::{Attachment, ChannelRef, Event, EventData, EventRecord, now_ms};
pub use frame::{RejectCode, SendRequest, SendResult, ToAgent, ToProxy};
