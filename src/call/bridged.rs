//! One call, one place: [`BridgedCall`] owns a call's signalling ([`Call`]),
//! its media session, its pipeline supervisor, its recording control and the
//! consent rules, and joins them. Sans-IO like its parts (quinn-proto's
//! `Connection`): the owner feeds it [`BridgeInput`]s at given instants and
//! does what [`BridgedCall::poll_output`] says — SIP and RTP to send,
//! pipeline and store operations, events to log — and wakes it at
//! [`BridgedCall::poll_timeout`]. Nothing here reads a clock or draws its own
//! randomness, so the privacy rules are tested in virtual time (`tests/sim`):
//!
//! - no caller audio reaches the pipeline before the disclosure prompt has
//!   finished (the media session gates it; the pipeline link starts only
//!   once the call is confirmed);
//! - the recording opens only once the call is confirmed (ACK, or the
//!   caller's first RTP from the SDP address) — with the media, so it begins
//!   with the disclosure; with early media (the prompt in the 183) at the
//!   confirmation: a source that ignores our answers gets nothing recorded;
//! - the tenant's opt-out key stops the recording within the frame that
//!   carried it: no [`StoreOp::Audio`] follows [`StoreOp::OptedOut`];
//! - while the recording is paused (PCI: the agent's `pause_recording` or
//!   the admin API), the recording gets silence of the same length, the
//!   transcribing stream gets silence (nothing to transcribe), the store
//!   keeps no transcript, and keys reach the agent as `*` unless the tenant
//!   allows them; the CDR lists each paused stretch.
//!
//! Wall-clock times (consent events, the recording's creation) are derived
//! from the instants passed in and the wall time given at creation.

use super::supervisor::{
    ConnectionFailure, ConnectionState, FALLBACK_MARK, FailureAction, GiveUpReason,
    PipelineSummary, PipelineSupervisor, SupervisorOutput,
};
use super::transfer::{
    TransferFailure, TransferMode, TransferState, TransferTarget, TransferUpdate,
};
use super::{
    Call, CallEvent, CallOutput, CallRecord, HangupCause, HoldAudio, MediaOutput, MediaSession,
    PcmFrame, Peer, PipelineAudio, QualitySummary, RecordingStatus, RtpSummary, Transmit,
};
use crate::config::{AwayAudio, FailurePolicy};
use crate::sip::message::Message;
use crate::sip::sdp::Negotiated;
use bytes::Bytes;
use rand::RngCore;
use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

mod target;

/// Caller frames held while the agent reconnects: one pipeline handle
/// queue's worth (the oldest go first).
pub const BACKLOG_FRAMES: usize = 50;

/// A tenant's fallback prompt as PCM at its pipeline rate, ready to queue.
#[derive(Debug)]
pub struct FallbackAudio {
    /// Samples at the tenant's pipeline rate.
    pub pcm: Vec<i16>,
    /// How long it plays.
    pub duration: Duration,
}

/// How a call uses a network pipeline (none for the echo pipeline).
#[derive(Debug, Clone)]
pub struct AgentPlan {
    /// The tenant's failure policy.
    pub policy: FailurePolicy,
    /// The fallback prompt, if the tenant has one.
    pub fallback: Option<Arc<FallbackAudio>>,
    /// The hold prompt, loaded, when the policy's `away_audio` is one.
    pub hold_prompt: Option<Arc<crate::media::prompt::Prompt>>,
    /// A Deepgram stream runs beside the agent for the whole call: it gets
    /// every caller frame, whatever happens to the agent's connections.
    pub beside_stt: bool,
    /// The pipeline is Deepgram alone: its stream is closed (not dropped)
    /// when the call ends, so its last transcripts arrive.
    pub deepgram_only: bool,
    /// Send the agent the call's quality figures this often while its
    /// connection is open ([`PipelineOp::Stats`]); `None`: never.
    pub stats_interval: Option<Duration>,
}

/// What the tenant's recording and consent rules are for this call.
#[derive(Debug, Clone, Copy, Default)]
pub struct RecordingRules {
    /// The tenant records calls.
    pub record: bool,
    /// The DTMF key that opts the caller out of recording and transcripts.
    pub opt_out_key: Option<char>,
    /// Keys pressed during a recording pause reach the agent as they are
    /// (otherwise as `*`).
    pub paused_dtmf_to_agent: bool,
}

/// Everything a bridged call starts from.
#[derive(Debug)]
pub struct BridgeSetup {
    /// The call's network pipeline, if not echo.
    pub agent: Option<AgentPlan>,
    /// Recording and consent.
    pub recording: RecordingRules,
    /// Transfers.
    pub transfer: TransferRules,
}

/// How a tenant's transfers may go.
#[derive(Debug, Clone, Copy, Default)]
pub struct TransferRules {
    /// A blind transfer the caller's side refuses (REFER answered 4xx–6xx)
    /// is tried again as a bridge transfer (`transfer_fallback = "bridge"`).
    pub fallback_bridge: bool,
}

