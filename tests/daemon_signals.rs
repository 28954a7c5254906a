#![allow(clippy::unwrap_used, clippy::expect_used)]
//! `sipbridge run` and the stop signals (issue 3, Build 3; issue 7 drain): SIGINT, and
//! SIGTERM once `[profile] drain_grace_s` (here 0) has passed, end every call with a BYE,
//! log each call's CDR with cause `shutdown` and hangup side `bridge`, and exit with
//! status 0. SIGINT does not wait for the grace period (here the default 30 s).
//! tests/lifecycle_drain.rs covers the drain itself.
//!
//! Each test holds a call up with SIPp's `bridge_bye.xml` (which waits for the bridge's
//! BYE and answers it 200), signals the daemon with `kill`, and checks what SIPp saw, the
//! CDR, and how the process ended.
//!
//! Reading a child's exit status without reaping it is `lifecycle_support::wait_for_exit`
//! (the harness's [`Daemon`] keeps its `Child` to itself).
//!
//! The same check runs over TCP: shutdown waits (bounded) for the BYEs to be answered,
//! so the connection stays open for the 200.
//!
//! Not tested: a new INVITE during shutdown getting 503; the window lasts as long as the
//! slowest BYE, which loopback peers answer within a millisecond.

mod common;
mod lifecycle_support;

use std::process::Command;
use std::thread;
use std::time::{Duration, Instant};

use common::{Daemon, ProfileSpec, sipp, sipp_scenario};
use lifecycle_support::{log_message, wait_for_exit, with_drain_grace};

/// How long the daemon may take to exit after the signal.
const EXIT_WITHIN: Duration = Duration::from_secs(5);

/// Holds a call up, sends `signal` (`-TERM`, `-INT`) to the daemon, and checks the BYE,
/// the CDR, the `logged` lines and the exit. `grace_s`: the profile's `drain_grace_s`
/// (`None`: the default).
fn call_ended_by(signal: &str, logged: &[&str], transport: &[&str], grace_s: Option<u32>) {
    // RTP timeout far beyond the test: only the signal may end the call.
    let profile = ProfileSpec {
        media: "rtp_timeout_s = 60",
        ..ProfileSpec::default()
    }
    .render();
    let profile = match grace_s {
        Some(s) => with_drain_grace(&profile, s),
        None => profile,
    };
    let daemon = Daemon::spawn(&profile);
    let tcp = transport == ["-t", "t1"];
    let target = if tcp {
        daemon.tcp_addr()
    } else {
        daemon.udp_addr()
    };
    let mut args = vec!["-s", "+15551234567", "-timeout", "20s"];
    args.extend_from_slice(transport);
    let args: Vec<String> = args.iter().map(|a| (*a).to_string()).collect();
    let carrier = thread::spawn(move || {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        sipp(&sipp_scenario("bridge_bye.xml"), target, &args)
    });

    // The call is up once the daemon logs the answer; give SIPp's ACK a moment to land.
    daemon
        .wait_for_log(Duration::from_secs(15), |l| {
            log_message(l).as_deref() == Some("answered")
        })
        .expect("the daemon answered the call");
    thread::sleep(Duration::from_millis(500));
    assert!(daemon.cdrs().is_empty(), "a CDR before the signal");

    let pid = daemon.pid();
    let signalled = Instant::now();
    let status = Command::new("kill")
        .args([signal, &pid.to_string()])
        .status()
        .unwrap();
    assert!(status.success(), "kill {signal} {pid}: {status}");

    let exit = wait_for_exit(pid, EXIT_WITHIN);
    let exit_after = signalled.elapsed();
    let result = carrier.join().unwrap();
    result.assert_success();
    // SIPp saw the BYE and sent the 200 (its message trace holds both).
    assert!(
        result.messages.contains("BYE sip:"),
        "SIPp's trace has no BYE:\n{}",
        result.report()
    );

    let cdrs = daemon.cdrs();
    assert_eq!(cdrs.len(), 1, "CDRs: {cdrs:?}");
    let cdr = &cdrs[0];
    assert_eq!(cdr["cause"], "shutdown", "{cdr}");
    assert_eq!(cdr["hangup_side"], "bridge", "{cdr}");
    assert_eq!(cdr["result_code"], 200, "{cdr}");
    for logged in logged {
        assert!(
            daemon
                .logs()
                .iter()
                .any(|l| log_message(l).as_deref() == Some(*logged)),
            "no {logged:?} log line"
        );
    }
    assert!(
        daemon
            .logs()
            .iter()
            .any(|l| log_message(l).as_deref() == Some("stopped")),
        "no \"stopped\" log line"
    );
    eprintln!("{signal}: daemon exited after {exit_after:?} with wait status {exit:?}; CDR {cdr}");
    assert_eq!(
        exit,
        Some(0),
        "the daemon did not exit with status 0 within {EXIT_WITHIN:?} (wait status {exit:?})"
    );
}

const SIGTERM_LINES: &[&str] = &["SIGTERM: draining", "drain grace over: ending calls"];

#[test]
fn sigterm_ends_the_call_with_bye_and_exits_0() {
    call_ended_by("-TERM", SIGTERM_LINES, &[], Some(0));
}

/// Over TCP the shutdown must wait for the BYE's 200 before closing the connection, or
/// SIPp (which lingers for BYE retransmissions) fails the call.
#[test]
fn sigterm_ends_a_tcp_call_with_bye_and_exits_0() {
    call_ended_by("-TERM", SIGTERM_LINES, &["-t", "t1"], Some(0));
}

#[test]
fn sigint_ends_the_call_with_bye_and_exits_0() {
    call_ended_by("-INT", &["SIGINT: ending calls"], &[], None);
}
