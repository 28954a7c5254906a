//! Twilio Media Streams mode (`/work/shared/specs/twilio-media-streams.md`,
//! `docs/agent-protocol.md` §Twilio mode): the same per-call WebSocket as the
//! native protocol, speaking Twilio's bidirectional `<Connect><Stream>`
//! dialect so an agent framework that already serves Twilio connects
//! unchanged.
//!
//! Owns: the message formats and the per-stream state ([`TwilioStream`]:
//! streamSid, the string counters). Audio is µ-law at 8 kHz both ways and
//! passes through as bytes: the call hands over the caller's µ-law as it left
//! the jitter buffer ([`crate::call::PipelineFormat::G711`]) and takes the
//! agent's as [`PipelineAudio::G711`]; only a PCM frame (a call whose plan
//! chose PCM) is converted here. Must not touch: call or media
//! state; the connection task is [`super::media_stream`]'s (shared with
//! Telnyx mode) and the connection is opened by [`super::connect`]. G.711 and
//! resampling are `crate::media`'s; base64 is the `base64` crate's.

use super::connect::AgentError;
use super::media_stream::{self, AgentFrame, StreamDialect};
use super::native::Channels;
use super::{AgentCommand, AgentTarget, CallInfo, Event};
use crate::call::{PcmFrame, PipelineAudio};
use crate::media::g711::{self, Law};
use crate::media::resample::{Downsampler, PipelineRate};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use std::time::SystemTime;
use tokio_tungstenite::tungstenite::Error as WsError;

/// Samples in one 20 ms µ-law frame at 8 kHz.
const FRAME_8K: usize = 160;

/// Why a Twilio-mode session failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TwilioError {
    /// The call's pipeline rate is neither 8000 nor 16000 Hz.
    #[error("unsupported pipeline rate {0} Hz")]
    UnsupportedRate(u32),
    /// Connecting or talking to the agent failed.
    #[error(transparent)]
    Agent(#[from] AgentError),
}

impl From<WsError> for TwilioError {
    fn from(e: WsError) -> TwilioError {
        TwilioError::Agent(e.into())
    }
}

/// A fresh stream SID: `MZ` and 32 hex digits, as Twilio's.
pub fn new_stream_sid(rng: &mut impl rand::RngCore) -> String {
    let mut bytes = [0u8; 16];
    rng.fill_bytes(&mut bytes);
    format!("MZ{}", hex::encode(bytes))
}

/// One stream's state: identity, counters and codec state. Pure: it turns
/// bridge events into JSON text and agent JSON text into commands.
#[derive(Debug)]
pub struct TwilioStream {
    stream_sid: String,
    call_sid: String,
    account_sid: String,
    /// The last `sequenceNumber` used (`connected` has none; `start` is 1).
    sequence: u64,
    /// `media.chunk` of the last caller frame sent.
    chunk: u64,
    /// Converts PCM frames (a call whose plan chose PCM) to 8 kHz.
    down: Downsampler,
    pcm8: Vec<i16>,
    ulaw: Vec<u8>,
    /// 0 on a call's first stream, n on its n-th reconnect.
    reconnect: u32,
}

impl TwilioStream {
    /// The stream for a call: `callSid` is its SIP Call-ID, `accountSid` its
    /// tenant's `[tenant.twilio_api]` account SID, or else its tenant id. Fails for a pipeline rate other than 8 or 16 kHz.
    pub fn new(info: &CallInfo, stream_sid: String) -> Result<TwilioStream, TwilioError> {
        let rate = PipelineRate::from_hz(info.sample_rate)
            .ok_or(TwilioError::UnsupportedRate(info.sample_rate))?;
        Ok(TwilioStream {
            reconnect: 0,
            stream_sid,
            call_sid: info.call_id.clone(),
            account_sid: info
                .account_sid
                .clone()
                .unwrap_or_else(|| info.tenant.clone()),
            sequence: 0,
            chunk: 0,
            down: Downsampler::new(rate),
            pcm8: Vec::with_capacity(FRAME_8K),
            ulaw: Vec::with_capacity(FRAME_8K),
        })
    }

    /// This stream's `streamSid`.
    pub fn stream_sid(&self) -> &str {
        &self.stream_sid
    }

    fn next_sequence(&mut self) -> String {
        self.sequence += 1;
        self.sequence.to_string()
    }

    /// `connected`, the first message.
    pub fn connected_message(&self) -> String {
        serde_json::json!({"event": "connected", "protocol": "Call", "version": "1.0.0"})
            .to_string()
    }

