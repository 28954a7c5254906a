#![allow(clippy::unwrap_used, clippy::expect_used)]
//! Junk on a live call's media ports (issue 4's acceptance: "RTP from a wrong source, wrong
//! payload type, truncated headers, random bytes: counted, ignored, call unaffected").
//!
//! SIPp does the signalling (`tests/sipp/media_on_test_socket.xml`) with an SDP offer
//! naming a UDP socket this test owns (`caller`). From it the test sends the real call
//! audio, PCMU every 20 ms: silence while the disclosure prompt plays, then caller1, then
//! silence. Interleaved with it, from `caller` and from a second socket (`intruder`, a
//! wrong source once the bridge has latched `caller`), it sends every kind of bad RTP
//! ([`Junk`]), and junk to the call's RTCP port. Then it checks:
//! - the echo of caller1 comes back whole (normalised cross-correlation ≥ 0.9) about
//!   0.5 s after it was sent;
//! - the bridge sent only to `caller`, never to `intruder`;
//! - the CDR counts every junk datagram in `rtp.rejected` and exactly the real packets in
//!   `rtp.packets_in`, with nothing lost.
//!
//! Owns: the junk generators, a small RTP parser for what the bridge sends, and a
//! correlation search (coarse on 4× decimated signals, then full rate around the peak).

mod common;

use std::collections::BTreeMap;
use std::net::{SocketAddr, UdpSocket};
use std::path::Path;
use std::thread;
use std::time::{Duration, Instant};

use common::audio::ncc;
use common::{Daemon, profile_toml, repo_path, sipp, sipp_scenario};
use sipbridge::media::g711::{self, Law};

/// Samples per second (G.711).
const RATE: usize = 8000;
/// Samples per 20 ms packet.
const FRAME: usize = 160;
/// When (from the bridge's first packet) the test starts caller1: after the 4.43 s prompt,
/// whose end opens the gate to the echo pipeline.
const OPEN_AT: usize = 5 * RATE;
/// When the test stops sending real audio.
const SEND_UNTIL: usize = 8 * RATE + RATE / 2;
/// How long SIPp holds the call after its ACK: the sending, the echo's tail, and margin.
const HOLD_MS: u64 = 9800;
/// How long the test listens after the bridge's first packet.
const LISTEN: Duration = Duration::from_millis(9300);
/// The echo pipeline's documented delay.
const ECHO_DELAY: f64 = 0.5;
/// Junk starts after this many real packets: the bridge latched `caller` after 2.
const JUNK_FROM_PACKET: usize = 10;
/// The test's SSRC for the real stream.
const SSRC: u32 = 0x5eed_cafe;

// ---------------------------------------------------------------------------------------
// Signals and correlation
// ---------------------------------------------------------------------------------------

fn read_wav(path: &Path) -> Vec<i16> {
    let mut reader =
        hound::WavReader::open(path).unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    let spec = reader.spec();
    assert_eq!((spec.channels, spec.sample_rate), (1, 8000));
    reader.samples::<i16>().map(Result::unwrap).collect()
}

fn to_f64(samples: &[i16]) -> Vec<f64> {
    samples.iter().map(|&s| f64::from(s)).collect()
}

fn seconds(samples: usize) -> f64 {
    samples as f64 / RATE as f64
}

/// Best `(lag, ncc)` of `needle` in `hay` over `lags`: every 4th lag on signals averaged
/// over 4 samples, then every lag within 8 of the coarse peak.
fn best_match(hay: &[f64], needle: &[f64], lags: std::ops::Range<usize>) -> (usize, f64) {
    let decimate =
        |x: &[f64]| -> Vec<f64> { x.chunks(4).map(|c| c.iter().sum::<f64>() / 4.0).collect() };
    let (coarse_hay, coarse_needle) = (decimate(hay), decimate(needle));
    let coarse = (lags.start / 4..lags.end.div_ceil(4))
        .map(|lag| (lag, ncc(&coarse_hay, &coarse_needle, lag)))
        .max_by(|a, b| a.1.total_cmp(&b.1))
        .expect("a non-empty lag range");
    let centre = coarse.0 * 4;
    (centre.saturating_sub(8)..centre + 9)
        .map(|lag| (lag, ncc(hay, needle, lag)))
        .max_by(|a, b| a.1.total_cmp(&b.1))
        .expect("17 lags")
}

