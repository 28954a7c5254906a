#![allow(clippy::unwrap_used, clippy::expect_used)]
//! RtpReceiver / RtpSender / RtcpScheduler against packets built with the
//! webrtc-rs crates, in virtual time, with hand-computed RFC 3550 values.

use std::net::SocketAddr;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use proptest::prelude::*;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use sipbridge::media::rtp::rtcp::{RtcpConfig, RtcpScheduler, ntp_timestamp};
use sipbridge::media::rtp::{
    RejectReason, RtpInput, RtpReceiver, RtpReceiverConfig, RtpSender, RtpSourcePolicy,
};
use webrtc_util::marshal::Marshal;

const PCMU: u8 = 0;
const EVENT: u8 = 101;

fn sdp_addr() -> SocketAddr {
    "192.0.2.1:5004".parse().unwrap()
}

fn other_addr() -> SocketAddr {
    "198.51.100.7:33000".parse().unwrap()
}

fn receiver() -> RtpReceiver {
    RtpReceiver::new(RtpReceiverConfig::new(PCMU, Some(EVENT)), sdp_addr()).unwrap()
}

/// A packet built by the `rtp` crate.
fn pkt(pt: u8, seq: u16, ts: u32, ssrc: u32) -> Bytes {
    rtp::packet::Packet {
        header: rtp::header::Header {
            version: 2,
            payload_type: pt,
            sequence_number: seq,
            timestamp: ts,
            ssrc,
            ..Default::default()
        },
        payload: Bytes::from(vec![0xff; 160]),
    }
    .marshal()
    .unwrap()
}

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

fn accepted(input: &RtpInput) -> bool {
    matches!(
        input,
        RtpInput::Media { .. } | RtpInput::TelephoneEvent { .. }
    )
}

#[test]
fn media_fields_and_telephone_event() {
    let t0 = Instant::now();
    let mut rx = receiver();
    let mut p = rtp::packet::Packet {
        header: rtp::header::Header {
            version: 2,
            marker: true,
            payload_type: PCMU,
            sequence_number: 9,
            timestamp: 1234,
            ssrc: 42,
            csrc: vec![7, 8],
            ..Default::default()
        },
        payload: Bytes::from_static(b"abc"),
    };
    p.header.padding = true;
    assert_eq!(
        rx.on_datagram(t0, sdp_addr(), p.marshal().unwrap()),
        RtpInput::Media {
            seq: 9,
            timestamp: 1234,
            ssrc: 42,
            payload_type: PCMU,
            marker: true,
            payload: Bytes::from_static(b"abc"),
        }
    );
    let ev = pkt(EVENT, 10, 1234, 42);
    assert!(matches!(
        rx.on_datagram(t0 + ms(20), sdp_addr(), ev),
        RtpInput::TelephoneEvent {
            seq: 10,
            timestamp: 1234,
            ssrc: 42,
            ..
        }
    ));
    assert_eq!(rx.last_packet_at(), Some(t0 + ms(20)));
    assert_eq!(rx.stats().bytes_received, 3 + 160);
}

#[test]
fn payload_type_mismatch_is_counted_and_ignored() {
    let t0 = Instant::now();
    let mut rx = receiver();
    assert_eq!(
        rx.on_datagram(t0, sdp_addr(), pkt(8, 1, 0, 1)),
        RtpInput::Rejected(RejectReason::WrongPayloadType)
    );
    assert_eq!(rx.stats().rejected.wrong_payload_type, 1);
    assert_eq!(rx.stats().packets_received, 0);
    assert_eq!(rx.last_packet_at(), None);
}

#[test]
fn malformed_datagrams_are_counted_per_reason() {
    let t0 = Instant::now();
    let mut rx = receiver();
    let good = pkt(PCMU, 1, 0, 1);
    let mut bad_version = good.to_vec();
    bad_version[0] = 0x40;
    let mut csrc = good[..12].to_vec();
    csrc[0] |= 0x0f;
    let mut ext = good[..12].to_vec();
    ext[0] |= 0x10;
    ext.extend_from_slice(&[0xbe, 0xde, 0x00, 0x09]);
    let mut pad = good.to_vec();
    pad[0] |= 0x20;
    *pad.last_mut().unwrap() = 200;
    for (data, reason) in [
        (good[..5].to_vec(), RejectReason::Truncated),
        (bad_version, RejectReason::BadVersion),
        (csrc, RejectReason::CsrcOverrun),
        (ext, RejectReason::ExtensionOverrun),
        (pad, RejectReason::BadPadding),
    ] {
        assert_eq!(
            rx.on_datagram(t0, sdp_addr(), Bytes::from(data)),
            RtpInput::Rejected(reason)
        );
    }
    let r = rx.stats().rejected;
    assert_eq!(
        (
            r.truncated,
            r.bad_version,
            r.csrc_overrun,
            r.extension_overrun,
            r.bad_padding
        ),
        (1, 1, 1, 1, 1)
    );
    // The call is unaffected: the next good packet is accepted.
    assert!(accepted(&rx.on_datagram(t0, sdp_addr(), good)));
}

