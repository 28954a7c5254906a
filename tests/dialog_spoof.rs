#![allow(clippy::unwrap_used, clippy::expect_used)]
//! Spoofed in-dialog requests (issue 19's acceptance: "a spoofed BYE and a spoofed
//! re-INVITE from another address do not end or move the call").
//!
//! The test is the carrier itself, on raw UDP sockets: it calls from 127.0.0.1 (the only
//! address the trunk allows), ACKs, and receives the call's RTP. An attacker on 127.0.0.2
//! who knows the Call-ID and both tags sends a BYE and then a re-INVITE whose SDP names
//! its own media socket. Then: the attacker gets no answer and no RTP, the caller keeps
//! receiving RTP, the caller's own BYE gets 200, and the CDR says the caller hung up.

mod common;

use std::net::{SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

use common::{Daemon, ProfileSpec};

fn sdp(ip: &str, port: u16) -> String {
    format!(
        "v=0\r\no=carrier 1 1 IN IP4 {ip}\r\ns=-\r\nc=IN IP4 {ip}\r\nt=0 0\r\n\
         m=audio {port} RTP/AVP 0\r\na=rtpmap:0 PCMU/8000\r\na=sendrecv\r\n"
    )
}

#[allow(clippy::too_many_arguments)]
fn request(
    method: &str,
    target: SocketAddr,
    from: SocketAddr,
    call_id: &str,
    to_tag: Option<&str>,
    cseq: u32,
    branch: &str,
    body: &str,
) -> String {
    let to_tag = to_tag.map(|t| format!(";tag={t}")).unwrap_or_default();
    let content_type = if body.is_empty() {
        String::new()
    } else {
        "Content-Type: application/sdp\r\n".to_owned()
    };
    format!(
        "{method} sip:+15551234567@{target} SIP/2.0\r\n\
         Via: SIP/2.0/UDP {from};branch=z9hG4bK{branch};rport\r\n\
         From: <sip:+15550001111@127.0.0.1>;tag=caller-tag-19\r\n\
         To: <sip:+15551234567@{target}>{to_tag}\r\n\
         Call-ID: {call_id}\r\n\
         CSeq: {cseq} {method}\r\n\
         Contact: <sip:carrier@{from}>\r\n\
         Max-Forwards: 70\r\n\
         {content_type}Content-Length: {}\r\n\r\n{body}",
        body.len()
    )
}

/// Waits for a SIP response with `status` on `socket`; returns its text.
fn wait_response(socket: &UdpSocket, status: u16, timeout: Duration) -> Option<String> {
    let deadline = Instant::now() + timeout;
    let mut buf = [0u8; 4096];
    while Instant::now() < deadline {
        if let Ok((n, _)) = socket.recv_from(&mut buf) {
            let text = String::from_utf8_lossy(&buf[..n]).into_owned();
            if text.starts_with(&format!("SIP/2.0 {status} ")) {
                return Some(text);
            }
        }
    }
    None
}

fn header<'a>(msg: &'a str, name: &str) -> Option<&'a str> {
    msg.lines()
        .find(|l| {
            l.split_once(':')
                .is_some_and(|(n, _)| n.trim().eq_ignore_ascii_case(name))
        })
        .and_then(|l| l.split_once(':'))
        .map(|(_, v)| v.trim())
}

/// Datagrams that arrive on `socket` within `window`.
fn count_datagrams(socket: &UdpSocket, window: Duration) -> usize {
    let deadline = Instant::now() + window;
    let mut buf = [0u8; 2048];
    let mut n = 0;
    while Instant::now() < deadline {
        if socket.recv_from(&mut buf).is_ok() {
            n += 1;
        }
    }
    n
}

