#![allow(clippy::unwrap_used, clippy::expect_used)]
//! Recordings in S3-compatible object storage (issue 16 item 3), against moto's S3
//! server on loopback (`common::s3`).
//!
//! Covers: a growing recording is uploaded in 5 MiB parts as it grows and completed
//! when it ends, byte for byte the sealed file (no plaintext, no RIFF), the local
//! spool file then removed; through the daemon, a SIPp call's recording becomes an
//! object that correlates with nothing of the caller's audio, is downloadable through
//! a signed admin link (decrypting to the caller's audio), and is deleted from the
//! bucket by erasure and by the retention sweep; with the object store down the
//! recording waits in the spool (which is bounded by `spool_max_mb`: past it new calls
//! go unrecorded) and is uploaded once the store is back. The credentials never
//! appear in a log.

mod common;

use common::s3::{ACCESS_KEY_ID, REGION, S3Server, SECRET_ACCESS_KEY};
use common::{Daemon, ProfileSpec, http, repo_path, sipp};
use sipbridge::config::secret::{Secret, SecretRef};
use sipbridge::media::g711;
use sipbridge::store::crypto::KeyRing;
use sipbridge::store::db::{RecordingRecord, RecordingState, Store};
use sipbridge::store::objects::{
    MIN_PART_BYTES, RecordingObjects, S3Settings, Shipped, object_key,
};
use sipbridge::store::recording::{RecordingDate, RecordingWriter, export_wav_from};
use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

const NUMBER: &str = "+15551234567";
const ADMIN_TOKEN: &str = "admin-token-for-the-s3-recording-test";

fn settings(s3: &S3Server) -> S3Settings {
    S3Settings::new(
        s3.endpoint(),
        s3.bucket().to_owned(),
        REGION.to_owned(),
        Secret::new(ACCESS_KEY_ID.as_bytes().to_vec(), SecretRef::Inline),
        Secret::new(SECRET_ACCESS_KEY.as_bytes().to_vec(), SecretRef::Inline),
        64 * 1024 * 1024,
    )
}

fn has_riff(bytes: &[u8]) -> bool {
    bytes.windows(4).any(|w| w == b"RIFF")
}

#[test]
fn s3_a_growing_recording_is_uploaded_in_parts_and_completed_byte_for_byte() {
    let s3 = S3Server::start("recordings");
    let objects = RecordingObjects::new(&settings(&s3)).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let var = tmp.path();
    let keyring = KeyRing::open(var, &[5u8; 32]).unwrap();
    let mut rng = <rand_chacha::ChaCha20Rng as rand::SeedableRng>::seed_from_u64(3);
    let key = keyring.data_key("acme", &mut rng).unwrap();
    let date = RecordingDate::new(2026, 12, 7).unwrap();
    let mut w = RecordingWriter::create(var, &key, date, 1_800_000_000, &mut rng).unwrap();
    let path = w.path().to_owned();
    let key_name = object_key(&path).unwrap();
    assert!(
        key_name.starts_with("recordings/acme/2026/12/07/"),
        "{key_name}"
    );

    // 180 s of a varied signal (5.76 MB sealed): the first 5 MiB part goes up while
    // the call is still going, and nothing is an object before the end.
    let mut upload = None;
    let (mut left_all, mut parts_during_call) = (Vec::new(), 0);
    for second in 0..180i32 {
        let left: Vec<i16> = (0..8000i32)
            .map(|i| ((i * 37 + second * 101) % 4000 - 2000) as i16)
            .collect();
        let right: Vec<i16> = left.iter().map(|s| s / 3).collect();
        w.push(&left, &right).unwrap();
        left_all.extend_from_slice(&left);
        assert_eq!(
            objects.ship(&path, &mut upload, false).unwrap(),
            Shipped::Pending
        );
        parts_during_call = upload.as_ref().map_or(0, |u| u.parts());
    }
    assert_eq!(
        parts_during_call, 1,
        "one 5 MiB part uploaded during the call"
    );
    assert_eq!(upload.as_ref().unwrap().uploaded(), MIN_PART_BYTES);
    assert_eq!(s3.pending_uploads(), vec![key_name.clone()]);
    assert!(
        s3.list("recordings/").is_empty(),
        "no object before the end"
    );

    let summary = w.finish().unwrap();
    let sealed = std::fs::read(&path).unwrap();
    assert_eq!(sealed.len() as u64, summary.bytes);
    assert_eq!(
        objects.ship(&path, &mut upload, true).unwrap(),
        Shipped::Done
    );
    assert!(
        !path.exists(),
        "the spool file is removed once the object is complete"
    );
    assert!(s3.pending_uploads().is_empty());
    assert_eq!(s3.list("recordings/"), vec![key_name.clone()]);
    let object = s3.get(&key_name).unwrap();
    assert!(
        object == sealed,
        "the object is the sealed file, byte for byte"
    );
    assert!(!has_riff(&object));
    // No 16-byte run of the plaintext PCM is in the object.
    let plain: Vec<u8> = left_all.iter().flat_map(|s| s.to_le_bytes()).collect();
    let runs: HashSet<&[u8]> = plain.chunks_exact(16).step_by(97).collect();
    assert!(!object.windows(16).any(|w| runs.contains(w)));

    // Read back from the bucket (no local file): decrypts to what was recorded.
    let file = objects.open_sealed(&path, var).unwrap();
    let mut wav = std::io::Cursor::new(Vec::new());
    let frames = export_wav_from(file, &keyring, &mut wav).unwrap();
    assert_eq!(frames, 180 * 8000);
    let (left, _) = channels(wav.get_ref());
    assert!(
        left == left_all,
        "the bucket's copy decrypts to the recorded audio"
    );
    let leftovers: Vec<_> = std::fs::read_dir(var)
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with(".fetch-"))
        .collect();
    assert!(leftovers.is_empty(), "the fetched copy is anonymous");

    // Deleting removes the object (a missing local file is fine).
    objects.remove_recording(&path).unwrap();
    assert!(s3.list("recordings/").is_empty());
    assert!(s3.get(&key_name).is_none());
}

