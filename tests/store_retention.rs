#![allow(clippy::unwrap_used, clippy::expect_used)]
//! Retention in virtual time: a store filled on day 0, swept on chosen days
//! with a real file deleter over a temp directory.

use std::cell::RefCell;
use std::collections::BTreeSet;
use std::io;
use std::path::{Path, PathBuf};

use sipbridge::store::db::{
    AuditAction, AuditFilter, CallEnd, CallRow, CallerIdPolicy, HoldTarget, ObjectKind,
    RecordingRow, RecordingState, RtpStats, Speaker, Store, StoredHangupSide, TranscriptRow,
};
use sipbridge::store::retention::{DAY_MS, ItemKind, RetentionPolicy, Sweeper};

/// Day 0, 10:00 UTC (2025-10-09); items are created then.
const DAY0: i64 = 1_759_968_000_000 + 10 * 3_600_000;

/// 09:00 on day `n`: one hour before items of day 0 reach `n` whole days.
fn morning_of(n: i64) -> i64 {
    DAY0 + n * DAY_MS - 3_600_000
}

fn policy(tenant: &str) -> Option<RetentionPolicy> {
    match tenant {
        "acme" => Some(RetentionPolicy::default()),
        "brisk" => Some(RetentionPolicy {
            recordings_days: 30,
            transcripts_days: 30,
            metadata_days: 365,
            audit_days: 400,
        }),
        _ => None,
    }
}

/// The engine the tests run on. Here SQLite; `tests/store_db_pg.rs` includes
/// this file as a module with its own `open_backend` (PostgreSQL).
#[allow(dead_code)]
fn open_backend(dir: &Path) -> Store {
    Store::open(&dir.join("meta.db")).unwrap()
}

struct Fixture {
    _dir: tempfile::TempDir,
    rec_dir: PathBuf,
    store: Store,
}

impl Fixture {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let rec_dir = dir.path().join("recordings");
        std::fs::create_dir(&rec_dir).unwrap();
        let mut store = crate::open_backend(dir.path());
        for t in ["acme", "brisk", "ghost"] {
            store.set_caller_policy(t, CallerIdPolicy::Plain);
        }
        Self {
            _dir: dir,
            rec_dir,
            store,
        }
    }

    /// A finished call at day 0 with one recording file and `transcripts` segments.
    fn call(&mut self, tenant: &str, id: &str, transcripts: usize) {
        let s = &mut self.store;
        s.insert_call(&CallRow {
            call_id: id.into(),
            tenant: tenant.into(),
            trunk: "t".into(),
            from: "+15551234".into(),
            to: "+15550000".into(),
            started_at: DAY0,
        })
        .unwrap();
        let path = self.rec_dir.join(format!("{id}-r.sealed"));
        std::fs::write(&path, b"sealed bytes").unwrap();
        s.insert_recording(&RecordingRow {
            id: format!("{id}-r"),
            call_id: id.into(),
            tenant: tenant.into(),
            path,
            key_id: "k".into(),
            created_at: DAY0,
        })
        .unwrap();
        s.set_recording_state(&format!("{id}-r"), RecordingState::Complete, 12, 1000)
            .unwrap();
        for n in 0..transcripts {
            s.insert_transcript(&TranscriptRow {
                id: format!("{id}/{n}"),
                call_id: id.into(),
                tenant: tenant.into(),
                speaker: Speaker::Caller,
                start_ms: 0,
                end_ms: 10,
                ciphertext: vec![1, 2, 3],
                key_id: "k".into(),
                confidence: 0.5,
                created_at: DAY0,
            })
            .unwrap();
        }
        s.finish_call(
            tenant,
            id,
            &CallEnd {
                answered_at: Some(DAY0 + 1000),
                ended_at: DAY0 + 60_000,
                result_code: 200,
                hangup_side: StoredHangupSide::Local,
                cause: "agent-hangup".into(),
                codec: Some("PCMA/8000".into()),
                rtp: RtpStats {
                    packets: 3000,
                    lost: 0,
                    jitter_ms: 1.0,
                },
            },
        )
        .unwrap();
    }

    fn file(&self, call: &str) -> PathBuf {
        self.rec_dir.join(format!("{call}-r.sealed"))
    }

    fn files(&self) -> BTreeSet<String> {
        std::fs::read_dir(&self.rec_dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect()
    }
}

/// The standard scene: acme (90/90/365) with a held call, brisk (30/30/365).
fn scene() -> Fixture {
    let mut f = Fixture::new();
    f.call("acme", "a1", 2);
    f.call("acme", "a2", 0);
    f.call("acme", "held", 1);
    f.call("brisk", "b1", 1);
    f.store
        .set_legal_hold(
            "acme",
            HoldTarget::Call,
            "held",
            true,
            "legal",
            "case 77",
            DAY0,
        )
        .unwrap();
    f
}

fn names(list: &[sipbridge::store::retention::Expiry]) -> Vec<(ItemKind, &str)> {
    list.iter()
        .map(|e| (e.item.kind, e.item.id.as_str()))
        .collect()
}

fn remove(path: &Path) -> io::Result<()> {
    std::fs::remove_file(path)
}

