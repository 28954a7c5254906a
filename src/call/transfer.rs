//! Call transfer asked by the agent (issue 13): the blind transfer by REFER
//! (RFC 3515) in the caller's dialog, and what every transfer reports.
//!
//! Owns: the transfer target's validation ([`TransferTarget::parse`]), the
//! REFER client side of our UAS dialog (REFER, its 2xx/non-2xx, the implicit
//! `refer` subscription's NOTIFYs with their `message/sipfrag` bodies, the
//! bound on how long the final NOTIFY may take) and the outcome reported to
//! the agent, the event stream and the CDR ([`TransferUpdate`],
//! [`TransferRecord`]). Must not touch: media, the pipeline, sockets,
//! clocks — it is part of [`Call`], fed instants like the rest of it.
//!
//! A `tel:` target stays `tel:` in `Refer-To` (a carrier such as Twilio
//! refuses a `tel:` number rewritten as a `sip:` URI with 403); a bare
//! E.164 number (`+15551234567`) becomes `tel:+15551234567`.

use super::{Call, CallEvent, CallOutput, HangupCause, State, Transmit, take_transmits, txn_key};
use crate::sip::message::{Method, NameAddr, Request, Scheme, Uri};
use crate::sip::transaction::ClientNonInviteTransaction;
use rand::RngCore;
use serde::Serialize;
use std::time::{Duration, Instant};

/// After the caller's side accepted our REFER (202), its final NOTIFY (the
/// target answered, or failed) must come within this long; otherwise the
/// transfer is reported failed (`notify-timeout`) and the caller stays with
/// the agent. It covers the target ringing (carriers give up after 60 s).
pub const NOTIFY_LIMIT: Duration = Duration::from_secs(90);

/// The longest transfer target accepted from an agent.
pub const MAX_TARGET_LEN: usize = 256;

/// How the agent wants the caller transferred.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum TransferMode {
    /// REFER to the caller's side: the carrier calls the target and drops us.
    Blind,
    /// The daemon calls the target itself and bridges the two legs.
    Bridge,
}

impl TransferMode {
    /// The protocol's name for it.
    pub fn as_str(self) -> &'static str {
        match self {
            TransferMode::Blind => "blind",
            TransferMode::Bridge => "bridge",
        }
    }

    /// The protocol's name as a mode (`None`: unknown).
    pub fn parse(s: &str) -> Option<TransferMode> {
        match s {
            "blind" => Some(TransferMode::Blind),
            "bridge" => Some(TransferMode::Bridge),
            _ => None,
        }
    }
}

/// A transfer target the agent gave, checked: a `sip:`/`sips:` URI without
/// URI headers, or a `tel:` number (a bare `+` E.164 number becomes `tel:`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TransferTarget(Uri);

impl TransferTarget {
    /// Checks the agent's `to`.
    pub fn parse(to: &str) -> Result<TransferTarget, TransferFailure> {
        let to = to.trim();
        if to.is_empty() || to.len() > MAX_TARGET_LEN {
            return Err(TransferFailure::InvalidTarget);
        }
        let text = if to.starts_with('+') {
            format!("tel:{to}")
        } else {
            to.to_owned()
        };
        let uri = Uri::parse(&text).map_err(|_| TransferFailure::InvalidTarget)?;
        let ok = match uri.scheme {
            Scheme::Sip | Scheme::Sips => uri.headers.is_none() && uri.host.is_some(),
            Scheme::Tel => uri.user.as_deref().is_some_and(|n| {
                // A global number: `+` and at least one digit.
                n.starts_with('+') && n.chars().any(|c| c.is_ascii_digit())
            }),
            Scheme::Other(_) => false,
        };
        if !ok {
            return Err(TransferFailure::InvalidTarget);
        }
        Ok(TransferTarget(uri))
    }

    /// The URI as it goes into `Refer-To` (and the CDR).
    pub fn uri(&self) -> &Uri {
        &self.0
    }
}

