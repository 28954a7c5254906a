#![allow(clippy::unwrap_used, clippy::expect_used)]
//! Hand-written torture messages for every parser case in issue 3, Build 1: valid ones
//! that must parse (with field checks), invalid ones with the expected status, print →
//! parse round trips, TCP framing, and "arbitrary bytes never panic".

use std::net::{Ipv4Addr, Ipv6Addr};

use proptest::prelude::*;
use sipbridge::sip::error::SipError;
use sipbridge::sip::message::{
    CSeq, Headers, Host, MAX_HEADER_LINE, MAX_HEADERS, MAX_MESSAGE_SIZE, Message, Method, NameAddr,
    Params, ParseError, Request, Response, Scheme, StreamDecoder, Uri, Via, error_response,
    parse_datagram, validate_request,
};

/// A valid INVITE with SDP as a carrier sends it; `{EXTRA}` is replaced by extra lines.
const INVITE: &str = "INVITE sip:+15551230000@bridge.example.com:5060 SIP/2.0\r\n\
Via: SIP/2.0/UDP 54.172.60.1:5060;branch=z9hG4bK-abc123;rport\r\n\
Max-Forwards: 69\r\n\
From: \"Alice, \\\"A\\\"\" <sip:+15559870000@carrier.example.net>;tag=from-1\r\n\
To: <sip:+15551230000@bridge.example.com>\r\n\
Call-ID: call-1@carrier\r\n\
CSeq: 101 INVITE\r\n\
Contact: <sip:+15559870000@54.172.60.1:5060;transport=udp>\r\n\
X-Twilio-CallSid: CA0123456789abcdef\r\n\
Content-Type: application/sdp\r\n\
Content-Length: 133\r\n\
\r\n\
v=0\r\n\
o=- 1 1 IN IP4 54.172.60.1\r\n\
s=-\r\n\
c=IN IP4 54.172.60.1\r\n\
t=0 0\r\n\
m=audio 10000 RTP/AVP 0 8 101\r\n\
a=rtpmap:101 telephone-event/8000\r\n";

fn parse_req(raw: &[u8]) -> Request {
    match parse_datagram(raw).unwrap() {
        Message::Request(r) => r,
        Message::Response(_) => panic!("response"),
    }
}

/// Status a UAS would answer with: parse error or validation error, 0 when accepted.
fn status_of(raw: &[u8]) -> u16 {
    match parse_datagram(raw) {
        Err(e) => SipError::from(e).status().0,
        Ok(Message::Request(r)) => validate_request(&r).map_or_else(|e| e.status().0, |()| 0),
        Ok(Message::Response(_)) => panic!("response"),
    }
}

/// A minimal valid OPTIONS with the given extra header lines (each ending in CRLF).
fn options(extra: &str) -> String {
    format!(
        "OPTIONS sip:bridge.example.com SIP/2.0\r\n\
         Via: SIP/2.0/UDP 192.0.2.1;branch=z9hG4bK1\r\n\
         From: <sip:a@example.com>;tag=1\r\n\
         To: <sip:b@example.com>\r\n\
         Call-ID: opt-1\r\n\
         CSeq: 1 OPTIONS\r\n\
         Max-Forwards: 70\r\n\
         {extra}Content-Length: 0\r\n\r\n"
    )
}

#[test]
fn carrier_invite_fields() {
    let r = parse_req(INVITE.as_bytes());
    assert_eq!(validate_request(&r), Ok(()));
    assert_eq!(r.method, Method::Invite);
    assert_eq!(r.uri.user_unescaped().as_deref(), Some("+15551230000"));
    assert_eq!(r.uri.port, Some(5060));
    let via = r.top_via().unwrap();
    assert_eq!(via.host, Host::V4(Ipv4Addr::new(54, 172, 60, 1)));
    assert_eq!(via.branch(), Some("z9hG4bK-abc123"));
    assert_eq!(via.rport(), Some(None));
    let from = r.from().unwrap();
    assert_eq!(from.display.as_deref(), Some("Alice, \"A\""));
    assert_eq!(from.tag(), Some("from-1"));
    assert_eq!(r.to().unwrap().tag(), None);
    assert_eq!(r.call_id().unwrap(), "call-1@carrier");
    assert_eq!(
        r.cseq().unwrap(),
        CSeq {
            seq: 101,
            method: Method::Invite
        }
    );
    assert_eq!(r.max_forwards().unwrap(), Some(69));
    assert_eq!(
        r.contacts().unwrap()[0].uri.params.get("transport"),
        Some(Some("udp"))
    );
    assert_eq!(
        r.headers.get("x-twilio-callsid"),
        Some("CA0123456789abcdef")
    );
    assert_eq!(r.body.len(), 133);
    assert!(r.body.starts_with(b"v=0\r\n"));
}

