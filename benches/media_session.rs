#![allow(clippy::unwrap_used, clippy::expect_used)]
//! One 20 ms tick of a Twilio-mode call through the sans-IO media core and
//! the Twilio dialect, both ways (issue 17 item 4): a caller RTP packet in →
//! jitter buffer → the `media` message for the agent; the agent's `media`
//! message parsed → playout → an RTP packet out. Virtual time, no I/O.
//!
//! - `twilio_tick/passthrough`: the call as built now (`PipelineFormat::G711`
//!   µ-law): the caller's codes go into the `media` message as they are, the
//!   agent's codes into the RTP payload.
//! - `twilio_tick/resample_round_trip`: the same call the way it ran before
//!   issue 17: a 16 kHz PCM pipeline (decode, upsample), the dialect
//!   downsampling and re-encoding the caller; the agent's µ-law decoded and
//!   upsampled to 16 kHz, then downsampled and encoded again by the playout
//!   queue.
//! - `native_tick/pcm16k`: for scale, a native-protocol call at 16 kHz (no
//!   serialisation: the caller frame and agent PCM only).

use base64::Engine as _;
use bytes::Bytes;
use criterion::{Criterion, criterion_group, criterion_main};
use rand::SeedableRng;
use sipbridge::call::{MediaOutput, MediaPlan, MediaSession, PipelineAudio, PipelineFormat};
use sipbridge::media::g711::{self, Law};
use sipbridge::media::resample::{PipelineRate, Upsampler};
use sipbridge::media::rtp::RtpSourcePolicy;
use sipbridge::pipeline::twilio::TwilioStream;
use sipbridge::pipeline::{AgentCommand, CallInfo};
use sipbridge::sip::sdp::{Codec, Direction, Negotiated};
use std::hint::black_box;
use std::net::SocketAddr;
use std::time::{Duration, Instant, SystemTime};

const SID: &str = "MZ0123456789abcdef0123456789abcdef";
const TICK: Duration = Duration::from_millis(20);

#[derive(Clone, Copy, PartialEq)]
enum Path {
    Passthrough,
    ResampleRoundTrip,
    Native,
}

fn negotiated() -> Negotiated {
    Negotiated {
        codec: Codec::Pcmu,
        payload_type: 0,
        telephone_event_pt: Some(101),
        remote_rtp: Some(SocketAddr::from(([127, 0, 0, 1], 40000))),
        remote_direction: Direction::SendRecv,
        local_direction: Direction::SendRecv,
        ptime_ms: 20,
        srtp: None,
    }
}

fn info() -> CallInfo {
    CallInfo {
        call_id: "bench@127.0.0.1".into(),
        direction: sipbridge::call::CallDirection::Inbound,
        tenant: "bench".into(),
        account_sid: None,
        from: "+15550001111".into(),
        to: "+15551234567".into(),
        custom: Vec::new(),
        sample_rate: 16_000,
    }
}

fn speech_codes(k: u32) -> Vec<u8> {
    let pcm: Vec<i16> = (0..160)
        .map(|n| {
            let t = f64::from(k * 160 + n) / 8000.0;
            (6000.0 * (2.0 * std::f64::consts::PI * 440.0 * t).sin()
                + 3000.0 * (2.0 * std::f64::consts::PI * 1870.0 * t).sin()) as i16
        })
        .collect();
    let mut codes = vec![0u8; 160];
    g711::encode(Law::Mu, &pcm, &mut codes);
    codes
}

fn rtp(seq: u16, ts: u32, payload: &[u8]) -> Bytes {
    let mut p = vec![0x80, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x12, 0x34];
    p[2..4].copy_from_slice(&seq.to_be_bytes());
    p[4..8].copy_from_slice(&ts.to_be_bytes());
    p.extend_from_slice(payload);
    Bytes::from(p)
}

/// One call and its clock.
struct Call {
    path: Path,
    m: MediaSession,
    stream: TwilioStream,
    up: Upsampler,
    rng: rand::rngs::StdRng,
    t0: Instant,
    k: u32,
    /// The caller's payloads and the agent's `media` messages, cycled.
    caller: Vec<Vec<u8>>,
    agent: Vec<String>,
    agent_pcm: Vec<Vec<i16>>,
}

