//! Smoke test of the media load tool (`sipbridge-load`, docs/performance.md): 5 calls for
//! a 3 s window against the daemon (recording off, once on one media thread and once on
//! two) and the UDP echo floor. It must set the calls up over SIP, get every packet back
//! and print the table and a ratio line per daemon run.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::Read;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

#[test]
fn five_calls_come_back_whole_with_a_ratio() {
    let fixture = concat!(env!("CARGO_MANIFEST_DIR"), "/fixtures/audio/caller1.ulaw");
    let mut child = Command::new(env!("CARGO_BIN_EXE_sipbridge-load"))
        .args([
            "--calls",
            "5",
            "--seconds",
            "3",
            "--warmup",
            "1.5",
            "--recording",
            "off",
            "--media-threads",
            "1,2",
        ])
        .args([
            "--threads",
            "1",
            "--log-filter",
            "warn",
            "--fixture",
            fixture,
        ])
        .args(["--sipbridge", env!("CARGO_BIN_EXE_sipbridge")])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start sipbridge-load");
    let deadline = Instant::now() + Duration::from_secs(55);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if Instant::now() > deadline {
            child.kill().unwrap();
            child.wait().unwrap();
            panic!("sipbridge-load ran for more than 55 s");
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let mut out = String::new();
    child
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut out)
        .unwrap();
    let mut err = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    assert!(
        status.success(),
        "exit {status}\nstdout:\n{out}\nstderr:\n{err}"
    );

    // The table: a floor row and a row per daemon run, each with 5 calls, 0.00 % loss,
    // 0 failed.
    for name in ["floor ", "daemon rec=off t=1 ", "daemon rec=off t=2 "] {
        let row = out
            .lines()
            .find(|l| l.starts_with(name))
            .unwrap_or_else(|| panic!("no {name:?} row in:\n{out}"));
        let cols: Vec<&str> = row[19..].split_whitespace().collect();
        assert_eq!(cols[0], "5", "calls in {row}");
        assert_eq!(cols[1], "0.00", "loss in {row}");
        assert_eq!(cols[8], "0", "failed calls in {row}");
        assert!(cols[9].parse::<f64>().is_ok(), "cores in {row}");
    }
    // A ratio line per daemon run.
    for threads in ["1", "2"] {
        let prefix = format!(
            "ratio daemon/floor: calls=5 media_threads={threads} recording=off loss=0.00% ratio="
        );
        let line = out
            .lines()
            .find(|l| l.starts_with(&prefix))
            .unwrap_or_else(|| panic!("no {prefix:?} line in:\n{out}"));
        let ratio = line
            .split("ratio=")
            .nth(1)
            .unwrap()
            .split_whitespace()
            .next()
            .unwrap();
        assert!(
            ratio == "n/a" || ratio.parse::<f64>().is_ok_and(|r| r > 0.0),
            "ratio {ratio:?} in {line}"
        );
        assert!(line.contains(" cores busy, "), "{line}");
    }
}
