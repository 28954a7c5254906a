//! Malformed SIP over the wire against the real `sipbridge run` on loopback: each bad
//! message gets the exact status RFC 3261 asks for (or is dropped when it is a response or
//! has no Via to answer to), the RFC 4475 torture messages each get the response
//! `tests/data/rfc4475/INDEX.md` expects, and afterwards the same daemon still completes a
//! SIPp call. Everything stays on 127.0.0.1.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use common::{Daemon, profile_toml, sipp, sipp_scenario};

/// How long to wait for an answer that must come.
const ANSWER_WAIT: Duration = Duration::from_secs(2);
/// How long silence must last to count as "dropped".
const SILENCE: Duration = Duration::from_millis(400);

/// A UDP client on loopback talking to one daemon.
struct Wire {
    sock: UdpSocket,
    daemon: SocketAddr,
}

impl Wire {
    fn new(daemon: &Daemon) -> Wire {
        let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
        Wire {
            sock,
            daemon: daemon.udp_addr(),
        }
    }

    fn port(&self) -> u16 {
        self.sock.local_addr().unwrap().port()
    }

    /// Sends `bytes` and returns the first final response (100 Trying skipped) within
    /// `wait`, or `None` if none came.
    fn exchange(&self, bytes: &[u8], wait: Duration) -> Option<String> {
        self.sock.send_to(bytes, self.daemon).unwrap();
        let deadline = Instant::now() + wait;
        let mut buf = vec![0u8; 70_000];
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return None;
            }
            self.sock.set_read_timeout(Some(left)).unwrap();
            match self.sock.recv_from(&mut buf) {
                Ok((n, from)) => {
                    assert_eq!(from, self.daemon, "a reply from elsewhere");
                    let text = String::from_utf8_lossy(&buf[..n]).into_owned();
                    if !text.starts_with("SIP/2.0 1") {
                        return Some(text);
                    }
                }
                Err(_) => return None,
            }
        }
    }

    /// The status line of the answer to `bytes`; panics if there is none.
    #[track_caller]
    fn status_of(&self, bytes: &[u8]) -> String {
        let resp = self
            .exchange(bytes, ANSWER_WAIT)
            .unwrap_or_else(|| panic!("no answer to:\n{}", String::from_utf8_lossy(bytes)));
        first_line(&resp).to_owned()
    }

    /// Asserts that `bytes` gets no answer at all.
    #[track_caller]
    fn assert_dropped(&self, bytes: &[u8]) {
        if let Some(resp) = self.exchange(bytes, SILENCE) {
            panic!(
                "expected no answer to:\n{}\ngot:\n{resp}",
                String::from_utf8_lossy(bytes)
            );
        }
    }

    /// A valid OPTIONS still gets 200: the daemon is alive and answering.
    #[track_caller]
    fn assert_alive(&self) {
        assert_eq!(
            self.status_of(&request(self.port(), &Req::default())),
            "SIP/2.0 200 OK"
        );
    }
}

fn first_line(text: &str) -> &str {
    text.split("\r\n").next().unwrap_or("")
}

/// A unique branch/Call-ID suffix.
fn unique() -> u32 {
    static NEXT: AtomicU32 = AtomicU32::new(1);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

/// A request built from parts, each of which a test can break.
struct Req<'a> {
    method: &'a str,
    uri: &'a str,
    version: &'a str,
    /// Header names to leave out.
    omit: &'a [&'a str],
    /// Extra header lines, each ending in CRLF.
    extra: &'a str,
    /// `None`: the body's length.
    content_length: Option<&'a str>,
    body: &'a [u8],
}

impl Default for Req<'_> {
    fn default() -> Self {
        Req {
            method: "OPTIONS",
            uri: "sip:+15551230000@127.0.0.1",
            version: "SIP/2.0",
            omit: &[],
            extra: "",
            content_length: None,
            body: b"",
        }
    }
}

