#![allow(clippy::unwrap_used, clippy::expect_used)]
//! TCP exhaustion (issues 18 and 19): connections that never complete a message are
//! closed after `tcp_idle_timeout_s`, connections over `tcp_max_connections_per_source`
//! are closed at once, and meanwhile legitimate SIPp calls over TCP from another address
//! succeed; with 10,000 such connections, none of 200 calls fails and the daemon's RSS
//! comes back to within 20 % of idle.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use common::{Daemon, ProfileSpec, sipp, sipp_scenario};

/// Whether the daemon closed `s` within `within` (read returns 0 or an error).
fn closed_within(s: &mut TcpStream, within: Duration) -> Option<Duration> {
    let start = Instant::now();
    s.set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    let mut buf = [0u8; 256];
    while start.elapsed() < within {
        match s.read(&mut buf) {
            Ok(0) => return Some(start.elapsed()),
            Ok(_) => {}
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(_) => return Some(start.elapsed()),
        }
    }
    None
}

/// A non-blocking look: has the daemon closed `s` already?
fn is_closed_now(mut s: &TcpStream) -> bool {
    s.set_nonblocking(true).unwrap();
    let mut buf = [0u8; 16];
    let closed = match s.read(&mut buf) {
        Ok(0) => true,
        Ok(_) => false,
        Err(e) => e.kind() != std::io::ErrorKind::WouldBlock,
    };
    s.set_nonblocking(false).unwrap();
    closed
}

fn connect_from(ip: &str, to: SocketAddr) -> TcpStream {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let stream = rt.block_on(async {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind(format!("{ip}:0").parse().unwrap()).unwrap();
        socket.connect(to).await.unwrap()
    });
    let _guard = rt.enter();
    let std = stream.into_std().unwrap();
    std.set_nonblocking(false).unwrap();
    std
}

#[test]
fn idle_half_open_and_surplus_tcp_connections_are_closed() {
    let text = ProfileSpec {
        extra: "[profile.security]\ntcp_idle_timeout_s = 2\ntcp_max_connections_per_source = 20\n",
        ..ProfileSpec::default()
    }
    .render();
    let daemon = Daemon::spawn(&text);
    let target = daemon.tcp_addr();

    // 30 silent connections from 127.0.0.2: 20 accepted, 10 over the cap.
    let mut conns: Vec<TcpStream> = (0..30).map(|_| connect_from("127.0.0.2", target)).collect();
    // One more that sends half a header.
    let mut half = connect_from("127.0.0.3", target);
    half.write_all(b"INVITE sip:x@127.0.0.1 SIP/2.0\r\nVia: SIP/2.0/TCP 127.0.0.3:5060;bra")
        .unwrap();

    std::thread::sleep(Duration::from_millis(300));
    let surplus = conns.iter().filter(|c| is_closed_now(c)).count();
    assert_eq!(
        surplus, 10,
        "connections over the per-source cap closed at once"
    );

    // A legitimate call over TCP from 127.0.0.1 meanwhile.
    let result = sipp(
        &sipp_scenario("basic_call.xml"),
        target,
        &["-s", "+15551234567", "-t", "t1"],
    );
    result.assert_success();

    // The rest close at the idle timeout (2 s after they opened), the half header too.
    let mut closed = 0;
    for c in conns.iter_mut() {
        if closed_within(c, Duration::from_secs(5)).is_some() {
            closed += 1;
        }
    }
    let half_closed = closed_within(&mut half, Duration::from_secs(5));
    eprintln!(
        "surplus closed at once: {surplus}; the others closed: {closed}; half header: {half_closed:?}"
    );
    assert_eq!(closed, 30, "every silent connection closed by the daemon");
    assert!(half_closed.is_some(), "the half-sent header was not closed");

    // The cap counts open connections: after they closed, new ones are accepted.
    let mut again = connect_from("127.0.0.2", target);
    assert!(
        closed_within(&mut again, Duration::from_millis(500)).is_none(),
        "a new connection after the others closed is accepted"
    );
}

/// Raises this process's soft RLIMIT_NOFILE to `want` (or its hard limit) with
/// util-linux `prlimit` (no unsafe code here); returns the soft limit in force.
fn raise_nofile(want: u64) -> u64 {
    let pid = std::process::id().to_string();
    let read = |col: &str| -> u64 {
        let out = std::process::Command::new("prlimit")
            .args([
                "--pid",
                &pid,
                "--nofile",
                "--raw",
                "--noheadings",
                "-o",
                col,
            ])
            .output()
            .expect("prlimit (util-linux)");
        let text = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        if text == "unlimited" {
            u64::MAX
        } else {
            text.parse().unwrap_or(0)
        }
    };
    let soft = want.min(read("HARD"));
    let status = std::process::Command::new("prlimit")
        .args(["--pid", &pid, &format!("--nofile={soft}:")])
        .status()
        .unwrap();
    assert!(status.success(), "prlimit failed");
    read("SOFT")
}

