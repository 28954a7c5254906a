//! The bridge transfer (issue 13 item 1, `mode: "bridge"`): the daemon calls
//! the transfer target itself and joins the caller to it, a B2BUA inside the
//! caller's [`BridgedCall`].
//!
//! The steps, each reported to the agent as a `transfer` event:
//! 1. the agent asks; [`BridgeOutput::DialTarget`] asks the owner for an
//!    [`OutboundLeg`] through the tenant's transfer trunk (admission, limits,
//!    an RTP port, the trunk's credentials — configuration and sockets are
//!    the owner's), which comes back as [`BridgeInput::TargetLeg`]
//!    (`accepted`) or [`BridgeInput::TargetUnavailable`] (`failed`);
//! 2. the leg rings (`progress` with the status) and may bring early media:
//!    the target's media session starts then, and its ringback reaches the
//!    caller whenever the agent is not speaking;
//! 3. answered: the leg becomes a second [`Call`], the agent gets
//!    `completed` and its connection is closed, and from then on each
//!    side's decoded audio is the other side's playout (each media session
//!    transcodes its own codec, so the legs may differ). The caller's
//!    recording goes on with both directions (left the caller, right the
//!    target as the caller hears it) under the same consent rules; keys
//!    pressed on either side are sent on to the other;
//! 4. busy, no answer, 4xx–6xx, Timer B: `failed` with the reason and the
//!    status; the agent keeps the caller;
//! 5. once bridged, either side's end ends the other (BYE, cause
//!    `bridged-leg-ended`); the caller's end while the target still rings
//!    cancels the leg.
//!
//! One target leg at a time: the agent may try again once a transfer has
//! failed, and the new leg replaces the old one (what still lingered of it,
//! such as the ACK for a repeated 486, is dropped: the far end stops
//! repeating after its Timer H).
//!
//! The target leg's own CDR ([`BridgeOutput::TargetReleased`]) is an
//! outbound call whose `transfer` names the caller's Call-ID, and the
//! caller's CDR names the target leg's: the two rows link.

use super::{BridgeEvent, BridgeInput, BridgeOutput, BridgedCall, PipelineOp};
use crate::call::outbound::{DialFailure, LegEvent, LegOutput, OutboundLeg};
use crate::call::transfer::{
    TransferFailure, TransferMode, TransferRecord, TransferState, TransferTarget, TransferUpdate,
};
use crate::call::{
    Call, CallEvent, CallOutput, CallRecord, CallSettings, HangupCause, MediaOutput, MediaSession,
    PipelineAudioRef,
};
use crate::sip::message::Message;
use crate::sip::sdp::Negotiated;
use rand::RngCore;
use std::time::{Duration, Instant};

/// The target's early media (ringback) reaches the caller only once the
/// agent has sent no audio for this long and its queued audio has played.
const AGENT_QUIET: Duration = Duration::from_millis(300);

/// Where the target leg is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Asked the owner for a leg.
    Preparing,
    /// The INVITE is out.
    Dialing,
    /// Answered: the two calls are joined.
    Bridged,
    /// Over (failed, or the bridged target call ended); the leg or call may
    /// still linger for retransmissions.
    Over,
}

/// The transfer target's leg. See the module docs.
pub(super) struct TargetLeg {
    target: TransferTarget,
    phase: Phase,
    /// The dialling leg, until it is answered or fails (then kept only
    /// while it still has transactions to finish).
    leg: Option<OutboundLeg>,
    /// The answered leg as a call.
    call: Option<Call>,
    /// The target's media (from early media or the answer).
    media: Option<MediaSession>,
    /// The call's settings once answered (the leg's media plan without the
    /// disclosure and without its own recording).
    settings: Option<CallSettings>,
    /// The leg's Call-ID.
    call_id: Option<String>,
    /// The owner was told the leg is over ([`BridgeOutput::TargetReleased`]).
    released: bool,
    /// The last status the target gave.
    status: Option<u16>,
}

impl TargetLeg {
    /// Whether this SIP message belongs to the target leg.
    fn owns(&self, msg: &Message) -> bool {
        let id = match msg {
            Message::Request(r) => r.call_id(),
            Message::Response(r) => r.call_id(),
        };
        self.call_id.as_deref().is_some_and(|c| Ok(c) == id)
    }

    fn poll_timeout(&self) -> Option<Instant> {
        [
            self.leg.as_ref().and_then(OutboundLeg::poll_timeout),
            self.call.as_ref().and_then(Call::poll_timeout),
            self.media.as_ref().map(MediaSession::poll_timeout),
        ]
        .into_iter()
        .flatten()
        .min()
    }

    /// The target leg's CDR `transfer`: the outcome, and the caller's Call-ID.
    fn leg_record(
        &self,
        result: &'static str,
        reason: Option<&'static str>,
        status: Option<u16>,
        caller_id: &str,
    ) -> TransferRecord {
        TransferRecord {
            to: self.target.to_string(),
            mode: TransferMode::Bridge,
            result,
            reason,
            status,
            leg_call_id: Some(caller_id.to_owned()),
        }
    }