fn request(port: u16, r: &Req<'_>) -> Vec<u8> {
    let n = unique();
    let headers = [
        (
            "Via",
            format!("SIP/2.0/UDP 127.0.0.1:{port};branch=z9hG4bK-mw-{n}"),
        ),
        ("From", "<sip:+15550001111@127.0.0.1>;tag=mw1".to_owned()),
        ("To", "<sip:+15551230000@127.0.0.1>".to_owned()),
        ("Call-ID", format!("malformed-{n}@127.0.0.1")),
        ("CSeq", format!("1 {}", r.method)),
        ("Max-Forwards", "70".to_owned()),
    ];
    let mut text = format!("{} {} {}\r\n", r.method, r.uri, r.version);
    for (name, value) in headers {
        if !r.omit.contains(&name) {
            text.push_str(&format!("{name}: {value}\r\n"));
        }
    }
    text.push_str(r.extra);
    let length = r
        .content_length
        .map_or_else(|| r.body.len().to_string(), str::to_owned);
    text.push_str(&format!("Content-Length: {length}\r\n\r\n"));
    let mut bytes = text.into_bytes();
    bytes.extend_from_slice(r.body);
    bytes
}

/// A SIPp basic call on the same daemon still succeeds.
fn assert_sipp_call_succeeds(daemon: &Daemon) {
    let result = sipp(
        &sipp_scenario("basic_call.xml"),
        daemon.udp_addr(),
        &["-s", "+15551230000"],
    );
    result.assert_success();
}

/// Deterministic pseudo-random bytes (xorshift64*).
fn noise(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x >> 12;
            x ^= x << 25;
            x ^= x >> 27;
            (x.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 56) as u8
        })
        .collect()
}

#[test]
fn garbage_and_oversized_datagrams_are_survived() {
    let daemon = Daemon::spawn(&profile_toml(""));
    let wire = Wire::new(&daemon);
    // Random bytes, including some that start like SIP: no Via to answer to → dropped.
    for seed in 1..=20u64 {
        let len = 1 + (seed as usize * 797) % 3000;
        wire.assert_dropped(&noise(seed, len));
    }
    wire.assert_dropped(b"INVITE \x00\xff\xfe garbage\r\n\r\n");
    wire.assert_dropped(b"SIP/2.0 200\r\n\r\n");
    // The biggest UDP payload over IPv4 (65,507 bytes): a valid request padded with an
    // unknown header. It is answered 513 Message Too Large, not parsed unbounded.
    let port = wire.port();
    let head = request(port, &Req::default());
    let pad = 65_507 - head.len() - "X-Pad: \r\n".len();
    let extra = format!("X-Pad: {}\r\n", "a".repeat(pad));
    let big = request(
        port,
        &Req {
            extra: &extra,
            ..Req::default()
        },
    );
    assert_eq!(big.len(), 65_507);
    assert_eq!(wire.status_of(&big), "SIP/2.0 513 Message Too Large");
    wire.assert_alive();
    assert_sipp_call_succeeds(&daemon);
}

#[test]
fn content_length_errors_get_400() {
    let daemon = Daemon::spawn(&profile_toml(""));
    let wire = Wire::new(&daemon);
    let port = wire.port();
    // Larger than the body (RFC 3261 §18.3: a truncated UDP message is 400).
    let longer = request(
        port,
        &Req {
            content_length: Some("50"),
            body: b"hello",
            ..Req::default()
        },
    );
    assert_eq!(wire.status_of(&longer), "SIP/2.0 400 Bad Request");
    for bad in ["-5", "abc", "99999999999999999999"] {
        let msg = request(
            port,
            &Req {
                content_length: Some(bad),
                ..Req::default()
            },
        );
        assert_eq!(
            wire.status_of(&msg),
            "SIP/2.0 400 Bad Request",
            "Content-Length: {bad}"
        );
    }
    // Extra bytes after the body on UDP are ignored (RFC 3261 §18.3).
    let shorter = request(
        port,
        &Req {
            content_length: Some("0"),
            body: b"trailing junk",
            ..Req::default()
        },
    );
    assert_eq!(wire.status_of(&shorter), "SIP/2.0 200 OK");
    wire.assert_alive();
}

#[test]
fn missing_mandatory_headers_get_400() {
    let daemon = Daemon::spawn(&profile_toml(""));
    let wire = Wire::new(&daemon);
    let port = wire.port();
    for header in ["Call-ID", "From", "To", "CSeq"] {
        let msg = request(
            port,
            &Req {
                omit: &[header],
                ..Req::default()
            },
        );
        assert_eq!(
            wire.status_of(&msg),
            "SIP/2.0 400 Bad Request",
            "without {header}"
        );
        let invite = request(
            port,
            &Req {
                method: "INVITE",
                omit: &[header],
                ..Req::default()
            },
        );
        assert_eq!(
            wire.status_of(&invite),
            "SIP/2.0 400 Bad Request",
            "INVITE without {header}"
        );
    }
    // Without a Via there is nowhere to send an answer: dropped.
    wire.assert_dropped(&request(
        port,
        &Req {
            omit: &["Via"],
            ..Req::default()
        },
    ));
    assert!(daemon.cdrs().is_empty(), "{:?}", daemon.cdrs());
    wire.assert_alive();
}

