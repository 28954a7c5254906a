//! The per-call state machine and the switchboard in front of it — sans-IO.
//!
//! Owns: what happens to one call from its INVITE to its last retransmission
//! absorbed (`Call`), and the decisions taken before a call exists — trunk
//! identification, digest challenges, routing, limits, stateless answers
//! (`Switchboard`). Both take time (`Instant`) and randomness as parameters and
//! return what to transmit; the daemon owns sockets, tasks and clocks.
//! Must not touch: sockets, tokio, the wall clock (`SystemTime` values are
//! passed in), the filesystem.

pub mod auth_guard;
pub mod bridged;
mod cdr;
pub mod linger;
mod media;
pub mod outbound;
mod session;
pub mod source_gate;
pub mod supervisor;
mod switchboard;
pub mod transfer;

pub use cdr::{
    CallDirection, CallRecord, DepthSummary, HangupSide, LatencySummary, PausedStretch,
    QualitySummary, RecordingStatus, RtpSummary,
};
pub use media::{
    G711Frame, HoldAudio, MediaCounters, MediaOutput, MediaPlan, MediaQuality, MediaSession,
    MediaSetupError, PcmFrame, PipelineAudio, PipelineAudioRef, PipelineFormat,
};
pub use switchboard::{
    Admitted, Dispatch, OutboundAdmitted, OutboundRefusal, OutboundRequest, PortAllocator,
    SecurityCounts, Switchboard, SwitchboardSettings, dialed_number,
};

use crate::sip::dialog::Dialog;
use crate::sip::error::SipError;
use crate::sip::message::{Host, Method, NameAddr, Params, Request, Response, Uri, Via};
use crate::sip::sdp::{Direction, LocalMedia, Negotiated, SdpSession};
use crate::sip::timer::TimerConfig;
use crate::sip::transaction::{
    ClientInviteTransaction, ClientNonInviteState, ClientNonInviteTransaction,
    ServerInviteTransaction, ServerNonInviteTransaction, Settled, TransactionEvent, TransactionKey,
    TransactionOutput, Transport, TxMethod,
};
use bytes::Bytes;
use rand::RngCore;
use session::SessionTimer;
use std::collections::VecDeque;
use std::net::SocketAddr;
use std::time::{Duration, Instant, SystemTime};

/// The transport a SIP message came in on or goes out on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TransportKind {
    /// Datagrams.
    Udp,
    /// A byte stream.
    Tcp,
    /// A byte stream inside TLS (RFC 3261 §26.2).
    Tls,
}

impl TransportKind {
    /// The Via transport token.
    pub fn as_via(self) -> &'static str {
        match self {
            TransportKind::Udp => "UDP",
            TransportKind::Tcp => "TCP",
            TransportKind::Tls => "TLS",
        }
    }

    fn reliability(self) -> Transport {
        match self {
            TransportKind::Udp => Transport::Unreliable,
            TransportKind::Tcp | TransportKind::Tls => Transport::Reliable,
        }
    }
}

/// Where a message came from, or goes to. `flow` is the daemon's name for the
/// socket: a listener index for UDP, a connection id for TCP (responses and
/// in-dialog requests reuse the connection the call came in on).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Peer {
    /// UDP or TCP.
    pub transport: TransportKind,
    /// The remote address.
    pub addr: SocketAddr,
    /// The daemon's socket or connection id.
    pub flow: u64,
}

/// Where the response to `req`, received from `source`, goes (RFC 3261
/// §18.2.2, RFC 3581): the same transport and socket or connection
/// (`flow`), to the address the top Via names (`received`/`rport`, else
/// sent-by). On TCP that address is only used if the connection has closed.
/// A request without a usable Via is answered to its source.
pub fn response_dest(req: &Request, source: Peer) -> Peer {
    match req.top_via() {
        Ok(via) => Peer {
            addr: crate::sip::response_addr::response_addr(&via, source.addr),
            ..source
        },
        Err(_) => source,
    }
}

/// Bytes to send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transmit {
    /// Destination.
    pub dest: Peer,
    /// An encoded SIP message.
    pub bytes: Bytes,
}

/// Our own SIP address as the peer must see it (the advertised address).
#[derive(Debug, Clone)]
pub struct LocalSip {
    /// Host (IP or name) put into Via and Contact.
    pub host: String,
    /// Port put into Via and Contact.
    pub port: u16,
}

/// Everything a call needs from the configuration, copied at admission so a
/// reload never changes a live call.
#[derive(Debug, Clone)]
pub struct CallSettings {
    /// The call's Call-ID (the switchboard's key for the call).
    pub call_id: String,
    /// Tenant id.
    pub tenant: String,
    /// Trunk name.
    pub trunk: String,
    /// RFC 3261 T1/T2/T4.
    pub timers: TimerConfig,
    /// Our advertised signalling address for the transport the call uses.
    pub local: LocalSip,
    /// Our media: address, RTP port, codec preference.
    pub media: LocalMedia,
    /// Wait between 180 Ringing and 200 OK.
    pub answer_delay: Duration,
    /// Session interval we ask for when the caller supports timers (RFC 4028).
    pub session_expires: Duration,
    /// Our Min-SE.
    pub min_se: Duration,
    /// End the call when no RTP arrives for this long (not while on hold).
    pub rtp_timeout: Option<Duration>,
    /// End the call after this long, whatever happens.
    pub max_duration: Option<Duration>,
    /// What the media does once answered (prompt, pipeline).
    pub plan: MediaPlan,
    /// Play the disclosure in `183 Session Progress` and answer once it has
    /// finished (the caller hears the notice before the call is answered).
    pub early_media: bool,
    /// The tenant records, but the store could not write when the call was
    /// admitted: it is answered without a recording (`plan.record` is off)
    /// and its CDR says so (issue 19).
    pub store_unavailable: bool,
}

/// Why a call ended, as recorded in the CDR.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HangupCause {
    /// BYE from the caller.
    CallerBye,
    /// CANCEL before answer.
    Cancelled,
    /// The bridge ended it on an operator's request (admin API).
    Local,
    /// The agent ended it: a native `hangup`, a Twilio-mode close frame, or the
    /// Twilio-compatible REST call `Status=completed`.
    AgentHangup,
    /// No ACK for our 200 within 64·T1.
    NoAck,
    /// No RTP for the configured time.
    RtpTimeout,
    /// The session timer expired without a refresh.
    SessionExpired,
    /// The maximum call duration was reached.
    MaxDuration,
    /// The daemon is shutting down.
    Shutdown,
    /// Rejected before answer (the result code says why).
    Rejected,
    /// A refresh or in-dialog request told us the dialog is gone (408/481).
    DialogGone,
    /// No usable SDP answer (delayed offer answered badly in the ACK).
    MediaFailed,
    /// The pipeline failed and the tenant's policy hangs up (`supervisor::PipelineSupervisor`).
    PipelineFailed,
    /// The agent transferred the caller and the transfer completed (the
    /// REFER's final NOTIFY said 2xx): our leg ends with a BYE.
    Transferred,
    /// A bridge transfer joined this call to another leg, and that leg
    /// ended: this one ends with it.
    BridgedLegEnded,
}

