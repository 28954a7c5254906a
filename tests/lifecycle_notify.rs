#![allow(clippy::unwrap_used, clippy::expect_used)]
//! systemd integration (issue 7, Build 1–2): the real daemon with `$NOTIFY_SOCKET`
//! pointed at a socket this test listens on sends READY (with STATUS), STATUS when the
//! number of calls changes, WATCHDOG pings every half `$WATCHDOG_USEC`, RELOADING with
//! MONOTONIC_USEC then READY on SIGHUP, and STOPPING on SIGTERM, in that order; without
//! `$WATCHDOG_USEC` (or with another process's `$WATCHDOG_PID`) it never pings.
//! `systemd/sipbridge.service` verifies cleanly with `systemd-analyze verify` (and the
//! sysusers/tmpfiles files apply to empty roots, when run as root) as
//! `scripts/install.sh` installs it, and the production profile passes `check`.
//!
//! Not tested here: that a stalled main loop stops the pings (the pings come from the
//! main loop itself, after it took the switchboard and call-table locks).

mod common;
mod lifecycle_support;

use std::process::Command;
use std::thread;
use std::time::{Duration, Instant};

use common::{Daemon, ProfileSpec, repo_path, sipp, sipp_scenario};
use lifecycle_support::{NotifySocket, field, signal, wait_for_exit};

const WAIT: Duration = Duration::from_secs(10);

#[test]
fn notifies_ready_status_watchdog_reloading_and_stopping_in_order() {
    let notify = NotifySocket::bind();
    let daemon = Daemon::spawn_with_env(
        &ProfileSpec::default().render(),
        &[
            ("NOTIFY_SOCKET", notify.path_str()),
            ("WATCHDOG_USEC", "400000"),
        ],
    );
    let ready = notify
        .wait_for(0, WAIT, |m| m.contains("READY=1"))
        .expect("READY=1");
    assert_eq!(
        ready,
        0,
        "READY is the first notification: {:?}",
        notify.messages()
    );
    assert_eq!(
        notify.messages()[0],
        "READY=1\nSTATUS=serving: 0 active calls\n"
    );

    // Watchdog pings every 200 ms (half of 400 ms).
    thread::sleep(Duration::from_millis(1300));
    let pings: Vec<Instant> = notify
        .all()
        .into_iter()
        .filter(|(_, m)| m == "WATCHDOG=1\n")
        .map(|(t, _)| t)
        .collect();
    assert!(pings.len() >= 5, "{} pings in 1.3 s", pings.len());
    let max_gap = pings.windows(2).map(|w| w[1] - w[0]).max().unwrap();
    // Never a gap as long as WATCHDOG_USEC: systemd would have killed the daemon.
    assert!(max_gap < Duration::from_millis(400), "gap {max_gap:?}");

    // A call: STATUS follows the number of live calls.
    let before_call = notify.messages().len();
    let target = daemon.udp_addr();
    sipp(
        &sipp_scenario("basic_call.xml"),
        target,
        &["-s", "+15551234567"],
    )
    .assert_success();
    let one = notify
        .wait_for(before_call, WAIT, |m| {
            field(m, "STATUS") == Some("serving: 1 active call")
        })
        .unwrap_or_else(|| panic!("STATUS with 1 call: {:?}", notify.messages()));
    notify
        .wait_for(one, WAIT, |m| {
            field(m, "STATUS") == Some("serving: 0 active calls")
        })
        .expect("STATUS back to 0 calls");

    // SIGHUP twice: RELOADING=1 with MONOTONIC_USEC (CLOCK_MONOTONIC in µs), then READY.
    let mut reloads = Vec::new();
    for _ in 0..2 {
        let from = notify.messages().len();
        let sent = Instant::now();
        signal(daemon.pid(), "-HUP");
        let r = notify
            .wait_for(from, WAIT, |m| m.contains("RELOADING=1"))
            .expect("RELOADING=1");
        let msg = notify.messages()[r].clone();
        assert!(msg.starts_with("RELOADING=1\n"), "{msg:?}");
        let usec: u64 = field(&msg, "MONOTONIC_USEC")
            .expect("MONOTONIC_USEC with RELOADING")
            .parse()
            .unwrap();
        let again = notify
            .wait_for(r + 1, WAIT, |m| m.contains("READY=1"))
            .expect("READY=1 after the reload");
        assert_eq!(
            notify.messages()[again],
            "READY=1\nSTATUS=serving: 0 active calls\n"
        );
        reloads.push((sent, usec, r, again));
        thread::sleep(Duration::from_millis(700));
    }
    let (t0, u0, _, _) = reloads[0];
    let (t1, u1, _, _) = reloads[1];
    let measured = (t1 - t0).as_micros() as i128;
    let reported = i128::from(u1) - i128::from(u0);
    assert!(
        (reported - measured).abs() < 300_000,
        "MONOTONIC_USEC moved {reported} µs while {measured} µs passed"
    );
    assert!(
        daemon
            .logs()
            .iter()
            .any(|l| lifecycle_support::log_message(l).as_deref()
                == Some("configuration reloaded")),
        "no 'configuration reloaded' log line"
    );

    // SIGTERM with no calls: STOPPING, then exit 0 at once.
    let from = notify.messages().len();
    let pid = daemon.pid();
    signal(pid, "-TERM");
    let stopping = notify
        .wait_for(from, WAIT, |m| m.starts_with("STOPPING=1\n"))
        .expect("STOPPING=1");
    // With the stop timeout extended past the drain grace and the BYE waits.
    let stop = &notify.messages()[stopping];
    let usec: u64 = stop
        .strip_prefix("STOPPING=1\nEXTEND_TIMEOUT_USEC=")
        .and_then(|v| v.trim_end().parse().ok())
        .unwrap_or_else(|| panic!("no EXTEND_TIMEOUT_USEC in {stop:?}"));
    assert!(usec >= 16_000_000, "{stop:?}");
    assert_eq!(wait_for_exit(pid, Duration::from_secs(5)), Some(0));

    // In order: READY < RELOADING < READY < RELOADING < READY < STOPPING, pings between.
    let order: Vec<usize> = std::iter::once(ready)
        .chain(reloads.iter().flat_map(|&(_, _, r, a)| [r, a]))
        .chain(std::iter::once(stopping))
        .collect();
    assert!(order.windows(2).all(|w| w[0] < w[1]), "{order:?}");
    let messages = notify.messages();
    assert!(
        messages[reloads[1].3..stopping]
            .iter()
            .any(|m| m == "WATCHDOG=1\n"),
        "pings go on after a reload: {messages:?}"
    );
    assert!(
        !messages[stopping + 1..]
            .iter()
            .any(|m| m.contains("READY=1")),
        "{messages:?}"
    );
}

