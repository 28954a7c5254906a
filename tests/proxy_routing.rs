#![allow(clippy::unwrap_used, clippy::expect_used)]
//! Calls through a record-routing proxy, against the real `sipbridge run` on loopback.
//!
//! - [`record_route_comes_back_in_order_in_180_and_200`]: an INVITE with two
//!   Record-Route headers (three values) gets a 180 and a 200 carrying them in order.
//! - [`bye_from_another_port_is_answered_there`]: INVITE from one port, BYE from
//!   another: the BYE's 200 goes to the BYE's source (RFC 3261 §18.2.2, RFC 3581), and
//!   nothing of it to the INVITE's port.
//! - [`hundred_sipp_calls_through_strict_kamailio`]: Kamailio with
//!   `tests/kamailio/strict-record-route.cfg` (record_route, loose_route, in-dialog
//!   requests without Route refused) in front of the daemon; 100 SIPp calls with
//!   `tests/sipp/proxy_call.xml` (which honours the route set): 0 failed, every CDR
//!   `caller-bye`.
//! - [`baresip_holds_resumes_and_hangs_up_through_kamailio`]: baresip, driven over its
//!   `ctrl_tcp` module, calls through the same proxy, puts the call on hold, resumes it
//!   and hangs up; its own SIP trace shows the answers to both re-INVITEs (the daemon's
//!   `recvonly` then `sendrecv`) and the 200 to its BYE.
//!
//! Owns: the Kamailio process helper (foreground, unprivileged, in a temp dir, killed at
//! the end) and the baresip `ctrl_tcp` client (netstring-framed JSON).

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use common::{Daemon, ProfileSpec, free_port, repo_path, sipp, sipp_scenario};

/// How long to wait for an answer that must come.
const ANSWER_WAIT: Duration = Duration::from_secs(3);

// ---------------------------------------------------------------------------------------
// Raw SIP over UDP
// ---------------------------------------------------------------------------------------

/// A UDP socket of the test standing in for a phone or a proxy.
struct Wire {
    sock: UdpSocket,
}

impl Wire {
    fn new() -> Wire {
        Wire {
            sock: UdpSocket::bind("127.0.0.1:0").unwrap(),
        }
    }

    fn port(&self) -> u16 {
        self.sock.local_addr().unwrap().port()
    }

    fn send(&self, to: SocketAddr, msg: &str) {
        self.sock.send_to(msg.as_bytes(), to).unwrap();
    }

    /// Datagrams received within `wait` that start with "SIP/2.0" (RTP and others skipped),
    /// up to and including the first that satisfies `until`.
    fn responses_until(&self, wait: Duration, until: impl Fn(&str) -> bool) -> Vec<String> {
        let deadline = Instant::now() + wait;
        let mut buf = vec![0u8; 70_000];
        let mut got = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return got;
            }
            self.sock.set_read_timeout(Some(left)).unwrap();
            let Ok((n, _)) = self.sock.recv_from(&mut buf) else {
                return got;
            };
            let text = String::from_utf8_lossy(&buf[..n]).into_owned();
            if !text.starts_with("SIP/2.0 ") {
                continue;
            }
            let done = until(&text);
            got.push(text);
            if done {
                return got;
            }
        }
    }
}

fn status(resp: &str) -> u16 {
    resp.get(8..11).and_then(|s| s.parse().ok()).unwrap_or(0)
}

/// Header values of `name` (one per line, in order), case-insensitively.
fn header_lines<'a>(msg: &'a str, name: &str) -> Vec<&'a str> {
    let head = msg.split("\r\n\r\n").next().unwrap_or_default();
    head.lines()
        .filter_map(|l| {
            let (n, v) = l.split_once(':')?;
            n.trim().eq_ignore_ascii_case(name).then(|| v.trim())
        })
        .collect()
}

fn to_tag(resp: &str) -> String {
    let to = header_lines(resp, "To")
        .first()
        .copied()
        .unwrap_or_default();
    to.split(";tag=")
        .nth(1)
        .and_then(|t| t.split(';').next())
        .unwrap_or_else(|| panic!("no To tag in\n{resp}"))
        .to_owned()
}

