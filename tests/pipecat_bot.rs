#![allow(clippy::unwrap_used, clippy::expect_used)]
//! Pipecat, unchanged, as the agent (issue 14 items 1–2): `examples/pipecat_bot/bot.py`
//! (pipecat-ai 1.14.0: FastAPI WebSocket transport, Pipecat's own
//! `TwilioFrameSerializer` with its default `auto_hang_up=True`) serves the tenant's
//! Twilio-mode pipeline; only its settings point it at sipbridge (`base_url` = the admin
//! listener, the tenant's `[tenant.twilio_api]` account SID and auth token).
//!
//! SIPp places the call (`bridge_bye_test_socket.xml`) and the test's own UDP socket is
//! the caller's media: it sends `caller1.ulaw` and records what comes back. Checked: the
//! bot hears the caller (what it wrote matches the fixture), the caller hears the bot
//! (its echo matches the fixture), and the bot's `EndFrame` hangs the call up through the
//! Twilio REST subset — Pipecat logs the success, the daemon logs the REST hang-up, SIPp
//! receives the BYE and the CDR says `agent-hangup`. No credential in the daemon's log.
//!
//! Needs the Python environment `scripts/install-test-deps.sh` builds
//! (`$SIPBRIDGE_TEST_VENV`, default `/opt/sipbridge-test-venv`).

mod agent_util;
mod common;

use agent_util::{best_ncc, ulaw_table};
use common::{Daemon, ProfileSpec, repo_path, sipp, sipp_scenario};
use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, UdpSocket};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const NUMBER: &str = "+15557770000";
const ACCOUNT_SID: &str = "AC7e57000000000000000000000000bot0";
const AUTH_TOKEN: &str = "pipecat-bot-auth-token-5b1e9c";
/// Seconds after `start` before the bot ends the call.
const HANGUP_AFTER_S: &str = "7";

fn python() -> std::path::PathBuf {
    let venv = std::env::var_os("SIPBRIDGE_TEST_VENV").map_or_else(
        || "/opt/sipbridge-test-venv".into(),
        std::path::PathBuf::from,
    );
    let python = venv.join("bin/python");
    assert!(
        python.exists(),
        "{} is missing: run `bash scripts/install-test-deps.sh` (it installs Pipecat there)",
        python.display()
    );
    python
}

/// The bot process; killed on drop. Its output lines are kept.
struct Bot {
    child: Child,
    lines: Arc<Mutex<Vec<String>>>,
}

impl Bot {
    /// Starts the bot on `port`; returns once it listens.
    fn spawn(admin: SocketAddr, heard: &std::path::Path, port: u16) -> Bot {
        let mut child = Command::new(python())
            .arg(repo_path("examples/pipecat_bot/bot.py"))
            .env("BOT_PORT", port.to_string())
            .env("TWILIO_ACCOUNT_SID", ACCOUNT_SID)
            .env("TWILIO_AUTH_TOKEN", AUTH_TOKEN)
            .env("TWILIO_API_BASE_URL", format!("http://{admin}"))
            .env("HANGUP_AFTER_S", HANGUP_AFTER_S)
            .env("BOT_HEARD_PATH", heard)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start the Pipecat bot");
        let lines = Arc::new(Mutex::new(Vec::new()));
        let (port_tx, port_rx) = mpsc::channel::<u16>();
        for out in [
            Box::new(child.stdout.take().unwrap()) as Box<dyn std::io::Read + Send>,
            Box::new(child.stderr.take().unwrap()),
        ] {
            let lines = Arc::clone(&lines);
            let port_tx = port_tx.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(out).lines().map_while(Result::ok) {
                    if let Some(p) = line.strip_prefix("bot listening on ") {
                        let _ = port_tx.send(p.trim().parse::<u16>().unwrap());
                    }
                    lines.lock().unwrap().push(line);
                }
            });
        }
        let bot = Bot { child, lines };
        // Importing Pipecat takes seconds on a cold cache.
        match port_rx.recv_timeout(Duration::from_secs(90)) {
            Ok(bound) if bound == port => bot,
            _ => panic!("the bot did not start on {port}:\n{}", bot.output()),
        }
    }

    fn output(&self) -> String {
        self.lines.lock().unwrap().join("\n")
    }

    fn wait_for_line(&self, needle: &str, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if self
                .lines
                .lock()
                .unwrap()
                .iter()
                .any(|l| l.contains(needle))
            {
                return true;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        false
    }
}

