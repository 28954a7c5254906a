#![allow(clippy::unwrap_used, clippy::expect_used)]
//! Recordings through the real daemon (issue 6 acceptance): SIPp is the carrier, the
//! daemon records to `var/recordings/…`, the test decrypts with the key ring opened from
//! the daemon's generated `var/master.key` and reads the metadata database.
//!
//! Covers: the round trip (left = caller1, right starts with the disclosure prompt, CDR
//! and `complete` recording rows, consent times); recording off leaves no audio on disk
//! (no RIFF, no plaintext run) and recording on leaves no plaintext; the opt-out DTMF
//! during the prompt removes the recording (file gone, row `deleted`, audited) and the
//! CDR shows the opt-out time; `kill -9` mid-call, then a restart on the same `var_dir`,
//! finds a `partial` recording that decrypts up to at most ~1 s before the kill.

mod common;

use common::{Daemon, ProfileSpec, repo_path, sipp};
use sipbridge::media::g711::{self, Law};
use sipbridge::store::crypto::KeyRing;
use sipbridge::store::db::{RecordingRecord, RecordingState, Store};
use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

const NUMBER: &str = "+15551234567";

fn profile(recording: bool) -> String {
    let text = ProfileSpec::default().render();
    assert!(text.contains("recording = false\n"));
    text.replace("recording = false\n", &format!("recording = {recording}\n"))
}

/// `call_with_audio.xml` with another pcap and pause before the BYE, written to `dir`.
fn scenario(dir: &Path, pcap: &Path, pause_ms: u32) -> PathBuf {
    let text = std::fs::read_to_string(repo_path("tests/sipp/call_with_audio.xml")).unwrap();
    let text = text
        .replace(
            "../../fixtures/pcap/caller1_pcmu.pcap",
            &pcap.display().to_string(),
        )
        .replace(
            "<pause milliseconds=\"3500\"/>",
            &format!("<pause milliseconds=\"{pause_ms}\"/>"),
        );
    assert!(text.contains(&pcap.display().to_string()));
    let path = dir.join("scenario.xml");
    std::fs::write(&path, text).unwrap();
    path
}

fn caller1_pcm() -> Vec<i16> {
    std::fs::read(repo_path("fixtures/audio/caller1.ulaw"))
        .unwrap()
        .iter()
        .map(|&c| g711::mu_to_linear(c))
        .collect()
}

fn prompt_pcm() -> Vec<i16> {
    let prompt =
        sipbridge::media::prompt::Prompt::load(repo_path("sip-profiles/prompts/disclosure.wav"))
            .unwrap();
    prompt
        .pcm8k()
        .iter()
        .map(|&s| g711::decode_sample(Law::Mu, g711::encode_sample(Law::Mu, s)))
        .collect()
}

/// Normalised cross-correlation of `needle` with `hay[lag..]` (zero beyond its end).
fn ncc(hay: &[i16], needle: &[i16], lag: usize) -> f64 {
    let (mut dot, mut e_hay, mut e_needle) = (0.0, 0.0, 0.0);
    for (i, &n) in needle.iter().enumerate() {
        let h = f64::from(hay.get(lag + i).copied().unwrap_or(0));
        let n = f64::from(n);
        dot += h * n;
        e_hay += h * h;
        e_needle += n * n;
    }
    let d = (e_hay * e_needle).sqrt();
    if d == 0.0 { 0.0 } else { dot / d }
}

/// Best (lag, NCC) of `needle` in `hay` over `lags`.
fn best(hay: &[i16], needle: &[i16], lags: std::ops::Range<usize>) -> (usize, f64) {
    lags.map(|l| (l, ncc(hay, needle, l)))
        .fold((0, f64::MIN), |a, b| if b.1 > a.1 { b } else { a })
}

/// The two channels of a stereo WAV held in memory.
fn channels(wav: &[u8]) -> (Vec<i16>, Vec<i16>) {
    let mut reader = hound::WavReader::new(std::io::Cursor::new(wav)).unwrap();
    let spec = reader.spec();
    assert_eq!((spec.channels, spec.sample_rate), (2, 8000));
    let samples: Vec<i16> = reader.samples::<i16>().map(Result::unwrap).collect();
    let left = samples.iter().step_by(2).copied().collect();
    let right = samples.iter().skip(1).step_by(2).copied().collect();
    (left, right)
}

fn keyring(daemon_dir: &Path) -> KeyRing {
    let master = std::fs::read(daemon_dir.join("var/master.key")).unwrap();
    KeyRing::open(&daemon_dir.join("var"), &master).unwrap()
}