    /// Nothing of the leg needs the task any more.
    fn is_finished(&self) -> bool {
        match self.phase {
            Phase::Preparing => false,
            Phase::Dialing | Phase::Bridged => false,
            Phase::Over => {
                self.released
                    && self.leg.as_ref().is_none_or(OutboundLeg::is_finished)
                    && self.call.as_ref().is_none_or(Call::is_finished)
            }
        }
    }
}

impl BridgedCall {
    /// The agent asked for a bridge transfer to `target` (the call is
    /// confirmed and no other transfer runs: checked by the caller).
    pub(super) fn start_bridge_transfer(&mut self, target: TransferTarget) {
        self.target = Some(Box::new(TargetLeg {
            target: target.clone(),
            phase: Phase::Preparing,
            leg: None,
            call: None,
            media: None,
            settings: None,
            call_id: None,
            released: false,
            status: None,
        }));
        self.emit(BridgeOutput::DialTarget { target });
    }

    /// A transfer (blind or bridge) is running.
    pub(super) fn target_busy(&self) -> bool {
        self.target
            .as_ref()
            .is_some_and(|t| matches!(t.phase, Phase::Preparing | Phase::Dialing))
    }

    /// The caller is joined to the transfer target.
    pub fn is_bridged_to_target(&self) -> bool {
        self.target
            .as_ref()
            .is_some_and(|t| t.phase == Phase::Bridged)
    }

    /// The target leg's Call-ID, once it is dialled.
    pub fn target_call_id(&self) -> Option<&str> {
        self.target.as_ref().and_then(|t| t.call_id.as_deref())
    }

    /// The target leg's media session, while it has one.
    pub fn target_media(&self) -> Option<&MediaSession> {
        self.target.as_ref().and_then(|t| t.media.as_ref())
    }

    /// The target leg needs nothing more (none was dialled, or it is over,
    /// released and its transactions done).
    pub(super) fn target_finished(&self) -> bool {
        self.target.as_deref().is_none_or(TargetLeg::is_finished)
    }

    pub(super) fn target_poll_timeout(&self) -> Option<Instant> {
        self.target.as_deref().and_then(TargetLeg::poll_timeout)
    }

    /// Routes a SIP message of the target leg; gives it back when it is the
    /// caller's.
    pub(super) fn target_sip(
        &mut self,
        now: Instant,
        msg: Message,
        from: crate::call::Peer,
        rng: &mut impl RngCore,
    ) -> Option<Message> {
        let Some(t) = &mut self.target else {
            return Some(msg);
        };
        if !t.owns(&msg) {
            return Some(msg);
        }
        match (msg, &mut t.call, &mut t.leg) {
            (Message::Request(req), Some(call), _) => call.handle_request_from(now, req, from, rng),
            (Message::Response(resp), Some(call), _) => call.handle_response(now, resp, rng),
            (Message::Response(resp), None, Some(leg)) => leg.handle_response(now, resp, rng),
            // A request before the answer (nothing else is expected of a
            // UAS we call): dropped; its retransmissions stop at its timeout.
            (Message::Request(_), None, _) | (Message::Response(_), None, None) => {}
        }
        None
    }

    /// The owner's answer to [`BridgeOutput::DialTarget`].
    pub(super) fn target_input(
        &mut self,
        now: Instant,
        input: BridgeInput,
        rng: &mut impl RngCore,
    ) {
        match input {
            BridgeInput::TargetLeg { leg, settings } => {
                let Some(t) = &mut self.target else {
                    // Nothing asked for it (any more): let the owner release it.
                    self.emit(BridgeOutput::TargetReleased {
                        record: Box::new(leg.record().clone()),
                    });
                    return;
                };
                t.call_id = Some(leg.call_id().to_owned());
                t.leg = Some(*leg);
                // The target hears no disclosure, echoes nothing and is not
                // recorded on its own: the caller's recording has both sides.
                let mut settings = *settings;
                settings.plan.prompt = None;
                settings.plan.gate_until_prompt_done = false;
                settings.plan.echo_delay = None;
                settings.plan.record = false;
                t.settings = Some(settings);
                if t.phase == Phase::Preparing && !self.call.is_ended() {
                    t.phase = Phase::Dialing;
                    self.bridge_update(TransferState::Accepted, None);
                } else if let Some(leg) = &mut t.leg {
                    // The caller hung up meanwhile.
                    t.phase = Phase::Over;
                    leg.cancel(now, rng);
                }
            }
            BridgeInput::TargetUnavailable(status) => {
                if let Some(t) = &mut self.target {
                    t.phase = Phase::Over;
                    t.released = true;
                }
                self.bridge_update(
                    TransferState::Failed(TransferFailure::Unavailable),
                    Some(status),
                );
            }
            BridgeInput::TargetRtp { from, data } => {
                if let Some(m) = self.target.as_mut().and_then(|t| t.media.as_mut()) {
                    m.on_rtp(now, from, data);
                    if let Some(c) = self.target.as_mut().and_then(|t| t.call.as_mut()) {
                        c.media_activity(now);
                    }
                }
            }
            BridgeInput::TargetRtcp(data) => {
                if let Some(m) = self.target.as_mut().and_then(|t| t.media.as_mut()) {
                    m.on_rtcp(now, &data);
                }
            }
            _ => {}
        }
    }

