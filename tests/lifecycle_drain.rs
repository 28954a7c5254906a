#![allow(clippy::unwrap_used, clippy::expect_used)]
//! SIGTERM drain (issue 7, Build 4) through the real daemon, with SIPp as the carrier:
//! - live calls go on and end on their own; meanwhile a new INVITE gets 503 with
//!   Retry-After and OPTIONS 503; STOPPING is notified; once the last call has ended the
//!   daemon exits 0 without waiting out the grace period, and the recordings are
//!   complete and decrypt;
//! - a call still up when `drain_grace_s` passes gets BYE then (not before), its CDR
//!   says `shutdown`, its recording is complete, exit 0;
//! - a second SIGTERM ends the calls with BYE at once, exit 0;
//! - Deepgram's last transcripts, still arriving while the daemon drains, are
//!   stored before it exits.

mod common;
mod lifecycle_support;

use std::path::Path;
use std::thread;
use std::time::{Duration, Instant};

use common::{Daemon, ProfileSpec, sipp, sipp_scenario};
use lifecycle_support::{
    NotifySocket, header, held_call_scenario, log_field, log_message, running, signal, status_of,
    udp_request, wait_for_exit, with_drain_grace,
};
use sipbridge::store::crypto::KeyRing;
use sipbridge::store::db::{RecordingState, Store};

const NUMBER: &str = "+15551234567";
const WAIT: Duration = Duration::from_secs(15);

/// A recording test profile (the bundled prompt, echo) with `drain_grace_s`.
fn profile(grace_s: u32) -> String {
    let text = ProfileSpec {
        media: "rtp_timeout_s = 60",
        ..ProfileSpec::default()
    }
    .render();
    assert!(text.contains("recording = false\n"));
    with_drain_grace(
        &text.replace("recording = false\n", "recording = true\n"),
        grace_s,
    )
}

/// Waits until the daemon has logged `n` lines with `message`.
fn wait_count(daemon: &Daemon, message: &str, n: usize) {
    let deadline = Instant::now() + WAIT;
    loop {
        let count = daemon
            .logs()
            .iter()
            .filter(|l| log_message(l).as_deref() == Some(message))
            .count();
        if count >= n {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{count} of {n} {message:?} lines"
        );
        thread::sleep(Duration::from_millis(20));
    }
}

fn has_log(daemon: &Daemon, message: &str) -> bool {
    daemon
        .logs()
        .iter()
        .any(|l| log_message(l).as_deref() == Some(message))
}

/// The call's one recording: complete, decrypted to a stereo WAV of about `ms`.
fn assert_recording_complete(dir: &Path, call_id: &str, min_ms: u64) {
    let store = Store::open(&dir.join("var/sipbridge.db")).unwrap();
    let recs = store.recordings_of_call("demo", call_id).unwrap();
    assert_eq!(recs.len(), 1, "{recs:?}");
    let rec = &recs[0];
    assert_eq!(rec.state, RecordingState::Complete, "{rec:?}");
    assert!(rec.duration_ms >= min_ms, "{rec:?}");
    let master = std::fs::read(dir.join("var/master.key")).unwrap();
    let keys = KeyRing::open(&dir.join("var"), &master).unwrap();
    let wav = sipbridge::store::recording::export_wav(&rec.path, &keys).unwrap();
    let reader = hound::WavReader::new(std::io::Cursor::new(wav)).unwrap();
    assert_eq!(
        (reader.spec().channels, reader.spec().sample_rate),
        (2, 8000)
    );
    assert_eq!(u64::from(reader.duration()), rec.duration_ms * 8);
}

