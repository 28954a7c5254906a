//! SIPp as the carrier against the real `sipbridge run` on loopback: every call flow of
//! issue 3's acceptance list, over UDP (and TCP for the basic call). Each test starts its
//! own daemon (port-0 listeners, an RTP range of its own) so tests run in parallel, and
//! asserts SIPp's exit code 0 with 0 failed calls plus the daemon's CDR where it proves
//! the outcome (log target `cdr`).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::thread;
use std::time::Duration;

use common::{Daemon, ProfileSpec, SippResult, profile_toml, sipp, sipp_scenario};
use serde_json::Value;

/// A number the catch-all route (or a test's exact route) sends to `demo`.
const NUMBER: &str = "+15551230000";
/// How long a CDR may take to appear after SIPp finished.
const CDR_WAIT: Duration = Duration::from_secs(5);

fn run(daemon_addr: std::net::SocketAddr, scenario: &str, args: &[&str]) -> SippResult {
    sipp(&sipp_scenario(scenario), daemon_addr, args)
}

/// The CDR of the only call SIPp placed (SIPp's Call-ID is `1-<pid>@127.0.0.1`).
fn cdr_for(daemon: &Daemon, result: &SippResult) -> Value {
    let call_id = call_id_sent(result);
    daemon
        .wait_for_cdr(CDR_WAIT, |c| c["call_id"] == call_id.as_str())
        .unwrap_or_else(|| {
            panic!(
                "no CDR for {call_id}; CDRs: {:?}\n{}",
                daemon.cdrs(),
                result.report()
            )
        })
}

/// The Call-ID of the first request SIPp sent, from its message trace.
fn call_id_sent(result: &SippResult) -> String {
    result
        .messages
        .lines()
        .find_map(|l| l.strip_prefix("Call-ID: "))
        .unwrap_or_else(|| panic!("no Call-ID in SIPp trace:\n{}", result.report()))
        .trim()
        .to_owned()
}

/// The status codes SIPp received, in order (from its message trace).
fn statuses_received(result: &SippResult) -> Vec<u16> {
    let mut out = Vec::new();
    let mut lines = result.messages.lines().peekable();
    while let Some(line) = lines.next() {
        if line.contains("message received") {
            // Skip the blank line after the banner, then read the start line.
            let start = lines.by_ref().find(|l| !l.trim().is_empty()).unwrap_or("");
            if let Some(code) = start.strip_prefix("SIP/2.0 ") {
                out.push(code[..3].parse().unwrap());
            }
        }
    }
    out
}

/// The first received message whose start line begins with `start`, as text.
fn received_message(result: &SippResult, start: &str) -> String {
    result
        .messages
        .split("-----------------------------------------------")
        .filter_map(|block| {
            let (_, message) = block.split_once("message received")?;
            let (_, message) = message.split_once('\n')?;
            Some(message.trim_start())
        })
        .find(|message| message.starts_with(start))
        .unwrap_or_else(|| panic!("SIPp received no {start:?}:\n{}", result.report()))
        .to_owned()
}

fn assert_cdr(cdr: &Value, result_code: u64, cause: &str) {
    assert_eq!(cdr["result_code"], result_code, "{cdr}");
    assert_eq!(cdr["cause"], cause, "{cdr}");
}

#[test]
fn basic_call_udp() {
    let daemon = Daemon::spawn(&profile_toml(""));
    let result = run(daemon.udp_addr(), "basic_call.xml", &["-s", NUMBER]);
    result.assert_success();
    assert_eq!(result.successful_calls, Some(1));
    assert_eq!(statuses_received(&result), [100, 180, 200, 200]);
    let ok = received_message(&result, "SIP/2.0 200");
    assert!(ok.contains("Content-Type: application/sdp"), "{ok}");
    assert!(ok.contains("a=rtpmap:0 PCMU/8000"), "{ok}");
    let cdr = cdr_for(&daemon, &result);
    assert_cdr(&cdr, 200, "caller-bye");
    assert_eq!(cdr["hangup_side"], "caller");
    assert_eq!(cdr["codec"], "PCMU");
    assert_eq!(cdr["tenant"], "demo");
    assert_eq!(cdr["trunk"], "local");
    assert_eq!(cdr["to"], NUMBER);
}

