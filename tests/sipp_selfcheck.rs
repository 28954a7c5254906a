//! Self-check of the SIPp harness (tests/common) and of the carrier scenarios in
//! tests/sipp/, without the bridge: each scenario runs as the carrier against SIPp playing
//! a scripted bridge (SIPp's embedded `uas`, or a mock in tests/sipp/mock/), and a few runs
//! are built to fail so the harness is shown to report failures, not only successes.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::net::SocketAddr;
use std::path::PathBuf;

use common::{
    SippResult, SippServer, Transport, listener_bound, profile_toml_for, rtp_range_for, sipp,
    sipp_scenario, stat_counter,
};

fn mock(name: &str) -> PathBuf {
    common::repo_path("tests/sipp/mock").join(name)
}

/// Runs carrier scenario `uac` against a SIPp server started with `server_args`.
fn pair(server_args: &[&str], uac: &str, uac_args: &[&str]) -> (SippResult, SippResult) {
    let server = SippServer::spawn(server_args);
    let carrier = sipp(&sipp_scenario(uac), server.addr(), uac_args);
    let server = server.finish();
    (carrier, server)
}

fn pair_with_mock(mock_name: &str, uac: &str, uac_args: &[&str]) -> (SippResult, SippResult) {
    let path = mock(mock_name);
    let path = path.to_str().unwrap();
    pair(&["-sf", path], uac, uac_args)
}

#[test]
fn basic_call_udp_against_sipp_uas() {
    let (carrier, server) = pair(&["-sn", "uas"], "basic_call.xml", &[]);
    carrier.assert_success();
    server.assert_success();
    // The harness saw the real exchange, in order.
    let sent_invite = carrier
        .messages
        .find("INVITE sip:service@127.0.0.1:")
        .unwrap();
    let got_ok = carrier.messages.find("SIP/2.0 200 OK").unwrap();
    let sent_bye = carrier.messages.find("BYE sip:").unwrap();
    assert!(
        sent_invite < got_ok && got_ok < sent_bye,
        "{}",
        carrier.messages
    );
}

#[test]
fn basic_call_tcp_against_sipp_uas() {
    let (carrier, _server) = pair(&["-sn", "uas", "-t", "t1"], "basic_call.xml", &["-t", "t1"]);
    // SIPp's embedded uas lingers 4 s after the BYE and counts the carrier's closed
    // connection as a failure, so only the carrier's side is asserted here.
    carrier.assert_success();
    assert!(
        carrier.messages.contains("Via: SIP/2.0/TCP 127.0.0.1:"),
        "{}",
        carrier.messages
    );
}

#[test]
fn cancel_before_answer() {
    let (carrier, server) = pair_with_mock("cancel_uas.xml", "cancel.xml", &[]);
    carrier.assert_success();
    server.assert_success();
}

#[test]
fn bridge_initiated_bye() {
    let (carrier, server) = pair_with_mock("bridge_bye_uas.xml", "bridge_bye.xml", &[]);
    carrier.assert_success();
    server.assert_success();
}

#[test]
fn options_accepts_allow_with_invite() {
    let (carrier, server) = pair_with_mock("options_uas.xml", "options.xml", &[]);
    carrier.assert_success();
    server.assert_success();
}

#[test]
fn options_fails_when_allow_lacks_invite() {
    let (carrier, _server) = pair_with_mock("options_no_invite_uas.xml", "options.xml", &[]);
    assert_eq!(carrier.exit_code, Some(1), "{}", carrier.report());
    assert_eq!(carrier.failed_calls, Some(1), "{}", carrier.report());
    assert!(
        carrier.errors.contains("Failed regexp match"),
        "{}",
        carrier.report()
    );
}

#[test]
fn unknown_method_gets_501() {
    let (carrier, server) = pair_with_mock("unknown_method_uas.xml", "unknown_method.xml", &[]);
    carrier.assert_success();
    server.assert_success();
}

