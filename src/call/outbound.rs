//! The outbound leg: the UAC side of one call we place, from our INVITE to
//! the answer (or the reason there was none), sans-IO (issue 13).
//!
//! Used for outbound calls (admin API `POST /v1/calls`: the answered leg
//! becomes a [`Call`] and then a `BridgedCall`, exactly like an inbound
//! call) and for the second leg of a bridge transfer (the target's leg).
//!
//! What it does:
//! - sends the INVITE with our SDP offer (G.711 + telephone-event) through
//!   the trunk's next hop, in an initial-INVITE client transaction (RFC 3261
//!   §17.1.1; Timer B stops at the first provisional);
//! - a 401/407 is ACKed (by the transaction) and the INVITE is sent once
//!   more with `Authorization` / `Proxy-Authorization` (RFC 3261 §22.2): a
//!   new CSeq and branch, the same Call-ID and From tag; a second challenge
//!   (but `stale=true`, answered once more) is a failure;
//! - every provisional is reported ([`LegEvent::Progress`]); the first with a
//!   usable SDP answer is early media ([`LegEvent::EarlyMedia`]);
//! - the 2xx is ACKed (a new transaction, RFC 3261 §13.2.2.4) and the leg
//!   is [`LegEvent::Answered`]: [`OutboundLeg::take_answered`] hands over
//!   the dialog, the SDP state and the ACK, and [`Call::from_answered`] turns
//!   them into a confirmed call (BYE either way, re-INVITEs, RTP timeout,
//!   2xx retransmissions re-ACKed);
//! - the answer timeout, or the owner's [`OutboundLeg::cancel`], sends
//!   CANCEL (RFC 3261 §9.1: only once a provisional has arrived; until then
//!   it waits for one) and the 487 ends the leg; a 2xx that crosses the
//!   CANCEL is ACKed and ended with BYE;
//! - a 2xx whose SDP we cannot use is ACKed and ended with BYE;
//! - every failure is one [`DialFailure`] with the status that caused it.
//!
//! Must not touch: sockets, clocks (`now` is passed in), randomness (tags,
//! branches, cnonces come from the caller's RNG), the configuration (the
//! owner fills [`DialSettings`]). Forked 2xx responses (a second dialog)
//! are not supported: only the first 2xx's dialog is kept, a later 2xx with
//! another To tag is ACKed and sent BYE.
//!
//! [`Call`]: super::Call
//! [`Call::from_answered`]: super::Call::from_answered

use super::{
    CallDirection, CallRecord, HangupSide, LocalSip, Peer, RecordingStatus, Transmit, TransportKind,
};
use crate::config::secret::Secret;
use crate::sip::dialog::Dialog;
use crate::sip::digest::DigestChallenge;
use crate::sip::message::{
    CSeq, Headers, Host, Method, NameAddr, Params, Request, Response, Uri, Via,
};
use crate::sip::sdp::{Direction, LocalMedia, Negotiated, SdpSession};
use crate::sip::timer::TimerConfig;
use crate::sip::transaction::{
    ClientInviteTransaction, ClientNonInviteTransaction, TransactionEvent, TransactionKey,
    TransactionOutput,
};
use bytes::Bytes;
use rand::RngCore;
use std::collections::VecDeque;
use std::time::{Duration, Instant, SystemTime};

/// Credentials for a trunk that challenges our INVITEs.
#[derive(Debug, Clone)]
pub struct LegCredentials {
    /// Digest username.
    pub username: String,
    /// Digest password (never printed).
    pub password: Secret,
}

/// Everything one outbound leg needs, filled by the owner from the trunk's
/// `outbound` section and the request.
#[derive(Debug, Clone)]
pub struct DialSettings {
    /// The new call's Call-ID.
    pub call_id: String,
    /// Tenant (for the CDR).
    pub tenant: String,
    /// Trunk name (for the CDR).
    pub trunk: String,
    /// The Request-URI (`sip:+15551234567@carrier.example`).
    pub request_uri: Uri,
    /// Our identity (From, no tag: the leg adds one).
    pub from: NameAddr,
    /// The party called (To).
    pub to: NameAddr,
    /// Where the INVITE goes: the trunk's next hop and the socket to use.
    pub dest: Peer,
    /// Our advertised SIP address (Via, Contact).
    pub local: LocalSip,
    /// Our media: RTP address and port, codecs.
    pub media: LocalMedia,
    /// RFC 3261 T1/T2/T4.
    pub timers: TimerConfig,
    /// Digest credentials for 401/407; `None`: a challenge is a failure.
    pub credentials: Option<LegCredentials>,
    /// Ringing longer than this (from the INVITE) is "no answer": CANCEL.
    pub answer_timeout: Duration,
    /// Extra headers on the INVITE (e.g. `P-Asserted-Identity`, `X-…`).
    pub extra_headers: Vec<(String, String)>,
}

/// Why a leg was not answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DialFailure {
    /// 486 Busy Here or 600 Busy Everywhere.
    Busy(u16),
    /// Not answered within the answer timeout (we sent CANCEL).
    NoAnswer,
    /// The owner cancelled it ([`OutboundLeg::cancel`]).
    Cancelled,
    /// The trunk challenged and we had no credentials, or refused ours.
    AuthFailed(u16),
    /// Another final response (3xx–6xx).
    Rejected(u16),
    /// No final response at all (Timer B, or no answer to our CANCEL).
    Timeout,
    /// The transport reported a failure.
    TransportError,
    /// Answered with an SDP we cannot use (ACKed, then BYE).
    MediaFailed,
}

impl DialFailure {
    /// The result code for the CDR and the API: the final response's
    /// status; 487 when we cancelled, 408 when nothing answered, 503 for a
    /// transport failure, 488 for unusable media.
    pub fn status(self) -> u16 {
        match self {
            DialFailure::Busy(s) | DialFailure::AuthFailed(s) | DialFailure::Rejected(s) => s,
            DialFailure::NoAnswer | DialFailure::Cancelled => 487,
            DialFailure::Timeout => 408,
            DialFailure::TransportError => 503,
            DialFailure::MediaFailed => 488,
        }
    }

    /// A short name for logs, CDRs and the API.
    pub fn as_str(self) -> &'static str {
        match self {
            DialFailure::Busy(_) => "busy",
            DialFailure::NoAnswer => "no-answer",
            DialFailure::Cancelled => "cancelled",
            DialFailure::AuthFailed(_) => "auth-failed",
            DialFailure::Rejected(_) => "rejected",
            DialFailure::Timeout => "timeout",
            DialFailure::TransportError => "transport-error",
            DialFailure::MediaFailed => "media-failed",
        }
    }
}

