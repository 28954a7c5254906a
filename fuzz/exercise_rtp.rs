//! One input through the media receive path: the RTP receiver (source lock,
//! payload type and sequence checks, report blocks), RTCP parsing, and SRTP /
//! SRTCP unprotection under every suite. Shared by the cargo-fuzz target
//! (`fuzz_targets/rtp.rs`) and the corpus replay test (`tests/fuzz_corpus.rs`).
//!
//! The input is cut into datagrams: each starts with one byte whose low 7
//! bits are its length (longer than what is left: the rest) and whose top bit
//! picks the sender (the SDP address, or another one). Properties beyond "no
//! panic": nothing from the other address is ever accepted as media; a packet
//! that unprotects is the RTP packet our peer context protected (round trip
//! of the input as payload).

use bytes::Bytes;
use rand::SeedableRng;
use rand::rngs::StdRng;
use sipbridge::media::rtp::rtcp::{RtcpConfig, RtcpScheduler};
use sipbridge::media::rtp::{RtpInput, RtpReceiver, RtpReceiverConfig, RtpSender};
use sipbridge::media::srtp::SrtpSession;
use sipbridge::sip::sdp::{CryptoSuite, KeyMaterial, SrtpParams};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

const SUITES: [CryptoSuite; 6] = [
    CryptoSuite::AesCm128HmacSha1_80,
    CryptoSuite::AesCm128HmacSha1_32,
    CryptoSuite::AesCm256HmacSha1_80,
    CryptoSuite::AesCm256HmacSha1_32,
    CryptoSuite::AeadAes128Gcm,
    CryptoSuite::AeadAes256Gcm,
];

fn key(suite: CryptoSuite, seed: u8) -> KeyMaterial {
    let (k, s) = suite.key_and_salt_len();
    KeyMaterial::new((0..k + s).map(|i| seed.wrapping_add(i as u8)).collect())
}

fn datagrams(data: &[u8]) -> Vec<(bool, &[u8])> {
    let mut out = Vec::new();
    let mut rest = data;
    while let Some((&head, tail)) = rest.split_first() {
        let len = usize::from(head & 0x7f).min(tail.len());
        out.push((head & 0x80 != 0, &tail[..len]));
        rest = &tail[len..];
        if out.len() >= 256 {
            break;
        }
    }
    out
}

pub(crate) fn exercise(data: &[u8]) {
    let sdp: SocketAddr = "192.0.2.10:4000".parse().unwrap_or_else(|_| unreachable!());
    let other: SocketAddr = "198.51.100.7:4000"
        .parse()
        .unwrap_or_else(|_| unreachable!());
    let start = Instant::now();
    let Ok(mut rx) = RtpReceiver::new(RtpReceiverConfig::new(0, Some(101)), sdp) else {
        return;
    };
    let mut rng = StdRng::seed_from_u64(1);
    let mut rtcp = RtcpScheduler::new(RtcpConfig::new("fuzz"), 1, start, &mut rng)
        .unwrap_or_else(|_| unreachable!());
    for (i, (from_other, dgram)) in datagrams(data).into_iter().enumerate() {
        let now = start + Duration::from_millis(20 * i as u64);
        let from = if from_other { other } else { sdp };
        let got = rx.on_datagram(now, from, Bytes::copy_from_slice(dgram));
        if from_other {
            assert!(
                matches!(got, RtpInput::Rejected(_)),
                "packet from another address accepted: {got:?}"
            );
        }
        let _ = rtcp.on_rtcp(now, dgram);
        if i % 8 == 7 {
            let _ = rx.report_block();
        }
    }
    let _ = rx.stats();
    let _ = rtcp.on_rtcp(start, data);

    for suite in SUITES {
        let (a, b) = (key(suite, 1), key(suite, 101));
        let ours = SrtpParams {
            suite,
            tag: 1,
            local: a.clone(),
            remote: b.clone(),
        };
        let theirs = SrtpParams {
            suite,
            tag: 1,
            local: b,
            remote: a,
        };
        let (Ok(mut us), Ok(mut peer)) = (SrtpSession::new(&ours), SrtpSession::new(&theirs))
        else {
            panic!("valid keys refused for {suite:?}");
        };
        // Raw input: rejected or unprotected, never a panic.
        let _ = us.unprotect_rtp(data);
        let _ = us.unprotect_rtcp(data);
        for (_, dgram) in datagrams(data).into_iter().take(16) {
            let _ = us.unprotect_rtp(dgram);
            let _ = us.unprotect_rtcp(dgram);
        }
        // Round trip: the input as the payload of the peer's packet, into a
        // fresh context (the one above may have met its SSRC limit).
        let Ok(mut us) = SrtpSession::new(&ours) else {
            unreachable!()
        };
        let mut sender = RtpSender::new(0x1234_5678, 1, 160, 0);
        let payload = &data[..data.len().min(1024)];
        let plain = sender.packet(payload, false, 160);
        let protected = peer
            .protect_rtp(&plain)
            .unwrap_or_else(|e| panic!("{suite:?} protect: {e}"));
        match us.unprotect_rtp(&protected) {
            Ok(back) => assert_eq!(back, plain, "{suite:?} round trip changed the packet"),
            Err(e) => panic!("{suite:?} own packet refused: {e}"),
        }
        assert!(
            us.unprotect_rtp(&protected).is_err(),
            "{suite:?} replay accepted"
        );
    }
}
