#![allow(clippy::unwrap_used, clippy::expect_used)]
//! The store's disk full (issue 19's acceptance: "With the store's disk full, every
//! answered call has a CDR saying whether it was recorded; no orphans after restart").
//!
//! `var_dir` is a 4 MiB tmpfs mounted by the test (root only: without root the tests
//! are skipped with a loud message; CI runs as root). A filler file takes every free
//! byte. With `[profile.store] min_free_mb = 1, check_interval_s = 1`:
//! - `answer-unrecorded`: a call recorded before, a call whose disk fills mid-call
//!   (its recording stops, what was sealed is kept as `partial`), five calls on the
//!   full disk (answered, not recorded); every CDR (log line and row) says which;
//!   after the disk is freed the rows kept for a retry are stored; after a `kill -9`
//!   and planted orphans (a zero-byte unindexed `.sbrec`, a row stuck in `recording`
//!   with a zero-byte file), the restart leaves neither.
//! - `reject`: on the full disk new calls get `503` + `Retry-After`, their CDR says
//!   `store-unavailable`; once the disk is freed calls are answered again.
//! - without root (no tmpfs): a recorded call, `kill -9`, the same planted orphans, a
//!   restart that removes them and keeps the recording.

mod common;

use std::net::UdpSocket;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::{Daemon, ProfileSpec, sipp, sipp_scenario};
use sipbridge::store::db::{CallFilter, CallRow, CallerIdPolicy, RecordingRow, Store};

/// A tmpfs mounted on a temp dir, unmounted on drop.
struct Tmpfs {
    dir: tempfile::TempDir,
}

impl Tmpfs {
    /// `None` (and a loud message) when not root.
    fn mount(size: &str) -> Option<Tmpfs> {
        if !nix::unistd::geteuid().is_root() {
            eprintln!(
                "\n*** SKIPPED: the disk-full tests mount a tmpfs and need root (CI runs as root) ***\n"
            );
            return None;
        }
        let dir = tempfile::tempdir().unwrap();
        let status = Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0700"),
                "tmpfs",
            ])
            .arg(dir.path())
            .status()
            .expect("run mount");
        assert!(status.success(), "mount -t tmpfs failed as root: {status}");
        Some(Tmpfs { dir })
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount")
            .arg("-l")
            .arg(self.dir.path())
            .status();
    }
}

/// Writes zeros into `dir/filler` until the filesystem refuses a single byte more.
fn fill(dir: &Path) -> PathBuf {
    use std::io::Write;
    let path = dir.join("filler");
    let mut f = std::fs::File::create(&path).unwrap();
    for block in [65_536usize, 4096, 512, 1] {
        let buf = vec![0u8; block];
        while f.write_all(&buf).is_ok() {}
    }
    let _ = f.sync_all();
    path
}

/// The profile: `demo` records, `var_dir` is the tmpfs, the watermark is 1 MiB checked
/// every second, an admin listener for `/metrics`.
fn profile(var: &Path, tenant: &str) -> String {
    ProfileSpec {
        tenant,
        extra: "[profile.admin]\nlisten = \"127.0.0.1:0\"\n\n\
                [profile.store]\nmin_free_mb = 1\ncheck_interval_s = 1\n",
        ..ProfileSpec::default()
    }
    .render()
    .replace("recording = false\n", "recording = true\n")
    .replace(
        "var_dir = \"var\"",
        &format!("var_dir = \"{}\"", var.display()),
    )
}

/// `basic_call.xml` with `ms` of call between the ACK and the BYE.
fn call_scenario(dir: &Path, ms: u32) -> PathBuf {
    let text = std::fs::read_to_string(sipp_scenario("basic_call.xml")).unwrap();
    assert!(text.contains("<pause milliseconds=\"1000\"/>"));
    let text = text.replace(
        "<pause milliseconds=\"1000\"/>",
        &format!("<pause milliseconds=\"{ms}\"/>"),
    );
    let path = dir.join(format!("call_{ms}.xml"));
    std::fs::write(&path, text).unwrap();
    path
}

