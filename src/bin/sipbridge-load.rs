//! `sipbridge-load` — the media load tool (issue 17 item 1; see docs/performance.md).
//!
//! For each N in `--calls`, on loopback only, in one run:
//! 1. **Floor**: a trivial UDP echo (`sipbridge-load floor-echo`, a child process: one
//!    socket per call, level-triggered epoll, every datagram sent straight back) takes the
//!    load below; its CPU per packet is the floor.
//! 2. **Daemon**, once per `--media-threads` value (`[profile.media] threads`) and
//!    recording setting: the release daemon (`sipbridge run`) with a
//!    temporary profile (echo pipeline, a 100 ms silent prompt, trunk 127.0.0.0/8,
//!    `max_calls`, `rtp_ports` and `max_unconfirmed_calls_per_source` sized for N,
//!    `rtp_timeout_s = 0`) answers N calls set up
//!    by this tool's own UAC over SIP/UDP (INVITE with SDP, ACK, later BYE; requests are
//!    retransmitted on T1 doubling until answered; responses are parsed with
//!    `sipbridge::sip`).
//!
//! The load: every call streams 20 ms PCMU frames of a real recording (`--fixture`, raw
//! µ-law, looped) at 50 packets/s, the calls' phases spread over the 20 ms on a 1 ms grid.
//! The packets leave from a few shared sockets (the SDP offer names them), one `sendmmsg`
//! per socket per millisecond, and are read back with `recvmmsg` once per millisecond, by
//! `--threads` threads, so the generator is not the bottleneck; what comes back is told
//! apart by its source address (the daemon's RTP socket of that call, or the floor's
//! socket of that call) and timed by the kernel (`SO_TIMESTAMPNS`).
//!
//! Measured over a window of `--seconds` after `--warmup` (the prompt plays and the jitter
//! buffer fills during the warm-up): per call, the packets that came back, loss by RTP
//! sequence number, lateness of each arrival against the returned stream's RTP timestamp
//! schedule (arrival − timestamp, less the smallest such offset of that call: 0 ms is the
//! earliest packet); the target's CPU (utime + stime from /proc/PID/stat) divided by the
//! packets in + out in the window; the daemon's RSS growth (VmRSS with the calls up less
//! VmRSS before the first INVITE) divided by the calls answered. Also reported: the
//! generator's own CPU and how late it sent (send lag), and the share of returned packets
//! that carry speech (the echo came back, not silence).
//!
//! Output: one table per N (a floor row and a row per daemon run: loss, p50/p99/max
//! lateness, µs per packet, ratio daemon/floor, RSS per call, failed calls, cores kept
//! busy), then a `ratio daemon/floor` line per daemon run (with calls per busy core).
//! Exits 1 if a call failed or lost packets (`--allow-loss`: exit 0 despite loss), 2 on a
//! set-up error.

use std::collections::HashMap;
use std::fs;
use std::io::{BufRead, BufReader, IoSlice, IoSliceMut, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, UdpSocket};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use clap::{Parser, Subcommand};
use nix::poll::{PollFd, PollFlags, ppoll};
use nix::sys::epoll::{
    EpollCreateFlags, EpollEvent, EpollFlags, EpollOp, epoll_create1, epoll_ctl, epoll_wait,
};
use nix::sys::socket::{
    ControlMessage, ControlMessageOwned, MsgFlags, MultiHeaders, SockaddrIn, recvmmsg, sendmmsg,
    setsockopt, sockopt,
};
use nix::sys::time::TimeSpec;
use sipbridge::sip::message::{Message, Request, Response, parse_datagram};

/// RTP packet: 12-byte header + 160 bytes of PCMU (20 ms at 8 kHz).
const FRAME: usize = 160;
const PKT: usize = 12 + FRAME;
const PTIME: Duration = Duration::from_millis(20);
/// Most datagrams handed to one sendmmsg/recvmmsg call.
const BATCH: usize = 256;
/// Calls per shared media socket (more sockets: more kernel queues to absorb bursts).
const CALLS_PER_SOCKET: usize = 250;
/// The generator's send/receive tick.
const SLOT: Duration = Duration::from_millis(1);
const SOCKET_BUFFER: usize = 8 << 20;
const T1: Duration = Duration::from_millis(500);
const T2: Duration = Duration::from_secs(4);
const DIALED: &str = "+15551230000";

#[derive(Parser, Debug)]
#[command(
    name = "sipbridge-load",
    about = "Media load: N concurrent calls against the daemon and a bare UDP echo, as a ratio"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Option<Cmd>,
    /// Concurrent calls, one run per value (comma-separated).
    #[arg(long, value_delimiter = ',', default_value = "100,300,500,1000")]
    calls: Vec<usize>,
    /// Length of the measured window, seconds.
    #[arg(long, default_value_t = 10.0)]
    seconds: f64,
    /// Streaming before the window opens (prompt, jitter buffer fill), seconds.
    #[arg(long, default_value_t = 2.0)]
    warmup: f64,
    /// Daemon runs: off, on (encrypted stereo recording) or both.
    #[arg(long, default_value = "both")]
    recording: String,
    /// Daemon binary; default: `sipbridge` next to this binary.
    #[arg(long)]
    sipbridge: Option<PathBuf>,
    /// Raw µ-law (8 kHz, PT 0) audio streamed by every call, looped.
    #[arg(long, default_value = "fixtures/audio/caller1.ulaw")]
    fixture: PathBuf,
    /// The daemon's media threads (`[profile.media] threads`), one daemon run per value
    /// (comma-separated); 0: the daemon's default, one per core.
    #[arg(long, value_delimiter = ',', default_value = "0")]
    media_threads: Vec<usize>,
    /// Generator threads (each owns a share of the calls and their sockets).
    #[arg(long, default_value_t = 2)]
    threads: usize,
    /// First port of the daemon's RTP range (even); 0: find a free range in 50000-60000.
    #[arg(long, default_value_t = 0)]
    rtp_start: u16,
    /// INVITEs per second while setting the calls up.
    #[arg(long, default_value_t = 250)]
    cps: u32,
    /// The daemon's --log-filter.
    #[arg(long, default_value = "info")]
    log_filter: String,
    /// Keep the work directory (profile, daemon logs) and print its path.
    #[arg(long)]
    keep: bool,
    /// Exit 0 even if packets were lost (calls that failed still exit 1).
    #[arg(long)]
    allow_loss: bool,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// The floor: binds COUNT UDP sockets on 127.0.0.1, prints their ports on one line and
    /// sends every datagram straight back to its sender (epoll, one socket per call).
    FloorEcho {
        #[arg(long)]
        count: usize,
    },
}

fn main() {
    let cli = Cli::parse();
    let result = match cli.cmd {
        Some(Cmd::FloorEcho { count }) => floor_echo(count),
        None => run(&cli),
    };
    match result {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            eprintln!("sipbridge-load: {e:#}");
            std::process::exit(2);
        }
    }
}

// ---------------------------------------------------------------------------------------
// The floor.

