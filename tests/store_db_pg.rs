#![allow(clippy::unwrap_used, clippy::expect_used)]
//! The metadata store on PostgreSQL (`[profile.store] kind = "postgres"`,
//! issue 16), against a real server (tests/common/pg.rs):
//!
//! - every semantic test of `store_db.rs` and `store_retention.rs`, included
//!   below as modules, runs here on a fresh PostgreSQL database
//!   (`open_backend`), so both engines answer the same suite;
//! - what only PostgreSQL has: migrations under an advisory lock with daemons
//!   starting at once, the append-only audit log enforced by triggers, two
//!   daemons sweeping retention at once (each item deleted and audited once),
//!   erasure by one daemon seen by the other. Assertions read PostgreSQL's rows.

mod common;

#[path = "store_db.rs"]
mod db_semantics;
#[path = "store_retention.rs"]
mod retention_semantics;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Barrier, Mutex};

use common::pg::PgServer;
use sipbridge::store::db::schema::CURRENT_VERSION;
use sipbridge::store::db::{
    AuditAction, AuditEntry, AuditFilter, CallEnd, CallRow, CallerIdPolicy, ObjectKind,
    RecordingRow, RecordingState, RtpStats, Speaker, Store, StoredHangupSide, TranscriptRow,
};
use sipbridge::store::retention::{DAY_MS, RetentionPolicy, Sweeper};

/// The included tests' engine: a fresh PostgreSQL database per test
/// directory (a test reopening its directory reopens its database).
fn open_backend(dir: &Path) -> Store {
    static DBS: Mutex<BTreeMap<PathBuf, String>> = Mutex::new(BTreeMap::new());
    let url = DBS
        .lock()
        .unwrap()
        .entry(dir.to_path_buf())
        .or_insert_with(|| PgServer::shared().fresh_database("semantics"))
        .clone();
    Store::open_postgres(&url).unwrap()
}

/// Tests of the SQLite file itself are skipped in the included modules.
const ENGINE_IS_SQLITE: bool = false;

const T0: i64 = 1_760_000_000_000;

fn db_name(url: &str) -> &str {
    url.rsplit('/').next().unwrap()
}

fn node(url: &str) -> Store {
    let mut s = Store::open_postgres(url).unwrap();
    for t in ["acme", "beta"] {
        s.set_caller_policy(t, CallerIdPolicy::Plain);
    }
    s.set_caller_policy(
        "hush",
        CallerIdPolicy::Hashed {
            key: b"tenant-hush-caller-key".to_vec(),
        },
    );
    s
}

/// A finished call with one complete recording (file under `dir`) and two
/// transcript segments.
fn full_call(s: &mut Store, dir: &Path, tenant: &str, id: &str, from: &str, at: i64) -> PathBuf {
    s.insert_call(&CallRow {
        call_id: id.into(),
        tenant: tenant.into(),
        trunk: "t".into(),
        from: from.into(),
        to: "+15550000".into(),
        started_at: at,
    })
    .unwrap();
    let path = dir.join(format!("{id}-r.sbrec"));
    std::fs::write(&path, b"sealed").unwrap();
    s.insert_recording(&RecordingRow {
        id: format!("{id}-r"),
        call_id: id.into(),
        tenant: tenant.into(),
        path: path.clone(),
        key_id: "k".into(),
        created_at: at,
    })
    .unwrap();
    s.set_recording_state(&format!("{id}-r"), RecordingState::Complete, 6, 1000)
        .unwrap();
    for n in 0..2 {
        s.insert_transcript(&TranscriptRow {
            id: format!("{id}/{n}"),
            call_id: id.into(),
            tenant: tenant.into(),
            speaker: Speaker::Agent,
            start_ms: n * 10,
            end_ms: n * 10 + 5,
            ciphertext: vec![0, 159, 146, 150, 255],
            key_id: "k".into(),
            confidence: 0.25,
            created_at: at,
        })
        .unwrap();
    }
    s.finish_call(
        tenant,
        id,
        &CallEnd {
            answered_at: Some(at + 1000),
            ended_at: at + 60_000,
            result_code: 200,
            hangup_side: StoredHangupSide::Remote,
            cause: "bye".into(),
            codec: Some("PCMU/8000".into()),
            rtp: RtpStats {
                packets: 3000,
                lost: 2,
                jitter_ms: 1.5,
            },
        },
    )
    .unwrap();
    path
}

