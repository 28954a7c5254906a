#![allow(clippy::unwrap_used, clippy::expect_used)]
//! Port 5060 on the open internet (issue 18's acceptance): the real SIPVicious tools
//! (PyPI `sipvicious`, installed by `scripts/install-test-deps.sh`) and a flood.
//!
//! - `svmap` from 127.0.0.2, an address no trunk allows, finds nothing: no answer to
//!   its OPTIONS (nor to a plain OPTIONS with an ordinary User-Agent), while the trunk's
//!   own address gets `200`.
//! - `svcrack` against a digest trunk (from 127.0.0.1: it cannot bind another address)
//!   is banned after the configured failures: the daemon's digest-failure counter says how many guesses it checked
//!   (at most `auth_failures_per_minute`), the ban list names the source. With the
//!   default scanner list it is banned by its User-Agent before its first guess.
//! - a 3,000 INVITE/s flood from 127.0.0.2 fails none of 200 SIPp calls from the trunk
//!   address 127.0.0.1, gets no answer, and the daemon's RSS stays bounded.

mod common;

use std::net::{SocketAddr, UdpSocket};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{Daemon, ProfileSpec, http, sipp, sipp_scenario};

const ADMIN_TOKEN: &str = "sipvicious-test-admin-token";

/// The SIPVicious tool `name` (`svmap`, `svcrack`) from its virtual environment.
fn tool(name: &str) -> PathBuf {
    let venv = std::env::var("SIPBRIDGE_SIPVICIOUS_VENV")
        .unwrap_or_else(|_| "/opt/sipvicious-venv".to_owned());
    let path = PathBuf::from(venv).join(format!("bin/sipvicious_{name}"));
    assert!(
        path.exists(),
        "{} missing: run scripts/install-test-deps.sh",
        path.display()
    );
    path
}

/// The test profile: the `local` trunk allows only 127.0.0.1 (so 127.0.0.2 is outside
/// every trunk), an admin listener, and `security` lines in `[profile.security]`.
fn profile(trunk: &str, security: &str, max_calls: u32) -> String {
    ProfileSpec {
        max_calls,
        trunk,
        extra: &format!("[profile.security]\n{security}\n"),
        ..ProfileSpec::default()
    }
    .render()
    .replace("allow = [\"127.0.0.0/8\"]", "allow = [\"127.0.0.1/32\"]")
    .replace(
        "[profile.sip]",
        "[profile.admin]\nlisten = \"127.0.0.1:0\"\ntoken = \"env:SB_ADMIN_TOKEN\"\n\n[profile.sip]",
    )
}

fn spawn(toml: &str, env: &[(&str, &str)]) -> Daemon {
    let mut all = vec![("SB_ADMIN_TOKEN", ADMIN_TOKEN)];
    all.extend_from_slice(env);
    Daemon::spawn_with_env(toml, &all)
}

/// One sample of `/metrics`: `name{labels}` (labels as printed) → value.
fn metric(admin: SocketAddr, series: &str) -> f64 {
    let text = http::get(admin, "/metrics", None).text();
    text.lines()
        .find_map(|l| {
            let (name, value) = l.rsplit_once(' ')?;
            (name == series).then(|| value.parse().ok())?
        })
        .unwrap_or(0.0)
}