fn floor_echo(count: usize) -> Result<i32> {
    let epoll = epoll_create1(EpollCreateFlags::EPOLL_CLOEXEC)?;
    let mut sockets = Vec::with_capacity(count);
    let mut ports = Vec::with_capacity(count);
    for i in 0..count {
        let s = UdpSocket::bind("127.0.0.1:0")?;
        s.set_nonblocking(true)?;
        let _ = setsockopt(s.as_raw_fd(), sockopt::RcvBuf, &(1 << 20));
        let mut ev = EpollEvent::new(EpollFlags::EPOLLIN, i as u64);
        epoll_ctl(epoll, EpollOp::EpollCtlAdd, s.as_raw_fd(), &mut ev)?;
        ports.push(s.local_addr()?.port().to_string());
        sockets.push(s);
    }
    let mut out = std::io::stdout().lock();
    writeln!(out, "{}", ports.join(" "))?;
    out.flush()?;
    drop(out);
    let mut events = vec![EpollEvent::empty(); 256];
    let mut buf = [0u8; 2048];
    loop {
        let n = match epoll_wait(epoll, &mut events, 1000) {
            Ok(n) => n,
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => return Err(e.into()),
        };
        // One datagram per ready socket per wake-up: level-triggered epoll reports the
        // socket again if more are queued, so no call ends in a recvfrom that fails.
        for ev in &events[..n] {
            let s = &sockets[ev.data() as usize];
            if let Ok((len, from)) = s.recv_from(&mut buf) {
                let _ = s.send_to(&buf[..len], from);
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// A run.

/// What one target did in the window.
#[derive(Debug, Default)]
struct Outcome {
    calls: usize,
    failed: usize,
    expected: u64,
    received: u64,
    sent: u64,
    /// Lateness per packet, µs.
    lateness: Vec<u32>,
    cpu_s: f64,
    rss_kb_per_call: Option<f64>,
    unmatched: u64,
    /// Datagrams the generator could not send (its socket buffer full).
    send_failed: u64,
    /// How late the generator sent each packet against its schedule, µs.
    send_lag: Vec<u32>,
    /// Packets that came back carrying speech (not silence or comfort noise).
    voiced: u64,
    /// The generator's own CPU in the window, seconds.
    generator_cpu_s: f64,
    window_s: f64,
    silent_calls: usize,
}

impl Outcome {
    fn loss_pct(&self) -> f64 {
        if self.expected == 0 {
            return 100.0;
        }
        (self.expected.saturating_sub(self.received)) as f64 * 100.0 / self.expected as f64
    }
    fn us_per_packet(&self) -> f64 {
        let pkts = self.sent + self.received;
        if pkts == 0 {
            f64::NAN
        } else {
            self.cpu_s * 1e6 / pkts as f64
        }
    }
    /// Cores the target kept busy in the window (its CPU seconds per second).
    fn cores(&self) -> f64 {
        if self.window_s > 0.0 {
            self.cpu_s / self.window_s
        } else {
            f64::NAN
        }
    }
    /// Calls one busy core carries: the calls over the cores they kept busy.
    fn calls_per_core(&self) -> Option<f64> {
        let cores = self.cores();
        (cores > 0.0).then(|| self.calls as f64 / cores)
    }
    fn percentile_ms(&mut self, p: f64) -> f64 {
        if self.lateness.is_empty() {
            return f64::NAN;
        }
        self.lateness.sort_unstable();
        let i = ((self.lateness.len() - 1) as f64 * p).round() as usize;
        f64::from(self.lateness[i]) / 1000.0
    }
}

fn run(cli: &Cli) -> Result<i32> {
    let fixture = fs::read(&cli.fixture)
        .with_context(|| format!("reading the fixture {}", cli.fixture.display()))?;
    if fixture.len() < FRAME {
        bail!(
            "fixture {} is shorter than one frame",
            cli.fixture.display()
        );
    }
    let recordings: Vec<bool> = match cli.recording.as_str() {
        "off" => vec![false],
        "on" => vec![true],
        "both" => vec![false, true],
        other => bail!("--recording must be off, on or both, not {other}"),
    };
    if cli.threads == 0 || cli.calls.contains(&0) {
        bail!("--threads and --calls must be positive");
    }
    let exe = std::env::current_exe()?;
    let daemon_bin = match &cli.sipbridge {
        Some(p) => p.clone(),
        None => exe.with_file_name("sipbridge"),
    };
    if !daemon_bin.exists() {
        bail!("no daemon binary at {} (--sipbridge)", daemon_bin.display());
    }
    let work = WorkDir {
        path: tempfile_dir()?,
        keep: cli.keep,
    };
    let work = &work.path;
    let prompt = work.join("prompt.wav");
    write_silent_prompt(&prompt)?;
    let fixture = Arc::new(fixture);
    let mut exit = 0;
    let mut ratio_lines = Vec::new();
    for &n in &cli.calls {
        let mut floor = run_floor(cli, n, &exe, &fixture)?;
        let floor_us = floor.us_per_packet();
        let mut rows = vec![row("floor", &mut floor, None)];
        for &mt in &cli.media_threads {
            for &rec in &recordings {
                let mut name = format!("daemon rec={}", if rec { "on" } else { "off" });
                if mt != 0 {
                    name.push_str(&format!(" t={mt}"));
                }
                let dir = work.join(format!("n{n}-t{mt}-rec-{rec}"));
                fs::create_dir_all(&dir)?;
                let mut d = run_daemon(cli, n, mt, rec, &dir, &daemon_bin, &prompt, &fixture)?;
                if d.failed > 0 || (!cli.allow_loss && d.received < d.expected) {
                    exit = 1;
                }
                ratio_lines.push(format!(
                    "ratio daemon/floor: calls={n} media_threads={} recording={} loss={:.2}% \
                     ratio={} (daemon {:.2} us/pkt, floor {floor_us:.2} us/pkt; \
                     {:.2} cores busy, {} calls per busy core)",
                    if mt == 0 {
                        "default".to_string()
                    } else {
                        mt.to_string()
                    },
                    if rec { "on" } else { "off" },
                    d.loss_pct(),
                    ratio(d.us_per_packet(), floor_us),
                    d.us_per_packet(),
                    d.cores(),
                    d.calls_per_core()
                        .map_or("n/a".to_string(), |c| format!("{c:.0}")),
                ));
                rows.push(row(&name, &mut d, Some(floor_us)));
            }
        }
        println!(
            "\nN = {n} concurrent calls, {:.0} s window, {} threads",
            cli.seconds, cli.threads
        );
        println!(
            "{:<19} {:>6} {:>7} {:>7} {:>7} {:>7} {:>9} {:>6} {:>8} {:>6} {:>6}",
            "target",
            "calls",
            "loss%",
            "p50ms",
            "p99ms",
            "maxms",
            "us/pkt",
            "ratio",
            "KB/call",
            "failed",
            "cores"
        );
        for r in rows {
            println!("{r}");
        }
    }
    println!();
    for l in &ratio_lines {
        println!("{l}");
    }
    Ok(exit)
}

fn row(name: &str, o: &mut Outcome, floor_us: Option<f64>) -> String {
    let (p50, p99, max) = (
        o.percentile_ms(0.5),
        o.percentile_ms(0.99),
        o.percentile_ms(1.0),
    );
    let mut s = format!(
        "{:<19} {:>6} {:>7.2} {:>7.1} {:>7.1} {:>7.1} {:>9.2} {:>6} {:>8} {:>6} {:>6.2}",
        name,
        o.calls,
        o.loss_pct(),
        p50,
        p99,
        max,
        o.us_per_packet(),
        floor_us.map_or("-".to_string(), |f| ratio(o.us_per_packet(), f)),
        o.rss_kb_per_call
            .map_or("-".to_string(), |k| format!("{k:.0}")),
        o.failed,
        o.cores(),
    );
    o.send_lag.sort_unstable();
    let lag = |p: f64| {
        o.send_lag
            .get(((o.send_lag.len().max(1) - 1) as f64 * p).round() as usize)
            .map_or(f64::NAN, |us| f64::from(*us) / 1000.0)
    };
    s.push_str(&format!(
        "\n{:<19} speech in {:.0} % of returned packets; generator: {:.0} % of a core, \
         send lag p99 {:.1} ms max {:.1} ms",
        "",
        o.voiced as f64 * 100.0 / o.received.max(1) as f64,
        o.generator_cpu_s * 100.0 / o.window_s,
        lag(0.99),
        lag(1.0)
    ));
    if o.unmatched > 0 || o.silent_calls > 0 || o.send_failed > 0 {
        s.push_str(&format!(
            "   ({} datagrams from unknown sources, {} calls silent in the window, {} not sent)",
            o.unmatched, o.silent_calls, o.send_failed
        ));
    }
    s
}

/// daemon/floor, or `n/a` when the floor's CPU in the window was below one clock tick.
fn ratio(daemon_us: f64, floor_us: f64) -> String {
    if floor_us > 0.0 && daemon_us.is_finite() {
        format!("{:.2}", daemon_us / floor_us)
    } else {
        "n/a".to_string()
    }
}

fn tempfile_dir() -> Result<PathBuf> {
    let base = std::env::var_os("TMPDIR").map_or_else(std::env::temp_dir, PathBuf::from);
    let nonce = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .subsec_nanos();
    let dir = base.join(format!("sipbridge-load-{}-{nonce}", std::process::id()));
    fs::create_dir_all(&dir)?;
    Ok(dir)
}

/// 100 ms of silence, 8 kHz 16-bit mono: the disclosure prompt is 4.4 s of a call that
/// would otherwise not be echoing yet.
fn write_silent_prompt(path: &Path) -> Result<()> {
    let spec = hound::WavSpec {
        channels: 1,
        sample_rate: 8000,
        bits_per_sample: 16,
        sample_format: hound::SampleFormat::Int,
    };
    let mut w = hound::WavWriter::create(path, spec)?;
    for _ in 0..800 {
        w.write_sample(0i16)?;
    }
    w.finalize()?;
    Ok(())
}

/// The run's temporary directory: removed when the run ends, on error too, unless kept.
struct WorkDir {
    path: PathBuf,
    keep: bool,
}

impl Drop for WorkDir {
    fn drop(&mut self) {
        if self.keep {
            eprintln!("work directory: {}", self.path.display());
        } else {
            let _ = fs::remove_dir_all(&self.path);
        }
    }
}

/// A child process killed when dropped.
struct Guard(Child);

impl Drop for Guard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn run_floor(cli: &Cli, n: usize, exe: &Path, fixture: &Arc<Vec<u8>>) -> Result<Outcome> {
    let mut child = Guard(
        Command::new(exe)
            .args(["floor-echo", "--count", &n.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .spawn()
            .context("starting the floor echo")?,
    );
    let stdout = child.0.stdout.take().ok_or_else(|| anyhow!("no stdout"))?;
    let mut line = String::new();
    BufReader::new(stdout).read_line(&mut line)?;
    let dests: Vec<SocketAddrV4> = line
        .split_whitespace()
        .map(|p| Ok(SocketAddrV4::new(Ipv4Addr::LOCALHOST, p.parse()?)))
        .collect::<Result<_>>()?;
    if dests.len() != n {
        bail!("the floor echo gave {} ports, not {n}", dests.len());
    }
    let pid = child.0.id();
    let media = MediaSockets::new(n, cli.threads)?;
    let mut o = stream(cli, media, dests, pid, fixture, None)?;
    o.calls = n;
    Ok(o)
}

fn free_rtp_range(len: u16) -> Result<u16> {
    for attempt in 0..50u32 {
        let start = 50000 + ((std::process::id() * 7919 + attempt * 2203) % 5000) as u16 * 2;
        if start.checked_add(len).is_none_or(|e| e > 65000) {
            continue;
        }
        let free = (start..start + len).all(|p| UdpSocket::bind(("127.0.0.1", p)).is_ok());
        if free {
            return Ok(start);
        }
    }
    bail!("no free RTP port range of {len} found; give --rtp-start")
}

#[allow(clippy::too_many_arguments)]
fn run_daemon(
    cli: &Cli,
    n: usize,
    media_threads: usize,
    recording: bool,
    dir: &Path,
    bin: &Path,
    prompt: &Path,
    fixture: &Arc<Vec<u8>>,
) -> Result<Outcome> {
    let max_calls = n + 16;
    let rtp_len = u16::try_from(2 * max_calls + 64).context("too many calls for one port range")?;
    let rtp_start = if cli.rtp_start == 0 {
        free_rtp_range(rtp_len)?
    } else {
        cli.rtp_start
    };
    if rtp_start % 2 != 0 {
        bail!("--rtp-start must be even");
    }
    let rtp_end = rtp_start
        .checked_add(rtp_len - 1)
        .ok_or_else(|| anyhow!("RTP range past 65535; lower --rtp-start"))?;
    let profile = dir.join("profile.toml");
    fs::write(
        &profile,
        format!(
            r#"[profile]
name = "media-load"
var_dir = "{var}"
max_calls = {max_calls}
rtp_ports = {{ start = {rtp_start}, end = {rtp_end} }}
drain_grace_s = 0

[profile.listen]
udp = ["127.0.0.1:0"]

[profile.sip]

[profile.media]
rtp_timeout_s = 0
{threads}

[profile.security]
max_unconfirmed_calls_per_source = {max_calls}

[profile.admin]
listen = "127.0.0.1:0"

[[tenant]]
id = "demo"
recording = {recording}
transcripts = false
prompt = "{prompt}"
pipeline = {{ kind = "echo" }}

[[trunk]]
name = "local"
allow = ["127.0.0.0/8"]
tenant = "demo"

[[route]]
number = "*"
tenant = "demo"
"#,
            var = dir.join("var").display(),
            prompt = prompt.display(),
            // Written only when asked for, so an older daemon can be measured too.
            threads = if media_threads == 0 {
                String::new()
            } else {
                format!("threads = {media_threads}")
            },
        ),
    )?;
    // The tool finds the SIP port in the listener's INFO line, whatever the filter.
    let filter = format!("{},sipbridge::daemon::transport=info", cli.log_filter);
    let log_path = dir.join("daemon.log");
    let log = fs::File::create(&log_path)?;
    let child = Guard(
        Command::new(bin)
            .args([
                "--log-format",
                "json",
                "--log-filter",
                &filter,
                "run",
                "--config",
            ])
            .arg(&profile)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?,
    );
    let pid = child.0.id();
    let sip_addr = wait_for_listener(&log_path, pid)?;
    thread::sleep(Duration::from_millis(300));
    let rss_before = rss_kb(pid)?;
    let media = MediaSockets::new(n, cli.threads)?;
    let mut uac = Uac::new(sip_addr, n)?;
    let ports: Vec<u16> = (0..n).map(|i| media.port_of_call(i)).collect();
    let answered = uac.set_up(&ports, cli.cps)?;
    let failed_setup = answered.iter().filter(|a| a.is_none()).count();
    // Calls that failed get no media: their destination is the discard address and the
    // window counts only answered calls.
    let dests: Vec<SocketAddrV4> = answered
        .iter()
        .map(|a| a.unwrap_or(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 9)))
        .collect();
    let live: Vec<bool> = answered.iter().map(Option::is_some).collect();
    let mut o = stream(cli, media, dests, pid, fixture, Some((rss_before, &live)))?;
    let failed_bye = uac.tear_down()?;
    // The calls' CDRs (and their quality histograms) are written as they end.
    thread::sleep(Duration::from_millis(1000));
    match added_latency(&log_path) {
        Ok(line) => println!(
            "added latency (calls={n} recording={}): {line}",
            if recording { "on" } else { "off" }
        ),
        Err(e) => println!("added latency: not read ({e})"),
    }
    o.calls = n;
    o.failed = failed_setup + failed_bye;
    if let Ok(status) = fs::read_to_string(format!("/proc/{pid}/status")) {
        let _ = status; // the daemon is still up: nothing crashed under load
    } else {
        bail!(
            "the daemon exited during the run; see {}",
            log_path.display()
        );
    }
    drop(child);
    Ok(o)
}

fn wait_for_listener(log: &Path, pid: u32) -> Result<SocketAddrV4> {
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        let text = fs::read_to_string(log).unwrap_or_default();
        for line in text.lines().filter(|l| l.contains("sip listener bound")) {
            if let Some(rest) = line.split("\"local\":\"").nth(1)
                && let Some(addr) = rest.split('"').next()
                && let Ok(SocketAddr::V4(a)) = addr.parse()
            {
                return Ok(a);
            }
        }
        if !Path::new(&format!("/proc/{pid}")).exists() {
            bail!("the daemon exited at start:\n{text}");
        }
        thread::sleep(Duration::from_millis(50));
    }
    bail!(
        "the daemon did not bind its SIP listener in 20 s; see {}",
        log.display()
    )
}

/// The bridge's added latency over every call of the run, from the daemon's
/// `/metrics` (`sipbridge_media_added_latency_seconds`, in = beyond the jitter
/// buffer's target, out = agent audio into an empty playout queue to its
/// first RTP packet): p50 and p99 as the upper bounds of their buckets.
fn added_latency(log: &Path) -> Result<String> {
    let text = fs::read_to_string(log)?;
    let addr = text
        .lines()
        .filter(|l| l.contains("admin API listening"))
        .find_map(|l| {
            l.split("\"addr\":\"")
                .nth(1)?
                .split('"')
                .next()
                .map(str::to_owned)
        })
        .ok_or_else(|| anyhow!("no admin listener in the daemon's log"))?;
    let mut conn = std::net::TcpStream::connect(&addr)?;
    conn.set_read_timeout(Some(Duration::from_secs(5)))?;
    conn.write_all(b"GET /metrics HTTP/1.0\r\nHost: load\r\n\r\n")?;
    let mut body = String::new();
    conn.read_to_string(&mut body)?;
    let mut parts = Vec::new();
    for direction in ["in", "out"] {
        let prefix = format!(
            "sipbridge_media_added_latency_seconds_bucket{{direction=\"{direction}\",le=\""
        );
        let buckets: Vec<(f64, f64)> = body
            .lines()
            .filter_map(|l| {
                let rest = l.strip_prefix(&prefix)?;
                let (le, count) = rest.split_once("\"} ")?;
                let le = if le == "+Inf" {
                    f64::INFINITY
                } else {
                    le.parse().ok()?
                };
                Some((le, count.trim().parse().ok()?))
            })
            .collect();
        let total = buckets.last().map_or(0.0, |b| b.1);
        let at = |q: f64| {
            buckets
                .iter()
                .find(|(_, c)| *c >= q * total)
                .map_or("-".to_owned(), |(le, _)| format!("≤ {:.0} ms", le * 1000.0))
        };
        parts.push(format!(
            "{direction} p50 {} p99 {} ({total:.0} samples)",
            at(0.5),
            at(0.99)
        ));
    }
    Ok(parts.join("; "))
}

/// utime + stime of a process, seconds.
fn cpu_seconds(pid: u32) -> Result<f64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let rest = stat
        .rsplit_once(") ")
        .map(|(_, r)| r)
        .ok_or_else(|| anyhow!("bad stat"))?;
    let f: Vec<&str> = rest.split_whitespace().collect();
    // After the comm: field 3 (state) is index 0, so utime (14) and stime (15) are 11, 12.
    let ticks: u64 = f[11].parse::<u64>()? + f[12].parse::<u64>()?;
    let hz = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)?.unwrap_or(100) as f64;
    Ok(ticks as f64 / hz)
}

fn rss_kb(pid: u32) -> Result<u64> {
    let status = fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| anyhow!("no VmRSS for {pid}"))
}

// ---------------------------------------------------------------------------------------
// Media.

/// The generator's shared media sockets; call i uses socket i % len, socket j belongs to
/// thread j % threads.
struct MediaSockets {
    sockets: Vec<UdpSocket>,
    threads: usize,
}

impl MediaSockets {
    fn new(calls: usize, threads: usize) -> Result<Self> {
        let per_thread = calls.div_ceil(threads * CALLS_PER_SOCKET).max(1);
        let count = (per_thread * threads).min(calls.max(threads));
        let mut sockets = Vec::with_capacity(count);
        for _ in 0..count {
            let s = UdpSocket::bind("127.0.0.1:0")?;
            s.set_nonblocking(true)?;
            let fd = s.as_raw_fd();
            // Forcing needs CAP_NET_ADMIN; otherwise the kernel caps at rmem_max/wmem_max.
            if setsockopt(fd, sockopt::RcvBufForce, &SOCKET_BUFFER).is_err() {
                let _ = setsockopt(fd, sockopt::RcvBuf, &SOCKET_BUFFER);
            }
            setsockopt(fd, sockopt::ReceiveTimestampns, &true)?;
            if setsockopt(fd, sockopt::SndBufForce, &SOCKET_BUFFER).is_err() {
                let _ = setsockopt(fd, sockopt::SndBuf, &SOCKET_BUFFER);
            }
            sockets.push(s);
        }
        Ok(MediaSockets { sockets, threads })
    }

    fn port_of_call(&self, call: usize) -> u16 {
        self.sockets[call % self.sockets.len()]
            .local_addr()
            .map_or(0, |a| a.port())
    }
}

/// One call as a generator thread sees it.
struct CallState {
    socket: usize,
    dest: SockaddrIn,
    live: bool,
    next_send: Instant,
    seq: u16,
    ts: u32,
    ssrc: u32,
    pos: usize,
    /// What came back in the window.
    rx: RxStats,
}

/// One returned stream, in the window: sequence numbers and timestamps extended past
/// their wrap, and each packet's arrival time less its RTP timestamp.
#[derive(Debug, Default)]
struct RxStats {
    received: u64,
    first_seq: i64,
    last_seq: i64,
    max_seq: i64,
    last_ts: i64,
    /// Arrival (µs, any fixed origin) − timestamp (µs of the stream's 8 kHz clock).
    offsets: Vec<i64>,
}

impl RxStats {
    fn on_packet(&mut self, seq: u16, ts: u32, arrival_us: i64) {
        let (seq, ts) = if self.received == 0 {
            self.first_seq = i64::from(seq);
            self.max_seq = i64::from(seq);
            (i64::from(seq), i64::from(ts))
        } else {
            (
                extend(self.last_seq, i64::from(seq), 1 << 16),
                extend(self.last_ts, i64::from(ts), 1 << 32),
            )
        };
        self.last_seq = seq;
        self.last_ts = ts;
        self.max_seq = self.max_seq.max(seq);
        self.first_seq = self.first_seq.min(seq);
        self.received += 1;
        self.offsets.push(arrival_us - ts * 125);
    }

    /// Packets the stream should have delivered: highest − lowest sequence number + 1, or
    /// a whole window's worth if nothing came.
    fn expected(&self, window_packets: u64) -> u64 {
        if self.received == 0 {
            return window_packets;
        }
        ((self.max_seq - self.first_seq + 1) as u64).max(self.received)
    }

    /// Each packet's lateness against the stream's timestamp schedule, µs: its offset
    /// less the smallest offset (the earliest packet reads 0).
    fn lateness_us(&self) -> impl Iterator<Item = u32> + '_ {
        let min = self.offsets.iter().copied().min().unwrap_or(0);
        self.offsets
            .iter()
            .map(move |o| u32::try_from(o - min).unwrap_or(u32::MAX))
    }
}

