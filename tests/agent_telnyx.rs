#![allow(clippy::unwrap_used, clippy::expect_used)]
//! The agent pipeline in Telnyx mode, end to end: the daemon (as a process), SIPp as the
//! carrier and a test agent written from Telnyx's Media Streaming documentation
//! (developers.telnyx.com: "Media Streaming over WebSockets", bidirectional RTP mode) —
//! JSON read by hand, base64, µ-law and big-endian L16 handled with the test's own code
//! (tests/agent_util), never with the bridge's serialiser.
//!
//! The agent holds every message the bridge sends against the documented shape of its
//! event ([`DOCUMENTED`]): each documented field present with its type, nothing
//! undocumented. Covers, for PCMU and for L16 at 16 kHz: `connected`, `start` (stream
//! and call identity, `custom_parameters`, `media_format`), the caller's audio as `media`
//! matching the fixture (NCC), the agent's `media` played to the caller (NCC), its
//! `mark` echoed after that audio; `clear` stopping playout and echoing the pending mark;
//! `dtmf`; `error` frames for a malformed frame and a payload that is not base64; `stop`
//! last; the agent closing the socket → BYE; the agent dropping the connection → the
//! supervisor's reconnect, on a new stream.

mod agent_util;
mod common;

use agent_util::{
    b64_decode, b64_encode, best_ncc, call_capturing_rtp, playout_overrun_ms, ulaw_encode,
    ulaw_table,
};
use common::{Daemon, ProfileSpec, repo_path, sipp, sipp_scenario};
use futures_util::{SinkExt, StreamExt};
use serde_json::Value;
use std::thread;
use std::time::{Duration, Instant};
use tokio::sync::oneshot;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tokio_tungstenite::tungstenite::http::StatusCode;

const NUMBER: &str = "+15551234567";
const TOKEN: &str = "tx-Bearer-77-very-secret";

// ---- the documented message shapes ----------------------------------------------------