fn invite(call_id: &str, from: &Wire, daemon: SocketAddr, rtp: u16, extra: &str) -> String {
    let port = from.port();
    let body = format!(
        "v=0\r\no=t 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\n\
m=audio {rtp} RTP/AVP 0\r\na=rtpmap:0 PCMU/8000\r\na=sendrecv\r\n"
    );
    format!(
        "INVITE sip:15551230000@{daemon} SIP/2.0\r\n\
Via: SIP/2.0/UDP 127.0.0.1:{port};branch=z9hG4bK-{call_id}-1;rport\r\n\
Max-Forwards: 70\r\n\
{extra}From: <sip:+15550001111@127.0.0.1>;tag=caller-{call_id}\r\n\
To: <sip:15551230000@{daemon}>\r\n\
Call-ID: {call_id}\r\n\
CSeq: 1 INVITE\r\n\
Contact: <sip:+15550001111@127.0.0.1:{port}>\r\n\
Content-Type: application/sdp\r\n\
Content-Length: {}\r\n\r\n{body}",
        body.len()
    )
}

fn in_dialog(
    method: &str,
    seq: u32,
    call_id: &str,
    tag: &str,
    from: &Wire,
    daemon: SocketAddr,
) -> String {
    let port = from.port();
    format!(
        "{method} sip:sipbridge@{daemon} SIP/2.0\r\n\
Via: SIP/2.0/UDP 127.0.0.1:{port};branch=z9hG4bK-{call_id}-{seq}-{method};rport\r\n\
Max-Forwards: 70\r\n\
From: <sip:+15550001111@127.0.0.1>;tag=caller-{call_id}\r\n\
To: <sip:15551230000@{daemon}>;tag={tag}\r\n\
Call-ID: {call_id}\r\n\
CSeq: {seq} {method}\r\n\
Content-Length: 0\r\n\r\n"
    )
}

#[test]
fn record_route_comes_back_in_order_in_180_and_200() {
    let daemon = Daemon::spawn(&ProfileSpec::default().render());
    let phone = Wire::new();
    let rtp = Wire::new();
    let rr = "Record-Route: <sip:127.0.0.1:5070;lr;ftag=caller-rr1>\r\n\
Record-Route: <sip:127.0.0.2:5071;lr;r2=on>, <sip:edge.example.com;lr;transport=tcp>\r\n";
    phone.send(
        daemon.udp_addr(),
        &invite("rr1", &phone, daemon.udp_addr(), rtp.port(), rr),
    );
    let got = phone.responses_until(ANSWER_WAIT, |r| status(r) == 200);
    let find = |code| {
        got.iter()
            .find(|r| status(r) == code)
            .unwrap_or_else(|| panic!("no {code} in {got:#?}"))
    };
    let want = vec![
        "<sip:127.0.0.1:5070;lr;ftag=caller-rr1>",
        "<sip:127.0.0.2:5071;lr;r2=on>, <sip:edge.example.com;lr;transport=tcp>",
    ];
    assert_eq!(header_lines(find(180), "Record-Route"), want, "180");
    let ok = find(200);
    assert_eq!(header_lines(ok, "Record-Route"), want, "200");
    let tag = to_tag(ok);
    phone.send(
        daemon.udp_addr(),
        &in_dialog("ACK", 1, "rr1", &tag, &phone, daemon.udp_addr()),
    );
    phone.send(
        daemon.udp_addr(),
        &in_dialog("BYE", 2, "rr1", &tag, &phone, daemon.udp_addr()),
    );
    let got = phone.responses_until(ANSWER_WAIT, |r| r.contains("CSeq: 2 BYE"));
    assert!(
        got.iter()
            .any(|r| status(r) == 200 && r.contains("CSeq: 2 BYE")),
        "{got:#?}"
    );
}

