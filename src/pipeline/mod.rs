//! Network pipelines of a call (DESIGN §3): async adapters that carry the
//! caller's PCM out of the call task and the pipeline's answers back in.
//!
//! Owns: one tokio task per call per pipeline connection, the bounded
//! channels between it and the call task ([`PipelineHandle`]), and the wire
//! protocols (the native agent protocol, `docs/agent-protocol.md`; Twilio
//! Media Streams, [`twilio`]; Telnyx Media Streaming, [`telnyx`]; the two
//! carrier dialects share one connection task, [`media_stream`]; Deepgram
//! live speech-to-text, [`deepgram`]), agents' connections opened by
//! [`connect`].
//! Must not touch: SIP or media state. The call task (`daemon::run_call`)
//! feeds frames in with non-blocking sends and applies the
//! [`AgentCommand`]s it receives to its `Call` and `MediaSession`; a slow or
//! dead pipeline therefore never stalls the media path or other calls.
//!
//! One [`PipelineHandle`] is one connection attempt. Its task reports how the
//! attempt went ([`AgentCommand::Connected`], [`AgentCommand::Failed`]) and
//! ends after a failure; whether and when to reconnect is decided by the
//! call's sans-IO `call::supervisor::PipelineSupervisor`, and the call task
//! spawns a new handle when it says so.

pub mod connect;
pub mod deepgram;
pub mod media_stream;
pub mod native;
pub mod telnyx;
pub mod twilio;

use crate::call::supervisor::ConnectionFailure;
use crate::call::{PcmFrame, PipelineAudio};
use crate::config::{AgentAuth, AgentMode, AgentSettings, TelnyxEncoding};
use rustls_pki_types::CertificateDer;
use tokio::sync::mpsc;

/// Caller frames buffered towards the pipeline at most (50 × 20 ms = 1 s);
/// beyond it frames are dropped and counted.
pub const AUDIO_QUEUE_FRAMES: usize = crate::call::bridged::BACKLOG_FRAMES;
/// DTMF and mark events buffered towards the pipeline at most.
pub const EVENT_QUEUE: usize = 64;
/// Commands from the pipeline buffered towards the call task at most (the
/// WebSocket task waits when it is full: that back-pressures the agent,
/// never the media path).
pub const COMMAND_QUEUE: usize = 64;

/// What the bridge tells the agent about a call in `start`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CallInfo {
    /// SIP Call-ID.
    pub call_id: String,
    /// Whether the caller called us or we dialled (admin API `POST /v1/calls`).
    pub direction: crate::call::CallDirection,
    /// Tenant id.
    pub tenant: String,
    /// The tenant's Twilio-compatible account SID (`[tenant.twilio_api]`), if it has
    /// one: Twilio mode's `accountSid` (else the tenant id).
    pub account_sid: Option<String>,
    /// Caller (From user part).
    pub from: String,
    /// Dialed number.
    pub to: String,
    /// The INVITE's `X-` headers (name as received, value), in order; for
    /// an outbound call, the `custom` parameters of `POST /v1/calls`.
    pub custom: Vec<(String, String)>,
    /// Sample rate of the PCM both ways (the tenant's `pipeline_rate`).
    pub sample_rate: u32,
}

impl CallInfo {
    /// The `X-` headers as a JSON object of strings (each dialect's custom
    /// parameters); the n-th reconnected stream of a carrier dialect
    /// (`reconnect` n, not 0) also says `"sipbridge_reconnect": "n"` there,
    /// as neither Twilio nor Telnyx has a field for it.
    pub fn custom_parameters(&self, reconnect: u32) -> serde_json::Map<String, serde_json::Value> {
        let mut custom: serde_json::Map<String, serde_json::Value> = self
            .custom
            .iter()
            .map(|(k, v)| (k.clone(), serde_json::Value::String(v.clone())))
            .collect();
        if reconnect > 0 {
            custom.insert(
                "sipbridge_reconnect".to_owned(),
                serde_json::Value::String(reconnect.to_string()),
            );
        }
        custom
    }
}

/// How to reach a tenant's agent.
#[derive(Clone)]
pub struct AgentTarget {
    /// `ws://` or `wss://` URL (may hold secrets in its query: never log it whole).
    pub url: String,
    /// Bearer token or HMAC secret, if any.
    pub auth: Option<AgentAuth>,
    /// Trust anchors for `wss://` besides the webpki roots (the tenant's `ca_file`).
    pub ca_certs: Vec<CertificateDer<'static>>,
}