// ---- through the daemon ---------------------------------------------------------

fn caller1_pcm() -> Vec<i16> {
    std::fs::read(repo_path("fixtures/audio/caller1.ulaw"))
        .unwrap()
        .iter()
        .map(|&c| g711::mu_to_linear(c))
        .collect()
}

/// Normalised cross-correlation of `needle` with `hay[lag..]`.
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

fn best(hay: &[i16], needle: &[i16], lags: std::ops::Range<usize>) -> (usize, f64) {
    lags.map(|l| (l, ncc(hay, needle, l)))
        .fold((0, f64::MIN), |a, b| if b.1 > a.1 { b } else { a })
}

fn channels(wav: &[u8]) -> (Vec<i16>, Vec<i16>) {
    let mut reader = hound::WavReader::new(std::io::Cursor::new(wav)).unwrap();
    assert_eq!(
        (reader.spec().channels, reader.spec().sample_rate),
        (2, 8000)
    );
    let samples: Vec<i16> = reader.samples::<i16>().map(Result::unwrap).collect();
    (
        samples.iter().step_by(2).copied().collect(),
        samples.iter().skip(1).step_by(2).copied().collect(),
    )
}

/// 16-byte windows of the caller's audio as µ-law and as 16-bit PCM (runs with at
/// least 8 distinct bytes: silence would match anything).
fn caller_windows() -> HashSet<[u8; 16]> {
    let mut set = HashSet::new();
    let mut add = |bytes: &[u8], step: usize| {
        let mut i = 0;
        while i + 16 <= bytes.len() {
            let w: [u8; 16] = bytes[i..i + 16].try_into().unwrap();
            if w.iter().collect::<HashSet<_>>().len() >= 8 {
                set.insert(w);
            }
            i += step;
        }
    };
    add(
        &std::fs::read(repo_path("fixtures/audio/caller1.ulaw")).unwrap(),
        1,
    );
    let pcm: Vec<u8> = caller1_pcm().iter().flat_map(|s| s.to_le_bytes()).collect();
    add(&pcm, 2);
    set
}

