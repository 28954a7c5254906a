#![allow(clippy::unwrap_used, clippy::expect_used)]
//! The data subcommands (`recordings`, `retention`, `erase`, `export`,
//! `tenant delete`) run as the real binary against a var_dir whose database,
//! keys and sealed recordings the test writes with the store library.

use std::collections::BTreeSet;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::SystemTime;

use rand::SeedableRng;
use rand_chacha::ChaCha20Rng;
use sipbridge::config::StoreEngine;
use sipbridge::store::crypto::{CryptoError, KeyRing};
use sipbridge::store::db::{
    AuditAction, AuditFilter, CallEnd, CallRow, CallerIdPolicy, ObjectKind, RecordingRow,
    RecordingState, RtpStats, Speaker, Store, StoredHangupSide, TranscriptRow, unix_ms,
};
use sipbridge::store::ops::{format_time, seal_transcript};
use sipbridge::store::recording::{RecordingDate, RecordingError, RecordingWriter, export_wav};
use sipbridge::store::retention::DAY_MS;

const MASTER: [u8; 32] = [0x42; 32];
const ALICE: &str = "+15550001";
const BOB: &str = "+15550002";

struct Env {
    _tmp: tempfile::TempDir,
    dir: PathBuf,
    var: PathBuf,
    config: PathBuf,
    rng: ChaCha20Rng,
    now: i64,
    engine: StoreEngine,
}

/// The store the tests run on: the `[profile.store]` lines of the test
/// profile and the engine they name, for a test directory `dir`. Here
/// SQLite (no lines); `tests/cli_store_pg.rs` includes this file as a module
/// and its own `store_engine` (reached through `crate::`) runs the same tests
/// on PostgreSQL.
#[allow(dead_code)]
fn store_engine(_dir: &Path) -> (String, StoreEngine) {
    (String::new(), StoreEngine::Sqlite)
}

/// Samples of recording `seed`: left and right channels differ.
fn samples(seed: i16, frames: usize) -> (Vec<i16>, Vec<i16>) {
    let left = (0..frames)
        .map(|i| ((i % 97) as i16 - 48) * 50 + seed)
        .collect();
    let right = (0..frames)
        .map(|i| ((i % 31) as i16 - 15) * -70 - seed)
        .collect();
    (left, right)
}

impl Env {
    fn new() -> Self {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().to_path_buf();
        let var = dir.join("var");
        std::fs::create_dir(&var).unwrap();
        std::fs::set_permissions(&var, std::fs::Permissions::from_mode(0o700)).unwrap();
        std::fs::write(var.join("master.key"), MASTER).unwrap();
        let config = dir.join("profile.toml");
        let (store_toml, engine) = crate::store_engine(&dir);
        std::fs::write(
            &config,
            format!(
                r#"[profile]
name = "clitest"
var_dir = "{var}"
master_key = "file:{var}/master.key"
max_calls = 10
rtp_ports = {{ start = 30000, end = 30099 }}
{store_toml}
[profile.listen]
udp = ["127.0.0.1:5999"]

[[trunk]]
name = "local"
allow = ["127.0.0.0/8"]

[[tenant]]
id = "acme"
recording = false
pipeline = {{ kind = "echo" }}

[tenant.retention]
recordings_days = 90
transcripts_days = 90
metadata_days = 365

[[tenant]]
id = "beta"
recording = false
pipeline = {{ kind = "echo" }}

[[route]]
number = "*"
tenant = "acme"
"#,
                var = var.display()
            ),
        )
        .unwrap();
        // The database exists as the daemon leaves it.
        drop(Store::open_engine(&engine, &var.join("sipbridge.db")).unwrap());
        Self {
            _tmp: tmp,
            dir,
            var,
            config,
            rng: ChaCha20Rng::seed_from_u64(7),
            now: unix_ms(SystemTime::now()),
            engine,
        }
    }

    fn store(&self) -> Store {
        let mut s = Store::open_engine(&self.engine, &self.var.join("sipbridge.db")).unwrap();
        s.set_caller_policy("acme", CallerIdPolicy::Plain);
        s.set_caller_policy("beta", CallerIdPolicy::Plain);
        s
    }