impl std::fmt::Debug for AgentTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentTarget")
            .field("url", &redact_url(&self.url))
            .field(
                "auth",
                &self
                    .auth
                    .as_ref()
                    .map(|a| (a.kind(), a.secret().fingerprint())),
            )
            .field("ca_certs", &self.ca_certs.len())
            .finish()
    }
}

impl AgentTarget {
    /// The target for a tenant's agent settings (any mode).
    pub fn for_settings(settings: &AgentSettings) -> AgentTarget {
        AgentTarget {
            url: settings.url.clone(),
            auth: settings.auth.clone(),
            ca_certs: settings
                .ca_file
                .as_ref()
                .map_or_else(Vec::new, |c| c.certs.clone()),
        }
    }
}

/// Which pipeline a call connects to, resolved from its tenant's settings
/// when the call starts (a reload later does not change a live call's).
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum PipelineSpec {
    /// An agent speaking the native protocol.
    Native(AgentTarget),
    /// An agent speaking Twilio Media Streams.
    Twilio(AgentTarget),
    /// An agent speaking Telnyx Media Streaming, in this encoding.
    Telnyx(AgentTarget, TelnyxEncoding),
    /// Deepgram live transcription of the caller.
    Deepgram(deepgram::DeepgramTarget),
}

impl PipelineSpec {
    /// The pipeline for a tenant's agent settings, in its configured mode.
    pub fn for_agent(settings: &AgentSettings) -> PipelineSpec {
        let target = AgentTarget::for_settings(settings);
        match settings.mode {
            AgentMode::Twilio => PipelineSpec::Twilio(target),
            AgentMode::Telnyx(encoding) => PipelineSpec::Telnyx(target, encoding),
            _ => PipelineSpec::Native(target),
        }
    }
}

/// Starts an agent connection task in its dialect (Deepgram is started by
/// [`PipelineHandle::spawn`] itself).
fn spawn_agent(spec: PipelineSpec, info: CallInfo, attempt: u32, chans: native::Channels) {
    match spec {
        PipelineSpec::Twilio(target) => {
            tokio::spawn(twilio::run(target, info, attempt, chans));
        }
        PipelineSpec::Telnyx(target, encoding) => {
            tokio::spawn(telnyx::run(target, info, attempt, chans, encoding));
        }
        PipelineSpec::Native(target) => {
            tokio::spawn(native::run(target, info, attempt, chans));
        }
        // Not an agent: nothing connects, the call's supervisor times out.
        PipelineSpec::Deepgram(_) => {}
    }
}

/// A final transcript segment of the call.
#[derive(Debug, Clone, PartialEq)]
pub struct Transcript {
    /// Who spoke (the caller, for Deepgram).
    pub speaker: crate::store::db::Speaker,
    /// The recognised text.
    pub text: String,
    /// Start, ms from the call's media start.
    pub start_ms: u64,
    /// End, ms from the call's media start.
    pub end_ms: u64,
    /// Recogniser confidence, clamped to 0..=1 (NaN becomes 0).
    pub confidence: f32,
}

// `confidence` is never NaN (see `Transcript::caller`), so equality is total.
impl Eq for Transcript {}

impl Transcript {
    /// A segment the caller spoke.
    pub fn caller(text: String, start_ms: u64, end_ms: u64, confidence: f32) -> Transcript {
        let confidence = if confidence.is_nan() {
            0.0
        } else {
            confidence.clamp(0.0, 1.0)
        };
        Transcript {
            speaker: crate::store::db::Speaker::Caller,
            text,
            start_ms,
            end_ms,
            confidence,
        }
    }
}

