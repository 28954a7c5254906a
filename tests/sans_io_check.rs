//! `.ci/check-sans-io.sh` must fail on a sans-IO module that uses tokio, sockets, the
//! clock or its own RNG, and pass on clean ones (and on a tree without those modules).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::process::{Command, Output};

fn check(root: &Path) -> Output {
    Command::new("bash")
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join(".ci/check-sans-io.sh"))
        .arg(root)
        .output()
        .unwrap()
}

fn write(root: &Path, rel: &str, text: &str) {
    let path = root.join(rel);
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, text).unwrap();
}

const CLEAN: &str = "//! Sans-IO: no tokio here, time is passed in.\n\
    use std::time::Instant;\n\
    pub fn poll(now: Instant) -> Instant { now }\n";

#[test]
fn passes_when_no_sans_io_dirs_exist() {
    let dir = tempfile::tempdir().unwrap();
    write(
        dir.path(),
        "src/daemon/mod.rs",
        "use tokio::net::UdpSocket;\n",
    );
    let out = check(dir.path());
    assert_eq!(out.status.code(), Some(0), "{out:?}");
}

#[test]
fn passes_on_clean_modules() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "src/sip/mod.rs", CLEAN);
    write(dir.path(), "src/media/rtp.rs", CLEAN);
    write(dir.path(), "src/call/mod.rs", CLEAN);
    // The tokio shell may use anything.
    write(
        dir.path(),
        "src/daemon/mod.rs",
        "let now = std::time::Instant::now();\n",
    );
    let out = check(dir.path());
    assert_eq!(out.status.code(), Some(0), "{out:?}");
}

#[test]
fn fails_on_each_forbidden_use_and_lists_file_and_line() {
    let cases = [
        ("src/sip/transport.rs", "use tokio::net::UdpSocket;"),
        (
            "src/sip/net.rs",
            "let s = std::net::UdpSocket::bind(addr)?;",
        ),
        ("src/media/net.rs", "use std::net::TcpStream;"),
        (
            "src/call/listen.rs",
            "let l = std::net::TcpListener::bind(a);",
        ),
        ("src/call/timer.rs", "let now = Instant::now();"),
        ("src/media/clock.rs", "let t = SystemTime::now();"),
        ("src/sip/branch.rs", "let mut r = rand::thread_rng();"),
        ("src/sip/tag.rs", "let mut r = rand::rng();"),
        // A trailing comment on a code line counts.
        ("src/call/mod.rs", "let x = 1; // tokio::spawn later"),
    ];
    for (rel, offending) in cases {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "src/sip/mod.rs", CLEAN);
        write(dir.path(), rel, &format!("// line 1\n{offending}\n"));
        let out = check(dir.path());
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{rel}: {offending}: {out:?}");
        assert!(stderr.contains(&format!("{rel}:2:")), "{rel}: {stderr}");
        assert!(
            !stderr.contains("src/sip/mod.rs"),
            "clean file listed: {stderr}"
        );
    }
}

#[test]
fn repository_itself_passes() {
    let out = check(Path::new(env!("CARGO_MANIFEST_DIR")));
    assert_eq!(out.status.code(), Some(0), "{out:?}");
}
