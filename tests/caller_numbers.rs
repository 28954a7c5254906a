//! `caller_numbers = "hashed"`: the daemon stores the caller's number only as
//! a keyed hash, and the number still finds the call (for erasure/export).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::{Daemon, ProfileSpec, sipp, sipp_scenario};
use sipbridge::store::db::{CallerIdPolicy, Store};

const CALLER: &str = "+15550001111";

#[test]
fn hashed_caller_numbers_are_stored_hashed_and_still_found() {
    let profile = ProfileSpec {
        tenant: "caller_numbers = \"hashed\"",
        ..ProfileSpec::default()
    }
    .render();
    let daemon = Daemon::spawn(&profile);
    let result = sipp(
        &sipp_scenario("basic_call.xml"),
        daemon.udp_addr(),
        &["-s", "+15551230000"],
    );
    result.assert_success();
    let cdr = daemon
        .wait_for_cdr(Duration::from_secs(10), |c| c["result_code"] == 200)
        .expect("a CDR");
    // The log line shows the number masked (issue 15); the database the hash.
    assert_eq!(cdr["from"], "+1555•••11");
    assert!(
        !daemon.logs().iter().any(|l| l.contains("5550001111")),
        "the plain number reached the log"
    );
    let call_id = cdr["call_id"].as_str().unwrap().to_owned();

    let var = daemon.dir().join("var");
    let master = std::fs::read(var.join("master.key")).unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let mut store = Store::open(&var.join("sipbridge.db")).unwrap();
        store.set_caller_policy("demo", CallerIdPolicy::for_tenant(true, &master, "demo"));
        if let Some(row) = store.get_call("demo", &call_id).unwrap() {
            let stored = row.caller.clone().unwrap_or_default();
            assert!(stored.starts_with("hmac-sha256:"), "stored {stored:?}");
            assert!(!stored.contains("5550001111"));
            let found = store.calls_by_caller("demo", CALLER).unwrap();
            assert_eq!(found.len(), 1);
            assert_eq!(found[0].call_id, call_id);
            break;
        }
        assert!(std::time::Instant::now() < deadline, "no call row written");
        std::thread::sleep(Duration::from_millis(100));
    }
    // Nothing of the number anywhere in the database file.
    let db = std::fs::read(var.join("sipbridge.db")).unwrap();
    let wal = std::fs::read(var.join("sipbridge.db-wal")).unwrap_or_default();
    for bytes in [db, wal] {
        assert!(
            !bytes.windows(10).any(|w| w == b"5550001111"),
            "the plain number reached the database file"
        );
    }
}
