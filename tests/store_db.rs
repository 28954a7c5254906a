#![allow(clippy::unwrap_used, clippy::expect_used)]
//! The metadata store against a real SQLite file: migrations, tenant-scoped
//! erasure, hashed caller ids, the append-only audit log, crash recovery.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use sipbridge::store::db::schema::{CURRENT_VERSION, MIGRATIONS};
use sipbridge::store::db::{
    AuditAction, AuditFilter, CRASH_RECOVERED_CAUSE, CallEnd, CallRow, CallerIdPolicy,
    ConsentEvent, DbError, ErasedRecording, HoldTarget, ObjectKind, RecordingRow, RecordingState,
    RtpStats, Speaker, Store, StoredHangupSide, TranscriptRow,
};

const T0: i64 = 1_760_000_000_000;

/// The engine the tests below run on. Here SQLite; `tests/store_db_pg.rs`
/// includes this file as a module and its own `open_backend` and
/// `ENGINE_IS_SQLITE` (reached through `crate::`) run the same tests on
/// PostgreSQL.
#[allow(dead_code)]
fn open_backend(dir: &Path) -> Store {
    Store::open(&dir.join("meta.db")).unwrap()
}

/// Whether `crate::open_backend` opens SQLite (tests of the database file itself).
#[allow(dead_code)]
const ENGINE_IS_SQLITE: bool = true;

fn open(dir: &Path) -> Store {
    let mut s = crate::open_backend(dir);
    s.set_caller_policy("acme", CallerIdPolicy::Plain);
    s.set_caller_policy("beta", CallerIdPolicy::Plain);
    s.set_caller_policy(
        "hush",
        CallerIdPolicy::Hashed {
            key: b"tenant-hush-caller-key".to_vec(),
        },
    );
    s
}

fn call(tenant: &str, id: &str, from: &str, at: i64) -> CallRow {
    CallRow {
        call_id: id.into(),
        tenant: tenant.into(),
        trunk: "trunk1".into(),
        from: from.into(),
        to: "+4930555".into(),
        started_at: at,
    }
}

fn rec(tenant: &str, call_id: &str, id: &str, at: i64) -> RecordingRow {
    RecordingRow {
        id: id.into(),
        call_id: call_id.into(),
        tenant: tenant.into(),
        path: PathBuf::from(format!("/var/rec/{tenant}/{id}.sealed")),
        key_id: format!("{tenant}-k1"),
        created_at: at,
    }
}

fn transcript(tenant: &str, call_id: &str, id: &str, at: i64) -> TranscriptRow {
    TranscriptRow {
        id: id.into(),
        call_id: call_id.into(),
        tenant: tenant.into(),
        speaker: Speaker::Caller,
        start_ms: 100,
        end_ms: 900,
        ciphertext: vec![0xde, 0xad, 0xbe, 0xef, 0x00, 0xff],
        key_id: format!("{tenant}-k1"),
        confidence: 0.875,
        created_at: at,
    }
}

fn end(at: i64) -> CallEnd {
    CallEnd {
        answered_at: Some(at - 50_000),
        ended_at: at,
        result_code: 200,
        hangup_side: StoredHangupSide::Remote,
        cause: "bye".into(),
        codec: Some("PCMU/8000".into()),
        rtp: RtpStats {
            packets: 2500,
            lost: 3,
            jitter_ms: 4.25,
        },
    }
}

/// A call with one complete recording and two transcript segments.
fn full_call(s: &mut Store, tenant: &str, id: &str, from: &str) {
    s.insert_call(&call(tenant, id, from, T0)).unwrap();
    s.insert_recording(&rec(tenant, id, &format!("{id}-r"), T0))
        .unwrap();
    s.set_recording_state(&format!("{id}-r"), RecordingState::Complete, 4096, 60_000)
        .unwrap();
    s.insert_transcript(&transcript(tenant, id, &format!("{id}/0"), T0))
        .unwrap();
    s.insert_transcript(&transcript(tenant, id, &format!("{id}/1"), T0))
        .unwrap();
    s.finish_call(tenant, id, &end(T0 + 60_000)).unwrap();
}

fn audit_ids(s: &Store, tenant: &str, action: AuditAction) -> Vec<(ObjectKind, String)> {
    s.audit_log(&AuditFilter {
        tenant: Some(tenant.into()),
        action: Some(action),
        ..AuditFilter::default()
    })
    .unwrap()
    .into_iter()
    .map(|a| (a.object_kind, a.object_id))
    .collect()
}