#[test]
fn version_scheme_and_require_errors() {
    let daemon = Daemon::spawn(&profile_toml(""));
    let wire = Wire::new(&daemon);
    let port = wire.port();
    let version = request(
        port,
        &Req {
            version: "SIP/3.0",
            ..Req::default()
        },
    );
    assert_eq!(
        wire.status_of(&version),
        "SIP/2.0 505 Version Not Supported"
    );
    let scheme = request(
        port,
        &Req {
            uri: "foo:bar@127.0.0.1",
            ..Req::default()
        },
    );
    assert_eq!(
        wire.status_of(&scheme),
        "SIP/2.0 416 Unsupported URI Scheme"
    );
    let require = request(
        port,
        &Req {
            extra: "Require: foo\r\n",
            ..Req::default()
        },
    );
    let resp = wire
        .exchange(&require, ANSWER_WAIT)
        .expect("answer to Require: foo");
    assert_eq!(first_line(&resp), "SIP/2.0 420 Bad Extension");
    assert!(resp.contains("\r\nUnsupported: foo\r\n"), "{resp}");
    // A known option tag is fine.
    let timer = request(
        port,
        &Req {
            extra: "Require: timer\r\n",
            ..Req::default()
        },
    );
    assert_eq!(wire.status_of(&timer), "SIP/2.0 200 OK");
    wire.assert_alive();
}

#[test]
fn malformed_responses_get_no_answer() {
    let daemon = Daemon::spawn(&profile_toml(""));
    let wire = Wire::new(&daemon);
    let port = wire.port();
    let via = format!("Via: SIP/2.0/UDP 127.0.0.1:{port};branch=z9hG4bK-resp\r\n");
    let responses = [
        format!("SIP/2.0 200 OK\r\n{via}Content-Length: 99\r\n\r\nabc"),
        format!("SIP/2.0 4294967301 Huge\r\n{via}Content-Length: 0\r\n\r\n"),
        format!("SIP/2.0 200 OK\r\n{via}CSeq: 99999999999 INVITE\r\nContent-Length: 0\r\n\r\n"),
        format!("SIP/7.0 200 OK\r\n{via}Content-Length: 0\r\n\r\n"),
        format!("SIP/2.0 180 Ringing\r\n{via}Call-ID: nobody\r\nContent-Length: -1\r\n\r\n"),
    ];
    for resp in &responses {
        wire.assert_dropped(resp.as_bytes());
    }
    wire.assert_alive();
}

#[test]
fn tcp_oversized_header_section_closes_the_connection() {
    let daemon = Daemon::spawn(&profile_toml(""));
    let mut tcp = TcpStream::connect(daemon.tcp_addr()).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let local = tcp.local_addr().unwrap().port();
    let mut head = String::from_utf8(request(local, &Req::default())).unwrap();
    // Replace the final blank line with 100 KB of headers and never end the section.
    head.truncate(head.len() - 2);
    let line = format!("X-Pad: {}\r\n", "b".repeat(990));
    // The daemon may close mid-way: a write error is part of the expected outcome.
    for _ in 0..100 {
        if tcp.write_all(line.as_bytes()).is_err() {
            break;
        }
    }
    let mut got = Vec::new();
    let closed = match tcp.read_to_end(&mut got) {
        Ok(_) => true,
        Err(e) => e.kind() == std::io::ErrorKind::ConnectionReset,
    };
    assert!(closed, "connection not closed within 5 s");
    // Whatever was answered before closing is an error response, never a 200.
    let text = String::from_utf8_lossy(&got);
    assert!(
        text.is_empty() || text.starts_with("SIP/2.0 4") || text.starts_with("SIP/2.0 5"),
        "{text}"
    );
    let wire = Wire::new(&daemon);
    wire.assert_alive();
    // TCP still works too.
    let result = sipp(
        &sipp_scenario("basic_call.xml"),
        daemon.tcp_addr(),
        &["-s", "+15551230000", "-t", "t1"],
    );
    result.assert_success();
}