    /// `start`, right after `connected` (`sequenceNumber` "1").
    pub fn start_message(&mut self, info: &CallInfo) -> String {
        let custom = info.custom_parameters(self.reconnect);
        serde_json::json!({
            "event": "start",
            "sequenceNumber": self.next_sequence(),
            "start": {
                "accountSid": self.account_sid,
                "streamSid": self.stream_sid,
                "callSid": self.call_sid,
                "tracks": ["inbound"],
                "customParameters": custom,
                "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1},
            },
            "streamSid": self.stream_sid,
        })
        .to_string()
    }

    /// `media` for one caller frame (20 ms): its µ-law codes as they are
    /// (A-law converted code by code), or a PCM frame converted to 8 kHz
    /// µ-law; base64. `chunk` counts from 1 and `timestamp` is 20 ms per
    /// frame before it.
    pub fn media_message(&mut self, frame: &PcmFrame) -> String {
        let codes: &[u8] = match &frame.g711 {
            Some(g) if g.law == Law::Mu => &g.codes,
            Some(g) => {
                self.ulaw.resize(g.codes.len(), 0);
                g711::transcode(g.law, Law::Mu, &g.codes, &mut self.ulaw);
                &self.ulaw
            }
            None => {
                self.pcm8.clear();
                self.down.process(&frame.samples, &mut self.pcm8);
                self.ulaw.resize(self.pcm8.len(), 0);
                g711::encode(Law::Mu, &self.pcm8, &mut self.ulaw);
                &self.ulaw
            }
        };
        let payload = BASE64.encode(codes);
        self.chunk += 1;
        let timestamp = (self.chunk - 1) * 20;
        let sequence = self.next_sequence();
        // Built by hand: every field is digits, base64 or our own hex SID,
        // none needs JSON escaping, and this runs 50 times a second per call.
        format!(
            r#"{{"event":"media","sequenceNumber":"{sequence}","media":{{"track":"inbound","chunk":"{}","timestamp":"{timestamp}","payload":"{}"}},"streamSid":"{}"}}"#,
            self.chunk, payload, self.stream_sid
        )
    }

    /// `dtmf` for one key press.
    pub fn dtmf_message(&mut self, digit: char) -> String {
        serde_json::json!({
            "event": "dtmf",
            "sequenceNumber": self.next_sequence(),
            "streamSid": self.stream_sid,
            "dtmf": {"track": "inbound_track", "digit": digit.to_string()},
        })
        .to_string()
    }

    /// `mark`: the echo of an agent's mark, once the audio before it has
    /// played (or was thrown away by `clear`).
    pub fn mark_message(&mut self, name: &str) -> String {
        serde_json::json!({
            "event": "mark",
            "sequenceNumber": self.next_sequence(),
            "streamSid": self.stream_sid,
            "mark": {"name": name},
        })
        .to_string()
    }

    /// `stop`, the last message.
    pub fn stop_message(&mut self) -> String {
        serde_json::json!({
            "event": "stop",
            "sequenceNumber": self.next_sequence(),
            "streamSid": self.stream_sid,
            "stop": {"accountSid": self.account_sid, "callSid": self.call_sid},
        })
        .to_string()
    }

    /// `transfer`: sipbridge's extension (Twilio Media Streams has no
    /// transfer), one step of the agent's transfer, in Twilio's shape.
    pub fn transfer_message(&mut self, u: &crate::call::transfer::TransferUpdate) -> String {
        serde_json::json!({
            "event": "transfer",
            "sequenceNumber": self.next_sequence(),
            "streamSid": self.stream_sid,
            "transfer": super::transfer_fields(u),
        })
        .to_string()
    }

    /// An event towards the agent as its message (`None`: Twilio Media
    /// Streams has no message for it — transcripts).
    fn event_message(&mut self, ev: &Event) -> Option<String> {
        match ev {
            Event::Dtmf(d) => Some(self.dtmf_message(*d)),
            Event::Mark { name, .. } => Some(self.mark_message(name)),
            Event::Transfer(u) => Some(self.transfer_message(u)),
            Event::Transcript(_) | Event::Stats { .. } => None,
        }
    }

