//! The media side of one answered call, sans-IO: RTP in → source check (the
//! SDP address, or one latch behind NAT; see `media::rtp::source`) →
//! jitter buffer (concealment on loss) → 20 ms frames for the pipeline in
//! its format ([`PipelineFormat`]); and out: the disclosure prompt first,
//! then the pipeline's audio, silence in between, paced by a 20 ms send
//! clock that re-phases to each talkspurt; RTCP SR/RR; RFC 4733 DTMF
//! received; the call's quality figures ([`MediaQuality`]).
//!
//! # The pipeline's format
//! The plan says what the pipeline takes ([`MediaPlan::pipeline_format`]):
//! - [`PipelineFormat::Pcm`] (native and Deepgram pipelines, echo): the
//!   caller's G.711 decoded and resampled to the pipeline rate, 16-bit PCM.
//! - [`PipelineFormat::G711`] (a Twilio-mode agent: µ-law; Telnyx PCMU/PCMA):
//!   the caller's codes as they left the jitter buffer, the very bytes when
//!   the laws match (a 20 ms packet's payload is not even copied), else
//!   converted code by code at 8 kHz (A-law ↔ µ-law); concealed frames are
//!   the concealment encoded. No decode, resample or re-encode on the way.
//!   With `with_pcm` the frame also carries PCM at the pipeline rate (a
//!   Deepgram stream beside the agent transcribes it).
//!
//! Whatever the format, the pipeline's audio comes back as
//! [`PipelineAudio`]: PCM at the pipeline rate (resampled and encoded by the
//! playout queue) or G.711 codes, which go into the RTP payload as they are
//! (converted code by code if the caller's law differs): with nothing else
//! to send (no prompt, key or hold audio), an agent's µ-law leaves in the
//! caller's PCMU packets byte for byte. The recording decodes what was sent.
//!
//! # Quality accounting
//! Time is what the owner passes in: an RTP packet's arrival is the `now`
//! of [`MediaSession::on_rtp`], an emission is the `now` of the
//! [`MediaSession::handle_timeout`] that produced it (the moment the owner
//! sends it or hands it on, however late the task woke).
//! - **Inbound latency**: a packet's arrival to the emission of the
//!   [`MediaOutput::CallerAudio`] frame its audio starts; "beyond target"
//!   subtracts the jitter buffer's target delay (negative values count as
//!   0). The jitter buffer is popped on its own playout clock (a stream's
//!   first packet plays exactly the target after it arrived; the session
//!   asks to be woken then, see [`MediaSession::poll_timeout`]), not on the
//!   outbound tick, and it re-anchors a grid that started late
//!   ([`crate::media::jitter`]), so on a clean stream the bridge adds only
//!   how late the task wakes.
//! - **Outbound latency**: pipeline audio pushed into an empty playout queue
//!   (after the prompt) to the emission of its first RTP packet. The send
//!   clock re-phases to a talkspurt: audio that comes after a tick that sent
//!   only filler (silence, comfort noise, hold audio) is sent at once,
//!   marker bit set, and the following ticks keep that phase plus 2 ms
//!   ([`OUT_SLACK`]: a producer pacing itself in real time never misses a
//!   tick by a hair and leaves a 20 ms gap). At 16 kHz the playout queue's
//!   downsampler runs causal ([`PlayoutQueue::with_causal_filter`]): each
//!   20 ms pushed completes a frame, 1.6 ms of filter delay instead of a
//!   20 ms wait for the next chunk; G.711 pushed has no filter: each 160
//!   codes are a frame. The RTP timestamp advances 160 a packet,
//!   so re-phasing (sending a frame up to 20 ms before its old slot) gains
//!   on the sampling clock; the gain is given back on filler: while it is
//!   10 ms or more a filler packet is held back (nothing sent, the
//!   timestamp does not advance), so the far end's jitter buffer never
//!   drifts. Not
//!   timed while on hold (nothing is sent).
//! - **Mark to playout**: a mark's arrival to its [`MediaOutput::Mark`]
//!   (played, not cleared, marks only): the queued audio before it plus the
//!   above.
//! - **Jitter-buffer depth**: frames held, sampled every tick once a stream
//!   has started.
//! - **MOS**: [`crate::media::quality::estimated_mos`] of the loss seen at
//!   playout (lost and late packets) and a one-way delay of one ptime
//!   (packetisation) + the inbound latency's median + half the RTCP round
//!   trip when known.
//!
//! Every summary is fixed-size ([`LatencyHistogram`]), whatever the call's
//! length.
//!
//! Owns: the per-call media clock and everything that runs on it. Must not
//! touch: sockets (the daemon passes datagrams in and sends what comes out),
//! clocks (`now`/`wall` are passed in), SIP (the `Call` hands over the
//! negotiated session).

use crate::media::dtmf::{self as dtmf, DtmfEvent, DtmfReceiver, DtmfSender};
use crate::media::g711::{self, Law};
use crate::media::jitter::{
    CONCEAL_FADE_FRAMES, Frame, JitterBuffer, JitterConfig, PushOutcome, conceal,
};
use crate::media::noise::ComfortNoise;
use crate::media::playout::{MarkEvent, PlayoutQueue};
use crate::media::prompt::{Prompt, PromptPlayer};
use crate::media::quality::{LatencyHistogram, estimated_mos};
use crate::media::resample::{PipelineRate, Upsampler};
use crate::media::rtp::rtcp::{RtcpConfig, RtcpScheduler};
use crate::media::rtp::{RtpInput, RtpReceiver, RtpReceiverConfig, RtpSender, RtpSourcePolicy};
use crate::media::srtp::SrtpSession;
use crate::sip::sdp::{Codec, Direction, Negotiated};
use bytes::Bytes;
use rand::RngCore;
use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

/// Samples in 20 ms at 8 kHz.
const FRAME: usize = 160;
/// The media clock period.
const TICK: Duration = Duration::from_millis(20);
/// Agent audio held while the disclosure plays: the prompt's length plus this.
const PROMPT_BACKLOG_SLACK: Duration = Duration::from_secs(2);
/// How long each key of an agent's DTMF is held, and the pause after it.
const DTMF_KEY: Duration = Duration::from_millis(100);
/// Ticks of silence between two keys.
const DTMF_GAP_TICKS: u32 = 3;
/// Keys an agent may have waiting at once (more are refused).
const MAX_DTMF_QUEUED: usize = 64;
/// Outbound ticks sent late, back to back, when the task woke late; older
/// ones are skipped (the same bound as the prompt's and playout's catch-up).
const MAX_SEND_CATCH_UP: u32 = 3;
/// Echoed audio waiting to be played back, at most (memory bound).
const MAX_ECHO_FRAMES: usize = 250;
/// The send clock's second frame of a re-phased talkspurt comes this long
/// after a whole frame (see [`MediaSession`]'s outbound latency notes).
const OUT_SLACK: Duration = Duration::from_millis(2);
/// Caller frames waiting for the recording's next outbound tick, at most
/// (the two clocks run at the same rate; this absorbs their phase).
const MAX_REC_LEFT: usize = 3;
/// Arrival times remembered for the packets in the jitter buffer (it holds
/// at most 10 at 20 ms; older entries are overwritten).
const ARRIVALS: usize = 32;

/// The media of a call could not be set up (an invalid negotiated session).
#[derive(Debug, thiserror::Error)]
#[error("media set-up failed: {0}")]
pub struct MediaSetupError(String);

/// Keys an agent asked to send that cannot be.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DtmfOutError {
    /// Not a key: only `0`–`9`, `*`, `#` and `A`–`D`.
    #[error("not a DTMF key: {0:?}")]
    InvalidKey(char),
    /// Nothing to send.
    #[error("no keys")]
    Empty,
    /// Too many keys waiting already.
    #[error("more than {MAX_DTMF_QUEUED} keys waiting")]
    TooMany,
    /// The playout queue's marks are full.
    #[error("too many marks pending")]
    Marks,
}

/// What the media of a call is configured to do (from the tenant).
#[derive(Debug, Clone)]
pub struct MediaPlan {
    /// The disclosure prompt, played first.
    pub prompt: Option<Arc<Prompt>>,
    /// Caller audio reaches the pipeline only once the prompt has finished.
    pub gate_until_prompt_done: bool,
    /// The pipeline's sample rate (its PCM: caller audio in
    /// [`PipelineFormat::Pcm`] or `with_pcm`, and PCM played to the caller,
    /// e.g. the fallback prompt).
    pub pipeline_rate: PipelineRate,
    /// What caller audio the pipeline takes.
    pub pipeline_format: PipelineFormat,
    /// The echo pipeline: play the caller back after this delay.
    pub echo_delay: Option<Duration>,
    /// The tenant records calls: emit [`MediaOutput::Record`] every tick.
    pub record: bool,
    /// Which source addresses are the call's RTP (from the trunk).
    pub rtp_source: RtpSourcePolicy,
}

/// What caller audio the pipeline takes (see the module docs).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum PipelineFormat {
    /// 16-bit PCM at the pipeline rate.
    #[default]
    Pcm,
    /// 8 kHz G.711 codes in `law`, passed through from the caller's RTP.
    G711 {
        /// The pipeline's law (µ-law for a Twilio-mode agent).
        law: Law,
        /// Also PCM at the pipeline rate (a Deepgram stream beside the agent).
        with_pcm: bool,
    },
}

impl PipelineFormat {
    /// Whether caller frames carry PCM at the pipeline rate.
    pub fn wants_pcm(self) -> bool {
        match self {
            PipelineFormat::Pcm => true,
            PipelineFormat::G711 { with_pcm, .. } => with_pcm,
        }
    }

    /// The law of the G.711 codes caller frames carry, if any.
    pub fn g711_law(self) -> Option<Law> {
        match self {
            PipelineFormat::Pcm => None,
            PipelineFormat::G711 { law, .. } => Some(law),
        }
    }
}

/// 20 ms of the caller's audio for the pipeline, in the plan's
/// [`PipelineFormat`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PcmFrame {
    /// 16-bit samples at `rate`; empty when the pipeline takes G.711 only.
    pub samples: Vec<i16>,
    /// Sample rate.
    pub rate: PipelineRate,
    /// Media time of the frame's start since the call was answered.
    pub media_time: Duration,
    /// The frame as 160 G.711 codes at 8 kHz, when the pipeline takes G.711.
    pub g711: Option<G711Frame>,
}

impl PcmFrame {
    /// The frame as audio to play on another call's leg (a bridged
    /// transfer): its G.711 codes when it has them (no transcoding between
    /// the legs beyond a code-by-code law change), else its PCM.
    pub fn audio(&self) -> PipelineAudioRef<'_> {
        match &self.g711 {
            Some(g) => PipelineAudioRef::G711(g.law, &g.codes),
            None => PipelineAudioRef::Pcm(&self.samples),
        }
    }
}

/// 20 ms of 8 kHz G.711.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct G711Frame {
    /// The codes' law.
    pub law: Law,
    /// 160 codes.
    pub codes: Bytes,
}

/// Audio from the pipeline to play to the caller, after what is queued.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PipelineAudio {
    /// 16-bit PCM at the pipeline rate, any length.
    Pcm(Vec<i16>),
    /// 8 kHz G.711 codes, any length (a Twilio-mode agent's µ-law).
    G711 {
        /// The codes' law.
        law: Law,
        /// The codes.
        codes: Vec<u8>,
    },
}

impl PipelineAudio {
    /// Samples (PCM) or codes.
    pub fn len(&self) -> usize {
        match self {
            PipelineAudio::Pcm(pcm) => pcm.len(),
            PipelineAudio::G711 { codes, .. } => codes.len(),
        }
    }

    /// Whether there is no audio.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Pipeline audio borrowed: what [`MediaSession::push_pipeline_audio`]
/// takes (PCM slices, or a [`PipelineAudio`]).
#[derive(Debug, Clone, Copy)]
pub enum PipelineAudioRef<'a> {
    /// 16-bit PCM at the pipeline rate.
    Pcm(&'a [i16]),
    /// 8 kHz G.711 codes in a law.
    G711(Law, &'a [u8]),
}

impl<'a> From<&'a [i16]> for PipelineAudioRef<'a> {
    fn from(pcm: &'a [i16]) -> Self {
        PipelineAudioRef::Pcm(pcm)
    }
}

impl<'a> From<&'a Vec<i16>> for PipelineAudioRef<'a> {
    fn from(pcm: &'a Vec<i16>) -> Self {
        PipelineAudioRef::Pcm(pcm)
    }
}

impl<'a, const N: usize> From<&'a [i16; N]> for PipelineAudioRef<'a> {
    fn from(pcm: &'a [i16; N]) -> Self {
        PipelineAudioRef::Pcm(pcm)
    }
}

