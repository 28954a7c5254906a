//! The daemon's retention sweeper runs at start-up: a CDR older than its
//! tenant's `metadata_days` is deleted (and audited) as soon as the daemon
//! starts; a recent one stays.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::{Duration, SystemTime};

use common::{Daemon, profile_toml};
use sipbridge::store::db::{
    AuditFilter, CallEnd, CallRow, CallerIdPolicy, RtpStats, Store, StoredHangupSide, unix_ms,
};

const DAY_MS: i64 = 86_400_000;

fn insert(store: &mut Store, id: &str, started_at: i64) {
    store
        .insert_call(&CallRow {
            call_id: id.to_owned(),
            tenant: "demo".to_owned(),
            trunk: "local".to_owned(),
            from: "+15550001111".to_owned(),
            to: "+15551230000".to_owned(),
            started_at,
        })
        .unwrap();
    store
        .finish_call(
            "demo",
            id,
            &CallEnd {
                answered_at: Some(started_at + 1_000),
                ended_at: started_at + 60_000,
                result_code: 200,
                hangup_side: StoredHangupSide::Remote,
                cause: "caller-bye".to_owned(),
                codec: Some("PCMU".to_owned()),
                rtp: RtpStats {
                    packets: 3000,
                    lost: 0,
                    jitter_ms: 1.0,
                },
            },
        )
        .unwrap();
}

#[test]
fn privacy_retention_sweeper_deletes_expired_cdrs_at_start_up() {
    let tmp = tempfile::tempdir().unwrap();
    let var = tmp.path().join("var");
    std::fs::create_dir_all(&var).unwrap();
    let now = unix_ms(SystemTime::now());
    {
        let mut store = Store::open(&var.join("sipbridge.db")).unwrap();
        store.set_caller_policy("demo", CallerIdPolicy::Plain);
        insert(&mut store, "old@test", now - 400 * DAY_MS); // past the default 365 days
        insert(&mut store, "recent@test", now - 10 * DAY_MS);
    }
    let profile = profile_toml("").replace(
        "var_dir = \"var\"",
        &format!("var_dir = {:?}", var.display().to_string()),
    );
    let daemon = Daemon::spawn(&profile);
    daemon
        .wait_for_log(Duration::from_secs(10), |l| l.contains("retention sweep"))
        .expect("a sweep at start-up");

    let store = Store::open(&var.join("sipbridge.db")).unwrap();
    assert!(
        store.get_call("demo", "old@test").unwrap().is_none(),
        "expired CDR kept"
    );
    assert!(
        store.get_call("demo", "recent@test").unwrap().is_some(),
        "recent CDR deleted"
    );
    let audit = store
        .audit_log(&AuditFilter {
            object_id: Some("old@test".to_owned()),
            ..AuditFilter::default()
        })
        .unwrap();
    assert!(
        audit.iter().any(|a| a.actor == "retention"),
        "the deletion is audited: {audit:?}"
    );
}