    fn ring(&self) -> KeyRing {
        KeyRing::open_engine(&self.var, &MASTER, &self.engine).unwrap()
    }

    fn run(&self, args: &[&str]) -> Output {
        let mut all: Vec<&str> = args.to_vec();
        all.push("--config");
        all.push(self.config.to_str().unwrap());
        Command::new(env!("CARGO_BIN_EXE_sipbridge"))
            .args(&all)
            .current_dir(&self.dir)
            .env("SIPBRIDGE_LOG", "warn")
            .output()
            .unwrap()
    }

    fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert_eq!(
            out.status.code(),
            Some(0),
            "{args:?}\nstdout: {}\nstderr: {}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    /// An ended call of `tenant` from `from`, started `age_days` ago.
    fn call(&self, tenant: &str, id: &str, from: &str, age_days: i64) {
        let started = self.now - age_days * DAY_MS;
        let mut s = self.store();
        s.insert_call(&CallRow {
            call_id: id.into(),
            tenant: tenant.into(),
            trunk: "local".into(),
            from: from.into(),
            to: "+4930555".into(),
            started_at: started,
        })
        .unwrap();
        s.finish_call(
            tenant,
            id,
            &CallEnd {
                answered_at: Some(started + 1000),
                ended_at: started + 60_000,
                result_code: 200,
                hangup_side: StoredHangupSide::Remote,
                cause: "bye".into(),
                codec: Some("PCMU/8000".into()),
                rtp: RtpStats {
                    packets: 3000,
                    lost: 1,
                    jitter_ms: 2.5,
                },
            },
        )
        .unwrap();
    }

    /// A sealed, complete recording of `frames` stereo frames for the call;
    /// returns its id and path.
    fn recording(
        &mut self,
        tenant: &str,
        call_id: &str,
        age_days: i64,
        seed: i16,
        frames: usize,
    ) -> (String, PathBuf) {
        let created = self.now - age_days * DAY_MS;
        let key = self.ring().data_key(tenant, &mut self.rng).unwrap();
        let mut w = RecordingWriter::create(
            &self.var,
            &key,
            RecordingDate::new(2026, 1, 2).unwrap(),
            (created / 1000) as u64,
            &mut self.rng,
        )
        .unwrap();
        let (l, r) = samples(seed, frames);
        w.push(&l, &r).unwrap();
        let sum = w.finish().unwrap();
        let id = sum.file_id.to_hex();
        let mut s = self.store();
        s.insert_recording(&RecordingRow {
            id: id.clone(),
            call_id: call_id.into(),
            tenant: tenant.into(),
            path: sum.path.clone(),
            key_id: key.id().to_string(),
            created_at: created,
        })
        .unwrap();
        s.set_recording_state(
            &id,
            RecordingState::Complete,
            sum.bytes,
            sum.frames * 1000 / 8000,
        )
        .unwrap();
        (id, sum.path)
    }

    fn transcript(&mut self, tenant: &str, call_id: &str, id: &str, text: &str, age_days: i64) {
        let created = self.now - age_days * DAY_MS;
        let key = self.ring().data_key(tenant, &mut self.rng).unwrap();
        let sealed = seal_transcript(&key, text, (created / 1000) as u64, &mut self.rng).unwrap();
        self.store()
            .insert_transcript(&TranscriptRow {
                id: id.into(),
                call_id: call_id.into(),
                tenant: tenant.into(),
                speaker: Speaker::Caller,
                start_ms: 200,
                end_ms: 1500,
                ciphertext: sealed,
                key_id: key.id().to_string(),
                confidence: 0.5,
                created_at: created,
            })
            .unwrap();
    }

    fn audit(&self, action: AuditAction) -> Vec<(String, ObjectKind, String, String)> {
        self.store()
            .audit_log(&AuditFilter {
                action: Some(action),
                ..AuditFilter::default()
            })
            .unwrap()
            .into_iter()
            .map(|a| (a.actor, a.object_kind, a.object_id, a.tenant))
            .collect()
    }
}

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p).unwrap().permissions().mode() & 0o777
}