/// What the agent's connection (or the pipeline task) reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AgentEvent {
    /// The connection is up.
    Connected,
    /// The connection attempt or the connection failed; its task has ended.
    Failed(ConnectionFailure),
    /// The agent asked to end the call.
    HangUp,
    /// Audio to play after what is queued (PCM at the pipeline rate, or
    /// 8 kHz G.711).
    Play(PipelineAudio),
    /// A mark after the audio queued so far.
    Mark(String),
    /// Barge-in: drop the queued audio.
    Clear,
    /// Pause (`true`) or resume (`false`) the recording and the transcript.
    PauseRecording(bool),
    /// Keys to send to the caller's side (an IVR), after the audio queued.
    SendDtmf(String),
    /// Transfer the caller: `to` as the agent wrote it, `mode` (`blind`
    /// when the agent gave none).
    Transfer {
        /// A `sip:`/`sips:` URI, `tel:` number or bare E.164 number.
        to: String,
        /// `blind` or `bridge`.
        mode: Option<String>,
    },
}

/// One input to a bridged call.
#[derive(Debug)]
pub enum BridgeInput {
    /// A SIP message routed to this call, and where it came from.
    Sip(Box<Message>, Peer),
    /// A datagram on the call's RTP port.
    Rtp {
        /// Its source.
        from: SocketAddr,
        /// Its bytes.
        data: Bytes,
    },
    /// A datagram on the call's RTCP port.
    Rtcp(Bytes),
    /// From the agent's connection.
    Agent(AgentEvent),
    /// End the call (admin, agent API, shutdown).
    HangUp(HangupCause),
    /// Pause (`true`) or resume (`false`) the recording and the transcript
    /// (the admin API).
    PauseRecording(bool),
    /// The instant of [`BridgedCall::poll_timeout`] has come.
    Timeout,
    /// The owner's answer to [`BridgeOutput::DialTarget`]: the transfer
    /// target's leg, its INVITE queued, and the settings of its call once
    /// answered.
    TargetLeg {
        /// The leg.
        leg: Box<super::outbound::OutboundLeg>,
        /// The answered call's settings.
        settings: Box<super::CallSettings>,
    },
    /// The owner's answer to [`BridgeOutput::DialTarget`]: no leg (no
    /// transfer trunk, a limit reached); the status says why (403, 429, 503).
    TargetUnavailable(u16),
    /// A datagram on the target leg's RTP port.
    TargetRtp {
        /// Its source.
        from: SocketAddr,
        /// Its bytes.
        data: Bytes,
    },
    /// A datagram on the target leg's RTCP port.
    TargetRtcp(Bytes),
}

/// What to do with the call's network pipeline.
#[derive(Debug, Clone, PartialEq)]
pub enum PipelineOp {
    /// The pipeline starts (the call is confirmed): open the streams that
    /// live for the whole call (Deepgram beside an agent).
    Open,
    /// Open a connection to the agent (`attempt` 0 first, then reconnects),
    /// replacing any previous one, and send it `backlog` first.
    Connect {
        /// 0 for the first connection.
        attempt: u32,
        /// Caller frames held while reconnecting, oldest first.
        backlog: Vec<PcmFrame>,
    },
    /// Drop the agent's connection.
    Disconnect,
    /// A caller frame: to the stream beside the agent, and to the agent when
    /// `to_agent`.
    Audio {
        /// The frame (silence for a Deepgram-only pipeline while paused).
        frame: PcmFrame,
        /// The agent's connection is open and gets it.
        to_agent: bool,
        /// The recording is paused: the stream beside the agent gets
        /// silence of the same length instead.
        stt_silence: bool,
    },
    /// A key the caller pressed, for the agent.
    Dtmf(char),
    /// A mark the agent set has played out (or was cleared).
    Mark {
        /// Its name.
        name: String,
        /// Cleared by barge-in rather than played.
        cleared: bool,
    },
    /// The call's quality so far (cumulative since the media started), for
    /// the agent's connection: every `stats_interval` while it is open.
    Stats {
        /// Media time since the call's media started.
        media_time: Duration,
        /// The figures.
        quality: Box<super::QualitySummary>,
    },
    /// A step of a transfer the agent asked for, for the agent's
    /// connection (a `transfer` event).
    Transfer(TransferUpdate),
    /// The call ended: close the streams (`deepgram_only`: close it so its
    /// last transcripts still come; an agent connection is just dropped).
    Close {
        /// The pipeline is Deepgram alone.
        deepgram_only: bool,
    },
}

/// The consent trail of a call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Consent {
    /// The disclosure prompt started playing.
    DisclosureStarted,
    /// The disclosure prompt played to its end.
    DisclosureFinished,
}

/// What to write to the store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreOp {
    /// Open the call's recording now (encrypted; it begins with the prompt).
    StartRecording(SystemTime),
    /// A consent event at a time.
    Consent(Consent, SystemTime),
    /// One 20 ms tick of the recording: caller left, what we sent right.
    Audio {
        /// The caller.
        left: Vec<i16>,
        /// What we sent.
        right: Vec<i16>,
    },
    /// The caller pressed the opt-out key: discard the recording, stop
    /// storing transcripts, audit the opt-out.
    OptedOut(SystemTime),
    /// The recording and the transcript are paused (`true`) or resumed.
    Paused(bool, SystemTime),
}