#[test]
fn compact_forms_equal_long_names() {
    let raw = "BYE sip:b@example.com SIP/2.0\r\n\
v: SIP/2.0/TCP h.example.com;branch=z9hG4bKc\r\n\
i: compact-call\r\n\
f: <sip:a@example.com>;tag=a\r\n\
t: <sip:b@example.com>;tag=b\r\n\
m: <sip:a@10.0.0.1>\r\n\
CSeq: 2 BYE\r\n\
c: application/sdp\r\n\
k: timer, 100rel\r\n\
s: hello\r\n\
o: refer\r\n\
e: identity\r\n\
x: 1800;refresher=uac\r\n\
u: talk\r\n\
r: <sip:c@example.com>\r\n\
b: <sip:a@example.com>\r\n\
l: 0\r\n\r\n";
    let r = parse_req(raw.as_bytes());
    let h = &r.headers;
    assert_eq!(r.top_via().unwrap().transport, "TCP");
    assert_eq!(r.call_id().unwrap(), "compact-call");
    assert_eq!(r.from().unwrap().tag(), Some("a"));
    assert_eq!(r.to().unwrap().tag(), Some("b"));
    assert_eq!(r.contacts().unwrap().len(), 1);
    assert_eq!(h.get("CONTENT-TYPE"), Some("application/sdp"));
    assert_eq!(
        h.values("Supported").collect::<Vec<_>>(),
        ["timer", "100rel"]
    );
    assert_eq!(h.get("Subject"), Some("hello"));
    assert_eq!(h.get("Event"), Some("refer"));
    assert_eq!(h.get("Content-Encoding"), Some("identity"));
    assert_eq!(h.get("Session-Expires"), Some("1800;refresher=uac"));
    assert_eq!(h.get("Allow-Events"), Some("talk"));
    assert_eq!(h.get("Refer-To"), Some("<sip:c@example.com>"));
    assert_eq!(h.get("Referred-By"), Some("<sip:a@example.com>"));
    assert_eq!(h.get("Content-Length"), Some("0"));
    // and the other way round: long name asked by its compact form
    let o = parse_req(options("").as_bytes());
    assert_eq!(o.headers.get("i"), Some("opt-1"));
    assert_eq!(o.headers.get("v"), o.headers.get("Via"));
    assert_eq!(validate_request(&r), Ok(()));
}

#[test]
fn folding_and_whitespace_everywhere() {
    let raw = concat!(
        "OPTIONS sip:b@example.com SIP/2.0\r\n",
        "Via   :   SIP / 2.0 / UDP\r\n",
        "\t  192.0.2.1:5062 ;  branch  =  z9hG4bKf ; rport\r\n",
        "From:\r\n",
        "  \"Bob\"\r\n",
        "  <sip:a@example.com>  ;  tag  =  x1\r\n",
        "To  :<sip:b@example.com>\r\n",
        "Call-ID:    fold-1   \r\n",
        "CSeq:\t7\r\n",
        " OPTIONS\r\n",
        "X-Long: one\r\n",
        " two\r\n",
        "\tthree\r\n",
        "Content-Length: 0\r\n\r\n",
    );
    let r = parse_req(raw.as_bytes());
    let v = r.top_via().unwrap();
    assert_eq!((v.transport.as_str(), v.port), ("UDP", Some(5062)));
    assert_eq!(v.branch(), Some("z9hG4bKf"));
    assert_eq!(v.rport(), Some(None));
    assert_eq!(validate_request(&r), Ok(()));
    let from = r.from().unwrap();
    assert_eq!(from.display.as_deref(), Some("Bob"));
    assert_eq!(from.tag(), Some("x1"));
    assert_eq!(r.call_id().unwrap(), "fold-1");
    assert_eq!(r.cseq().unwrap().seq, 7);
    assert_eq!(r.headers.get("x-long"), Some("one two three"));
}

#[test]
fn whitespace_around_separators_in_via() {
    let v = Via::parse("SIP / 2.0 / udp  192.0.2.1:5062 ;  branch  =  z9hG4bKf ; rport = 1234")
        .unwrap();
    assert_eq!(v.transport, "UDP");
    assert_eq!(v.port, Some(5062));
    assert_eq!(v.branch(), Some("z9hG4bKf"));
    assert_eq!(v.rport(), Some(Some(1234)));
    assert_eq!(
        v.to_string(),
        "SIP/2.0/UDP 192.0.2.1:5062;branch=z9hG4bKf;rport=1234"
    );
    // LWS inside host:port is not allowed
    assert!(Via::parse("SIP/2.0/UDP 192.0.2.1 : 5062").is_err());
    assert!(Via::parse("SIP/2.0/UDP").is_err());
    assert!(Via::parse("SIP/3.0/UDP h").is_err());
    assert!(Via::parse("SIP/2.0/UDP h;;branch=x").is_err());
}

#[test]
fn multi_value_via_and_contact_split() {
    let raw = options(
        "Via: SIP/2.0/UDP [2001:db8::1]:5060;branch=z9hG4bK2;received=[2001:db8::2], SIP/2.0/TCP p.example.com;branch=z9hG4bK3\r\n\
         Contact: \"Smith, J\" <sip:j@a.example.com;x=\"a,b\">;q=0.5, <sip:k@b.example.com?Subject=a%2Cb>,sip:l@c.example.com;expires=60\r\n",
    );
    let r = parse_req(raw.as_bytes());
    let vias = r.vias().unwrap();
    assert_eq!(vias.len(), 3);
    assert_eq!(vias[1].host, Host::V6("2001:db8::1".parse().unwrap()));
    assert_eq!(vias[1].received(), Some("[2001:db8::2]"));
    assert_eq!(vias[2].transport, "TCP");
    let c = r.contacts().unwrap();
    assert_eq!(c.len(), 3);
    assert_eq!(c[0].display.as_deref(), Some("Smith, J"));
    assert_eq!(c[0].uri.params.get("x"), Some(Some("\"a,b\"")));
    assert_eq!(c[0].params.get("q"), Some(Some("0.5")));
    assert_eq!(c[1].uri.headers.as_deref(), Some("Subject=a%2Cb"));
    assert_eq!(c[2].params.get("expires"), Some(Some("60")));
    assert_eq!(r.headers.values("Contact").count(), 3);
    assert_eq!(r.headers.get_all("Via").count(), 2);
    assert_eq!(validate_request(&r), Ok(()));
}