fn wav_samples(bytes: &[u8]) -> (hound::WavSpec, Vec<i16>) {
    let mut r = hound::WavReader::new(bytes).unwrap();
    let spec = r.spec();
    let s = r.samples::<i16>().map(Result::unwrap).collect();
    (spec, s)
}

fn interleave(seed: i16, frames: usize) -> Vec<i16> {
    let (l, r) = samples(seed, frames);
    l.iter().zip(&r).flat_map(|(a, b)| [*a, *b]).collect()
}

/// Ids in the first column of the table's data rows.
fn listed(table: &str) -> BTreeSet<String> {
    table
        .lines()
        .skip(1)
        .map(|l| l.split_whitespace().next().unwrap().to_owned())
        .collect()
}

#[test]
fn list_filters_by_tenant_and_since_and_never_shows_callers() {
    let mut env = Env::new();
    env.call("acme", "c-old", ALICE, 10);
    env.call("acme", "c-new", ALICE, 1);
    env.call("beta", "c-beta", ALICE, 1);
    let (old, _) = env.recording("acme", "c-old", 10, 1, 8000);
    let (new, _) = env.recording("acme", "c-new", 1, 2, 12_000);
    let (beta, _) = env.recording("beta", "c-beta", 1, 3, 4000);

    let all = env.ok(&["recordings", "list"]);
    let header: Vec<&str> = all.lines().next().unwrap().split_whitespace().collect();
    assert_eq!(
        header,
        [
            "ID", "TENANT", "CALL", "CREATED", "DURATION", "SIZE", "STATE"
        ]
    );
    assert_eq!(
        listed(&all),
        BTreeSet::from([old.clone(), new.clone(), beta.clone()])
    );
    assert!(!all.contains(ALICE), "{all}");
    let row: Vec<&str> = all
        .lines()
        .find(|l| l.starts_with(&new))
        .unwrap()
        .split_whitespace()
        .collect();
    assert_eq!(row[1..3], ["acme", "c-new"]);
    assert_eq!(row[3], format_time(env.now - DAY_MS));
    assert_eq!(row[4], "1.5s");
    assert_eq!(row[6], "complete");

    let acme = env.ok(&["recordings", "list", "--tenant", "beta"]);
    assert_eq!(listed(&acme), BTreeSet::from([beta.clone()]));

    let since = format_time(env.now - 5 * DAY_MS);
    let recent = env.ok(&["recordings", "list", "--since", &since]);
    assert_eq!(listed(&recent), BTreeSet::from([new.clone(), beta]));
    let unix = ((env.now - 5 * DAY_MS) / 1000).to_string();
    let recent_acme = env.ok(&["recordings", "list", "--since", &unix, "--tenant", "acme"]);
    assert_eq!(listed(&recent_acme), BTreeSet::from([new]));

    let bad = env.run(&["recordings", "list", "--since", "last tuesday"]);
    assert_eq!(bad.status.code(), Some(2));
}

#[test]
fn export_decrypts_to_a_private_wav_and_is_audited() {
    let mut env = Env::new();
    env.call("acme", "c1", ALICE, 1);
    let (id, _) = env.recording("acme", "c1", 1, 9, 20_500);
    let out = env.dir.join("out.wav");
    let text = env.ok(&["recordings", "export", &id, "--out", out.to_str().unwrap()]);
    assert!(text.contains("20500 frames"), "{text}");
    assert_eq!(mode(&out), 0o600);
    let (spec, got) = wav_samples(&std::fs::read(&out).unwrap());
    assert_eq!(
        (spec.channels, spec.sample_rate, spec.bits_per_sample),
        (2, 8000, 16)
    );
    assert_eq!(got, interleave(9, 20_500));
    assert_eq!(
        env.audit(AuditAction::RecordingExport),
        [(
            "cli".into(),
            ObjectKind::Recording,
            id.clone(),
            "acme".into()
        )]
    );

    // Never overwrites; unknown ids fail; neither is audited.
    let again = env.run(&["recordings", "export", &id, "--out", out.to_str().unwrap()]);
    assert_eq!(again.status.code(), Some(1));
    let other = env.dir.join("x.wav");
    let unknown = env.run(&[
        "recordings",
        "export",
        "nope",
        "--out",
        other.to_str().unwrap(),
    ]);
    assert_eq!(unknown.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&unknown.stderr).contains("unknown recording"));
    assert!(!other.exists());
    assert_eq!(env.audit(AuditAction::RecordingExport).len(), 1);
}