/// Something that happened, for the owner to log or count.
pub enum BridgeEvent {
    /// 183 with SDP sent; media started before the answer.
    EarlyMedia(Negotiated),
    /// 200 OK sent.
    Answered(Negotiated),
    /// ACK (or the caller's RTP) confirmed the call: recording and the
    /// pipeline start now.
    Confirmed,
    /// Re-negotiated media (hold, unhold, new address).
    MediaChanged(Negotiated),
    /// No media could be set up: the call is hung up.
    MediaFailed(String),
    /// The disclosure prompt finished.
    PromptFinished,
    /// A DTMF key.
    Dtmf {
        /// The key.
        digit: char,
        /// How long it was held.
        duration_ms: u32,
    },
    /// The caller opted out: recording discarded and stopped.
    OptedOut,
    /// The recording was paused (`true`) or resumed.
    Paused(bool),
    /// A mark played out.
    MarkPlayed {
        /// Its name.
        name: String,
        /// Cleared by barge-in.
        cleared: bool,
    },
    /// Reconnecting to the agent, holding this many caller frames.
    Reconnecting {
        /// The attempt (1 = first reconnect).
        attempt: u32,
        /// Frames held for the new connection.
        held: usize,
    },
    /// The supervisor gave up on the pipeline.
    GaveUp {
        /// Why.
        reason: GiveUpReason,
        /// What the tenant's policy does now.
        action: FailureAction,
    },
    /// The fallback prompt was queued, this many samples short (queue full).
    FallbackTruncated(usize),
    /// The fallback prompt has played.
    FallbackPlayed,
    /// Hanging up after the pipeline failure (fallback done).
    HangingUpAfterFailure,
    /// The agent asked to hang up.
    AgentHangUp,
    /// Agent audio dropped: the playout queue was full.
    PlayoutFull(usize),
    /// An agent mark could not be queued.
    MarkDropped(String),
    /// Keys the agent asked to send were refused (why; never the keys).
    DtmfRefused(String),
    /// A step of a transfer the agent asked for (the call's event stream:
    /// `transfer.*` webhooks hook here).
    Transfer(TransferUpdate),
    /// The call is over for the user. The media session's last state goes
    /// with it (for the final counters); the owner closes the sockets, the
    /// CDR is final once the pipeline's own dropped frames are added.
    Ended {
        /// The CDR.
        record: Box<CallRecord>,
        /// The media session as it ended.
        media: Option<Box<MediaSession>>,
    },
}

/// One output of a bridged call.
pub enum BridgeOutput {
    /// SIP to send.
    Sip(Transmit),
    /// An RTP packet to send from the call's RTP port.
    Rtp {
        /// Destination.
        to: SocketAddr,
        /// The packet.
        bytes: Bytes,
    },
    /// An RTCP packet to send from the call's RTCP port.
    Rtcp {
        /// Destination.
        to: SocketAddr,
        /// The packet.
        bytes: Bytes,
    },
    /// For the pipeline.
    Pipeline(PipelineOp),
    /// For the store.
    Store(StoreOp),
    /// To log or count.
    Event(BridgeEvent),
    /// A bridge transfer: dial `target` through the tenant's transfer trunk
    /// and answer with [`BridgeInput::TargetLeg`] or
    /// [`BridgeInput::TargetUnavailable`].
    DialTarget {
        /// Whom to call.
        target: TransferTarget,
    },
    /// An RTP packet to send from the target leg's RTP port.
    TargetRtp {
        /// Destination.
        to: SocketAddr,
        /// The packet.
        bytes: Bytes,
    },
    /// An RTCP packet to send from the target leg's RTCP port.
    TargetRtcp {
        /// Destination.
        to: SocketAddr,
        /// The packet.
        bytes: Bytes,
    },
    /// The target leg is over for the user: log and store its CDR, give
    /// back its slot and port (its transactions may still linger here).
    TargetReleased {
        /// The leg's CDR.
        record: Box<CallRecord>,
    },
}

/// The pipeline side of a live call: the supervisor and what the
/// connections need that outlives each of them.
#[derive(Debug)]
struct Link {
    supervisor: PipelineSupervisor,
    fallback: Option<Arc<FallbackAudio>>,
    beside_stt: bool,
    deepgram_only: bool,
    /// An agent connection is open (between `Connect` and its end).
    connected: bool,
    /// Caller frames held between a loss and the next attempt.
    backlog: VecDeque<PcmFrame>,
    /// Frames dropped from the backlog.
    dropped: u64,
    /// What the caller hears while the agent is away (`None`: silence).
    away_audio: Option<HoldAudio>,
    /// How often the agent gets a `stats` event, if at all.
    stats_interval: Option<Duration>,
    /// When the next one is due (while a connection is open).
    next_stats: Option<Instant>,
}

/// A call with everything joined to it. See the module docs.
pub struct BridgedCall {
    call: Call,
    media: Option<MediaSession>,
    rules: RecordingRules,
    /// The recording is open (until the call ends or the caller opts out).
    recording: bool,
    /// A recording was opened at some point (for the CDR's `recording`).
    recording_opened: bool,
    opted_out: bool,
    /// The recording is paused since this wall time.
    paused_since: Option<SystemTime>,
    paused: Vec<crate::call::PausedStretch>,
    /// The agent plan, until the call is confirmed and the link starts.
    agent: Option<AgentPlan>,
    link: Option<Link>,
    /// Answered (200 sent) but not yet confirmed.
    awaiting_ack: Option<Negotiated>,
    /// The packet that confirmed the call before the ACK: fed to the media
    /// session once that has started, so none of the caller's audio is lost.
    confirming_rtp: Option<(Instant, SocketAddr, Bytes)>,
    shutting_down: bool,
    /// The tenant's transfer rules.
    transfer_rules: TransferRules,
    /// The bridge transfer's second leg (boxed: ~18 KB that most calls
    /// never use).
    target: Option<Box<target::TargetLeg>>,
    /// The agent link's summary, once a bridge transfer closed it.
    closed_link: Option<PipelineSummary>,
    /// The agent's audio last arrived then.
    last_agent_play: Option<Instant>,
    out: VecDeque<BridgeOutput>,
    t0: Instant,
    wall0: SystemTime,
}

