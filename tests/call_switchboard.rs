//! Sans-IO tests of the switchboard's trunk identification (unknown source →
//! silence by default, 403 when configured to reject), of its source gate
//! (rate limits, scanner and malformed-message bans, never for a trunk's own
//! addresses), of trusted proxies (OPTIONS health answers, the caller's address
//! taken from the proxy's header and never from anyone else's) and of UPDATE handling in a live call (an UPDATE with a hold
//! offer is answered without dropping the call).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use rand::SeedableRng;
use rand::rngs::StdRng;
use sipbridge::call::{
    Call, CallEvent, CallOutput, Dispatch, Peer, PortAllocator, Switchboard, SwitchboardSettings,
    TransportKind,
};
use sipbridge::sip::message::{Message, parse_datagram};
use sipbridge::sip::sdp::Direction;

fn config(extra_sip: &str, allow: &str) -> Arc<sipbridge::config::Config> {
    config_with(extra_sip, allow, "")
}

fn config_with(extra_sip: &str, allow: &str, tenant: &str) -> Arc<sipbridge::config::Config> {
    let dir = tempfile::tempdir().unwrap();
    let prompt = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/sip-profiles/prompts/disclosure.wav"
    );
    let toml = format!(
        r#"[profile]
name = "t"
var_dir = "var"
max_calls = 10
rtp_ports = {{ start = 40000, end = 40099 }}
[profile.listen]
udp = ["127.0.0.1:5060"]
[profile.sip]
{extra_sip}
[[trunk]]
name = "carrier"
allow = ["{allow}"]
[[tenant]]
id = "demo"
prompt = "{prompt}"
pipeline = {{ kind = "echo" }}
{tenant}
[[route]]
number = "*"
tenant = "demo"
"#
    );
    let path = dir.path().join("p.toml");
    std::fs::write(&path, toml).unwrap();
    Arc::new(sipbridge::config::load(&path).unwrap_or_else(|d| panic!("{d}")))
}

fn switchboard(config: &Arc<sipbridge::config::Config>, rng: &mut StdRng) -> Switchboard {
    let local: SocketAddr = "127.0.0.1:5060".parse().unwrap();
    let settings = SwitchboardSettings::from_profile(&config.profiles[0], Some(local), None);
    Switchboard::new(
        Arc::clone(config),
        settings,
        PortAllocator::new(40000, 40099),
        rng,
    )
}

const PEER: &str = "127.0.0.1:5080";

fn peer() -> Peer {
    Peer {
        transport: TransportKind::Udp,
        addr: PEER.parse().unwrap(),
        flow: 0,
    }
}

fn sdp(direction: &str) -> String {
    format!(
        "v=0\r\no=c 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\n\
m=audio 30000 RTP/AVP 0 101\r\na=rtpmap:0 PCMU/8000\r\na=rtpmap:101 telephone-event/8000\r\n\
a=fmtp:101 0-16\r\na={direction}\r\n"
    )
}