impl<'a> From<&'a PipelineAudio> for PipelineAudioRef<'a> {
    fn from(audio: &'a PipelineAudio) -> Self {
        match audio {
            PipelineAudio::Pcm(pcm) => PipelineAudioRef::Pcm(pcm),
            PipelineAudio::G711 { law, codes } => PipelineAudioRef::G711(*law, codes),
        }
    }
}

/// What the media session asks its owner to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MediaOutput {
    /// Send an RTP packet.
    Rtp {
        /// Destination.
        to: SocketAddr,
        /// The packet.
        bytes: Bytes,
    },
    /// Send an RTCP compound packet (to the RTCP port).
    Rtcp {
        /// Destination.
        to: SocketAddr,
        /// The packet.
        bytes: Bytes,
    },
    /// Caller audio for the pipeline.
    CallerAudio(PcmFrame),
    /// A key press.
    Dtmf(DtmfEvent),
    /// The prompt finished playing (consent: the notice was given).
    PromptFinished,
    /// A mark the pipeline set has been played out (or cleared).
    Mark(MarkEvent),
    /// One 20 ms tick of the call for the recording (only when the plan
    /// records), from the first outbound tick on, so the recording starts
    /// with the disclosure prompt. Silence where nothing was received or
    /// sent. The caller's frames come from the jitter buffer's clock and
    /// wait (at most 3) for the next outbound tick.
    Record {
        /// The caller: 160 samples at 8 kHz.
        left: Vec<i16>,
        /// What we sent (prompt, then pipeline/echo audio), decoded from the
        /// G.711 payload: 160 samples at 8 kHz.
        right: Vec<i16>,
    },
}

/// Counters for the CDR and metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MediaCounters {
    /// RTP packets sent.
    pub rtp_out: u64,
    /// PCM frames handed to the pipeline.
    pub frames_to_pipeline: u64,
    /// Frames concealed for lost or late packets (gaps that audio followed;
    /// at most the fade length per gap).
    pub concealed: u64,
    /// SRTP/SRTCP packets dropped: failed authentication, replays, plain RTP.
    pub srtp_rejected: u64,
    /// Agent audio frames dropped (the oldest) because more than the prompt's
    /// length plus 2 s of it arrived while the disclosure played.
    pub agent_frames_dropped: u64,
    /// Outbound 20 ms ticks not sent because the task woke more than
    /// [`MAX_SEND_CATCH_UP`] ticks late.
    pub ticks_skipped: u64,
}

/// The call's quality figures so far (see the module docs).
#[derive(Debug, Clone, PartialEq)]
pub struct MediaQuality {
    /// Interarrival jitter (RFC 3550), ms.
    pub jitter_ms: f64,
    /// Packets lost or discarded late, percent of those expected.
    pub loss_pct: f64,
    /// Frames concealed.
    pub concealed: u64,
    /// Jitter-buffer depth now, frames.
    pub jb_depth_current: u32,
    /// Jitter-buffer depth, mean over the ticks since the stream started.
    pub jb_depth_avg: f64,
    /// Jitter-buffer depth, most.
    pub jb_depth_max: u32,
    /// The jitter buffer's target delay.
    pub jb_target: Duration,
    /// Estimated MOS (G.107 E-model, simplified); `None` before any of the
    /// caller's RTP arrived (nothing to rate).
    pub mos: Option<f64>,
    /// The one-way delay the MOS assumes, ms.
    pub one_way_delay_ms: f64,
    /// RTP arrival to caller audio emitted.
    pub latency_in: LatencyHistogram,
    /// The same, beyond the jitter buffer's target.
    pub latency_in_beyond_target: LatencyHistogram,
    /// Pipeline audio into an empty queue to its first RTP packet.
    pub latency_out: LatencyHistogram,
    /// A mark's arrival to its report (played marks).
    pub mark_to_playout: LatencyHistogram,
}

/// The call's quality accounting (bounded).
#[derive(Debug, Clone, Default)]
struct QualityMeter {
    /// (RTP timestamp, arrival) of recently buffered packets, a ring.
    arrivals: [(u32, Option<Instant>); ARRIVALS],
    next_arrival: usize,
    latency_in: LatencyHistogram,
    latency_in_beyond: LatencyHistogram,
    latency_out: LatencyHistogram,
    mark_to_playout: LatencyHistogram,
    /// Pipeline audio went into an empty queue at this instant, not yet sent.
    out_pending: Option<Instant>,
    /// Arrival of each mark not yet reported, in order (as many as the
    /// playout queue holds, at most `MAX_MARKS`).
    marks: VecDeque<Instant>,
    jb_ticks: u64,
    jb_sum: u64,
    jb_max: u32,
    jb_current: u32,
}

impl QualityMeter {
    fn arrived(&mut self, timestamp: u32, at: Instant) {
        self.arrivals[self.next_arrival] = (timestamp, Some(at));
        self.next_arrival = (self.next_arrival + 1) % ARRIVALS;
    }

    /// The arrival of the packet for the slot at `timestamp` (within half a
    /// frame of `spf` samples), forgotten once found.
    fn take_arrival(&mut self, timestamp: u32, spf: u32) -> Option<Instant> {
        let half = i64::from(spf / 2);
        let entry = self.arrivals.iter_mut().find(|(ts, at)| {
            at.is_some() && i64::from(ts.wrapping_sub(timestamp) as i32).abs() <= half
        })?;
        entry.1.take()
    }
}

/// One call's media.
pub struct MediaSession {
    /// SRTP at the packet boundary, when negotiated.
    srtp: Option<SrtpSession>,
    law: Law,
    plan: MediaPlan,
    receiver: RtpReceiver,
    jitter: JitterBuffer,
    dtmf: DtmfReceiver,
    sender: RtpSender,
    rtcp: Option<RtcpScheduler>,
    prompt: Option<PromptPlayer>,
    prompt_done: bool,
    upsampler: Upsampler,
    /// The last upsampled sample, held back one sample (see `caller_frame`).
    up_carry: i16,
    /// The last received audio (at most 20 ms of codes in the caller's law),
    /// what concealment repeats.
    prev: Bytes,
    /// The negotiated RFC 4733 payload type (none: keys go in-band).
    te_pt: Option<u8>,
    /// The RFC 4733 key being sent.
    dtmf_out: DtmfSender,
    /// Keys the agent sent, each group behind the audio queued before it
    /// (the playout mark that releases it, and the keys).
    dtmf_waiting: VecDeque<(String, Vec<char>)>,
    /// Keys released: sent one after the other.
    dtmf_now: VecDeque<char>,
    /// The in-band key being played, and the frames of it sent.
    dtmf_tone: Option<(char, u32)>,
    /// Ticks of silence still due after a key.
    dtmf_gap: u32,
    /// Names the internal marks apart.
    dtmf_marks: u64,
    /// Keys sent to the caller.
    dtmf_sent: u64,
    /// Fills the caller's silence while set (the agent is away: its
    /// connection is being re-established).
    hold_audio: Option<HoldSound>,
    /// The seed the comfort noise starts from (drawn at creation).
    noise_seed: u32,
    /// Frames of hold audio (comfort noise or the hold prompt) sent.
    away_frames: u64,
    /// Frames concealed since the last audio frame (at most the fade
    /// length), added to the counters when audio resumes.
    conceal_run: u64,
    /// The caller's codes not yet cut into 20 ms frames (packets of other
    /// ptimes than 20 ms, concealment).
    inbound: VecDeque<u8>,
    /// Where we send: the SDP address until the caller's source is latched.
    remote: Option<SocketAddr>,
    /// The caller does not want our audio (we were put on hold, or inactive).
    send_paused: bool,
    started: Instant,
    /// The next outbound tick.
    out_next: Instant,
    /// The tick after the next adds [`OUT_SLACK`] (a talkspurt re-phased).
    out_slack_pending: bool,
    /// How far the RTP timestamp runs ahead of the sampling clock (ns; re-
    /// phasing sends frames early), given back on filler packets.
    out_ahead: i64,
    /// The last outbound tick sent only filler (silence, comfort noise, the
    /// hold prompt) or nothing.
    last_out_filler: bool,
    /// Caller frames (8 kHz) for the recording's next outbound ticks.
    rec_left: VecDeque<Vec<i16>>,
    /// The next outbound packet starts a talkspurt (marker bit).
    talkspurt: bool,
    /// Caller audio (in the pipeline's format) waiting to be echoed back.
    echo: VecDeque<(Instant, PipelineAudio)>,
    /// The pipeline's audio to the caller, paced out at 20 ms.
    playout: PlayoutQueue,
    counters: MediaCounters,
    /// Recording tap active (the plan records and no opt-out stopped it).
    recording: bool,
    /// The negotiated ptime.
    ptime: Duration,
    quality: QualityMeter,
    /// The `now` of the running `handle_timeout`: when what it emits leaves.
    wake: Instant,
    out: VecDeque<MediaOutput>,
}

fn law_of(codec: Codec) -> Law {
    match codec {
        Codec::Pcmu => Law::Mu,
        Codec::Pcma => Law::A,
    }
}

