#![allow(clippy::unwrap_used, clippy::expect_used)]
//! Digest guessing against a trunk (issue 19's acceptance: "a digest guessing run is
//! throttled to ≤ 10 guesses per source per minute and banned; a replayed nonce is
//! refused").
//!
//! Raw UDP sockets: an attacker on 127.0.0.2 fetches a challenge and answers it with a
//! wrong password, over and over, then tries the right password. The carrier on
//! 127.0.0.1 (listed in `never_ban`) then calls with the right password and is
//! answered; its Authorization replayed from 127.0.0.3 on a new INVITE is refused.

mod common;

use std::net::{SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

use common::{Daemon, ProfileSpec};
use sipbridge::sip::digest::{Algorithm, DigestCredentials, ResponseParams, compute_response};

const PASSWORD: &str = "correct horse";
const USER: &str = "carrier";

fn invite(target: SocketAddr, from: SocketAddr, call_id: &str, branch: &str, auth: &str) -> String {
    let body = "v=0\r\no=c 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\n\
                m=audio 4000 RTP/AVP 0\r\na=rtpmap:0 PCMU/8000\r\n";
    let auth = if auth.is_empty() {
        String::new()
    } else {
        format!("Authorization: {auth}\r\n")
    };
    format!(
        "INVITE sip:+15551234567@{target} SIP/2.0\r\n\
         Via: SIP/2.0/UDP {from};branch=z9hG4bK{branch};rport\r\n\
         From: <sip:+15550001111@127.0.0.1>;tag=t-{branch}\r\n\
         To: <sip:+15551234567@{target}>\r\n\
         Call-ID: {call_id}\r\n\
         CSeq: 1 INVITE\r\n\
         Contact: <sip:c@{from}>\r\n\
         Max-Forwards: 70\r\n\
         {auth}Content-Type: application/sdp\r\n\
         Content-Length: {}\r\n\r\n{body}",
        body.len()
    )
}

/// The first final (or 401) response within `timeout`: `(status, text)`.
fn final_response(socket: &UdpSocket, timeout: Duration) -> Option<(u16, String)> {
    let deadline = Instant::now() + timeout;
    let mut buf = [0u8; 4096];
    while Instant::now() < deadline {
        if let Ok((n, _)) = socket.recv_from(&mut buf) {
            let text = String::from_utf8_lossy(&buf[..n]).into_owned();
            let status: u16 = text.get(8..11).and_then(|s| s.parse().ok()).unwrap_or(0);
            if status >= 200 {
                return Some((status, text));
            }
        }
    }
    None
}

fn answer(challenge_response: &str, target: SocketAddr, password: &str) -> String {
    let line = challenge_response
        .lines()
        .find(|l| l.starts_with("WWW-Authenticate:") && l.contains("MD5"))
        .or_else(|| {
            challenge_response
                .lines()
                .find(|l| l.starts_with("WWW-Authenticate:"))
        })
        .expect("a challenge");
    let value = line.split_once(':').unwrap().1.trim();
    let c = DigestCredentials::parse(&format!("{value}, username=x, uri=x, response=x")).unwrap();
    let alg = match c.algorithm.as_deref() {
        Some("SHA-256") => Algorithm::Sha256,
        _ => Algorithm::Md5,
    };
    let uri = format!("sip:+15551234567@{target}");
    let response = compute_response(
        alg,
        &ResponseParams {
            username: USER,
            realm: &c.realm,
            password: password.as_bytes(),
            method: "INVITE",
            uri: &uri,
            nonce: &c.nonce,
            nc: "00000001",
            cnonce: "0a4f113b",
            qop: "auth",
        },
    );
    format!(
        "Digest username=\"{USER}\",realm=\"{}\",nonce=\"{}\",uri=\"{uri}\",\
         response=\"{response}\",algorithm={},cnonce=\"0a4f113b\",qop=auth,nc=00000001",
        c.realm,
        c.nonce,
        alg.as_str()
    )
}

/// One challenge-and-answer round from `socket`: the status of the answered INVITE
/// (`None`: no answer at all, at either step).
fn attempt(socket: &UdpSocket, target: SocketAddr, n: usize, password: &str) -> Option<u16> {
    let from = socket.local_addr().unwrap();
    let call_id = format!("guess-{n}-{}", from.ip());
    let first = invite(target, from, &call_id, &format!("a{n}"), "");
    socket.send_to(first.as_bytes(), target).unwrap();
    let (status, challenge) = final_response(socket, Duration::from_millis(700))?;
    assert_eq!(status, 401, "{challenge}");
    let auth = answer(&challenge, target, password);
    let second = invite(target, from, &call_id, &format!("b{n}"), &auth);
    socket.send_to(second.as_bytes(), target).unwrap();
    final_response(socket, Duration::from_millis(700)).map(|(s, _)| s)
}

#[test]
fn guessing_is_throttled_and_banned_and_a_replayed_nonce_is_refused() {
    let trunk = format!(
        "[trunk.digest]\nusername = \"{USER}\"\npassword = \"env:SB_TEST_DIGEST_PASSWORD\"\n\
         realm = \"sipbridge.test\"\nalgorithms = [\"MD5\"]\n"
    );
    let text = ProfileSpec {
        trunk: &trunk,
        extra: "[profile.security]\nnever_ban = [\"127.0.0.1\"]\n",
        ..ProfileSpec::default()
    }
    .render();
    let daemon = Daemon::spawn_with_env(&text, &[("SB_TEST_DIGEST_PASSWORD", PASSWORD)]);
    let target = daemon.udp_addr();
    let attacker = UdpSocket::bind("127.0.0.2:0").expect("bind 127.0.0.2");
    attacker
        .set_read_timeout(Some(Duration::from_millis(20)))
        .unwrap();

    let mut outcomes = Vec::new();
    for n in 0..25 {
        outcomes.push(attempt(&attacker, target, n, &format!("guess{n}")));
    }
    let checked = outcomes.iter().filter(|o| o.is_some()).count();
    eprintln!("attacker outcomes: {outcomes:?}");
    // 9 refused with a new challenge, the 10th bans (403), then silence.
    assert_eq!(checked, 10, "{outcomes:?}");
    assert!(
        outcomes[..9].iter().all(|o| *o == Some(401)),
        "{outcomes:?}"
    );
    assert_eq!(outcomes[9], Some(403), "{outcomes:?}");
    assert!(outcomes[10..].iter().all(Option::is_none), "{outcomes:?}");
    // Banned: even the right password gets no answer.
    assert_eq!(attempt(&attacker, target, 99, PASSWORD), None);

    // The carrier (never banned) is answered, although its username was guessed at.
    let carrier = UdpSocket::bind("127.0.0.1:0").unwrap();
    carrier
        .set_read_timeout(Some(Duration::from_millis(20)))
        .unwrap();
    let from = carrier.local_addr().unwrap();
    let first = invite(target, from, "legit-1", "l1", "");
    carrier.send_to(first.as_bytes(), target).unwrap();
    let (status, challenge) = final_response(&carrier, Duration::from_secs(2)).unwrap();
    assert_eq!(status, 401);
    let auth = answer(&challenge, target, PASSWORD);
    let second = invite(target, from, "legit-1", "l2", &auth);
    carrier.send_to(second.as_bytes(), target).unwrap();
    let (status, _) = final_response(&carrier, Duration::from_secs(5)).unwrap();
    assert_eq!(status, 200, "the carrier's call");

    // The same Authorization (nonce, nc=1) on a new INVITE: refused with a new
    // challenge from the carrier's own address (an on-path replay)...
    let replay = invite(target, from, "replay-1", "r1", &auth);
    carrier.send_to(replay.as_bytes(), target).unwrap();
    let (status, _) = final_response(&carrier, Duration::from_secs(2)).expect("an answer");
    assert_eq!(status, 401, "a replayed nonce is refused");
    let cdr = daemon
        .wait_for_cdr(Duration::from_secs(5), |c| c["call_id"] == "replay-1")
        .expect("the replay's CDR");
    assert!(cdr["cause"].as_str().unwrap().contains("replayed"), "{cdr}");
    // ...and from elsewhere, where the guessed-at username is still throttled: 403.
    let replayer = UdpSocket::bind("127.0.0.3:0").expect("bind 127.0.0.3");
    replayer
        .set_read_timeout(Some(Duration::from_millis(20)))
        .unwrap();
    let rfrom = replayer.local_addr().unwrap();
    let replay = invite(target, rfrom, "replay-2", "r2", &auth);
    replayer.send_to(replay.as_bytes(), target).unwrap();
    let (status, _) = final_response(&replayer, Duration::from_secs(2)).expect("an answer");
    assert_eq!(status, 403, "a replayed nonce is refused");
}
