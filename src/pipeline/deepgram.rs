//! Deepgram live speech-to-text (`/v1/listen`, `shared/specs/deepgram-live.md`):
//! one WebSocket per call that carries the caller's PCM out and brings final
//! transcripts back as [`AgentCommand::Transcript`].
//!
//! Owns: the listen URL ([`listen_url`]), the server-message parser
//! ([`parse_server_text`]), the mapping from Deepgram's stream time to call
//! media time across reconnects ([`StreamClock`]), and the connection task
//! ([`run`]): KeepAlive while no audio flows, `Finalize` + `CloseStream` at
//! call end with a bounded wait for the last Results and Metadata, reconnect
//! with a bounded backoff schedule and a bounded audio buffer meanwhile.
//! Must not touch: call or media state (it talks to the call task only through
//! [`Channels`]) or the store (the call task hands transcripts on).
//!
//! Why a direct tokio-tungstenite client and not the `deepgram` crate: the
//! crate brings its own tokio-tungstenite/reqwest versions and TLS stack (a
//! second WebSocket stack beside the one the agent pipelines use, and a second
//! place to configure `wss://`); its typed `StreamResponse` requires fields the
//! spec marks optional (`from_finalize`), so one such message ends its stream;
//! and reconnect with timestamp rebasing, KeepAlive only while idle, and the
//! HTTP status of a refused upgrade (401 vs 400, for the log) all need the
//! connection loop in our hands. The WebSocket itself is tokio-tungstenite's.
//!
//! The API key only ever goes into the `Authorization` header (marked
//! sensitive); errors and logs carry the call id, the listen URL (which holds
//! no secret) and the server's `dg-error` text.

use super::{AgentCommand, Transcript};
use crate::call::PcmFrame;
use crate::config::{DeepgramSettings, Secret};
use futures_util::{SinkExt, StreamExt};
use std::collections::VecDeque;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tracing::{debug, info, warn};

/// How long one connection attempt (TCP + TLS + upgrade) may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// A KeepAlive goes out when nothing was sent for this long (the spec's
/// 3–5 s cadence; Deepgram closes after about 10 s of silence on the socket).
pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(3);
/// How long the bridge waits, after `CloseStream`, for the last Results,
/// Metadata and the close.
pub const CLOSE_WAIT: Duration = Duration::from_secs(3);
/// Pauses before each reconnect attempt after a connection failed or dropped;
/// past the last one the call carries on without transcription.
pub const RECONNECT_BACKOFF: [Duration; 4] = [
    Duration::from_millis(100),
    Duration::from_millis(400),
    Duration::from_millis(1000),
    Duration::from_millis(2000),
];
/// Connections per call at most (a server that accepts and drops at once
/// cannot make the task loop forever).
pub const MAX_CONNECTIONS: u32 = 16;
/// A connection that lived this long resets the backoff schedule.
const STABLE_CONNECTION: Duration = Duration::from_secs(10);
/// Caller frames held while (re)connecting (250 × 20 ms = 5 s); older ones
/// are dropped and counted.
pub const RECONNECT_BUFFER_FRAMES: usize = 250;
/// Largest message accepted from Deepgram.
pub const MAX_MESSAGE_BYTES: usize = 1 << 20;
/// Longest transcript segment kept (bytes); longer text is cut at a char boundary.
pub const MAX_TRANSCRIPT_BYTES: usize = 16 * 1024;
/// Frames whose media time is this much later than the previous frame's end
/// start a new anchor in the [`StreamClock`] (hold, lost packets).
const GAP_TOLERANCE: Duration = Duration::from_millis(30);
/// Anchors kept per connection at most.
const MAX_ANCHORS: usize = 4096;
/// Frames of exact digital silence still sent after audio stops (1 s, so
/// Deepgram's endpointing sees the pause); past them the caller is treated as
/// silent (hold, no RTP: the media session then yields zeros) and KeepAlive
/// takes over, so silence is not streamed (and billed) for minutes.
pub const SILENCE_FRAMES_SENT: u32 = 50;

/// Why a Deepgram connection failed or ended (logged, never shown to callers).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DeepgramError {
    /// The listen URL cannot be used (e.g. `wss://` in a build without TLS).
    #[error("listen URL not usable: {0}")]
    InvalidUrl(String),
    /// The API key is not a valid header value.
    #[error("api key is not a valid header value")]
    InvalidKey,
    /// No connection within [`CONNECT_TIMEOUT`].
    #[error("connect timed out")]
    ConnectTimeout,
    /// Deepgram answered the upgrade with an HTTP status (`dg-error` text).
    #[error("upgrade rejected with HTTP {status}: {reason}")]
    Rejected {
        /// HTTP status.
        status: u16,
        /// The `dg-error` header, if any (server text, holds no secret).
        reason: String,
    },
    /// Deepgram closed the stream (e.g. 1011 `NET-0001` when idle).
    #[error("closed by deepgram: {code} {reason}")]
    Closed {
        /// WebSocket close code.
        code: u16,
        /// Close reason.
        reason: String,
    },
    /// Any other WebSocket or I/O failure.
    #[error("websocket: {0}")]
    Ws(String),
}