#[test]
fn strict_accepts_only_the_sdp_address_and_port() {
    let t0 = Instant::now();
    let mut rx = receiver();
    // Another address, however often it sends, before and after the SDP
    // address spoke: never the call's media (issue 19's hijack).
    for i in 0..3u16 {
        assert_eq!(
            rx.on_datagram(
                t0 + ms(20 * u64::from(i)),
                other_addr(),
                pkt(PCMU, 100 + i, 0, 9)
            ),
            RtpInput::Rejected(RejectReason::WrongSource)
        );
    }
    assert_eq!(rx.latched_source(), None);
    let same_ip_other_port: SocketAddr = "192.0.2.1:5006".parse().unwrap();
    assert_eq!(
        rx.on_datagram(t0, same_ip_other_port, pkt(PCMU, 1, 0, 5)),
        RtpInput::Rejected(RejectReason::WrongSource)
    );
    assert!(accepted(&rx.on_datagram(
        t0 + ms(60),
        sdp_addr(),
        pkt(PCMU, 1, 0, 5)
    )));
    assert_eq!(rx.latched_source(), Some(sdp_addr()));
    // After a second of silence from the caller, a sender elsewhere still
    // does not take over.
    for i in 0..5u16 {
        let t = t0 + ms(1100 + 20 * u64::from(i));
        assert_eq!(
            rx.on_datagram(t, other_addr(), pkt(PCMU, 200 + i, 0, 9)),
            RtpInput::Rejected(RejectReason::WrongSource)
        );
    }
    assert!(accepted(&rx.on_datagram(
        t0 + ms(1300),
        sdp_addr(),
        pkt(PCMU, 2, 160, 5)
    )));
    assert_eq!(rx.latched_source(), Some(sdp_addr()));
    assert_eq!(rx.stats().rejected.wrong_source, 9);
    assert_eq!(rx.stats().latches, 1);
}

#[test]
fn behind_nat_latches_once_then_locks() {
    let t0 = Instant::now();
    let nat_ip = "198.51.100.7".parse().unwrap();
    let mut config = RtpReceiverConfig::new(PCMU, Some(EVENT));
    config.source = RtpSourcePolicy::Latch {
        window: Duration::from_secs(2),
        signalling_ip: Some(nat_ip),
    };
    let mut rx = RtpReceiver::new(config, sdp_addr()).unwrap();
    // An attacker elsewhere sprays first: not a candidate.
    let attacker: SocketAddr = "203.0.113.66:7000".parse().unwrap();
    for i in 0..4u16 {
        assert_eq!(
            rx.on_datagram(t0, attacker, pkt(PCMU, 50 + i, 0, 9)),
            RtpInput::Rejected(RejectReason::WrongSource)
        );
    }
    // A NATed phone: the SDP address never sends; its public address (the
    // signalling source's IP) latches on its 2nd packet.
    assert_eq!(
        rx.on_datagram(t0, other_addr(), pkt(PCMU, 1, 0, 5)),
        RtpInput::Rejected(RejectReason::WrongSource)
    );
    assert!(accepted(&rx.on_datagram(
        t0 + ms(20),
        other_addr(),
        pkt(PCMU, 2, 160, 5)
    )));
    assert_eq!(rx.latched_source(), Some(other_addr()));
    // Locked: after 5 s of silence neither a rebound port of the same NAT
    // nor the attacker takes over.
    let rebound: SocketAddr = "198.51.100.7:40000".parse().unwrap();
    for i in 0..4u16 {
        let t = t0 + ms(5000 + 20 * u64::from(i));
        assert_eq!(
            rx.on_datagram(t, rebound, pkt(PCMU, 3 + i, 320, 5)),
            RtpInput::Rejected(RejectReason::WrongSource)
        );
        assert_eq!(
            rx.on_datagram(t, attacker, pkt(PCMU, 60 + i, 0, 9)),
            RtpInput::Rejected(RejectReason::WrongSource)
        );
    }
    assert!(accepted(&rx.on_datagram(
        t0 + ms(5100),
        other_addr(),
        pkt(PCMU, 3, 320, 5)
    )));
    assert_eq!(rx.stats().latches, 1);
    assert_eq!(rx.stats().rejected.wrong_source, 13);
}