// ---------------------------------------------------------------------------------------
// RTP
// ---------------------------------------------------------------------------------------

/// An RTP header (version 2, no CSRC, no extension) followed by `payload`.
fn rtp(payload_type: u8, seq: u16, timestamp: u32, ssrc: u32, payload: &[u8]) -> Vec<u8> {
    let mut packet = vec![0x80, payload_type & 0x7f];
    packet.extend_from_slice(&seq.to_be_bytes());
    packet.extend_from_slice(&timestamp.to_be_bytes());
    packet.extend_from_slice(&ssrc.to_be_bytes());
    packet.extend_from_slice(payload);
    packet
}

/// Real packet `index` of the test's stream.
fn real_packet(index: usize, samples: &[i16]) -> Vec<u8> {
    let seq = (index as u16).wrapping_add(1000);
    let timestamp = ((index * FRAME) as u32).wrapping_add(90_000);
    let payload: Vec<u8> = samples
        .iter()
        .map(|&s| g711::encode_sample(Law::Mu, s))
        .collect();
    let mut packet = rtp(0, seq, timestamp, SSRC, &payload);
    if index == 0 {
        packet[1] |= 0x80;
    }
    packet
}

/// One RTP packet the bridge sent.
struct Received {
    timestamp: u32,
    payload_type: u8,
    payload: Vec<u8>,
}

fn parse_rtp(datagram: &[u8]) -> Option<Received> {
    if datagram.len() < 12 || datagram[0] >> 6 != 2 || datagram[0] & 0x3f != 0 {
        return None; // the bridge sends no padding, extension or CSRC
    }
    Some(Received {
        timestamp: u32::from_be_bytes(datagram[4..8].try_into().unwrap()),
        payload_type: datagram[1] & 0x7f,
        payload: datagram[12..].to_vec(),
    })
}

/// A small deterministic generator (xorshift64*) for the random junk.
struct Noise(u64);

impl Noise {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }
}

/// The kinds of bad datagram sent to the RTP port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Junk {
    /// Payload type 18 (G.729), not offered.
    WrongPayloadType,
    /// Payload type 101 (telephone-event), not offered either.
    UnofferedEvents,
    /// 0 to 11 bytes.
    Truncated,
    /// Version 0, 1 or 3, otherwise a full PCMU packet.
    BadVersion,
    /// CSRC count 15 in a 52-byte datagram.
    CsrcOverrun,
    /// P bit with a padding count of 0.
    ZeroPadding,
    /// P bit with a padding count of 255 in a 172-byte datagram.
    PaddingTooLong,
    /// X bit with an extension claiming 200 words.
    ExtensionOverrun,
    /// An RTCP receiver report on the RTP port (PT 201 reads as marker + PT 73).
    RtcpOnRtpPort,
    /// Random bytes (never a valid version-2 PCMU header).
    Random,
}

const JUNK_KINDS: [Junk; 10] = [
    Junk::WrongPayloadType,
    Junk::UnofferedEvents,
    Junk::Truncated,
    Junk::BadVersion,
    Junk::CsrcOverrun,
    Junk::ZeroPadding,
    Junk::PaddingTooLong,
    Junk::ExtensionOverrun,
    Junk::RtcpOnRtpPort,
    Junk::Random,
];