#[test]
fn sigterm_lets_live_calls_finish_refuses_new_ones_and_exits_0() {
    let notify = NotifySocket::bind();
    let daemon = Daemon::spawn_with_env(&profile(30), &[("NOTIFY_SOCKET", notify.path_str())]);
    let target = daemon.udp_addr();
    let scenarios = tempfile::tempdir().unwrap();
    let held = held_call_scenario(scenarios.path(), 4000);
    let calls: Vec<_> = (0..2)
        .map(|_| {
            let held = held.clone();
            thread::spawn(move || sipp(&held, target, &["-s", NUMBER]))
        })
        .collect();
    wait_count(&daemon, "answered", 2);
    thread::sleep(Duration::from_millis(300));

    let pid = daemon.pid();
    let signalled = Instant::now();
    signal(pid, "-TERM");
    notify
        .wait_for(0, WAIT, |m| m.starts_with("STOPPING=1\n"))
        .expect("STOPPING=1");
    let draining = daemon
        .wait_for_log(WAIT, |l| {
            log_message(l).as_deref() == Some("SIGTERM: draining")
        })
        .unwrap();
    assert_eq!(log_field(&draining, "calls").as_deref(), Some("2"));
    assert_eq!(log_field(&draining, "grace_s").as_deref(), Some("30"));

    // New calls are refused while the live ones go on; OPTIONS say unavailable.
    let refused = udp_request(target, "INVITE", NUMBER);
    assert_eq!(status_of(&refused), 503, "{refused}");
    let retry: u32 = header(&refused, "Retry-After")
        .expect("Retry-After")
        .parse()
        .unwrap();
    assert!(retry > 0);
    assert_eq!(status_of(&udp_request(target, "OPTIONS", NUMBER)), 503);
    assert!(running(pid), "exited with calls up");
    notify
        .wait_for(0, WAIT, |m| m == "STATUS=draining: 2 active calls\n")
        .expect("STATUS while draining");

    // Both calls end on their own (the caller's BYE), then the daemon exits 0 at once.
    for call in calls {
        call.join().unwrap().assert_success();
    }
    let exit = wait_for_exit(pid, Duration::from_secs(5));
    let took = signalled.elapsed();
    assert_eq!(exit, Some(0), "wait status {exit:?}");
    assert!(
        took < Duration::from_secs(10),
        "exit {took:?} after SIGTERM"
    );
    assert!(has_log(&daemon, "drained: no calls left"));
    assert!(!has_log(&daemon, "drain grace over: ending calls"));
    let answered: Vec<_> = daemon
        .cdrs()
        .into_iter()
        .filter(|c| c["result_code"] == 200)
        .collect();
    assert_eq!(answered.len(), 2, "{answered:?}");
    for cdr in &answered {
        assert_eq!(cdr["cause"], "caller-bye", "{cdr}");
        assert_recording_complete(daemon.dir(), cdr["call_id"].as_str().unwrap(), 4000);
    }
    let rejected: Vec<_> = daemon
        .cdrs()
        .into_iter()
        .filter(|c| c["result_code"] == 503)
        .collect();
    assert_eq!(rejected.len(), 1, "the refused INVITE's CDR: {rejected:?}");
}

#[test]
fn calls_left_when_the_grace_period_ends_get_bye_and_exit_is_0() {
    let daemon = Daemon::spawn(&profile(2));
    let target = daemon.udp_addr();
    let carrier =
        thread::spawn(move || sipp(&sipp_scenario("bridge_bye.xml"), target, &["-s", NUMBER]));
    wait_count(&daemon, "answered", 1);
    thread::sleep(Duration::from_millis(300));

    let pid = daemon.pid();
    let signalled = Instant::now();
    signal(pid, "-TERM");
    // Still up one second into the two-second grace.
    thread::sleep(Duration::from_millis(1000));
    assert!(running(pid), "exited before the grace period ended");
    assert!(
        daemon.cdrs().is_empty(),
        "the call ended before the grace period"
    );

    let exit = wait_for_exit(pid, Duration::from_secs(10));
    let took = signalled.elapsed();
    assert_eq!(exit, Some(0), "wait status {exit:?}");
    assert!(
        took >= Duration::from_secs(2) && took < Duration::from_secs(2 + 5 + 2),
        "exit {took:?} after SIGTERM"
    );
    let result = carrier.join().unwrap();
    result.assert_success();
    assert!(result.messages.contains("BYE sip:"), "{}", result.report());
    assert!(has_log(&daemon, "drain grace over: ending calls"));
    let cdrs = daemon.cdrs();
    assert_eq!(cdrs.len(), 1, "{cdrs:?}");
    assert_eq!(cdrs[0]["cause"], "shutdown", "{}", cdrs[0]);
    assert_eq!(cdrs[0]["hangup_side"], "bridge", "{}", cdrs[0]);
    assert_recording_complete(daemon.dir(), cdrs[0]["call_id"].as_str().unwrap(), 2000);
}

#[test]
fn a_second_sigterm_ends_the_calls_at_once() {
    let daemon = Daemon::spawn(&profile(60));
    let target = daemon.udp_addr();
    let carrier =
        thread::spawn(move || sipp(&sipp_scenario("bridge_bye.xml"), target, &["-s", NUMBER]));
    wait_count(&daemon, "answered", 1);
    thread::sleep(Duration::from_millis(300));

    let pid = daemon.pid();
    signal(pid, "-TERM");
    thread::sleep(Duration::from_millis(500));
    assert!(running(pid));
    let second = Instant::now();
    signal(pid, "-TERM");
    let exit = wait_for_exit(pid, Duration::from_secs(5));
    let took = second.elapsed();
    assert_eq!(exit, Some(0), "wait status {exit:?}");
    assert!(
        took < Duration::from_secs(3),
        "exit {took:?} after the second SIGTERM"
    );
    let result = carrier.join().unwrap();
    result.assert_success();
    assert!(has_log(&daemon, "second SIGTERM: ending calls now"));
    let cdrs = daemon.cdrs();
    assert_eq!(cdrs.len(), 1, "{cdrs:?}");
    assert_eq!(cdrs[0]["cause"], "shutdown", "{}", cdrs[0]);
    assert_recording_complete(daemon.dir(), cdrs[0]["call_id"].as_str().unwrap(), 500);
}