impl std::fmt::Display for TransferTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

/// Why a transfer did not happen (the caller stays with the agent).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum TransferFailure {
    /// `to` is not a `sip:`/`sips:` URI or a `tel:`/E.164 number.
    InvalidTarget,
    /// `mode` is neither `blind` nor `bridge`.
    InvalidMode,
    /// `bridge`: this build cannot dial the target itself yet (the
    /// outbound leg is issue 13 item 2); use `blind`.
    UnsupportedMode,
    /// Another transfer of this call is still running.
    InProgress,
    /// The call is not answered and confirmed yet, or already ending.
    NotConnected,
    /// The caller's side refused the REFER (its status is reported).
    Refused,
    /// The REFER got no final answer (Timer F).
    Timeout,
    /// The transfer target failed (the NOTIFY's sipfrag status is reported).
    TargetFailed,
    /// No final NOTIFY within [`NOTIFY_LIMIT`] of the 202, or the
    /// subscription ended without one.
    NotifyTimeout,
}

impl TransferFailure {
    /// The protocol's name for it.
    pub fn as_str(self) -> &'static str {
        match self {
            TransferFailure::InvalidTarget => "invalid-target",
            TransferFailure::InvalidMode => "invalid-mode",
            TransferFailure::UnsupportedMode => "unsupported-mode",
            TransferFailure::InProgress => "in-progress",
            TransferFailure::NotConnected => "not-connected",
            TransferFailure::Refused => "refused",
            TransferFailure::Timeout => "timeout",
            TransferFailure::TargetFailed => "target-failed",
            TransferFailure::NotifyTimeout => "notify-timeout",
        }
    }
}

/// Where a transfer stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum TransferState {
    /// The caller's side accepted the REFER (202): it is calling the target.
    Accepted,
    /// A provisional status of the target (NOTIFY with a 1xx sipfrag).
    Progress,
    /// The target answered (NOTIFY with a 2xx sipfrag): the call ends here.
    Completed,
    /// It did not happen; the caller stays with the agent.
    Failed(TransferFailure),
}

impl TransferState {
    /// The agent protocol's `result`.
    pub fn result(self) -> &'static str {
        match self {
            TransferState::Accepted => "accepted",
            TransferState::Progress => "progress",
            TransferState::Completed => "completed",
            TransferState::Failed(_) => "failed",
        }
    }

    /// Whether nothing more follows.
    pub fn is_final(self) -> bool {
        matches!(self, TransferState::Completed | TransferState::Failed(_))
    }
}

/// One step of a transfer, for the agent (a `transfer` event), the call's
/// event stream and the CDR.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TransferUpdate {
    /// The target as the agent gave it (checked), or as given when invalid.
    pub to: String,
    /// Blind or bridge.
    pub mode: TransferMode,
    /// Where it stands.
    pub state: TransferState,
    /// The SIP status behind it: the REFER's final response (202, 403, …)
    /// or the NOTIFY's sipfrag status (180, 200, 486, …).
    pub status: Option<u16>,
}

/// The CDR's account of the call's last transfer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TransferRecord {
    /// `transferred_to`: the target.
    pub to: String,
    /// Blind or bridge.
    pub mode: TransferMode,
    /// `completed`, `failed`, or `accepted` (the call ended after the 202
    /// before any final NOTIFY told the outcome).
    pub result: &'static str,
    /// The failure, when `failed`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<&'static str>,
    /// The last SIP status seen (see [`TransferUpdate::status`]).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub status: Option<u16>,
}

impl TransferRecord {
    /// The record a step leaves.
    pub fn of(u: &TransferUpdate) -> TransferRecord {
        TransferRecord {
            to: u.to.clone(),
            mode: u.mode,
            result: match u.state {
                TransferState::Progress => "accepted",
                s => s.result(),
            },
            reason: match u.state {
                TransferState::Failed(f) => Some(f.as_str()),
                _ => None,
            },
            status: u.status,
        }
    }
}