#[test]
fn bye_from_another_port_is_answered_there() {
    let daemon = Daemon::spawn(&ProfileSpec::default().render());
    let first = Wire::new();
    let second = Wire::new();
    let rtp = Wire::new();
    let to = daemon.udp_addr();
    first.send(to, &invite("port1", &first, to, rtp.port(), ""));
    let got = first.responses_until(ANSWER_WAIT, |r| status(r) == 200);
    let ok = got
        .iter()
        .find(|r| status(r) == 200)
        .unwrap_or_else(|| panic!("no 200: {got:#?}"));
    let tag = to_tag(ok);
    first.send(to, &in_dialog("ACK", 1, "port1", &tag, &first, to));

    second.send(to, &in_dialog("BYE", 2, "port1", &tag, &second, to));
    let got = second.responses_until(ANSWER_WAIT, |r| r.contains("CSeq: 2 BYE"));
    let bye_ok = got
        .iter()
        .find(|r| r.contains("CSeq: 2 BYE"))
        .unwrap_or_else(|| panic!("the BYE's source got no answer: {got:#?}"));
    assert_eq!(status(bye_ok), 200, "{bye_ok}");
    let via = header_lines(bye_ok, "Via")[0];
    assert!(
        via.contains(&format!("rport={}", second.port())),
        "rport filled in: {via}"
    );
    // Nothing of it went to the INVITE's port.
    let stray = first.responses_until(Duration::from_millis(500), |r| r.contains("BYE"));
    assert!(
        stray.iter().all(|r| !r.contains("CSeq: 2 BYE")),
        "the BYE's 200 went to the INVITE's port: {stray:#?}"
    );
    let cdr = daemon
        .wait_for_cdr(ANSWER_WAIT, |c| c["call_id"] == "port1")
        .expect("a CDR");
    assert_eq!(cdr["cause"], "caller-bye");
}

// ---------------------------------------------------------------------------------------
// Kamailio
// ---------------------------------------------------------------------------------------

/// Kamailio in the foreground with `tests/kamailio/strict-record-route.cfg`, listening on
/// a free loopback UDP port and relaying new INVITEs and OPTIONS to the daemon; its work
/// dir, runtime dir and pid file in a temp dir; 64 MB shared and 8 MB private memory.
/// Stopped with SIGTERM (then SIGKILL) on drop.
struct Kamailio {
    child: Child,
    _dir: tempfile::TempDir,
    addr: SocketAddr,
    log: Arc<Mutex<Vec<String>>>,
}

impl Kamailio {
    fn start(daemon: SocketAddr) -> Kamailio {
        let cfg = repo_path("tests/kamailio/strict-record-route.cfg");
        for _attempt in 1..=3 {
            let dir = tempfile::tempdir().unwrap();
            let port = free_port();
            let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
            let mut child = Command::new("kamailio")
                .arg("-f")
                .arg(&cfg)
                .args(["-DD", "-E", "-m", "64", "-M", "8", "-w"])
                .arg(dir.path())
                .arg("-Y")
                .arg(dir.path())
                .arg("-P")
                .arg(dir.path().join("kamailio.pid"))
                .arg("-A")
                .arg(format!("LISTEN=udp:{addr}"))
                .arg("-A")
                .arg(format!("SIPBRIDGE=\"sip:{daemon}\""))
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .expect("spawn kamailio (bash scripts/install-test-deps.sh installs it)");
            let log = Arc::new(Mutex::new(Vec::new()));
            for stream in [
                Box::new(child.stdout.take().unwrap()) as Box<dyn Read + Send>,
                Box::new(child.stderr.take().unwrap()),
            ] {
                let log = Arc::clone(&log);
                thread::spawn(move || {
                    for line in BufReader::new(stream).lines() {
                        let Ok(line) = line else { break };
                        log.lock().unwrap().push(line);
                    }
                });
            }
            let mut kam = Kamailio {
                child,
                _dir: dir,
                addr,
                log,
            };
            if kam.wait_ready() {
                return kam;
            }
            // Lost the port to a race, or not up in time: try another port.
            eprintln!("kamailio not ready; log:\n{}", kam.log());
        }
        panic!("kamailio did not start");
    }

    /// An OPTIONS through the proxy is answered 200 by the daemon: both are up. Up to 10 s.
    fn wait_ready(&mut self) -> bool {
        let probe = Wire::new();
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut n = 0;
        while Instant::now() < deadline {
            if !matches!(self.child.try_wait(), Ok(None)) {
                return false;
            }
            n += 1;
            let port = probe.port();
            let options = format!(
                "OPTIONS sip:ping@{addr} SIP/2.0\r\n\
Via: SIP/2.0/UDP 127.0.0.1:{port};branch=z9hG4bK-probe-{n};rport\r\n\
Max-Forwards: 70\r\n\
From: <sip:probe@127.0.0.1>;tag=probe\r\n\
To: <sip:ping@{addr}>\r\n\
Call-ID: probe-{n}\r\n\
CSeq: {n} OPTIONS\r\n\
Content-Length: 0\r\n\r\n",
                addr = self.addr
            );
            probe.send(self.addr, &options);
            let got = probe.responses_until(Duration::from_millis(300), |r| status(r) == 200);
            if got.iter().any(|r| status(r) == 200) {
                return true;
            }
        }
        false
    }