#[test]
fn opens_in_wal_with_foreign_keys_private_file_and_current_schema() {
    if !crate::ENGINE_IS_SQLITE {
        return; // reads the SQLite file; store_db_pg.rs checks PostgreSQL's rows
    }
    let dir = tempfile::tempdir().unwrap();
    let mut s = open(dir.path());
    assert_eq!(s.journal_mode().unwrap(), "wal");
    assert!(s.foreign_keys().unwrap());
    assert_eq!(s.schema_version().unwrap(), CURRENT_VERSION);
    assert_eq!(CURRENT_VERSION, 8);
    s.insert_call(&call("acme", "c1", "+1", T0)).unwrap();
    let mode = std::fs::metadata(dir.path().join("meta.db"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    let wal = std::fs::metadata(dir.path().join("meta.db-wal")).unwrap();
    assert_eq!(
        wal.permissions().mode() & 0o077,
        0,
        "WAL file must be private"
    );
}

#[test]
fn migrates_a_version_1_database_and_keeps_its_rows() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("meta.db");
    {
        let conn = rusqlite::Connection::open(&path).unwrap();
        conn.execute_batch(MIGRATIONS[0]).unwrap();
        conn.pragma_update(None, "user_version", 1).unwrap();
        conn.execute(
            "INSERT INTO calls (call_id, tenant, trunk, caller, callee, started_at) \
             VALUES ('old', 'acme', 'tr', '+111', '+222', 5)",
            [],
        )
        .unwrap();
        let has_transcripts: i64 = conn
            .query_row(
                "SELECT count(*) FROM sqlite_master WHERE name = 'transcripts'",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(has_transcripts, 0);
    }
    let mut s = Store::open(&path).unwrap();
    s.set_caller_policy("acme", CallerIdPolicy::Plain);
    assert_eq!(s.schema_version().unwrap(), 8);
    let old = s.get_call("acme", "old").unwrap().unwrap();
    assert_eq!(old.caller.as_deref(), Some("+111"));
    assert_eq!(old.started_at, 5);
    // v7: rows from before outbound calls are inbound.
    assert_eq!(old.direction, "inbound");
    s.insert_transcript(&transcript("acme", "old", "old/0", 7))
        .unwrap();
    assert_eq!(s.transcripts_of_call("acme", "old").unwrap().len(), 1);
    drop(s);
    // Re-opening at the current version applies nothing and loses nothing.
    let s = Store::open(&path).unwrap();
    assert_eq!(s.schema_version().unwrap(), 8);
    assert_eq!(s.transcripts_of_call("acme", "old").unwrap().len(), 1);
}

#[test]
fn refuses_a_database_from_a_newer_build() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("meta.db");
    rusqlite::Connection::open(&path)
        .unwrap()
        .pragma_update(None, "user_version", 99)
        .unwrap();
    match Store::open(&path) {
        Err(DbError::SchemaTooNew { found, supported }) => {
            assert_eq!((found, supported), (99, CURRENT_VERSION));
        }
        other => panic!("expected SchemaTooNew, got {other:?}"),
    }
}

#[test]
fn cdr_records_end_rtp_and_consent() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = open(dir.path());
    s.insert_call(&call("acme", "c1", "+4917000", T0)).unwrap();
    s.record_consent("acme", "c1", ConsentEvent::DisclosureStarted, T0 + 100)
        .unwrap();
    s.record_consent("acme", "c1", ConsentEvent::DisclosureFinished, T0 + 4100)
        .unwrap();
    s.record_consent("acme", "c1", ConsentEvent::OptOut, T0 + 2500)
        .unwrap();
    s.finish_call("acme", "c1", &end(T0 + 60_000)).unwrap();
    let c = s.get_call("acme", "c1").unwrap().unwrap();
    assert_eq!(c.caller.as_deref(), Some("+4917000"));
    assert_eq!(c.to, "+4930555");
    assert_eq!(c.answered_at, Some(T0 + 10_000));
    assert_eq!(c.ended_at, Some(T0 + 60_000));
    assert_eq!(c.result_code, Some(200));
    assert_eq!(c.hangup_side, Some(StoredHangupSide::Remote));
    assert_eq!(c.cause.as_deref(), Some("bye"));
    assert_eq!(c.codec.as_deref(), Some("PCMU/8000"));
    assert_eq!(
        c.rtp,
        Some(RtpStats {
            packets: 2500,
            lost: 3,
            jitter_ms: 4.25
        })
    );
    assert_eq!(c.consent.disclosure_started_at, Some(T0 + 100));
    assert_eq!(c.consent.disclosure_finished_at, Some(T0 + 4100));
    assert_eq!(c.consent.opt_out_at, Some(T0 + 2500));
    // The opt-out is audited.
    let log = s
        .audit_log(&AuditFilter {
            action: Some(AuditAction::ConsentOptOut),
            ..AuditFilter::default()
        })
        .unwrap();
    assert_eq!(log.len(), 1);
    assert_eq!(
        (log[0].at, log[0].actor.as_str(), log[0].object_id.as_str()),
        (T0 + 2500, "caller", "c1")
    );

    assert!(matches!(
        s.finish_call("acme", "c1", &end(T0 + 70_000)),
        Err(DbError::CallAlreadyEnded(id)) if id == "c1"
    ));
    // Another tenant cannot see or touch it.
    assert!(s.get_call("beta", "c1").unwrap().is_none());
    assert!(matches!(
        s.finish_call("beta", "c1", &end(T0)),
        Err(DbError::TenantMismatch { .. })
    ));
    assert!(matches!(
        s.record_consent("beta", "c1", ConsentEvent::OptOut, T0),
        Err(DbError::UnknownCall { .. })
    ));
}