impl HangupCause {
    /// A short name for logs and CDRs.
    pub fn as_str(self) -> &'static str {
        match self {
            HangupCause::CallerBye => "caller-bye",
            HangupCause::Cancelled => "cancelled",
            HangupCause::Local => "local-hangup",
            HangupCause::AgentHangup => "agent-hangup",
            HangupCause::NoAck => "no-ack",
            HangupCause::RtpTimeout => "rtp-timeout",
            HangupCause::SessionExpired => "session-expired",
            HangupCause::MaxDuration => "max-duration",
            HangupCause::Shutdown => "shutdown",
            HangupCause::Rejected => "rejected",
            HangupCause::DialogGone => "dialog-gone",
            HangupCause::MediaFailed => "media-failed",
            HangupCause::PipelineFailed => "pipeline-failed",
            HangupCause::Transferred => "transferred",
            HangupCause::BridgedLegEnded => "bridged-leg-ended",
        }
    }
}

/// Settings for the call module's virtual-time tests: UDP on 127.0.0.1:5060,
/// media on 127.0.0.1:`rtp_port` with `codecs`, 8 kHz pipeline, no prompt,
/// no recording, no timeouts.
#[cfg(test)]
pub(crate) fn test_settings(
    call_id: &str,
    rtp_port: u16,
    codecs: Vec<crate::sip::sdp::Codec>,
) -> CallSettings {
    CallSettings {
        call_id: call_id.into(),
        tenant: "demo".into(),
        trunk: "local".into(),
        timers: TimerConfig::default(),
        local: LocalSip {
            host: "127.0.0.1".into(),
            port: 5060,
        },
        media: LocalMedia {
            addr: "127.0.0.1".parse().expect("an address"),
            rtp_port,
            codecs,
            telephone_event_pt: 101,
            ptime_ms: 20,
            encryption: crate::sip::sdp::Encryption::Off,
            secure_signalling: false,
            srtp_key: None,
        },
        answer_delay: Duration::ZERO,
        session_expires: Duration::from_secs(1800),
        min_se: Duration::from_secs(90),
        rtp_timeout: None,
        max_duration: None,
        plan: MediaPlan {
            prompt: None,
            gate_until_prompt_done: false,
            pipeline_rate: crate::media::resample::PipelineRate::Hz8000,
            pipeline_format: Default::default(),
            echo_delay: None,
            record: false,
            rtp_source: Default::default(),
        },
        early_media: false,
        store_unavailable: false,
    }
}

/// What the call tells its owner.
#[derive(Debug, Clone, PartialEq)]
pub enum CallEvent {
    /// 183 with SDP sent: start the media (the prompt) before the answer.
    EarlyMedia(Negotiated),
    /// 200 OK sent; media may flow to `negotiated.remote_rtp`.
    Answered(Negotiated),
    /// The session was re-negotiated (hold, unhold, new address).
    MediaChanged(Negotiated),
    /// The call is over for the user: release its media and counters. The
    /// `Call` may live on a little to absorb retransmissions.
    Ended(Box<CallRecord>),
    /// A step of a transfer the agent asked for (accepted, progress,
    /// completed, failed).
    Transfer(transfer::TransferUpdate),
}

/// Output of [`Call::poll_output`].
#[derive(Debug, Clone, PartialEq)]
pub enum CallOutput {
    /// Send these bytes.
    Transmit(Transmit),
    /// Something happened.
    Event(CallEvent),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// 180 sent, waiting to answer.
    Ringing,
    /// 200 sent, waiting for the ACK.
    Answered,
    /// ACK received: the call is up.
    Confirmed,
    /// Over; lingering for retransmissions.
    Ended,
}

/// An INVITE server transaction for a re-INVITE from the peer.
struct ReInvite {
    branch: String,
    /// Where its responses go (the re-INVITE's own Via and source).
    dest: Peer,
    txn: ServerInviteTransaction,
    /// The 2xx was sent; we wait for its ACK (CSeq number).
    awaiting_ack: Option<u32>,
    /// The re-INVITE had no SDP: our offer went in the 200, the answer comes in the ACK.
    delayed: bool,
}

/// A non-INVITE server transaction (BYE, UPDATE, OPTIONS, CANCEL, …).
struct ServerTxn {
    branch: String,
    /// Where its response goes (the request's own Via and source).
    dest: Peer,
    method: Method,
    txn: ServerNonInviteTransaction,
}

/// Our own request in progress.
enum ClientTxn {
    Bye(ClientNonInviteTransaction),
    Refresh {
        seq: u32,
        /// Our Via on the re-INVITE: the ACK for a non-2xx answer carries it.
        via: Via,
        txn: ClientInviteTransaction,
    },
}

/// One call, from its INVITE to the end.
pub struct Call {
    call_id: String,
    settings: CallSettings,
    peer: Peer,
    state: State,
    invite: Request,
    invite_branch: String,
    /// The INVITE server transaction (calls we answer); `None` for calls we
    /// placed ([`Call::from_answered`]).
    invite_txn: Option<ServerInviteTransaction>,
    /// Where the INVITE's responses go (RFC 3261 §18.2.2).
    invite_dest: Peer,
    dialog: Dialog,
    sdp: SdpSession,
    /// INVITE without SDP: our offer went in the 200, the answer comes in the ACK.
    delayed_offer: bool,
    negotiated: Option<Negotiated>,
    /// The SDP answer prepared before ringing, sent in the 200.
    pending_answer: Option<Bytes>,
    /// Re-INVITE server transactions from the peer: the current one and any
    /// finished ones still absorbing retransmissions (Timer I/L).
    reinvites: Vec<ReInvite>,
    server_txns: Vec<ServerTxn>,
    client: Option<ClientTxn>,
    /// The agent's blind transfer (REFER) and its subscription, if any.
    refer: Option<transfer::Refer>,
    /// The last ACK we sent for a 2xx to our refresh, resent on 2xx retransmissions.
    last_ack: Option<(u32, Bytes)>,
    session: Option<SessionTimer>,
    /// A hang-up decided while handling input, carried out before returning.
    pending_hangup: Option<HangupCause>,
    answer_at: Option<Instant>,
    last_media: Instant,
    deadline: Option<Instant>,
    started: Instant,
    wall_started: SystemTime,
    record: CallRecord,
    out: VecDeque<CallOutput>,
}

/// With early media, answer at the latest this long after the 183 (a prompt
/// is at most 120 s; the media normally reports its end much sooner).
const EARLY_MEDIA_LIMIT: Duration = Duration::from_secs(130);

/// Maximum in-dialog server transactions kept at once; a peer flooding new
/// requests gets 503 beyond it instead of growing memory.
const MAX_SERVER_TXNS: usize = 32;

fn random_token(rng: &mut impl RngCore) -> String {
    format!("{:016x}", rng.next_u64())
}