/// The status of a `message/sipfrag` body (RFC 3420): its first line must
/// be a SIP status line, `SIP/2.0 200 OK`.
pub fn sipfrag_status(body: &[u8]) -> Option<u16> {
    let first = body.split(|&b| b == b'\n').next()?;
    let line = std::str::from_utf8(first).ok()?.trim_end_matches('\r');
    let rest = line.strip_prefix("SIP/2.0 ")?;
    let code = rest.get(..3)?;
    if rest.len() > 3 && !rest[3..].starts_with(' ') {
        return None;
    }
    let status: u16 = code.parse().ok()?;
    (100..=699).contains(&status).then_some(status)
}

/// The REFER in progress and the subscription it created.
pub(super) struct Refer {
    pub(super) target: TransferTarget,
    /// Its CSeq number (the `id` of its `Event: refer` NOTIFYs).
    pub(super) seq: u32,
    /// The REFER's transaction, until it terminates.
    pub(super) txn: Option<ClientNonInviteTransaction>,
    /// The 202 came.
    pub(super) accepted: bool,
    /// The final NOTIFY must come by then (set at the 202).
    pub(super) deadline: Option<Instant>,
    /// The last status seen.
    pub(super) status: Option<u16>,
    /// A final state was reported: nothing more is.
    pub(super) done: bool,
}

impl Refer {
    /// Its transaction is still running (retransmitting or absorbing).
    pub(super) fn txn_running(&self) -> bool {
        self.txn.is_some()
    }

    pub(super) fn poll_timeout(&self) -> Option<Instant> {
        let txn = self.txn.as_ref().and_then(|t| t.poll_timeout());
        let deadline = if self.done { None } else { self.deadline };
        [txn, deadline].into_iter().flatten().min()
    }
}

impl Call {
    /// The agent asks for a blind transfer to `target`: a REFER goes to the
    /// caller's side at once. Refused without touching the wire when the
    /// call is not confirmed or a transfer is already running; the outcome
    /// comes as [`CallEvent::Transfer`] updates.
    pub fn refer(
        &mut self,
        now: Instant,
        target: TransferTarget,
        rng: &mut impl RngCore,
    ) -> Result<(), TransferFailure> {
        if self.state != State::Confirmed || self.pending_hangup.is_some() {
            return Err(TransferFailure::NotConnected);
        }
        if self.refer.as_ref().is_some_and(|r| !r.done) {
            return Err(TransferFailure::InProgress);
        }
        let via = self.via(rng);
        let contact = self.contact_addr();
        let mut req = self.dialog.new_request(Method::Refer, &via, &contact);
        req.headers
            .push("Refer-To", NameAddr::new(target.uri().clone()).to_string());
        req.headers.push(
            "Referred-By",
            NameAddr::new(self.dialog.local_uri.uri.clone()).to_string(),
        );
        req.headers.push("Allow", super::ALLOW);
        let seq = self.dialog.local_seq;
        let Ok(key) = txn_key(&req) else {
            return Err(TransferFailure::NotConnected);
        };
        let txn = ClientNonInviteTransaction::new(
            now,
            key,
            self.peer.transport.reliability(),
            self.settings.timers,
            req.encode(),
        );
        self.refer = Some(Refer {
            target,
            seq,
            txn: Some(txn),
            accepted: false,
            deadline: None,
            status: None,
            done: false,
        });
        self.drain_refer(now, rng);
        Ok(())
    }

