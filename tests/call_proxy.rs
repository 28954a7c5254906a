//! Sans-IO tests of calls through a record-routing proxy: Record-Route copied
//! into the dialog-creating responses in order (RFC 3261 §12.1.1), and every
//! response sent where the request's own top Via and source say (RFC 3261
//! §18.2.2, RFC 3581) — not to where the INVITE came from.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use rand::SeedableRng;
use rand::rngs::StdRng;
use sipbridge::call::{
    Call, CallOutput, Dispatch, Peer, PortAllocator, Switchboard, SwitchboardSettings, Transmit,
    TransportKind,
};
use sipbridge::sip::message::{Message, Request, Response, parse_datagram};

fn config() -> Arc<sipbridge::config::Config> {
    config_with("")
}

/// The test profile; `tenant` is appended to the `demo` tenant.
fn config_with(tenant: &str) -> Arc<sipbridge::config::Config> {
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
tcp = ["127.0.0.1:5060"]
[profile.media]
rtp_timeout_s = 0
[[trunk]]
name = "carrier"
allow = ["127.0.0.0/8"]
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
    let settings = SwitchboardSettings::from_profile(&config.profiles[0], Some(local), Some(local));
    Switchboard::new(
        Arc::clone(config),
        settings,
        PortAllocator::new(40000, 40099),
        rng,
    )
}

fn udp(addr: &str) -> Peer {
    Peer {
        transport: TransportKind::Udp,
        addr: addr.parse().unwrap(),
        flow: 0,
    }
}

const SDP: &str = "v=0\r\no=c 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\n\
m=audio 30000 RTP/AVP 0\r\na=rtpmap:0 PCMU/8000\r\na=sendrecv\r\n";

struct Req<'a> {
    method: &'a str,
    branch: &'a str,
    cseq: u32,
    to_tag: Option<&'a str>,
    /// The top Via's sent-by and parameters after the branch.
    via: &'a str,
    extra: &'a str,
    body: &'a str,
}

fn request(r: &Req<'_>) -> Vec<u8> {
    let to_tag = r.to_tag.map(|t| format!(";tag={t}")).unwrap_or_default();
    let ctype = if r.body.is_empty() {
        ""
    } else {
        "Content-Type: application/sdp\r\n"
    };
    let (transport, via) = match r.via.strip_prefix("TCP ") {
        Some(v) => ("TCP", v),
        None => ("UDP", r.via),
    };
    let (sent_by, params) = via.split_once(';').unwrap_or((via, ""));
    let params = if params.is_empty() {
        String::new()
    } else {
        format!(";{params}")
    };
    format!(
        "{} sip:+15551230000@127.0.0.1:5060 SIP/2.0\r\n\
Via: SIP/2.0/{transport} {sent_by};branch=z9hG4bK{}{params}\r\n\
Max-Forwards: 70\r\n\
{}From: <sip:+15559870000@127.0.0.1>;tag=caller\r\n\
To: <sip:+15551230000@127.0.0.1>{to_tag}\r\n\
Call-ID: proxy-1@127.0.0.1\r\n\
CSeq: {} {}\r\n\
Contact: <sip:caller@127.0.0.1:5081>\r\n\
{ctype}Content-Length: {}\r\n\r\n{}",
        r.method,
        r.branch,
        r.extra,
        r.cseq,
        r.method,
        r.body.len(),
        r.body
    )
    .into_bytes()
}

/// Dispatches `bytes` from `from` as the daemon does (Via stamped with
/// received/rport); returns the request for a live call, or the reply.
fn dispatch(
    sb: &mut Switchboard,
    now: Instant,
    bytes: &[u8],
    from: Peer,
    has_call: bool,
    rng: &mut StdRng,
) -> Dispatch {
    sb.dispatch(
        now,
        SystemTime::now(),
        bytes,
        parse_datagram(bytes),
        from,
        |_| has_call,
        rng,
    )
}

fn to_call(d: Dispatch) -> Request {
    match d {
        Dispatch::ToCall(_, Message::Request(r)) => r,
        other => panic!("not for the call: {other:?}"),
    }
}

