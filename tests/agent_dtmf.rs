#![allow(clippy::unwrap_used, clippy::expect_used)]
//! DTMF out (issue 13 item 3): an agent's `{"event":"dtmf","digits":…}` reaches the
//! caller's side as RFC 4733 events with the right event codes, one timestamp per key,
//! the marker on each key's first packet and three end packets (E bit) with the key's
//! full duration — when the far end offered telephone-event; as in-band DTMF tones of the
//! right frequency pairs when it did not. SIPp does the signalling; the call's media
//! goes to this test's own UDP socket, which records every RTP packet the bridge sends.
//! The agent is the scripted one of tests/common/test_agent.rs.

mod common;

use common::test_agent::{Behaviour, TestAgent};
use common::{Daemon, ProfileSpec};
use sipbridge::media::g711::mu_to_linear;
use std::net::UdpSocket;
use std::time::{Duration, Instant};

const KEYS: &str = r#"{"event":"dtmf","digits":"19#*"}"#;

/// The daemon with the `demo` tenant on a native agent at `port`, without the
/// disclosure prompt (the keys go out at once).
fn daemon(port: u16) -> Daemon {
    let pipeline =
        format!(r#"pipeline = {{ kind = "agent", url = "ws://127.0.0.1:{port}/agent" }}"#);
    let profile: String = ProfileSpec::default()
        .render()
        .replace(r#"pipeline = { kind = "echo" }"#, &pipeline)
        .lines()
        .filter(|l| !l.starts_with("prompt = "))
        .collect::<Vec<_>>()
        .join("\n");
    Daemon::spawn(&profile)
}

/// Every RTP packet the bridge sent to the test's socket during a 3 s call.
fn call(daemon: &Daemon, scenario: &str) -> Vec<Vec<u8>> {
    let media = UdpSocket::bind("127.0.0.1:0").unwrap();
    media
        .set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let carrier = common::sipp_caller(daemon, scenario, &media, 3000);
    let mut packets = Vec::new();
    let mut buf = [0u8; 2048];
    let deadline = Instant::now() + Duration::from_secs(15);
    while Instant::now() < deadline && !carrier.is_finished() {
        if let Ok((n, _)) = media.recv_from(&mut buf) {
            packets.push(buf[..n].to_vec());
        }
    }
    carrier.join().unwrap().assert_success();
    packets
}

#[test]
fn agent_keys_reach_the_far_end_as_rfc4733_events() {
    let agent = TestAgent::spawn(vec![Behaviour::SayAfterStart(KEYS)]);
    let daemon = daemon(agent.port());
    let packets = call(&daemon, "media_on_test_socket_te.xml");
    agent.finish();
    let events: Vec<&Vec<u8>> = packets.iter().filter(|p| p[1] & 0x7f == 101).collect();
    // Group by timestamp (one per key), in order.
    let mut keys: Vec<(u32, Vec<&Vec<u8>>)> = Vec::new();
    for p in &events {
        let ts = u32::from_be_bytes([p[4], p[5], p[6], p[7]]);
        match keys.last_mut() {
            Some((t, group)) if *t == ts => group.push(p),
            _ => keys.push((ts, vec![p])),
        }
    }
    let codes: Vec<u8> = keys.iter().map(|(_, g)| g[0][12]).collect();
    assert_eq!(codes, vec![1, 9, 11, 10], "event codes in order: {keys:?}");
    for (ts, group) in &keys {
        assert!(group.iter().all(|p| p.len() == 16), "4-byte event payloads");
        assert!(
            group.iter().all(|p| p[12] == group[0][12]),
            "one key per timestamp {ts}"
        );
        assert_eq!(group[0][1] & 0x80, 0x80, "marker on the key's first packet");
        assert!(
            group[1..].iter().all(|p| p[1] & 0x80 == 0),
            "marker only once"
        );
        let ends: Vec<&&Vec<u8>> = group.iter().filter(|p| p[13] & 0x80 != 0).collect();
        assert_eq!(ends.len(), 3, "three end packets for the key at {ts}");
        for e in ends {
            assert_eq!(u16::from_be_bytes([e[14], e[15]]), 800, "100 ms at 8 kHz");
        }
        assert!(
            group.iter().take_while(|p| p[13] & 0x80 == 0).count() >= 1,
            "updates before the end"
        );
    }
    // The audio's RTP clock runs on through the keys: same SSRC, sequence unbroken.
    let ssrc = &packets[0][8..12];
    assert!(packets.iter().all(|p| &p[8..12] == ssrc));
    let seqs: Vec<u16> = packets
        .iter()
        .map(|p| u16::from_be_bytes([p[2], p[3]]))
        .collect();
    assert!(
        seqs.windows(2).all(|w| w[1] == w[0].wrapping_add(1)),
        "no gap in sequence"
    );
    assert!(
        daemon.logs().iter().all(|l| !l.contains("19#*")),
        "the keys (maybe a PIN) are in no log line"
    );
}

/// Power of `freq` in a frame (Goertzel), relative to the frame's energy.
fn share(pcm: &[f64], freq: f64) -> f64 {
    let w = 2.0 * std::f64::consts::PI * freq / 8000.0;
    let (mut re, mut im, mut energy) = (0.0, 0.0, 0.0);
    for (n, v) in pcm.iter().enumerate() {
        re += v * (w * n as f64).cos();
        im -= v * (w * n as f64).sin();
        energy += v * v;
    }
    if energy < 1.0 {
        return 0.0;
    }
    2.0 * (re * re + im * im) / (pcm.len() as f64 * energy)
}

#[test]
fn without_telephone_event_the_keys_are_in_band_tones() {
    let agent = TestAgent::spawn(vec![Behaviour::SayAfterStart(KEYS)]);
    let daemon = daemon(agent.port());
    let packets = call(&daemon, "media_on_test_socket.xml");
    agent.finish();
    assert!(packets.iter().all(|p| p[1] & 0x7f == 0), "only PCMU");
    let pairs = [
        (697.0, 1209.0),
        (852.0, 1477.0),
        (941.0, 1477.0),
        (941.0, 1209.0),
    ];
    // Which key each tonal frame carries (both of its frequencies hold most of the power).
    let mut heard: Vec<usize> = Vec::new();
    for p in &packets {
        let pcm: Vec<f64> = p[12..]
            .iter()
            .map(|&c| f64::from(mu_to_linear(c)))
            .collect();
        if let Some(k) = pairs
            .iter()
            .position(|&(lo, hi)| share(&pcm, lo) + share(&pcm, hi) > 0.8)
            && heard.last() != Some(&k)
        {
            heard.push(k);
        }
    }
    assert_eq!(heard, vec![0, 1, 2, 3], "keys 1 9 # * in order");
    let tonal = packets
        .iter()
        .filter(|p| {
            let pcm: Vec<f64> = p[12..]
                .iter()
                .map(|&c| f64::from(mu_to_linear(c)))
                .collect();
            pairs
                .iter()
                .any(|&(lo, hi)| share(&pcm, lo) + share(&pcm, hi) > 0.8)
        })
        .count();
    assert_eq!(tonal, 20, "100 ms (5 frames) per key");
}
