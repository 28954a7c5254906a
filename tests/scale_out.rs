#![allow(clippy::unwrap_used, clippy::expect_used)]
//! Scale-out (issue 16): Kamailio with the shipped
//! `sip-profiles/examples/kamailio-dispatcher.cfg` in front of two `sipbridge run`
//! daemons, SIPp as the carrier, all real processes on loopback.
//!
//! [`kamailio_spreads_drains_and_fails_over_between_two_daemons`], in four phases:
//! 0. both daemons share one PostgreSQL store (`common::pg`, one master key) and one
//!    S3-compatible bucket (moto's server, `common::s3`): six calls with the caller's
//!    audio to a recording tenant, spread over both; each recording is an object in the
//!    bucket with no RIFF header and no run of the caller's audio, listed by
//!    `sipbridge recordings list` on either daemon and downloadable through a signed
//!    link from either (decrypting to the caller's audio); erasing a call through the
//!    daemon that did not take it deletes its object from the bucket;
//! 1. 200 calls through Kamailio: 0 failed, both daemons answered some (their CDRs);
//! 2. 3-second calls; node A gets SIGTERM mid-run (long `drain_grace_s`): its live
//!    calls end normally (caller's BYE, 200), every INVITE it sees afterwards is
//!    answered 503 and retried on B by the failure route, its OPTIONS answers take it
//!    out of the set, SIPp counts 0 failed, and A exits by itself once idle;
//! 3. A is started again on its port (the dispatcher's pings bring it back); node B
//!    gets SIGKILL mid-run: the dispatcher marks it down within its ping interval plus
//!    the ping's timeout, no call is sent to it after that, and the only failed calls
//!    are those that were up on B when it died.
//!
//! Kamailio listens on 127.0.0.2 and is the daemons' only trusted proxy; the trunk
//! allows 127.0.0.1 (SIPp) alone, so every call's trunk is found from the `X-Src-IP`
//! header Kamailio adds — without it the proxy's own address would match no trunk.
//!
//! Owns: the Kamailio process helper for the dispatcher config (log lines stamped
//! with the moment the test read them).

mod common;

use std::collections::HashSet;
use std::io::{BufRead, BufReader, Read};
use std::net::{SocketAddr, UdpSocket};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant, SystemTime};

use common::pg::PgServer;
use common::s3::S3Server;
use common::{Daemon, ProfileSpec, SippResult, free_port, http, repo_path, sipp, sipp_scenario};
use sipbridge::media::g711;

/// The dispatcher's OPTIONS interval in the test (seconds).
const PING_INTERVAL_S: u64 = 1;
/// How long Kamailio waits for any answer before the next node (ms); also the
/// timeout of a ping.
const NODE_TIMEOUT_MS: u64 = 1000;
/// Where Kamailio listens: another loopback address than SIPp's and the daemons'.
const PROXY_IP: &str = "127.0.0.2";
/// The number of the recording tenant `rec` (every other number reaches `demo`).
const RECORDED_NUMBER: &str = "15559990000";
/// The daemons' admin token.
const ADMIN_TOKEN: &str = "admin-token-of-the-scale-out-test";

// ---------------------------------------------------------------------------------------
// Kamailio
// ---------------------------------------------------------------------------------------

/// Kamailio in the foreground with the shipped dispatcher config, one worker (so a 180
/// and a 200 sent back to back keep their order for SIPp), on a free port of
/// [`PROXY_IP`], dispatching to `nodes`. Stopped on drop.
struct Kamailio {
    child: Child,
    _dir: tempfile::TempDir,
    addr: SocketAddr,
    log: Arc<Mutex<Vec<(Instant, String)>>>,
}