#[test]
fn daemons_starting_at_once_migrate_once_to_the_current_version() {
    let pg = PgServer::shared();
    let url = pg.fresh_database("migrate");
    let barrier = Arc::new(Barrier::new(4));
    let handles: Vec<_> = (0..4)
        .map(|_| {
            let (url, barrier) = (url.clone(), barrier.clone());
            std::thread::spawn(move || {
                barrier.wait();
                Store::open_postgres(&url).map(|s| s.schema_version().unwrap())
            })
        })
        .collect();
    for h in handles {
        assert_eq!(h.join().unwrap().unwrap(), CURRENT_VERSION);
    }
    let db = db_name(&url);
    assert_eq!(pg.query_i64(db, "SELECT count(*) FROM schema_version"), 1);
    assert_eq!(
        pg.query_i64(db, "SELECT version FROM schema_version"),
        i64::from(CURRENT_VERSION)
    );
    assert_eq!(
        pg.query_i64(
            db,
            "SELECT count(*) FROM information_schema.tables WHERE table_schema = 'public' \
             AND table_name IN ('calls', 'recordings', 'transcripts', 'audit', 'audit_prune')"
        ),
        5
    );
    // Opening again changes nothing.
    let s = Store::open_postgres(&url).unwrap();
    assert_eq!(s.schema_version().unwrap(), CURRENT_VERSION);
    assert_eq!(pg.query_i64(db, "SELECT count(*) FROM audit_prune"), 1);
}

#[test]
fn a_database_from_a_newer_build_is_refused() {
    let pg = PgServer::shared();
    let url = pg.fresh_database("newer");
    drop(Store::open_postgres(&url).unwrap());
    pg.client(db_name(&url))
        .batch_execute("UPDATE schema_version SET version = 999")
        .unwrap();
    let err = Store::open_postgres(&url).unwrap_err().to_string();
    assert!(err.contains("999"), "{err}");
}

#[test]
fn rows_land_in_postgres_with_their_values() {
    let pg = PgServer::shared();
    let url = pg.fresh_database("rows");
    let dir = tempfile::tempdir().unwrap();
    let mut s = node(&url);
    full_call(&mut s, dir.path(), "acme", "c1", "+15551234", T0);
    let mut c = pg.client(db_name(&url));
    let row = c
        .query_one(
            "SELECT caller, ended_at, rtp_lost, rtp_jitter_ms, codec, legal_hold FROM calls \
             WHERE call_id = 'c1' AND tenant = 'acme'",
            &[],
        )
        .unwrap();
    assert_eq!(
        row.get::<_, Option<String>>(0).as_deref(),
        Some("+15551234")
    );
    assert_eq!(row.get::<_, Option<i64>>(1), Some(T0 + 60_000));
    assert_eq!(row.get::<_, Option<i64>>(2), Some(2));
    assert_eq!(row.get::<_, Option<f64>>(3), Some(1.5));
    assert_eq!(
        row.get::<_, Option<String>>(4).as_deref(),
        Some("PCMU/8000")
    );
    assert_eq!(row.get::<_, i64>(5), 0);
    let t = c
        .query_one("SELECT ciphertext FROM transcripts WHERE id = 'c1/1'", &[])
        .unwrap();
    assert_eq!(t.get::<_, Vec<u8>>(0), vec![0, 159, 146, 150, 255]);
    let r = c
        .query_one(
            "SELECT state, size_bytes FROM recordings WHERE id = 'c1-r'",
            &[],
        )
        .unwrap();
    assert_eq!(r.get::<_, String>(0), "complete");
    assert_eq!(r.get::<_, i64>(1), 6);
}

#[test]
fn hashed_caller_ids_are_not_plain_in_postgres() {
    let pg = PgServer::shared();
    let url = pg.fresh_database("hashed");
    let dir = tempfile::tempdir().unwrap();
    let mut s = node(&url);
    full_call(&mut s, dir.path(), "hush", "h1", "+4917099887766", T0);
    let db = db_name(&url);
    assert_eq!(
        pg.query_i64(
            db,
            "SELECT count(*) FROM calls WHERE caller LIKE 'hmac-sha256:%' AND tenant = 'hush'"
        ),
        1
    );
    assert_eq!(
        pg.query_i64(
            db,
            "SELECT count(*) FROM calls WHERE caller LIKE '%17099887766%'"
        ),
        0
    );
    assert_eq!(
        s.calls_by_caller("hush", "+4917099887766").unwrap().len(),
        1
    );
}