    /// A response to our REFER.
    pub(super) fn on_refer_response(
        &mut self,
        now: Instant,
        seq: u32,
        status: u16,
        rng: &mut impl RngCore,
    ) {
        let Some(r) = &mut self.refer else { return };
        if r.seq != seq {
            return;
        }
        let Some(txn) = &mut r.txn else { return };
        let first_final = status >= 200
            && matches!(
                txn.state(),
                crate::sip::transaction::ClientNonInviteState::Trying
                    | crate::sip::transaction::ClientNonInviteState::Proceeding
            );
        let _ = txn.on_response(now, status);
        if first_final && !r.done {
            if (200..300).contains(&status) {
                r.accepted = true;
                r.status = Some(status);
                r.deadline = Some(now + NOTIFY_LIMIT);
                self.transfer_update(now, TransferState::Accepted, Some(status), rng);
            } else {
                self.transfer_update(
                    now,
                    TransferState::Failed(TransferFailure::Refused),
                    Some(status),
                    rng,
                );
            }
        }
        self.drain_refer(now, rng);
    }

    /// A NOTIFY in our dialog: the `refer` subscription's progress. Answered
    /// 200 when it belongs to our REFER, 489 for another event package, 481
    /// when no REFER of ours created a subscription (RFC 6665 §4.1.3).
    pub(super) fn on_notify(
        &mut self,
        now: Instant,
        req: &Request,
        dest: super::Peer,
        rng: &mut impl RngCore,
    ) {
        let event = req.headers.get("Event").unwrap_or("");
        let package = event.split(';').next().unwrap_or("").trim();
        if !package.eq_ignore_ascii_case("refer") {
            let resp = self.dialog_response(req, 489, false);
            self.start_server_txn(now, req, resp, dest);
            return;
        }
        let id_ok = |r: &Refer| {
            event.split(';').skip(1).all(|p| match p.split_once('=') {
                Some((name, value)) if name.trim().eq_ignore_ascii_case("id") => {
                    value.trim().parse::<u32>().ok() == Some(r.seq)
                }
                _ => true,
            })
        };
        if !self.refer.as_ref().is_some_and(id_ok) {
            let resp = self.dialog_response(req, 481, false);
            self.start_server_txn(now, req, resp, dest);
            return;
        }
        let ok = self.dialog_response(req, 200, false);
        self.start_server_txn(now, req, ok, dest);
        let terminated = req
            .headers
            .get("Subscription-State")
            .and_then(|s| s.split(';').next())
            .is_some_and(|s| s.trim().eq_ignore_ascii_case("terminated"));
        let status = sipfrag_status(&req.body);
        let Some(r) = &mut self.refer else { return };
        if r.done {
            return;
        }
        // A NOTIFY may overtake the 202 (RFC 3515 §2.4.4): it accepts too.
        r.accepted = true;
        match status {
            Some(s) if s < 200 => {
                r.status = Some(s);
                if terminated {
                    self.transfer_update(
                        now,
                        TransferState::Failed(TransferFailure::NotifyTimeout),
                        Some(s),
                        rng,
                    );
                } else {
                    self.transfer_update(now, TransferState::Progress, Some(s), rng);
                }
            }
            Some(s) if s < 300 => {
                self.transfer_update(now, TransferState::Completed, Some(s), rng);
            }
            Some(s) => {
                self.transfer_update(
                    now,
                    TransferState::Failed(TransferFailure::TargetFailed),
                    Some(s),
                    rng,
                );
            }
            None if terminated => {
                let last = r.status;
                self.transfer_update(
                    now,
                    TransferState::Failed(TransferFailure::NotifyTimeout),
                    last,
                    rng,
                );
            }
            None => {}
        }
    }

    /// Time passes for the REFER: retransmissions, Timer F, the bound on
    /// the final NOTIFY.
    pub(super) fn refer_timeout(&mut self, now: Instant, rng: &mut impl RngCore) {
        let Some(r) = &mut self.refer else { return };
        if let Some(t) = &mut r.txn {
            t.handle_timeout(now);
        }
        self.drain_refer(now, rng);
        let Some(r) = &mut self.refer else { return };
        if !r.done && r.deadline.is_some_and(|d| now >= d) {
            let last = r.status;
            self.transfer_update(
                now,
                TransferState::Failed(TransferFailure::NotifyTimeout),
                last,
                rng,
            );
        }
    }