#[test]
fn interarrival_jitter_matches_rfc3550_a8_by_hand() {
    let t0 = Instant::now();
    let mut rx = receiver();
    // Sent every 20 ms (160 ticks); arrivals at 0, 20, 50, 60 ms =
    // 0, 160, 400, 480 ticks. Transit 0, 0, 80, 0 → D = 0, 80, 80.
    // J·16: 0 → 0 + 80 − 0 = 80 → 80 + 80 − ((80+8)>>4 = 5) = 155 → J = 9.
    for (i, at) in [0u64, 20, 50, 60].into_iter().enumerate() {
        rx.on_datagram(
            t0 + ms(at),
            sdp_addr(),
            pkt(PCMU, i as u16, 160 * i as u32, 5),
        );
        let want = [0, 0, 5, 9][i];
        assert_eq!(rx.stats().jitter, want, "after packet {i}");
    }
}

#[test]
fn loss_fraction_and_cumulative_loss_per_rfc3550_a3() {
    let t0 = Instant::now();
    let mut rx = receiver();
    for seq in (0u16..10).filter(|s| *s != 2 && *s != 5) {
        rx.on_datagram(t0, sdp_addr(), pkt(PCMU, seq, 160 * u32::from(seq), 5));
    }
    let b = rx.report_block().unwrap();
    // Expected 10, received 8: fraction (2 << 8) / 10 = 51.
    assert_eq!(
        (b.fraction_lost, b.cumulative_lost, b.extended_highest_seq),
        (51, 2, 9)
    );
    assert_eq!((rx.stats().expected, rx.stats().cumulative_lost), (10, 2));
    // Next interval: 10..=19 plus a duplicate of 15 → lost_interval −1 → 0.
    for seq in (10u16..20).chain([15]) {
        rx.on_datagram(t0, sdp_addr(), pkt(PCMU, seq, 160 * u32::from(seq), 5));
    }
    let b = rx.report_block().unwrap();
    assert_eq!((b.fraction_lost, b.cumulative_lost), (0, 1));
    assert_eq!(rx.stats().fraction_lost, 0);
}

#[test]
fn sequence_wrap_extends_the_highest_sequence_number() {
    let t0 = Instant::now();
    let mut rx = receiver();
    for seq in [65_534u16, 65_535, 1, 0, 2] {
        assert!(accepted(&rx.on_datagram(
            t0,
            sdp_addr(),
            pkt(PCMU, seq, 0, 5)
        )));
    }
    let s = rx.stats();
    assert_eq!(s.extended_highest_seq, (1 << 16) + 2);
    assert_eq!(
        (s.expected, s.packets_received, s.cumulative_lost),
        (5, 5, 0)
    );
}

#[test]
fn sequence_jump_needs_two_sequential_packets_and_counts_continue() {
    let t0 = Instant::now();
    let mut rx = receiver();
    for seq in [10u16, 11] {
        rx.on_datagram(t0, sdp_addr(), pkt(PCMU, seq, 0, 5));
    }
    assert_eq!(
        rx.on_datagram(t0, sdp_addr(), pkt(PCMU, 20_000, 0, 5)),
        RtpInput::Rejected(RejectReason::SequenceJump)
    );
    assert!(accepted(&rx.on_datagram(
        t0,
        sdp_addr(),
        pkt(PCMU, 20_001, 0, 5)
    )));
    assert!(accepted(&rx.on_datagram(
        t0,
        sdp_addr(),
        pkt(PCMU, 20_002, 0, 5)
    )));
    let s = rx.stats();
    assert_eq!(
        (s.packets_received, s.expected, s.cumulative_lost),
        (4, 4, 0)
    );
    assert_eq!(s.rejected.sequence_jump, 1);
}

#[test]
fn ssrc_change_starts_a_new_stream_and_stats_continue() {
    let t0 = Instant::now();
    let mut rx = receiver();
    for seq in [100u16, 101, 103] {
        rx.on_datagram(t0, sdp_addr(), pkt(PCMU, seq, 0, 1111));
    }
    assert_eq!(rx.stats().cumulative_lost, 1);
    for seq in [7u16, 8] {
        assert!(accepted(&rx.on_datagram(
            t0 + ms(60),
            sdp_addr(),
            pkt(PCMU, seq, 0, 2222)
        )));
    }
    // A straggler of the old SSRC right after the switch is stale...
    assert_eq!(
        rx.on_datagram(t0 + ms(80), sdp_addr(), pkt(PCMU, 102, 0, 1111)),
        RtpInput::Rejected(RejectReason::StaleSsrc)
    );
    let s = *rx.stats();
    assert_eq!((s.ssrc, s.ssrc_changes), (Some(2222), 1));
    assert_eq!(
        (s.packets_received, s.expected, s.cumulative_lost),
        (5, 6, 1)
    );
    assert_eq!(s.extended_highest_seq, 8);
    // ...but the old SSRC coming back later is a real switch.
    assert!(accepted(&rx.on_datagram(
        t0 + ms(1000),
        sdp_addr(),
        pkt(PCMU, 500, 0, 1111)
    )));
    assert_eq!(rx.stats().ssrc_changes, 2);
}