/// A tenant with `early_media`: the prompt plays in 183 Session Progress and the
/// 200 comes once it has finished (the 4.4 s disclosure).
#[test]
fn early_media_prompt_before_answer() {
    let profile = ProfileSpec {
        tenant: "early_media = true",
        ..ProfileSpec::default()
    }
    .render();
    let daemon = Daemon::spawn(&profile);
    let result = run(daemon.udp_addr(), "basic_call.xml", &["-s", NUMBER]);
    result.assert_success();
    assert_eq!(statuses_received(&result), [100, 183, 200, 200]);
    let progress = received_message(&result, "SIP/2.0 183");
    assert!(progress.contains("a=rtpmap:0 PCMU/8000"), "{progress}");
    let cdr = cdr_for(&daemon, &result);
    assert_cdr(&cdr, 200, "caller-bye");
    let rang_ms = cdr["answered_at"].as_u64().unwrap() - cdr["started_at"].as_u64().unwrap();
    assert!(
        (4_300..8_000).contains(&rang_ms),
        "answered {rang_ms} ms after the INVITE; the prompt lasts 4.44 s"
    );
}

#[test]
fn basic_call_tcp() {
    let daemon = Daemon::spawn(&profile_toml(""));
    let result = run(
        daemon.tcp_addr(),
        "basic_call.xml",
        &["-s", NUMBER, "-t", "t1"],
    );
    result.assert_success();
    assert!(
        result.messages.contains("TCP message sent"),
        "{}",
        result.report()
    );
    assert!(
        result.messages.contains("Via: SIP/2.0/TCP"),
        "{}",
        result.report()
    );
    let cdr = cdr_for(&daemon, &result);
    assert_cdr(&cdr, 200, "caller-bye");
    assert_eq!(cdr["codec"], "PCMU");
}

#[test]
fn twenty_calls_at_ten_per_second() {
    let daemon = Daemon::spawn(&profile_toml(""));
    let result = run(
        daemon.udp_addr(),
        "basic_call.xml",
        &["-s", NUMBER, "-m", "20", "-r", "10", "-l", "20"],
    );
    result.assert_success();
    assert_eq!(result.successful_calls, Some(20), "{}", result.report());
    let cdrs = daemon.wait_for_cdrs(20, CDR_WAIT);
    assert_eq!(cdrs.len(), 20, "{cdrs:?}");
    for cdr in &cdrs {
        assert_cdr(cdr, 200, "caller-bye");
    }
    let mut ids: Vec<&str> = cdrs
        .iter()
        .map(|c| c["call_id"].as_str().unwrap())
        .collect();
    ids.sort_unstable();
    ids.dedup();
    assert_eq!(ids.len(), 20, "one CDR per call");
}

#[test]
fn cancel_before_answer() {
    let profile = ProfileSpec {
        sip: "answer_delay_ms = 2000",
        ..ProfileSpec::default()
    }
    .render();
    let daemon = Daemon::spawn(&profile);
    let result = run(daemon.udp_addr(), "cancel.xml", &["-s", NUMBER]);
    result.assert_success();
    let statuses = statuses_received(&result);
    assert!(
        statuses.ends_with(&[180, 200, 487]),
        "{statuses:?}\n{}",
        result.report()
    );
    let cdr = cdr_for(&daemon, &result);
    assert_cdr(&cdr, 487, "cancelled");
    assert_eq!(cdr["answered_at"], Value::Null);
}