fn store(daemon_dir: &Path) -> Store {
    Store::open(&daemon_dir.join("var/sipbridge.db")).unwrap()
}

/// Polls the database until `pred` holds for the call's recordings (the store thread
/// writes after the CDR is logged).
fn wait_recordings(
    dir: &Path,
    call_id: &str,
    pred: impl Fn(&[RecordingRecord]) -> bool,
) -> Vec<RecordingRecord> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let recs = store(dir).recordings_of_call("demo", call_id).unwrap();
        if pred(&recs) || Instant::now() > deadline {
            return recs;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn files_under(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let p = e.path();
        if p.is_dir() {
            files_under(&p, out);
        } else {
            out.push(p);
        }
    }
}

/// 16-byte windows of `bytes` with at least 8 distinct values (silence and other
/// low-entropy runs would match anything).
const WINDOW: usize = 16;
fn windows(bytes: &[u8], step: usize, into: &mut HashSet<[u8; WINDOW]>) {
    let mut i = 0;
    while i + WINDOW <= bytes.len() {
        let w: [u8; WINDOW] = bytes[i..i + WINDOW].try_into().unwrap();
        if w.iter().collect::<HashSet<_>>().len() >= 8 {
            into.insert(w);
        }
        i += step;
    }
}

/// Plaintext forms of audio the daemon could have written: µ-law bytes and 16-bit
/// little-endian PCM of `pcm` (mono), of the fixture, and `extra` verbatim.
fn plaintext_windows(extra: &[u8]) -> HashSet<[u8; WINDOW]> {
    let mut set = HashSet::new();
    let ulaw = std::fs::read(repo_path("fixtures/audio/caller1.ulaw")).unwrap();
    windows(&ulaw, 1, &mut set);
    let pcm: Vec<u8> = caller1_pcm().iter().flat_map(|s| s.to_le_bytes()).collect();
    windows(&pcm, 2, &mut set);
    let prompt: Vec<u8> = prompt_pcm().iter().flat_map(|s| s.to_le_bytes()).collect();
    windows(&prompt, 2, &mut set);
    windows(extra, 2, &mut set);
    set
}

/// Files under `dirs` holding a RIFF header or any plaintext window.
fn audio_files(dirs: &[&Path], plain: &HashSet<[u8; WINDOW]>) -> Vec<String> {
    let mut files = Vec::new();
    for d in dirs {
        files_under(d, &mut files);
    }
    let mut found = Vec::new();
    for f in files {
        let Ok(bytes) = std::fs::read(&f) else {
            continue;
        };
        if bytes.windows(4).any(|w| w == b"RIFF") {
            found.push(format!("{}: RIFF", f.display()));
        } else if bytes.windows(WINDOW).any(|w| plain.contains(w)) {
            found.push(format!("{}: plaintext audio run", f.display()));
        }
    }
    found
}

fn spawn(recording: bool, tmp: &Path) -> Daemon {
    Daemon::spawn_with_env(&profile(recording), &[("TMPDIR", tmp.to_str().unwrap())])
}

/// The configuration has no default opt-out key: the tenant sets `9`.
fn spawn_with_opt_out(tmp: &Path) -> Daemon {
    let text = profile(true).replace(
        "recording = true\n",
        "recording = true\nopt_out_key = \"9\"\n",
    );
    Daemon::spawn_with_env(&text, &[("TMPDIR", tmp.to_str().unwrap())])
}

fn answered_call_id(daemon: &Daemon) -> String {
    let cdr = daemon
        .wait_for_cdr(Duration::from_secs(10), |c| c["result_code"] == 200)
        .expect("CDR of the answered call");
    cdr["call_id"].as_str().unwrap().to_owned()
}