proptest! {
    #[test]
    fn random_bytes_never_panic_and_are_counted(
        datagrams in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..120), 1..40),
        versioned in any::<bool>(),
    ) {
        let t0 = Instant::now();
        let mut rx = receiver();
        let mut ok = 0u64;
        let n = datagrams.len() as u64;
        for (i, mut d) in datagrams.into_iter().enumerate() {
            if versioned && !d.is_empty() {
                // Version 2 with random P/X/CC, PT 0: reach the layout checks.
                d[0] = 0x80 | (d[0] & 0x3f);
                if d.len() > 1 {
                    d[1] &= 0x80;
                }
            }
            let input = rx.on_datagram(t0 + ms(i as u64), sdp_addr(), Bytes::from(d));
            if accepted(&input) {
                ok += 1;
            }
        }
        prop_assert_eq!(ok + rx.stats().rejected.total(), n);
    }

    #[test]
    fn random_rtcp_never_panics(
        body in proptest::collection::vec(any::<u8>(), 0..200),
        pt in 200u8..=204,
        count in 0u8..32,
        framed in any::<bool>(),
    ) {
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        let t0 = Instant::now();
        let mut s = RtcpScheduler::new(RtcpConfig::new("a@b"), 1, t0, &mut rng).unwrap();
        let data = if framed {
            let words = (body.len() / 4) as u16;
            let mut d = vec![0x80 | count, pt];
            d.extend_from_slice(&words.to_be_bytes());
            d.extend_from_slice(&body[..usize::from(words) * 4]);
            d
        } else {
            body
        };
        let _ = s.on_rtcp(t0, &data);
    }
}

#[test]
fn report_interval_is_randomised_between_half_and_one_and_a_half() {
    let mut rng = ChaCha8Rng::seed_from_u64(9);
    let t0 = Instant::now();
    let mut rx = receiver();
    let mut s = RtcpScheduler::new(RtcpConfig::new("me@host"), 1, t0, &mut rng).unwrap();
    let mut now = t0;
    let mut gaps = Vec::new();
    for _ in 0..500 {
        let next = s.poll_timeout();
        gaps.push(next - now);
        assert!(
            s.poll_transmit(
                next - ms(1),
                SystemTime::UNIX_EPOCH,
                None,
                &mut rx,
                &mut rng
            )
            .unwrap()
            .is_none()
        );
        assert!(
            s.poll_transmit(next, SystemTime::UNIX_EPOCH, None, &mut rx, &mut rng)
                .unwrap()
                .is_some()
        );
        now = next;
    }
    let (min, max) = (gaps.iter().min().unwrap(), gaps.iter().max().unwrap());
    assert!(
        *min >= Duration::from_millis(2500) && *min < Duration::from_millis(2600),
        "{min:?}"
    );
    assert!(
        *max < Duration::from_millis(7500) && *max > Duration::from_millis(7400),
        "{max:?}"
    );
    let mean = gaps.iter().sum::<Duration>() / gaps.len() as u32;
    assert!(
        mean > Duration::from_millis(4800) && mean < Duration::from_millis(5200),
        "{mean:?}"
    );
}

