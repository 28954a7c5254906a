#![allow(clippy::unwrap_used, clippy::expect_used)]
//! The pipeline failure policy end to end (issue 5 items 5 and 6): the daemon (as a
//! process), SIPp as the carrier, a scripted agent (tests/common/test_agent.rs), and —
//! where the caller must hear something — the test's own RTP socket.
//!
//! Each failure — connection refused, HTTP 401/403 at the upgrade, a drop mid-call
//! (reconnect succeeds / fails), an agent that never completes the upgrade, an agent that
//! never says anything — runs under both `on_failure` values: `"fallback"` must play the
//! fallback prompt (a 1 kHz tone here) to the caller and then send BYE (CDR cause
//! `pipeline-failed`); `"continue"` must leave the call up until the caller's BYE. Every
//! test checks the CDR's pipeline summary and that neither the bearer token nor the URL's
//! query secret appears in any log line. The back-pressure test shows an agent that stops
//! reading costs dropped frames (counted in the CDR), never the caller's 20 ms RTP or a
//! second call.
//!
//! With `"continue"` a recording tenant's recording runs on to the caller's BYE.
//! Also: `check`-level validation of the policy keys (through the library's loader).

mod common;

use common::test_agent::{Behaviour, TestAgent};
use common::{Daemon, ProfileSpec, SippResult, sipp, sipp_scenario};
use serde_json::Value;
use sipbridge::media::g711::mu_to_linear;
use sipbridge::store::db::{RecordingState, Store};
use std::net::UdpSocket;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::{Duration, Instant};

const NUMBER: &str = "+15551234567";
const TOKEN: &str = "tok-Pf55-very-secret";
const QUERY_SECRET: &str = "qs-Kx09-secret";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Policy {
    Fallback,
    Continue,
}

/// A 1 s, 1 kHz tone at 8 kHz, written as the tenant's fallback prompt.
fn fallback_wav(dir: &Path) -> PathBuf {
    let path = dir.join("fallback.wav");
    let spec = hound::WavSpec {
        channels: 1,
        sample_rate: 8000,
        bits_per_sample: 16,
        sample_format: hound::SampleFormat::Int,
    };
    let mut w = hound::WavWriter::create(&path, spec).unwrap();
    for i in 0..8000 {
        let phase = 2.0 * std::f64::consts::PI * 1000.0 * f64::from(i) / 8000.0;
        w.write_sample((8000.0 * phase.sin()) as i16).unwrap();
    }
    w.finalize().unwrap();
    path
}

/// The daemon with the `demo` tenant on a native agent at `port` (bearer token, a secret
/// in the URL query), caller audio not gated by the 4.4 s disclosure prompt, the policy
/// and the extra pipeline `keys`.
struct Setup {
    daemon: Daemon,
    _dir: tempfile::TempDir,
}

fn start(port: u16, policy: Policy, keys: &str) -> Setup {
    start_recording(port, policy, keys, false)
}