/// Junk datagram number `n` of `kind`. Header fields (seq, timestamp, SSRC) are the real
/// stream's, so only what makes it junk differs.
fn junk(kind: Junk, n: usize, seq: u16, timestamp: u32, noise: &mut Noise) -> Vec<u8> {
    let pcmu = [0x55u8; FRAME];
    match kind {
        Junk::WrongPayloadType => rtp(18, seq, timestamp, SSRC, &[0x11; 20]),
        Junk::UnofferedEvents => rtp(101, seq, timestamp, SSRC, &[1, 0x0a, 0, 160]),
        Junk::Truncated => rtp(0, seq, timestamp, SSRC, &[])[..n % 12].to_vec(),
        Junk::BadVersion => {
            let mut p = rtp(0, seq, timestamp, SSRC, &pcmu);
            p[0] = [0x00, 0x40, 0xc0][n % 3];
            p
        }
        Junk::CsrcOverrun => {
            let mut p = rtp(0, seq, timestamp, SSRC, &[0x55; 40]);
            p[0] |= 0x0f;
            p
        }
        Junk::ZeroPadding => {
            let mut p = rtp(0, seq, timestamp, SSRC, &pcmu);
            p[0] |= 0x20;
            *p.last_mut().unwrap() = 0;
            p
        }
        Junk::PaddingTooLong => {
            let mut p = rtp(0, seq, timestamp, SSRC, &pcmu);
            p[0] |= 0x20;
            *p.last_mut().unwrap() = 255;
            p
        }
        Junk::ExtensionOverrun => {
            let mut ext = vec![0xbe, 0xde, 0x00, 200];
            ext.extend_from_slice(&pcmu);
            let mut p = rtp(0, seq, timestamp, SSRC, &ext);
            p[0] |= 0x10;
            p
        }
        Junk::RtcpOnRtpPort => {
            // RR, no report blocks: V=2, RC=0, PT=201, length 1, SSRC.
            let mut p = vec![0x80, 201, 0, 1];
            p.extend_from_slice(&SSRC.to_be_bytes());
            p
        }
        Junk::Random => loop {
            let len = 1 + (noise.next() % 300) as usize;
            let bytes = noise.bytes(len);
            let plausible = len >= 12 && bytes[0] >> 6 == 2 && bytes[1] & 0x7f == 0;
            if !plausible {
                break bytes;
            }
        },
    }
}

/// Junk datagram `n` for the RTCP port.
fn rtcp_junk(n: usize, noise: &mut Noise) -> Vec<u8> {
    match n % 6 {
        0 => Vec::new(),
        1 => noise.bytes(1 + n % 7),
        // An SR header whose length claims 100 words in 28 bytes.
        2 => {
            let mut p = vec![0x80, 200, 0, 100];
            p.extend_from_slice(&noise.bytes(24));
            p
        }
        // Version 0.
        3 => {
            let mut p = vec![0x01, 201, 0, 1];
            p.extend_from_slice(&SSRC.to_be_bytes());
            p
        }
        // An RR claiming 31 report blocks but holding none.
        4 => {
            let mut p = vec![0x9f, 201, 0, 1];
            p.extend_from_slice(&SSRC.to_be_bytes());
            p
        }
        _ => {
            let len = 1 + (noise.next() % 400) as usize;
            noise.bytes(len)
        }
    }
}

fn recv_nonblocking(socket: &UdpSocket, buf: &mut [u8]) -> Option<(usize, SocketAddr)> {
    match socket.recv_from(buf) {
        Ok(got) => Some(got),
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ) =>
        {
            None
        }
        // Linux reports an ICMP port unreachable for an earlier send here: not data.
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => None,
        Err(e) => panic!("recv: {e}"),
    }
}

// ---------------------------------------------------------------------------------------
// The test
// ---------------------------------------------------------------------------------------