/// `kind id` of each line starting with `prefix`.
fn items(out: &str, prefix: &str) -> BTreeSet<String> {
    out.lines()
        .filter_map(|l| l.strip_prefix(prefix))
        .map(|l| l.split_whitespace().take(2).collect::<Vec<_>>().join(" "))
        .collect()
}

#[test]
fn retention_dry_run_lists_exactly_what_run_deletes() {
    let mut env = Env::new();
    // acme: 90/90/365 days. beta: defaults from the configuration.
    env.call("acme", "c-400", ALICE, 400);
    env.call("acme", "c-100", ALICE, 100);
    env.call("acme", "c-10", BOB, 10);
    env.call("beta", "b-100", ALICE, 100);
    let (r400, p400) = env.recording("acme", "c-400", 400, 1, 800);
    let (r100, p100) = env.recording("acme", "c-100", 100, 2, 800);
    let (r10, p10) = env.recording("acme", "c-10", 10, 3, 800);
    let (b100, pb100) = env.recording("beta", "b-100", 100, 4, 800);
    env.transcript("acme", "c-100", "c-100/0", "hello", 100);
    env.transcript("acme", "c-10", "c-10/0", "fresh", 10);

    let dry = env.ok(&["retention", "run", "--dry-run"]);
    let expected = BTreeSet::from([
        format!("recording {r400}"),
        format!("recording {r100}"),
        format!("recording {b100}"),
        "transcript c-100/0".to_owned(),
        "call c-400".to_owned(),
    ]);
    assert_eq!(items(&dry, "would delete: "), expected, "{dry}");
    let line = dry
        .lines()
        .find(|l| l.contains(&format!("recording {r100}")))
        .unwrap();
    assert!(line.contains("tenant=acme age=100d"), "{line}");
    assert!(line.ends_with("policy recordings_days=90d"), "{line}");
    assert!(dry.contains("total: would delete 5 item(s)"), "{dry}");
    // Nothing went.
    for p in [&p400, &p100, &p10, &pb100] {
        assert!(p.exists());
    }
    assert_eq!(env.store().list_recordings(None, None).unwrap().len(), 4);
    assert!(env.audit(AuditAction::RetentionDelete).is_empty());

    let run = env.ok(&["retention", "run"]);
    assert_eq!(items(&run, "deleted: "), expected, "{run}");
    for p in [&p400, &p100, &pb100] {
        assert!(!p.exists(), "{}", p.display());
    }
    assert!(p10.exists());
    let s = env.store();
    let left: Vec<String> = s
        .list_recordings(None, None)
        .unwrap()
        .into_iter()
        .map(|r| r.id)
        .collect();
    assert_eq!(left, [r10]);
    assert!(s.get_call("acme", "c-400").unwrap().is_none());
    assert!(s.get_call("acme", "c-100").unwrap().is_some());
    assert!(s.transcripts_of_call("acme", "c-100").unwrap().is_empty());
    assert_eq!(s.transcripts_of_call("acme", "c-10").unwrap().len(), 1);
    let audited: BTreeSet<(ObjectKind, String)> = env
        .audit(AuditAction::RetentionDelete)
        .into_iter()
        .map(|(actor, kind, id, _)| {
            assert_eq!(actor, "retention");
            (kind, id)
        })
        .collect();
    assert_eq!(
        audited,
        BTreeSet::from([
            (ObjectKind::Recording, r400),
            (ObjectKind::Recording, r100),
            (ObjectKind::Recording, b100),
            (ObjectKind::Transcript, "c-100/0".to_owned()),
            (ObjectKind::Call, "c-400".to_owned()),
        ])
    );
    // A second run finds nothing.
    assert!(
        env.ok(&["retention", "run"])
            .contains("total: deleted 0 item(s)")
    );
}

