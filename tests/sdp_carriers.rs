#![allow(clippy::unwrap_used, clippy::expect_used)]
//! SDP offers as real carriers and PBXs send them, answered by `SdpSession`;
//! every answer must re-parse with ezk-sdp-types.

use std::net::{IpAddr, Ipv4Addr};

use bytes::Bytes;
use bytesstr::BytesStr;
use ezk_sdp_types::SessionDescription;
use sipbridge::sip::sdp::{Codec, Direction, LocalMedia, Negotiated, SdpError, SdpSession};

fn local() -> LocalMedia {
    LocalMedia::new(IpAddr::V4(Ipv4Addr::new(203, 0, 113, 5)), 40000)
}

fn sdp(lines: &[&str]) -> Vec<u8> {
    let mut s = lines.join("\r\n");
    s.push_str("\r\n");
    s.into_bytes()
}

/// Answers `offer`, checks ezk re-parses the answer, returns both.
fn answer(offer: &[u8], local: &LocalMedia) -> (Negotiated, String) {
    let (n, body) = SdpSession::new(1001, "sipbridge")
        .answer(offer, local)
        .unwrap();
    let text = String::from_utf8(body.to_vec()).unwrap();
    reparse(&body);
    (n, text)
}

fn reparse(body: &Bytes) -> SessionDescription {
    SessionDescription::parse(&BytesStr::from_utf8_bytes(body.clone()).unwrap()).unwrap()
}

#[test]
fn telnyx_style_offer_with_hd_codecs_first() {
    let offer = sdp(&[
        "v=0",
        "o=- 3872459017 3872459017 IN IP4 192.76.120.10",
        "s=Telnyx",
        "c=IN IP4 192.76.120.10",
        "t=0 0",
        "m=audio 17382 RTP/AVP 9 18 96 0 8 101",
        "a=rtpmap:9 G722/8000",
        "a=rtpmap:18 G729/8000",
        "a=fmtp:18 annexb=no",
        "a=rtpmap:96 opus/48000/2",
        "a=fmtp:96 useinbandfec=1",
        "a=rtpmap:0 PCMU/8000",
        "a=rtpmap:8 PCMA/8000",
        "a=rtpmap:101 telephone-event/8000",
        "a=fmtp:101 0-16",
        "a=ptime:20",
        "a=sendrecv",
    ]);
    let (n, text) = answer(&offer, &local());
    assert_eq!(n.codec, Codec::Pcmu);
    assert_eq!(n.payload_type, 0);
    assert_eq!(n.telephone_event_pt, Some(101));
    assert_eq!(n.remote_rtp, Some("192.76.120.10:17382".parse().unwrap()));
    assert_eq!(
        text,
        "v=0\r\no=sipbridge 1001 1 IN IP4 203.0.113.5\r\ns=-\r\nc=IN IP4 203.0.113.5\r\nt=0 0\r\n\
         m=audio 40000 RTP/AVP 0 101\r\na=rtpmap:0 PCMU/8000\r\n\
         a=rtpmap:101 telephone-event/8000\r\na=fmtp:101 0-16\r\na=ptime:20\r\na=sendrecv\r\n"
    );
}

#[test]
fn pbx_with_only_pcma_and_its_own_dtmf_pt() {
    // Asterisk-style: PCMA only, telephone-event on 96, media-level c=.
    let offer = sdp(&[
        "v=0",
        "o=- 1700000000 1700000001 IN IP4 10.0.0.20",
        "s=Asterisk",
        "t=0 0",
        "m=audio 12000 RTP/AVP 8 96",
        "c=IN IP4 10.0.0.20",
        "a=rtpmap:8 PCMA/8000",
        "a=rtpmap:96 telephone-event/8000",
        "a=fmtp:96 0-16",
        "a=ptime:20",
        "a=maxptime:140",
        "a=sendrecv",
    ]);
    let (n, text) = answer(&offer, &local());
    assert_eq!((n.codec, n.payload_type), (Codec::Pcma, 8));
    assert_eq!(n.telephone_event_pt, Some(96));
    assert_eq!(n.remote_rtp, Some("10.0.0.20:12000".parse().unwrap()));
    assert!(text.contains(
        "m=audio 40000 RTP/AVP 8 96\r\na=rtpmap:8 PCMA/8000\r\na=rtpmap:96 telephone-event/8000\r\na=fmtp:96 0-16\r\n"
    ));
}

#[test]
fn no_dtmf_offered_means_none_answered() {
    let offer = sdp(&[
        "v=0",
        "o=- 1 1 IN IP4 10.0.0.20",
        "s=-",
        "c=IN IP4 10.0.0.20",
        "t=0 0",
        "m=audio 12000 RTP/AVP 0",
    ]);
    let (n, text) = answer(&offer, &local());
    assert_eq!(n.telephone_event_pt, None);
    assert!(text.contains("m=audio 40000 RTP/AVP 0\r\na=rtpmap:0 PCMU/8000\r\na=ptime:20\r\n"));
    assert!(!text.contains("telephone-event"));
}

