//! Shared harness for integration tests that drive real processes on loopback: the
//! `sipbridge` daemon ([`Daemon`]), SIPp as the carrier ([`sipp`]) and SIPp as a scripted
//! peer ([`SippServer`]).
//!
//! Owns: spawning and reaping those processes, picking free loopback ports, collecting
//! their logs, and the test profile template ([`profile_toml`]). It never touches the
//! crate's internals: tests that use it see sipbridge only through its binary and sockets.
//!
//! Every child process is bounded in time and killed on drop, so a hung peer fails the
//! test instead of hanging `cargo test`. Failures print what the peer saw (SIPp's error
//! and message logs, the daemon's log lines).

// Each integration test file compiles this module and uses a different part of it.
#![allow(dead_code)]
#![allow(clippy::unwrap_used, clippy::expect_used)]

pub(crate) mod test_agent;

use std::io::{BufRead, BufReader, Read};
use std::net::{SocketAddr, TcpListener, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use tempfile::TempDir;

pub(crate) mod audio;
pub(crate) mod deepgram_mock;
pub(crate) mod http;
pub(crate) mod pg;
pub(crate) mod s3;

/// The repository root (where `Cargo.toml` is).
pub(crate) const REPO: &str = env!("CARGO_MANIFEST_DIR");

/// How long [`Daemon::spawn`] waits for both listeners to be reported.
pub(crate) const DAEMON_START_TIMEOUT: Duration = Duration::from_secs(10);

/// SIPp's `-timeout` when the caller gives none.
pub(crate) const SIPP_DEFAULT_TIMEOUT_SECS: u64 = 30;

/// Extra time past SIPp's own `-timeout` before the harness kills it.
const SIPP_KILL_GRACE: Duration = Duration::from_secs(15);

/// SIPp's exit code when it cannot bind a socket (`-2` as an unsigned byte).
const SIPP_EXIT_BIND_FAILED: i32 = 254;

/// A path inside the repository.
pub(crate) fn repo_path(relative: &str) -> PathBuf {
    Path::new(REPO).join(relative)
}

/// A SIPp scenario file under `tests/sipp/`, e.g. `sipp_scenario("basic_call.xml")`.
pub(crate) fn sipp_scenario(name: &str) -> PathBuf {
    repo_path("tests/sipp").join(name)
}

// ---------------------------------------------------------------------------------------
// Test profile
// ---------------------------------------------------------------------------------------

/// First port of the RTP ranges handed to tests. Ranges stay below Linux's ephemeral
/// ports (32768+), which the harness uses for SIPp's signalling and media sockets.
const RTP_BASE: u16 = 10_000;
/// Ports per test.
const RTP_SPAN: u16 = 100;
/// Number of distinct ranges: 10000..=29999.
const RTP_SLOTS: u64 = 200;

/// The RTP port range `(start, end)` (inclusive, even start) for a test name: stable
/// across runs, and different tests are unlikely to share one (FNV-1a of the name).
pub(crate) fn rtp_range_for(test_name: &str) -> (u16, u16) {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in test_name.bytes() {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    let slot = u16::try_from(hash % RTP_SLOTS).expect("slot < 200");
    let start = RTP_BASE + slot * RTP_SPAN;
    (start, start + RTP_SPAN - 1)
}

/// The name of the running test (libtest names each test's thread after it).
pub(crate) fn current_test_name() -> String {
    thread::current().name().unwrap_or("unnamed").to_string()
}

/// A minimal profile for one test: UDP and TCP listeners on `127.0.0.1:0`, `var_dir`
/// relative to the daemon's working directory, an RTP range derived from the test's name,
/// `max_calls = 50` (the range holds 50 port pairs), one `local` trunk for 127.0.0.0/8
/// dedicated to one `demo` tenant (no recording, no transcripts, the bundled prompt, the
/// `echo` pipeline) and a catch-all route.
///
/// `extra` is appended verbatim: start it with a table header (`[[route]]`, `[[trunk]]` …).
/// For keys inside the generated tables (limits, `[profile.sip]`, digest credentials, a
/// route set without the catch-all) use [`ProfileSpec`].
pub(crate) fn profile_toml(extra: &str) -> String {
    profile_toml_for(&current_test_name(), extra)
}

/// [`profile_toml`] for an explicit test name.
pub(crate) fn profile_toml_for(test_name: &str, extra: &str) -> String {
    ProfileSpec {
        extra,
        ..ProfileSpec::default()
    }
    .render_for(test_name)
}

/// The test profile with its variable parts. This is the only place that knows the
/// profile format (docs/configuration.md), so a format change is fixed here.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ProfileSpec<'a> {
    /// `[profile] max_calls`.
    pub(crate) max_calls: u32,
    /// Lines inside `[profile.sip]`, e.g. `answer_delay_ms = 2000`.
    pub(crate) sip: &'a str,
    /// Lines inside `[profile.media]`, e.g. `rtp_timeout_s = 2`.
    pub(crate) media: &'a str,
    /// Lines appended to the `local` trunk, e.g. `max_calls = 1`, or a
    /// `[trunk.digest]` table (which then must come last).
    pub(crate) trunk: &'a str,
    /// Lines appended to the `demo` tenant, e.g. `max_calls = 1`.
    pub(crate) tenant: &'a str,
    /// The `[[route]]` entries; `None` gives the catch-all `number = "*"` to `demo`.
    pub(crate) routes: Option<&'a str>,
    /// Appended verbatim at the end.
    pub(crate) extra: &'a str,
    /// Lines added to `[profile.listen]`, e.g. `tls = ["127.0.0.1:0"]`.
    pub(crate) listen: &'a str,
}

impl Default for ProfileSpec<'_> {
    fn default() -> Self {
        ProfileSpec {
            max_calls: 50,
            sip: "",
            media: "",
            trunk: "",
            tenant: "",
            routes: None,
            extra: "",
            listen: "",
        }
    }
}

