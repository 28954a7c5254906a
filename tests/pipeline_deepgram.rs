#![allow(clippy::unwrap_used, clippy::expect_used)]
//! The Deepgram pipeline end to end: the daemon (as a process), SIPp as the carrier and
//! the Deepgram-protocol mock (`common::deepgram_mock`, written from the spec).
//!
//! Covers: the listen query from the tenant config, `Authorization: Token`, linear16 at
//! the pipeline rate matching the caller fixture (NCC ≥ 0.98 at 8 kHz), Finalize +
//! CloseStream ending the stream, scripted final transcripts stored in order with
//! call-relative times (read back decrypted through `sipbridge export`), nothing stored
//! for a tenant without `transcripts`, KeepAlive through a silent hold longer than the
//! mock's idle limit, a drop mid-call followed by a reconnect with times still right, a
//! wrong key (401) leaving the call up with no key in any log line; and the config keys.

mod common;

use common::audio::ncc;
use common::deepgram_mock::{ConnLog, ConnScript, DeepgramMock, Ended, MockConfig, Scripted};
use common::{Daemon, ProfileSpec, repo_path, sipp, sipp_scenario};
use serde_json::Value;
use sipbridge::media::g711::mu_to_linear;
use sipbridge::media::resample::{Downsampler, PipelineRate};
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

const NUMBER: &str = "+15551234567";
const CALLER: &str = "+15550001111";
const KEY: &str = "dg-Kq71-right-key";