#[test]
fn junk_on_the_media_ports_is_counted_and_ignored() {
    let started = Instant::now();
    let daemon = Daemon::spawn(&profile_toml(""));
    let caller_audio = read_wav(&repo_path("fixtures/audio/caller1.wav"));

    let caller = UdpSocket::bind("127.0.0.1:0").unwrap();
    let intruder = UdpSocket::bind("127.0.0.1:0").unwrap();
    caller
        .set_read_timeout(Some(Duration::from_millis(2)))
        .unwrap();
    intruder.set_nonblocking(true).unwrap();
    let caller_port = caller.local_addr().unwrap().port().to_string();
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
                &HOLD_MS.to_string(),
                "-timeout",
                "30s",
            ],
        )
    });

    let mut source = vec![0i16; SEND_UNTIL];
    source[OPEN_AT..OPEN_AT + caller_audio.len()].copy_from_slice(&caller_audio);
    let frames = SEND_UNTIL / FRAME;

    let mut noise = Noise(0x9e37_79b9_7f4a_7c15);
    let mut received: Vec<Received> = Vec::new();
    let mut bridge: Option<SocketAddr> = None;
    let mut bridge_sources: BTreeMap<SocketAddr, usize> = BTreeMap::new();
    let mut intruder_got = 0usize;
    let mut junk_sent: BTreeMap<(Junk, &str), usize> = BTreeMap::new();
    let mut wrong_source_valid = 0usize;
    let mut rtcp_sent = 0usize;
    let mut real_sent = 0usize;
    let mut t0: Option<Instant> = None;
    let mut buf = [0u8; 2048];
    let first_deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let now = Instant::now();
        match t0 {
            None if now > first_deadline => break,
            Some(t0) if now > t0 + LISTEN => break,
            _ => {}
        }
        if let (Some(t0), Some(to)) = (t0, bridge) {
            while real_sent < frames && now >= t0 + Duration::from_millis(20 * real_sent as u64) {
                let i = real_sent;
                caller
                    .send_to(&real_packet(i, &source[i * FRAME..(i + 1) * FRAME]), to)
                    .unwrap();
                real_sent += 1;
                if i < JUNK_FROM_PACKET {
                    continue;
                }
                let seq = (i as u16).wrapping_add(1001);
                let timestamp = (((i + 1) * FRAME) as u32).wrapping_add(90_000);
                match i % 4 {
                    // Bad RTP, alternately from the caller's own address and the intruder.
                    1 => {
                        let n = i / 4;
                        let kind = JUNK_KINDS[(n / 2) % JUNK_KINDS.len()];
                        let (socket, name) = if n.is_multiple_of(2) {
                            (&caller, "caller")
                        } else {
                            (&intruder, "intruder")
                        };
                        let count = junk_sent.entry((kind, name)).or_default();
                        socket
                            .send_to(&junk(kind, *count, seq, timestamp, &mut noise), to)
                            .unwrap();
                        *count += 1;
                    }
                    // Good RTP from the wrong source, three in a row (more than the two
                    // that latch a source), carrying noise the echo must never contain.
                    2 if i % 20 == 2 => {
                        for k in 0..3u16 {
                            let payload = noise.bytes(FRAME);
                            let p = rtp(
                                0,
                                7000 + (wrong_source_valid as u16) + k,
                                timestamp,
                                0x0bad_0bad,
                                &payload,
                            );
                            intruder.send_to(&p, to).unwrap();
                        }
                        wrong_source_valid += 3;
                    }
                    // Junk to the RTCP port (the RTP port + 1), from either socket.
                    3 => {
                        let rtcp = SocketAddr::new(to.ip(), to.port() + 1);
                        let socket = if rtcp_sent.is_multiple_of(2) {
                            &caller
                        } else {
                            &intruder
                        };
                        socket
                            .send_to(&rtcp_junk(rtcp_sent, &mut noise), rtcp)
                            .unwrap();
                        rtcp_sent += 1;
                    }
                    _ => {}
                }
            }
        }
        if let Some((n, from)) = recv_nonblocking(&caller, &mut buf)
            && let Some(packet) = parse_rtp(&buf[..n])
        {
            bridge.get_or_insert(from);
            *bridge_sources.entry(from).or_default() += 1;
            t0.get_or_insert_with(Instant::now);
            received.push(packet);
        }
        while recv_nonblocking(&intruder, &mut buf).is_some() {
            intruder_got += 1;
        }
    }
    let result = carrier.join().unwrap();
    result.assert_success();
    let cdr = daemon
        .wait_for_cdr(Duration::from_secs(5), |c| c["result_code"] == 200)
        .expect("the call's CDR");

    // The bridge's RTP port is the one in its SDP answer (so + 1 was its RTCP port).
    let bridge = bridge.expect("the bridge sent RTP");
    // The offer's m= line comes first in SIPp's trace, the answer's last.
    let answer_ports: Vec<u16> = result
        .messages
        .lines()
        .filter_map(|l| l.trim().strip_prefix("m=audio "))
        .filter_map(|rest| rest.split_whitespace().next()?.parse().ok())
        .collect();

    // What the caller heard, placed by RTP timestamp.
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
    let reference: Vec<i16> = caller_audio
        .iter()
        .map(|&s| g711::decode_sample(Law::Mu, g711::encode_sample(Law::Mu, s)))
        .collect();
    let (echo_lag, echo_ncc) = best_match(&heard, &to_f64(&reference), OPEN_AT..OPEN_AT + 2 * RATE);
    let echo_delay = seconds(echo_lag) - seconds(OPEN_AT);

    let junk_total: usize = junk_sent.values().sum::<usize>() + wrong_source_valid;
    let rtp = &cdr["rtp"];
    eprintln!(
        "rtp_junk: sent {real_sent} real packets, {junk_total} junk RTP datagrams \
         ({wrong_source_valid} valid PCMU from the intruder, the rest {junk_sent:?}), \
         {rtcp_sent} junk RTCP datagrams; received {} packets from {bridge_sources:?}, \
         {intruder_got} at the intruder; SDP m= ports {answer_ports:?}; echo ncc {echo_ncc:.4} \
         at {:.3} s ({echo_delay:.3} s after sending); CDR rtp {rtp}; test took {:.1} s",
        received.len(),
        seconds(echo_lag),
        started.elapsed().as_secs_f64(),
    );

    assert_eq!(
        answer_ports.last().copied(),
        Some(bridge.port()),
        "the bridge's RTP comes from its SDP answer's port"
    );
    assert_eq!(bridge_sources.len(), 1, "RTP from several bridge ports");
    assert_eq!(intruder_got, 0, "the bridge sent to the wrong source");
    assert!(
        received.len() > 400,
        "only {} packets from the bridge",
        received.len()
    );
    assert!(
        received
            .iter()
            .all(|p| p.payload_type == 0 && p.payload.len() == FRAME)
    );
    if echo_ncc < 0.9 {
        // Where the damage is: the echo against caller1 in 250 ms windows.
        let reference = to_f64(&reference);
        let windows: Vec<String> = (0..reference.len() / (RATE / 4))
            .map(|w| {
                let part = &reference[w * RATE / 4..(w + 1) * RATE / 4];
                format!("{:.2}", ncc(&heard, part, echo_lag + w * RATE / 4))
            })
            .collect();
        let gaps: Vec<(u32, u32)> = received
            .windows(2)
            .map(|p| (p[0].timestamp, p[1].timestamp.wrapping_sub(p[0].timestamp)))
            .filter(|&(_, step)| step != FRAME as u32)
            .map(|(ts, step)| (ts.wrapping_sub(ts0), step))
            .collect();
        panic!(
            "echo of caller1 damaged: ncc {echo_ncc:.4}; per 250 ms window {windows:?}; \
             timestamp steps other than 160 (at, step): {gaps:?}"
        );
    }
    assert!(
        (echo_delay - ECHO_DELAY).abs() < 0.3,
        "echo {echo_delay:.3} s after caller1 was sent, expected ~{ECHO_DELAY} s"
    );
    assert_eq!(cdr["hangup_side"], "caller", "{cdr}");
    assert_eq!(rtp["packets_in"], real_sent, "{cdr}");
    assert_eq!(rtp["lost"], 0, "{cdr}");
    assert_eq!(rtp["rejected"], junk_total, "{cdr}");
}