/// A JSON type as the documentation shows it.
#[derive(Clone, Copy, Debug)]
enum Ty {
    /// Any string.
    Str,
    /// A string holding a decimal integer (`sequence_number`, `chunk`, `timestamp`).
    Digits,
    /// A JSON integer.
    Int,
    /// Standard base64 text.
    Base64,
    /// `2025-06-05T08:54:19.698408Z`.
    Timestamp,
    /// An object of string values (`custom_parameters`).
    StrMap,
    /// An array of strings (`tags`).
    StrArray,
    /// An object with these fields.
    Obj(&'static [Field]),
}

#[derive(Clone, Copy, Debug)]
struct Field {
    name: &'static str,
    ty: Ty,
    required: bool,
}

const fn req(name: &'static str, ty: Ty) -> Field {
    Field {
        name,
        ty,
        required: true,
    }
}

const fn opt(name: &'static str, ty: Ty) -> Field {
    Field {
        name,
        ty,
        required: false,
    }
}

const EVENT: Field = req("event", Ty::Str);
const SEQ: Field = req("sequence_number", Ty::Digits);
const STREAM: Field = req("stream_id", Ty::Str);

/// Telnyx → application events, as documented.
const DOCUMENTED: &[(&str, &[Field])] = &[
    ("connected", &[EVENT, req("version", Ty::Str)]),
    (
        "start",
        &[
            EVENT,
            SEQ,
            STREAM,
            req(
                "start",
                Ty::Obj(&[
                    req("user_id", Ty::Str),
                    req("call_control_id", Ty::Str),
                    req("call_session_id", Ty::Str),
                    req("from", Ty::Str),
                    req("to", Ty::Str),
                    opt("tags", Ty::StrArray),
                    opt("client_state", Ty::Base64),
                    req("custom_parameters", Ty::StrMap),
                    req(
                        "media_format",
                        Ty::Obj(&[
                            req("encoding", Ty::Str),
                            req("sample_rate", Ty::Int),
                            req("channels", Ty::Int),
                        ]),
                    ),
                ]),
            ),
        ],
    ),
    (
        "media",
        &[
            EVENT,
            SEQ,
            STREAM,
            req(
                "media",
                Ty::Obj(&[
                    req("track", Ty::Str),
                    req("chunk", Ty::Digits),
                    req("timestamp", Ty::Digits),
                    req("payload", Ty::Base64),
                ]),
            ),
        ],
    ),
    (
        "dtmf",
        &[
            EVENT,
            STREAM,
            req("occurred_at", Ty::Timestamp),
            SEQ,
            req("dtmf", Ty::Obj(&[req("digit", Ty::Str)])),
        ],
    ),
    (
        "mark",
        &[
            EVENT,
            STREAM,
            SEQ,
            req("mark", Ty::Obj(&[req("name", Ty::Str)])),
        ],
    ),
    (
        "error",
        &[
            EVENT,
            req(
                "payload",
                Ty::Obj(&[
                    req("code", Ty::Int),
                    req("title", Ty::Str),
                    req("detail", Ty::Str),
                ]),
            ),
            STREAM,
        ],
    ),
    (
        "stop",
        &[
            EVENT,
            SEQ,
            req(
                "stop",
                Ty::Obj(&[req("user_id", Ty::Str), req("call_control_id", Ty::Str)]),
            ),
            STREAM,
        ],
    ),
];

fn is_timestamp(s: &str) -> bool {
    let b = s.as_bytes();
    let digits = |r: std::ops::Range<usize>| b[r].iter().all(u8::is_ascii_digit);
    b.len() == 27
        && digits(0..4)
        && b[4] == b'-'
        && digits(5..7)
        && b[7] == b'-'
        && digits(8..10)
        && b[10] == b'T'
        && digits(11..13)
        && b[13] == b':'
        && digits(14..16)
        && b[16] == b':'
        && digits(17..19)
        && b[19] == b'.'
        && digits(20..26)
        && b[26] == b'Z'
}

fn type_ok(v: &Value, ty: Ty, path: &str, problems: &mut Vec<String>) {
    let ok = match ty {
        Ty::Str => v.is_string(),
        Ty::Digits => v
            .as_str()
            .is_some_and(|s| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit())),
        Ty::Int => v.is_u64() || v.is_i64(),
        Ty::Base64 => v.as_str().is_some_and(|s| b64_decode(s).is_some()),
        Ty::Timestamp => v.as_str().is_some_and(is_timestamp),
        Ty::StrMap => v
            .as_object()
            .is_some_and(|m| m.values().all(Value::is_string)),
        Ty::StrArray => v.as_array().is_some_and(|a| a.iter().all(Value::is_string)),
        Ty::Obj(fields) => {
            if v.is_object() {
                shape_problems(v, fields, path, problems);
                true
            } else {
                false
            }
        }
    };
    if !ok {
        problems.push(format!("{path}: not {ty:?}: {v}"));
    }
}

fn shape_problems(v: &Value, fields: &[Field], path: &str, problems: &mut Vec<String>) {
    let obj = v.as_object().unwrap();
    for f in fields {
        let at = format!("{path}.{}", f.name);
        match obj.get(f.name) {
            Some(x) => type_ok(x, f.ty, &at, problems),
            None if f.required => problems.push(format!("{at}: missing")),
            None => {}
        }
    }
    for k in obj.keys() {
        if !fields.iter().any(|f| f.name == k) {
            problems.push(format!("{path}.{k}: not documented"));
        }
    }
}

/// Every message against its event's documented shape.
fn assert_documented(texts: &[(Instant, Value)]) {
    for (_, v) in texts {
        let event = v["event"].as_str().expect("event");
        let fields = DOCUMENTED
            .iter()
            .find(|(e, _)| *e == event)
            .unwrap_or_else(|| panic!("undocumented event: {v}"))
            .1;
        let mut problems = Vec::new();
        type_ok(v, Ty::Obj(fields), event, &mut problems);
        assert!(problems.is_empty(), "{problems:?} in {v}");
    }
}

#[test]
fn the_shape_checker_finds_missing_mistyped_and_undocumented_fields() {
    let good = serde_json::json!({"event":"mark","stream_id":"S","sequence_number":"5",
        "mark":{"name":"x"}});
    assert_documented(&[(Instant::now(), good)]);
    let mut problems = Vec::new();
    let bad = serde_json::json!({"event":"mark","stream_id":"S","sequence_number":5,
        "mark":{},"extra":1});
    type_ok(&bad, Ty::Obj(DOCUMENTED[4].1), "mark", &mut problems);
    assert_eq!(problems.len(), 3, "{problems:?}");
    assert!(is_timestamp("2025-06-05T08:54:19.698408Z"));
    assert!(!is_timestamp("2025-06-05T08:54:19Z"));
}

