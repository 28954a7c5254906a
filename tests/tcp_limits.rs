#![allow(clippy::unwrap_used, clippy::expect_used)]
//! TCP exhaustion (issue 19): connections that never complete a message are closed
//! after `tcp_idle_timeout_s`, connections over `tcp_max_connections_per_source` are
//! closed at once, and meanwhile a legitimate SIPp call over TCP from another address
//! succeeds.

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