/// A free UDP port on `ip` (SIPVicious puts its port in Via; `rport` brings answers
/// back to it).
fn free_udp_port(ip: &str) -> u16 {
    UdpSocket::bind(format!("{ip}:0"))
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn run(cmd: &mut Command, timeout: Duration) -> (Option<i32>, String) {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start the tool");
    let deadline = Instant::now() + timeout;
    let code = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status.code();
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let out = child.wait_with_output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (code, text)
}

fn options(target: SocketAddr, from: SocketAddr, n: u32, user_agent: &str) -> String {
    format!(
        "OPTIONS sip:{target} SIP/2.0\r\n\
         Via: SIP/2.0/UDP {from};branch=z9hG4bKopt{n};rport\r\n\
         From: <sip:probe@{from}>;tag=o{n}\r\n\
         To: <sip:{target}>\r\n\
         Call-ID: options-{n}@{from}\r\n\
         CSeq: 1 OPTIONS\r\n\
         Max-Forwards: 70\r\n\
         User-Agent: {user_agent}\r\n\
         Content-Length: 0\r\n\r\n"
    )
}

/// What arrives on `socket` within `wait`.
fn received(socket: &UdpSocket, wait: Duration) -> Vec<String> {
    socket
        .set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    let deadline = Instant::now() + wait;
    let mut out = Vec::new();
    let mut buf = [0u8; 8192];
    while Instant::now() < deadline {
        if let Ok((n, _)) = socket.recv_from(&mut buf) {
            out.push(String::from_utf8_lossy(&buf[..n]).into_owned());
        }
    }
    out
}

#[test]
fn svmap_from_outside_every_trunk_finds_nothing() {
    let daemon = spawn(&profile("", "", 50), &[]);
    let target = daemon.udp_addr();
    let admin = daemon.admin_addr();

    // The daemon is alive: the trunk's own address gets 200 to an OPTIONS.
    let trunk = UdpSocket::bind("127.0.0.1:0").unwrap();
    let from = trunk.local_addr().unwrap();
    trunk
        .send_to(options(target, from, 1, "carrier-sbc").as_bytes(), target)
        .unwrap();
    let got = received(&trunk, Duration::from_secs(2));
    assert!(
        got.iter().any(|m| m.starts_with("SIP/2.0 200")),
        "the trunk's OPTIONS was not answered: {got:?}"
    );

    // svmap from 127.0.0.2: nothing found.
    let port = free_udp_port("127.0.0.2");
    let (code, out) = run(
        Command::new(tool("svmap"))
            .args(["-b", "127.0.0.2", "-P", &port.to_string()])
            .args(["-p", &target.port().to_string(), "-t", "0.05"])
            .arg("127.0.0.1"),
        Duration::from_secs(60),
    );
    eprintln!("svmap exit {code:?}:\n{out}");
    assert!(code.is_some(), "svmap did not finish: {out}");
    assert!(
        out.to_lowercase().contains("found nothing"),
        "svmap found something: {out}"
    );
    assert!(
        !out.contains("127.0.0.1:"),
        "svmap listed the daemon: {out}"
    );

    // An ordinary OPTIONS from there: no answer either (the default is to drop).
    let outside = UdpSocket::bind("127.0.0.3:0").unwrap();
    let from = outside.local_addr().unwrap();
    for n in 0..3 {
        outside
            .send_to(
                options(target, from, 10 + n, "Linphone/5.2").as_bytes(),
                target,
            )
            .unwrap();
    }
    let got = received(&outside, Duration::from_secs(2));
    assert!(got.is_empty(), "an unknown source got an answer: {got:?}");

    // Counted: svmap's OPTIONS as a scanner (and banned), the others as unknown.
    let scanner = metric(admin, "sipbridge_sip_bans_total{reason=\"scanner\"}");
    let unknown = metric(
        admin,
        "sipbridge_sip_dropped_total{reason=\"unknown_source\"}",
    );
    eprintln!("scanner bans {scanner}, unknown-source drops {unknown}");
    assert_eq!(scanner, 1.0, "svmap's source banned as a scanner");
    assert!(unknown >= 3.0, "unknown-source drops counted: {unknown}");
    let bans = http::get(admin, "/v1/security/bans", Some(ADMIN_TOKEN)).json();
    assert_eq!(bans["bans"][0]["source"], "127.0.0.2", "{bans}");
    assert_eq!(bans["bans"][0]["reason"], "scanner", "{bans}");
}

/// The digest trunk of the svcrack tests: username `carrier`, realm `sipbridge.test`,
/// allowed from anywhere on loopback (a digest trunk: its sources are challenged, not trusted).
const DIGEST_TRUNK: &str = "[trunk.digest]\nusername = \"carrier\"\n\
    password = \"env:SB_TEST_DIGEST_PASSWORD\"\nrealm = \"sipbridge.test\"\n\
    algorithms = [\"MD5\"]\n";

/// svcrack 0.3.8 ignores `-b` (it binds every address), so it sends from 127.0.0.1:
/// here an address of the digest trunk, as any internet address is of a digest trunk
/// that allows the internet.
fn svcrack(target: SocketAddr) -> (Option<i32>, String) {
    let port = free_udp_port("0.0.0.0");
    run(
        Command::new(tool("svcrack"))
            .args(["-P", &port.to_string()])
            .args(["-p", &target.port().to_string()])
            .args(["-u", "carrier", "-r", "1000-1200", "-m", "INVITE"])
            .args(["--maximumtime", "3", "-t", "0.05"])
            .arg("127.0.0.1"),
        Duration::from_secs(90),
    )
}

#[test]
fn svcrack_is_banned_after_the_configured_digest_failures() {
    const LIMIT: f64 = 5.0;
    // The scanner list is emptied so that the digest limit is what stops svcrack
    // (its User-Agent is `friendly-scanner`; the next test keeps the default list).
    let toml = profile(
        DIGEST_TRUNK,
        "auth_failures_per_minute = 5\nscanner_user_agents = []\n",
        50,
    )
    .replace("allow = [\"127.0.0.1/32\"]", "allow = [\"127.0.0.0/8\"]");
    let daemon = spawn(&toml, &[("SB_TEST_DIGEST_PASSWORD", "Z7q!long-and-random")]);
    let target = daemon.udp_addr();
    let admin = daemon.admin_addr();

    let (code, out) = svcrack(target);
    eprintln!("svcrack exit {code:?}:\n{out}");
    assert!(code.is_some(), "svcrack did not stop: {out}");
    assert!(
        !out.contains("The password for"),
        "svcrack cracked it: {out}"
    );

    let checked = metric(admin, "sipbridge_sip_digest_failures_total");
    let banned = metric(admin, "sipbridge_sip_bans_total{reason=\"digest\"}");
    let dropped = metric(admin, "sipbridge_sip_dropped_total{reason=\"banned\"}");
    eprintln!("guesses checked: {checked}; digest bans: {banned}; dropped while banned: {dropped}");
    assert!(
        (1.0..=LIMIT).contains(&checked),
        "{checked} guesses got through (limit {LIMIT})"
    );
    assert_eq!(banned, 1.0);
    let bans = http::get(admin, "/v1/security/bans", Some(ADMIN_TOKEN)).json();
    assert_eq!(bans["bans"][0]["source"], "127.0.0.1", "{bans}");
    assert_eq!(bans["bans"][0]["reason"], "digest", "{bans}");
    let left = bans["bans"][0]["expires_in_s"].as_u64().unwrap();
    assert!(
        left > 500 && left <= 600,
        "ban of auth_ban_s (600 s): {left}"
    );

    // The ban is the source's: a plain OPTIONS from 127.0.0.1 gets nothing now,
    // from 127.0.0.3 (same trunk, not banned) it gets 200.
    for (ip, answered) in [("127.0.0.1", false), ("127.0.0.3", true)] {
        let s = UdpSocket::bind(format!("{ip}:0")).unwrap();
        let from = s.local_addr().unwrap();
        s.send_to(options(target, from, 40, "Linphone/5.2").as_bytes(), target)
            .unwrap();
        let got = received(&s, Duration::from_secs(1));
        assert_eq!(!got.is_empty(), answered, "{ip}: {got:?}");
    }
}

#[test]
fn svcrack_with_its_scanner_user_agent_gets_no_guess_checked() {
    let toml = profile(DIGEST_TRUNK, "", 50)
        .replace("allow = [\"127.0.0.1/32\"]", "allow = [\"127.0.0.0/8\"]");
    let daemon = spawn(&toml, &[("SB_TEST_DIGEST_PASSWORD", "Z7q!long-and-random")]);
    let admin = daemon.admin_addr();
    let (code, out) = svcrack(daemon.udp_addr());
    eprintln!("svcrack exit {code:?}:\n{out}");
    assert!(code.is_some(), "svcrack did not stop: {out}");
    let checked = metric(admin, "sipbridge_sip_digest_failures_total");
    let scanner = metric(admin, "sipbridge_sip_bans_total{reason=\"scanner\"}");
    eprintln!("guesses checked: {checked}; scanner bans: {scanner}");
    assert_eq!(checked, 0.0);
    assert_eq!(scanner, 1.0);
    assert!(out.contains("no server response"), "{out}");
}

/// VmRSS of `pid` in KiB.
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

#[test]
fn an_invite_flood_from_one_address_fails_no_legitimate_call() {
    const RATE: u64 = 3000;
    let daemon = spawn(&profile("", "", 50), &[]);
    let target = daemon.udp_addr();
    let admin = daemon.admin_addr();
    let pid = daemon.pid();
    let idle = rss_kib(pid);

    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flood = {
        let stop = std::sync::Arc::clone(&stop);
        std::thread::spawn(move || {
            let s = UdpSocket::bind("127.0.0.2:0").unwrap();
            s.set_nonblocking(true).unwrap();
            let from = s.local_addr().unwrap();
            let start = Instant::now();
            let (mut sent, mut answers) = (0u64, 0u64);
            let mut buf = [0u8; 4096];
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                // Paced: catch up to RATE per second in 5 ms steps.
                let due = start.elapsed().as_millis() as u64 * RATE / 1000;
                while sent < due {
                    let msg = format!(
                        "INVITE sip:+15551234567@{target} SIP/2.0\r\n\
                         Via: SIP/2.0/UDP {from};branch=z9hG4bKflood{sent};rport\r\n\
                         From: <sip:flood@{from}>;tag=f{sent}\r\n\
                         To: <sip:+15551234567@{target}>\r\n\
                         Call-ID: flood-{sent}@127.0.0.2\r\n\
                         CSeq: 1 INVITE\r\n\
                         Contact: <sip:flood@{from}>\r\n\
                         Max-Forwards: 70\r\n\
                         User-Agent: PolycomVVX\r\n\
                         Content-Length: 0\r\n\r\n"
                    );
                    let _ = s.send_to(msg.as_bytes(), target);
                    sent += 1;
                }
                while s.recv_from(&mut buf).is_ok() {
                    answers += 1;
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            (sent, answers, start.elapsed())
        })
    };
    std::thread::sleep(Duration::from_millis(500));

    // 200 calls from the trunk's address while the flood runs.
    let result = sipp(
        &sipp_scenario("basic_call.xml"),
        target,
        &[
            "-s",
            "+15551234567",
            "-m",
            "200",
            "-r",
            "25",
            "-l",
            "60",
            "-timeout",
            "120s",
        ],
    );
    let during = rss_kib(pid);
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (sent, answers, took) = flood.join().unwrap();
    let dropped = metric(
        admin,
        "sipbridge_sip_dropped_total{reason=\"rate_limited\"}",
    ) + metric(
        admin,
        "sipbridge_sip_dropped_total{reason=\"call_rate_limited\"}",
    ) + metric(
        admin,
        "sipbridge_sip_dropped_total{reason=\"unknown_source\"}",
    );
    let after = rss_kib(pid);
    eprintln!(
        "flood: {sent} INVITEs in {took:?} ({:.0}/s), {answers} answers; dropped at the gate \
         or as unknown: {dropped}; SIPp: {:?} ok, {:?} failed; RSS idle {idle} KiB, \
         during {during} KiB, after {after} KiB",
        sent as f64 / took.as_secs_f64(),
        result.successful_calls,
        result.failed_calls
    );
    result.assert_success();
    assert_eq!(result.successful_calls, Some(200));
    assert_eq!(result.failed_calls, Some(0));
    assert!(
        sent as f64 / took.as_secs_f64() > 0.8 * RATE as f64,
        "the flood did not reach its rate"
    );
    assert_eq!(answers, 0, "the flood got answers");
    assert!(dropped >= 0.9 * sent as f64, "{dropped} of {sent} dropped");
    // Bounded: the flood costs no per-INVITE state (200 calls' worth at most).
    assert!(
        during < idle + 40 * 1024 && after < idle + 40 * 1024,
        "RSS grew from {idle} KiB to {during} KiB (after: {after} KiB)"
    );
}