#[test]
fn bridge_hangs_up_on_rtp_timeout() {
    let profile = ProfileSpec {
        media: "rtp_timeout_s = 2",
        ..ProfileSpec::default()
    }
    .render();
    let daemon = Daemon::spawn(&profile);
    let started = std::time::Instant::now();
    let result = run(
        daemon.udp_addr(),
        "bridge_bye.xml",
        &["-s", NUMBER, "-timeout", "15s"],
    );
    result.assert_success();
    // The BYE came after the 2 s of silence, not at once and not much later.
    let elapsed = started.elapsed();
    assert!(
        elapsed >= Duration::from_secs(2) && elapsed < Duration::from_secs(8),
        "{elapsed:?}"
    );
    assert!(result.messages.contains("BYE sip:"), "{}", result.report());
    let cdr = cdr_for(&daemon, &result);
    assert_cdr(&cdr, 200, "rtp-timeout");
    assert_eq!(cdr["hangup_side"], "bridge");
}

#[test]
fn options_answers_200_with_allow() {
    let daemon = Daemon::spawn(&profile_toml(""));
    let result = run(daemon.udp_addr(), "options.xml", &["-s", NUMBER]);
    result.assert_success();
    let ok = received_message(&result, "SIP/2.0 200");
    assert!(ok.contains("Allow: INVITE"), "{ok}");
    assert!(ok.contains("Accept: application/sdp"), "{ok}");
    // OPTIONS is not a call attempt.
    thread::sleep(Duration::from_millis(200));
    assert!(daemon.cdrs().is_empty(), "{:?}", daemon.cdrs());
}

#[test]
fn unknown_method_gets_501() {
    let daemon = Daemon::spawn(&profile_toml(""));
    let result = run(daemon.udp_addr(), "unknown_method.xml", &["-s", NUMBER]);
    result.assert_success();
    let resp = received_message(&result, "SIP/2.0 501");
    assert!(resp.contains("Allow: "), "{resp}");
}

#[test]
fn no_route_gets_404() {
    let profile = ProfileSpec {
        routes: Some("[[route]]\nnumber = \"+15551230000\"\ntenant = \"demo\"\n"),
        ..ProfileSpec::default()
    }
    .render();
    let daemon = Daemon::spawn(&profile);
    let result = run(daemon.udp_addr(), "no_route.xml", &["-s", "+15559999999"]);
    result.assert_success();
    assert_eq!(statuses_received(&result).last(), Some(&404));
    let cdr = cdr_for(&daemon, &result);
    assert_cdr(&cdr, 404, "no-route");
    // The routed number on the same daemon still connects.
    let routed = run(daemon.udp_addr(), "basic_call.xml", &["-s", NUMBER]);
    routed.assert_success();
}

/// Starts a call held up for `hold_ms` on a thread and waits until the daemon answered it.
fn hold_one_call(daemon: &Daemon, hold_ms: u32) -> thread::JoinHandle<SippResult> {
    let addr = daemon.udp_addr();
    let hold = hold_ms.to_string();
    let handle = thread::spawn(move || {
        sipp(
            &sipp_scenario("held_call.xml"),
            addr,
            &["-s", NUMBER, "-d", &hold],
        )
    });
    daemon
        .wait_for_log(Duration::from_secs(10), |l| l.contains("\"answered\""))
        .expect("the held call was answered");
    handle
}

#[test]
fn tenant_limit_gets_486() {
    let profile = ProfileSpec {
        tenant: "max_calls = 1",
        ..ProfileSpec::default()
    }
    .render();
    let daemon = Daemon::spawn(&profile);
    let held = hold_one_call(&daemon, 3000);
    let result = run(daemon.udp_addr(), "busy.xml", &["-s", NUMBER]);
    result.assert_success();
    assert_eq!(statuses_received(&result).last(), Some(&486));
    let busy_cdr = cdr_for(&daemon, &result);
    assert_cdr(&busy_cdr, 486, "busy");
    held.join().unwrap().assert_success();
    // The slot is free again once the first call ended.
    let after = run(daemon.udp_addr(), "basic_call.xml", &["-s", NUMBER]);
    after.assert_success();
}