#[test]
fn tcp_wrong_content_length_in_a_stream() {
    let daemon = Daemon::spawn(&profile_toml(""));
    let mut tcp = TcpStream::connect(daemon.tcp_addr()).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    let local = tcp.local_addr().unwrap().port();
    // A negative Content-Length loses the framing: 400 then close (RFC 4475 §3.1.2.3).
    let msg = request(
        local,
        &Req {
            content_length: Some("-999"),
            ..Req::default()
        },
    );
    tcp.write_all(&msg).unwrap();
    let mut got = Vec::new();
    let _ = tcp.read_to_end(&mut got);
    let text = String::from_utf8_lossy(&got);
    assert!(
        text.is_empty() || first_line(&text) == "SIP/2.0 400 Bad Request",
        "{text}"
    );
    Wire::new(&daemon).assert_alive();
}

// ---------------------------------------------------------------------------------------
// RFC 4475 torture messages
// ---------------------------------------------------------------------------------------

/// The answer each torture message must get from sipbridge as an endpoint (UAS, not a
/// registrar, not a proxy), per tests/data/rfc4475/INDEX.md. `None`: dropped (responses).
/// Where INDEX.md allows a liberal alternative or the RFC's answer is a registrar's, the
/// reason is given.
const TORTURE: &[(&str, Option<u16>)] = &[
    // 3.1.1 valid: parsed, then handled as an endpoint would.
    ("wsinv.dat", Some(481)), // INVITE with a To tag for no dialog of ours
    ("intmeth.dat", Some(501)),
    ("esc01.dat", Some(404)), // INVITE: the user part is not a number, so no route
    ("escnull.dat", Some(405)), // REGISTER: not a registrar
    ("esc02.dat", Some(501)),
    ("lwsdisp.dat", Some(200)), // OPTIONS
    ("longreq.dat", Some(404)), // INVITE, user part not a number
    ("dblreq.dat", Some(405)),  // the REGISTER; the trailing INVITE ignored (one answer)
    ("semiuri.dat", Some(200)),
    ("transports.dat", Some(200)),
    ("mpart01.dat", Some(405)), // MESSAGE: not allowed here
    ("unreason.dat", None),     // a response
    ("noreason.dat", None),     // a response
    // 3.1.2 invalid.
    ("badinv01.dat", Some(400)),
    ("clerr.dat", Some(400)),
    ("ncl.dat", Some(400)),
    ("scalar02.dat", Some(400)),
    ("scalarlg.dat", None),
    ("quotbal.dat", Some(400)),
    ("ltgtruri.dat", Some(400)),
    ("lwsruri.dat", Some(400)),
    ("lwsstart.dat", Some(404)), // tolerated (liberal), then no route
    ("trws.dat", Some(200)),     // tolerated (liberal): OPTIONS
    ("escruri.dat", Some(400)),
    ("baddate.dat", Some(404)), // Date ignored, then no route
    ("regbadct.dat", Some(400)),
    ("badaspec.dat", Some(200)), // liberal: spaces ignored (OPTIONS)
    ("baddn.dat", Some(400)),
    ("badvers.dat", Some(505)),
    ("mismatch01.dat", Some(400)),
    ("mismatch02.dat", Some(501)),
    ("bigcode.dat", None),
    // 3.2
    ("badbranch.dat", Some(400)),
    // 3.3
    ("insuf.dat", Some(400)),
    ("unkscm.dat", Some(416)),
    ("novelsc.dat", Some(416)),
    ("unksm2.dat", Some(405)), // REGISTER: not a registrar
    ("bext01.dat", Some(420)),
    ("invut.dat", Some(415)),
    ("regaut01.dat", Some(405)), // non-registrar endpoint
    ("multi01.dat", Some(400)),
    ("mcl01.dat", Some(400)),
    ("bcast.dat", None),
    ("zeromf.dat", Some(200)), // a UAS answers OPTIONS with Max-Forwards 0
    ("cparam01.dat", Some(405)), // REGISTER: not a registrar
    ("cparam02.dat", Some(405)),
    ("regescrt.dat", Some(405)),
    ("sdp01.dat", Some(406)),
    // 3.4
    ("inv2543.dat", Some(404)), // accepted (RFC 2543), then no route
];