impl MediaSession {
    /// Starts the media of an answered call at `now`.
    pub fn new(
        now: Instant,
        neg: &Negotiated,
        plan: MediaPlan,
        rng: &mut impl RngCore,
    ) -> Result<MediaSession, MediaSetupError> {
        let law = law_of(neg.codec);
        let sdp_addr = neg
            .remote_rtp
            .unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], 0)));
        let mut rx_config = RtpReceiverConfig::new(neg.payload_type, neg.telephone_event_pt);
        rx_config.source = plan.rtp_source;
        let receiver =
            RtpReceiver::new(rx_config, sdp_addr).map_err(|e| MediaSetupError(e.to_string()))?;
        let ptime = Duration::from_millis(u64::from(neg.ptime_ms.clamp(10, 60)));
        let jitter = JitterBuffer::new(JitterConfig::new(ptime))
            .map_err(|e| MediaSetupError(e.to_string()))?;
        let ssrc = rng.next_u32();
        let sender = RtpSender::new(
            ssrc,
            (rng.next_u32() & 0xffff) as u16,
            rng.next_u32(),
            neg.payload_type,
        );
        let rtcp = RtcpScheduler::new(
            RtcpConfig::new(format!("sipbridge-{ssrc:08x}")),
            ssrc,
            now,
            rng,
        )
        .ok();
        let prompt = plan
            .prompt
            .as_ref()
            .map(|p| PromptPlayer::new(Arc::clone(p), law, now));
        let srtp = neg
            .srtp
            .as_ref()
            .map(SrtpSession::new)
            .transpose()
            .map_err(|e| MediaSetupError(e.to_string()))?;
        let mut session = MediaSession {
            srtp,
            law,
            receiver,
            jitter,
            dtmf: DtmfReceiver::new(8000),
            sender,
            rtcp,
            prompt_done: prompt.is_none(),
            prompt,
            upsampler: Upsampler::new(plan.pipeline_rate),
            up_carry: 0,
            prev: Bytes::new(),
            conceal_run: 0,
            te_pt: neg.telephone_event_pt,
            dtmf_out: DtmfSender::new(8000),
            dtmf_waiting: VecDeque::new(),
            dtmf_now: VecDeque::new(),
            dtmf_tone: None,
            dtmf_gap: 0,
            dtmf_marks: 0,
            dtmf_sent: 0,
            hold_audio: None,
            noise_seed: rng.next_u32(),
            away_frames: 0,
            inbound: VecDeque::with_capacity(4 * FRAME),
            remote: neg.remote_rtp,
            send_paused: false,
            started: now,
            out_next: now,
            out_slack_pending: false,
            out_ahead: 0,
            last_out_filler: false,
            rec_left: VecDeque::with_capacity(MAX_REC_LEFT),
            talkspurt: true,
            echo: VecDeque::new(),
            playout: PlayoutQueue::new(law, plan.pipeline_rate, now, true).with_causal_filter(),
            counters: MediaCounters::default(),
            recording: plan.record,
            ptime,
            quality: QualityMeter::default(),
            wake: now,
            out: VecDeque::new(),
            plan,
        };
        session.update(neg);
        Ok(session)
    }

    /// A re-negotiation (hold, unhold, new address).
    pub fn update(&mut self, neg: &Negotiated) {
        // New keys (a re-INVITE) get new contexts; the same ones keep theirs.
        match (&neg.srtp, &self.srtp) {
            (Some(p), Some(s)) if s.runs(p) => {}
            (Some(p), _) => self.srtp = SrtpSession::new(p).ok(),
            (None, _) => self.srtp = None,
        }
        self.send_paused = !neg.local_direction.sends() || neg.remote_rtp.is_none();
        self.te_pt = neg.telephone_event_pt;
        if let Some(addr) = neg.remote_rtp {
            self.receiver.set_sdp_address(addr);
            if self.receiver.latched_source().is_none() {
                self.remote = Some(addr);
            }
        }
        if matches!(
            neg.local_direction,
            Direction::RecvOnly | Direction::Inactive
        ) {
            self.talkspurt = true;
        }
    }

    /// Audio from the pipeline (PCM at the pipeline rate or 8 kHz G.711,
    /// any length), arriving at `now`, to play to the caller after what is
    /// queued. Returns the samples (or codes) accepted (the queue is
    /// bounded).
    pub fn push_pipeline_audio<'a>(
        &mut self,
        now: Instant,
        audio: impl Into<PipelineAudioRef<'a>>,
    ) -> usize {
        let accepted = self.push_playout_paced(now, audio.into(), true);
        // While the disclosure plays, the agent's audio waits behind it (an
        // agent that greets at once loses nothing), but at most the prompt's
        // length plus 2 s of it: beyond that the oldest goes, counted.
        if !self.prompt_done
            && let Some(prompt) = &self.plan.prompt
        {
            let cap = (prompt.duration() + PROMPT_BACKLOG_SLACK).as_millis() as u64 * 8;
            let over = self.playout.queued().saturating_sub(cap);
            if over > 0 {
                self.counters.agent_frames_dropped +=
                    self.playout.drop_oldest_frames(over.div_ceil(FRAME as u64));
                self.drain_marks();
            }
        }
        accepted
    }

    /// Queues audio to play; `slack`: a re-phased send clock keeps
    /// [`OUT_SLACK`] behind the audio's phase (a producer with jitter).
    fn push_playout_paced(
        &mut self,
        now: Instant,
        audio: PipelineAudioRef<'_>,
        slack: bool,
    ) -> usize {
        let was_empty = self.playout.queued() == 0;
        let accepted = match audio {
            PipelineAudioRef::Pcm(pcm) => self.playout.push_pcm(pcm),
            PipelineAudioRef::G711(law, codes) => self.playout.push_g711(law, codes),
        };
        if was_empty && accepted > 0 {
            self.maybe_rephase(now, slack);
        }
        // Outbound latency is timed from audio that finds the queue empty,
        // once the prompt is done (before that it waits for the prompt).
        if was_empty && accepted > 0 && self.prompt_done && self.quality.out_pending.is_none() {
            self.quality.out_pending = Some(now);
        }
        accepted
    }

    /// Pipeline audio queued for the caller and not yet sent, in ms.
    pub fn playout_queued_ms(&self) -> u64 {
        self.playout.queued_ms()
    }

    /// A mark, arriving at `now`, after the pipeline audio queued so far;
    /// reported as [`MediaOutput::Mark`] once that audio has been sent.
    pub fn mark(
        &mut self,
        now: Instant,
        name: String,
    ) -> Result<(), crate::media::playout::PlayoutError> {
        self.playout.mark(name)?;
        self.quality.marks.push_back(now);
        Ok(())
    }

    /// Keys from the agent to send to the caller (an IVR on the far end),
    /// after the agent audio queued so far: RFC 4733 events when the far end
    /// negotiated telephone-event, else in-band tones; each key held 100 ms
    /// with 60 ms between keys. A `clear` before they start drops them.
    pub fn send_dtmf(&mut self, keys: &str) -> Result<(), DtmfOutError> {
        let keys: Vec<char> = keys.chars().collect();
        if keys.is_empty() {
            return Err(DtmfOutError::Empty);
        }
        if let Some(&bad) = keys
            .iter()
            .find(|&&k| k == '!' || dtmf::key_frequencies(k).is_none())
        {
            return Err(DtmfOutError::InvalidKey(bad));
        }
        let waiting: usize = self.dtmf_waiting.iter().map(|(_, k)| k.len()).sum();
        if waiting + self.dtmf_now.len() + keys.len() > MAX_DTMF_QUEUED {
            return Err(DtmfOutError::TooMany);
        }
        self.dtmf_marks += 1;
        let name = format!("\u{1}sipbridge-dtmf-{}", self.dtmf_marks);
        self.playout
            .mark(name.clone())
            .map_err(|_| DtmfOutError::Marks)?;
        self.dtmf_waiting.push_back((name, keys));
        Ok(())
    }

    /// Keys sent to the caller so far.
    pub fn dtmf_sent(&self) -> u64 {
        self.dtmf_sent
    }

    /// A mark the playout queue reports: the agent's, or one that releases
    /// the agent's keys (never reported to the agent).
    fn on_playout_mark(&mut self, mark: MarkEvent) {
        if let Some(i) = self.dtmf_waiting.iter().position(|(n, _)| *n == mark.name) {
            if let Some((_, keys)) = self.dtmf_waiting.remove(i)
                && !mark.cleared
            {
                self.dtmf_now.extend(keys);
            }
            return;
        }
        if let Some(at) = self.quality.marks.pop_front()
            && !mark.cleared
        {
            let emitted = self.wake.max(at);
            self.quality
                .mark_to_playout
                .record(emitted.saturating_duration_since(at));
        }
        self.out.push_back(MediaOutput::Mark(mark));
    }

    /// Whether a key is being sent (or its pause runs): the agent's audio
    /// queued after it waits.
    fn dtmf_busy(&self) -> bool {
        !self.dtmf_out.is_idle()
            || self.dtmf_tone.is_some()
            || self.dtmf_gap > 0
            || !self.dtmf_now.is_empty()
    }

    /// Barge-in: drop all queued pipeline audio at once.
    pub fn clear(&mut self) {
        self.playout.clear();
        self.quality.out_pending = None;
        self.drain_marks();
    }

    /// Reports the marks the playout queue has done with (mark-to-playout
    /// timed for the played ones).
    fn drain_marks(&mut self) {
        while let Some(mark) = self.playout.poll_marks() {
            self.on_playout_mark(mark);
        }
    }

    /// Media time at `now`: since the session started.
    pub fn media_time(&self, now: Instant) -> Duration {
        now.saturating_duration_since(self.started)
    }

    /// The call's quality figures so far.
    pub fn quality(&self) -> MediaQuality {
        let stats = self.receiver.stats();
        let q = &self.quality;
        let late = self.jitter.stats().late;
        let lost = u64::try_from(stats.cumulative_lost.max(0)).unwrap_or(0) + late;
        let expected = stats.expected.max(stats.packets_received);
        let loss_pct = if expected == 0 {
            0.0
        } else {
            (lost as f64 * 100.0 / expected as f64).min(100.0)
        };
        let rtt_half_ms = self
            .rtcp
            .as_ref()
            .and_then(|r| r.remote_stats().rtt)
            .map_or(0.0, |rtt| rtt.as_secs_f64() * 500.0);
        let buffered_ms = q
            .latency_in
            .percentile_ms(50.0)
            .unwrap_or_else(|| self.jitter.target_delay().as_secs_f64() * 1000.0);
        let one_way_delay_ms = self.ptime.as_secs_f64() * 1000.0 + buffered_ms + rtt_half_ms;
        MediaQuality {
            jitter_ms: f64::from(stats.jitter) / 8.0,
            loss_pct,
            concealed: self.counters.concealed,
            jb_depth_current: q.jb_current,
            jb_depth_avg: if q.jb_ticks == 0 {
                0.0
            } else {
                q.jb_sum as f64 / q.jb_ticks as f64
            },
            jb_depth_max: q.jb_max,
            jb_target: self.jitter.target_delay(),
            mos: (stats.packets_received > 0).then(|| estimated_mos(one_way_delay_ms, loss_pct)),
            one_way_delay_ms,
            latency_in: q.latency_in.clone(),
            latency_in_beyond_target: q.latency_in_beyond.clone(),
            latency_out: q.latency_out.clone(),
            mark_to_playout: q.mark_to_playout.clone(),
        }
    }

    /// Fill the caller's silence with comfort noise (`true`: the agent is
    /// away) or not. Prompt and agent audio always take precedence.
    pub fn set_comfort_noise(&mut self, on: bool) {
        self.set_hold_audio(on.then_some(HoldAudio::ComfortNoise));
    }

    /// Fill the caller's silence with `audio` while the agent is away
    /// (`None`: the agent is back, or the tenant wants silence). The
    /// disclosure prompt and any agent audio always take precedence. A hold
    /// prompt starts from its beginning each time the agent goes away, and
    /// loops.
    pub fn set_hold_audio(&mut self, audio: Option<HoldAudio>) {
        let same = matches!(
            (&audio, &self.hold_audio),
            (Some(HoldAudio::ComfortNoise), Some(HoldSound::Noise(_)))
        ) || matches!(
            (&audio, &self.hold_audio),
            (Some(HoldAudio::Prompt(a)), Some(HoldSound::Prompt(b, _))) if Arc::ptr_eq(a, b)
        );
        if same {
            return;
        }
        self.hold_audio = audio.map(|a| match a {
            HoldAudio::ComfortNoise => HoldSound::Noise(ComfortNoise::new(
                self.noise_seed.wrapping_add(self.away_frames as u32),
            )),
            HoldAudio::Prompt(p) => HoldSound::Prompt(p, 0),
        });
    }

    /// Frames of hold audio (comfort noise or the hold prompt) sent so far.
    pub fn comfort_noise_frames(&self) -> u64 {
        self.away_frames
    }

    /// Stops the recording tap for the rest of the call (consent opt-out):
    /// no [`MediaOutput::Record`] follows.
    pub fn stop_recording(&mut self) {
        self.recording = false;
    }

    /// Whether the recording tap is on.
    pub fn is_recording(&self) -> bool {
        self.recording
    }

    /// Whether the disclosure prompt has finished (or there is none).
    pub fn prompt_done(&self) -> bool {
        self.prompt_done
    }

    /// Counters so far.
    pub fn counters(&self) -> MediaCounters {
        self.counters
    }

    /// Jitter buffer statistics (late, duplicate, overflow packets).
    pub fn jitter_stats(&self) -> &crate::media::jitter::JitterStats {
        self.jitter.stats()
    }

    /// RTP receive statistics (loss, jitter) for the CDR.
    pub fn rtp_stats(&self) -> &crate::media::rtp::RtpStats {
        self.receiver.stats()
    }

    /// An RTP datagram arrived on the call's RTP port. Returns whether it was
    /// valid media for this call (the RTP timeout only counts those).
    pub fn on_rtp(&mut self, now: Instant, from: SocketAddr, data: Bytes) -> bool {
        let data = match &mut self.srtp {
            None => data,
            Some(srtp) => match srtp.unprotect_rtp(&data) {
                Ok(plain) => plain,
                Err(_) => {
                    self.counters.srtp_rejected += 1;
                    return false;
                }
            },
        };
        match self.receiver.on_datagram(now, from, data) {
            RtpInput::Media {
                timestamp,
                ssrc,
                payload,
                ..
            } => {
                self.follow_source();
                match self.jitter.push(now, ssrc, timestamp, payload) {
                    PushOutcome::Resynced { .. } => {
                        // A new grid: what was buffered is gone.
                        self.quality.arrivals = Default::default();
                        self.quality.arrived(timestamp, now);
                    }
                    PushOutcome::Buffered | PushOutcome::Overflow { .. } => {
                        self.quality.arrived(timestamp, now);
                    }
                    _ => {}
                }
                true
            }
            RtpInput::TelephoneEvent {
                timestamp,
                marker,
                payload,
                ..
            } => {
                self.follow_source();
                if let Some(ev) = self.dtmf.on_packet(timestamp, marker, &payload) {
                    self.out.push_back(MediaOutput::Dtmf(ev));
                }
                true
            }
            RtpInput::Rejected(_) => false,
        }
    }

    /// An RTCP datagram arrived on the call's RTCP port.
    pub fn on_rtcp(&mut self, now: Instant, data: &[u8]) {
        let plain;
        let data = match &mut self.srtp {
            None => data,
            Some(srtp) => match srtp.unprotect_rtcp(data) {
                Ok(p) => {
                    plain = p;
                    &plain[..]
                }
                Err(_) => {
                    self.counters.srtp_rejected += 1;
                    return;
                }
            },
        };
        if let Some(rtcp) = &mut self.rtcp {
            // Malformed RTCP is counted by the scheduler and otherwise ignored.
            let _ = rtcp.on_rtcp(now, data);
        }
    }

    /// Symmetric RTP: answer to where the caller's packets come from.
    fn follow_source(&mut self) {
        if let Some(src) = self.receiver.latched_source() {
            self.remote = Some(src);
        }
    }

    /// When the jitter buffer plays its next slot (`None` before the first
    /// packet). A shell that reads the RTP socket in batches rather than per
    /// packet reads it just before this, so every packet that arrived in
    /// time is in the buffer when its slot is played.
    pub fn next_slot_at(&self) -> Option<Instant> {
        self.jitter.next_playout_at()
    }

    /// When [`MediaSession::handle_timeout`] must run next: the next
    /// outbound tick, the jitter buffer's next slot, echoed audio falling
    /// due, or RTCP.
    pub fn poll_timeout(&self) -> Instant {
        let mut at = self.out_next;
        if let Some(jb) = self.jitter.next_playout_at() {
            at = at.min(jb);
        }
        if let Some((due, _)) = self.echo.front() {
            at = at.min(*due);
        }
        match &self.rtcp {
            Some(r) => at.min(r.poll_timeout()),
            None => at,
        }
    }

    /// Next output to act on.
    pub fn poll_output(&mut self) -> Option<MediaOutput> {
        loop {
            let out = self.out.pop_front()?;
            let Some(srtp) = &mut self.srtp else {
                return Some(out);
            };
            // Protected at the boundary: nothing plain leaves an SRTP call.
            match out {
                MediaOutput::Rtp { to, bytes } => match srtp.protect_rtp(&bytes) {
                    Ok(bytes) => return Some(MediaOutput::Rtp { to, bytes }),
                    Err(_) => continue,
                },
                MediaOutput::Rtcp { to, bytes } => match srtp.protect_rtcp(&bytes) {
                    Ok(bytes) => return Some(MediaOutput::Rtcp { to, bytes }),
                    Err(_) => continue,
                },
                other => return Some(other),
            }
        }
    }

    /// Runs everything due at `now`, in time order, each at its own time, so
    /// what is sent and heard depends on media time only, never on how
    /// promptly the task woke: the jitter buffer's slots (on its own
    /// playout clock, see the module docs), echoed audio, and the outbound
    /// ticks. Outbound ticks missed by at most [`MAX_SEND_CATCH_UP`] are sent
    /// late, back to back, with their own timestamps (the far end's jitter
    /// buffer absorbs that; a skipped frame would be an audible gap and a
    /// slip of everything queued after it). Further behind (the task
    /// stalled), the older ticks keep their timestamps but send nothing, so
    /// the stream resumes on time rather than ever further behind.
    pub fn handle_timeout(&mut self, now: Instant, wall: SystemTime, rng: &mut impl RngCore) {
        self.wake = now;
        loop {
            let jb = self.jitter.next_playout_at().filter(|t| *t <= now);
            let echo = self.echo.front().map(|(due, _)| *due).filter(|t| *t <= now);
            let out = Some(self.out_next).filter(|t| *t <= now);
            let Some(at) = [jb, echo, out].into_iter().flatten().min() else {
                break;
            };
            if jb == Some(at) {
                self.inbound_pop(at);
            } else if echo == Some(at) {
                if let Some((_, audio)) = self.echo.pop_front() {
                    // The echo pipeline's audio comes back the way an
                    // agent's does, but on the jitter buffer's clock: no
                    // slack, so one wake-up serves both directions.
                    self.push_playout_paced(at, (&audio).into(), false);
                }
            } else {
                self.outbound_step(at, now);
            }
        }
        if let Some(rtcp) = &mut self.rtcp
            && now >= rtcp.poll_timeout()
            && let Ok(Some(bytes)) =
                rtcp.poll_transmit(now, wall, Some(&self.sender), &mut self.receiver, rng)
            && let Some(remote) = self.remote
        {
            let to = SocketAddr::new(remote.ip(), remote.port().wrapping_add(1));
            self.out.push_back(MediaOutput::Rtcp { to, bytes });
        }
    }

    /// The outbound tick due at `at` (the task woke at `now`), and the
    /// recording's frame for it.
    fn outbound_step(&mut self, at: Instant, now: Instant) {
        let behind = now.saturating_duration_since(at);
        let sent = if behind > TICK * MAX_SEND_CATCH_UP {
            self.sender.skip(FRAME as u32);
            self.talkspurt = true;
            self.counters.ticks_skipped += 1;
            None
        } else {
            self.outbound_tick(at)
        };
        if self.recording {
            let left = self.rec_left.pop_front().unwrap_or_else(|| vec![0; FRAME]);
            let mut right = vec![0i16; FRAME];
            if let Some(payload) = sent {
                g711::decode(self.law, &payload, &mut right);
            }
            self.out.push_back(MediaOutput::Record { left, right });
        }
        self.out_next = at + TICK;
        if std::mem::take(&mut self.out_slack_pending) {
            self.out_next += OUT_SLACK;
            self.out_ahead -= duration_ns(OUT_SLACK);
            self.playout.rephase(self.out_next);
        }
    }

    /// Audio into an empty playout queue at `now`, between two outbound
    /// ticks, after a tick that sent only filler: a new talkspurt. Its first
    /// frame goes at once rather than at the next tick, and the send clock
    /// keeps that phase (plus [`OUT_SLACK`] from the second frame on, the
    /// room a producer pacing itself in real time needs to never miss a
    /// tick). The marker bit tells the far end; the RTP timestamp runs on by
    /// 160 a packet, and the time this gains on the sampling clock is given
    /// back by holding back filler packets (see the module docs).
    fn maybe_rephase(&mut self, now: Instant, slack: bool) {
        if !self.last_out_filler
            || !self.prompt_done
            || self.send_paused
            || self.dtmf_busy()
            || now >= self.out_next
        {
            return;
        }
        self.out_ahead += duration_ns(self.out_next.saturating_duration_since(now));
        self.out_next = now;
        self.out_slack_pending = slack;
        self.talkspurt = true;
        self.playout.rephase(now);
    }

    fn gate_open(&self) -> bool {
        self.prompt_done || !self.plan.gate_until_prompt_done
    }

    /// Plays the jitter buffer's slot due at `at`: the caller's audio (or
    /// concealment) in 20 ms frames to the pipeline, gated or not (the
    /// recording hears the caller from the start).
    fn inbound_pop(&mut self, at: Instant) {
        let popped = self.jitter.pop(at);
        if self.jitter.next_playout_at().is_some() {
            let depth = u32::try_from(self.jitter.buffered()).unwrap_or(u32::MAX);
            let q = &mut self.quality;
            q.jb_current = depth;
            q.jb_max = q.jb_max.max(depth);
            q.jb_sum = q.jb_sum.saturating_add(u64::from(depth));
            q.jb_ticks += 1;
        }
        match popped {
            Some(Frame::Audio { payload, timestamp }) => {
                let spf = u32::try_from(self.ptime.as_millis() * 8).unwrap_or(FRAME as u32);
                let arrived = self.quality.take_arrival(timestamp, spf);
                // The gap before this frame was loss or lateness: count it.
                self.counters.concealed += std::mem::take(&mut self.conceal_run);
                let keep = payload.len().min(FRAME);
                self.prev = payload.slice(payload.len() - keep..);
                self.inbound_codes(at, payload, arrived);
            }
            Some(Frame::Concealed { consecutive, .. }) if self.inbound.len() < FRAME => {
                // Counted once audio resumes, and only the frames concealment
                // fills (after the fade it is silence): a stream that stops
                // (the caller's last packet before BYE, a hold) lost nothing.
                if consecutive as usize <= CONCEAL_FADE_FRAMES {
                    self.conceal_run += 1;
                }
                // Before any audio: 20 ms of silence.
                let len = if self.prev.is_empty() {
                    FRAME
                } else {
                    self.prev.len()
                };
                let mut prev = vec![0i16; len];
                g711::decode(self.law, &self.prev, &mut prev);
                let pcm = conceal(&prev, consecutive);
                let mut codes = vec![0u8; pcm.len()];
                g711::encode(self.law, &pcm, &mut codes);
                self.inbound_codes(at, Bytes::from(codes), None);
            }
            Some(Frame::Concealed { .. }) | None => {}
        }
    }

    /// The caller's codes (or concealment) played at `at`, cut into 20 ms
    /// frames; the packet they start arrived at `arrived`. A 20 ms packet
    /// with nothing left over before it is the frame itself (not copied).
    fn inbound_codes(&mut self, at: Instant, codes: Bytes, mut arrived: Option<Instant>) {
        if self.inbound.is_empty() && codes.len() == FRAME {
            self.caller_frame(at, codes, arrived);
            return;
        }
        self.inbound.extend(codes.iter());
        // Bounded: a peer sending more audio than real time cannot grow it.
        while self.inbound.len() > 8 * FRAME {
            self.inbound.pop_front();
        }
        // Every whole 20 ms goes at once (a 30 ms ptime gives one frame, then
        // two).
        while self.inbound.len() >= FRAME {
            let frame: Vec<u8> = self.inbound.drain(..FRAME).collect();
            self.caller_frame(at, Bytes::from(frame), arrived.take());
        }
    }

    /// One 20 ms frame of the caller's audio (160 codes in the caller's
    /// law), played at `at`; the packet it starts arrived at `arrived`.
    /// Decoded only for what needs PCM: the recording, a PCM pipeline.
    fn caller_frame(&mut self, at: Instant, codes: Bytes, arrived: Option<Instant>) {
        let format = self.plan.pipeline_format;
        let gate_open = self.gate_open();
        let wants_pcm = gate_open && format.wants_pcm();
        let pcm = (self.recording || wants_pcm).then(|| {
            let mut pcm = vec![0i16; FRAME];
            g711::decode(self.law, &codes, &mut pcm);
            pcm
        });
        if self.recording
            && let Some(pcm) = &pcm
        {
            if self.rec_left.len() >= MAX_REC_LEFT {
                self.rec_left.pop_front();
            }
            self.rec_left.push_back(pcm.clone());
        }
        if !gate_open {
            return;
        }
        let media_time = at.saturating_duration_since(self.started);
        let mut samples = Vec::new();
        if let (true, Some(pcm)) = (wants_pcm, &pcm) {
            // One more for the carried sample below: no regrowth.
            samples.reserve_exact(self.plan.pipeline_rate.samples_per_20ms() + 1);
            let delay_one = self.plan.pipeline_rate == PipelineRate::Hz16000;
            if delay_one {
                // The half-band upsampler delays by 27 samples at 16 kHz
                // (13.5 at 8 kHz); one more sample makes it a whole 14
                // samples at 8 kHz, so echoed/agent audio comes back a whole
                // number of samples late (the playout queue's causal
                // downsampler adds 13): the last frame's last sample goes
                // first, this frame's last is carried to the next.
                samples.push(self.up_carry);
            }
            self.upsampler.process(pcm, &mut samples);
            if delay_one {
                self.up_carry = samples.pop().unwrap_or(0);
            }
        }
        let g711 = format.g711_law().map(|law| G711Frame {
            law,
            codes: if law == self.law {
                codes
            } else {
                let mut out = vec![0u8; codes.len()];
                g711::transcode(self.law, law, &codes, &mut out);
                Bytes::from(out)
            },
        });
        if let Some(delay) = self.plan.echo_delay
            && self.echo.len() < MAX_ECHO_FRAMES
        {
            // The echo pipeline: what the pipeline gets comes back through
            // the same path an agent's audio takes.
            let audio = match &g711 {
                Some(f) => PipelineAudio::G711 {
                    law: f.law,
                    codes: f.codes.to_vec(),
                },
                None => PipelineAudio::Pcm(samples.clone()),
            };
            self.echo.push_back((at + delay, audio));
        }
        self.counters.frames_to_pipeline += 1;
        if let Some(arrived) = arrived {
            let latency = self.wake.max(arrived).saturating_duration_since(arrived);
            self.quality.latency_in.record(latency);
            self.quality
                .latency_in_beyond
                .record(latency.saturating_sub(self.jitter.target_delay()));
        }
        self.out.push_back(MediaOutput::CallerAudio(PcmFrame {
            samples,
            rate: self.plan.pipeline_rate,
            media_time,
            g711,
        }));
    }

    /// Returns the G.711 payload sent this tick (`None` when on hold, or
    /// when a filler packet is held back).
    fn outbound_tick(&mut self, now: Instant) -> Option<[u8; FRAME]> {
        let mut payload = [self.law.silence(); FRAME];
        let mut have_audio = false;
        let mut first_of_burst = None;
        // Silence fills the gaps: carriers' SBCs and NATs expect a steady stream.
        if let Some(player) = &mut self.prompt {
            if let Some(frame) = player.poll(now) {
                payload = frame.payload;
                have_audio = true;
            }
            if player.is_finished() && !self.prompt_done {
                self.prompt_done = true;
                self.out.push_back(MediaOutput::PromptFinished);
            }
        }
        // While the prompt plays the playout queue is not polled: audio the
        // pipeline sends meanwhile waits (its slot clock skips ahead, the audio
        // is delayed, not dropped) and starts when the disclosure has ended.
        // While the agent's keys are sent, its audio queued after them waits
        // (the playout's slot clock skips ahead: delayed, not dropped).
        let dtmf_busy = self.dtmf_busy();
        if !have_audio
            && !dtmf_busy
            && let Some(frame) = self.playout.poll(now)
        {
            payload = frame.payload;
            have_audio = !frame.is_silence;
            if have_audio {
                first_of_burst = self.quality.out_pending.take();
            }
        }
        self.drain_marks();
        if !have_audio && self.dtmf_busy() {
            match self.dtmf_tick(now) {
                DtmfTick::Events(packets) => {
                    self.last_out_filler = false;
                    return self.send_events(packets);
                }
                DtmfTick::Tone(pcm) => {
                    g711::encode(self.law, &pcm[..], &mut payload);
                    have_audio = true;
                }
                DtmfTick::Pause => have_audio = true,
            }
        }
        let filler = !have_audio;
        self.last_out_filler = filler;
        if filler && let Some(hold) = &mut self.hold_audio {
            payload = hold.frame(self.law);
            self.away_frames += 1;
        }
        let sending =
            matches!((self.remote, self.send_paused), (Some(to), false) if to.port() != 0);
        if filler && sending {
            // Give back what re-phasing gained on the sampling clock (from
            // half a frame on: the error stays within ±10 ms): a filler
            // packet held back (nothing sent, the timestamp does not
            // advance), or a frame's worth of timestamp skipped.
            if self.out_ahead >= duration_ns(TICK / 2) {
                self.out_ahead -= duration_ns(TICK);
                return None;
            }
            if self.out_ahead <= -duration_ns(TICK) {
                self.out_ahead += duration_ns(TICK);
                self.sender.skip(FRAME as u32);
                self.talkspurt = true;
            }
        }
        match self.remote {
            Some(to) if sending => {
                let bytes = self.sender.packet(&payload, self.talkspurt, FRAME as u32);
                self.talkspurt = false;
                self.counters.rtp_out += 1;
                if let Some(pushed) = first_of_burst {
                    let emitted = self.wake.max(pushed);
                    self.quality
                        .latency_out
                        .record(emitted.saturating_duration_since(pushed));
                }
                self.out.push_back(MediaOutput::Rtp { to, bytes });
                Some(payload)
            }
            _ => {
                // On hold: keep the timestamp running, start a new talkspurt after.
                self.sender.skip(FRAME as u32);
                self.talkspurt = true;
                None
            }
        }
    }
}

