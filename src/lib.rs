//! sipbridge: answers phone calls (SIP/RTP) for AI voice agents.
//!
//! Architecture (DESIGN §2): a sans-IO protocol core — `sip`, `media`, `call` —
//! that never touches sockets, clocks or tasks, inside a thin tokio shell
//! (`daemon`). Configuration lives in `config`, logging set-up in `logging`,
//! stored data in `store`. The admin API (`admin`) reaches live calls and the
//! switchboard only through `control`, which the daemon implements.

pub mod admin;
pub mod call;
pub mod config;
pub(crate) mod control;
pub mod daemon;
pub mod logging;
pub mod media;
pub(crate) mod metrics;
pub mod pipeline;
pub mod sip;
pub mod store;