#[test]
fn privacy_audit_rows_are_append_only_in_postgres() {
    let pg = PgServer::shared();
    let url = pg.fresh_database("audit");
    let mut s = node(&url);
    for at in [T0, T0 + 10 * DAY_MS] {
        s.audit(&AuditEntry {
            at,
            actor: "ops",
            action: AuditAction::RecordingExport,
            object_kind: ObjectKind::Recording,
            object_id: "r1",
            tenant: "acme",
            reason: "customer asked",
        })
        .unwrap();
    }
    let db = db_name(&url);
    let mut c = pg.client(db);
    for sql in [
        "UPDATE audit SET reason = 'nothing happened'",
        "DELETE FROM audit",
        "DELETE FROM audit WHERE at = 1760000000000",
        "TRUNCATE audit",
    ] {
        let err = c.batch_execute(sql).unwrap_err();
        assert!(format!("{err:?}").contains("append-only"), "{sql}: {err:?}");
    }
    assert_eq!(pg.query_i64(db, "SELECT count(*) FROM audit"), 2);
    // Audit retention is the one way out, and only for rows older than its cut.
    assert_eq!(s.prune_audit("acme", T0 + DAY_MS).unwrap(), 1);
    assert_eq!(pg.query_i64(db, "SELECT count(*) FROM audit"), 1);
    assert_eq!(pg.query_i64(db, "SELECT before FROM audit_prune"), 0);
    assert!(c.batch_execute("DELETE FROM audit").is_err());
}

fn policy(tenant: &str) -> Option<RetentionPolicy> {
    (tenant == "acme").then_some(RetentionPolicy {
        recordings_days: 1,
        transcripts_days: 2,
        metadata_days: 3,
        audit_days: 400,
    })
}