fn is_held(neg: &Negotiated) -> bool {
    matches!(
        neg.remote_direction,
        Direction::SendOnly | Direction::Inactive
    ) || neg.remote_rtp.is_none()
}

/// The Allow header value: every method the bridge handles.
pub const ALLOW: &str = "INVITE, ACK, CANCEL, BYE, OPTIONS, UPDATE, INFO, NOTIFY";
/// The Supported header value.
pub const SUPPORTED: &str = "timer";

impl Call {
    /// Takes an admitted INVITE: sends 100 Trying at once, 180 Ringing, and —
    /// after the configured answer delay — 200 OK with the SDP answer (or our
    /// offer when the INVITE had none). An unusable offer is answered 488.
    pub fn new(
        now: Instant,
        wall_now: SystemTime,
        invite: Request,
        peer: Peer,
        settings: CallSettings,
        rng: &mut impl RngCore,
    ) -> Result<Call, SipError> {
        let call_id = invite.call_id()?.to_owned();
        let top_via = invite.top_via()?;
        let invite_branch = top_via.branch().unwrap_or_default().to_owned();
        let key = txn_key(&invite)?;
        let trying = Response::for_request(&invite, 100).encode();
        let invite_txn = ServerInviteTransaction::new(
            now,
            key,
            peer.transport.reliability(),
            settings.timers,
            Some(trying),
        );
        let invite_dest = response_dest(&invite, peer);
        let dialog = Dialog::new_uas(&invite, random_token(rng), rng.next_u32() >> 1)?;
        let from = invite.from()?;
        let record = CallRecord {
            call_id: call_id.clone(),
            direction: CallDirection::Inbound,
            tenant: Some(settings.tenant.clone()),
            trunk: Some(settings.trunk.clone()),
            from: from.uri.user_unescaped().unwrap_or_default(),
            to: invite.uri.user_unescaped().unwrap_or_default(),
            source: peer.addr,
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
        let session = SessionTimer::negotiate(&invite, settings.session_expires, settings.min_se)?;
        let mut call = Call {
            call_id,
            peer,
            state: State::Ringing,
            invite_branch,
            invite_txn: Some(invite_txn),
            invite_dest,
            dialog,
            sdp: SdpSession::new(rng.next_u64() >> 1, "sipbridge"),
            delayed_offer: invite.body.is_empty(),
            negotiated: None,
            pending_answer: None,
            reinvites: Vec::new(),
            server_txns: Vec::new(),
            client: None,
            refer: None,
            last_ack: None,
            session,
            pending_hangup: None,
            answer_at: None,
            last_media: now,
            deadline: settings.max_duration.map(|d| now + d),
            started: now,
            wall_started: wall_now,
            record,
            out: VecDeque::new(),
            invite,
            settings,
        };
        call.drain_invite_txn();
        // Negotiate first: a bad offer is answered 488 without ringing.
        if !call.delayed_offer {
            match call.sdp.answer(&call.invite.body, &call.settings.media) {
                Ok((neg, body)) => {
                    call.negotiated = Some(neg);
                    call.pending_answer = Some(body);
                }
                Err(e) => {
                    let status = e.status();
                    call.reject(now, status, HangupCause::Rejected);
                    return Ok(call);
                }
            }
        }
        if call.settings.early_media
            && let (Some(neg), Some(body)) = (call.negotiated.clone(), call.pending_answer.clone())
        {
            // RFC 3960 early media: the same SDP answer in the 183 and the 200.
            let mut progress = call.ok_with_sdp(&call.invite, body);
            progress.status = 183;
            progress.reason = crate::sip::error::reason_phrase(183).to_owned();
            if let Some(t) = call.invite_txn.as_mut() {
                let _ = t.send_provisional(now, progress.encode());
            }
            call.drain_invite_txn();
            call.out
                .push_back(CallOutput::Event(CallEvent::EarlyMedia(neg)));
            // Answered by `prompt_finished`; this bound answers anyway if the
            // media never reports it.
            call.answer_at = Some(now + EARLY_MEDIA_LIMIT.max(call.settings.answer_delay));
            return Ok(call);
        }
        let ringing = call.dialog_response(&call.invite, 180, true);
        if let Some(t) = call.invite_txn.as_mut() {
            let _ = t.send_provisional(now, ringing.encode());
        }
        call.drain_invite_txn();
        if call.settings.answer_delay.is_zero() {
            call.answer(now);
        } else {
            call.answer_at = Some(now + call.settings.answer_delay);
        }
        Ok(call)
    }
}

impl Call {
    /// A call we placed, once its outbound leg was answered and ACKed
    /// ([`outbound::OutboundLeg`]): confirmed at once, with the dialog, SDP
    /// state and ACK the leg hands over. From here on it behaves like a call
    /// we answered: BYE either way, re-INVITEs, RTP timeout, maximum
    /// duration; a retransmitted 2xx is ACKed again. Emits
    /// [`CallEvent::Answered`].
    pub fn from_answered(now: Instant, leg: outbound::AnsweredLeg, settings: CallSettings) -> Call {
        let invite_branch = branch_of(&leg.invite);
        let seq = leg.invite.cseq().map(|c| c.seq).unwrap_or(0);
        let mut record = leg.record;
        record
            .answered_at
            .get_or_insert(leg.wall_started + now.saturating_duration_since(leg.started));
        record.codec = Some(leg.negotiated.codec.encoding_name().to_owned());
        let mut call = Call {
            call_id: settings.call_id.clone(),
            peer: leg.dest,
            state: State::Confirmed,
            invite_branch,
            invite_txn: None,
            invite_dest: leg.dest,
            dialog: leg.dialog,
            sdp: leg.sdp,
            delayed_offer: false,
            negotiated: Some(leg.negotiated.clone()),
            pending_answer: None,
            reinvites: Vec::new(),
            server_txns: Vec::new(),
            client: None,
            refer: None,
            last_ack: Some((seq, leg.ack)),
            session: None,
            pending_hangup: None,
            answer_at: None,
            last_media: now,
            deadline: settings.max_duration.map(|d| now + d),
            started: leg.started,
            wall_started: leg.wall_started,
            record,
            out: VecDeque::new(),
            invite: leg.invite,
            settings,
        };
        call.out
            .push_back(CallOutput::Event(CallEvent::Answered(leg.negotiated)));
        call
    }
}

/// The transaction key of a request (RFC 3261 §17.2.3): branch, sent-by, method.
fn txn_key(req: &Request) -> Result<TransactionKey, SipError> {
    let via = req.top_via()?;
    let sent_by = match via.port {
        Some(port) => format!("{}:{}", via.host, port),
        None => via.host.to_string(),
    };
    let branch = via.branch().unwrap_or_default();
    match TransactionKey::new(branch, &sent_by, req.method.as_str()) {
        Ok(key) => Ok(key),
        // RFC 2543 peers send no z9hG4bK branch (RFC 3261 §17.2.3 falls back
        // to matching on the request's identity): build the key from
        // Call-ID, CSeq and From tag, which identify the transaction there.
        Err(_) => {
            let cseq = req.cseq()?;
            let from_tag = req.from()?.tag().map(str::to_owned).unwrap_or_default();
            let method = match req.method {
                Method::Invite | Method::Ack => TxMethod::Invite,
                ref m => TxMethod::NonInvite(m.as_str().to_owned()),
            };
            Ok(TransactionKey {
                branch: format!("rfc2543|{}|{}|{}", req.call_id()?, cseq.seq, from_tag),
                sent_by: sent_by.to_ascii_lowercase(),
                method,
            })
        }
    }
}

/// Moves the bytes a transaction wants sent into `out`; true when it reported
/// a timeout (Timer B/F/H).
fn take_transmits(
    mut poll: impl FnMut() -> Option<TransactionOutput>,
    out: &mut Vec<Bytes>,
) -> bool {
    let mut timed_out = false;
    while let Some(o) = poll() {
        match o {
            TransactionOutput::Transmit(bytes) => out.push(bytes),
            TransactionOutput::Event(TransactionEvent::TimedOut(_)) => timed_out = true,
            TransactionOutput::Event(_) => {}
        }
    }
    timed_out
}

fn branch_of(req: &Request) -> String {
    req.top_via()
        .ok()
        .and_then(|v| v.branch().map(str::to_owned))
        .unwrap_or_default()
}

impl Call {
    /// The Call-ID.
    pub fn call_id(&self) -> &str {
        &self.call_id
    }

