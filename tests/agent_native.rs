#![allow(clippy::unwrap_used, clippy::expect_used)]
//! The native agent pipeline end to end: the daemon (as a process), SIPp as the carrier
//! and a test agent (a tokio-tungstenite server written here, from docs/agent-protocol.md).
//!
//! Covers: the caller's audio reaching the agent intact (issue 4's pipeline sink test:
//! NCC ≥ 0.98 against the µ-law fixture, no gap), `start` fields, `stop` at call end,
//! bearer auth, agent `hangup` → BYE, agent audio played to the caller (1 kHz tone on
//! the test's own RTP socket) with its `mark` echoed, a refused connection leaving the
//! call up (`on_failure = "continue"`), and no token or URL query secret in the daemon's
//! logs.

mod agent_util;
mod common;

use agent_util::{best_ncc, call_capturing_rtp, ncc, playout_overrun_ms};
use common::{Daemon, ProfileSpec, repo_path, sipp, sipp_scenario};
use futures_util::{SinkExt, StreamExt};
use serde_json::Value;
use sipbridge::media::g711::mu_to_linear;
use sipbridge::media::resample::{Downsampler, PipelineRate, Upsampler};
use std::net::UdpSocket;
use std::thread;
use std::time::{Duration, Instant};
use tokio::sync::oneshot;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tokio_tungstenite::tungstenite::http::StatusCode;

const NUMBER: &str = "+15551234567";
const TOKEN: &str = "tok-Zq81-very-secret";
const QUERY_SECRET: &str = "qs-Hh27-secret";

/// What the test agent saw.
#[derive(Debug, Default)]
struct AgentLog {
    auth: Option<String>,
    uri: String,
    texts: Vec<Value>,
    frame_sizes: Vec<usize>,
    pcm: Vec<i16>,
    first_frame: Option<Instant>,
    last_frame: Option<Instant>,
    /// When the first `mark` echo arrived.
    mark_at: Option<Instant>,
    /// When the agent sent `clear`.
    clear_sent: Option<Instant>,
}

#[derive(Debug, Clone, Copy)]
enum Script {
    /// Only listen.
    Listen,
    /// Send `hangup` right after `start`.
    HangUp,
    /// Refuse the upgrade with HTTP 401.
    Reject401,
    /// Drop the TCP connection right after `start`.
    DropAfterStart,
    /// Right after `start` (while the prompt plays), send 1 s of a 1 kHz tone, then a mark.
    ToneThenMark,
    /// Right after `start`, send caller2.ulaw as 16 kHz PCM ([`fixture_16k`]), then a mark.
    FixtureThenMark,
    /// Right after `start`, send 5 s of a 1 kHz tone and a mark; `clear` on the signal.
    ToneThenClear,
}

/// caller2.ulaw decoded and brought to 16 kHz with its samples on the even positions
/// (the upsampler's start-up dropped), so 2:1 decimation gives the fixture back.
fn fixture_16k() -> Vec<i16> {
    let fixture = std::fs::read(repo_path("fixtures/audio/caller2.ulaw")).unwrap();
    let pcm8: Vec<i16> = fixture.iter().map(|&c| mu_to_linear(c)).collect();
    let mut up = Upsampler::new(PipelineRate::Hz16000);
    let mut pcm16 = Vec::new();
    up.process(&pcm8, &mut pcm16);
    up.process(&[0; 32], &mut pcm16);
    pcm16.drain(..up.delay_samples());
    pcm16.truncate(pcm8.len() * 2);
    pcm16
}

fn tone_16k() -> Vec<i16> {
    (0..16_000)
        .map(|i| {
            let t = f64::from(i) / 16_000.0;
            (8000.0 * (2.0 * std::f64::consts::PI * 1000.0 * t).sin()) as i16
        })
        .collect()
}

/// A one-connection agent on a free port; the thread returns what it saw once the
/// bridge closes the connection (or after 30 s).
fn spawn_agent(script: Script) -> (u16, thread::JoinHandle<AgentLog>) {
    spawn_agent_with(script, None)
}

