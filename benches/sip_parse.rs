//! Criterion benchmarks for the SIP message layer: parse a typical carrier INVITE with
//! SDP, validate it, and build + encode the 200 for it.

use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};
use sipbridge::sip::message::{Message, Request, Response, parse_datagram, validate_request};

const SDP: &str = "v=0\r\n\
o=root 1804289383 1804289383 IN IP4 54.172.60.1\r\n\
s=Twilio Media Gateway\r\n\
c=IN IP4 168.86.128.10\r\n\
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
        "INVITE sip:+15551230000@bridge.example.com:5060;transport=udp SIP/2.0\r\n\
Via: SIP/2.0/UDP 54.172.60.1:5060;branch=z9hG4bK0f3c.8e1a7b2c4d5e6f70;rport\r\n\
Max-Forwards: 69\r\n\
From: \"+15559870000\" <sip:+15559870000@54.172.60.1>;tag=38719423_6772d868_0c7e1b5e\r\n\
To: <sip:+15551230000@bridge.example.com>\r\n\
Call-ID: 5d2f9e8c0a7b4e1f9a3c6d8e0f1a2b3c@0.0.0.0\r\n\
CSeq: 1 INVITE\r\n\
Contact: <sip:+15559870000@54.172.60.1:5060;transport=udp>\r\n\
Allow: INVITE, ACK, CANCEL, OPTIONS, BYE, UPDATE\r\n\
Supported: timer\r\n\
Session-Expires: 1800;refresher=uac\r\n\
Min-SE: 90\r\n\
P-Asserted-Identity: <sip:+15559870000@54.172.60.1>\r\n\
X-Twilio-AccountSid: AC0123456789abcdef0123456789abcdef\r\n\
X-Twilio-CallSid: CA0123456789abcdef0123456789abcdef\r\n\
User-Agent: Twilio Gateway\r\n\
Content-Type: application/sdp\r\n\
Content-Length: {}\r\n\r\n",
        SDP.len()
    );
    let mut v = head.into_bytes();
    v.extend_from_slice(SDP.as_bytes());
    v
}

fn parse_request(raw: &[u8]) -> Request {
    match parse_datagram(raw) {
        Ok(Message::Request(r)) => r,
        other => panic!("benchmark INVITE does not parse: {other:?}"),
    }
}

fn benches(c: &mut Criterion) {
    let raw = carrier_invite();
    c.bench_function("parse_invite_with_sdp", |b| {
        b.iter(|| parse_datagram(black_box(&raw)))
    });
    c.bench_function("parse_validate_invite", |b| {
        b.iter(|| {
            let r = parse_request(black_box(&raw));
            validate_request(&r).map(|()| r)
        })
    });
    let req = parse_request(&raw);
    c.bench_function("build_encode_200", |b| {
        b.iter(|| {
            let mut resp = Response::for_request(black_box(&req), 200);
            resp.headers
                .push("Contact", "<sip:bridge@203.0.113.5:5060>");
            resp.headers.push("Content-Type", "application/sdp");
            resp.body = bytes::Bytes::from_static(SDP.as_bytes());
            resp.encode()
        })
    });
    c.bench_function("parse_validate_respond", |b| {
        b.iter(|| {
            let r = parse_request(black_box(&raw));
            let _ = validate_request(&r);
            Response::for_request(&r, 200).encode()
        })
    });
}

criterion_group!(sip_parse, benches);
criterion_main!(sip_parse);