impl ProfileSpec<'_> {
    /// The profile text for the running test (its RTP range comes from its name).
    pub(crate) fn render(&self) -> String {
        self.render_for(&current_test_name())
    }

    /// The profile text for `test_name`.
    pub(crate) fn render_for(&self, test_name: &str) -> String {
        let (start, end) = rtp_range_for(test_name);
        let prompt = repo_path("sip-profiles/prompts/disclosure.wav");
        let prompt = toml::Value::String(prompt.display().to_string());
        let ProfileSpec {
            max_calls,
            sip,
            media,
            trunk,
            tenant,
            routes,
            extra,
            listen,
        } = *self;
        let routes = routes.unwrap_or("[[route]]\nnumber = \"*\"\ntenant = \"demo\"\n");
        format!(
            r#"[profile]
name = "test"
var_dir = "var"
max_calls = {max_calls}
rtp_ports = {{ start = {start}, end = {end} }}

[profile.listen]
udp = ["127.0.0.1:0"]
tcp = ["127.0.0.1:0"]
{listen}

[profile.sip]
{sip}

[profile.media]
{media}

[[tenant]]
id = "demo"
recording = false
transcripts = false
prompt = {prompt}
pipeline = {{ kind = "echo" }}
{tenant}

[[trunk]]
name = "local"
allow = ["127.0.0.0/8"]
tenant = "demo"
{trunk}

{routes}
{extra}"#
        )
    }
}

// ---------------------------------------------------------------------------------------
// The daemon
// ---------------------------------------------------------------------------------------

/// A running `sipbridge --log-format json run --config profile.toml`, in its own temp dir
/// (its working directory, so `var/` lands there). Killed on drop.
pub(crate) struct Daemon {
    child: Child,
    dir: TempDir,
    udp: SocketAddr,
    tcp: SocketAddr,
    logs: Arc<Mutex<Vec<String>>>,
}