impl Kamailio {
    fn start(nodes: &[SocketAddr]) -> Kamailio {
        let cfg = repo_path("sip-profiles/examples/kamailio-dispatcher.cfg");
        for _attempt in 1..=3 {
            let dir = tempfile::tempdir().unwrap();
            let list: String = nodes.iter().map(|n| format!("1 sip:{n}\n")).collect();
            let list_path = dir.path().join("dispatcher.list");
            std::fs::write(&list_path, list).unwrap();
            let port = {
                let s = UdpSocket::bind(format!("{PROXY_IP}:0")).unwrap();
                s.local_addr().unwrap().port()
            };
            let addr: SocketAddr = format!("{PROXY_IP}:{port}").parse().unwrap();
            let mut child = Command::new("kamailio")
                .arg("-f")
                .arg(&cfg)
                .args(["-DD", "-E", "-m", "64", "-M", "8", "-w"])
                .arg(dir.path())
                .arg("-Y")
                .arg(dir.path())
                .arg("-P")
                .arg(dir.path().join("kamailio.pid"))
                .arg("-A")
                .arg(format!("LISTEN=udp:{addr}"))
                .arg("-A")
                .arg(format!("DSLIST=\"{}\"", list_path.display()))
                .arg("-A")
                .arg(format!("PING_INTERVAL={PING_INTERVAL_S}"))
                .arg("-A")
                .arg(format!("NODE_TIMEOUT_MS={NODE_TIMEOUT_MS}"))
                .arg("-A")
                .arg("WORKERS=1")
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .expect("spawn kamailio (bash scripts/install-test-deps.sh installs it)");
            let log = Arc::new(Mutex::new(Vec::new()));
            for stream in [
                Box::new(child.stdout.take().unwrap()) as Box<dyn Read + Send>,
                Box::new(child.stderr.take().unwrap()),
            ] {
                let log = Arc::clone(&log);
                thread::spawn(move || {
                    for line in BufReader::new(stream).lines() {
                        let Ok(line) = line else { break };
                        log.lock().unwrap().push((Instant::now(), line));
                    }
                });
            }
            let mut kam = Kamailio {
                child,
                _dir: dir,
                addr,
                log,
            };
            if kam.wait_ready() {
                return kam;
            }
            eprintln!("kamailio not ready; log:\n{}", kam.log());
        }
        panic!("kamailio did not start");
    }

    /// Kamailio answers an OPTIONS to itself. Up to 10 s.
    fn wait_ready(&mut self) -> bool {
        let probe = UdpSocket::bind("127.0.0.1:0").unwrap();
        probe
            .set_read_timeout(Some(Duration::from_millis(300)))
            .unwrap();
        let port = probe.local_addr().unwrap().port();
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut n = 0;
        let mut buf = [0u8; 4096];
        while Instant::now() < deadline {
            if !matches!(self.child.try_wait(), Ok(None)) {
                return false;
            }
            n += 1;
            let options = format!(
                "OPTIONS sip:{addr} SIP/2.0\r\n\
Via: SIP/2.0/UDP 127.0.0.1:{port};branch=z9hG4bK-ready-{n};rport\r\n\
Max-Forwards: 70\r\n\
From: <sip:probe@127.0.0.1>;tag=probe\r\n\
To: <sip:{addr}>\r\n\
Call-ID: ready-{n}\r\n\
CSeq: {n} OPTIONS\r\n\
Content-Length: 0\r\n\r\n",
                addr = self.addr
            );
            probe.send_to(options.as_bytes(), self.addr).unwrap();
            if let Ok((len, _)) = probe.recv_from(&mut buf)
                && buf[..len].starts_with(b"SIP/2.0 200")
            {
                return true;
            }
        }
        false
    }