    /// A text message from the agent as a command: `media` (base64 µ-law
    /// 8 kHz, played as it is), `mark`, `clear`. `None` for
    /// anything else, a wrong or missing `streamSid`, or a payload that is
    /// not base64 (Twilio ignores those with a warning, and so do we).
    pub fn parse_agent_text(&mut self, text: &str) -> Option<AgentCommand> {
        let v: serde_json::Value = serde_json::from_str(text).ok()?;
        if v.get("streamSid")?.as_str()? != self.stream_sid {
            return None;
        }
        match v.get("event")?.as_str()? {
            "media" => {
                let payload = v.get("media")?.get("payload")?.as_str()?;
                let codes = BASE64.decode(payload).ok()?;
                if codes.is_empty() {
                    return None;
                }
                Some(AgentCommand::Play(PipelineAudio::G711 {
                    law: Law::Mu,
                    codes,
                }))
            }
            "mark" => Some(AgentCommand::Mark(
                v.get("mark")?.get("name")?.as_str()?.to_owned(),
            )),
            "clear" => Some(AgentCommand::Clear),
            // sipbridge's extension (Twilio has no such message): PCI pause.
            "pause_recording" => Some(AgentCommand::PauseRecording(true)),
            "resume_recording" => Some(AgentCommand::PauseRecording(false)),
            // sipbridge's extension: `{"event":"transfer","streamSid":…,
            // "transfer":{"to":…,"mode":…}}`.
            "transfer" => super::transfer_command(v.get("transfer")?),
            _ => None,
        }
    }
}

impl StreamDialect for TwilioStream {
    const MODE: &'static str = "twilio";

    fn set_reconnect(&mut self, n: u32) {
        self.reconnect = n;
    }

    fn opening(&mut self, info: &CallInfo) -> Vec<String> {
        vec![self.connected_message(), self.start_message(info)]
    }

    fn media_message(&mut self, frame: &PcmFrame) -> String {
        TwilioStream::media_message(self, frame)
    }

    fn event_message(&mut self, ev: &Event, _now: SystemTime) -> Option<String> {
        TwilioStream::event_message(self, ev)
    }

    fn stop_message(&mut self) -> String {
        TwilioStream::stop_message(self)
    }

    fn agent_text(&mut self, text: &str) -> AgentFrame {
        self.parse_agent_text(text)
            .map_or(AgentFrame::Ignored, AgentFrame::Command)
    }

    /// Twilio rejects binary frames (warning 31950); so do we.
    fn agent_binary(&mut self) -> AgentFrame {
        AgentFrame::Ignored
    }
}