/// [`spawn_agent`] with a signal that makes the agent send `clear`.
fn spawn_agent_with(
    script: Script,
    mut clear_rx: Option<oneshot::Receiver<()>>,
) -> (u16, thread::JoinHandle<AgentLog>) {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    listener.set_nonblocking(true).unwrap();
    let handle = thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let listener = tokio::net::TcpListener::from_std(listener).unwrap();
            let mut log = AgentLog::default();
            let Ok(Ok((stream, _))) =
                tokio::time::timeout(Duration::from_secs(20), listener.accept()).await
            else {
                return log;
            };
            let (mut auth, mut uri) = (None, String::new());
            #[allow(clippy::result_large_err)] // tungstenite's callback signature
            let ws = tokio_tungstenite::accept_hdr_async(stream, |req: &Request, resp| {
                auth = req
                    .headers()
                    .get("authorization")
                    .map(|v| v.to_str().unwrap().to_owned());
                uri = req.uri().to_string();
                if matches!(script, Script::Reject401) {
                    let mut refusal = ErrorResponse::new(Some("no".to_owned()));
                    *refusal.status_mut() = StatusCode::UNAUTHORIZED;
                    return Err(refusal);
                }
                Ok::<Response, _>(resp)
            })
            .await;
            let Ok(mut ws) = ws else {
                log.auth = auth;
                log.uri = uri;
                return log;
            };
            log.auth = auth;
            log.uri = uri;
            let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
            loop {
                let msg = tokio::select! {
                    signal = async {
                        match &mut clear_rx {
                            Some(rx) => rx.await.ok(),
                            None => std::future::pending().await,
                        }
                    } => {
                        clear_rx = None;
                        if signal.is_some() {
                            ws.send(Message::text(r#"{"event":"clear"}"#.to_owned()))
                                .await
                                .unwrap();
                            log.clear_sent = Some(Instant::now());
                        }
                        continue;
                    }
                    m = tokio::time::timeout_at(deadline, ws.next()) => m,
                };
                let Ok(Some(Ok(msg))) = msg else { break };
                match msg {
                    Message::Text(text) => {
                        let v: Value = serde_json::from_str(&text).unwrap();
                        if v["event"] == "mark" {
                            log.mark_at.get_or_insert(Instant::now());
                        }
                        let start = v["event"] == "start";
                        log.texts.push(v);
                        if !start {
                            continue;
                        }
                        match script {
                            Script::Listen | Script::Reject401 => {}
                            Script::DropAfterStart => return log,
                            Script::HangUp => ws
                                .send(Message::text(r#"{"event":"hangup"}"#.to_owned()))
                                .await
                                .unwrap(),
                            Script::ToneThenMark
                            | Script::FixtureThenMark
                            | Script::ToneThenClear => {
                                // Sent at once (with the prompt, while it still plays:
                                // the bridge holds it and plays it after the prompt).
                                let audio = match script {
                                    Script::FixtureThenMark => fixture_16k(),
                                    Script::ToneThenClear => tone_16k().repeat(5),
                                    _ => tone_16k(),
                                };
                                for chunk in audio.chunks(320) {
                                    let bytes: Vec<u8> =
                                        chunk.iter().flat_map(|s| s.to_le_bytes()).collect();
                                    ws.send(Message::binary(bytes)).await.unwrap();
                                }
                                ws.send(Message::text(
                                    r#"{"event":"mark","name":"after-tone"}"#.to_owned(),
                                ))
                                .await
                                .unwrap();
                            }
                        }
                    }
                    Message::Binary(bytes) => {
                        let now = Instant::now();
                        log.first_frame.get_or_insert(now);
                        log.last_frame = Some(now);
                        log.frame_sizes.push(bytes.len());
                        log.pcm.extend(
                            bytes
                                .chunks_exact(2)
                                .map(|c| i16::from_le_bytes([c[0], c[1]])),
                        );
                    }
                    Message::Close(_) => break,
                    _ => {}
                }
            }
            log
        })
    });
    (port, handle)
}