/// What the pipeline asks the call to do.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum AgentCommand {
    /// Audio to play after what is queued: PCM at the pipeline rate, or
    /// 8 kHz G.711 as a Twilio- or Telnyx-mode agent sends it.
    Play(PipelineAudio),
    /// A mark after the audio queued so far.
    Mark(String),
    /// Barge-in: drop the queued audio.
    Clear,
    /// End the call (BYE).
    HangUp,
    /// Pause (`true`) or resume (`false`) the recording and the transcript
    /// (PCI: card numbers read out).
    PauseRecording(bool),
    /// Keys to send to the caller's side (`{"event":"dtmf","digits":…}`).
    SendDtmf(String),
    /// Transfer the caller (`{"event":"transfer","to":…,"mode":…}`); the
    /// call checks both.
    Transfer {
        /// The target as the agent wrote it (at most 512 characters).
        to: String,
        /// `blind` or `bridge`; `None`: the agent gave none (blind).
        mode: Option<String>,
    },
    /// A final transcript segment (for the store).
    Transcript(Transcript),
    /// The connection is up (before any other command of this connection).
    Connected,
    /// The connection attempt or the connection failed; the task has ended
    /// and nothing else comes from this handle.
    Failed(ConnectionFailure),
}

/// Events towards the pipeline other than audio.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Event {
    Dtmf(char),
    Mark {
        name: String,
        cleared: bool,
    },
    Transcript(Transcript),
    /// The call's quality figures (native protocol only: the other modes
    /// send nothing for it).
    Stats {
        media_time: std::time::Duration,
        quality: Box<crate::call::QualitySummary>,
    },
    /// A step of a transfer the agent asked for (every mode).
    Transfer(crate::call::transfer::TransferUpdate),
}

/// The call task's end of a pipeline connection. Dropping it ends the
/// connection: the task sends what is queued, then `stop`, then closes.
#[derive(Debug)]
pub struct PipelineHandle {
    audio: mpsc::Sender<PcmFrame>,
    /// Timed frames for a Deepgram connection, when the pipeline has one.
    stt: Option<mpsc::Sender<PcmFrame>>,
    events: mpsc::Sender<Event>,
    commands: mpsc::Receiver<AgentCommand>,
    commands_open: bool,
    dropped: u64,
}

impl PipelineHandle {
    /// Connects this call to its pipeline in a new task; `attempt` is 0 for
    /// the call's first connection, n for its n-th reconnect (the agent's
    /// `start` says so). Must be called inside a tokio runtime.
    pub fn spawn(spec: PipelineSpec, info: CallInfo, attempt: u32) -> PipelineHandle {
        let (audio_tx, audio_rx) = mpsc::channel(AUDIO_QUEUE_FRAMES);
        let (event_tx, event_rx) = mpsc::channel(EVENT_QUEUE);
        let (cmd_tx, cmd_rx) = mpsc::channel(COMMAND_QUEUE);
        let chans = native::Channels {
            audio: audio_rx,
            events: event_rx,
            commands: cmd_tx,
        };
        let mut stt = None;
        match spec {
            spec @ (PipelineSpec::Native(_)
            | PipelineSpec::Twilio(_)
            | PipelineSpec::Telnyx(..)) => {
                spawn_agent(spec, info, attempt, chans);
            }
            PipelineSpec::Deepgram(target) => {
                let (stt_tx, stt_rx) = mpsc::channel(AUDIO_QUEUE_FRAMES);
                stt = Some(stt_tx);
                // The Deepgram task reconnects by itself and a Deepgram
                // failure never ends the call: to the call's supervisor the
                // pipeline is up from the start (the channel is new, so
                // this cannot fail).
                let _ = chans.commands.try_send(AgentCommand::Connected);
                let chans = deepgram::Channels {
                    audio: stt_rx,
                    commands: chans.commands,
                };
                tokio::spawn(deepgram::run(target, info.call_id, chans));
            }
        }
        PipelineHandle {
            audio: audio_tx,
            stt,
            events: event_tx,
            commands: cmd_rx,
            commands_open: true,
            dropped: 0,
        }
    }

    /// Queues a caller frame without waiting; a full queue drops it (counted).
    /// Frames after the connection has ended are discarded silently.
    pub fn send_audio(&mut self, frame: &PcmFrame) {
        if let Some(stt) = &self.stt {
            if let Err(mpsc::error::TrySendError::Full(_)) = stt.try_send(frame.clone()) {
                self.dropped += 1;
            }
            if self.audio.is_closed() {
                return;
            }
        }
        if let Err(mpsc::error::TrySendError::Full(_)) = self.audio.try_send(frame.clone()) {
            self.dropped += 1;
        }
    }

    /// Queues a DTMF digit without waiting.
    pub fn send_dtmf(&mut self, digit: char) {
        let _ = self.events.try_send(Event::Dtmf(digit));
    }

