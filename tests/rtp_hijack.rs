#![allow(clippy::unwrap_used, clippy::expect_used)]
//! RTP hijack attacks from another address on the same network (issue 19's acceptance:
//! "the port-spray and silence-hijack attacks reach neither the caller, the recording nor
//! the pipeline (audio correlation), and the call's audio is unaffected").
//!
//! SIPp does the signalling (`tests/sipp/media_on_test_socket.xml`) with an SDP offer
//! naming a UDP socket this test owns (`caller`, 127.0.0.1); the tenant records and runs
//! the echo pipeline (what the pipeline gets comes back to the call's media address ~0.5 s
//! later, so the echo shows what reached the pipeline). The attacker is a socket on
//! 127.0.0.2 that sends PCMU carrying its own signal: a 20 ms frame of noise repeated,
//! which nothing else in the call contains.
//! - port spray: from before the call to its end, every 20 ms, 2 packets to every port
//!   of the profile's RTP range (the attacker does not know the call's port);
//! - silence hijack: the caller talks, falls silent for 2 s, and 1.2 s into the silence
//!   the attacker sends to the call's port (it knows it) for 2 s; then the caller talks
//!   again.
//!
//! Then: the caller's audio is echoed whole (normalised cross-correlation ≥ 0.9, after
//! the attack too), no window of what the caller heard nor of the recording's caller
//! channel correlates with the attacker's frame, the attacker got no packet, and the
//! CDR counts the attacker's packets as `wrong_source`.

mod common;

use std::net::{SocketAddr, UdpSocket};
use std::path::Path;
use std::thread;
use std::time::{Duration, Instant};

use common::audio::ncc;
use common::{Daemon, ProfileSpec, repo_path, rtp_range_for, sipp, sipp_scenario};
use sipbridge::media::g711::{self, Law};
use sipbridge::store::crypto::KeyRing;
use sipbridge::store::db::{RecordingState, Store};

const RATE: usize = 8000;
const FRAME: usize = 160;
/// After the 4.43 s prompt the echo pipeline's gate is open.
const OPEN_AT: usize = 5 * RATE;
const ECHO_DELAY: f64 = 0.5;
const SSRC: u32 = 0x5eed_cafe;

fn read_wav(path: &Path) -> Vec<i16> {
    let mut reader = hound::WavReader::open(path).unwrap();
    assert_eq!(reader.spec().sample_rate, 8000);
    reader.samples::<i16>().map(Result::unwrap).collect()
}

fn g711_round_trip(x: &[i16]) -> Vec<i16> {
    x.iter()
        .map(|&s| g711::decode_sample(Law::Mu, g711::encode_sample(Law::Mu, s)))
        .collect()
}

/// Best `(lag, ncc)` over `lags`: coarse on 4× decimated signals, then full rate.
fn best_match(hay: &[f64], needle: &[f64], lags: std::ops::Range<usize>) -> (usize, f64) {
    let decimate =
        |x: &[f64]| -> Vec<f64> { x.chunks(4).map(|c| c.iter().sum::<f64>() / 4.0).collect() };
    let (ch, cn) = (decimate(hay), decimate(needle));
    let coarse = (lags.start / 4..lags.end.div_ceil(4))
        .map(|lag| (lag, ncc(&ch, &cn, lag)))
        .max_by(|a, b| a.1.total_cmp(&b.1))
        .unwrap();
    let centre = coarse.0 * 4;
    (centre.saturating_sub(8)..centre + 9)
        .map(|lag| (lag, ncc(hay, needle, lag)))
        .max_by(|a, b| a.1.total_cmp(&b.1))
        .unwrap()
}

fn to_f64(x: &[i16]) -> Vec<f64> {
    x.iter().map(|&s| f64::from(s)).collect()
}

/// The highest correlation of any 200 ms window of `hay` with the attacker's (periodic)
/// signal: a window holding it matches at one of the 160 phases.
fn attacker_presence(hay: &[i16], attacker_frame: &[i16]) -> f64 {
    let needle: Vec<f64> = to_f64(&attacker_frame.repeat(10));
    let hay = to_f64(hay);
    let mut best: f64 = 0.0;
    let mut start = 0;
    while start + needle.len() + FRAME <= hay.len() {
        for phase in 0..FRAME {
            best = best.max(ncc(&hay, &needle, start + phase));
        }
        start += needle.len() / 2;
    }
    best
}

