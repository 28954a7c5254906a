#![allow(clippy::unwrap_used, clippy::expect_used)]
//! Recording downloads under load (issue 15): 21 clients that request a
//! download and never read hold no daemon thread, do not stop a fresh
//! download (byte-identical to the store's own export) nor a SIPp call, fill
//! the tenant's download cap (the next request gets 429 with `Retry-After`),
//! and are cut at `download_deadline_s`, after which the cap's slots are free
//! again.

mod common;

use common::http::{self, Response};
use common::{Daemon, ProfileSpec, sipp, sipp_scenario};
use rand::SeedableRng;
use sipbridge::store::crypto::KeyRing;
use sipbridge::store::db::{CallRow, CallerIdPolicy, RecordingRow, RecordingState, Store, unix_ms};
use sipbridge::store::recording::{RecordingDate, RecordingWriter, export_wav};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

const ADMIN_TOKEN: &str = "sbadm_ZG93bmxvYWRzLWFkbWluLXRva2VuLTE";
/// 90 s of stereo audio: 2.9 MB, far more than a stalled client's socket
/// buffers (4 KiB asked for) and hyper's write buffer hold.
const FRAMES: usize = 8000 * 90;
const DEADLINE_S: u64 = 40;
const STALLED: usize = 21;

/// Writes a master key and one complete recording of `demo` under `var`;
/// returns its id and path.
fn seed(var: &Path) -> (String, PathBuf, KeyRing) {
    let master = [0x5au8; 32];
    std::fs::write(var.join("master.key"), master).unwrap();
    let keyring = KeyRing::open(var, &master).unwrap();
    let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(15);
    let key = keyring.data_key("demo", &mut rng).unwrap();
    let now = unix_ms(std::time::SystemTime::now());
    let mut w = RecordingWriter::create(
        var,
        &key,
        RecordingDate::new(2026, 12, 7).unwrap(),
        (now / 1000) as u64,
        &mut rng,
    )
    .unwrap();
    let left: Vec<i16> = (0..8000).map(|i| ((i % 400) as i16 - 200) * 50).collect();
    let right: Vec<i16> = (0..8000).map(|i| ((i % 90) as i16) * -70).collect();
    for _ in 0..FRAMES / 8000 {
        w.push(&left, &right).unwrap();
    }
    let sum = w.finish().unwrap();
    let id = sum.file_id.to_hex();
    let mut store = Store::open(&var.join("sipbridge.db")).unwrap();
    store.set_caller_policy("demo", CallerIdPolicy::Plain);
    store
        .insert_call(&CallRow {
            call_id: "download-call".into(),
            tenant: "demo".into(),
            trunk: "local".into(),
            from: "+15550001111".into(),
            to: "+15551230000".into(),
            started_at: now,
        })
        .unwrap();
    store
        .insert_recording(&RecordingRow {
            id: id.clone(),
            call_id: "download-call".into(),
            tenant: "demo".into(),
            path: sum.path.clone(),
            key_id: key.id().to_string(),
            created_at: now,
        })
        .unwrap();
    store
        .set_recording_state(&id, RecordingState::Complete, sum.bytes, 90_000)
        .unwrap();
    (id, sum.path, keyring)
}

/// Threads of process `pid` (`/proc/PID/status`).
fn threads(pid: u32) -> usize {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("Threads:"))
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

/// CPU time (user + system, clock ticks) of process `pid`.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Fields after the command's closing parenthesis; utime and stime are
    // the 14th and 15th of the whole line.
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = rest.split(' ').collect();
    f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap()
}

/// Waits until process `pid` uses under 5% of a core over half a second;
/// panics if it is still busy at `until`.
fn wait_idle(pid: u32, until: Instant) {
    let mut last = cpu_ticks(pid);
    loop {
        std::thread::sleep(Duration::from_millis(500));
        let now = cpu_ticks(pid);
        if now - last <= 2 {
            return;
        }
        assert!(
            Instant::now() < until,
            "the daemon stays busy with stalled downloads"
        );
        last = now;
    }
}

/// Sends `GET path` on a socket with a 4 KiB receive buffer and never reads.
fn stalled_get(addr: SocketAddr, path: &str) -> TcpStream {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let s = rt.block_on(async {
        let sock = tokio::net::TcpSocket::new_v4().unwrap();
        sock.set_recv_buffer_size(4096).unwrap();
        let s = sock.connect(addr).await.unwrap();
        s.into_std().unwrap()
    });
    s.set_nonblocking(false).unwrap();
    let mut s = s;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    s
}

fn download(addr: SocketAddr, url: &str) -> Response {
    http::get(addr, url, None)
}