    fn log(&self) -> String {
        self.log.lock().unwrap().join("\n")
    }
}

impl Drop for Kamailio {
    fn drop(&mut self) {
        // SIGTERM lets the main process stop its children; SIGKILL if it lingers.
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if !matches!(self.child.try_wait(), Ok(None)) {
                break;
            }
            thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        if thread::panicking() {
            eprintln!("---- kamailio log ----\n{}", self.log());
        }
    }
}

/// The daemon for the proxy tests: the test profile (180 and 200 back to back).
fn proxied_daemon() -> Daemon {
    Daemon::spawn(&ProfileSpec::default().render())
}

#[test]
fn hundred_sipp_calls_through_strict_kamailio() {
    let daemon = proxied_daemon();
    let kam = Kamailio::start(daemon.udp_addr());
    let result = sipp(
        &sipp_scenario("proxy_call.xml"),
        kam.addr,
        &[
            "-m",
            "100",
            "-r",
            "20",
            "-l",
            "20",
            "-s",
            "15551230000",
            "-timeout",
            "60s",
        ],
    );
    assert!(
        result.succeeded() && result.successful_calls == Some(100),
        "SIPp through Kamailio:\n{}\n---- kamailio ----\n{}",
        result.report(),
        kam.log()
    );
    let cdrs = daemon.wait_for_cdrs(100, Duration::from_secs(10));
    assert_eq!(cdrs.len(), 100, "{cdrs:#?}");
    for cdr in &cdrs {
        assert_eq!(cdr["cause"], "caller-bye", "{cdr}");
        assert_eq!(cdr["result_code"], 200, "{cdr}");
    }
    // Every in-dialog request went along the route set: the proxy refused none.
    let log = kam.log();
    assert!(!log.contains("without Route"), "{log}");
}

// ---------------------------------------------------------------------------------------
// baresip over ctrl_tcp
// ---------------------------------------------------------------------------------------

/// baresip's `ctrl_tcp` protocol: netstrings (`LEN:JSON,`) both ways; commands are
/// `{"command","params","token"}`, answers `{"response":true,…}`, events `{"event":true,
/// "type":…}`.
struct Ctrl {
    stream: TcpStream,
    buf: Vec<u8>,
}

impl Ctrl {
    fn connect(addr: SocketAddr) -> Ctrl {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match TcpStream::connect(addr) {
                Ok(stream) => {
                    return Ctrl {
                        stream,
                        buf: Vec::new(),
                    };
                }
                Err(e) if Instant::now() >= deadline => panic!("baresip ctrl_tcp {addr}: {e}"),
                Err(_) => thread::sleep(Duration::from_millis(50)),
            }
        }
    }

    fn command(&mut self, command: &str, params: &str) {
        let json =
            serde_json::json!({"command": command, "params": params, "token": command}).to_string();
        let framed = format!("{}:{json},", json.len());
        self.stream.write_all(framed.as_bytes()).unwrap();
    }

    /// The next message, or `None` after `wait`.
    fn next(&mut self, wait: Duration) -> Option<serde_json::Value> {
        let deadline = Instant::now() + wait;
        loop {
            if let Some(colon) = self.buf.iter().position(|&b| b == b':') {
                let len: usize = std::str::from_utf8(&self.buf[..colon])
                    .ok()
                    .and_then(|s| s.trim().parse().ok())
                    .expect("netstring length");
                if self.buf.len() > colon + len + 1 {
                    let json = self.buf[colon + 1..colon + 1 + len].to_vec();
                    self.buf.drain(..colon + len + 2);
                    return serde_json::from_slice(&json).ok();
                }
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return None;
            }
            self.stream.set_read_timeout(Some(left)).unwrap();
            let mut chunk = [0u8; 4096];
            match self.stream.read(&mut chunk) {
                Ok(0) => return None,
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(_) => return None,
            }
        }
    }

    /// Waits for the event `kind` (optionally with `param`); panics after `wait`.
    #[track_caller]
    fn expect_event(&mut self, kind: &str, param: Option<&str>, wait: Duration) {
        let deadline = Instant::now() + wait;
        let mut seen = Vec::new();
        while let Some(msg) = self.next(deadline.saturating_duration_since(Instant::now())) {
            if msg["event"] == true
                && msg["type"] == kind
                && param.is_none_or(|p| msg["param"] == p)
            {
                return;
            }
            seen.push(msg);
        }
        panic!("no {kind} {param:?} event; saw {seen:#?}");
    }
}