// ---- the test agent -------------------------------------------------------------------

/// The stream's encoding as the agent handles it.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Enc {
    Pcmu,
    L16,
}

impl Enc {
    fn name(self) -> &'static str {
        match self {
            Enc::Pcmu => "PCMU",
            Enc::L16 => "L16",
        }
    }

    /// Payload bytes per 20 ms.
    fn frame_bytes(self) -> usize {
        match self {
            Enc::Pcmu => 160,
            Enc::L16 => 640,
        }
    }

    /// A payload as samples (µ-law decoded, or big-endian 16-bit).
    fn decode(self, bytes: &[u8]) -> Vec<i16> {
        match self {
            Enc::Pcmu => {
                let table = ulaw_table();
                bytes.iter().map(|&c| table[c as usize]).collect()
            }
            Enc::L16 => bytes
                .chunks_exact(2)
                .map(|c| i16::from_be_bytes([c[0], c[1]]))
                .collect(),
        }
    }
}

/// What the test agent saw.
#[derive(Debug, Default)]
struct Seen {
    authorization: Option<String>,
    texts: Vec<(Instant, Value)>,
    clear_sent: Option<Instant>,
    closed_by_bridge: bool,
}

impl Seen {
    fn events(&self, name: &str) -> Vec<&Value> {
        self.texts
            .iter()
            .filter(|(_, v)| v["event"] == name)
            .map(|(_, v)| v)
            .collect()
    }
}

enum Script {
    /// Only listen.
    Listen,
    /// After `start`: two frames the bridge cannot use, then `payload` as 20 ms
    /// `media` messages, then a `mark`.
    PlayThenMark(Vec<u8>),
    /// As `PlayThenMark` (without the bad frames), then `clear` when the signal comes.
    PlayThenClear(Vec<u8>, oneshot::Receiver<()>),
    /// Close the WebSocket (close handshake) right after `start`.
    CloseAfterStart,
    /// Drop the TCP connection, with no close frame, after this many `media` messages.
    DropAfterMedia(usize),
}

/// A one-connection agent on a free port; the thread returns what it saw once the
/// bridge closes the connection (or after 30 s). The upgrade is refused with 401
/// without the bearer token.
fn spawn_agent(script: Script, enc: Enc) -> (u16, thread::JoinHandle<Seen>) {
    let (port, handle) = spawn_agents(vec![script], enc);
    (
        port,
        thread::spawn(move || handle.join().unwrap().remove(0)),
    )
}

/// An agent that serves one connection per script, one after the other, on one port.
fn spawn_agents(scripts: Vec<Script>, enc: Enc) -> (u16, thread::JoinHandle<Vec<Seen>>) {
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
            let mut seen = Vec::new();
            for script in scripts {
                let Ok(Ok((tcp, _))) =
                    tokio::time::timeout(Duration::from_secs(20), listener.accept()).await
                else {
                    seen.push(Seen::default());
                    continue;
                };
                seen.push(serve(tcp, script, enc).await);
            }
            seen
        })
    });
    (port, handle)
}