    /// Time passes for the target leg.
    pub(super) fn target_timeout(&mut self, now: Instant, rng: &mut impl RngCore) {
        let wall = self.wall(now);
        let Some(t) = &mut self.target else { return };
        if let Some(leg) = &mut t.leg {
            leg.handle_timeout(now, rng);
        }
        if let Some(c) = &mut t.call {
            c.handle_timeout(now, rng);
        }
        if let Some(m) = &mut t.media {
            m.handle_timeout(now, wall, rng);
        }
    }

    /// The caller's call ended: the target goes too (BYE once bridged,
    /// CANCEL while it rings).
    pub(super) fn target_caller_ended(&mut self, now: Instant, rng: &mut impl RngCore) {
        let Some(t) = &mut self.target else { return };
        if let Some(c) = &mut t.call {
            c.hang_up(now, HangupCause::BridgedLegEnded, rng);
        }
        if let Some(leg) = &mut t.leg
            && t.phase != Phase::Over
        {
            leg.cancel(now, rng);
        }
    }

    /// Caller audio while bridged goes to the target; `false`: not bridged.
    pub(super) fn relay_to_target(&mut self, now: Instant, audio: PipelineAudioRef<'_>) -> bool {
        let Some(t) = &mut self.target else {
            return false;
        };
        if t.phase != Phase::Bridged {
            return false;
        }
        if let Some(m) = &mut t.media {
            m.push_pipeline_audio(now, audio);
        }
        true
    }

    /// A key the caller pressed while bridged goes to the target (RFC 4733
    /// where the target negotiated it, in-band otherwise).
    pub(super) fn dtmf_to_target(&mut self, digit: char) {
        if let Some(t) = &mut self.target
            && t.phase == Phase::Bridged
            && let Some(m) = &mut t.media
        {
            let _ = m.send_dtmf(&digit.to_string());
        }
    }

    /// Drains the target leg, its call and its media; `true` if anything
    /// came out.
    pub(super) fn target_outputs(&mut self, now: Instant, rng: &mut impl RngCore) -> bool {
        let mut progress = false;
        progress |= self.leg_outputs(now, rng);
        progress |= self.target_call_outputs(now, rng);
        progress |= self.target_media_outputs(now);
        if let Some(t) = &mut self.target
            && t.leg.as_ref().is_some_and(OutboundLeg::is_finished)
            && t.phase != Phase::Dialing
        {
            t.leg = None;
        }
        progress
    }

    fn leg_outputs(&mut self, now: Instant, rng: &mut impl RngCore) -> bool {
        let mut progress = false;
        while let Some(o) = self
            .target
            .as_mut()
            .and_then(|t| t.leg.as_mut())
            .and_then(OutboundLeg::poll_output)
        {
            progress = true;
            match o {
                LegOutput::Transmit(tx) => self.emit(BridgeOutput::Sip(tx)),
                LegOutput::Event(LegEvent::Progress(status)) => {
                    if self
                        .target
                        .as_ref()
                        .is_some_and(|t| t.phase == Phase::Dialing)
                    {
                        self.bridge_update(TransferState::Progress, Some(status));
                    }
                }
                LegOutput::Event(LegEvent::EarlyMedia(neg)) => {
                    self.start_target_media(now, &neg, rng)
                }
                LegOutput::Event(LegEvent::Answered) => self.target_answered(now, rng),
                LegOutput::Event(LegEvent::Failed(f)) => self.target_failed(f),
            }
        }
        progress
    }

    /// The target answered: it becomes a call joined to the caller's.
    fn target_answered(&mut self, now: Instant, rng: &mut impl RngCore) {
        let Some(t) = &mut self.target else { return };
        let (Some(answered), Some(settings)) = (
            t.leg.as_mut().and_then(OutboundLeg::take_answered),
            t.settings.clone(),
        ) else {
            return;
        };
        let neg = answered.negotiated.clone();
        let mut call = Call::from_answered(now, answered, settings);
        if t.phase != Phase::Dialing || self.call.is_ended() {
            // The caller has gone meanwhile: the target is released at once.
            t.phase = Phase::Over;
            call.hang_up(now, HangupCause::BridgedLegEnded, rng);
            t.call = Some(call);
            return;
        }
        t.phase = Phase::Bridged;
        t.status = Some(200);
        t.call = Some(call);
        match &mut t.media {
            Some(m) => m.update(&neg),
            None => self.start_target_media(now, &neg, rng),
        }
        if self.target.as_ref().is_some_and(|t| t.media.is_none()) {
            // No usable media: the target is released, the agent keeps the caller.
            if let Some(c) = self.target.as_mut().and_then(|t| t.call.as_mut()) {
                c.hang_up(now, HangupCause::MediaFailed, rng);
            }
            if let Some(t) = &mut self.target {
                t.phase = Phase::Over;
            }
            self.bridge_update(
                TransferState::Failed(TransferFailure::TargetFailed),
                Some(488),
            );
            return;
        }
        self.bridge_update(TransferState::Completed, Some(200));
        // The agent's part is over: its connection closes after the
        // `completed` event; the caller's audio now goes to the target.
        if let Some(m) = &mut self.media {
            m.clear();
        }
        if let Some(l) = self.link.take() {
            self.emit(BridgeOutput::Pipeline(PipelineOp::Close {
                deepgram_only: l.deepgram_only,
            }));
            self.closed_link = Some(crate::call::supervisor::PipelineSummary {
                dropped_frames: l.dropped,
                ..l.supervisor.summary()
            });
        }
        if let Some(m) = &mut self.media {
            m.set_hold_audio(None);
        }
    }

