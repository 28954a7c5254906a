#![allow(clippy::unwrap_used, clippy::expect_used)]
//! `sipbridge run` and the stop signals (issue 3, Build 3): on SIGTERM or SIGINT the daemon
//! ends every call with a BYE, logs each call's CDR with cause `shutdown` and hangup side
//! `bridge`, and exits with status 0.
//!
//! Each test holds a call up with SIPp's `bridge_bye.xml` (which waits for the bridge's
//! BYE and answers it 200), signals the daemon with `kill`, and checks what SIPp saw, the
//! CDR, and how the process ended.
//!
//! Owns: reading a child's exit status without reaping it (from `/proc/PID/stat` while it
//! is a zombie), because the harness's [`Daemon`] keeps its `Child` to itself.
//!
//! The same check runs over TCP: shutdown waits (bounded) for the BYEs to be answered,
//! so the connection stays open for the 200.
//!
//! Not tested: a new INVITE during shutdown getting 503; the window lasts as long as the
//! slowest BYE, which loopback peers answer within a millisecond.

mod common;

use std::process::Command;
use std::thread;
use std::time::{Duration, Instant};

use common::{Daemon, ProfileSpec, sipp, sipp_scenario};

/// How long the daemon may take to exit after the signal.
const EXIT_WITHIN: Duration = Duration::from_secs(5);

/// The `message` field of one of the daemon's JSON log lines.
fn log_message(line: &str) -> Option<String> {
    let value: serde_json::Value = serde_json::from_str(line).ok()?;
    let fields = match value.get("fields") {
        Some(fields) if fields.is_object() => fields,
        _ => &value,
    };
    Some(fields.get("message")?.as_str()?.to_string())
}

/// What `/proc/PID/stat` says about a process: its state letter and, once it is a zombie,
/// its wait status (field 52, `exit_code`, in `waitpid(2)` form). `None` once it is gone.
fn proc_state(pid: u32) -> Option<(char, i32)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name, which is in parentheses and may hold spaces.
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let state = fields.first()?.chars().next()?;
    // `rest` starts at field 3 (state), so field 52 is at index 49.
    let wait_status = fields.get(49)?.parse().ok()?;
    Some((state, wait_status))
}

/// Waits up to `timeout` for the (unreaped) child `pid` to exit and returns its wait
/// status. Nothing reaps the daemon until its `Drop`, so it stays a zombie meanwhile.
fn wait_for_exit(pid: u32, timeout: Duration) -> Option<i32> {
    let deadline = Instant::now() + timeout;
    loop {
        match proc_state(pid) {
            Some(('Z', status)) => return Some(status),
            Some(_) => {}
            None => panic!("process {pid} vanished: something reaped it"),
        }
        if Instant::now() >= deadline {
            return None;
        }
        thread::sleep(Duration::from_millis(20));
    }
}

/// Holds a call up, sends `signal` (`-TERM`, `-INT`) to the daemon, and checks the BYE,
/// the CDR and the exit.
fn call_ended_by(signal: &str, logged: &str, transport: &[&str]) {
    // RTP timeout far beyond the test: only the signal may end the call.
    let daemon = Daemon::spawn(
        &ProfileSpec {
            media: "rtp_timeout_s = 60",
            ..ProfileSpec::default()
        }
        .render(),
    );
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
    assert!(
        daemon
            .logs()
            .iter()
            .any(|l| log_message(l).as_deref() == Some(logged)),
        "no {logged:?} log line"
    );
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

#[test]
fn sigterm_ends_the_call_with_bye_and_exits_0() {
    call_ended_by("-TERM", "SIGTERM: ending calls", &[]);
}

/// Fails today: the daemon counts a call as ended when its BYE is *sent*, so shutdown
/// does not wait for the BYE's 200 and closes the TCP connection ~20 ms after the signal,
/// while SIPp still holds the call (it lingers 200 ms for BYE retransmissions) and fails it.
#[test]
fn sigterm_ends_a_tcp_call_with_bye_and_exits_0() {
    call_ended_by("-TERM", "SIGTERM: ending calls", &["-t", "t1"]);
}

#[test]
fn sigint_ends_the_call_with_bye_and_exits_0() {
    call_ended_by("-INT", "SIGINT: ending calls", &[]);
}