#[test]
fn drain_grace_s_defaults_to_30_allows_0_and_rejects_more_than_an_hour() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("p.toml");
    let base = ProfileSpec::default().render();
    let load = |text: &str| {
        std::fs::write(&path, text).unwrap();
        sipbridge::config::load(&path)
    };
    let grace = |text: &str| load(text).unwrap().profiles[0].drain_grace;
    assert_eq!(grace(&base), Duration::from_secs(30));
    assert_eq!(grace(&with_drain_grace(&base, 0)), Duration::ZERO);
    assert_eq!(
        grace(&with_drain_grace(&base, 3600)),
        Duration::from_secs(3600)
    );
    let err = load(&with_drain_grace(&base, 3601)).unwrap_err();
    let errors: Vec<String> = err.errors().map(ToString::to_string).collect();
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert!(
        errors[0].contains("p.toml:4:17: drain_grace_s 3601 is longer than 3600 s"),
        "{errors:?}"
    );
}

#[test]
fn sigterm_uses_the_drain_grace_of_the_reloaded_profile() {
    let daemon = Daemon::spawn(&profile(60));
    let target = daemon.udp_addr();
    std::fs::write(daemon.dir().join("profile.toml"), profile(1)).unwrap();
    signal(daemon.pid(), "-HUP");
    daemon
        .wait_for_log(WAIT, |l| {
            log_message(l).as_deref() == Some("configuration reloaded")
        })
        .expect("reloaded");
    let carrier =
        thread::spawn(move || sipp(&sipp_scenario("bridge_bye.xml"), target, &["-s", NUMBER]));
    wait_count(&daemon, "answered", 1);
    let pid = daemon.pid();
    let signalled = Instant::now();
    signal(pid, "-TERM");
    assert_eq!(wait_for_exit(pid, Duration::from_secs(8)), Some(0));
    let took = signalled.elapsed();
    assert!(
        took >= Duration::from_secs(1) && took < Duration::from_secs(6),
        "exit {took:?} after SIGTERM"
    );
    carrier.join().unwrap().assert_success();
    let draining = daemon
        .wait_for_log(WAIT, |l| {
            log_message(l).as_deref() == Some("SIGTERM: draining")
        })
        .unwrap();
    assert_eq!(log_field(&draining, "grace_s").as_deref(), Some("1"));
}

/// Deepgram's last Results arriving while the daemon drains (here 2 s after
/// `CloseStream`, which the bridge sends when SIGTERM ends the call) are in
/// the store after the process exited: `sipbridge export` decrypts them.
#[test]
fn privacy_transcripts_in_flight_at_sigterm_are_stored_before_exit() {
    use common::deepgram_mock::{DeepgramMock, MockConfig, Scripted};
    const KEY: &str = "dg-drain-test-key";
    const LATE: &str = "said as the daemon drained";
    let mut config = MockConfig::new(KEY);
    config.on_close_stream = vec![Scripted::final_result(0.2, 0.5, LATE, 0.9)];
    config.close_stream_delay = Duration::from_secs(2);
    let mock = DeepgramMock::start(config);
    let pipeline = format!(
        r#"pipeline = {{ kind = "deepgram", model = "nova-2", language = "en-US", api_key = "env:DG_KEY", base_url = "{}" }}"#,
        mock.base_url()
    );
    let text = ProfileSpec {
        media: "rtp_timeout_s = 60",
        tenant: "caller_audio_after_prompt = false",
        ..ProfileSpec::default()
    }
    .render()
    .replace(r#"pipeline = { kind = "echo" }"#, &pipeline)
    .replace("transcripts = false", "transcripts = true");
    let daemon = Daemon::spawn_with_env(&with_drain_grace(&text, 0), &[("DG_KEY", KEY)]);
    let target = daemon.udp_addr();
    let carrier =
        thread::spawn(move || sipp(&sipp_scenario("bridge_bye.xml"), target, &["-s", NUMBER]));
    wait_count(&daemon, "answered", 1);
    wait_count(&daemon, "deepgram connected", 1);
    thread::sleep(Duration::from_millis(500));

    let pid = daemon.pid();
    signal(pid, "-TERM");
    let exit = wait_for_exit(pid, Duration::from_secs(20));
    assert_eq!(exit, Some(0), "wait status {exit:?}");
    let result = carrier.join().unwrap();
    result.assert_success();
    // The mock sent the late Results; the bridge was still listening.
    let conns = mock.connections();
    assert_eq!(conns.len(), 1, "{conns:#?}");
    assert!(
        conns[0].sent.iter().any(|m| m.contains(LATE)),
        "{:#?}",
        conns[0]
    );

    // Read back from the store the daemon left.
    let out = daemon.dir().join("export");
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_sipbridge"))
        .args([
            "export",
            "--tenant",
            "demo",
            "--caller",
            "+15550001111",
            "--out",
        ])
        .arg(&out)
        .args(["--config", "profile.toml"])
        .current_dir(daemon.dir())
        .env_remove("DG_KEY")
        .env("SIPBRIDGE_LOG", "warn")
        .output()
        .unwrap();
    assert_eq!(
        o.status.code(),
        Some(0),
        "export: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let list: Vec<serde_json::Value> =
        serde_json::from_slice(&std::fs::read(out.join("transcripts.json")).unwrap()).unwrap();
    let texts: Vec<&str> = list.iter().filter_map(|t| t["text"].as_str()).collect();
    assert_eq!(texts, [LATE], "{list:#?}");
}