#[test]
fn a_tenant_without_caller_policy_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = open(dir.path());
    assert!(matches!(
        s.insert_call(&call("nobody", "c1", "+1", T0)),
        Err(DbError::NoCallerPolicy(t)) if t == "nobody"
    ));
}

#[test]
fn rows_must_belong_to_their_calls_tenant() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = open(dir.path());
    s.insert_call(&call("acme", "c1", "+1", T0)).unwrap();
    assert!(matches!(
        s.insert_recording(&rec("beta", "c1", "r", T0)),
        Err(DbError::TenantMismatch { .. })
    ));
    assert!(matches!(
        s.insert_transcript(&transcript("beta", "c1", "t", T0)),
        Err(DbError::TenantMismatch { .. })
    ));
    assert!(matches!(
        s.insert_transcript(&transcript("acme", "nope", "t", T0)),
        Err(DbError::UnknownCall { .. })
    ));
}

#[test]
fn transcripts_keep_ciphertext_bytes_and_fields() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = open(dir.path());
    s.insert_call(&call("acme", "c1", "+1", T0)).unwrap();
    let mut late = transcript("acme", "c1", "c1/1", T0);
    late.start_ms = 2000;
    late.end_ms = 3000;
    late.speaker = Speaker::Agent;
    s.insert_transcript(&late).unwrap();
    s.insert_transcript(&transcript("acme", "c1", "c1/0", T0))
        .unwrap();
    let got = s.transcripts_of_call("acme", "c1").unwrap();
    assert_eq!(got, vec![transcript("acme", "c1", "c1/0", T0), late]);
    assert!(s.transcripts_of_call("beta", "c1").unwrap().is_empty());
}

#[test]
fn recording_lifecycle_and_listing() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = open(dir.path());
    s.insert_call(&call("acme", "c1", "+1", T0)).unwrap();
    s.insert_call(&call("beta", "c2", "+1", T0)).unwrap();
    s.insert_recording(&rec("acme", "c1", "a-old", T0)).unwrap();
    s.insert_recording(&rec("acme", "c1", "a-new", T0 + 1000))
        .unwrap();
    s.insert_recording(&rec("beta", "c2", "b", T0 + 500))
        .unwrap();
    s.set_recording_state("a-old", RecordingState::Complete, 321, 1234)
        .unwrap();

    let r = s.get_recording(Some("acme"), "a-old").unwrap().unwrap();
    assert_eq!(
        (r.state, r.size_bytes, r.duration_ms),
        (RecordingState::Complete, 321, 1234)
    );
    assert_eq!(r.path, PathBuf::from("/var/rec/acme/a-old.sealed"));
    assert!(s.get_recording(Some("beta"), "a-old").unwrap().is_none());

    // complete -> partial is not a lifecycle step.
    assert!(matches!(
        s.set_recording_state("a-old", RecordingState::Partial, 0, 0),
        Err(DbError::InvalidTransition {
            from: RecordingState::Complete,
            to: RecordingState::Partial,
            ..
        })
    ));
    assert!(matches!(
        s.set_recording_state("a-new", RecordingState::Deleted, 0, 0),
        Err(DbError::InvalidTransition { .. })
    ));

    let ids = |v: Vec<sipbridge::store::db::RecordingRecord>| {
        v.into_iter().map(|r| r.id).collect::<Vec<_>>()
    };
    assert_eq!(
        ids(s.list_recordings(None, None).unwrap()),
        ["a-old", "b", "a-new"]
    );
    assert_eq!(
        ids(s.list_recordings(Some("acme"), None).unwrap()),
        ["a-old", "a-new"]
    );
    assert_eq!(
        ids(s.list_recordings(None, Some(T0 + 500)).unwrap()),
        ["b", "a-new"]
    );

    // Deleting (opt-out) is audited and hides it from the listing.
    let path = s
        .delete_recording("acme", "a-old", "caller", "opt-out", T0 + 9)
        .unwrap();
    assert_eq!(path, PathBuf::from("/var/rec/acme/a-old.sealed"));
    assert_eq!(
        ids(s.list_recordings(Some("acme"), None).unwrap()),
        ["a-new"]
    );
    assert_eq!(
        audit_ids(&s, "acme", AuditAction::RecordingDelete),
        [(ObjectKind::Recording, "a-old".to_owned())]
    );
    assert!(matches!(
        s.delete_recording("beta", "a-new", "x", "y", T0),
        Err(DbError::UnknownRecording(_))
    ));
}