#[test]
fn privacy_erasure_by_caller_touches_only_that_caller_in_that_tenant() {
    let mut env = Env::new();
    env.call("acme", "a1", ALICE, 3);
    env.call("acme", "a2", BOB, 3);
    env.call("beta", "b1", ALICE, 3);
    let (ra1, pa1) = env.recording("acme", "a1", 3, 1, 8000);
    let (_, pa2) = env.recording("acme", "a2", 3, 2, 8000);
    let (_, pb1) = env.recording("beta", "b1", 3, 3, 8000);
    env.transcript("acme", "a1", "a1/0", "my number is secret", 3);
    env.transcript("acme", "a2", "a2/0", "bob speaking", 3);
    env.transcript("beta", "b1", "b1/0", "alice at beta", 3);

    let missing = env.run(&["erase", "--tenant", "acme", "--reason", "x"]);
    assert_eq!(missing.status.code(), Some(2));

    let out = env.ok(&[
        "erase",
        "--tenant",
        "acme",
        "--caller",
        ALICE,
        "--reason",
        "GDPR art. 17 request",
    ]);
    assert_eq!(
        out,
        "erased: 1 call(s), 1 recording(s), 1 transcript segment(s)\n"
    );
    assert!(!pa1.exists());
    assert!(pa2.exists() && pb1.exists());
    let s = env.store();
    let a1 = s.get_call("acme", "a1").unwrap().unwrap();
    assert_eq!(a1.caller, None);
    assert!(a1.erased_at.is_some());
    assert_eq!(
        s.get_recording(None, &ra1).unwrap().unwrap().state,
        RecordingState::Deleted
    );
    assert!(s.transcripts_of_call("acme", "a1").unwrap().is_empty());
    // Bob in acme and Alice in beta are untouched, and beta still decrypts.
    assert_eq!(
        s.get_call("acme", "a2").unwrap().unwrap().caller.as_deref(),
        Some(BOB)
    );
    assert_eq!(s.transcripts_of_call("acme", "a2").unwrap().len(), 1);
    assert_eq!(
        s.get_call("beta", "b1").unwrap().unwrap().caller.as_deref(),
        Some(ALICE)
    );
    assert_eq!(s.transcripts_of_call("beta", "b1").unwrap().len(), 1);
    let (_, beta_audio) = wav_samples(&export_wav(&pb1, &env.ring()).unwrap());
    assert_eq!(beta_audio, interleave(3, 8000));

    let audited: BTreeSet<_> = env.audit(AuditAction::EraseCaller).into_iter().collect();
    assert_eq!(
        audited,
        BTreeSet::from([
            ("cli".into(), ObjectKind::Call, "a1".into(), "acme".into()),
            ("cli".into(), ObjectKind::Recording, ra1, "acme".into()),
            (
                "cli".into(),
                ObjectKind::Transcript,
                "a1/0".into(),
                "acme".into()
            ),
        ])
    );
    let log = env.store().audit_log(&AuditFilter::default()).unwrap();
    assert!(log.iter().all(|a| !a.object_id.contains(ALICE)));
    assert!(
        log.iter()
            .filter(|a| a.action == AuditAction::EraseCaller)
            .all(|a| a.reason == "GDPR art. 17 request")
    );

    // By call id: the other tenant's call id behaves as unknown.
    let cross = env.run(&[
        "erase", "--tenant", "acme", "--call", "b1", "--reason", "test",
    ]);
    assert_eq!(cross.status.code(), Some(1));
    assert!(pb1.exists());
    let by_call = env.ok(&[
        "erase", "--tenant", "acme", "--call", "a2", "--reason", "asked",
    ]);
    assert!(by_call.starts_with("erased: 1 call(s), 1 recording(s)"));
    assert!(!pa2.exists());
    assert_eq!(env.audit(AuditAction::EraseCall).len(), 3);
}