    fn target_failed(&mut self, f: DialFailure) {
        let Some(t) = &mut self.target else { return };
        let was_dialing = t.phase == Phase::Dialing;
        t.phase = Phase::Over;
        t.media = None;
        if !t.released {
            t.released = true;
            let caller_id = self.call.call_id();
            let record = t.leg.as_ref().map(|l| {
                let mut r = l.record().clone();
                r.transfer = Some(t.leg_record(
                    "failed",
                    Some(failure_of(f).as_str()),
                    Some(f.status()),
                    caller_id,
                ));
                r
            });
            if let Some(record) = record {
                self.emit(BridgeOutput::TargetReleased {
                    record: Box::new(record),
                });
            }
        }
        if was_dialing {
            // Cancelled because the caller left: not the target's doing.
            let why = if self.call.is_ended() {
                TransferFailure::NotConnected
            } else {
                failure_of(f)
            };
            self.bridge_update(TransferState::Failed(why), Some(f.status()));
        }
    }

    fn start_target_media(&mut self, now: Instant, neg: &Negotiated, rng: &mut impl RngCore) {
        let Some(t) = &mut self.target else { return };
        if t.media.is_some() {
            return;
        }
        let Some(settings) = &t.settings else { return };
        match MediaSession::new(now, neg, settings.plan.clone(), rng) {
            Ok(m) => t.media = Some(m),
            Err(e) => self.event(BridgeEvent::MediaFailed(format!("transfer target: {e}"))),
        }
    }

    fn target_call_outputs(&mut self, now: Instant, rng: &mut impl RngCore) -> bool {
        let mut progress = false;
        while let Some(o) = self
            .target
            .as_mut()
            .and_then(|t| t.call.as_mut())
            .and_then(Call::poll_output)
        {
            progress = true;
            match o {
                CallOutput::Transmit(tx) => self.emit(BridgeOutput::Sip(tx)),
                CallOutput::Event(CallEvent::MediaChanged(neg)) => {
                    if let Some(m) = self.target.as_mut().and_then(|t| t.media.as_mut()) {
                        m.update(&neg);
                    }
                }
                CallOutput::Event(CallEvent::Ended(record)) => self.target_ended(now, *record, rng),
                // Answered is the leg's own report (already handled), and a
                // call we placed has no early media or transfer of its own.
                CallOutput::Event(_) => {}
            }
        }
        progress
    }

    /// The target's call ended (its BYE, ours, a timeout): the caller's
    /// goes too, and the owner releases the leg.
    fn target_ended(&mut self, now: Instant, mut record: CallRecord, rng: &mut impl RngCore) {
        let caller_id = self.call.call_id().to_owned();
        let Some(t) = &mut self.target else { return };
        let media = t.media.take();
        if let Some(m) = &media {
            record.rtp = Some(crate::call::RtpSummary::of(m));
            record.quality = Some(crate::call::QualitySummary::of(m));
        }
        record.transfer = Some(t.leg_record("completed", None, t.status, &caller_id));
        t.phase = Phase::Over;
        if !t.released {
            t.released = true;
            self.emit(BridgeOutput::TargetReleased {
                record: Box::new(record),
            });
        }
        self.call.hang_up(now, HangupCause::BridgedLegEnded, rng);
    }

    fn target_media_outputs(&mut self, now: Instant) -> bool {
        let mut progress = false;
        while let Some(o) = self
            .target
            .as_mut()
            .and_then(|t| t.media.as_mut())
            .and_then(MediaSession::poll_output)
        {
            progress = true;
            match o {
                MediaOutput::Rtp { to, bytes } => self.emit(BridgeOutput::TargetRtp { to, bytes }),
                MediaOutput::Rtcp { to, bytes } => {
                    self.emit(BridgeOutput::TargetRtcp { to, bytes });
                }
                MediaOutput::CallerAudio(frame) => {
                    let bridged = self.is_bridged_to_target();
                    let agent_quiet = self
                        .last_agent_play
                        .is_none_or(|at| now.saturating_duration_since(at) >= AGENT_QUIET);
                    let Some(m) = &mut self.media else { continue };
                    // Ringback (early media) only while the agent is silent:
                    // never mixed into its speech.
                    if bridged || (agent_quiet && m.playout_queued_ms() <= 40) {
                        m.push_pipeline_audio(now, frame.audio());
                    }
                }
                MediaOutput::Dtmf(ev) => {
                    // Keys the target presses reach the caller (an IVR on
                    // the caller's side is rare, but the keys are theirs).
                    if self.is_bridged_to_target()
                        && let Some(m) = &mut self.media
                    {
                        let _ = m.send_dtmf(&ev.digit.to_string());
                    }
                }
                // No prompt, no recording of its own, no marks.
                MediaOutput::PromptFinished | MediaOutput::Record { .. } | MediaOutput::Mark(_) => {
                }
            }
        }
        progress
    }

