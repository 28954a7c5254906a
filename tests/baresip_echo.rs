#![allow(clippy::unwrap_used, clippy::expect_used)]
//! End-to-end media against real peers on loopback: what a caller hears from
//! `sipbridge run` with the `echo` pipeline.
//!
//! - [`baresip_hears_prompt_then_its_own_echo`]: baresip (a real phone, headless) calls the
//!   daemon and records what it hears; the recording must hold the disclosure prompt from
//!   the start, then baresip's own source audio echoed back, and nothing of that audio
//!   before the prompt has ended.
//! - [`sipp_call_rtp_to_test_socket`]: SIPp does the signalling with an SDP offer naming a
//!   UDP socket this test owns; the test sends caller audio itself (once while the prompt
//!   plays, once after) and checks what the bridge sends back: prompt first, paced at 20 ms,
//!   the gated copy never echoed, the second copy echoed.
//!
//! Owns: the correlation helper used for those checks (normalised cross-correlation in
//! f64, a coarse search on box-filtered decimated signals, then a full-rate refinement),
//! the µ-law framing of the test's own RTP, and the baresip config it writes.

mod common;

use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use common::{Daemon, free_port, profile_toml, repo_path};
use sipbridge::media::g711::{self, Law};

/// Samples per second of every signal here (G.711).
const RATE: usize = 8000;

// ---------------------------------------------------------------------------------------
// Signals
// ---------------------------------------------------------------------------------------

fn read_wav(path: &Path) -> Vec<i16> {
    let mut reader =
        hound::WavReader::open(path).unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    let spec = reader.spec();
    assert_eq!(
        (spec.channels, spec.sample_rate, spec.bits_per_sample),
        (1, 8000, 16),
        "{} must be 8 kHz mono 16-bit",
        path.display()
    );
    reader.samples::<i16>().map(Result::unwrap).collect()
}

fn write_wav(path: &Path, samples: &[i16]) {
    let spec = hound::WavSpec {
        channels: 1,
        sample_rate: 8000,
        bits_per_sample: 16,
        sample_format: hound::SampleFormat::Int,
    };
    let mut writer = hound::WavWriter::create(path, spec).unwrap();
    for &s in samples {
        writer.write_sample(s).unwrap();
    }
    writer.finalize().unwrap();
}

/// The signal as a µ-law path delivers it: encode then decode every sample.
fn mulaw_round_trip(samples: &[i16]) -> Vec<i16> {
    samples
        .iter()
        .map(|&s| g711::decode_sample(Law::Mu, g711::encode_sample(Law::Mu, s)))
        .collect()
}

fn to_f64(samples: &[i16]) -> Vec<f64> {
    samples.iter().map(|&s| f64::from(s)).collect()
}

fn seconds(samples: usize) -> f64 {
    samples as f64 / RATE as f64
}

// ---------------------------------------------------------------------------------------
// Normalised cross-correlation
// ---------------------------------------------------------------------------------------

/// Decimation factor of the coarse search.
const COARSE: usize = 4;
/// Full-rate lags searched either side of the coarse peak.
const REFINE: usize = 2 * COARSE;

/// Where `needle` best matches inside `hay`, and how well.
#[derive(Debug, Clone, Copy)]
struct Match {
    /// Sample offset in `hay` of the needle's first sample.
    lag: usize,
    /// Normalised cross-correlation at `lag`, in [-1, 1].
    ncc: f64,
}

/// Prefix sums of squares: the energy of any window in O(1).
fn energy_prefix(x: &[f64]) -> Vec<f64> {
    let mut prefix = Vec::with_capacity(x.len() + 1);
    prefix.push(0.0);
    let mut acc = 0.0;
    for v in x {
        acc += v * v;
        prefix.push(acc);
    }
    prefix
}

/// Normalised cross-correlation of `needle` with `hay[lag..lag + needle.len()]`
/// (`hay_energy` from [`energy_prefix`] of `hay`). 0 when either window is silent.
fn ncc_at(hay: &[f64], hay_energy: &[f64], needle: &[f64], needle_energy: f64, lag: usize) -> f64 {
    let window = &hay[lag..lag + needle.len()];
    let dot: f64 = window.iter().zip(needle).map(|(a, b)| a * b).sum();
    let energy = hay_energy[lag + needle.len()] - hay_energy[lag];
    let denominator = (energy * needle_energy).sqrt();
    if denominator <= f64::EPSILON {
        0.0
    } else {
        dot / denominator
    }
}