#[derive(Default)]
struct ThreadResult {
    sent: u64,
    received: u64,
    expected: u64,
    unmatched: u64,
    send_failed: u64,
    silent: usize,
    voiced: u64,
    lateness: Vec<u32>,
    send_lag: Vec<u32>,
}

fn extend(last: i64, low: i64, modulus: i64) -> i64 {
    let half = modulus / 2;
    let mut d = (low - last.rem_euclid(modulus)).rem_euclid(modulus);
    if d >= half {
        d -= modulus;
    }
    last + d
}

/// Streams to `dests` (call i's destination) until the window closes; measures `pid`.
fn stream(
    cli: &Cli,
    media: MediaSockets,
    dests: Vec<SocketAddrV4>,
    pid: u32,
    fixture: &Arc<Vec<u8>>,
    daemon: Option<(u64, &[bool])>,
) -> Result<Outcome> {
    let n = dests.len();
    let threads = media.threads.min(media.sockets.len());
    let t0 = Instant::now() + Duration::from_millis(50);
    let window_start = t0 + Duration::from_secs_f64(cli.warmup);
    let window_end = window_start + Duration::from_secs_f64(cli.seconds);
    let stop = Arc::new(AtomicBool::new(false));
    let sockets = Arc::new(media.sockets);
    let mut handles = Vec::new();
    for t in 0..threads {
        let mut calls = Vec::new();
        for (i, d) in dests.iter().enumerate() {
            let socket = i % sockets.len();
            if socket % threads != t {
                continue;
            }
            // Phases spread over the 20 ms on a 1 ms grid: each slot sends about N/20.
            let phase = SLOT * ((i * 20 / n) as u32);
            calls.push(CallState {
                socket,
                dest: SockaddrIn::from(*d),
                live: daemon.is_none_or(|(_, live)| live[i]),
                next_send: t0 + phase,
                seq: (i as u16).wrapping_mul(7),
                ts: (i as u32).wrapping_mul(104_729),
                ssrc: 0x5151_0000 ^ i as u32,
                pos: (i * FRAME * 13) % (fixture.len() - fixture.len() % FRAME).max(FRAME),
                rx: RxStats::default(),
            });
        }
        let my_sockets: Vec<usize> = (0..sockets.len()).filter(|j| j % threads == t).collect();
        let sockets = Arc::clone(&sockets);
        let fixture = Arc::clone(fixture);
        let stop = Arc::clone(&stop);
        handles.push(thread::spawn(move || {
            media_thread(
                calls,
                &my_sockets,
                &sockets,
                &fixture,
                (t0, window_start, window_end),
                &stop,
            )
        }));
    }
    // The target's CPU over the window.
    sleep_until(window_start);
    let cpu0 = cpu_seconds(pid)?;
    let own0 = cpu_seconds(std::process::id())?;
    sleep_until(window_end);
    let cpu1 = cpu_seconds(pid)?;
    let own1 = cpu_seconds(std::process::id())?;
    let rss_kb_per_call = match daemon {
        Some((before, live)) => {
            let live = live.iter().filter(|l| **l).count().max(1);
            Some(rss_kb(pid)?.saturating_sub(before) as f64 / live as f64)
        }
        None => None,
    };
    stop.store(true, Ordering::Relaxed);
    let mut o = Outcome {
        cpu_s: cpu1 - cpu0,
        rss_kb_per_call,
        generator_cpu_s: own1 - own0,
        window_s: cli.seconds,
        ..Outcome::default()
    };
    for h in handles {
        let r = h.join().map_err(|_| anyhow!("a media thread panicked"))??;
        o.sent += r.sent;
        o.received += r.received;
        o.expected += r.expected;
        o.unmatched += r.unmatched;
        o.send_failed += r.send_failed;
        o.send_lag.extend(r.send_lag);
        o.voiced += r.voiced;
        o.silent_calls += r.silent;
        o.lateness.extend(r.lateness);
    }
    Ok(o)
}