fn rtp(seq: u16, timestamp: u32, ssrc: u32, samples: &[i16]) -> Vec<u8> {
    let mut p = vec![0x80, 0];
    p.extend_from_slice(&seq.to_be_bytes());
    p.extend_from_slice(&timestamp.to_be_bytes());
    p.extend_from_slice(&ssrc.to_be_bytes());
    p.extend(samples.iter().map(|&s| g711::encode_sample(Law::Mu, s)));
    p
}

fn recv_nonblocking(socket: &UdpSocket, buf: &mut [u8]) -> Option<(usize, SocketAddr)> {
    match socket.recv_from(buf) {
        Ok(got) => Some(got),
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock
                    | std::io::ErrorKind::TimedOut
                    | std::io::ErrorKind::ConnectionRefused
            ) =>
        {
            None
        }
        Err(e) => panic!("recv: {e}"),
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Attack {
    PortSpray,
    SilenceHijack,
}

struct Outcome {
    /// What the caller heard, placed by RTP timestamp.
    heard: Vec<i16>,
    /// The recording's caller channel.
    recorded_caller: Vec<i16>,
    attacker_frame: Vec<i16>,
    attacker_sent: usize,
    attacker_got: usize,
    cdr: serde_json::Value,
}

/// When (samples from the bridge's first packet) the caller sends what, for `attack`.
struct Plan {
    source: Vec<i16>,
    /// Frames the caller does not send (its silence in the hijack case).
    mute: std::ops::Range<usize>,
    /// Frames during which the attacker sends to the call's port.
    direct: std::ops::Range<usize>,
    /// Where caller2 starts (hijack case).
    second_at: usize,
}

fn plan(attack: Attack, caller1: &[i16], caller2: &[i16]) -> Plan {
    match attack {
        Attack::PortSpray => {
            let mut source = vec![0i16; OPEN_AT + caller1.len() + RATE];
            source[OPEN_AT..OPEN_AT + caller1.len()].copy_from_slice(caller1);
            Plan {
                source,
                mute: 0..0,
                direct: 0..0,
                second_at: 0,
            }
        }
        Attack::SilenceHijack => {
            let silent_from = (OPEN_AT + caller1.len()).div_ceil(FRAME);
            let silent_until = silent_from + 100; // 2 s
            let second_at = silent_until * FRAME;
            let mut source = vec![0i16; second_at + caller2.len() + RATE];
            source[OPEN_AT..OPEN_AT + caller1.len()].copy_from_slice(caller1);
            source[second_at..second_at + caller2.len()].copy_from_slice(caller2);
            Plan {
                source,
                mute: silent_from..silent_until,
                direct: silent_from + 60..silent_until + 40,
                second_at,
            }
        }
    }
}

fn run(attack: Attack, test_name: &str) -> Outcome {
    let text = ProfileSpec::default().render_for(test_name);
    let text = text.replace("recording = false\n", "recording = true\n");
    let daemon = Daemon::spawn(&text);
    let (range_start, range_end) = rtp_range_for(test_name);
    let caller1 = read_wav(&repo_path("fixtures/audio/caller1.wav"));
    let caller2 = read_wav(&repo_path("fixtures/audio/caller2.wav"));
    let plan = plan(attack, &caller1, &caller2);
    let frames = plan.source.len() / FRAME;

    let caller = UdpSocket::bind("127.0.0.1:0").unwrap();
    caller
        .set_read_timeout(Some(Duration::from_millis(2)))
        .unwrap();
    let attacker = UdpSocket::bind("127.0.0.2:0").expect("bind 127.0.0.2 (loopback /8)");
    attacker.set_nonblocking(true).unwrap();
    let mut noise = 0x9e37_79b9_7f4a_7c15u64;
    let attacker_frame: Vec<i16> = (0..FRAME)
        .map(|_| {
            noise ^= noise >> 12;
            noise ^= noise << 25;
            noise ^= noise >> 27;
            ((noise.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 48) as i16) / 3
        })
        .collect();
    let attacker_frame = g711_round_trip(&attacker_frame);

    let caller_port = caller.local_addr().unwrap().port().to_string();
    let hold_ms = (frames * 20 + 1500).to_string();
    let target = daemon.udp_addr();
    let carrier = thread::spawn(move || {
        sipp(
            &sipp_scenario("media_on_test_socket.xml"),
            target,
            &[
                "-key",
                "test_rtp_port",
                &caller_port,
                "-s",
                "+15551234567",
                "-d",
                &hold_ms,
                "-timeout",
                "40s",
            ],
        )
    });

    let listen = Duration::from_millis(frames as u64 * 20 + 800);
    let mut received: Vec<(u32, Vec<u8>)> = Vec::new();
    let mut bridge: Option<SocketAddr> = None;
    let mut t0: Option<Instant> = None;
    let mut caller_sent = 0usize;
    let mut attacker_sent = 0usize;
    let mut attacker_got = 0usize;
    let mut attacker_seq = 0u16;
    let mut next_spray = Instant::now();
    let mut buf = [0u8; 2048];
    let first_deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let now = Instant::now();
        match t0 {
            None if now > first_deadline => break,
            Some(t0) if now > t0 + listen => break,
            _ => {}
        }
        if attack == Attack::PortSpray && now >= next_spray {
            next_spray += Duration::from_millis(20);
            for port in range_start..=range_end {
                for _ in 0..2 {
                    let ts = u32::from(attacker_seq) * FRAME as u32;
                    let p = rtp(attacker_seq, ts, 0x0bad_0bad, &attacker_frame);
                    attacker_seq = attacker_seq.wrapping_add(1);
                    let to = SocketAddr::from(([127, 0, 0, 1], port));
                    if attacker.send_to(&p, to).is_ok() {
                        attacker_sent += 1;
                    }
                }
            }
        }
        if let (Some(t0), Some(to)) = (t0, bridge) {
            while caller_sent < frames && now >= t0 + Duration::from_millis(20 * caller_sent as u64)
            {
                let i = caller_sent;
                caller_sent += 1;
                if plan.direct.contains(&i) {
                    let ts = (i * FRAME) as u32;
                    let p = rtp(7000 + i as u16, ts, 0x0bad_0bad, &attacker_frame);
                    attacker.send_to(&p, to).unwrap();
                    attacker_sent += 1;
                }
                if plan.mute.contains(&i) {
                    continue;
                }
                let samples = &plan.source[i * FRAME..(i + 1) * FRAME];
                let p = rtp(1000 + i as u16, (90_000 + i * FRAME) as u32, SSRC, samples);
                caller.send_to(&p, to).unwrap();
            }
        }
        if let Some((n, from)) = recv_nonblocking(&caller, &mut buf)
            && n >= 12
        {
            bridge.get_or_insert(from);
            t0.get_or_insert_with(Instant::now);
            let ts = u32::from_be_bytes(buf[4..8].try_into().unwrap());
            received.push((ts, buf[12..n].to_vec()));
        }
        while recv_nonblocking(&attacker, &mut buf).is_some() {
            attacker_got += 1;
        }
    }
    carrier.join().unwrap().assert_success();
    let cdr = daemon
        .wait_for_cdr(Duration::from_secs(5), |c| c["result_code"] == 200)
        .expect("the call's CDR");
    assert!(received.len() > 300, "{} packets", received.len());

    let ts0 = received[0].0;
    let span = received
        .iter()
        .map(|(ts, p)| ts.wrapping_sub(ts0) as usize + p.len())
        .max()
        .unwrap();
    let mut heard = vec![0i16; span];
    for (ts, p) in &received {
        let at = ts.wrapping_sub(ts0) as usize;
        g711::decode(Law::Mu, p, &mut heard[at..at + p.len()]);
    }

    // The recording's caller channel.
    let dir = daemon.dir().to_path_buf();
    let call_id = cdr["call_id"].as_str().unwrap().to_owned();
    let deadline = Instant::now() + Duration::from_secs(10);
    let rec = loop {
        let store = Store::open(&dir.join("var/sipbridge.db")).unwrap();
        let recs = store.recordings_of_call("demo", &call_id).unwrap();
        if let Some(r) = recs.iter().find(|r| r.state == RecordingState::Complete) {
            break r.clone();
        }
        assert!(Instant::now() < deadline, "no complete recording: {recs:?}");
        thread::sleep(Duration::from_millis(50));
    };
    let master = std::fs::read(dir.join("var/master.key")).unwrap();
    let keys = KeyRing::open(&dir.join("var"), &master).unwrap();
    let wav = sipbridge::store::recording::export_wav(&rec.path, &keys).unwrap();
    let mut reader = hound::WavReader::new(std::io::Cursor::new(wav)).unwrap();
    let samples: Vec<i16> = reader.samples::<i16>().map(Result::unwrap).collect();
    let recorded_caller = samples.iter().step_by(2).copied().collect();

    Outcome {
        heard,
        recorded_caller,
        attacker_frame,
        attacker_sent,
        attacker_got,
        cdr,
    }
}