/// The test profile with `demo` on Deepgram at `base_url`, caller audio not gated by the
/// prompt, transcripts stored or not, the key from `DG_KEY`.
fn profile(base_url: &str, transcripts: bool) -> String {
    let spec = ProfileSpec {
        tenant: "caller_audio_after_prompt = false",
        ..ProfileSpec::default()
    };
    let pipeline = format!(
        r#"pipeline = {{ kind = "deepgram", model = "nova-2-phonecall", language = "en-US", api_key = "env:DG_KEY", base_url = "{base_url}", endpointing_ms = 300, interim_results = true, utterance_end_ms = 1000, vad_events = true }}"#
    );
    let text = spec
        .render()
        .replace(r#"pipeline = { kind = "echo" }"#, &pipeline)
        .replace(
            "transcripts = false",
            &format!("transcripts = {transcripts}"),
        );
    assert!(text.contains("kind = \"deepgram\""));
    text
}

fn spawn_daemon(base_url: &str, transcripts: bool, key: &str) -> Daemon {
    Daemon::spawn_with_env(&profile(base_url, transcripts), &[("DG_KEY", key)])
}

fn assert_no_key_in_logs(daemon: &Daemon, key: &str) {
    for line in daemon.logs() {
        assert!(!line.contains(key), "key leaked: {line}");
    }
}

fn answered_cdr(daemon: &Daemon) -> Value {
    daemon
        .wait_for_cdr(Duration::from_secs(10), |c| c["result_code"] == 200)
        .expect("a CDR for the answered call")
}

/// The caller's transcripts as `sipbridge export` decrypts them, polled until `n` are
/// there (or 10 s).
fn exported_transcripts(daemon: &Daemon, n: usize) -> Vec<Value> {
    let deadline = Instant::now() + Duration::from_secs(10);
    for attempt in 0.. {
        let out: PathBuf = daemon.dir().join(format!("export-{attempt}"));
        let o = Command::new(env!("CARGO_BIN_EXE_sipbridge"))
            .args(["export", "--tenant", "demo", "--caller", CALLER, "--out"])
            .arg(&out)
            .args(["--config", "profile.toml"])
            .current_dir(daemon.dir())
            .env("DG_KEY", "unused-by-export")
            .env("SIPBRIDGE_LOG", "warn")
            .output()
            .unwrap();
        assert_eq!(
            o.status.code(),
            Some(0),
            "export: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        let list: Vec<Value> =
            serde_json::from_slice(&std::fs::read(out.join("transcripts.json")).unwrap()).unwrap();
        if list.len() >= n || Instant::now() >= deadline {
            return list;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    unreachable!()
}

/// Best NCC of the 16 kHz `pcm` (back at 8 kHz, both decimation phases) against the
/// µ-law caller fixture.
fn best_ncc_against_fixture(pcm: &[i16]) -> f64 {
    let fixture = std::fs::read(repo_path("fixtures/audio/caller1.ulaw")).unwrap();
    let needle: Vec<f64> = fixture
        .iter()
        .map(|&c| f64::from(mu_to_linear(c)))
        .collect();
    let mut best = f64::MIN;
    for phase in 0..2 {
        let mut down = Downsampler::new(PipelineRate::Hz16000);
        let mut pcm8 = Vec::new();
        down.process(&pcm[phase..], &mut pcm8);
        let hay: Vec<f64> = pcm8.iter().map(|&s| f64::from(s)).collect();
        assert!(
            hay.len() >= needle.len(),
            "{} < {}",
            hay.len(),
            needle.len()
        );
        for lag in 0..=hay.len() - needle.len() {
            best = best.max(ncc(&hay, &needle, lag));
        }
    }
    best
}

fn ms(v: &Value, field: &str) -> i64 {
    v[field].as_i64().unwrap()
}

#[test]
fn caller_audio_reaches_deepgram_and_final_transcripts_are_stored_in_call_time() {
    let mut config = MockConfig::new(KEY);
    config.scripts = vec![ConnScript {
        at_audio: vec![
            (0.4, Scripted::SpeechStarted { timestamp: 0.3 }),
            (1.0, Scripted::interim(0.0, 1.0, "hi i")),
            (1.2, Scripted::final_result(0.30, 0.50, "hi", 0.97)),
            (
                2.2,
                Scripted::final_result(0.80, 1.20, "i would like to check", 0.91),
            ),
            (2.5, Scripted::UtteranceEnd { last_word_end: 2.0 }),
        ],
        on_close: vec![Scripted::final_result(2.00, 0.90, "my order status", 0.88)],
        drop_at_audio: None,
    }];
    let mock = DeepgramMock::start(config);
    let daemon = spawn_daemon(&mock.base_url(), true, KEY);
    let result = sipp(
        &sipp_scenario("call_with_audio.xml"),
        daemon.udp_addr(),
        &["-s", NUMBER],
    );
    result.assert_success();
    let cdr = answered_cdr(&daemon);
    let conns = mock.wait_until(Duration::from_secs(8), |c| {
        c.first().is_some_and(|c| c.ended != Ended::Open)
    });
    assert_eq!(conns.len(), 1, "{conns:#?}");
    let c = &conns[0];
    assert_eq!(c.status, 101);
    assert_eq!(c.path, "/v1/listen");
    assert_eq!(
        c.authorization.as_deref(),
        Some(format!("Token {KEY}").as_str())
    );
    let q = |k: &str| c.query.get(k).map(String::as_str);
    assert_eq!(q("encoding"), Some("linear16"));
    assert_eq!(q("sample_rate"), Some("16000"));
    assert_eq!(q("channels"), Some("1"));
    assert_eq!(q("model"), Some("nova-2-phonecall"));
    assert_eq!(q("language"), Some("en-US"));
    assert_eq!(q("endpointing"), Some("300"));
    assert_eq!(q("interim_results"), Some("true"));
    assert_eq!(q("utterance_end_ms"), Some("1000"));
    assert_eq!(q("vad_events"), Some("true"));
    assert_eq!(c.query.len(), 9, "{:?}", c.query);

    // linear16 at 16 kHz in 20 ms frames, matching the caller's audio.
    assert!(c.frames.iter().all(|(_, f)| f.len() == 640));
    let best = best_ncc_against_fixture(&c.pcm());
    eprintln!("deepgram sink: NCC {best:.4}, {} frames", c.frames.len());
    assert!(best >= 0.98, "NCC {best:.4}");

    // The stream ends with Finalize, CloseStream; the mock closed after Metadata.
    assert_eq!(c.text_types(), ["Finalize", "CloseStream"]);
    assert_eq!(c.ended, Ended::CloseStream);
    assert!(c.sent.last().unwrap().contains("\"Metadata\""));

    // Final transcripts only, in order, in call time: the first frame's media time T0
    // plus the stream time; gaps between segments exactly as scripted.
    let rows = exported_transcripts(&daemon, 3);
    let texts: Vec<&str> = rows.iter().map(|r| r["text"].as_str().unwrap()).collect();
    assert_eq!(
        texts,
        ["hi", "i would like to check", "my order status"],
        "{rows:#?}"
    );
    for r in &rows {
        assert_eq!(r["call_id"], cdr["call_id"]);
        assert_eq!(r["speaker"], "caller");
    }
    let t0 = ms(&rows[0], "start_ms") - 300;
    assert!(
        (0..=500).contains(&t0),
        "first frame at {t0} ms of media time"
    );
    let expect = [(300, 800), (800, 2000), (2000, 2900)];
    for (r, (start, end)) in rows.iter().zip(expect) {
        assert!((ms(r, "start_ms") - t0 - start).abs() <= 1, "{r}");
        assert!((ms(r, "end_ms") - t0 - end).abs() <= 1, "{r}");
    }
    let conf: Vec<f64> = rows
        .iter()
        .map(|r| r["confidence"].as_f64().unwrap())
        .collect();
    for (got, want) in conf.iter().zip([0.97, 0.91, 0.88]) {
        assert!((got - want).abs() < 1e-4, "{conf:?}");
    }
    assert_no_key_in_logs(&daemon, KEY);
}

/// call_with_audio.xml, then a hold (re-INVITE a=sendonly) with no RTP for `hold_ms`,
/// then BYE; written next to nothing else (the pcap path made absolute).
fn hold_scenario(dir: &std::path::Path, hold_ms: u32) -> PathBuf {
    let base = std::fs::read_to_string(sipp_scenario("call_with_audio.xml")).unwrap();
    let hold = std::fs::read_to_string(sipp_scenario("hold.xml")).unwrap();
    let start = hold.find("<!-- Hold. -->").unwrap();
    let end = hold.find("<!-- Unhold. -->").unwrap();
    let hold_block = &hold[start..end];
    let pcap = repo_path("fixtures/pcap/caller1_pcmu.pcap");
    let text = base
        .replace(
            "../../fixtures/pcap/caller1_pcmu.pcap",
            pcap.to_str().unwrap(),
        )
        .replace(
            "<pause milliseconds=\"3500\"/>",
            &format!(
                "<pause milliseconds=\"3200\"/>\n{hold_block}\n<pause milliseconds=\"{hold_ms}\"/>"
            ),
        )
        .replace("CSeq: 2 BYE", "CSeq: 3 BYE")
        .replace("<Reference variables=\"held,still_held\"/>", "");
    let text = if text.contains("assign_to=\"held\"") {
        text.replace(
            "</scenario>",
            "<Reference variables=\"held\"/>\n</scenario>",
        )
    } else {
        text
    };
    let path = dir.join("audio_then_hold.xml");
    std::fs::write(&path, text).unwrap();
    path
}

/// Gaps between consecutive client messages (frames and texts) of a connection.
fn longest_silence(c: &ConnLog) -> Duration {
    let mut times: Vec<Instant> = c
        .frames
        .iter()
        .map(|(t, _)| *t)
        .chain(c.texts.iter().map(|(t, _)| *t))
        .collect();
    times.sort();
    times
        .windows(2)
        .map(|w| w[1] - w[0])
        .max()
        .unwrap_or_default()
}

#[test]
fn keepalive_flows_through_a_silent_hold_and_nothing_is_stored_without_transcripts() {
    let mut config = MockConfig::new(KEY);
    // Shorter than the hold: without KeepAlive the mock would close 1011 NET-0001.
    config.idle_timeout = Duration::from_secs(5);
    config.scripts = vec![ConnScript {
        at_audio: vec![(1.0, Scripted::final_result(0.2, 0.5, "hello", 0.9))],
        on_close: vec![Scripted::final_result(2.0, 0.5, "goodbye", 0.9)],
        drop_at_audio: None,
    }];
    let mock = DeepgramMock::start(config);
    let daemon = spawn_daemon(&mock.base_url(), false, KEY);
    let dir = tempfile::tempdir().unwrap();
    let scenario = hold_scenario(dir.path(), 8000);
    let result = sipp(
        &scenario,
        daemon.udp_addr(),
        &["-s", NUMBER, "-timeout", "25s"],
    );
    result.assert_success();
    answered_cdr(&daemon);
    assert!(
        daemon
            .logs()
            .iter()
            .any(|l| l.contains("media changed") && l.contains("SendOnly")),
        "no hold seen in the daemon log"
    );
    let conns = mock.wait_until(Duration::from_secs(8), |c| {
        c.first().is_some_and(|c| c.ended != Ended::Open)
    });
    assert_eq!(
        conns.len(),
        1,
        "one connection, never idle-closed: {conns:#?}"
    );
    let c = &conns[0];
    assert_eq!(c.ended, Ended::CloseStream);
    let types = c.text_types();
    let keepalives = types.iter().filter(|t| *t == "KeepAlive").count();
    // Audio stops at ~2.9 s; after 1 s of sent silence the bridge flushes (Finalize) and
    // keeps the stream open with KeepAlive until the BYE at ~11.5 s.
    assert!(keepalives >= 2, "{types:?}");
    assert_eq!(types[0], "Finalize", "{types:?}");
    assert!(
        types[1..types.len() - 2].iter().all(|t| t == "KeepAlive"),
        "{types:?}"
    );
    assert_eq!(&types[types.len() - 2..], ["Finalize", "CloseStream"]);
    assert!(
        longest_silence(c) <= Duration::from_millis(3500),
        "{:?} without a message",
        longest_silence(c)
    );
    // KeepAlive only while no audio flows: none between the first and last frame.
    let (first, last) = (c.frames.first().unwrap().0, c.frames.last().unwrap().0);
    assert!(
        c.texts
            .iter()
            .all(|(t, text)| !text.contains("KeepAlive") || *t < first || *t > last),
        "KeepAlive while audio was flowing"
    );
    // The tenant does not keep transcripts: Deepgram answered, nothing was stored.
    assert!(c.sent.iter().any(|m| m.contains("goodbye")));
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(exported_transcripts(&daemon, 0), Vec::<Value>::new());
    assert_no_key_in_logs(&daemon, KEY);
}

#[test]
fn a_drop_mid_call_is_followed_by_a_reconnect_and_times_stay_right() {
    let mut config = MockConfig::new(KEY);
    config.scripts = vec![
        ConnScript {
            at_audio: vec![(
                0.6,
                Scripted::final_result(0.2, 0.3, "before the drop", 0.9),
            )],
            on_close: vec![],
            drop_at_audio: Some(1.5),
        },
        ConnScript {
            at_audio: vec![(0.5, Scripted::final_result(0.1, 0.3, "after the drop", 0.8))],
            on_close: vec![Scripted::final_result(0.9, 0.3, "at the end", 0.7)],
            drop_at_audio: None,
        },
    ];
    let mock = DeepgramMock::start(config);
    let daemon = spawn_daemon(&mock.base_url(), true, KEY);
    let result = sipp(
        &sipp_scenario("call_with_audio.xml"),
        daemon.udp_addr(),
        &["-s", NUMBER],
    );
    result.assert_success();
    let cdr = answered_cdr(&daemon);
    let conns = mock.wait_until(Duration::from_secs(8), |c| {
        c.len() >= 2 && c[1].ended != Ended::Open
    });
    assert_eq!(conns.len(), 2, "{conns:#?}");
    assert_eq!(conns[0].ended, Ended::Dropped);
    assert_eq!(conns[1].ended, Ended::CloseStream);
    assert_eq!(conns[1].status, 101);
    assert!(conns[1].frames.len() >= 20, "{}", conns[1].frames.len());
    let call_id = cdr["call_id"].as_str().unwrap();
    assert!(
        daemon
            .logs()
            .iter()
            .any(|l| l.contains("deepgram connection lost; reconnecting") && l.contains(call_id)),
        "the drop is logged with the call id"
    );

    let rows = exported_transcripts(&daemon, 3);
    let texts: Vec<&str> = rows.iter().map(|r| r["text"].as_str().unwrap()).collect();
    assert_eq!(
        texts,
        ["before the drop", "after the drop", "at the end"],
        "{rows:#?}"
    );
    // Connection 2's stream 0 is where connection 1 stopped (1.5 s of audio; the frames
    // that arrived while reconnecting were held and sent first), not the call's 0.
    let before = ms(&rows[0], "start_ms");
    let after = ms(&rows[1], "start_ms");
    let gap = after - before;
    // (1.5 + 0.1) − 0.2 = 1.4 s, plus the few frames sent into the dead socket before
    // the drop was seen (without rebasing it would be 0.1 − 0.2 = −0.1 s).
    assert!((1400..=1600).contains(&gap), "{gap} ms between {rows:#?}");
    assert_eq!(ms(&rows[2], "start_ms") - after, 800);
    assert_no_key_in_logs(&daemon, KEY);
}

#[test]
fn wrong_key_gets_401_the_call_continues_and_no_key_is_logged() {
    let wrong = "dg-Zz93-WRONG-key";
    let mock = DeepgramMock::start(MockConfig::new(KEY));
    let daemon = spawn_daemon(&mock.base_url(), true, wrong);
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
        .wait_for_log(Duration::from_secs(3), |l| {
            l.contains("deepgram refused the stream") && l.contains(&call_id)
        })
        .expect("the refusal is logged with the call id");
    assert!(failure.contains("HTTP 401"), "{failure}");
    assert!(failure.contains("Invalid credentials."), "{failure}");
    // Refused once, not retried (a 401 would only repeat).
    let conns = mock.connections();
    assert_eq!(conns.len(), 1, "{conns:#?}");
    assert_eq!(conns[0].status, 401);
    assert_eq!(
        conns[0].authorization.as_deref(),
        Some(format!("Token {wrong}").as_str())
    );
    assert_no_key_in_logs(&daemon, wrong);
    assert_eq!(exported_transcripts(&daemon, 0), Vec::<Value>::new());
}

#[test]
fn an_unavailable_deepgram_is_retried_on_the_backoff_schedule_then_given_up() {
    let mut config = MockConfig::new(KEY);
    config.reject_status = Some(503);
    let mock = DeepgramMock::start(config);
    let daemon = spawn_daemon(&mock.base_url(), true, KEY);
    let result = sipp(
        &sipp_scenario("call_with_audio.xml"),
        daemon.udp_addr(),
        &["-s", NUMBER],
    );
    result.assert_success();
    let cdr = answered_cdr(&daemon);
    assert_eq!(cdr["cause"], "caller-bye");
    let call_id = cdr["call_id"].as_str().unwrap().to_owned();
    let gave_up = daemon
        .wait_for_log(Duration::from_secs(5), |l| {
            l.contains("deepgram unreachable after retries") && l.contains(&call_id)
        })
        .expect("giving up is logged with the call id");
    assert!(gave_up.contains("HTTP 503"), "{gave_up}");
    // One attempt and four retries, 0.1, 0.4, 1 and 2 s apart.
    let conns = mock.connections();
    assert_eq!(conns.len(), 5, "{conns:#?}");
    assert!(conns.iter().all(|c| c.status == 503));
    let gaps: Vec<u128> = conns
        .windows(2)
        .map(|w| (w[1].opened - w[0].opened).as_millis())
        .collect();
    // Never early; late by at most half the step and 300 ms: a loaded CI host wakes
    // timers late, and the steps (100, 400, 1000, 2000) stay told apart.
    for (gap, want) in gaps.iter().zip([100u128, 400, 1000, 2000]) {
        assert!(*gap >= want && *gap < want + want / 2 + 300, "{gaps:?}");
    }
    assert_no_key_in_logs(&daemon, KEY);
}

/// A one-connection native agent that only listens: returns its text messages and the
/// number of binary frames once the bridge closes (or after 30 s).
fn spawn_listening_agent() -> (u16, std::thread::JoinHandle<(Vec<Value>, usize)>) {
    use futures_util::StreamExt;
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    listener.set_nonblocking(true).unwrap();
    let handle = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let listener = tokio::net::TcpListener::from_std(listener).unwrap();
            let (mut texts, mut frames) = (Vec::new(), 0);
            let Ok(Ok((stream, _))) =
                tokio::time::timeout(Duration::from_secs(20), listener.accept()).await
            else {
                return (texts, frames);
            };
            let mut ws = tokio_tungstenite::accept_async(stream).await.unwrap();
            let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
            while let Ok(Some(Ok(msg))) = tokio::time::timeout_at(deadline, ws.next()).await {
                match msg {
                    tokio_tungstenite::tungstenite::Message::Text(t) => {
                        texts.push(serde_json::from_str(&t).unwrap());
                    }
                    tokio_tungstenite::tungstenite::Message::Binary(_) => frames += 1,
                    tokio_tungstenite::tungstenite::Message::Close(_) => break,
                    _ => {}
                }
            }
            (texts, frames)
        })
    });
    (port, handle)
}