#[test]
fn export_writes_calls_transcripts_and_recordings_for_one_caller() {
    let mut env = Env::new();
    env.call("acme", "a1", ALICE, 3);
    env.call("acme", "a2", ALICE, 2);
    env.call("acme", "a3", BOB, 2);
    env.call("beta", "b1", ALICE, 2);
    let (ra1, _) = env.recording("acme", "a1", 3, 5, 9000);
    env.recording("acme", "a3", 2, 6, 100);
    env.recording("beta", "b1", 2, 7, 100);
    env.transcript("acme", "a2", "a2/0", "héllo, this is Alice", 2);
    env.transcript("beta", "b1", "b1/0", "beta text", 2);

    let dir = env.dir.join("export");
    let out = env.ok(&[
        "export",
        "--tenant",
        "acme",
        "--caller",
        ALICE,
        "--out",
        dir.to_str().unwrap(),
    ]);
    assert!(
        out.starts_with("exported 2 call(s), 1 transcript segment(s), 1 recording(s)"),
        "{out}"
    );
    assert_eq!(mode(&dir), 0o700);
    assert_eq!(mode(&dir.join("recordings")), 0o700);
    let mut names: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    assert_eq!(names, ["calls.json", "recordings", "transcripts.json"]);

    let calls: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("calls.json")).unwrap()).unwrap();
    let ids: Vec<&str> = calls
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["call_id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["a1", "a2"]);
    assert_eq!(calls[0]["caller"], ALICE);
    assert_eq!(calls[0]["cause"], "bye");
    assert_eq!(calls[0]["recordings"], serde_json::json!([ra1]));
    let transcripts: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("transcripts.json")).unwrap()).unwrap();
    assert_eq!(
        transcripts,
        serde_json::json!([{
            "id": "a2/0", "call_id": "a2", "speaker": "caller", "start_ms": 200,
            "end_ms": 1500, "confidence": 0.5, "text": "héllo, this is Alice"
        }])
    );
    let wav = dir.join("recordings").join(format!("{ra1}.wav"));
    assert_eq!(
        std::fs::read_dir(dir.join("recordings")).unwrap().count(),
        1
    );
    for f in [&wav, &dir.join("calls.json"), &dir.join("transcripts.json")] {
        assert_eq!(mode(f), 0o600, "{}", f.display());
    }
    assert_eq!(
        wav_samples(&std::fs::read(&wav).unwrap()).1,
        interleave(5, 9000)
    );

    let audited: BTreeSet<_> = env.audit(AuditAction::DataExport).into_iter().collect();
    assert_eq!(
        audited,
        BTreeSet::from([
            ("cli".into(), ObjectKind::Call, "a1".into(), "acme".into()),
            ("cli".into(), ObjectKind::Call, "a2".into(), "acme".into()),
            (
                "cli".into(),
                ObjectKind::Tenant,
                "acme".into(),
                "acme".into()
            ),
        ])
    );
    // An existing directory is never written into.
    let again = env.run(&[
        "export",
        "--tenant",
        "acme",
        "--caller",
        ALICE,
        "--out",
        dir.to_str().unwrap(),
    ]);
    assert_eq!(again.status.code(), Some(1));
}

