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
//!    target as the caller hears it) under the same consent rules;
//! 4. busy, no answer, 4xx–6xx, Timer B: `failed` with the reason and the
//!    status; the agent keeps the caller;
//! 5. once bridged, either side's end ends the other (BYE, cause
//!    `bridged-leg-ended`); the caller's end while the target still rings
//!    cancels the leg.
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
        self.target = Some(TargetLeg {
            target: target.clone(),
            phase: Phase::Preparing,
            leg: None,
            call: None,
            media: None,
            settings: None,
            call_id: None,
            released: false,
            status: None,
        });
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
        self.target.as_ref().is_none_or(TargetLeg::is_finished)
    }

    pub(super) fn target_poll_timeout(&self) -> Option<Instant> {
        self.target.as_ref().and_then(TargetLeg::poll_timeout)
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
    pub(super) fn relay_to_target(&mut self, now: Instant, samples: &[i16]) -> bool {
        let Some(t) = &mut self.target else {
            return false;
        };
        if t.phase != Phase::Bridged {
            return false;
        }
        if let Some(m) = &mut t.media {
            m.push_pipeline_audio(now, samples);
        }
        true
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
            let record = t.leg.as_ref().map(|l| {
                let mut r = l.record().clone();
                r.transfer = Some(TransferRecord {
                    to: t.target.to_string(),
                    mode: TransferMode::Bridge,
                    result: "failed",
                    reason: Some(failure_of(f).as_str()),
                    status: Some(f.status()),
                    leg_call_id: Some(self.call.call_id().to_owned()),
                });
                r
            });
            if let Some(record) = record {
                self.emit(BridgeOutput::TargetReleased {
                    record: Box::new(record),
                });
            }
        }
        if was_dialing {
            self.bridge_update(TransferState::Failed(failure_of(f)), Some(f.status()));
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
        record.transfer = Some(TransferRecord {
            to: t.target.to_string(),
            mode: TransferMode::Bridge,
            result: "completed",
            reason: None,
            status: t.status,
            leg_call_id: Some(caller_id),
        });
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
                        m.push_pipeline_audio(now, &frame.samples);
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