impl Drop for Bot {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn profile(bot_port: u16) -> String {
    let spec = ProfileSpec {
        tenant: &format!(
            "caller_audio_after_prompt = false\npipeline_rate = 8000\n\
             [tenant.twilio_api]\naccount_sid = \"{ACCOUNT_SID}\"\nauth_token = \"env:BOT_TW_TOKEN\"\n"
        ),
        ..ProfileSpec::default()
    };
    let agent = format!(
        r#"pipeline = {{ kind = "agent", url = "ws://127.0.0.1:{bot_port}/ws", mode = "twilio", on_failure = "continue" }}"#
    );
    spec.render()
        .replace(r#"pipeline = { kind = "echo" }"#, &agent)
        // No disclosure prompt (recording is off): the caller hears only the bot.
        .lines()
        .filter(|l| !l.starts_with("prompt = "))
        .collect::<Vec<_>>()
        .join("\n")
        .replace(
            "[profile.sip]",
            "[profile.admin]\nlisten = \"127.0.0.1:0\"\n\n[profile.sip]",
        )
}

/// The daemon's RTP port for the call, from its `call started` line.
fn rtp_port(daemon: &Daemon) -> u16 {
    let line = daemon
        .wait_for_log(Duration::from_secs(15), |l| l.contains("\"call started\""))
        .unwrap_or_else(|| panic!("no `call started` line:\n{}", daemon.logs().join("\n")));
    let v: serde_json::Value = serde_json::from_str(&line).unwrap();
    let port = v["fields"]["port"]
        .as_u64()
        .or_else(|| v["port"].as_u64())
        .unwrap_or_else(|| panic!("no port in {line}"));
    u16::try_from(port).unwrap()
}

#[test]
fn pipecat_bot_unchanged_hears_the_caller_is_heard_and_hangs_up_with_auto_hang_up() {
    let heard_dir = tempfile::tempdir().unwrap();
    let heard = heard_dir.path().join("heard.pcm");
    // The bot needs the admin address and the daemon the bot's port: the daemon goes
    // first with a port reserved for the bot, which binds it with SO_REUSEADDR.
    let reserve = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let bot_port = reserve.local_addr().unwrap().port();
    drop(reserve);
    let daemon = Daemon::spawn_with_env(&profile(bot_port), &[("BOT_TW_TOKEN", AUTH_TOKEN)]);
    let admin = daemon.admin_addr();
    let bot = Bot::spawn(admin, &heard, bot_port);

    let media = UdpSocket::bind("127.0.0.1:0").unwrap();
    let media_port = media.local_addr().unwrap().port().to_string();
    let udp = daemon.udp_addr();
    let carrier = std::thread::spawn(move || {
        sipp(
            &sipp_scenario("bridge_bye_test_socket.xml"),
            udp,
            &[
                "-key",
                "test_rtp_port",
                &media_port,
                "-s",
                NUMBER,
                "-timeout",
                "30s",
            ],
        )
    });

    // The caller: caller1.ulaw in 20 ms packets, then silence until the bot hangs up.
    let remote = SocketAddr::from(([127, 0, 0, 1], rtp_port(&daemon)));
    assert!(
        daemon
            .wait_for_log(Duration::from_secs(10), |l| l.contains("\"answered\""))
            .is_some(),
        "the call was not answered"
    );
    let speech = std::fs::read(repo_path("fixtures/audio/caller1.ulaw")).unwrap();
    let sender = {
        let sock = media.try_clone().unwrap();
        let speech = speech.clone();
        std::thread::spawn(move || {
            let start = Instant::now();
            let frames = speech.chunks(160).map(<[u8]>::to_vec).chain(
                std::iter::repeat_n(vec![0xFF; 160], 500), // 10 s of silence at most
            );
            for (i, payload) in frames.enumerate() {
                let mut packet = vec![0x80, 0x00];
                packet.extend_from_slice(&(i as u16).to_be_bytes());
                packet.extend_from_slice(&((i as u32) * 160).to_be_bytes());
                packet.extend_from_slice(&0x05ee_db07_u32.to_be_bytes());
                packet.extend_from_slice(&payload);
                if sock.send_to(&packet, remote).is_err() {
                    break;
                }
                let next = start + Duration::from_millis(20 * (i as u64 + 1));
                if let Some(wait) = next.checked_duration_since(Instant::now()) {
                    std::thread::sleep(wait);
                }
            }
        })
    };
    let packets = agent_util::capture(&media, Duration::from_secs(25), |_| {});
    let result = carrier.join().unwrap();
    drop(sender); // it stops by itself once its 10 s of silence are sent
    result.assert_success();
    assert!(result.messages.contains("BYE sip:"), "{}", result.report());

    // The bot ended the call through the REST subset, as Pipecat reports it.
    assert!(
        bot.wait_for_line(
            "Successfully terminated Twilio call",
            Duration::from_secs(5)
        ),
        "Pipecat did not report the hang-up:\n{}",
        bot.output()
    );
    assert!(
        daemon
            .logs()
            .iter()
            .any(|l| l.contains("hang-up requested through the Twilio REST API")),
        "no REST hang-up in the daemon's log"
    );
    let cdr = daemon
        .wait_for_cdr(Duration::from_secs(10), |c| c["result_code"] == 200)
        .expect("a CDR for the answered call");
    assert_eq!(cdr["cause"], "agent-hangup", "{cdr}");
    assert_eq!(cdr["hangup_side"], "bridge");

    let table = ulaw_table();
    let needle: Vec<f64> = speech
        .iter()
        .map(|&c| f64::from(table[c as usize]))
        .collect();
    // The bot heard the caller.
    let heard_pcm: Vec<f64> = std::fs::read(&heard)
        .unwrap()
        .chunks_exact(2)
        .map(|b| f64::from(i16::from_le_bytes([b[0], b[1]])))
        .collect();
    let (ncc, lag) = best_ncc(&heard_pcm, &needle);
    eprintln!("caller audio at the bot: NCC {ncc:.4} at lag {lag}");
    assert!(ncc >= 0.95, "the bot heard NCC {ncc:.4}");
    // The caller heard the bot (its echo).
    let back: Vec<f64> = packets
        .iter()
        .flat_map(|p| p.samples.iter().map(|&s| f64::from(s)))
        .collect();
    // A Python bot on a loaded 2-core machine may stall for a few tens of ms; the
    // caller then hears a short gap and the rest of the echo later, which is right.
    // So the echo is matched in 250 ms pieces, each free to sit up to 500 ms later.
    let (ncc, lag) = best_ncc(&back, &needle);
    let pieces = agent_util::segment_nccs(&back, &needle, 2000, 4000);
    eprintln!("the bot's audio at the caller: NCC {ncc:.4} at lag {lag}; by piece {pieces:.3?}");
    let good = pieces.iter().filter(|&&p| p >= 0.9).count();
    assert!(
        pieces.len() >= 8 && good * 10 >= pieces.len() * 8,
        "the caller heard the bot in only {good} of {} pieces: {pieces:.3?}",
        pieces.len()
    );

    for line in daemon.logs() {
        assert!(!line.contains(AUTH_TOKEN), "credential in the log: {line}");
    }
}