impl std::fmt::Debug for BridgedCall {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BridgedCall")
            .field("call_id", &self.call.call_id())
            .field("media", &self.media.is_some())
            .field("recording", &self.recording)
            .field("opted_out", &self.opted_out)
            .field("pipeline", &self.pipeline_state())
            .finish_non_exhaustive()
    }
}

impl BridgedCall {
    /// Joins a new call (already accepted by the switchboard) to its plan;
    /// what the call has to say at once (100/180, an immediate 200) is queued.
    pub fn new(
        call: Call,
        setup: BridgeSetup,
        now: Instant,
        wall: SystemTime,
        rng: &mut impl RngCore,
    ) -> BridgedCall {
        let mut bridged = BridgedCall {
            call,
            media: None,
            rules: setup.recording,
            recording: false,
            recording_opened: false,
            opted_out: false,
            paused_since: None,
            paused: Vec::new(),
            agent: setup.agent,
            link: None,
            awaiting_ack: None,
            confirming_rtp: None,
            shutting_down: false,
            transfer_rules: setup.transfer,
            target: None,
            closed_link: None,
            last_agent_play: None,
            out: VecDeque::new(),
            t0: now,
            wall0: wall,
        };
        bridged.drive(now, rng);
        bridged
    }

    /// The signalling side.
    pub fn call(&self) -> &Call {
        &self.call
    }

    /// The media session, while the call has one.
    pub fn media(&self) -> Option<&MediaSession> {
        self.media.as_ref()
    }

    /// The caller opted out of recording.
    pub fn opted_out(&self) -> bool {
        self.opted_out
    }

    /// Whether the call was recorded, as far as the call knows (the store
    /// may still have failed to write it).
    fn recording_status(&self) -> RecordingStatus {
        if self.opted_out {
            RecordingStatus::OptedOut
        } else if self.recording_opened {
            RecordingStatus::Recorded
        } else if self.call.settings().store_unavailable {
            RecordingStatus::NotRecorded
        } else if self.rules.record {
            RecordingStatus::NotStarted
        } else {
            RecordingStatus::Off
        }
    }

    /// The pipeline supervisor's state, once the pipeline has started.
    pub fn pipeline_state(&self) -> Option<ConnectionState> {
        self.link.as_ref().map(|l| l.supervisor.state())
    }

    /// The task can end: the call is finished, or (shutting down) ended with
    /// its BYE answered or timed out — lingering retransmission absorbers are
    /// not waited for then.
    pub fn is_done(&self) -> bool {
        (self.call.is_finished()
            || (self.shutting_down && self.call.is_ended() && !self.call.bye_pending()))
            && self.target_finished()
    }

    /// The caller's call may be compacted to what answers its
    /// retransmissions ([`Call::compact`]): nothing else needs the task.
    pub fn can_compact(&self) -> bool {
        self.target_finished()
    }

    /// The next output, if any.
    pub fn poll_output(&mut self) -> Option<BridgeOutput> {
        self.out.pop_front()
    }

    /// When to call [`BridgedCall::handle`] with [`BridgeInput::Timeout`].
    pub fn poll_timeout(&self) -> Option<Instant> {
        [
            self.call.poll_timeout(),
            self.media.as_ref().map(MediaSession::poll_timeout),
            self.link.as_ref().and_then(|l| l.supervisor.poll_timeout()),
            self.link.as_ref().and_then(|l| l.next_stats),
            self.target_poll_timeout(),
        ]
        .into_iter()
        .flatten()
        .min()
    }

    /// Feeds one input at `now`; the outputs it causes are queued.
    pub fn handle(&mut self, now: Instant, input: BridgeInput, rng: &mut impl RngCore) {
        match input {
            BridgeInput::Sip(msg, from) => match self.target_sip(now, *msg, from, rng) {
                Some(Message::Request(req)) => self.call.handle_request_from(now, req, from, rng),
                Some(Message::Response(resp)) => self.call.handle_response(now, resp, rng),
                None => {}
            },
            input @ (BridgeInput::TargetLeg { .. }
            | BridgeInput::TargetUnavailable(_)
            | BridgeInput::TargetRtp { .. }
            | BridgeInput::TargetRtcp(_)) => self.target_input(now, input, rng),
            BridgeInput::Rtp { from, data } => {
                if self.media.is_none()
                    && self.confirming_rtp.is_none()
                    && self
                        .awaiting_ack
                        .as_ref()
                        .is_some_and(|n| n.remote_rtp == Some(from))
                {
                    self.confirming_rtp = Some((now, from, data.clone()));
                }
                if let Some(m) = &mut self.media
                    && m.on_rtp(now, from, data)
                {
                    self.call.media_activity(now);
                }
            }
            BridgeInput::Rtcp(data) => {
                if let Some(m) = &mut self.media {
                    m.on_rtcp(now, &data);
                }
            }
            BridgeInput::Agent(ev) => self.agent_event(now, ev, rng),
            BridgeInput::HangUp(cause) => {
                self.shutting_down |= cause == HangupCause::Shutdown;
                self.call.hang_up(now, cause, rng);
            }
            BridgeInput::PauseRecording(pause) => self.pause_recording(now, pause),
            BridgeInput::Timeout => {
                self.call.handle_timeout(now, rng);
                let wall = self.wall(now);
                if let Some(m) = &mut self.media {
                    m.handle_timeout(now, wall, rng);
                }
                if let Some(l) = &mut self.link {
                    l.supervisor.handle_timeout(now, rng);
                }
                self.target_timeout(now, rng);
            }
        }
        self.drive(now, rng);
    }

