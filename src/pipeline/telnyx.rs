//! Telnyx mode (`docs/agent-protocol.md` §Telnyx mode): the same per-call
//! WebSocket as the other dialects, speaking Telnyx's Media Streaming
//! dialect in its bidirectional RTP mode (`stream_bidirectional_mode =
//! "rtp"`), so an agent written for Telnyx connects unchanged.
//!
//! Owns: the message formats and the per-stream state ([`TelnyxStream`]:
//! stream_id, the string counters, the encoding — PCMU or PCMA at 8 kHz,
//! converted to and from the pipeline rate with resampler state, or L16 at
//! 16 kHz, the pipeline's own 16 kHz PCM in network byte order with no G.711
//! step either way — and the documented error frames). Must not touch: call
//! or media state; the connection task is [`super::media_stream`]'s (shared
//! with Twilio mode) and the connection is opened by [`super::connect`].
//! G.711 and resampling are `crate::media`'s; base64 is the `base64` crate's.

use super::media_stream::{self, AgentFrame, StreamDialect};
use super::native::Channels;
use super::{AgentCommand, AgentTarget, CallInfo, Event};
use crate::call::{PcmFrame, PipelineAudio};
use crate::config::TelnyxEncoding;
use crate::media::g711::{self, Law};
use crate::media::resample::{Downsampler, PipelineRate};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use std::time::SystemTime;

/// Samples in one 20 ms frame at 8 kHz.
const FRAME_8K: usize = 160;

/// Why a Telnyx-mode stream cannot start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TelnyxError {
    /// The call's pipeline rate is neither 8000 nor 16000 Hz, or L16 (16 kHz)
    /// is asked of an 8 kHz pipeline.
    #[error("encoding {encoding} cannot stream a {rate} Hz pipeline")]
    UnsupportedRate {
        /// The stream encoding.
        encoding: &'static str,
        /// The pipeline rate.
        rate: u32,
    },
}

/// The error frames the bridge sends (Telnyx's codes and titles).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum StreamError {
    /// 100003: the frame is not JSON, has no known `event`, lacks a field
    /// the event needs, or names another stream.
    MalformedFrame,
    /// 100004: a `media` payload that is not base64.
    InvalidMedia,
}

impl StreamError {
    /// Telnyx's numeric code.
    pub fn code(self) -> u32 {
        match self {
            StreamError::MalformedFrame => 100_003,
            StreamError::InvalidMedia => 100_004,
        }
    }

    /// Telnyx's title.
    pub fn title(self) -> &'static str {
        match self {
            StreamError::MalformedFrame => "malformed_frame",
            StreamError::InvalidMedia => "invalid_media",
        }
    }
}