impl DeepgramError {
    /// A refusal that another attempt would get again (bad key, bad query,
    /// no credit, not allowed): no reconnect.
    pub fn is_permanent(&self) -> bool {
        matches!(
            self,
            DeepgramError::InvalidUrl(_)
                | DeepgramError::InvalidKey
                | DeepgramError::Rejected {
                    status: 400..=403,
                    ..
                }
        )
    }
}

impl From<WsError> for DeepgramError {
    fn from(e: WsError) -> DeepgramError {
        match e {
            WsError::Http(resp) => DeepgramError::Rejected {
                status: resp.status().as_u16(),
                reason: resp
                    .headers()
                    .get("dg-error")
                    .and_then(|v| v.to_str().ok())
                    .map(|s| s.chars().take(200).collect())
                    .unwrap_or_default(),
            },
            // The listen URL holds no secret (model, language, options).
            WsError::Url(e) => DeepgramError::InvalidUrl(e.to_string()),
            other => DeepgramError::Ws(other.to_string()),
        }
    }
}

/// Where and how a call's audio is transcribed.
#[derive(Clone)]
pub struct DeepgramTarget {
    /// The full listen URL ([`listen_url`]; holds no secret).
    pub url: String,
    /// Sample rate of the PCM sent (the tenant's `pipeline_rate`).
    pub sample_rate: u32,
    /// The API key (`Authorization: Token …`).
    pub api_key: Secret,
}

impl std::fmt::Debug for DeepgramTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeepgramTarget")
            .field("url", &self.url)
            .field("sample_rate", &self.sample_rate)
            .field("api_key", &self.api_key.fingerprint())
            .finish()
    }
}

impl DeepgramTarget {
    /// The target for a tenant's settings at its pipeline rate.
    pub fn new(settings: &DeepgramSettings, sample_rate: u32) -> DeepgramTarget {
        DeepgramTarget {
            url: listen_url(settings, sample_rate),
            sample_rate,
            api_key: settings.api_key.clone(),
        }
    }
}