    /// The recording is paused.
    pub fn is_paused(&self) -> bool {
        self.paused_since.is_some()
    }

    /// Pauses or resumes the recording and the transcript; a repeated
    /// request changes nothing. Ignored once the call has ended.
    fn pause_recording(&mut self, now: Instant, pause: bool) {
        if self.call.is_ended() || pause == self.paused_since.is_some() {
            return;
        }
        let wall = self.wall(now);
        if pause {
            self.paused_since = Some(wall);
        } else {
            self.end_pause(wall);
        }
        self.emit(BridgeOutput::Store(StoreOp::Paused(pause, wall)));
        self.event(BridgeEvent::Paused(pause));
    }

    /// Closes the open pause, if any, as a stretch for the CDR.
    fn end_pause(&mut self, at: SystemTime) {
        if let Some(from) = self.paused_since.take() {
            self.paused.push(crate::call::PausedStretch {
                paused_at: from,
                resumed_at: at,
            });
        }
    }

    fn wall(&self, now: Instant) -> SystemTime {
        self.wall0 + now.saturating_duration_since(self.t0)
    }

    fn emit(&mut self, o: BridgeOutput) {
        self.out.push_back(o);
    }

    fn event(&mut self, e: BridgeEvent) {
        self.out.push_back(BridgeOutput::Event(e));
    }

    /// Joins the parts until none has anything more to say.
    fn drive(&mut self, now: Instant, rng: &mut impl RngCore) {
        // Each pass can only start things once (media, the link), so a few
        // passes reach the fixed point; the bound is a guard, not a budget.
        for _ in 0..8 {
            let before = self.out.len();
            let mut progress = self.confirm(now, rng);
            progress |= self.media_outputs(now);
            progress |= self.supervisor_outputs(now, rng);
            progress |= self.call_outputs(now, rng);
            progress |= self.target_outputs(now, rng);
            if !progress && self.out.len() == before {
                break;
            }
        }
        self.stats_due(now);
        self.fill_while_away();
    }

    /// Every `stats_interval` of an open agent connection (counted from its
    /// opening), the call's quality figures go to the agent.
    fn stats_due(&mut self, now: Instant) {
        let (Some(l), Some(m)) = (&mut self.link, &self.media) else {
            return;
        };
        let Some(every) = l.stats_interval else {
            return;
        };
        if !l.connected || self.call.is_ended() {
            l.next_stats = None;
            return;
        }
        match l.next_stats {
            None => l.next_stats = Some(now + every),
            Some(due) if now >= due => {
                let next = due + every;
                l.next_stats = Some(if next > now { next } else { now + every });
                self.out
                    .push_back(BridgeOutput::Pipeline(PipelineOp::Stats {
                        media_time: m.media_time(now),
                        quality: Box::new(QualitySummary::of(m)),
                    }));
            }
            Some(_) => {}
        }
    }

    /// While the agent is away (its connection being made or re-made, not
    /// given up), the caller's silence is filled with comfort noise or the
    /// hold prompt, as the tenant wants: the line is audibly alive, not dead
    /// air. The prompt and any agent audio still queued play first.
    fn fill_while_away(&mut self) {
        let (Some(m), Some(l)) = (&mut self.media, &self.link) else {
            return;
        };
        let away = !l.deepgram_only
            && matches!(
                l.supervisor.state(),
                ConnectionState::Connecting { .. } | ConnectionState::Reconnecting { .. }
            );
        m.set_hold_audio(if away { l.away_audio.clone() } else { None });
    }

    /// Answered and now confirmed (ACK, or the caller's RTP from the SDP
    /// address): the recording and the pipeline start.
    fn confirm(&mut self, now: Instant, rng: &mut impl RngCore) -> bool {
        let mut progress = false;
        if self.awaiting_ack.is_some()
            && (self.call.is_confirmed() || self.confirming_rtp.is_some())
            && !self.call.is_ended()
            && let Some(neg) = self.awaiting_ack.take()
        {
            progress = true;
            self.event(BridgeEvent::Confirmed);
            if self.media.is_none() {
                self.start_media(now, &neg, rng);
            }
            // The recording opens now, not with early media: nothing of a
            // call that is never confirmed is recorded.
            self.open_recording(now);
            if let Some(m) = &self.media
                && let Some(plan) = self.agent.take()
            {
                let mut supervisor = PipelineSupervisor::new(
                    &plan.policy,
                    plan.fallback.as_ref().map(|f| f.duration),
                );
                if m.prompt_done() {
                    supervisor.prompt_finished(now);
                }
                supervisor.start(now);
                self.link = Some(Link {
                    supervisor,
                    fallback: plan.fallback,
                    beside_stt: plan.beside_stt,
                    deepgram_only: plan.deepgram_only,
                    connected: false,
                    backlog: VecDeque::new(),
                    dropped: 0,
                    away_audio: match &plan.policy.away_audio {
                        AwayAudio::Silence => None,
                        AwayAudio::HoldPrompt(_) if plan.hold_prompt.is_some() => {
                            plan.hold_prompt.clone().map(HoldAudio::Prompt)
                        }
                        _ => Some(HoldAudio::ComfortNoise),
                    },
                    stats_interval: plan.stats_interval,
                    next_stats: None,
                });
                self.emit(BridgeOutput::Pipeline(PipelineOp::Open));
            }
        }
        if let Some(m) = &mut self.media
            && let Some((at, from, data)) = self.confirming_rtp.take()
        {
            progress = true;
            if m.on_rtp(at, from, data) {
                self.call.media_activity(at);
            }
        }
        progress
    }

