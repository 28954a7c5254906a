//! Helpers for the daemon lifecycle tests (issue 7): a stand-in for systemd's notify
//! socket that records every datagram the daemon sends, signals, and reading a child's
//! exit status without reaping it.
//!
//! Owns: nothing of the daemon's; used beside `tests/common` (which spawns it).

#![allow(dead_code)]
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

/// A unix datagram socket standing in for `$NOTIFY_SOCKET`: every datagram is kept
/// with the time it arrived.
pub(crate) struct NotifySocket {
    _dir: tempfile::TempDir,
    path: PathBuf,
    received: Arc<Mutex<Vec<(Instant, String)>>>,
}

impl NotifySocket {
    pub(crate) fn bind() -> NotifySocket {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify.sock");
        let sock = UnixDatagram::bind(&path).unwrap();
        sock.set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        let received = Arc::new(Mutex::new(Vec::new()));
        let sink = Arc::clone(&received);
        thread::spawn(move || {
            let mut buf = vec![0u8; 4096];
            // Ends when the test (and its sink) is gone.
            while Arc::strong_count(&sink) > 1 {
                if let Ok(n) = sock.recv(&mut buf) {
                    let text = String::from_utf8_lossy(&buf[..n]).into_owned();
                    sink.lock().unwrap().push((Instant::now(), text));
                }
            }
        });
        NotifySocket {
            _dir: dir,
            path,
            received,
        }
    }

    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    pub(crate) fn path_str(&self) -> &str {
        self.path.to_str().unwrap()
    }

    /// Every datagram so far.
    pub(crate) fn all(&self) -> Vec<(Instant, String)> {
        self.received.lock().unwrap().clone()
    }

    /// Datagrams so far, without their times.
    pub(crate) fn messages(&self) -> Vec<String> {
        self.all().into_iter().map(|(_, m)| m).collect()
    }

    /// Waits up to `timeout` for a datagram at index `from` or later that satisfies
    /// `pred`; returns its index.
    pub(crate) fn wait_for(
        &self,
        from: usize,
        timeout: Duration,
        pred: impl Fn(&str) -> bool,
    ) -> Option<usize> {
        let deadline = Instant::now() + timeout;
        loop {
            let found = self
                .received
                .lock()
                .unwrap()
                .iter()
                .enumerate()
                .skip(from)
                .find(|(_, (_, m))| pred(m))
                .map(|(i, _)| i);
            if found.is_some() || Instant::now() >= deadline {
                return found;
            }
            thread::sleep(Duration::from_millis(10));
        }
    }
}

/// The value of `KEY=` in a notification datagram (one assignment per line).
pub(crate) fn field<'a>(message: &'a str, key: &str) -> Option<&'a str> {
    message
        .lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix('='))
}

/// `kill -SIGNAL pid`.
pub(crate) fn signal(pid: u32, signal: &str) {
    let status = Command::new("kill")
        .args([signal, &pid.to_string()])
        .status()
        .unwrap();
    assert!(status.success(), "kill {signal} {pid}: {status}");
}

/// What `/proc/PID/stat` says about a process: its state letter and, once it is a zombie,
/// its wait status (field 52, `exit_code`, in `waitpid(2)` form). `None` once it is gone.
fn proc_state(pid: u32) -> Option<(char, i32)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name, which is in parentheses and may hold spaces.
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let state = fields.first()?.chars().next()?;
    // `rest` starts at field 3 (state), so field 52 is at index 49.
    let wait_status = fields.get(49)?.parse().ok()?;
    Some((state, wait_status))
}

/// Waits up to `timeout` for the (unreaped) child `pid` to exit and returns its wait
/// status (0: exit 0). Nothing reaps the harness's daemon until its `Drop`, so it stays
/// a zombie meanwhile.
pub(crate) fn wait_for_exit(pid: u32, timeout: Duration) -> Option<i32> {
    let deadline = Instant::now() + timeout;
    loop {
        match proc_state(pid) {
            Some(('Z', status)) => return Some(status),
            Some(_) => {}
            None => panic!("process {pid} vanished: something reaped it"),
        }
        if Instant::now() >= deadline {
            return None;
        }
        thread::sleep(Duration::from_millis(20));
    }
}

/// Whether the (unreaped) child `pid` is still running.
pub(crate) fn running(pid: u32) -> bool {
    matches!(proc_state(pid), Some((state, _)) if state != 'Z')
}