fn start_call(
    sb: &mut Switchboard,
    t0: Instant,
    invite: &[u8],
    from: Peer,
    rng: &mut StdRng,
) -> Call {
    let Dispatch::NewCall(admitted) = dispatch(sb, t0, invite, from, false, rng) else {
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

fn transmits(call: &mut Call) -> Vec<Transmit> {
    let mut out = Vec::new();
    while let Some(o) = call.poll_output() {
        if let CallOutput::Transmit(t) = o {
            out.push(t);
        }
    }
    out
}

fn response(t: &Transmit) -> Response {
    match parse_datagram(&t.bytes) {
        Ok(Message::Response(r)) => r,
        other => panic!("not a response: {other:?}"),
    }
}

fn record_routes(r: &Response) -> Vec<String> {
    r.headers
        .values("Record-Route")
        .map(str::to_owned)
        .collect()
}

const TWO_RR: &str = "Record-Route: <sip:127.0.0.1:5070;lr;ftag=caller>\r\n\
Record-Route: <sip:127.0.0.2:5071;lr>, <sip:proxy3.example.com;lr;transport=tcp>\r\n";

#[test]
fn record_route_is_copied_in_order_into_180_and_200_only() {
    let mut rng = StdRng::seed_from_u64(1);
    let t0 = Instant::now();
    let cfg = config();
    let mut sb = switchboard(&cfg, &mut rng);
    let proxy = udp("127.0.0.1:5070");
    let invite = request(&Req {
        method: "INVITE",
        branch: "i1",
        cseq: 1,
        to_tag: None,
        via: "127.0.0.1:5070",
        extra: TWO_RR,
        body: SDP,
    });
    let mut call = start_call(&mut sb, t0, &invite, proxy, &mut rng);
    let sent: Vec<Response> = transmits(&mut call).iter().map(response).collect();
    let statuses: Vec<u16> = sent.iter().map(|r| r.status).collect();
    assert_eq!(statuses, vec![100, 180, 200]);
    let want = vec![
        "<sip:127.0.0.1:5070;lr;ftag=caller>".to_owned(),
        "<sip:127.0.0.2:5071;lr>".to_owned(),
        "<sip:proxy3.example.com;lr;transport=tcp>".to_owned(),
    ];
    assert_eq!(record_routes(&sent[1]), want, "180");
    assert_eq!(record_routes(&sent[2]), want, "200");
    // The 200 still carries our Contact: the proxy routes the ACK to it.
    assert_eq!(
        sent[2].headers.get("Contact"),
        Some("<sip:sipbridge@127.0.0.1:5060>")
    );
    let tag = sent[2].to().unwrap().tag().unwrap().to_owned();

    // A re-INVITE inside the dialog creates nothing: its 200 has no Record-Route.
    let ack = request(&Req {
        method: "ACK",
        branch: "a1",
        cseq: 1,
        to_tag: Some(&tag),
        via: "127.0.0.1:5070",
        extra: "",
        body: "",
    });
    let ack = to_call(dispatch(&mut sb, t0, &ack, proxy, true, &mut rng));
    call.handle_request_from(t0, ack, proxy, &mut rng);
    let reinvite = request(&Req {
        method: "INVITE",
        branch: "r2",
        cseq: 2,
        to_tag: Some(&tag),
        via: "127.0.0.1:5070",
        extra: TWO_RR,
        body: SDP,
    });
    let reinvite = to_call(dispatch(&mut sb, t0, &reinvite, proxy, true, &mut rng));
    call.handle_request_from(t0 + Duration::from_secs(1), reinvite, proxy, &mut rng);
    let sent = transmits(&mut call);
    let ok = response(&sent[0]);
    assert_eq!(ok.status, 200);
    assert!(record_routes(&ok).is_empty(), "{ok:?}");
}

#[test]
fn early_media_183_carries_the_record_route_too() {
    let mut rng = StdRng::seed_from_u64(6);
    let t0 = Instant::now();
    let cfg = config_with("early_media = true");
    let mut sb = switchboard(&cfg, &mut rng);
    let prompt = sipbridge::media::prompt::Prompt::load(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/sip-profiles/prompts/disclosure.wav"
    ))
    .unwrap();
    sb.set_prompts(
        [("demo".to_owned(), Arc::new(prompt))]
            .into_iter()
            .collect(),
    );
    let invite = request(&Req {
        method: "INVITE",
        branch: "e6",
        cseq: 1,
        to_tag: None,
        via: "127.0.0.1:5070",
        extra: TWO_RR,
        body: SDP,
    });
    let mut call = start_call(&mut sb, t0, &invite, udp("127.0.0.1:5070"), &mut rng);
    let sent: Vec<Response> = transmits(&mut call).iter().map(response).collect();
    assert_eq!(sent[1].status, 183);
    assert_eq!(record_routes(&sent[1]).len(), 3, "{:?}", sent[1]);
    call.prompt_finished(t0 + Duration::from_secs(5));
    let sent: Vec<Response> = transmits(&mut call).iter().map(response).collect();
    let ok = sent.iter().find(|r| r.status == 200).unwrap();
    assert_eq!(record_routes(ok).len(), 3);
}

#[test]
fn a_rejected_invite_gets_no_record_route() {
    let mut rng = StdRng::seed_from_u64(2);
    let t0 = Instant::now();
    let cfg = config();
    let mut sb = switchboard(&cfg, &mut rng);
    let proxy = udp("127.0.0.1:5070");
    // An offer with no common codec: 488, which creates no dialog.
    let bad = SDP
        .replace("RTP/AVP 0", "RTP/AVP 99")
        .replace("a=rtpmap:0 PCMU/8000", "a=rtpmap:99 foo/8000");
    let invite = request(&Req {
        method: "INVITE",
        branch: "i2",
        cseq: 1,
        to_tag: None,
        via: "127.0.0.1:5070",
        extra: TWO_RR,
        body: &bad,
    });
    let mut call = start_call(&mut sb, t0, &invite, proxy, &mut rng);
    let sent: Vec<Response> = transmits(&mut call).iter().map(response).collect();
    let last = sent.last().unwrap();
    assert_eq!(last.status, 488);
    assert!(record_routes(last).is_empty());
}

/// INVITE from port 5081, then ACK, re-INVITE and BYE from port 5082: each
/// response goes to its request's source (rport), never to 5081.
#[test]
fn in_dialog_responses_go_to_the_requests_own_source() {
    let mut rng = StdRng::seed_from_u64(3);
    let t0 = Instant::now();
    let cfg = config();
    let mut sb = switchboard(&cfg, &mut rng);
    let first = udp("127.0.0.1:5081");
    let second = udp("127.0.0.1:5082");
    let invite = request(&Req {
        method: "INVITE",
        branch: "i3",
        cseq: 1,
        to_tag: None,
        via: "127.0.0.1:5081;rport",
        extra: "",
        body: SDP,
    });
    let mut call = start_call(&mut sb, t0, &invite, first, &mut rng);
    let sent = transmits(&mut call);
    assert!(sent.iter().all(|t| t.dest == first), "{sent:?}");
    let tag = response(&sent[2]).to().unwrap().tag().unwrap().to_owned();

    let ack = request(&Req {
        method: "ACK",
        branch: "a3",
        cseq: 1,
        to_tag: Some(&tag),
        via: "127.0.0.1:5082;rport",
        extra: "",
        body: "",
    });
    let ack = to_call(dispatch(&mut sb, t0, &ack, second, true, &mut rng));
    call.handle_request_from(t0, ack, second, &mut rng);
    assert!(transmits(&mut call).is_empty());

    // Hold re-INVITE from the other port: its 200 goes there.
    let hold = request(&Req {
        method: "INVITE",
        branch: "r3",
        cseq: 2,
        to_tag: Some(&tag),
        via: "127.0.0.1:5082;rport",
        extra: "",
        body: &SDP.replace("sendrecv", "sendonly"),
    });
    let hold = to_call(dispatch(&mut sb, t0, &hold, second, true, &mut rng));
    let t1 = t0 + Duration::from_secs(1);
    call.handle_request_from(t1, hold, second, &mut rng);
    let sent = transmits(&mut call);
    assert_eq!(response(&sent[0]).status, 200);
    assert_eq!(sent[0].dest, second);
    // Its 2xx is retransmitted (no ACK yet) to the same place.
    call.handle_timeout(t1 + Duration::from_millis(600), &mut rng);
    let sent = transmits(&mut call);
    assert!(
        !sent.is_empty() && sent.iter().all(|t| t.dest == second),
        "{sent:?}"
    );
    let ack = request(&Req {
        method: "ACK",
        branch: "a4",
        cseq: 2,
        to_tag: Some(&tag),
        via: "127.0.0.1:5082;rport",
        extra: "",
        body: "",
    });
    let ack = to_call(dispatch(&mut sb, t1, &ack, second, true, &mut rng));
    call.handle_request_from(t1, ack, second, &mut rng);

    let bye_bytes = request(&Req {
        method: "BYE",
        branch: "b3",
        cseq: 3,
        to_tag: Some(&tag),
        via: "127.0.0.1:5082;rport",
        extra: "",
        body: "",
    });
    let bye = to_call(dispatch(&mut sb, t1, &bye_bytes, second, true, &mut rng));
    assert_eq!(
        bye.top_via().unwrap().params.get("rport"),
        Some(Some("5082"))
    );
    let t2 = t0 + Duration::from_secs(2);
    call.handle_request_from(t2, bye, second, &mut rng);
    let sent = transmits(&mut call);
    assert_eq!(sent.len(), 1, "{sent:?}");
    assert_eq!(response(&sent[0]).status, 200);
    assert_eq!(
        sent[0].dest, second,
        "the BYE's 200 goes to the BYE's source"
    );
    assert!(call.is_ended());
    // A retransmitted BYE gets the same answer, to the same place.
    let bye = to_call(dispatch(&mut sb, t2, &bye_bytes, second, true, &mut rng));
    call.handle_request_from(t2 + Duration::from_millis(500), bye, second, &mut rng);
    let again = transmits(&mut call);
    assert_eq!(again, sent);
}

/// Without rport, the response goes to the received address and the sent-by
/// port (RFC 3261 §18.2.2), not to the source port.
#[test]
fn without_rport_the_sent_by_port_is_used() {
    let mut rng = StdRng::seed_from_u64(4);
    let t0 = Instant::now();
    let cfg = config();
    let mut sb = switchboard(&cfg, &mut rng);
    // Sent from an ephemeral port, listening on 5090, advertised as a name.
    let from = udp("127.0.0.1:40123");
    let options = request(&Req {
        method: "OPTIONS",
        branch: "o1",
        cseq: 1,
        to_tag: None,
        via: "pbx.example.com:5090",
        extra: "",
        body: "",
    });
    match dispatch(&mut sb, t0, &options, from, false, &mut rng) {
        Dispatch::Reply { transmit, .. } => {
            assert_eq!(transmit.dest.addr, "127.0.0.1:5090".parse().unwrap());
            let r = response(&transmit);
            assert_eq!(r.top_via().unwrap().received(), Some("127.0.0.1"));
        }
        other => panic!("{other:?}"),
    }
    // An INVITE's responses (and a rejection's) follow the same rule.
    let invite = request(&Req {
        method: "INVITE",
        branch: "i4",
        cseq: 1,
        to_tag: None,
        via: "127.0.0.1:5090",
        extra: "",
        body: SDP,
    });
    let mut call = start_call(&mut sb, t0, &invite, from, &mut rng);
    let sent = transmits(&mut call);
    assert!(
        sent.iter()
            .all(|t| t.dest.addr == "127.0.0.1:5090".parse::<SocketAddr>().unwrap()),
        "{sent:?}"
    );
}

/// TCP: each response goes over the connection its request came on; the
/// address is the Via's (used only if that connection has closed).
#[test]
fn tcp_responses_use_the_requests_connection() {
    let mut rng = StdRng::seed_from_u64(5);
    let t0 = Instant::now();
    let cfg = config();
    let mut sb = switchboard(&cfg, &mut rng);
    let conn1 = Peer {
        transport: TransportKind::Tcp,
        addr: "127.0.0.1:40001".parse().unwrap(),
        flow: 1 << 32,
    };
    let conn2 = Peer {
        flow: (1 << 32) + 1,
        addr: "127.0.0.1:40002".parse().unwrap(),
        ..conn1
    };
    let invite = request(&Req {
        method: "INVITE",
        branch: "i5",
        cseq: 1,
        to_tag: None,
        via: "TCP 127.0.0.1:5081;rport",
        extra: TWO_RR,
        body: SDP,
    });
    let mut call = start_call(&mut sb, t0, &invite, conn1, &mut rng);
    let sent = transmits(&mut call);
    assert!(sent.iter().all(|t| t.dest == conn1), "{sent:?}");
    let ok = response(&sent[2]);
    assert_eq!(
        ok.headers.get("Contact"),
        Some("<sip:sipbridge@127.0.0.1:5060;transport=tcp>"),
        "the Contact names the transport the INVITE came on"
    );
    assert_eq!(record_routes(&ok).len(), 3);
    let tag = ok.to().unwrap().tag().unwrap().to_owned();
    // BYE over a second connection: its 200 goes over that one.
    let bye = request(&Req {
        method: "BYE",
        branch: "b5",
        cseq: 2,
        to_tag: Some(&tag),
        via: "TCP 127.0.0.1:5081",
        extra: "",
        body: "",
    });
    let bye = to_call(dispatch(&mut sb, t0, &bye, conn2, true, &mut rng));
    call.handle_request_from(t0 + Duration::from_secs(1), bye, conn2, &mut rng);
    let sent = transmits(&mut call);
    assert_eq!(response(&sent[0]).status, 200);
    assert_eq!(sent[0].dest.flow, conn2.flow);
    assert_eq!(sent[0].dest.transport, TransportKind::Tcp);
    // No rport: a new connection would go to the sent-by port.
    assert_eq!(sent[0].dest.addr, "127.0.0.1:5081".parse().unwrap());
}