/// Percent-encodes everything but RFC 3986 unreserved characters.
fn encode_component(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// `<base_url>/v1/listen?…`: raw linear16 mono at `sample_rate`, and the
/// tenant's model, language and streaming options (spec §2).
pub fn listen_url(settings: &DeepgramSettings, sample_rate: u32) -> String {
    let mut q = vec![
        ("encoding", "linear16".to_owned()),
        ("sample_rate", sample_rate.to_string()),
        ("channels", "1".to_owned()),
        ("model", settings.model.clone()),
        ("language", settings.language.clone()),
    ];
    match settings.endpointing_ms {
        Some(0) => q.push(("endpointing", "false".to_owned())),
        Some(ms) => q.push(("endpointing", ms.to_string())),
        None => {}
    }
    if settings.interim_results {
        q.push(("interim_results", "true".to_owned()));
    }
    if let Some(ms) = settings.utterance_end_ms {
        q.push(("utterance_end_ms", ms.to_string()));
    }
    if settings.vad_events {
        q.push(("vad_events", "true".to_owned()));
    }
    let query: Vec<String> = q
        .iter()
        .map(|(k, v)| format!("{k}={}", encode_component(v)))
        .collect();
    format!(
        "{}/v1/listen?{}",
        settings.base_url.trim_end_matches('/'),
        query.join("&")
    )
}

/// One `Results` message, as far as the bridge uses it.
#[derive(Debug, Clone, PartialEq)]
pub struct Segment {
    /// Stream seconds at the span's start.
    pub start: f64,
    /// Span length in seconds.
    pub duration: f64,
    /// The text of this span will not change.
    pub is_final: bool,
    /// An endpoint (pause) was detected.
    pub speech_final: bool,
    /// Caused by `Finalize`.
    pub from_finalize: bool,
    /// `alternatives[0].transcript`.
    pub text: String,
    /// `alternatives[0].confidence` (0 when absent).
    pub confidence: f32,
}

/// A message from Deepgram, dispatched on `type` (spec §4: `channel` has two
/// shapes, so nothing is parsed before the type is known).
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum ServerMessage {
    /// Transcription of a span of audio.
    Results(Segment),
    /// A gap after the last word (`utterance_end_ms`).
    UtteranceEnd {
        /// End of the last word, stream seconds.
        last_word_end: f64,
    },
    /// Speech began (`vad_events`).
    SpeechStarted {
        /// Stream seconds.
        timestamp: f64,
    },
    /// The summary after `CloseStream`.
    Metadata {
        /// Request id.
        request_id: String,
        /// Seconds of audio received.
        duration: f64,
    },
    /// A type the bridge does not use (logged, ignored).
    Other(String),
}

/// Parses a text message from Deepgram; `None` for anything that is not a
/// JSON object with a string `type` or a `Results` without its numbers.
pub fn parse_server_text(text: &str) -> Option<ServerMessage> {
    let v: serde_json::Value = serde_json::from_str(text).ok()?;
    let f64_of = |key: &str| v.get(key).and_then(serde_json::Value::as_f64);
    let bool_of = |key: &str| {
        v.get(key)
            .and_then(serde_json::Value::as_bool)
            .unwrap_or(false)
    };
    Some(match v.get("type")?.as_str()? {
        "Results" => {
            let alt = v.get("channel")?.get("alternatives")?.get(0);
            let text = alt
                .and_then(|a| a.get("transcript"))
                .and_then(serde_json::Value::as_str)
                .unwrap_or_default();
            let confidence = alt
                .and_then(|a| a.get("confidence"))
                .and_then(serde_json::Value::as_f64)
                .unwrap_or(0.0);
            ServerMessage::Results(Segment {
                start: f64_of("start")?,
                duration: f64_of("duration")?,
                is_final: bool_of("is_final"),
                speech_final: bool_of("speech_final"),
                from_finalize: bool_of("from_finalize"),
                text: text.to_owned(),
                confidence: confidence as f32,
            })
        }
        "UtteranceEnd" => ServerMessage::UtteranceEnd {
            last_word_end: f64_of("last_word_end")?,
        },
        "SpeechStarted" => ServerMessage::SpeechStarted {
            timestamp: f64_of("timestamp")?,
        },
        "Metadata" => ServerMessage::Metadata {
            request_id: v
                .get("request_id")
                .and_then(serde_json::Value::as_str)
                .unwrap_or_default()
                .to_owned(),
            duration: f64_of("duration").unwrap_or(0.0),
        },
        other => ServerMessage::Other(other.chars().take(64).collect()),
    })
}

/// Maps one connection's stream time (Deepgram counts only the audio it
/// received, from 0 on every connection) to call media time: each run of
/// contiguous frames is anchored at the media time of its first frame, so a
/// reconnect and a hold (no frames, KeepAlive only) both keep times right.
#[derive(Debug, Clone)]
pub struct StreamClock {
    rate: u32,
    /// (samples sent before the run, media time of the run's first sample).
    anchors: VecDeque<(u64, Duration)>,
    sent: u64,
    /// Where the next frame starts if it follows on directly.
    next: Option<Duration>,
}

impl StreamClock {
    /// A clock for a new connection at `rate` Hz.
    pub fn new(rate: u32) -> StreamClock {
        StreamClock {
            rate: rate.max(1),
            anchors: VecDeque::new(),
            sent: 0,
            next: None,
        }
    }

    /// Samples sent on this connection so far.
    pub fn samples_sent(&self) -> u64 {
        self.sent
    }

    /// Records a frame of `samples` samples starting at `media_time`.
    pub fn on_frame(&mut self, media_time: Duration, samples: usize) {
        let contiguous = self
            .next
            .is_some_and(|next| media_time <= next + GAP_TOLERANCE);
        if !contiguous {
            if self.anchors.len() >= MAX_ANCHORS {
                self.anchors.pop_front();
            }
            self.anchors.push_back((self.sent, media_time));
        }
        let len = Duration::from_secs_f64(samples as f64 / f64::from(self.rate));
        self.next = Some(if contiguous {
            self.next.unwrap_or(media_time) + len
        } else {
            media_time + len
        });
        self.sent += samples as u64;
    }

    /// Call media time in ms of stream second `t` (negative or NaN: 0;
    /// beyond a day — never a real call — clamped there, so arithmetic on a
    /// server's absurd value cannot overflow).
    pub fn call_ms(&self, t: f64) -> u64 {
        const MAX_STREAM_S: f64 = 86_400.0;
        let pos = if t.is_finite() && t > 0.0 {
            (t.min(MAX_STREAM_S) * f64::from(self.rate)).round() as u64
        } else {
            0
        };
        let idx = self.anchors.partition_point(|(start, _)| *start <= pos);
        let Some((start, media)) = idx
            .checked_sub(1)
            .and_then(|i| self.anchors.get(i))
            .or_else(|| self.anchors.front())
        else {
            return pos.saturating_mul(1000) / u64::from(self.rate);
        };
        let into = pos.saturating_sub(*start);
        (media.as_millis() as u64).saturating_add(into.saturating_mul(1000) / u64::from(self.rate))
    }

    /// The transcript of a final, non-empty Results span, in call time.
    pub fn transcript(&self, seg: &Segment) -> Option<Transcript> {
        let text = seg.text.trim();
        if !seg.is_final || text.is_empty() {
            return None;
        }
        let mut end = text.len().min(MAX_TRANSCRIPT_BYTES);
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        let start_ms = self.call_ms(seg.start);
        let end_ms = self
            .call_ms(seg.start + seg.duration.max(0.0))
            .max(start_ms);
        Some(Transcript::caller(
            text.get(..end).unwrap_or_default().to_owned(),
            start_ms,
            end_ms,
            seg.confidence,
        ))
    }
}

/// What to do with a caller frame (see [`SILENCE_FRAMES_SENT`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admit {
    /// Send it.
    Send,
    /// Audio stopped: send `Finalize` (flush what Deepgram holds) and skip it.
    FinalizeAndSkip,
    /// Still silent: skip it (KeepAlive keeps the stream open).
    Skip,
}