#[test]
fn erase_by_caller_covers_that_caller_in_that_tenant_only() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = open(dir.path());
    let victim = "+4915112345678";
    full_call(&mut s, "acme", "a1", victim);
    full_call(&mut s, "acme", "a2", victim);
    full_call(&mut s, "acme", "a3", "+49301111");
    full_call(&mut s, "beta", "b1", victim);
    let before_b1 = s.get_call("beta", "b1").unwrap().unwrap();

    let out = s
        .erase_caller(
            "acme",
            victim,
            "dpo@acme",
            "GDPR art. 17 request 42",
            T0 + 1,
        )
        .unwrap();
    assert_eq!(out.calls, ["a1", "a2"]);
    assert_eq!(out.transcripts, ["a1/0", "a1/1", "a2/0", "a2/1"]);
    assert_eq!(
        out.recordings,
        [
            ErasedRecording {
                id: "a1-r".into(),
                path: "/var/rec/acme/a1-r.sealed".into()
            },
            ErasedRecording {
                id: "a2-r".into(),
                path: "/var/rec/acme/a2-r.sealed".into()
            },
        ]
    );
    assert!(out.held.is_empty());

    // The caller is gone from acme ...
    assert!(s.calls_by_caller("acme", victim).unwrap().is_empty());
    let a1 = s.get_call("acme", "a1").unwrap().unwrap();
    assert_eq!((a1.caller, a1.erased_at), (None, Some(T0 + 1)));
    assert_eq!(a1.ended_at, Some(T0 + 60_000), "non-PII CDR fields stay");
    assert!(s.transcripts_of_call("acme", "a1").unwrap().is_empty());
    assert_eq!(
        s.get_recording(Some("acme"), "a1-r")
            .unwrap()
            .unwrap()
            .state,
        RecordingState::Deleted
    );
    // ... another acme caller is untouched ...
    assert_eq!(s.transcripts_of_call("acme", "a3").unwrap().len(), 2);
    assert_eq!(
        s.get_recording(None, "a3-r").unwrap().unwrap().state,
        RecordingState::Complete
    );
    // ... and beta's identical number is untouched.
    assert_eq!(s.get_call("beta", "b1").unwrap().unwrap(), before_b1);
    assert_eq!(s.calls_by_caller("beta", victim).unwrap().len(), 1);
    assert_eq!(s.transcripts_of_call("beta", "b1").unwrap().len(), 2);
    assert_eq!(
        s.get_recording(None, "b1-r").unwrap().unwrap().state,
        RecordingState::Complete
    );

    // Every erased object is audited, with who and why, never the number.
    let log = s
        .audit_log(&AuditFilter {
            action: Some(AuditAction::EraseCaller),
            ..AuditFilter::default()
        })
        .unwrap();
    let mut objects: Vec<_> = log
        .iter()
        .map(|a| (a.object_kind, a.object_id.as_str()))
        .collect();
    objects.sort();
    assert_eq!(
        objects,
        [
            (ObjectKind::Call, "a1"),
            (ObjectKind::Call, "a2"),
            (ObjectKind::Recording, "a1-r"),
            (ObjectKind::Recording, "a2-r"),
            (ObjectKind::Transcript, "a1/0"),
            (ObjectKind::Transcript, "a1/1"),
            (ObjectKind::Transcript, "a2/0"),
            (ObjectKind::Transcript, "a2/1"),
        ]
    );
    for a in &log {
        assert_eq!(
            (a.tenant.as_str(), a.actor.as_str(), a.reason.as_str(), a.at),
            ("acme", "dpo@acme", "GDPR art. 17 request 42", T0 + 1)
        );
        assert!(!a.object_id.contains(victim));
    }
}

#[test]
fn hashed_caller_ids_are_not_plain_but_found_and_erased_by_number() {
    if !crate::ENGINE_IS_SQLITE {
        return; // reads the SQLite file; store_db_pg.rs checks PostgreSQL's rows
    }
    let dir = tempfile::tempdir().unwrap();
    let mut s = open(dir.path());
    let number = "+4917099887766";
    full_call(&mut s, "hush", "h1", number);
    full_call(&mut s, "hush", "h2", "+4917000000000");
    full_call(&mut s, "acme", "p1", number);

    let stored = s.get_call("hush", "h1").unwrap().unwrap().caller.unwrap();
    assert!(stored.starts_with("hmac-sha256:"), "{stored}");
    assert_eq!(stored.len(), "hmac-sha256:".len() + 64);
    assert!(!stored.contains("17099887766"));
    // The raw database file holds no trace of the number for this tenant.
    let raw = rusqlite::Connection::open(dir.path().join("meta.db")).unwrap();
    let plain_rows: i64 = raw
        .query_row(
            "SELECT count(*) FROM calls WHERE tenant = 'hush' AND caller LIKE '%17099887766%'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(plain_rows, 0);

    // Export by number finds exactly that caller's calls.
    let found = s.calls_by_caller("hush", number).unwrap();
    assert_eq!(
        found.iter().map(|c| c.call_id.as_str()).collect::<Vec<_>>(),
        ["h1"]
    );
    assert_eq!(s.transcripts_of_call("hush", "h1").unwrap().len(), 2);

    let out = s
        .erase_caller("hush", number, "ops", "request 7", T0 + 5)
        .unwrap();
    assert_eq!(out.calls, ["h1"]);
    assert!(s.calls_by_caller("hush", number).unwrap().is_empty());
    assert_eq!(
        s.calls_by_caller("hush", "+4917000000000").unwrap().len(),
        1
    );
    assert_eq!(s.calls_by_caller("acme", number).unwrap().len(), 1);
}

#[test]
fn a_tenant_switching_to_hashing_still_finds_its_older_plain_rows() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = open(dir.path());
    s.insert_call(&call("acme", "before", "+15550001", T0))
        .unwrap();
    s.set_caller_policy("acme", CallerIdPolicy::Hashed { key: b"k".to_vec() });
    s.insert_call(&call("acme", "after", "+15550001", T0 + 1))
        .unwrap();
    let ids: Vec<_> = s
        .calls_by_caller("acme", "+15550001")
        .unwrap()
        .into_iter()
        .map(|c| c.call_id)
        .collect();
    assert_eq!(ids, ["before", "after"]);
    let out = s
        .erase_caller("acme", "+15550001", "ops", "r", T0 + 2)
        .unwrap();
    assert_eq!(out.calls, ["before", "after"]);
}