/// What the leg tells its owner.
#[derive(Debug, Clone, PartialEq)]
pub enum LegEvent {
    /// A provisional response (180, 183, …; 100 is not reported).
    Progress(u16),
    /// A provisional carried a usable SDP answer: the far end's early media
    /// (ringback, announcements) comes to `negotiated.remote_rtp`.
    EarlyMedia(Negotiated),
    /// Answered and ACKed: take it with [`OutboundLeg::take_answered`].
    Answered,
    /// Not answered; the CDR of the attempt is [`OutboundLeg::record`].
    Failed(DialFailure),
}

/// Output of [`OutboundLeg::poll_output`].
#[derive(Debug, Clone, PartialEq)]
pub enum LegOutput {
    /// Send these bytes.
    Transmit(Transmit),
    /// Something happened.
    Event(LegEvent),
}

/// Where the leg is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LegState {
    /// INVITE sent, nothing but 100 yet.
    Calling,
    /// A provisional arrived (the far end rings).
    Ringing,
    /// We sent CANCEL (or will, at the first provisional) and wait for the 487.
    Cancelling,
    /// Answered: hand over with [`OutboundLeg::take_answered`].
    Answered,
    /// Not answered (or answered and released at once: media failed, or
    /// the 2xx crossed our CANCEL).
    Failed,
}

/// An answered leg, ready to become a [`super::Call`].
#[derive(Debug, Clone)]
pub struct AnsweredLeg {
    /// Our INVITE as last sent (with credentials when challenged).
    pub invite: Request,
    /// The dialog the 2xx created.
    pub dialog: Dialog,
    /// Our SDP state (version, session id) for later re-INVITEs.
    pub sdp: SdpSession,
    /// The media agreed in the 2xx (or, without SDP there, the early SDP).
    pub negotiated: Negotiated,
    /// The ACK we sent for the 2xx: resent on each 2xx retransmission.
    pub ack: Bytes,
    /// Where the trunk is.
    pub dest: Peer,
    /// The INVITE was first sent (for durations).
    pub started: Instant,
    /// The wall time then.
    pub wall_started: SystemTime,
    /// The CDR so far (answered, codec set).
    pub record: CallRecord,
}

/// Why the leg ends: the answer timeout or the owner.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum CancelReason {
    NoAnswer,
    Owner,
}

impl CancelReason {
    fn failure(self) -> DialFailure {
        match self {
            CancelReason::NoAnswer => DialFailure::NoAnswer,
            CancelReason::Owner => DialFailure::Cancelled,
        }
    }
}

/// One INVITE attempt (the first, and the one with credentials).
struct Attempt {
    request: Request,
    seq: u32,
    txn: ClientInviteTransaction,
}

/// The UAC side of one call we place. See the module docs.
pub struct OutboundLeg {
    settings: DialSettings,
    state: LegState,
    local_tag: String,
    /// The current INVITE attempt.
    attempt: Attempt,
    /// A challenged attempt still absorbing retransmitted 401/407s (Timer D).
    challenged: Option<Attempt>,
    /// Challenges answered so far (at most two: the first and a stale one).
    auth_rounds: u8,
    /// Nonce count for the current nonce.
    nc: u32,
    last_nonce: String,
    sdp: SdpSession,
    /// The SDP of the first provisional that had a usable one.
    early_sdp: Option<Bytes>,
    early_reported: bool,
    provisional_seen: bool,
    cancel: Option<CancelReason>,
    cancel_txn: Option<ClientNonInviteTransaction>,
    /// RFC 3261 §9.1: no final response 64·T1 after our CANCEL ends the leg.
    cancel_deadline: Option<Instant>,
    /// BYE for a 2xx we cannot keep (crossed CANCEL, unusable SDP, fork).
    bye_txn: Option<ClientNonInviteTransaction>,
    answer_deadline: Instant,
    answered: Option<AnsweredLeg>,
    failure: Option<DialFailure>,
    started: Instant,
    wall_started: SystemTime,
    record: CallRecord,
    out: VecDeque<LegOutput>,
}

impl std::fmt::Debug for OutboundLeg {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OutboundLeg")
            .field("call_id", &self.settings.call_id)
            .field("state", &self.state)
            .finish_non_exhaustive()
    }
}

fn random_token(rng: &mut impl RngCore) -> String {
    format!("{:016x}", rng.next_u64())
}

/// Header names the owner may not set through `extra_headers`: the leg
/// writes them itself.
const RESERVED_HEADERS: &[&str] = &[
    "via",
    "from",
    "to",
    "call-id",
    "cseq",
    "contact",
    "max-forwards",
    "content-type",
    "content-length",
    "authorization",
    "proxy-authorization",
    "route",
];

impl OutboundLeg {
    /// Sends the INVITE at once.
    pub fn new(
        now: Instant,
        wall_now: SystemTime,
        settings: DialSettings,
        rng: &mut impl RngCore,
    ) -> OutboundLeg {
        let local_tag = random_token(rng);
        let mut sdp = SdpSession::new(rng.next_u64() >> 1, "sipbridge");
        let seq = 1 + (rng.next_u32() >> 20);
        let mut request = build_invite(&settings, &local_tag, seq, rng);
        request.body = sdp.offer(&settings.media, Direction::SendRecv);
        let txn = start_invite_txn(now, &settings, &request);
        let record = CallRecord {
            call_id: settings.call_id.clone(),
            direction: CallDirection::Outbound,
            tenant: Some(settings.tenant.clone()),
            trunk: Some(settings.trunk.clone()),
            from: settings.from.uri.user_unescaped().unwrap_or_default(),
            to: settings.to.uri.user_unescaped().unwrap_or_default(),
            source: settings.dest.addr,
            started_at: wall_now,
            answered_at: None,
            ended_at: None,
            result_code: 0,
            hangup_side: HangupSide::None,
            cause: String::new(),
            codec: None,
            rtp: None,
            pipeline: None,
            recording_paused: Vec::new(),
            recording: RecordingStatus::Off,
            quality: None,
            transfer: None,
        };
        let mut leg = OutboundLeg {
            answer_deadline: now + settings.answer_timeout,
            settings,
            state: LegState::Calling,
            local_tag,
            attempt: Attempt { request, seq, txn },
            challenged: None,
            auth_rounds: 0,
            nc: 0,
            last_nonce: String::new(),
            sdp,
            early_sdp: None,
            early_reported: false,
            provisional_seen: false,
            cancel: None,
            cancel_txn: None,
            cancel_deadline: None,
            bye_txn: None,
            answered: None,
            failure: None,
            started: now,
            wall_started: wall_now,
            record,
            out: VecDeque::new(),
        };
        leg.drain(now);
        leg
    }

    /// The leg's Call-ID (the daemon routes responses by it).
    pub fn call_id(&self) -> &str {
        &self.settings.call_id
    }

    /// Where the leg is.
    pub fn state(&self) -> LegState {
        self.state
    }

