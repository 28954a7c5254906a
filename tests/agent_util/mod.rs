//! Helpers for the agent acceptance tests (`tests/agent_native.rs`,
//! `tests/agent_twilio.rs`, `tests/agent_telnyx.rs`), written from the specs and independent of the
//! bridge's own code: a µ-law decode table and base64, normalised
//! cross-correlation, capture of the RTP that reaches the caller, the
//! "playout stopped within N ms of media time after `clear`" measurement, an
//! HMAC signature check as an agent would do it, and a private CA with a
//! server certificate for `wss://`.

// Each test file uses a different part of it.
#![allow(dead_code)]
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::UdpSocket;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// µ-law code → linear, from the G.711 formula (bias 0x84, 8 segments).
pub(crate) fn ulaw_decode(code: u8) -> i16 {
    let u = !code;
    let exponent = (u >> 4) & 7;
    let mantissa = i32::from(u & 0x0f);
    let magnitude = (((mantissa << 3) + 0x84) << exponent) - 0x84;
    if u & 0x80 != 0 {
        -magnitude as i16
    } else {
        magnitude as i16
    }
}

/// Linear → µ-law code, from the G.711 formula (clip at 32635, bias 0x84).
pub(crate) fn ulaw_encode(sample: i16) -> u8 {
    let mut s = i32::from(sample);
    let sign = if s < 0 {
        s = -s;
        0x80
    } else {
        0
    };
    let s = s.min(32_635) + 0x84;
    let exponent = 31 - s.leading_zeros() as i32 - 7;
    let mantissa = (s >> (exponent + 3)) & 0x0f;
    !((sign | (exponent << 4) | mantissa) as u8)
}

/// The 256-entry decode table.
pub(crate) fn ulaw_table() -> [i16; 256] {
    std::array::from_fn(|i| ulaw_decode(i as u8))
}

const B64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

/// Standard base64 with padding.
pub(crate) fn b64_encode(bytes: &[u8]) -> String {
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, &b)| n | u32::from(b) << (16 - 8 * i));
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(B64[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// Standard base64 (padding optional); `None` for any other character.
pub(crate) fn b64_decode(text: &str) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    let (mut acc, mut bits) = (0u32, 0);
    for c in text.bytes().filter(|&c| c != b'=') {
        let v = B64.iter().position(|&b| b == c)? as u32;
        acc = acc << 6 | v;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
        }
    }
    Some(out)
}

/// Normalised cross-correlation of `needle` with `hay[lag..]` (zero beyond its end).
pub(crate) fn ncc(hay: &[f64], needle: &[f64], lag: usize) -> f64 {
    let (mut dot, mut e_hay, mut e_needle) = (0.0, 0.0, 0.0);
    for (i, n) in needle.iter().enumerate() {
        let h = hay.get(lag + i).copied().unwrap_or(0.0);
        dot += h * n;
        e_hay += h * h;
        e_needle += n * n;
    }
    let d = (e_hay * e_needle).sqrt();
    if d == 0.0 { 0.0 } else { dot / d }
}

/// The best NCC of `needle` over every lag in `hay`, and that lag.
pub(crate) fn best_ncc(hay: &[f64], needle: &[f64]) -> (f64, usize) {
    (0..hay.len().saturating_sub(needle.len()) + 1)
        .map(|l| (ncc(hay, needle, l), l))
        .fold((f64::MIN, 0), |a, b| if b.0 > a.0 { b } else { a })
}

/// Segmental match of `needle` in `hay`, for audio that passed through a peer
/// which may stall: a stalled agent makes the bridge send silence for a while and
/// then the rest of its audio later, so one lag cannot fit the whole needle. The
/// needle is cut into `window`-sample pieces; each piece with speech in it is
/// matched on its own, over lags within `slack` samples of where the whole needle
/// fits best. Returns the best NCC of each voiced piece, in order.
pub(crate) fn segment_nccs(hay: &[f64], needle: &[f64], window: usize, slack: usize) -> Vec<f64> {
    // Where the whole needle fits best, found on every 4th sample (16 times less
    // work in a debug build; each piece is then searched sample by sample).
    let every4 = |x: &[f64]| x.iter().step_by(4).copied().collect::<Vec<f64>>();
    let (_, lag0) = best_ncc(&every4(hay), &every4(needle));
    let lag0 = lag0 * 4;
    let loudest = needle
        .chunks(window)
        .map(|w| w.iter().map(|s| s * s).sum::<f64>() / w.len() as f64)
        .fold(0.0_f64, f64::max);
    needle
        .chunks_exact(window)
        .enumerate()
        .filter(|(_, w)| w.iter().map(|s| s * s).sum::<f64>() / window as f64 > loudest / 100.0)
        .map(|(k, piece)| {
            let centre = lag0 + k * window;
            let last = hay.len().saturating_sub(window);
            (centre.saturating_sub(slack)..=(centre + slack).min(last))
                .map(|l| ncc(hay, piece, l))
                .fold(f64::MIN, f64::max)
        })
        .collect()
}