#[test]
fn no_route_404_is_acked() {
    let (carrier, server) = pair_with_mock(
        "reject_404_uas.xml",
        "no_route.xml",
        &["-s", "+19995550000"],
    );
    carrier.assert_success();
    server.assert_success();
    assert!(
        carrier.messages.contains("INVITE sip:+19995550000@"),
        "{}",
        carrier.messages
    );
}

#[test]
fn busy_accepts_486_and_503() {
    for mock_name in ["reject_486_uas.xml", "reject_503_uas.xml"] {
        let (carrier, server) = pair_with_mock(mock_name, "busy.xml", &[]);
        carrier.assert_success();
        server.assert_success();
    }
}

#[test]
fn busy_fails_on_other_rejection() {
    let (carrier, _server) = pair_with_mock("reject_404_uas.xml", "busy.xml", &["-timeout", "5s"]);
    assert!(!carrier.succeeded(), "{}", carrier.report());
    assert_ne!(carrier.exit_code, Some(0));
}

#[test]
fn digest_challenge_then_success() {
    let (carrier, server) = pair_with_mock(
        "digest_uas.xml",
        "digest.xml",
        &["-au", "trunkuser", "-ap", "s3cret"],
    );
    carrier.assert_success();
    server.assert_success();
    assert!(
        carrier
            .messages
            .contains("Authorization: Digest username=\"trunkuser\"")
    );
}

#[test]
fn digest_with_wrong_password_fails() {
    let (carrier, _server) = pair_with_mock(
        "digest_uas.xml",
        "digest.xml",
        &["-au", "trunkuser", "-ap", "wrong"],
    );
    assert_eq!(carrier.failed_calls, Some(1), "{}", carrier.report());
    assert!(
        carrier.errors.contains("403 Forbidden"),
        "{}",
        carrier.report()
    );
}

#[test]
fn hold_and_unhold() {
    let (carrier, server) = pair_with_mock("hold_uas.xml", "hold.xml", &[]);
    carrier.assert_success();
    server.assert_success();
    // Both re-INVITEs went out and the hold was answered recvonly.
    assert!(
        carrier.messages.contains("CSeq: 3 INVITE"),
        "{}",
        carrier.messages
    );
    assert!(
        carrier.messages.contains("a=recvonly"),
        "{}",
        carrier.messages
    );
}

#[test]
fn unanswered_call_fails_within_its_timeout() {
    // Nothing listens on this port: SIPp retransmits, then gives up at -timeout.
    let dead: SocketAddr = ([127, 0, 0, 1], common::free_port()).into();
    let started = std::time::Instant::now();
    let carrier = sipp(&sipp_scenario("basic_call.xml"), dead, &["-timeout", "3s"]);
    assert!(!carrier.succeeded(), "{}", carrier.report());
    assert_ne!(carrier.exit_code, Some(0));
    assert!(started.elapsed() < std::time::Duration::from_secs(15));
}

#[test]
fn listener_log_lines_are_recognised() {
    let nested = r#"{"timestamp":"2026-11-22T15:00:00Z","level":"INFO","fields":{"message":"sip listener bound","transport":"udp","local":"127.0.0.1:40123"},"target":"sipbridge::daemon"}"#;
    let flat = r#"{"level":"INFO","message":"sip listener bound","transport":"tcp","local":"127.0.0.1:40124"}"#;
    let other = r#"{"fields":{"message":"call started","transport":"udp","local":"127.0.0.1:1"}}"#;
    assert_eq!(
        listener_bound(nested),
        Some((Transport::Udp, "127.0.0.1:40123".parse().unwrap()))
    );
    assert_eq!(
        listener_bound(flat),
        Some((Transport::Tcp, "127.0.0.1:40124".parse().unwrap()))
    );
    assert_eq!(listener_bound(other), None);
    assert_eq!(
        listener_bound("sip listener bound udp 127.0.0.1:5060"),
        None
    );
}