/// caller1 (and in the hijack case caller2) echoed whole, ~0.5 s after sending, and
/// present in the recording's caller channel.
fn assert_caller_unaffected(o: &Outcome, segments: &[(usize, &[i16])]) {
    let heard = to_f64(&o.heard);
    let recorded = to_f64(&o.recorded_caller);
    for &(at, audio) in segments {
        let reference = to_f64(&g711_round_trip(audio));
        let (lag, score) = best_match(&heard, &reference, at..at + 2 * RATE);
        let delay = (lag as f64 - at as f64) / RATE as f64;
        eprintln!("echo at {at}: ncc {score:.4}, {delay:.3} s after sending");
        assert!(score >= 0.9, "echo of the caller damaged: ncc {score:.4}");
        assert!((delay - ECHO_DELAY).abs() < 0.3, "echo {delay:.3} s late");
        let (lag, score) = best_match(&recorded, &reference, at.saturating_sub(RATE)..at + RATE);
        eprintln!("recording at {at}: ncc {score:.4} at {lag}");
        assert!(
            score >= 0.9,
            "caller missing from the recording: ncc {score:.4}"
        );
    }
}

fn assert_attacker_nowhere(o: &Outcome) {
    let in_heard = attacker_presence(&o.heard, &o.attacker_frame);
    let in_recording = attacker_presence(&o.recorded_caller, &o.attacker_frame);
    eprintln!(
        "attacker sent {} packets, got {}; its signal in what the caller heard: ncc {in_heard:.3}, \
         in the recording: {in_recording:.3}; CDR rtp {}",
        o.attacker_sent, o.attacker_got, o.cdr["rtp"]
    );
    // Self-check of the detector: the attacker's own signal scores ~1.
    let mut probe = vec![0i16; 4000];
    probe.extend(o.attacker_frame.repeat(20));
    assert!(attacker_presence(&probe, &o.attacker_frame) > 0.95);
    assert_eq!(o.attacker_got, 0, "the bridge sent RTP to the attacker");
    assert!(
        in_heard < 0.3,
        "the attacker reached the caller/pipeline: {in_heard:.3}"
    );
    assert!(
        in_recording < 0.3,
        "the attacker reached the recording: {in_recording:.3}"
    );
    let wrong = o.cdr["rtp"]["wrong_source"].as_u64().unwrap();
    assert!(
        wrong > 0,
        "attacker packets counted as wrong_source: {}",
        o.cdr
    );
}