async fn serve(stream: tokio::net::TcpStream, script: Script, enc: Enc) -> Seen {
    let mut seen = Seen::default();
    #[allow(clippy::result_large_err)] // tungstenite's callback signature
    let ws = tokio_tungstenite::accept_hdr_async(stream, |req: &Request, resp| {
        seen.authorization = req
            .headers()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        if seen.authorization.as_deref() != Some(&format!("Bearer {TOKEN}")) {
            let mut refusal = ErrorResponse::new(Some("unauthorized".to_owned()));
            *refusal.status_mut() = StatusCode::UNAUTHORIZED;
            return Err(refusal);
        }
        Ok::<Response, _>(resp)
    })
    .await;
    let Ok(mut ws) = ws else {
        return seen;
    };
    let close_after_start = matches!(script, Script::CloseAfterStart);
    let drop_after = match script {
        Script::DropAfterMedia(n) => Some(n),
        _ => None,
    };
    let bad_frames = matches!(script, Script::PlayThenMark(_));
    let (audio, mut clear_rx) = match script {
        Script::PlayThenMark(a) => (Some(a), None),
        Script::PlayThenClear(a, rx) => (Some(a), Some(rx)),
        Script::Listen | Script::CloseAfterStart | Script::DropAfterMedia(_) => (None, None),
    };
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
                    // As Telnyx documents it: no stream_id.
                    ws.send(Message::text(r#"{"event":"clear"}"#)).await.unwrap();
                    seen.clear_sent = Some(Instant::now());
                }
                continue;
            }
            m = tokio::time::timeout_at(deadline, ws.next()) => m,
        };
        let Ok(Some(Ok(msg))) = msg else { break };
        match msg {
            Message::Text(text) => {
                let v: Value = serde_json::from_str(&text).unwrap();
                let start = v["event"] == "start";
                let stream_id = v["stream_id"].as_str().unwrap_or_default().to_owned();
                seen.texts.push((Instant::now(), v));
                if drop_after.is_some_and(|n| seen.events("media").len() >= n) {
                    // Gone without a close frame (the socket is dropped with `ws`).
                    return seen;
                }
                if !start {
                    continue;
                }
                if close_after_start {
                    ws.close(None).await.unwrap();
                    // Read the bridge's close reply.
                    while let Ok(Some(Ok(_))) =
                        tokio::time::timeout(Duration::from_secs(2), ws.next()).await
                    {
                    }
                    return seen;
                }
                if bad_frames {
                    ws.send(Message::text("{not json")).await.unwrap();
                    let bad = format!(
                        r#"{{"event":"media","stream_id":"{stream_id}","media":{{"payload":"%%not base64%%"}}}}"#
                    );
                    ws.send(Message::text(bad)).await.unwrap();
                }
                if let Some(audio) = &audio {
                    for chunk in audio.chunks(enc.frame_bytes()) {
                        let media = format!(
                            r#"{{"event":"media","media":{{"payload":"{}"}}}}"#,
                            b64_encode(chunk)
                        );
                        ws.send(Message::text(media)).await.unwrap();
                    }
                    let mark = r#"{"event":"mark","mark":{"name":"after-audio"}}"#;
                    ws.send(Message::text(mark)).await.unwrap();
                }
            }
            Message::Binary(_) => panic!("Telnyx sends no binary frames"),
            Message::Close(_) => {
                seen.closed_by_bridge = true;
                break;
            }
            _ => {}
        }
    }
    seen
}

// ---- the daemon side ------------------------------------------------------------------