    /// The recording opens (the tenant records, the caller has not opted
    /// out, the call is confirmed and has media). Without early media this is
    /// the moment the media starts, so the recording begins with the
    /// disclosure; with early media the disclosure has played in the 183
    /// before the answer, and the recording begins at the confirmation.
    fn open_recording(&mut self, now: Instant) {
        if self.rules.record && !self.opted_out && !self.recording && self.media.is_some() {
            self.recording = true;
            self.recording_opened = true;
            let wall = self.wall(now);
            self.emit(BridgeOutput::Store(StoreOp::StartRecording(wall)));
        }
    }

    /// Starts the media (the prompt plays first).
    fn start_media(&mut self, now: Instant, neg: &Negotiated, rng: &mut impl RngCore) {
        let plan = self.call.settings().plan.clone();
        let has_prompt = plan.prompt.is_some();
        match MediaSession::new(now, neg, plan, rng) {
            Ok(m) => {
                self.media = Some(m);
                let wall = self.wall(now);
                if has_prompt {
                    self.emit(BridgeOutput::Store(StoreOp::Consent(
                        Consent::DisclosureStarted,
                        wall,
                    )));
                }
            }
            Err(e) => {
                self.event(BridgeEvent::MediaFailed(e.to_string()));
                self.call.hang_up(now, HangupCause::MediaFailed, rng);
            }
        }
    }

    fn media_outputs(&mut self, now: Instant) -> bool {
        let mut progress = false;
        while let Some(o) = self.media.as_mut().and_then(MediaSession::poll_output) {
            progress = true;
            match o {
                MediaOutput::Rtp { to, bytes } => self.emit(BridgeOutput::Rtp { to, bytes }),
                MediaOutput::Rtcp { to, bytes } => self.emit(BridgeOutput::Rtcp { to, bytes }),
                MediaOutput::CallerAudio(frame) => {
                    if !self.relay_to_target(now, frame.audio()) {
                        self.caller_audio(frame);
                    }
                }
                MediaOutput::Dtmf(ev) => {
                    self.event(BridgeEvent::Dtmf {
                        digit: ev.digit,
                        duration_ms: ev.duration_ms,
                    });
                    if !self.opted_out && self.rules.opt_out_key == Some(ev.digit) {
                        // Within the frame that carried the key: the tap stops
                        // before the media session's next tick.
                        self.opted_out = true;
                        self.recording = false;
                        if let Some(m) = &mut self.media {
                            m.stop_recording();
                        }
                        let wall = self.wall(now);
                        self.emit(BridgeOutput::Store(StoreOp::OptedOut(wall)));
                        self.event(BridgeEvent::OptedOut);
                    }
                    self.dtmf_to_target(ev.digit);
                    if self.link.as_ref().is_some_and(|l| l.connected) {
                        let digit =
                            if self.paused_since.is_some() && !self.rules.paused_dtmf_to_agent {
                                '*'
                            } else {
                                ev.digit
                            };
                        self.emit(BridgeOutput::Pipeline(PipelineOp::Dtmf(digit)));
                    }
                }
                MediaOutput::PromptFinished => {
                    self.event(BridgeEvent::PromptFinished);
                    let wall = self.wall(now);
                    self.emit(BridgeOutput::Store(StoreOp::Consent(
                        Consent::DisclosureFinished,
                        wall,
                    )));
                    self.call.prompt_finished(now);
                    if let Some(l) = &mut self.link {
                        l.supervisor.prompt_finished(now);
                    }
                }
                MediaOutput::Record { left, right } => {
                    if self.recording && !self.opted_out {
                        let (left, right) = if self.paused_since.is_some() {
                            (vec![0; left.len()], vec![0; right.len()])
                        } else {
                            (left, right)
                        };
                        self.emit(BridgeOutput::Store(StoreOp::Audio { left, right }));
                    }
                }
                MediaOutput::Mark(mark) => {
                    self.event(BridgeEvent::MarkPlayed {
                        name: mark.name.clone(),
                        cleared: mark.cleared,
                    });
                    let Some(l) = &mut self.link else { continue };
                    if l.connected {
                        self.emit(BridgeOutput::Pipeline(PipelineOp::Mark {
                            name: mark.name,
                            cleared: mark.cleared,
                        }));
                    } else if mark.name == FALLBACK_MARK && !mark.cleared {
                        l.supervisor.fallback_played(now);
                        self.event(BridgeEvent::FallbackPlayed);
                    }
                }
            }
        }
        progress
    }