/// One RTP packet as the caller received it.
#[derive(Debug, Clone)]
pub(crate) struct Packet {
    pub(crate) at: Instant,
    pub(crate) ts: u32,
    pub(crate) samples: Vec<i16>,
}

impl Packet {
    /// Anything above the quietest µ-law steps.
    pub(crate) fn audible(&self) -> bool {
        self.samples.iter().any(|s| s.unsigned_abs() > 64)
    }
}

/// Receives PCMU RTP on `sock` until `limit` has passed, or 1.5 s without a
/// packet once some arrived; `on_packet` sees each as it comes.
pub(crate) fn capture(
    sock: &UdpSocket,
    limit: Duration,
    mut on_packet: impl FnMut(&Packet),
) -> Vec<Packet> {
    let table = ulaw_table();
    sock.set_read_timeout(Some(Duration::from_millis(1500)))
        .unwrap();
    let deadline = Instant::now() + limit;
    let mut out: Vec<Packet> = Vec::new();
    let mut buf = [0u8; 2048];
    while Instant::now() < deadline {
        match sock.recv_from(&mut buf) {
            Ok((n, _)) if n == 12 + 160 && buf[1] & 0x7f == 0 => {
                let p = Packet {
                    at: Instant::now(),
                    ts: u32::from_be_bytes([buf[4], buf[5], buf[6], buf[7]]),
                    samples: buf[12..n].iter().map(|&c| table[c as usize]).collect(),
                };
                on_packet(&p);
                out.push(p);
            }
            Ok(_) => {}
            Err(_) if !out.is_empty() => break,
            Err(_) => {}
        }
    }
    out
}

/// A call from SIPp to `number` whose media goes to a socket this test
/// holds (`media_on_test_socket.xml`), held `hold_ms`; returns the RTP the
/// caller received, `on_packet` seeing each packet as it arrives.
pub(crate) fn call_capturing_rtp(
    daemon: &crate::common::Daemon,
    number: &str,
    hold_ms: u32,
    on_packet: impl FnMut(&Packet),
) -> Vec<Packet> {
    use crate::common::{sipp, sipp_scenario};
    let media = UdpSocket::bind("127.0.0.1:0").unwrap();
    let media_port = media.local_addr().unwrap().port().to_string();
    let target = daemon.udp_addr();
    let hold = hold_ms.to_string();
    let number = number.to_owned();
    let carrier = std::thread::spawn(move || {
        sipp(
            &sipp_scenario("media_on_test_socket.xml"),
            target,
            &[
                "-key",
                "test_rtp_port",
                &media_port,
                "-s",
                &number,
                "-d",
                &hold,
            ],
        )
    });
    let packets = capture(&media, Duration::from_secs(15), on_packet);
    carrier.join().unwrap().assert_success();
    packets
}