/// Counts exact-zero frames in a row to tell when no audio flows.
#[derive(Debug, Clone, Default)]
pub struct SilenceGate {
    zeros: u32,
}

impl SilenceGate {
    /// The decision for the next frame.
    pub fn admit(&mut self, samples: &[i16]) -> Admit {
        if samples.iter().any(|&s| s != 0) {
            self.zeros = 0;
            return Admit::Send;
        }
        self.zeros = self.zeros.saturating_add(1);
        match self.zeros.cmp(&(SILENCE_FRAMES_SENT + 1)) {
            std::cmp::Ordering::Less => Admit::Send,
            std::cmp::Ordering::Equal => Admit::FinalizeAndSkip,
            std::cmp::Ordering::Greater => Admit::Skip,
        }
    }
}

/// The task's ends of the channels to and from the call task.
#[derive(Debug)]
pub(crate) struct Channels {
    pub(crate) audio: mpsc::Receiver<PcmFrame>,
    pub(crate) commands: mpsc::Sender<AgentCommand>,
}

/// The native protocol's `transcript` event (`docs/agent-protocol.md`).
pub fn transcript_message(t: &Transcript) -> String {
    serde_json::json!({
        "event": "transcript",
        "speaker": t.speaker.as_str(),
        "text": t.text,
        "start_ms": t.start_ms,
        "end_ms": t.end_ms,
        "confidence": t.confidence,
        "is_final": true,
    })
    .to_string()
}

/// The `{"type":…}` control messages (spec §3).
pub fn control_message(kind: &str) -> String {
    serde_json::json!({ "type": kind }).to_string()
}

fn request(
    target: &DeepgramTarget,
) -> Result<tokio_tungstenite::tungstenite::handshake::client::Request, DeepgramError> {
    let mut req = target
        .url
        .as_str()
        .into_client_request()
        .map_err(|e| DeepgramError::InvalidUrl(e.to_string()))?;
    let mut value = b"Token ".to_vec();
    value.extend_from_slice(target.api_key.expose());
    let mut value = HeaderValue::from_bytes(&value).map_err(|_| DeepgramError::InvalidKey)?;
    value.set_sensitive(true);
    req.headers_mut().insert("authorization", value);
    Ok(req)
}

/// PCM samples as 16-bit little-endian bytes.
fn pcm_bytes(samples: &[i16]) -> Vec<u8> {
    samples.iter().flat_map(|s| s.to_le_bytes()).collect()
}

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// The call's audio while no connection is up: bounded, oldest dropped first.
struct Backlog {
    frames: VecDeque<PcmFrame>,
    dropped: u64,
    /// The call task dropped its end: the call is over.
    ended: bool,
}

impl Backlog {
    fn push(&mut self, frame: PcmFrame) {
        if self.frames.len() >= RECONNECT_BUFFER_FRAMES {
            self.frames.pop_front();
            self.dropped += 1;
        }
        self.frames.push_back(frame);
    }

    /// Takes one message off the audio channel into the backlog (`false`
    /// once the call has ended).
    async fn fill(&mut self, audio: &mut mpsc::Receiver<PcmFrame>) -> bool {
        if self.ended {
            return std::future::pending().await;
        }
        match audio.recv().await {
            Some(f) => {
                self.push(f);
                true
            }
            None => {
                self.ended = true;
                false
            }
        }
    }
}

/// How a connected session ended.
enum SessionEnd {
    /// The call ended and the stream was closed in order.
    Finished,
    /// The connection failed mid-call.
    Dropped(DeepgramError),
}