fn duration_ns(d: Duration) -> i64 {
    i64::try_from(d.as_nanos()).unwrap_or(i64::MAX)
}
/// What the caller hears while the agent is away.
#[derive(Debug, Clone)]
pub enum HoldAudio {
    /// Comfort noise ([`ComfortNoise`]).
    ComfortNoise,
    /// A prompt, looped.
    Prompt(Arc<Prompt>),
}

/// The hold audio being played.
enum HoldSound {
    Noise(ComfortNoise),
    /// The prompt and the index of its next frame.
    Prompt(Arc<Prompt>, usize),
}

impl HoldSound {
    fn frame(&mut self, law: Law) -> [u8; FRAME] {
        match self {
            HoldSound::Noise(n) => n.frame(law),
            HoldSound::Prompt(p, next) => {
                let frames = p.frames(law);
                let Some(frame) = frames.get(*next).or_else(|| frames.first()) else {
                    return [law.silence(); FRAME];
                };
                *next = (*next + 1) % frames.len();
                *frame
            }
        }
    }
}

/// What the agent's keys do with one outbound tick.
enum DtmfTick {
    /// RFC 4733 packets to send instead of audio (possibly none this tick).
    Events(Vec<dtmf::DtmfPacket>),
    /// An in-band tone frame to send as audio.
    Tone(Box<[i16; FRAME]>),
    /// The pause between keys: silence.
    Pause,
}