#[test]
fn port_spray_from_another_address_reaches_nobody() {
    let name = common::current_test_name();
    let o = run(Attack::PortSpray, &name);
    let caller1 = read_wav(&repo_path("fixtures/audio/caller1.wav"));
    assert_caller_unaffected(&o, &[(OPEN_AT, &caller1)]);
    assert_attacker_nowhere(&o);
}

#[test]
fn silence_hijack_from_another_address_reaches_nobody() {
    let name = common::current_test_name();
    let o = run(Attack::SilenceHijack, &name);
    let caller1 = read_wav(&repo_path("fixtures/audio/caller1.wav"));
    let caller2 = read_wav(&repo_path("fixtures/audio/caller2.wav"));
    let p = plan(Attack::SilenceHijack, &caller1, &caller2);
    assert_caller_unaffected(&o, &[(OPEN_AT, &caller1), (p.second_at, &caller2)]);
    assert_attacker_nowhere(&o);
}

#[test]
fn behind_nat_and_the_latch_window_are_read_and_checked() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("p.toml");
    let load = |text: &str| {
        std::fs::write(&path, text).unwrap();
        sipbridge::config::load(&path)
    };
    let base = ProfileSpec::default().render();
    let config = load(&base).unwrap();
    assert!(!config.trunks[0].behind_nat, "strict by default");
    assert_eq!(
        config.profiles[0].security.rtp_latch_window,
        Duration::from_secs(2)
    );
    let nat = ProfileSpec {
        trunk: "behind_nat = true\n",
        extra: "[profile.security]\nrtp_latch_window_ms = 500\n",
        ..ProfileSpec::default()
    }
    .render();
    // `[profile.security]` after other tables is still the profile's sub-table.
    let config = load(&nat).unwrap();
    assert!(config.trunks[0].behind_nat);
    assert_eq!(
        config.profiles[0].security.rtp_latch_window,
        Duration::from_millis(500)
    );
    let err = load(&nat.replace("= 500", "= 0")).unwrap_err();
    let errors: Vec<String> = err.errors().map(ToString::to_string).collect();
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert!(
        errors[0].contains("rtp_latch_window_ms 0 must be 1 to 10000"),
        "{errors:?}"
    );
}
