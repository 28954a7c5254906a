//! sipbridge: answers phone calls (SIP/RTP) for AI voice agents.
//!
//! Architecture (see `docs/` and the design notes): a sans-IO protocol core
//! (`sip`, later `media` and `call`) that never touches sockets, clocks or tasks,
//! inside a thin tokio shell (`daemon`). Configuration lives in `config`.

pub mod config;
pub mod media;
pub mod logging;
pub mod sip;
pub mod store;