/// Two ends in virtual time: A sends media and an SR; B answers with an RR
/// carrying LSR/DLSR; A computes the RTT; B hangs up with BYE.
#[test]
fn sr_rr_exchange_gives_loss_jitter_and_rtt() {
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    let t0 = Instant::now();
    let wall0 = UNIX_EPOCH + Duration::from_secs(1_800_000_000);
    let (a_ssrc, b_ssrc) = (0xaaaa_0001, 0xbbbb_0002);
    let mut a_tx = RtpSender::new(a_ssrc, 1000, 50_000, PCMU);
    let mut a_rx = receiver();
    let mut a = RtcpScheduler::new(RtcpConfig::new("a@bridge"), a_ssrc, t0, &mut rng).unwrap();
    let mut b_rx = receiver();
    let mut b = RtcpScheduler::new(RtcpConfig::new("b@phone"), b_ssrc, t0, &mut rng).unwrap();

    // A sends 50 packets; B loses every 10th.
    for i in 0..50u32 {
        let data = a_tx.packet(&[0x7f; 160], i == 0, 160);
        if i % 10 != 9 {
            b_rx.on_datagram(t0 + ms(20 * u64::from(i)), sdp_addr(), data);
        }
    }
    // A's report at 1 s is an SR (media was sent) + SDES CNAME.
    let at = a.poll_timeout();
    let wall = wall0 + (at - t0);
    let sr_bytes = a
        .poll_transmit(at, wall, Some(&a_tx), &mut a_rx, &mut rng)
        .unwrap()
        .unwrap();
    let parsed = rtcp::packet::unmarshal(&mut sr_bytes.clone()).unwrap();
    assert_eq!(parsed.len(), 2);
    // A valid RFC 3550 §6.1 compound: SR first, SDES with CNAME.
    rtcp::compound_packet::CompoundPacket(parsed.clone())
        .validate()
        .unwrap();
    let sr = parsed[0]
        .as_any()
        .downcast_ref::<rtcp::sender_report::SenderReport>()
        .unwrap();
    assert_eq!(
        (sr.ssrc, sr.packet_count, sr.octet_count),
        (a_ssrc, 50, 8000)
    );
    assert_eq!(sr.ntp_time, ntp_timestamp(wall));
    assert_eq!(sr.rtp_time, 50_000 + 50 * 160);
    assert!(sr.reports.is_empty(), "A received nothing");
    let sdes = parsed[1]
        .as_any()
        .downcast_ref::<rtcp::source_description::SourceDescription>()
        .unwrap();
    assert_eq!(&sdes.chunks[0].items[0].text[..], b"a@bridge");

    // B receives it 15 ms later and reports 500 ms after that.
    b.on_rtcp(at + ms(15), &sr_bytes).unwrap();
    let b_at = b.poll_timeout().max(at + ms(515));
    let rr_bytes = b
        .poll_transmit(b_at, wall0, None, &mut b_rx, &mut rng)
        .unwrap()
        .unwrap();
    let parsed = rtcp::packet::unmarshal(&mut rr_bytes.clone()).unwrap();
    rtcp::compound_packet::CompoundPacket(parsed.clone())
        .validate()
        .unwrap();
    let rr = parsed[0]
        .as_any()
        .downcast_ref::<rtcp::receiver_report::ReceiverReport>()
        .unwrap();
    let block = &rr.reports[0];
    assert_eq!(block.ssrc, a_ssrc);
    assert_eq!(block.last_sender_report, (sr.ntp_time >> 16) as u32);
    let dlsr = (b_at - (at + ms(15))).as_nanos() * 65_536 / 1_000_000_000;
    assert_eq!(u128::from(block.delay), dlsr);
    // 49 expected (1000..=1048), 45 received → fraction (4 << 8) / 49 = 20.
    assert_eq!(
        (
            block.fraction_lost,
            block.total_lost,
            block.last_sequence_number
        ),
        (20, 4, 1048)
    );

    // A digests the RR: RTT = (arrival − SR send) − DLSR ≈ 15 ms + 15 ms.
    let arrive = b_at + ms(15);
    a.on_rtcp(arrive, &rr_bytes).unwrap();
    let remote = a.remote_stats();
    assert_eq!(
        (
            remote.fraction_lost,
            remote.cumulative_lost,
            remote.extended_highest_seq
        ),
        (20, 4, 1048)
    );
    assert_eq!(remote.ssrc, Some(b_ssrc));
    let rtt = remote.rtt.unwrap();
    assert!(rtt >= ms(29) && rtt <= ms(31), "{rtt:?}");

    // A sent nothing since: its next report is an RR.
    let next = a.poll_timeout();
    let rr2 = a
        .poll_transmit(next, wall0, Some(&a_tx), &mut a_rx, &mut rng)
        .unwrap()
        .unwrap();
    let parsed = rtcp::packet::unmarshal(&mut rr2.clone()).unwrap();
    assert!(
        parsed[0]
            .as_any()
            .downcast_ref::<rtcp::receiver_report::ReceiverReport>()
            .is_some()
    );

    // BYE.
    assert!(!a.remote_stats().bye);
    a.on_rtcp(arrive + ms(100), &b.bye().unwrap()).unwrap();
    assert!(a.remote_stats().bye);
    assert!(a.on_rtcp(arrive, b"\x80\xc8\x00\x40 short").is_err());
}