/// [`start`] with the tenant's `recording` on or off.
fn start_recording(port: u16, policy: Policy, keys: &str, recording: bool) -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let policy_keys = match policy {
        Policy::Fallback => {
            let wav = toml::Value::String(fallback_wav(dir.path()).display().to_string());
            format!(r#"on_failure = "fallback", fallback_prompt = {wav}"#)
        }
        Policy::Continue => r#"on_failure = "continue""#.to_owned(),
    };
    let keys = if keys.is_empty() {
        policy_keys
    } else {
        format!("{policy_keys}, {keys}")
    };
    let pipeline = format!(
        r#"pipeline = {{ kind = "agent", url = "ws://127.0.0.1:{port}/agent?key={QUERY_SECRET}", auth = "env:AGENT_TOKEN", {keys} }}"#
    );
    let profile = ProfileSpec {
        tenant: "caller_audio_after_prompt = false",
        ..ProfileSpec::default()
    }
    .render()
    .replace(r#"pipeline = { kind = "echo" }"#, &pipeline)
    .replace("recording = false", &format!("recording = {recording}"));
    assert!(profile.contains("on_failure"));
    Setup {
        daemon: Daemon::spawn_with_env(&profile, &[("AGENT_TOKEN", TOKEN)]),
        _dir: dir,
    }
}

/// A loopback port nobody listens on.
fn closed_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// One RTP packet the caller received: arrival time and PCMU payload.
type Heard = (Instant, Vec<u8>);

/// Runs SIPp `scenario` with the call's media on a socket of the test (`-key
/// test_rtp_port`), recording every PCMU packet the bridge sends to it. With `send_rtp`
/// the socket also sends the bridge 20 ms of µ-law silence every 20 ms (to the port the
/// daemon logs for the first call).
fn call_on_socket(
    daemon: &Daemon,
    scenario: &str,
    extra: &[&str],
    send_rtp: bool,
) -> (SippResult, Vec<Heard>) {
    let media = UdpSocket::bind("127.0.0.1:0").unwrap();
    media
        .set_read_timeout(Some(Duration::from_millis(50)))
        .unwrap();
    let port = media.local_addr().unwrap().port().to_string();
    let done = AtomicBool::new(false);
    thread::scope(|s| {
        let carrier = s.spawn(|| {
            let mut args = vec!["-key", "test_rtp_port", &port, "-s", NUMBER];
            args.extend_from_slice(extra);
            let result = sipp(&sipp_scenario(scenario), daemon.udp_addr(), &args);
            done.store(true, Ordering::SeqCst);
            result
        });
        if send_rtp {
            let sender = media.try_clone().unwrap();
            let done = &done;
            s.spawn(move || {
                let line = daemon
                    .wait_for_log(Duration::from_secs(10), |l| l.contains("\"call started\""))
                    .expect("call started");
                let v: Value = serde_json::from_str(&line).unwrap();
                let rtp_port = v["port"].as_u64().unwrap();
                let to = format!("127.0.0.1:{rtp_port}");
                let start = Instant::now();
                let mut seq: u16 = 0;
                while !done.load(Ordering::SeqCst) {
                    let mut p = vec![0x80, 0, 0, 0, 0, 0, 0, 0, 0x0b, 0xad, 0xbe, 0xef];
                    p[2..4].copy_from_slice(&seq.to_be_bytes());
                    p[4..8].copy_from_slice(&(u32::from(seq) * 160).to_be_bytes());
                    p.extend_from_slice(&[0xff; 160]);
                    let _ = sender.send_to(&p, &to);
                    seq = seq.wrapping_add(1);
                    let next = start + Duration::from_millis(20) * u32::from(seq);
                    thread::sleep(next.saturating_duration_since(Instant::now()));
                }
            });
        }
        let mut heard = Vec::new();
        let mut buf = [0u8; 2048];
        while !done.load(Ordering::SeqCst) {
            if let Ok((n, _)) = media.recv_from(&mut buf)
                && n == 12 + 160
                && buf[1] & 0x7f == 0
            {
                heard.push((Instant::now(), buf[12..n].to_vec()));
            }
        }
        (carrier.join().unwrap(), heard)
    })
}

/// Share of a 20 ms µ-law frame's energy in the 1 kHz DFT bin (1.0 for a pure tone: the
/// frame holds exactly 20 periods).
fn tone_share(payload: &[u8]) -> f64 {
    let x: Vec<f64> = payload
        .iter()
        .map(|&c| f64::from(mu_to_linear(c)))
        .collect();
    let w = 2.0 * std::f64::consts::PI * 1000.0 / 8000.0;
    let (mut re, mut im, mut energy) = (0.0, 0.0, 0.0);
    for (n, v) in x.iter().enumerate() {
        re += v * (w * n as f64).cos();
        im -= v * (w * n as f64).sin();
        energy += v * v;
    }
    if energy < 1.0 {
        return 0.0;
    }
    2.0 * (re * re + im * im) / (x.len() as f64 * energy)
}

/// The longest run of tonal packets, and the index after its end.
fn longest_tone(heard: &[Heard]) -> (usize, usize) {
    let (mut best, mut end, mut run) = (0, 0, 0);
    for (i, (_, payload)) in heard.iter().enumerate() {
        if tone_share(payload) > 0.9 {
            run += 1;
            if run > best {
                (best, end) = (run, i + 1);
            }
        } else {
            run = 0;
        }
    }
    (best, end)
}

fn answered_cdr(daemon: &Daemon) -> Value {
    daemon
        .wait_for_cdr(Duration::from_secs(10), |c| c["result_code"] == 200)
        .expect("a CDR for the answered call")
}

fn assert_no_secret_in_logs(daemon: &Daemon) {
    for line in daemon.logs() {
        assert!(!line.contains(TOKEN), "token leaked: {line}");
        assert!(!line.contains(QUERY_SECRET), "URL query leaked: {line}");
    }
}

/// The give-up decision is logged with the call id (the call's span) and the reason.
fn assert_gave_up_logged(daemon: &Daemon, call_id: &str, reason: &str) {
    let line = daemon
        .wait_for_log(Duration::from_secs(2), |l| {
            l.contains("agent pipeline given up") && l.contains(call_id)
        })
        .expect("the give-up is logged with the call id");
    assert!(line.contains(reason), "{line}");
}

/// Runs the caller for `policy`: with `Fallback`, a caller that waits for the bridge's
/// BYE; with `Continue`, one that hangs up itself after `hold_ms`. Both on the test's
/// socket. Then checks the outcome the policy promises and returns the CDR.
fn caller_sees_policy(setup: &Setup, policy: Policy, hold_ms: u32, reason: &str) -> Value {
    let daemon = &setup.daemon;
    let hold = hold_ms.to_string();
    let (result, heard) = match policy {
        Policy::Fallback => call_on_socket(
            daemon,
            "bridge_bye_test_socket.xml",
            &["-timeout", "20s"],
            false,
        ),
        Policy::Continue => {
            call_on_socket(daemon, "media_on_test_socket.xml", &["-d", &hold], false)
        }
    };
    // SIPp succeeds only if the BYE came from the side the policy says.
    result.assert_success();
    let cdr = answered_cdr(daemon);
    let (run, end) = longest_tone(&heard);
    match policy {
        Policy::Fallback => {
            assert!(result.messages.contains("BYE sip:"), "{}", result.report());
            assert_eq!(cdr["cause"], "pipeline-failed");
            assert_eq!(cdr["hangup_side"], "bridge");
            // The whole 1 s prompt (50 packets), then the BYE ends the media at once.
            assert!(
                (47..=51).contains(&run),
                "tone run {run} of {}",
                heard.len()
            );
            assert!(
                heard.len() - end <= 5,
                "{} packets after the fallback prompt",
                heard.len() - end
            );
        }
        Policy::Continue => {
            assert_eq!(cdr["cause"], "caller-bye");
            assert_eq!(cdr["hangup_side"], "caller");
            assert_eq!(run, 0, "no fallback prompt");
            // Prompt, then silence, for the whole call.
            let span = heard.last().unwrap().0 - heard.first().unwrap().0;
            assert!(
                span >= Duration::from_millis(u64::from(hold_ms) - 500),
                "media for {span:?}"
            );
        }
    }
    assert_eq!(cdr["pipeline"]["failure"], reason, "{cdr}");
    assert_gave_up_logged(daemon, cdr["call_id"].as_str().unwrap(), reason);
    assert_no_secret_in_logs(daemon);
    cdr
}

fn connection_failures_logged(daemon: &Daemon, call_id: &str) -> Vec<String> {
    daemon
        .logs()
        .into_iter()
        .filter(|l| l.contains("agent pipeline failed") && l.contains(call_id))
        .collect()
}

// ---------------------------------------------------------------------------------------
// Connection refused
// ---------------------------------------------------------------------------------------

fn refused(policy: Policy) {
    let port = closed_port();
    let setup = start(
        port,
        policy,
        "reconnect_attempts = 2, reconnect_within_ms = 2000",
    );
    let cdr = caller_sees_policy(&setup, policy, 6000, "reconnects-exhausted");
    assert_eq!(cdr["pipeline"]["connections"], 0);
    assert_eq!(cdr["pipeline"]["reconnects"], 2);
    let failures = connection_failures_logged(&setup.daemon, cdr["call_id"].as_str().unwrap());
    assert_eq!(failures.len(), 3, "{failures:#?}");
    for (n, line) in failures.iter().enumerate() {
        assert!(line.contains(&format!("\"attempt\":{n}")), "{line}");
        assert!(
            line.contains(&format!("ws://127.0.0.1:{port}/agent\"")),
            "{line}"
        );
    }
}

#[test]
fn refused_connection_with_fallback_plays_the_prompt_then_hangs_up() {
    refused(Policy::Fallback);
}

#[test]
fn refused_connection_with_continue_keeps_the_call() {
    refused(Policy::Continue);
}

/// `"continue"` keeps recording: the call's recording covers it to the caller's BYE.
#[test]
fn continue_keeps_recording_after_the_agent_failed() {
    let setup = start_recording(
        closed_port(),
        Policy::Continue,
        "reconnect_attempts = 0",
        true,
    );
    let cdr = caller_sees_policy(&setup, Policy::Continue, 6000, "reconnects-exhausted");
    let call_id = cdr["call_id"].as_str().unwrap();
    let db = setup.daemon.dir().join("var/sipbridge.db");
    let deadline = Instant::now() + Duration::from_secs(10);
    let recs = loop {
        let recs = Store::open(&db)
            .unwrap()
            .recordings_of_call("demo", call_id)
            .unwrap();
        if recs
            .first()
            .is_some_and(|r| r.state == RecordingState::Complete)
            || Instant::now() > deadline
        {
            break recs;
        }
        thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(recs.len(), 1, "{recs:?}");
    assert_eq!(recs[0].state, RecordingState::Complete);
    // Answer to BYE: the whole 6 s hold, not just up to the failure.
    assert!(recs[0].duration_ms >= 5500, "{} ms", recs[0].duration_ms);
}

// ---------------------------------------------------------------------------------------
// HTTP 401 / 403 at the upgrade: permanent, no reconnect
// ---------------------------------------------------------------------------------------

fn rejected(status: u16, policy: Policy) {
    let agent = TestAgent::spawn(vec![Behaviour::Reject(status)]);
    let setup = start(agent.port(), policy, "");
    let reason = format!("rejected-{status}");
    let cdr = caller_sees_policy(&setup, policy, 3000, &reason);
    assert_eq!(cdr["pipeline"]["reconnects"], 0, "{cdr}");
    let conns = agent.finish();
    assert_eq!(conns.len(), 1, "a rejection is not retried");
    assert_eq!(
        conns[0].auth.as_deref(),
        Some(format!("Bearer {TOKEN}").as_str())
    );
    let failures = connection_failures_logged(&setup.daemon, cdr["call_id"].as_str().unwrap());
    assert_eq!(failures.len(), 1);
    assert!(
        failures[0].contains(&format!("upgrade rejected with HTTP {status}")),
        "{}",
        failures[0]
    );
}

#[test]
fn upgrade_401_with_fallback_plays_the_prompt_then_hangs_up() {
    rejected(401, Policy::Fallback);
}

#[test]
fn upgrade_401_with_continue_keeps_the_call() {
    rejected(401, Policy::Continue);
}

#[test]
fn upgrade_403_with_fallback_plays_the_prompt_then_hangs_up() {
    rejected(403, Policy::Fallback);
}

#[test]
fn upgrade_403_with_continue_keeps_the_call() {
    rejected(403, Policy::Continue);
}

/// `on_failure = "fallback"` without a `fallback_prompt`: BYE right away, while the
/// disclosure prompt would still be playing.
#[test]
fn fallback_without_a_prompt_hangs_up_at_once() {
    let agent = TestAgent::spawn(vec![Behaviour::Reject(401)]);
    let pipeline_keys = r#"on_failure = "fallback""#;
    let profile = ProfileSpec::default().render().replace(
        r#"pipeline = { kind = "echo" }"#,
        &format!(
            r#"pipeline = {{ kind = "agent", url = "ws://127.0.0.1:{}/agent?key={QUERY_SECRET}", auth = "env:AGENT_TOKEN", {pipeline_keys} }}"#,
            agent.port()
        ),
    );
    let daemon = Daemon::spawn_with_env(&profile, &[("AGENT_TOKEN", TOKEN)]);
    let started = Instant::now();
    let result = sipp(
        &sipp_scenario("bridge_bye.xml"),
        daemon.udp_addr(),
        &["-s", NUMBER, "-timeout", "15s"],
    );
    result.assert_success();
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    let cdr = answered_cdr(&daemon);
    assert_eq!(cdr["cause"], "pipeline-failed");
    assert_eq!(cdr["pipeline"]["failure"], "rejected-401");
    assert_no_secret_in_logs(&daemon);
}

// ---------------------------------------------------------------------------------------
// Dropped mid-call
// ---------------------------------------------------------------------------------------

/// The agent drops right after `start`; the reconnect succeeds: the call goes on with the
/// second connection (which gets `"reconnect": 1` and the caller's audio), whatever the
/// policy.
fn drop_then_reconnect(policy: Policy) {
    let agent = TestAgent::spawn(vec![Behaviour::DropAfterStart, Behaviour::Silent]);
    let setup = start(agent.port(), policy, "");
    let result = sipp(
        &sipp_scenario("call_with_audio.xml"),
        setup.daemon.udp_addr(),
        &["-s", NUMBER],
    );
    result.assert_success();
    let cdr = answered_cdr(&setup.daemon);
    assert_eq!(cdr["cause"], "caller-bye");
    assert_eq!(cdr["pipeline"]["connections"], 2, "{cdr}");
    assert_eq!(cdr["pipeline"]["reconnects"], 1);
    assert_eq!(cdr["pipeline"]["failure"], Value::Null);
    let conns = agent.finish();
    assert_eq!(conns.len(), 2);
    let (first, second) = (&conns[0].texts[0], &conns[1].texts[0]);
    assert_eq!(
        (&first["event"], &first["reconnect"]),
        (&"start".into(), &0.into())
    );
    assert_eq!(
        (&second["event"], &second["reconnect"]),
        (&"start".into(), &1.into())
    );
    assert_eq!(first["call_id"], cdr["call_id"]);
    assert_eq!(second["call_id"], cdr["call_id"]);
    assert!(conns[1].frames >= 100, "{} frames", conns[1].frames);
    assert_eq!(conns[1].texts.last().unwrap()["event"], "stop");
    assert_eq!(
        conns[1].auth.as_deref(),
        Some(format!("Bearer {TOKEN}").as_str())
    );
    assert!(
        !setup
            .daemon
            .logs()
            .iter()
            .any(|l| l.contains("agent pipeline given up"))
    );
    assert_no_secret_in_logs(&setup.daemon);
}

#[test]
fn drop_mid_call_reconnects_under_fallback() {
    drop_then_reconnect(Policy::Fallback);
}

#[test]
fn drop_mid_call_reconnects_under_continue() {
    drop_then_reconnect(Policy::Continue);
}

/// A hold prompt for the tenant: 2 s at 16 kHz (converted on load like the disclosure
/// prompt), a rising sweep 300 → 1500 Hz then a falling one, distinct at every lag.
fn hold_wav(dir: &Path) -> PathBuf {
    let path = dir.join("hold.wav");
    let spec = hound::WavSpec {
        channels: 1,
        sample_rate: 16000,
        bits_per_sample: 16,
        sample_format: hound::SampleFormat::Int,
    };
    let mut w = hound::WavWriter::create(&path, spec).unwrap();
    let mut phase = 0.0f64;
    for i in 0..32000 {
        let t = f64::from(i) / 16000.0;
        let f = if t < 1.0 {
            300.0 + 1200.0 * t
        } else {
            1500.0 - 900.0 * (t - 1.0)
        };
        phase += 2.0 * std::f64::consts::PI * f / 16000.0;
        w.write_sample((9000.0 * phase.sin()) as i16).unwrap();
    }
    w.finalize().unwrap();
    path
}

/// What the caller heard around an agent outage.
struct Outage {
    setup: Setup,
    heard: Vec<(Instant, Vec<u8>)>,
    killed_at: Instant,
    back_at: Instant,
}

/// Issue 14: an agent killed mid-call and restarted on its port 3 s later gets the call
/// back (a `start` with the same call id and `"reconnect"` > 0, then the caller's audio),
/// under the default reconnect policy and the pipeline `keys`; the call does not end
/// until the caller's BYE. Returns what the caller heard, for the test to judge.
fn agent_killed_and_restarted(keys: &str) -> Outage {
    let agent = TestAgent::spawn(vec![Behaviour::Silent]);
    let port = agent.port();
    let setup = start(port, Policy::Fallback, keys);
    let outage: std::sync::Mutex<Option<(Instant, Instant)>> = std::sync::Mutex::new(None);
    let (result, heard, restarted) = thread::scope(|s| {
        let agent_side = s.spawn(|| {
            assert!(
                agent.wait_for_conns(1, Duration::from_secs(10)),
                "first connection"
            );
            setup
                .daemon
                .wait_for_log(Duration::from_secs(15), |l| {
                    l.contains("disclosure prompt finished")
                })
                .expect("the disclosure prompt ends");
            thread::sleep(Duration::from_millis(1000));
            let killed_at = Instant::now();
            let first = agent.kill();
            thread::sleep(Duration::from_secs(3));
            let again = TestAgent::spawn_on(port, vec![Behaviour::Silent]);
            assert!(
                again.wait_for_conns(1, Duration::from_secs(10)),
                "the bridge came back to the restarted agent"
            );
            *outage.lock().unwrap() = Some((killed_at, Instant::now()));
            (first, again)
        });
        let (result, heard) = call_on_socket(
            &setup.daemon,
            "media_on_test_socket.xml",
            &["-d", "14000"],
            true,
        );
        (result, heard, agent_side.join().unwrap())
    });
    result.assert_success();
    let (first, again) = restarted;
    let cdr = answered_cdr(&setup.daemon);
    assert_eq!(cdr["cause"], "caller-bye", "{cdr}");
    assert_eq!(cdr["hangup_side"], "caller");
    assert_eq!(cdr["pipeline"]["failure"], Value::Null, "{cdr}");
    assert!(
        cdr["pipeline"]["reconnects"].as_u64().unwrap() >= 1,
        "{cdr}"
    );
    assert_eq!(first.len(), 1);
    let conns = again.finish();
    let start = &conns[0].texts[0];
    assert_eq!(start["event"], "start");
    assert_eq!(start["call_id"], cdr["call_id"]);
    assert!(start["reconnect"].as_u64().unwrap() >= 1, "{start}");
    assert!(
        conns[0].frames >= 50,
        "{} caller frames after",
        conns[0].frames
    );
    assert!(
        setup
            .daemon
            .logs()
            .iter()
            .all(|l| !l.contains("agent pipeline given up"))
    );
    assert_no_secret_in_logs(&setup.daemon);
    let (killed_at, back_at) = outage.lock().unwrap().unwrap();
    Outage {
        setup,
        heard,
        killed_at,
        back_at,
    }
}

fn level(payload: &[u8]) -> f64 {
    let e: f64 = payload
        .iter()
        .map(|&c| f64::from(mu_to_linear(c)).powi(2))
        .sum();
    (e / payload.len() as f64).sqrt()
}

impl Outage {
    /// Payloads heard in the 500 ms before the kill.
    fn before(&self) -> Vec<&[u8]> {
        self.heard
            .iter()
            .filter(|(at, _)| {
                *at < self.killed_at && *at + Duration::from_millis(500) > self.killed_at
            })
            .map(|(_, p)| &p[..])
            .collect()
    }

    /// Payloads heard while the agent was away (200 ms margins).
    fn away(&self) -> Vec<&[u8]> {
        self.heard
            .iter()
            .filter(|(at, _)| {
                *at > self.killed_at + Duration::from_millis(200)
                    && *at + Duration::from_millis(200) < self.back_at
            })
            .map(|(_, p)| &p[..])
            .collect()
    }
}

/// The default `away_audio`: the caller hears comfort noise while the agent is away,
/// not silence (before the kill, with the agent up and silent, it heard silence).
#[test]
fn agent_killed_and_restarted_within_5_s_gets_the_call_back_with_comfort_noise_meanwhile() {
    let o = agent_killed_and_restarted("");
    let before: Vec<f64> = o.before().into_iter().map(level).collect();
    let away: Vec<f64> = o.away().into_iter().map(level).collect();
    assert!(
        before.len() >= 15,
        "{} packets before the kill",
        before.len()
    );
    assert!(away.len() >= 100, "{} packets while away", away.len());
    assert!(
        before.iter().all(|&l| l < 10.0),
        "not silence before the kill: {before:?}"
    );
    let noisy = away.iter().filter(|&&l| l > 50.0).count();
    assert!(
        noisy * 100 >= away.len() * 95,
        "comfort noise in {noisy} of {} packets while the agent was away",
        away.len()
    );
}

/// `hold_prompt`: while the agent is away the caller hears the tenant's WAV, looped —
/// the audio heard correlates with the prompt (as the daemon converts it) at ≥ 0.9 over
/// a whole second, and it plays on past its 2 s length — not silence, not noise; the
/// call goes on and the agent gets it back.
#[test]
fn agent_killed_and_restarted_within_5_s_gets_the_call_back_with_the_hold_prompt_meanwhile() {
    let dir = tempfile::tempdir().unwrap();
    let wav = hold_wav(dir.path());
    let keys = format!(
        "away_audio = \"hold-prompt\", hold_prompt = {}",
        toml::Value::String(wav.display().to_string())
    );
    let o = agent_killed_and_restarted(&keys);
    assert!(
        o.setup
            .daemon
            .logs()
            .iter()
            .any(|l| l.contains("hold prompt loaded"))
    );
    let before: Vec<f64> = o.before().into_iter().map(level).collect();
    assert!(
        before.len() >= 15 && before.iter().all(|&l| l < 10.0),
        "{before:?}"
    );
    let away = o.away();
    assert!(away.len() >= 100, "{} packets while away", away.len());
    let mut pcm = Vec::new();
    for p in &away {
        pcm.extend(p.iter().map(|&c| f64::from(mu_to_linear(c))));
    }
    let prompt = sipbridge::media::prompt::Prompt::load(&wav).unwrap();
    let reference: Vec<f64> = prompt.pcm8k().iter().map(|&s| f64::from(s)).collect();
    assert_eq!(reference.len(), 16000);
    // One second heard, looped reference: the best lag's normalised correlation.
    let window = &pcm[..8000];
    let norm = |x: &[f64]| x.iter().map(|v| v * v).sum::<f64>().sqrt();
    let best = (0..reference.len())
        .map(|lag| {
            let r: Vec<f64> = (0..window.len())
                .map(|i| reference[(lag + i) % reference.len()])
                .collect();
            let dot: f64 = window.iter().zip(&r).map(|(a, b)| a * b).sum();
            dot / (norm(window) * norm(&r)).max(1.0)
        })
        .fold(f64::MIN, f64::max);
    assert!(best >= 0.9, "the hold prompt heard: correlation {best:.3}");
    // It loops: what is heard 2 s (the prompt's length) after its first 300 ms is
    // those 300 ms again.
    assert!(pcm.len() >= 18_400, "{} samples while away", pcm.len());
    let (first, again) = (&pcm[..2400], &pcm[16_000..18_400]);
    let dot: f64 = first.iter().zip(again).map(|(a, b)| a * b).sum();
    let c = dot / (norm(first) * norm(again)).max(1.0);
    assert!(c >= 0.9, "looped: correlation {c:.3}");
}

/// The agent drops right after `start` and then refuses every reconnect.
fn drop_then_refuse(policy: Policy) {
    let agent = TestAgent::spawn(vec![Behaviour::DropAfterStart]);
    let setup = start(
        agent.port(),
        policy,
        "reconnect_attempts = 2, reconnect_within_ms = 3000",
    );
    let cdr = caller_sees_policy(&setup, policy, 6000, "reconnects-exhausted");
    assert_eq!(cdr["pipeline"]["connections"], 1);
    assert_eq!(cdr["pipeline"]["reconnects"], 2);
    assert_eq!(agent.finish().len(), 1);
}

#[test]
fn drop_mid_call_without_reconnect_under_fallback_plays_the_prompt_then_hangs_up() {
    drop_then_refuse(Policy::Fallback);
}

#[test]
fn drop_mid_call_without_reconnect_under_continue_keeps_the_call() {
    drop_then_refuse(Policy::Continue);
}

// ---------------------------------------------------------------------------------------
// Never answering
// ---------------------------------------------------------------------------------------

/// TCP accepted, upgrade never answered: each attempt times out after `connect_timeout_ms`.
fn never_upgrades(policy: Policy) {
    let agent = TestAgent::spawn(vec![Behaviour::Hang, Behaviour::Hang]);
    let setup = start(
        agent.port(),
        policy,
        "connect_timeout_ms = 500, reconnect_attempts = 1",
    );
    let cdr = caller_sees_policy(&setup, policy, 4000, "reconnects-exhausted");
    assert_eq!(cdr["pipeline"]["connections"], 0);
    assert_eq!(cdr["pipeline"]["reconnects"], 1);
    assert_eq!(agent.finish().len(), 2);
}

#[test]
fn agent_never_upgrading_under_fallback_plays_the_prompt_then_hangs_up() {
    never_upgrades(Policy::Fallback);
}

#[test]
fn agent_never_upgrading_under_continue_keeps_the_call() {
    never_upgrades(Policy::Continue);
}

/// Connected, never sends audio or a mark: `agent_silence_s = 1` after the 4.4 s
/// disclosure prompt ends is a failure of the agent (no reconnect).
fn silent_agent(policy: Policy) {
    let agent = TestAgent::spawn(vec![Behaviour::Silent]);
    let setup = start(agent.port(), policy, "agent_silence_s = 1");
    let cdr = caller_sees_policy(&setup, policy, 7500, "agent-silent");
    assert_eq!(cdr["pipeline"]["connections"], 1);
    assert_eq!(cdr["pipeline"]["reconnects"], 0);
    let conns = agent.finish();
    assert_eq!(conns.len(), 1);
    assert_eq!(conns[0].texts[0]["event"], "start");
    // The bridge gave the agent up: it closed the connection with `stop`.
    assert_eq!(conns[0].texts.last().unwrap()["event"], "stop");
}

#[test]
fn silent_agent_under_fallback_plays_the_prompt_then_hangs_up() {
    silent_agent(Policy::Fallback);
}

#[test]
fn silent_agent_under_continue_keeps_the_call() {
    silent_agent(Policy::Continue);
}

// ---------------------------------------------------------------------------------------
// Back-pressure
// ---------------------------------------------------------------------------------------

/// Call 1's agent stops reading: its caller frames are dropped (counted in the CDR and
/// logged), while the bridge's RTP to call 1's caller keeps its 20 ms pace and call 2,
/// running at the same time against a healthy agent, loses nothing.
#[test]
fn agent_that_stops_reading_costs_frames_not_media_or_other_calls() {
    let agent = TestAgent::spawn(vec![Behaviour::NeverRead, Behaviour::Silent]);
    let setup = start(agent.port(), Policy::Continue, "");
    let daemon = &setup.daemon;
    let (first, second) = thread::scope(|s| {
        let first =
            s.spawn(|| call_on_socket(daemon, "media_on_test_socket.xml", &["-d", "9000"], true));
        assert!(agent.wait_for_conns(1, Duration::from_secs(5)));
        thread::sleep(Duration::from_secs(2));
        let second = sipp(
            &sipp_scenario("call_with_audio.xml"),
            daemon.udp_addr(),
            &["-s", NUMBER],
        );
        (first.join().unwrap(), second)
    });
    let (result, heard) = first;
    result.assert_success();
    second.assert_success();

    let cdrs = daemon.wait_for_cdrs(2, Duration::from_secs(10));
    assert_eq!(cdrs.len(), 2);
    let conns = agent.finish();
    let slow_call = conns[0].texts.first().map(|v| v["call_id"].clone());
    // The slow call never got its `start` read: find it as the CDR that is not call 2's.
    let healthy_id = conns[1].texts[0]["call_id"].clone();
    let slow = cdrs.iter().find(|c| c["call_id"] != healthy_id).unwrap();
    let healthy = cdrs.iter().find(|c| c["call_id"] == healthy_id).unwrap();
    assert_eq!(slow_call, None);

    let dropped = slow["pipeline"]["dropped_frames"].as_u64().unwrap();
    assert!(dropped >= 50, "dropped {dropped}: {slow}");
    assert!(
        daemon
            .logs()
            .iter()
            .any(|l| l.contains("caller frames dropped")
                && l.contains(&format!("\"dropped\":{dropped}"))),
        "the drop count is logged"
    );
    assert_eq!(healthy["pipeline"]["dropped_frames"], 0, "{healthy}");
    assert!(conns[1].frames >= 150, "{} frames", conns[1].frames);

    // The slow call's caller heard a steady 20 ms stream for the whole 9 s.
    let span = heard.last().unwrap().0 - heard.first().unwrap().0;
    let expected = span.as_secs_f64() / 0.020;
    assert!(
        heard.len() as f64 >= expected * 0.97,
        "{} packets over {span:?}",
        heard.len()
    );
    let worst = heard.windows(2).map(|w| w[1].0 - w[0].0).max().unwrap();
    eprintln!(
        "back-pressure: {dropped} frames dropped; caller got {} packets over {span:?}, worst gap {worst:?}",
        heard.len()
    );
    assert!(worst < Duration::from_millis(150), "worst gap {worst:?}");
    assert!(span >= Duration::from_millis(8500), "{span:?}");
    assert_no_secret_in_logs(daemon);
}

// ---------------------------------------------------------------------------------------
// Validation
// ---------------------------------------------------------------------------------------

fn load(pipeline: &str, dir: &Path) -> Result<sipbridge::config::Config, String> {
    let text = ProfileSpec::default()
        .render()
        .replace(r#"pipeline = { kind = "echo" }"#, pipeline);
    let path = dir.join("profile.toml");
    std::fs::write(&path, text).unwrap();
    sipbridge::config::load_with_env(&path, &|_| Some("t".to_owned())).map_err(|d| d.to_string())
}

#[test]
fn policy_keys_are_validated_and_defaulted() {
    let dir = tempfile::tempdir().unwrap();
    let agent = r#"kind = "agent", url = "ws://127.0.0.1:1/a""#;

    let config = load(&format!("pipeline = {{ {agent} }}"), dir.path()).unwrap();
    let p = &config.tenant("demo").unwrap().pipeline_failure;
    assert_eq!(p.on_failure, sipbridge::config::OnFailure::Fallback);
    assert_eq!(p.fallback_prompt, None);
    assert_eq!(
        (
            p.reconnect_attempts,
            p.reconnect_within,
            p.connect_timeout,
            p.agent_silence
        ),
        (10, Duration::from_secs(10), Duration::from_secs(3), None)
    );
    assert_eq!(p.away_audio, sipbridge::config::AwayAudio::ComfortNoise);

    let wav = toml::Value::String(fallback_wav(dir.path()).display().to_string());
    let config = load(
        &format!(
            "pipeline = {{ {agent}, fallback_prompt = {wav}, reconnect_attempts = 0, reconnect_within_ms = 800, connect_timeout_ms = 250, agent_silence_s = 7, away_audio = \"silence\" }}"
        ),
        dir.path(),
    )
    .unwrap();
    let p = &config.tenant("demo").unwrap().pipeline_failure;
    assert_eq!(p.fallback_prompt.as_ref().unwrap().duration_ms, 1000);
    assert_eq!(
        (
            p.reconnect_attempts,
            p.reconnect_within,
            p.connect_timeout,
            p.agent_silence
        ),
        (
            0,
            Duration::from_millis(800),
            Duration::from_millis(250),
            Some(Duration::from_secs(7))
        )
    );
    assert_eq!(p.away_audio, sipbridge::config::AwayAudio::Silence);
    assert!(config.summary().contains(
        "on failure: 0 reconnects within 800 ms (connect timeout 250 ms, silence meanwhile), agent silence 7 s; then play"
    ));

    for (keys, message) in [
        (
            r#"on_failure = "retry""#,
            "on_failure `retry` must be `fallback` or `continue`",
        ),
        (
            &format!(r#"on_failure = "continue", fallback_prompt = {wav}"#),
            "`fallback_prompt` needs on_failure = \"fallback\"",
        ),
        (
            r#"fallback_prompt = "nope.wav""#,
            "prompt nope.wav: cannot read",
        ),
        (
            "reconnect_attempts = 11",
            "reconnect_attempts 11 must be 0-10",
        ),
        (
            "reconnect_within_ms = 50",
            "reconnect_within_ms 50 must be 100-600000",
        ),
        (
            "connect_timeout_ms = 40000",
            "connect_timeout_ms 40000 must be 100-30000",
        ),
        (
            "agent_silence_s = 4000",
            "agent_silence_s 4000 must be 0-3600",
        ),
        (
            r#"away_audio = "music""#,
            "away_audio `music` must be `comfort-noise`, `silence` or `hold-prompt`",
        ),
        (
            r#"away_audio = "hold-prompt""#,
            "away_audio = \"hold-prompt\" needs `hold_prompt` (a WAV file)",
        ),
        (
            r#"hold_prompt = "nope.wav""#,
            "prompt nope.wav: cannot read",
        ),
        (
            &format!(r#"away_audio = "silence", hold_prompt = {wav}"#),
            "`hold_prompt` needs away_audio = \"hold-prompt\" (or no away_audio)",
        ),
    ] {
        let err = load(&format!("pipeline = {{ {agent}, {keys} }}"), dir.path()).unwrap_err();
        assert!(err.contains(message), "{keys}: {err}");
    }
    let err = load(
        r#"pipeline = { kind = "echo", on_failure = "continue" }"#,
        dir.path(),
    )
    .unwrap_err();
    assert!(
        err.contains("`on_failure` does not apply to pipeline kind `echo`"),
        "{err}"
    );

    // At most 30 s of fallback prompt.
    let long = dir.path().join("long.wav");
    let spec = hound::WavSpec {
        channels: 1,
        sample_rate: 8000,
        bits_per_sample: 16,
        sample_format: hound::SampleFormat::Int,
    };
    let mut w = hound::WavWriter::create(&long, spec).unwrap();
    for _ in 0..8000 * 31 {
        w.write_sample(100i16).unwrap();
    }
    w.finalize().unwrap();
    let long = toml::Value::String(long.display().to_string());
    let err = load(
        &format!("pipeline = {{ {agent}, fallback_prompt = {long} }}"),
        dir.path(),
    )
    .unwrap_err();
    assert!(err.contains("31.0 s; at most 30 s"), "{err}");

    // A hold prompt: `hold_prompt` alone (or with away_audio = "hold-prompt").
    let hold = hold_wav(dir.path());
    let hold_value = toml::Value::String(hold.display().to_string());
    for keys in [
        format!("hold_prompt = {hold_value}"),
        format!(r#"away_audio = "hold-prompt", hold_prompt = {hold_value}"#),
    ] {
        let config = load(&format!("pipeline = {{ {agent}, {keys} }}"), dir.path()).unwrap();
        let p = &config.tenant("demo").unwrap().pipeline_failure;
        match &p.away_audio {
            sipbridge::config::AwayAudio::HoldPrompt(prompt) => {
                assert_eq!(prompt.path, hold);
                assert_eq!((prompt.sample_rate, prompt.duration_ms), (16000, 2000));
            }
            other => panic!("{other:?}"),
        }
        assert!(
            config.summary().contains(&format!(
                "hold prompt {} (2.0 s, looped) meanwhile",
                hold.display()
            )),
            "{}",
            config.summary()
        );
    }
    let err = load(
        &format!(r#"pipeline = {{ kind = "echo", hold_prompt = {hold_value} }}"#),
        dir.path(),
    )
    .unwrap_err();
    assert!(
        err.contains("`hold_prompt` does not apply to pipeline kind `echo`"),
        "{err}"
    );
}