/// A fresh stream id: a random (version 4) UUID in upper case, as Telnyx's.
pub fn new_stream_id(rng: &mut impl rand::RngCore) -> String {
    let mut b = [0u8; 16];
    rng.fill_bytes(&mut b);
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h = hex::encode_upper(b);
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

/// `2025-06-05T08:54:19.698408Z`: UTC, microseconds (Telnyx's `occurred_at`).
pub fn occurred_at(now: SystemTime) -> String {
    let since = now
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default();
    let secs = i64::try_from(since.as_secs()).unwrap_or(i64::MAX / 1000);
    let whole = crate::store::ops::format_time(secs.saturating_mul(1000));
    format!(
        "{}.{:06}Z",
        whole.trim_end_matches('Z'),
        since.subsec_micros()
    )
}

/// One stream's state: identity, counters and codec state. Pure: it turns
/// bridge events into JSON text and agent JSON text into [`AgentFrame`]s.
#[derive(Debug)]
pub struct TelnyxStream {
    stream_id: String,
    call_control_id: String,
    user_id: String,
    encoding: TelnyxEncoding,
    /// The G.711 law for PCMU/PCMA; `None` for L16.
    law: Option<Law>,
    /// The last `sequence_number` used (`connected` has none; `start` is 1).
    sequence: u64,
    /// `media.chunk` of the last caller frame sent.
    chunk: u64,
    /// Converts PCM frames to 8 kHz for PCMU/PCMA (a call whose plan chose
    /// PCM; G.711 frames pass through).
    down: Downsampler,
    pcm8: Vec<i16>,
    codes: Vec<u8>,
    /// 0 on a call's first stream, n on its n-th reconnect.
    reconnect: u32,
}

impl TelnyxStream {
    /// The stream for a call: `call_control_id` (and `call_session_id`) is its
    /// SIP Call-ID, `user_id` its tenant id. Fails for a pipeline rate other
    /// than 8 or 16 kHz, and for L16 on an 8 kHz pipeline.
    pub fn new(
        info: &CallInfo,
        stream_id: String,
        encoding: TelnyxEncoding,
    ) -> Result<TelnyxStream, TelnyxError> {
        let unsupported = TelnyxError::UnsupportedRate {
            encoding: encoding.name(),
            rate: info.sample_rate,
        };
        let rate = PipelineRate::from_hz(info.sample_rate).ok_or(unsupported)?;
        let law = match encoding {
            TelnyxEncoding::Pcmu => Some(Law::Mu),
            TelnyxEncoding::Pcma => Some(Law::A),
            _ => None,
        };
        if law.is_none() && rate.hz() != encoding.sample_rate() {
            return Err(TelnyxError::UnsupportedRate {
                encoding: encoding.name(),
                rate: info.sample_rate,
            });
        }
        Ok(TelnyxStream {
            reconnect: 0,
            stream_id,
            call_control_id: info.call_id.clone(),
            user_id: info.tenant.clone(),
            encoding,
            law,
            sequence: 0,
            chunk: 0,
            down: Downsampler::new(rate),
            pcm8: Vec::with_capacity(FRAME_8K),
            codes: Vec::with_capacity(2 * 2 * FRAME_8K),
        })
    }

    /// This stream's `stream_id`.
    pub fn stream_id(&self) -> &str {
        &self.stream_id
    }

    fn next_sequence(&mut self) -> String {
        self.sequence += 1;
        self.sequence.to_string()
    }

    /// `connected`, the first message.
    pub fn connected_message(&self) -> String {
        serde_json::json!({"event": "connected", "version": "1.0.0"}).to_string()
    }

    /// `start`, right after `connected` (`sequence_number` "1").
    pub fn start_message(&mut self, info: &CallInfo) -> String {
        let custom = info.custom_parameters(self.reconnect);
        serde_json::json!({
            "event": "start",
            "sequence_number": self.next_sequence(),
            "start": {
                "user_id": self.user_id,
                "call_control_id": self.call_control_id,
                "call_session_id": self.call_control_id,
                "from": info.from,
                "to": info.to,
                "custom_parameters": custom,
                "media_format": {
                    "encoding": self.encoding.name(),
                    "sample_rate": self.encoding.sample_rate(),
                    "channels": 1,
                },
            },
            "stream_id": self.stream_id,
        })
        .to_string()
    }

    /// `media` for one caller frame (20 ms): PCMU/PCMA at 8 kHz (the
    /// frame's G.711 codes as they are, converted code by code from the other
    /// law, or a PCM frame converted), or for L16 the 16 kHz PCM frame in
    /// network byte order; base64. `chunk` counts from 1, `timestamp` is
    /// 20 ms per frame before it.
    pub fn media_message(&mut self, frame: &PcmFrame) -> String {
        self.codes.clear();
        match (self.law, &frame.g711) {
            (Some(law), Some(g)) => {
                self.codes.resize(g.codes.len(), 0);
                g711::transcode(g.law, law, &g.codes, &mut self.codes);
            }
            (Some(law), None) => {
                self.pcm8.clear();
                self.down.process(&frame.samples, &mut self.pcm8);
                self.codes.resize(self.pcm8.len(), 0);
                g711::encode(law, &self.pcm8, &mut self.codes);
            }
            (None, _) => self
                .codes
                .extend(frame.samples.iter().flat_map(|s| s.to_be_bytes())),
        }
        self.chunk += 1;
        let timestamp = (self.chunk - 1) * 20;
        let sequence = self.next_sequence();
        // Built by hand: every field is digits, base64 or our own UUID,
        // none needs JSON escaping, and this runs 50 times a second per call.
        format!(
            r#"{{"event":"media","sequence_number":"{sequence}","media":{{"track":"inbound","chunk":"{}","timestamp":"{timestamp}","payload":"{}"}},"stream_id":"{}"}}"#,
            self.chunk,
            BASE64.encode(&self.codes),
            self.stream_id
        )
    }

    /// `dtmf` for one key press, `occurred_at` being `now`.
    pub fn dtmf_message(&mut self, digit: char, now: SystemTime) -> String {
        serde_json::json!({
            "event": "dtmf",
            "stream_id": self.stream_id,
            "occurred_at": occurred_at(now),
            "sequence_number": self.next_sequence(),
            "dtmf": {"digit": digit.to_string()},
        })
        .to_string()
    }

    /// `transfer`: sipbridge's extension (Telnyx Media Streaming has no
    /// transfer), one step of the agent's transfer, in Telnyx's shape.
    pub fn transfer_message(&mut self, u: &crate::call::transfer::TransferUpdate) -> String {
        serde_json::json!({
            "event": "transfer",
            "stream_id": self.stream_id,
            "sequence_number": self.next_sequence(),
            "transfer": super::transfer_fields(u),
        })
        .to_string()
    }

    /// `mark`: the echo of an agent's mark, once the audio before it has
    /// played (or was thrown away by `clear`).
    pub fn mark_message(&mut self, name: &str) -> String {
        serde_json::json!({
            "event": "mark",
            "stream_id": self.stream_id,
            "sequence_number": self.next_sequence(),
            "mark": {"name": name},
        })
        .to_string()
    }

    /// `stop`, the last message.
    pub fn stop_message(&mut self) -> String {
        serde_json::json!({
            "event": "stop",
            "sequence_number": self.next_sequence(),
            "stop": {"user_id": self.user_id, "call_control_id": self.call_control_id},
            "stream_id": self.stream_id,
        })
        .to_string()
    }

    /// `error` (no `sequence_number`, as Telnyx's).
    pub fn error_message(&self, error: StreamError, detail: &str) -> String {
        serde_json::json!({
            "event": "error",
            "payload": {"code": error.code(), "title": error.title(), "detail": detail},
            "stream_id": self.stream_id,
        })
        .to_string()
    }

    fn refuse(&self, error: StreamError, detail: &str) -> AgentFrame {
        AgentFrame::Reply(self.error_message(error, detail))
    }

    /// A text frame from the agent: `media` (base64 in the stream's
    /// encoding → PCM at the pipeline rate), `mark`, `clear`, and
    /// sipbridge's `pause_recording`/`resume_recording`. `stream_id` may be
    /// left out (Telnyx's client frames carry none); if present it must be
    /// this stream's. Anything else is answered with an `error` frame and
    /// otherwise ignored.
    pub fn parse_agent_text(&mut self, text: &str) -> AgentFrame {
        use StreamError::{InvalidMedia, MalformedFrame};
        let Ok(v) = serde_json::from_str::<serde_json::Value>(text) else {
            return self.refuse(MalformedFrame, "the frame is not JSON");
        };
        let Some(event) = v.get("event").and_then(|e| e.as_str()) else {
            return self.refuse(MalformedFrame, "the frame has no event");
        };
        if let Some(id) = v.get("stream_id")
            && id.as_str() != Some(self.stream_id.as_str())
        {
            return self.refuse(MalformedFrame, "stream_id is not this stream's");
        }
        match event {
            "media" => {
                let Some(payload) = v
                    .get("media")
                    .and_then(|m| m.get("payload"))
                    .and_then(|p| p.as_str())
                else {
                    return self.refuse(MalformedFrame, "media.payload is missing");
                };
                let Ok(bytes) = BASE64.decode(payload) else {
                    return self.refuse(InvalidMedia, "media.payload is not base64");
                };
                match self.play(bytes) {
                    Some(audio) => AgentFrame::Command(AgentCommand::Play(audio)),
                    None => AgentFrame::Ignored,
                }
            }
            "mark" => match v
                .get("mark")
                .and_then(|m| m.get("name"))
                .and_then(|n| n.as_str())
            {
                Some(name) => AgentFrame::Command(AgentCommand::Mark(name.to_owned())),
                None => self.refuse(MalformedFrame, "mark.name is missing"),
            },
            "clear" => AgentFrame::Command(AgentCommand::Clear),
            // sipbridge's extension (Telnyx has no such message): PCI pause.
            "pause_recording" => AgentFrame::Command(AgentCommand::PauseRecording(true)),
            "resume_recording" => AgentFrame::Command(AgentCommand::PauseRecording(false)),
            // sipbridge's extension: `{"event":"transfer","stream_id":…,
            // "transfer":{"to":…,"mode":…}}`.
            "transfer" => match v.get("transfer").and_then(super::transfer_command) {
                Some(cmd) => AgentFrame::Command(cmd),
                None => self.refuse(MalformedFrame, "transfer.to is missing"),
            },
            _ => self.refuse(MalformedFrame, "unknown event"),
        }
    }

    /// The agent's payload as audio to play (`None`: no audio): PCMU/PCMA
    /// codes as they are (8 kHz G.711 goes into the RTP payload without a
    /// resampling round trip), L16 as PCM at the pipeline rate.
    fn play(&self, bytes: Vec<u8>) -> Option<PipelineAudio> {
        let audio = match self.law {
            Some(law) => PipelineAudio::G711 { law, codes: bytes },
            // L16 at 16 kHz is the pipeline's own format: straight through
            // (a trailing odd byte is dropped).
            None => PipelineAudio::Pcm(
                bytes
                    .chunks_exact(2)
                    .map(|c| i16::from_be_bytes([c[0], c[1]]))
                    .collect(),
            ),
        };
        (!audio.is_empty()).then_some(audio)
    }
}

impl StreamDialect for TelnyxStream {
    const MODE: &'static str = "telnyx";

    fn set_reconnect(&mut self, n: u32) {
        self.reconnect = n;
    }

    fn opening(&mut self, info: &CallInfo) -> Vec<String> {
        vec![self.connected_message(), self.start_message(info)]
    }

    fn media_message(&mut self, frame: &PcmFrame) -> String {
        TelnyxStream::media_message(self, frame)
    }

    /// Transcripts have no Telnyx message.
    fn event_message(&mut self, ev: &Event, now: SystemTime) -> Option<String> {
        match ev {
            Event::Dtmf(d) => Some(self.dtmf_message(*d, now)),
            Event::Mark { name, .. } => Some(self.mark_message(name)),
            Event::Transfer(u) => Some(self.transfer_message(u)),
            Event::Transcript(_) | Event::Stats { .. } => None,
        }
    }

    fn stop_message(&mut self) -> String {
        TelnyxStream::stop_message(self)
    }

    fn agent_text(&mut self, text: &str) -> AgentFrame {
        self.parse_agent_text(text)
    }

    fn agent_binary(&mut self) -> AgentFrame {
        self.refuse(
            StreamError::MalformedFrame,
            "binary frames are not accepted: send JSON text",
        )
    }
}

/// The connection task ([`super::media_stream::run`]) with a fresh
/// `stream_id`; the agent closing the stream hangs up, as in Twilio mode.
pub(crate) async fn run(
    target: AgentTarget,
    info: CallInfo,
    attempt: u32,
    chans: Channels,
    encoding: TelnyxEncoding,
) {
    let stream = TelnyxStream::new(&info, new_stream_id(&mut rand::rng()), encoding);
    media_stream::start(target, info, attempt, chans, stream).await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use serde_json::{Value, json};
    use std::time::Duration;

    const ID: &str = "32DE0DEA-53CB-4B21-89A4-9E1819C043BC";

    fn info(rate: u32) -> CallInfo {
        CallInfo {
            call_id: "abc@h".into(),
            direction: crate::call::CallDirection::Inbound,
            tenant: "demo".into(),
            account_sid: None,
            from: "+1555".into(),
            to: "+1666".into(),
            custom: vec![("X-Order".into(), "42".into())],
            sample_rate: rate,
        }
    }

    fn stream(rate: u32, encoding: TelnyxEncoding) -> TelnyxStream {
        TelnyxStream::new(&info(rate), ID.into(), encoding).unwrap()
    }

    fn pcm_frame(samples: Vec<i16>) -> PcmFrame {
        let rate = if samples.len() == 320 {
            PipelineRate::Hz16000
        } else {
            PipelineRate::Hz8000
        };
        PcmFrame {
            samples,
            rate,
            media_time: std::time::Duration::ZERO,
            g711: None,
        }
    }

    fn json(s: &str) -> Value {
        serde_json::from_str(s).unwrap()
    }

    fn error_code(frame: &AgentFrame) -> Option<u64> {
        match frame {
            AgentFrame::Reply(text) => json(text)["payload"]["code"].as_u64(),
            _ => None,
        }
    }

    #[test]
    fn stream_id_is_an_upper_case_v4_uuid() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(1);
        let id = new_stream_id(&mut rng);
        assert_eq!(id.len(), 36);
        let parts: Vec<&str> = id.split('-').collect();
        assert_eq!(
            parts.iter().map(|p| p.len()).collect::<Vec<_>>(),
            [8, 4, 4, 4, 12]
        );
        assert!(
            id.bytes()
                .all(|b| b == b'-' || b.is_ascii_digit() || b.is_ascii_uppercase())
        );
        assert!(parts[2].starts_with('4'));
        assert!(matches!(parts[3].as_bytes()[0], b'8' | b'9' | b'A' | b'B'));
        assert_ne!(id, new_stream_id(&mut rng));
    }

    #[test]
    fn occurred_at_is_utc_with_microseconds() {
        let t = SystemTime::UNIX_EPOCH + Duration::from_micros(1_749_113_659_698_408);
        assert_eq!(occurred_at(t), "2025-06-05T08:54:19.698408Z");
    }

    #[test]
    fn connected_start_dtmf_mark_stop_error_shapes_and_counters() {
        let mut s = stream(16_000, TelnyxEncoding::L16);
        assert_eq!(
            json(&s.connected_message()),
            json!({"event":"connected","version":"1.0.0"})
        );
        assert_eq!(
            json(&s.start_message(&info(16_000))),
            json!({"event":"start","sequence_number":"1","stream_id":ID,
                "start":{"user_id":"demo","call_control_id":"abc@h","call_session_id":"abc@h",
                    "from":"+1555","to":"+1666","custom_parameters":{"X-Order":"42"},
                    "media_format":{"encoding":"L16","sample_rate":16000,"channels":1}}})
        );
        let t = SystemTime::UNIX_EPOCH + Duration::from_secs(1_749_113_659);
        assert_eq!(
            json(&s.event_message(&Event::Dtmf('#'), t).unwrap()),
            json!({"event":"dtmf","stream_id":ID,"occurred_at":"2025-06-05T08:54:19.000000Z",
                "sequence_number":"2","dtmf":{"digit":"#"}})
        );
        let mark = Event::Mark {
            name: "m\"1".into(),
            cleared: true,
        };
        assert_eq!(
            json(&s.event_message(&mark, t).unwrap()),
            json!({"event":"mark","stream_id":ID,"sequence_number":"3","mark":{"name":"m\"1"}})
        );
        assert_eq!(
            json(&s.error_message(StreamError::InvalidMedia, "x")),
            json!({"event":"error","stream_id":ID,
                "payload":{"code":100004,"title":"invalid_media","detail":"x"}})
        );
        assert_eq!(
            json(&StreamDialect::stop_message(&mut s)),
            json!({"event":"stop","sequence_number":"4","stream_id":ID,
                "stop":{"user_id":"demo","call_control_id":"abc@h"}})
        );
        let pcma = stream(8000, TelnyxEncoding::Pcma).start_message(&info(8000));
        assert_eq!(
            json(&pcma)["start"]["media_format"],
            json!({"encoding":"PCMA","sample_rate":8000,"channels":1})
        );
    }

    #[test]
    fn l16_media_is_the_16k_frame_itself_big_endian() {
        let mut s = stream(16_000, TelnyxEncoding::L16);
        s.start_message(&info(16_000));
        let frame: Vec<i16> = (0..320).map(|i| (i * 97 - 15_000) as i16).collect();
        let bytes: Vec<u8> = frame.iter().flat_map(|x| x.to_be_bytes()).collect();
        let frame = pcm_frame(frame);
        let m = json(&TelnyxStream::media_message(&mut s, &frame));
        assert_eq!(
            m,
            json!({"event":"media","sequence_number":"2","stream_id":ID,
                "media":{"track":"inbound","chunk":"1","timestamp":"0",
                    "payload": BASE64.encode(&bytes)}})
        );
        let m = json(&TelnyxStream::media_message(&mut s, &frame));
        assert_eq!(m["media"]["chunk"], "2");
        assert_eq!(m["media"]["timestamp"], "20");
    }

    #[test]
    fn pcmu_and_pcma_media_are_8k_g711() {
        for (enc, law) in [
            (TelnyxEncoding::Pcmu, Law::Mu),
            (TelnyxEncoding::Pcma, Law::A),
        ] {
            let mut s = stream(8000, enc);
            let frame: Vec<i16> = (0..160).map(|i| (i * 97 - 7000) as i16).collect();
            let mut expected = vec![0u8; 160];
            g711::encode(law, &frame, &mut expected);
            let m = json(&TelnyxStream::media_message(&mut s, &pcm_frame(frame)));
            assert_eq!(m["media"]["payload"], BASE64.encode(&expected));
            // A 16 kHz pipeline is downsampled to the same 160 codes.
            let mut s = stream(16_000, enc);
            let frame = pcm_frame(vec![1000; 320]);
            let codes = BASE64
                .decode(
                    json(&TelnyxStream::media_message(&mut s, &frame))["media"]["payload"]
                        .as_str()
                        .unwrap(),
                )
                .unwrap();
            assert_eq!(codes.len(), 160);
        }
    }

    /// A G.711 frame (the caller's codes) goes out as the same bytes in the
    /// stream's law, converted code by code from the other law.
    #[test]
    fn g711_frames_pass_through_in_the_streams_law() {
        let all: Vec<u8> = (0..=255).collect();
        for enc in [TelnyxEncoding::Pcmu, TelnyxEncoding::Pcma] {
            for from in [Law::Mu, Law::A] {
                let mut s = stream(16_000, enc);
                let frame = PcmFrame {
                    g711: Some(crate::call::G711Frame {
                        law: from,
                        codes: bytes::Bytes::copy_from_slice(&all[96..256]),
                    }),
                    ..pcm_frame(Vec::new())
                };
                let m = json(&TelnyxStream::media_message(&mut s, &frame));
                let got = BASE64
                    .decode(m["media"]["payload"].as_str().unwrap())
                    .unwrap();
                let to = if enc == TelnyxEncoding::Pcmu {
                    Law::Mu
                } else {
                    Law::A
                };
                let mut expected = vec![0u8; 160];
                g711::transcode(from, to, &all[96..256], &mut expected);
                assert_eq!(got, expected);
                if from == to {
                    assert_eq!(got, &all[96..256]);
                }
            }
        }
    }

    #[test]
    fn agent_l16_media_plays_as_is_and_pcmu_as_its_codes() {
        let mut s = stream(16_000, TelnyxEncoding::L16);
        let pcm: Vec<i16> = vec![-2, 300, i16::MAX, i16::MIN];
        let bytes: Vec<u8> = pcm.iter().flat_map(|x| x.to_be_bytes()).collect();
        let text = json!({"event":"media","media":{"payload":BASE64.encode(&bytes)}}).to_string();
        assert_eq!(
            s.parse_agent_text(&text),
            AgentFrame::Command(AgentCommand::Play(PipelineAudio::Pcm(pcm.clone())))
        );
        // With this stream's id, too; an odd trailing byte is dropped.
        let mut odd = bytes.clone();
        odd.push(7);
        let text = json!({"event":"media","stream_id":ID,"media":{"payload":BASE64.encode(&odd)}})
            .to_string();
        assert_eq!(
            s.parse_agent_text(&text),
            AgentFrame::Command(AgentCommand::Play(PipelineAudio::Pcm(pcm)))
        );

        let mut s = stream(8000, TelnyxEncoding::Pcmu);
        let codes = [0x00u8, 0x7f, 0x80, 0xff];
        let text = json!({"event":"media","media":{"payload":BASE64.encode(codes)}}).to_string();
        assert_eq!(
            s.parse_agent_text(&text),
            AgentFrame::Command(AgentCommand::Play(PipelineAudio::G711 {
                law: Law::Mu,
                codes: codes.to_vec()
            }))
        );
    }

    #[test]
    fn agent_mark_clear_and_pause_become_commands() {
        let mut s = stream(8000, TelnyxEncoding::Pcmu);
        assert_eq!(
            s.parse_agent_text(r#"{"event":"mark","mark":{"name":"u1"}}"#),
            AgentFrame::Command(AgentCommand::Mark("u1".into()))
        );
        assert_eq!(
            s.parse_agent_text(r#"{"event":"clear"}"#),
            AgentFrame::Command(AgentCommand::Clear)
        );
        assert_eq!(
            s.parse_agent_text(r#"{"event":"pause_recording"}"#),
            AgentFrame::Command(AgentCommand::PauseRecording(true))
        );
        assert_eq!(
            s.parse_agent_text(r#"{"event":"media","media":{"payload":""}}"#),
            AgentFrame::Ignored
        );
    }

    #[test]
    fn malformed_frames_and_bad_payloads_get_documented_error_frames() {
        let mut s = stream(8000, TelnyxEncoding::Pcmu);
        for text in [
            "not json",
            "[1,2]",
            r#"{"media":{"payload":"AAAA"}}"#,
            r#"{"event":"hangup"}"#,
            r#"{"event":"mark","mark":{}}"#,
            r#"{"event":"media","media":{}}"#,
            r#"{"event":"clear","stream_id":"OTHER"}"#,
        ] {
            assert_eq!(
                error_code(&s.parse_agent_text(text)),
                Some(100_003),
                "{text}"
            );
        }
        let bad = s.parse_agent_text(r#"{"event":"media","media":{"payload":"@@not base64"}}"#);
        assert_eq!(error_code(&bad), Some(100_004));
        let AgentFrame::Reply(text) = bad else {
            panic!("no reply")
        };
        assert_eq!(json(&text)["payload"]["title"], "invalid_media");
        assert_eq!(json(&text)["stream_id"], ID);
        assert_eq!(error_code(&s.agent_binary()), Some(100_003));
    }

    proptest::proptest! {
        /// Any text from the agent, and any payload bytes in any encoding, give a
        /// command, an error frame or nothing: never a panic.
        #[test]
        fn agent_frames_never_panic(
            text in ".{0,200}",
            payload in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..700),
            enc in 0..3usize,
        ) {
            let encoding = [TelnyxEncoding::Pcmu, TelnyxEncoding::Pcma, TelnyxEncoding::L16][enc];
            let mut s = stream(16_000, encoding);
            let _ = s.parse_agent_text(&text);
            let media = json!({"event":"media","media":{"payload":BASE64.encode(&payload)}});
            match s.parse_agent_text(&media.to_string()) {
                AgentFrame::Command(AgentCommand::Play(audio)) => proptest::prop_assert!(!audio.is_empty()),
                // Nothing, or (L16) too short for a sample.
                AgentFrame::Ignored => proptest::prop_assert!(payload.len() < 2),
                other => proptest::prop_assert!(false, "{other:?}"),
            }
        }
    }

    #[test]
    fn l16_needs_a_16k_pipeline() {
        assert!(matches!(
            TelnyxStream::new(&info(8000), ID.into(), TelnyxEncoding::L16),
            Err(TelnyxError::UnsupportedRate { rate: 8000, .. })
        ));
        assert!(TelnyxStream::new(&info(44_100), ID.into(), TelnyxEncoding::Pcmu).is_err());
        assert!(TelnyxStream::new(&info(8000), ID.into(), TelnyxEncoding::Pcmu).is_ok());
    }

    #[test]
    fn a_reconnected_stream_says_so_in_custom_parameters() {
        let mut s = stream(8000, TelnyxEncoding::Pcmu);
        s.set_reconnect(3);
        let start: Value = serde_json::from_str(&s.start_message(&info(8000))).unwrap();
        assert_eq!(
            start["start"]["custom_parameters"],
            json!({"X-Order":"42","sipbridge_reconnect":"3"})
        );
        assert_eq!(start["start"]["call_control_id"], "abc@h", "the same call");
    }

    #[test]
    fn transfer_is_an_extension_in_telnyx_shape() {
        use crate::call::transfer::{TransferMode, TransferState, TransferUpdate};
        let mut s = stream(8000, TelnyxEncoding::Pcmu);
        let msg = json!({"event":"transfer","transfer":{"to":"sip:desk@pbx.example.com"}});
        assert_eq!(
            s.parse_agent_text(&msg.to_string()),
            AgentFrame::Command(AgentCommand::Transfer {
                to: "sip:desk@pbx.example.com".into(),
                mode: None
            })
        );
        let bad = json!({"event":"transfer","transfer":{}});
        match s.parse_agent_text(&bad.to_string()) {
            AgentFrame::Reply(r) => assert_eq!(json(&r)["payload"]["code"], 100003),
            other => panic!("{other:?}"),
        }
        s.start_message(&info(8000));
        let out = StreamDialect::event_message(
            &mut s,
            &Event::Transfer(TransferUpdate {
                to: "sip:desk@pbx.example.com".into(),
                mode: TransferMode::Blind,
                state: TransferState::Progress,
                status: Some(180),
            }),
            std::time::SystemTime::UNIX_EPOCH,
        );
        assert_eq!(
            json(&out.unwrap()),
            json!({"event":"transfer","sequence_number":"2","stream_id":ID,
                "transfer":{"result":"progress","status":180,"to":"sip:desk@pbx.example.com","mode":"blind"}})
        );
    }
}