#[test]
fn no_watchdog_pings_unless_asked_for_this_process() {
    for env in [
        vec![],
        // systemd sets WATCHDOG_PID to the main process; another pid means "not you".
        vec![("WATCHDOG_USEC", "200000"), ("WATCHDOG_PID", "1")],
    ] {
        let notify = NotifySocket::bind();
        let mut all_env = vec![("NOTIFY_SOCKET", notify.path_str())];
        all_env.extend(env.iter().copied());
        let daemon = Daemon::spawn_with_env(&ProfileSpec::default().render(), &all_env);
        notify
            .wait_for(0, WAIT, |m| m.contains("READY=1"))
            .expect("READY=1");
        thread::sleep(Duration::from_millis(800));
        let messages = notify.messages();
        assert!(
            !messages.iter().any(|m| m.contains("WATCHDOG")),
            "env {env:?}: {messages:?}"
        );
        drop(daemon);
    }
}

#[test]
fn the_unit_verifies_with_systemd_analyze() {
    let out = Command::new("bash")
        .arg(repo_path("scripts/verify-unit.sh"))
        .args(["--binary", env!("CARGO_BIN_EXE_sipbridge")])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "verify-unit.sh failed:\n{stderr}");
    assert!(stderr.is_empty(), "{stderr}");

    // What the unit promises the daemon and the profile.
    let unit = std::fs::read_to_string(repo_path("systemd/sipbridge.service")).unwrap();
    for line in [
        "Type=notify",
        "NotifyAccess=main",
        "ExecReload=/bin/kill -HUP $MAINPID",
        "Restart=on-failure",
        "StateDirectory=sipbridge",
        "ConfigurationDirectory=sipbridge",
        "LoadCredential=master.key:/etc/sipbridge/credentials/master.key",
        "AmbientCapabilities=CAP_NET_BIND_SERVICE",
        "CapabilityBoundingSet=CAP_NET_BIND_SERVICE",
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        "MemoryDenyWriteExecute=yes",
        "SystemCallFilter=@system-service",
        "RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6",
    ] {
        assert!(unit.lines().any(|l| l == line), "unit lacks {line:?}");
    }
    let secs = |key: &str| -> u64 {
        let v = unit
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .unwrap_or_else(|| panic!("unit lacks {key}"));
        v.trim_end_matches('s').parse().unwrap()
    };
    // Drain grace (default 30 s) + 5 s for the BYEs + 1 s for TCP + the store.
    assert!(secs("TimeoutStopSec=") >= 30 + 5 + 1 + 10);
    assert!(secs("WatchdogSec=") >= 2);
}