impl Call {
    fn new(path: Path) -> Call {
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        let t0 = Instant::now();
        let plan = MediaPlan {
            prompt: None,
            gate_until_prompt_done: false,
            pipeline_rate: PipelineRate::Hz16000,
            pipeline_format: match path {
                Path::Passthrough => PipelineFormat::G711 {
                    law: Law::Mu,
                    with_pcm: false,
                },
                Path::ResampleRoundTrip | Path::Native => PipelineFormat::Pcm,
            },
            echo_delay: None,
            record: false,
            rtp_source: RtpSourcePolicy::Strict,
        };
        let m = MediaSession::new(t0, &negotiated(), plan, &mut rng).unwrap();
        let caller: Vec<Vec<u8>> = (0..50).map(speech_codes).collect();
        let agent = caller
            .iter()
            .map(|c| {
                format!(
                    r#"{{"event":"media","streamSid":"{SID}","media":{{"payload":"{}"}}}}"#,
                    base64::engine::general_purpose::STANDARD.encode(c)
                )
            })
            .collect();
        let mut up = Upsampler::new(PipelineRate::Hz16000);
        let agent_pcm = caller
            .iter()
            .map(|c| {
                let mut pcm8 = vec![0i16; 160];
                g711::decode(Law::Mu, c, &mut pcm8);
                let mut pcm = Vec::new();
                up.process(&pcm8, &mut pcm);
                pcm
            })
            .collect();
        Call {
            path,
            m,
            stream: TwilioStream::new(&info(), SID.into()).unwrap(),
            up: Upsampler::new(PipelineRate::Hz16000),
            rng,
            t0,
            k: 0,
            caller,
            agent,
            agent_pcm,
        }
    }

    /// One 20 ms tick: a packet in, the agent's 20 ms in, everything due
    /// run, the caller frame serialised and the RTP packet taken.
    fn tick(&mut self) -> usize {
        let k = self.k;
        self.k += 1;
        let at = self.t0 + TICK * k;
        let from = SocketAddr::from(([127, 0, 0, 1], 40000));
        let i = (k % 50) as usize;
        self.m.on_rtp(
            at,
            from,
            rtp(k as u16, k.wrapping_mul(160), &self.caller[i]),
        );
        match self.path {
            Path::Passthrough => {
                if let Some(AgentCommand::Play(audio)) =
                    self.stream.parse_agent_text(&self.agent[i])
                {
                    self.m.push_pipeline_audio(at, &audio);
                }
            }
            Path::ResampleRoundTrip => {
                // The dialect as it was: µ-law decoded and upsampled.
                if let Some(AgentCommand::Play(PipelineAudio::G711 { codes, .. })) =
                    self.stream.parse_agent_text(&self.agent[i])
                {
                    let mut pcm8 = vec![0i16; codes.len()];
                    g711::decode(Law::Mu, &codes, &mut pcm8);
                    let mut pcm = Vec::with_capacity(2 * pcm8.len());
                    self.up.process(&pcm8, &mut pcm);
                    self.m.push_pipeline_audio(at, &pcm);
                }
            }
            Path::Native => {
                self.m.push_pipeline_audio(at, &self.agent_pcm[i]);
            }
        }
        let mut bytes = 0;
        while self.m.poll_timeout() <= at {
            let due = self.m.poll_timeout();
            self.m
                .handle_timeout(due, SystemTime::UNIX_EPOCH, &mut self.rng);
            while let Some(o) = self.m.poll_output() {
                match o {
                    MediaOutput::CallerAudio(frame) => {
                        bytes += match self.path {
                            Path::Native => frame.samples.len(),
                            _ => self.stream.media_message(&frame).len(),
                        }
                    }
                    MediaOutput::Rtp { bytes: b, .. } => bytes += b.len(),
                    _ => {}
                }
            }
        }
        bytes
    }
}

fn bench(c: &mut Criterion) {
    let mut group = c.benchmark_group("twilio_tick");
    for (name, path) in [
        ("passthrough", Path::Passthrough),
        ("resample_round_trip", Path::ResampleRoundTrip),
    ] {
        let mut call = Call::new(path);
        group.bench_function(name, |b| b.iter(|| black_box(call.tick())));
    }
    group.finish();
    let mut call = Call::new(Path::Native);
    c.bench_function("native_tick/pcm16k", |b| b.iter(|| black_box(call.tick())));
}

criterion_group!(benches, bench);
criterion_main!(benches);
