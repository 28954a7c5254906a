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
    /// `bridge`: no leg to the target could be started (no transfer trunk
    /// for the tenant, a call limit or rate reached, the daemon draining).
    Unavailable,
    /// `bridge`: the target did not answer within the trunk's answer
    /// timeout (we cancelled).
    NoAnswer,
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
            TransferFailure::Unavailable => "unavailable",
            TransferFailure::NoAnswer => "no-answer",
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
    /// A bridge transfer's other leg: in the caller's CDR the target leg's
    /// Call-ID, in the target leg's CDR the caller's.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub leg_call_id: Option<String>,
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
            leg_call_id: None,
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
    /// A blind transfer of this call is running (REFER sent, no final
    /// outcome yet).
    pub fn transfer_running(&self) -> bool {
        self.refer.as_ref().is_some_and(|r| !r.done)
    }

    /// Notes a transfer's step in the CDR (a bridge transfer, which the
    /// `BridgedCall` runs beside this call).
    pub fn note_transfer(&mut self, record: TransferRecord) {
        self.record.transfer = Some(record);
    }

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
    use crate::call::{Peer, TransportKind};
    use crate::sip::message::{Message, Response, parse_datagram};
    use crate::sip::sdp::Codec;
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;
    use std::time::SystemTime;

    const SDP: &str = "v=0\r\no=c 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\n\
t=0 0\r\nm=audio 40000 RTP/AVP 0\r\na=rtpmap:0 PCMU/8000\r\n";

    fn invite() -> Request {
        request(&format!(
            "INVITE sip:+15550001111@127.0.0.1:5060 SIP/2.0\r\n\
Via: SIP/2.0/UDP 127.0.0.1:5070;branch=z9hG4bK-inv;rport\r\n\
Max-Forwards: 70\r\n\
From: <sip:+15551112222@127.0.0.1>;tag=car\r\n\
To: <sip:+15550001111@127.0.0.1>\r\n\
Call-ID: xfer-1@127.0.0.1\r\n\
CSeq: 1 INVITE\r\n\
Contact: <sip:carrier@127.0.0.1:5070>\r\n\
Content-Type: application/sdp\r\n\
Content-Length: {}\r\n\r\n{SDP}",
            SDP.len()
        ))
    }

    struct Leg {
        call: Call,
        now: Instant,
        rng: ChaCha8Rng,
        /// Our To tag.
        tag: String,
        /// The carrier's CSeq counter.
        cseq: u32,
        /// What the last NOTIFY made the call send.
        last: Vec<Message>,
    }

    fn request(text: &str) -> Request {
        match parse_datagram(text.as_bytes()) {
            Ok(Message::Request(r)) => r,
            other => panic!("not a request: {other:?}"),
        }
    }

    fn parse_out(bytes: &[u8]) -> Message {
        parse_datagram(bytes).expect("our own message parses")
    }

    impl Leg {
        /// A confirmed call (INVITE, 200 at once, ACK).
        fn confirmed() -> Leg {
            let mut rng = ChaCha8Rng::seed_from_u64(7);
            let now = Instant::now();
            let settings =
                crate::call::test_settings("xfer-1@127.0.0.1", 20_000, vec![Codec::Pcmu]);
            let peer = Peer {
                transport: TransportKind::Udp,
                addr: "127.0.0.1:5070".parse().unwrap(),
                flow: 0,
            };
            let mut call = Call::new(
                now,
                SystemTime::UNIX_EPOCH,
                invite(),
                peer,
                settings,
                &mut rng,
            )
            .unwrap();
            call.handle_timeout(now, &mut rng);
            let mut tag = String::new();
            while let Some(o) = call.poll_output() {
                if let CallOutput::Transmit(t) = o
                    && let Message::Response(r) = parse_out(&t.bytes)
                    && r.status == 200
                {
                    tag = r.to().unwrap().tag().unwrap().to_owned();
                }
            }
            assert!(!tag.is_empty(), "answered");
            let mut leg = Leg {
                call,
                now,
                rng,
                tag,
                cseq: 1,
                last: Vec::new(),
            };
            let ack = leg.in_dialog("ACK", 1, "", "");
            leg.call.handle_request(now, ack, &mut leg.rng);
            leg.drain();
            assert!(leg.call.is_confirmed());
            leg
        }

        fn in_dialog(&self, method: &str, seq: u32, headers: &str, body: &str) -> Request {
            request(&format!(
                "{method} sip:sipbridge@127.0.0.1:5060 SIP/2.0\r\n\
Via: SIP/2.0/UDP 127.0.0.1:5070;branch=z9hG4bK-{method}-{seq}\r\n\
Max-Forwards: 70\r\n\
From: <sip:+15551112222@127.0.0.1>;tag=car\r\n\
To: <sip:+15550001111@127.0.0.1>;tag={tag}\r\n\
Call-ID: xfer-1@127.0.0.1\r\n\
CSeq: {seq} {method}\r\n\
{headers}Content-Length: {len}\r\n\r\n{body}",
                tag = self.tag,
                len = body.len()
            ))
        }

        /// A NOTIFY from the carrier; returns our response's status.
        fn notify(&mut self, event: &str, state: &str, frag: &str) -> u16 {
            self.cseq += 1;
            let headers = format!(
                "Event: {event}\r\nSubscription-State: {state}\r\n\
Content-Type: message/sipfrag;version=2.0\r\n"
            );
            let req = self.in_dialog("NOTIFY", self.cseq, &headers, frag);
            self.call.handle_request(self.now, req, &mut self.rng);
            let (sent, _) = self.drain();
            let status = sent
                .iter()
                .find_map(|m| match m {
                    Message::Response(r) if r.cseq().unwrap().method == Method::Notify => {
                        Some(r.status)
                    }
                    _ => None,
                })
                .expect("the NOTIFY is answered");
            self.last = sent;
            status
        }

        /// Everything the call sent and reported.
        fn drain(&mut self) -> (Vec<Message>, Vec<CallEvent>) {
            let (mut sent, mut events) = (Vec::new(), Vec::new());
            while let Some(o) = self.call.poll_output() {
                match o {
                    CallOutput::Transmit(t) => sent.push(parse_out(&t.bytes)),
                    CallOutput::Event(e) => events.push(e),
                }
            }
            (sent, events)
        }

        /// The REFER for `to`, as sent.
        fn refer(&mut self, to: &str) -> Request {
            let target = TransferTarget::parse(to).unwrap();
            self.call.refer(self.now, target, &mut self.rng).unwrap();
            let (sent, events) = self.drain();
            assert!(events.is_empty());
            match sent.as_slice() {
                [Message::Request(r)] if r.method == Method::Refer => r.clone(),
                other => panic!("one REFER expected: {other:?}"),
            }
        }

        fn answer(&mut self, refer: &Request, status: u16) -> Vec<TransferUpdate> {
            let resp = Response::for_request(refer, status);
            self.call.handle_response(self.now, resp, &mut self.rng);
            updates(self.drain().1)
        }

        /// Runs virtual time to `at`, returning what was sent and reported.
        fn run_until(&mut self, at: Instant) -> (Vec<Message>, Vec<TransferUpdate>) {
            let (mut sent, mut ups) = (Vec::new(), Vec::new());
            while let Some(t) = self.call.poll_timeout() {
                if t > at {
                    break;
                }
                self.now = t.max(self.now);
                self.call.handle_timeout(self.now, &mut self.rng);
                let (s, e) = self.drain();
                sent.extend(s);
                ups.extend(updates(e));
            }
            self.now = at;
            (sent, ups)
        }
    }

    fn updates(events: Vec<CallEvent>) -> Vec<TransferUpdate> {
        events
            .into_iter()
            .filter_map(|e| match e {
                CallEvent::Transfer(u) => Some(u),
                _ => None,
            })
            .collect()
    }

    fn states(ups: &[TransferUpdate]) -> Vec<(TransferState, Option<u16>)> {
        ups.iter().map(|u| (u.state, u.status)).collect()
    }

    #[test]
    fn refer_names_the_target_and_us_in_the_dialog() {
        let mut leg = Leg::confirmed();
        let refer = leg.refer("+15557654321");
        assert_eq!(refer.headers.get("Refer-To"), Some("<tel:+15557654321>"));
        assert_eq!(
            refer.headers.get("Referred-By"),
            Some("<sip:+15550001111@127.0.0.1>")
        );
        assert_eq!(refer.uri.to_string(), "sip:carrier@127.0.0.1:5070");
        assert!(refer.headers.get("To").unwrap().contains("tag=car"));
        assert!(refer.headers.get("Contact").is_some());
    }

    #[test]
    fn completed_transfer_byes_the_callers_leg_with_cause_transferred() {
        let mut leg = Leg::confirmed();
        let refer = leg.refer("sip:desk@10.0.0.9");
        let seq = refer.cseq().unwrap().seq;
        assert_eq!(
            states(&leg.answer(&refer, 202)),
            vec![(TransferState::Accepted, Some(202))]
        );
        let event = format!("refer;id={seq}");
        assert_eq!(
            leg.notify(&event, "active;expires=60", "SIP/2.0 180 Ringing\r\n"),
            200
        );
        assert_eq!(
            leg.notify(&event, "terminated;reason=noresource", "SIP/2.0 200 OK\r\n"),
            200
        );
        // The 200 to the NOTIFY, then the BYE, in that same step; the CDR says so.
        let kinds: Vec<String> = leg
            .last
            .iter()
            .map(|m| match m {
                Message::Request(r) => r.method.to_string(),
                Message::Response(r) => r.status.to_string(),
            })
            .collect();
        assert_eq!(kinds, vec!["200", "BYE"]);
        assert!(leg.call.is_ended());
        let record = &leg.call.record;
        assert_eq!(record.cause, "transferred");
        let t = record.transfer.as_ref().unwrap();
        assert_eq!(
            (t.result, t.status, t.to.as_str()),
            ("completed", Some(200), "sip:desk@10.0.0.9")
        );
    }

    #[test]
    fn the_final_notify_may_overtake_the_202() {
        let mut leg = Leg::confirmed();
        let refer = leg.refer("tel:+15557654321");
        assert_eq!(
            leg.notify("refer", "terminated", "SIP/2.0 486 Busy Here\r\n"),
            200
        );
        let ups = leg.answer(&refer, 202);
        assert!(ups.is_empty(), "nothing after the final step: {ups:?}");
        assert!(!leg.call.is_ended(), "the caller stays");
        let t = leg.call.record.transfer.as_ref().unwrap();
        assert_eq!(
            (t.result, t.reason, t.status),
            ("failed", Some("target-failed"), Some(486))
        );
    }

    #[test]
    fn a_refer_without_answer_fails_at_timer_f_and_the_caller_stays() {
        let mut leg = Leg::confirmed();
        let start = leg.now;
        let _refer = leg.refer("tel:+15557654321");
        let (sent, ups) = leg.run_until(start + Duration::from_secs(40));
        assert!(
            sent.iter()
                .all(|m| matches!(m, Message::Request(r) if r.method == Method::Refer)),
            "only REFER retransmissions: {sent:?}"
        );
        assert!(sent.len() >= 5, "retransmitted: {}", sent.len());
        assert_eq!(
            states(&ups),
            vec![(TransferState::Failed(TransferFailure::Timeout), Some(408))]
        );
        assert!(!leg.call.is_ended());
        // Another transfer may follow.
        let again = leg.refer("tel:+15557654321");
        assert_eq!(again.method, Method::Refer);
    }

    #[test]
    fn no_final_notify_within_the_limit_fails_and_the_caller_stays() {
        let mut leg = Leg::confirmed();
        let refer = leg.refer("tel:+15557654321");
        leg.answer(&refer, 202);
        let accepted_at = leg.now;
        leg.notify("refer", "active", "SIP/2.0 100 Trying\r\n");
        let (_, ups) = leg.run_until(accepted_at + NOTIFY_LIMIT - Duration::from_millis(1));
        assert!(ups.is_empty());
        let (_, ups) = leg.run_until(accepted_at + NOTIFY_LIMIT);
        assert_eq!(
            states(&ups),
            vec![(
                TransferState::Failed(TransferFailure::NotifyTimeout),
                Some(100)
            )]
        );
        assert!(!leg.call.is_ended());
        // A late NOTIFY is answered, not reported.
        assert_eq!(leg.notify("refer", "terminated", "SIP/2.0 200 OK\r\n"), 200);
        assert!(!leg.call.is_ended());
    }

    #[test]
    fn a_subscription_ended_without_a_final_status_fails() {
        let mut leg = Leg::confirmed();
        let refer = leg.refer("tel:+15557654321");
        leg.answer(&refer, 202);
        leg.notify("refer", "terminated;reason=timeout", "");
        let t = leg.call.record.transfer.as_ref().unwrap();
        assert_eq!((t.result, t.reason), ("failed", Some("notify-timeout")));
    }

    #[test]
    fn one_transfer_at_a_time_and_only_once_confirmed() {
        let mut leg = Leg::confirmed();
        let _refer = leg.refer("tel:+15557654321");
        let target = TransferTarget::parse("tel:+15550000000").unwrap();
        assert_eq!(
            leg.call.refer(leg.now, target.clone(), &mut leg.rng),
            Err(TransferFailure::InProgress)
        );
        assert!(leg.drain().0.is_empty(), "no second REFER");
        let now = leg.now;
        leg.call.hang_up(now, HangupCause::Local, &mut leg.rng);
        assert_eq!(
            leg.call.refer(leg.now, target, &mut leg.rng),
            Err(TransferFailure::NotConnected)
        );
    }

    #[test]
    fn notifies_of_other_packages_or_subscriptions_are_refused() {
        let mut leg = Leg::confirmed();
        assert_eq!(
            leg.notify("refer", "active", "SIP/2.0 100 Trying\r\n"),
            481,
            "no REFER yet"
        );
        let refer = leg.refer("tel:+15557654321");
        let seq = refer.cseq().unwrap().seq;
        assert_eq!(leg.notify("dialog", "active", ""), 489);
        assert_eq!(
            leg.notify(&format!("refer;id={}", seq + 1), "active", ""),
            481
        );
        assert_eq!(
            leg.notify(&format!("refer;id={seq}"), "active", "garbage"),
            200
        );
        assert!(leg.call.record.transfer.is_none(), "nothing to report yet");
    }

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