    /// The tenant and trunk the call was admitted for.
    pub fn settings(&self) -> &CallSettings {
        &self.settings
    }

    /// The negotiated media, once answered.
    pub fn negotiated(&self) -> Option<&Negotiated> {
        self.negotiated.as_ref()
    }

    /// Whether the call is over for the user (CDR written, media released).
    pub fn is_ended(&self) -> bool {
        self.state == State::Ended
    }

    /// Whether the caller's ACK for our 200 has arrived (the call is up).
    pub fn is_confirmed(&self) -> bool {
        self.state == State::Confirmed
    }

    /// Whether every transaction is done too: the owner may drop the call.
    pub fn is_finished(&self) -> bool {
        self.state == State::Ended
            && self.invite_txn.as_ref().is_none_or(|t| t.is_terminated())
            && self.reinvites.is_empty()
            && self.server_txns.is_empty()
            && self.client.is_none()
            && !self
                .refer
                .as_ref()
                .is_some_and(transfer::Refer::txn_running)
    }

    /// The call's residue once it has ended and none of its transactions
    /// sends anything on its own any more (see [`linger`]): the owner may
    /// then drop the call and keep this instead. `None` while the call lives,
    /// while a transaction still retransmits or waits for an answer, or when
    /// nothing lingers at all ([`Call::is_finished`]).
    pub fn compact(&self) -> Option<linger::Lingering> {
        if self.state != State::Ended || self.pending_hangup.is_some() || !self.out.is_empty() {
            return None;
        }
        let mut pending = Vec::new();
        let mut until: Option<Instant> = None;
        let mut keep = |settled: Settled, pending_entry: Option<(&str, Method, Peer)>| -> bool {
            match settled {
                Settled::Done => true,
                Settled::Active => false,
                Settled::Absorbing(residue) => {
                    until = Some(until.map_or(residue.until, |u| u.max(residue.until)));
                    if let Some((branch, method, dest)) = pending_entry {
                        pending.push(linger::Pending {
                            branch: branch.to_owned(),
                            method,
                            dest,
                            resend: residue.resend,
                        });
                    }
                    true
                }
            }
        };
        // A REFER still waiting for its answer retransmits on its own.
        if self
            .refer
            .as_ref()
            .is_some_and(transfer::Refer::txn_running)
        {
            return None;
        }
        // Calls we placed have no INVITE server transaction.
        if let Some(invite_txn) = &self.invite_txn
            && !keep(
                invite_txn.settled(),
                Some((&self.invite_branch, Method::Invite, self.invite_dest)),
            )
        {
            return None;
        }
        for re in &self.reinvites {
            if !keep(
                re.txn.settled(),
                Some((&re.branch, Method::Invite, re.dest)),
            ) {
                return None;
            }
        }
        for t in &self.server_txns {
            if !keep(t.txn.settled(), Some((&t.branch, t.method.clone(), t.dest))) {
                return None;
            }
        }
        let client = match &self.client {
            None => Settled::Done,
            Some(ClientTxn::Bye(t)) => t.settled(),
            Some(ClientTxn::Refresh { txn, .. }) => txn.settled(),
        };
        // Our BYE's response retransmissions are absorbed by any lingering
        // call: only its time counts.
        if !keep(client, None) {
            return None;
        }
        let until = until?;
        Some(linger::Lingering::new(self.call_id.clone(), until, pending))
    }

    /// Our BYE has been sent and neither answered nor timed out yet. A daemon
    /// shutting down waits for this (bounded) rather than for the lingering
    /// transactions that only absorb retransmissions.
    pub fn bye_pending(&self) -> bool {
        matches!(&self.client, Some(ClientTxn::Bye(t))
            if matches!(t.state(), ClientNonInviteState::Trying | ClientNonInviteState::Proceeding))
    }

    /// Next output to act on.
    pub fn poll_output(&mut self) -> Option<CallOutput> {
        self.out.pop_front()
    }

    /// When [`Call::handle_timeout`] must be called next.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let mut next = self.invite_txn.as_ref().and_then(|t| t.poll_timeout());
        let mut consider = |t: Option<Instant>| {
            if let Some(t) = t {
                next = Some(next.map_or(t, |n| n.min(t)));
            }
        };
        for re in &self.reinvites {
            consider(re.txn.poll_timeout());
        }
        for t in &self.server_txns {
            consider(t.txn.poll_timeout());
        }
        match &self.client {
            Some(ClientTxn::Bye(t)) => consider(t.poll_timeout()),
            Some(ClientTxn::Refresh { txn, .. }) => consider(txn.poll_timeout()),
            None => {}
        }
        consider(self.refer.as_ref().and_then(transfer::Refer::poll_timeout));
        if self.state != State::Ended {
            consider(self.answer_at);
            consider(self.deadline);
            if let Some(s) = &self.session {
                consider(s.next_timeout());
            }
            consider(self.rtp_deadline());
        }
        next
    }

    fn rtp_deadline(&self) -> Option<Instant> {
        let timeout = self.settings.rtp_timeout?;
        if self.state != State::Confirmed || self.negotiated.as_ref().is_none_or(is_held) {
            return None;
        }
        Some(self.last_media + timeout)
    }

    /// The disclosure prompt has been played. With early media this answers
    /// the call (200 OK); otherwise it changes nothing.
    pub fn prompt_finished(&mut self, now: Instant) {
        if self.settings.early_media && self.state == State::Ringing && self.answer_at.is_some() {
            self.answer_at = None;
            self.answer(now);
        }
    }

    /// RTP arrived for this call (the media layer calls this; it re-arms the RTP timeout).
    pub fn media_activity(&mut self, now: Instant) {
        self.last_media = now;
    }