/// A connection from `ip` to `to`, blocking, made with socket2 (no runtime per
/// connection: ten thousand of them are opened).
fn connect_fast(ip: std::net::IpAddr, to: SocketAddr) -> std::io::Result<TcpStream> {
    let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
    s.bind(&SocketAddr::new(ip, 0).into())?;
    s.connect_timeout(&to.into(), Duration::from_secs(5))?;
    Ok(s.into())
}

/// VmRSS of `pid` in KiB.
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

/// Issue 18's acceptance: 10,000 idle or half-open TCP connections from one address
/// fail none of 200 legitimate calls, are all closed by the daemon within the
/// configured timeout, and the daemon's RSS comes back to within 20 % of its idle
/// value afterwards.
#[test]
fn ten_thousand_idle_and_half_open_connections_fail_no_call_and_leave_no_memory() {
    const CONNS: usize = 10_000;
    const IDLE_TIMEOUT: u64 = 3;
    let limit = raise_nofile(CONNS as u64 + 2_000);
    assert!(
        limit >= CONNS as u64 + 500,
        "RLIMIT_NOFILE {limit} is too low for {CONNS} connections"
    );
    let security = format!("[profile.security]\ntcp_idle_timeout_s = {IDLE_TIMEOUT}\n");
    let text = ProfileSpec {
        max_calls: 50,
        extra: &security,
        ..ProfileSpec::default()
    }
    .render();
    let daemon = Daemon::spawn(&text);
    let target = daemon.tcp_addr();
    let pid = daemon.pid();
    // Idle: the steady state after calls without an attack. Calls leave memory with
    // the allocator (its per-thread arenas keep what concurrent calls used on each
    // worker thread); measured here, RSS grows by about 14, 8 and 7 MB over the first
    // three rounds of 200 calls, then by under 0.5 MB a round. So the baseline is taken
    // after three rounds, and what is compared is what the connections leave behind.
    let two_hundred_calls = || {
        sipp(
            &sipp_scenario("basic_call.xml"),
            target,
            &[
                "-s",
                "+15551234567",
                "-t",
                "t1",
                "-m",
                "200",
                "-r",
                "20",
                "-l",
                "40",
                "-timeout",
                "120s",
            ],
        )
    };
    let fresh = rss_kib(pid);
    for _ in 0..3 {
        two_hundred_calls().assert_success();
    }
    std::thread::sleep(Duration::from_millis(500));
    let idle = rss_kib(pid);

    // 10,000 connections from 127.0.0.2, every other one sending half a header,
    // while 200 SIPp calls run over TCP from 127.0.0.1.
    let attacker: std::net::IpAddr = "127.0.0.2".parse().unwrap();
    let opener = std::thread::spawn(move || {
        let start = Instant::now();
        let mut conns = Vec::with_capacity(CONNS);
        let mut failed = 0;
        for i in 0..CONNS {
            match connect_fast(attacker, target) {
                Ok(mut s) => {
                    if i % 2 == 1 {
                        let _ = s.write_all(b"INVITE sip:x@127.0.0.1 SIP/2.0\r\nVia: SIP/2.0/TCP 127.0.0.2:5060;bra");
                    }
                    conns.push(s);
                }
                Err(_) => failed += 1,
            }
        }
        (conns, failed, start.elapsed())
    });
    let calls = sipp(
        &sipp_scenario("basic_call.xml"),
        target,
        &[
            "-s",
            "+15551234567",
            "-t",
            "t1",
            "-m",
            "200",
            "-r",
            "20",
            "-l",
            "60",
            "-timeout",
            "120s",
        ],
    );
    let (conns, connect_failed, took) = opener.join().unwrap();
    let during = rss_kib(pid);
    eprintln!(
        "{} connections opened in {took:?} ({connect_failed} connects failed); SIPp {:?} ok, \
         {:?} failed",
        conns.len(),
        calls.successful_calls,
        calls.failed_calls
    );
    calls.assert_success();
    assert_eq!(calls.successful_calls, Some(200));
    assert_eq!(calls.failed_calls, Some(0));
    assert!(
        conns.len() >= CONNS * 9 / 10,
        "only {} connections opened",
        conns.len()
    );

    // Every one is closed by the daemon within the timeout (plus scheduling slack),
    // counted from the end of the opening.
    let deadline = Instant::now() + Duration::from_secs(IDLE_TIMEOUT + 5);
    let mut open: Vec<&TcpStream> = conns.iter().collect();
    while !open.is_empty() && Instant::now() < deadline {
        open.retain(|c| !is_closed_now(c));
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(
        open.is_empty(),
        "{} connections still open 5 s after the timeout",
        open.len()
    );
    drop(conns);

    // Memory given back: RSS within 20 % of idle once they are gone.
    let mut after = rss_kib(pid);
    let settle = Instant::now() + Duration::from_secs(10);
    while after > idle * 6 / 5 && Instant::now() < settle {
        std::thread::sleep(Duration::from_millis(500));
        after = rss_kib(pid);
    }
    eprintln!(
        "RSS: fresh {fresh} KiB, idle (after 600 calls) {idle} KiB, during {during} KiB, \
         after {after} KiB"
    );
    assert!(
        after <= idle * 6 / 5,
        "RSS {after} KiB is not within 20 % of idle ({idle} KiB)"
    );
}
