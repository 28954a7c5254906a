//! SIP signalling, sans-IO: message parse/print, transactions (RFC 3261 §17),
//! dialogs, digest authentication and SDP offer/answer.
//!
//! Nothing in here imports tokio, opens sockets or reads a clock: time
//! (`std::time::Instant`) and randomness are passed in by the caller.

pub mod dialog;
pub mod digest;
pub mod error;
pub mod message;
pub mod response_addr;
pub mod sdes;
pub mod sdp;
pub mod timer;
pub mod transaction;
pub use message::*;