    /// Why it failed, once [`LegState::Failed`].
    pub fn failure(&self) -> Option<DialFailure> {
        self.failure
    }

    /// The settings it was started with.
    pub fn settings(&self) -> &DialSettings {
        &self.settings
    }

    /// The attempt's CDR: complete once failed (result code, cause, end).
    pub fn record(&self) -> &CallRecord {
        &self.record
    }

    /// Next output to act on.
    pub fn poll_output(&mut self) -> Option<LegOutput> {
        self.out.pop_front()
    }

    /// The answered leg, once [`LegEvent::Answered`] was emitted (once).
    pub fn take_answered(&mut self) -> Option<AnsweredLeg> {
        self.answered.take()
    }

    /// Whether nothing is left to retransmit or absorb: the owner may drop
    /// the leg (after taking the answered leg, if any).
    pub fn is_finished(&self) -> bool {
        matches!(self.state, LegState::Answered | LegState::Failed)
            && self.attempt.txn.is_terminated()
            && self
                .challenged
                .as_ref()
                .is_none_or(|a| a.txn.is_terminated())
            && self.cancel_txn.as_ref().is_none_or(|t| t.is_terminated())
            && self.bye_txn.as_ref().is_none_or(|t| t.is_terminated())
    }

    /// When [`OutboundLeg::handle_timeout`] must be called next.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let mut next: Option<Instant> = None;
        let mut consider = |t: Option<Instant>| {
            if let Some(t) = t {
                next = Some(next.map_or(t, |n| n.min(t)));
            }
        };
        consider(self.attempt.txn.poll_timeout());
        consider(self.challenged.as_ref().and_then(|a| a.txn.poll_timeout()));
        consider(self.cancel_txn.as_ref().and_then(|t| t.poll_timeout()));
        consider(self.bye_txn.as_ref().and_then(|t| t.poll_timeout()));
        if matches!(self.state, LegState::Calling | LegState::Ringing) {
            consider(Some(self.answer_deadline));
        }
        if self.state == LegState::Cancelling {
            consider(self.cancel_deadline);
        }
        next
    }

    /// Time moves on: retransmissions, the answer timeout, Timer B.
    pub fn handle_timeout(&mut self, now: Instant, rng: &mut impl RngCore) {
        self.attempt.txn.handle_timeout(now);
        if let Some(a) = &mut self.challenged {
            a.txn.handle_timeout(now);
        }
        if let Some(t) = &mut self.cancel_txn {
            t.handle_timeout(now);
        }
        if let Some(t) = &mut self.bye_txn {
            t.handle_timeout(now);
        }
        self.drain(now);
        if matches!(self.state, LegState::Calling | LegState::Ringing)
            && now >= self.answer_deadline
        {
            self.start_cancel(now, CancelReason::NoAnswer, rng);
        }
        if self.state == LegState::Cancelling && self.cancel_deadline.is_some_and(|t| now >= t) {
            let reason = self.cancel.unwrap_or(CancelReason::Owner);
            self.fail(now, reason.failure(), reason.failure().status());
        }
    }

    /// The owner gives up (admin API `DELETE`, the caller of a bridge
    /// transfer hung up): CANCEL. After the answer the leg is a `Call`;
    /// hang that up instead. Does nothing once answered or failed.
    pub fn cancel(&mut self, now: Instant, rng: &mut impl RngCore) {
        if matches!(self.state, LegState::Calling | LegState::Ringing) {
            self.start_cancel(now, CancelReason::Owner, rng);
        }
    }

    /// A response with this leg's Call-ID.
    pub fn handle_response(&mut self, now: Instant, resp: Response, rng: &mut impl RngCore) {
        let Ok(cseq) = resp.cseq() else {
            return;
        };
        let status = resp.status;
        if !(100..=699).contains(&status) {
            return;
        }
        match cseq.method {
            Method::Invite if cseq.seq == self.attempt.seq => {
                self.on_invite_response(now, resp, rng);
            }
            Method::Invite => {
                if let Some(a) = &mut self.challenged
                    && a.seq == cseq.seq
                {
                    // A retransmitted challenge: the transaction re-ACKs it.
                    let _ = a.txn.on_response(now, status, Bytes::new);
                }
            }
            Method::Cancel => {
                if let Some(t) = &mut self.cancel_txn {
                    let _ = t.on_response(now, status);
                }
            }
            Method::Bye => {
                if let Some(t) = &mut self.bye_txn {
                    let _ = t.on_response(now, status);
                }
            }
            _ => {}
        }
        self.drain(now);
    }

    fn on_invite_response(&mut self, now: Instant, resp: Response, rng: &mut impl RngCore) {
        let status = resp.status;
        if (200..300).contains(&status) {
            self.on_2xx(now, &resp, rng);
            return;
        }
        let ack_req = ack_for_non2xx(&self.attempt.request, &resp);
        let _ = self
            .attempt
            .txn
            .on_response(now, status, || ack_req.encode());
        if status < 200 {
            // Any provisional, 100 included, lets a CANCEL go (RFC 3261 §9.1).
            self.provisional_seen = true;
            if status > 100 && matches!(self.state, LegState::Calling | LegState::Ringing) {
                self.state = LegState::Ringing;
                self.out
                    .push_back(LegOutput::Event(LegEvent::Progress(status)));
                if !self.early_reported && !resp.body.is_empty() {
                    // RFC 3261 §13.2.1: the answer may come in a provisional;
                    // the 2xx repeats it. Read it on a copy: the 2xx is
                    // checked again.
                    let mut probe = self.sdp.clone();
                    if let Ok(neg) = probe.accept_answer(&resp.body, &self.settings.media) {
                        self.early_reported = true;
                        self.early_sdp = Some(resp.body.clone());
                        self.out
                            .push_back(LegOutput::Event(LegEvent::EarlyMedia(neg)));
                    }
                }
            }
            self.send_pending_cancel(now, rng);
            return;
        }
        // A final non-2xx.
        if !matches!(
            self.state,
            LegState::Calling | LegState::Ringing | LegState::Cancelling
        ) {
            return;
        }
        if (status == 401 || status == 407) && self.cancel.is_none() {
            match self.retry_with_credentials(now, &resp, rng) {
                Ok(()) => return,
                Err(()) => {
                    self.fail(now, DialFailure::AuthFailed(status), status);
                    return;
                }
            }
        }
        let failure = match (self.cancel, status) {
            (Some(reason), 487) => reason.failure(),
            (_, 486 | 600) => DialFailure::Busy(status),
            (_, 401 | 407) => DialFailure::AuthFailed(status),
            _ => DialFailure::Rejected(status),
        };
        self.fail(now, failure, status);
    }

    /// The INVITE again with credentials for `challenge` (RFC 3261 §22.2).
    fn retry_with_credentials(
        &mut self,
        now: Instant,
        challenge: &Response,
        rng: &mut impl RngCore,
    ) -> Result<(), ()> {
        let creds = self.settings.credentials.clone().ok_or(())?;
        let (header, answer_header) = if challenge.status == 407 {
            ("Proxy-Authenticate", "Proxy-Authorization")
        } else {
            ("WWW-Authenticate", "Authorization")
        };
        // The first challenge we can answer (a trunk may offer SHA-256 and MD5).
        let parsed = challenge
            .headers
            .get_all(header)
            .find_map(|v| DigestChallenge::parse(v).ok())
            .ok_or(())?;
        // One answer per call, and once more only for a stale nonce: a
        // second plain challenge means our credentials were refused.
        if self.auth_rounds >= 2 || (self.auth_rounds == 1 && !parsed.stale) {
            return Err(());
        }
        self.auth_rounds += 1;
        if parsed.nonce != self.last_nonce {
            self.nc = 0;
            self.last_nonce = parsed.nonce.clone();
        }
        self.nc += 1;
        let uri = self.settings.request_uri.to_string();
        let value = parsed.answer(
            &creds.username,
            creds.password.expose(),
            "INVITE",
            &uri,
            &random_token(rng),
            self.nc,
        );
        let seq = self.attempt.seq.wrapping_add(1).max(1);
        let mut request = build_invite(&self.settings, &self.local_tag, seq, rng);
        request.body = self.attempt.request.body.clone();
        request.headers.push(answer_header, value);
        // The ACK for the challenge goes out before the new INVITE.
        let mut acks = Vec::new();
        while let Some(o) = self.attempt.txn.poll_output() {
            if let TransactionOutput::Transmit(b) = o {
                acks.push(b);
            }
        }
        for b in acks {
            self.transmit(b);
        }
        let txn = start_invite_txn(now, &self.settings, &request);
        let old = std::mem::replace(&mut self.attempt, Attempt { request, seq, txn });
        self.challenged = Some(old);
        Ok(())
    }

    fn on_2xx(&mut self, now: Instant, resp: &Response, rng: &mut impl RngCore) {
        let _ = self.attempt.txn.on_response(now, resp.status, Bytes::new);
        let Ok(dialog) = Dialog::new_uac(&self.attempt.request, resp) else {
            return;
        };
        let via = self.via(rng);
        let ack = dialog.ack(self.attempt.seq, &via).encode();
        if let Some(a) = &self.answered
            && a.dialog.remote_tag == dialog.remote_tag
        {
            // A retransmission before the owner took the leg: ACK again.
            let ack = a.ack.clone();
            self.transmit(ack);
            return;
        }
        self.transmit(ack.clone());
        if self.state != LegState::Calling && self.state != LegState::Ringing {
            // Crossed our CANCEL, a fork's second answer, or after a
            // failure: ACK (above) and end that dialog at once.
            self.send_bye(now, dialog, rng);
            if self.state == LegState::Cancelling {
                let reason = self.cancel.unwrap_or(CancelReason::Owner);
                self.fail(now, reason.failure(), reason.failure().status());
            }
            return;
        }
        let body = if resp.body.is_empty() {
            self.early_sdp.clone().unwrap_or_default()
        } else {
            resp.body.clone()
        };
        let negotiated = match self.sdp.accept_answer(&body, &self.settings.media) {
            Ok(n) => n,
            Err(_) => {
                self.send_bye(now, dialog, rng);
                self.fail(now, DialFailure::MediaFailed, 488);
                return;
            }
        };
        self.state = LegState::Answered;
        self.record.answered_at = Some(self.wall(now));
        self.record.result_code = resp.status;
        self.record.codec = Some(negotiated.codec.encoding_name().to_owned());
        self.answered = Some(AnsweredLeg {
            invite: self.attempt.request.clone(),
            dialog,
            sdp: self.sdp.clone(),
            negotiated,
            ack,
            dest: self.settings.dest,
            started: self.started,
            wall_started: self.wall_started,
            record: self.record.clone(),
        });
        self.out.push_back(LegOutput::Event(LegEvent::Answered));
    }

    fn start_cancel(&mut self, now: Instant, reason: CancelReason, rng: &mut impl RngCore) {
        self.cancel = Some(reason);
        self.state = LegState::Cancelling;
        // RFC 3261 §9.1: with no final response 64·T1 after the CANCEL, the
        // INVITE transaction is over.
        self.cancel_deadline = Some(now + self.settings.timers.t1() * 64);
        self.send_pending_cancel(now, rng);
    }

    /// Sends the CANCEL once a provisional has arrived (RFC 3261 §9.1).
    fn send_pending_cancel(&mut self, now: Instant, _rng: &mut impl RngCore) {
        if self.cancel.is_none() || self.cancel_txn.is_some() || !self.provisional_seen {
            return;
        }
        let cancel = cancel_for(&self.attempt.request);
        let Some(key) = key_of(&cancel) else {
            return;
        };
        let txn = ClientNonInviteTransaction::new(
            now,
            key,
            self.settings.dest.transport.reliability(),
            self.settings.timers,
            cancel.encode(),
        );
        self.cancel_txn = Some(txn);
        self.drain_txns();
    }

    fn send_bye(&mut self, now: Instant, mut dialog: Dialog, rng: &mut impl RngCore) {
        let via = self.via(rng);
        let contact = contact_of(&self.settings);
        let bye = dialog.new_request(Method::Bye, &via, &contact);
        let Some(key) = key_of(&bye) else {
            return;
        };
        self.bye_txn = Some(ClientNonInviteTransaction::new(
            now,
            key,
            self.settings.dest.transport.reliability(),
            self.settings.timers,
            bye.encode(),
        ));
        self.drain_txns();
    }

    fn fail(&mut self, now: Instant, failure: DialFailure, status: u16) {
        if matches!(self.state, LegState::Answered | LegState::Failed) && self.failure.is_some() {
            return;
        }
        self.state = LegState::Failed;
        self.failure = Some(failure);
        self.record.result_code = status;
        self.record.ended_at = Some(self.wall(now));
        self.record.hangup_side = match failure {
            DialFailure::NoAnswer
            | DialFailure::Cancelled
            | DialFailure::Timeout
            | DialFailure::TransportError
            | DialFailure::MediaFailed => HangupSide::Bridge,
            _ => HangupSide::Caller,
        };
        self.record.cause = failure.as_str().to_owned();
        self.out
            .push_back(LegOutput::Event(LegEvent::Failed(failure)));
    }

    fn wall(&self, now: Instant) -> SystemTime {
        self.wall_started + now.saturating_duration_since(self.started)
    }

    fn via(&self, rng: &mut impl RngCore) -> Via {
        via_for(&self.settings, rng)
    }

    fn transmit(&mut self, bytes: Bytes) {
        self.out.push_back(LegOutput::Transmit(Transmit {
            dest: self.settings.dest,
            bytes,
        }));
    }

    /// Moves every transaction's output out; turns INVITE timeouts and
    /// transport errors into failures.
    fn drain(&mut self, now: Instant) {
        let mut failed = None;
        while let Some(o) = self.attempt.txn.poll_output() {
            match o {
                TransactionOutput::Transmit(b) => self.transmit(b),
                TransactionOutput::Event(TransactionEvent::TimedOut(_)) => {
                    // Nothing at all came back: a timeout, whatever we wanted.
                    failed = Some(match self.cancel {
                        Some(reason) if self.provisional_seen => reason.failure(),
                        _ => DialFailure::Timeout,
                    });
                }
                TransactionOutput::Event(TransactionEvent::TransportError) => {
                    failed = Some(DialFailure::TransportError);
                }
                TransactionOutput::Event(_) => {}
            }
        }
        self.drain_txns();
        if let Some(f) = failed
            && matches!(
                self.state,
                LegState::Calling | LegState::Ringing | LegState::Cancelling
            )
        {
            self.fail(now, f, f.status());
        }
    }

    fn drain_txns(&mut self) {
        let mut sent = Vec::new();
        if let Some(a) = &mut self.challenged {
            while let Some(o) = a.txn.poll_output() {
                if let TransactionOutput::Transmit(b) = o {
                    sent.push(b);
                }
            }
            if a.txn.is_terminated() {
                self.challenged = None;
            }
        }
        for t in [&mut self.cancel_txn, &mut self.bye_txn]
            .into_iter()
            .flatten()
        {
            while let Some(o) = t.poll_output() {
                if let TransactionOutput::Transmit(b) = o {
                    sent.push(b);
                }
            }
        }
        for b in sent {
            self.transmit(b);
        }
    }
}