/// The best lag of `needle` in `hay` over `lags` (start offsets; clipped to where the
/// needle fits whole, with `hay` zero-padded by the needle's length so a needle cut
/// short by the end of the recording still scores). Coarse pass on both signals
/// box-filtered and decimated by [`COARSE`], then every full-rate lag within
/// [`REFINE`] of the coarse peak. `None` when the range is empty.
fn best_match(hay: &[f64], needle: &[f64], lags: std::ops::Range<usize>) -> Option<Match> {
    let mut padded = hay.to_vec();
    padded.resize(hay.len() + needle.len(), 0.0);
    let last = lags.end.min(hay.len());
    if lags.start >= last || needle.is_empty() {
        return None;
    }
    let decimate = |x: &[f64]| -> Vec<f64> {
        x.chunks(COARSE)
            .map(|c| c.iter().sum::<f64>() / COARSE as f64)
            .collect()
    };
    let (coarse_hay, coarse_needle) = (decimate(&padded), decimate(needle));
    let coarse_prefix = energy_prefix(&coarse_hay);
    let coarse_needle_energy: f64 = coarse_needle.iter().map(|v| v * v).sum();
    let mut coarse_best = (lags.start / COARSE, f64::NEG_INFINITY);
    for lag in lags.start / COARSE..last.div_ceil(COARSE) {
        if lag + coarse_needle.len() > coarse_hay.len() {
            break;
        }
        let ncc = ncc_at(
            &coarse_hay,
            &coarse_prefix,
            &coarse_needle,
            coarse_needle_energy,
            lag,
        );
        if ncc > coarse_best.1 {
            coarse_best = (lag, ncc);
        }
    }

    let prefix = energy_prefix(&padded);
    let needle_energy: f64 = needle.iter().map(|v| v * v).sum();
    let centre = coarse_best.0 * COARSE;
    let from = centre.saturating_sub(REFINE).max(lags.start);
    let to = (centre + REFINE + 1).min(last);
    (from..to)
        .map(|lag| Match {
            lag,
            ncc: ncc_at(&padded, &prefix, needle, needle_energy, lag),
        })
        .max_by(|a, b| a.ncc.total_cmp(&b.ncc))
}

#[test]
fn correlation_helper_finds_a_known_lag() {
    let caller = to_f64(&read_wav(&repo_path("fixtures/audio/caller1.wav")));
    // caller1 at 1.2345 s inside 5 s of other speech at a low level.
    let prompt = to_f64(&read_wav(&repo_path("sip-profiles/prompts/disclosure.wav")));
    let at = 9876;
    let mut hay: Vec<f64> = prompt.iter().map(|v| v * 0.1).collect();
    hay.resize(5 * RATE, 0.0);
    for (i, v) in caller.iter().enumerate() {
        hay[at + i] += v;
    }
    let found = best_match(&hay, &caller, 0..hay.len()).unwrap();
    assert_eq!(found.lag, at);
    assert!(found.ncc > 0.95, "{found:?}");
    // Outside the true position it scores low.
    let elsewhere = best_match(&hay, &caller, at + 2000..hay.len()).unwrap();
    assert!(elsewhere.ncc < 0.5, "{elsewhere:?}");
    // An exact copy scores 1.
    let exact = best_match(&caller, &caller[100..4100], 0..caller.len()).unwrap();
    assert_eq!(exact.lag, 100);
    assert!((exact.ncc - 1.0).abs() < 1e-9, "{exact:?}");
}

// ---------------------------------------------------------------------------------------
// Test 1: baresip calls the daemon
// ---------------------------------------------------------------------------------------

/// Silence before caller1 in baresip's source: the 4.44 s prompt and call setup fit in it,
/// so caller1 reaches the bridge only after the disclosure has ended.
const LEAD_SILENCE: usize = 6 * RATE;
/// Silence after caller1: room for the echo (~0.5 s) before baresip's source ends and it
/// hangs up.
const TAIL_SILENCE: usize = 3 * RATE;
/// baresip's `-t`: it quits by itself after this many seconds whatever happens.
const BARESIP_SECONDS: u64 = 14;
/// The echo pipeline's delay as the daemon documents it (~0.5 s).
const ECHO_DELAY: f64 = 0.5;

/// An even port `p` such that `p..p + n` are all free for UDP right now (baresip binds RTP
/// and RTCP from its `rtp_ports` range).
fn free_udp_range(n: u16) -> (u16, u16) {
    loop {
        let port = free_port() & !1;
        if port.checked_add(n).is_none() {
            continue;
        }
        let held: Vec<_> = (port..port + n)
            .map_while(|p| UdpSocket::bind(("127.0.0.1", p)).ok())
            .collect();
        if held.len() == usize::from(n) {
            return (port, port + n - 1);
        }
    }
}

/// A headless baresip caller: config dir, `snd_path` and source WAV in one temp dir.
struct Baresip {
    dir: tempfile::TempDir,
}

impl Baresip {
    fn new(source: &[i16]) -> Baresip {
        Baresip::with(
            source,
            "",
            "<sip:caller@127.0.0.1>;regint=0;audio_codecs=PCMU\n",
        )
    }