    /// Time moves on: retransmit, time out, refresh, expire.
    pub fn handle_timeout(&mut self, now: Instant, rng: &mut impl RngCore) {
        if let Some(t) = self.invite_txn.as_mut() {
            t.handle_timeout(now);
        }
        self.drain_invite_txn_at(now, rng);
        for re in &mut self.reinvites {
            re.txn.handle_timeout(now);
        }
        self.drain_reinvite();
        for t in &mut self.server_txns {
            t.txn.handle_timeout(now);
        }
        self.drain_server_txns();
        match &mut self.client {
            Some(ClientTxn::Bye(t)) => t.handle_timeout(now),
            Some(ClientTxn::Refresh { txn, .. }) => txn.handle_timeout(now),
            None => {}
        }
        self.drain_client(now, rng);
        self.refer_timeout(now, rng);
        if self.state == State::Ended {
            return;
        }
        if self.answer_at.is_some_and(|t| now >= t) {
            self.answer_at = None;
            self.answer(now);
        }
        if self.deadline.is_some_and(|t| now >= t) {
            self.hang_up(now, HangupCause::MaxDuration, rng);
            return;
        }
        if self.rtp_deadline().is_some_and(|t| now >= t) {
            self.hang_up(now, HangupCause::RtpTimeout, rng);
            return;
        }
        let mut refresh = false;
        let mut expired = false;
        if let Some(s) = &mut self.session {
            if s.expired(now) {
                expired = true;
            } else if s.refresh_due(now) && self.client.is_none() && !self.offer_pending() {
                refresh = true;
            }
        }
        if expired {
            self.hang_up(now, HangupCause::SessionExpired, rng);
        } else if refresh {
            self.send_refresh(now, rng);
        }
    }

    /// Ends the call from our side: BYE when answered, a final error before.
    pub fn hang_up(&mut self, now: Instant, cause: HangupCause, rng: &mut impl RngCore) {
        match self.state {
            State::Ended => {}
            State::Ringing => {
                let status = if cause == HangupCause::Shutdown {
                    503
                } else {
                    480
                };
                self.reject(now, status, cause);
            }
            State::Answered | State::Confirmed => {
                let via = self.via(rng);
                let contact = self.contact_addr();
                let bye = self.dialog.new_request(Method::Bye, &via, &contact);
                let Ok(key) = txn_key(&bye) else {
                    return;
                };
                let txn = ClientNonInviteTransaction::new(
                    now,
                    key,
                    self.peer.transport.reliability(),
                    self.settings.timers,
                    bye.encode(),
                );
                self.client = Some(ClientTxn::Bye(txn));
                self.drain_client(now, rng);
                self.end(now, HangupSide::Bridge, cause);
            }
        }
    }

    /// A request for this call's Call-ID, as if it came from where the INVITE
    /// came from (see [`Call::handle_request_from`]).
    pub fn handle_request(&mut self, now: Instant, req: Request, rng: &mut impl RngCore) {
        let source = self.peer;
        self.handle_request_from(now, req, source, rng);
    }

    /// A request for this call's Call-ID that arrived from `source`. It is
    /// matched to the dialog by its identifiers, whatever its source; its
    /// responses go where its own top Via and source say (RFC 3261 §18.2.2,
    /// RFC 3581), not to where the INVITE came from.
    pub fn handle_request_from(
        &mut self,
        now: Instant,
        req: Request,
        source: Peer,
        rng: &mut impl RngCore,
    ) {
        let dest = response_dest(&req, source);
        let branch = branch_of(&req);
        let has_to_tag = req.to().ok().is_some_and(|t| t.tag().is_some());
        match req.method {
            Method::Ack => self.on_ack(now, &req, &branch),
            Method::Cancel => self.on_cancel(now, &req, &branch, dest),
            Method::Invite if !has_to_tag && branch == self.invite_branch => {
                if let Some(t) = self.invite_txn.as_mut() {
                    t.on_request_retransmission(now);
                }
                self.drain_invite_txn();
            }
            Method::Invite if !has_to_tag => {
                // A new INVITE with our Call-ID but another branch and no To tag:
                // a second call attempt reusing the Call-ID while this one lives.
                self.respond_stateless(now, &req, 482, dest);
            }
            _ => self.on_in_dialog(now, req, &branch, dest, rng),
        }
        // A hang-up the request made necessary (an ACK without a usable
        // answer) happens now: `poll_timeout` does not announce it.
        self.run_pending_hangup(now, rng);
    }

    fn on_ack(&mut self, now: Instant, ack: &Request, branch: &str) {
        let seq = ack.cseq().map(|c| c.seq).unwrap_or(0);
        // Only a call we answered waits for the ACK of its INVITE; in a call
        // we placed, the peer's CSeq numbers are its own.
        if self.invite_txn.is_some() && seq == self.dialog_invite_seq() {
            // The ACK of the initial INVITE: for a non-2xx it shares the
            // INVITE's branch, for our 2xx it is a new transaction in the
            // dialog. Either way it stops the INVITE transaction's
            // retransmissions — also when the call already ended (we hung up
            // before the ACK arrived).
            if let Some(t) = self.invite_txn.as_mut() {
                t.on_ack(now);
            }
            self.drain_invite_txn();
            if self.state == State::Answered
                && (branch != self.invite_branch || self.dialog.matches(ack))
            {
                self.confirm(now, ack);
            }
            return;
        }
        // An ACK for a re-INVITE: a 2xx's ACK carries the re-INVITE's CSeq, a
        // non-2xx's ACK also its branch (RFC 3261 §17.2.3).
        let Some(idx) = self
            .reinvites
            .iter()
            .position(|re| re.awaiting_ack == Some(seq) || re.branch == branch)
        else {
            return; // A duplicate or stray ACK, absorbed.
        };
        let re = &mut self.reinvites[idx];
        re.txn.on_ack(now);
        let answered = re.awaiting_ack.take().is_some();
        let delayed = std::mem::take(&mut re.delayed);
        if answered
            && delayed
            && let Ok(neg) = self.sdp.accept_answer(&ack.body, &self.settings.media)
        {
            self.negotiated = Some(neg.clone());
            self.out
                .push_back(CallOutput::Event(CallEvent::MediaChanged(neg)));
        }
        self.drain_reinvite();
    }

    /// The caller's ACK for our 200: the call is up.
    fn confirm(&mut self, now: Instant, ack: &Request) {
        self.state = State::Confirmed;
        self.last_media = now;
        if let Some(s) = &mut self.session {
            s.start(now);
        }
        if !self.delayed_offer {
            return;
        }
        match self.sdp.accept_answer(&ack.body, &self.settings.media) {
            Ok(neg) => {
                self.record.codec = Some(neg.codec.encoding_name().to_owned());
                self.negotiated = Some(neg.clone());
                self.out
                    .push_back(CallOutput::Event(CallEvent::Answered(neg)));
            }
            Err(_) => {
                // No usable answer in the ACK: the call cannot carry media.
                self.pending_hangup = Some(HangupCause::MediaFailed);
            }
        }
    }