/// The `message` field of one of the daemon's JSON log lines.
pub(crate) fn log_message(line: &str) -> Option<String> {
    let value: serde_json::Value = serde_json::from_str(line).ok()?;
    let fields = match value.get("fields") {
        Some(fields) if fields.is_object() => fields,
        _ => &value,
    };
    Some(fields.get("message")?.as_str()?.to_string())
}

/// A JSON log line's field (under `fields` or at the top level), as a string.
pub(crate) fn log_field(line: &str, key: &str) -> Option<String> {
    let value: serde_json::Value = serde_json::from_str(line).ok()?;
    let fields = match value.get("fields") {
        Some(fields) if fields.is_object() => fields,
        _ => &value,
    };
    let v = fields.get(key)?;
    Some(v.as_str().map_or_else(|| v.to_string(), str::to_owned))
}

/// Sends one out-of-dialog `method` request (INVITE with an SDP offer, or OPTIONS) for
/// `number` over UDP from 127.0.0.1 and returns the first final response (status ≥ 200)
/// the daemon sends back within 5 s, as text.
pub(crate) fn udp_request(daemon: std::net::SocketAddr, method: &str, number: &str) -> String {
    let sock = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let local = sock.local_addr().unwrap();
    let sdp = "v=0\r\no=- 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\n\
               m=audio 40000 RTP/AVP 0\r\na=rtpmap:0 PCMU/8000\r\n";
    let body = if method == "INVITE" { sdp } else { "" };
    let content_type = if body.is_empty() {
        String::new()
    } else {
        "Content-Type: application/sdp\r\n".to_owned()
    };
    let tag = std::process::id();
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    let msg = format!(
        "{method} sip:{number}@{daemon} SIP/2.0\r\n\
         Via: SIP/2.0/UDP {local};branch=z9hG4bK{nanos}\r\n\
         From: <sip:+15550001111@{local}>;tag={tag}\r\n\
         To: <sip:{number}@{daemon}>\r\n\
         Call-ID: lifecycle-{nanos}@127.0.0.1\r\n\
         CSeq: 1 {method}\r\n\
         Contact: <sip:+15550001111@{local}>\r\n\
         Max-Forwards: 70\r\n\
         {content_type}Content-Length: {}\r\n\r\n{body}",
        body.len()
    );
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut next_send = Instant::now();
    let mut buf = vec![0u8; 65_536];
    while Instant::now() < deadline {
        if Instant::now() >= next_send {
            sock.send_to(msg.as_bytes(), daemon).unwrap();
            next_send = Instant::now() + Duration::from_millis(500);
        }
        if let Ok((n, _)) = sock.recv_from(&mut buf) {
            let text = String::from_utf8_lossy(&buf[..n]).into_owned();
            let status: u16 = text
                .split_whitespace()
                .nth(1)
                .and_then(|s| s.parse().ok())
                .unwrap_or(0);
            if status >= 200 {
                return text;
            }
        }
    }
    panic!("no final response to {method} from {daemon} within 5 s");
}

/// The status code of a response's status line.
pub(crate) fn status_of(response: &str) -> u16 {
    response
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

/// A header's value in a response (case-insensitive name, first occurrence).
pub(crate) fn header<'a>(response: &'a str, name: &str) -> Option<&'a str> {
    response.lines().find_map(|l| {
        let (n, v) = l.split_once(':')?;
        n.trim().eq_ignore_ascii_case(name).then(|| v.trim())
    })
}

/// A test profile (from `tests/common`) with `[profile] drain_grace_s = secs`.
pub(crate) fn with_drain_grace(profile: &str, secs: u32) -> String {
    let anchor = "max_calls = ";
    let at = profile.find(anchor).expect("the profile has max_calls");
    let mut out = profile.to_owned();
    out.insert_str(at, &format!("drain_grace_s = {secs}\n"));
    out
}

/// `call_with_audio.xml` holding the call `pause_ms` after the audio starts (instead of
/// 3.5 s), written into `dir`.
pub(crate) fn held_call_scenario(dir: &Path, pause_ms: u32) -> PathBuf {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/sipp/call_with_audio.xml");
    let text = std::fs::read_to_string(path).unwrap();
    let pcap = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/pcap/caller1_pcmu.pcap");
    let text = text
        .replace(
            "../../fixtures/pcap/caller1_pcmu.pcap",
            pcap.to_str().unwrap(),
        )
        .replace(
            "<pause milliseconds=\"3500\"/>",
            &format!("<pause milliseconds=\"{pause_ms}\"/>"),
        );
    let out = dir.join(format!("held_{pause_ms}.xml"));
    std::fs::write(&out, text).unwrap();
    out
}
