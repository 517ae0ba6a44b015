//! The always-on proxy: it holds agents' channels, stores inbound events durably, wakes
//! sleeping agents, replays events to them over QUIC and performs their sends.

pub mod admin;
pub mod app;
pub mod certs;
pub mod channels;
pub mod dashboard;
pub mod fleet;
pub mod fresh;
pub mod lifecycle;
pub mod metrics;
pub mod otlp;
pub mod outbound;
pub mod session;
pub mod wake;
pub mod warm_start;

/// The example echo agent (the same code as `protocol/examples/echo.rs`), so the binary can
/// run it and a quickstart wake takes milliseconds, not a compile.
#[path = "../../protocol/examples/echo.rs"]
pub mod echo;