    /// A bridge transfer step: the caller's CDR and the agent, like a blind one.
    fn bridge_update(&mut self, state: TransferState, status: Option<u16>) {
        let Some(t) = &mut self.target else { return };
        if status.is_some() {
            t.status = status;
        }
        let update = TransferUpdate {
            to: t.target.to_string(),
            mode: TransferMode::Bridge,
            state,
            status,
        };
        let mut record = TransferRecord::of(&update);
        record.leg_call_id = t.call_id.clone();
        self.call.note_transfer(record);
        self.transfer_update(update);
    }
}

/// The agent's reason for a leg that was not answered.
fn failure_of(f: DialFailure) -> TransferFailure {
    match f {
        DialFailure::NoAnswer | DialFailure::Cancelled => TransferFailure::NoAnswer,
        DialFailure::Timeout | DialFailure::TransportError => TransferFailure::Timeout,
        DialFailure::Busy(_)
        | DialFailure::AuthFailed(_)
        | DialFailure::Rejected(_)
        | DialFailure::MediaFailed => TransferFailure::TargetFailed,
    }
}

#[cfg(test)]
mod tests {
    //! The bridge transfer in virtual time: the paths real peers rarely take
    //! (the caller gone while the target rings, or before the leg exists) and
    //! the hand-over of a hang-up from one joined leg to the other.
    use super::*;
    use crate::call::bridged::{AgentEvent, AgentPlan, BridgeSetup, RecordingRules};
    use crate::call::outbound::DialSettings;
    use crate::call::{LocalSip, Peer, TransportKind};
    use crate::config::FailurePolicy;
    use crate::sip::message::{NameAddr, Request, Response, Uri, parse_datagram};
    use crate::sip::sdp::Codec;
    use crate::sip::timer::TimerConfig;
    use bytes::Bytes;
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;
    use std::time::SystemTime;

    const SDP: &str = "v=0\r\no=c 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\n\
t=0 0\r\nm=audio 40000 RTP/AVP 0\r\na=rtpmap:0 PCMU/8000\r\n";
    const TARGET_SDP: &str = "v=0\r\no=t 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\n\
t=0 0\r\nm=audio 42000 RTP/AVP 8\r\na=rtpmap:8 PCMA/8000\r\n";
    const CALLER: &str = "127.0.0.1:5070";
    const TRUNK: &str = "127.0.0.1:5080";

    fn peer(addr: &str) -> Peer {
        Peer {
            transport: TransportKind::Udp,
            addr: addr.parse().unwrap(),
            flow: 0,
        }
    }

    fn parse(bytes: &[u8]) -> Message {
        parse_datagram(bytes).expect("our own message parses")
    }

    fn request(text: &str) -> Request {
        match parse_datagram(text.as_bytes()) {
            Ok(Message::Request(r)) => r,
            other => panic!("not a request: {other:?}"),
        }
    }

    fn settings(call_id: &str, rtp_port: u16) -> CallSettings {
        crate::call::test_settings(call_id, rtp_port, vec![Codec::Pcmu, Codec::Pcma])
    }

    /// A Twilio-mode tenant's settings: its pipeline takes 8 kHz µ-law.
    fn mu_law_settings(call_id: &str, rtp_port: u16) -> CallSettings {
        let mut s = settings(call_id, rtp_port);
        s.plan.pipeline_format = crate::call::PipelineFormat::G711 {
            law: crate::media::g711::Law::Mu,
            with_pcm: false,
        };
        s
    }

    /// A confirmed inbound call with a connected agent, the trunk and the
    /// target leg's INVITE as the test sees them.
    struct Sim {
        b: BridgedCall,
        now: Instant,
        rng: ChaCha8Rng,
        /// Our To tag towards the caller.
        tag: String,
        /// Everything the call put out, in order.
        out: Vec<BridgeOutput>,
        /// Target legs given so far.
        legs: u32,
        /// The tenant's call settings (the caller's, and the target leg's).
        make: fn(&str, u16) -> CallSettings,
    }

    impl Sim {
        fn new() -> Sim {
            Sim::with(settings)
        }

        /// [`Sim::new`] with the caller's call settings from `make`.
        fn with(make: fn(&str, u16) -> CallSettings) -> Sim {
            let mut rng = ChaCha8Rng::seed_from_u64(11);
            let now = Instant::now();
            let invite = request(&format!(
                "INVITE sip:+15550001111@127.0.0.1:5060 SIP/2.0\r\n\
Via: SIP/2.0/UDP {CALLER};branch=z9hG4bK-inv;rport\r\n\
Max-Forwards: 70\r\n\
From: <sip:+15551112222@127.0.0.1>;tag=car\r\n\
To: <sip:+15550001111@127.0.0.1>\r\n\
Call-ID: caller-1@127.0.0.1\r\n\
CSeq: 1 INVITE\r\n\
Contact: <sip:carrier@{CALLER}>\r\n\
Content-Type: application/sdp\r\n\
Content-Length: {}\r\n\r\n{SDP}",
                SDP.len()
            ));
            let call = Call::new(
                now,
                SystemTime::UNIX_EPOCH,
                invite,
                peer(CALLER),
                make("caller-1@127.0.0.1", 20_000),
                &mut rng,
            )
            .unwrap();
            let setup = BridgeSetup {
                agent: Some(AgentPlan {
                    policy: FailurePolicy::default(),
                    fallback: None,
                    hold_prompt: None,
                    beside_stt: false,
                    deepgram_only: false,
                    stats_interval: None,
                }),
                recording: RecordingRules::default(),
                transfer: Default::default(),
            };
            let b = BridgedCall::new(call, setup, now, SystemTime::UNIX_EPOCH, &mut rng);
            let mut sim = Sim {
                b,
                now,
                rng,
                tag: String::new(),
                out: Vec::new(),
                legs: 0,
                make,
            };
            sim.input(BridgeInput::Timeout);
            sim.tag = sim
                .sent_to(CALLER)
                .iter()
                .find_map(|m| match m {
                    Message::Response(r) if r.status == 200 => {
                        r.to().ok()?.tag().map(str::to_owned)
                    }
                    _ => None,
                })
                .expect("answered");
            let ack = sim.caller_request("ACK", 1);
            sim.input(BridgeInput::Sip(
                Box::new(Message::Request(ack)),
                peer(CALLER),
            ));
            sim.input(BridgeInput::Agent(AgentEvent::Connected));
            assert!(sim.b.call().is_confirmed());
            sim
        }

