#![allow(clippy::unwrap_used, clippy::expect_used)]
//! PCI pause through the real daemon (issue 15 item 4): SIPp is the carrier playing
//! caller1, a native agent on loopback sends `pause_recording` right after `start` and
//! `resume_recording` 1.5 s later. The decrypted recording holds silence of the same
//! length on both channels for that stretch (and sound around it: the prompt on the right,
//! the caller on the left), its length is the whole call, and the CDR lists the stretch.
//! With Deepgram, a pause through the admin API keeps what Deepgram transcribes of the
//! paused stretch out of the store (what comes before and after is stored).

mod common;

use common::{Daemon, ProfileSpec, repo_path, sipp};
use futures_util::{SinkExt, StreamExt};
use sipbridge::store::crypto::KeyRing;
use sipbridge::store::db::{RecordingState, Store};
use std::path::Path;
use std::time::{Duration, Instant};
use tokio_tungstenite::tungstenite::Message;

const NUMBER: &str = "+15551234567";
const PAUSE: Duration = Duration::from_millis(1500);

/// A native agent: after `start`, pauses at once, resumes after [`PAUSE`], then reads
/// until the bridge closes. One connection.
fn spawn_agent() -> (u16, std::thread::JoinHandle<()>) {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    listener.set_nonblocking(true).unwrap();
    let thread = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let listener = tokio::net::TcpListener::from_std(listener).unwrap();
            let accepted = tokio::time::timeout(Duration::from_secs(20), listener.accept()).await;
            let Ok(Ok((tcp, _))) = accepted else { return };
            let Ok(mut ws) = tokio_tungstenite::accept_async(tcp).await else {
                return;
            };
            let session = async {
                let mut resume_at = None;
                loop {
                    let sleep = async {
                        match resume_at {
                            Some(t) => tokio::time::sleep_until(t).await,
                            None => std::future::pending().await,
                        }
                    };
                    tokio::select! {
                        msg = ws.next() => match msg {
                            Some(Ok(Message::Text(t))) if t.contains("\"start\"") && resume_at.is_none() => {
                                ws.send(Message::text(r#"{"event":"pause_recording"}"#)).await.unwrap();
                                resume_at = Some(tokio::time::Instant::now() + PAUSE);
                            }
                            Some(Ok(_)) => {}
                            _ => return,
                        },
                        () = sleep => {
                            ws.send(Message::text(r#"{"event":"resume_recording"}"#)).await.unwrap();
                            resume_at = Some(tokio::time::Instant::now() + Duration::from_secs(3600));
                        }
                    }
                }
            };
            let _ = tokio::time::timeout(Duration::from_secs(30), session).await;
        });
    });
    (port, thread)
}

fn scenario(dir: &Path) -> std::path::PathBuf {
    let text = std::fs::read_to_string(repo_path("tests/sipp/call_with_audio.xml")).unwrap();
    let text = text
        .replace(
            "../../fixtures/pcap/caller1_pcmu.pcap",
            &repo_path("fixtures/pcap/caller1_pcmu.pcap")
                .display()
                .to_string(),
        )
        .replace(
            "<pause milliseconds=\"3500\"/>",
            "<pause milliseconds=\"5500\"/>",
        );
    assert!(text.contains("\"5500\""));
    let path = dir.join("scenario.xml");
    std::fs::write(&path, text).unwrap();
    path
}

/// The longest run of samples where both channels are exactly zero: (start, length).
fn longest_silence(left: &[i16], right: &[i16]) -> (usize, usize) {
    let (mut best, mut run_start, mut run) = ((0, 0), 0, 0);
    for (i, (l, r)) in left.iter().zip(right).enumerate() {
        if *l == 0 && *r == 0 {
            if run == 0 {
                run_start = i;
            }
            run += 1;
            if run > best.1 {
                best = (run_start, run);
            }
        } else {
            run = 0;
        }
    }
    best
}

fn loud(samples: &[i16]) -> bool {
    samples.iter().filter(|s| s.unsigned_abs() > 200).count() > samples.len() / 20
}