fn sent_by(settings: &DialSettings) -> String {
    format!("{}:{}", settings.local.host, settings.local.port)
}

fn local_host(settings: &DialSettings) -> Host {
    Host::parse(&settings.local.host).unwrap_or_else(|_| Host::Domain(settings.local.host.clone()))
}

fn via_for(settings: &DialSettings, rng: &mut impl RngCore) -> Via {
    let mut params = Params::new();
    params.set("branch", Some(&format!("z9hG4bK{}", random_token(rng))));
    params.set("rport", None);
    Via {
        transport: settings.dest.transport.as_via().to_owned(),
        host: local_host(settings),
        port: Some(settings.local.port),
        params,
    }
}

fn contact_of(settings: &DialSettings) -> NameAddr {
    let mut uri = Uri::sip(
        Some("sipbridge"),
        local_host(settings),
        Some(settings.local.port),
    );
    match settings.dest.transport {
        TransportKind::Udp => {}
        TransportKind::Tcp => uri.params.set("transport", Some("tcp")),
        TransportKind::Tls => uri.params.set("transport", Some("tls")),
    }
    NameAddr::new(uri)
}

fn build_invite(
    settings: &DialSettings,
    local_tag: &str,
    seq: u32,
    rng: &mut impl RngCore,
) -> Request {
    let mut from = settings.from.clone();
    from.params.set("tag", Some(local_tag));
    let mut to = settings.to.clone();
    to.params.remove("tag");
    let mut headers = Headers::default();
    headers.push("Via", via_for(settings, rng).to_string());
    headers.push("Max-Forwards", "70");
    headers.push("From", from.to_string());
    headers.push("To", to.to_string());
    headers.push("Call-ID", settings.call_id.clone());
    headers.push(
        "CSeq",
        CSeq {
            seq,
            method: Method::Invite,
        }
        .to_string(),
    );
    headers.push("Contact", contact_of(settings).to_string());
    headers.push("Allow", super::ALLOW);
    headers.push("User-Agent", "sipbridge");
    for (name, value) in &settings.extra_headers {
        if RESERVED_HEADERS.contains(&name.to_ascii_lowercase().as_str()) {
            continue;
        }
        headers.push(name, value.clone());
    }
    headers.push("Content-Type", "application/sdp");
    Request {
        method: Method::Invite,
        uri: settings.request_uri.clone(),
        headers,
        body: Bytes::new(),
    }
}