/// The connection task ([`super::media_stream::run`]) with a fresh
/// `streamSid`; the agent closing the stream hangs up, as Twilio ends a
/// `<Connect><Stream>` call.
pub(crate) async fn run(target: AgentTarget, info: CallInfo, attempt: u32, chans: Channels) {
    let stream = TwilioStream::new(&info, new_stream_sid(&mut rand::rng()));
    media_stream::start(target, info, attempt, chans, stream).await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use serde_json::{Value, json};

    const SID: &str = "MZ0123456789abcdef0123456789abcdef";

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

    fn json(s: &str) -> Value {
        serde_json::from_str(s).unwrap()
    }

    fn pcm_frame(samples: Vec<i16>, rate: PipelineRate) -> PcmFrame {
        PcmFrame {
            samples,
            rate,
            media_time: std::time::Duration::ZERO,
            g711: None,
        }
    }

    fn g711_frame(law: Law, codes: &[u8]) -> PcmFrame {
        PcmFrame {
            g711: Some(crate::call::G711Frame {
                law,
                codes: bytes::Bytes::copy_from_slice(codes),
            }),
            ..pcm_frame(Vec::new(), PipelineRate::Hz16000)
        }
    }

    /// The caller's µ-law goes out as the same bytes, every code (0x7F, the
    /// negative zero, included), at any pipeline rate; A-law is converted
    /// code by code.
    #[test]
    fn g711_media_is_the_callers_codes_as_they_are() {
        let mut s = TwilioStream::new(&info(16_000), SID.into()).unwrap();
        s.start_message(&info(16_000));
        let codes: Vec<u8> = (0..160u32).map(|i| (i * 13 % 256) as u8).collect();
        let m = json(&s.media_message(&g711_frame(Law::Mu, &codes)));
        assert_eq!(
            m,
            json!({"event":"media","sequenceNumber":"2","streamSid":SID,
                "media":{"track":"inbound","chunk":"1","timestamp":"0",
                    "payload": BASE64.encode(&codes)}})
        );
        let all: Vec<u8> = (0..=255).collect();
        for law in [Law::Mu, Law::A] {
            let m = json(&s.media_message(&g711_frame(law, &all[..160])));
            let got = BASE64
                .decode(m["media"]["payload"].as_str().unwrap())
                .unwrap();
            let expected: Vec<u8> = all[..160]
                .iter()
                .map(|&c| g711::linear_to_mu(g711::decode_sample(law, c)))
                .collect();
            match law {
                Law::Mu => assert_eq!(got, &all[..160]),
                Law::A => assert_eq!(got, expected),
            }
        }
    }

    #[test]
    fn stream_sid_is_mz_and_32_hex() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(1);
        let sid = new_stream_sid(&mut rng);
        assert_eq!(sid.len(), 34);
        assert!(sid.starts_with("MZ"));
        assert!(sid[2..].bytes().all(|b| b.is_ascii_hexdigit()));
        assert_ne!(sid, new_stream_sid(&mut rng));
    }

    #[test]
    fn connected_start_dtmf_mark_stop_shapes_and_counters() {
        let mut s = TwilioStream::new(&info(16_000), SID.into()).unwrap();
        assert_eq!(
            json(&s.connected_message()),
            json!({"event":"connected","protocol":"Call","version":"1.0.0"})
        );
        assert_eq!(
            json(&s.start_message(&info(16_000))),
            json!({"event":"start","sequenceNumber":"1","streamSid":SID,
                "start":{"accountSid":"demo","streamSid":SID,"callSid":"abc@h",
                    "tracks":["inbound"],"customParameters":{"X-Order":"42"},
                    "mediaFormat":{"encoding":"audio/x-mulaw","sampleRate":8000,"channels":1}}})
        );
        assert_eq!(
            json(&s.event_message(&Event::Dtmf('#')).unwrap()),
            json!({"event":"dtmf","sequenceNumber":"2","streamSid":SID,
                "dtmf":{"track":"inbound_track","digit":"#"}})
        );
        assert_eq!(
            json(
                &s.event_message(&Event::Mark {
                    name: "m\"1".into(),
                    cleared: true
                })
                .unwrap()
            ),
            json!({"event":"mark","sequenceNumber":"3","streamSid":SID,"mark":{"name":"m\"1"}})
        );
        assert_eq!(
            json(&s.stop_message()),
            json!({"event":"stop","sequenceNumber":"4","streamSid":SID,
                "stop":{"accountSid":"demo","callSid":"abc@h"}})
        );
    }

    #[test]
    fn a_reconnected_stream_says_so_in_custom_parameters() {
        let mut s = TwilioStream::new(&info(8000), SID.into()).unwrap();
        s.set_reconnect(2);
        let start = json(&s.start_message(&info(8000)));
        assert_eq!(
            start["start"]["customParameters"],
            json!({"X-Order":"42","sipbridge_reconnect":"2"})
        );
        assert_eq!(start["start"]["callSid"], "abc@h", "the same call");
    }

    #[test]
    fn media_at_8k_is_the_mu_law_of_the_frame_with_string_counters() {
        let mut s = TwilioStream::new(&info(8000), SID.into()).unwrap();
        s.start_message(&info(8000));
        let frame: Vec<i16> = (0..160).map(|i| (i * 97 - 7000) as i16).collect();
        let expected: Vec<u8> = frame.iter().map(|&x| g711::linear_to_mu(x)).collect();
        let frame = pcm_frame(frame, PipelineRate::Hz8000);
        let m = json(&s.media_message(&frame));
        assert_eq!(
            m,
            json!({"event":"media","sequenceNumber":"2","streamSid":SID,
                "media":{"track":"inbound","chunk":"1","timestamp":"0",
                    "payload": BASE64.encode(&expected)}})
        );
        assert_eq!(m["media"]["payload"].as_str().unwrap().len(), 216);
        let m = json(&s.media_message(&frame));
        assert_eq!(m["sequenceNumber"], "3");
        assert_eq!(m["media"]["chunk"], "2");
        assert_eq!(m["media"]["timestamp"], "20");
    }

    #[test]
    fn media_at_16k_is_downsampled_to_160_codes() {
        let mut s = TwilioStream::new(&info(16_000), SID.into()).unwrap();
        let frame = pcm_frame(vec![1000i16; 320], PipelineRate::Hz16000);
        let mut codes = Vec::new();
        for _ in 0..3 {
            let m = json(&s.media_message(&frame));
            codes = BASE64
                .decode(m["media"]["payload"].as_str().unwrap())
                .unwrap();
            assert_eq!(codes.len(), 160);
        }
        // DC passes the half-band filter unchanged once its history is full.
        assert!(codes.iter().all(|&c| c == g711::linear_to_mu(1000)));
    }

    #[test]
    fn agent_media_mark_clear_become_commands() {
        let mut s = TwilioStream::new(&info(8000), SID.into()).unwrap();
        let codes: Vec<u8> = vec![0x00, 0x7f, 0x80, 0xff];
        let text =
            json!({"event":"media","streamSid":SID,"media":{"payload":BASE64.encode(&codes)}})
                .to_string();
        assert_eq!(
            s.parse_agent_text(&text),
            Some(AgentCommand::Play(PipelineAudio::G711 {
                law: Law::Mu,
                codes: codes.clone()
            }))
        );
        assert_eq!(
            s.parse_agent_text(
                &json!({"event":"mark","streamSid":SID,"mark":{"name":"u1"}}).to_string()
            ),
            Some(AgentCommand::Mark("u1".into()))
        );
        assert_eq!(
            s.parse_agent_text(&json!({"event":"clear","streamSid":SID}).to_string()),
            Some(AgentCommand::Clear)
        );
    }

    /// The agent's µ-law is played as it is at any pipeline rate: no
    /// upsampling, no filter start-up to drop, nothing to reset on `clear`.
    #[test]
    fn agent_media_at_16k_is_the_codes_as_they_are() {
        let mut s = TwilioStream::new(&info(16_000), SID.into()).unwrap();
        let codes: Vec<u8> = (0..160u32).map(|i| (i * 5 % 256) as u8).collect();
        let text =
            json!({"event":"media","streamSid":SID,"media":{"payload":BASE64.encode(&codes)}})
                .to_string();
        let play = Some(AgentCommand::Play(PipelineAudio::G711 {
            law: Law::Mu,
            codes: codes.clone(),
        }));
        assert_eq!(s.parse_agent_text(&text), play);
        assert_eq!(s.parse_agent_text(&text), play);
        s.parse_agent_text(&json!({"event":"clear","streamSid":SID}).to_string());
        assert_eq!(s.parse_agent_text(&text), play);
    }

    #[test]
    fn wrong_sid_unknown_events_and_garbage_are_ignored() {
        let mut s = TwilioStream::new(&info(8000), SID.into()).unwrap();
        for text in [
            json!({"event":"clear"}).to_string(),
            json!({"event":"clear","streamSid":"MZother"}).to_string(),
            json!({"event":"hangup","streamSid":SID}).to_string(),
            json!({"event":"mark","streamSid":SID,"mark":{}}).to_string(),
            json!({"event":"media","streamSid":SID,"media":{"payload":"@@not base64"}}).to_string(),
            json!({"event":"media","streamSid":SID,"media":{"payload":""}}).to_string(),
            "not json".to_owned(),
            "[1,2]".to_owned(),
        ] {
            assert_eq!(s.parse_agent_text(&text), None, "{text}");
        }
    }

    #[test]
    fn unsupported_rate_is_an_error() {
        assert!(matches!(
            TwilioStream::new(&info(44_100), SID.into()),
            Err(TwilioError::UnsupportedRate(44_100))
        ));
    }

    #[test]
    fn transfer_is_an_extension_in_twilio_shape() {
        use crate::call::transfer::{TransferMode, TransferState, TransferUpdate};
        let mut s = TwilioStream::new(&info(8000), SID.into()).unwrap();
        let msg = json!({"event":"transfer","streamSid":SID,
            "transfer":{"to":"tel:+15557654321","mode":"blind"}});
        assert_eq!(
            s.parse_agent_text(&msg.to_string()),
            Some(AgentCommand::Transfer {
                to: "tel:+15557654321".into(),
                mode: Some("blind".into())
            })
        );
        for ignored in [
            json!({"event":"transfer","streamSid":"MZother","transfer":{"to":"tel:+1"}}),
            json!({"event":"transfer","streamSid":SID}),
            json!({"event":"transfer","streamSid":SID,"transfer":{"mode":"blind"}}),
        ] {
            assert_eq!(s.parse_agent_text(&ignored.to_string()), None, "{ignored}");
        }
        s.start_message(&info(8000));
        let out = s.event_message(&Event::Transfer(TransferUpdate {
            to: "tel:+15557654321".into(),
            mode: TransferMode::Blind,
            state: TransferState::Completed,
            status: Some(200),
        }));
        assert_eq!(
            json(&out.unwrap()),
            json!({"event":"transfer","sequenceNumber":"2","streamSid":SID,
                "transfer":{"result":"completed","status":200,"to":"tel:+15557654321","mode":"blind"}})
        );
    }
}