fn baresip_dir(sip_port: u16, ctrl_port: u16) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    // A tone long enough for the whole call (baresip hangs up when its source ends).
    let spec = hound::WavSpec {
        channels: 1,
        sample_rate: 8000,
        bits_per_sample: 16,
        sample_format: hound::SampleFormat::Int,
    };
    let mut w = hound::WavWriter::create(root.join("source.wav"), spec).unwrap();
    for i in 0..8000 * 30 {
        let s = (f64::from(i) * 2.0 * std::f64::consts::PI * 440.0 / 8000.0).sin() * 8000.0;
        w.write_sample(s as i16).unwrap();
    }
    w.finalize().unwrap();
    let rtp = free_port() & !1;
    let config = format!(
        "sip_listen 127.0.0.1:{sip_port}\n\
         net_interface 127.0.0.1\n\
         audio_source aufile,{source}\n\
         audio_player aubridge,nil\n\
         audio_alert aubridge,nil\n\
         ausrc_srate 8000\n\
         auplay_srate 8000\n\
         ausrc_channels 1\n\
         auplay_channels 1\n\
         rtp_ports {rtp}-{rtp_end}\n\
         module_path /usr/lib/baresip/modules\n\
         module g711.so\n\
         module aufile.so\n\
         module aubridge.so\n\
         module_app menu.so\n\
         module_app ctrl_tcp.so\n\
         ctrl_tcp_listen 127.0.0.1:{ctrl_port}\n\
         module_tmp account.so\n\
         module_tmp uuid.so\n",
        source = root.join("source.wav").display(),
        rtp_end = rtp + 9,
    );
    std::fs::write(root.join("config"), config).unwrap();
    std::fs::write(
        root.join("accounts"),
        "<sip:caller@127.0.0.1>;regint=0;audio_codecs=PCMU\n",
    )
    .unwrap();
    dir
}