#[test]
fn spoofed_bye_and_reinvite_from_another_address_neither_end_nor_move_the_call() {
    let text = ProfileSpec::default()
        .render()
        .replace("allow = [\"127.0.0.0/8\"]", "allow = [\"127.0.0.1/32\"]");
    assert!(text.contains("127.0.0.1/32"));
    let daemon = Daemon::spawn(&text);
    let target = daemon.udp_addr();
    let sip = UdpSocket::bind("127.0.0.1:0").unwrap();
    let media = UdpSocket::bind("127.0.0.1:0").unwrap();
    let attacker = UdpSocket::bind("127.0.0.2:0").expect("bind 127.0.0.2 (loopback /8)");
    let attacker_media = UdpSocket::bind("127.0.0.2:0").unwrap();
    for s in [&sip, &media, &attacker, &attacker_media] {
        s.set_read_timeout(Some(Duration::from_millis(20))).unwrap();
    }
    let (from, media_port) = (
        sip.local_addr().unwrap(),
        media.local_addr().unwrap().port(),
    );
    let attacker_addr = attacker.local_addr().unwrap();
    let call_id = "spoof-19@127.0.0.1";

    let invite = request(
        "INVITE",
        target,
        from,
        call_id,
        None,
        1,
        "inv1",
        &sdp("127.0.0.1", media_port),
    );
    sip.send_to(invite.as_bytes(), target).unwrap();
    let ok = wait_response(&sip, 200, Duration::from_secs(10)).expect("200 OK");
    let to = header(&ok, "To").unwrap();
    let to_tag = to.split(";tag=").nth(1).unwrap().split(';').next().unwrap();
    let to_tag = to_tag.to_owned();
    sip.send_to(
        request("ACK", target, from, call_id, Some(&to_tag), 1, "ack1", "").as_bytes(),
        target,
    )
    .unwrap();
    assert!(
        count_datagrams(&media, Duration::from_millis(500)) > 5,
        "the call's RTP reaches the caller"
    );

    // The attacker: same Call-ID and tags, from 127.0.0.2.
    let bye = request(
        "BYE",
        target,
        attacker_addr,
        call_id,
        Some(&to_tag),
        2,
        "bye-x",
        "",
    );
    attacker.send_to(bye.as_bytes(), target).unwrap();
    let attacker_port = attacker_media.local_addr().unwrap().port();
    let reinvite = request(
        "INVITE",
        target,
        attacker_addr,
        call_id,
        Some(&to_tag),
        3,
        "reinv-x",
        &sdp("127.0.0.2", attacker_port),
    );
    attacker.send_to(reinvite.as_bytes(), target).unwrap();
    // Its retransmissions, as a real UAC would send them.
    std::thread::sleep(Duration::from_millis(500));
    attacker.send_to(bye.as_bytes(), target).unwrap();
    attacker.send_to(reinvite.as_bytes(), target).unwrap();

    let to_caller = count_datagrams(&media, Duration::from_millis(1500));
    let to_attacker_media = count_datagrams(&attacker_media, Duration::from_millis(100));
    let to_attacker = count_datagrams(&attacker, Duration::from_millis(100));
    eprintln!(
        "after the spoofed BYE and re-INVITE: {to_caller} RTP packets to the caller, \
         {to_attacker_media} to the attacker's media socket, {to_attacker} SIP messages \
         to the attacker"
    );
    assert_eq!(to_attacker, 0, "the attacker got an answer");
    assert_eq!(to_attacker_media, 0, "the media moved to the attacker");
    assert!(
        to_caller > 40,
        "the call's RTP stopped: {to_caller} packets"
    );
    assert!(
        daemon.cdrs().is_empty(),
        "the call ended: {:?}",
        daemon.cdrs()
    );

    // The real caller's BYE ends it.
    let bye = request("BYE", target, from, call_id, Some(&to_tag), 4, "bye1", "");
    sip.send_to(bye.as_bytes(), target).unwrap();
    wait_response(&sip, 200, Duration::from_secs(5)).expect("200 to the caller's BYE");
    let cdr = daemon
        .wait_for_cdr(Duration::from_secs(5), |c| c["result_code"] == 200)
        .expect("the call's CDR");
    assert_eq!(cdr["hangup_side"], "caller", "{cdr}");
    assert_eq!(cdr["cause"], "caller-bye", "{cdr}");
}