    /// Queues a final transcript for the agent without waiting (a native
    /// agent gets a `transcript` event; Twilio and Telnyx streams have none).
    pub fn send_transcript(&mut self, transcript: Transcript) {
        let _ = self.events.try_send(Event::Transcript(transcript));
    }

    /// Queues a "mark played" (or cleared) report without waiting.
    pub fn send_mark(&mut self, name: String, cleared: bool) {
        let _ = self.events.try_send(Event::Mark { name, cleared });
    }

    /// Queues the call's quality figures without waiting (a native agent
    /// gets a `stats` event; Twilio and Telnyx streams have none).
    pub fn send_stats(
        &mut self,
        media_time: std::time::Duration,
        quality: Box<crate::call::QualitySummary>,
    ) {
        let _ = self.events.try_send(Event::Stats {
            media_time,
            quality,
        });
    }

    /// Queues a transfer step for the agent without waiting.
    pub fn send_transfer(&mut self, update: crate::call::transfer::TransferUpdate) {
        let _ = self.events.try_send(Event::Transfer(update));
    }

    /// Caller frames dropped because the pipeline was behind.
    pub fn dropped_frames(&self) -> u64 {
        self.dropped
    }

    /// Ends the call's side of the connection (the pipeline closes its
    /// stream, e.g. Deepgram's `CloseStream`) and returns what the pipeline
    /// still has to say; the receiver closes once the pipeline task is done.
    pub fn finish(self) -> mpsc::Receiver<AgentCommand> {
        self.commands
    }

    /// The next command from the pipeline; pending for good once the
    /// connection has ended (so it can be polled beside a call's other
    /// sources).
    pub fn poll_recv(&mut self, cx: &mut std::task::Context<'_>) -> std::task::Poll<AgentCommand> {
        if self.commands_open {
            match self.commands.poll_recv(cx) {
                std::task::Poll::Ready(Some(cmd)) => return std::task::Poll::Ready(cmd),
                std::task::Poll::Ready(None) => self.commands_open = false,
                std::task::Poll::Pending => {}
            }
        }
        std::task::Poll::Pending
    }
}

pub use crate::config::redact_url;

/// The longest transfer target or mode taken from an agent's message (the
/// call refuses targets longer than `transfer::MAX_TARGET_LEN` anyway).
const MAX_TRANSFER_FIELD: usize = 512;

/// An agent's transfer request from its JSON fields (`to` required, `mode`
/// optional); the same in every mode.
pub(crate) fn transfer_command(fields: &serde_json::Value) -> Option<AgentCommand> {
    let clip = |s: &str| s.chars().take(MAX_TRANSFER_FIELD).collect::<String>();
    let to = clip(fields.get("to")?.as_str()?);
    let mode = match fields.get("mode") {
        None | Some(serde_json::Value::Null) => None,
        Some(m) => Some(clip(m.as_str()?)),
    };
    Some(AgentCommand::Transfer { to, mode })
}

/// The fields of a transfer step as the agent sees them (inside `transfer`
/// in the Twilio and Telnyx modes, at the top level in the native one):
/// `result`, `to`, `mode`, and `status`/`reason` when there are some.
pub(crate) fn transfer_fields(
    u: &crate::call::transfer::TransferUpdate,
) -> serde_json::Map<String, serde_json::Value> {
    let mut m = serde_json::Map::new();
    m.insert("result".into(), u.state.result().into());
    m.insert("to".into(), u.to.clone().into());
    m.insert("mode".into(), u.mode.as_str().into());
    if let Some(s) = u.status {
        m.insert("status".into(), s.into());
    }
    if let crate::call::transfer::TransferState::Failed(f) = u.state {
        m.insert("reason".into(), f.as_str().into());
    }
    m
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redact_url_keeps_scheme_host_port_path_only() {
        assert_eq!(
            redact_url("wss://user:pw@agent.example:8443/v1/call?token=abc#x"),
            "wss://agent.example:8443/v1/call"
        );
        assert_eq!(redact_url("ws://127.0.0.1:9000"), "ws://127.0.0.1:9000");
        assert_eq!(redact_url("ws://h?key=1"), "ws://h");
        assert_eq!(redact_url("no scheme?key=1"), "<invalid url>");
    }
}
