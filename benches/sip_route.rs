//! Criterion benchmark of the whole sans-IO answer path for one carrier INVITE:
//! parse → switchboard (trunk by source, route, limits, RTP port) → `Call::new`
//! (100 Trying, 180 Ringing, SDP answer, 200 OK encoded) — everything the
//! daemon does for an INVITE except the socket calls. Each iteration frees the
//! call's slot and port again, so the state stays the same.

use std::hint::black_box;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use criterion::{Criterion, criterion_group, criterion_main};
use rand::SeedableRng;
use rand::rngs::StdRng;
use sipbridge::call::{
    Call, CallOutput, Dispatch, Peer, PortAllocator, Switchboard, SwitchboardSettings,
    TransportKind,
};
use sipbridge::sip::message::parse_datagram;

const SDP: &str = "v=0\r\n\
o=root 1804289383 1804289383 IN IP4 127.0.0.2\r\n\
s=Twilio Media Gateway\r\n\
c=IN IP4 127.0.0.2\r\n\
t=0 0\r\n\
m=audio 16384 RTP/AVP 0 8 101\r\n\
a=rtpmap:0 PCMU/8000\r\n\
a=rtpmap:8 PCMA/8000\r\n\
a=rtpmap:101 telephone-event/8000\r\n\
a=fmtp:101 0-16\r\n\
a=ptime:20\r\n\
a=sendrecv\r\n";

fn carrier_invite() -> Vec<u8> {
    let head = format!(
        "INVITE sip:+15551230000@127.0.0.1:5060 SIP/2.0\r\n\
Via: SIP/2.0/UDP 127.0.0.2:5060;branch=z9hG4bK0f3c.8e1a7b2c4d5e6f70;rport\r\n\
Max-Forwards: 69\r\n\
From: \"+15559870000\" <sip:+15559870000@127.0.0.2>;tag=38719423_6772d868\r\n\
To: <sip:+15551230000@127.0.0.1>\r\n\
Call-ID: 5d2f9e8c0a7b4e1f9a3c6d8e0f1a2b3c@127.0.0.2\r\n\
CSeq: 1 INVITE\r\n\
Contact: <sip:+15559870000@127.0.0.2:5060>\r\n\
Allow: INVITE, ACK, CANCEL, OPTIONS, BYE, UPDATE\r\n\
Supported: timer\r\n\
Session-Expires: 1800;refresher=uac\r\n\
Content-Type: application/sdp\r\n\
Content-Length: {}\r\n\r\n",
        SDP.len()
    );
    let mut v = head.into_bytes();
    v.extend_from_slice(SDP.as_bytes());
    v
}

fn benches(c: &mut Criterion) {
    let profile = concat!(env!("CARGO_MANIFEST_DIR"), "/sip-profiles/default.toml");
    let config = match sipbridge::config::load(std::path::Path::new(profile)) {
        Ok(c) => Arc::new(c),
        Err(d) => panic!("default profile: {d}"),
    };
    let local: SocketAddr = "127.0.0.1:5060".parse().unwrap_or_else(|_| unreachable!());
    let settings = SwitchboardSettings::from_profile(&config.profiles[0], Some(local), Some(local));
    let mut rng = StdRng::seed_from_u64(7);
    let mut sb = Switchboard::new(
        Arc::clone(&config),
        settings,
        PortAllocator::new(20000, 20999),
        &mut rng,
    );
    let raw = carrier_invite();
    let peer = Peer {
        transport: TransportKind::Udp,
        addr: "127.0.0.2:5060".parse().unwrap_or_else(|_| unreachable!()),
        flow: 0,
    };
    c.bench_function("invite_parse_route_answer", |b| {
        b.iter(|| {
            let now = Instant::now();
            let parsed = parse_datagram(black_box(&raw));
            let Dispatch::NewCall(admitted) = sb.dispatch(
                now,
                SystemTime::now(),
                &raw,
                parsed,
                peer,
                |_| false,
                &mut rng,
            ) else {
                panic!("INVITE not admitted");
            };
            let settings = admitted.settings.clone();
            let mut call = Call::new(
                now,
                SystemTime::now(),
                admitted.invite,
                admitted.peer,
                admitted.settings,
                &mut rng,
            )
            .unwrap_or_else(|e| panic!("call: {e}"));
            let mut bytes = 0;
            while let Some(out) = call.poll_output() {
                if let CallOutput::Transmit(t) = out {
                    bytes += t.bytes.len();
                }
            }
            sb.call_ended(&settings);
            black_box(bytes)
        })
    });
}

criterion_group!(route, benches);
criterion_main!(route);