#[test]
fn deepgram_plus_agent_forwards_transcripts_to_the_agent_and_stores_them() {
    let mut config = MockConfig::new(KEY);
    config.scripts = vec![ConnScript {
        at_audio: vec![
            (1.2, Scripted::final_result(0.30, 0.50, "hi", 0.97)),
            (1.5, Scripted::interim(1.0, 0.5, "i would")),
            (
                2.2,
                Scripted::final_result(0.80, 1.20, "i would like to check", 0.91),
            ),
        ],
        on_close: vec![Scripted::final_result(2.00, 0.90, "my order status", 0.88)],
        drop_at_audio: None,
    }];
    let mock = DeepgramMock::start(config);
    let (agent_port, agent) = spawn_listening_agent();
    let text = profile(&mock.base_url(), true).replace(
        r#"kind = "deepgram","#,
        &format!(r#"kind = "deepgram+agent", url = "ws://127.0.0.1:{agent_port}/agent", mode = "native","#),
    );
    let daemon = Daemon::spawn_with_env(&text, &[("DG_KEY", KEY)]);
    let result = sipp(
        &sipp_scenario("call_with_audio.xml"),
        daemon.udp_addr(),
        &["-s", NUMBER],
    );
    result.assert_success();
    let cdr = answered_cdr(&daemon);
    let (texts, frames) = agent.join().unwrap();
    // The agent got the caller's audio and the live final transcripts, between start and stop.
    assert!(frames >= 140, "{frames} frames");
    assert_eq!(texts.first().unwrap()["event"], "start");
    assert_eq!(texts.first().unwrap()["call_id"], cdr["call_id"]);
    assert_eq!(texts.last().unwrap()["event"], "stop");
    let forwarded: Vec<&Value> = texts
        .iter()
        .filter(|t| t["event"] == "transcript")
        .collect();
    assert_eq!(forwarded.len(), 2, "{texts:#?}");
    // Stored: those two and the one flushed by CloseStream (after the agent's stop).
    let rows = exported_transcripts(&daemon, 3);
    let stored: Vec<&str> = rows.iter().map(|r| r["text"].as_str().unwrap()).collect();
    assert_eq!(stored, ["hi", "i would like to check", "my order status"]);
    for (f, r) in forwarded.iter().zip(&rows) {
        assert_eq!(f["speaker"], "caller");
        assert_eq!(f["text"], r["text"]);
        assert_eq!(f["start_ms"], r["start_ms"]);
        assert_eq!(f["end_ms"], r["end_ms"]);
        assert_eq!(f["is_final"], true);
        assert!(
            (f["confidence"].as_f64().unwrap() - r["confidence"].as_f64().unwrap()).abs() < 1e-6
        );
    }
    let conns = mock.connections();
    assert_eq!(conns.len(), 1);
    assert!(best_ncc_against_fixture(&conns[0].pcm()) >= 0.98);
    assert_no_key_in_logs(&daemon, KEY);
}

/// `deepgram+agent` with an agent that refuses every connection (policy
/// `continue`): the agent's reconnects never touch the Deepgram stream — one
/// connection for the whole call, every transcript stored.
#[test]
fn deepgram_beside_a_failing_agent_keeps_one_stream_for_the_whole_call() {
    let mut config = MockConfig::new(KEY);
    config.scripts = vec![ConnScript {
        at_audio: vec![
            (1.2, Scripted::final_result(0.30, 0.50, "hi", 0.97)),
            (
                2.2,
                Scripted::final_result(0.80, 1.20, "i would like to check", 0.91),
            ),
        ],
        on_close: vec![Scripted::final_result(2.00, 0.90, "my order status", 0.88)],
        drop_at_audio: None,
    }];
    let mock = DeepgramMock::start(config);
    let refused = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let text = profile(&mock.base_url(), true).replace(
        r#"kind = "deepgram","#,
        &format!(
            r#"kind = "deepgram+agent", url = "ws://127.0.0.1:{refused}/agent", on_failure = "continue", reconnect_attempts = 3,"#
        ),
    );
    let daemon = Daemon::spawn_with_env(&text, &[("DG_KEY", KEY)]);
    sipp(
        &sipp_scenario("call_with_audio.xml"),
        daemon.udp_addr(),
        &["-s", NUMBER],
    )
    .assert_success();
    let cdr = answered_cdr(&daemon);
    assert_eq!(cdr["pipeline"]["failure"], "reconnects-exhausted", "{cdr}");
    let rows = exported_transcripts(&daemon, 3);
    let stored: Vec<&str> = rows.iter().map(|r| r["text"].as_str().unwrap()).collect();
    assert_eq!(stored, ["hi", "i would like to check", "my order status"]);
    assert_eq!(mock.connections().len(), 1, "one Deepgram stream");
    assert_no_key_in_logs(&daemon, KEY);
}

/// The mock itself, driven by a plain WebSocket client: query checks (400 with
/// `dg-error`), the idle close (1011 NET-0001), and the CloseStream sequence (scripted
/// Results with `from_finalize`, Metadata with the audio's sha256 and duration, 1000).
#[test]
fn the_mock_behaves_as_the_spec_says() {
    use futures_util::{SinkExt, StreamExt};
    use sha2::Digest;
    use tokio_tungstenite::tungstenite::Message;
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let mut config = MockConfig::new(KEY);
    config.idle_timeout = Duration::from_millis(300);
    config.scripts = vec![
        ConnScript::default(),
        ConnScript {
            at_audio: vec![(0.01, Scripted::final_result(0.0, 0.01, "x", 0.5))],
            on_close: vec![Scripted::final_result(0.01, 0.01, "flushed", 0.5)],
            drop_at_audio: None,
        },
    ];
    let mock = DeepgramMock::start(config);
    let base = mock.base_url();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let request = |query: &str, key: &str| {
            let mut req = format!("{base}/v1/listen?{query}")
                .into_client_request()
                .unwrap();
            req.headers_mut()
                .insert("authorization", format!("token {key}").parse().unwrap());
            req
        };
        let refused = |r: Result<_, tokio_tungstenite::tungstenite::Error>| match r {
            Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => (
                resp.status().as_u16(),
                resp.headers()["dg-error"].to_str().unwrap().to_owned(),
                resp.headers().contains_key("dg-request-id"),
            ),
            other => panic!("not refused: {:?}", other.map(|_| ())),
        };
        let ok = "encoding=linear16&sample_rate=8000&channels=1&model=nova-3";
        for (query, why) in [
            ("encoding=pcm16&sample_rate=8000", "unknown encoding"),
            ("encoding=linear16&sample_rate=8k", "sample_rate"),
            (
                "encoding=linear16&sample_rate=8000&model=nova-9",
                "unknown model",
            ),
        ] {
            let (status, dg_error, id) =
                refused(tokio_tungstenite::connect_async(request(query, KEY)).await);
            assert_eq!(status, 400, "{query}");
            assert!(dg_error.contains(why), "{dg_error}");
            assert!(id);
        }
        let (status, dg_error, _) =
            refused(tokio_tungstenite::connect_async(request(ok, "nope")).await);
        assert_eq!((status, dg_error.as_str()), (401, "Invalid credentials."));

        // Idle: nothing sent → 1011 NET-0001. Timed from before the connect:
        // the mock's idle clock starts when it accepts, so a slow handshake
        // on a busy machine cannot make the close look early.
        let started = Instant::now();
        let (mut ws, resp) = tokio_tungstenite::connect_async(request(ok, KEY))
            .await
            .unwrap();
        assert!(resp.headers().contains_key("dg-request-id"));
        let close = loop {
            match ws.next().await {
                Some(Ok(Message::Close(f))) => break f.unwrap(),
                Some(Ok(_)) => {}
                other => panic!("{other:?}"),
            }
        };
        assert_eq!(u16::from(close.code), 1011);
        assert!(close.reason.contains("NET-0001"), "{}", close.reason);
        assert!(started.elapsed() >= Duration::from_millis(300));

        // Audio, a scripted result, Finalize → flushed result, CloseStream → Metadata, 1000.
        let (mut ws, _) = tokio_tungstenite::connect_async(request(ok, KEY))
            .await
            .unwrap();
        let audio: Vec<u8> = (0..320u16).flat_map(|i| i.to_le_bytes()).collect();
        ws.send(Message::binary(audio.clone())).await.unwrap();
        ws.send(Message::text(r#"{"type":"Finalize"}"#))
            .await
            .unwrap();
        ws.send(Message::text(r#"{"type":"CloseStream"}"#))
            .await
            .unwrap();
        let mut got = Vec::new();
        let close = loop {
            match ws.next().await {
                Some(Ok(Message::Text(t))) => got.push(serde_json::from_str::<Value>(&t).unwrap()),
                Some(Ok(Message::Close(f))) => break f.unwrap(),
                Some(Ok(_)) => {}
                other => panic!("{other:?}"),
            }
        };
        assert_eq!(u16::from(close.code), 1000);
        assert_eq!(got.len(), 3, "{got:#?}");
        assert_eq!(got[0]["channel"]["alternatives"][0]["transcript"], "x");
        assert_eq!(got[0]["from_finalize"], false);
        assert_eq!(
            got[1]["channel"]["alternatives"][0]["transcript"],
            "flushed"
        );
        assert_eq!(got[1]["from_finalize"], true);
        assert_eq!(got[2]["type"], "Metadata");
        assert_eq!(got[2]["sha256"], hex::encode(sha2::Sha256::digest(&audio)));
        assert_eq!(got[2]["duration"], 0.04);
        assert_eq!(got[2]["channels"], 1);
        assert_eq!(got[2]["request_id"], got[0]["metadata"]["request_id"]);
    });
    let conns = mock.connections();
    let statuses: Vec<u16> = conns.iter().map(|c| c.status).collect();
    assert_eq!(statuses, [400, 400, 400, 401, 101, 101]);
    assert_eq!(conns[4].ended, Ended::Idle);
    assert_eq!(conns[5].ended, Ended::CloseStream);
}

/// `check` knows the Deepgram keys, where they apply and what they need.
#[test]
fn deepgram_config_keys_are_parsed_and_checked() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("profile.toml");
    let env = |name: &str| (name == "DG_KEY").then(|| KEY.to_owned());
    let load = |text: &str| {
        std::fs::write(&path, text).unwrap();
        sipbridge::config::load_with_env(&path, &env)
    };
    let base = ProfileSpec::default().render_for("deepgram_config_keys");
    let with = |pipeline: &str| base.replace(r#"pipeline = { kind = "echo" }"#, pipeline);

    let cfg = load(&with(
        r#"pipeline = { kind = "deepgram", model = "nova-3", language = "en", api_key = "env:DG_KEY", base_url = "ws://127.0.0.1:9/", endpointing_ms = 0, interim_results = true, utterance_end_ms = 1200, vad_events = true }"#,
    ))
    .unwrap();
    let sipbridge::config::Pipeline::Deepgram(d) = &cfg.tenant("demo").unwrap().pipeline else {
        panic!("deepgram pipeline")
    };
    assert_eq!(
        (
            d.endpointing_ms,
            d.interim_results,
            d.utterance_end_ms,
            d.vad_events
        ),
        (Some(0), true, Some(1200), true)
    );
    assert_eq!(d.base_url, "ws://127.0.0.1:9");
    assert_eq!(
        sipbridge::pipeline::deepgram::listen_url(d, 8000),
        "ws://127.0.0.1:9/v1/listen?encoding=linear16&sample_rate=8000&channels=1&model=nova-3\
         &language=en&endpointing=false&interim_results=true&utterance_end_ms=1200&vad_events=true"
    );

    let cfg = load(&with(
        r#"pipeline = { kind = "deepgram", model = "nova-3", language = "en", api_key = "env:DG_KEY" }"#,
    ))
    .unwrap();
    let sipbridge::config::Pipeline::Deepgram(d) = &cfg.tenant("demo").unwrap().pipeline else {
        panic!("deepgram pipeline")
    };
    assert_eq!(d.base_url, "wss://api.deepgram.com");
    assert_eq!(
        (
            d.endpointing_ms,
            d.interim_results,
            d.utterance_end_ms,
            d.vad_events
        ),
        (None, false, None, false)
    );

    let errors = |pipeline: &str| load(&with(pipeline)).unwrap_err().to_string();
    let e = errors(
        r#"pipeline = { kind = "deepgram", model = "nova-3", language = "en", api_key = "env:DG_KEY", utterance_end_ms = 1000 }"#,
    );
    assert!(
        e.contains("`utterance_end_ms` needs `interim_results = true`"),
        "{e}"
    );
    let e = errors(
        r#"pipeline = { kind = "deepgram", model = "nova-3", language = "en", api_key = "env:DG_KEY", base_url = "https://api.deepgram.com" }"#,
    );
    assert!(e.contains("must start with ws:// or wss://"), "{e}");
    let e = errors(
        r#"pipeline = { kind = "agent", url = "ws://127.0.0.1:9", vad_events = true, base_url = "ws://x" }"#,
    );
    assert!(
        e.contains("`vad_events` does not apply to pipeline kind `agent`"),
        "{e}"
    );
    assert!(
        e.contains("`base_url` does not apply to pipeline kind `agent`"),
        "{e}"
    );
    let e = errors(
        r#"pipeline = { kind = "deepgram", model = "nova-3", language = "en", api_key = "env:DG_KEY", endpointing = 10 }"#,
    );
    assert!(e.contains("endpointing"), "{e}");
}