    fn drain_refer(&mut self, now: Instant, rng: &mut impl RngCore) {
        let dest = self.request_dest();
        let Some(r) = &mut self.refer else { return };
        let Some(txn) = &mut r.txn else { return };
        let mut out = Vec::new();
        let timed_out = take_transmits(|| txn.poll_output(), &mut out);
        if txn.is_terminated() {
            r.txn = None;
        }
        for bytes in out {
            self.out
                .push_back(CallOutput::Transmit(Transmit { dest, bytes }));
        }
        if timed_out && self.refer.as_ref().is_some_and(|r| !r.done && !r.accepted) {
            self.transfer_update(
                now,
                TransferState::Failed(TransferFailure::Timeout),
                Some(408),
                rng,
            );
        }
    }

    /// Reports a step; a final one closes the transfer and, completed, ends
    /// the call (BYE: RFC 3515 §2.4.7 leaves it to us once the target
    /// answered).
    fn transfer_update(
        &mut self,
        now: Instant,
        state: TransferState,
        status: Option<u16>,
        rng: &mut impl RngCore,
    ) {
        let Some(r) = &mut self.refer else { return };
        if state.is_final() {
            r.done = true;
            r.deadline = None;
        }
        if status.is_some() {
            r.status = status;
        }
        let update = TransferUpdate {
            to: r.target.to_string(),
            mode: TransferMode::Blind,
            state,
            status,
        };
        self.record.transfer = Some(TransferRecord::of(&update));
        self.out
            .push_back(CallOutput::Event(CallEvent::Transfer(update)));
        if state == TransferState::Completed {
            self.hang_up(now, HangupCause::Transferred, rng);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_keep_tel_and_check_sip() {
        let t = |s: &str| TransferTarget::parse(s).map(|t| t.to_string());
        assert_eq!(t("tel:+15551234567").unwrap(), "tel:+15551234567");
        assert_eq!(t("+15551234567").unwrap(), "tel:+15551234567");
        assert_eq!(t(" +1-555-123-4567 ").unwrap(), "tel:+1-555-123-4567");
        assert_eq!(
            t("sip:support@pbx.example.com;transport=tcp").unwrap(),
            "sip:support@pbx.example.com;transport=tcp"
        );
        assert_eq!(
            t("sips:alice@10.0.0.1:5061").unwrap(),
            "sips:alice@10.0.0.1:5061"
        );
        for bad in [
            "",
            "1555",
            "tel:5551234",
            "tel:+",
            "mailto:a@b",
            "sip:a@b?Replaces=x",
            "sip:a@b\r\nX: y",
            "sip:a@b c",
            &format!("sip:{}@b", "a".repeat(300)),
        ] {
            assert_eq!(t(bad), Err(TransferFailure::InvalidTarget), "{bad:?}");
        }
    }

    #[test]
    fn sipfrag_status_line_only() {
        assert_eq!(sipfrag_status(b"SIP/2.0 200 OK\r\n"), Some(200));
        assert_eq!(sipfrag_status(b"SIP/2.0 100 Trying"), Some(100));
        assert_eq!(
            sipfrag_status(b"SIP/2.0 486 Busy Here\r\nContent-Length: 0\r\n\r\n"),
            Some(486)
        );
        assert_eq!(sipfrag_status(b"SIP/2.0 180"), Some(180));
        for bad in [
            &b""[..],
            b"INVITE sip:a@b SIP/2.0\r\n",
            b"SIP/2.0 2000 OK",
            b"SIP/2.0 099 x",
            b"SIP/1.0 200 OK",
            b"\xff\xfe",
        ] {
            assert_eq!(sipfrag_status(bad), None, "{bad:?}");
        }
    }
}