#[test]
fn profile_template_parses_and_separates_rtp_ranges() {
    let text = profile_toml_for(
        "some_test",
        "\n[[route]]\nnumber = \"+1555\"\ntenant = \"demo\"\n",
    );
    let value: toml::Table = toml::from_str(&text).unwrap();
    let (start, end) = rtp_range_for("some_test");
    assert_eq!(start % 2, 0);
    assert_eq!(end - start + 1, 100);
    assert!((10_000..30_000).contains(&start));
    let ports = &value["profile"]["rtp_ports"];
    assert_eq!(ports["start"].as_integer(), Some(i64::from(start)));
    assert_eq!(ports["end"].as_integer(), Some(i64::from(end)));
    assert_eq!(value["route"].as_array().unwrap().len(), 2);
    let prompt = value["tenant"][0]["prompt"].as_str().unwrap();
    assert!(std::path::Path::new(prompt).is_file(), "{prompt}");
    // Same name, same range; another name, another range.
    assert_eq!(rtp_range_for("some_test"), (start, end));
    assert_ne!(rtp_range_for("other_test"), (start, end));
}

#[test]
fn stat_counter_reads_last_row() {
    let csv = "A;FailedCall(C);SuccessfulCall(C);\n1;0;0;\n2;3;4;\n";
    assert_eq!(stat_counter(csv, "FailedCall(C)"), Some(3));
    assert_eq!(stat_counter(csv, "SuccessfulCall(C)"), Some(4));
    assert_eq!(stat_counter(csv, "Missing"), None);
    assert_eq!(stat_counter("A;B\n", "A"), None);
}

#[test]
fn call_with_audio_plays_caller1_as_paced_pcmu() {
    use std::time::{Duration, Instant};

    let sink = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    sink.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let rtp_port = sink.local_addr().unwrap().port().to_string();
    let receiver = std::thread::spawn(move || {
        let mut packets = Vec::new();
        let mut buf = [0u8; 2048];
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            match sink.recv(&mut buf) {
                Ok(n) => packets.push((Instant::now(), buf[..n].to_vec())),
                Err(_) if !packets.is_empty() => break, // 200 ms of silence: done
                Err(_) => {}
            }
        }
        packets
    });
    let mock_path = mock("media_uas.xml");
    let server = SippServer::spawn(&[
        "-sf",
        mock_path.to_str().unwrap(),
        "-set",
        "rtp_port",
        &rtp_port,
    ]);
    let carrier = sipp(&sipp_scenario("call_with_audio.xml"), server.addr(), &[]);
    let server = server.finish();
    carrier.assert_success();
    server.assert_success();

    let packets = receiver.join().unwrap();
    let expected = std::fs::read(common::repo_path("fixtures/audio/caller1.ulaw")).unwrap();
    assert_eq!(packets.len(), expected.len().div_ceil(160));
    let mut payload = Vec::new();
    for (i, (_, p)) in packets.iter().enumerate() {
        assert_eq!(p.len(), 12 + 160);
        assert_eq!(p[0], 0x80, "RTP v2");
        assert_eq!(p[1] & 0x7f, 0, "PT 0 (PCMU)");
        let seq = u16::from_be_bytes([p[2], p[3]]);
        let ts = u32::from_be_bytes([p[4], p[5], p[6], p[7]]);
        assert_eq!(seq, 1000 + u16::try_from(i).unwrap());
        assert_eq!(ts, 160 * u32::try_from(i).unwrap());
        payload.extend_from_slice(&p[12..]);
    }
    assert_eq!(&payload[..expected.len()], &expected[..]);
    assert!(payload[expected.len()..].iter().all(|b| *b == 0xff));
    // Paced in real time (20 ms apart), not sent in one burst.
    let spread = packets.last().unwrap().0 - packets[0].0;
    assert!(spread >= Duration::from_millis(2500), "{spread:?}");
}