        fn input(&mut self, input: BridgeInput) {
            self.b.handle(self.now, input, &mut self.rng);
            while let Some(o) = self.b.poll_output() {
                self.out.push(o);
            }
        }

        /// Runs the call's timers for `ms`.
        fn advance(&mut self, ms: u64) {
            let until = self.now + Duration::from_millis(ms);
            while let Some(t) = self.b.poll_timeout().filter(|&t| t <= until) {
                self.now = t.max(self.now);
                self.input(BridgeInput::Timeout);
            }
            self.now = until;
        }

        /// SIP messages sent to `addr` so far.
        fn sent_to(&self, addr: &str) -> Vec<Message> {
            self.out
                .iter()
                .filter_map(|o| match o {
                    BridgeOutput::Sip(t) if t.dest.addr.to_string() == addr => {
                        Some(parse(&t.bytes))
                    }
                    _ => None,
                })
                .collect()
        }

        /// Requests with `method` sent to `addr` so far.
        fn requests_to(&self, addr: &str, method: &str) -> Vec<Request> {
            self.sent_to(addr)
                .into_iter()
                .filter_map(|m| match m {
                    Message::Request(r) if r.method.as_str() == method => Some(r),
                    _ => None,
                })
                .collect()
        }

        fn caller_request(&self, method: &str, seq: u32) -> Request {
            request(&format!(
                "{method} sip:sipbridge@127.0.0.1:5060 SIP/2.0\r\n\
Via: SIP/2.0/UDP {CALLER};branch=z9hG4bK-{method}-{seq}\r\n\
Max-Forwards: 70\r\n\
From: <sip:+15551112222@127.0.0.1>;tag=car\r\n\
To: <sip:+15550001111@127.0.0.1>;tag={tag}\r\n\
Call-ID: caller-1@127.0.0.1\r\n\
CSeq: {seq} {method}\r\n\
Content-Length: 0\r\n\r\n",
                tag = self.tag,
            ))
        }

        /// The agent asks for a bridge transfer; the owner answers with a leg.
        fn transfer(&mut self, give_leg: bool) {
            self.input(BridgeInput::Agent(AgentEvent::Transfer {
                to: "+15557654321".into(),
                mode: Some("bridge".into()),
            }));
            assert!(
                self.out
                    .iter()
                    .any(|o| matches!(o, BridgeOutput::DialTarget { .. })),
                "the owner is asked for a leg"
            );
            if give_leg {
                self.give_leg();
            }
        }

        fn give_leg(&mut self) {
            self.legs += 1;
            let call_id = format!("leg-{}@sipbridge", self.legs);
            let dial = DialSettings {
                call_id: call_id.clone(),
                tenant: "demo".into(),
                trunk: "people".into(),
                request_uri: Uri::parse(&format!("sip:+15557654321@{TRUNK}")).unwrap(),
                from: NameAddr::parse("<sip:+15551112222@127.0.0.1>").unwrap(),
                to: NameAddr::parse(&format!("<sip:+15557654321@{TRUNK}>")).unwrap(),
                dest: peer(TRUNK),
                local: LocalSip {
                    host: "127.0.0.1".into(),
                    port: 5060,
                },
                media: (self.make)(&call_id, 30_000).media,
                timers: TimerConfig::default(),
                credentials: None,
                answer_timeout: Duration::from_secs(30),
                extra_headers: Vec::new(),
            };
            let leg = OutboundLeg::new(self.now, SystemTime::UNIX_EPOCH, dial, &mut self.rng);
            self.input(BridgeInput::TargetLeg {
                leg: Box::new(leg),
                settings: Box::new((self.make)(&call_id, 30_000)),
            });
        }

        /// The target's answer to our (last) INVITE or CANCEL.
        fn target_responds(&mut self, method: &str, status: u16, sdp: &str) {
            let req = self
                .requests_to(TRUNK, method)
                .pop()
                .unwrap_or_else(|| panic!("no {method} to the target"));
            let mut resp = Response::for_request(&req, status);
            resp.headers.set(
                "To",
                format!("{};tag=target-1", req.headers.get("To").unwrap()),
            );
            if (101..300).contains(&status) {
                resp.headers
                    .push("Contact", format!("<sip:target@{TRUNK}>"));
            }
            if !sdp.is_empty() {
                resp.headers.push("Content-Type", "application/sdp");
                resp.body = Bytes::copy_from_slice(sdp.as_bytes());
            }
            let Message::Response(resp) = parse(&resp.encode()) else {
                unreachable!()
            };
            self.input(BridgeInput::Sip(
                Box::new(Message::Response(resp)),
                peer(TRUNK),
            ));
        }