#[test]
fn erasure_leaves_calls_under_legal_hold() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = open(dir.path());
    full_call(&mut s, "acme", "free", "+1");
    full_call(&mut s, "acme", "held", "+1");
    full_call(&mut s, "acme", "rec-held", "+1");
    s.set_legal_hold(
        "acme",
        HoldTarget::Call,
        "held",
        true,
        "legal",
        "case 9",
        T0,
    )
    .unwrap();
    s.set_legal_hold(
        "acme",
        HoldTarget::Recording,
        "rec-held-r",
        true,
        "legal",
        "case 9",
        T0,
    )
    .unwrap();
    let out = s
        .erase_caller("acme", "+1", "ops", "request", T0 + 1)
        .unwrap();
    assert_eq!(out.calls, ["free"]);
    assert_eq!(out.held, ["held", "rec-held"]);
    assert_eq!(s.transcripts_of_call("acme", "held").unwrap().len(), 2);
    assert_eq!(
        s.get_call("acme", "held")
            .unwrap()
            .unwrap()
            .caller
            .as_deref(),
        Some("+1")
    );
    assert_eq!(
        audit_ids(&s, "acme", AuditAction::LegalHoldSet),
        [
            (ObjectKind::Call, "held".to_owned()),
            (ObjectKind::Recording, "rec-held-r".to_owned())
        ]
    );
    assert!(matches!(
        s.delete_recording("acme", "held-r", "x", "y", T0),
        Err(DbError::LegalHold { .. })
    ));
}

#[test]
fn erase_call_is_scoped_to_its_tenant() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = open(dir.path());
    full_call(&mut s, "acme", "a1", "+1");
    assert!(matches!(
        s.erase_call("beta", "a1", "ops", "r", T0),
        Err(DbError::TenantMismatch { .. })
    ));
    assert_eq!(s.transcripts_of_call("acme", "a1").unwrap().len(), 2);
    let out = s.erase_call("acme", "a1", "ops", "r", T0).unwrap();
    assert_eq!(out.calls, ["a1"]);
    assert_eq!(out.recordings.len(), 1);
    assert_eq!(out.transcripts.len(), 2);
    assert_eq!(audit_ids(&s, "acme", AuditAction::EraseCall).len(), 4);
}

#[test]
fn erase_tenant_removes_its_rows_keeps_audit_and_other_tenants() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = open(dir.path());
    full_call(&mut s, "acme", "a1", "+1");
    full_call(&mut s, "acme", "a2", "+2");
    full_call(&mut s, "beta", "b1", "+1");
    s.set_legal_hold("acme", HoldTarget::Call, "a2", true, "legal", "case", T0)
        .unwrap();
    match s.erase_tenant("acme", "ops", "offboarding", T0 + 1) {
        Err(DbError::LegalHold { tenant, held }) => {
            assert_eq!((tenant.as_str(), held), ("acme", vec!["a2".to_owned()]))
        }
        other => panic!("expected LegalHold, got {other:?}"),
    }
    assert!(
        s.get_call("acme", "a1").unwrap().is_some(),
        "refusal changes nothing"
    );
    s.set_legal_hold(
        "acme",
        HoldTarget::Call,
        "a2",
        false,
        "legal",
        "case closed",
        T0,
    )
    .unwrap();

    let out = s
        .erase_tenant("acme", "ops", "offboarding", T0 + 2)
        .unwrap();
    assert_eq!(out.calls, ["a1", "a2"]);
    assert_eq!(out.transcripts, ["a1/0", "a1/1", "a2/0", "a2/1"]);
    assert_eq!(
        out.recordings
            .iter()
            .map(|r| r.path.to_str().unwrap())
            .collect::<Vec<_>>(),
        ["/var/rec/acme/a1-r.sealed", "/var/rec/acme/a2-r.sealed"]
    );
    assert!(s.get_call("acme", "a1").unwrap().is_none());
    assert!(s.list_recordings(Some("acme"), None).unwrap().is_empty());
    assert!(s.get_call("beta", "b1").unwrap().is_some());
    assert_eq!(s.list_recordings(Some("beta"), None).unwrap().len(), 1);
    let log = audit_ids(&s, "acme", AuditAction::EraseTenant);
    assert_eq!(log.len(), 2 + 4 + 2 + 1);
    assert_eq!(
        log.last().unwrap(),
        &(ObjectKind::Tenant, "acme".to_owned())
    );
    // Earlier audit rows of the tenant survive its deletion.
    assert_eq!(audit_ids(&s, "acme", AuditAction::LegalHoldSet).len(), 1);
}