#[test]
fn privacy_stalled_downloads_hold_no_thread_and_end_at_their_deadline() {
    let dir = tempfile::tempdir().unwrap();
    let var = dir.path().join("var");
    std::fs::create_dir(&var).unwrap();
    let (id, path, keyring) = seed(&var);
    let expected = export_wav(&path, &keyring).unwrap();
    assert_eq!(expected.len(), 44 + FRAMES * 4);

    let profile = ProfileSpec::default()
        .render()
        .replace(
            "var_dir = \"var\"",
            &format!(
                "var_dir = {}",
                toml::Value::String(var.display().to_string())
            ),
        )
        .replace(
            "[profile.sip]",
            &format!(
                "[profile.admin]\nlisten = \"127.0.0.1:0\"\ntoken = \"env:SB_ADMIN_TOKEN\"\n\
                 download_deadline_s = {DEADLINE_S}\nmax_downloads_per_tenant = {STALLED}\n\n[profile.sip]"
            ),
        );
    let daemon = Daemon::spawn_with_env(&profile, &[("SB_ADMIN_TOKEN", ADMIN_TOKEN)]);
    let addr = daemon.admin_addr();
    let link = http::request(
        addr,
        "POST",
        &format!("/v1/recordings/{id}/link"),
        &[
            ("Authorization", &format!("Bearer {ADMIN_TOKEN}")),
            ("Content-Type", "application/json"),
        ],
        br#"{"ttl_s": 600}"#,
    );
    assert_eq!(link.status, 201, "{}", link.text());
    let url = link.json()["url"].as_str().unwrap().to_owned();
    // The daemon idle: its runtime's workers and what start-up left.
    std::thread::sleep(Duration::from_millis(500));
    let idle_threads = threads(daemon.pid());

    // 20 clients ask and never read, while a fresh download and a call run.
    let stall_start = Instant::now();
    let mut stalled: Vec<TcpStream> = (0..STALLED - 1).map(|_| stalled_get(addr, &url)).collect();
    // Each fills its socket buffers once, then costs nothing: the daemon
    // goes idle with 20 downloads open.
    wait_idle(
        daemon.pid(),
        stall_start + Duration::from_secs(DEADLINE_S / 2),
    );

    let fresh_start = Instant::now();
    let fresh = download(addr, &url);
    eprintln!(
        "fresh download with {} stalled: {:?}",
        STALLED - 1,
        fresh_start.elapsed()
    );
    assert_eq!(fresh.status, 200, "{}", fresh.text());
    assert_eq!(fresh.header("connection"), Some("close"));
    assert_eq!(
        fresh.body.len(),
        expected.len(),
        "the fresh download is whole"
    );
    assert!(fresh.body == expected, "and decrypts to the stored audio");

    sipp(
        &sipp_scenario("basic_call.xml"),
        daemon.udp_addr(),
        &["-s", "+15551230000"],
    )
    .assert_success();

    // One more stalled client fills the cap; the next request is refused.
    stalled.push(stalled_get(addr, &url));
    std::thread::sleep(Duration::from_millis(500));
    let refused = download(addr, &url);
    assert_eq!(refused.status, 429, "{}", refused.text());
    assert_eq!(refused.header("retry-after"), Some("5"));

    // No thread waits for a client that does not read: once the blocking
    // pool's idle threads expire (10 s), the daemon is back near idle,
    // while 21 downloads are still open.
    let check_until = stall_start + Duration::from_secs(DEADLINE_S - 3);
    let mut now_threads = threads(daemon.pid());
    while now_threads > idle_threads + 8 && Instant::now() < check_until {
        std::thread::sleep(Duration::from_millis(500));
        now_threads = threads(daemon.pid());
    }
    eprintln!(
        "daemon threads: {idle_threads} idle, {now_threads} with {STALLED} stalled downloads"
    );
    assert!(
        now_threads <= idle_threads + 8,
        "{now_threads} threads with {STALLED} stalled downloads (idle: {idle_threads})"
    );
    assert!(
        Instant::now() < stall_start + Duration::from_secs(DEADLINE_S),
        "the check ran before the deadline"
    );
    let cut = |daemon: &Daemon| {
        daemon
            .logs()
            .iter()
            .filter(|l| l.contains("recording download cut"))
            .count()
    };
    assert_eq!(cut(&daemon), 0, "nothing cut before the deadline");

    // At the deadline each stalled download is cut: its connection ends
    // with the file incomplete.
    let deadline = stall_start + Duration::from_secs(DEADLINE_S + 30);
    loop {
        let n = cut(&daemon);
        if n == STALLED {
            break;
        }
        assert!(Instant::now() < deadline, "{n} of {STALLED} downloads cut");
        std::thread::sleep(Duration::from_millis(200));
    }
    // Each at its own deadline: the daemon logs how long the body lived
    // (from after the request's checks, so a little under the deadline).
    let lived: Vec<u64> = daemon
        .logs()
        .iter()
        .filter(|l| l.contains("recording download cut"))
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            v["after_ms"].as_str().unwrap().parse().unwrap()
        })
        .collect();
    eprintln!("stalled downloads cut after (ms): {lived:?}");
    for ms in lived {
        assert!(
            (DEADLINE_S * 1000 - 5000..=DEADLINE_S * 1000 + 15_000).contains(&ms),
            "a stalled download cut after {ms} ms, the deadline is {DEADLINE_S} s"
        );
    }
    for mut s in stalled {
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut got = Vec::new();
        // A reset is as good as an end here.
        let _ = s.read_to_end(&mut got);
        assert!(
            got.len() < expected.len(),
            "a stalled client got the whole file ({} bytes)",
            got.len()
        );
    }

    // The cap's slots are free again.
    let again_start = Instant::now();
    let again = download(addr, &url);
    eprintln!("download with none stalled: {:?}", again_start.elapsed());
    assert_eq!(again.status, 200, "{}", again.text());
    assert!(again.body == expected);
}