fn sleep_until(t: Instant) {
    let now = Instant::now();
    if t > now {
        thread::sleep(t - now);
    }
}

const NO_CMSGS: [ControlMessage<'static>; 0] = [];

/// Headers for `sendmmsg`. nix 0.26 reports how many datagrams `sendmmsg` sent only as an
/// iterator whose items read each header's source-address slot, and only `recvmmsg`
/// writes those: receiving BATCH datagrams into the headers once initialises every slot.
fn primed_headers() -> Result<MultiHeaders<SockaddrIn>> {
    let mut headers = MultiHeaders::<SockaddrIn>::preallocate(BATCH, None);
    let rx = UdpSocket::bind("127.0.0.1:0")?;
    let _ = setsockopt(rx.as_raw_fd(), sockopt::RcvBuf, &(4 << 20));
    rx.set_read_timeout(Some(Duration::from_secs(2)))?;
    let tx = UdpSocket::bind("127.0.0.1:0")?;
    for _ in 0..BATCH {
        tx.send_to(&[0], rx.local_addr()?)?;
    }
    let mut bufs = vec![[0u8; 8]; BATCH];
    let iovs: Vec<[IoSliceMut<'_>; 1]> = bufs.iter_mut().map(|b| [IoSliceMut::new(b)]).collect();
    let got = recvmmsg(rx.as_raw_fd(), &mut headers, &iovs, MsgFlags::empty(), None)?.count();
    if got != BATCH {
        bail!("priming the sendmmsg headers received {got} of {BATCH} datagrams");
    }
    drop(iovs);
    Ok(headers)
}

fn media_thread(
    mut calls: Vec<CallState>,
    mine: &[usize],
    sockets: &[UdpSocket],
    fixture: &[u8],
    (t0, ws, we): (Instant, Instant, Instant),
    stop: &AtomicBool,
) -> Result<ThreadResult> {
    let mut r = ThreadResult::default();
    let by_source: HashMap<SocketAddrV4, usize> = calls
        .iter()
        .enumerate()
        .filter(|(_, c)| c.live)
        .map(|(k, c)| {
            (
                SocketAddrV4::new(Ipv4Addr::from(c.dest.ip()), c.dest.port()),
                k,
            )
        })
        .collect();
    let fix_len = fixture.len() - fixture.len() % FRAME;
    let mut out_bufs = vec![[0u8; PKT]; BATCH];
    let mut out_addrs: Vec<Option<SockaddrIn>> = vec![None; BATCH];
    let mut send_hdrs = primed_headers()?;
    let mut in_bufs = vec![[0u8; 2048]; BATCH];
    // Room for one SCM_TIMESTAMPNS per datagram (CMSG_SPACE(16) is 32 on Linux).
    let mut recv_hdrs =
        MultiHeaders::<SockaddrIn>::preallocate(BATCH, Some(Vec::with_capacity(64)));
    let mut got: Vec<(usize, Option<SockaddrIn>, Option<i64>)> = Vec::with_capacity(BATCH);
    // Due calls per socket.
    let mut due: Vec<Vec<usize>> = vec![Vec::new(); sockets.len()];
    let mut slot = t0;
    loop {
        sleep_until(slot);
        let now = Instant::now();
        if stop.load(Ordering::Relaxed) || now >= we + Duration::from_millis(200) {
            break;
        }
        while slot <= now {
            slot += SLOT;
        }
        // Send what is due, one sendmmsg per socket.
        for d in &mut due {
            d.clear();
        }
        for (k, c) in calls.iter().enumerate() {
            if c.live && c.next_send <= now {
                due[c.socket].push(k);
            }
        }
        for &j in mine {
            let fd = sockets[j].as_raw_fd();
            for chunk in due[j].chunks(BATCH) {
                for (b, &k) in chunk.iter().enumerate() {
                    let c = &mut calls[k];
                    let p = &mut out_bufs[b];
                    p[0] = 0x80;
                    p[1] = 0;
                    p[2..4].copy_from_slice(&c.seq.to_be_bytes());
                    p[4..8].copy_from_slice(&c.ts.to_be_bytes());
                    p[8..12].copy_from_slice(&c.ssrc.to_be_bytes());
                    p[12..].copy_from_slice(&fixture[c.pos..c.pos + FRAME]);
                    out_addrs[b] = Some(c.dest);
                    if now >= ws && now < we {
                        let lag = now.saturating_duration_since(c.next_send).as_micros();
                        r.send_lag.push(u32::try_from(lag).unwrap_or(u32::MAX));
                    }
                    c.seq = c.seq.wrapping_add(1);
                    c.ts = c.ts.wrapping_add(FRAME as u32);
                    c.pos = (c.pos + FRAME) % fix_len;
                    c.next_send += PTIME;
                }
                let iovs: Vec<[IoSlice<'_>; 1]> = out_bufs[..chunk.len()]
                    .iter()
                    .map(|b| [IoSlice::new(b)])
                    .collect();
                let mut offset = 0;
                while offset < chunk.len() {
                    match sendmmsg(
                        fd,
                        &mut send_hdrs,
                        &iovs[offset..],
                        &out_addrs[offset..chunk.len()],
                        NO_CMSGS,
                        MsgFlags::empty(),
                    ) {
                        Ok(res) => {
                            let sent = res.count();
                            if sent == 0 {
                                break;
                            }
                            offset += sent;
                        }
                        Err(nix::errno::Errno::EINTR) => {}
                        // A full socket buffer: the rest of the batch is not sent.
                        Err(_) => break,
                    }
                }
                if now >= ws && now < we {
                    r.sent += offset as u64;
                    r.send_failed += (chunk.len() - offset) as u64;
                }
            }
        }
        // Everything that came back since the last slot, with the kernel's arrival time.
        for &j in mine {
            let fd = sockets[j].as_raw_fd();
            loop {
                got.clear();
                {
                    let iovs: Vec<[IoSliceMut<'_>; 1]> =
                        in_bufs.iter_mut().map(|b| [IoSliceMut::new(b)]).collect();
                    match recvmmsg(fd, &mut recv_hdrs, &iovs, MsgFlags::MSG_DONTWAIT, None) {
                        Ok(res) => got.extend(res.map(|m| {
                            let at = m.cmsgs().find_map(|c| match c {
                                ControlMessageOwned::ScmTimestampns(t) => {
                                    Some(t.tv_sec() * 1_000_000 + t.tv_nsec() / 1000)
                                }
                                _ => None,
                            });
                            (m.bytes, m.address, at)
                        })),
                        Err(nix::errno::Errno::EINTR) => continue,
                        Err(_) => break,
                    }
                }
                if got.is_empty() {
                    break;
                }
                let drained = Instant::now();
                let in_window = drained >= ws && drained < we;
                let fallback = realtime_us();
                for (b, &(len, from, at)) in got.iter().enumerate() {
                    if !in_window || len < 12 {
                        continue;
                    }
                    let Some(from) = from else { continue };
                    let src = SocketAddrV4::new(Ipv4Addr::from(from.ip()), from.port());
                    let Some(&k) = by_source.get(&src) else {
                        r.unmatched += 1;
                        continue;
                    };
                    let p = &in_bufs[b];
                    let seq = u16::from_be_bytes([p[2], p[3]]);
                    let ts = u32::from_be_bytes([p[4], p[5], p[6], p[7]]);
                    let c = &mut calls[k];
                    c.rx.on_packet(seq, ts, at.unwrap_or(fallback));
                    // Speech, not silence or comfort noise: a sample above about -36 dBov
                    // (µ-law magnitude code below 0x50).
                    if len > 12 && p[12..len.min(PKT + 64)].iter().any(|b| b & 0x7f < 0x50) {
                        r.voiced += 1;
                    }
                }
                if got.len() < BATCH {
                    break;
                }
            }
        }
    }
    let window_packets = (we - ws).as_secs_f64() / PTIME.as_secs_f64();
    for c in calls.iter().filter(|c| c.live) {
        r.received += c.rx.received;
        r.expected += c.rx.expected(window_packets as u64);
        if c.rx.received == 0 {
            r.silent += 1;
        }
        r.lateness.extend(c.rx.lateness_us());
    }
    Ok(r)
}

/// Wall-clock time, µs since the epoch (the clock of SO_TIMESTAMPNS).
fn realtime_us() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as i64)
}

// ---------------------------------------------------------------------------------------
// Signalling: a minimal UAC over one UDP socket.

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Phase {
    Idle,
    Inviting,
    Proceeding,
    Up,
    Failed,
    Byeing,
    Done,
}

struct Call {
    phase: Phase,
    invite: Vec<u8>,
    ack: Vec<u8>,
    bye: Vec<u8>,
    retransmit_at: Instant,
    interval: Duration,
    give_up: Instant,
    media: Option<SocketAddrV4>,
}

struct Uac {
    socket: UdpSocket,
    target: SocketAddrV4,
    local: SocketAddrV4,
    run: u32,
    calls: Vec<Call>,
    /// Final failure statuses to INVITEs, and how many.
    rejected: std::collections::BTreeMap<u16, usize>,
}

fn header_value<'a>(msg: &'a Message, name: &str) -> Option<&'a str> {
    msg.headers().get(name)
}