/// Dry run, check nothing moved, then the real sweep; returns what was deleted
/// and asserts the dry run listed exactly that.
fn sweep(f: &mut Fixture, now: i64) -> Vec<(ItemKind, String)> {
    let sweeper = Sweeper::new(&policy, &remove);
    let files_before = f.files();
    let items_before = f.store.retention_items().unwrap();
    let audit_before = f.store.audit_log(&AuditFilter::default()).unwrap().len();
    let dry = sweeper.dry_run(&f.store, now).unwrap();
    assert_eq!(f.files(), files_before, "dry run deleted a file");
    assert_eq!(
        f.store.retention_items().unwrap(),
        items_before,
        "dry run deleted a row"
    );
    assert_eq!(
        f.store.audit_log(&AuditFilter::default()).unwrap().len(),
        audit_before
    );

    let report = sweeper.run(&mut f.store, now).unwrap();
    assert_eq!(report.deleted, dry.expired, "dry run and run disagree");
    assert!(report.failed.is_empty() && report.skipped.is_empty());
    assert_eq!(report.held, dry.held);

    // Each deletion has its audit row carrying the rule.
    let log = f
        .store
        .audit_log(&AuditFilter {
            action: Some(AuditAction::RetentionDelete),
            since: Some(now),
            ..AuditFilter::default()
        })
        .unwrap();
    for e in &report.deleted {
        let kind = match e.item.kind {
            ItemKind::Recording => ObjectKind::Recording,
            ItemKind::Transcript => ObjectKind::Transcript,
            ItemKind::Call => ObjectKind::Call,
        };
        let row = log
            .iter()
            .find(|a| a.object_kind == kind && a.object_id == e.item.id)
            .unwrap_or_else(|| panic!("no audit row for {:?}", e.item));
        assert_eq!(row.actor, "retention");
        assert_eq!(row.tenant, e.item.tenant);
        assert_eq!(row.reason, e.reason.to_string());
        assert_eq!(row.at, now);
    }
    names(&report.deleted)
        .into_iter()
        .map(|(k, id)| (k, id.to_owned()))
        .collect()
}

fn owned(v: &[(ItemKind, &str)]) -> Vec<(ItemKind, String)> {
    v.iter().map(|(k, s)| (*k, (*s).to_owned())).collect()
}

#[test]
fn privacy_retention_on_time_sweeps_exactly_the_expected_set_each_day() {
    let mut f = scene();
    let all_files: BTreeSet<String> =
        ["a1-r.sealed", "a2-r.sealed", "held-r.sealed", "b1-r.sealed"]
            .map(String::from)
            .into();
    assert_eq!(f.files(), all_files);

    assert!(sweep(&mut f, morning_of(30)).is_empty());
    assert_eq!(
        sweep(&mut f, morning_of(31)),
        owned(&[
            (ItemKind::Recording, "b1-r"),
            (ItemKind::Transcript, "b1/0")
        ])
    );
    assert!(!f.file("b1").exists());
    assert!(sweep(&mut f, morning_of(90)).is_empty());
    assert_eq!(f.files().len(), 3);

    assert_eq!(
        sweep(&mut f, morning_of(91)),
        owned(&[
            (ItemKind::Recording, "a1-r"),
            (ItemKind::Recording, "a2-r"),
            (ItemKind::Transcript, "a1/0"),
            (ItemKind::Transcript, "a1/1"),
        ])
    );
    assert_eq!(f.files(), BTreeSet::from(["held-r.sealed".to_owned()]));
    assert_eq!(
        f.store
            .get_recording(Some("acme"), "a1-r")
            .unwrap()
            .unwrap()
            .state,
        RecordingState::Deleted
    );
    assert!(
        f.store
            .transcripts_of_call("acme", "a1")
            .unwrap()
            .is_empty()
    );
    assert!(
        f.store.get_call("acme", "a1").unwrap().is_some(),
        "CDRs stay until 365 days"
    );
    assert_eq!(
        f.store.transcripts_of_call("acme", "held").unwrap().len(),
        1
    );

    assert!(sweep(&mut f, morning_of(365)).is_empty());
    assert_eq!(
        sweep(&mut f, morning_of(366)),
        owned(&[
            (ItemKind::Call, "a1"),
            (ItemKind::Call, "a2"),
            (ItemKind::Call, "b1")
        ])
    );
    for (t, c) in [("acme", "a1"), ("acme", "a2"), ("brisk", "b1")] {
        assert!(f.store.get_call(t, c).unwrap().is_none());
        assert!(f.store.recordings_of_call(t, c).unwrap().is_empty());
    }
    // The held call keeps everything, and is reported as held.
    assert!(f.store.get_call("acme", "held").unwrap().is_some());
    assert_eq!(f.files(), BTreeSet::from(["held-r.sealed".to_owned()]));
    let sel = Sweeper::new(&policy, &remove)
        .dry_run(&f.store, morning_of(1000))
        .unwrap();
    assert!(sel.expired.is_empty());
    assert_eq!(
        names(&sel.held),
        [
            (ItemKind::Recording, "held-r"),
            (ItemKind::Transcript, "held/0"),
            (ItemKind::Call, "held")
        ]
    );

    // Releasing the hold lets the next sweep take it all.
    f.store
        .set_legal_hold(
            "acme",
            HoldTarget::Call,
            "held",
            false,
            "legal",
            "case closed",
            morning_of(1000),
        )
        .unwrap();
    assert_eq!(
        sweep(&mut f, morning_of(1001)),
        owned(&[
            (ItemKind::Recording, "held-r"),
            (ItemKind::Transcript, "held/0"),
            (ItemKind::Call, "held")
        ])
    );
    assert!(f.files().is_empty());
}