    /// A caller frame (the media session sends none before the prompt has
    /// finished): to the streams that are open, or held while reconnecting.
    fn caller_audio(&mut self, mut frame: PcmFrame) {
        let Some(l) = &mut self.link else { return };
        let to_agent = l.connected;
        let stt_silence = self.paused_since.is_some();
        if stt_silence && l.deepgram_only {
            frame.samples.fill(0);
        }
        if !to_agent && matches!(l.supervisor.state(), ConnectionState::Reconnecting { .. }) {
            if l.backlog.len() >= BACKLOG_FRAMES {
                l.backlog.pop_front();
                l.dropped += 1;
            }
            l.backlog.push_back(frame.clone());
        }
        if to_agent || l.beside_stt {
            self.emit(BridgeOutput::Pipeline(PipelineOp::Audio {
                frame,
                to_agent,
                stt_silence,
            }));
        }
    }

    /// Does what the pipeline supervisor asks: (re)connect, drop the
    /// connection, give up per the tenant's policy, hang up after the fallback.
    fn supervisor_outputs(&mut self, now: Instant, rng: &mut impl RngCore) -> bool {
        let mut progress = false;
        while let Some(o) = self.link.as_mut().and_then(|l| l.supervisor.poll_output()) {
            progress = true;
            let Some(l) = &mut self.link else { break };
            match o {
                SupervisorOutput::Connect { attempt } => {
                    l.connected = true;
                    let backlog: Vec<PcmFrame> = l.backlog.drain(..).collect();
                    if attempt > 0 {
                        let held = backlog.len();
                        self.event(BridgeEvent::Reconnecting { attempt, held });
                    }
                    self.emit(BridgeOutput::Pipeline(PipelineOp::Connect {
                        attempt,
                        backlog,
                    }));
                }
                SupervisorOutput::Disconnect => {
                    l.connected = false;
                    self.emit(BridgeOutput::Pipeline(PipelineOp::Disconnect));
                }
                SupervisorOutput::GaveUp { reason, action } => {
                    l.connected = false;
                    l.dropped += l.backlog.len() as u64;
                    l.backlog.clear();
                    let fallback = l.fallback.clone();
                    self.emit(BridgeOutput::Pipeline(PipelineOp::Disconnect));
                    self.event(BridgeEvent::GaveUp { reason, action });
                    match action {
                        FailureAction::Continue => {}
                        FailureAction::HangUp => {
                            self.call.hang_up(now, HangupCause::PipelineFailed, rng);
                        }
                        FailureAction::PlayFallback => self.play_fallback(now, fallback),
                    }
                }
                SupervisorOutput::HangUp => {
                    self.event(BridgeEvent::HangingUpAfterFailure);
                    self.call.hang_up(now, HangupCause::PipelineFailed, rng);
                }
            }
        }
        progress
    }

    fn play_fallback(&mut self, now: Instant, fallback: Option<Arc<FallbackAudio>>) {
        match (self.media.as_mut(), fallback) {
            (Some(m), Some(f)) => {
                m.clear();
                let queued = m.push_pipeline_audio(now, &f.pcm);
                let marked = m.mark(now, FALLBACK_MARK.to_owned()).is_ok();
                if queued < f.pcm.len() {
                    self.event(BridgeEvent::FallbackTruncated(f.pcm.len() - queued));
                }
                if !marked {
                    // No mark will come: the supervisor's bound hangs up.
                    self.event(BridgeEvent::MarkDropped(FALLBACK_MARK.to_owned()));
                }
            }
            _ => {
                if let Some(l) = &mut self.link {
                    l.supervisor.fallback_played(now);
                }
            }
        }
    }

    fn agent_event(&mut self, now: Instant, ev: AgentEvent, rng: &mut impl RngCore) {
        let Some(l) = &mut self.link else { return };
        let out = &mut self.out;
        match ev {
            AgentEvent::Connected => l.supervisor.on_connected(now),
            AgentEvent::Failed(failure) => {
                // The connection's task has ended; the owner drops its handle.
                if l.connected {
                    l.connected = false;
                    out.push_back(BridgeOutput::Pipeline(PipelineOp::Disconnect));
                }
                l.supervisor.on_failed(now, failure, rng);
            }
            AgentEvent::HangUp => {
                out.push_back(BridgeOutput::Event(BridgeEvent::AgentHangUp));
                self.call.hang_up(now, HangupCause::AgentHangup, rng);
            }
            AgentEvent::Play(pcm) => {
                self.last_agent_play = Some(now);
                let Some(m) = &mut self.media else { return };
                l.supervisor.on_agent_output(now);
                let accepted = m.push_pipeline_audio(now, &pcm);
                if accepted < pcm.len() {
                    out.push_back(BridgeOutput::Event(BridgeEvent::PlayoutFull(
                        pcm.len() - accepted,
                    )));
                }
            }
            AgentEvent::Mark(name) => {
                let Some(m) = &mut self.media else { return };
                l.supervisor.on_agent_output(now);
                if m.mark(now, name.clone()).is_err() {
                    out.push_back(BridgeOutput::Event(BridgeEvent::MarkDropped(name)));
                }
            }
            AgentEvent::Clear => {
                if let Some(m) = &mut self.media {
                    m.clear();
                }
            }
            AgentEvent::PauseRecording(pause) => self.pause_recording(now, pause),
            AgentEvent::SendDtmf(keys) => {
                let Some(m) = &mut self.media else { return };
                l.supervisor.on_agent_output(now);
                if let Err(e) = m.send_dtmf(&keys) {
                    // The keys may be a PIN: the reason only.
                    let why = match e {
                        super::media::DtmfOutError::InvalidKey(_) => "not a DTMF key".to_owned(),
                        other => other.to_string(),
                    };
                    out.push_back(BridgeOutput::Event(BridgeEvent::DtmfRefused(why)));
                }
            }
            AgentEvent::Transfer { to, mode } => self.transfer(now, to, mode.as_deref(), rng),
        }
    }