/// The SDP body of RFC 5118 §4.6 (IPv6 in SDP).
fn rfc5118_body() -> String {
    let msg = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/data/rfc5118/ipv6-in-sdp.dat"
    ))
    .unwrap();
    let (_, body) = msg
        .split_once("\n\n")
        .or_else(|| msg.split_once("\r\n\r\n"))
        .unwrap();
    body.to_owned()
}

#[test]
fn rfc5118_ipv6_offer_of_g726_only_is_488() {
    let err = SdpSession::new(1, "b")
        .answer(rfc5118_body().as_bytes(), &local())
        .unwrap_err();
    assert_eq!(err, SdpError::NoCommonCodec);
    assert_eq!(err.status(), 488);
}

#[test]
fn rfc5118_ipv6_offer_with_pcmu_added() {
    let body = rfc5118_body().replace("m=audio 6000 RTP/AVP 2", "m=audio 6000 RTP/AVP 2 0");
    let (n, text) = answer(body.as_bytes(), &local());
    assert_eq!(n.codec, Codec::Pcmu);
    assert_eq!(n.remote_rtp, Some("[2001:db8::20]:6000".parse().unwrap()));
    assert_eq!(n.telephone_event_pt, None);
    // Audio accepted, the video stream answered with port 0 in its place.
    assert!(text.ends_with(
        "m=audio 40000 RTP/AVP 0\r\na=rtpmap:0 PCMU/8000\r\na=ptime:20\r\na=sendrecv\r\nm=video 0 RTP/AVP 107\r\n"
    ));
}

/// The `sdp` fuzz target's find: a second `m=` line whose tokens ezk tolerates but
/// which has no readable proto or format was echoed as `m=audio 0 /0`, an answer no
/// parser reads. Now the rejected line is a readable placeholder.
#[test]
fn a_garbage_m_line_is_rejected_with_a_readable_placeholder() {
    let offer = sdp(&[
        "v=0",
        "o=- 1 2 IN IP4 10.0.0.20",
        "s=-",
        "c=IN IP4 10.0.0.20",
        "t=0 0",
        "m=audio 12000 RTP/AVP 0",
        "m=audio 5-\u{0}\u{0}_SHA1 /0",
    ]);
    let (_, body) = SdpSession::new(1, "b").answer(&offer, &local()).unwrap();
    let text = std::str::from_utf8(&body).unwrap();
    assert!(!text.contains(" /0"), "{text}");
    assert_eq!(reparse(&body).media_descriptions.len(), 2, "{text}");
}

#[test]
fn t38_image_stream_is_rejected_with_its_own_type() {
    let offer = sdp(&[
        "v=0",
        "o=- 1 2 IN IP4 10.0.0.20",
        "s=-",
        "c=IN IP4 10.0.0.20",
        "t=0 0",
        "m=audio 12000 RTP/AVP 0",
        "m=image 12002 udptl t38",
        "a=T38FaxVersion:0",
    ]);
    let (_, body) = SdpSession::new(1, "b").answer(&offer, &local()).unwrap();
    let text = std::str::from_utf8(&body).unwrap();
    assert!(text.ends_with("a=sendrecv\r\nm=image 0 udptl t38\r\n"));
    // ezk has no `image` media type; everything else must still re-parse.
    let renamed = text.replace("m=image", "m=application");
    let sd = reparse(&Bytes::from(renamed));
    assert_eq!(sd.media_descriptions.len(), 2);
    assert_eq!(sd.media_descriptions[1].media.port, 0);
}

#[test]
fn dynamic_payload_type_for_pcmu() {
    let offer = sdp(&[
        "v=0",
        "o=- 1 1 IN IP4 10.0.0.20",
        "s=-",
        "c=IN IP4 10.0.0.20",
        "t=0 0",
        "m=audio 12000 RTP/AVP 97 101",
        "a=rtpmap:97 pcmu/8000/1",
        "a=rtpmap:101 telephone-event/8000",
    ]);
    let (n, text) = answer(&offer, &local());
    assert_eq!((n.codec, n.payload_type), (Codec::Pcmu, 97));
    assert!(text.contains("m=audio 40000 RTP/AVP 97 101\r\na=rtpmap:97 PCMU/8000\r\n"));
}