fn calls(store: &Store) -> Vec<sipbridge::store::db::StoredCdr> {
    store
        .list_calls(&CallFilter {
            tenant: Some("demo".into()),
            limit: 1000,
            ..CallFilter::default()
        })
        .unwrap()
}

/// Polls the database until `n` calls are closed with their `recording` set.
fn wait_for_closed_rows(db: &Path, n: usize) -> Vec<sipbridge::store::db::StoredCdr> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let store = Store::open(db).unwrap();
        let rows = calls(&store);
        let closed = rows
            .iter()
            .filter(|c| c.ended_at.is_some() && c.recording.is_some())
            .count();
        if closed >= n || Instant::now() >= deadline {
            return rows;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Daemon::spawn returns once the listeners are bound; the store opens (and recovers)
/// after that.
fn wait_ready(daemon: &Daemon) {
    assert!(
        daemon
            .wait_for_log(Duration::from_secs(10), |l| l.contains("\"ready\""))
            .is_some(),
        "the daemon did not get ready"
    );
}

fn count_lines(daemon: &Daemon, needle: &str) -> usize {
    daemon.logs().iter().filter(|l| l.contains(needle)).count()
}

fn metric(daemon: &Daemon, name: &str) -> Option<f64> {
    let text = common::http::get(daemon.admin_addr(), "/metrics", None).text();
    text.lines()
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

/// Every `.sbrec` under `var/recordings`.
fn sbrec_files(var: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![var.join("recordings")];
    while let Some(dir) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if p.extension().is_some_and(|x| x == "sbrec") {
                out.push(p);
            }
        }
    }
    out
}

/// No zero-byte or unindexed `.sbrec`, no recording row in state `recording`, no CDR
/// without an end.
fn assert_no_orphans(var: &Path) {
    let store = Store::open(&var.join("sipbridge.db")).unwrap();
    let live = store.live_recording_ids().unwrap();
    for f in sbrec_files(var) {
        let len = std::fs::metadata(&f).unwrap().len();
        assert!(len > 0, "zero-byte recording file {}", f.display());
        let stem = f.file_stem().unwrap().to_str().unwrap().to_owned();
        assert!(
            live.contains(&stem),
            "unindexed recording file {}",
            f.display()
        );
    }
    let stuck = store.open_recordings_of_crashed().unwrap();
    assert!(stuck.is_empty(), "rows left in state recording: {stuck:?}");
    let open: Vec<_> = calls(&store)
        .into_iter()
        .filter(|c| c.ended_at.is_none())
        .collect();
    assert!(open.is_empty(), "CDRs without an end: {open:?}");
}

/// What a crash around a full disk can leave, planted by hand while the daemon is
/// down: a zero-byte `.sbrec` no row names, and a row stuck in `recording` whose file
/// is zero bytes. Returns both files.
fn plant_orphans(var: &Path) -> (PathBuf, PathBuf) {
    let day = var.join("recordings/demo/2026/01/02");
    std::fs::create_dir_all(&day).unwrap();
    let unindexed = day.join(format!("{}.sbrec", "ab".repeat(16)));
    std::fs::write(&unindexed, b"").unwrap();
    let stuck_file = day.join(format!("{}.sbrec", "cd".repeat(16)));
    std::fs::write(&stuck_file, b"").unwrap();
    let mut store = Store::open(&var.join("sipbridge.db")).unwrap();
    store.set_caller_policy("demo", CallerIdPolicy::Plain);
    store
        .insert_call(&CallRow {
            call_id: "crashed-on-full-disk".into(),
            tenant: "demo".into(),
            trunk: "local".into(),
            from: "+15550001111".into(),
            to: "+15551234567".into(),
            started_at: 1_767_312_000_000,
        })
        .unwrap();
    store
        .insert_recording(&RecordingRow {
            id: "cd".repeat(16),
            call_id: "crashed-on-full-disk".into(),
            tenant: "demo".into(),
            path: stuck_file.clone(),
            key_id: "k".into(),
            created_at: 1_767_312_000_000,
        })
        .unwrap();
    (unindexed, stuck_file)
}