#[test]
fn privacy_audit_rows_are_append_only() {
    if !crate::ENGINE_IS_SQLITE {
        return; // reads the SQLite file; store_db_pg.rs checks PostgreSQL's rows
    }
    let dir = tempfile::tempdir().unwrap();
    let mut s = open(dir.path());
    let id = s
        .audit(&sipbridge::store::db::AuditEntry {
            at: T0,
            actor: "ops",
            action: AuditAction::RecordingExport,
            object_kind: ObjectKind::Recording,
            object_id: "r1",
            tenant: "acme",
            reason: "customer asked",
        })
        .unwrap();
    let raw = rusqlite::Connection::open(dir.path().join("meta.db")).unwrap();
    for sql in [
        "UPDATE audit SET reason = 'nothing happened'",
        "DELETE FROM audit",
        "DELETE FROM audit WHERE id = 1",
    ] {
        let err = raw.execute(sql, []).unwrap_err();
        assert!(
            err.to_string().contains("audit log is append-only"),
            "{sql}: {err}"
        );
    }
    let log = s.audit_log(&AuditFilter::default()).unwrap();
    assert_eq!(log.len(), 1);
    assert_eq!(
        (
            log[0].id,
            log[0].reason.as_str(),
            log[0].action,
            log[0].actor.as_str()
        ),
        (id, "customer asked", AuditAction::RecordingExport, "ops")
    );
    // Filters.
    assert!(
        s.audit_log(&AuditFilter {
            tenant: Some("beta".into()),
            ..Default::default()
        })
        .unwrap()
        .is_empty()
    );
    assert!(
        s.audit_log(&AuditFilter {
            since: Some(T0 + 1),
            ..Default::default()
        })
        .unwrap()
        .is_empty()
    );
    assert_eq!(
        s.audit_log(&AuditFilter {
            object_id: Some("r1".into()),
            since: Some(T0),
            ..Default::default()
        })
        .unwrap()
        .len(),
        1
    );
}

#[test]
fn crash_recovery_finds_open_recordings_and_closes_open_calls() {
    let dir = tempfile::tempdir().unwrap();
    {
        let mut s = open(dir.path());
        full_call(&mut s, "acme", "done", "+1");
        s.insert_call(&call("acme", "live1", "+2", T0)).unwrap();
        s.insert_call(&call("beta", "live2", "+3", T0)).unwrap();
        s.insert_recording(&rec("acme", "live1", "live1-r", T0))
            .unwrap();
        // The process dies here: no finish_call, no set_recording_state.
    }
    let mut s = open(dir.path());
    let open_recs = s.open_recordings_of_crashed().unwrap();
    assert_eq!(
        open_recs.iter().map(|r| r.id.as_str()).collect::<Vec<_>>(),
        ["live1-r"]
    );
    assert_eq!(
        open_recs[0].path,
        PathBuf::from("/var/rec/acme/live1-r.sealed")
    );

    let restart = T0 + 3_600_000;
    assert_eq!(s.close_crashed_calls(restart).unwrap(), ["live1", "live2"]);
    let c = s.get_call("acme", "live1").unwrap().unwrap();
    assert_eq!(
        (c.ended_at, c.cause.as_deref(), c.hangup_side),
        (Some(restart), Some(CRASH_RECOVERED_CAUSE), None)
    );
    let done = s.get_call("acme", "done").unwrap().unwrap();
    assert_eq!(
        done.cause.as_deref(),
        Some("bye"),
        "ended calls are not touched"
    );
    assert_eq!(
        audit_ids(&s, "beta", AuditAction::CrashRecovered),
        [(ObjectKind::Call, "live2".to_owned())]
    );

    // After verifying the sealed chunks, recovery marks the file partial.
    s.set_recording_state("live1-r", RecordingState::Partial, 8000, 2000)
        .unwrap();
    assert!(s.open_recordings_of_crashed().unwrap().is_empty());
    assert!(s.close_crashed_calls(restart + 1).unwrap().is_empty());
}

#[test]
fn unix_ms_converts_wall_clock_times() {
    use sipbridge::store::db::unix_ms;
    use std::time::{Duration, UNIX_EPOCH};
    assert_eq!(
        unix_ms(UNIX_EPOCH + Duration::from_millis(1_760_000_000_123)),
        1_760_000_000_123
    );
    assert_eq!(unix_ms(UNIX_EPOCH - Duration::from_secs(1)), 0);
}