/// The test profile with the `demo` tenant on the native agent at `url`, caller audio
/// not gated by the prompt, bearer token from `AGENT_TOKEN`.
fn profile(url: &str) -> String {
    let spec = ProfileSpec {
        tenant: "caller_audio_after_prompt = false",
        ..ProfileSpec::default()
    };
    let agent = format!(
        r#"pipeline = {{ kind = "agent", url = "{url}", mode = "native", auth = "env:AGENT_TOKEN" }}"#
    );
    let text = spec
        .render()
        .replace(r#"pipeline = { kind = "echo" }"#, &agent);
    assert!(text.contains("kind = \"agent\""));
    text
}

fn spawn_daemon(url: &str) -> Daemon {
    Daemon::spawn_with_env(&profile(url), &[("AGENT_TOKEN", TOKEN)])
}

/// [`spawn_daemon`] with the tenant's `on_failure = "continue"` (the default,
/// `"fallback"`, hangs up; tests/agent_failure.rs covers both).
fn spawn_daemon_continuing(url: &str) -> Daemon {
    let profile = profile(url).replace(
        r#"auth = "env:AGENT_TOKEN" }"#,
        r#"auth = "env:AGENT_TOKEN", on_failure = "continue" }"#,
    );
    assert!(profile.contains("on_failure"));
    Daemon::spawn_with_env(&profile, &[("AGENT_TOKEN", TOKEN)])
}

fn assert_no_secret_in_logs(daemon: &Daemon) {
    for line in daemon.logs() {
        assert!(!line.contains(TOKEN), "token leaked: {line}");
        assert!(!line.contains(QUERY_SECRET), "URL query leaked: {line}");
    }
}

fn answered_cdr(daemon: &Daemon) -> Value {
    daemon
        .wait_for_cdr(Duration::from_secs(10), |c| c["result_code"] == 200)
        .expect("a CDR for the answered call")
}

#[test]
fn caller_audio_reaches_the_agent_intact_with_start_stop_and_bearer() {
    let (port, agent) = spawn_agent(Script::Listen);
    let daemon = spawn_daemon(&format!("ws://127.0.0.1:{port}/agent?key={QUERY_SECRET}"));
    let result = sipp(
        &sipp_scenario("call_with_audio.xml"),
        daemon.udp_addr(),
        &["-s", NUMBER],
    );
    result.assert_success();
    let log = agent.join().unwrap();
    let cdr = answered_cdr(&daemon);

    // Handshake: bearer token, URL path and query as configured.
    assert_eq!(
        log.auth.as_deref(),
        Some(format!("Bearer {TOKEN}").as_str())
    );
    assert_eq!(log.uri, format!("/agent?key={QUERY_SECRET}"));

    // start first, with the call's identity; stop last.
    let start = &log.texts[0];
    assert_eq!(start["event"], "start");
    assert_eq!(start["call_id"], cdr["call_id"]);
    assert_eq!(start["tenant"], "demo");
    assert_eq!(start["direction"], "inbound");
    assert_eq!(start["from"], "+15550001111");
    assert_eq!(start["to"], NUMBER);
    assert_eq!(start["codec"], "pcm_s16le");
    assert_eq!(start["sample_rate"], 16000);
    assert_eq!(start["custom"], serde_json::json!({}));
    assert_eq!(
        log.texts.last().unwrap(),
        &serde_json::json!({"event": "stop"})
    );

    // Every binary message is one 20 ms frame at 16 kHz; frames are contiguous: no
    // fewer frames than the wall time they span (a dropped frame would show here).
    assert!(
        log.frame_sizes.iter().all(|&n| n == 640),
        "{:?}",
        log.frame_sizes
    );
    let span = log.last_frame.unwrap() - log.first_frame.unwrap();
    let frames = log.frame_sizes.len();
    assert!(
        frames as f64 >= span.as_secs_f64() / 0.020 - 1.0,
        "{frames} frames over {span:?}"
    );
    assert!(frames >= 150, "{frames} frames");
    assert!(
        !daemon
            .logs()
            .iter()
            .any(|l| l.contains("caller frames dropped")),
        "the bridge dropped frames"
    );

    // Back to 8 kHz (both phases of the 2:1 decimation: the up/down filter pair's
    // delay may be an odd number of 16 kHz samples) and against the fixture.
    let fixture = std::fs::read(repo_path("fixtures/audio/caller1.ulaw")).unwrap();
    let needle: Vec<f64> = fixture
        .iter()
        .map(|&c| f64::from(mu_to_linear(c)))
        .collect();
    let (mut lag, mut best, mut phase) = (0, f64::MIN, 0);
    for ph in 0..2 {
        let mut down = Downsampler::new(PipelineRate::Hz16000);
        let mut pcm8 = Vec::new();
        down.process(&log.pcm[ph..], &mut pcm8);
        let hay: Vec<f64> = pcm8.iter().map(|&s| f64::from(s)).collect();
        assert!(
            hay.len() >= needle.len(),
            "{} < {}",
            hay.len(),
            needle.len()
        );
        for l in 0..hay.len() - needle.len() + 1 {
            let v = ncc(&hay, &needle, l);
            if v > best {
                (lag, best, phase) = (l, v, ph);
            }
        }
    }
    eprintln!("sink: NCC {best:.4} at lag {lag} (phase {phase}), {frames} frames");
    assert!(best >= 0.98, "NCC {best:.4} at lag {lag} phase {phase}");

    assert!(
        daemon
            .logs()
            .iter()
            .any(|l| l.contains(&format!("ws://127.0.0.1:{port}/agent\""))),
        "the redacted URL is logged"
    );
    assert_no_secret_in_logs(&daemon);
}

#[test]
fn agent_hangup_sends_bye() {
    let (port, agent) = spawn_agent(Script::HangUp);
    let daemon = spawn_daemon(&format!("ws://127.0.0.1:{port}/agent"));
    // bridge_bye.xml with two X- headers in the INVITE.
    let scenario_dir = tempfile::tempdir().unwrap();
    let scenario = scenario_dir.path().join("bridge_bye_x.xml");
    let text = std::fs::read_to_string(sipp_scenario("bridge_bye.xml")).unwrap();
    let text = text.replacen(
        "Max-Forwards: 70\n",
        "Max-Forwards: 70\n      X-Order-Id: 42\n      x-customer: acme corp\n",
        1,
    );
    std::fs::write(&scenario, text).unwrap();
    let started = Instant::now();
    let result = sipp(
        &scenario,
        daemon.udp_addr(),
        &["-s", NUMBER, "-timeout", "15s"],
    );
    result.assert_success();
    // Well before the 30 s RTP timeout: the agent's hangup did it.
    assert!(
        started.elapsed() < Duration::from_secs(8),
        "{:?}",
        started.elapsed()
    );
    assert!(result.messages.contains("BYE sip:"), "{}", result.report());
    let cdr = answered_cdr(&daemon);
    assert_eq!(cdr["cause"], "agent-hangup");
    assert_eq!(cdr["hangup_side"], "bridge");
    let log = agent.join().unwrap();
    let start = log.texts.first().unwrap();
    assert_eq!(start["event"], "start");
    assert_eq!(
        start["custom"],
        serde_json::json!({"X-Order-Id": "42", "x-customer": "acme corp"})
    );
    assert_eq!(log.texts.last().unwrap()["event"], "stop");
    assert_no_secret_in_logs(&daemon);
}

/// Power of the 1 kHz bin in one 8 kHz frame relative to its energy (Goertzel).
fn tone_ratio(frame: &[f64]) -> f64 {
    let k = 2.0 * (2.0 * std::f64::consts::PI * 1000.0 / 8000.0).cos();
    let (mut s1, mut s2) = (0.0, 0.0);
    for &x in frame {
        let s = x + k * s1 - s2;
        s2 = s1;
        s1 = s;
    }
    let power = s1 * s1 + s2 * s2 - k * s1 * s2;
    let energy: f64 = frame.iter().map(|x| x * x).sum();
    if energy == 0.0 {
        0.0
    } else {
        2.0 * power / (energy * frame.len() as f64)
    }
}

#[test]
fn agent_audio_is_played_to_the_caller_and_its_mark_comes_back() {
    let (port, agent) = spawn_agent(Script::ToneThenMark);
    let daemon = spawn_daemon(&format!("ws://127.0.0.1:{port}/agent"));
    let media = UdpSocket::bind("127.0.0.1:0").unwrap();
    let media_port = media.local_addr().unwrap().port().to_string();
    let target = daemon.udp_addr();
    // The prompt (4.4 s) plays first, the tone from 5 s: hold the call 8 s.
    let carrier = thread::spawn(move || {
        sipp(
            &sipp_scenario("media_on_test_socket.xml"),
            target,
            &[
                "-key",
                "test_rtp_port",
                &media_port,
                "-s",
                NUMBER,
                "-d",
                "8000",
            ],
        )
    });
    media
        .set_read_timeout(Some(Duration::from_millis(1500)))
        .unwrap();
    let mut frames: Vec<Vec<f64>> = Vec::new();
    let mut buf = [0u8; 2048];
    let deadline = Instant::now() + Duration::from_secs(15);
    while Instant::now() < deadline {
        match media.recv_from(&mut buf) {
            Ok((n, _)) if n == 12 + 160 && buf[1] & 0x7f == 0 => {
                frames.push(
                    buf[12..n]
                        .iter()
                        .map(|&c| f64::from(mu_to_linear(c)))
                        .collect(),
                );
            }
            Ok(_) => {}
            Err(_) if !frames.is_empty() => break,
            Err(_) => {}
        }
    }
    let result = carrier.join().unwrap();
    result.assert_success();
    let log = agent.join().unwrap();

    // 1 s of tone = 50 packets, played contiguously.
    let tonal: Vec<bool> = frames.iter().map(|f| tone_ratio(f) > 0.9).collect();
    let longest = tonal.split(|&t| !t).map(<[bool]>::len).max().unwrap_or(0);
    assert!(
        (48..=51).contains(&longest),
        "longest tone run {longest} packets of {}",
        frames.len()
    );
    let mark = log
        .texts
        .iter()
        .find(|v| v["event"] == "mark")
        .expect("mark echoed");
    assert_eq!(
        mark,
        &serde_json::json!({"event": "mark", "name": "after-tone", "cleared": false})
    );
    assert_eq!(log.texts.last().unwrap()["event"], "stop");
    assert_no_secret_in_logs(&daemon);
}

#[test]
fn refused_agent_connection_leaves_the_call_up() {
    // A port nobody listens on.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let daemon =
        spawn_daemon_continuing(&format!("ws://127.0.0.1:{port}/agent?key={QUERY_SECRET}"));
    let result = sipp(
        &sipp_scenario("call_with_audio.xml"),
        daemon.udp_addr(),
        &["-s", NUMBER],
    );
    result.assert_success();
    let cdr = answered_cdr(&daemon);
    assert_eq!(cdr["cause"], "caller-bye");
    let call_id = cdr["call_id"].as_str().unwrap().to_owned();
    let failure = daemon
        .wait_for_log(Duration::from_secs(2), |l| {
            l.contains("agent pipeline failed") && l.contains(&call_id)
        })
        .expect("the failure is logged with the call id");
    assert!(
        failure.contains(&format!("ws://127.0.0.1:{port}/agent")),
        "{failure}"
    );
    assert_no_secret_in_logs(&daemon);
}

/// With `on_failure = "continue"`, a call against a misbehaving agent still runs to the
/// caller's BYE, and the failure is logged (with the call id and `reason`) without any
/// secret.
fn call_survives_agent_failure(script: Script, reason: &str) {
    let (port, agent) = spawn_agent(script);
    let daemon =
        spawn_daemon_continuing(&format!("ws://127.0.0.1:{port}/agent?key={QUERY_SECRET}"));
    let result = sipp(
        &sipp_scenario("call_with_audio.xml"),
        daemon.udp_addr(),
        &["-s", NUMBER],
    );
    result.assert_success();
    let cdr = answered_cdr(&daemon);
    assert_eq!(cdr["cause"], "caller-bye");
    let call_id = cdr["call_id"].as_str().unwrap().to_owned();
    let failure = daemon
        .wait_for_log(Duration::from_secs(2), |l| {
            l.contains("agent pipeline failed") && l.contains(&call_id)
        })
        .expect("the failure is logged with the call id");
    assert!(failure.contains(reason), "{failure}");
    let log = agent.join().unwrap();
    assert_eq!(
        log.auth.as_deref(),
        Some(format!("Bearer {TOKEN}").as_str())
    );
    assert_no_secret_in_logs(&daemon);
}

#[test]
fn upgrade_rejected_with_401_leaves_the_call_up() {
    call_survives_agent_failure(Script::Reject401, "upgrade rejected with HTTP 401");
}

#[test]
fn agent_dropping_mid_call_leaves_the_call_up() {
    call_survives_agent_failure(Script::DropAfterStart, "websocket");
}

/// `pipeline_rate = 8000`: `start` says so, frames are 320-byte 20 ms blocks at
/// 8 kHz, and they are the caller's decoded audio itself (no resampling).
#[test]
fn pipeline_rate_8000_delivers_the_callers_audio_at_8_khz() {
    let (port, agent) = spawn_agent(Script::Listen);
    let profile = profile(&format!("ws://127.0.0.1:{port}/agent")).replace(
        "caller_audio_after_prompt = false",
        "caller_audio_after_prompt = false\npipeline_rate = 8000",
    );
    let daemon = Daemon::spawn_with_env(&profile, &[("AGENT_TOKEN", TOKEN)]);
    let result = sipp(
        &sipp_scenario("call_with_audio.xml"),
        daemon.udp_addr(),
        &["-s", NUMBER],
    );
    result.assert_success();
    let log = agent.join().unwrap();
    assert_eq!(log.texts[0]["sample_rate"], 8000);
    assert!(
        log.frame_sizes.iter().all(|&n| n == 320),
        "{:?}",
        log.frame_sizes
    );
    let fixture = std::fs::read(repo_path("fixtures/audio/caller1.ulaw")).unwrap();
    let needle: Vec<f64> = fixture
        .iter()
        .map(|&c| f64::from(mu_to_linear(c)))
        .collect();
    let hay: Vec<f64> = log.pcm.iter().map(|&s| f64::from(s)).collect();
    assert!(
        hay.len() >= needle.len(),
        "{} < {}",
        hay.len(),
        needle.len()
    );
    let best = (0..hay.len() - needle.len() + 1)
        .map(|l| ncc(&hay, &needle, l))
        .fold(f64::MIN, f64::max);
    assert!(best >= 0.99, "NCC {best:.4}");
    assert_no_secret_in_logs(&daemon);
}

/// The native profile without the disclosure prompt (the agent's audio plays at once).
fn profile_without_prompt(url: &str) -> String {
    profile(url)
        .lines()
        .filter(|l| !l.starts_with("prompt = "))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Issue 5 acceptance: the agent's audio reaches the caller matching what was sent
/// (NCC ≥ 0.95 after G.711), and its mark comes back right after that audio was sent.
#[test]
fn agent_audio_reaches_the_caller_matching_what_was_sent() {
    let (port, agent) = spawn_agent(Script::FixtureThenMark);
    let daemon = Daemon::spawn_with_env(
        &profile_without_prompt(&format!("ws://127.0.0.1:{port}/agent")),
        &[("AGENT_TOKEN", TOKEN)],
    );
    let packets = call_capturing_rtp(&daemon, NUMBER, 5000, |_| {});
    let log = agent.join().unwrap();
    let hay: Vec<f64> = packets
        .iter()
        .flat_map(|p| p.samples.iter().map(|&s| f64::from(s)))
        .collect();
    let fixture = std::fs::read(repo_path("fixtures/audio/caller2.ulaw")).unwrap();
    let needle: Vec<f64> = fixture
        .iter()
        .map(|&c| f64::from(mu_to_linear(c)))
        .collect();
    let (best, lag) = best_ncc(&hay, &needle);
    eprintln!("agent audio at the caller: NCC {best:.4} at lag {lag}");
    assert!(best >= 0.95, "NCC {best:.4} at lag {lag}");
    let last_audio_at = packets[(lag + needle.len()).div_ceil(160) - 1].at;
    let mark_at = log.mark_at.expect("mark echoed");
    // One frame of slack for the two receiving threads' scheduling.
    assert!(mark_at + Duration::from_millis(20) >= last_audio_at);
    assert!(mark_at < last_audio_at + Duration::from_millis(100));
    // The CDR's quality: the mark waited for the whole fixture to play (its
    // mark-to-playout is the fixture's length, give or take the agent's
    // sending), and the agent's audio went out within a tick and the
    // resampler's look-ahead of arriving into the empty queue.
    let q = answered_cdr(&daemon)["quality"].clone();
    eprintln!("quality: {q}");
    let fixture_ms = (needle.len() / 8) as f64;
    let m = &q["mark_to_playout_ms"];
    assert_eq!(m["count"].as_u64(), Some(1), "{q}");
    let waited = m["max"].as_f64().unwrap();
    assert!(
        waited >= fixture_ms - 500.0 && waited <= fixture_ms + 500.0,
        "{waited} ms for {fixture_ms} ms of audio: {q}"
    );
    let out = &q["latency_out_ms"];
    assert!(out["count"].as_u64().unwrap() >= 1, "{q}");
    assert!(out["p50"].as_f64().unwrap() <= 45.0, "{q}");
    // The caller sent no audio: nothing to rate.
    assert!(q["mos"].is_null(), "{q}");
    assert_no_secret_in_logs(&daemon);
}

/// Issue 5 acceptance: `clear` during playout stops it within 40 ms of media time
/// (measured on the RTP the caller receives), and the pending mark comes back cleared.
#[test]
fn clear_stops_playout_within_40_ms_of_media_time() {
    let (clear_tx, clear_rx) = oneshot::channel();
    let (port, agent) = spawn_agent_with(Script::ToneThenClear, Some(clear_rx));
    let daemon = Daemon::spawn_with_env(
        &profile_without_prompt(&format!("ws://127.0.0.1:{port}/agent")),
        &[("AGENT_TOKEN", TOKEN)],
    );
    let mut clear_tx = Some(clear_tx);
    let mut audible = 0;
    let packets = call_capturing_rtp(&daemon, NUMBER, 3000, |p| {
        if p.audible() {
            audible += 1;
            if audible == 25
                && let Some(tx) = clear_tx.take()
            {
                tx.send(()).unwrap();
            }
        }
    });
    let log = agent.join().unwrap();
    let clear_at = log.clear_sent.expect("clear sent");
    let (overrun_ms, later) = playout_overrun_ms(&packets, clear_at);
    eprintln!("playout ran {overrun_ms:.1} ms of media time past the clear");
    assert!(overrun_ms <= 40.0, "{overrun_ms:.1} ms");
    assert_eq!(later, 0, "audio after the clear");
    let mark = log
        .texts
        .iter()
        .find(|v| v["event"] == "mark")
        .expect("mark echoed");
    assert_eq!(
        mark,
        &serde_json::json!({"event": "mark", "name": "after-tone", "cleared": true})
    );
    assert!(log.mark_at.unwrap() < clear_at + Duration::from_millis(100));
    assert_no_secret_in_logs(&daemon);
}

/// The fields of a `stats` event (docs/agent-protocol.md), each present with
/// its type.
fn assert_stats_shape(v: &Value) {
    assert_eq!(v["event"], "stats");
    for key in [
        "media_time_ms",
        "jitter_ms",
        "loss_pct",
        "one_way_delay_ms",
        "jb_target_ms",
    ] {
        assert!(v[key].is_number(), "{key} in {v}");
    }
    assert!(v["mos"].is_number() || v["mos"].is_null(), "{v}");
    assert!(v["concealed"].is_u64(), "{v}");
    assert!(
        v["jb_depth"]["avg"].is_number() && v["jb_depth"]["max"].is_u64(),
        "{v}"
    );
    for key in [
        "latency_in_ms",
        "latency_in_beyond_target_ms",
        "latency_out_ms",
        "mark_to_playout_ms",
    ] {
        let l = &v[key];
        assert!(l["count"].is_u64(), "{key} in {v}");
        for p in ["p50", "p99", "max"] {
            assert!(l[p].is_number() || l[p].is_null(), "{key}.{p} in {v}");
        }
    }
}

/// With `stats_interval_s = 1` a native agent gets a `stats` event every
/// second of its connection, with the documented fields: the caller's audio
/// counted in, no loss on loopback, a MOS of a clean G.711 call.
#[test]
fn stats_events_arrive_at_the_configured_interval() {
    let (port, agent) = spawn_agent(Script::Listen);
    let profile = profile(&format!("ws://127.0.0.1:{port}/agent")).replace(
        "caller_audio_after_prompt = false",
        "caller_audio_after_prompt = false\nstats_interval_s = 1",
    );
    assert!(profile.contains("stats_interval_s = 1"));
    let daemon = Daemon::spawn_with_env(&profile, &[("AGENT_TOKEN", TOKEN)]);
    sipp(
        &sipp_scenario("call_with_audio.xml"),
        daemon.udp_addr(),
        &["-s", NUMBER],
    )
    .assert_success();
    answered_cdr(&daemon);
    let log = agent.join().unwrap();
    let stats: Vec<&Value> = log.texts.iter().filter(|v| v["event"] == "stats").collect();
    // The call holds ~3.5 s after the answer: three events (two at least
    // under load).
    assert!((2..=4).contains(&stats.len()), "{:?}", log.texts);
    for s in &stats {
        assert_stats_shape(s);
    }
    let times: Vec<u64> = stats
        .iter()
        .map(|s| s["media_time_ms"].as_u64().unwrap())
        .collect();
    for pair in times.windows(2) {
        let gap = pair[1] - pair[0];
        assert!((750..=1250).contains(&gap), "interval {gap} ms: {times:?}");
    }
    let last = stats.last().unwrap();
    assert!(
        last["latency_in_ms"]["count"].as_u64().unwrap() > 50,
        "{last}"
    );
    assert_eq!(last["loss_pct"].as_f64(), Some(0.0), "{last}");
    let mos = last["mos"].as_f64().unwrap();
    assert!((4.0..=4.5).contains(&mos), "{last}");
    // stats come between start and stop.
    assert_eq!(log.texts.first().unwrap()["event"], "start");
    assert_eq!(log.texts.last().unwrap()["event"], "stop");
}

/// Without `stats_interval_s` (the default) no `stats` event is sent.
#[test]
fn no_stats_events_by_default() {
    let (port, agent) = spawn_agent(Script::Listen);
    let daemon = spawn_daemon(&format!("ws://127.0.0.1:{port}/agent"));
    sipp(
        &sipp_scenario("basic_call.xml"),
        daemon.udp_addr(),
        &["-s", NUMBER],
    )
    .assert_success();
    answered_cdr(&daemon);
    let log = agent.join().unwrap();
    assert!(
        log.texts.iter().all(|v| v["event"] != "stats"),
        "{:?}",
        log.texts
    );
}
