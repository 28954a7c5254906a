//! Network pipelines of a call (DESIGN §3): async adapters that carry the
//! caller's PCM out of the call task and the pipeline's answers back in.
//!
//! Owns: one tokio task per call per pipeline connection, the bounded
//! channels between it and the call task ([`PipelineHandle`]), and the wire
//! protocols (the native agent protocol, `docs/agent-protocol.md`, and
//! Twilio Media Streams, [`twilio`]), opened by [`connect`].
//! Must not touch: SIP or media state. The call task (`daemon::run_call`)
//! feeds frames in with non-blocking sends and applies the
//! [`AgentCommand`]s it receives to its `Call` and `MediaSession`; a slow or
//! dead pipeline therefore never stalls the media path or other calls.

pub mod connect;
pub mod native;
pub mod twilio;

use crate::call::PcmFrame;
use crate::config::{AgentAuth, AgentMode, AgentSettings};
use rustls_pki_types::CertificateDer;
use tokio::sync::mpsc;

/// Caller frames buffered towards the pipeline at most (50 × 20 ms = 1 s);
/// beyond it frames are dropped and counted.
pub const AUDIO_QUEUE_FRAMES: usize = 50;
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
    /// Tenant id.
    pub tenant: String,
    /// Caller (From user part).
    pub from: String,
    /// Dialed number.
    pub to: String,
    /// The INVITE's `X-` headers (name as received, value), in order.
    pub custom: Vec<(String, String)>,
    /// Sample rate of the PCM both ways (the tenant's `pipeline_rate`).
    pub sample_rate: u32,
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
}

impl PipelineSpec {
    /// The pipeline for a tenant's agent settings, in its configured mode.
    pub fn for_agent(settings: &AgentSettings) -> PipelineSpec {
        let target = AgentTarget::for_settings(settings);
        match settings.mode {
            AgentMode::Twilio => PipelineSpec::Twilio(target),
            AgentMode::Native => PipelineSpec::Native(target),
        }
    }
}

/// What the pipeline asks the call to do.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum AgentCommand {
    /// PCM at the pipeline rate to play after what is queued.
    Play(Vec<i16>),
    /// A mark after the audio queued so far.
    Mark(String),
    /// Barge-in: drop the queued audio.
    Clear,
    /// End the call (BYE).
    HangUp,
}

/// Events towards the pipeline other than audio.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Event {
    Dtmf(char),
    Mark { name: String, cleared: bool },
}

/// The call task's end of a pipeline connection. Dropping it ends the
/// connection: the task sends what is queued, then `stop`, then closes.
#[derive(Debug)]
pub struct PipelineHandle {
    audio: mpsc::Sender<Vec<i16>>,
    events: mpsc::Sender<Event>,
    commands: mpsc::Receiver<AgentCommand>,
    commands_open: bool,
    dropped: u64,
}

impl PipelineHandle {
    /// Connects this call to its pipeline in a new task.
    /// Must be called inside a tokio runtime.
    pub fn spawn(spec: PipelineSpec, info: CallInfo) -> PipelineHandle {
        let (audio_tx, audio_rx) = mpsc::channel(AUDIO_QUEUE_FRAMES);
        let (event_tx, event_rx) = mpsc::channel(EVENT_QUEUE);
        let (cmd_tx, cmd_rx) = mpsc::channel(COMMAND_QUEUE);
        let chans = native::Channels {
            audio: audio_rx,
            events: event_rx,
            commands: cmd_tx,
        };
        match spec {
            PipelineSpec::Native(target) => tokio::spawn(native::run(target, info, chans)),
            PipelineSpec::Twilio(target) => tokio::spawn(twilio::run(target, info, chans)),
        };
        PipelineHandle {
            audio: audio_tx,
            events: event_tx,
            commands: cmd_rx,
            commands_open: true,
            dropped: 0,
        }
    }

    /// Queues a caller frame without waiting; a full queue drops it (counted).
    /// Frames after the connection has ended are discarded silently.
    pub fn send_audio(&mut self, frame: &PcmFrame) {
        if let Err(mpsc::error::TrySendError::Full(_)) = self.audio.try_send(frame.samples.clone())
        {
            self.dropped += 1;
        }
    }

    /// Queues a DTMF digit without waiting.
    pub fn send_dtmf(&mut self, digit: char) {
        let _ = self.events.try_send(Event::Dtmf(digit));
    }

    /// Queues a "mark played" (or cleared) report without waiting.
    pub fn send_mark(&mut self, name: String, cleared: bool) {
        let _ = self.events.try_send(Event::Mark { name, cleared });
    }

    /// Caller frames dropped because the pipeline was behind.
    pub fn dropped_frames(&self) -> u64 {
        self.dropped
    }

    /// The next command from the pipeline; never resolves once the
    /// connection has ended (so it can sit in a `select!`).
    pub async fn recv(&mut self) -> AgentCommand {
        if self.commands_open {
            if let Some(cmd) = self.commands.recv().await {
                return cmd;
            }
            self.commands_open = false;
        }
        std::future::pending().await
    }
}

pub use crate::config::redact_url;

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