#[test]
fn privacy_erased_numbers_leave_no_bytes_in_the_database_files() {
    if !crate::ENGINE_IS_SQLITE {
        return; // reads the SQLite file; store_db_pg.rs checks PostgreSQL's rows
    }
    let dir = tempfile::tempdir().unwrap();
    let mut s = open(dir.path());
    for i in 0..50 {
        s.insert_call(&call("acme", &format!("c{i}"), "+15559998888", T0 + i))
            .unwrap();
    }
    s.erase_caller("acme", "+15559998888", "ops", "request", T0 + 100)
        .unwrap();
    s.checkpoint().unwrap();
    for name in ["meta.db", "meta.db-wal"] {
        let bytes = std::fs::read(dir.path().join(name)).unwrap_or_default();
        assert!(
            !bytes.windows(10).any(|w| w == b"5559998888"),
            "the erased number is still in {name}"
        );
    }
}

/// Issue 19: a CDR says whether its call was recorded (schema v5), closed in one
/// statement with its frame counts; rows closed otherwise say nothing.
#[test]
fn close_call_stores_whether_the_call_was_recorded() {
    use sipbridge::store::db::{CallRecording, MediaFrames};
    let dir = tempfile::tempdir().unwrap();
    let mut s = open(dir.path());
    s.insert_call(&call("acme", "c1", "+1", T0)).unwrap();
    s.insert_call(&call("acme", "c2", "+1", T0)).unwrap();
    let frames = MediaFrames {
        concealed: 3,
        dropped: 4,
    };
    s.close_call(
        "acme",
        "c1",
        &end(T0 + 5),
        frames,
        CallRecording::Partial,
        None,
    )
    .unwrap();
    let c1 = s.get_call("acme", "c1").unwrap().unwrap();
    assert_eq!(c1.recording, Some(CallRecording::Partial));
    assert!(c1.recording.unwrap().recorded());
    assert_eq!(c1.frames, Some(frames));
    assert_eq!(c1.ended_at, Some(T0 + 5));
    // Closing twice is refused, as with finish_call.
    assert!(
        s.close_call("acme", "c1", &end(T0 + 6), frames, CallRecording::Off, None)
            .is_err()
    );
    s.finish_call("acme", "c2", &end(T0 + 5)).unwrap();
    assert_eq!(s.get_call("acme", "c2").unwrap().unwrap().recording, None);
    assert!(!CallRecording::NotRecorded.recorded());
}

/// Issue 13: a CDR keeps the call's last transfer (schema v6), written with the close;
/// a call without one has none, and a bad result value is refused by the schema.
#[test]
fn close_call_stores_the_transfer() {
    use sipbridge::store::db::{CallRecording, CallTransfer, MediaFrames};
    let dir = tempfile::tempdir().unwrap();
    let mut s = open(dir.path());
    for id in ["t1", "t2", "t3", "t4"] {
        s.insert_call(&call("acme", id, "+1", T0)).unwrap();
    }
    let transfer = CallTransfer {
        to: "tel:+15557654321".into(),
        mode: "blind".into(),
        result: "failed".into(),
        reason: Some("target-failed".into()),
        status: Some(486),
        leg_call_id: None,
    };
    // A bridge transfer names the other leg.
    let bridged = CallTransfer {
        mode: "bridge".into(),
        result: "completed".into(),
        reason: None,
        status: Some(200),
        leg_call_id: Some("leg-1@sipbridge".into()),
        ..transfer.clone()
    };
    let close = |s: &mut Store, id: &str, t: Option<&CallTransfer>| {
        s.close_call(
            "acme",
            id,
            &end(T0 + 5),
            MediaFrames::default(),
            CallRecording::Off,
            t,
        )
    };
    close(&mut s, "t1", Some(&transfer)).unwrap();
    close(&mut s, "t2", None).unwrap();
    assert_eq!(
        s.get_call("acme", "t1").unwrap().unwrap().transfer,
        Some(transfer.clone())
    );
    assert_eq!(s.get_call("acme", "t2").unwrap().unwrap().transfer, None);
    close(&mut s, "t4", Some(&bridged)).unwrap();
    assert_eq!(
        s.get_call("acme", "t4").unwrap().unwrap().transfer,
        Some(bridged)
    );
    let bad = CallTransfer {
        result: "maybe".into(),
        ..transfer
    };
    assert!(close(&mut s, "t3", Some(&bad)).is_err());
    assert_eq!(s.get_call("acme", "t3").unwrap().unwrap().ended_at, None);
}

#[test]
fn an_outbound_call_is_marked_so() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = open(dir.path());
    s.insert_call(&call("acme", "out1", "+1", T0)).unwrap();
    assert_eq!(
        s.get_call("acme", "out1").unwrap().unwrap().direction,
        "inbound"
    );
    s.mark_outbound("acme", "out1").unwrap();
    assert_eq!(
        s.get_call("acme", "out1").unwrap().unwrap().direction,
        "outbound"
    );
    // Another tenant's call is not touched.
    assert!(s.mark_outbound("globex", "out1").is_err());
}