/// After the restart: both planted files gone, the stuck row deleted, no orphans.
fn assert_orphans_gone(daemon: &Daemon, var: &Path, unindexed: &Path, stuck_file: &Path) {
    assert!(
        !unindexed.exists(),
        "the unindexed zero-byte file survived the restart"
    );
    assert!(
        !stuck_file.exists(),
        "the stuck zero-byte file survived the restart"
    );
    assert_no_orphans(var);
    let store = Store::open(&var.join("sipbridge.db")).unwrap();
    let stuck = store
        .recordings_of_call("demo", "crashed-on-full-disk")
        .unwrap();
    assert_eq!(stuck.len(), 1);
    assert_eq!(stuck[0].state.as_str(), "deleted", "{stuck:?}");
    assert!(
        daemon
            .logs()
            .iter()
            .any(|l| l.contains("removed recording files no recording row names")),
        "no line about the unindexed file"
    );
}

/// The start-up clean-up without root (no tmpfs): a recorded call, a kill -9, the
/// planted orphans, a restart.
#[test]
fn restart_removes_orphan_recordings() {
    let owned = tempfile::tempdir().unwrap();
    let var = owned.path().join("var");
    let text = profile(&var, "");
    let daemon = Daemon::spawn(&text);
    wait_ready(&daemon);
    let r = sipp(
        &sipp_scenario("basic_call.xml"),
        daemon.udp_addr(),
        &["-s", "+15551234567", "-m", "1"],
    );
    r.assert_success();
    let cdr = daemon
        .wait_for_cdr(Duration::from_secs(10), |c| c["result_code"] == 200)
        .expect("CDR");
    assert_eq!(cdr["recording"], "recorded", "{cdr}");
    let rows = wait_for_closed_rows(&var.join("sipbridge.db"), 1);
    assert_eq!(rows[0].recording.map(|r| r.as_str()), Some("recorded"));
    drop(daemon);
    let (unindexed, stuck_file) = plant_orphans(&var);
    let daemon = Daemon::spawn(&text);
    wait_ready(&daemon);
    assert_orphans_gone(&daemon, &var, &unindexed, &stuck_file);
    // The recorded call's file is kept.
    assert_eq!(sbrec_files(&var).len(), 1);
}