#[test]
fn privacy_disclosure_before_recording_round_trip_no_plaintext() {
    let tmp = tempfile::tempdir().unwrap();
    let daemon = spawn(true, tmp.path());
    let sc = scenario(
        tmp.path(),
        &repo_path("fixtures/pcap/caller1_pcmu.pcap"),
        5500,
    );
    sipp(&sc, daemon.udp_addr(), &["-s", NUMBER]).assert_success();
    let call_id = answered_call_id(&daemon);
    let dir = daemon.dir();
    let recs = wait_recordings(dir, &call_id, |r| {
        r.first()
            .is_some_and(|r| r.state == RecordingState::Complete)
    });
    assert_eq!(recs.len(), 1, "{recs:?}");
    let rec = &recs[0];
    assert_eq!(rec.state, RecordingState::Complete);
    assert!(
        rec.path.starts_with(dir.join("var/recordings/demo")),
        "{:?}",
        rec.path
    );
    assert_eq!(rec.size_bytes, std::fs::metadata(&rec.path).unwrap().len());
    assert!(
        (5000..8000).contains(&rec.duration_ms),
        "duration {} ms",
        rec.duration_ms
    );

    let wav = sipbridge::store::recording::export_wav(&rec.path, &keyring(dir)).unwrap();
    let (left, right) = channels(&wav);
    assert_eq!(left.len() as u64, rec.duration_ms * 8);

    let caller = caller1_pcm();
    let (lag, score) = best(&left, &caller, 0..8000);
    eprintln!("left vs caller1: NCC {score:.4} at {lag}");
    assert!(score >= 0.95, "left channel NCC {score:.4} at lag {lag}");

    let prompt = prompt_pcm();
    let (lag, score) = best(&right, &prompt, 0..800);
    eprintln!("right vs prompt: NCC {score:.4} at {lag}");
    assert!(score >= 0.95, "right channel NCC {score:.4} at lag {lag}");
    assert!(
        lag < 400,
        "the recording starts with the prompt (lag {lag})"
    );

    let call = store(dir).get_call("demo", &call_id).unwrap().unwrap();
    assert_eq!(call.result_code, Some(200));
    assert_eq!(call.caller.as_deref(), Some("+15550001111"));
    assert_eq!(call.to, NUMBER);
    assert_eq!(call.cause.as_deref(), Some("caller-bye"), "{call:?}");
    let started = call
        .consent
        .disclosure_started_at
        .expect("disclosure start");
    let finished = call.consent.disclosure_finished_at.expect("disclosure end");
    let played = finished - started;
    assert!((4300..4900).contains(&played), "prompt took {played} ms");
    assert_eq!(call.consent.opt_out_at, None);

    // No plaintext anywhere: not the fixture, not the prompt, not the recording's own
    // decrypted samples, and no RIFF.
    let decrypted: Vec<u8> = left
        .iter()
        .zip(&right)
        .flat_map(|(l, r)| [l.to_le_bytes(), r.to_le_bytes()].concat())
        .collect();
    let found = audio_files(&[dir, tmp.path()], &plaintext_windows(&decrypted));
    assert!(found.is_empty(), "{found:?}");
}