fn metric(daemon: &Daemon, name: &str) -> Option<f64> {
    let text = common::http::get(daemon.admin_addr(), "/metrics", None).text();
    text.lines()
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

/// Issue 17 item 5: once a call has ended, its task and state are gone and a
/// compact entry answers what is left: a retransmitted BYE gets the very
/// same 200 (Timer J), a retransmitted ACK nothing, a new request in the
/// ended dialog 481. `/metrics` counts the entry.
#[test]
fn after_the_call_a_compact_entry_answers_its_retransmissions() {
    let text = ProfileSpec {
        extra: "[profile.admin]\nlisten = \"127.0.0.1:0\"\n",
        ..ProfileSpec::default()
    }
    .render();
    let daemon = Daemon::spawn(&text);
    let target = daemon.udp_addr();
    let sip = UdpSocket::bind("127.0.0.1:0").unwrap();
    let media = UdpSocket::bind("127.0.0.1:0").unwrap();
    sip.set_read_timeout(Some(Duration::from_millis(20)))
        .unwrap();
    let from = sip.local_addr().unwrap();
    let media_port = media.local_addr().unwrap().port();
    let call_id = "linger-17@127.0.0.1";
    let invite = request(
        "INVITE",
        target,
        from,
        call_id,
        None,
        1,
        "linv1",
        &sdp("127.0.0.1", media_port),
    );
    sip.send_to(invite.as_bytes(), target).unwrap();
    let ok = wait_response(&sip, 200, Duration::from_secs(10)).expect("200 OK");
    let to = header(&ok, "To").unwrap();
    let to_tag = to.split(";tag=").nth(1).unwrap().split(';').next().unwrap();
    let to_tag = to_tag.to_owned();
    let ack = request("ACK", target, from, call_id, Some(&to_tag), 1, "lack1", "");
    sip.send_to(ack.as_bytes(), target).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        metric(&daemon, "sipbridge_sip_lingering_calls"),
        Some(0.0),
        "nothing lingers while the call lives"
    );

    let bye = request("BYE", target, from, call_id, Some(&to_tag), 2, "lbye2", "");
    sip.send_to(bye.as_bytes(), target).unwrap();
    let first = wait_response(&sip, 200, Duration::from_secs(5)).expect("200 to the BYE");
    daemon
        .wait_for_cdr(Duration::from_secs(5), |c| c["cause"] == "caller-bye")
        .expect("the call's CDR");
    // The call's task hands over to the compact entry as soon as it ends.
    let deadline = Instant::now() + Duration::from_secs(5);
    while metric(&daemon, "sipbridge_sip_lingering_calls") != Some(1.0) {
        assert!(
            Instant::now() < deadline,
            "the ended call never became a lingering entry"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let bytes = metric(&daemon, "sipbridge_sip_lingering_bytes").unwrap();
    assert!(
        bytes > 0.0 && bytes < 4096.0,
        "a compact entry, not a call: {bytes} bytes"
    );

    // The caller did not hear the 200 and retransmits its BYE (and ACK).
    sip.send_to(ack.as_bytes(), target).unwrap();
    sip.send_to(bye.as_bytes(), target).unwrap();
    let again = wait_response(&sip, 200, Duration::from_secs(5)).expect("the 200 again");
    assert_eq!(again, first, "the same 200, byte for byte");
    // A new request in the ended dialog.
    let options = request(
        "OPTIONS",
        target,
        from,
        call_id,
        Some(&to_tag),
        3,
        "lopt3",
        "",
    );
    sip.send_to(options.as_bytes(), target).unwrap();
    let gone =
        wait_response(&sip, 481, Duration::from_secs(5)).expect("481: the dialog no longer exists");
    assert_eq!(header(&gone, "CSeq"), Some("3 OPTIONS"));
    // Nothing else came: the ACK was absorbed.
    assert_eq!(count_datagrams(&sip, Duration::from_millis(300)), 0);
}