/// `c=` address and `m=audio` port of an SDP body.
fn sdp_media(body: &[u8]) -> Option<SocketAddrV4> {
    let text = std::str::from_utf8(body).ok()?;
    let mut ip = None;
    let mut port = None;
    for line in text.lines() {
        if let Some(c) = line.strip_prefix("c=IN IP4 ") {
            ip = c.trim().parse::<Ipv4Addr>().ok();
        } else if let Some(m) = line.strip_prefix("m=audio ") {
            port = m.split_whitespace().next()?.parse::<u16>().ok();
        }
    }
    Some(SocketAddrV4::new(ip?, port?))
}

impl Uac {
    fn new(target: SocketAddrV4, n: usize) -> Result<Self> {
        let socket = UdpSocket::bind("127.0.0.1:0")?;
        socket.set_nonblocking(true)?;
        let _ = setsockopt(socket.as_raw_fd(), sockopt::RcvBuf, &SOCKET_BUFFER);
        let local = match socket.local_addr()? {
            SocketAddr::V4(a) => a,
            SocketAddr::V6(_) => bail!("IPv6 SIP socket"),
        };
        let now = Instant::now();
        let calls = (0..n)
            .map(|_| Call {
                phase: Phase::Idle,
                invite: Vec::new(),
                ack: Vec::new(),
                bye: Vec::new(),
                retransmit_at: now,
                interval: T1,
                give_up: now,
                media: None,
            })
            .collect();
        let run = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .subsec_micros();
        Ok(Uac {
            socket,
            target,
            local,
            run,
            calls,
            rejected: Default::default(),
        })
    }