#[test]
fn quoted_strings_with_escapes() {
    let n = NameAddr::parse(r#""a \"quoted\" \\ name;<x>" <sip:q@example.com>;tag=t"#).unwrap();
    assert_eq!(n.display.as_deref(), Some(r#"a "quoted" \ name;<x>"#));
    assert_eq!(n.tag(), Some("t"));
    assert_eq!(
        n.to_string(),
        r#""a \"quoted\" \\ name;<x>" <sip:q@example.com>;tag=t"#
    );
    assert!(NameAddr::parse(r#""unterminated <sip:q@example.com>"#).is_err());
    assert!(NameAddr::parse(r#"Bell, Alexander <sip:q@example.com>"#).is_err());
    // quoted param value keeps its quotes and may contain ; and ,
    let n = NameAddr::parse(r#"<sip:q@example.com>;x="a;b,c";y"#).unwrap();
    assert_eq!(n.params.get("x"), Some(Some("\"a;b,c\"")));
    assert_eq!(n.params.get("y"), Some(None));
}

#[test]
fn ipv6_everywhere() {
    let u = Uri::parse("sips:alice@[2001:db8::7]:5061;transport=tls").unwrap();
    assert_eq!(u.scheme, Scheme::Sips);
    assert_eq!(
        u.host,
        Some(Host::V6(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 7)))
    );
    assert_eq!(u.port, Some(5061));
    assert_eq!(u.to_string(), "sips:alice@[2001:db8::7]:5061;transport=tls");
    assert!(Uri::parse("sip:2001:db8::10").is_err());
    assert!(Uri::parse("sip:[2001:db8::10").is_err());
    assert!(Uri::parse("sip:[::1]x").is_err());
    let v = Via::parse("SIP/2.0/TCP [::1]:5070;received=::2;branch=z9hG4bKx").unwrap();
    assert_eq!(v.host, Host::V6(Ipv6Addr::LOCALHOST));
    assert_eq!(v.received(), Some("::2"));
    assert_eq!(
        v.to_string(),
        "SIP/2.0/TCP [::1]:5070;received=::2;branch=z9hG4bKx"
    );
    assert_eq!(Host::V6(Ipv6Addr::LOCALHOST).to_string(), "[::1]");
}

#[test]
fn uri_schemes() {
    let t = Uri::parse("tel:+1-201-555-0123;phone-context=example.com").unwrap();
    assert_eq!(t.scheme, Scheme::Tel);
    assert_eq!(t.host, None);
    assert_eq!(t.user_unescaped().as_deref(), Some("+1-201-555-0123"));
    assert_eq!(t.params.get("phone-context"), Some(Some("example.com")));
    assert_eq!(
        t.to_string(),
        "tel:+1-201-555-0123;phone-context=example.com"
    );
    assert!(Uri::parse("tel:").is_err());
    assert!(Uri::parse("tel:12 34").is_err());
    let s = Uri::parse("SIP:Bob:secret@Example.COM:5070;lr;maddr=10.0.0.1?h=v&x=y").unwrap();
    assert_eq!(s.scheme, Scheme::Sip);
    assert_eq!(s.user.as_deref(), Some("Bob"));
    assert_eq!(s.password.as_deref(), Some("secret"));
    assert_eq!(s.host, Some(Host::Domain("Example.COM".into())));
    assert!(s.params.has("LR"));
    assert_eq!(s.headers.as_deref(), Some("h=v&x=y"));
    assert_eq!(
        s.to_string(),
        "sip:Bob:secret@Example.COM:5070;lr;maddr=10.0.0.1?h=v&x=y"
    );
    let h = Uri::parse("http://example.com/x").unwrap();
    assert_eq!(h.scheme, Scheme::Other("http".into()));
    assert_eq!(h.to_string(), "http://example.com/x");
    assert!(Uri::parse("sip:").is_err());
    assert!(Uri::parse("sip:a@").is_err());
    assert!(Uri::parse("sip:h:99999").is_err());
    assert!(Uri::parse("1sip:x").is_err());
    assert!(Uri::parse("<sip:x@y>").is_err());
}

#[test]
fn percent_escapes_kept_as_written() {
    let u = Uri::parse("sip:%61lice%20b@example.com").unwrap();
    assert_eq!(u.user.as_deref(), Some("%61lice%20b"));
    assert_eq!(u.user_unescaped().as_deref(), Some("alice b"));
    assert_eq!(u.to_string(), "sip:%61lice%20b@example.com");
    assert_ne!(u, Uri::parse("sip:alice%20b@example.com").unwrap());
    // a % that is not an escape stays literal
    assert_eq!(sipbridge::sip::message::unescape("100%"), "100%");
    assert_eq!(sipbridge::sip::message::unescape("%zz%4"), "%zz%4");
}

#[test]
fn unknown_headers_reemitted_verbatim_in_order() {
    let raw = options(
        "X-B: second ;; weird,,\r\nP-Asserted-Identity: <tel:+15550001111>\r\nX-A: first\r\n",
    );
    let r = parse_req(raw.as_bytes());
    let out = r.encode();
    assert_eq!(&out[..], raw.as_bytes());
}

#[test]
fn encode_exact_bytes_and_content_length_from_body() {
    let mut r = parse_req(options("").as_bytes());
    r.body = bytes::Bytes::from_static(b"hello");
    r.headers.set("Content-Type", "text/plain");
    let out = String::from_utf8(r.encode().to_vec()).unwrap();
    assert!(out.contains("\r\nContent-Length: 5\r\n"));
    assert!(out.ends_with("\r\n\r\nhello"));
    r.headers.remove("Content-Length");
    let out = String::from_utf8(r.encode().to_vec()).unwrap();
    assert!(out.ends_with("Content-Type: text/plain\r\nContent-Length: 5\r\n\r\nhello"));
}

#[test]
fn response_for_request_exact_bytes() {
    let r = parse_req(INVITE.as_bytes());
    let mut resp = Response::for_request(&r, 200);
    resp.headers
        .set("To", format!("{};tag=ours", r.headers.get("To").unwrap()));
    let want = "SIP/2.0 200 OK\r\n\
Via: SIP/2.0/UDP 54.172.60.1:5060;branch=z9hG4bK-abc123;rport\r\n\
From: \"Alice, \\\"A\\\"\" <sip:+15559870000@carrier.example.net>;tag=from-1\r\n\
To: <sip:+15551230000@bridge.example.com>;tag=ours\r\n\
Call-ID: call-1@carrier\r\n\
CSeq: 101 INVITE\r\n\
Content-Length: 0\r\n\r\n";
    assert_eq!(String::from_utf8(resp.encode().to_vec()).unwrap(), want);
    assert_eq!(Response::for_request(&r, 180).reason, "Ringing");
    assert_eq!(Response::for_request(&r, 487).reason, "Request Terminated");
    let e = Response::for_error(&r, &SipError::BadExtension(vec!["foo".into()]));
    assert_eq!((e.status, e.reason.as_str()), (420, "Bad Extension"));
    assert_eq!(e.headers.get("Unsupported"), Some("foo"));
}

#[test]
fn content_length_framing_on_udp() {
    // extra bytes after Content-Length are ignored
    let mut raw = options("").into_bytes();
    raw.extend_from_slice(b"garbage INVITE sip:x SIP/2.0\r\n");
    let r = parse_req(&raw);
    assert!(r.body.is_empty());
    // truncated body
    let raw = INVITE.replace("Content-Length: 133", "Content-Length: 134");
    assert_eq!(
        parse_datagram(raw.as_bytes()).unwrap_err(),
        ParseError::Truncated {
            expected: 134,
            available: 133
        }
    );
    assert_eq!(status_of(raw.as_bytes()), 400);
    // shorter Content-Length cuts the body
    let raw = INVITE.replace("Content-Length: 133", "Content-Length: 3");
    assert_eq!(&parse_req(raw.as_bytes()).body[..], b"v=0");
    // no Content-Length: body is the rest of the datagram
    let raw = INVITE.replace("Content-Length: 133\r\n", "");
    assert_eq!(parse_req(raw.as_bytes()).body.len(), 133);
    for bad in ["-1", "abc", "1 2", "", "99999999999", "+5", "0x10"] {
        let raw = options("").replace("Content-Length: 0", &format!("Content-Length: {bad}"));
        assert!(
            matches!(
                parse_datagram(raw.as_bytes()),
                Err(ParseError::ContentLength(_))
            ),
            "{bad:?}"
        );
        assert_eq!(status_of(raw.as_bytes()), 400);
    }
    let dup = options("l: 0\r\n");
    assert!(matches!(
        parse_datagram(dup.as_bytes()),
        Err(ParseError::ContentLength(_))
    ));
}

#[test]
fn size_limits() {
    let big = options(&format!("X-Pad: {}\r\n", "a".repeat(MAX_HEADER_LINE)));
    assert_eq!(
        parse_datagram(big.as_bytes()).unwrap_err(),
        ParseError::TooLarge(MAX_HEADER_LINE)
    );
    assert_eq!(status_of(big.as_bytes()), 513);
    // folding cannot sneak past the line limit
    let folded = options(&format!(
        "X-Pad: a\r\n{}",
        " bbbbbbbbbbbbbbbbbbbbbbbbbbbbbb\r\n".repeat(300)
    ));
    assert_eq!(
        parse_datagram(folded.as_bytes()).unwrap_err(),
        ParseError::TooLarge(MAX_HEADER_LINE)
    );
    let many = options(&"X-H: 1\r\n".repeat(MAX_HEADERS));
    assert_eq!(
        parse_datagram(many.as_bytes()).unwrap_err(),
        ParseError::TooLarge(MAX_HEADERS)
    );
    let ok = options(&"X-H: 1\r\n".repeat(MAX_HEADERS - 8));
    assert!(parse_datagram(ok.as_bytes()).is_ok());
    let mut huge = options("").into_bytes();
    huge.resize(MAX_MESSAGE_SIZE + 1, b'x');
    assert_eq!(
        parse_datagram(&huge).unwrap_err(),
        ParseError::TooLarge(MAX_MESSAGE_SIZE)
    );
}

#[test]
fn utf8_only_in_header_section() {
    let mut raw = options("X-Bad: \u{0}ok\r\n").into_bytes();
    let pos = raw.iter().position(|&b| b == 0).unwrap();
    raw[pos] = 0xff;
    assert_eq!(parse_datagram(&raw).unwrap_err(), ParseError::NotUtf8);
    assert_eq!(status_of(&raw), 400);
    // binary body is fine
    let mut raw = INVITE
        .replace("application/sdp", "application/octet-stream")
        .into_bytes();
    let len = raw.len();
    raw[len - 3] = 0xff;
    raw[len - 4] = 0x00;
    let r = parse_req(&raw);
    assert_eq!(r.body[r.body.len() - 3], 0xff);
}

#[test]
fn start_line_errors() {
    let cases: &[(&str, u16)] = &[
        ("OPTIONS sip:bridge.example.com SIP/3.0", 505),
        ("OPTIONS sip:bridge.example.com SIP/2.1", 505),
        ("OPTIONS sip:bridge.example.com HTTP/1.1", 400),
        ("OPTIONS <sip:bridge.example.com> SIP/2.0", 400),
        ("OPTIONS sip:bridge.example.com; lr SIP/2.0", 400),
        ("OPTIONS sip:bridge.example.com", 400),
        ("OPT(IONS sip:bridge.example.com SIP/2.0", 400),
        ("", 400),
    ];
    for (line, want) in cases {
        let raw = options("").replacen("OPTIONS sip:bridge.example.com SIP/2.0", line, 1);
        assert_eq!(status_of(raw.as_bytes()), *want, "{line:?}");
    }
    // liberal: extra SPs and a trailing SP
    let raw = options("").replacen(
        "OPTIONS sip:bridge.example.com SIP/2.0",
        "OPTIONS   sip:bridge.example.com \tSIP/2.0 ",
        1,
    );
    assert_eq!(status_of(raw.as_bytes()), 0);
    // responses
    let resp =
        |line: &str| parse_datagram(format!("{line}\r\nContent-Length: 0\r\n\r\n").as_bytes());
    assert!(
        matches!(resp("SIP/2.0 180 Ringing"), Ok(Message::Response(r)) if r.status == 180 && r.reason == "Ringing")
    );
    assert!(matches!(resp("SIP/2.0 200"), Ok(Message::Response(r)) if r.reason.is_empty()));
    assert!(resp("SIP/2.0 99 Low").is_err());
    assert!(resp("SIP/2.0 700 High").is_err());
    assert!(resp("SIP/2.0 2000 OK").is_err());
    assert!(matches!(
        resp("SIP/2.1 200 OK"),
        Err(ParseError::VersionNotSupported(_))
    ));
    assert_eq!(parse_datagram(b"\r\n\r\n").unwrap_err(), ParseError::Empty);
    assert_eq!(parse_datagram(b"").unwrap_err(), ParseError::Empty);
    assert_eq!(
        parse_datagram(b"OPTIONS sip:a SIP/2.0\r\nVia: x\r\n").unwrap_err(),
        ParseError::Unterminated
    );
}

#[test]
fn header_line_errors() {
    for bad in [
        "NoColonHere\r\n",
        "Bad Name: x\r\n",
        ": empty name\r\n",
        "X-Cr: a\rb\r\n",
    ] {
        let raw = options(bad);
        assert!(
            matches!(
                parse_datagram(raw.as_bytes()),
                Err(ParseError::HeaderLine(_))
            ),
            "{bad:?}"
        );
    }
    // continuation before the first header
    let raw = "OPTIONS sip:a SIP/2.0\r\n folded: x\r\n\r\n";
    assert!(matches!(
        parse_datagram(raw.as_bytes()),
        Err(ParseError::HeaderLine(_))
    ));
    // bare LF line ends are tolerated
    let lf = options("").replace("\r\n", "\n");
    assert_eq!(status_of(lf.as_bytes()), 0);
    // leading CRLFs before the start line are skipped
    let lead = format!("\r\n\r\n{}", options(""));
    assert_eq!(status_of(lead.as_bytes()), 0);
}

#[test]
fn semantic_errors_get_the_right_status() {
    let base = options("");
    let cases: Vec<(String, u16)> = vec![
        (
            base.replace("Via: SIP/2.0/UDP 192.0.2.1;branch=z9hG4bK1\r\n", ""),
            400,
        ),
        (base.replace("From: <sip:a@example.com>;tag=1\r\n", ""), 400),
        (base.replace("To: <sip:b@example.com>\r\n", ""), 400),
        (base.replace("Call-ID: opt-1\r\n", ""), 400),
        (base.replace("CSeq: 1 OPTIONS\r\n", ""), 400),
        (options("To: <sip:c@example.com>\r\n"), 400),
        (options("Call-ID: other\r\n"), 400),
        (options("CSeq: 2 OPTIONS\r\n"), 400),
        (options("f: <sip:x@example.com>;tag=2\r\n"), 400),
        (base.replace("CSeq: 1 OPTIONS", "CSeq: 1 INVITE"), 400),
        (
            base.replace("CSeq: 1 OPTIONS", "CSeq: 4294967296 OPTIONS"),
            400,
        ),
        (base.replace("CSeq: 1 OPTIONS", "CSeq: -1 OPTIONS"), 400),
        (base.replace("CSeq: 1 OPTIONS", "CSeq: 1"), 400),
        (base.replace("Max-Forwards: 70", "Max-Forwards: 256"), 400),
        (
            base.replace("Max-Forwards: 70", "Max-Forwards: seventy"),
            400,
        ),
        (base.replace("Call-ID: opt-1", "Call-ID: two words"), 400),
        (base.replace("branch=z9hG4bK1", "branch=z9hG4bK"), 400),
        (
            base.replace(
                "Via: SIP/2.0/UDP 192.0.2.1;branch=z9hG4bK1",
                "Via: SIP/2.0/UDP 192.0.2.1;;",
            ),
            400,
        ),
        (
            base.replace(
                "Via: SIP/2.0/UDP 192.0.2.1;branch=z9hG4bK1",
                "Via: SIP/2.0/UDP 192.0.2.1,,",
            ),
            400,
        ),
        (options("Contact: <sip:a@example.com>;;\r\n"), 400),
        (options("Contact: sip:a@example.com?Route=x\r\n"), 400),
        (options("Expires: 4294967296\r\n"), 400),
        (
            options("Contact: <sip:a@example.com>;expires=4294967296\r\n"),
            400,
        ),
        (
            base.replace(
                "OPTIONS sip:bridge.example.com",
                "OPTIONS sip:bridge.example.com?Route=x",
            ),
            400,
        ),
        (
            base.replace(
                "OPTIONS sip:bridge.example.com",
                "OPTIONS http://bridge.example.com",
            ),
            416,
        ),
        (
            base.replace("OPTIONS sip:", "FOO sip:")
                .replace("1 OPTIONS", "1 FOO"),
            501,
        ),
        (
            base.replace("OPTIONS sip:", "options sip:")
                .replace("1 OPTIONS", "1 options"),
            501,
        ),
        (options("Require: timer, 100rel\r\n"), 420),
        // accepted
        (options("Require: timer\r\n"), 0),
        (base.replace("Max-Forwards: 70", "Max-Forwards: 0"), 0),
        (base.replace("Max-Forwards: 70\r\n", ""), 0),
        (
            base.replace("OPTIONS sip:bridge.example.com", "OPTIONS tel:+15551230000"),
            0,
        ),
        (
            base.replace("CSeq: 1 OPTIONS", "CSeq: 4294967295 OPTIONS"),
            0,
        ),
        (options("Contact: *\r\n"), 0),
    ];
    for (raw, want) in &cases {
        assert_eq!(status_of(raw.as_bytes()), *want, "{raw}");
    }
}

#[test]
fn body_type_checks() {
    let ct = |from: &str, to: &str| status_of(INVITE.replace(from, to).as_bytes());
    assert_eq!(ct("application/sdp", "application/SDP; charset=x"), 0);
    assert_eq!(ct("application/sdp", "text/plain"), 415);
    assert_eq!(ct("Content-Type: application/sdp\r\n", ""), 400);
    assert_eq!(
        ct(
            "Content-Type: application/sdp\r\n",
            "Content-Type: application/sdp\r\ne: gzip\r\n"
        ),
        415
    );
    assert_eq!(
        ct(
            "Content-Type: application/sdp\r\n",
            "Content-Type: application/sdp\r\nAccept: text/html\r\n"
        ),
        406
    );
    assert_eq!(
        ct(
            "Content-Type: application/sdp\r\n",
            "Content-Type: application/sdp\r\nAccept: text/html, application/*\r\n"
        ),
        0
    );
    // an INVITE without a body is fine (offer in the 200)
    let raw = INVITE.replace("Content-Length: 133", "Content-Length: 0");
    assert_eq!(status_of(raw.as_bytes()), 0);
    let resp = Response::for_error(
        &parse_req(INVITE.replace("application/sdp", "text/plain").as_bytes()),
        &SipError::UnsupportedMediaType,
    );
    assert_eq!(resp.headers.get("Accept"), Some("application/sdp"));
}

#[test]
fn error_response_best_effort() {
    // missing To/From but a Via: a response with what could be found
    let raw = b"INVITE sip:a@example.com SIP/3.0\r\nv: SIP/2.0/UDP 192.0.2.1;branch=z9hG4bKq\r\nVia: SIP/2.0/UDP 192.0.2.9\r\nt: <sip:a@example.com>\r\nCall-ID: e1\r\nCSeq: 1 INVITE\r\nContent-Length: 0\r\n\r\n";
    let err = SipError::from(parse_datagram(raw).unwrap_err());
    let out = String::from_utf8(error_response(raw, &err).unwrap().to_vec()).unwrap();
    assert_eq!(
        out,
        "SIP/2.0 505 Version Not Supported\r\nVia: SIP/2.0/UDP 192.0.2.1;branch=z9hG4bKq\r\nVia: SIP/2.0/UDP 192.0.2.9\r\nTo: <sip:a@example.com>;tag=".to_owned()
            + &out[out.find(";tag=").unwrap() + 5..]
    );
    assert!(out.contains("\r\nCall-ID: e1\r\nCSeq: 1 INVITE\r\nContent-Length: 0\r\n\r\n"));
    // deterministic tag
    assert_eq!(
        error_response(raw, &err).unwrap(),
        error_response(raw, &err).unwrap()
    );
    // existing To tag kept, not doubled
    let raw2 = options("").replace("To: <sip:b@example.com>", "To: <sip:b@example.com>;tag=zz");
    let out2 = error_response(raw2.as_bytes(), &SipError::Malformed("x".into())).unwrap();
    assert!(
        String::from_utf8(out2.to_vec())
            .unwrap()
            .contains("\r\nTo: <sip:b@example.com>;tag=zz\r\n")
    );
    // responses, ACKs and Via-less garbage get nothing
    let e = SipError::Malformed("x".into());
    assert_eq!(
        error_response(b"SIP/2.0 200 OK\r\nVia: SIP/2.0/UDP h\r\n\r\n", &e),
        None
    );
    assert_eq!(
        error_response(b"ACK sip:a SIP/2.0\r\nVia: SIP/2.0/UDP h\r\n\r\n", &e),
        None
    );
    assert_eq!(error_response(b"\x00\x01garbage", &e), None);
    assert_eq!(error_response(b"", &e), None);
    // extra headers from the table
    let out = error_response(options("").as_bytes(), &SipError::UnknownMethod).unwrap();
    assert!(
        String::from_utf8(out.to_vec())
            .unwrap()
            .contains("\r\nAllow: INVITE, ACK, CANCEL, BYE, OPTIONS, UPDATE\r\n")
    );
}

#[test]
fn round_trip_print_parse() {
    for s in [
        "sip:alice@example.com",
        "sips:a:b@[::1]:5061;transport=tls;lr?x=y",
        "tel:+15551234;ext=12",
        "sip:%41@h;n%61me=v%25",
        "urn:service:sos",
    ] {
        let u = Uri::parse(s).unwrap();
        assert_eq!(u.to_string(), s);
        assert_eq!(Uri::parse(&u.to_string()).unwrap(), u);
    }
    for s in [
        "\"A \\\"B\\\"\" <sip:a@b>;tag=1",
        "<sip:a@b;lr>",
        "<tel:+1555>;expires=30",
    ] {
        let n = NameAddr::parse(s).unwrap();
        assert_eq!(n.to_string(), s);
        assert_eq!(NameAddr::parse(&n.to_string()).unwrap(), n);
    }
    // addr-spec form prints with <>
    assert_eq!(
        NameAddr::parse("sip:a@b;tag=1").unwrap().to_string(),
        "<sip:a@b>;tag=1"
    );
    assert_eq!(
        NameAddr::parse("Bob <sip:a@b>").unwrap().to_string(),
        "\"Bob\" <sip:a@b>"
    );
    let v = Via::parse("SIP/2.0/tls [2001:db8::1]:5061;branch=z9hG4bKx;received=1.2.3.4;rport=9")
        .unwrap();
    assert_eq!(Via::parse(&v.to_string()).unwrap(), v);
    // whole messages
    for raw in [INVITE.to_owned(), options("X-A: b\r\n")] {
        let m = parse_datagram(raw.as_bytes()).unwrap();
        assert_eq!(&m.encode()[..], raw.as_bytes());
        assert_eq!(parse_datagram(&m.encode()).unwrap(), m);
    }
}

#[test]
fn headers_and_params_api() {
    let mut h = Headers::new();
    h.push("Via", "a");
    h.push("X", "1");
    h.push("v", "b, c");
    assert_eq!(h.get_all("VIA").collect::<Vec<_>>(), ["a", "b, c"]);
    assert_eq!(h.values("via").collect::<Vec<_>>(), ["a", "b", "c"]);
    h.set("Via", "z");
    assert_eq!(h.iter().collect::<Vec<_>>(), [("Via", "z"), ("X", "1")]);
    h.set("New", "n");
    assert_eq!(h.get("new"), Some("n"));
    h.remove("x");
    assert_eq!(h.len(), 2);
    let mut p = Params::parse(" ; a = 1 ;B; c=\"x y\"").unwrap();
    assert_eq!(p.get("A"), Some(Some("1")));
    assert_eq!(p.get("b"), Some(None));
    assert_eq!(p.get("c"), Some(Some("\"x y\"")));
    assert_eq!(p.get("d"), None);
    p.set("b", Some("2"));
    p.set("d", None);
    p.remove("a");
    assert_eq!(
        p.iter().collect::<Vec<_>>(),
        [("B", Some("2")), ("c", Some("\"x y\"")), ("d", None)]
    );
    assert_eq!(p.to_string(), ";B=2;c=\"x y\";d");
    assert!(Params::parse(";a=").is_err());
    assert!(Params::parse(";a=x y").is_err());
    assert!(Params::parse("a").is_err());
    assert_eq!(Method::from("INVITE"), Method::Invite);
    assert_eq!(Method::from("invite"), Method::Extension("invite".into()));
    assert_eq!(Method::Prack.to_string(), "PRACK");
}

// ---------------------------------------------------------------- TCP framing

fn two_messages() -> Vec<u8> {
    let mut v = INVITE.as_bytes().to_vec();
    v.extend_from_slice(options("").as_bytes());
    v
}

fn drain(d: &mut StreamDecoder) -> Vec<Message> {
    let mut out = Vec::new();
    while let Some(m) = d.next_message().unwrap() {
        out.push(m);
    }
    out
}

#[test]
fn stream_split_at_every_byte_boundary() {
    let all = two_messages();
    let want = vec![
        parse_datagram(INVITE.as_bytes()).unwrap(),
        parse_datagram(options("").as_bytes()).unwrap(),
    ];
    for cut in 0..=all.len() {
        let mut d = StreamDecoder::new(MAX_MESSAGE_SIZE);
        d.push(&all[..cut]);
        let mut got = drain(&mut d);
        d.push(&all[cut..]);
        got.extend(drain(&mut d));
        assert_eq!(got, want, "cut at {cut}");
        assert_eq!(d.buffered(), 0);
    }
}

#[test]
fn stream_byte_by_byte_and_keepalives() {
    let mut all = b"\r\n\r\n".to_vec();
    all.extend_from_slice(INVITE.as_bytes());
    all.extend_from_slice(b"\r\n\r\n");
    all.extend_from_slice(options("").as_bytes());
    all.extend_from_slice(b"\r\n");
    let mut d = StreamDecoder::new(MAX_MESSAGE_SIZE);
    let mut got = Vec::new();
    for b in &all {
        d.push(std::slice::from_ref(b));
        got.extend(drain(&mut d));
    }
    assert_eq!(got.len(), 2);
    assert!(matches!(&got[0], Message::Request(r) if r.body.len() == 133));
    assert!(matches!(&got[1], Message::Request(r) if r.method == Method::Options));
    assert!(d.keepalives() >= 2);
}

#[test]
fn stream_two_messages_in_one_push() {
    let mut d = StreamDecoder::new(MAX_MESSAGE_SIZE);
    d.push(&two_messages());
    let got = drain(&mut d);
    assert_eq!(got.len(), 2);
    assert!(d.next_message().unwrap().is_none());
}

#[test]
fn stream_waits_for_body_then_errors_on_bad_framing() {
    // Content-Length larger than what has arrived: wait
    let mut d = StreamDecoder::new(MAX_MESSAGE_SIZE);
    d.push(
        INVITE
            .replace("Content-Length: 133", "Content-Length: 200")
            .as_bytes(),
    );
    assert_eq!(d.next_message().unwrap(), None);
    // Content-Length missing on a stream
    let mut d = StreamDecoder::new(MAX_MESSAGE_SIZE);
    d.push(INVITE.replace("Content-Length: 133\r\n", "").as_bytes());
    assert!(matches!(
        d.next_message(),
        Err(ParseError::ContentLength(_))
    ));
    // negative
    let mut d = StreamDecoder::new(MAX_MESSAGE_SIZE);
    d.push(
        INVITE
            .replace("Content-Length: 133", "Content-Length: -5")
            .as_bytes(),
    );
    assert!(matches!(
        d.next_message(),
        Err(ParseError::ContentLength(_))
    ));
}

#[test]
fn stream_oversized_is_an_error_not_growth() {
    // a header section that never ends
    let mut d = StreamDecoder::new(1024);
    d.push(b"INVITE sip:a SIP/2.0\r\nX: ");
    assert_eq!(d.next_message().unwrap(), None);
    d.push(&[b'a'; 1100]);
    assert_eq!(d.next_message().unwrap_err(), ParseError::TooLarge(1024));
    // a Content-Length over the limit is refused before the body arrives
    let mut d = StreamDecoder::new(1024);
    d.push(
        INVITE
            .replace("Content-Length: 133", "Content-Length: 5000")
            .as_bytes(),
    );
    assert_eq!(d.next_message().unwrap_err(), ParseError::TooLarge(1024));
    // exactly at the limit is fine
    let mut d = StreamDecoder::new(INVITE.len());
    d.push(INVITE.as_bytes());
    assert!(d.next_message().unwrap().is_some());
}

// ---------------------------------------------------------------- never panic

fn exercise(data: &[u8]) {
    if let Ok(m) = parse_datagram(data) {
        let _ = m.encode();
        if let Message::Request(r) = &m {
            let e = validate_request(r).err().unwrap_or(SipError::NotFound);
            let _ = Response::for_error(r, &e).encode();
            let _ = (r.vias(), r.contacts(), r.record_routes(), r.max_forwards());
        }
        let again = parse_datagram(&m.encode()).unwrap();
        assert_eq!(again.encode(), m.encode());
    } else if let Err(e) = parse_datagram(data) {
        let _ = error_response(data, &SipError::from(e));
    }
    let mut d = StreamDecoder::new(4096);
    for chunk in data.chunks(7) {
        d.push(chunk);
        while let Ok(Some(_)) = d.next_message() {}
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn arbitrary_bytes_never_panic(data in proptest::collection::vec(any::<u8>(), 0..600)) {
        exercise(&data);
    }

    #[test]
    fn mutated_messages_never_panic(
        edits in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8),
        which in 0usize..2,
    ) {
        let mut data = if which == 0 { INVITE.as_bytes().to_vec() } else { options("Contact: \"x\" <sip:[::1]>;a=b\r\n").into_bytes() };
        for (i, b) in edits {
            let at = i.index(data.len());
            data[at] = b;
        }
        exercise(&data);
    }

    #[test]
    fn sip_chars_never_panic(s in "[ -~\r\n\t]{0,300}") {
        exercise(s.as_bytes());
        let _ = Uri::parse(&s);
        let _ = NameAddr::parse(&s);
        let _ = Via::parse(&s);
    }
}

#[test]
fn regression_version_with_multibyte_char_does_not_panic() {
    // found by cargo-fuzz style fuzzing: slicing "StPŠ.0" at byte 4 split a UTF-8 char
    let raw = "OPa: iSIP/com StP\u{160}.0\r\nVia: SIP/2.0/0.2. \0branc 0\r\n\r\n";
    assert!(matches!(
        parse_datagram(raw.as_bytes()),
        Err(ParseError::StartLine(_))
    ));
    let raw = "SIP\u{160}/2.0 200 OK\r\n\r\n";
    assert!(parse_datagram(raw.as_bytes()).is_err());
    assert_eq!(
        error_response(
            "\u{160}IP/2.0 x\r\nVia: SIP/2.0/UDP h\r\n\r\n".as_bytes(),
            &SipError::NotFound
        )
        .map(|b| b.starts_with(b"SIP/2.0 404")),
        Some(true)
    );
}