/// baresip's output (stdout and stderr), its status line's `\r` redraws split off.
fn spawn_baresip(dir: &std::path::Path) -> (Child, Arc<Mutex<Vec<String>>>) {
    let mut child = Command::new("baresip")
        .arg("-f")
        .arg(dir)
        .args(["-s", "-t", "40"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn baresip (bash scripts/install-test-deps.sh installs it)");
    let out = Arc::new(Mutex::new(Vec::new()));
    for stream in [
        Box::new(child.stdout.take().unwrap()) as Box<dyn Read + Send>,
        Box::new(child.stderr.take().unwrap()),
    ] {
        let out = Arc::clone(&out);
        thread::spawn(move || {
            for line in BufReader::new(stream).split(b'\n') {
                let Ok(line) = line else { break };
                let line = String::from_utf8_lossy(&line).into_owned();
                let mut out = out.lock().unwrap();
                out.extend(line.split('\r').map(str::to_owned));
            }
        });
    }
    (child, out)
}

#[test]
fn baresip_holds_resumes_and_hangs_up_through_kamailio() {
    let daemon = proxied_daemon();
    let kam = Kamailio::start(daemon.udp_addr());
    let sip_port = free_port();
    let ctrl_port = free_port();
    let dir = baresip_dir(sip_port, ctrl_port);
    let (mut child, out) = spawn_baresip(dir.path());
    let output = || out.lock().unwrap().join("\n");
    let context = || {
        format!(
            "---- baresip ----\n{}\n---- kamailio ----\n{}",
            output(),
            kam.log()
        )
    };
    let mut ctrl = Ctrl::connect(format!("127.0.0.1:{ctrl_port}").parse().unwrap());
    let wait = Duration::from_secs(10);
    let run = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        ctrl.command("dial", &format!("sip:15551230000@{}", kam.addr));
        ctrl.expect_event("CALL_ESTABLISHED", None, wait);
        thread::sleep(Duration::from_millis(500));
        // Hold: the re-INVITE goes through the proxy; its 200 (our SDP answer) must come
        // back to baresip for it to report the remote SDP.
        ctrl.command("hold", "");
        ctrl.expect_event("CALL_REMOTE_SDP", Some("answer"), wait);
        thread::sleep(Duration::from_millis(500));
        ctrl.command("resume", "");
        ctrl.expect_event("CALL_REMOTE_SDP", Some("answer"), wait);
        thread::sleep(Duration::from_millis(500));
        ctrl.command("hangup", "");
        ctrl.expect_event("CALL_CLOSED", None, wait);
    }));
    let cdr = daemon.wait_for_cdr(wait, |c| c["cause"] == "caller-bye");
    // baresip logs the 200 to its BYE once it arrives.
    let deadline = Instant::now() + wait;
    while Instant::now() < deadline && !bye_answered(&output()) {
        thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let _ = child.wait();
    if let Err(e) = run {
        eprintln!("{}", context());
        std::panic::resume_unwind(e);
    }
    let text = output();
    assert!(text.contains("call: hold"), "{}", context());
    assert!(text.contains("call: resume"), "{}", context());
    let answers = reinvite_answers(&text);
    assert!(
        answers.len() >= 2,
        "baresip received {} answers to its re-INVITEs:\n{}",
        answers.len(),
        context()
    );
    assert!(
        answers[0].contains("a=recvonly"),
        "the hold was answered recvonly (paused):\n{}",
        answers[0]
    );
    assert!(
        answers[1].contains("a=sendrecv"),
        "the resume was answered sendrecv:\n{}",
        answers[1]
    );
    assert!(bye_answered(&text), "no 200 to the BYE:\n{}", context());
    let cdr = cdr.unwrap_or_else(|| panic!("no caller-bye CDR:\n{}", context()));
    assert_eq!(cdr["result_code"], 200);
    let log = kam.log();
    assert!(!log.contains("without Route"), "{log}");
    assert!(
        log.contains("in-dialog INVITE via route set"),
        "the re-INVITEs went through the proxy:\n{log}"
    );
}

/// The 200 OK responses to baresip's re-INVITEs in its SIP trace (`-s`), in order: every
/// 200 to an INVITE after the first (the initial INVITE's), retransmissions counted once.
fn reinvite_answers(trace: &str) -> Vec<String> {
    let mut seen = Vec::new();
    let mut answers = Vec::new();
    for m in sip_messages(trace) {
        if !m.starts_with("SIP/2.0 200") {
            continue;
        }
        let Some(cseq) = header_lines(&m, "CSeq").first().map(|c| (*c).to_owned()) else {
            continue;
        };
        if cseq.ends_with("INVITE") && !seen.contains(&cseq) {
            seen.push(cseq);
            answers.push(m);
        }
    }
    answers.into_iter().skip(1).collect()
}

fn bye_answered(trace: &str) -> bool {
    sip_messages(trace).iter().any(|m| {
        m.starts_with("SIP/2.0 200")
            && header_lines(m, "CSeq")
                .first()
                .is_some_and(|c| c.ends_with("BYE"))
    })
}

/// `text` without ANSI colour sequences (`ESC [ … m`).
fn strip_ansi(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// The SIP messages in a baresip trace: each starts at a request or status line and runs
/// to the next one or to baresip's `#` separator; blank lines (its CRLFs split in two) are
/// dropped, lines re-joined with CRLF.
fn sip_messages(trace: &str) -> Vec<String> {
    let trace = strip_ansi(trace);
    let mut msgs: Vec<Vec<&str>> = Vec::new();
    let mut open = false;
    for line in trace.lines() {
        let l = line.trim();
        if l.is_empty() {
            continue;
        }
        let starts = l.starts_with("SIP/2.0 ")
            || ["INVITE ", "ACK ", "BYE ", "OPTIONS ", "UPDATE ", "CANCEL "]
                .iter()
                .any(|m| l.starts_with(m) && l.ends_with("SIP/2.0"));
        if starts {
            msgs.push(vec![l]);
            open = true;
        } else if l == "#" {
            open = false;
        } else if open && let Some(m) = msgs.last_mut() {
            m.push(l);
        }
    }
    msgs.into_iter().map(|m| m.join("\r\n")).collect()
}