/// The connection task: connect, stream, reconnect on failure, and close in
/// order when the call task drops its handle. Failures are logged with the
/// call id; the call itself carries on.
pub(crate) async fn run(target: DeepgramTarget, call_id: String, mut chans: Channels) {
    // The base URL may carry proxy credentials: logs get it redacted.
    let url = super::redact_url(&target.url);
    let mut backlog = Backlog {
        frames: VecDeque::new(),
        dropped: 0,
        ended: false,
    };
    let mut failures = 0usize;
    let mut connections = 0u32;
    loop {
        if backlog.ended && backlog.frames.is_empty() && connections > 0 {
            break;
        }
        connections += 1;
        let attempt = connect(&target, &mut chans.audio, &mut backlog).await;
        let err = match attempt {
            Ok(ws) => {
                info!(call_id = %crate::logging::wire(&call_id), %url, connection = connections, "deepgram connected");
                crate::metrics::pipeline_connected("deepgram");
                if connections > 1 {
                    crate::metrics::pipeline_reconnect("deepgram");
                }
                let opened = Instant::now();
                match session(ws, &target, &call_id, &mut chans, &mut backlog).await {
                    SessionEnd::Finished => break,
                    SessionEnd::Dropped(e) => {
                        if opened.elapsed() >= STABLE_CONNECTION {
                            failures = 0;
                        }
                        e
                    }
                }
            }
            Err(e) => e,
        };
        crate::metrics::pipeline_failed("deepgram");
        if let DeepgramError::Rejected { .. } = err
            && err.is_permanent()
        {
            warn!(call_id = %crate::logging::wire(&call_id), %url, error = %err, "deepgram refused the stream; call continues without transcription");
            break;
        }
        if err.is_permanent() {
            warn!(call_id = %crate::logging::wire(&call_id), %url, error = %err, "deepgram stream cannot start; call continues without transcription");
            break;
        }
        let Some(pause) = RECONNECT_BACKOFF.get(failures).copied() else {
            warn!(call_id = %crate::logging::wire(&call_id), %url, error = %err, "deepgram unreachable after retries; call continues without transcription");
            break;
        };
        if connections >= MAX_CONNECTIONS {
            warn!(call_id = %crate::logging::wire(&call_id), %url, error = %err, "deepgram dropped too often; call continues without transcription");
            break;
        }
        failures += 1;
        warn!(call_id = %crate::logging::wire(&call_id), %url, error = %err, retry_in_ms = pause.as_millis() as u64, "deepgram connection lost; reconnecting");
        let wake = Instant::now() + pause;
        loop {
            tokio::select! {
                () = tokio::time::sleep_until(wake) => break,
                _ = backlog.fill(&mut chans.audio) => {}
            }
        }
    }
    if backlog.dropped > 0 {
        crate::metrics::caller_frames_dropped(backlog.dropped);
        warn!(call_id = %crate::logging::wire(&call_id), dropped = backlog.dropped, "caller frames dropped while deepgram was unreachable");
    }
    debug!(call_id = %crate::logging::wire(&call_id), "deepgram task finished");
}

/// One connection attempt; the call's audio keeps arriving into the backlog.
async fn connect(
    target: &DeepgramTarget,
    audio: &mut mpsc::Receiver<PcmFrame>,
    backlog: &mut Backlog,
) -> Result<Ws, DeepgramError> {
    let req = request(target)?;
    let config = WebSocketConfig::default()
        .max_message_size(Some(MAX_MESSAGE_BYTES))
        .max_frame_size(Some(MAX_MESSAGE_BYTES));
    let fut = tokio::time::timeout(
        CONNECT_TIMEOUT,
        tokio_tungstenite::connect_async_with_config(req, Some(config), true),
    );
    tokio::pin!(fut);
    loop {
        tokio::select! {
            r = &mut fut => {
                let (ws, _resp) = r.map_err(|_| DeepgramError::ConnectTimeout)??;
                return Ok(ws);
            }
            _ = backlog.fill(audio) => {}
        }
    }
}

/// Hands a message's transcript (if final) to the call task.
async fn on_text(text: &str, clock: &StreamClock, chans: &Channels, call_id: &str) {
    let commands = &chans.commands;
    match parse_server_text(text) {
        Some(ServerMessage::Results(seg)) => {
            if let Some(t) = clock.transcript(&seg) {
                debug!(call_id = %crate::logging::wire(call_id), start_ms = t.start_ms, end_ms = t.end_ms, "transcript");
                // The call task stores it and forwards it to a native agent.
                // It may be gone (call over): nothing to do then.
                let _ = commands.send(AgentCommand::Transcript(t)).await;
            }
        }
        Some(ServerMessage::Metadata {
            request_id,
            duration,
        }) => {
            info!(call_id = %crate::logging::wire(call_id), %request_id, audio_s = duration, "deepgram stream summary");
        }
        Some(ServerMessage::SpeechStarted { timestamp }) => {
            debug!(call_id = %crate::logging::wire(call_id), at_ms = clock.call_ms(timestamp), "speech started");
        }
        Some(ServerMessage::UtteranceEnd { last_word_end }) => {
            debug!(call_id = %crate::logging::wire(call_id), at_ms = clock.call_ms(last_word_end), "utterance end");
        }
        Some(ServerMessage::Other(kind)) => {
            debug!(call_id = %crate::logging::wire(call_id), %kind, "deepgram message ignored")
        }
        None => {
            debug!(call_id = %crate::logging::wire(call_id), "unparsable deepgram message ignored")
        }
    }
}