fn key_of(req: &Request) -> Option<TransactionKey> {
    let via = req.top_via().ok()?;
    let sent_by = match via.port {
        Some(port) => format!("{}:{}", via.host, port),
        None => via.host.to_string(),
    };
    TransactionKey::new(via.branch()?, &sent_by, req.method.as_str()).ok()
}

fn start_invite_txn(
    now: Instant,
    settings: &DialSettings,
    request: &Request,
) -> ClientInviteTransaction {
    let key = key_of(request).unwrap_or_else(|| TransactionKey {
        branch: String::new(),
        sent_by: sent_by(settings),
        method: crate::sip::transaction::TxMethod::Invite,
    });
    ClientInviteTransaction::new_initial(
        now,
        key,
        settings.dest.transport.reliability(),
        settings.timers,
        request.encode(),
    )
}

/// The ACK for a non-2xx final response (RFC 3261 §17.1.1.3): the INVITE's
/// top Via, Request-URI, From, Call-ID, Route and CSeq number; the
/// response's To (with its tag).
fn ack_for_non2xx(invite: &Request, resp: &Response) -> Request {
    let mut req = same_transaction_request(invite, Method::Ack);
    if let Some(to) = resp.headers.get("To") {
        req.headers.set("To", to);
    }
    req
}

/// CANCEL for `invite` (RFC 3261 §9.1): the same Request-URI, top Via,
/// From, To, Call-ID, Route and CSeq number.
fn cancel_for(invite: &Request) -> Request {
    same_transaction_request(invite, Method::Cancel)
}

