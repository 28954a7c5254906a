#![allow(clippy::unwrap_used, clippy::expect_used)]
//! Blind transfer (issue 13 item 1): an agent's `{"event":"transfer","to":…,"mode":"blind"}`
//! becomes a REFER (RFC 3515) in the caller's dialog, with `Refer-To` and `Referred-By`.
//! The carrier is SIPp (tests/sipp/transfer_carrier*.xml): it answers the REFER, calls the
//! Refer-To target itself — a second SIPp — and reports the target's answer in NOTIFYs
//! with `message/sipfrag` bodies. The agent (tests/common/test_agent.rs) gets a `transfer`
//! event per step; the CDR, logged and in the database, names the target and the result.
//!
//! - target answers: NOTIFY 100 then 200 → the bridge BYEs the caller's leg, cause
//!   `transferred`, the agent saw `accepted`, `progress`, `completed`;
//! - target busy: NOTIFY 486 → the agent gets `failed` (`target-failed`, 486) and keeps
//!   the caller (its audio still flows until the carrier hangs up);
//! - REFER refused (403) for a `tel:` target, sent as `tel:` → `failed` (`refused`, 403);
//! - Twilio mode: the same, as sipbridge's extension in Twilio's message shape;
//! - the example agent (examples/transfer_agent.py) does a whole transfer.
//!
//! Timer F, the 90 s bound on the final NOTIFY, NOTIFYs that overtake the 202 and one
//! transfer at a time are tested in virtual time in `src/call/transfer.rs`.

mod common;

use common::test_agent::{Behaviour, ConnLog, TestAgent, events_named};
use common::{Daemon, ProfileSpec, SippResult, SippServer, sipp_scenario};
use serde_json::{Value, json};
use std::net::UdpSocket;
use std::time::{Duration, Instant};