#[test]
fn privacy_crypto_shredding_tenant_delete_shreds_the_key_then_files_and_rows() {
    let mut env = Env::new();
    env.call("acme", "a1", ALICE, 3);
    env.call("beta", "b1", ALICE, 3);
    let (ra1, pa1) = env.recording("acme", "a1", 3, 1, 8000);
    let (_, pb1) = env.recording("beta", "b1", 3, 2, 8000);
    env.transcript("acme", "a1", "a1/0", "bye", 3);
    // A copy of the sealed file (a backup) must be useless afterwards.
    let copy = env.dir.join("backup.sbrec");
    std::fs::copy(&pa1, &copy).unwrap();

    let unconfirmed = env.run(&["tenant", "delete", "acme"]);
    assert_eq!(unconfirmed.status.code(), Some(2));
    assert!(pa1.exists());
    assert!(env.ring().load("acme").is_ok());

    let out = env.ok(&["tenant", "delete", "acme", "--yes"]);
    assert_eq!(
        out,
        "tenant acme: data key destroyed\ndeleted 1 calls\ndeleted 1 recordings\n\
         deleted 1 transcript segments\n"
    );
    assert!(!pa1.exists());
    assert!(!env.var.join("recordings").join("acme").exists());
    assert!(!env.var.join("keys").join("acme.key").exists());
    assert!(matches!(
        export_wav(&copy, &env.ring()),
        Err(RecordingError::Crypto(CryptoError::NoKey { .. }))
    ));
    let s = env.store();
    assert!(s.get_call("acme", "a1").unwrap().is_none());
    assert!(s.get_recording(None, &ra1).unwrap().is_none());
    assert!(s.transcripts_of_call("acme", "a1").unwrap().is_empty());
    // beta untouched.
    assert!(s.get_call("beta", "b1").unwrap().is_some());
    assert_eq!(
        wav_samples(&export_wav(&pb1, &env.ring()).unwrap()).1,
        interleave(2, 8000)
    );
    assert_eq!(
        env.audit(AuditAction::KeyDestroyed),
        [(
            "cli".into(),
            ObjectKind::Tenant,
            "acme".into(),
            "acme".into()
        )]
    );
    let erased: BTreeSet<_> = env
        .audit(AuditAction::EraseTenant)
        .into_iter()
        .map(|(_, k, id, _)| (k, id))
        .collect();
    assert_eq!(
        erased,
        BTreeSet::from([
            (ObjectKind::Call, "a1".into()),
            (ObjectKind::Recording, ra1),
            (ObjectKind::Transcript, "a1/0".into()),
            (ObjectKind::Tenant, "acme".into()),
        ])
    );
}