/// `call_with_audio.xml` (caller1's audio) with the pause before the BYE set.
fn scenario(dir: &Path, pause_ms: u32) -> PathBuf {
    let text = std::fs::read_to_string(repo_path("tests/sipp/call_with_audio.xml")).unwrap();
    let pcap = repo_path("fixtures/pcap/caller1_pcmu.pcap");
    let text = text
        .replace(
            "../../fixtures/pcap/caller1_pcmu.pcap",
            &pcap.display().to_string(),
        )
        .replace(
            "<pause milliseconds=\"3500\"/>",
            &format!("<pause milliseconds=\"{pause_ms}\"/>"),
        );
    let path = dir.join("scenario.xml");
    std::fs::write(&path, text).unwrap();
    path
}

/// A recording daemon whose recordings go to `s3`, with `var_dir` at `var` (so a
/// restart finds the same store) and the admin API on.
fn spawn(s3: &S3Server, var: &Path, recordings_extra: &str, extra: &str) -> Daemon {
    let text = ProfileSpec::default().render();
    let text = text
        .replace("recording = false\n", "recording = true\n")
        .replace(
            "var_dir = \"var\"",
            &format!(
                "var_dir = {}",
                toml::Value::String(var.display().to_string())
            ),
        );
    let text = format!(
        "{text}\n{}{recordings_extra}\n[profile.admin]\nlisten = \"127.0.0.1:0\"\ntoken = \"env:SB_ADMIN_TOKEN\"\n{extra}",
        s3.recordings_section()
    );
    Daemon::spawn_with_env(&text, &[("SB_ADMIN_TOKEN", ADMIN_TOKEN)])
}

fn store(var: &Path) -> Store {
    Store::open(&var.join("sipbridge.db")).unwrap()
}