fn closed(frame: Option<tokio_tungstenite::tungstenite::protocol::CloseFrame>) -> DeepgramError {
    match frame {
        Some(f) => DeepgramError::Closed {
            code: u16::from(f.code),
            reason: f.reason.chars().take(200).collect(),
        },
        None => DeepgramError::Closed {
            code: 1005,
            reason: String::new(),
        },
    }
}

async fn session(
    mut ws: Ws,
    target: &DeepgramTarget,
    call_id: &str,
    chans: &mut Channels,
    backlog: &mut Backlog,
) -> SessionEnd {
    let mut clock = StreamClock::new(target.sample_rate);
    match stream(&mut ws, &mut clock, call_id, chans, backlog).await {
        Ok(()) => {}
        Err(e) => return SessionEnd::Dropped(e),
    }
    // The call ended: flush what Deepgram holds, then wait (bounded) for the
    // last Results, the Metadata and the close.
    let closing = async {
        ws.send(Message::text(control_message("Finalize"))).await?;
        ws.send(Message::text(control_message("CloseStream")))
            .await?;
        while let Some(msg) = ws.next().await {
            match msg? {
                Message::Text(text) => on_text(&text, &clock, chans, call_id).await,
                Message::Close(_) => break,
                _ => {}
            }
        }
        Ok::<(), WsError>(())
    };
    match tokio::time::timeout(CLOSE_WAIT, closing).await {
        Ok(Ok(())) => info!(call_id = %crate::logging::wire(call_id), "deepgram stream closed"),
        Ok(Err(e)) => {
            warn!(call_id = %crate::logging::wire(call_id), error = %DeepgramError::from(e), "deepgram close failed")
        }
        Err(_) => {
            warn!(call_id = %crate::logging::wire(call_id), "deepgram did not close within the wait; last results may be missing")
        }
    }
    SessionEnd::Finished
}