    /// An offer/answer exchange is in progress (RFC 3261 §14.2: a new offer
    /// gets 491 until the pending one is answered and, for INVITE, ACKed).
    fn offer_pending(&self) -> bool {
        self.reinvites.iter().any(|re| re.awaiting_ack.is_some())
    }

    fn dialog_invite_seq(&self) -> u32 {
        self.invite.cseq().map(|c| c.seq).unwrap_or(0)
    }

    fn on_cancel(&mut self, now: Instant, cancel: &Request, branch: &str, dest: Peer) {
        if branch != self.invite_branch {
            self.respond_stateless(now, cancel, 481, dest);
            return;
        }
        if let Some(t) = self
            .server_txns
            .iter_mut()
            .find(|t| t.branch == branch && t.method == Method::Cancel)
        {
            t.txn.on_request_retransmission(now);
            self.drain_server_txns();
            return;
        }
        // 200 to the CANCEL (RFC 3261 §9.2), To tag as in our provisional.
        let ok = self.dialog_response(cancel, 200, false);
        self.start_server_txn(now, cancel, ok, dest);
        if self.state == State::Ringing {
            self.reject(now, 487, HangupCause::Cancelled);
        }
    }

    fn on_in_dialog(
        &mut self,
        now: Instant,
        req: Request,
        branch: &str,
        dest: Peer,
        rng: &mut impl RngCore,
    ) {
        // Retransmission of a request we already answer?
        if let Some(t) = self
            .server_txns
            .iter_mut()
            .find(|t| t.branch == branch && t.method == req.method)
        {
            t.txn.on_request_retransmission(now);
            self.drain_server_txns();
            return;
        }
        if req.method == Method::Invite
            && let Some(re) = self.reinvites.iter_mut().find(|re| re.branch == branch)
        {
            re.txn.on_request_retransmission(now);
            self.drain_reinvite();
            return;
        }
        if !self.dialog.matches(&req) {
            self.respond_stateless(now, &req, 481, dest);
            return;
        }
        let seq = req.cseq().map(|c| c.seq).unwrap_or(0);
        if self.dialog.accept_remote_cseq(seq).is_err() {
            self.respond_stateless(now, &req, 500, dest);
            return;
        }
        match req.method {
            Method::Bye => {
                let ok = self.dialog_response(&req, 200, false);
                self.start_server_txn(now, &req, ok, dest);
                match self.state {
                    State::Ended => {}
                    State::Ringing => {
                        // BYE before our 200 (RFC 3261 §15.1.2): 487 the INVITE.
                        self.reject(now, 487, HangupCause::CallerBye);
                    }
                    State::Answered | State::Confirmed => {
                        // The 2xx needs no more retransmission once the dialog ends.
                        if let Some(t) = self.invite_txn.as_mut() {
                            t.on_ack(now);
                        }
                        self.drain_invite_txn();
                        self.end(now, HangupSide::Caller, HangupCause::CallerBye);
                    }
                }
            }
            Method::Invite => self.on_reinvite(now, req, branch, dest),
            Method::Update => self.on_update(now, &req, dest),
            Method::Options => {
                let mut ok = self.dialog_response(&req, 200, true);
                ok.headers.push("Allow", ALLOW);
                ok.headers.push("Accept", "application/sdp");
                ok.headers.push("Supported", SUPPORTED);
                self.start_server_txn(now, &req, ok, dest);
            }
            Method::Info => {
                let ok = self.dialog_response(&req, 200, false);
                self.start_server_txn(now, &req, ok, dest);
            }
            Method::Notify => self.on_notify(now, &req, dest, rng),
            Method::Extension(_) => self.respond_stateless(now, &req, 501, dest),
            _ => {
                let mut resp = self.dialog_response(&req, 405, false);
                resp.headers.push("Allow", ALLOW);
                self.start_server_txn(now, &req, resp, dest);
            }
        }
    }

    fn on_reinvite(&mut self, now: Instant, req: Request, branch: &str, dest: Peer) {
        let Ok(key) = txn_key(&req) else {
            return;
        };
        let mut txn = ServerInviteTransaction::new(
            now,
            key,
            dest.transport.reliability(),
            self.settings.timers,
            None,
        );
        let busy = self.offer_pending()
            || matches!(self.client, Some(ClientTxn::Refresh { .. }))
            || self.state == State::Answered;
        let seq = req.cseq().map(|c| c.seq).unwrap_or(0);
        let mut delayed = false;
        let (status, resp) = if busy {
            // Glare or an overlapping offer (RFC 3261 §14.2).
            let mut resp = self.dialog_response(&req, 491, false);
            resp.headers.push("Retry-After", "1");
            (491, resp)
        } else if req.body.is_empty() {
            delayed = true;
            let body = self.sdp.offer(&self.settings.media, Direction::SendRecv);
            (200, self.ok_with_sdp(&req, body))
        } else {
            match self.sdp.answer(&req.body, &self.settings.media) {
                Ok((neg, body)) => {
                    self.negotiated = Some(neg.clone());
                    self.out
                        .push_back(CallOutput::Event(CallEvent::MediaChanged(neg)));
                    (200, self.ok_with_sdp(&req, body))
                }
                Err(e) => {
                    // The old session stays (RFC 3261 §14.2).
                    let status = e.status();
                    (status, self.dialog_response(&req, status, false))
                }
            }
        };
        let mut resp = resp;
        if status == 200 {
            self.dialog.refresh_target(&req);
            if let Some(s) = &mut self.session {
                s.refreshed(now);
                // RFC 4028 §9: the 2xx to a refresh carries the session timer.
                s.apply(&mut resp.headers);
            }
        }
        let _ = txn.send_final(now, status, resp.encode());
        if self.reinvites.len() >= MAX_SERVER_TXNS {
            // Bounded: the oldest finished one stops absorbing retransmissions.
            self.reinvites.remove(0);
        }
        self.reinvites.push(ReInvite {
            branch: branch.to_owned(),
            dest,
            txn,
            awaiting_ack: (status == 200).then_some(seq),
            delayed,
        });
        self.drain_reinvite();
    }

    fn on_update(&mut self, now: Instant, req: &Request, dest: Peer) {
        let resp = if req.body.is_empty() {
            self.dialog_response(req, 200, true)
        } else if self.offer_pending() {
            self.dialog_response(req, 491, false)
        } else {
            match self.sdp.answer(&req.body, &self.settings.media) {
                Ok((neg, body)) => {
                    self.negotiated = Some(neg.clone());
                    self.out
                        .push_back(CallOutput::Event(CallEvent::MediaChanged(neg)));
                    self.ok_with_sdp(req, body)
                }
                Err(e) => self.dialog_response(req, e.status(), false),
            }
        };
        let mut resp = resp;
        if resp.status == 200 {
            self.dialog.refresh_target(req);
            if let Some(s) = &mut self.session {
                s.refreshed(now);
                s.apply(&mut resp.headers);
            }
        }
        self.start_server_txn(now, req, resp, dest);
    }