/// Two daemons run the sweeper at the same moment on one database: every
/// expired item is deleted by exactly one of them and audited exactly once.
#[test]
fn two_daemons_sweeping_at_once_delete_and_audit_each_item_once() {
    let pg = PgServer::shared();
    let url = pg.fresh_database("sweep");
    let dir = tempfile::tempdir().unwrap();
    let mut a = node(&url);
    const CALLS: usize = 40;
    for i in 0..CALLS {
        full_call(
            &mut a,
            dir.path(),
            "acme",
            &format!("c{i:02}"),
            "+15551234",
            T0 + i as i64,
        );
    }
    let db = db_name(&url);
    // Two rounds: day 2 (recordings and transcripts expire), day 4 (the CDRs).
    for (round, now) in [(0, T0 + 2 * DAY_MS + 60_000), (1, T0 + 4 * DAY_MS)] {
        let barrier = Arc::new(Barrier::new(2));
        let handles: Vec<_> = (0..2)
            .map(|_| {
                let (url, barrier) = (url.clone(), barrier.clone());
                std::thread::spawn(move || {
                    let mut s = node(&url);
                    let remove = |p: &Path| std::fs::remove_file(p);
                    let sweeper = Sweeper::new(&policy, &remove);
                    barrier.wait();
                    let report = sweeper.run(&mut s, now).unwrap();
                    assert!(report.failed.is_empty(), "{:?}", report.failed);
                    report
                        .deleted
                        .iter()
                        .map(|e| (format!("{:?}", e.item.kind), e.item.id.clone()))
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        let mut deleted: BTreeMap<(String, String), usize> = BTreeMap::new();
        for h in handles {
            for item in h.join().unwrap() {
                *deleted.entry(item).or_default() += 1;
            }
        }
        let expected = if round == 0 { CALLS * 3 } else { CALLS };
        assert_eq!(deleted.len(), expected, "round {round}: {deleted:?}");
        assert!(
            deleted.values().all(|&n| n == 1),
            "round {round}: an item was deleted by both daemons: {deleted:?}"
        );
    }
    // In PostgreSQL: nothing left, one audit row per object and sweep, none
    // twice. Per call: round 0 audits its recording and two transcripts;
    // round 1 the call and the recording row it removes with it.
    for table in ["calls", "recordings", "transcripts"] {
        assert_eq!(
            pg.query_i64(db, &format!("SELECT count(*) FROM {table}")),
            0,
            "{table}"
        );
    }
    assert_eq!(
        pg.query_i64(
            db,
            "SELECT count(*) FROM audit WHERE action = 'retention-delete'"
        ),
        (CALLS * 5) as i64
    );
    assert_eq!(
        pg.query_i64(
            db,
            "SELECT count(*) FROM (SELECT object_kind, object_id FROM audit \
             WHERE action = 'retention-delete' GROUP BY object_kind, object_id, at \
             HAVING count(*) > 1) d"
        ),
        0
    );
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
}

/// Tenants' data keys live in PostgreSQL: a key one daemon creates is the
/// key the other loads (same master key), two creating at once agree, and
/// a key destroyed by one (crypto-shredding) is gone for the other.
#[test]
fn data_keys_are_shared_and_shredded_across_daemons() {
    use sipbridge::config::{Secret, SecretRef, StoreEngine};
    use sipbridge::store::crypto::{CryptoError, KeyRing};
    let pg = PgServer::shared();
    let url = pg.fresh_database("keys");
    let engine = StoreEngine::Postgres {
        url: Secret::new(url.clone().into_bytes(), SecretRef::Inline),
    };
    let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let master = [0x5a; 32];
    let a = KeyRing::open_engine(dir_a.path(), &master, &engine).unwrap();
    let b = KeyRing::open_engine(dir_b.path(), &master, &engine).unwrap();
    let mut rng = rand::rng();
    let barrier = Arc::new(Barrier::new(2));
    let (ka, kb) = std::thread::scope(|s| {
        let ha = s.spawn(|| {
            barrier.wait();
            a.data_key("acme", &mut rand::rng()).unwrap()
        });
        let hb = s.spawn(|| {
            barrier.wait();
            b.data_key("acme", &mut rand::rng()).unwrap()
        });
        (ha.join().unwrap(), hb.join().unwrap())
    });
    assert_eq!(ka.id(), kb.id(), "both daemons must use one key");
    assert_eq!(b.load("acme").unwrap().id(), ka.id());
    let db = db_name(&url);
    assert_eq!(pg.query_i64(db, "SELECT count(*) FROM data_keys"), 1);
    assert_eq!(
        pg.query_i64(db, "SELECT length(wrapped)::bigint FROM data_keys"),
        85
    );
    // Nothing under var_dir/keys: the key is in the database only.
    assert_eq!(std::fs::read_dir(a.dir()).unwrap().count(), 0);
    // A daemon with another master key cannot use it.
    let other = KeyRing::open_engine(dir_b.path(), &[0x11; 32], &engine).unwrap();
    assert!(matches!(
        other.load("acme"),
        Err(CryptoError::MasterKeyMismatch { .. })
    ));
    b.data_key("beta", &mut rng).unwrap();
    assert_eq!(a.tenants().unwrap(), ["acme", "beta"]);

    assert!(a.destroy("acme").unwrap());
    assert!(matches!(b.load("acme"), Err(CryptoError::NoKey { .. })));
    assert_eq!(
        pg.query_i64(db, "SELECT count(*) FROM data_keys WHERE tenant = 'acme'"),
        0
    );
    assert!(!b.destroy("acme").unwrap());
}

/// A daemon restarting closes its own open CDRs and recovers its own open
/// recordings, never another node's live calls.
#[test]
fn start_up_recovery_touches_only_this_nodes_rows() {
    let pg = PgServer::shared();
    let url = pg.fresh_database("recovery");
    let mut a = node(&url);
    a.set_node("node-a");
    let mut b = node(&url);
    b.set_node("node-b");
    for (s, id) in [(&mut a, "a-live"), (&mut b, "b-crashed")] {
        s.insert_call(&CallRow {
            call_id: id.into(),
            tenant: "acme".into(),
            trunk: "t".into(),
            from: "+1555".into(),
            to: "+1556".into(),
            started_at: T0,
        })
        .unwrap();
        s.insert_recording(&RecordingRow {
            id: format!("{id}-r"),
            call_id: id.into(),
            tenant: "acme".into(),
            path: PathBuf::from(format!("/nonexistent/{id}.sbrec")),
            key_id: "k".into(),
            created_at: T0,
        })
        .unwrap();
    }
    let ids = |v: Vec<sipbridge::store::db::RecordingRecord>| -> Vec<String> {
        v.into_iter().map(|r| r.id).collect()
    };
    assert_eq!(
        ids(b.open_recordings_of_crashed().unwrap()),
        ["b-crashed-r"]
    );
    assert_eq!(b.close_crashed_calls(T0 + 5).unwrap(), ["b-crashed"]);
    let db = db_name(&url);
    assert_eq!(
        pg.query_i64(db, "SELECT count(*) FROM calls WHERE ended_at IS NULL"),
        1
    );
    assert_eq!(
        pg.query_i64(
            db,
            "SELECT count(*) FROM calls WHERE call_id = 'a-live' AND node = 'node-a' AND ended_at IS NULL"
        ),
        1
    );
    assert_eq!(ids(a.open_recordings_of_crashed().unwrap()), ["a-live-r"]);
}

/// A connection the server drops (restart, failover, network cut) fails
/// the statement that finds it broken; the next one reconnects.
#[test]
fn a_dropped_connection_fails_one_statement_and_the_next_reconnects() {
    let pg = PgServer::shared();
    let url = pg.fresh_database("reconnect");
    let dir = tempfile::tempdir().unwrap();
    let mut s = node(&url);
    full_call(&mut s, dir.path(), "acme", "before", "+1555", T0);
    let db = db_name(&url);
    let killed = pg.query_i64(
        "postgres",
        &format!(
            "SELECT count(*) FROM (SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
             WHERE datname = '{db}') k"
        ),
    );
    assert!(killed >= 1, "no backend to terminate");
    // Let the client see the termination notice.
    std::thread::sleep(std::time::Duration::from_millis(200));
    let call = |id: &str| CallRow {
        call_id: id.into(),
        tenant: "acme".into(),
        trunk: "t".into(),
        from: "+1555".into(),
        to: "+1556".into(),
        started_at: T0,
    };
    let first = s.insert_call(&call("during"));
    let second = s.insert_call(&call("after"));
    assert!(second.is_ok(), "{second:?}");
    let rows = pg.query_i64(db, "SELECT count(*) FROM calls");
    assert_eq!(rows, if first.is_ok() { 3 } else { 2 }, "{first:?}");
    assert!(s.get_call("acme", "before").unwrap().is_some());
}

/// What one daemon writes the other lists; an erasure on one is what both see.
#[test]
fn erasure_on_one_daemon_is_seen_by_the_other() {
    let pg = PgServer::shared();
    let url = pg.fresh_database("erase");
    let dir = tempfile::tempdir().unwrap();
    let mut a = node(&url);
    let mut b = node(&url);
    full_call(&mut a, dir.path(), "acme", "a1", "+15559998888", T0);
    full_call(&mut b, dir.path(), "acme", "b1", "+15559998888", T0 + 1);
    full_call(&mut b, dir.path(), "beta", "x1", "+15559998888", T0 + 2);
    let listed = |s: &Store| -> Vec<String> {
        s.list_recordings(Some("acme"), None)
            .unwrap()
            .into_iter()
            .map(|r| r.id)
            .collect()
    };
    assert_eq!(listed(&a), ["a1-r", "b1-r"]);
    assert_eq!(listed(&b), ["a1-r", "b1-r"]);

    let erased = b
        .erase_caller("acme", "+15559998888", "ops", "request", T0 + 100)
        .unwrap();
    assert_eq!(erased.calls, ["a1", "b1"]);
    assert_eq!(erased.recordings.len(), 2);
    assert!(listed(&a).is_empty());
    let db = db_name(&url);
    assert_eq!(
        pg.query_i64(
            db,
            "SELECT count(*) FROM calls WHERE tenant = 'acme' AND caller IS NULL AND erased_at IS NOT NULL"
        ),
        2
    );
    assert_eq!(
        pg.query_i64(db, "SELECT count(*) FROM transcripts WHERE tenant = 'acme'"),
        0
    );
    // The other tenant's row with the same number is untouched.
    assert_eq!(
        pg.query_i64(
            db,
            "SELECT count(*) FROM calls WHERE tenant = 'beta' AND caller = '+15559998888'"
        ),
        1
    );
    let audit = a
        .audit_log(&AuditFilter {
            action: Some(AuditAction::EraseCaller),
            ..AuditFilter::default()
        })
        .unwrap();
    assert_eq!(audit.len(), 2 + 2 + 4, "{audit:?}");

    // A tenant erased on A is gone for B.
    a.erase_tenant("beta", "ops", "offboarding", T0 + 200)
        .unwrap();
    assert!(b.get_call("beta", "x1").unwrap().is_none());
    assert_eq!(
        pg.query_i64(db, "SELECT count(*) FROM calls WHERE tenant = 'beta'"),
        0
    );
}