/// Group commit (issue 17): a batch of many writes is one commit; a write
/// refused inside it is undone alone (its audit row too) and the others
/// stay; a batch rolled back leaves nothing; a write's own transaction is a
/// savepoint inside the batch, so opt-outs are audited exactly once.
#[test]
fn a_batch_commits_many_writes_once_and_a_refused_write_alone_is_undone() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = open(dir.path());
    let before = s.commits();
    s.insert_call(&call("acme", "solo", "+4915100", T0))
        .unwrap();
    assert_eq!(
        s.commits(),
        before + 1,
        "a write outside a batch commits at once"
    );

    let before = s.commits();
    s.begin_batch().unwrap();
    assert!(s.in_batch());
    for n in 0..50 {
        let id = format!("b{n}");
        s.batched(|s| s.insert_call(&call("acme", &id, "+4915100", T0 + n)))
            .unwrap();
        s.batched(|s| s.record_consent("acme", &id, ConsentEvent::OptOut, T0 + n))
            .unwrap();
        s.batched(|s| s.insert_recording(&rec("acme", &id, &format!("{id}-r"), T0)))
            .unwrap();
    }
    // Refused inside the batch: a duplicate CDR (the engine refuses the
    // statement), an opt-out of an unknown call, a transition a recording
    // cannot make. Each leaves nothing and the batch goes on.
    assert!(
        s.batched(|s| s.insert_call(&call("acme", "b0", "+4915100", T0)))
            .is_err()
    );
    assert!(matches!(
        s.batched(|s| s.record_consent("acme", "nobody", ConsentEvent::OptOut, T0)),
        Err(DbError::UnknownCall { .. })
    ));
    s.batched(|s| s.set_recording_state("b1-r", RecordingState::Complete, 10, 1000))
        .unwrap();
    assert!(matches!(
        s.batched(|s| s.set_recording_state("b1-r", RecordingState::Partial, 10, 1000)),
        Err(DbError::InvalidTransition { .. })
    ));
    s.batched(|s| s.finish_call("acme", "b1", &end(T0 + 60_000)))
        .unwrap();
    assert_eq!(s.commits(), before, "nothing commits before the batch does");
    s.commit_batch().unwrap();
    assert!(!s.in_batch());
    assert_eq!(s.commits(), before + 1, "152 writes, one commit");

    for n in 0..50 {
        let cdr = s.get_call("acme", &format!("b{n}")).unwrap().unwrap();
        assert_eq!(cdr.consent.opt_out_at, Some(T0 + n), "b{n}");
    }
    assert_eq!(
        s.get_call("acme", "b1").unwrap().unwrap().ended_at,
        Some(T0 + 60_000)
    );
    let r = s.get_recording(Some("acme"), "b1-r").unwrap().unwrap();
    assert_eq!(r.state, RecordingState::Complete);
    let opt_outs = audit_ids(&s, "acme", AuditAction::ConsentOptOut);
    assert_eq!(
        opt_outs.len(),
        50,
        "each opt-out audited once: {opt_outs:?}"
    );
    assert!(!opt_outs.iter().any(|(_, id)| id == "nobody"));

    // A batch rolled back leaves nothing, audit rows included; the store
    // writes on afterwards.
    s.begin_batch().unwrap();
    s.batched(|s| s.insert_call(&call("acme", "gone", "+4915100", T0)))
        .unwrap();
    s.batched(|s| s.record_consent("acme", "gone", ConsentEvent::OptOut, T0))
        .unwrap();
    s.rollback_batch();
    assert!(s.get_call("acme", "gone").unwrap().is_none());
    assert_eq!(audit_ids(&s, "acme", AuditAction::ConsentOptOut).len(), 50);
    s.insert_call(&call("acme", "after", "+4915100", T0))
        .unwrap();
    assert!(s.get_call("acme", "after").unwrap().is_some());

    // No batch inside a transaction's place: a second batch is refused.
    s.begin_batch().unwrap();
    assert!(matches!(s.begin_batch(), Err(DbError::Misuse(_))));
    s.commit_batch().unwrap();
}

/// What group commit saves on SQLite, seen in the WAL file: every commit
/// appends the pages it changed, so 200 CDR rows written one by one append
/// at least 200 frames, and the same rows in one batch a handful.
#[test]
fn a_batch_appends_a_fraction_of_the_wal_of_single_commits() {
    if !crate::ENGINE_IS_SQLITE {
        return;
    }
    let wal_bytes = |batch: bool| {
        let dir = tempfile::tempdir().unwrap();
        let mut s = open(dir.path());
        let wal = dir.path().join("meta.db-wal");
        let before = std::fs::metadata(&wal).map_or(0, |m| m.len());
        if batch {
            s.begin_batch().unwrap();
        }
        for n in 0..200 {
            s.batched(|s| s.insert_call(&call("acme", &format!("w{n}"), "+4915100", T0)))
                .unwrap();
        }
        if batch {
            s.commit_batch().unwrap();
        }
        assert!(s.get_call("acme", "w0").unwrap().is_some());
        assert!(s.get_call("acme", "w199").unwrap().is_some());
        std::fs::metadata(&wal).unwrap().len() - before
    };
    let (single, batched) = (wal_bytes(false), wal_bytes(true));
    assert!(
        single >= 200 * 4096,
        "one frame per commit at least: {single}"
    );
    assert!(
        batched * 10 < single,
        "batched {batched} vs single {single}"
    );
}