/// Streams until the call ends (`Ok`) or the connection fails.
async fn stream(
    ws: &mut Ws,
    clock: &mut StreamClock,
    call_id: &str,
    chans: &mut Channels,
    backlog: &mut Backlog,
) -> Result<(), DeepgramError> {
    let mut gate = SilenceGate::default();
    // What arrived while connecting goes first.
    while let Some(frame) = backlog.frames.pop_front() {
        // An empty binary frame would close the stream.
        if frame.samples.is_empty() || gate.admit(&frame.samples) != Admit::Send {
            continue;
        }
        let bytes = pcm_bytes(&frame.samples);
        if let Err(e) = ws.send(Message::binary(bytes)).await {
            backlog.frames.push_front(frame);
            return Err(e.into());
        }
        clock.on_frame(frame.media_time, frame.samples.len());
    }
    if backlog.ended {
        return Ok(());
    }
    let mut last_sent = Instant::now();
    loop {
        tokio::select! {
            frame = chans.audio.recv() => match frame {
                Some(frame) if frame.samples.is_empty() => {}
                Some(frame) => match gate.admit(&frame.samples) {
                    Admit::Skip => {}
                    Admit::FinalizeAndSkip => {
                        ws.send(Message::text(control_message("Finalize"))).await?;
                        debug!(call_id = %crate::logging::wire(call_id), "no caller audio: finalize, then keepalive");
                        last_sent = Instant::now();
                    }
                    Admit::Send => {
                    if let Err(e) = ws.send(Message::binary(pcm_bytes(&frame.samples))).await {
                        backlog.push(frame);
                        return Err(e.into());
                    }
                    clock.on_frame(frame.media_time, frame.samples.len());
                    last_sent = Instant::now();
                    }
                },
                None => {
                    backlog.ended = true;
                    return Ok(());
                }
            },
            msg = ws.next() => match msg {
                Some(Ok(Message::Text(text))) => on_text(&text, clock, chans, call_id).await,
                Some(Ok(Message::Close(frame))) => return Err(closed(frame)),
                None => return Err(closed(None)),
                Some(Ok(_)) => {}
                Some(Err(e)) => return Err(e.into()),
            },
            () = tokio::time::sleep_until(last_sent + KEEPALIVE_INTERVAL) => {
                ws.send(Message::text(control_message("KeepAlive"))).await?;
                debug!(call_id = %crate::logging::wire(call_id), "deepgram keepalive");
                last_sent = Instant::now();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::SecretRef;

    fn settings() -> DeepgramSettings {
        DeepgramSettings {
            model: "nova-2-phonecall".into(),
            language: "en-US".into(),
            api_key: Secret::new(b"dg-key-1".to_vec(), SecretRef::Env("DG".into())),
            endpointing_ms: None,
            interim_results: false,
            utterance_end_ms: None,
            vad_events: false,
            base_url: "wss://api.deepgram.com".into(),
        }
    }

    #[test]
    fn listen_url_minimal_and_full() {
        assert_eq!(
            listen_url(&settings(), 16_000),
            "wss://api.deepgram.com/v1/listen?encoding=linear16&sample_rate=16000&channels=1\
             &model=nova-2-phonecall&language=en-US"
        );
        let mut s = settings();
        s.base_url = "ws://127.0.0.1:4000/".into();
        s.language = "en US&x=1".into();
        s.endpointing_ms = Some(300);
        s.interim_results = true;
        s.utterance_end_ms = Some(1000);
        s.vad_events = true;
        assert_eq!(
            listen_url(&s, 8000),
            "ws://127.0.0.1:4000/v1/listen?encoding=linear16&sample_rate=8000&channels=1\
             &model=nova-2-phonecall&language=en%20US%26x%3D1&endpointing=300\
             &interim_results=true&utterance_end_ms=1000&vad_events=true"
        );
        s.endpointing_ms = Some(0);
        assert!(listen_url(&s, 8000).contains("&endpointing=false&"));
    }

    #[test]
    fn token_header_is_set_and_sensitive_and_debug_hides_the_key() {
        let target = DeepgramTarget::new(&settings(), 16_000);
        let req = request(&target).unwrap();
        let h = req.headers().get("authorization").unwrap();
        assert_eq!(h.as_bytes(), b"Token dg-key-1");
        assert!(h.is_sensitive());
        assert!(!format!("{target:?}").contains("dg-key-1"));
        assert_eq!(req.uri().path(), "/v1/listen");
    }

    #[test]
    fn parses_results_and_the_other_types() {
        let r = r#"{"type":"Results","channel_index":[0,1],"start":4.02,"duration":1.76,
            "is_final":true,"speech_final":true,"from_finalize":false,
            "channel":{"alternatives":[{"transcript":"Yes, I'd like to reschedule.",
            "confidence":0.9921875,"words":[]}]},"metadata":{"request_id":"x"}}"#;
        assert_eq!(
            parse_server_text(r),
            Some(ServerMessage::Results(Segment {
                start: 4.02,
                duration: 1.76,
                is_final: true,
                speech_final: true,
                from_finalize: false,
                text: "Yes, I'd like to reschedule.".into(),
                confidence: 0.992_187_5,
            }))
        );
        // from_finalize absent is fine; the channel array shape of other types too.
        let r = r#"{"type":"Results","start":0,"duration":1,"is_final":false,
            "channel":{"alternatives":[]}}"#;
        let Some(ServerMessage::Results(seg)) = parse_server_text(r) else {
            panic!("results")
        };
        assert_eq!((seg.text.as_str(), seg.from_finalize), ("", false));
        assert_eq!(
            parse_server_text(r#"{"type":"UtteranceEnd","channel":[0,1],"last_word_end":2.395}"#),
            Some(ServerMessage::UtteranceEnd {
                last_word_end: 2.395
            })
        );
        assert_eq!(
            parse_server_text(r#"{"type":"SpeechStarted","channel":[0,1],"timestamp":9.54}"#),
            Some(ServerMessage::SpeechStarted { timestamp: 9.54 })
        );
        assert_eq!(
            parse_server_text(
                r#"{"type":"Metadata","request_id":"r1","sha256":"e3","created":"x","duration":2.5,"channels":1}"#
            ),
            Some(ServerMessage::Metadata {
                request_id: "r1".into(),
                duration: 2.5
            })
        );
        assert_eq!(
            parse_server_text(r#"{"type":"Error","description":"x"}"#),
            Some(ServerMessage::Other("Error".into()))
        );
        assert_eq!(parse_server_text(r#"{"type":"Results","start":1}"#), None);
        assert_eq!(parse_server_text("[1]"), None);
        assert_eq!(parse_server_text("not json"), None);
    }

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn clock_rebases_a_connection_that_starts_mid_call() {
        // A reconnect 12.34 s into the call: Deepgram's 0 is the call's 12.34 s.
        let mut c = StreamClock::new(16_000);
        for i in 0..100 {
            c.on_frame(ms(12_340 + 20 * i), 320);
        }
        assert_eq!(c.samples_sent(), 32_000);
        assert_eq!(c.call_ms(0.0), 12_340);
        assert_eq!(c.call_ms(1.5), 13_840);
        assert_eq!(c.call_ms(-1.0), 12_340);
        assert_eq!(c.call_ms(f64::NAN), 12_340);
        // An absurd server value is clamped, never an overflow.
        assert_eq!(c.call_ms(1e300), c.call_ms(86_400.0));
        assert_eq!(c.call_ms(f64::INFINITY), 12_340);
    }

    #[test]
    fn clock_skips_a_hold_gap_and_tolerates_timer_jitter() {
        let mut c = StreamClock::new(8000);
        // 1 s of frames from 0.5 s, with a 10 ms late tick in the middle.
        for i in 0..50 {
            let late = if i == 25 { 10 } else { 0 };
            c.on_frame(ms(500 + 20 * i + late), 160);
        }
        // On hold 1.5 s → 6.0 s: no frames. Then 1 s more.
        for i in 0..50 {
            c.on_frame(ms(6000 + 20 * i), 160);
        }
        assert_eq!(c.call_ms(0.0), 500);
        assert_eq!(c.call_ms(0.99), 1490);
        // Stream second 1.0 is the first sample after the hold.
        assert_eq!(c.call_ms(1.0), 6000);
        assert_eq!(c.call_ms(1.25), 6250);
    }

    #[test]
    fn only_final_non_empty_results_become_transcripts() {
        let mut c = StreamClock::new(16_000);
        for i in 0..200 {
            c.on_frame(ms(2000 + 20 * i), 320);
        }
        let seg = Segment {
            start: 1.0,
            duration: 0.5,
            is_final: true,
            speech_final: false,
            from_finalize: false,
            text: " hello there ".into(),
            confidence: 0.9,
        };
        assert_eq!(
            c.transcript(&seg),
            Some(Transcript::caller("hello there".into(), 3000, 3500, 0.9))
        );
        let interim = Segment {
            is_final: false,
            ..seg.clone()
        };
        assert_eq!(c.transcript(&interim), None);
        let empty = Segment {
            text: "  ".into(),
            ..seg.clone()
        };
        assert_eq!(c.transcript(&empty), None);
        let long = Segment {
            text: "é".repeat(MAX_TRANSCRIPT_BYTES),
            ..seg
        };
        let t = c.transcript(&long).unwrap();
        assert_eq!(t.text.len(), MAX_TRANSCRIPT_BYTES);
    }

    #[test]
    fn refusals_that_would_repeat_are_permanent() {
        let rejected = |status| DeepgramError::Rejected {
            status,
            reason: String::new(),
        };
        assert!(rejected(401).is_permanent());
        assert!(rejected(400).is_permanent());
        assert!(!rejected(429).is_permanent());
        assert!(!rejected(503).is_permanent());
        assert!(!DeepgramError::ConnectTimeout.is_permanent());
        assert!(
            !DeepgramError::Closed {
                code: 1011,
                reason: "NET-0001".into()
            }
            .is_permanent()
        );
    }

    #[test]
    fn silence_gate_sends_one_second_then_finalizes_then_skips() {
        let mut g = SilenceGate::default();
        let zeros = [0i16; 320];
        let voice = [0i16, 5, -3, 0];
        assert_eq!(g.admit(&voice), Admit::Send);
        for _ in 0..SILENCE_FRAMES_SENT {
            assert_eq!(g.admit(&zeros), Admit::Send);
        }
        assert_eq!(g.admit(&zeros), Admit::FinalizeAndSkip);
        assert_eq!(g.admit(&zeros), Admit::Skip);
        assert_eq!(g.admit(&zeros), Admit::Skip);
        assert_eq!(g.admit(&voice), Admit::Send);
        assert_eq!(g.admit(&zeros), Admit::Send);
    }

    #[test]
    fn transcript_event_for_the_agent() {
        let t = Transcript::caller("hi there".into(), 1200, 1900, 0.5);
        let v: serde_json::Value = serde_json::from_str(&transcript_message(&t)).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"event":"transcript","speaker":"caller","text":"hi there",
                "start_ms":1200,"end_ms":1900,"confidence":0.5,"is_final":true})
        );
    }

    #[test]
    fn backlog_keeps_the_newest_frames_and_counts_the_rest() {
        let mut b = Backlog {
            frames: VecDeque::new(),
            dropped: 0,
            ended: false,
        };
        for i in 0..RECONNECT_BUFFER_FRAMES + 30 {
            b.push(PcmFrame {
                samples: vec![1; 320],
                rate: crate::media::resample::PipelineRate::Hz16000,
                media_time: ms(20 * i as u64),
                g711: None,
            });
        }
        assert_eq!(b.frames.len(), RECONNECT_BUFFER_FRAMES);
        assert_eq!(b.dropped, 30);
        assert_eq!(b.frames.front().unwrap().media_time, ms(600));
    }

    #[test]
    fn control_messages() {
        assert_eq!(control_message("KeepAlive"), r#"{"type":"KeepAlive"}"#);
        assert_eq!(control_message("CloseStream"), r#"{"type":"CloseStream"}"#);
    }
}