    /// A caller with `extra` config lines (modules, TLS files) and this `accounts` file.
    fn with(source: &[i16], extra: &str, accounts: &str) -> Baresip {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        std::fs::create_dir(root.join("snd")).unwrap();
        write_wav(&root.join("source.wav"), source);
        let sip_port = free_port();
        let (rtp_start, rtp_end) = free_udp_range(10);
        let config = format!(
            "sip_listen 127.0.0.1:{sip_port}\n\
             net_interface 127.0.0.1\n\
             audio_source aufile,{source}\n\
             audio_player aubridge,nil\n\
             audio_alert aubridge,nil\n\
             ausrc_srate 8000\n\
             auplay_srate 8000\n\
             ausrc_channels 1\n\
             auplay_channels 1\n\
             rtp_ports {rtp_start}-{rtp_end}\n\
             module_path /usr/lib/baresip/modules\n\
             module g711.so\n\
             module aufile.so\n\
             module aubridge.so\n\
             module sndfile.so\n\
             module_app menu.so\n\
             module_tmp account.so\n\
             module_tmp uuid.so\n\
             snd_path {snd}\n\
             {extra}",
            source = root.join("source.wav").display(),
            snd = root.join("snd").display(),
        );
        std::fs::write(root.join("config"), config).unwrap();
        std::fs::write(root.join("accounts"), accounts).unwrap();
        Baresip { dir }
    }