        fn released(&self) -> Vec<&CallRecord> {
            self.out
                .iter()
                .filter_map(|o| match o {
                    BridgeOutput::TargetReleased { record } => Some(&**record),
                    _ => None,
                })
                .collect()
        }

        fn transfer_results(&self) -> Vec<&'static str> {
            self.out
                .iter()
                .filter_map(|o| match o {
                    BridgeOutput::Event(BridgeEvent::Transfer(u)) => Some(u.state.result()),
                    _ => None,
                })
                .collect()
        }

        fn caller_record(&self) -> Option<&CallRecord> {
            self.out.iter().find_map(|o| match o {
                BridgeOutput::Event(BridgeEvent::Ended { record, .. }) => Some(&**record),
                _ => None,
            })
        }
    }

    #[test]
    fn the_callers_hang_up_while_the_target_rings_cancels_the_leg() {
        let mut sim = Sim::new();
        sim.transfer(true);
        assert_eq!(sim.requests_to(TRUNK, "INVITE").len(), 1);
        sim.target_responds("INVITE", 180, "");
        let bye = sim.caller_request("BYE", 2);
        sim.input(BridgeInput::Sip(
            Box::new(Message::Request(bye)),
            peer(CALLER),
        ));
        assert_eq!(sim.caller_record().unwrap().cause, "caller-bye");
        assert_eq!(sim.requests_to(TRUNK, "CANCEL").len(), 1, "CANCEL at once");
        assert!(sim.released().is_empty(), "released on the 487, not before");
        sim.target_responds("CANCEL", 200, "");
        sim.target_responds("INVITE", 487, "");
        let released = sim.released();
        assert_eq!(released.len(), 1);
        assert_eq!(released[0].result_code, 487);
        assert_eq!(
            released[0]
                .transfer
                .as_ref()
                .unwrap()
                .leg_call_id
                .as_deref(),
            Some("caller-1@127.0.0.1")
        );
        assert_eq!(sim.transfer_results(), ["accepted", "progress", "failed"]);
        let failed = sim.out.iter().rev().find_map(|o| match o {
            BridgeOutput::Event(BridgeEvent::Transfer(u)) => Some(u.state),
            _ => None,
        });
        assert_eq!(
            failed,
            Some(TransferState::Failed(TransferFailure::NotConnected))
        );
        assert!(
            !sim.b.is_done(),
            "the 487's ACK absorbs retransmissions first"
        );
        sim.advance(40_000);
        assert!(sim.b.is_done());
        assert_eq!(sim.released().len(), 1, "released once");
    }

    #[test]
    fn a_leg_that_comes_after_the_caller_left_is_cancelled_and_released() {
        let mut sim = Sim::new();
        sim.transfer(false);
        let bye = sim.caller_request("BYE", 2);
        sim.input(BridgeInput::Sip(
            Box::new(Message::Request(bye)),
            peer(CALLER),
        ));
        assert!(sim.b.call().is_ended());
        assert!(!sim.b.is_done(), "the owner's leg is still to come");
        sim.give_leg();
        // RFC 3261 §9.1: CANCEL only once a provisional came.
        sim.target_responds("INVITE", 100, "");
        sim.target_responds("INVITE", 180, "");
        assert_eq!(sim.requests_to(TRUNK, "CANCEL").len(), 1);
        sim.target_responds("CANCEL", 200, "");
        sim.target_responds("INVITE", 487, "");
        assert_eq!(sim.released().len(), 1);
        assert!(
            sim.transfer_results().is_empty(),
            "never started, nothing to report"
        );
        sim.advance(40_000);
        assert!(sim.b.is_done());
    }

    #[test]
    fn when_the_joined_target_hangs_up_the_caller_gets_bye() {
        let mut sim = Sim::new();
        sim.transfer(true);
        sim.target_responds("INVITE", 180, "");
        sim.target_responds("INVITE", 200, TARGET_SDP);
        assert!(sim.b.is_bridged_to_target());
        assert_eq!(sim.requests_to(TRUNK, "ACK").len(), 1, "the 2xx is ACKed");
        assert_eq!(
            sim.transfer_results(),
            ["accepted", "progress", "completed"]
        );
        // The agent's part is over: its connection closes after `completed`.
        let close = sim
            .out
            .iter()
            .position(|o| matches!(o, BridgeOutput::Pipeline(PipelineOp::Close { .. })))
            .expect("the agent's connection closed");
        let completed = sim
            .out
            .iter()
            .position(|o| {
                matches!(o, BridgeOutput::Pipeline(PipelineOp::Transfer(u))
                    if u.state == TransferState::Completed)
            })
            .expect("the agent told");
        assert!(completed < close);
        // The target's media goes to its SDP address from the target leg's port.
        sim.advance(100);
        assert!(sim.out.iter().any(|o| matches!(o,
            BridgeOutput::TargetRtp { to, .. } if to.to_string() == "127.0.0.1:42000")));
        // The target hangs up.
        let bye = request(&format!(
            "BYE sip:sipbridge@127.0.0.1:5060 SIP/2.0\r\n\
Via: SIP/2.0/UDP {TRUNK};branch=z9hG4bK-target-bye\r\n\
Max-Forwards: 70\r\n\
From: <sip:+15557654321@{TRUNK}>;tag=target-1\r\n\
To: {};tag={}\r\n\
Call-ID: leg-1@sipbridge\r\n\
CSeq: 9 BYE\r\n\
Content-Length: 0\r\n\r\n",
            "<sip:+15551112222@127.0.0.1>",
            sim.requests_to(TRUNK, "INVITE")[0]
                .from()
                .unwrap()
                .tag()
                .unwrap()
        ));
        sim.input(BridgeInput::Sip(
            Box::new(Message::Request(bye)),
            peer(TRUNK),
        ));
        let ok = sim.sent_to(TRUNK).into_iter().any(
            |m| matches!(m, Message::Response(r) if r.status == 200 && r.cseq().unwrap().seq == 9),
        );
        assert!(ok, "the target's BYE answered");
        let released = sim.released();
        assert_eq!(released.len(), 1);
        assert_eq!(released[0].cause, "caller-bye", "the target hung up");
        assert_eq!(sim.requests_to(CALLER, "BYE").len(), 1, "BYE to the caller");
        let record = sim.caller_record().unwrap();
        assert_eq!(record.cause, "bridged-leg-ended");
        let t = record.transfer.as_ref().unwrap();
        assert_eq!(
            (t.result, t.leg_call_id.as_deref()),
            ("completed", Some("leg-1@sipbridge"))
        );
    }

    /// A Twilio-mode tenant (its legs' frames are G.711, no PCM): once
    /// joined, each side's codes reach the other, converted code by code
    /// between the caller's PCMU and the target's PCMA, no resampling.
    #[test]
    fn g711_legs_relay_each_others_codes() {
        let mut sim = Sim::with(mu_law_settings);
        sim.transfer(true);
        sim.target_responds("INVITE", 200, TARGET_SDP);
        assert!(sim.b.is_bridged_to_target());
        let rtp = |seq: u16, pt: u8, payload: &[u8]| {
            let mut p = vec![0x80, pt, 0, 0, 0, 0, 0, 0, 0, 0, 0x12, 0x34];
            p[2..4].copy_from_slice(&seq.to_be_bytes());
            p[4..8].copy_from_slice(&(u32::from(seq) * 160).to_be_bytes());
            p.extend_from_slice(payload);
            Bytes::from(p)
        };
        let caller: Vec<u8> = (0..160u32).map(|i| (i * 7 + 3) as u8).collect();
        let target: Vec<u8> = (0..160u32).map(|i| (i * 11 + 5) as u8).collect();
        sim.out.clear();
        for k in 0u16..20 {
            sim.input(BridgeInput::Rtp {
                from: "127.0.0.1:40000".parse().unwrap(),
                data: rtp(k, 0, &caller),
            });
            sim.input(BridgeInput::TargetRtp {
                from: "127.0.0.1:42000".parse().unwrap(),
                data: rtp(k, 8, &target),
            });
            sim.advance(20);
        }
        let mut to_target = vec![0u8; 160];
        crate::media::g711::transcode(
            crate::media::g711::Law::Mu,
            crate::media::g711::Law::A,
            &caller,
            &mut to_target,
        );
        let mut to_caller = vec![0u8; 160];
        crate::media::g711::transcode(
            crate::media::g711::Law::A,
            crate::media::g711::Law::Mu,
            &target,
            &mut to_caller,
        );
        let (mut at_target, mut at_caller) = (0, 0);
        for o in &sim.out {
            match o {
                BridgeOutput::TargetRtp { bytes, .. } if bytes[12..] == to_target[..] => {
                    at_target += 1;
                }
                BridgeOutput::Rtp { bytes, .. } if bytes[12..] == to_caller[..] => at_caller += 1,
                _ => {}
            }
        }
        assert!(
            at_target >= 15,
            "the caller's codes at the target: {at_target}"
        );
        assert!(
            at_caller >= 15,
            "the target's codes at the caller: {at_caller}"
        );
    }

    #[test]
    fn after_a_busy_target_the_agent_may_transfer_again() {
        let mut sim = Sim::new();
        sim.transfer(true);
        sim.target_responds("INVITE", 486, "");
        assert_eq!(sim.transfer_results(), ["accepted", "failed"]);
        assert_eq!(sim.released().len(), 1);
        sim.transfer(true);
        let dials = sim
            .out
            .iter()
            .filter(|o| matches!(o, BridgeOutput::DialTarget { .. }))
            .count();
        assert_eq!(dials, 2);
        let invites = sim.requests_to(TRUNK, "INVITE");
        assert_eq!(
            invites.last().unwrap().call_id().unwrap(),
            "leg-2@sipbridge"
        );
        sim.target_responds("INVITE", 200, TARGET_SDP);
        assert!(sim.b.is_bridged_to_target());
        assert_eq!(
            sim.transfer_results(),
            ["accepted", "failed", "accepted", "completed"]
        );
    }
}