    /// The agent asks for a transfer. Whatever is wrong with the request
    /// (target, mode, a transfer already running, a call not up) comes back
    /// to it at once as a failed `transfer`; the caller stays.
    fn transfer(&mut self, now: Instant, to: String, mode: Option<&str>, rng: &mut impl RngCore) {
        if let Some(l) = &mut self.link {
            l.supervisor.on_agent_output(now);
        }
        let fail = |to: String, mode, why| TransferUpdate {
            to,
            mode,
            state: TransferState::Failed(why),
            status: None,
        };
        let Some(mode) = TransferMode::parse(mode.unwrap_or("blind")) else {
            let u = fail(to, TransferMode::Blind, TransferFailure::InvalidMode);
            self.transfer_update(u);
            return;
        };
        let target = match TransferTarget::parse(&to) {
            Ok(t) => t,
            Err(why) => {
                self.transfer_update(fail(to, mode, why));
                return;
            }
        };
        let result = if self.target_busy() || self.call.transfer_running() {
            Err(TransferFailure::InProgress)
        } else {
            match mode {
                TransferMode::Blind => self.call.refer(now, target.clone(), rng),
                TransferMode::Bridge if !self.call.is_confirmed() || self.call.is_ended() => {
                    Err(TransferFailure::NotConnected)
                }
                TransferMode::Bridge => {
                    self.start_bridge_transfer(target.clone());
                    Ok(())
                }
            }
        };
        if let Err(why) = result {
            self.transfer_update(fail(target.to_string(), mode, why));
        }
    }

    /// A transfer step: to the agent while its connection is open, and to
    /// the call's event stream.
    fn transfer_update(&mut self, u: TransferUpdate) {
        if self.link.as_ref().is_some_and(|l| l.connected) {
            self.emit(BridgeOutput::Pipeline(PipelineOp::Transfer(u.clone())));
        }
        self.event(BridgeEvent::Transfer(u));
    }

    fn call_outputs(&mut self, now: Instant, rng: &mut impl RngCore) -> bool {
        let mut progress = false;
        while let Some(o) = self.call.poll_output() {
            progress = true;
            match o {
                CallOutput::Transmit(t) => self.emit(BridgeOutput::Sip(t)),
                CallOutput::Event(CallEvent::EarlyMedia(neg)) => {
                    self.event(BridgeEvent::EarlyMedia(neg.clone()));
                    self.start_media(now, &neg, rng);
                }
                CallOutput::Event(CallEvent::Answered(neg)) => {
                    self.awaiting_ack = Some(neg.clone());
                    self.event(BridgeEvent::Answered(neg));
                }
                CallOutput::Event(CallEvent::MediaChanged(neg)) => {
                    if let Some(m) = &mut self.media {
                        m.update(&neg);
                    }
                    // On hold (the caller no longer listens) an agent has
                    // nothing to say: no silence timer meanwhile.
                    if let Some(l) = &mut self.link {
                        l.supervisor.set_held(now, !neg.remote_direction.receives());
                    }
                    self.event(BridgeEvent::MediaChanged(neg));
                }
                CallOutput::Event(CallEvent::Transfer(u)) => {
                    let fallback = self.transfer_rules.fallback_bridge
                        && u.mode == TransferMode::Blind
                        && u.state == TransferState::Failed(TransferFailure::Refused)
                        && !self.call.is_ended();
                    let to = u.to.clone();
                    self.transfer_update(u);
                    // The caller's side refused the REFER: the daemon calls
                    // the target itself, as the tenant allows.
                    if fallback && let Ok(target) = TransferTarget::parse(&to) {
                        self.start_bridge_transfer(target);
                    }
                }
                CallOutput::Event(CallEvent::Ended(mut record)) => {
                    let media = self.media.take();
                    if let Some(m) = &media {
                        record.rtp = Some(RtpSummary::of(m));
                        record.quality = Some(QualitySummary::of(m));
                    }
                    self.recording = false;
                    record.recording = self.recording_status();
                    self.end_pause(self.wall(now));
                    record.recording_paused = std::mem::take(&mut self.paused);
                    self.awaiting_ack = None;
                    self.confirming_rtp = None;
                    if let Some(l) = self.link.take() {
                        self.emit(BridgeOutput::Pipeline(PipelineOp::Close {
                            deepgram_only: l.deepgram_only,
                        }));
                        record.pipeline = Some(PipelineSummary {
                            dropped_frames: l.dropped,
                            ..l.supervisor.summary()
                        });
                    } else if let Some(summary) = self.closed_link.take() {
                        record.pipeline = Some(summary);
                    }
                    self.target_caller_ended(now, rng);
                    self.event(BridgeEvent::Ended {
                        record,
                        media: media.map(Box::new),
                    });
                }
            }
        }
        progress
    }
}
