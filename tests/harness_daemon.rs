//! Self-check of `common::Daemon` with a fake daemon (a bash script), since the real
//! `sipbridge run` is not written yet: arguments, working directory, listener discovery,
//! log collection, kill on drop, and a clear failure when the daemon dies at start.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::Path;
use std::time::Duration;

use common::Daemon;

/// Prints what `sipbridge --log-format json run --config PATH` prints at start, the way
/// tracing-subscriber's JSON formatter does, then runs until killed.
const FAKE_DAEMON: &str = r#"
[ "$1 $2 $3 $4" = "--log-format json run --config" ] || { echo "bad args: $*" >&2; exit 9; }
[ -f "$5" ] || { echo "no profile at $5" >&2; exit 8; }
mkdir var
echo '{"timestamp":"t","level":"INFO","fields":{"message":"loading profile"},"target":"sipbridge"}' >&2
echo '{"timestamp":"t","level":"INFO","fields":{"message":"sip listener bound","transport":"udp","local":"127.0.0.1:40001"},"target":"sipbridge::daemon"}' >&2
echo 'plain text on stdout'
echo '{"timestamp":"t","level":"INFO","fields":{"message":"sip listener bound","transport":"tcp","local":"127.0.0.1:40002"},"target":"sipbridge::daemon"}' >&2
exec sleep 60
"#;

#[test]
fn fake_daemon_is_started_found_and_killed() {
    let daemon = Daemon::spawn_program(
        Path::new("bash"),
        &["-c", FAKE_DAEMON, "fake-sipbridge"],
        &common::profile_toml(""),
    );
    assert_eq!(daemon.udp_addr(), "127.0.0.1:40001".parse().unwrap());
    assert_eq!(daemon.tcp_addr(), "127.0.0.1:40002".parse().unwrap());
    // It ran in its temp dir (var/ landed there) with the profile written there.
    assert!(daemon.dir().join("var").is_dir());
    let profile = std::fs::read_to_string(daemon.dir().join("profile.toml")).unwrap();
    assert!(profile.contains(r#"udp = ["127.0.0.1:0"]"#));
    // Both streams are collected, in order per stream.
    let line = daemon
        .wait_for_log(Duration::from_secs(5), |l| l == "plain text on stdout")
        .unwrap();
    assert_eq!(line, "plain text on stdout");
    let logs = daemon.logs();
    assert_eq!(logs.len(), 4, "{logs:?}");
    assert!(
        logs.iter()
            .any(|l| l.contains(r#""message":"loading profile""#))
    );

    let proc_dir = format!("/proc/{}", daemon.pid());
    assert!(Path::new(&proc_dir).exists());
    drop(daemon);
    assert!(
        !Path::new(&proc_dir).exists(),
        "daemon still running after drop"
    );
}

#[test]
fn daemon_dying_at_start_fails_with_its_output() {
    let result = std::panic::catch_unwind(|| {
        Daemon::spawn_program(
            Path::new("bash"),
            &[
                "-c",
                "echo 'config error: route to missing tenant' >&2; exit 2",
                "fake",
            ],
            &common::profile_toml(""),
        )
    });
    let message = *result.err().unwrap().downcast::<String>().unwrap();
    assert!(message.contains("exited (exit status: 2)"), "{message}");
    assert!(
        message.contains("config error: route to missing tenant"),
        "{message}"
    );
}
