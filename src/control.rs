//! The seam between the admin API and the running daemon (DESIGN §2): what
//! `admin` may ask of live calls and of the switchboard, and nothing more.
//!
//! Owns the [`Control`] trait (the daemon implements it; `admin` is handed an
//! `Arc<dyn Control>` when the daemon starts it), the view of a live call
//! outside its task ([`LiveCall`]), and the reload's outcome
//! ([`ReloadSummary`], [`ReloadError`]: the same for SIGHUP and
//! `POST /v1/reload`). Must not hold or lock daemon state itself: `admin`
//! depends on this module only, never on `daemon`, so dependencies point one
//! way (`daemon` → `admin` → `control`).

use crate::call::HangupCause;
use crate::config::Config;
use crate::store::time::UnixMs;
use futures_util::future::BoxFuture;
use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64};

/// What the admin API asks of the daemon.
pub(crate) trait Control: Send + Sync {
    /// The configuration in force (a reload swaps it).
    fn config(&self) -> Arc<Config>;

    /// Whether the daemon is draining (new calls refused).
    fn is_draining(&self) -> bool;

    /// Whether the daemon's store is open (the admin API then opens its own
    /// connection to it).
    fn has_store(&self) -> bool;

    /// The calls that have not ended, of `tenant` (all with `None`), oldest
    /// first (then by call id).
    fn live_calls(&self, tenant: Option<&str>) -> Vec<Arc<LiveCall>>;

    /// The call `call_id` if it has not ended.
    fn live_call(&self, call_id: &str) -> Option<Arc<LiveCall>>;

    /// Asks the call's task to end the call with `cause` (BYE, or a final
    /// response before the answer). Does not wait for it.
    fn hang_up(&self, call_id: &str, cause: HangupCause) -> Result<(), CommandError>;

    /// Asks the call's task to pause (`true`) or resume its recording and
    /// transcript (PCI). Does not wait for it.
    fn pause_recording(&self, call_id: &str, pause: bool) -> Result<(), CommandError>;

    /// Re-reads and applies the configuration: the same reload as SIGHUP.
    fn reload(self: Arc<Self>) -> BoxFuture<'static, Result<ReloadSummary, ReloadError>>;

    /// The sources banned now (the SIP ban list), longest remaining first,
    /// at most `max`.
    fn bans(&self, max: usize) -> Vec<crate::call::source_gate::Ban>;

    /// Places an outbound call (`POST /v1/calls`): admitted by the
    /// switchboard (trunk allowed for the tenant, rate and call limits), then
    /// dialled by its own task. Returns the new call's id once the INVITE is
    /// on its way; the call's progress is [`Control::live_call`].
    fn dial(self: Arc<Self>, request: DialRequest)
    -> BoxFuture<'static, Result<String, DialError>>;
}

/// An outbound call as the admin API asks for it.
#[derive(Debug, Clone)]
pub(crate) struct DialRequest {
    /// What the switchboard checks and the leg dials.
    pub(crate) call: crate::call::OutboundRequest,
    /// Parameters passed to the agent in `start` (`custom`).
    pub(crate) custom: Vec<(String, String)>,
}

/// Why an outbound call was not placed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub(crate) enum DialError {
    /// The switchboard refused it.
    #[error(transparent)]
    Refused(#[from] crate::call::OutboundRefusal),
    /// The trunk's proxy name did not resolve.
    #[error("the trunk's proxy could not be resolved")]
    Unresolved,
    /// The daemon has no UDP listener to send from.
    #[error("no UDP listener to dial from")]
    NoListener,
}

/// What is known about a live call outside its task.
#[derive(Debug)]
pub(crate) struct LiveCall {
    pub(crate) call_id: String,
    pub(crate) tenant: String,
    pub(crate) trunk: String,
    /// Caller number as received (the admin API applies the tenant's policy).
    pub(crate) from: String,
    pub(crate) to: String,
    pub(crate) started_at: UnixMs,
    /// Unix ms of the answer; 0 until answered.
    pub(crate) answered_at: AtomicI64,
    /// Set once the call has ended (its task may still be finishing).
    pub(crate) ended: AtomicBool,
    /// Inbound, or placed through the admin API.
    pub(crate) direction: crate::call::CallDirection,
    /// An outbound call's far end is ringing (a provisional arrived).
    pub(crate) ringing: AtomicBool,
}

/// Why a command did not reach a call.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub(crate) enum CommandError {
    /// No such call (any more): its task has gone.
    #[error("no such call")]
    Gone,
    /// The call's mailbox is full; the caller may try again.
    #[error("the call is busy")]
    Busy,
}

/// What a reload changed (serialisable for the admin API's answer).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[non_exhaustive]
pub(crate) struct ReloadSummary {
    pub(crate) trunks: usize,
    pub(crate) tenants: usize,
    pub(crate) routes: usize,
    /// Listeners opened, as `udp 127.0.0.1:5062`.
    pub(crate) listeners_added: Vec<String>,
    /// Listeners closed.
    pub(crate) listeners_removed: Vec<String>,
    /// Listeners kept as they were (their sockets were not touched).
    pub(crate) listeners_kept: usize,
}

impl fmt::Display for ReloadSummary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let list = |v: &[String]| {
            if v.is_empty() {
                "none".to_owned()
            } else {
                v.join(", ")
            }
        };
        write!(
            f,
            "{} trunks, {} tenants, {} routes; listeners added: {}; removed: {}; kept: {}",
            self.trunks,
            self.tenants,
            self.routes,
            list(&self.listeners_added),
            list(&self.listeners_removed),
            self.listeners_kept
        )
    }
}

/// Why a reload was rejected. Whatever the reason, nothing changed: the
/// running configuration stays as it was.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub(crate) enum ReloadError {
    /// SIGTERM came first: the daemon no longer takes configuration.
    #[error("the daemon is draining; reload refused")]
    Draining,
    /// The files do not validate (`sipbridge check` lists the same problems).
    #[error("configuration invalid ({} error(s)): {}", .0.len(), .0.join("; "))]
    Invalid(Vec<String>),
    /// A change only a restart can make.
    #[error("{0}: restart the daemon to change it")]
    NeedsRestart(String),
    /// A disclosure prompt could not be loaded.
    #[error("loading prompts: {0}")]
    Prompt(String),
    /// A new listen address could not be bound.
    #[error("binding a new listener: {0}")]
    Bind(String),
    /// The blocking loader task failed.
    #[error("reading the configuration: {0}")]
    Load(String),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summary_lists_listener_changes() {
        let s = ReloadSummary {
            trunks: 1,
            tenants: 2,
            routes: 3,
            listeners_added: vec!["udp 127.0.0.1:5062".to_owned()],
            listeners_removed: vec![],
            listeners_kept: 2,
        };
        assert_eq!(
            s.to_string(),
            "1 trunks, 2 tenants, 3 routes; listeners added: udp 127.0.0.1:5062; removed: none; kept: 2"
        );
    }

    #[test]
    fn invalid_reload_error_carries_every_diagnostic() {
        let e = ReloadError::Invalid(vec!["a.toml:1:1: x".to_owned(), "a.toml:2:1: y".to_owned()]);
        assert_eq!(
            e.to_string(),
            "configuration invalid (2 error(s)): a.toml:1:1: x; a.toml:2:1: y"
        );
    }
}