/// Media time (ms) from `clear_at` to the end of the last audible packet
/// sent before playout stopped. The media time of `clear_at` is read off the
/// RTP clock: packets leave the bridge on a 20 ms wall-clock tick, so
/// `arrival - ts / 8000` is the same for all of them but for delays on the
/// way, which only add; the smallest is the mapping. Returns the overrun in
/// ms (negative: stopped before the clear's media time) and the number of
/// audible packets after the first silent one that followed (should be 0).
pub(crate) fn playout_overrun_ms(packets: &[Packet], clear_at: Instant) -> (f64, usize) {
    let ts0 = packets[0].ts;
    let media = |p: &Packet| Duration::from_secs_f64(f64::from(p.ts.wrapping_sub(ts0)) / 8000.0);
    let base = packets
        .iter()
        .map(|p| p.at - media(p))
        .min()
        .expect("packets");
    // Media times in samples since the first packet.
    let clear_ts = (clear_at - base).as_secs_f64() * 8000.0;
    let before = packets
        .iter()
        .rposition(|p| p.at <= clear_at)
        .expect("packets before the clear");
    // The first silent packet after the audio that was playing.
    let stop = packets[before..]
        .iter()
        .position(|p| !p.audible())
        .map(|i| before + i)
        .expect("playout stopped");
    let last_audible = packets[..stop]
        .iter()
        .rposition(Packet::audible)
        .expect("audio was playing at the clear");
    let end_ts = f64::from(packets[last_audible].ts.wrapping_sub(ts0)) + 160.0;
    let later = packets[stop..].iter().filter(|p| p.audible()).count();
    ((end_ts - clear_ts) / 8.0, later)
}

/// What an agent checks on the upgrade with HMAC auth
/// (docs/agent-protocol.md): the signature over timestamp, call id and
/// request target, a timestamp within `max_skew` of now. Returns the signed
/// call id (to compare with the call's `start`) or why it was refused.
pub(crate) fn verify_hmac(
    secret: &[u8],
    timestamp: Option<&str>,
    call_id: Option<&str>,
    signature: Option<&str>,
    request_target: &str,
    max_skew: Duration,
) -> Result<String, String> {
    use hmac::{Hmac, KeyInit, Mac};
    let ts = timestamp.ok_or("no timestamp")?;
    let call_id = call_id.ok_or("no call id")?;
    let sig = signature.ok_or("no signature")?;
    let hex_sig = sig.strip_prefix("v1=").ok_or("not v1")?;
    let given = hex::decode(hex_sig).map_err(|_| "not hex")?;
    let mut mac = <Hmac<sha2::Sha256> as KeyInit>::new_from_slice(secret).unwrap();
    mac.update(format!("{ts}.{call_id}.{request_target}").as_bytes());
    mac.verify_slice(&given).map_err(|_| "bad signature")?;
    let ts: u64 = ts.parse().map_err(|_| "bad timestamp")?;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    if now.abs_diff(ts) > max_skew.as_secs() {
        return Err("stale".into());
    }
    Ok(call_id.to_owned())
}

/// A private CA (written as PEM to `dir/ca.pem`) and a rustls server config
/// for `127.0.0.1` with a certificate it issued.
pub(crate) fn private_ca_server(dir: &Path) -> (Arc<rustls::ServerConfig>, std::path::PathBuf) {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "sipbridge test CA");
    let ca_cert = ca_params.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca_params, ca_key);
    let leaf_key = KeyPair::generate().unwrap();
    let leaf = CertificateParams::new(vec!["127.0.0.1".to_owned()])
        .unwrap()
        .signed_by(&leaf_key, &issuer)
        .unwrap();
    let ca_path = dir.join("ca.pem");
    std::fs::write(&ca_path, ca_cert.pem()).unwrap();
    let key = rustls_pki_types::PrivateKeyDer::Pkcs8(leaf_key.serialize_der().into());
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(vec![leaf.der().clone()], key)
    .unwrap();
    (Arc::new(config), ca_path)
}

#[test]
fn own_codecs_agree_with_known_values() {
    assert_eq!(ulaw_decode(0xff), 0);
    assert_eq!(ulaw_decode(0x7f), 0);
    assert_eq!(ulaw_decode(0x00), -32124);
    assert_eq!(ulaw_decode(0x80), 32124);
    assert_eq!(ulaw_encode(0), 0xff);
    for code in 0..=255u8 {
        let back = ulaw_encode(ulaw_decode(code));
        assert!(back == code || (code == 0x7f && back == 0xff), "{code:#x}");
    }
    assert_eq!(b64_encode(b"Man"), "TWFu");
    assert_eq!(b64_encode(b"Ma"), "TWE=");
    assert_eq!(b64_encode(b"M"), "TQ==");
    assert_eq!(b64_decode("TWFuTWE=").unwrap(), b"ManMa");
    assert_eq!(b64_decode("T@"), None);
    let bytes: Vec<u8> = (0..=255).collect();
    assert_eq!(b64_decode(&b64_encode(&bytes)).unwrap(), bytes);
}
