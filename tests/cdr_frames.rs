#![allow(clippy::unwrap_used, clippy::expect_used)]
//! The stored CDR carries the call's media frame counts (issue 15): frames
//! concealed at playout and caller frames dropped on the way to the pipeline,
//! the same numbers as the CDR log line.

mod common;

use std::time::{Duration, Instant};

use common::{Daemon, ProfileSpec, sipp, sipp_scenario};
use sipbridge::store::db::{CallerIdPolicy, MediaFrames, Store};

#[test]
fn stored_cdr_has_concealed_and_dropped_frame_counts() {
    let daemon = Daemon::spawn(&ProfileSpec::default().render());
    sipp(
        &sipp_scenario("basic_call.xml"),
        daemon.udp_addr(),
        &["-s", "+15551230000"],
    )
    .assert_success();
    let cdr = daemon
        .wait_for_cdr(Duration::from_secs(10), |c| c["result_code"] == 200)
        .expect("a CDR");
    let call_id = cdr["call_id"].as_str().unwrap().to_owned();
    let concealed = cdr["rtp"]["concealed"].as_u64().unwrap();
    let db = daemon.dir().join("var").join("sipbridge.db");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let mut store = Store::open(&db).unwrap();
        store.set_caller_policy("demo", CallerIdPolicy::Plain);
        let row = store.get_call("demo", &call_id).unwrap();
        if let Some(frames) = row.and_then(|r| r.frames) {
            assert_eq!(
                frames,
                MediaFrames {
                    concealed,
                    dropped: 0
                }
            );
            break;
        }
        assert!(Instant::now() < deadline, "no frame counts stored");
        std::thread::sleep(Duration::from_millis(100));
    }
}
