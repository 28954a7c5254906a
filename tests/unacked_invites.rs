#![allow(clippy::unwrap_used, clippy::expect_used)]
//! INVITEs that are never ACKed (issue 19's acceptance: "300 never-ACKed INVITEs from
//! one allowed address leave 0 of 20 legitimate calls failing; nothing is recorded for
//! them").
//!
//! From 127.0.0.2 (inside the trunk's 127.0.0.0/8) the test sends 300 INVITEs with
//! distinct Call-IDs and ignores every answer. Then SIPp places 20 calls from 127.0.0.1.
//! The tenant records. Without a per-source limit the attacker's answered calls hold
//! all 50 call slots until Timer H, and each is recorded meanwhile.

mod common;

use std::net::UdpSocket;
use std::time::Duration;

use common::{Daemon, ProfileSpec, sipp, sipp_scenario};
use sipbridge::store::db::Store;

fn invite(target: std::net::SocketAddr, from: std::net::SocketAddr, n: usize) -> String {
    let body = "v=0\r\no=x 1 1 IN IP4 127.0.0.2\r\ns=-\r\nc=IN IP4 127.0.0.2\r\nt=0 0\r\n\
                m=audio 4000 RTP/AVP 0\r\na=rtpmap:0 PCMU/8000\r\n";
    format!(
        "INVITE sip:+15551234567@{target} SIP/2.0\r\n\
         Via: SIP/2.0/UDP {from};branch=z9hG4bKflood{n}\r\n\
         From: <sip:+15550009999@127.0.0.2>;tag=f{n}\r\n\
         To: <sip:+15551234567@{target}>\r\n\
         Call-ID: flood-{n}@127.0.0.2\r\n\
         CSeq: 1 INVITE\r\n\
         Contact: <sip:x@{from}>\r\n\
         Max-Forwards: 70\r\n\
         Content-Type: application/sdp\r\n\
         Content-Length: {}\r\n\r\n{body}",
        body.len()
    )
}

#[test]
fn never_acked_invites_hold_neither_the_slots_nor_a_recording() {
    // T1 = 100 ms: Timer H (64·T1) ends the un-ACKed calls after 6.4 s.
    let text = ProfileSpec {
        sip: "t1_ms = 100\nt2_ms = 400\n",
        ..ProfileSpec::default()
    }
    .render()
    .replace("recording = false\n", "recording = true\n");
    let daemon = Daemon::spawn(&text);
    let target = daemon.udp_addr();
    let attacker = UdpSocket::bind("127.0.0.2:0").expect("bind 127.0.0.2");
    let from = attacker.local_addr().unwrap();
    for n in 0..300 {
        attacker
            .send_to(invite(target, from, n).as_bytes(), target)
            .unwrap();
        std::thread::sleep(Duration::from_millis(1));
    }
    // Let the daemon take them all in before the carrier calls.
    std::thread::sleep(Duration::from_millis(500));

    let result = sipp(
        &sipp_scenario("basic_call.xml"),
        target,
        &["-s", "+15551234567", "-m", "20", "-r", "10"],
    );
    eprintln!(
        "legitimate calls: {:?} successful, {:?} failed",
        result.successful_calls, result.failed_calls
    );
    result.assert_success();
    assert_eq!(result.successful_calls, Some(20));

    // The attacker's answered calls end at Timer H: none was recorded. The CDR rows
    // (rejected attempts are logged one by one only up to 5 per source and 10 s,
    // then summarised; their rows are all written).
    let db = daemon.dir().join("var/sipbridge.db");
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let rows = loop {
        let rows = Store::open(&db)
            .unwrap()
            .list_calls(&sipbridge::store::db::CallFilter {
                tenant: Some("demo".into()),
                limit: 1000,
                ..Default::default()
            })
            .unwrap();
        let closed = rows.iter().filter(|c| c.ended_at.is_some()).count();
        if closed >= 320 || std::time::Instant::now() >= deadline {
            break rows;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let flood: Vec<_> = rows
        .iter()
        .filter(|c| c.call_id.starts_with("flood-"))
        .collect();
    let cause = |c: &sipbridge::store::db::StoredCdr| c.cause.clone().unwrap_or_default();
    let answered = flood.iter().filter(|c| cause(c) == "no-ack").count();
    let limited = flood
        .iter()
        .filter(|c| cause(c) == "unconfirmed-limit")
        .count();
    eprintln!(
        "flood: {} CDRs, {answered} answered and ended by Timer H, {limited} refused at the \
         unconfirmed limit",
        flood.len()
    );
    assert!(answered <= 10, "{answered} un-ACKed calls were answered");
    assert!(limited >= 250, "only {limited} refused");
    let store = Store::open(&db).unwrap();
    for n in 0..300 {
        let recs = store
            .recordings_of_call("demo", &format!("flood-{n}@127.0.0.2"))
            .unwrap();
        assert!(recs.is_empty(), "flood-{n} was recorded: {recs:?}");
    }
    let legit: Vec<_> = rows
        .iter()
        .filter(|c| !c.call_id.starts_with("flood-"))
        .collect();
    assert_eq!(legit.len(), 20);
    let recorded = legit
        .iter()
        .filter(|c| {
            !store
                .recordings_of_call("demo", &c.call_id)
                .unwrap()
                .is_empty()
        })
        .count();
    assert_eq!(recorded, 20, "the legitimate calls are recorded");
}