#[test]
fn trunk_limit_gets_486() {
    let profile = ProfileSpec {
        trunk: "max_calls = 1",
        ..ProfileSpec::default()
    }
    .render();
    let daemon = Daemon::spawn(&profile);
    let held = hold_one_call(&daemon, 3000);
    let result = run(daemon.udp_addr(), "busy.xml", &["-s", NUMBER]);
    result.assert_success();
    assert_eq!(statuses_received(&result).last(), Some(&486));
    assert_cdr(&cdr_for(&daemon, &result), 486, "busy");
    held.join().unwrap().assert_success();
}

#[test]
fn profile_limit_gets_503_with_retry_after() {
    let profile = ProfileSpec {
        max_calls: 1,
        ..ProfileSpec::default()
    }
    .render();
    let daemon = Daemon::spawn(&profile);
    let held = hold_one_call(&daemon, 3000);
    // busy.xml fails the call unless the 503 carries a numeric Retry-After.
    let result = run(daemon.udp_addr(), "busy.xml", &["-s", NUMBER]);
    result.assert_success();
    let resp = received_message(&result, "SIP/2.0 503");
    assert!(resp.contains("Retry-After: "), "{resp}");
    assert_cdr(&cdr_for(&daemon, &result), 503, "global-limit");
    held.join().unwrap().assert_success();
}

#[test]
fn two_concurrent_calls_over_tenant_limit_one_is_busy() {
    let profile = ProfileSpec {
        tenant: "max_calls = 1",
        ..ProfileSpec::default()
    }
    .render();
    let daemon = Daemon::spawn(&profile);
    // Two calls at once, each 2 s long: exactly one gets through, the other gets 486.
    let held = hold_one_call(&daemon, 2000);
    let second = run(
        daemon.udp_addr(),
        "held_call.xml",
        &["-s", NUMBER, "-d", "2000"],
    );
    assert_eq!(second.successful_calls, Some(0), "{}", second.report());
    assert_eq!(second.failed_calls, Some(1), "{}", second.report());
    assert_eq!(statuses_received(&second).last(), Some(&486));
    held.join().unwrap().assert_success();
    let cdrs = daemon.wait_for_cdrs(2, CDR_WAIT);
    let mut codes: Vec<u64> = cdrs
        .iter()
        .map(|c| c["result_code"].as_u64().unwrap())
        .collect();
    codes.sort_unstable();
    assert_eq!(codes, [200, 486], "{cdrs:?}");
}

const DIGEST_TRUNK: &str = "[trunk.digest]\nusername = \"carrier\"\npassword = \"env:SB_TEST_DIGEST_PASSWORD\"\nrealm = \"sipbridge.test\"\n";
/// The same trunk offering MD5 only: SIPp 3.6 answers only the first
/// challenge and only MD5 (the default order is SHA-256, then MD5).
const DIGEST_TRUNK_MD5: &str = "[trunk.digest]\nusername = \"carrier\"\npassword = \"env:SB_TEST_DIGEST_PASSWORD\"\nrealm = \"sipbridge.test\"\nalgorithms = [\"MD5\"]\n";
const DIGEST_ENV: [(&str, &str); 1] = [("SB_TEST_DIGEST_PASSWORD", "s3cret-pass")];

#[test]
fn digest_challenge_is_401_with_md5() {
    let profile = ProfileSpec {
        trunk: DIGEST_TRUNK,
        ..ProfileSpec::default()
    }
    .render();
    let daemon = Daemon::spawn_with_env(&profile, &DIGEST_ENV);
    let result = run(daemon.udp_addr(), "digest_challenge.xml", &["-s", NUMBER]);
    result.assert_success();
    let challenge = received_message(&result, "SIP/2.0 401");
    assert!(
        challenge.contains("WWW-Authenticate: Digest realm=\"sipbridge.test\""),
        "{challenge}"
    );
    let cdr = cdr_for(&daemon, &result);
    assert_eq!(cdr["result_code"], 401, "{cdr}");
    assert_eq!(cdr["answered_at"], Value::Null, "{cdr}");
}