#[test]
fn full_disk_answers_unrecorded_says_so_and_leaves_no_orphans() {
    let Some(fs) = Tmpfs::mount("4m") else {
        return;
    };
    let var = fs.path().join("var");
    let scenarios = tempfile::tempdir().unwrap();
    let text = profile(&var, "");
    let daemon = Daemon::spawn(&text);
    wait_ready(&daemon);
    let target = daemon.udp_addr();
    let db = var.join("sipbridge.db");
    assert_eq!(metric(&daemon, "sipbridge_store_writable"), Some(1.0));

    // 1. Space: recorded.
    let r = sipp(
        &call_scenario(scenarios.path(), 1500),
        target,
        &["-s", "+15551234567", "-m", "1"],
    );
    r.assert_success();
    let first = daemon
        .wait_for_cdr(Duration::from_secs(10), |c| c["result_code"] == 200)
        .expect("first CDR");
    assert_eq!(first["recording"], "recorded", "{first}");
    assert_eq!(first["recorded"], true, "{first}");

    // 2. The disk fills 2 s into a 5 s call: the call goes on, its recording stops.
    let long = call_scenario(scenarios.path(), 5000);
    let caller =
        std::thread::spawn(move || sipp(&long, target, &["-s", "+15551234567", "-m", "1"]));
    std::thread::sleep(Duration::from_secs(2));
    let filler = fill(fs.path());
    let r = caller.join().unwrap();
    r.assert_success();
    assert!(
        daemon
            .wait_for_log(Duration::from_secs(10), |l| l
                .contains("store free space below min_free_mb"))
            .is_some(),
        "no watermark line"
    );
    let cdrs = daemon.wait_for_cdrs(2, Duration::from_secs(10));
    let second = &cdrs[1];
    assert!(
        second["recording"] == "partial" || second["recording"] == "not-recorded",
        "a recording cut by the full disk claims: {second}"
    );
    assert_eq!(metric(&daemon, "sipbridge_store_writable"), Some(0.0));
    assert!(metric(&daemon, "sipbridge_store_free_bytes").unwrap() < 1_048_576.0);

    // 3. Full: five calls answered, none recorded, every CDR says so.
    let r = sipp(
        &sipp_scenario("basic_call.xml"),
        target,
        &["-s", "+15551234567", "-m", "5", "-r", "5"],
    );
    r.assert_success();
    assert_eq!(r.successful_calls, Some(5));
    let cdrs = daemon.wait_for_cdrs(7, Duration::from_secs(10));
    assert_eq!(cdrs.len(), 7, "{cdrs:#?}");
    for c in &cdrs[2..] {
        assert_eq!(c["result_code"], 200, "{c}");
        assert_eq!(c["recording"], "not-recorded", "{c}");
        assert_eq!(c["recorded"], false, "{c}");
    }
    let full_ids: Vec<String> = cdrs[2..]
        .iter()
        .map(|c| c["call_id"].as_str().unwrap().to_owned())
        .collect();

    // 4. Space again: one line says so; what waited for a retry is stored.
    std::fs::remove_file(&filler).unwrap();
    assert!(
        daemon
            .wait_for_log(Duration::from_secs(10), |l| l
                .contains("store writable again"))
            .is_some(),
        "the store did not become writable again"
    );
    assert_eq!(
        count_lines(&daemon, "store free space below min_free_mb"),
        1
    );
    assert_eq!(
        count_lines(&daemon, "store free space back above min_free_mb"),
        1
    );
    let rows = wait_for_closed_rows(&db, 7);
    assert_eq!(rows.len(), 7, "{rows:#?}");
    let store = Store::open(&db).unwrap();
    for row in &rows {
        assert_eq!(row.result_code, Some(200), "{row:?}");
        let rec = row.recording.expect("recording column set");
        let recs = store.recordings_of_call("demo", &row.call_id).unwrap();
        let live: Vec<_> = recs
            .iter()
            .filter(|r| r.state.as_str() != "deleted")
            .collect();
        if full_ids.contains(&row.call_id) {
            assert_eq!(rec.as_str(), "not-recorded", "{row:?}");
            assert!(
                recs.is_empty(),
                "a call on the full disk has recordings: {recs:?}"
            );
        } else if row.call_id == first["call_id"] {
            assert_eq!(rec.as_str(), "recorded", "{row:?}");
            assert_eq!(live.len(), 1);
            assert_eq!(live[0].state.as_str(), "complete");
        } else {
            // The call whose disk filled: what it claims matches what is there.
            match rec.as_str() {
                "partial" => {
                    assert_eq!(live.len(), 1, "{recs:?}");
                    assert_eq!(live[0].state.as_str(), "partial");
                    assert!(live[0].duration_ms >= 1000, "{recs:?}");
                }
                "not-recorded" => assert!(live.is_empty(), "{recs:?}"),
                other => panic!("the call cut by the full disk says {other}"),
            }
        }
    }
    assert_no_orphans(&var);
    drop(store);
    for l in daemon
        .logs()
        .iter()
        .filter(|l| l.contains("store_link") && (l.contains("\"WARN\"") || l.contains("writable")))
    {
        eprintln!("{l}");
    }
    eprintln!(
        "the call cut by the full disk: {}",
        rows.iter()
            .find(|r| r.call_id != first["call_id"] && !full_ids.contains(&r.call_id))
            .and_then(|r| r.recording)
            .map_or("?", |r| r.as_str())
    );

    // 5. kill -9, what a crash around a full disk leaves, restart.
    drop(daemon);
    let (unindexed, stuck_file) = plant_orphans(&var);
    let daemon = Daemon::spawn(&text);
    wait_ready(&daemon);
    assert_orphans_gone(&daemon, &var, &unindexed, &stuck_file);
    drop(daemon);
}