    fn call_id(&self, i: usize) -> String {
        format!("load-{}-{i}@127.0.0.1", self.run)
    }

    fn index_of(&self, call_id: &str) -> Option<usize> {
        let rest = call_id.strip_prefix(&format!("load-{}-", self.run))?;
        rest.strip_suffix("@127.0.0.1")?
            .parse()
            .ok()
            .filter(|i| *i < self.calls.len())
    }

    fn common(&self, i: usize, branch: &str) -> String {
        format!(
            "Via: SIP/2.0/UDP {local};branch=z9hG4bK{branch};rport\r\nMax-Forwards: 70\r\n\
             From: <sip:+15559990000@127.0.0.1>;tag=ld{i}\r\nCall-ID: {cid}\r\n",
            local = self.local,
            cid = self.call_id(i),
        )
    }

    fn invite(&self, i: usize, rtp_port: u16) -> Vec<u8> {
        let sdp = format!(
            "v=0\r\no=load {i} 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\n\
             m=audio {rtp_port} RTP/AVP 0 101\r\na=rtpmap:0 PCMU/8000\r\n\
             a=rtpmap:101 telephone-event/8000\r\na=fmtp:101 0-16\r\na=ptime:20\r\na=sendrecv\r\n"
        );
        format!(
            "INVITE sip:{DIALED}@{target} SIP/2.0\r\n{common}To: <sip:{DIALED}@{target}>\r\n\
             CSeq: 1 INVITE\r\nContact: <sip:load@{local}>\r\nContent-Type: application/sdp\r\n\
             Content-Length: {len}\r\n\r\n{sdp}",
            target = self.target,
            common = self.common(i, &format!("-inv-{}-{i}", self.run)),
            local = self.local,
            len = sdp.len(),
        )
        .into_bytes()
    }