impl MediaSession {
    /// Advances the agent's keys by one tick at `now`.
    fn dtmf_tick(&mut self, now: Instant) -> DtmfTick {
        if self.dtmf_gap > 0 && self.dtmf_out.is_idle() && self.dtmf_tone.is_none() {
            self.dtmf_gap -= 1;
            return DtmfTick::Pause;
        }
        match self.te_pt {
            Some(_) => {
                if self.dtmf_out.is_idle()
                    && let Some(key) = self.dtmf_now.pop_front()
                    && self
                        .dtmf_out
                        .press(key, DTMF_KEY, now, self.sender.timestamp())
                        .is_ok()
                {
                    self.dtmf_sent += 1;
                }
                let mut packets = Vec::new();
                while let Some(p) = self.dtmf_out.poll(now) {
                    packets.push(p);
                }
                if self.dtmf_out.is_idle() {
                    self.dtmf_gap = DTMF_GAP_TICKS;
                }
                DtmfTick::Events(packets)
            }
            None => {
                if self.dtmf_tone.is_none()
                    && let Some(key) = self.dtmf_now.pop_front()
                {
                    self.dtmf_sent += 1;
                    self.dtmf_tone = Some((key, 0));
                }
                let Some((key, n)) = self.dtmf_tone else {
                    return DtmfTick::Pause;
                };
                let pcm = Box::new(dtmf::tone_frame(key, n * FRAME as u32));
                let frames = (DTMF_KEY.as_millis() / TICK.as_millis()) as u32;
                if n + 1 >= frames {
                    self.dtmf_tone = None;
                    self.dtmf_gap = DTMF_GAP_TICKS;
                } else {
                    self.dtmf_tone = Some((key, n + 1));
                }
                DtmfTick::Tone(pcm)
            }
        }
    }

    /// Sends this tick's RFC 4733 packets (none between updates) in place of
    /// audio; the audio clock runs on, and audio after the key starts a new
    /// talkspurt.
    fn send_events(&mut self, packets: Vec<dtmf::DtmfPacket>) -> Option<[u8; FRAME]> {
        self.talkspurt = true;
        if let (Some(to), false, Some(pt)) = (self.remote, self.send_paused, self.te_pt)
            && to.port() != 0
        {
            for p in packets {
                let bytes = self
                    .sender
                    .packet_with(pt, p.timestamp, &p.payload, p.marker);
                self.counters.rtp_out += 1;
                self.out.push_back(MediaOutput::Rtp { to, bytes });
            }
        }
        self.sender.skip(FRAME as u32);
        None
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    fn negotiated() -> Negotiated {
        Negotiated {
            srtp: None,
            codec: Codec::Pcmu,
            payload_type: 0,
            telephone_event_pt: Some(101),
            remote_rtp: Some(SocketAddr::from(([127, 0, 0, 1], 40000))),
            remote_direction: Direction::SendRecv,
            local_direction: Direction::SendRecv,
            ptime_ms: 20,
        }
    }

    fn plan(record: bool, prompt: &[i16]) -> MediaPlan {
        MediaPlan {
            prompt: Some(Arc::new(Prompt::from_pcm(prompt, 8000).unwrap())),
            gate_until_prompt_done: true,
            pipeline_rate: PipelineRate::Hz8000,
            pipeline_format: Default::default(),
            echo_delay: None,
            record,
            rtp_source: RtpSourcePolicy::Strict,
        }
    }

    fn rtp(seq: u16, ts: u32, payload: &[u8]) -> Bytes {
        let mut p = vec![0x80, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x12, 0x34];
        p[2..4].copy_from_slice(&seq.to_be_bytes());
        p[4..8].copy_from_slice(&ts.to_be_bytes());
        p.extend_from_slice(payload);
        Bytes::from(p)
    }

    fn records(m: &mut MediaSession) -> Vec<(Vec<i16>, Vec<i16>)> {
        let mut out = Vec::new();
        while let Some(o) = m.poll_output() {
            if let MediaOutput::Record { left, right } = o {
                out.push((left, right));
            }
        }
        out
    }

    /// The tap emits one 20 ms stereo frame per tick from the first tick: the
    /// right channel is the prompt as sent (G.711 round trip), the left the
    /// caller (before the pipeline gate opens), silence where nothing flowed;
    /// `stop_recording` ends it.
    #[test]
    fn record_tap_carries_prompt_and_caller_until_stopped() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        let prompt: Vec<i16> = (0..1600).map(|i| ((i % 80) * 200 - 8000) as i16).collect();
        let t0 = Instant::now();
        let mut m = MediaSession::new(t0, &negotiated(), plan(true, &prompt), &mut rng).unwrap();
        let from = SocketAddr::from(([127, 0, 0, 1], 40000));
        let caller: Vec<u8> = (0..FRAME).map(|i| (i * 3 % 256) as u8).collect();
        let mut got = Vec::new();
        for tick in 0u16..20 {
            let now = t0 + TICK * u32::from(tick);
            if tick < 10 {
                m.on_rtp(now, from, rtp(tick, u32::from(tick) * 160, &caller));
            }
            m.handle_timeout(now, SystemTime::UNIX_EPOCH, &mut rng);
            got.extend(records(&mut m));
        }
        assert_eq!(got.len(), 20, "one record frame per tick from the first");
        assert!(
            got.iter()
                .all(|(l, r)| l.len() == FRAME && r.len() == FRAME)
        );
        let right: Vec<i16> = got.iter().flat_map(|(_, r)| r.clone()).collect();
        let expected: Vec<i16> = prompt
            .iter()
            .map(|&s| g711::decode_sample(Law::Mu, g711::encode_sample(Law::Mu, s)))
            .collect();
        assert_eq!(&right[..1600], &expected[..], "right = the prompt as sent");
        let mut decoded = vec![0i16; FRAME];
        g711::decode(Law::Mu, &caller, &mut decoded);
        let with_caller = got.iter().filter(|(l, _)| *l == decoded).count();
        assert!(
            with_caller >= 8,
            "caller frames in the left channel: {with_caller}"
        );
        // Before the jitter buffer releases the first packet: silence.
        let first = got.iter().position(|(l, _)| *l == decoded).unwrap();
        assert!(got[..first].iter().all(|(l, _)| l.iter().all(|&s| s == 0)));

        m.stop_recording();
        assert!(!m.is_recording());
        m.handle_timeout(t0 + TICK * 20, SystemTime::UNIX_EPOCH, &mut rng);
        assert!(records(&mut m).is_empty());
    }

    fn sent_rtp(m: &mut MediaSession) -> Vec<(u16, u32, Vec<u8>)> {
        let mut out = Vec::new();
        while let Some(o) = m.poll_output() {
            if let MediaOutput::Rtp { bytes, .. } = o {
                let seq = u16::from_be_bytes([bytes[2], bytes[3]]);
                let ts = u32::from_be_bytes([bytes[4], bytes[5], bytes[6], bytes[7]]);
                out.push((seq, ts, bytes[12..].to_vec()));
            }
        }
        out
    }