    /// A response for this call's Call-ID (to our BYE or refresh).
    pub fn handle_response(&mut self, now: Instant, resp: Response, rng: &mut impl RngCore) {
        let Ok(cseq) = resp.cseq() else {
            return;
        };
        if cseq.method == Method::Refer {
            self.on_refer_response(now, cseq.seq, resp.status, rng);
            return;
        }
        match (&mut self.client, &cseq.method) {
            (Some(ClientTxn::Bye(txn)), Method::Bye) => {
                // A response in the wrong state is absorbed by the transaction.
                let _ = txn.on_response(now, resp.status);
            }
            (Some(ClientTxn::Refresh { seq, via, txn }), Method::Invite) if *seq == cseq.seq => {
                let seq = *seq;
                let status = resp.status;
                // The ACK for a non-2xx belongs to the INVITE transaction: same
                // Via (branch) as our re-INVITE (RFC 3261 §17.1.1.3).
                let ack = self.dialog.ack(seq, via);
                let _ = txn.on_response(now, status, || ack.encode());
                if (200..300).contains(&status) {
                    self.ack_refresh(seq, &resp, rng);
                    if let Some(s) = &mut self.session {
                        s.refreshed(now);
                    }
                } else if status == 408 || status == 481 {
                    self.pending_hangup = Some(HangupCause::DialogGone);
                } else if status >= 300
                    && let Some(s) = &mut self.session
                {
                    s.retry_later(now);
                }
            }
            (_, Method::Invite) if (200..300).contains(&resp.status) => {
                // A retransmitted 2xx to a refresh whose transaction is gone: re-ACK.
                if let Some((seq, ack)) = &self.last_ack
                    && *seq == cseq.seq
                {
                    let dest = self.request_dest();
                    self.out.push_back(CallOutput::Transmit(Transmit {
                        dest,
                        bytes: ack.clone(),
                    }));
                }
            }
            _ => {}
        }
        self.drain_client(now, rng);
    }
}

impl Call {
    fn answer(&mut self, now: Instant) {
        let body = if self.delayed_offer {
            self.sdp.offer(&self.settings.media, Direction::SendRecv)
        } else {
            self.pending_answer.take().unwrap_or_default()
        };
        let invite = self.invite.clone();
        let mut ok = self.ok_with_sdp(&invite, body);
        if let Some(s) = &self.session {
            s.apply(&mut ok.headers);
        }
        if let Some(t) = self.invite_txn.as_mut() {
            let _ = t.send_final(now, 200, ok.encode());
        }
        self.drain_invite_txn();
        self.state = State::Answered;
        self.record.answered_at = Some(self.wall(now));
        self.record.result_code = 200;
        if let Some(neg) = &self.negotiated {
            self.record.codec = Some(neg.codec.encoding_name().to_owned());
            self.out
                .push_back(CallOutput::Event(CallEvent::Answered(neg.clone())));
        }
    }

    fn ok_with_sdp(&self, req: &Request, body: Bytes) -> Response {
        let mut ok = self.dialog_response(req, 200, true);
        ok.headers.push("Allow", ALLOW);
        ok.headers.push("Supported", SUPPORTED);
        ok.headers.push("Content-Type", "application/sdp");
        ok.body = body;
        ok
    }

    /// Final non-2xx to the INVITE: the call ends before it began.
    fn reject(&mut self, now: Instant, status: u16, cause: HangupCause) {
        let invite = self.invite.clone();
        let mut resp = self.dialog_response(&invite, status, false);
        if status == 503 {
            resp.headers.push("Retry-After", "5");
        }
        if status == 488 {
            // RFC 3261 §21.4.26: say why the offer was not acceptable.
            resp.headers.push(
                "Warning",
                format!(
                    "305 {} \"Incompatible media format\"",
                    self.settings.local.host
                ),
            );
        }
        if let Some(t) = self.invite_txn.as_mut() {
            let _ = t.send_final(now, status, resp.encode());
        }
        self.drain_invite_txn();
        self.answer_at = None;
        self.record.result_code = status;
        let side = match cause {
            HangupCause::Cancelled | HangupCause::CallerBye => HangupSide::Caller,
            _ => HangupSide::Bridge,
        };
        self.end(now, side, cause);
    }

    fn end(&mut self, now: Instant, side: HangupSide, cause: HangupCause) {
        if self.state == State::Ended {
            return;
        }
        self.state = State::Ended;
        if let Some(r) = &mut self.refer {
            // Whatever comes later (a late NOTIFY) is answered, not reported.
            r.done = true;
            r.deadline = None;
        }
        self.record.ended_at = Some(self.wall(now));
        self.record.hangup_side = side;
        self.record.cause = cause.as_str().to_owned();
        self.out
            .push_back(CallOutput::Event(CallEvent::Ended(Box::new(
                self.record.clone(),
            ))));
    }

    fn wall(&self, now: Instant) -> SystemTime {
        self.wall_started + now.saturating_duration_since(self.started)
    }

    /// A response in this dialog: our To tag on everything but 100, our Contact
    /// where a dialog is established or refreshed, and — in a response that
    /// creates the dialog (1xx with our tag, 2xx to the initial INVITE) — the
    /// INVITE's Record-Route, every value in its order (RFC 3261 §12.1.1), so
    /// the caller's route set sends ACK, re-INVITE and BYE through the proxies.
    fn dialog_response(&self, req: &Request, status: u16, contact: bool) -> Response {
        let mut resp = Response::for_request(req, status);
        if status > 100 {
            self.dialog.tag_response(&mut resp);
        }
        let creates_dialog = req.method == Method::Invite
            && (101..300).contains(&status)
            && req.to().ok().is_some_and(|t| t.tag().is_none());
        if creates_dialog {
            for value in req.headers.get_all("Record-Route") {
                resp.headers.push("Record-Route", value);
            }
        }
        if contact {
            resp.headers
                .push("Contact", self.contact_addr().to_string());
        }
        resp
    }

    /// Our advertised host (an IP literal from the profile; a name if one
    /// were ever configured, printed as given).
    fn local_host(&self) -> Host {
        Host::parse(&self.settings.local.host)
            .unwrap_or_else(|_| Host::Domain(self.settings.local.host.clone()))
    }

    fn contact_addr(&self) -> NameAddr {
        let mut uri = Uri::sip(
            Some("sipbridge"),
            self.local_host(),
            Some(self.settings.local.port),
        );
        match self.peer.transport {
            TransportKind::Udp => {}
            TransportKind::Tcp => uri.params.set("transport", Some("tcp")),
            // A `sips:` request gets a `sips:` Contact (RFC 5630 §3.1.2);
            // otherwise `transport=tls` keeps the dialog on TLS.
            TransportKind::Tls if self.invite.uri.scheme == crate::sip::message::Scheme::Sips => {
                uri.scheme = crate::sip::message::Scheme::Sips;
            }
            TransportKind::Tls => uri.params.set("transport", Some("tls")),
        }
        NameAddr::new(uri)
    }