fn wait_recording(var: &Path, call_id: &str) -> RecordingRecord {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let recs = store(var).recordings_of_call("demo", call_id).unwrap();
        if let Some(r) = recs.first()
            && r.state == RecordingState::Complete
        {
            return r.clone();
        }
        assert!(
            Instant::now() < deadline,
            "recording of {call_id}: {recs:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Waits until `pred` holds for the bucket's keys.
fn wait_bucket(s3: &S3Server, what: &str, pred: impl Fn(&[String]) -> bool) -> Vec<String> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let keys = s3.list("recordings/");
        if pred(&keys) {
            return keys;
        }
        assert!(Instant::now() < deadline, "{what}: bucket holds {keys:?}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Places one call with caller1's audio; returns its call id.
fn call(daemon: &Daemon, dir: &Path, answered_before: usize) -> String {
    sipp(&scenario(dir, 4000), daemon.udp_addr(), &["-s", NUMBER]).assert_success();
    let cdrs = daemon.wait_for_cdrs(answered_before + 1, Duration::from_secs(10));
    cdrs[answered_before]["call_id"]
        .as_str()
        .unwrap()
        .to_owned()
}

fn admin_post(daemon: &Daemon, path: &str, body: &str) -> http::Response {
    http::request(
        daemon.admin_addr(),
        "POST",
        path,
        &[
            ("Authorization", &format!("Bearer {ADMIN_TOKEN}")),
            ("Content-Type", "application/json"),
        ],
        body.as_bytes(),
    )
}

fn assert_no_secrets(daemon: &Daemon) {
    for line in daemon.logs() {
        assert!(
            !line.contains(SECRET_ACCESS_KEY),
            "the secret access key is in a log line: {line}"
        );
    }
}

#[test]
fn s3_recordings_of_calls_are_encrypted_objects_downloadable_and_deleted_by_erasure_and_retention()
{
    let s3 = S3Server::start("recordings");
    let tmp = tempfile::tempdir().unwrap();
    let var = tmp.path().join("var");
    let daemon = spawn(&s3, &var, "", "");

    // 1. A call: its recording becomes an object and leaves the spool.
    let call1 = call(&daemon, tmp.path(), 0);
    let rec1 = wait_recording(&var, &call1);
    let key1 = object_key(&rec1.path).unwrap();
    wait_bucket(&s3, "the first recording", |k| k.contains(&key1));
    let deadline = Instant::now() + Duration::from_secs(10);
    while rec1.path.exists() {
        assert!(
            Instant::now() < deadline,
            "spool file left: {:?}",
            rec1.path
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let object = s3.get(&key1).unwrap();
    assert_eq!(object.len() as u64, rec1.size_bytes);
    assert!(!has_riff(&object), "RIFF header in the object");
    let plain = caller_windows();
    assert!(
        !object.windows(16).any(|w| plain.contains(w)),
        "a run of the caller's audio is in the object"
    );
    // Read as audio, the object does not correlate with the caller's.
    let as_pcm: Vec<i16> = object
        .chunks_exact(2)
        .map(|b| i16::from_le_bytes([b[0], b[1]]))
        .collect();
    let caller = caller1_pcm();
    let (_, score) = best(&as_pcm, &caller[..8000], 0..as_pcm.len().min(40_000));
    assert!(
        score < 0.2,
        "the object correlates with the caller's audio: {score:.3}"
    );

    // 2. A signed link streams it from the bucket, decrypted.
    let link = admin_post(
        &daemon,
        &format!("/v1/recordings/{}/link", rec1.id),
        r#"{"ttl_s": 600}"#,
    );
    assert_eq!(link.status, 201, "{}", link.text());
    let url = link.json()["url"].as_str().unwrap().to_owned();
    let got = http::get(daemon.admin_addr(), &url, None);
    assert_eq!(got.status, 200, "{}", got.text());
    let (left, _) = channels(&got.body);
    assert_eq!(left.len() as u64, rec1.duration_ms * 8);
    let (lag, score) = best(&left, &caller, 0..8000);
    assert!(
        score >= 0.95,
        "downloaded left channel NCC {score:.4} at lag {lag}"
    );
    // Not in the bucket (as for another node while this one still spools it): 503,
    // ask again.
    let kept = s3.get(&key1).unwrap();
    s3.delete(&key1);
    let missing = http::get(daemon.admin_addr(), &url, None);
    assert_eq!(missing.status, 503, "{}", missing.text());
    assert_eq!(missing.header("retry-after"), Some("5"));
    assert!(!missing.text().contains(&rec1.path.display().to_string()));
    let restored = http::request(
        s3.addr(),
        "PUT",
        &format!("/{}/{key1}", s3.bucket()),
        &[],
        &kept,
    );
    assert_eq!(restored.status, 200);

    // 3. Erasure of a second call deletes its object.
    let call2 = call(&daemon, tmp.path(), 1);
    let rec2 = wait_recording(&var, &call2);
    let key2 = object_key(&rec2.path).unwrap();
    wait_bucket(&s3, "the second recording", |k| k.contains(&key2));
    let erased = admin_post(
        &daemon,
        "/v1/erase",
        &format!(r#"{{"tenant": "demo", "call": "{call2}", "reason": "data subject request"}}"#),
    );
    assert_eq!(erased.status, 200, "{}", erased.text());
    assert_eq!(
        s3.list("recordings/"),
        vec![key1.clone()],
        "erasure left the object"
    );
    assert_no_secrets(&daemon);
    drop(daemon);

    // 4. Retention: the first recording made 100 days old; the sweep at the next
    // start deletes its object.
    {
        let db = rusqlite::Connection::open(var.join("sipbridge.db")).unwrap();
        let old = sipbridge::store::db::unix_ms(std::time::SystemTime::now()) - 100 * 86_400_000;
        let n = db
            .execute(
                "UPDATE recordings SET created_at = ?1 WHERE id = ?2",
                rusqlite::params![old, rec1.id],
            )
            .unwrap();
        assert_eq!(n, 1);
    }
    let daemon = spawn(&s3, &var, "", "");
    daemon
        .wait_for_log(Duration::from_secs(15), |l| l.contains("retention sweep"))
        .expect("a sweep at start-up");
    assert!(
        s3.list("recordings/").is_empty(),
        "retention left {:?}",
        s3.list("recordings/")
    );
    let rec = store(&var).get_recording(None, &rec1.id).unwrap().unwrap();
    assert_eq!(rec.state, RecordingState::Deleted);
    assert_no_secrets(&daemon);
}

#[test]
fn s3_outage_keeps_recordings_in_a_bounded_spool_until_the_store_is_back() {
    let mut s3 = S3Server::start("recordings");
    s3.stop();
    let tmp = tempfile::tempdir().unwrap();
    let var = tmp.path().join("var");
    let daemon = spawn(
        &s3,
        &var,
        "spool_max_mb = 1\n",
        "[profile.store]\ncheck_interval_s = 1\n",
    );
    let call1 = call(&daemon, tmp.path(), 0);
    let rec1 = wait_recording(&var, &call1);
    daemon
        .wait_for_log(Duration::from_secs(20), |l| {
            l.contains("recording upload failed; kept in the spool")
        })
        .expect("the failed upload is logged");
    assert!(rec1.path.exists(), "the recording waits in the spool");
    let spooled = std::fs::read(&rec1.path).unwrap();
    assert!(!has_riff(&spooled));
    // A second recording is erased meanwhile by another node on the same database
    // (its row marked deleted, its file out of that node's reach).
    let erased_call = call(&daemon, tmp.path(), 1);
    let erased = wait_recording(&var, &erased_call);
    {
        let db = rusqlite::Connection::open(var.join("sipbridge.db")).unwrap();
        let n = db
            .execute(
                "UPDATE recordings SET state = 'deleted' WHERE id = ?1",
                rusqlite::params![erased.id],
            )
            .unwrap();
        assert_eq!(n, 1);
    }

    // Over spool_max_mb (1 MiB): the next call is answered but not recorded.
    let filler = var.join("recordings/demo/2026/01/01");
    std::fs::create_dir_all(&filler).unwrap();
    let filler = filler.join(format!("{}.sbrec", "f".repeat(32)));
    std::fs::write(&filler, vec![0x5a; 2 * 1024 * 1024]).unwrap();
    daemon
        .wait_for_log(Duration::from_secs(10), |l| {
            l.contains("exceed spool_max_mb")
        })
        .expect("the spool's bound is logged");
    let call2 = call(&daemon, tmp.path(), 2);
    let cdrs = daemon.wait_for_cdrs(3, Duration::from_secs(10));
    assert_eq!(cdrs[2]["call_id"], call2.as_str());
    assert_eq!(cdrs[2]["recording"], "not-recorded", "{}", cdrs[2]);

    // Where recordings go is fixed until a restart: a reload that changes it is
    // refused, and the running configuration stays.
    let profile = daemon.dir().join("profile.toml");
    let text = std::fs::read_to_string(&profile).unwrap();
    std::fs::write(
        &profile,
        text.replace("bucket = \"recordings\"", "bucket = \"elsewhere\""),
    )
    .unwrap();
    let reload = admin_post(&daemon, "/v1/reload", "{}");
    assert_eq!(reload.status, 409, "{}", reload.text());
    assert!(
        reload.text().contains("[profile.recordings] changed"),
        "{}",
        reload.text()
    );
    std::fs::write(&profile, text).unwrap();

    // The store is back: the spool drains into the bucket.
    s3.restart();
    let key1 = object_key(&rec1.path).unwrap();
    wait_bucket(&s3, "the spooled recording", |k| k.contains(&key1));
    assert!(s3.get(&key1).unwrap() == spooled, "uploaded byte for byte");
    let deadline = Instant::now() + Duration::from_secs(30);
    while rec1.path.exists() || filler.exists() {
        assert!(Instant::now() < deadline, "the spool did not drain");
        std::thread::sleep(Duration::from_millis(200));
    }
    daemon
        .wait_for_log(Duration::from_secs(10), |l| {
            l.contains("recording spool back under spool_max_mb")
        })
        .expect("the spool is back under its bound");
    // The erased recording's object does not outlive its row.
    daemon
        .wait_for_log(Duration::from_secs(10), |l| {
            l.contains("recording deleted while it was uploading")
        })
        .expect("the erased recording's object is deleted after its upload");
    let erased_key = object_key(&erased.path).unwrap();
    assert!(!s3.list("recordings/").contains(&erased_key));
    assert!(!erased.path.exists());
    assert_no_secrets(&daemon);
}

#[test]
fn s3_an_upload_a_crash_left_is_aborted_and_the_file_uploaded_again_from_its_first_byte() {
    let s3 = S3Server::start("recordings");
    let objects = RecordingObjects::new(&settings(&s3)).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("recordings/acme/2026/12/07");
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(format!("{}.sbrec", "ab".repeat(16)));
    let bytes: Vec<u8> = (0..6 * 1024 * 1024u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    std::fs::write(&path, &bytes).unwrap();
    let key = object_key(&path).unwrap();

    // One part goes up while the file is open; then the process "dies".
    let mut upload = None;
    assert_eq!(
        objects.ship(&path, &mut upload, false).unwrap(),
        Shipped::Pending
    );
    assert_eq!(upload.as_ref().unwrap().parts(), 1);
    assert_eq!(s3.pending_uploads(), vec![key.clone()]);
    let marker = tmp.path().join(format!(
        "recordings/acme/2026/12/07/{}.sbrec.upload",
        "ab".repeat(16)
    ));
    assert!(marker.exists(), "the upload is named beside the file");
    drop(upload);

    // The next start: the marker's upload is aborted, the file shipped whole.
    assert!(objects.abort_stale_upload(&path).unwrap());
    assert!(
        s3.pending_uploads().is_empty(),
        "the crashed upload is aborted"
    );
    assert!(!marker.exists());
    let mut upload = None;
    assert_eq!(
        objects.ship(&path, &mut upload, true).unwrap(),
        Shipped::Done
    );
    assert!(s3.get(&key).unwrap() == bytes);
    assert!(!path.exists() && !marker.exists());
    assert!(s3.pending_uploads().is_empty());
}

#[test]
fn s3_kill_9_mid_call_then_restart_uploads_the_recovered_partial_recording() {
    let s3 = S3Server::start("recordings");
    let tmp = tempfile::tempdir().unwrap();
    let var = tmp.path().join("var");
    let first = spawn(&s3, &var, "", "");
    let sc = scenario(tmp.path(), 8000);
    let target = first.udp_addr();
    let carrier = std::thread::spawn(move || {
        // The BYE after the kill goes unanswered; the result does not matter.
        let _ = sipp(&sc, target, &["-s", NUMBER, "-timeout", "12s"]);
    });
    first
        .wait_for_log(Duration::from_secs(10), |l| l.contains("recording started"))
        .expect("the recording starts");
    std::thread::sleep(Duration::from_millis(3500));
    let status = std::process::Command::new("kill")
        .args(["-9", &first.pid().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    assert!(
        s3.list("recordings/").is_empty(),
        "nothing complete before the kill"
    );

    let second = spawn(&s3, &var, "", "");
    let deadline = Instant::now() + Duration::from_secs(15);
    let rec = loop {
        let recs = store(&var).list_recordings(Some("demo"), None).unwrap();
        if let Some(r) = recs
            .into_iter()
            .find(|r| r.state == RecordingState::Partial)
        {
            break r;
        }
        assert!(Instant::now() < deadline, "{:?}", second.logs());
        std::thread::sleep(Duration::from_millis(100));
    };
    let key = object_key(&rec.path).unwrap();
    wait_bucket(&s3, "the recovered recording", |k| k.contains(&key));
    let deadline = Instant::now() + Duration::from_secs(10);
    while rec.path.exists() {
        assert!(Instant::now() < deadline, "the spool file stays");
        std::thread::sleep(Duration::from_millis(100));
    }
    let object = s3.get(&key).unwrap();
    assert!(!has_riff(&object));
    // Decrypted from the bucket: the seconds before the kill, the caller's audio.
    let master = std::fs::read(var.join("master.key")).unwrap();
    let keyring = KeyRing::open(&var, &master).unwrap();
    let objects = RecordingObjects::new(&settings(&s3)).unwrap();
    let recovered = sipbridge::store::recording::recover_wav_from(
        objects.open_sealed(&rec.path, &var).unwrap(),
        &keyring,
    )
    .unwrap();
    assert_eq!(rec.duration_ms, recovered.frames * 1000 / 8000);
    assert!(rec.duration_ms >= 2000, "recovered {} ms", rec.duration_ms);
    let (left, _) = channels(&recovered.wav);
    let caller = caller1_pcm();
    let needle = &caller[..caller.len().min(left.len().saturating_sub(2000))];
    let (lag, score) = best(&left, needle, 0..2000);
    assert!(score >= 0.95, "left channel NCC {score:.4} at lag {lag}");
    let _ = carrier.join();
    assert_no_secrets(&second);
}