    /// Dials `uri`, waits for baresip to quit (`-t`), and returns its output. Killed if it
    /// outlives `-t` by 5 s.
    fn dial(&self, uri: &str) -> String {
        let mut child = Command::new("baresip")
            .arg("-f")
            .arg(self.dir.path())
            .args([
                "-t",
                &BARESIP_SECONDS.to_string(),
                "-e",
                &format!("/dial {uri}"),
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn baresip (bash scripts/install-test-deps.sh installs it)");
        let (tx, rx) = mpsc::channel();
        for stream in [
            Box::new(child.stdout.take().unwrap()) as Box<dyn std::io::Read + Send>,
            Box::new(child.stderr.take().unwrap()),
        ] {
            let tx = tx.clone();
            thread::spawn(move || {
                for line in BufReader::new(stream).split(b'\n') {
                    let Ok(line) = line else { break };
                    let _ = tx.send(String::from_utf8_lossy(&line).into_owned());
                }
            });
        }
        drop(tx);
        let deadline = Instant::now() + Duration::from_secs(BARESIP_SECONDS + 5);
        loop {
            if let Ok(Some(_)) = child.try_wait() {
                break;
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                break;
            }
            thread::sleep(Duration::from_millis(50));
        }
        // baresip's status line redraws with '\r': keep its output readable.
        rx.iter()
            .map(|l| l.rsplit('\r').next().unwrap_or_default().to_string())
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// What the phone heard: sndfile's `dump-*-dec.wav`.
    fn heard(&self) -> Option<PathBuf> {
        std::fs::read_dir(self.dir.path().join("snd"))
            .unwrap()
            .filter_map(Result::ok)
            .map(|e| e.path())
            .find(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with("dump-") && n.ends_with("-dec.wav"))
            })
    }
}

#[test]
fn baresip_hears_prompt_then_its_own_echo() {
    let started = Instant::now();
    let daemon = Daemon::spawn(&profile_toml(""));
    let prompt = read_wav(&repo_path("sip-profiles/prompts/disclosure.wav"));
    let caller = read_wav(&repo_path("fixtures/audio/caller1.wav"));

    let mut source = vec![0i16; LEAD_SILENCE];
    source.extend_from_slice(&caller);
    source.resize(source.len() + TAIL_SILENCE, 0);
    let phone = Baresip::new(&source);
    let output = phone.dial(&format!("sip:+15551234567@{}", daemon.udp_addr()));
    let context = || format!("---- baresip output ----\n{output}");

    let recording = phone
        .heard()
        .unwrap_or_else(|| panic!("baresip wrote no dump-*-dec.wav\n{}", context()));
    let heard = to_f64(&read_wav(&recording));
    let prompt_ref = to_f64(&mulaw_round_trip(&prompt));
    let caller_ref = to_f64(&mulaw_round_trip(&caller));
    assert!(
        heard.len() > LEAD_SILENCE + caller.len(),
        "recording is {:.2} s, shorter than the call should be\n{}",
        seconds(heard.len()),
        context()
    );

    // (a) The prompt, near the start of the recording. The phone's own playout may
    // slip a frame or two under load, so the prompt is checked in 0.5 s segments,
    // each found (ncc ≥ 0.9) within 150 ms of where the whole prompt places it, in
    // order: the whole notice was heard, and nothing else was mixed into it.
    let found_prompt = best_match(&heard, &prompt_ref, 0..3 * RATE).unwrap();
    let prompt_end = found_prompt.lag + prompt_ref.len();
    let segment = RATE / 2;
    let slack = RATE * 15 / 100;
    let mean_energy = prompt_ref.iter().map(|v| v * v).sum::<f64>() / prompt_ref.len() as f64;
    let mut segments = Vec::new();
    for (i, seg) in prompt_ref.chunks(segment).enumerate() {
        let energy = seg.iter().map(|v| v * v).sum::<f64>() / seg.len() as f64;
        if seg.len() < segment / 2 || energy < mean_energy * 0.05 {
            continue; // a pause in the prompt: nothing to correlate
        }
        let expected = found_prompt.lag + i * segment;
        let m = best_match(
            &heard,
            seg,
            expected.saturating_sub(slack)..expected + slack,
        )
        .unwrap();
        segments.push((i, m));
    }
    let weakest = segments
        .iter()
        .map(|(_, m)| m.ncc)
        .fold(f64::INFINITY, f64::min);
    let in_order = segments.windows(2).all(|w| w[0].1.lag < w[1].1.lag);
    // (b) The echo of caller1, after the prompt.
    let found_echo = best_match(&heard, &caller_ref, prompt_end..heard.len()).unwrap();
    // (c) caller1 nowhere before the prompt's end (any start from 0 to the prompt's end).
    let early = best_match(&heard, &caller_ref, 0..prompt_end).unwrap();
    // Where baresip's source had caller1, relative to the prompt's start (both start at
    // the answer, give or take the call setup), plus the echo delay.
    let echo_after_prompt_start = seconds(found_echo.lag - found_prompt.lag);
    let expected = seconds(LEAD_SILENCE) + ECHO_DELAY;

    eprintln!(
        "baresip: recording {:.2} s; prompt ncc {:.4} at {:.3} s ({} segments, weakest ncc \
         {weakest:.4}), \
         ends {:.3} s; echo ncc {:.4} at {:.3} s ({echo_after_prompt_start:.3} s after the \
         prompt's start, source had it at {expected:.2} s incl. echo delay); best caller1 \
         match before the prompt's end: ncc {:.4} at {:.3} s; test took {:.1} s",
        seconds(heard.len()),
        found_prompt.ncc,
        seconds(found_prompt.lag),
        segments.len(),
        seconds(prompt_end),
        found_echo.ncc,
        seconds(found_echo.lag),
        early.ncc,
        seconds(early.lag),
        started.elapsed().as_secs_f64(),
    );
    assert!(
        found_prompt.lag < RATE && segments.len() >= 6 && weakest >= 0.9 && in_order,
        "prompt not found at the start: {found_prompt:?}, segments {segments:?}\n{}",
        context()
    );
    assert!(
        found_echo.ncc >= 0.9,
        "echo of caller1 not found after the prompt: {found_echo:?}\n{}",
        context()
    );
    assert!(
        (echo_after_prompt_start - expected).abs() < 0.5,
        "echo at {echo_after_prompt_start:.3} s after the prompt's start, expected ~{expected:.2} s"
    );
    assert!(
        early.ncc < 0.5,
        "caller1 audible before the prompt ended: {early:?}"
    );
    drop(daemon);
}

// ---------------------------------------------------------------------------------------
// Test 2: SIPp signals, the test owns the media socket
// ---------------------------------------------------------------------------------------

/// Samples per 20 ms RTP packet.
const FRAME: usize = 160;
/// How long SIPp holds the call after its ACK before sending BYE.
const HOLD_MS: u64 = 9000;
/// When (from the first packet the bridge sends) the test starts caller1 the first time:
/// while the prompt plays, so the bridge must not echo it.
const GATED_AT: usize = RATE / 5;
/// When it sends caller1 again: after the 4.43 s prompt has ended.
const OPEN_AT: usize = 5 * RATE;
/// When the test stops sending.
const SEND_UNTIL: usize = 8 * RATE + RATE / 2;

/// The carrier's side of the call: an INVITE whose SDP names the test's socket
/// (`-key test_rtp_port N`), ACK, a pause, BYE.
const SCENARIO: &str = r#"<?xml version="1.0" encoding="ISO-8859-1" ?>
<!DOCTYPE scenario SYSTEM "sipp.dtd">
<scenario name="sipbridge call, media on the test's socket">
  <send retrans="500">
    <![CDATA[

      INVITE sip:[service]@[remote_ip]:[remote_port] SIP/2.0
      Via: SIP/2.0/[transport] [local_ip]:[local_port];branch=[branch]
      From: "SIPp carrier" <sip:+15550001111@[local_ip]:[local_port]>;tag=[pid]SIPpTag00[call_number]
      To: <sip:[service]@[remote_ip]:[remote_port]>
      Call-ID: [call_id]
      CSeq: 1 INVITE
      Contact: <sip:+15550001111@[local_ip]:[local_port];transport=[transport]>
      Max-Forwards: 70
      Content-Type: application/sdp
      Content-Length: [len]

      v=0
      o=carrier 53655765 2353687637 IN IP4 127.0.0.1
      s=-
      c=IN IP4 127.0.0.1
      t=0 0
      m=audio [test_rtp_port] RTP/AVP 0
      a=rtpmap:0 PCMU/8000
      a=ptime:20
      a=sendrecv

    ]]>
  </send>
  <recv response="100" optional="true"/>
  <recv response="180" optional="true"/>
  <recv response="183" optional="true"/>
  <recv response="200" rtd="true" rrs="true"/>
  <send>
    <![CDATA[

      ACK [next_url] SIP/2.0
      Via: SIP/2.0/[transport] [local_ip]:[local_port];branch=[branch]
      From: "SIPp carrier" <sip:+15550001111@[local_ip]:[local_port]>;tag=[pid]SIPpTag00[call_number]
      To: <sip:[service]@[remote_ip]:[remote_port]>[peer_tag_param]
      Call-ID: [call_id]
      CSeq: 1 ACK
      [routes]
      Contact: <sip:+15550001111@[local_ip]:[local_port];transport=[transport]>
      Max-Forwards: 70
      Content-Length: 0

    ]]>
  </send>
  <pause milliseconds="HOLD_MS"/>
  <send retrans="500">
    <![CDATA[

      BYE [next_url] SIP/2.0
      Via: SIP/2.0/[transport] [local_ip]:[local_port];branch=[branch]
      From: "SIPp carrier" <sip:+15550001111@[local_ip]:[local_port]>;tag=[pid]SIPpTag00[call_number]
      To: <sip:[service]@[remote_ip]:[remote_port]>[peer_tag_param]
      Call-ID: [call_id]
      CSeq: 2 BYE
      [routes]
      Contact: <sip:+15550001111@[local_ip]:[local_port];transport=[transport]>
      Max-Forwards: 70
      Content-Length: 0

    ]]>
  </send>
  <recv response="200" crlf="true"/>
</scenario>
"#;

/// One RTP packet the bridge sent to the test.
struct Received {
    at: Instant,
    seq: u16,
    timestamp: u32,
    payload_type: u8,
    payload: Vec<u8>,
}

/// Parses a plain RTP packet (no extension handling beyond skipping it): enough for what
/// the bridge sends. `None` for anything else (RTCP never reaches this port).
fn parse_rtp(datagram: &[u8], at: Instant) -> Option<Received> {
    if datagram.len() < 12 || datagram[0] >> 6 != 2 {
        return None;
    }
    let csrc = usize::from(datagram[0] & 0x0f) * 4;
    let mut offset = 12 + csrc;
    if datagram[0] & 0x10 != 0 {
        let words = usize::from(u16::from_be_bytes([
            *datagram.get(offset + 2)?,
            *datagram.get(offset + 3)?,
        ]));
        offset += 4 + words * 4;
    }
    Some(Received {
        at,
        seq: u16::from_be_bytes([datagram[2], datagram[3]]),
        timestamp: u32::from_be_bytes([datagram[4], datagram[5], datagram[6], datagram[7]]),
        payload_type: datagram[1] & 0x7f,
        payload: datagram.get(offset..)?.to_vec(),
    })
}

/// An RTP packet from the test: PT 0, fixed SSRC, marker on the first.
fn rtp_packet(index: usize, samples: &[i16]) -> Vec<u8> {
    let seq = u16::try_from(index % 65_536).unwrap().wrapping_add(1000);
    let timestamp = u32::try_from(index * FRAME).unwrap().wrapping_add(90_000);
    let mut packet = vec![0x80, if index == 0 { 0x80 } else { 0x00 }];
    packet.extend_from_slice(&seq.to_be_bytes());
    packet.extend_from_slice(&timestamp.to_be_bytes());
    packet.extend_from_slice(&0x5eed_cafe_u32.to_be_bytes());
    packet.extend(samples.iter().map(|&s| g711::encode_sample(Law::Mu, s)));
    packet
}

#[test]
fn sipp_call_rtp_to_test_socket() {
    let started = Instant::now();
    let daemon = Daemon::spawn(&profile_toml(""));
    let prompt = read_wav(&repo_path("sip-profiles/prompts/disclosure.wav"));
    let caller = read_wav(&repo_path("fixtures/audio/caller1.wav"));

    let media = UdpSocket::bind("127.0.0.1:0").unwrap();
    let media_port = media.local_addr().unwrap().port();
    let scenario_dir = tempfile::tempdir().unwrap();
    let scenario = scenario_dir.path().join("rtp_to_test_socket.xml");
    std::fs::write(&scenario, SCENARIO.replace("HOLD_MS", &HOLD_MS.to_string())).unwrap();
    let target = daemon.udp_addr();
    let port_arg = media_port.to_string();
    let carrier = thread::spawn(move || {
        common::sipp(
            &scenario,
            target,
            &[
                "-key",
                "test_rtp_port",
                &port_arg,
                "-s",
                "+15551234567",
                "-timeout",
                "25s",
            ],
        )
    });

    // What the test sends: silence, caller1 while the prompt plays, silence, caller1 after
    // it, silence.
    let mut source = vec![0i16; SEND_UNTIL];
    source[GATED_AT..GATED_AT + caller.len()].copy_from_slice(&caller);
    source[OPEN_AT..OPEN_AT + caller.len()].copy_from_slice(&caller);

    // Wait for the bridge's first packet (the prompt starts at the answer), then send from
    // the same socket every 20 ms while collecting what arrives.
    media
        .set_read_timeout(Some(Duration::from_millis(5)))
        .unwrap();
    let mut received: Vec<Received> = Vec::new();
    let mut bridge: Option<SocketAddr> = None;
    let mut buf = [0u8; 2048];
    let first_deadline = Instant::now() + Duration::from_secs(10);
    let mut t0: Option<Instant> = None;
    let mut sent = 0usize;
    let frames = SEND_UNTIL / FRAME;
    let listen_for = Duration::from_millis(HOLD_MS + 300);
    loop {
        let now = Instant::now();
        match t0 {
            None if now > first_deadline => break,
            Some(t0) if now > t0 + listen_for => break,
            _ => {}
        }
        if let (Some(t0), Some(to)) = (t0, bridge) {
            while sent < frames && now >= t0 + Duration::from_millis(20 * sent as u64) {
                let packet = rtp_packet(sent, &source[sent * FRAME..(sent + 1) * FRAME]);
                media.send_to(&packet, to).unwrap();
                sent += 1;
            }
        }
        match media.recv_from(&mut buf) {
            Ok((n, from)) => {
                let at = Instant::now();
                if let Some(packet) = parse_rtp(&buf[..n], at) {
                    bridge.get_or_insert(from);
                    t0.get_or_insert(at);
                    received.push(packet);
                }
            }
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(e) => panic!("recv on the media socket: {e}"),
        }
    }
    let result = carrier.join().unwrap();
    result.assert_success();
    assert!(
        received.len() > 100,
        "the bridge sent {} RTP packets to the SDP's port",
        received.len()
    );
    assert!(
        received
            .iter()
            .all(|p| p.payload_type == 0 && p.payload.len() == FRAME)
    );

    // Reassemble by RTP timestamp (robust to reordering), decode.
    let ts0 = received[0].timestamp;
    let span = received
        .iter()
        .map(|p| p.timestamp.wrapping_sub(ts0) as usize + p.payload.len())
        .max()
        .unwrap();
    let mut heard = vec![0i16; span];
    for p in &received {
        let at = p.timestamp.wrapping_sub(ts0) as usize;
        g711::decode(Law::Mu, &p.payload, &mut heard[at..at + p.payload.len()]);
    }
    let heard = to_f64(&heard);
    let prompt_ref = to_f64(&mulaw_round_trip(&prompt));
    let caller_ref = to_f64(&mulaw_round_trip(&caller));

    let found_prompt = best_match(&heard, &prompt_ref, 0..RATE).unwrap();
    let prompt_end = found_prompt.lag + prompt_ref.len();
    let found_echo = best_match(&heard, &caller_ref, prompt_end..heard.len()).unwrap();
    let gated = best_match(
        &heard,
        &caller_ref,
        0..found_echo.lag.saturating_sub(RATE / 2),
    )
    .unwrap();

    // Pacing: inter-arrival gaps, and how far arrivals drift from the RTP clock.
    let gaps: Vec<f64> = received
        .windows(2)
        .map(|w| (w[1].at - w[0].at).as_secs_f64() * 1000.0)
        .collect();
    let mean_gap = gaps.iter().sum::<f64>() / gaps.len() as f64;
    let max_gap = gaps.iter().copied().fold(0.0, f64::max);
    let bursty = gaps.iter().filter(|&&g| g < 5.0).count();
    let t_first = received[0].at;
    let drift_ms = received
        .iter()
        .map(|p| {
            let clock = f64::from(p.timestamp.wrapping_sub(ts0)) / RATE as f64;
            ((p.at - t_first).as_secs_f64() - clock).abs() * 1000.0
        })
        .fold(0.0, f64::max);
    let seq_ok = received
        .windows(2)
        .filter(|w| w[1].seq == w[0].seq.wrapping_add(1))
        .count();

    eprintln!(
        "sipp: {} packets ({} in sequence); gaps mean {mean_gap:.2} ms, max {max_gap:.1} ms, \
         {bursty} under 5 ms; max drift from the RTP clock {drift_ms:.1} ms; prompt ncc {:.4} \
         at {:.3} s, ends {:.3} s; echo ncc {:.4} at {:.3} s (sent at {:.2} s); best caller1 \
         match before it (copy sent at {:.2} s, during the prompt): ncc {:.4} at {:.3} s; \
         test took {:.1} s",
        received.len(),
        seq_ok + 1,
        found_prompt.ncc,
        seconds(found_prompt.lag),
        seconds(prompt_end),
        found_echo.ncc,
        seconds(found_echo.lag),
        seconds(OPEN_AT),
        seconds(GATED_AT),
        gated.ncc,
        seconds(gated.lag),
        started.elapsed().as_secs_f64(),
    );
    assert!(
        found_prompt.ncc >= 0.9 && found_prompt.lag < FRAME,
        "prompt not first: {found_prompt:?}"
    );
    assert!(
        found_echo.ncc >= 0.9,
        "no echo after the prompt: {found_echo:?}"
    );
    let echo_delay = seconds(found_echo.lag) - seconds(OPEN_AT);
    assert!(
        (echo_delay - ECHO_DELAY).abs() < 0.3,
        "echo {echo_delay:.3} s after the caller spoke, expected ~{ECHO_DELAY} s"
    );
    assert!(
        gated.ncc < 0.5,
        "caller audio sent during the prompt was echoed: {gated:?}"
    );
    assert!(
        (15.0..=25.0).contains(&mean_gap),
        "mean inter-packet gap {mean_gap:.2} ms"
    );
    assert!(
        drift_ms < 60.0,
        "arrivals drift {drift_ms:.1} ms from the RTP clock (bursty sending)"
    );
    drop(daemon);
}

// ---------------------------------------------------------------------------------------
// Test 3: baresip over TLS with SRTP, captured on the wire
// ---------------------------------------------------------------------------------------

/// A test CA and a certificate for 127.0.0.1 it signed, as PEM files in `dir`:
/// (ca, cert, key).
fn test_pki(dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair, SanType};
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_key = KeyPair::generate().unwrap();
    let ca_pem = ca_params.self_signed(&ca_key).unwrap().pem();
    let issuer = Issuer::new(ca_params, ca_key);
    let mut params = CertificateParams::new(vec!["localhost".to_owned()]).unwrap();
    params
        .subject_alt_names
        .push(SanType::IpAddress([127, 0, 0, 1].into()));
    let key = KeyPair::generate().unwrap();
    let cert = params.signed_by(&key, &issuer).unwrap();
    let paths = (
        dir.join("ca.pem"),
        dir.join("cert.pem"),
        dir.join("key.pem"),
    );
    std::fs::write(&paths.0, ca_pem).unwrap();
    std::fs::write(&paths.1, cert.pem()).unwrap();
    std::fs::write(&paths.2, key.serialize_pem()).unwrap();
    paths
}