    fn via(&self, rng: &mut impl RngCore) -> Via {
        let mut params = Params::new();
        params.set("branch", Some(&format!("z9hG4bK{}", random_token(rng))));
        params.set("rport", None);
        Via {
            transport: self.peer.transport.as_via().to_owned(),
            host: self.local_host(),
            port: Some(self.settings.local.port),
            params,
        }
    }

    /// Where our in-dialog requests go: the next hop when it is an IP literal,
    /// else back where the INVITE came from (we do no DNS in the core). On TCP
    /// the INVITE's connection is reused.
    fn request_dest(&self) -> Peer {
        let hop = self.dialog.next_hop();
        let port = hop.port.unwrap_or(5060);
        let ip = match &hop.host {
            Some(crate::sip::message::Host::V4(ip)) => Some(std::net::IpAddr::V4(*ip)),
            Some(crate::sip::message::Host::V6(ip)) => Some(std::net::IpAddr::V6(*ip)),
            _ => None,
        };
        match (self.peer.transport, ip) {
            (TransportKind::Tcp | TransportKind::Tls, _) | (_, None) => self.peer,
            (TransportKind::Udp, Some(ip)) => Peer {
                transport: TransportKind::Udp,
                addr: SocketAddr::new(ip, port),
                flow: self.peer.flow,
            },
        }
    }

    /// A response that needs no dialog state (481, 482, 500, 501), still kept
    /// in a transaction so that retransmissions get it again.
    fn respond_stateless(&mut self, now: Instant, req: &Request, status: u16, dest: Peer) {
        let resp = Response::for_request(req, status);
        self.start_server_txn(now, req, resp, dest);
    }

    fn start_server_txn(&mut self, now: Instant, req: &Request, resp: Response, dest: Peer) {
        let bytes = resp.encode();
        let Ok(key) = txn_key(req) else {
            self.transmit(dest, bytes);
            return;
        };
        if self.server_txns.len() >= MAX_SERVER_TXNS {
            // Bounded: answer without keeping state.
            self.transmit(dest, bytes);
            return;
        }
        let mut txn = ServerNonInviteTransaction::new(
            now,
            key,
            dest.transport.reliability(),
            self.settings.timers,
        );
        let _ = txn.send_final(now, resp.status, bytes);
        self.server_txns.push(ServerTxn {
            branch: branch_of(req),
            dest,
            method: req.method.clone(),
            txn,
        });
        self.drain_server_txns();
    }

    fn transmit(&mut self, dest: Peer, bytes: Bytes) {
        self.out
            .push_back(CallOutput::Transmit(Transmit { dest, bytes }));
    }

    fn drain_invite_txn(&mut self) {
        while let Some(o) = self.invite_txn.as_mut().and_then(|t| t.poll_output()) {
            match o {
                TransactionOutput::Transmit(bytes) => self.transmit(self.invite_dest, bytes),
                TransactionOutput::Event(TransactionEvent::TimedOut(_)) => {
                    if self.state == State::Answered {
                        self.pending_hangup = Some(HangupCause::NoAck);
                    }
                }
                TransactionOutput::Event(_) => {}
            }
        }
    }

    fn drain_invite_txn_at(&mut self, now: Instant, rng: &mut impl RngCore) {
        self.drain_invite_txn();
        self.run_pending_hangup(now, rng);
    }

    fn run_pending_hangup(&mut self, now: Instant, rng: &mut impl RngCore) {
        if let Some(cause) = self.pending_hangup.take() {
            self.hang_up(now, cause, rng);
        }
    }

    fn drain_reinvite(&mut self) {
        let mut out = Vec::new();
        for re in &mut self.reinvites {
            let mut sent = Vec::new();
            take_transmits(|| re.txn.poll_output(), &mut sent);
            out.extend(sent.into_iter().map(|bytes| (re.dest, bytes)));
        }
        self.reinvites.retain(|re| !re.txn.is_terminated());
        for (dest, bytes) in out {
            self.transmit(dest, bytes);
        }
    }

    fn drain_server_txns(&mut self) {
        let mut out = Vec::new();
        for t in &mut self.server_txns {
            let mut sent = Vec::new();
            take_transmits(|| t.txn.poll_output(), &mut sent);
            out.extend(sent.into_iter().map(|bytes| (t.dest, bytes)));
        }
        self.server_txns.retain(|t| !t.txn.is_terminated());
        for (dest, bytes) in out {
            self.transmit(dest, bytes);
        }
    }

    fn drain_client(&mut self, now: Instant, rng: &mut impl RngCore) {
        let dest = self.request_dest();
        let mut out = Vec::new();
        let (timed_out, done) = match &mut self.client {
            Some(ClientTxn::Bye(t)) => (
                take_transmits(|| t.poll_output(), &mut out),
                t.is_terminated(),
            ),
            Some(ClientTxn::Refresh { txn, .. }) => (
                take_transmits(|| txn.poll_output(), &mut out),
                txn.is_terminated(),
            ),
            None => (false, false),
        };
        for bytes in out {
            self.out
                .push_back(CallOutput::Transmit(Transmit { dest, bytes }));
        }
        if done {
            let was_refresh = matches!(self.client, Some(ClientTxn::Refresh { .. }));
            self.client = None;
            if was_refresh && timed_out {
                // RFC 4028 §10 / RFC 5057: a refresh that times out ends the session.
                self.pending_hangup = Some(HangupCause::DialogGone);
            }
        }
        self.run_pending_hangup(now, rng);
    }

    fn send_refresh(&mut self, now: Instant, rng: &mut impl RngCore) {
        let via = self.via(rng);
        let contact = self.contact_addr();
        let mut req = self.dialog.new_request(Method::Invite, &via, &contact);
        let direction = self
            .negotiated
            .as_ref()
            .map_or(Direction::SendRecv, |n| n.local_direction);
        req.body = self.sdp.offer(&self.settings.media, direction);
        req.headers.push("Content-Type", "application/sdp");
        req.headers.push("Allow", ALLOW);
        req.headers.push("Supported", SUPPORTED);
        if let Some(s) = &mut self.session {
            s.apply_refresh(&mut req.headers);
            s.refresh_sent(now);
        }
        let seq = self.dialog.local_seq;
        let Ok(key) = txn_key(&req) else {
            return;
        };
        let txn = ClientInviteTransaction::new(
            now,
            key,
            self.peer.transport.reliability(),
            self.settings.timers,
            req.encode(),
        );
        self.client = Some(ClientTxn::Refresh { seq, via, txn });
        self.drain_client(now, rng);
    }

    fn ack_refresh(&mut self, seq: u32, ok: &Response, rng: &mut impl RngCore) {
        if let Ok(neg) = self.sdp.accept_answer(&ok.body, &self.settings.media) {
            self.negotiated = Some(neg);
        }
        let via = self.via(rng);
        let ack = self.dialog.ack(seq, &via).encode();
        self.last_ack = Some((seq, ack.clone()));
        let dest = self.request_dest();
        self.out
            .push_back(CallOutput::Transmit(Transmit { dest, bytes: ack }));
    }
}