#[test]
fn digest_challenge_then_success() {
    let profile = ProfileSpec {
        trunk: DIGEST_TRUNK_MD5,
        ..ProfileSpec::default()
    }
    .render();
    let daemon = Daemon::spawn_with_env(&profile, &DIGEST_ENV);
    let result = run(
        daemon.udp_addr(),
        "digest.xml",
        &[
            "-s",
            NUMBER,
            "-au",
            "carrier",
            "-ap",
            "s3cret-pass",
            // The digest `uri` must be the Request-URI (RFC 2617 §3.2.2);
            // SIPp adds the `sip:` and by default omits the user.
            "-auth_uri",
            &format!("{NUMBER}@{}", daemon.udp_addr()),
        ],
    );
    result.assert_success();
    let challenge = received_message(&result, "SIP/2.0 401");
    assert!(
        challenge.contains("WWW-Authenticate: Digest realm=\"sipbridge.test\""),
        "{challenge}"
    );
    assert!(challenge.contains("MD5"), "{challenge}");
    assert!(
        result.messages.contains("Authorization: Digest"),
        "{}",
        result.report()
    );
    let cdrs = daemon.wait_for_cdrs(2, CDR_WAIT);
    assert_eq!(cdrs.len(), 2, "{cdrs:?}");
    assert_eq!(cdrs[0]["result_code"], 401, "{cdrs:?}");
    assert_cdr(&cdrs[1], 200, "caller-bye");
}

#[test]
fn digest_wrong_password_is_challenged_again() {
    let profile = ProfileSpec {
        trunk: DIGEST_TRUNK_MD5,
        ..ProfileSpec::default()
    }
    .render();
    let daemon = Daemon::spawn_with_env(&profile, &DIGEST_ENV);
    let result = run(
        daemon.udp_addr(),
        "digest.xml",
        &[
            "-s",
            NUMBER,
            "-au",
            "carrier",
            "-ap",
            "wrong",
            "-timeout",
            "10s",
            "-auth_uri",
            &format!("{NUMBER}@{}", daemon.udp_addr()),
        ],
    );
    // The authenticated INVITE gets a second 401 where digest.xml waits for a
    // 200: SIPp gives up (its call times out), and no call is answered.
    assert_ne!(result.exit_code, Some(0), "{}", result.report());
    assert_eq!(
        result.successful_calls.unwrap_or(0),
        0,
        "{}",
        result.report()
    );
    let statuses = statuses_received(&result);
    // SIPp retransmits the authenticated INVITE it cannot finish; each copy
    // gets the same cached 401.
    assert!(
        statuses.iter().filter(|s| **s == 401).count() >= 2,
        "{statuses:?}"
    );
    assert!(!statuses.contains(&200), "{statuses:?}");
    // One CDR per attempt, not per retransmission: the challenge-less INVITE
    // and the one with the wrong password.
    let cdrs = daemon.wait_for_cdrs(2, CDR_WAIT);
    assert_eq!(cdrs.len(), 2, "{cdrs:?}");
    assert!(cdrs.iter().all(|c| c["result_code"] == 401), "{cdrs:?}");
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(daemon.cdrs().len(), 2, "retransmissions created CDRs");
}

#[test]
fn reinvite_hold_and_unhold() {
    let daemon = Daemon::spawn(&profile_toml(""));
    let result = run(daemon.udp_addr(), "hold.xml", &["-s", NUMBER]);
    result.assert_success();
    // Three 200s for the three INVITEs and one for the BYE; one call, never dropped.
    let statuses = statuses_received(&result);
    assert_eq!(
        statuses.iter().filter(|s| **s == 200).count(),
        4,
        "{statuses:?}"
    );
    let cdrs = daemon.wait_for_cdrs(1, CDR_WAIT);
    assert_eq!(cdrs.len(), 1, "{cdrs:?}");
    assert_cdr(&cdrs[0], 200, "caller-bye");
    assert!(
        daemon
            .logs()
            .iter()
            .any(|l| l.contains("media changed") && l.contains("SendOnly")),
        "no hold seen in the daemon log"
    );
}