#[test]
fn privacy_pci_pause_leaves_silence_of_the_same_length_and_the_cdr_shows_it() {
    let tmp = tempfile::tempdir().unwrap();
    let (port, agent) = spawn_agent();
    let pipeline = format!(
        r#"pipeline = {{ kind = "agent", url = "ws://127.0.0.1:{port}/agent", on_failure = "continue" }}"#
    );
    let profile = ProfileSpec::default()
        .render()
        .replace(r#"pipeline = { kind = "echo" }"#, &pipeline)
        .replace("recording = false", "recording = true");
    assert!(profile.contains("kind = \"agent\""));
    let daemon = Daemon::spawn_with_env(&profile, &[("TMPDIR", tmp.path().to_str().unwrap())]);
    sipp(&scenario(tmp.path()), daemon.udp_addr(), &["-s", NUMBER]).assert_success();
    let cdr = daemon
        .wait_for_cdr(Duration::from_secs(10), |c| c["result_code"] == 200)
        .expect("CDR of the answered call");
    let call_id = cdr["call_id"].as_str().unwrap().to_owned();
    assert_eq!(cdr["cause"], "caller-bye", "{cdr}");

    // The CDR lists one paused stretch of about PAUSE.
    let stretches = cdr["recording_paused"]
        .as_array()
        .expect("recording_paused in the CDR");
    assert_eq!(stretches.len(), 1, "{cdr}");
    let paused_ms =
        stretches[0]["resumed_at"].as_u64().unwrap() - stretches[0]["paused_at"].as_u64().unwrap();
    assert!(
        (1400..1700).contains(&paused_ms),
        "paused for {paused_ms} ms: {cdr}"
    );
    assert!(
        daemon
            .logs()
            .iter()
            .any(|l| l.contains("recording and transcript paused"))
    );

    let dir = daemon.dir();
    let store = || Store::open(&dir.join("var/sipbridge.db")).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let rec = loop {
        let recs = store().recordings_of_call("demo", &call_id).unwrap();
        if let Some(r) = recs
            .into_iter()
            .find(|r| r.state == RecordingState::Complete)
        {
            break r;
        }
        assert!(Instant::now() < deadline, "no complete recording");
        std::thread::sleep(Duration::from_millis(50));
    };
    let master = std::fs::read(dir.join("var/master.key")).unwrap();
    let keys = KeyRing::open(&dir.join("var"), &master).unwrap();
    let wav = sipbridge::store::recording::export_wav(&rec.path, &keys).unwrap();
    let mut reader = hound::WavReader::new(std::io::Cursor::new(wav)).unwrap();
    let samples: Vec<i16> = reader.samples::<i16>().map(Result::unwrap).collect();
    let left: Vec<i16> = samples.iter().step_by(2).copied().collect();
    let right: Vec<i16> = samples.iter().skip(1).step_by(2).copied().collect();
    // The whole call is there: the pause is silence, not a cut.
    assert_eq!(left.len() as u64, rec.duration_ms * 8);
    assert!(rec.duration_ms > 5000, "{} ms", rec.duration_ms);

    let (start, len) = longest_silence(&left, &right);
    let expected = paused_ms as usize * 8;
    eprintln!("silence: {len} samples at {start}; paused {paused_ms} ms ({expected} samples)");
    assert!(
        len + 480 >= expected && len <= expected + 480,
        "silent run of {len} samples at {start}, the pause was {expected}"
    );
    // Sound on both sides of it: the prompt was playing before and after.
    let before = &right[start.saturating_sub(800)..start];
    let after = &right[start + len..(start + len + 800).min(right.len())];
    assert!(
        start < 800 || loud(before),
        "the prompt before the pause is missing"
    );
    assert!(loud(after), "the prompt after the pause is missing");
    assert!(
        loud(&left[start + len..]),
        "the caller after the pause is missing"
    );
    drop(daemon);
    agent.join().unwrap();
}

/// A PCI pause through the admin API keeps Deepgram's transcript of the
/// paused stretch out of the store: the mock answers the `Finalize` the
/// bridge sends into the pause (it streams silence then) with a final
/// Results, which is dropped; the Results before the pause and the one at the
/// call's end (after the resume) are stored, read back with `export`.
#[test]
fn privacy_pci_pause_keeps_the_paused_stretch_out_of_the_stored_transcript() {
    use common::deepgram_mock::{ConnScript, DeepgramMock, MockConfig, Scripted};
    use common::http;
    const KEY: &str = "dg-pci-pause-key";
    const ADMIN: &str = "sbadm_cGNpLXBhdXNlLWFkbWluLXRva2VuLTAx";
    let tmp = tempfile::tempdir().unwrap();
    let mut config = MockConfig::new(KEY);
    config.scripts = vec![ConnScript {
        at_audio: vec![(
            0.3,
            Scripted::final_result(0.1, 0.2, "before the card", 0.9),
        )],
        on_close: vec![Scripted::final_result(0.6, 0.4, "four one one one", 0.9)],
        drop_at_audio: None,
    }];
    config.on_close_stream = vec![Scripted::final_result(2.5, 0.3, "after the card", 0.9)];
    let mock = DeepgramMock::start(config);
    let pipeline = format!(
        r#"pipeline = {{ kind = "deepgram", model = "nova-2", language = "en-US", api_key = "env:DG_KEY", base_url = "{}" }}"#,
        mock.base_url()
    );
    let profile = ProfileSpec {
        tenant: "caller_audio_after_prompt = false",
        ..ProfileSpec::default()
    }
    .render()
    .replace(r#"pipeline = { kind = "echo" }"#, &pipeline)
    .replace("recording = false", "recording = true")
    .replace("transcripts = false", "transcripts = true")
    .replace(
        "[profile.sip]",
        "[profile.admin]\nlisten = \"127.0.0.1:0\"\ntoken = \"env:SB_ADMIN_TOKEN\"\n\n[profile.sip]",
    );
    let daemon = Daemon::spawn_with_env(&profile, &[("DG_KEY", KEY), ("SB_ADMIN_TOKEN", ADMIN)]);
    let addr = daemon.admin_addr();
    let (sc, udp) = (scenario(tmp.path()), daemon.udp_addr());
    let carrier = std::thread::spawn(move || sipp(&sc, udp, &["-s", NUMBER]));

    let sent = |text: &str| {
        mock.connections()
            .first()
            .is_some_and(|c| c.sent.iter().any(|m| m.contains(text)))
    };
    let wait = |what: &str, cond: &dyn Fn() -> bool| {
        let until = Instant::now() + Duration::from_secs(10);
        while !cond() {
            assert!(Instant::now() < until, "waited in vain for {what}");
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    wait("the first transcript", &|| sent("before the card"));
    let calls = http::get(addr, "/v1/calls", Some(ADMIN)).json();
    let call_id = calls["calls"][0]["call_id"].as_str().unwrap().to_owned();
    let post = |what: &str| {
        http::request(
            addr,
            "POST",
            &format!("/v1/calls/{call_id}/{what}"),
            &[("Authorization", &format!("Bearer {ADMIN}"))],
            b"",
        )
    };
    assert_eq!(post("pause_recording").status, 202);
    // Paused, the bridge streams silence; after a second of it, Finalize,
    // answered with the card number.
    wait("the paused stretch's transcript", &|| {
        sent("four one one one")
    });
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(post("resume_recording").status, 202);
    carrier.join().unwrap().assert_success();
    wait("the last transcript", &|| sent("after the card"));
    daemon
        .wait_for_cdr(Duration::from_secs(10), |c| c["result_code"] == 200)
        .expect("CDR of the answered call");

    // What the store holds, decrypted by `export` (polled: the last one is
    // written after the call's end).
    let until = Instant::now() + Duration::from_secs(10);
    let mut attempt = 0;
    let texts = loop {
        attempt += 1;
        let out = daemon.dir().join(format!("export-{attempt}"));
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
            .env("SIPBRIDGE_LOG", "warn")
            .output()
            .unwrap();
        assert_eq!(
            o.status.code(),
            Some(0),
            "{}",
            String::from_utf8_lossy(&o.stderr)
        );
        let list: Vec<serde_json::Value> =
            serde_json::from_slice(&std::fs::read(out.join("transcripts.json")).unwrap()).unwrap();
        let texts: Vec<String> = list
            .iter()
            .filter_map(|t| t["text"].as_str().map(str::to_owned))
            .collect();
        if texts.len() >= 2 || Instant::now() >= until {
            break texts;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    assert_eq!(texts, ["before the card", "after the card"]);
}
