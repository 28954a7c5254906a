//! Caller data in the daemon's logs (issue 15): after calls from a known number to
//! a tenant with `caller_numbers = "hashed"` and to a plain tenant, the daemon's
//! whole output — JSON and text, at debug level, start-up to exit — holds neither
//! the caller's number nor the hashed tenant's dialled number. With
//! `[profile.logging] caller_data = "full"` it does, and `sipbridge check` warns.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{free_port, repo_path, rtp_range_for, sipp, sipp_scenario};

/// The caller of `tests/sipp/basic_call.xml`.
const CALLER_DIGITS: &str = "5550001111";
/// Dialled number of the hashed tenant.
const HASHED_NUMBER: &str = "+15551230000";
/// Dialled number of the plain tenant.
const PLAIN_NUMBER: &str = "+15551239999";

fn profile(test: &str, port: u16, logging: &str) -> String {
    let (start, end) = rtp_range_for(test);
    let prompt = toml::Value::String(
        repo_path("sip-profiles/prompts/disclosure.wav")
            .display()
            .to_string(),
    );
    format!(
        r#"[profile]
name = "test"
max_calls = 20
var_dir = "var"
rtp_ports = {{ start = {start}, end = {end} }}

[profile.listen]
udp = ["127.0.0.1:{port}"]

{logging}

[[tenant]]
id = "hashed"
caller_numbers = "hashed"
prompt = {prompt}
pipeline = {{ kind = "echo" }}

[[tenant]]
id = "plain"
prompt = {prompt}
pipeline = {{ kind = "echo" }}

[[trunk]]
name = "local"
allow = ["127.0.0.0/8"]

[[route]]
number = "{HASHED_NUMBER}"
tenant = "hashed"

[[route]]
number = "{PLAIN_NUMBER}"
tenant = "plain"
"#
    )
}

/// Runs the daemon with `format` at debug level, makes one call to each tenant,
/// stops it with SIGTERM and returns everything it printed.
fn whole_log(test: &str, format: &str, logging: &str) -> String {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let path = dir.path().join("profile.toml");
    std::fs::write(&path, profile(test, port, logging)).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_sipbridge"))
        .args([
            "--log-format",
            format,
            "--log-filter",
            "debug",
            "run",
            "--config",
        ])
        .arg(&path)
        .current_dir(dir.path())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let out = Arc::new(Mutex::new(String::new()));
    let readers: Vec<_> = [
        Box::new(child.stderr.take().unwrap()) as Box<dyn std::io::Read + Send>,
        Box::new(child.stdout.take().unwrap()),
    ]
    .into_iter()
    .map(|stream| {
        let out = Arc::clone(&out);
        std::thread::spawn(move || {
            for line in BufReader::new(stream).lines() {
                let Ok(line) = line else { break };
                let mut o = out.lock().unwrap();
                o.push_str(&line);
                o.push('\n');
            }
        })
    })
    .collect();
    let wait_for = |needle: &str, count: usize| {
        let deadline = Instant::now() + Duration::from_secs(15);
        while out.lock().unwrap().matches(needle).count() < count {
            assert!(
                Instant::now() < deadline,
                "no {needle:?} in:\n{}",
                out.lock().unwrap()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    wait_for("listener bound", 1);
    let target = format!("127.0.0.1:{port}").parse().unwrap();
    for number in [HASHED_NUMBER, PLAIN_NUMBER] {
        sipp(&sipp_scenario("basic_call.xml"), target, &["-s", number]).assert_success();
    }
    wait_for("call record", 2);
    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let deadline = Instant::now() + Duration::from_secs(15);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("the daemon did not exit on SIGTERM");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    for r in readers {
        r.join().unwrap();
    }
    out.lock().unwrap().clone()
}

fn assert_no_caller_data(log: &str) {
    for needle in [CALLER_DIGITS, &HASHED_NUMBER[2..]] {
        if let Some(line) = log.lines().find(|l| l.contains(needle)) {
            panic!("{needle} is in the log:\n{line}");
        }
    }
    // The plain tenant's call and the hashed tenant's call both left a CDR line.
    assert_eq!(log.matches("call record").count(), 2, "{log}");
}

#[test]
fn privacy_no_caller_numbers_in_json_logs() {
    let log = whole_log("privacy_no_caller_numbers_in_json_logs", "json", "");
    assert_no_caller_data(&log);
    // The caller is still recognisable in its masked form.
    assert!(log.contains("+1555•••11"), "{log}");
}

#[test]
fn privacy_no_caller_numbers_in_text_logs() {
    let log = whole_log("privacy_no_caller_numbers_in_text_logs", "text", "");
    assert_no_caller_data(&log);
}

#[test]
fn full_caller_data_logs_numbers_and_check_warns() {
    let switch = "[profile.logging]\ncaller_data = \"full\"\n";
    let log = whole_log(
        "full_caller_data_logs_numbers_and_check_warns",
        "json",
        switch,
    );
    assert!(log.contains(CALLER_DIGITS), "{log}");
    assert!(log.contains(HASHED_NUMBER), "{log}");

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("profile.toml");
    std::fs::write(&path, profile("check", free_port(), switch)).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_sipbridge"))
        .args(["check", "--config"])
        .arg(&path)
        .current_dir(dir.path())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert!(
        stdout.contains("caller_data") || stderr.contains("caller_data"),
        "no warning about caller_data:\n{stdout}\n{stderr}"
    );
    assert!(
        stdout.contains("warning") || stderr.contains("warning"),
        "{stdout}\n{stderr}"
    );
}