    fn in_dialog(
        &self,
        i: usize,
        method: &str,
        cseq: u32,
        uri: &str,
        to: &str,
        branch: &str,
    ) -> Vec<u8> {
        format!(
            "{method} {uri} SIP/2.0\r\n{common}To: {to}\r\nCSeq: {cseq} {method}\r\n\
             Content-Length: 0\r\n\r\n",
            common = self.common(i, branch),
        )
        .into_bytes()
    }

    fn send(&self, bytes: &[u8]) {
        let _ = self.socket.send_to(bytes, self.target);
    }

    /// Sets every call up (at `cps` INVITEs per second); returns each call's media
    /// destination (the daemon's RTP address from its answer), or None if it failed.
    fn set_up(&mut self, rtp_ports: &[u16], cps: u32) -> Result<Vec<Option<SocketAddrV4>>> {
        let start = Instant::now();
        let gap = Duration::from_secs_f64(1.0 / f64::from(cps.max(1)));
        let mut next_new = 0usize;
        let mut buf = vec![0u8; 65536];
        loop {
            let now = Instant::now();
            // New INVITEs, paced.
            while next_new < self.calls.len() && start + gap.mul_f64(next_new as f64) <= now {
                let i = next_new;
                let invite = self.invite(i, rtp_ports[i]);
                self.send(&invite);
                let c = &mut self.calls[i];
                c.invite = invite;
                c.phase = Phase::Inviting;
                c.retransmit_at = now + T1;
                c.interval = T1;
                c.give_up = now + 64 * T1;
                next_new += 1;
            }
            // Timer A / B.
            for i in 0..self.calls.len() {
                let c = &self.calls[i];
                if !matches!(c.phase, Phase::Inviting | Phase::Proceeding) {
                    continue;
                }
                if now >= c.give_up {
                    self.calls[i].phase = Phase::Failed;
                } else if c.phase == Phase::Inviting && now >= c.retransmit_at {
                    self.send(&c.invite.clone());
                    let c = &mut self.calls[i];
                    c.interval *= 2;
                    c.retransmit_at = now + c.interval;
                }
            }
            if next_new == self.calls.len()
                && self
                    .calls
                    .iter()
                    .all(|c| matches!(c.phase, Phase::Up | Phase::Failed))
            {
                break;
            }
            self.receive(&mut buf, Duration::from_millis(2))?;
        }
        for (status, count) in &self.rejected {
            eprintln!(
                "sipbridge-load: {count} of {} INVITEs answered {status}",
                self.calls.len()
            );
        }
        let timed_out = self
            .calls
            .iter()
            .filter(|c| c.phase == Phase::Failed)
            .count()
            - self.rejected.values().sum::<usize>();
        if timed_out > 0 {
            eprintln!("sipbridge-load: {timed_out} INVITEs got no final response (or no SDP)");
        }
        Ok(self
            .calls
            .iter()
            .map(|c| if c.phase == Phase::Up { c.media } else { None })
            .collect())
    }