/// `tshark` capturing `filter` on loopback into `path` until dropped.
struct Capture {
    child: std::process::Child,
}

impl Capture {
    fn start(path: &Path, filter: &str) -> Capture {
        let mut child = Command::new("tshark")
            .args(["-i", "lo", "-F", "pcap", "-f", filter, "-w"])
            .arg(path)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn tshark (bash scripts/install-test-deps.sh installs it)");
        // Wait for "Capturing on" (bounded), then a moment for the filter to apply.
        let stderr = child.stderr.take().unwrap();
        let (tx, rx) = mpsc::channel();
        thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if line.contains("Capturing on") {
                    let _ = tx.send(());
                }
            }
        });
        rx.recv_timeout(Duration::from_secs(10))
            .expect("tshark did not start capturing");
        thread::sleep(Duration::from_millis(300));
        Capture { child }
    }

    /// Stops the capture (SIGINT lets tshark flush the file).
    fn stop(mut self) {
        let pid = self.child.id().to_string();
        let _ = Command::new("kill").args(["-INT", &pid]).status();
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `(src port, dst port, payload)` of every UDP or TCP segment with a payload.
fn captured(path: &Path, proto: &str) -> Vec<(u16, u16, Vec<u8>)> {
    let out = Command::new("tshark")
        .arg("-r")
        .arg(path)
        .args([
            "-Y",
            &format!("{proto} && {proto}.payload"),
            "-T",
            "fields",
            "-e",
            &format!("{proto}.srcport"),
            "-e",
            &format!("{proto}.dstport"),
            "-e",
            &format!("{proto}.payload"),
        ])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            let mut f = l.split('\t');
            let src = f.next()?.parse().ok()?;
            let dst = f.next()?.parse().ok()?;
            let payload = hex::decode(f.next()?.replace(':', "")).ok()?;
            Some((src, dst, payload))
        })
        .collect()
}