fn same_transaction_request(invite: &Request, method: Method) -> Request {
    let mut headers = Headers::default();
    if let Some(via) = invite.headers.get("Via") {
        headers.push("Via", via);
    }
    headers.push("Max-Forwards", "70");
    for name in ["From", "To", "Call-ID"] {
        if let Some(v) = invite.headers.get(name) {
            headers.push(name, v);
        }
    }
    for route in invite.headers.get_all("Route") {
        headers.push("Route", route);
    }
    let seq = invite.cseq().map(|c| c.seq).unwrap_or(1);
    headers.push(
        "CSeq",
        CSeq {
            seq,
            method: method.clone(),
        }
        .to_string(),
    );
    Request {
        method,
        uri: invite.uri.clone(),
        headers,
        body: Bytes::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::secret::SecretRef;
    use crate::sip::digest::{DigestCredentials, DigestServer};
    use crate::sip::message::{Message, parse_datagram};
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;
    use std::net::SocketAddr;

    const ANSWER_SDP: &str = "v=0\r\no=- 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\nm=audio 40000 RTP/AVP 0 101\r\na=rtpmap:0 PCMU/8000\r\na=rtpmap:101 telephone-event/8000\r\na=sendrecv\r\n";
    const BAD_SDP: &str = "v=0\r\no=- 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\nm=audio 40000 RTP/AVP 18\r\na=rtpmap:18 G729/8000\r\n";

    fn trunk_addr() -> SocketAddr {
        "127.0.0.1:5080".parse().unwrap()
    }

    fn settings(credentials: bool) -> DialSettings {
        DialSettings {
            call_id: "out-1@sipbridge".into(),
            tenant: "acme".into(),
            trunk: "carrier".into(),
            request_uri: Uri::parse("sip:+15557654321@127.0.0.1:5080").unwrap(),
            from: NameAddr::parse("<sip:+15551230000@sipbridge.example>").unwrap(),
            to: NameAddr::parse("<sip:+15557654321@127.0.0.1:5080>").unwrap(),
            dest: Peer {
                transport: TransportKind::Udp,
                addr: trunk_addr(),
                flow: 0,
            },
            local: LocalSip {
                host: "127.0.0.1".into(),
                port: 5060,
            },
            media: LocalMedia::new("127.0.0.1".parse().unwrap(), 30000),
            timers: TimerConfig::default(),
            credentials: credentials.then(|| LegCredentials {
                username: "acme-out".into(),
                password: Secret::new(b"hunter2".to_vec(), SecretRef::Inline),
            }),
            answer_timeout: Duration::from_secs(30),
            extra_headers: vec![
                ("X-Campaign".into(), "spring".into()),
                ("Call-ID".into(), "must-not-override".into()),
            ],
        }
    }

    struct Run {
        t0: Instant,
        leg: OutboundLeg,
        rng: ChaCha8Rng,
    }

    impl Run {
        fn new(credentials: bool) -> Run {
            let t0 = Instant::now();
            let mut rng = ChaCha8Rng::seed_from_u64(3);
            let leg = OutboundLeg::new(t0, SystemTime::UNIX_EPOCH, settings(credentials), &mut rng);
            Run { t0, leg, rng }
        }

        fn at(&self, ms: u64) -> Instant {
            self.t0 + Duration::from_millis(ms)
        }

        /// Drains the leg: requests sent, events.
        fn drain(&mut self) -> (Vec<Request>, Vec<LegEvent>) {
            let (mut sent, mut events) = (Vec::new(), Vec::new());
            while let Some(o) = self.leg.poll_output() {
                match o {
                    LegOutput::Transmit(t) => {
                        assert_eq!(t.dest.addr, trunk_addr());
                        match parse_datagram(&t.bytes) {
                            Ok(Message::Request(r)) => sent.push(r),
                            other => panic!("not a request: {other:?}"),
                        }
                    }
                    LegOutput::Event(e) => events.push(e),
                }
            }
            (sent, events)
        }

        fn respond(
            &mut self,
            ms: u64,
            req: &Request,
            status: u16,
            tag: bool,
            body: &str,
            extra: &[(&str, &str)],
        ) {
            let mut resp = Response::for_request(req, status);
            if tag {
                resp.headers.set(
                    "To",
                    format!("{};tag=uas-1", req.headers.get("To").unwrap()),
                );
            }
            if (101..300).contains(&status) {
                resp.headers.push("Contact", "<sip:uas@127.0.0.1:5080>");
            }
            for (n, v) in extra {
                resp.headers.push(n, *v);
            }
            if !body.is_empty() {
                resp.headers.push("Content-Type", "application/sdp");
                resp.body = Bytes::copy_from_slice(body.as_bytes());
            }
            let parsed = match parse_datagram(&resp.encode()) {
                Ok(Message::Response(r)) => r,
                other => panic!("{other:?}"),
            };
            let now = self.at(ms);
            self.leg.handle_response(now, parsed, &mut self.rng);
        }

        /// Runs timers up to `ms`.
        fn run_until(&mut self, ms: u64) -> (Vec<Request>, Vec<LegEvent>) {
            let (mut sent, mut events) = self.drain();
            while let Some(t) = self.leg.poll_timeout() {
                if t > self.at(ms) {
                    break;
                }
                self.leg.handle_timeout(t, &mut self.rng);
                let (s, e) = self.drain();
                sent.extend(s);
                events.extend(e);
            }
            (sent, events)
        }
    }

    fn cseq(r: &Request) -> (u32, String) {
        let c = r.cseq().unwrap();
        (c.seq, c.method.as_str().to_owned())
    }

    #[test]
    fn invite_carries_offer_identity_and_extra_headers() {
        let mut run = Run::new(false);
        let (sent, events) = run.drain();
        assert!(events.is_empty());
        let invite = &sent[0];
        assert_eq!(invite.method, Method::Invite);
        assert_eq!(invite.uri.to_string(), "sip:+15557654321@127.0.0.1:5080");
        assert_eq!(invite.call_id().unwrap(), "out-1@sipbridge");
        assert!(invite.from().unwrap().tag().is_some());
        assert!(invite.to().unwrap().tag().is_none());
        assert_eq!(invite.headers.get("X-Campaign"), Some("spring"));
        assert_eq!(invite.headers.get_all("Call-ID").count(), 1);
        let body = std::str::from_utf8(&invite.body).unwrap();
        assert!(body.contains("m=audio 30000 RTP/AVP 0 8 101"), "{body}");
        assert!(body.contains("a=rtpmap:101 telephone-event/8000"));
        assert!(invite.headers.get("Authorization").is_none());
    }

    #[test]
    fn challenge_is_acked_and_answered_then_2xx_is_acked_and_answered() {
        let mut run = Run::new(true);
        let (sent, _) = run.drain();
        let first = sent[0].clone();
        let mut server = DigestServer::new("carrier.example", [9; 32], Duration::from_secs(60));
        let mut srng = ChaCha8Rng::seed_from_u64(1);
        let challenge = server.challenge(1_000, &mut srng, false).remove(0);
        run.respond(
            20,
            &first,
            401,
            true,
            "",
            &[("WWW-Authenticate", &challenge)],
        );
        let (sent, events) = run.drain();
        assert!(events.is_empty(), "{events:?}");
        // The ACK for the 401 (same branch), then the INVITE with credentials.
        assert_eq!(sent.len(), 2, "{sent:?}");
        assert_eq!(sent[0].method, Method::Ack);
        assert_eq!(cseq(&sent[0]), (cseq(&first).0, "ACK".into()));
        assert_eq!(
            sent[0].top_via().unwrap().branch(),
            first.top_via().unwrap().branch()
        );
        assert_eq!(sent[0].to().unwrap().tag(), Some("uas-1"));
        let second = sent[1].clone();
        assert_eq!(second.method, Method::Invite);
        assert_eq!(cseq(&second).0, cseq(&first).0 + 1);
        assert_eq!(second.call_id().unwrap(), first.call_id().unwrap());
        assert_eq!(second.from().unwrap().tag(), first.from().unwrap().tag());
        assert_ne!(
            second.top_via().unwrap().branch(),
            first.top_via().unwrap().branch()
        );
        let creds = DigestCredentials::parse(second.headers.get("Authorization").unwrap()).unwrap();
        assert_eq!(creds.username, "acme-out");
        assert_eq!(
            server.verify_credentials(
                &creds,
                "INVITE",
                &second.uri.to_string(),
                "acme-out",
                b"hunter2",
                1_001
            ),
            Ok(())
        );
        // A retransmitted 401 is ACKed again and changes nothing.
        run.respond(
            30,
            &first,
            401,
            true,
            "",
            &[("WWW-Authenticate", &challenge)],
        );
        let (sent, events) = run.drain();
        assert_eq!(sent.len(), 1);
        assert_eq!(sent[0].method, Method::Ack);
        assert!(events.is_empty());

        run.respond(100, &second, 180, true, "", &[]);
        run.respond(3_000, &second, 200, true, ANSWER_SDP, &[]);
        let (sent, events) = run.drain();
        assert_eq!(events[0], LegEvent::Progress(180));
        assert_eq!(events[1], LegEvent::Answered);
        assert_eq!(sent.len(), 1);
        let ack = &sent[0];
        assert_eq!(ack.method, Method::Ack);
        assert_eq!(cseq(ack), (cseq(&second).0, "ACK".into()));
        assert_eq!(ack.uri.to_string(), "sip:uas@127.0.0.1:5080");
        assert_ne!(
            ack.top_via().unwrap().branch(),
            second.top_via().unwrap().branch()
        );
        assert_eq!(run.leg.state(), LegState::Answered);
        let answered = run.leg.take_answered().unwrap();
        assert_eq!(
            answered.negotiated.remote_rtp,
            Some("127.0.0.1:40000".parse().unwrap())
        );
        assert_eq!(answered.record.direction, CallDirection::Outbound);
        assert_eq!(answered.record.result_code, 200);
        assert!(answered.invite.headers.get("Authorization").is_some());
        // The password never appears on the wire.
        assert!(!String::from_utf8_lossy(&answered.invite.encode()).contains("hunter2"));
    }

    #[test]
    fn second_challenge_is_an_auth_failure_and_no_credentials_fails_at_once() {
        let mut run = Run::new(true);
        let (sent, _) = run.drain();
        let ch = "Digest realm=\"c\", nonce=\"n1\", qop=\"auth\"";
        run.respond(10, &sent[0], 407, true, "", &[("Proxy-Authenticate", ch)]);
        let (sent, _) = run.drain();
        let second = sent[1].clone();
        assert!(
            second
                .headers
                .get("Proxy-Authorization")
                .unwrap()
                .contains("nonce=\"n1\"")
        );
        let ch2 = "Digest realm=\"c\", nonce=\"n2\", qop=\"auth\"";
        run.respond(20, &second, 407, true, "", &[("Proxy-Authenticate", ch2)]);
        let (sent, events) = run.drain();
        assert_eq!(sent.len(), 1); // only the ACK
        assert_eq!(events, vec![LegEvent::Failed(DialFailure::AuthFailed(407))]);
        assert_eq!(run.leg.record().result_code, 407);
        assert_eq!(run.leg.record().cause, "auth-failed");

        let mut run = Run::new(false);
        let (sent, _) = run.drain();
        run.respond(10, &sent[0], 401, true, "", &[("WWW-Authenticate", ch)]);
        let (sent, events) = run.drain();
        assert_eq!(sent.len(), 1);
        assert_eq!(events, vec![LegEvent::Failed(DialFailure::AuthFailed(401))]);
    }

    #[test]
    fn stale_nonce_is_answered_once_more() {
        let mut run = Run::new(true);
        let (sent, _) = run.drain();
        run.respond(
            10,
            &sent[0],
            401,
            true,
            "",
            &[(
                "WWW-Authenticate",
                "Digest realm=\"c\", nonce=\"n1\", qop=\"auth\"",
            )],
        );
        let (sent, _) = run.drain();
        run.respond(
            20,
            &sent[1],
            401,
            true,
            "",
            &[(
                "WWW-Authenticate",
                "Digest realm=\"c\", nonce=\"n2\", qop=\"auth\", stale=true",
            )],
        );
        let (sent, events) = run.drain();
        assert!(events.is_empty());
        assert_eq!(sent[1].method, Method::Invite);
        assert!(
            sent[1]
                .headers
                .get("Authorization")
                .unwrap()
                .contains("nonce=\"n2\"")
        );
    }

    #[test]
    fn busy_and_rejections_are_typed() {
        for (status, want) in [
            (486, DialFailure::Busy(486)),
            (600, DialFailure::Busy(600)),
            (404, DialFailure::Rejected(404)),
            (503, DialFailure::Rejected(503)),
        ] {
            let mut run = Run::new(false);
            let (sent, _) = run.drain();
            run.respond(10, &sent[0], 180, true, "", &[]);
            run.respond(500, &sent[0], status, true, "", &[]);
            let (acks, events) = run.drain();
            assert_eq!(acks.len(), 1);
            assert_eq!(acks[0].method, Method::Ack);
            assert_eq!(
                events,
                vec![LegEvent::Progress(180), LegEvent::Failed(want)]
            );
            assert_eq!(want.status(), status);
            assert_eq!(run.leg.record().result_code, status);
            // Timer D absorbs retransmissions, then the leg is finished.
            run.run_until(40_000);
            assert!(run.leg.is_finished());
        }
    }

    #[test]
    fn early_media_is_reported_and_used_when_the_2xx_has_no_sdp() {
        let mut run = Run::new(false);
        let (sent, _) = run.drain();
        run.respond(10, &sent[0], 183, true, ANSWER_SDP, &[]);
        let (_, events) = run.drain();
        assert_eq!(events.len(), 2);
        assert!(
            matches!(&events[1], LegEvent::EarlyMedia(n) if n.remote_rtp == Some("127.0.0.1:40000".parse().unwrap()))
        );
        run.respond(2_000, &sent[0], 200, true, "", &[]);
        let (_, events) = run.drain();
        assert_eq!(events, vec![LegEvent::Answered]);
        assert!(run.leg.take_answered().is_some());
    }

    #[test]
    fn answer_timeout_cancels_and_487_is_no_answer() {
        let mut run = Run::new(false);
        let (sent, _) = run.drain();
        let invite = sent[0].clone();
        run.respond(50, &invite, 180, true, "", &[]);
        run.drain();
        // Ringing: nothing happens until the answer timeout (30 s).
        let (sent, events) = run.run_until(29_999);
        assert!(sent.is_empty() && events.is_empty());
        let (sent, events) = run.run_until(30_000);
        assert!(events.is_empty());
        assert_eq!(sent.len(), 1);
        let cancel = &sent[0];
        assert_eq!(cancel.method, Method::Cancel);
        assert_eq!(cseq(cancel), (cseq(&invite).0, "CANCEL".into()));
        assert_eq!(
            cancel.top_via().unwrap().branch(),
            invite.top_via().unwrap().branch()
        );
        assert!(cancel.to().unwrap().tag().is_none());
        assert_eq!(run.leg.state(), LegState::Cancelling);
        let mut ok = Response::for_request(cancel, 200);
        ok.headers.set("To", cancel.headers.get("To").unwrap());
        let now = run.at(30_010);
        run.leg.handle_response(now, ok, &mut run.rng);
        run.respond(30_020, &invite, 487, true, "", &[]);
        let (sent, events) = run.drain();
        assert_eq!(sent[0].method, Method::Ack);
        assert_eq!(events, vec![LegEvent::Failed(DialFailure::NoAnswer)]);
        assert_eq!(run.leg.record().result_code, 487);
        assert_eq!(run.leg.record().cause, "no-answer");
    }

    #[test]
    fn cancel_before_any_provisional_waits_for_one() {
        let mut run = Run::new(false);
        let (sent, _) = run.drain();
        let invite = sent[0].clone();
        let now = run.at(10);
        run.leg.cancel(now, &mut run.rng);
        let (sent, _) = run.drain();
        assert!(sent.is_empty(), "no CANCEL before a provisional: {sent:?}");
        run.respond(100, &invite, 100, false, "", &[]);
        let (sent, _) = run.drain();
        assert_eq!(sent.len(), 1);
        assert_eq!(sent[0].method, Method::Cancel);
        // The far end never answers the INVITE: 64·T1 after the CANCEL it is over.
        let (_, events) = run.run_until(40_000);
        assert_eq!(events, vec![LegEvent::Failed(DialFailure::Cancelled)]);
    }

    #[test]
    fn a_2xx_crossing_our_cancel_is_acked_and_byed() {
        let mut run = Run::new(false);
        let (sent, _) = run.drain();
        let invite = sent[0].clone();
        run.respond(10, &invite, 180, true, "", &[]);
        let now = run.at(20);
        run.leg.cancel(now, &mut run.rng);
        run.drain();
        run.respond(30, &invite, 200, true, ANSWER_SDP, &[]);
        let (sent, events) = run.drain();
        let methods: Vec<_> = sent.iter().map(|r| r.method.clone()).collect();
        assert_eq!(methods, vec![Method::Ack, Method::Bye]);
        assert_eq!(sent[1].to().unwrap().tag(), Some("uas-1"));
        assert_eq!(events, vec![LegEvent::Failed(DialFailure::Cancelled)]);
        assert!(run.leg.take_answered().is_none());
    }

    #[test]
    fn unusable_answer_is_acked_byed_and_media_failed() {
        let mut run = Run::new(false);
        let (sent, _) = run.drain();
        run.respond(30, &sent[0], 200, true, BAD_SDP, &[]);
        let (sent, events) = run.drain();
        let methods: Vec<_> = sent.iter().map(|r| r.method.clone()).collect();
        assert_eq!(methods, vec![Method::Ack, Method::Bye]);
        assert_eq!(events, vec![LegEvent::Failed(DialFailure::MediaFailed)]);
    }

    #[test]
    fn no_response_at_all_times_out_with_retransmissions() {
        let mut run = Run::new(false);
        let (sent, events) = run.run_until(40_000);
        let invites = sent.iter().filter(|r| r.method == Method::Invite).count();
        assert_eq!(invites, 7); // 0, 0.5, 1.5, 3.5, 7.5, 15.5, 31.5 s
        assert_eq!(events, vec![LegEvent::Failed(DialFailure::Timeout)]);
        assert_eq!(run.leg.record().result_code, 408);
    }

    #[test]
    fn answered_leg_becomes_a_call_that_reacks_2xx_and_sends_bye() {
        use crate::call::{CallEvent, CallOutput, CallSettings, HangupCause};
        let mut run = Run::new(false);
        let (sent, _) = run.drain();
        let invite = sent[0].clone();
        run.respond(30, &invite, 200, true, ANSWER_SDP, &[]);
        run.drain();
        let answered = run.leg.take_answered().unwrap();
        let s = settings(false);
        let call_settings = CallSettings {
            call_id: s.call_id.clone(),
            tenant: s.tenant.clone(),
            trunk: s.trunk.clone(),
            timers: s.timers,
            local: s.local.clone(),
            media: s.media.clone(),
            ..crate::call::test_settings(&s.call_id, s.media.rtp_port, s.media.codecs.clone())
        };
        let mut call = super::super::Call::from_answered(run.at(30), answered, call_settings);
        assert!(call.is_confirmed());
        assert!(matches!(
            call.poll_output(),
            Some(CallOutput::Event(CallEvent::Answered(_)))
        ));
        // A retransmitted 200 is ACKed again.
        let mut ok = Response::for_request(&invite, 200);
        ok.headers.set(
            "To",
            format!("{};tag=uas-1", invite.headers.get("To").unwrap()),
        );
        call.handle_response(run.at(530), ok, &mut run.rng);
        let Some(CallOutput::Transmit(t)) = call.poll_output() else {
            panic!("no re-ACK")
        };
        assert!(t.bytes.starts_with(b"ACK sip:uas@127.0.0.1:5080"));
        // Our hang-up is a BYE in the dialog.
        call.hang_up(run.at(1_000), HangupCause::Local, &mut run.rng);
        let Some(CallOutput::Transmit(t)) = call.poll_output() else {
            panic!("no BYE")
        };
        let Ok(Message::Request(bye)) = parse_datagram(&t.bytes) else {
            panic!()
        };
        assert_eq!(bye.method, Method::Bye);
        assert_eq!(bye.to().unwrap().tag(), Some("uas-1"));
        assert_eq!(bye.from().unwrap().tag(), invite.from().unwrap().tag());
        assert!(cseq(&bye).0 > cseq(&invite).0);
        let Some(CallOutput::Event(CallEvent::Ended(rec))) = call.poll_output() else {
            panic!("no end")
        };
        assert_eq!(rec.direction, CallDirection::Outbound);
        assert_eq!(rec.cause, "local-hangup");
        assert!(rec.answered_at.is_some());
    }
}