#[test]
fn hold_unhold_sequence_over_one_session() {
    let base = [
        "v=0",
        "o=root 5 5 IN IP4 168.86.128.10",
        "s=-",
        "c=IN IP4 168.86.128.10",
        "t=0 0",
        "m=audio 14520 RTP/AVP 0 8 101",
        "a=rtpmap:101 telephone-event/8000",
        "a=fmtp:101 0-16",
        "a=sendrecv",
    ];
    let mut s = SdpSession::new(7, "sipbridge");
    let (n1, b1) = s.answer(&sdp(&base), &local()).unwrap();
    assert_eq!(n1.local_direction, Direction::SendRecv);

    let mut hold = base;
    hold[8] = "a=sendonly";
    let (n2, b2) = s.answer(&sdp(&hold), &local()).unwrap();
    assert_eq!(n2.local_direction, Direction::RecvOnly);
    let sd2 = reparse(&b2);
    assert_eq!(sd2.origin.session_version, "2");
    assert_eq!(
        sd2.media_descriptions[0].direction,
        ezk_sdp_types::Direction::RecvOnly
    );

    let mut inactive = base;
    inactive[8] = "a=inactive";
    let (n3, b3) = s.answer(&sdp(&inactive), &local()).unwrap();
    assert_eq!(n3.local_direction, Direction::Inactive);
    assert_eq!(reparse(&b3).origin.session_version, "3");

    // A session refresh with the same inactive offer: unchanged body and version.
    let (_, b3again) = s.answer(&sdp(&inactive), &local()).unwrap();
    assert_eq!(b3, b3again);

    let (n4, b4) = s.answer(&sdp(&base), &local()).unwrap();
    assert_eq!(n4, n1);
    assert_eq!(reparse(&b4).origin.session_version, "4");
    assert_ne!(b1, b4);
}

#[test]
fn our_offer_reparses_with_ezk() {
    let mut s = SdpSession::new(u64::MAX, "sipbridge");
    let offer = s.offer(&local(), Direction::SendRecv);
    let sd = reparse(&offer);
    assert_eq!(sd.origin.session_id, "18446744073709551615");
    let md = &sd.media_descriptions[0];
    assert_eq!(md.media.fmts, [0, 8, 101]);
    assert_eq!(md.media.port, 40000);
    assert_eq!(md.rtpmap.len(), 3);
    assert_eq!(md.fmtp[0].params, "0-16");
}

mod props {
    use super::*;
    use proptest::prelude::*;

    fn sdp_line() -> impl Strategy<Value = String> {
        prop_oneof![
            Just("v=0".to_owned()),
            Just("o=- 1 1 IN IP4 192.0.2.1".to_owned()),
            Just("s=-".to_owned()),
            Just("t=0 0".to_owned()),
            Just("c=IN IP4 0.0.0.0".to_owned()),
            Just("c=IN IP6 2001:db8::1".to_owned()),
            Just("c=IN IP4 192.0.2.9".to_owned()),
            (
                prop_oneof![Just("audio"), Just("video"), Just("image")],
                any::<u16>(),
                proptest::collection::vec(
                    prop_oneof![Just(0u8), Just(8), Just(101), any::<u8>()],
                    0..6
                )
            )
                .prop_map(|(t, p, f)| {
                    let fmts: Vec<String> = f.iter().map(u8::to_string).collect();
                    format!("m={t} {p} RTP/AVP {}", fmts.join(" "))
                }),
            (
                any::<u8>(),
                prop_oneof![
                    Just("PCMU"),
                    Just("PCMA"),
                    Just("telephone-event"),
                    Just("G729")
                ],
                prop_oneof![Just(8000u32), Just(16000)]
            )
                .prop_map(|(pt, e, r)| format!("a=rtpmap:{pt} {e}/{r}")),
            prop_oneof![
                Just("a=sendonly"),
                Just("a=recvonly"),
                Just("a=inactive"),
                Just("a=sendrecv")
            ]
            .prop_map(str::to_owned),
            "a=ptime:[0-9]{1,4}",
            "[a-z]=[ -~]{0,30}",
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(1024))]

        #[test]
        fn arbitrary_bytes_never_panic(body in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = SdpSession::new(1, "b").answer(&body, &local());
            let mut s = SdpSession::new(1, "b");
            s.offer(&local(), Direction::SendRecv);
            let _ = s.accept_answer(&body, &local());
            // The same with SRTP possible (a=crypto parsed and keys decoded).
            let srtp = LocalMedia {
                encryption: sipbridge::sip::sdp::Encryption::Optional,
                secure_signalling: true,
                srtp_key: Some(sipbridge::sip::sdp::KeyMaterial::new(vec![7; 46])),
                ..local()
            };
            let _ = SdpSession::new(1, "b").answer(&body, &srtp);
        }

        #[test]
        fn line_soup_answers_reparse(lines in proptest::collection::vec(sdp_line(), 0..14)) {
            // A valid session header half of the time, so answers happen.
            let body = if lines.len() % 2 == 0 {
                format!("v=0\r\no=- 1 1 IN IP4 192.0.2.1\r\ns=-\r\nt=0 0\r\n{}", lines.join("\r\n"))
            } else {
                lines.join("\r\n")
            };
            match SdpSession::new(1, "b").answer(body.as_bytes(), &local()) {
                Ok((n, answer)) => {
                    let text = std::str::from_utf8(&answer).unwrap().replace("m=image", "m=application");
                    let sd = reparse(&Bytes::from(text));
                    prop_assert_eq!(sd.media_descriptions.len(), lines.iter().filter(|l| l.starts_with("m=")).count());
                    prop_assert!(matches!(n.codec, Codec::Pcmu | Codec::Pcma));
                }
                Err(e) => prop_assert!(matches!(e.status(), 400 | 488)),
            }
        }
    }
}