/// `message` with every Via sent-by (`SIP/2.0/<transport> <host[:port]>`, with any LWS
/// and line folding in between) replaced by `127.0.0.1:<port>`, in the header section
/// only, so that nothing could be sent off loopback.
fn via_to_loopback(message: &[u8], port: u16) -> Vec<u8> {
    let head_end = message
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or(message.len());
    let (head, body) = message.split_at(head_end);
    let is_lws = |b: u8| matches!(b, b' ' | b'\t' | b'\r' | b'\n');
    let skip = |i: usize| {
        let mut i = i;
        while i < head.len() && is_lws(head[i]) {
            i += 1;
        }
        i
    };
    let sent_by = format!("127.0.0.1:{port}");
    let mut out = Vec::with_capacity(message.len() + 64);
    let mut i = 0;
    while i < head.len() {
        if let Some(host) = sent_by_at(head, i, &skip) {
            out.extend_from_slice(&head[i..host.0]);
            out.extend_from_slice(sent_by.as_bytes());
            i = host.1;
        } else {
            out.push(head[i]);
            i += 1;
        }
    }
    out.extend_from_slice(body);
    out
}

/// If `SIP / 2.0 / TRANSPORT LWS host` starts at `i`, the host's byte range.
fn sent_by_at(head: &[u8], i: usize, skip: &impl Fn(usize) -> usize) -> Option<(usize, usize)> {
    let starts = |at: usize, s: &[u8]| {
        head.get(at..at + s.len())
            .is_some_and(|h| h.eq_ignore_ascii_case(s))
    };
    if !starts(i, b"SIP") {
        return None;
    }
    let j = skip(i + 3);
    if head.get(j) != Some(&b'/') {
        return None;
    }
    let j = skip(j + 1);
    if !starts(j, b"2.0") {
        return None;
    }
    let j = skip(j + 3);
    if head.get(j) != Some(&b'/') {
        return None;
    }
    let mut j = skip(j + 1);
    let transport_start = j;
    while j < head.len() && (head[j].is_ascii_alphanumeric() || head[j] == b'-') {
        j += 1;
    }
    let host_start = skip(j);
    if j == transport_start || host_start == j {
        return None;
    }
    let mut end = host_start;
    while end < head.len() && !matches!(head[end], b';' | b',' | b' ' | b'\t' | b'\r' | b'\n') {
        end += 1;
    }
    (end > host_start).then_some((host_start, end))
}

#[test]
fn via_rewrite_handles_folding_and_compact_forms() {
    let msg = b"OPTIONS sip:a@b SIP/2.0\r\nv: SIP  /  2.0\r\n /UDP\r\n    192.0.2.2;branch=x\r\nVia: SIP/2.0/TCP [2001:db8::1]:5060, SIP/2.0/UDP h.example\r\n\r\nSIP/2.0/UDP body.example";
    let out = String::from_utf8(via_to_loopback(msg, 4000)).unwrap();
    assert_eq!(
        out,
        "OPTIONS sip:a@b SIP/2.0\r\nv: SIP  /  2.0\r\n /UDP\r\n    127.0.0.1:4000;branch=x\r\nVia: SIP/2.0/TCP 127.0.0.1:4000, SIP/2.0/UDP 127.0.0.1:4000\r\n\r\nSIP/2.0/UDP body.example"
    );
}

#[test]
fn rfc4475_torture_messages_over_udp() {
    let dir = common::repo_path("tests/data/rfc4475");
    let mut on_disk: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.ends_with(".dat"))
        .collect();
    on_disk.sort();
    let mut listed: Vec<String> = TORTURE.iter().map(|(n, _)| (*n).to_owned()).collect();
    listed.sort();
    assert_eq!(on_disk, listed, "every torture file has an expectation");

    let daemon = Daemon::spawn(&profile_toml(""));
    let wire = Wire::new(&daemon);
    let mut wrong = Vec::new();
    for (name, expected) in TORTURE {
        let raw = std::fs::read(dir.join(name)).unwrap();
        let msg = via_to_loopback(&raw, wire.port());
        let wait = if expected.is_some() {
            ANSWER_WAIT
        } else {
            SILENCE
        };
        let got = wire.exchange(&msg, wait).map(|r| {
            first_line(&r)
                .get(8..11)
                .unwrap_or("")
                .parse::<u16>()
                .unwrap_or(0)
        });
        if got != *expected {
            wrong.push(format!("{name}: expected {expected:?}, got {got:?}"));
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
    // dblreq.dat's trailing INVITE was not processed: no call attempt was recorded for it,
    // and no torture INVITE created a call.
    assert!(
        daemon.cdrs().iter().all(|c| c["result_code"] != 200),
        "{:?}",
        daemon.cdrs()
    );
    wire.assert_alive();
    assert_sipp_call_succeeds(&daemon);
}