    /// Hangs up every call that is up; returns how many BYEs got no 2xx.
    fn tear_down(&mut self) -> Result<usize> {
        let now = Instant::now();
        for i in 0..self.calls.len() {
            if self.calls[i].phase != Phase::Up {
                continue;
            }
            let bye = self.calls[i].bye.clone();
            self.send(&bye);
            let c = &mut self.calls[i];
            c.phase = Phase::Byeing;
            c.retransmit_at = now + T1;
            c.interval = T1;
            c.give_up = now + 64 * T1;
            if i % 200 == 199 {
                thread::sleep(Duration::from_millis(20));
            }
        }
        let mut buf = vec![0u8; 65536];
        loop {
            let now = Instant::now();
            let mut pending = false;
            for i in 0..self.calls.len() {
                if self.calls[i].phase != Phase::Byeing {
                    continue;
                }
                pending = true;
                if now >= self.calls[i].give_up {
                    self.calls[i].phase = Phase::Failed;
                } else if now >= self.calls[i].retransmit_at {
                    let bye = self.calls[i].bye.clone();
                    self.send(&bye);
                    let c = &mut self.calls[i];
                    c.interval = (c.interval * 2).min(T2);
                    c.retransmit_at = now + c.interval;
                }
            }
            if !pending {
                break;
            }
            self.receive(&mut buf, Duration::from_millis(5))?;
        }
        Ok(self
            .calls
            .iter()
            .filter(|c| c.phase == Phase::Failed)
            .count())
    }

    /// Handles what arrives within `wait`.
    fn receive(&mut self, buf: &mut [u8], wait: Duration) -> Result<()> {
        let mut fds = [PollFd::new(self.socket.as_raw_fd(), PollFlags::POLLIN)];
        match ppoll(&mut fds, Some(TimeSpec::from_duration(wait)), None) {
            Ok(_) | Err(nix::errno::Errno::EINTR) => {}
            Err(e) => return Err(e.into()),
        }
        while let Ok((len, from)) = self.socket.recv_from(buf) {
            let Ok(msg) = parse_datagram(&buf[..len]) else {
                continue;
            };
            match msg {
                Message::Response(ref resp) => self.on_response(&msg, resp),
                Message::Request(ref req) => self.on_request(req, from),
            }
        }
        Ok(())
    }

    fn on_request(&self, req: &Request, from: SocketAddr) {
        // The daemon's own in-dialog requests (BYE, OPTIONS, re-INVITE…): say yes.
        if req.method.as_str() == "ACK" {
            return;
        }
        let resp: Response = Response::for_request(req, 200);
        let _ = self.socket.send_to(&resp.encode(), from);
    }

    fn on_response(&mut self, msg: &Message, resp: &Response) {
        let Some(i) = header_value(msg, "Call-ID").and_then(|c| self.index_of(c)) else {
            return;
        };
        let Some(cseq) = header_value(msg, "CSeq") else {
            return;
        };
        let to = header_value(msg, "To").unwrap_or_default().to_string();
        if cseq.ends_with("BYE") {
            if resp.status >= 200 && self.calls[i].phase == Phase::Byeing {
                self.calls[i].phase = if resp.status < 300 {
                    Phase::Done
                } else {
                    Phase::Failed
                };
            }
            return;
        }
        if !cseq.ends_with("INVITE") {
            return;
        }
        match resp.status {
            100..=199 => {
                if self.calls[i].phase == Phase::Inviting {
                    self.calls[i].phase = Phase::Proceeding;
                }
            }
            200..=299 => {
                if matches!(self.calls[i].phase, Phase::Inviting | Phase::Proceeding) {
                    let uri = resp
                        .headers
                        .contacts()
                        .ok()
                        .and_then(|c| c.into_iter().next())
                        .map_or_else(
                            || format!("sip:{DIALED}@{}", self.target),
                            |c| c.uri.to_string(),
                        );
                    let ack =
                        self.in_dialog(i, "ACK", 1, &uri, &to, &format!("-ack-{}-{i}", self.run));
                    let bye =
                        self.in_dialog(i, "BYE", 2, &uri, &to, &format!("-bye-{}-{i}", self.run));
                    let media = sdp_media(&resp.body);
                    let c = &mut self.calls[i];
                    c.ack = ack;
                    c.bye = bye;
                    c.media = media;
                    c.phase = if media.is_some() {
                        Phase::Up
                    } else {
                        Phase::Failed
                    };
                }
                // First 2xx or a retransmission: (re)send the ACK.
                if !self.calls[i].ack.is_empty() {
                    self.send(&self.calls[i].ack);
                }
            }
            _ => {
                // A final failure: ACK it in the INVITE's transaction.
                let ack = self.in_dialog(
                    i,
                    "ACK",
                    1,
                    &format!("sip:{DIALED}@{}", self.target),
                    &to,
                    &format!("-inv-{}-{i}", self.run),
                );
                self.send(&ack);
                if matches!(self.calls[i].phase, Phase::Inviting | Phase::Proceeding) {
                    eprintln!(
                        "sipbridge-load: call {i} answered {} {}",
                        resp.status, resp.reason
                    );
                    self.calls[i].phase = Phase::Failed;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A stream of `n` packets from `seq0`/`ts0`, 20 ms apart, each `delay_us(i)` late.
    fn stream(seq0: u16, ts0: u32, n: u16, skip: &[u16], delay_us: impl Fn(u16) -> i64) -> RxStats {
        let mut rx = RxStats::default();
        for i in 0..n {
            if skip.contains(&i) {
                continue;
            }
            let ts = ts0.wrapping_add(u32::from(i) * 160);
            rx.on_packet(
                seq0.wrapping_add(i),
                ts,
                7_000_000 + i64::from(i) * 20_000 + delay_us(i),
            );
        }
        rx
    }

    #[test]
    fn a_whole_stream_across_both_wraps_loses_nothing_and_is_on_time() {
        let rx = stream(65_500, u32::MAX - 800, 200, &[], |_| 0);
        assert_eq!(rx.received, 200);
        assert_eq!(rx.expected(500), 200);
        assert!(rx.lateness_us().all(|l| l == 0));
    }

    #[test]
    fn gaps_by_sequence_number_are_loss() {
        let rx = stream(65_530, 1000, 100, &[3, 4, 50], |_| 0);
        assert_eq!(rx.received, 97);
        assert_eq!(rx.expected(500), 100);
    }

    #[test]
    fn lateness_is_against_the_timestamp_schedule() {
        // Packet 10 arrives 30 ms late, the rest on time: p-max 30 ms, others 0.
        let rx = stream(1, 5, 50, &[], |i| if i == 10 { 30_000 } else { 0 });
        let late: Vec<u32> = rx.lateness_us().collect();
        assert_eq!(late[10], 30_000);
        assert_eq!(late.iter().filter(|l| **l != 0).count(), 1);
        // Reordered: a packet that comes after its successor still counts once.
        let mut rx = RxStats::default();
        rx.on_packet(10, 1600, 0);
        rx.on_packet(12, 1920, 40_000);
        rx.on_packet(11, 1760, 41_000);
        assert_eq!((rx.received, rx.expected(0)), (3, 3));
        assert_eq!(rx.lateness_us().collect::<Vec<_>>(), vec![0, 0, 21_000]);
    }

    #[test]
    fn a_silent_call_loses_the_whole_window() {
        assert_eq!(RxStats::default().expected(500), 500);
        assert_eq!(RxStats::default().lateness_us().count(), 0);
    }

    #[test]
    fn the_answer_gives_the_media_address() {
        let sdp = b"v=0\r\no=- 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\n\
                    m=audio 40002 RTP/AVP 0 101\r\na=rtpmap:0 PCMU/8000\r\n";
        assert_eq!(sdp_media(sdp), Some("127.0.0.1:40002".parse().unwrap()));
        assert_eq!(sdp_media(b"v=0\r\nc=IN IP4 127.0.0.1\r\n"), None);
    }
}
