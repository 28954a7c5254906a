#![allow(clippy::unwrap_used, clippy::expect_used)]
//! Scale-out (issue 16): Kamailio with the shipped
//! `sip-profiles/examples/kamailio-dispatcher.cfg` in front of two `sipbridge run`
//! daemons, SIPp as the carrier, all real processes on loopback.
//!
//! [`kamailio_spreads_drains_and_fails_over_between_two_daemons`], in three phases:
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

use common::{Daemon, ProfileSpec, SippResult, free_port, repo_path, sipp, sipp_scenario};

/// The dispatcher's OPTIONS interval in the test (seconds).
const PING_INTERVAL_S: u64 = 1;
/// How long Kamailio waits for any answer before the next node (ms); also the
/// timeout of a ping.
const NODE_TIMEOUT_MS: u64 = 1000;
/// Where Kamailio listens: another loopback address than SIPp's and the daemons'.
const PROXY_IP: &str = "127.0.0.2";

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

/// A daemon's profile: UDP on `port`, the trunk allowing SIPp's 127.0.0.1 only,
/// Kamailio's address a trusted proxy, unknown sources dropped, a long drain.
/// `node` names its RTP range (distinct per node).
fn node_profile(node: &str, port: u16) -> String {
    let text = ProfileSpec {
        max_calls: 50,
        extra: &format!(
            "[profile.security]\nunknown_source = \"drop\"\ntrusted_proxies = [\"{PROXY_IP}\"]\n"
        ),
        ..ProfileSpec::default()
    }
    .render_for(&format!("scale_out::{node}"));
    let text = text
        .replace(
            "udp = [\"127.0.0.1:0\"]",
            &format!("udp = [\"127.0.0.1:{port}\"]"),
        )
        .replace("allow = [\"127.0.0.0/8\"]", "allow = [\"127.0.0.1/32\"]")
        .replace("max_calls = 50\n", "max_calls = 50\ndrain_grace_s = 60\n");
    assert!(text.contains(&format!("127.0.0.1:{port}")), "{text}");
    assert!(text.contains("127.0.0.1/32") && text.contains("drain_grace_s"));
    text
}

fn signal(daemon: &Daemon, sig: &str) {
    let status = Command::new("kill")
        .args([sig, &daemon.pid().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
}

/// Answered calls (CDR result 200) in a daemon's log.
fn answered(d: &Daemon) -> Vec<serde_json::Value> {
    d.cdrs()
        .into_iter()
        .filter(|c| c["result_code"] == 200)
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
    let (port_a, port_b) = (free_port(), free_port());
    let mut a = Daemon::spawn(&node_profile("a", port_a));
    let b = Daemon::spawn(&node_profile("b", port_b));
    let (addr_a, addr_b) = (a.udp_addr(), b.udp_addr());
    let kam = Kamailio::start(&[addr_a, addr_b]);
    let context = |kam: &Kamailio| format!("---- kamailio ----\n{}", kam.log());

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
    let a2 = Daemon::spawn(&node_profile("a", port_a));
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