    /// A task that wakes late (by up to three ticks) still sends every tick's
    /// frame, with its own timestamp and in order: the caller hears the whole
    /// prompt, late but whole, however irregular the wake-ups. A stall beyond
    /// that skips the older ticks' frames and resumes on the media clock.
    #[test]
    fn late_wake_ups_send_every_frame_and_a_stall_resumes_on_time() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(3);
        // 40 distinct prompt frames.
        let prompt: Vec<i16> = (0..40 * FRAME)
            .map(|i| (((i / FRAME) as i32 - 20) * 1000 + (i % 7) as i32 * 50) as i16)
            .collect();
        let t0 = Instant::now();
        let mut m = MediaSession::new(t0, &negotiated(), plan(false, &prompt), &mut rng).unwrap();
        let frames = m.plan.prompt.clone().unwrap();
        let frames = frames.frames(Law::Mu);
        // Wake-ups in ms: prompt, 1 and 2.5 ticks late, then a 200 ms stall.
        let mut sent = Vec::new();
        for ms in [0u64, 20, 45, 50, 60, 130, 140, 160, 180, 200, 420, 440, 460] {
            m.handle_timeout(
                t0 + Duration::from_millis(ms),
                SystemTime::UNIX_EPOCH,
                &mut rng,
            );
            sent.extend(sent_rtp(&mut m));
        }
        let (seq0, ts0, _) = sent[0].clone();
        // Up to the stall (ticks 0..=10 at 200 ms): one packet per tick, in
        // order, each with its tick's timestamp and its prompt frame.
        for (k, (seq, ts, payload)) in sent.iter().take(11).enumerate() {
            assert_eq!(*seq, seq0.wrapping_add(k as u16), "sequence of packet {k}");
            assert_eq!(
                ts.wrapping_sub(ts0),
                160 * k as u32,
                "timestamp of packet {k}"
            );
            assert_eq!(payload[..], frames[k][..], "prompt frame {k}");
        }
        // After the stall (ticks 11..=21 due at 420 ms): the current tick and
        // the three before it are sent, with their own timestamps; the older
        // ones (11..=17) are not; then 22 and 23 on time.
        let after: Vec<u32> = sent[11..]
            .iter()
            .map(|(_, ts, _)| ts.wrapping_sub(ts0) / 160)
            .collect();
        assert_eq!(
            after,
            vec![18, 19, 20, 21, 22, 23],
            "ticks sent after the stall"
        );
        assert_eq!(m.counters().ticks_skipped, 7);
        assert_eq!(m.counters().rtp_out, sent.len() as u64);
    }

    /// The agent's keys go out after the audio queued before them, as RFC 4733
    /// events (start with marker, updates, three end packets with E set, all
    /// with the key's timestamp and the negotiated payload type), one key after
    /// the other; then the agent's later audio. Without telephone-event they
    /// are in-band tones. Invalid keys are refused.
    #[test]
    fn agent_keys_go_out_as_rfc4733_events_after_the_queued_audio() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(5);
        let t0 = Instant::now();
        let no_prompt = || MediaPlan {
            prompt: None,
            ..plan(false, &[0; 160])
        };
        let mut m = MediaSession::new(t0, &negotiated(), no_prompt(), &mut rng).unwrap();
        // 60 ms of agent audio, the keys, 40 ms more.
        m.push_pipeline_audio(t0, &[3000; 480]);
        m.send_dtmf("1#").unwrap();
        m.push_pipeline_audio(t0, &[-3000; 320]);
        assert_eq!(m.send_dtmf("12x"), Err(DtmfOutError::InvalidKey('x')));
        assert_eq!(m.send_dtmf(""), Err(DtmfOutError::Empty));
        let mut sent = Vec::new();
        for tick in 0u32..40 {
            m.handle_timeout(t0 + TICK * tick, SystemTime::UNIX_EPOCH, &mut rng);
            while let Some(o) = m.poll_output() {
                assert!(!matches!(o, MediaOutput::Mark(_)), "internal mark leaked");
                if let MediaOutput::Rtp { bytes, .. } = o {
                    sent.push((tick, bytes.to_vec()));
                }
            }
        }
        let pt = |b: &[u8]| b[1] & 0x7f;
        let events: Vec<&(u32, Vec<u8>)> = sent.iter().filter(|(_, b)| pt(b) == 101).collect();
        // Per key: start (marker), one update, three ends.
        assert_eq!(events.len(), 10, "{events:?}");
        for (key, code) in [(0usize, 1u8), (1, 11)] {
            let e = &events[key * 5..key * 5 + 5];
            let ts = &e[0].1[4..8];
            assert!(
                e.iter().all(|(_, b)| &b[4..8] == ts),
                "one timestamp per key"
            );
            assert!(e.iter().all(|(_, b)| b[12] == code), "event code");
            assert_eq!(e[0].1[1] & 0x80, 0x80, "marker on the first");
            let ends = e.iter().filter(|(_, b)| b[13] & 0x80 != 0).count();
            assert_eq!(ends, 3, "three end packets");
            assert_eq!(u16::from_be_bytes([e[4].1[14], e[4].1[15]]), 800, "100 ms");
        }
        // The first key starts after the 3 frames of audio queued before it;
        // audio queued after the keys comes after the last end packet.
        let first_event = events[0].0;
        let audio_before = sent
            .iter()
            .filter(|(t, b)| *t < first_event && pt(b) == 0 && b[12..].iter().any(|&c| c != 0xff))
            .count();
        assert_eq!(audio_before, 3);
        let last_event = events.last().unwrap().0;
        let later_audio = sent
            .iter()
            .filter(|(t, b)| *t > last_event && pt(b) == 0 && b[12..].iter().any(|&c| c != 0xff))
            .count();
        assert_eq!(later_audio, 2, "the audio sent after the keys");
        assert_eq!(m.dtmf_sent(), 2);

        // No telephone-event negotiated: in-band tones, 100 ms per key.
        let mut neg = negotiated();
        neg.telephone_event_pt = None;
        let mut m = MediaSession::new(t0, &neg, no_prompt(), &mut rng).unwrap();
        m.send_dtmf("5").unwrap();
        let mut tones = 0;
        for tick in 0u32..20 {
            m.handle_timeout(t0 + TICK * tick, SystemTime::UNIX_EPOCH, &mut rng);
            while let Some(o) = m.poll_output() {
                if let MediaOutput::Rtp { bytes, .. } = o {
                    assert_eq!(pt(&bytes), 0);
                    let mut pcm = [0i16; FRAME];
                    g711::decode(Law::Mu, &bytes[12..], &mut pcm);
                    if pcm.iter().map(|&s| i32::from(s).abs()).max().unwrap() > 4000 {
                        tones += 1;
                    }
                }
            }
        }
        assert_eq!(tones, 5);
    }

    /// Agent audio sent while the disclosure plays waits and is played right
    /// after it, up to the prompt's length plus 2 s; beyond that the oldest
    /// goes (counted). After the prompt, no such cap.
    #[test]
    fn agent_audio_during_the_prompt_waits_bounded_then_plays() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(6);
        let t0 = Instant::now();
        // A 0.5 s prompt (25 frames).
        let prompt: Vec<i16> = (0..4000).map(|i| ((i % 40) * 300 - 6000) as i16).collect();
        let mut m = MediaSession::new(t0, &negotiated(), plan(false, &prompt), &mut rng).unwrap();
        // 4 s of agent audio at once (200 frames, each its own level), at the start.
        let level = |k: usize| ((k % 100) as i16 - 50) * 100 + 7;
        let agent: Vec<i16> = (0..200 * FRAME).map(|i| level(i / FRAME)).collect();
        m.push_pipeline_audio(t0, &agent);
        // Capped at 0.5 + 2 s = 125 frames: the oldest 75 went.
        assert_eq!(m.counters().agent_frames_dropped, 75);
        let mut payloads = Vec::new();
        for tick in 0u32..160 {
            m.handle_timeout(t0 + TICK * tick, SystemTime::UNIX_EPOCH, &mut rng);
            payloads.extend(sent_rtp(&mut m).into_iter().map(|(_, _, p)| p));
        }
        // The prompt, then frames 75.. of the agent's audio, in order.
        let encoded = |k: usize| {
            let mut out = vec![0u8; FRAME];
            g711::encode(Law::Mu, &agent[k * FRAME..(k + 1) * FRAME], &mut out);
            out
        };
        let first = payloads
            .iter()
            .position(|p| *p == encoded(75))
            .expect("agent audio played");
        assert_eq!(first, 25, "right after the prompt");
        for k in 0..125 {
            assert_eq!(payloads[25 + k], encoded(75 + k), "agent frame {}", 75 + k);
        }
        // After the prompt a long push is not capped.
        m.push_pipeline_audio(t0, &agent);
        assert_eq!(m.counters().agent_frames_dropped, 75);
    }

    fn bare_plan() -> MediaPlan {
        MediaPlan {
            prompt: None,
            gate_until_prompt_done: false,
            pipeline_rate: PipelineRate::Hz8000,
            pipeline_format: Default::default(),
            echo_delay: None,
            record: false,
            rtp_source: RtpSourcePolicy::Strict,
        }
    }

    /// Runs the session as the daemon's task does, in virtual time:
    /// `handle_timeout` at every `poll_timeout` up to `until`. Returns what
    /// came out, each with the instant it was emitted.
    fn run_until(
        m: &mut MediaSession,
        until: Instant,
        rng: &mut impl RngCore,
    ) -> Vec<(Instant, MediaOutput)> {
        let mut out = Vec::new();
        while m.poll_timeout() <= until {
            let at = m.poll_timeout();
            m.handle_timeout(at, SystemTime::UNIX_EPOCH, rng);
            while let Some(o) = m.poll_output() {
                out.push((at, o));
            }
        }
        out
    }

    /// Feeds `packets` 20 ms packets (skipping those `drop` says), packet
    /// `k` arriving `phase + 20 ms·k` after the session's start, and runs the
    /// session on its own deadlines, exactly on time; returns the session.
    fn fed(phase: Duration, packets: u16, drop: impl Fn(u16) -> bool) -> MediaSession {
        let mut rng = rand::rngs::StdRng::seed_from_u64(9);
        let t0 = Instant::now();
        let mut m = MediaSession::new(t0, &negotiated(), bare_plan(), &mut rng).unwrap();
        let from = SocketAddr::from(([127, 0, 0, 1], 40000));
        let payload = [0x55u8; FRAME];
        for k in 0..packets {
            let at = t0 + phase + TICK * u32::from(k);
            run_until(&mut m, at, &mut rng);
            if !drop(k) {
                m.on_rtp(at, from, rtp(k, u32::from(k) * 160, &payload));
            }
        }
        run_until(&mut m, t0 + phase + TICK * u32::from(packets + 5), &mut rng);
        m
    }

    /// A clean stream, whatever its phase against the outbound clock: the
    /// jitter buffer plays it out on its own clock, so each packet is handed
    /// to the pipeline exactly the target after it arrived, nothing beyond;
    /// every frame is timed; no loss, MOS 4.41.
    #[test]
    fn inbound_latency_is_the_jitter_target_at_any_phase() {
        for phase_us in [0u64, 300, 3000, 9000, 11_000, 13_000, 19_700] {
            let m = fed(Duration::from_micros(phase_us), 100, |_| false);
            let q = m.quality();
            assert_eq!(q.latency_in.count(), 100, "phase {phase_us} µs");
            assert_eq!(q.latency_in_beyond_target.max(), Duration::ZERO, "{q:?}");
            assert_eq!(q.latency_in.max(), Duration::from_millis(40), "{q:?}");
            assert_eq!(q.loss_pct, 0.0);
            let mos = q.mos.unwrap();
            assert!((mos - 4.41).abs() < 0.01, "{mos}");
            assert!(q.jb_depth_max >= 1 && q.jb_depth_max <= 3, "{q:?}");
            assert!(q.jb_depth_avg > 0.5 && q.jb_depth_avg <= 3.0, "{q:?}");
        }
    }

    /// The call's first packets reach the session late (its task was busy
    /// setting calls up): three arrive together 70 ms after the first was
    /// sent, the rest on time. The grid anchored on that late start would
    /// hold every packet 70 ms beyond the target for the rest of the call;
    /// the buffer re-anchors within two seconds (its first window holds the
    /// late start itself), and from then on each packet reaches the
    /// pipeline within 5 ms of the target.
    #[test]
    fn a_late_start_is_re_anchored_after_start_up() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(9);
        let t0 = Instant::now();
        let mut m = MediaSession::new(t0, &negotiated(), bare_plan(), &mut rng).unwrap();
        let from = SocketAddr::from(([127, 0, 0, 1], 40000));
        let phase = Duration::from_micros(4_300);
        let sent = |k: u32| t0 + phase + TICK * k;
        let mut emitted = Vec::new();
        for k in 0u32..150 {
            let at = sent(k).max(sent(3) + Duration::from_millis(10));
            emitted.extend(run_until(&mut m, at, &mut rng));
            let level = (k as i16 % 100) * 200 - 10_000;
            let mut payload = [0u8; FRAME];
            g711::encode(Law::Mu, &[level; FRAME], &mut payload);
            m.on_rtp(at, from, rtp(k as u16, k * 160, &payload));
        }
        emitted.extend(run_until(&mut m, sent(160), &mut rng));
        let frames: Vec<Instant> = emitted
            .iter()
            .filter(|(_, o)| matches!(o, MediaOutput::CallerAudio(_)))
            .map(|(at, _)| *at)
            .collect();
        assert!(frames.len() >= 150, "{}", frames.len());
        assert!(m.jitter_stats().reanchors >= 1);
        assert_eq!(m.jitter_stats().late, 0, "nothing lost to it");
        // The i-th frame to the pipeline is packet i's audio.
        for (k, at) in frames.iter().enumerate().take(150).skip(105) {
            let beyond = at.saturating_duration_since(sent(k as u32) + Duration::from_millis(40));
            assert!(
                beyond <= Duration::from_millis(5),
                "packet {k}: {beyond:?} beyond"
            );
        }
    }

    /// An RTP packet sent: emitted at, marker, sequence, timestamp, payload.
    type SentRtp = (Instant, bool, u16, u32, Vec<u8>);

    /// An agent speaking in real time, 20 ms chunks every 20 ms, at
    /// `phase` after an outbound tick, for 50 chunks from 1 s into the call;
    /// returns every RTP packet sent (emitted at, marker, sequence,
    /// timestamp, payload) and the push instants.
    fn real_time_agent(
        rate: PipelineRate,
        phase: Duration,
        talkspurts: u32,
    ) -> (Vec<SentRtp>, Vec<Instant>, MediaSession) {
        real_time_agent_in(rate, PipelineFormat::Pcm, phase, talkspurts)
    }

    /// [`real_time_agent`] in a pipeline format: with G.711 the agent sends
    /// its 20 ms chunks as 160 µ-law codes.
    fn real_time_agent_in(
        rate: PipelineRate,
        format: PipelineFormat,
        phase: Duration,
        talkspurts: u32,
    ) -> (Vec<SentRtp>, Vec<Instant>, MediaSession) {
        let mut rng = rand::rngs::StdRng::seed_from_u64(11);
        let t0 = Instant::now();
        let mut plan = bare_plan();
        plan.pipeline_rate = rate;
        plan.pipeline_format = format;
        let (rate, g711) = match format.g711_law() {
            Some(law) => (PipelineRate::Hz8000, Some(law)),
            None => (rate, None),
        };
        let mut m = MediaSession::new(t0, &negotiated(), plan, &mut rng).unwrap();
        let mut out = Vec::new();
        let mut pushes = Vec::new();
        let n = rate.samples_per_20ms();
        for spurt in 0..talkspurts {
            // Each talkspurt 1 s after the last began, at its own phase.
            let begin = t0 + Duration::from_secs(u64::from(spurt) + 1) + phase * (spurt + 1);
            for k in 0u32..25 {
                let at = begin + TICK * k;
                out.extend(run_until(&mut m, at, &mut rng));
                let chunk: Vec<i16> = (0..n)
                    .map(|i| {
                        let t = (k as usize * n + i) as f64 / f64::from(rate.hz());
                        (8000.0 * (2.0 * std::f64::consts::PI * 440.0 * t).sin()) as i16
                    })
                    .collect();
                match g711 {
                    Some(law) => {
                        let mut codes = vec![0u8; chunk.len()];
                        g711::encode(law, &chunk, &mut codes);
                        m.push_pipeline_audio(at, &PipelineAudio::G711 { law, codes });
                    }
                    None => {
                        m.push_pipeline_audio(at, &chunk);
                    }
                }
                pushes.push(at);
            }
        }
        let end = t0 + Duration::from_secs(u64::from(talkspurts) + 2);
        out.extend(run_until(&mut m, end, &mut rng));
        let rtp = out
            .into_iter()
            .filter_map(|(at, o)| match o {
                MediaOutput::Rtp { bytes, .. } => Some((
                    at,
                    bytes[1] & 0x80 != 0,
                    u16::from_be_bytes([bytes[2], bytes[3]]),
                    u32::from_be_bytes([bytes[4], bytes[5], bytes[6], bytes[7]]),
                    bytes[12..].to_vec(),
                )),
                _ => None,
            })
            .collect();
        (rtp, pushes, m)
    }

    fn loud(payload: &[u8]) -> bool {
        let mut pcm = [0i16; FRAME];
        g711::decode(Law::Mu, payload, &mut pcm);
        pcm.iter().any(|s| s.unsigned_abs() > 1000)
    }

    /// Agent audio in → RTP out within 5 ms, at both pipeline rates, as
    /// G.711 (a Twilio-mode agent), and at any phase against the send clock:
    /// the first frame of a talkspurt leaves at once (marker bit set) and
    /// the send clock keeps its phase, so each later chunk leaves 2 ms after
    /// it came (the slack a real-time producer needs); at 16 kHz the
    /// downsampler runs causal, so a chunk completes its frame without
    /// waiting for the next (G.711: no filter, 160 codes are a frame). No
    /// filler gets between the chunks; sequence numbers and timestamps run on
    /// by 1 and 160; the latency accounting times it the same way.
    #[test]
    fn agent_audio_leaves_within_5_ms_of_arriving() {
        let mu = PipelineFormat::G711 {
            law: Law::Mu,
            with_pcm: false,
        };
        for (rate, format) in [
            (PipelineRate::Hz8000, PipelineFormat::Pcm),
            (PipelineRate::Hz16000, PipelineFormat::Pcm),
            (PipelineRate::Hz16000, mu),
        ] {
            for phase_us in [300u64, 7_300, 13_000, 19_900] {
                let phase = Duration::from_micros(phase_us);
                let (rtp, pushes, m) = real_time_agent_in(rate, format, phase, 1);
                let first = rtp.iter().position(|p| loud(&p.4)).expect("audio sent");
                for (k, pushed) in pushes.iter().enumerate() {
                    let (at, marker, ..) = &rtp[first + k];
                    assert!(
                        at.saturating_duration_since(*pushed) <= Duration::from_millis(5),
                        "{rate:?} {format:?} phase {phase_us} µs chunk {k}: {:?}",
                        at.saturating_duration_since(*pushed)
                    );
                    assert!(*at >= *pushed);
                    assert_eq!(*marker, k == 0, "marker on the first frame only");
                    if k < 24 {
                        assert!(loud(&rtp[first + k].4), "{rate:?} chunk {k} is audio");
                    }
                }
                for w in rtp.windows(2) {
                    assert_eq!(w[1].2, w[0].2.wrapping_add(1), "sequence");
                    assert_eq!(w[1].3, w[0].3.wrapping_add(160), "timestamp");
                }
                // Timed whenever a chunk finds the queue empty (each one at
                // 8 kHz; at 16 kHz the filter's tail is still queued).
                let q = m.quality();
                assert!(q.latency_out.count() >= 1);
                assert!(
                    q.latency_out.max() <= OUT_SLACK,
                    "{rate:?} {format:?} {phase_us}"
                );
            }
        }
    }

    /// Re-phasing sends frames before their slot on the old clock: the RTP
    /// timestamp gains on the sampling clock. Filler packets give it back
    /// (one held back per 20 ms gained), so after many talkspurts and a
    /// pause the timestamp is within a frame of the sampling clock, and the
    /// far end's jitter buffer never drifts.
    #[test]
    fn re_phasing_does_not_drift_the_timestamp() {
        let (rtp, _, _) = real_time_agent(PipelineRate::Hz8000, Duration::from_millis(1), 10);
        let (t_first, _, _, ts_first, _) = &rtp[0];
        let (t_last, _, _, ts_last, _) = rtp.last().unwrap();
        let wall = t_last.duration_since(*t_first).as_micros() as i64 * 8 / 1000;
        let ts = i64::from(ts_last.wrapping_sub(*ts_first));
        assert!(
            (ts - wall).abs() <= 160,
            "timestamp {ts} vs sampling clock {wall}"
        );
        let markers = rtp.iter().filter(|p| p.1).count();
        assert_eq!(markers, 11, "the first packet and each talkspurt");
    }

    /// A task that wakes late adds its lateness, and only that.
    #[test]
    fn a_late_wake_up_shows_as_latency_beyond_target() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(9);
        let t0 = Instant::now();
        let mut m = MediaSession::new(t0, &negotiated(), bare_plan(), &mut rng).unwrap();
        let from = SocketAddr::from(([127, 0, 0, 1], 40000));
        for k in 0u16..50 {
            let tick = t0 + TICK * u32::from(k);
            // Every tick runs 7 ms late.
            m.handle_timeout(
                tick + Duration::from_millis(7),
                SystemTime::UNIX_EPOCH,
                &mut rng,
            );
            while m.poll_output().is_some() {}
            m.on_rtp(tick, from, rtp(k, u32::from(k) * 160, &[0x55; FRAME]));
        }
        let q = m.quality();
        assert!(q.latency_in.count() >= 45);
        assert_eq!(q.latency_in_beyond_target.percentile_ms(50.0), Some(7.0));
        assert_eq!(q.latency_in_beyond_target.max(), Duration::from_millis(7));
    }

    /// 10 % of the packets lost: the loss shows, concealment counts the
    /// gaps, and the MOS is the E-model's for that loss (far below 4.41).
    #[test]
    fn a_lossy_stream_lowers_the_mos_as_the_e_model_says() {
        let m = fed(Duration::from_millis(5), 200, |k| k % 10 == 5);
        let q = m.quality();
        assert!((q.loss_pct - 10.0).abs() < 0.6, "{}", q.loss_pct);
        assert_eq!(q.concealed, 20);
        let expected = estimated_mos(q.one_way_delay_ms, q.loss_pct);
        let mos = q.mos.unwrap();
        assert!((mos - expected).abs() < 1e-9);
        assert!(mos < 1.8, "{mos}");
        let clean = fed(Duration::from_millis(5), 200, |_| false).quality();
        assert!(clean.mos.unwrap() > 4.4);
        // 1 % loss: MOS about 3.8.
        let one = fed(Duration::from_millis(5), 200, |k| k == 50 || k == 150).quality();
        let mos = one.mos.unwrap();
        assert!((mos - 3.83).abs() < 0.05, "{mos}");
    }

    /// Agent audio that finds the queue empty leaves at the next tick: 15 ms
    /// when it comes 5 ms after one; a mark behind two frames of it is
    /// reported with the second frame, 35 ms after it came.
    #[test]
    fn outbound_and_mark_to_playout_latency() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(4);
        let t0 = Instant::now();
        let mut m = MediaSession::new(t0, &negotiated(), bare_plan(), &mut rng).unwrap();
        let ms = Duration::from_millis;
        for k in 0u32..3 {
            m.handle_timeout(t0 + TICK * k, SystemTime::UNIX_EPOCH, &mut rng);
        }
        let at = t0 + TICK * 2 + ms(5);
        assert_eq!(m.push_pipeline_audio(at, &[3000; 2 * FRAME]), 2 * FRAME);
        m.mark(at, "end".into()).unwrap();
        let mut marks = 0;
        for k in 3u32..8 {
            m.handle_timeout(t0 + TICK * k, SystemTime::UNIX_EPOCH, &mut rng);
            while let Some(o) = m.poll_output() {
                marks += usize::from(matches!(o, MediaOutput::Mark(_)));
            }
        }
        assert_eq!(marks, 1);
        let q = m.quality();
        assert_eq!(q.latency_out.count(), 1);
        assert_eq!(q.latency_out.max(), ms(15));
        assert_eq!(q.mark_to_playout.count(), 1);
        assert_eq!(q.mark_to_playout.max(), ms(35));
        // More audio while some is queued is not a new measurement; after
        // the queue ran dry it is.
        m.push_pipeline_audio(t0 + TICK * 8 + ms(1), &[3000; FRAME]);
        m.push_pipeline_audio(t0 + TICK * 8 + ms(2), &[3000; FRAME]);
        for k in 9u32..12 {
            m.handle_timeout(t0 + TICK * k, SystemTime::UNIX_EPOCH, &mut rng);
        }
        let q = m.quality();
        assert_eq!(q.latency_out.count(), 2);
        assert_eq!(q.latency_out.percentile_ms(100.0), Some(19.0));
    }

    #[test]
    fn no_record_frames_when_the_plan_does_not_record() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(2);
        let t0 = Instant::now();
        let mut m =
            MediaSession::new(t0, &negotiated(), plan(false, &[1000; 800]), &mut rng).unwrap();
        for tick in 0u32..10 {
            m.handle_timeout(t0 + TICK * tick, SystemTime::UNIX_EPOCH, &mut rng);
        }
        assert!(!m.is_recording());
        assert!(records(&mut m).is_empty());
    }

    /// A Twilio-mode plan: the pipeline takes 8 kHz µ-law.
    fn g711_plan(record: bool) -> MediaPlan {
        MediaPlan {
            pipeline_rate: PipelineRate::Hz16000,
            pipeline_format: PipelineFormat::G711 {
                law: Law::Mu,
                with_pcm: false,
            },
            record,
            ..bare_plan()
        }
    }

    /// Distinct payloads for packet `k`: every code value occurs (0x7F, the
    /// µ-law negative zero, included), so a decode/encode cycle would show.
    fn codes(k: u16, len: usize) -> Vec<u8> {
        (0..len)
            .map(|i| (i as u32 * 7 + u32::from(k) * 31) as u8)
            .collect()
    }

    fn caller_frames(out: &[(Instant, MediaOutput)]) -> Vec<PcmFrame> {
        out.iter()
            .filter_map(|(_, o)| match o {
                MediaOutput::CallerAudio(f) => Some(f.clone()),
                _ => None,
            })
            .collect()
    }

    fn rtp_payloads(out: &[(Instant, MediaOutput)]) -> Vec<Vec<u8>> {
        out.iter()
            .filter_map(|(_, o)| match o {
                MediaOutput::Rtp { bytes, .. } => Some(bytes[12..].to_vec()),
                _ => None,
            })
            .collect()
    }

    /// Twilio mode, both ways, no transcoding: the bytes the agent gets are
    /// the caller's RTP payloads as they left the jitter buffer (no PCM
    /// beside them), and the agent's µ-law goes out as the RTP payloads, byte
    /// for byte, whatever sizes it arrives in; silence fills before and
    /// after it. The recording still hears both sides (decoded).
    #[test]
    fn twilio_mode_passes_mu_law_through_both_ways() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(21);
        let t0 = Instant::now();
        let mut m = MediaSession::new(t0, &negotiated(), g711_plan(true), &mut rng).unwrap();
        let from = SocketAddr::from(([127, 0, 0, 1], 40000));
        let mut out = Vec::new();
        for k in 0u16..20 {
            let at = t0 + TICK * u32::from(k);
            out.extend(run_until(&mut m, at, &mut rng));
            m.on_rtp(at, from, rtp(k, u32::from(k) * 160, &codes(k, FRAME)));
        }
        // The agent answers with 1 s of µ-law in uneven pieces.
        let agent: Vec<u8> = codes(1000, 50 * FRAME);
        let pushed_at = t0 + TICK * 20 + Duration::from_millis(3);
        out.extend(run_until(&mut m, pushed_at, &mut rng));
        for piece in agent.chunks(333) {
            let audio = PipelineAudio::G711 {
                law: Law::Mu,
                codes: piece.to_vec(),
            };
            assert_eq!(m.push_pipeline_audio(pushed_at, &audio), piece.len());
        }
        out.extend(run_until(&mut m, t0 + Duration::from_secs(3), &mut rng));

        // (After the last packet, concealment fades out: frames 20 on.)
        let frames = caller_frames(&out);
        assert!(frames.len() >= 20);
        for (k, f) in frames[..20].iter().enumerate() {
            let g = f.g711.as_ref().expect("µ-law for the agent");
            assert_eq!(g.law, Law::Mu);
            assert_eq!(g.codes[..], codes(k as u16, FRAME)[..], "frame {k}");
            assert!(f.samples.is_empty(), "no PCM when the pipeline takes none");
        }

        let payloads = rtp_payloads(&out);
        let first = payloads
            .iter()
            .position(|p| p.iter().any(|&c| c != Law::Mu.silence()))
            .expect("agent audio sent");
        assert!(payloads[..first].iter().all(|p| p == &[0xFF; FRAME]));
        let sent: Vec<u8> = payloads[first..first + 50].concat();
        assert_eq!(sent, agent, "the agent's µ-law is the RTP payload");
        assert!(payloads[first + 50..].iter().all(|p| p == &[0xFF; FRAME]));

        // The recording decodes both: the caller left, what was sent right.
        let recs: Vec<(Vec<i16>, Vec<i16>)> = out
            .iter()
            .filter_map(|(_, o)| match o {
                MediaOutput::Record { left, right } => Some((left.clone(), right.clone())),
                _ => None,
            })
            .collect();
        let decoded = |c: &[u8]| -> Vec<i16> { c.iter().map(|&c| g711::mu_to_linear(c)).collect() };
        // In order (silence where nothing flowed: before, after, and where
        // the send clock re-phased to the agent's talkspurt).
        let audible = |frames: Vec<&Vec<i16>>| -> Vec<Vec<i16>> {
            frames
                .into_iter()
                .filter(|f| f.iter().any(|&x| x != 0))
                .cloned()
                .collect()
        };
        let left = audible(recs.iter().map(|(l, _)| l).collect());
        let caller: Vec<Vec<i16>> = (0..20).map(|k| decoded(&codes(k, FRAME))).collect();
        assert_eq!(left[..20], caller[..], "the caller's frames, left");
        let right = audible(recs.iter().map(|(_, r)| r).collect());
        let agent: Vec<Vec<i16>> = agent.chunks(FRAME).map(decoded).collect();
        assert_eq!(right, agent, "the agent's frames, right");
    }

    /// A PCMA caller with a µ-law pipeline: at most a code-by-code A-law ↔
    /// µ-law conversion, both ways; with `with_pcm` the frame also carries
    /// PCM at the pipeline rate (for a Deepgram stream beside the agent).
    #[test]
    fn a_law_caller_is_converted_code_by_code_and_pcm_rides_along() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(22);
        let t0 = Instant::now();
        let neg = Negotiated {
            codec: Codec::Pcma,
            payload_type: 8,
            ..negotiated()
        };
        let plan = MediaPlan {
            pipeline_format: PipelineFormat::G711 {
                law: Law::Mu,
                with_pcm: true,
            },
            ..g711_plan(false)
        };
        let mut m = MediaSession::new(t0, &neg, plan, &mut rng).unwrap();
        let from = SocketAddr::from(([127, 0, 0, 1], 40000));
        let mut out = Vec::new();
        for k in 0u16..5 {
            let at = t0 + TICK * u32::from(k);
            out.extend(run_until(&mut m, at, &mut rng));
            let mut p = rtp(k, u32::from(k) * 160, &codes(k, FRAME)).to_vec();
            p[1] = 8;
            m.on_rtp(at, from, Bytes::from(p));
        }
        let agent = codes(77, FRAME);
        m.push_pipeline_audio(
            t0 + TICK * 5,
            &PipelineAudio::G711 {
                law: Law::Mu,
                codes: agent.clone(),
            },
        );
        out.extend(run_until(&mut m, t0 + TICK * 12, &mut rng));
        let frames = caller_frames(&out);
        assert!(frames.len() >= 5);
        for (k, f) in frames[..5].iter().enumerate() {
            let mut mu = vec![0u8; FRAME];
            g711::transcode(Law::A, Law::Mu, &codes(k as u16, FRAME), &mut mu);
            assert_eq!(f.g711.as_ref().unwrap().codes[..], mu[..]);
            assert_eq!(f.samples.len(), 320, "PCM at 16 kHz beside it");
            assert_eq!(f.rate, PipelineRate::Hz16000);
        }
        let mut a = vec![0u8; FRAME];
        g711::transcode(Law::Mu, Law::A, &agent, &mut a);
        assert!(
            rtp_payloads(&out).contains(&a),
            "the agent's µ-law as A-law"
        );
    }

    /// A lost packet: the pipeline still gets a frame, the concealment
    /// encoded (not silence, not a copy of a byte pattern); a 30 ms ptime is
    /// cut into 20 ms frames that are the payloads' bytes in order.
    #[test]
    fn concealment_and_other_ptimes_in_g711_mode() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(23);
        let t0 = Instant::now();
        let mut m = MediaSession::new(t0, &negotiated(), g711_plan(false), &mut rng).unwrap();
        let from = SocketAddr::from(([127, 0, 0, 1], 40000));
        // A loud tone, so concealment is audible.
        let tone: Vec<u8> = (0..FRAME)
            .map(|i| g711::linear_to_mu((8000.0 * (i as f64 * 0.3).sin()) as i16))
            .collect();
        let mut out = Vec::new();
        for k in 0u16..12 {
            let at = t0 + TICK * u32::from(k);
            out.extend(run_until(&mut m, at, &mut rng));
            if k != 6 {
                m.on_rtp(at, from, rtp(k, u32::from(k) * 160, &tone));
            }
        }
        out.extend(run_until(&mut m, t0 + TICK * 20, &mut rng));
        let frames = caller_frames(&out);
        assert!(frames.len() >= 12, "one frame per slot, the lost one too");
        let concealed: Vec<&PcmFrame> = frames[..12]
            .iter()
            .filter(|f| f.g711.as_ref().unwrap().codes[..] != tone[..])
            .collect();
        assert_eq!(concealed.len(), 1);
        let c = &concealed[0].g711.as_ref().unwrap().codes;
        assert_eq!(c.len(), FRAME);
        assert!(
            c.iter().any(|&b| b != Law::Mu.silence()),
            "concealment, not silence"
        );
        assert_eq!(m.counters().concealed, 1);

        // 30 ms packets.
        let neg = Negotiated {
            ptime_ms: 30,
            ..negotiated()
        };
        let mut m = MediaSession::new(t0, &neg, g711_plan(false), &mut rng).unwrap();
        let mut out = Vec::new();
        let mut sent = Vec::new();
        for k in 0u16..10 {
            let at = t0 + Duration::from_millis(30) * u32::from(k);
            out.extend(run_until(&mut m, at, &mut rng));
            let p = codes(k, 240);
            m.on_rtp(at, from, rtp(k, u32::from(k) * 240, &p));
            sent.extend(p);
        }
        out.extend(run_until(&mut m, t0 + Duration::from_millis(400), &mut rng));
        let got: Vec<u8> = caller_frames(&out)[..15]
            .iter()
            .flat_map(|f| f.g711.as_ref().unwrap().codes.to_vec())
            .collect();
        assert_eq!(got.len(), 15 * FRAME);
        assert_eq!(got, sent);
    }

    /// The echo pipeline in G.711: what the caller sent comes back as the
    /// same RTP payload bytes.
    #[test]
    fn echo_in_g711_returns_the_callers_bytes() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(24);
        let t0 = Instant::now();
        let plan = MediaPlan {
            echo_delay: Some(Duration::from_millis(200)),
            ..g711_plan(false)
        };
        let mut m = MediaSession::new(t0, &negotiated(), plan, &mut rng).unwrap();
        let from = SocketAddr::from(([127, 0, 0, 1], 40000));
        let mut out = Vec::new();
        for k in 0u16..10 {
            let at = t0 + TICK * u32::from(k);
            out.extend(run_until(&mut m, at, &mut rng));
            m.on_rtp(at, from, rtp(k, u32::from(k) * 160, &codes(k, FRAME)));
        }
        out.extend(run_until(&mut m, t0 + Duration::from_secs(1), &mut rng));
        let payloads = rtp_payloads(&out);
        let first = payloads
            .iter()
            .position(|p| *p == codes(0, FRAME))
            .expect("echoed");
        for k in 0..10 {
            assert_eq!(payloads[first + k], codes(k as u16, FRAME));
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod srtp_tests {
    use super::*;
    use crate::sip::sdp::{CryptoSuite, KeyMaterial, SrtpParams};
    use rand::SeedableRng;

    fn params(local: u8, remote: u8) -> SrtpParams {
        SrtpParams {
            suite: CryptoSuite::AesCm128HmacSha1_80,
            tag: 1,
            local: KeyMaterial::new(vec![local; 46]),
            remote: KeyMaterial::new(vec![remote; 46]),
        }
    }

    fn rtp(seq: u16, payload: &[u8]) -> Vec<u8> {
        let mut p = vec![0x80, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x12, 0x34];
        p[2..4].copy_from_slice(&seq.to_be_bytes());
        p[4..8].copy_from_slice(&(u32::from(seq) * 160).to_be_bytes());
        p.extend_from_slice(payload);
        p
    }

    /// With SRTP negotiated, only packets the peer's key authenticates get in
    /// (plain RTP is dropped and counted) and every RTP packet out is SRTP.
    #[test]
    fn srtp_call_takes_only_authenticated_packets_and_sends_only_srtp() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(3);
        let neg = Negotiated {
            codec: Codec::Pcmu,
            payload_type: 0,
            telephone_event_pt: None,
            remote_rtp: Some(SocketAddr::from(([127, 0, 0, 1], 40000))),
            remote_direction: Direction::SendRecv,
            local_direction: Direction::SendRecv,
            ptime_ms: 20,
            srtp: Some(params(1, 2)),
        };
        let plan = MediaPlan {
            prompt: None,
            gate_until_prompt_done: false,
            pipeline_rate: crate::media::resample::PipelineRate::Hz8000,
            pipeline_format: Default::default(),
            echo_delay: None,
            record: false,
            rtp_source: RtpSourcePolicy::Strict,
        };
        let t0 = Instant::now();
        let mut m = MediaSession::new(t0, &neg, plan, &mut rng).unwrap();
        let mut peer = crate::media::srtp::SrtpSession::new(&params(2, 1)).unwrap();
        let from = SocketAddr::from(([127, 0, 0, 1], 40000));

        assert!(!m.on_rtp(t0, from, rtp(1, &[0x11; 160]).into()));
        assert_eq!(m.counters().srtp_rejected, 1);
        let wire = peer.protect_rtp(&rtp(2, &[0x11; 160])).unwrap();
        assert!(m.on_rtp(t0, from, wire.clone()));
        assert!(!m.on_rtp(t0, from, wire), "replay");
        assert_eq!(m.counters().srtp_rejected, 2);

        m.handle_timeout(t0 + TICK, SystemTime::UNIX_EPOCH, &mut rng);
        let mut sent = 0;
        while let Some(o) = m.poll_output() {
            if let MediaOutput::Rtp { bytes, .. } = o {
                assert_eq!(bytes.len(), 12 + 160 + 10, "SRTP tag appended");
                let plain = peer.unprotect_rtp(&bytes).unwrap();
                assert_eq!(plain.len(), 12 + 160);
                sent += 1;
            }
        }
        assert!(sent >= 1);
    }
}