fn request(method: &str, branch: &str, cseq: u32, to_tag: Option<&str>, body: &str) -> Vec<u8> {
    let to_tag = to_tag.map(|t| format!(";tag={t}")).unwrap_or_default();
    let ctype = if body.is_empty() {
        String::new()
    } else {
        "Content-Type: application/sdp\r\n".to_owned()
    };
    format!(
        "{method} sip:+15551230000@127.0.0.1:5060 SIP/2.0\r\n\
Via: SIP/2.0/UDP {PEER};branch=z9hG4bK{branch}\r\n\
Max-Forwards: 70\r\n\
From: <sip:+15559870000@127.0.0.1>;tag=caller\r\n\
To: <sip:+15551230000@127.0.0.1>{to_tag}\r\n\
Call-ID: cs-1@127.0.0.1\r\n\
CSeq: {cseq} {method}\r\n\
Contact: <sip:caller@{PEER}>\r\n\
{ctype}Content-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

fn status_of(bytes: &[u8]) -> u16 {
    match parse_datagram(bytes) {
        Ok(Message::Response(r)) => r.status,
        other => panic!("not a response: {other:?}"),
    }
}

#[test]
fn an_overloaded_switchboard_sheds_new_invites_with_503_and_recovers() {
    let mut rng = StdRng::seed_from_u64(9);
    let now = Instant::now();
    let cfg = config("", "127.0.0.0/8");
    let mut sb = switchboard(&cfg, &mut rng);
    sb.set_overloaded(true);
    let invite = request("INVITE", "o1", 1, None, &sdp("sendrecv"));
    let d = dispatch(&mut sb, now, &invite, &mut rng);
    match d {
        Dispatch::Reply { transmit, record } => {
            assert_eq!(status_of(&transmit.bytes), 503);
            let text = String::from_utf8_lossy(&transmit.bytes).into_owned();
            assert!(text.contains("\r\nRetry-After: 5\r\n"), "{text}");
            assert_eq!(record.expect("a CDR for the attempt").result_code, 503);
        }
        other => panic!("expected a 503, got {other:?}"),
    }
    assert_eq!(sb.ports.in_use(), 0);
    // OPTIONS answer 503 too (issue 16): a load balancer pinging the daemon sends new
    // calls elsewhere until it recovers.
    let options = request("OPTIONS", "o2", 1, None, "");
    match dispatch(&mut sb, now, &options, &mut rng) {
        Dispatch::Reply { transmit, .. } => {
            assert_eq!(status_of(&transmit.bytes), 503);
            let text = String::from_utf8_lossy(&transmit.bytes).into_owned();
            assert!(text.contains("\r\nRetry-After: 5\r\n"), "{text}");
        }
        other => panic!("expected a 503, got {other:?}"),
    }
    sb.set_overloaded(false);
    let options = request("OPTIONS", "o4", 1, None, "");
    match dispatch(&mut sb, now, &options, &mut rng) {
        Dispatch::Reply { transmit, .. } => assert_eq!(status_of(&transmit.bytes), 200),
        other => panic!("expected a 200, got {other:?}"),
    }
    let invite = request("INVITE", "o3", 1, None, &sdp("sendrecv"));
    let d = dispatch(&mut sb, now, &invite, &mut rng);
    assert!(matches!(d, Dispatch::NewCall(_)), "{d:?}");
}

#[test]
fn unknown_source_gets_silence_or_403() {
    let mut rng = StdRng::seed_from_u64(1);
    let now = Instant::now();
    let invite = request("INVITE", "u1", 1, None, &sdp("sendrecv"));
    let options = request("OPTIONS", "u2", 1, None, "");
    let garbage = b"OPTIONS sip:x SIP/2.0\r\nVia: nonsense\r\n\r\n".to_vec();

    // The only trunk allows 10.0.0.0/8; we come from 127.0.0.1. By default
    // nothing at all is answered: not the INVITE, not an OPTIONS ping (what
    // svmap sends), not a malformed message.
    let cfg = config("", "10.0.0.0/8");
    let mut sb = switchboard(&cfg, &mut rng);
    for msg in [&invite, &options, &garbage] {
        let d = dispatch(&mut sb, now, msg, &mut rng);
        assert!(matches!(d, Dispatch::Drop("unknown source")), "{d:?}");
    }

    // `unknown_source = "reject"` (either spelling): 403 to the INVITE (with a
    // CDR) and to the OPTIONS.
    let cfg = config_with(
        "[profile.security]\nunknown_source = \"reject\"",
        "10.0.0.0/8",
        "",
    );
    let mut sb = switchboard(&cfg, &mut rng);
    match dispatch(&mut sb, now, &options, &mut rng) {
        Dispatch::Reply { transmit, record } => {
            assert_eq!(status_of(&transmit.bytes), 403);
            assert!(record.is_none());
        }
        other => panic!("expected a 403, got {other:?}"),
    }
    let cfg = config("unknown_source = \"reject\"", "10.0.0.0/8");
    let mut sb = switchboard(&cfg, &mut rng);
    let d = dispatch(&mut sb, now, &invite, &mut rng);
    match d {
        Dispatch::Reply { transmit, record } => {
            assert_eq!(status_of(&transmit.bytes), 403);
            assert_eq!(transmit.dest.addr, PEER.parse::<SocketAddr>().unwrap());
            assert_eq!(record.expect("a CDR for the attempt").result_code, 403);
        }
        other => panic!("expected a 403, got {other:?}"),
    }
    assert_eq!(sb.ports.in_use(), 0);

    let cfg = config("unknown_source = \"drop\"", "10.0.0.0/8");
    let mut sb = switchboard(&cfg, &mut rng);
    let d = dispatch(&mut sb, now, &invite, &mut rng);
    assert!(matches!(d, Dispatch::Drop(_)), "{d:?}");
    // [profile.security] wins over the older [profile.sip] spelling.
    let cfg = config_with(
        "unknown_source = \"reject\"\n[profile.security]\nunknown_source = \"drop\"",
        "10.0.0.0/8",
        "",
    );
    let mut sb = switchboard(&cfg, &mut rng);
    let d = dispatch(&mut sb, now, &options, &mut rng);
    assert!(matches!(d, Dispatch::Drop(_)), "{d:?}");

    // The same INVITE from an allowed source is admitted.
    let cfg = config("", "127.0.0.0/8");
    let mut sb = switchboard(&cfg, &mut rng);
    let d = dispatch(&mut sb, now, &invite, &mut rng);
    assert!(matches!(d, Dispatch::NewCall(_)), "{d:?}");
}

/// A config whose trunk `carrier` has digest credentials: its `allow` does
/// not make its sources trusted.
fn digest_config(security: &str) -> Arc<sipbridge::config::Config> {
    config_with(
        &format!("[profile.security]\n{security}"),
        "127.0.0.0/8",
        "[trunk.digest]\nusername = \"u\"\npassword = \"pw-for-switchboard-tests\"\nrealm = \"r\"",
    )
}

#[test]
fn the_gate_rate_limits_untrusted_sources_before_parsing() {
    let mut rng = StdRng::seed_from_u64(3);
    let t0 = Instant::now();
    let cfg = digest_config("request_burst_per_source = 10\ncall_burst_per_source = 4");
    let mut sb = switchboard(&cfg, &mut rng);
    let ip = "127.0.0.9".parse().unwrap();
    let invites = (0..20)
        .filter(|_| sb.screen(t0, ip, b"INVITE sip:x SIP/2.0").is_ok())
        .count();
    assert_eq!(invites, 4, "the INVITE bucket");
    let others = (0..20)
        .filter(|_| sb.screen(t0, ip, b"OPTIONS sip:x SIP/2.0").is_ok())
        .count();
    assert_eq!(others, 6, "the message bucket (4 INVITEs took 4 of 10)");
    // The refill: 50 messages and 5 INVITEs a second by default.
    let t1 = t0 + Duration::from_millis(200);
    assert!(sb.screen(t1, ip, b"INVITE sip:x SIP/2.0").is_ok());
    assert!(sb.screen(t1, ip, b"INVITE sip:x SIP/2.0").is_err());

    // A trunk identified by address alone is trusted: never limited.
    let cfg = config("", "127.0.0.0/8");
    let mut sb = switchboard(&cfg, &mut rng);
    for _ in 0..1000 {
        assert!(sb.screen(t0, ip, b"INVITE sip:x SIP/2.0").is_ok());
    }
}

#[test]
fn scanners_and_malformed_floods_are_banned_but_never_a_trunk_address() {
    let mut rng = StdRng::seed_from_u64(4);
    let t0 = Instant::now();
    let cfg = digest_config("malformed_ban_after = 3\nban_s = 30");
    let mut sb = switchboard(&cfg, &mut rng);
    let peer_ip = PEER.parse::<SocketAddr>().unwrap().ip();

    // A scanner's User-Agent: dropped and banned.
    let mut scan = String::from_utf8(request("OPTIONS", "s1", 1, None, "")).unwrap();
    scan = scan.replace(
        "Max-Forwards: 70\r\n",
        "Max-Forwards: 70\r\nUser-Agent: friendly-scanner\r\n",
    );
    let d = dispatch(&mut sb, t0, scan.as_bytes(), &mut rng);
    assert!(matches!(d, Dispatch::Drop("scanner")), "{d:?}");
    assert!(sb.screen(t0, peer_ip, b"OPTIONS sip:x SIP/2.0").is_err());
    let bans = sb.bans_in_force(t0, 10);
    assert_eq!(bans.len(), 1);
    assert_eq!(bans[0].reason.as_str(), "scanner");
    assert_eq!(bans[0].remaining, Duration::from_secs(30));
    // The ban expires.
    let later = t0 + Duration::from_secs(31);
    assert!(sb.screen(later, peer_ip, b"OPTIONS sip:x SIP/2.0").is_ok());

    // Three malformed messages: the third bans.
    let garbage = b"NOT SIP AT ALL\r\n\r\n";
    for i in 0..3 {
        let d = dispatch(&mut sb, later, garbage, &mut rng);
        if i < 2 {
            assert!(
                !matches!(d, Dispatch::Drop("malformed: source banned")),
                "{d:?}"
            );
        } else {
            assert!(
                matches!(d, Dispatch::Drop("malformed: source banned")),
                "{d:?}"
            );
        }
    }
    assert!(sb.screen(later, peer_ip, b"OPTIONS sip:x SIP/2.0").is_err());
    assert_eq!(sb.security_counts().bans[1].1, 1, "one malformed ban");

    // A trunk address (a trunk without digest allows it): never banned.
    let cfg = config("", "127.0.0.0/8");
    let mut sb = switchboard(&cfg, &mut rng);
    let d = dispatch(&mut sb, t0, scan.as_bytes(), &mut rng);
    assert!(!matches!(d, Dispatch::Drop(_)), "{d:?}");
    for _ in 0..100 {
        let _ = dispatch(&mut sb, t0, garbage, &mut rng);
    }
    assert!(sb.screen(t0, peer_ip, b"OPTIONS sip:x SIP/2.0").is_ok());
    assert!(sb.bans_in_force(t0, 10).is_empty());
}

/// The daemon loads each tenant's prompt once at start; early media needs it.
fn load_prompts(sb: &mut Switchboard) {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/sip-profiles/prompts/disclosure.wav"
    );
    let prompt = sipbridge::media::prompt::Prompt::load(path).unwrap();
    sb.set_prompts(
        [("demo".to_owned(), Arc::new(prompt))]
            .into_iter()
            .collect(),
    );
}

/// Dispatches one datagram from [`peer`] (no call exists yet).
fn dispatch(sb: &mut Switchboard, now: Instant, bytes: &[u8], rng: &mut StdRng) -> Dispatch {
    sb.dispatch(
        now,
        SystemTime::now(),
        bytes,
        parse_datagram(bytes),
        peer(),
        |_| false,
        rng,
    )
}

/// Dispatches an INVITE that must be admitted and starts its `Call`, as the
/// daemon does.
fn start_call(sb: &mut Switchboard, t0: Instant, invite: &[u8], rng: &mut StdRng) -> Call {
    let Dispatch::NewCall(admitted) = dispatch(sb, t0, invite, rng) else {
        panic!("not admitted")
    };
    Call::new(
        t0,
        SystemTime::now(),
        admitted.invite,
        admitted.peer,
        admitted.settings,
        rng,
    )
    .unwrap()
}

fn transmits(call: &mut Call) -> (Vec<Vec<u8>>, Vec<CallEvent>) {
    let mut bytes = Vec::new();
    let mut events = Vec::new();
    while let Some(o) = call.poll_output() {
        match o {
            CallOutput::Transmit(t) => bytes.push(t.bytes.to_vec()),
            CallOutput::Event(e) => events.push(e),
        }
    }
    (bytes, events)
}

/// The 200 OK among the call's outputs so far (the answer to its INVITE).
fn the_200(call: &mut Call) -> sipbridge::sip::message::Response {
    let (sent, _) = transmits(call);
    let ok = sent.iter().find(|b| status_of(b) == 200).expect("200 OK");
    let Ok(Message::Response(ok)) = parse_datagram(ok) else {
        panic!()
    };
    ok
}

#[test]
fn update_with_hold_offer_is_answered_and_the_call_stays_up() {
    let mut rng = StdRng::seed_from_u64(2);
    let t0 = Instant::now();
    let cfg = config("", "127.0.0.0/8");
    let mut sb = switchboard(&cfg, &mut rng);
    let invite = request("INVITE", "i1", 1, None, &sdp("sendrecv"));
    let mut call = start_call(&mut sb, t0, &invite, &mut rng);
    let ok = the_200(&mut call);
    let tag = ok.to().unwrap().tag().unwrap().to_owned();

    // ACK, then an UPDATE putting us on hold.
    let ack = request("ACK", "a1", 1, Some(&tag), "");
    let Ok(Message::Request(ack)) = parse_datagram(&ack) else {
        panic!()
    };
    call.handle_request(t0 + Duration::from_millis(10), ack, &mut rng);
    let update = request("UPDATE", "u2", 2, Some(&tag), &sdp("sendonly"));
    let Ok(Message::Request(update)) = parse_datagram(&update) else {
        panic!()
    };
    call.handle_request(t0 + Duration::from_secs(1), update, &mut rng);
    let (sent, events) = transmits(&mut call);
    assert_eq!(sent.len(), 1, "one 200 to the UPDATE");
    let Ok(Message::Response(resp)) = parse_datagram(&sent[0]) else {
        panic!()
    };
    assert_eq!(resp.status, 200);
    assert_eq!(resp.cseq().unwrap().method.as_str(), "UPDATE");
    let body = String::from_utf8_lossy(&resp.body);
    assert!(
        body.contains("a=recvonly"),
        "hold answered recvonly:\n{body}"
    );
    assert!(
        events.iter().any(
            |e| matches!(e, CallEvent::MediaChanged(n) if n.remote_direction == Direction::SendOnly)
        ),
        "{events:?}"
    );
    assert!(!call.is_ended(), "an UPDATE never ends the call");

    // A retransmitted UPDATE gets the same bytes and changes nothing.
    let again = request("UPDATE", "u2", 2, Some(&tag), &sdp("sendonly"));
    let Ok(Message::Request(again)) = parse_datagram(&again) else {
        panic!()
    };
    call.handle_request(t0 + Duration::from_millis(1500), again, &mut rng);
    let (resent, events) = transmits(&mut call);
    assert_eq!(resent, sent);
    assert!(events.is_empty(), "{events:?}");
    // On hold, the RTP timeout does not run: the call is still up a minute later.
    call.handle_timeout(t0 + Duration::from_secs(60), &mut rng);
    assert!(!call.is_ended());
}

/// A call that answered a delayed offer (an INVITE without SDP) with its own
/// offer, and got an ACK without a usable answer, cannot carry media: it says
/// BYE as that ACK is handled, not at whatever timer fires next (its
/// `poll_timeout` announced nothing for it).
#[test]
fn an_ack_without_a_usable_answer_is_hung_up_at_once() {
    let mut rng = StdRng::seed_from_u64(21);
    let t0 = Instant::now();
    let cfg = config("", "127.0.0.0/8");
    let mut sb = switchboard(&cfg, &mut rng);
    let invite = request("INVITE", "i1", 1, None, "");
    let mut call = start_call(&mut sb, t0, &invite, &mut rng);
    let ok = the_200(&mut call);
    assert!(
        String::from_utf8_lossy(&ok.body).contains("m=audio"),
        "our offer in the 200"
    );
    let tag = ok.to().unwrap().tag().unwrap().to_owned();
    let ack = request("ACK", "a1", 1, Some(&tag), "");
    let Ok(Message::Request(ack)) = parse_datagram(&ack) else {
        panic!()
    };
    let at = t0 + Duration::from_millis(10);
    call.handle_request(at, ack, &mut rng);
    let (sent, _) = transmits(&mut call);
    let bye = sent
        .iter()
        .filter_map(|b| match parse_datagram(b) {
            Ok(Message::Request(r)) => Some(r),
            _ => None,
        })
        .find(|r| r.method.as_str() == "BYE");
    assert!(
        bye.is_some(),
        "a BYE right after the ACK: {} sent",
        sent.len()
    );
    assert!(call.is_ended());
}

#[test]
fn early_media_sends_183_with_sdp_and_answers_when_the_prompt_ends() {
    let mut rng = StdRng::seed_from_u64(3);
    let t0 = Instant::now();
    let cfg = config_with("", "127.0.0.0/8", "early_media = true");
    let mut sb = switchboard(&cfg, &mut rng);
    load_prompts(&mut sb);
    let invite = request("INVITE", "e1", 1, None, &sdp("sendrecv"));
    let mut call = start_call(&mut sb, t0, &invite, &mut rng);
    let (sent, events) = transmits(&mut call);
    let statuses: Vec<u16> = sent.iter().map(|b| status_of(b)).collect();
    assert_eq!(statuses, vec![100, 183], "no 180, no 200 yet");
    let Ok(Message::Response(progress)) = parse_datagram(&sent[1]) else {
        panic!()
    };
    assert!(
        progress.body.starts_with(b"v=0"),
        "183 carries the SDP answer"
    );
    assert!(
        matches!(events.as_slice(), [CallEvent::EarlyMedia(_)]),
        "{events:?}"
    );
    // Time passes (the prompt plays): still no answer.
    call.handle_timeout(t0 + Duration::from_secs(3), &mut rng);
    let (sent, _) = transmits(&mut call);
    assert!(
        sent.iter().all(|b| status_of(b) != 200),
        "answered too early"
    );
    // The media reports the end of the prompt: 200 with the same SDP.
    call.prompt_finished(t0 + Duration::from_millis(4440));
    let (sent, events) = transmits(&mut call);
    let ok = sent
        .iter()
        .find(|b| status_of(b) == 200)
        .expect("200 after the prompt");
    let Ok(Message::Response(ok)) = parse_datagram(ok) else {
        panic!()
    };
    assert_eq!(
        ok.body, progress.body,
        "RFC 3960: the 200 repeats the 183's answer"
    );
    assert!(
        events.iter().any(|e| matches!(e, CallEvent::Answered(_))),
        "{events:?}"
    );
}

#[test]
fn cancel_during_early_media_gets_487() {
    let mut rng = StdRng::seed_from_u64(4);
    let t0 = Instant::now();
    let cfg = config_with("", "127.0.0.0/8", "early_media = true");
    let mut sb = switchboard(&cfg, &mut rng);
    load_prompts(&mut sb);
    let invite = request("INVITE", "e2", 1, None, &sdp("sendrecv"));
    let mut call = start_call(&mut sb, t0, &invite, &mut rng);
    transmits(&mut call);
    let cancel = request("CANCEL", "e2", 1, None, "");
    let Ok(Message::Request(cancel)) = parse_datagram(&cancel) else {
        panic!()
    };
    call.handle_request(t0 + Duration::from_secs(2), cancel, &mut rng);
    let (sent, events) = transmits(&mut call);
    let statuses: Vec<u16> = sent.iter().map(|b| status_of(b)).collect();
    assert_eq!(statuses, vec![200, 487]);
    assert!(
        events.iter().any(
            |e| matches!(e, CallEvent::Ended(r) if r.result_code == 487 && r.cause == "cancelled")
        ),
        "{events:?}"
    );
}

/// We are the session refresher; the caller answers our refreshing re-INVITE
/// with 491: our ACK for it carries the re-INVITE's own Via branch (it belongs
/// to that INVITE transaction, RFC 3261 §17.1.1.3), and the call stays up.
#[test]
fn ack_for_a_non_2xx_to_our_refresh_uses_our_branch() {
    let mut rng = StdRng::seed_from_u64(5);
    let t0 = Instant::now();
    // No RTP flows in this test: switch the RTP timeout off.
    let cfg = config("[profile.media]\nrtp_timeout_s = 0", "127.0.0.0/8");
    let mut sb = switchboard(&cfg, &mut rng);
    let mut invite = String::from_utf8(request("INVITE", "r1", 1, None, &sdp("sendrecv"))).unwrap();
    invite = invite.replace(
        "Max-Forwards: 70\r\n",
        "Max-Forwards: 70\r\nSupported: timer\r\nSession-Expires: 90;refresher=uas\r\n",
    );
    let invite = invite.into_bytes();
    let mut call = start_call(&mut sb, t0, &invite, &mut rng);
    let ok = the_200(&mut call);
    assert_eq!(ok.headers.get("Session-Expires"), Some("90;refresher=uas"));
    let tag = ok.to().unwrap().tag().unwrap().to_owned();
    let ack = request("ACK", "a1", 1, Some(&tag), "");
    let Ok(Message::Request(ack)) = parse_datagram(&ack) else {
        panic!()
    };
    call.handle_request(t0, ack, &mut rng);
    transmits(&mut call);

    // Half the interval later we refresh.
    call.handle_timeout(t0 + Duration::from_secs(45), &mut rng);
    let (sent, _) = transmits(&mut call);
    let Ok(Message::Request(reinvite)) = parse_datagram(&sent[0]) else {
        panic!("expected our re-INVITE")
    };
    assert_eq!(reinvite.method.as_str(), "INVITE");
    let our_via = reinvite.top_via().unwrap();
    let our_branch = our_via.branch().unwrap().to_owned();
    assert!(our_branch.starts_with("z9hG4bK"));

    // The caller answers 491.
    let mut busy = sipbridge::sip::message::Response::for_request(&reinvite, 491);
    busy.headers.set(
        "To",
        format!("{};tag=caller", reinvite.headers.get("To").unwrap()),
    );
    call.handle_response(t0 + Duration::from_millis(45_050), busy, &mut rng);
    let (sent, _) = transmits(&mut call);
    let Ok(Message::Request(ack)) = parse_datagram(&sent[0]) else {
        panic!("expected our ACK")
    };
    assert_eq!(ack.method.as_str(), "ACK");
    assert_eq!(ack.top_via().unwrap().branch(), Some(our_branch.as_str()));
    assert_eq!(ack.cseq().unwrap().seq, reinvite.cseq().unwrap().seq);
    assert!(!call.is_ended());
}

/// RFC nits of issue 19: the OPTIONS 200 has a To tag; the 503 for a call whose RTP
/// port could not be bound has a To tag, `Retry-After` and a CDR, and frees the slot;
/// a 488 says why in a Warning.
#[test]
fn options_no_rtp_port_and_488_answers_are_complete() {
    let mut rng = StdRng::seed_from_u64(19);
    let now = Instant::now();
    let cfg = config("", "127.0.0.0/8");
    let mut sb = switchboard(&cfg, &mut rng);
    let to_tag = |bytes: &[u8]| match parse_datagram(bytes) {
        Ok(Message::Response(r)) => r.to().unwrap().tag().map(str::to_owned),
        other => panic!("not a response: {other:?}"),
    };

    let options = request("OPTIONS", "op1", 1, None, "");
    let Dispatch::Reply { transmit, .. } = dispatch(&mut sb, now, &options, &mut rng) else {
        panic!("no answer")
    };
    assert_eq!(status_of(&transmit.bytes), 200);
    assert!(
        to_tag(&transmit.bytes).is_some(),
        "OPTIONS 200 without a To tag"
    );

    let invite = request("INVITE", "in1", 1, None, &sdp("sendrecv"));
    let Dispatch::NewCall(admitted) = dispatch(&mut sb, now, &invite, &mut rng) else {
        panic!("not admitted")
    };
    assert_eq!(sb.active_calls(), 1);
    let (transmit, record) = sb.rtp_bind_failed(&admitted, SystemTime::now(), &mut rng);
    assert_eq!(status_of(&transmit.bytes), 503);
    assert!(to_tag(&transmit.bytes).is_some(), "503 without a To tag");
    let text = String::from_utf8_lossy(&transmit.bytes).into_owned();
    assert!(text.contains("\r\nRetry-After: 5\r\n"), "{text}");
    assert_eq!(
        (record.result_code, record.cause.as_str()),
        (503, "no-rtp-ports")
    );
    assert_eq!(record.tenant.as_deref(), Some("demo"));
    assert_eq!(sb.active_calls(), 0);
    assert_eq!(sb.ports.in_use(), 0);

    // An offer of G.729 only: 488 with a Warning.
    let g729 = sdp("sendrecv")
        .replace("RTP/AVP 0 101", "RTP/AVP 18")
        .replace("a=rtpmap:0 PCMU/8000\r\n", "a=rtpmap:18 G729/8000\r\n");
    let invite = request("INVITE", "in2", 1, None, &g729);
    let mut call = start_call(&mut sb, now, &invite, &mut rng);
    let mut answered = None;
    while let Some(out) = call.poll_output() {
        if let CallOutput::Transmit(t) = out
            && status_of(&t.bytes) == 488
        {
            answered = Some(String::from_utf8_lossy(&t.bytes).into_owned());
        }
    }
    let text = answered.expect("a 488");
    assert!(
        text.contains("\r\nWarning: 305 127.0.0.1 \"Incompatible media format\"\r\n"),
        "{text}"
    );
}

/// A call keeps the tenant it was admitted with: a reload between the admission and
/// the call's start (the daemon binds the RTP port in between, an await) does not
/// change its opt-out key or pipeline — `Admitted` carries the configuration.
#[test]
fn an_admitted_call_keeps_its_tenant_across_a_reload() {
    let mut rng = StdRng::seed_from_u64(12);
    let now = Instant::now();
    let before = config_with("", "127.0.0.0/8", "opt_out_key = \"9\"");
    let mut sb = switchboard(&before, &mut rng);
    let invite = request("INVITE", "r1", 1, None, &sdp("sendrecv"));
    let Dispatch::NewCall(admitted) = dispatch(&mut sb, now, &invite, &mut rng) else {
        panic!("not admitted");
    };
    let after = config_with("", "127.0.0.0/8", "opt_out_key = \"#\"");
    let settings = SwitchboardSettings::from_profile(
        &after.profiles[0],
        Some("127.0.0.1:5060".parse().unwrap()),
        None,
    );
    sb.reconfigure(Arc::clone(&after), settings, HashMap::new(), &mut rng);
    assert_eq!(sb.config().tenant("demo").unwrap().opt_out_key, Some('#'));
    assert_eq!(
        admitted.config.tenant("demo").unwrap().opt_out_key,
        Some('9')
    );
}

/// Issue 19: while the store cannot write, a recording tenant's new calls are answered
/// unrecorded (`on_store_failure = "answer-unrecorded"`, the default) or refused with
/// 503 (`"reject"`); a tenant that does not record is unaffected.
#[test]
fn store_that_cannot_write_fails_recording_tenants_closed() {
    use sipbridge::call::RecordingStatus;
    let now = Instant::now();
    let admitted = |tenant: &str, writable: bool, branch: &str| {
        let mut rng = StdRng::seed_from_u64(19);
        let cfg = config_with("", "127.0.0.0/8", tenant);
        let mut sb = switchboard(&cfg, &mut rng);
        sb.set_store_writable(writable);
        let invite = request("INVITE", branch, 1, None, &sdp("sendrecv"));
        dispatch(&mut sb, now, &invite, &mut rng)
    };
    let new_call = |d: Dispatch| match d {
        Dispatch::NewCall(a) => a,
        other => panic!("expected a call, got {other:?}"),
    };

    let a = new_call(admitted("recording = true", false, "s1"));
    assert!(!a.settings.plan.record, "answered unrecorded");
    assert!(a.settings.store_unavailable);
    let a = new_call(admitted("recording = true", true, "s2"));
    assert!(a.settings.plan.record && !a.settings.store_unavailable);
    let a = new_call(admitted("recording = false", false, "s3"));
    assert!(!a.settings.plan.record && !a.settings.store_unavailable);

    match admitted(
        "recording = true\non_store_failure = \"reject\"",
        false,
        "s4",
    ) {
        Dispatch::Reply { transmit, record } => {
            assert_eq!(status_of(&transmit.bytes), 503);
            let text = String::from_utf8_lossy(&transmit.bytes).into_owned();
            assert!(text.contains("\r\nRetry-After: 30\r\n"), "{text}");
            let record = record.expect("a CDR for the attempt");
            assert_eq!(record.cause, "store-unavailable");
            assert_eq!(record.recording, RecordingStatus::NotRecorded);
            assert!(!record.recording.recorded());
        }
        other => panic!("expected a 503, got {other:?}"),
    }
    let a = new_call(admitted(
        "recording = true\non_store_failure = \"reject\"",
        true,
        "s5",
    ));
    assert!(a.settings.plan.record);
}

// ---------------------------------------------------------------------------------------
// Trusted proxies (issue 16)
// ---------------------------------------------------------------------------------------

/// A config whose only trunk allows the carrier's 198.51.100.0/24, with 127.0.0.1 (the
/// test's [`peer`]) a trusted proxy when `proxy` is set; `unknown_source = "drop"`.
fn proxied_config(proxy: bool, extra_security: &str) -> Arc<sipbridge::config::Config> {
    let proxies = if proxy {
        "trusted_proxies = [\"127.0.0.1\"]"
    } else {
        ""
    };
    config_with(
        &format!("[profile.security]\nunknown_source = \"drop\"\n{proxies}\n{extra_security}"),
        "198.51.100.0/24",
        "",
    )
}

/// `msg` with `headers` (CRLF-terminated lines) added after its first line.
fn with_headers(msg: &[u8], headers: &str) -> Vec<u8> {
    let text = String::from_utf8(msg.to_vec()).unwrap();
    let (first, rest) = text.split_once("\r\n").unwrap();
    format!("{first}\r\n{headers}{rest}").into_bytes()
}

fn reply_status(d: &Dispatch) -> Option<u16> {
    match d {
        Dispatch::Reply { transmit, .. } => Some(status_of(&transmit.bytes)),
        _ => None,
    }
}

#[test]
fn a_trusted_proxy_gets_options_answers_that_say_whether_to_send_calls() {
    let mut rng = StdRng::seed_from_u64(16);
    let now = Instant::now();
    let options = request("OPTIONS", "p1", 1, None, "");
    // Not a trusted proxy, no trunk allows 127.0.0.1: silence (unknown_source = drop).
    let cfg = proxied_config(false, "");
    let mut sb = switchboard(&cfg, &mut rng);
    let d = dispatch(&mut sb, now, &options, &mut rng);
    assert!(matches!(d, Dispatch::Drop("unknown source")), "{d:?}");

    // A trusted proxy: 200 while serving.
    let cfg = proxied_config(true, "");
    let mut sb = switchboard(&cfg, &mut rng);
    assert_eq!(
        reply_status(&dispatch(&mut sb, now, &options, &mut rng)),
        Some(200)
    );
    // The global limit reached (max_calls = 10): 503 + Retry-After: 5, then 200 again.
    let calls: Vec<_> = (0..10)
        .map(|i| {
            let invite = request("INVITE", &format!("c{i}"), 1, None, &sdp("sendrecv"));
            let invite = String::from_utf8(invite)
                .unwrap()
                .replace("Call-ID: cs-1@", &format!("Call-ID: cs-limit-{i}@"));
            let invite = with_headers(invite.as_bytes(), "X-Src-IP: 198.51.100.7\r\n");
            match dispatch(&mut sb, now, &invite, &mut rng) {
                Dispatch::NewCall(a) => a,
                other => panic!("call {i} not admitted: {other:?}"),
            }
        })
        .collect();
    let d = dispatch(&mut sb, now, &options, &mut rng);
    assert_eq!(reply_status(&d), Some(503), "{d:?}");
    let Dispatch::Reply { transmit, .. } = &d else {
        unreachable!()
    };
    let text = String::from_utf8_lossy(&transmit.bytes).into_owned();
    assert!(text.contains("\r\nRetry-After: 5\r\n"), "{text}");
    sb.call_ended(&calls[0].settings);
    assert_eq!(
        reply_status(&dispatch(&mut sb, now, &options, &mut rng)),
        Some(200)
    );
    // Draining: 503 + Retry-After: 30.
    sb.start_draining();
    let d = dispatch(&mut sb, now, &options, &mut rng);
    let Dispatch::Reply { transmit, .. } = &d else {
        panic!("{d:?}")
    };
    assert_eq!(status_of(&transmit.bytes), 503);
    let text = String::from_utf8_lossy(&transmit.bytes).into_owned();
    assert!(text.contains("\r\nRetry-After: 30\r\n"), "{text}");
}

#[test]
fn a_trusted_proxys_source_header_picks_the_trunk_and_nobody_elses_does() {
    let mut rng = StdRng::seed_from_u64(17);
    let now = Instant::now();
    let invite = request("INVITE", "x1", 1, None, &sdp("sendrecv"));
    let carrier = with_headers(&invite, "X-Src-IP: 198.51.100.7\r\n");

    // From a trusted proxy, naming the carrier: admitted on the carrier's trunk.
    let cfg = proxied_config(true, "");
    let mut sb = switchboard(&cfg, &mut rng);
    match dispatch(&mut sb, now, &carrier, &mut rng) {
        Dispatch::NewCall(a) => {
            assert_eq!(a.settings.trunk, "carrier");
            // Responses still go to the proxy (the top Via).
            assert_eq!(a.peer.addr, PEER.parse::<SocketAddr>().unwrap());
        }
        other => panic!("not admitted: {other:?}"),
    }
    assert_eq!(sb.unconfirmed_from("198.51.100.7".parse().unwrap()), 1);
    assert_eq!(sb.unconfirmed_from("127.0.0.1".parse().unwrap()), 0);

    // The same header from a source that is not a trusted proxy is ignored: the packet's
    // source (no trunk) decides, and it is dropped unanswered.
    let cfg = proxied_config(false, "");
    let mut sb = switchboard(&cfg, &mut rng);
    let d = dispatch(&mut sb, now, &carrier, &mut rng);
    assert!(matches!(d, Dispatch::Drop("unknown source")), "{d:?}");
    // ... also with `unknown_source = "reject"`: 403, not the carrier's trunk.
    let cfg = config_with(
        "[profile.security]\nunknown_source = \"reject\"",
        "198.51.100.0/24",
        "",
    );
    let mut sb = switchboard(&cfg, &mut rng);
    assert_eq!(
        reply_status(&dispatch(&mut sb, now, &carrier, &mut rng)),
        Some(403)
    );

    // A proxy relaying a caller no trunk allows: 403 (never silence to the proxy, which
    // would retry on another node), with a CDR.
    let cfg = proxied_config(true, "");
    let mut sb = switchboard(&cfg, &mut rng);
    let stranger = with_headers(&invite, "X-Src-IP: 203.0.113.9\r\n");
    match dispatch(&mut sb, now, &stranger, &mut rng) {
        Dispatch::Reply { transmit, record } => {
            assert_eq!(status_of(&transmit.bytes), 403);
            assert_eq!(record.expect("a CDR").result_code, 403);
        }
        other => panic!("expected a 403, got {other:?}"),
    }
    // A caller's own header comes before the proxy's: the last one counts.
    let smuggled = with_headers(
        &request("INVITE", "x2", 1, None, &sdp("sendrecv")),
        "X-Src-IP: 198.51.100.7\r\nX-Src-IP: 203.0.113.9\r\n",
    );
    assert_eq!(
        reply_status(&dispatch(&mut sb, now, &smuggled, &mut rng)),
        Some(403)
    );
    // No header, or garbage in it: the proxy's own address, which no trunk allows.
    for (branch, extra) in [("x3", ""), ("x4", "X-Src-IP: 198.51.100.7.evil\r\n")] {
        let msg = with_headers(&request("INVITE", branch, 1, None, &sdp("sendrecv")), extra);
        assert_eq!(
            reply_status(&dispatch(&mut sb, now, &msg, &mut rng)),
            Some(403),
            "{extra}"
        );
    }
    // Another header name, IPv6 with a port in brackets.
    let cfg = config_with(
        "[profile.security]\ntrusted_proxies = [\"127.0.0.0/8\"]\n\
         trusted_proxy_source_header = \"X-Carrier-Addr\"",
        "2001:db8::/32",
        "",
    );
    let mut sb = switchboard(&cfg, &mut rng);
    let v6 = with_headers(
        &request("INVITE", "x5", 1, None, &sdp("sendrecv")),
        "X-Src-IP: 198.51.100.7\r\nx-carrier-addr: [2001:db8::5]:5060\r\n",
    );
    let d = dispatch(&mut sb, now, &v6, &mut rng);
    assert!(matches!(d, Dispatch::NewCall(_)), "{d:?}");
}

#[test]
fn a_trusted_proxy_is_never_rate_limited() {
    let mut rng = StdRng::seed_from_u64(18);
    let now = Instant::now();
    // Two INVITEs a second per source at most: the proxy carries many callers.
    let cfg = proxied_config(
        true,
        "calls_per_second_per_source = 1\ncall_burst_per_source = 2",
    );
    let mut sb = switchboard(&cfg, &mut rng);
    let passed = (0..50)
        .filter(|_| {
            sb.screen(now, "127.0.0.1".parse().unwrap(), b"INVITE sip:x SIP/2.0")
                .is_ok()
        })
        .count();
    assert_eq!(passed, 50);
    let passed = (0..50)
        .filter(|_| {
            sb.screen(now, "127.0.0.2".parse().unwrap(), b"INVITE sip:x SIP/2.0")
                .is_ok()
        })
        .count();
    assert_eq!(passed, 2);
}

fn parse_request(bytes: &[u8]) -> sipbridge::sip::message::Request {
    let Ok(Message::Request(req)) = parse_datagram(bytes) else {
        panic!("not a request")
    };
    req
}

/// Issue 17 item 5: an ended call whose transactions only absorb
/// retransmissions compacts to a small entry that answers them with the very
/// bytes the call would have sent, until Timer J/L runs out.
#[test]
fn an_ended_call_lingers_as_a_compact_entry_that_answers_like_the_call() {
    use sipbridge::call::linger::{LingerReply, LingerTable};
    let mut rng = StdRng::seed_from_u64(21);
    let t0 = Instant::now();
    let cfg = config("", "127.0.0.0/8");
    let mut sb = switchboard(&cfg, &mut rng);
    let invite = request("INVITE", "l1", 1, None, &sdp("sendrecv"));
    let mut call = start_call(&mut sb, t0, &invite, &mut rng);
    let ok = the_200(&mut call);
    let tag = ok.to().unwrap().tag().unwrap().to_owned();
    assert!(call.compact().is_none(), "a live call does not linger");
    call.handle_request(
        t0 + Duration::from_millis(10),
        parse_request(&request("ACK", "a1", 1, Some(&tag), "")),
        &mut rng,
    );
    let bye_at = t0 + Duration::from_secs(5);
    let bye = request("BYE", "b2", 2, Some(&tag), "");
    call.handle_request(bye_at, parse_request(&bye), &mut rng);
    let (sent, _) = transmits(&mut call);
    assert_eq!(sent.iter().map(|b| status_of(b)).collect::<Vec<_>>(), [200]);
    assert!(call.is_ended() && !call.is_finished());

    let lingering = call.compact().expect("only retransmissions are left");
    // Timer J (64·T1 on UDP) from the BYE's 200 is the last to run out.
    assert_eq!(lingering.until(), bye_at + Duration::from_secs(32));
    // The two responses it may resend (the INVITE's 200 with its SDP, the
    // BYE's 200), the Call-ID and two branches: about a kilobyte.
    assert!(
        lingering.heap_bytes() < 2048,
        "two responses and a few keys, not a call: {}",
        lingering.heap_bytes()
    );

    // The same input to the call and to its residue: the same bytes out.
    let later = bye_at + Duration::from_secs(2);
    let cases: [(&str, Vec<u8>); 3] = [
        ("BYE retransmission", bye.clone()),
        ("INVITE retransmission", invite.clone()),
        (
            "ACK retransmission",
            request("ACK", "a1", 1, Some(&tag), ""),
        ),
    ];
    for (what, bytes) in cases {
        call.handle_request(later, parse_request(&bytes), &mut rng);
        let (from_call, _) = transmits(&mut call);
        let from_residue = match lingering.on_message(&parse_datagram(&bytes).unwrap(), peer()) {
            LingerReply::Send(t) => {
                assert_eq!(t.dest, peer(), "{what}");
                vec![t.bytes.to_vec()]
            }
            LingerReply::Absorbed => Vec::new(),
        };
        assert_eq!(from_residue, from_call, "{what}");
    }
    // The BYE's 200 is resent byte for byte.
    let LingerReply::Send(again) = lingering.on_message(&parse_datagram(&bye).unwrap(), peer())
    else {
        panic!("BYE retransmission unanswered")
    };
    assert_eq!(status_of(&again.bytes), 200);
    // A new request in the ended dialog: 481, as once the call is gone.
    let options = request("OPTIONS", "o3", 3, Some(&tag), "");
    let LingerReply::Send(reply) = lingering.on_message(&parse_datagram(&options).unwrap(), peer())
    else {
        panic!("new request unanswered")
    };
    assert_eq!(status_of(&reply.bytes), 481);

    // The table forgets it when its time is up.
    let mut table = LingerTable::new(10);
    table.insert(bye_at, lingering);
    assert!(table.contains(later, "cs-1@127.0.0.1"));
    assert!(
        table
            .on_message(
                later,
                "cs-1@127.0.0.1",
                &parse_datagram(&bye).unwrap(),
                peer()
            )
            .is_some()
    );
    let expired = bye_at + Duration::from_secs(32);
    assert!(!table.contains(expired, "cs-1@127.0.0.1"));
    assert!(
        table
            .on_message(
                expired,
                "cs-1@127.0.0.1",
                &parse_datagram(&bye).unwrap(),
                peer()
            )
            .is_none()
    );
    assert!(table.is_empty(), "expired entries are dropped");
}

/// A call we hung up lingers only once our BYE has its answer: until then
/// the BYE still retransmits on its own.
#[test]
fn our_bye_must_be_answered_before_a_call_compacts() {
    let mut rng = StdRng::seed_from_u64(22);
    let t0 = Instant::now();
    let cfg = config("", "127.0.0.0/8");
    let mut sb = switchboard(&cfg, &mut rng);
    let invite = request("INVITE", "l2", 1, None, &sdp("sendrecv"));
    let mut call = start_call(&mut sb, t0, &invite, &mut rng);
    let ok = the_200(&mut call);
    let tag = ok.to().unwrap().tag().unwrap().to_owned();
    call.handle_request(
        t0 + Duration::from_millis(10),
        parse_request(&request("ACK", "a1", 1, Some(&tag), "")),
        &mut rng,
    );
    let hangup_at = t0 + Duration::from_secs(3);
    call.hang_up(
        hangup_at,
        sipbridge::call::HangupCause::MaxDuration,
        &mut rng,
    );
    let (sent, _) = transmits(&mut call);
    let our_bye = sent
        .iter()
        .find_map(|b| match parse_datagram(b) {
            Ok(Message::Request(r)) if r.method.as_str() == "BYE" => Some(r),
            _ => None,
        })
        .expect("our BYE");
    assert!(call.is_ended());
    assert!(call.compact().is_none(), "our BYE is still unanswered");
    // The caller's 200 to our BYE.
    let ok = sipbridge::sip::message::Response::for_request(&our_bye, 200);
    call.handle_response(hangup_at + Duration::from_millis(50), ok.clone(), &mut rng);
    transmits(&mut call);
    let lingering = call.compact().expect("answered: it may linger");
    // The INVITE's Timer L (64·T1 from the 200) outlasts Timer K (T4).
    assert_eq!(lingering.until(), t0 + Duration::from_secs(32));
    assert_eq!(
        lingering.on_message(&Message::Response(ok), peer()),
        sipbridge::call::linger::LingerReply::Absorbed,
        "retransmitted 200s to our BYE are absorbed"
    );
}
