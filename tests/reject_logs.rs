#![allow(clippy::unwrap_used, clippy::expect_used)]
//! Logs under a flood of rejected INVITEs, and strings from the wire in logs (issue 19,
//! item 7 and "Logs": "rate-limited per-source rejection logs (a summary line per
//! interval); every string from the wire printed to a terminal or log escaped").
//!
//! From 127.0.0.3 the test sends 2 INVITEs whose Call-IDs carry terminal controls
//! (ESC, the one-byte CSI U+009B, DEL), then 600 INVITEs to a number without a route
//! (404 each). Before, each reject wrote a ~720-byte CDR line at INFO; now at most
//! 5 per source and 10 s are logged one by one, and one summary line per source
//! counts the rest by status and cause. No control character reaches the log raw.

mod common;

use std::net::{SocketAddr, UdpSocket};
use std::time::Duration;

use common::{Daemon, ProfileSpec, cdr_of};

fn invite(target: SocketAddr, from: SocketAddr, number: &str, call_id: &str, n: usize) -> Vec<u8> {
    let body = "v=0\r\no=x 1 1 IN IP4 127.0.0.3\r\ns=-\r\nc=IN IP4 127.0.0.3\r\nt=0 0\r\n\
                m=audio 4000 RTP/AVP 0\r\na=rtpmap:0 PCMU/8000\r\n";
    format!(
        "INVITE sip:{number}@{target} SIP/2.0\r\n\
         Via: SIP/2.0/UDP {from};branch=z9hG4bKrej{n}\r\n\
         From: <sip:+15550009999@127.0.0.3>;tag=f{n}\r\n\
         To: <sip:{number}@{target}>\r\n\
         Call-ID: {call_id}\r\n\
         CSeq: 1 INVITE\r\n\
         Contact: <sip:x@{from}>\r\n\
         Max-Forwards: 70\r\n\
         Content-Type: application/sdp\r\n\
         Content-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// The line's fields (nested under `fields` or flat).
fn fields(line: &str) -> Option<serde_json::Value> {
    let v: serde_json::Value = serde_json::from_str(line).ok()?;
    Some(v.get("fields").cloned().unwrap_or(v))
}

#[test]
fn rejected_flood_logs_a_bounded_number_of_lines_and_wire_strings_escaped() {
    let text = ProfileSpec {
        sip: "t1_ms = 100\nt2_ms = 400\n",
        routes: Some("[[route]]\nnumber = \"+15551234567\"\ntenant = \"demo\"\n"),
        ..ProfileSpec::default()
    }
    .render();
    let daemon = Daemon::spawn(&text);
    let target = daemon.udp_addr();
    let sock = UdpSocket::bind("127.0.0.3:0").expect("bind 127.0.0.3");
    let from = sock.local_addr().unwrap();
    // What the daemon answered 404 (it may drop datagrams under load): distinct Call-IDs.
    let reader = {
        let sock = sock.try_clone().unwrap();
        sock.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
        std::thread::spawn(move || {
            let mut seen = std::collections::HashSet::new();
            let mut buf = [0u8; 4096];
            while let Ok((len, _)) = sock.recv_from(&mut buf) {
                let text = String::from_utf8_lossy(&buf[..len]).into_owned();
                if text.starts_with("SIP/2.0 404")
                    && let Some(id) = text.lines().find_map(|l| l.strip_prefix("Call-ID: "))
                {
                    seen.insert(id.to_owned());
                }
            }
            seen.len()
        })
    };

    // Hostile Call-IDs: one answered (its call logs under a span), one rejected.
    let evil_answered = "evil-\u{1b}[2J-\u{9b}31m-\u{7f}-1@127.0.0.3";
    let evil_rejected = "evil-\u{1b}]0;pwned\u{7}-2@127.0.0.3";
    sock.send_to(
        &invite(target, from, "+15551234567", evil_answered, 0),
        target,
    )
    .unwrap();
    sock.send_to(
        &invite(target, from, "+15550000000", evil_rejected, 1),
        target,
    )
    .unwrap();
    const FLOOD: usize = 600;
    for n in 0..FLOOD {
        let call_id = format!("reject-{n}@127.0.0.3");
        sock.send_to(
            &invite(target, from, "+15550000000", &call_id, n + 2),
            target,
        )
        .unwrap();
        std::thread::sleep(Duration::from_millis(1));
    }
    let answered_404 = reader.join().unwrap();

    // The interval closes within 10 s (+1 s tick): one summary line for the source.
    let summary = daemon
        .wait_for_log(Duration::from_secs(15), |l| {
            l.contains("requests from 127.0.0.3 rejected in the last 10 s")
        })
        .expect("no summary line");
    eprintln!("summary: {summary}");
    // The answered hostile call ends at Timer H (64·T1 = 6.4 s) with its CDR.
    let ended = daemon
        .wait_for_cdr(Duration::from_secs(15), |c| c["cause"] == "no-ack")
        .expect("the hostile call's CDR");
    assert_eq!(
        ended["call_id"], evil_answered,
        "the CDR's JSON keeps the true value"
    );

    let logs = daemon.logs();
    let rejected_lines: Vec<serde_json::Value> = logs
        .iter()
        .filter_map(|l| cdr_of(l))
        .filter(|c| c["result_code"] == 404)
        .collect();
    let not_logged: u64 = logs
        .iter()
        .filter(|l| l.contains("requests from 127.0.0.3 rejected"))
        .filter_map(|l| fields(l))
        .map(|f| f["not_logged"].as_u64().unwrap())
        .sum();
    eprintln!(
        "{} rejects sent, {answered_404} answered 404: {} CDR lines, {not_logged} counted in \
         summaries; {} log lines in all",
        FLOOD + 1,
        rejected_lines.len(),
        logs.len()
    );
    // One interval, or two when the flood straddled a boundary.
    assert!(
        rejected_lines.len() <= 10,
        "{} rejected CDR lines",
        rejected_lines.len()
    );
    assert!(answered_404 > FLOOD / 2, "only {answered_404} answered");
    assert_eq!(
        rejected_lines.len() as u64 + not_logged,
        answered_404 as u64,
        "every reject is logged or counted"
    );
    assert!(summary.contains("404 no-route ×"), "{summary}");
    let info_lines = logs
        .iter()
        .filter(|l| {
            fields(l).is_some_and(|_| {
                serde_json::from_str::<serde_json::Value>(l)
                    .ok()
                    .and_then(|v| v["level"].as_str().map(str::to_owned))
                    .is_some_and(|lvl| lvl != "DEBUG" && lvl != "TRACE")
            })
        })
        .count();
    assert!(info_lines < 60, "{info_lines} lines at INFO or above");

    // No control character from the wire reaches the log raw; the fields show them
    // escaped.
    for l in &logs {
        assert!(
            !l.chars()
                .any(|c| matches!(c, '\u{1b}' | '\u{9b}' | '\u{7f}' | '\u{7}' | '\0')),
            "raw control character in a log line: {l:?}"
        );
    }
    let evil_line = logs
        .iter()
        .find(|l| cdr_of(l).is_some_and(|c| c["cause"] == "no-ack"))
        .unwrap();
    let f = fields(evil_line).unwrap();
    assert_eq!(
        f["call_id"], "evil-\\u{1b}[2J-\\u{9b}31m-\\u{7f}-1@127.0.0.3",
        "{evil_line}"
    );
    assert!(
        logs.iter()
            .any(|l| l.contains("evil-\\\\u{1b}]0;pwned\\\\u{7}-2")),
        "the rejected hostile Call-ID is logged escaped"
    );
}