/// The test profile: tenant `demo` on a Telnyx-mode agent at `url` in `enc`, bearer
/// auth (token from `AGENT_TOKEN`), caller audio not gated by the prompt; `no_prompt`
/// drops the disclosure prompt so the agent's audio plays at once.
fn profile(url: &str, enc: Enc, no_prompt: bool) -> String {
    let spec = ProfileSpec {
        tenant: "caller_audio_after_prompt = false\npipeline_rate = 16000",
        ..ProfileSpec::default()
    };
    let agent = format!(
        r#"pipeline = {{ kind = "agent", url = "{url}", mode = "telnyx", encoding = "{}", auth = "env:AGENT_TOKEN", on_failure = "continue" }}"#,
        enc.name()
    );
    let text = spec
        .render()
        .replace(r#"pipeline = { kind = "echo" }"#, &agent);
    assert!(text.contains("mode = \"telnyx\""));
    if no_prompt {
        text.lines()
            .filter(|l| !l.starts_with("prompt = "))
            .collect::<Vec<_>>()
            .join("\n")
    } else {
        text
    }
}

fn spawn_daemon(profile: &str) -> Daemon {
    Daemon::spawn_with_env(profile, &[("AGENT_TOKEN", TOKEN)])
}

fn assert_no_secret_in_logs(daemon: &Daemon) {
    for line in daemon.logs() {
        assert!(!line.contains(TOKEN), "secret leaked: {line}");
    }
}

fn answered_cdr(daemon: &Daemon) -> Value {
    daemon
        .wait_for_cdr(Duration::from_secs(10), |c| c["result_code"] == 200)
        .expect("a CDR for the answered call")
}

/// A SIPp scenario from `name` with two X- headers added to the INVITE.
fn with_x_headers(dir: &std::path::Path, name: &str) -> std::path::PathBuf {
    let text = std::fs::read_to_string(sipp_scenario(name)).unwrap();
    let text = text
        .replacen(
            "Max-Forwards: 70\n",
            "Max-Forwards: 70\n      X-Order-Id: 42\n      x-customer: acme corp\n",
            1,
        )
        .replace(
            "../../fixtures/pcap/",
            &format!("{}/", repo_path("fixtures/pcap").display()),
        );
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

fn fixture(name: &str) -> Vec<u8> {
    std::fs::read(repo_path(&format!("fixtures/audio/{name}"))).unwrap()
}

fn digits(v: &Value) -> Option<u64> {
    v.as_str()?.parse().ok()
}

/// The fixture as 8 kHz samples (the test's own µ-law table).
fn fixture_8k(name: &str) -> Vec<f64> {
    let table = ulaw_table();
    fixture(name)
        .iter()
        .map(|&c| f64::from(table[c as usize]))
        .collect()
}

/// 8 kHz samples at 16 kHz: each sample, then the mean of it and the next.
fn upsample_linear(x: &[i16]) -> Vec<i16> {
    let mut out = Vec::with_capacity(x.len() * 2);
    for (i, &s) in x.iter().enumerate() {
        let next = x.get(i + 1).copied().unwrap_or(s);
        out.push(s);
        out.push(((i32::from(s) + i32::from(next)) / 2) as i16);
    }
    out
}

/// A call with the caller's fixture audio to an agent listening in `enc`; checks
/// everything the agent got against the documentation and returns it.
fn caller_audio_call(enc: Enc) -> (Seen, Vec<f64>) {
    let (port, agent) = spawn_agent(Script::Listen, enc);
    let daemon = spawn_daemon(&profile(
        &format!("ws://127.0.0.1:{port}/telnyx"),
        enc,
        false,
    ));
    let dir = tempfile::tempdir().unwrap();
    let scenario = with_x_headers(dir.path(), "call_with_audio.xml");
    sipp(&scenario, daemon.udp_addr(), &["-s", NUMBER]).assert_success();
    let seen = agent.join().unwrap();
    let cdr = answered_cdr(&daemon);
    let call_id = cdr["call_id"].as_str().unwrap().to_owned();
    assert_eq!(seen.authorization, Some(format!("Bearer {TOKEN}")));
    assert_documented(&seen.texts);

    // connected first, then start (sequence_number "1") with the call's identity.
    let texts: Vec<&Value> = seen.texts.iter().map(|(_, v)| v).collect();
    assert_eq!(
        texts[0],
        &serde_json::json!({"event":"connected","version":"1.0.0"})
    );
    let start = texts[1];
    assert_eq!(start["event"], "start");
    assert_eq!(start["sequence_number"], "1");
    let stream_id = start["stream_id"].as_str().unwrap();
    let groups: Vec<usize> = stream_id.split('-').map(str::len).collect();
    assert_eq!(groups, [8, 4, 4, 4, 12], "a UUID: {stream_id}");
    let s = &start["start"];
    assert_eq!(s["user_id"], "demo");
    assert_eq!(s["call_control_id"], call_id.as_str());
    assert_eq!(s["call_session_id"], call_id.as_str());
    assert_eq!(s["to"], NUMBER);
    assert_eq!(
        s["custom_parameters"],
        serde_json::json!({"X-Order-Id":"42","x-customer":"acme corp"})
    );
    let rate = if enc == Enc::L16 { 16_000 } else { 8000 };
    assert_eq!(
        s["media_format"],
        serde_json::json!({"encoding": enc.name(), "sample_rate": rate, "channels": 1})
    );

    // Every later message carries the stream_id and the next sequence_number.
    for (i, v) in texts[1..].iter().enumerate() {
        assert_eq!(v["stream_id"], stream_id, "{v}");
        assert_eq!(digits(&v["sequence_number"]), Some(i as u64 + 1), "{v}");
    }

    // media: track inbound, chunk from "1", 20 ms per chunk, 20 ms of the encoding.
    let media = seen.events("media");
    assert!(media.len() >= 150, "{} media messages", media.len());
    let mut pcm = Vec::new();
    for (i, m) in media.iter().enumerate() {
        let body = &m["media"];
        assert_eq!(body["track"], "inbound");
        assert_eq!(digits(&body["chunk"]), Some(i as u64 + 1));
        assert_eq!(digits(&body["timestamp"]), Some(i as u64 * 20));
        let payload = b64_decode(body["payload"].as_str().unwrap()).unwrap();
        assert_eq!(payload.len(), enc.frame_bytes());
        pcm.extend(enc.decode(&payload).into_iter().map(f64::from));
    }
    // stop last, with the call's identity; the bridge then closed.
    assert_eq!(
        texts.last().unwrap(),
        &&serde_json::json!({"event":"stop",
            "sequence_number":(texts.len() - 1).to_string(),
            "stop":{"user_id":"demo","call_control_id":call_id},
            "stream_id":stream_id})
    );
    assert!(seen.closed_by_bridge);
    assert_no_secret_in_logs(&daemon);
    (seen, pcm)
}

#[test]
fn telnyx_pcmu_agent_gets_documented_messages_and_the_callers_audio() {
    let (_, pcm) = caller_audio_call(Enc::Pcmu);
    let (best, lag) = best_ncc(&pcm, &fixture_8k("caller1.ulaw"));
    eprintln!("PCMU: caller audio at the agent: NCC {best:.4} at lag {lag}");
    assert!(best >= 0.95, "NCC {best:.4} at lag {lag}");
}

#[test]
fn telnyx_l16_agent_gets_the_callers_audio_wideband_at_16k() {
    let (_, pcm16) = caller_audio_call(Enc::L16);
    // 16 kHz at the agent: its even or its odd samples are the 8 kHz signal.
    let needle = fixture_8k("caller1.ulaw");
    let (best, lag) = (0..2)
        .map(|phase| {
            let pcm8: Vec<f64> = pcm16.iter().skip(phase).step_by(2).copied().collect();
            best_ncc(&pcm8, &needle)
        })
        .fold((f64::MIN, 0), |a, b| if b.0 > a.0 { b } else { a });
    eprintln!("L16: caller audio at the agent: NCC {best:.4} at lag {lag} (8 kHz samples)");
    assert!(best >= 0.95, "NCC {best:.4} at lag {lag}");
}

/// The agent plays `payload` (in `enc`) and a mark; the caller must hear `expected`
/// (8 kHz) and the mark must come back after it.
fn agent_audio_reaches_the_caller(enc: Enc, payload: Vec<u8>, expected: &[f64]) -> Seen {
    let (port, agent) = spawn_agent(Script::PlayThenMark(payload), enc);
    let daemon = spawn_daemon(&profile(
        &format!("ws://127.0.0.1:{port}/telnyx"),
        enc,
        true,
    ));
    let packets = call_capturing_rtp(&daemon, NUMBER, 5000, |_| {});
    let seen = agent.join().unwrap();
    assert_documented(&seen.texts);

    let hay: Vec<f64> = packets
        .iter()
        .flat_map(|p| p.samples.iter().map(|&s| f64::from(s)))
        .collect();
    let (best, lag) = best_ncc(&hay, expected);
    eprintln!(
        "{}: agent audio at the caller: NCC {best:.4} at lag {lag}",
        enc.name()
    );
    assert!(best >= 0.95, "NCC {best:.4} at lag {lag}");

    // The mark comes back once, after the last packet of the audio was sent (the
    // caller's socket and the agent share this clock), and not long after.
    let marks = seen.events("mark");
    assert_eq!(marks.len(), 1, "{marks:?}");
    assert_eq!(marks[0]["mark"], serde_json::json!({"name": "after-audio"}));
    let mark_at = seen
        .texts
        .iter()
        .find(|(_, v)| v["event"] == "mark")
        .unwrap()
        .0;
    let last_audio_at = packets[(lag + expected.len()).div_ceil(160) - 1].at;
    let first_audio_at = packets[lag / 160].at;
    // One frame of slack for the two receiving threads' scheduling.
    assert!(
        mark_at + Duration::from_millis(20) >= last_audio_at,
        "mark {:?} before the last audio packet",
        last_audio_at - mark_at
    );
    assert!(
        mark_at < last_audio_at + Duration::from_millis(100),
        "mark {:?} after the audio",
        mark_at - last_audio_at
    );
    assert!(mark_at - first_audio_at >= Duration::from_millis(2500));
    assert_eq!(seen.texts.last().unwrap().1["event"], "stop");
    assert_no_secret_in_logs(&daemon);
    seen
}

#[test]
fn telnyx_pcmu_agent_audio_reaches_the_caller_and_bad_frames_get_error_frames() {
    let audio = fixture("caller2.ulaw");
    let seen = agent_audio_reaches_the_caller(Enc::Pcmu, audio, &fixture_8k("caller2.ulaw"));
    // The two unusable frames were answered with the documented error frames, in order.
    let errors = seen.events("error");
    assert_eq!(errors.len(), 2, "{errors:?}");
    assert_eq!(errors[0]["payload"]["code"], 100_003);
    assert_eq!(errors[0]["payload"]["title"], "malformed_frame");
    assert_eq!(errors[1]["payload"]["code"], 100_004);
    assert_eq!(errors[1]["payload"]["title"], "invalid_media");
}

#[test]
fn telnyx_l16_agent_audio_reaches_the_caller() {
    let table = ulaw_table();
    let pcm8: Vec<i16> = fixture("caller2.ulaw")
        .iter()
        .map(|&c| table[c as usize])
        .collect();
    let payload: Vec<u8> = upsample_linear(&pcm8)
        .iter()
        .flat_map(|s| s.to_be_bytes())
        .collect();
    let seen = agent_audio_reaches_the_caller(Enc::L16, payload, &fixture_8k("caller2.ulaw"));
    assert_eq!(seen.events("error").len(), 2);
}

#[test]
fn telnyx_clear_stops_playout_within_40_ms_and_echoes_the_pending_mark() {
    // 5 s of a 1 kHz tone at -12 dBFS, as µ-law.
    let tone: Vec<u8> = (0..40_000)
        .map(|i| {
            let x = (8000.0 * (2.0 * std::f64::consts::PI * f64::from(i) / 8.0).sin()) as i16;
            ulaw_encode(x)
        })
        .collect();
    let (clear_tx, clear_rx) = oneshot::channel();
    let (port, agent) = spawn_agent(Script::PlayThenClear(tone, clear_rx), Enc::Pcmu);
    let daemon = spawn_daemon(&profile(
        &format!("ws://127.0.0.1:{port}/telnyx"),
        Enc::Pcmu,
        true,
    ));
    // Clear once 25 packets (500 ms) of the tone have reached the caller.
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
    let seen = agent.join().unwrap();
    assert_documented(&seen.texts);
    let clear_at = seen.clear_sent.expect("clear sent");
    let (overrun_ms, later) = playout_overrun_ms(&packets, clear_at);
    eprintln!("playout ran {overrun_ms:.1} ms of media time past the clear");
    assert!(overrun_ms <= 40.0, "{overrun_ms:.1} ms");
    assert_eq!(later, 0, "audio after the clear");
    let total_audible = packets.iter().filter(|p| p.audible()).count();
    assert!(total_audible < 40, "{total_audible} audible packets of 250");

    // The pending mark is echoed at the clear, not after the 5 s of tone.
    let (mark_at, mark) = seen
        .texts
        .iter()
        .find(|(_, v)| v["event"] == "mark")
        .expect("mark echoed");
    assert_eq!(mark["mark"]["name"], "after-audio");
    assert!(
        *mark_at < clear_at + Duration::from_millis(100),
        "{:?}",
        *mark_at - clear_at
    );
    assert!(seen.events("error").is_empty());
    assert_no_secret_in_logs(&daemon);
}

#[test]
fn telnyx_dtmf_reaches_the_agent() {
    let dtmf = std::path::Path::new("/usr/share/sip-tester/dtmf_2833_9.pcap");
    assert!(dtmf.exists(), "SIPp's RFC 4733 pcap of digit 9");
    let (port, agent) = spawn_agent(Script::Listen, Enc::L16);
    let daemon = spawn_daemon(&profile(
        &format!("ws://127.0.0.1:{port}/telnyx"),
        Enc::L16,
        false,
    ));
    let dir = tempfile::tempdir().unwrap();
    let scenario = dir.path().join("dtmf.xml");
    let text = std::fs::read_to_string(sipp_scenario("call_with_audio.xml"))
        .unwrap()
        .replace(
            "../../fixtures/pcap/caller1_pcmu.pcap",
            dtmf.to_str().unwrap(),
        );
    std::fs::write(&scenario, text).unwrap();
    let before = std::time::SystemTime::now();
    sipp(&scenario, daemon.udp_addr(), &["-s", NUMBER]).assert_success();
    let seen = agent.join().unwrap();
    assert_documented(&seen.texts);
    let stream_id = seen.texts[1].1["stream_id"].as_str().unwrap().to_owned();
    let dtmf = seen.events("dtmf");
    assert_eq!(dtmf.len(), 1, "{dtmf:?}");
    assert_eq!(dtmf[0]["dtmf"], serde_json::json!({"digit": "9"}));
    assert_eq!(dtmf[0]["stream_id"], stream_id.as_str());
    assert!(digits(&dtmf[0]["sequence_number"]).is_some_and(|n| n > 1));
    // occurred_at is today's UTC date (the call ran within the last minute).
    let secs = before
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let occurred = dtmf[0]["occurred_at"].as_str().unwrap();
    let (h, m) = (secs / 3600 % 24, secs / 60 % 60);
    let hm = format!("T{h:02}:{m:02}");
    let hm_next = format!(
        "T{:02}:{:02}",
        (secs + 60) / 3600 % 24,
        (secs + 60) / 60 % 60
    );
    assert!(
        occurred.contains(&hm) || occurred.contains(&hm_next),
        "{occurred} vs {hm}"
    );
    assert_no_secret_in_logs(&daemon);
}

#[test]
fn telnyx_agent_closing_the_socket_hangs_up_the_call() {
    let (port, agent) = spawn_agent(Script::CloseAfterStart, Enc::Pcmu);
    let daemon = spawn_daemon(&profile(
        &format!("ws://127.0.0.1:{port}/telnyx"),
        Enc::Pcmu,
        false,
    ));
    let started = Instant::now();
    let result = sipp(
        &sipp_scenario("bridge_bye.xml"),
        daemon.udp_addr(),
        &["-s", NUMBER, "-timeout", "15s"],
    );
    result.assert_success();
    assert!(
        started.elapsed() < Duration::from_secs(8),
        "{:?}",
        started.elapsed()
    );
    assert!(result.messages.contains("BYE sip:"), "{}", result.report());
    let cdr = answered_cdr(&daemon);
    assert_eq!(cdr["cause"], "agent-hangup");
    assert_eq!(cdr["hangup_side"], "bridge");
    let seen = agent.join().unwrap();
    assert_documented(&seen.texts);
    assert_eq!(seen.texts[1].1["event"], "start");
    assert!(
        seen.events("stop").is_empty(),
        "no stop after the agent's close"
    );
    assert_no_secret_in_logs(&daemon);
}

#[test]
fn telnyx_agent_dropped_mid_call_is_reconnected_on_a_new_stream() {
    let (port, agent) = spawn_agents(vec![Script::DropAfterMedia(10), Script::Listen], Enc::Pcmu);
    let daemon = spawn_daemon(&profile(
        &format!("ws://127.0.0.1:{port}/telnyx"),
        Enc::Pcmu,
        false,
    ));
    sipp(
        &sipp_scenario("call_with_audio.xml"),
        daemon.udp_addr(),
        &["-s", NUMBER],
    )
    .assert_success();
    let cdr = answered_cdr(&daemon);
    assert_eq!(cdr["cause"], "caller-bye");
    assert_eq!(cdr["pipeline"]["connections"], 2, "{cdr}");
    assert_eq!(cdr["pipeline"]["reconnects"], 1, "{cdr}");
    let conns = agent.join().unwrap();
    for c in &conns {
        assert_documented(&c.texts);
        assert_eq!(c.texts[0].1["event"], "connected");
        assert_eq!(c.texts[1].1["event"], "start");
        assert_eq!(c.texts[1].1["start"]["call_control_id"], cdr["call_id"]);
    }
    // A new stream: its own stream_id, counters from the start again.
    let (first, second) = (&conns[0].texts[1].1, &conns[1].texts[1].1);
    assert_ne!(first["stream_id"], second["stream_id"]);
    assert_eq!(second["sequence_number"], "1");
    let media = conns[1].events("media");
    assert!(media.len() >= 100, "{} media messages", media.len());
    assert_eq!(media[0]["media"]["chunk"], "1");
    assert_eq!(conns[1].texts.last().unwrap().1["event"], "stop");
    assert_no_secret_in_logs(&daemon);
}