#[test]
fn bad_configuration_exits_2_and_no_database_exits_1() {
    let env = Env::new();
    let out = Command::new(env!("CARGO_BIN_EXE_sipbridge"))
        .args(["recordings", "list", "--config"])
        .arg(env.dir.join("missing.toml"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    if env.engine != StoreEngine::Sqlite {
        return; // no database file to remove
    }
    std::fs::remove_file(env.var.join("sipbridge.db")).unwrap();
    let out = env.run(&["recordings", "list"]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("no database at"), "{err}");
    assert!(!err.contains(&hex_of(&MASTER)));
}

fn hex_of(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

#[test]
fn privacy_data_commands_run_with_every_pipeline_secret_unset() {
    let mut env = Env::new();
    // Tenant beta talks to Deepgram and an agent, the admin API has a token:
    // every one of those secrets is an unset environment variable.
    let text = std::fs::read_to_string(&env.config).unwrap();
    let text = text.replacen(
        "id = \"beta\"\nrecording = false\npipeline = { kind = \"echo\" }",
        "id = \"beta\"\nrecording = false\npipeline = { kind = \"deepgram+agent\", model = \"nova-3\", \
         language = \"en-US\", api_key = \"env:SB_TEST_UNSET_DEEPGRAM_KEY\", \
         url = \"ws://127.0.0.1:9/agent\", auth = \"env:SB_TEST_UNSET_AGENT_TOKEN\" }",
        1,
    );
    let text = text.replacen(
        "[[trunk]]",
        "[profile.admin]\nlisten = \"127.0.0.1:0\"\ntoken = \"env:SB_TEST_UNSET_ADMIN_TOKEN\"\n\n[[trunk]]",
        1,
    );
    assert!(text.contains("SB_TEST_UNSET_DEEPGRAM_KEY"), "{text}");
    std::fs::write(&env.config, text).unwrap();
    env.call("beta", "b1", ALICE, 2);
    env.recording("beta", "b1", 2, 7, 100);

    // The daemon needs them: `check` refuses the configuration.
    let check = env.run(&["check"]);
    assert_eq!(check.status.code(), Some(2));
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&check.stdout),
        String::from_utf8_lossy(&check.stderr)
    );
    assert!(said.contains("SB_TEST_UNSET_DEEPGRAM_KEY"), "{said}");

    let listed = env.ok(&["recordings", "list", "--tenant", "beta"]);
    assert_eq!(listed.lines().count(), 2, "{listed}");
    env.ok(&["retention", "run", "--dry-run"]);
    let dir = env.dir.join("export");
    let out = env.ok(&[
        "export",
        "--tenant",
        "beta",
        "--caller",
        ALICE,
        "--out",
        dir.to_str().unwrap(),
    ]);
    assert!(out.starts_with("exported 1 call(s)"), "{out}");
    let out = env.ok(&[
        "erase", "--tenant", "beta", "--caller", ALICE, "--reason", "asked",
    ]);
    assert!(
        out.starts_with("erased: 1 call(s), 1 recording(s)"),
        "{out}"
    );
    env.ok(&["tenant", "delete", "beta", "--yes"]);
}

/// Issue 16: two nodes, each with its own var_dir and configuration, on one
/// PostgreSQL database with the same master key. What one records the other
/// lists and exports (the data key is in the database); retention and
/// erasure run on the other delete the recording for both. Runs in
/// `tests/cli_store_pg.rs` (SQLite has no second node to ask).
#[test]
fn two_nodes_on_one_database_list_export_retain_and_erase_each_others_recordings() {
    let mut env = Env::new();
    if env.engine == StoreEngine::Sqlite {
        return;
    }
    let var_b = env.dir.join("var-b");
    std::fs::create_dir(&var_b).unwrap();
    std::fs::set_permissions(&var_b, std::fs::Permissions::from_mode(0o700)).unwrap();
    std::fs::write(var_b.join("master.key"), MASTER).unwrap();
    let config_b = env.dir.join("node-b.toml");
    let text = std::fs::read_to_string(&env.config).unwrap();
    let var_a = env.var.display().to_string();
    std::fs::write(
        &config_b,
        text.replace(&var_a, &var_b.display().to_string()),
    )
    .unwrap();
    let dir = env.dir.clone();
    let on_b = |args: &[&str]| -> String {
        let out = Command::new(env!("CARGO_BIN_EXE_sipbridge"))
            .args(args)
            .arg("--config")
            .arg(&config_b)
            .current_dir(&dir)
            .env("SIPBRIDGE_LOG", "warn")
            .output()
            .unwrap();
        assert_eq!(
            out.status.code(),
            Some(0),
            "node b {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };

    env.call("acme", "old", ALICE, 100);
    env.call("acme", "new", BOB, 1);
    let (r_old, p_old) = env.recording("acme", "old", 100, 4, 8000);
    let (r_new, p_new) = env.recording("acme", "new", 1, 5, 8000);
    assert_eq!(
        listed(&on_b(&["recordings", "list"])),
        listed(&env.ok(&["recordings", "list"]))
    );
    assert_eq!(
        listed(&on_b(&["recordings", "list"])),
        BTreeSet::from([r_old.clone(), r_new.clone()])
    );
    let out = env.dir.join("from-b.wav");
    on_b(&[
        "recordings",
        "export",
        &r_new,
        "--out",
        out.to_str().unwrap(),
    ]);
    assert_eq!(
        wav_samples(&std::fs::read(&out).unwrap()).1,
        interleave(5, 8000)
    );

    // Retention on B deletes A's expired recording: file and row.
    let run = on_b(&["retention", "run"]);
    assert!(run.contains(&format!("recording {r_old}")), "{run}");
    assert!(!p_old.exists());
    assert_eq!(
        env.store()
            .get_recording(None, &r_old)
            .unwrap()
            .unwrap()
            .state,
        RecordingState::Deleted
    );
    // Erasure on B deletes the other one.
    on_b(&[
        "erase", "--tenant", "acme", "--caller", BOB, "--reason", "request",
    ]);
    assert!(!p_new.exists());
    assert!(env.store().list_recordings(None, None).unwrap().is_empty());
    assert!(listed(&env.ok(&["recordings", "list"])).is_empty());
    assert_eq!(env.audit(AuditAction::EraseCaller).len(), 2);
}