#[test]
fn baresip_over_tls_with_srtp_hears_the_prompt_and_its_echo_and_nothing_is_plain_on_the_wire() {
    let dir = tempfile::tempdir().unwrap();
    let (ca, cert, key) = test_pki(dir.path());
    let tls = format!(
        "[profile.tls]\ncert = \"file:{}\"\nkey = \"file:{}\"\n",
        cert.display(),
        key.display()
    );
    let toml = common::ProfileSpec {
        listen: "tls = [\"127.0.0.1:0\"]",
        trunk: "media_encryption = \"required\"",
        extra: &tls,
        ..common::ProfileSpec::default()
    }
    .render();
    let daemon = Daemon::spawn(&toml);
    let tls_line = daemon
        .wait_for_log(Duration::from_secs(5), |l| {
            l.contains("sip listener bound") && l.contains("\"transport\":\"tls\"")
        })
        .expect("tls listener");
    let v: serde_json::Value = serde_json::from_str(&tls_line).unwrap();
    let tls_addr: SocketAddr = v.get("fields").unwrap_or(&v)["local"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();

    let prompt = read_wav(&repo_path("sip-profiles/prompts/disclosure.wav"));
    let caller = read_wav(&repo_path("fixtures/audio/caller1.wav"));
    let mut source = vec![0i16; LEAD_SILENCE];
    source.extend_from_slice(&caller);
    source.resize(source.len() + TAIL_SILENCE, 0);
    let phone = Baresip::with(
        &source,
        &format!("module srtp.so\nsip_cafile {}\n", ca.display()),
        "<sip:caller@127.0.0.1;transport=tls>;regint=0;audio_codecs=PCMU;mediaenc=srtp-mand\n",
    );

    let (rtp_start, rtp_end) = common::rtp_range_for(&common::current_test_name());
    let pcap = dir.path().join("call.pcap");
    let capture = Capture::start(
        &pcap,
        &format!(
            "tcp port {} or udp port {} or udp portrange {rtp_start}-{}",
            tls_addr.port(),
            daemon.udp_addr().port(),
            rtp_end
        ),
    );
    let output = phone.dial(&format!(
        "sip:+15551234567@127.0.0.1:{};transport=tls",
        tls_addr.port()
    ));
    capture.stop();
    let context = || format!("---- baresip output ----\n{output}");

    // What the caller heard: the prompt, then its own speech echoed by the pipeline.
    let recording = phone
        .heard()
        .unwrap_or_else(|| panic!("baresip wrote no dump-*-dec.wav\n{}", context()));
    let heard = to_f64(&read_wav(&recording));
    let prompt_ref = to_f64(&mulaw_round_trip(&prompt));
    let caller_ref = to_f64(&mulaw_round_trip(&caller));
    // The bridge starts the prompt at the answer; baresip can decrypt only once it has
    // read the key in that 200 OK (over TLS), so the first few packets (~60 ms seen)
    // can arrive before it can use them. The prompt is checked from 200 ms in.
    let clipped = &prompt_ref[RATE / 5..];
    let found_prompt = best_match(&heard, clipped, 0..3 * RATE)
        .unwrap_or_else(|| panic!("recording too short\n{}", context()));
    let prompt_end = found_prompt.lag + clipped.len();
    let found_echo = best_match(&heard, &caller_ref, prompt_end..heard.len())
        .unwrap_or_else(|| panic!("recording too short\n{}", context()));
    eprintln!(
        "tls+srtp: prompt ncc {:.4} at {:.3} s, echo ncc {:.4} at {:.3} s",
        found_prompt.ncc,
        seconds(found_prompt.lag),
        found_echo.ncc,
        seconds(found_echo.lag)
    );
    let audio_ok = found_prompt.ncc >= 0.9;
    assert!(
        found_echo.ncc >= 0.9,
        "caller's speech did not come back: {found_echo:?}\n{}",
        context()
    );

    // The wire: SIP only inside TLS, media only as SRTP.
    let tcp = captured(&pcap, "tcp");
    assert!(
        tcp.iter().any(|(_, _, p)| p.first() == Some(&0x16)),
        "no TLS handshake captured ({} segments)",
        tcp.len()
    );
    for (src, dst, p) in &tcp {
        let text = String::from_utf8_lossy(p);
        assert!(
            !text.contains("SIP/2.0") && !text.contains("a=crypto"),
            "plaintext SIP on the wire ({src} -> {dst}): {text}"
        );
    }
    let udp = captured(&pcap, "udp");
    let rtp: Vec<&Vec<u8>> = udp
        .iter()
        .filter(|(src, _, p)| {
            (rtp_start..=rtp_end).contains(src)
                && p.len() > 12
                && p[0] >> 6 == 2
                && p[1] & 0x7f == 0
        })
        .map(|(_, _, p)| p)
        .collect();
    assert!(
        rtp.len() > 200,
        "only {} RTP packets from the bridge captured",
        rtp.len()
    );
    // Every packet is 160 bytes of payload plus the 80-bit tag; decoded as µ-law the
    // payloads do not correlate with the prompt the bridge was sending.
    assert!(
        rtp.iter().all(|p| p.len() == 12 + 160 + 10),
        "not SRTP-sized"
    );
    let mut as_audio = Vec::new();
    for p in &rtp {
        for &b in &p[12..172] {
            as_audio.push(g711::decode_sample(Law::Mu, b));
        }
    }
    let as_audio = to_f64(&as_audio);
    let plain_prompt = best_match(&as_audio, &prompt_ref[..2 * RATE], 0..as_audio.len()).unwrap();
    assert!(
        plain_prompt.ncc < 0.3,
        "the prompt is readable in the captured RTP: {plain_prompt:?}"
    );
    assert!(
        udp.iter()
            .all(|(_, _, p)| !String::from_utf8_lossy(p).contains("SIP/2.0"))
    );
    assert!(
        audio_ok,
        "prompt not heard: {found_prompt:?}\n{}",
        context()
    );
    drop(daemon);
}