/// The daemon with the `demo` tenant on a native agent at `port`, without the
/// disclosure prompt, with the admin listener (for `/metrics`).
fn daemon(port: u16) -> Daemon {
    let pipeline =
        format!(r#"pipeline = {{ kind = "agent", url = "ws://127.0.0.1:{port}/agent" }}"#);
    let profile: String = ProfileSpec::default()
        .render()
        .replace(r#"pipeline = { kind = "echo" }"#, &pipeline)
        .lines()
        .filter(|l| !l.starts_with("prompt = "))
        .collect::<Vec<_>>()
        .join("\n")
        .replace(
            "[profile.sip]",
            "[profile.admin]\nlisten = \"127.0.0.1:0\"\n\n[profile.sip]",
        );
    Daemon::spawn(&profile)
}

/// The agent's message, kept for the whole test (the scripted agent takes `&'static`).
fn say(v: Value) -> &'static str {
    Box::leak(v.to_string().into_boxed_str())
}

/// Runs the carrier `scenario` (call length `-d` ms after the transfer steps) and returns
/// its result and how many RTP packets the bridge sent to the caller's media socket
/// after the transfer's outcome could be known (the last 1 s of the run).
fn carrier(daemon: &Daemon, scenario: &str, hold_ms: u32) -> (SippResult, usize) {
    let media = UdpSocket::bind("127.0.0.1:0").unwrap();
    media
        .set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    let run = common::sipp_caller(daemon, scenario, &media, hold_ms);
    let mut arrivals = Vec::new();
    let mut buf = [0u8; 2048];
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline && !run.is_finished() {
        if media.recv_from(&mut buf).is_ok() {
            arrivals.push(Instant::now());
        }
    }
    let result = run.join().unwrap();
    let end = Instant::now();
    let late = arrivals
        .iter()
        .filter(|t| end.duration_since(**t) < Duration::from_millis(1000))
        .count();
    (result, late)
}

/// The `transfer` events one agent connection got.
fn transfer_events(conns: &[ConnLog]) -> Vec<Value> {
    events_named(conns, "transfer")
}

#[test]
fn blind_transfer_to_an_answering_target_ends_the_callers_leg() {
    let target = SippServer::spawn(&["-sn", "uas"]);
    let to = format!("sip:support@{}", target.addr());
    let agent = TestAgent::spawn(vec![Behaviour::SayAfterStart(say(
        json!({"event": "transfer", "to": to, "mode": "blind"}),
    ))]);
    let daemon = daemon(agent.port());
    let (result, _) = carrier(&daemon, "transfer_carrier.xml", 0);
    result.assert_success();
    target.finish().assert_success();
    // On the wire: the REFER named the target as given and us as the referrer.
    assert!(
        result.messages.contains(&format!("Refer-To: <{to}>")),
        "{}",
        result.messages
    );
    assert!(
        result.messages.contains("Referred-By: <sip:+15551234567@"),
        "{}",
        result.messages
    );
    let cdr = daemon
        .wait_for_cdr(Duration::from_secs(10), |c| c["cause"] == "transferred")
        .expect("CDR with cause transferred");
    assert_eq!(cdr["hangup_side"], "bridge");
    assert_eq!(cdr["transfer"]["result"], "completed");
    assert_eq!(cdr["transfer"]["mode"], "blind");
    assert_eq!(cdr["transfer"]["status"], 200);
    let call_id = cdr["call_id"].as_str().unwrap().to_owned();
    let row = daemon.stored_cdr(&call_id);
    assert_eq!(row.cause.as_deref(), Some("transferred"));
    let t = row.transfer.expect("transfer columns");
    assert_eq!(
        (t.to.as_str(), t.mode.as_str(), t.result.as_str(), t.status),
        (to.as_str(), "blind", "completed", Some(200))
    );
    let conns = agent.finish();
    let steps: Vec<(Value, Value)> = transfer_events(&conns)
        .iter()
        .map(|e| (e["result"].clone(), e["status"].clone()))
        .collect();
    assert_eq!(
        steps,
        vec![
            (json!("accepted"), json!(202)),
            (json!("progress"), json!(100)),
            (json!("completed"), json!(200)),
        ]
    );
    let last = conns[0].texts.last().unwrap();
    assert_eq!(
        last["event"], "stop",
        "the agent's connection ends after the result"
    );
}

#[test]
fn busy_target_fails_back_to_the_agent_which_keeps_the_caller() {
    let target = SippServer::spawn(&[
        "-sf",
        sipp_scenario("transfer_target_busy.xml").to_str().unwrap(),
    ]);
    let to = format!("sip:sales@{}", target.addr());
    let agent = TestAgent::spawn(vec![Behaviour::SayAfterStart(say(
        json!({"event": "transfer", "to": to}),
    ))]);
    let daemon = daemon(agent.port());
    let (result, late_packets) = carrier(&daemon, "transfer_carrier_busy.xml", 2000);
    result.assert_success();
    target.finish().assert_success();
    // The caller's leg lived on after the failure: media kept flowing to it, and it was
    // the carrier that hung up.
    assert!(
        late_packets >= 25,
        "media after the failed transfer: {late_packets}"
    );
    let cdr = daemon
        .wait_for_cdr(Duration::from_secs(10), |c| c["cause"] == "caller-bye")
        .expect("CDR");
    assert_eq!(cdr["transfer"]["result"], "failed");
    assert_eq!(cdr["transfer"]["reason"], "target-failed");
    assert_eq!(cdr["transfer"]["status"], 486);
    let row = daemon.stored_cdr(cdr["call_id"].as_str().unwrap());
    let t = row.transfer.expect("transfer columns");
    assert_eq!(
        (t.result.as_str(), t.reason.as_deref(), t.status),
        ("failed", Some("target-failed"), Some(486))
    );
    let conns = agent.finish();
    assert_eq!(conns.len(), 1, "one connection: the agent kept the call");
    let events = transfer_events(&conns);
    let last = events.last().unwrap();
    assert_eq!(
        (&last["result"], &last["reason"], &last["status"]),
        (&json!("failed"), &json!("target-failed"), &json!(486)),
        "{events:?}"
    );
    assert_eq!(
        conns[0].texts.last().unwrap()["event"],
        "stop",
        "stopped at the call's end"
    );
}

#[test]
fn refused_refer_for_a_tel_target_fails_back_and_the_target_stays_tel() {
    let agent = TestAgent::spawn(vec![Behaviour::SayAfterStart(say(
        json!({"event": "transfer", "to": "+15557654321", "mode": "blind"}),
    ))]);
    let daemon = daemon(agent.port());
    let (result, late_packets) = carrier(&daemon, "transfer_carrier_refuse.xml", 2000);
    result.assert_success();
    assert!(
        result.messages.contains("Refer-To: <tel:+15557654321>"),
        "{}",
        result.messages
    );
    assert!(late_packets >= 25, "the caller stays: {late_packets}");
    let cdr = daemon
        .wait_for_cdr(Duration::from_secs(10), |c| c["cause"] == "caller-bye")
        .expect("CDR");
    assert_eq!(cdr["transfer"]["result"], "failed");
    assert_eq!(cdr["transfer"]["reason"], "refused");
    assert_eq!(cdr["transfer"]["status"], 403);
    // The target is masked in the log like a phone number.
    assert!(
        daemon.logs().iter().all(|l| !l.contains("15557654321")),
        "the target number is in no log line"
    );
    let metrics = common::http::get(daemon.admin_addr(), "/metrics", None).text();
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("sipbridge_transfers_total{")
                && l.contains(r#"mode="blind""#)
                && l.contains(r#"result="failed""#)
                && l.contains(r#"reason="refused""#)
                && l.contains(r#"tenant="demo""#)
                && l.ends_with(" 1")),
        "{metrics}"
    );
    let events = transfer_events(&agent.finish());
    assert_eq!(events.len(), 1, "{events:?}");
    assert_eq!(
        events[0],
        json!({"event": "transfer", "result": "failed", "reason": "refused",
               "status": 403, "to": "tel:+15557654321", "mode": "blind"})
    );
}

/// The example agent (examples/transfer_agent.py, in the test venv that
/// scripts/install-test-deps.sh makes) transfers a real call and reports each step.
#[test]
fn example_agent_transfers_the_caller() {
    let target = SippServer::spawn(&["-sn", "uas"]);
    let to = format!("sip:desk@{}", target.addr());
    let agent = common::ExampleAgent::spawn("transfer_agent.py", &[("TRANSFER_TO", &to)]);
    let port = agent.port();
    let daemon = daemon(port);
    let (result, _) = carrier(&daemon, "transfer_carrier.xml", 0);
    result.assert_success();
    target.finish().assert_success();
    daemon
        .wait_for_cdr(Duration::from_secs(10), |c| c["cause"] == "transferred")
        .expect("CDR with cause transferred");
    let lines = agent.lines_until_stopped();
    let steps: Vec<&Value> = lines.iter().filter_map(|l| l.get("transfer")).collect();
    assert_eq!(
        steps,
        vec![&json!("accepted"), &json!("progress"), &json!("completed")],
        "{lines:?}"
    );
    assert!(
        lines
            .iter()
            .all(|l| l.get("to").is_none_or(|t| *t == json!(to)))
    );
    assert!(lines.iter().any(|l| l["stopped"] == true), "{lines:?}");
}

/// Twilio mode: the transfer is sipbridge's extension on the same socket, nested as
/// Twilio nests its messages, and its outcome comes back in Twilio's shape.
#[test]
fn twilio_mode_transfer_and_its_outcome() {
    let agent = TestAgent::spawn(vec![Behaviour::SayAfterStart(
        r#"{"event":"transfer","streamSid":"{streamSid}","transfer":{"to":"tel:+15557654321","mode":"blind"}}"#,
    )]);
    let pipeline = format!(
        r#"pipeline = {{ kind = "agent", url = "ws://127.0.0.1:{}/agent", mode = "twilio" }}"#,
        agent.port()
    );
    let profile: String = ProfileSpec::default()
        .render()
        .replace(r#"pipeline = { kind = "echo" }"#, &pipeline)
        .lines()
        .filter(|l| !l.starts_with("prompt = "))
        .collect::<Vec<_>>()
        .join("\n");
    let daemon = Daemon::spawn(&profile);
    let (result, _) = carrier(&daemon, "transfer_carrier_refuse.xml", 1000);
    result.assert_success();
    assert!(result.messages.contains("Refer-To: <tel:+15557654321>"));
    let conns = agent.finish();
    let sid = conns[0]
        .texts
        .iter()
        .find(|v| v["event"] == "start")
        .and_then(|v| v["streamSid"].as_str())
        .unwrap()
        .to_owned();
    let events = transfer_events(&conns);
    assert_eq!(events.len(), 1, "{events:?}");
    assert_eq!(events[0]["streamSid"], json!(sid));
    assert!(events[0]["sequenceNumber"].is_string());
    assert_eq!(
        events[0]["transfer"],
        json!({"result": "failed", "reason": "refused", "status": 403,
               "to": "tel:+15557654321", "mode": "blind"})
    );
}