#[test]
fn install_stages_everything_under_destdir_with_the_prefix_applied() {
    let stage = tempfile::tempdir().unwrap();
    let out = Command::new("bash")
        .arg(repo_path("scripts/install.sh"))
        .args(["--binary", env!("CARGO_BIN_EXE_sipbridge")])
        .env("DESTDIR", stage.path())
        .env("PREFIX", "/opt/sb")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    use std::os::unix::fs::PermissionsExt;
    let mode = |p: &str| {
        std::fs::metadata(stage.path().join(p))
            .unwrap_or_else(|e| panic!("{p}: {e}"))
            .permissions()
            .mode()
            & 0o7777
    };
    assert_eq!(mode("opt/sb/bin/sipbridge"), 0o755);
    assert_eq!(mode("etc/systemd/system/sipbridge.service"), 0o644);
    assert_eq!(mode("etc/sysusers.d/sipbridge.conf"), 0o644);
    assert_eq!(mode("etc/tmpfiles.d/sipbridge.conf"), 0o644);
    assert_eq!(mode("etc/sipbridge/sipbridge.toml"), 0o644);
    assert_eq!(mode("etc/sipbridge/credentials"), 0o700);
    assert_eq!(mode("opt/sb/share/sipbridge/prompts/disclosure.wav"), 0o644);
    let unit =
        std::fs::read_to_string(stage.path().join("etc/systemd/system/sipbridge.service")).unwrap();
    assert!(unit.contains("ExecStart=/opt/sb/bin/sipbridge "), "{unit}");
    assert!(!unit.contains("/usr/local"), "{unit}");
    let profile =
        std::fs::read_to_string(stage.path().join("etc/sipbridge/sipbridge.toml")).unwrap();
    assert!(profile.contains("prompt = \"/opt/sb/share/sipbridge/prompts/disclosure.wav\""));

    // A second run keeps the administrator's profile and stages the example beside it.
    std::fs::write(
        stage.path().join("etc/sipbridge/sipbridge.toml"),
        "# mine\n",
    )
    .unwrap();
    let again = Command::new("bash")
        .arg(repo_path("scripts/install.sh"))
        .args(["--binary", env!("CARGO_BIN_EXE_sipbridge")])
        .env("DESTDIR", stage.path())
        .output()
        .unwrap();
    assert!(again.status.success());
    assert_eq!(
        std::fs::read_to_string(stage.path().join("etc/sipbridge/sipbridge.toml")).unwrap(),
        "# mine\n"
    );
    assert!(
        stage
            .path()
            .join("etc/sipbridge/sipbridge.toml.example")
            .exists()
    );
}

#[test]
fn the_production_profile_passes_check_with_its_credentials() {
    let creds = tempfile::tempdir().unwrap();
    std::fs::write(creds.path().join("master.key"), [7u8; 32]).unwrap();
    std::fs::write(creds.path().join("agent-token"), "token").unwrap();
    std::fs::write(creds.path().join("admin-token"), "admin-secret").unwrap();
    // As installed with PREFIX pointing at the repository's prompt.
    let text = std::fs::read_to_string(repo_path("systemd/sipbridge.toml")).unwrap();
    let text = text.replace(
        "/usr/local/share/sipbridge",
        repo_path("sip-profiles").to_str().unwrap(),
    );
    let profile = creds.path().join("sipbridge.toml");
    std::fs::write(&profile, text).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_sipbridge"))
        .args(["check", "--config"])
        .arg(&profile)
        .env("CREDENTIALS_DIRECTORY", creds.path())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("drain grace: 30 s"), "{stdout}");
    assert!(
        stdout.contains("master key: credential:master.key"),
        "{stdout}"
    );

    // Without the credentials it is an error, never a generated key.
    let out = Command::new(env!("CARGO_BIN_EXE_sipbridge"))
        .args(["check", "--config"])
        .arg(&profile)
        .env_remove("CREDENTIALS_DIRECTORY")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
}