/// Sends an INVITE from `sock` and returns the first final response's status line
/// and text.
fn invite_final(sock: &UdpSocket, target: std::net::SocketAddr, n: u32) -> String {
    let from = sock.local_addr().unwrap();
    let body = "v=0\r\no=x 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\n\
                m=audio 4000 RTP/AVP 0\r\na=rtpmap:0 PCMU/8000\r\n";
    let invite = format!(
        "INVITE sip:+15551234567@{target} SIP/2.0\r\n\
         Via: SIP/2.0/UDP {from};branch=z9hG4bKfull{n}\r\n\
         From: <sip:+15550009999@127.0.0.1>;tag=f{n}\r\n\
         To: <sip:+15551234567@{target}>\r\n\
         Call-ID: full-{n}@127.0.0.1\r\n\
         CSeq: 1 INVITE\r\n\
         Contact: <sip:x@{from}>\r\n\
         Max-Forwards: 70\r\n\
         Content-Type: application/sdp\r\n\
         Content-Length: {}\r\n\r\n{body}",
        body.len()
    );
    sock.send_to(invite.as_bytes(), target).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut buf = [0u8; 4096];
    loop {
        let (len, _) = sock
            .recv_from(&mut buf)
            .expect("a final response within 5 s");
        let text = String::from_utf8_lossy(&buf[..len]).into_owned();
        let code: u16 = text
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or(0);
        if code >= 200 {
            return text;
        }
    }
}

#[test]
fn full_disk_rejects_when_the_tenant_says_so() {
    let Some(fs) = Tmpfs::mount("4m") else {
        return;
    };
    let var = fs.path().join("var");
    let daemon = Daemon::spawn(&profile(&var, "on_store_failure = \"reject\"\n"));
    wait_ready(&daemon);
    let target = daemon.udp_addr();
    let filler = fill(fs.path());
    assert!(
        daemon
            .wait_for_log(Duration::from_secs(10), |l| l
                .contains("store free space below min_free_mb"))
            .is_some(),
        "no watermark line"
    );
    let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
    for n in 0..3 {
        let resp = invite_final(&sock, target, n);
        assert!(resp.starts_with("SIP/2.0 503"), "{resp}");
        assert!(resp.contains("Retry-After: 30"), "{resp}");
    }
    let cdrs = daemon.wait_for_cdrs(3, Duration::from_secs(10));
    assert_eq!(cdrs.len(), 3, "{cdrs:#?}");
    for c in &cdrs {
        assert_eq!(c["result_code"], 503, "{c}");
        assert_eq!(c["cause"], "store-unavailable", "{c}");
        assert_eq!(c["recording"], "not-recorded", "{c}");
        assert_eq!(c["recorded"], false, "{c}");
    }

    // Space again: calls are answered (and recorded) again.
    std::fs::remove_file(&filler).unwrap();
    assert!(
        daemon
            .wait_for_log(Duration::from_secs(10), |l| l
                .contains("store writable again"))
            .is_some(),
        "the store did not become writable again"
    );
    let r = sipp(
        &sipp_scenario("basic_call.xml"),
        target,
        &["-s", "+15551234567", "-m", "1"],
    );
    r.assert_success();
    let answered = daemon
        .wait_for_cdr(Duration::from_secs(10), |c| c["result_code"] == 200)
        .expect("answered CDR");
    assert_eq!(answered["recording"], "recorded", "{answered}");
    let rows = wait_for_closed_rows(&var.join("sipbridge.db"), 4);
    let refused = rows.iter().filter(|r| r.result_code == Some(503)).count();
    assert_eq!(refused, 3, "{rows:#?}");
    assert_no_orphans(&var);
}