#[test]
fn a_tenant_without_policy_keeps_everything_and_is_reported() {
    let mut f = Fixture::new();
    f.call("ghost", "g1", 1);
    let report = Sweeper::new(&policy, &remove)
        .run(&mut f.store, morning_of(5000))
        .unwrap();
    assert!(report.deleted.is_empty());
    assert_eq!(report.unknown_tenants.get("ghost"), Some(&3));
    assert!(f.file("g1").exists());
    assert!(f.store.get_call("ghost", "g1").unwrap().is_some());
}

#[test]
fn a_failed_file_deletion_keeps_the_row_for_the_next_sweep() {
    let mut f = Fixture::new();
    f.call("acme", "a1", 0);
    let attempts = RefCell::new(Vec::new());
    let failing = |p: &Path| -> io::Result<()> {
        attempts.borrow_mut().push(p.to_path_buf());
        Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            "read-only fs",
        ))
    };
    let report = Sweeper::new(&policy, &failing)
        .run(&mut f.store, morning_of(91))
        .unwrap();
    assert!(report.deleted.is_empty());
    assert_eq!(
        names(
            &report
                .failed
                .iter()
                .map(|(e, _)| e.clone())
                .collect::<Vec<_>>()
        ),
        [(ItemKind::Recording, "a1-r")]
    );
    assert_eq!(report.failed[0].1.kind(), io::ErrorKind::PermissionDenied);
    assert_eq!(*attempts.borrow(), [f.file("a1")]);
    assert_eq!(
        f.store.get_recording(None, "a1-r").unwrap().unwrap().state,
        RecordingState::Complete
    );
    assert!(
        f.store
            .audit_log(&AuditFilter {
                action: Some(AuditAction::RetentionDelete),
                ..Default::default()
            })
            .unwrap()
            .is_empty()
    );
    // A file already gone counts as deleted.
    std::fs::remove_file(f.file("a1")).unwrap();
    assert_eq!(
        sweep(&mut f, morning_of(92)),
        owned(&[(ItemKind::Recording, "a1-r")])
    );
}

#[test]
fn expiring_a_cdr_removes_leftover_files_of_its_recordings() {
    // An erasure marked the recording deleted but the process died before
    // removing the file: the CDR's expiry removes the file at the latest.
    let mut f = Fixture::new();
    f.call("acme", "a1", 0);
    f.store
        .erase_call("acme", "a1", "ops", "request", DAY0 + 1)
        .unwrap();
    assert!(f.file("a1").exists());
    assert!(sweep(&mut f, morning_of(91)).is_empty());
    assert_eq!(
        sweep(&mut f, morning_of(366)),
        owned(&[(ItemKind::Call, "a1")])
    );
    assert!(!f.file("a1").exists());
}

#[test]
fn privacy_audit_rows_have_their_own_retention() {
    let mut f = Fixture::new();
    let entry =
        |at: i64, tenant: &'static str, id: &'static str| sipbridge::store::db::AuditEntry {
            at,
            actor: "ops",
            action: AuditAction::RecordingExport,
            object_kind: ObjectKind::Recording,
            object_id: id,
            tenant,
            reason: "asked",
        };
    for (at, tenant, id) in [
        (DAY0, "acme", "old"),
        (DAY0 + 300 * DAY_MS, "acme", "recent"),
        (DAY0, "ghost", "unconfigured"),
    ] {
        f.store.audit(&entry(at, tenant, id)).unwrap();
    }
    let audit_ids = |s: &Store| -> BTreeSet<String> {
        s.audit_log(&AuditFilter {
            action: Some(AuditAction::RecordingExport),
            ..AuditFilter::default()
        })
        .unwrap()
        .into_iter()
        .map(|a| a.object_id)
        .collect()
    };
    // One hour before 400 days: all kept.
    let report = Sweeper::new(&policy, &remove)
        .run(&mut f.store, morning_of(400))
        .unwrap();
    assert!(report.audit_pruned.is_empty());
    assert_eq!(audit_ids(&f.store).len(), 3);
    // A day later the 400-day-old row of acme goes; the tenant without a
    // policy keeps its rows.
    let report = Sweeper::new(&policy, &remove)
        .run(&mut f.store, morning_of(401))
        .unwrap();
    assert_eq!(report.audit_pruned.get("acme"), Some(&1));
    assert_eq!(
        audit_ids(&f.store),
        BTreeSet::from(["recent".to_owned(), "unconfigured".to_owned()])
    );
}
