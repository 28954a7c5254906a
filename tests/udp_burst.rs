#![allow(clippy::unwrap_used, clippy::expect_used)]
//! SIP UDP receive buffers sized for bursts (issue 18: "a burst of 300 BYEs at once from
//! one caller today loses ~40 % of them to the kernel until the caller retransmits").
//!
//! The daemon asks for `udp_receive_buffer_bytes` (4 MiB) of SO_RCVBUF on its SIP socket
//! and reports what the kernel granted; 300 requests sent back to back from the trunk's
//! address, with no retransmission, are all answered.

mod common;

use std::net::UdpSocket;
use std::time::{Duration, Instant};

use common::{Daemon, ProfileSpec};

/// `net.core.rmem_max`: what an unprivileged SO_RCVBUF may reach (Linux doubles it).
fn rmem_max() -> usize {
    std::fs::read_to_string("/proc/sys/net/core/rmem_max")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(212_992)
}

#[test]
fn a_burst_of_300_requests_is_answered_whole_and_the_buffer_is_what_was_asked() {
    let daemon = Daemon::spawn(&ProfileSpec::default().render());
    let target = daemon.udp_addr();

    // What the kernel granted, as the daemon logged it.
    let line = daemon
        .wait_for_log(Duration::from_secs(5), |l| l.contains("udp receive buffer"))
        .expect("the daemon logs its UDP receive buffer");
    let v: serde_json::Value = serde_json::from_str(&line).unwrap();
    let fields = v.get("fields").unwrap_or(&v);
    let got = fields["got"].as_u64().unwrap() as usize;
    let expected = (4 * 1024 * 1024usize).min(2 * rmem_max());
    eprintln!("SO_RCVBUF granted: {got} bytes (rmem_max {})", rmem_max());
    assert!(got >= expected, "SO_RCVBUF {got} < {expected}");

    // 300 OPTIONS at once (BYEs for unknown dialogs would do the same: one answer each).
    let s = UdpSocket::bind("127.0.0.1:0").unwrap();
    let from = s.local_addr().unwrap();
    for n in 0..300 {
        let msg = format!(
            "OPTIONS sip:{target} SIP/2.0\r\n\
             Via: SIP/2.0/UDP {from};branch=z9hG4bKburst{n};rport\r\n\
             From: <sip:carrier@{from}>;tag=b{n}\r\n\
             To: <sip:{target}>\r\n\
             Call-ID: burst-{n}@127.0.0.1\r\n\
             CSeq: 1 OPTIONS\r\n\
             Max-Forwards: 70\r\n\
             User-Agent: carrier-sbc/1.0 (a burst after an outage, padded to the size of a BYE)\r\n\
             Content-Length: 0\r\n\r\n"
        );
        s.send_to(msg.as_bytes(), target).unwrap();
    }
    s.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let mut answered = std::collections::HashSet::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut buf = [0u8; 4096];
    while answered.len() < 300 && Instant::now() < deadline {
        if let Ok((n, _)) = s.recv_from(&mut buf) {
            let text = String::from_utf8_lossy(&buf[..n]);
            if let Some(id) = text.lines().find_map(|l| l.strip_prefix("Call-ID: burst-")) {
                answered.insert(id.to_owned());
            }
        }
    }
    eprintln!("answered {} of 300", answered.len());
    assert_eq!(answered.len(), 300, "requests of the burst lost");
}