#[test]
fn privacy_no_audio_at_rest_when_recording_is_off() {
    let tmp = tempfile::tempdir().unwrap();
    let daemon = spawn(false, tmp.path());
    let sc = scenario(
        tmp.path(),
        &repo_path("fixtures/pcap/caller1_pcmu.pcap"),
        3500,
    );
    sipp(&sc, daemon.udp_addr(), &["-s", NUMBER]).assert_success();
    let call_id = answered_call_id(&daemon);
    let dir = daemon.dir();
    // The CDR row is written; no recording row, no recordings directory, no data key.
    let deadline = Instant::now() + Duration::from_secs(10);
    let call = loop {
        let c = store(dir).get_call("demo", &call_id).unwrap();
        if c.as_ref().is_some_and(|c| c.ended_at.is_some()) || Instant::now() > deadline {
            break c.expect("CDR row");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(call.result_code, Some(200));
    assert!(
        store(dir)
            .recordings_of_call("demo", &call_id)
            .unwrap()
            .is_empty()
    );
    assert!(!dir.join("var/recordings").exists());
    assert!(!dir.join("var/keys/demo.key").exists());
    let found = audio_files(&[dir, tmp.path()], &plaintext_windows(&[]));
    assert!(found.is_empty(), "{found:?}");
}

#[test]
fn privacy_opt_out_dtmf_during_the_prompt_deletes_the_recording() {
    let dtmf = Path::new("/usr/share/sip-tester/dtmf_2833_9.pcap");
    assert!(dtmf.exists(), "SIPp's RFC 4733 pcap of digit 9");
    let tmp = tempfile::tempdir().unwrap();
    let daemon = spawn_with_opt_out(tmp.path());
    let sc = scenario(tmp.path(), dtmf, 2500);
    sipp(&sc, daemon.udp_addr(), &["-s", NUMBER]).assert_success();
    let call_id = answered_call_id(&daemon);
    let dir = daemon.dir();
    let recs = wait_recordings(dir, &call_id, |r| {
        r.first()
            .is_some_and(|r| r.state == RecordingState::Deleted)
    });
    assert_eq!(recs.len(), 1, "{recs:?}");
    assert_eq!(recs[0].state, RecordingState::Deleted);
    assert!(!recs[0].path.exists(), "the recording file is removed");
    let mut files = Vec::new();
    files_under(&dir.join("var/recordings"), &mut files);
    assert!(files.is_empty(), "{files:?}");
    assert!(
        store(dir)
            .list_recordings(Some("demo"), None)
            .unwrap()
            .is_empty()
    );

    let call = store(dir).get_call("demo", &call_id).unwrap().unwrap();
    let started = call
        .consent
        .disclosure_started_at
        .expect("disclosure start");
    let opt_out = call.consent.opt_out_at.expect("opt-out time in the CDR");
    assert!(opt_out >= started, "{call:?}");
    assert!(
        call.consent
            .disclosure_finished_at
            .is_none_or(|f| opt_out < f),
        "the key was pressed during the prompt: {call:?}"
    );
    let audit = store(dir)
        .audit_log(&sipbridge::store::db::AuditFilter::default())
        .unwrap();
    let actions: Vec<String> = audit.iter().map(|a| a.action.to_string()).collect();
    assert!(
        actions.contains(&"consent-opt-out".to_owned()),
        "{actions:?}"
    );
    assert!(
        actions.contains(&"recording-delete".to_owned()),
        "{actions:?}"
    );
    assert!(
        daemon.logs().iter().any(|l| l.contains("caller opted out")),
        "the daemon logged the opt-out"
    );
}

#[test]
fn privacy_crash_safety_kill_9_mid_call_recovers_a_partial_recording() {
    let tmp = tempfile::tempdir().unwrap();
    let first = spawn(true, tmp.path());
    let sc = scenario(
        tmp.path(),
        &repo_path("fixtures/pcap/caller1_pcmu.pcap"),
        8000,
    );
    let target = first.udp_addr();
    let carrier = std::thread::spawn(move || {
        // The BYE after the kill goes unanswered; the result does not matter.
        let _ = sipp(&sc, target, &["-s", NUMBER, "-timeout", "12s"]);
    });
    first
        .wait_for_log(Duration::from_secs(10), |l| l.contains("recording started"))
        .expect("the recording starts");
    let started = Instant::now();
    std::thread::sleep(Duration::from_millis(3500));
    let status = std::process::Command::new("kill")
        .args(["-9", &first.pid().to_string()])
        .status()
        .unwrap();
    let killed_after = started.elapsed();
    assert!(status.success());

    // Restart on the same var_dir (absolute path to the first daemon's).
    let var = first.dir().join("var");
    let text = profile(true).replace(
        "var_dir = \"var\"",
        &format!("var_dir = {:?}", var.display().to_string()),
    );
    let second = Daemon::spawn_with_env(&text, &[("TMPDIR", tmp.path().to_str().unwrap())]);
    let deadline = Instant::now() + Duration::from_secs(10);
    let rec = loop {
        let recs = store(first.dir())
            .list_recordings(Some("demo"), None)
            .unwrap();
        if let Some(r) = recs
            .into_iter()
            .find(|r| r.state == RecordingState::Partial)
        {
            break r;
        }
        assert!(Instant::now() < deadline, "{:?}", second.logs());
        std::thread::sleep(Duration::from_millis(50));
    };
    let recovered =
        sipbridge::store::recording::recover_wav(&rec.path, &keyring(first.dir())).unwrap();
    assert!(!recovered.complete);
    assert_eq!(rec.duration_ms, recovered.frames * 1000 / 8000);
    let killed_ms = u64::try_from(killed_after.as_millis()).unwrap();
    eprintln!(
        "killed {killed_ms} ms after the recording started; recovered {} ms",
        rec.duration_ms
    );
    // At most one second (one sealed chunk) lost, plus the test's own timing slack
    // (the "recording started" log line reaches the test a little after the file opens).
    assert!(
        rec.duration_ms + 1000 + 200 >= killed_ms && rec.duration_ms <= killed_ms + 200,
        "recovered {} ms of a recording killed after {killed_ms} ms",
        rec.duration_ms
    );
    let (left, _) = channels(&recovered.wav);
    let caller = caller1_pcm();
    let needle = &caller[..caller.len().min(left.len().saturating_sub(2000))];
    let (lag, score) = best(&left, needle, 0..2000);
    assert!(
        score >= 0.95,
        "recovered caller audio NCC {score:.4} at {lag}"
    );

    // The CDR was closed as crash-recovered.
    let call = store(first.dir())
        .get_call("demo", &rec.call_id)
        .unwrap()
        .unwrap();
    assert_eq!(call.cause.as_deref(), Some("crash-recovered"));
    drop(second);
    let _ = carrier.join();
}