impl Daemon {
    /// Writes `profile_toml` to a temp dir, starts the daemon there and waits (up to
    /// [`DAEMON_START_TIMEOUT`]) for its `"sip listener bound"` log lines for UDP and TCP.
    /// Panics with the daemon's output if it exits or does not report both in time.
    pub(crate) fn spawn(profile_toml: &str) -> Daemon {
        Daemon::spawn_with_env(profile_toml, &[])
    }

    /// [`Daemon::spawn`] with extra environment variables, e.g. for `env:NAME` secrets.
    pub(crate) fn spawn_with_env(profile_toml: &str, env: &[(&str, &str)]) -> Daemon {
        Daemon::start(
            Path::new(env!("CARGO_BIN_EXE_sipbridge")),
            &[],
            profile_toml,
            env,
        )
    }

    /// [`Daemon::spawn`] with another program standing in for the binary (`program
    /// leading_args… --log-format json run --config PATH`): lets the harness test itself
    /// with a fake daemon.
    pub(crate) fn spawn_program(
        program: &Path,
        leading_args: &[&str],
        profile_toml: &str,
    ) -> Daemon {
        Daemon::start(program, leading_args, profile_toml, &[])
    }

    fn start(
        program: &Path,
        leading_args: &[&str],
        profile_toml: &str,
        env: &[(&str, &str)],
    ) -> Daemon {
        let dir = tempfile::tempdir().expect("temp dir");
        let profile = dir.path().join("profile.toml");
        std::fs::write(&profile, profile_toml).expect("write profile");

        let mut child = Command::new(program)
            .args(leading_args)
            .args(["--log-format", "json", "run", "--config"])
            .arg(&profile)
            .current_dir(dir.path())
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "debug".into()),
            )
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {}: {e}", program.display()));

        let logs = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = mpsc::channel();
        let stderr = child.stderr.take().expect("piped stderr");
        let stdout = child.stdout.take().expect("piped stdout");
        collect_lines(stderr, Arc::clone(&logs), tx.clone());
        collect_lines(stdout, Arc::clone(&logs), tx);

        let deadline = Instant::now() + DAEMON_START_TIMEOUT;
        let (mut udp, mut tcp) = (None, None);
        while udp.is_none() || tcp.is_none() {
            let remaining = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(remaining) {
                Ok(line) => match listener_bound(&line) {
                    Some((Transport::Udp, addr)) => udp = Some(addr),
                    Some((Transport::Tcp, addr)) => tcp = Some(addr),
                    None => {}
                },
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    panic!(
                        "sipbridge did not report both listeners within {:?} (udp {udp:?}, tcp {tcp:?}); output:\n{}",
                        DAEMON_START_TIMEOUT,
                        logs.lock().unwrap().join("\n")
                    );
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    // Both streams closed: the process is gone.
                    let status = child.wait().expect("wait sipbridge");
                    panic!(
                        "sipbridge exited ({status}) before reporting its listeners; output:\n{}",
                        logs.lock().unwrap().join("\n")
                    );
                }
            }
        }
        Daemon {
            child,
            dir,
            udp: udp.expect("loop ends with udp set"),
            tcp: tcp.expect("loop ends with tcp set"),
            logs,
        }
    }

    /// The bound UDP listener, e.g. `127.0.0.1:41234`.
    pub(crate) fn udp_addr(&self) -> SocketAddr {
        self.udp
    }

    /// The bound TCP listener.
    pub(crate) fn tcp_addr(&self) -> SocketAddr {
        self.tcp
    }

    /// Every line the daemon printed so far (stderr and stdout, in arrival order).
    pub(crate) fn logs(&self) -> Vec<String> {
        self.logs.lock().unwrap().clone()
    }

    /// The daemon's working directory (holds `profile.toml` and `var/`).
    pub(crate) fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Waits up to `timeout` for a log line satisfying `pred` and returns it.
    pub(crate) fn wait_for_log(
        &self,
        timeout: Duration,
        pred: impl Fn(&str) -> bool,
    ) -> Option<String> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(line) = self.logs.lock().unwrap().iter().find(|l| pred(l)) {
                return Some(line.clone());
            }
            if Instant::now() >= deadline {
                return None;
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// Every call detail record logged so far (log target `cdr`): the JSON object in
    /// the line's `cdr` field, e.g. `{"call_id":…,"result_code":487,"cause":"cancelled",…}`.
    pub(crate) fn cdrs(&self) -> Vec<serde_json::Value> {
        self.logs().iter().filter_map(|l| cdr_of(l)).collect()
    }

    /// Waits up to `timeout` for a CDR satisfying `pred` and returns it.
    pub(crate) fn wait_for_cdr(
        &self,
        timeout: Duration,
        pred: impl Fn(&serde_json::Value) -> bool,
    ) -> Option<serde_json::Value> {
        let line = self.wait_for_log(timeout, |l| cdr_of(l).is_some_and(|c| pred(&c)))?;
        cdr_of(&line)
    }

    /// Waits up to `timeout` until `n` CDRs were logged and returns them (fewer on
    /// timeout).
    pub(crate) fn wait_for_cdrs(&self, n: usize, timeout: Duration) -> Vec<serde_json::Value> {
        let deadline = Instant::now() + timeout;
        loop {
            let cdrs = self.cdrs();
            if cdrs.len() >= n || Instant::now() >= deadline {
                return cdrs;
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// The admin API's bound address (from its `admin API listening` log line;
    /// the profile must have `[profile.admin]`). Waits up to 10 s.
    pub(crate) fn admin_addr(&self) -> SocketAddr {
        let line = self
            .wait_for_log(Duration::from_secs(10), |l| {
                l.contains("admin API listening")
            })
            .unwrap_or_else(|| {
                panic!(
                    "no `admin API listening` line; output:\n{}",
                    self.logs().join("\n")
                )
            });
        let v: serde_json::Value = serde_json::from_str(&line).expect("JSON log line");
        let fields = v.get("fields").unwrap_or(&v);
        fields["addr"]
            .as_str()
            .and_then(|a| a.parse().ok())
            .unwrap_or_else(|| panic!("no addr in {line}"))
    }

    /// The daemon's process id.
    pub(crate) fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Whether the daemon is still running.
    pub(crate) fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if thread::panicking() {
            eprintln!("---- sipbridge log ----\n{}", self.logs().join("\n"));
        }
    }
}

/// Reads `stream` line by line on a thread: each line is stored and sent to `tx` (sending
/// stops mattering once [`Daemon::spawn`] has what it needs).
fn collect_lines(
    stream: impl Read + Send + 'static,
    logs: Arc<Mutex<Vec<String>>>,
    tx: mpsc::Sender<String>,
) {
    thread::spawn(move || {
        for line in BufReader::new(stream).lines() {
            let Ok(line) = line else { break };
            logs.lock().unwrap().push(line.clone());
            let _ = tx.send(line);
        }
    });
}

/// The CDR in a daemon log line: a JSON line with target `cdr` whose `cdr` field (at the
/// top level or under `fields`) holds the record as a JSON string.
pub(crate) fn cdr_of(line: &str) -> Option<serde_json::Value> {
    let value: serde_json::Value = serde_json::from_str(line).ok()?;
    if value.get("target")?.as_str()? != "cdr" {
        return None;
    }
    let fields = match value.get("fields") {
        Some(fields) if fields.is_object() => fields,
        _ => &value,
    };
    serde_json::from_str(fields.get("cdr")?.as_str()?).ok()
}

/// A SIP transport as the daemon names it in its logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Transport {
    Udp,
    Tcp,
}

/// Recognises the daemon's JSON log line for a bound listener:
/// `{"fields":{"message":"sip listener bound","transport":"udp","local":"127.0.0.1:5060"},…}`
/// (fields nested under `fields`, or flattened at the top level).
pub(crate) fn listener_bound(line: &str) -> Option<(Transport, SocketAddr)> {
    let value: serde_json::Value = serde_json::from_str(line).ok()?;
    let fields = match value.get("fields") {
        Some(fields) if fields.is_object() => fields,
        _ => &value,
    };
    if fields.get("message")?.as_str()? != "sip listener bound" {
        return None;
    }
    let transport = match fields.get("transport")?.as_str()? {
        "udp" => Transport::Udp,
        "tcp" => Transport::Tcp,
        _ => return None,
    };
    let local = fields.get("local")?.as_str()?.parse().ok()?;
    Some((transport, local))
}

// ---------------------------------------------------------------------------------------
// SIPp
// ---------------------------------------------------------------------------------------

/// A loopback port that is free for both UDP and TCP right now (the OS picks it; SIPp
/// binds it a moment later, so a rare race is retried by the callers).
pub(crate) fn free_port() -> u16 {
    loop {
        let udp = UdpSocket::bind("127.0.0.1:0").expect("bind udp 127.0.0.1:0");
        let port = udp.local_addr().expect("local addr").port();
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

/// What a finished SIPp run reported.
#[derive(Debug)]
pub(crate) struct SippResult {
    /// SIPp's exit code (0: every call succeeded; 1: some failed; 255: fatal or timed
    /// out with `-timeout_error`); `None` when the harness had to kill it.
    pub(crate) exit_code: Option<i32>,
    pub(crate) stdout: String,
    pub(crate) stderr: String,
    /// Cumulative failed calls from SIPp's statistics file; `None` if it wrote none.
    pub(crate) failed_calls: Option<u64>,
    /// Cumulative successful calls; `None` if SIPp wrote no statistics.
    pub(crate) successful_calls: Option<u64>,
    /// SIPp's `-trace_err` log: unexpected messages, failed regexps, timeouts.
    pub(crate) errors: String,
    /// SIPp's `-trace_msg` log: every message sent and received.
    pub(crate) messages: String,
}

impl SippResult {
    /// Exit code 0, at least one successful call and no failed call.
    pub(crate) fn succeeded(&self) -> bool {
        self.exit_code == Some(0)
            && self.failed_calls == Some(0)
            && self.successful_calls.is_some_and(|n| n > 0)
    }

    /// Panics with [`Self::report`] unless [`Self::succeeded`].
    #[track_caller]
    pub(crate) fn assert_success(&self) {
        assert!(self.succeeded(), "SIPp run failed:\n{}", self.report());
    }

    /// Everything needed to see why a run failed.
    pub(crate) fn report(&self) -> String {
        format!(
            "exit code: {:?}\nsuccessful calls: {:?}\nfailed calls: {:?}\n\
             ---- SIPp error log ----\n{}\n---- SIPp messages ----\n{}\n\
             ---- SIPp stderr ----\n{}\n---- SIPp stdout (tail) ----\n{}",
            self.exit_code,
            self.successful_calls,
            self.failed_calls,
            self.errors,
            self.messages,
            self.stderr,
            tail(&self.stdout, 3000),
        )
    }
}

/// The last `max` bytes of `text` (on a char boundary).
fn tail(text: &str, max: usize) -> &str {
    let mut start = text.len().saturating_sub(max);
    while !text.is_char_boundary(start) {
        start += 1;
    }
    &text[start..]
}

/// A caller from +15551234567 in its own thread: SIPp runs `scenario` (a file in
/// tests/sipp that takes `-key test_rtp_port`) against the daemon's UDP listener, its
/// RTP on `media` (the test's socket), holding the call `hold_ms` (`-d`).
pub(crate) fn sipp_caller(
    daemon: &Daemon,
    scenario: &str,
    media: &UdpSocket,
    hold_ms: u32,
) -> thread::JoinHandle<SippResult> {
    let port = media.local_addr().unwrap().port().to_string();
    let target = daemon.udp_addr();
    let scenario = sipp_scenario(scenario);
    let hold = hold_ms.to_string();
    thread::spawn(move || {
        sipp(
            &scenario,
            target,
            &[
                "-key",
                "test_rtp_port",
                &port,
                "-s",
                "+15551234567",
                "-d",
                &hold,
            ],
        )
    })
}

/// Runs SIPp as the carrier (UAC) with `scenario` against `target` and waits for it.
///
/// Always adds `-nostdin`, `-i 127.0.0.1`, a free local signalling port (`-p`) and media
/// port (`-mp`), `-timeout_error`, and traces into a temp dir; adds `-m 1` and
/// `-timeout 30s` unless `extra_args` sets them. Use `extra_args` for the rest, e.g.
/// `&["-t", "t1"]` for TCP, `&["-s", "+15551234567"]` for the dialed number, or
/// `&["-au", "user", "-ap", "secret"]` for digest credentials. SIPp is killed
/// [`SIPP_KILL_GRACE`] after its own timeout. A port lost to a race is retried.
pub(crate) fn sipp(scenario: &Path, target: SocketAddr, extra_args: &[&str]) -> SippResult {
    let mut args: Vec<String> = vec!["-sf".into(), scenario.display().to_string()];
    args.push(target.to_string());
    args.extend(extra_args.iter().map(|a| (*a).to_string()));
    if !has_flag(extra_args, "-m") {
        args.extend(["-m".into(), "1".into()]);
    }
    for attempt in 1..=3 {
        let mut run = SippProcess::start(&args, free_port());
        let result = run.finish();
        if result.exit_code != Some(SIPP_EXIT_BIND_FAILED) || attempt == 3 {
            return result;
        }
    }
    unreachable!("the last attempt returns")
}

/// SIPp as a scripted peer (UAS) listening on a free loopback port: the stand-in for the
/// bridge in the harness's self-check. Killed on drop unless [`SippServer::finish`]ed.
pub(crate) struct SippServer {
    process: SippProcess,
    addr: SocketAddr,
}

impl SippServer {
    /// Starts SIPp with `args` (a scenario: `-sn uas` or `-sf FILE`, plus options; `-m 1`
    /// and the harness defaults as in [`sipp`]) and waits until its port is bound.
    pub(crate) fn spawn(args: &[&str]) -> SippServer {
        let mut owned: Vec<String> = args.iter().map(|a| (*a).to_string()).collect();
        if !has_flag(args, "-m") {
            owned.extend(["-m".into(), "1".into()]);
        }
        let tcp = is_tcp(args);
        for _attempt in 1..=3 {
            let port = free_port();
            let mut process = SippProcess::start(&owned, port);
            let deadline = Instant::now() + Duration::from_secs(5);
            loop {
                if port_taken(port, tcp) {
                    let addr = SocketAddr::from(([127, 0, 0, 1], port));
                    return SippServer { process, addr };
                }
                if let Ok(Some(_)) = process.child.try_wait() {
                    break; // lost the port to another process: retry
                }
                if Instant::now() >= deadline {
                    let result = process.finish();
                    panic!("SIPp server did not bind {port}:\n{}", result.report());
                }
                thread::sleep(Duration::from_millis(10));
            }
            let result = process.finish();
            if result.exit_code != Some(SIPP_EXIT_BIND_FAILED) {
                panic!("SIPp server exited at start:\n{}", result.report());
            }
        }
        panic!("SIPp server could not bind a port in 3 attempts");
    }

    /// Starts SIPp on `scenario` (a file in tests/sipp) whose SDP names `media`'s port
    /// (`-key test_rtp_port N`): the test sends and receives that side's RTP itself.
    pub(crate) fn spawn_with_media(scenario: &str, media: &UdpSocket) -> SippServer {
        SippServer::spawn(&[
            "-sf",
            sipp_scenario(scenario).to_str().unwrap(),
            "-key",
            "test_rtp_port",
            &media.local_addr().unwrap().port().to_string(),
        ])
    }

    /// Where it listens.
    pub(crate) fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Waits for it to finish its `-m` calls (bounded by its timeout) and returns its result.
    pub(crate) fn finish(mut self) -> SippResult {
        self.process.finish()
    }
}

/// One SIPp child with its trace directory and output readers.
struct SippProcess {
    child: Child,
    dir: TempDir,
    stdout: Option<JoinHandle<String>>,
    stderr: Option<JoinHandle<String>>,
    hard_timeout: Duration,
    started: Instant,
    finished: bool,
}

impl SippProcess {
    fn start(args: &[String], port: u16) -> SippProcess {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut cmd = Command::new("sipp");
        cmd.args(args).args(["-nostdin", "-i", "127.0.0.1"]).args([
            "-p",
            &port.to_string(),
            "-mp",
            &free_port().to_string(),
        ]);
        let arg_refs: Vec<&str> = args.iter().map(String::as_str).collect();
        let timeout_secs = match flag_value(&arg_refs, "-timeout") {
            Some(value) => parse_seconds(value),
            None => {
                cmd.args(["-timeout", &format!("{SIPP_DEFAULT_TIMEOUT_SECS}s")]);
                SIPP_DEFAULT_TIMEOUT_SECS
            }
        };
        let trace = |name: &str| dir.path().join(name);
        cmd.arg("-timeout_error")
            .arg("-trace_err")
            .arg("-error_file")
            .arg(trace("errors.log"))
            .arg("-trace_msg")
            .arg("-message_file")
            .arg(trace("messages.log"))
            .arg("-trace_stat")
            .arg("-stf")
            .arg(trace("stat.csv"))
            .current_dir(dir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd
            .spawn()
            .expect("spawn sipp (bash scripts/install-test-deps.sh installs it)");
        let stdout = child.stdout.take().map(read_all);
        let stderr = child.stderr.take().map(read_all);
        SippProcess {
            child,
            dir,
            stdout,
            stderr,
            hard_timeout: Duration::from_secs(timeout_secs) + SIPP_KILL_GRACE,
            started: Instant::now(),
            finished: false,
        }
    }

    fn finish(&mut self) -> SippResult {
        let status = self.wait_bounded();
        self.finished = true;
        let stdout = join_output(self.stdout.take());
        let stderr = join_output(self.stderr.take());
        let read =
            |name: &str| std::fs::read_to_string(self.dir.path().join(name)).unwrap_or_default();
        let stats = read("stat.csv");
        SippResult {
            exit_code: status.and_then(|s| s.code()),
            failed_calls: stat_counter(&stats, "FailedCall(C)"),
            successful_calls: stat_counter(&stats, "SuccessfulCall(C)"),
            errors: read("errors.log"),
            messages: read("messages.log"),
            stdout,
            stderr,
        }
    }

    /// Waits for exit until the hard timeout, then kills. `None` when killed.
    fn wait_bounded(&mut self) -> Option<ExitStatus> {
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            if self.started.elapsed() >= self.hard_timeout {
                let _ = self.child.kill();
                let _ = self.child.wait();
                return None;
            }
            thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for SippProcess {
    fn drop(&mut self) {
        if !self.finished {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn read_all(mut stream: impl Read + Send + 'static) -> JoinHandle<String> {
    thread::spawn(move || {
        let mut bytes = Vec::new();
        let _ = stream.read_to_end(&mut bytes);
        String::from_utf8_lossy(&bytes).into_owned()
    })
}

fn join_output(handle: Option<JoinHandle<String>>) -> String {
    handle
        .map(|h| h.join().unwrap_or_default())
        .unwrap_or_default()
}

/// The last row's value of `column` in SIPp's `;`-separated statistics file.
pub(crate) fn stat_counter(csv: &str, column: &str) -> Option<u64> {
    let mut lines = csv.lines().filter(|l| !l.trim().is_empty());
    let header: Vec<&str> = lines.next()?.split(';').collect();
    let index = header.iter().position(|h| *h == column)?;
    let last = lines.next_back()?;
    last.split(';').nth(index)?.trim().parse().ok()
}

fn has_flag(args: &[&str], flag: &str) -> bool {
    args.contains(&flag)
}

fn flag_value<'a>(args: &[&'a str], flag: &str) -> Option<&'a str> {
    let at = args.iter().position(|a| *a == flag)?;
    args.get(at + 1).copied()
}

fn is_tcp(args: &[&str]) -> bool {
    flag_value(args, "-t").is_some_and(|t| t.starts_with('t'))
}

/// SIPp durations: `30`, `30s`, `500ms`, `2m`, `1h` → whole seconds (rounded up).
fn parse_seconds(value: &str) -> u64 {
    let digits: String = value.chars().take_while(char::is_ascii_digit).collect();
    let n: u64 = digits.parse().unwrap_or(SIPP_DEFAULT_TIMEOUT_SECS);
    match &value[digits.len()..] {
        "ms" => n.div_ceil(1000),
        "m" => n * 60,
        "h" => n * 3600,
        _ => n,
    }
}

/// Whether something already listens on `port` (binding it ourselves fails).
fn port_taken(port: u16, tcp: bool) -> bool {
    if tcp {
        TcpListener::bind(("127.0.0.1", port)).is_err()
    } else {
        UdpSocket::bind(("127.0.0.1", port)).is_err()
    }
}

/// One of the Python example agents (`examples/*.py`), run with the test venv that
/// scripts/install-test-deps.sh makes (`$SIPBRIDGE_TEST_VENV`, default
/// `/opt/sipbridge-test-venv`) on a free port; killed when dropped.
pub(crate) struct ExampleAgent {
    child: std::process::Child,
    lines: std::sync::mpsc::Receiver<String>,
    port: u16,
}

impl ExampleAgent {
    /// Starts `examples/{file}` with `AGENT_PORT=0` and `env`, and waits for its
    /// `listening <port>` line.
    pub(crate) fn spawn(file: &str, env: &[(&str, &str)]) -> ExampleAgent {
        use std::io::{BufRead, BufReader};
        use std::process::{Command, Stdio};
        let venv = std::env::var_os("SIPBRIDGE_TEST_VENV")
            .map_or_else(|| PathBuf::from("/opt/sipbridge-test-venv"), PathBuf::from);
        let python = venv.join("bin/python");
        assert!(
            python.exists(),
            "{} is missing: run `bash scripts/install-test-deps.sh`",
            python.display()
        );
        let mut child = Command::new(python)
            .arg(repo_path(&format!("examples/{file}")))
            .env("AGENT_PORT", "0")
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("start the example agent");
        let stdout = child.stdout.take().unwrap();
        let (tx, lines) = std::sync::mpsc::channel::<String>();
        thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let first = lines
            .recv_timeout(Duration::from_secs(20))
            .expect("the example agent is listening");
        let port = first
            .strip_prefix("listening ")
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| panic!("unexpected first line {first:?}"));
        ExampleAgent { child, lines, port }
    }

    /// Its port.
    pub(crate) fn port(&self) -> u16 {
        self.port
    }

    /// The JSON lines it printed until one has `"stopped": true` (or 10 s).
    pub(crate) fn lines_until_stopped(&self) -> Vec<serde_json::Value> {
        let mut lines: Vec<serde_json::Value> = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline && !lines.iter().any(|l| l["stopped"] == true) {
            if let Ok(l) = self.lines.recv_timeout(Duration::from_millis(200)) {
                lines.push(serde_json::from_str(&l).unwrap_or(serde_json::Value::Null));
            }
        }
        lines
    }
}

impl Drop for ExampleAgent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Daemon {
    /// The stored CDR of `call_id` (tenant `demo`) once it is closed, from the SQLite
    /// store in the daemon's `var/` (the store writes behind the call). Waits up to 10 s.
    pub(crate) fn stored_cdr(&self, call_id: &str) -> sipbridge::store::db::StoredCdr {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let store =
                sipbridge::store::db::Store::open(&self.dir().join("var/sipbridge.db")).unwrap();
            if let Some(c) = store.get_call("demo", call_id).unwrap()
                && c.ended_at.is_some()
            {
                return c;
            }
            assert!(Instant::now() < deadline, "CDR of {call_id} not closed");
            thread::sleep(Duration::from_millis(50));
        }
    }
}