    fn log(&self) -> String {
        self.log
            .lock()
            .unwrap()
            .iter()
            .map(|(_, l)| l.as_str())
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// Log lines containing `needle`, with the moment each was read.
    fn lines_with(&self, needle: &str) -> Vec<(Instant, String)> {
        self.log
            .lock()
            .unwrap()
            .iter()
            .filter(|(_, l)| l.contains(needle))
            .cloned()
            .collect()
    }

    /// Waits up to `timeout` for a line containing `event` (`node down`, `node up`) and
    /// `needle`, read at or after `since`.
    fn wait_for(
        &self,
        since: Instant,
        event: &str,
        needle: &str,
        timeout: Duration,
    ) -> Option<Instant> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some((at, _)) = self
                .lines_with(needle)
                .into_iter()
                .find(|(at, l)| *at >= since && l.contains(event))
            {
                return Some(at);
            }
            if Instant::now() >= deadline {
                return None;
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// Call-IDs Kamailio sent to `node` (its `call ID to sip:NODE` lines), with when.
    fn calls_to(&self, node: SocketAddr) -> Vec<(Instant, String)> {
        let suffix = format!(" to sip:{node}");
        self.lines_with(&suffix)
            .into_iter()
            .filter_map(|(at, l)| {
                let rest = &l[l.find("call ")? + 5..];
                let id = rest.strip_suffix(&suffix)?;
                Some((at, id.to_owned()))
            })
            .collect()
    }
}

impl Drop for Kamailio {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if !matches!(self.child.try_wait(), Ok(None)) {
                break;
            }
            thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        if thread::panicking() {
            eprintln!("---- kamailio log ----\n{}", self.log());
        }
    }
}

// ---------------------------------------------------------------------------------------
// The daemons
// ---------------------------------------------------------------------------------------

/// A daemon's profile: UDP on `port`, the trunk allowing SIPp's 127.0.0.1 only and
/// no longer dedicated to `demo`, Kamailio's address a trusted proxy, unknown sources
/// dropped, a long drain, the admin API, a recording tenant `rec` for
/// [`RECORDED_NUMBER`] with its recordings in `s3`. `node` names its RTP range.
fn node_profile(node: &str, port: u16, s3: &S3Server, shared: &Path) -> String {
    let prompt = toml::Value::String(
        repo_path("sip-profiles/prompts/disclosure.wav")
            .display()
            .to_string(),
    );
    let routes = format!(
        "[[route]]\nnumber = \"{RECORDED_NUMBER}\"\ntenant = \"rec\"\n\n\
         [[route]]\nnumber = \"*\"\ntenant = \"demo\"\n"
    );
    let extra = format!(
        "[[tenant]]\nid = \"rec\"\nrecording = true\ntranscripts = false\nprompt = {prompt}\n\
         pipeline = {{ kind = \"echo\" }}\n\n\
         [profile.security]\nunknown_source = \"drop\"\ntrusted_proxies = [\"{PROXY_IP}\"]\n\n\
         [profile.admin]\nlisten = \"127.0.0.1:0\"\ntoken = \"env:SB_ADMIN_TOKEN\"\n\n\
         [profile.store]\nkind = \"postgres\"\nurl = \"file:{}\"\n\n{}",
        shared.join("pg-url").display(),
        s3.recordings_section()
    );
    let text = ProfileSpec {
        max_calls: 50,
        routes: Some(&routes),
        extra: &extra,
        ..ProfileSpec::default()
    }
    .render_for(&format!("scale_out::{node}"));
    let text = text
        .replace(
            "udp = [\"127.0.0.1:0\"]",
            &format!("udp = [\"127.0.0.1:{port}\"]"),
        )
        .replace(
            "allow = [\"127.0.0.0/8\"]\ntenant = \"demo\"\n",
            "allow = [\"127.0.0.1/32\"]\n",
        )
        .replace(
            "max_calls = 50\n",
            &format!(
                "max_calls = 50\ndrain_grace_s = 60\nmaster_key = \"file:{}\"\n",
                shared.join("master.key").display()
            ),
        );
    assert!(text.contains(&format!("127.0.0.1:{port}")), "{text}");
    assert!(
        text.contains("127.0.0.1/32") && text.contains("drain_grace_s"),
        "{text}"
    );
    text
}

fn spawn_node(node: &str, port: u16, s3: &S3Server, shared: &Path) -> Daemon {
    Daemon::spawn_with_env(
        &node_profile(node, port, s3, shared),
        &[("SB_ADMIN_TOKEN", ADMIN_TOKEN)],
    )
}

// ---------------------------------------------------------------------------------------
// Recordings
// ---------------------------------------------------------------------------------------

/// `proxy_call.xml` with caller1's audio (PCMU, 2.92 s) played after the ACK and the
/// BYE 3.5 s later.
fn audio_scenario(dir: &Path) -> std::path::PathBuf {
    let xml = std::fs::read_to_string(sipp_scenario("proxy_call.xml")).unwrap();
    let pcap = repo_path("fixtures/pcap/caller1_pcmu.pcap");
    let play = format!(
        "<nop>\n    <action>\n      <exec play_pcap_audio=\"{}\"/>\n    </action>\n  </nop>\n\n  \
         <pause milliseconds=\"3500\"/>",
        pcap.display()
    );
    assert!(xml.contains("<pause milliseconds=\"500\"/>"));
    let path = dir.join("proxy_call_audio.xml");
    std::fs::write(&path, xml.replace("<pause milliseconds=\"500\"/>", &play)).unwrap();
    path
}

fn caller1_pcm() -> Vec<i16> {
    std::fs::read(repo_path("fixtures/audio/caller1.ulaw"))
        .unwrap()
        .iter()
        .map(|&c| g711::mu_to_linear(c))
        .collect()
}

/// 16-byte windows of the caller's audio, as µ-law and as 16-bit PCM (windows with at
/// least 8 distinct bytes: silence would match anything).
fn caller_windows() -> HashSet<[u8; 16]> {
    let mut set = HashSet::new();
    let mut add = |bytes: &[u8], step: usize| {
        let mut i = 0;
        while i + 16 <= bytes.len() {
            let w: [u8; 16] = bytes[i..i + 16].try_into().unwrap();
            if w.iter().collect::<HashSet<_>>().len() >= 8 {
                set.insert(w);
            }
            i += step;
        }
    };
    add(
        &std::fs::read(repo_path("fixtures/audio/caller1.ulaw")).unwrap(),
        1,
    );
    let pcm: Vec<u8> = caller1_pcm().iter().flat_map(|s| s.to_le_bytes()).collect();
    add(&pcm, 2);
    set
}

/// `sipbridge recordings list` of a daemon's profile: (recording id, call id) per row.
fn recordings_list(d: &Daemon) -> Vec<(String, String)> {
    let out = Command::new(env!("CARGO_BIN_EXE_sipbridge"))
        .args(["recordings", "list", "--config", "profile.toml"])
        .current_dir(d.dir())
        .env("SB_ADMIN_TOKEN", ADMIN_TOKEN)
        .env_remove("CREDENTIALS_DIRECTORY")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "recordings list: {text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    text.lines()
        .skip(1)
        .filter_map(|l| {
            let mut cols = l.split_whitespace();
            let id = cols.next()?.to_owned();
            let _tenant = cols.next()?;
            Some((id, cols.next()?.to_owned()))
        })
        .collect()
}

/// A signed link to recording `id` from `d`'s admin API, and what it serves.
fn download(d: &Daemon, id: &str) -> http::Response {
    let link = http::request(
        d.admin_addr(),
        "POST",
        &format!("/v1/recordings/{id}/link"),
        &[
            ("Authorization", &format!("Bearer {ADMIN_TOKEN}")),
            ("Content-Type", "application/json"),
        ],
        br#"{"ttl_s": 600}"#,
    );
    if link.status != 201 {
        return link;
    }
    let url = link.json()["url"].as_str().unwrap().to_owned();
    http::get(d.admin_addr(), &url, None)
}

fn signal(daemon: &Daemon, sig: &str) {
    let status = Command::new("kill")
        .args([sig, &daemon.pid().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
}

/// Answered calls (CDR result 200) of tenant `demo` in a daemon's log.
fn answered(d: &Daemon) -> Vec<serde_json::Value> {
    d.cdrs()
        .into_iter()
        .filter(|c| c["result_code"] == 200 && c["tenant"] == "demo")
        .collect()
}

fn unix_ms(t: SystemTime) -> u64 {
    u64::try_from(
        t.duration_since(SystemTime::UNIX_EPOCH)
            .unwrap()
            .as_millis(),
    )
    .unwrap()
}

/// Runs SIPp on a thread: `calls` calls of `scenario` at `rate` per second.
fn sipp_in_background(
    scenario: &Path,
    target: SocketAddr,
    calls: u32,
    rate: u32,
    limit: u32,
) -> thread::JoinHandle<SippResult> {
    let scenario = scenario.to_owned();
    thread::spawn(move || {
        sipp(
            &scenario,
            target,
            &[
                "-m",
                &calls.to_string(),
                "-r",
                &rate.to_string(),
                "-l",
                &limit.to_string(),
                "-s",
                "15551230000",
                "-timeout",
                "90s",
            ],
        )
    })
}

#[test]
fn kamailio_spreads_drains_and_fails_over_between_two_daemons() {
    let s3 = S3Server::start("recordings");
    let pg = PgServer::start();
    let shared = tempfile::tempdir().unwrap();
    std::fs::write(
        shared.path().join("pg-url"),
        pg.create_database("sipbridge"),
    )
    .unwrap();
    std::fs::write(
        shared.path().join("master.key"),
        "scale-out-test-master-key-32byte",
    )
    .unwrap();
    let (port_a, port_b) = (free_port(), free_port());
    let mut a = spawn_node("a", port_a, &s3, shared.path());
    let b = spawn_node("b", port_b, &s3, shared.path());
    let (addr_a, addr_b) = (a.udp_addr(), b.udp_addr());
    let kam = Kamailio::start(&[addr_a, addr_b]);
    let context = |kam: &Kamailio| format!("---- kamailio ----\n{}", kam.log());

    // ---- 0. recordings of calls on both daemons, in one bucket ------------------------
    let tmp = tempfile::tempdir().unwrap();
    let result = sipp(
        &audio_scenario(tmp.path()),
        kam.addr,
        &[
            "-m",
            "6",
            "-r",
            "2",
            "-l",
            "6",
            "-s",
            RECORDED_NUMBER,
            "-timeout",
            "60s",
        ],
    );
    assert!(
        result.succeeded() && result.successful_calls == Some(6),
        "phase 0:\n{}\n{}",
        result.report(),
        context(&kam)
    );
    // Which daemon took which recorded call: their CDRs.
    let took = |d: &Daemon| -> HashSet<String> {
        d.cdrs()
            .iter()
            .filter(|c| c["tenant"] == "rec" && c["result_code"] == 200)
            .filter_map(|c| c["call_id"].as_str().map(str::to_owned))
            .collect()
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    let (mut list_a, mut list_b) = (Vec::new(), Vec::new());
    while Instant::now() < deadline {
        (list_a, list_b) = (recordings_list(&a), recordings_list(&b));
        if list_a.len() == 6 && s3.list("recordings/").len() == 6 {
            break;
        }
        thread::sleep(Duration::from_millis(250));
    }
    let (took_a, took_b) = (took(&a), took(&b));
    assert!(
        !took_a.is_empty() && !took_b.is_empty() && took_a.len() + took_b.len() == 6,
        "recorded calls: A {took_a:?}, B {took_b:?}"
    );
    // One store: both daemons list all six.
    list_a.sort();
    list_b.sort();
    assert_eq!(list_a.len(), 6, "A lists {list_a:?}");
    assert_eq!(list_a, list_b, "the two daemons list different recordings");
    let keys = s3.list("recordings/");
    assert_eq!(keys.len(), 6, "bucket: {keys:?}");
    let plain = caller_windows();
    for key in &keys {
        let object = s3.get(key).unwrap();
        assert!(
            !object.windows(4).any(|w| w == b"RIFF"),
            "RIFF in object {key}"
        );
        assert!(
            !object.windows(16).any(|w| plain.contains(w)),
            "a run of the caller's audio is in object {key}"
        );
    }
    let caller = caller1_pcm();
    for (id, call_id) in &list_a {
        for (node, d) in [("A", &a), ("B", &b)] {
            let got = download(d, id);
            assert_eq!(
                got.status,
                200,
                "{id} ({call_id}) from {node}: {}",
                got.text()
            );
            let mut wav = hound::WavReader::new(std::io::Cursor::new(&got.body)).unwrap();
            let left: Vec<i16> = wav
                .samples::<i16>()
                .step_by(2)
                .map(Result::unwrap)
                .collect();
            // SIPp plays the pcap on a loaded host: matched in pieces (see
            // `pieces_found`), the first 2 s.
            let (found, pieces) = common::audio::pieces_found(&left, &caller[..16_000]);
            assert!(
                found >= 0.75,
                "{id} from {node}: caller pieces {pieces:.3?}"
            );
        }
    }
    // Erasure through the daemon that did not take the call deletes its object.
    let victim = took_a.iter().next().unwrap().clone();
    let erased = http::request(
        b.admin_addr(),
        "POST",
        "/v1/erase",
        &[
            ("Authorization", &format!("Bearer {ADMIN_TOKEN}")),
            ("Content-Type", "application/json"),
        ],
        format!(r#"{{"tenant": "rec", "call": "{victim}", "reason": "data subject request"}}"#)
            .as_bytes(),
    );
    assert_eq!(erased.status, 200, "{}", erased.text());
    let left_keys = s3.list("recordings/");
    assert_eq!(
        left_keys.len(),
        5,
        "erasure from B of A's call: {left_keys:?}"
    );
    assert_eq!(recordings_list(&a).len(), 5);
    eprintln!(
        "phase 0: A took {}, B took {} recorded calls; both list {}; {} objects, 5 after \
         erasing one of A's through B",
        took_a.len(),
        took_b.len(),
        list_a.len(),
        keys.len()
    );

    // ---- 1. 200 calls, spread over both ---------------------------------------------
    let result = sipp_in_background(&sipp_scenario("proxy_call.xml"), kam.addr, 200, 20, 20)
        .join()
        .unwrap();
    assert!(
        result.succeeded() && result.successful_calls == Some(200),
        "phase 1:\n{}\n{}",
        result.report(),
        context(&kam)
    );
    let on_a = a.wait_for_cdrs(1, Duration::from_secs(5));
    let (n_a, n_b) = (answered(&a).len(), answered(&b).len());
    assert_eq!(n_a + n_b, 200, "{on_a:#?}");
    // Round robin: both nodes take a fair share.
    assert!(n_a >= 50 && n_b >= 50, "A {n_a}, B {n_b}");
    for c in answered(&a).iter().chain(answered(&b).iter()) {
        assert_eq!(c["cause"], "caller-bye", "{c}");
        assert_eq!(c["trunk"], "local", "{c}");
    }
    eprintln!("phase 1: A answered {n_a}, B {n_b}");

    // ---- 2. drain A mid-run ---------------------------------------------------------
    let long = tempfile::tempdir().unwrap();
    let long_scenario = long.path().join("proxy_call_3s.xml");
    let xml = std::fs::read_to_string(sipp_scenario("proxy_call.xml")).unwrap();
    assert!(xml.contains("<pause milliseconds=\"500\"/>"));
    std::fs::write(
        &long_scenario,
        xml.replace(
            "<pause milliseconds=\"500\"/>",
            "<pause milliseconds=\"3000\"/>",
        ),
    )
    .unwrap();
    let before_a = a.cdrs().len();
    let run = sipp_in_background(&long_scenario, kam.addr, 100, 10, 40);
    // 4 s in, about 20 calls went to A, the last 15 or so still up: drain it.
    thread::sleep(Duration::from_secs(4));
    let term_sent = SystemTime::now();
    let term_at = Instant::now();
    signal(&a, "-TERM");
    a.wait_for_log(Duration::from_secs(5), |l| l.contains("SIGTERM: draining"))
        .expect("A logs its drain");
    let draining_seen = unix_ms(SystemTime::now());
    let down_a = kam.wait_for(
        term_at,
        "node down",
        &format!("[sip:{addr_a}]"),
        Duration::from_secs(10),
    );
    let result = run.join().unwrap();
    assert!(
        result.succeeded() && result.successful_calls == Some(100),
        "phase 2 (drain):\n{}\n{}",
        result.report(),
        context(&kam)
    );
    assert!(down_a.is_some(), "A never taken out:\n{}", context(&kam));
    // A ends by itself once its last call is over.
    let deadline = Instant::now() + Duration::from_secs(20);
    while a.is_running() && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(100));
    }
    assert!(!a.is_running(), "A did not exit after draining");
    let after: Vec<_> = a.cdrs().into_iter().skip(before_a).collect();
    let ms = |c: &serde_json::Value, k: &str| c[k].as_u64();
    // Live calls at the SIGTERM went on to the caller's BYE.
    let live_at_term: Vec<_> = after
        .iter()
        .filter(|c| {
            c["result_code"] == 200
                && ms(c, "answered_at").is_some_and(|t| t < unix_ms(term_sent))
                && ms(c, "ended_at").is_some_and(|t| t > unix_ms(term_sent))
        })
        .collect();
    assert!(
        !live_at_term.is_empty(),
        "no call was up on A at the SIGTERM: {after:#?}"
    );
    for c in &live_at_term {
        assert_eq!(c["cause"], "caller-bye", "{c}");
    }
    // No call was admitted on A once it was draining; those offered got 503 (and went
    // to B: SIPp saw no failure).
    let refused: Vec<_> = after.iter().filter(|c| c["result_code"] == 503).collect();
    for c in &after {
        if ms(c, "started_at").is_some_and(|t| t > draining_seen) {
            assert_eq!(c["result_code"], 503, "admitted while draining: {c}");
        }
    }
    let failovers = kam.lines_with("failover ").len();
    eprintln!(
        "phase 2: {} calls live on A at SIGTERM finished; A refused {} INVITEs with 503; \
         {failovers} failovers so far; A out of the set {:?} after SIGTERM",
        live_at_term.len(),
        refused.len(),
        down_a.map(|t| t - term_at)
    );

    // ---- 3. A back; SIGKILL B mid-run ------------------------------------------------
    let restart_at = Instant::now();
    let a2 = spawn_node("a", port_a, &s3, shared.path());
    assert_eq!(a2.udp_addr(), addr_a);
    kam.wait_for(
        restart_at,
        "node up",
        &format!("[sip:{addr_a}]"),
        Duration::from_secs(10),
    )
    .unwrap_or_else(|| panic!("A not back in the set:\n{}", context(&kam)));
    let b_before: HashSet<String> = b
        .cdrs()
        .iter()
        .filter_map(|c| c["call_id"].as_str().map(str::to_owned))
        .collect();
    let run = sipp_in_background(&sipp_scenario("proxy_call.xml"), kam.addr, 100, 10, 20);
    thread::sleep(Duration::from_secs(4));
    let b_cdrs_at_kill: HashSet<String> = b
        .cdrs()
        .iter()
        .filter_map(|c| c["call_id"].as_str().map(str::to_owned))
        .collect();
    let kill_at = Instant::now();
    signal(&b, "-KILL");
    let down_b = kam
        .wait_for(
            kill_at,
            "node down",
            &format!("[sip:{addr_b}]"),
            Duration::from_secs(10),
        )
        .unwrap_or_else(|| panic!("B never marked down:\n{}", context(&kam)));
    let result = run.join().unwrap();
    let detection = down_b - kill_at;
    // Within one ping interval plus the ping's own timeout (and scheduling slack).
    assert!(
        detection
            <= Duration::from_secs(PING_INTERVAL_S)
                + Duration::from_millis(NODE_TIMEOUT_MS)
                + Duration::from_secs(2),
        "B marked down {detection:?} after SIGKILL"
    );
    // Nothing was sent to B once it was marked down.
    let late: Vec<_> = kam
        .calls_to(addr_b)
        .into_iter()
        .filter(|(at, _)| *at > down_b)
        .collect();
    assert!(late.is_empty(), "sent to B after it was down: {late:?}");
    // The calls that failed are those up on B when it died: sent there before the
    // kill, never finished there.
    let lost: Vec<String> = kam
        .calls_to(addr_b)
        .into_iter()
        .filter(|(at, id)| *at < kill_at && !b_before.contains(id) && !b_cdrs_at_kill.contains(id))
        .map(|(_, id)| id)
        .collect();
    let failed = result.failed_calls.unwrap_or(u64::MAX);
    assert!(
        failed <= lost.len() as u64,
        "{failed} calls failed, only {} were up on B: {lost:?}\n{}",
        lost.len(),
        result.report()
    );
    assert_eq!(
        result.successful_calls.unwrap_or(0) + failed,
        100,
        "{}",
        result.report()
    );
    let a2_answered = answered(&a2).len();
    assert!(a2_answered > 0);
    eprintln!(
        "phase 3: B marked down {detection:?} after SIGKILL (ping interval {PING_INTERVAL_S} s); \
         {failed} calls failed (up on B at the kill: {}); A answered {a2_answered}",
        lost.len()
    );
}
