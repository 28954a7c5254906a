#![allow(clippy::unwrap_used, clippy::expect_used)]
//! Secret values given as `env:`, `file:` and inline never show up in Debug,
//! Display or JSON output, nor in logs at any level, nor in `check` output.

use std::io::Write;
use std::path::Path;
use std::process::Command;
use std::sync::{Arc, Mutex};

use sipbridge::config::{self, Config, MasterKey, Pipeline, Secret, SecretRef};
use sipbridge::logging::{self, LogFormat};
use tracing_subscriber::fmt::MakeWriter;

const ENV_VALUE: &str = "ENV-SECRET-7f3a9c1d";
const FILE_VALUE: &str = "FILE-SECRET-91bc4e2a";
const INLINE_VALUE: &str = "INLINE-SECRET-55de0b7f";
const KEY_VALUE: &str = "MASTER-KEY-SECRET-3c8e1f90";
const ALL: [&str; 4] = [ENV_VALUE, FILE_VALUE, INLINE_VALUE, KEY_VALUE];

#[derive(Clone, Default)]
struct Buf(Arc<Mutex<Vec<u8>>>);

impl Write for Buf {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'w> MakeWriter<'w> for Buf {
    type Writer = Buf;
    fn make_writer(&'w self) -> Buf {
        self.clone()
    }
}

impl Buf {
    fn text(&self) -> String {
        String::from_utf8(self.0.lock().unwrap().clone()).unwrap()
    }
}

fn assert_clean(what: &str, output: &str) {
    for value in ALL {
        assert!(!output.contains(value), "{what} reveals {value}:\n{output}");
    }
}

/// A profile using the secret as `env:`, `file:` and inline, and a master key file.
fn setup(dir: &Path) -> std::path::PathBuf {
    let spec = hound::WavSpec {
        channels: 1,
        sample_rate: 8000,
        bits_per_sample: 16,
        sample_format: hound::SampleFormat::Int,
    };
    let mut w = hound::WavWriter::create(dir.join("prompt.wav"), spec).unwrap();
    for _ in 0..800 {
        w.write_sample(0i16).unwrap();
    }
    w.finalize().unwrap();
    std::fs::write(dir.join("agent.token"), format!("{FILE_VALUE}\n")).unwrap();
    std::fs::write(dir.join("master.key"), KEY_VALUE).unwrap();
    let toml = format!(
        r#"[profile]
name = "secrets"
master_key = "file:master.key"
[profile.listen]
udp = ["127.0.0.1:5099"]

[[trunk]]
name = "pbx"
allow = ["10.0.0.0/8"]
[trunk.digest]
username = "pbx"
password = "{INLINE_VALUE}"

[[tenant]]
id = "t"
recording = true
prompt = "prompt.wav"
pipeline = {{ kind = "deepgram+agent", model = "nova-3", language = "en-US", api_key = "env:SB_TEST_DG_KEY", url = "wss://agent.example/ws", auth = "file:agent.token" }}

[[route]]
number = "*"
tenant = "t"
"#
    );
    let file = dir.join("secrets.toml");
    std::fs::write(&file, toml).unwrap();
    file
}

fn env(k: &str) -> Option<String> {
    (k == "SB_TEST_DG_KEY").then(|| ENV_VALUE.to_owned())
}

/// Loads the profile in-process. Its paths are relative to the working
/// directory, which tests in one process share, so a copy with absolute paths
/// is loaded (the binary tests below use the relative form).
fn load_in(dir: &Path) -> Config {
    let file = dir.join("secrets.toml");
    let text = std::fs::read_to_string(&file).unwrap();
    let abs = |name: &str| dir.join(name).to_str().unwrap().to_owned();
    let text = text
        .replace("file:master.key", &format!("file:{}", abs("master.key")))
        .replace("file:agent.token", &format!("file:{}", abs("agent.token")))
        .replace("\"prompt.wav\"", &format!("\"{}\"", abs("prompt.wav")));
    let abs_file = dir.join("secrets-abs.toml");
    std::fs::write(&abs_file, text).unwrap();
    config::load_with_env(&abs_file, &env).unwrap()
}

fn secrets_of(cfg: &Config) -> Vec<&Secret> {
    let mut out = Vec::new();
    if let MasterKey::Loaded(k) = &cfg.profiles[0].master_key {
        out.push(k);
    }
    out.push(&cfg.trunks[0].digest.as_ref().unwrap().password);
    if let Pipeline::DeepgramAgent(dg, agent) = &cfg.tenants[0].pipeline {
        out.push(&dg.api_key);
        out.push(agent.auth.as_ref().unwrap().secret());
    }
    out
}

#[test]
fn values_are_resolved_but_never_formatted() {
    let dir = tempfile::tempdir().unwrap();
    setup(dir.path());
    let cfg = load_in(dir.path());
    let secrets = secrets_of(&cfg);
    let exposed: Vec<&[u8]> = secrets.iter().map(|s| s.expose()).collect();
    assert_eq!(
        exposed,
        [
            KEY_VALUE.as_bytes(),
            INLINE_VALUE.as_bytes(),
            ENV_VALUE.as_bytes(),
            FILE_VALUE.as_bytes()
        ]
    );
    assert_eq!(secrets[1].source(), &SecretRef::Inline);
    assert_eq!(
        secrets[2].source(),
        &SecretRef::Env("SB_TEST_DG_KEY".into())
    );
    for s in &secrets {
        let fp = s.fingerprint();
        assert!(fp.starts_with("sha256:") && fp.ends_with('…'), "{fp}");
        assert_eq!(fp.chars().count(), "sha256:".len() + 4 + 1);
        assert_eq!(s.to_string(), fp);
        assert_clean("Display", &s.to_string());
        assert_clean("Debug", &format!("{s:?}"));
        assert_clean("Debug (pretty)", &format!("{s:#?}"));
        let json = serde_json::to_string(s).unwrap();
        assert_eq!(json, format!("\"{fp}\""));
    }
    assert_clean("Config Debug", &format!("{cfg:?}"));
    assert_clean("Config Debug (pretty)", &format!("{cfg:#?}"));
    assert_clean("summary", &cfg.summary());
    assert_clean("warnings", &format!("{:?}", cfg.warnings));
    assert!(
        cfg.warnings
            .iter()
            .any(|w| w.message.contains("digest password is written inline")),
        "{:?}",
        cfg.warnings
    );
}

#[test]
fn privacy_no_secrets_in_logs_at_trace() {
    let dir = tempfile::tempdir().unwrap();
    setup(dir.path());
    for format in [LogFormat::Json, LogFormat::Text] {
        let buf = Buf::default();
        let sub = logging::subscriber(format, "trace", buf.clone(), false).unwrap();
        tracing::subscriber::with_default(sub, || {
            let cfg = load_in(dir.path());
            // What a careless caller might log: the whole config and each secret.
            tracing::trace!(config = ?cfg, "loaded");
            for s in secrets_of(&cfg) {
                tracing::error!(secret = %s, debug = ?s, "secret");
                tracing::info!("{s} {s:?}");
            }
        });
        let log = buf.text();
        assert!(
            log.contains("digest password is written inline"),
            "the inline warning is logged:\n{log}"
        );
        assert!(log.contains("TRACE") && log.contains("sha256:"), "{log}");
        assert_clean(&format!("{format:?} log"), &log);
    }
}

#[test]
fn check_output_at_trace_never_carries_the_values() {
    let dir = tempfile::tempdir().unwrap();
    let file = setup(dir.path());
    for format in ["json", "text"] {
        let out = Command::new(env!("CARGO_BIN_EXE_sipbridge"))
            .args([
                "--log-format",
                format,
                "--log-filter",
                "trace",
                "check",
                "--config",
            ])
            .arg(file.file_name().unwrap())
            .current_dir(dir.path())
            .env("SB_TEST_DG_KEY", ENV_VALUE)
            .output()
            .unwrap();
        let stdout = String::from_utf8(out.stdout).unwrap();
        let stderr = String::from_utf8(out.stderr).unwrap();
        assert_eq!(out.status.code(), Some(0), "{stdout}\n{stderr}");
        // The inline secret is flagged on stdout and in the log, by place only.
        assert!(
            stdout.contains("secrets.toml:12:12: warning: digest password is written inline"),
            "{stdout}"
        );
        assert!(
            stderr.contains("digest password is written inline"),
            "{stderr}"
        );
        assert!(stderr.contains("resolved deepgram api_key"), "{stderr}");
        assert_clean("check stdout", &stdout);
        assert_clean("check stderr", &stderr);
    }
    // Missing env var: an error that names the variable, not a value.
    let out = Command::new(env!("CARGO_BIN_EXE_sipbridge"))
        .args(["--log-filter", "trace", "check", "--config", "secrets.toml"])
        .current_dir(dir.path())
        .env_remove("SB_TEST_DG_KEY")
        .output()
        .unwrap();
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert_eq!(out.status.code(), Some(2));
    let text = std::fs::read_to_string(&file).unwrap();
    let line = text.lines().position(|l| l.contains("api_key")).unwrap() + 1;
    let column = text
        .lines()
        .nth(line - 1)
        .unwrap()
        .find("\"env:SB_TEST")
        .unwrap()
        + 1;
    assert!(
        stderr.contains(&format!("secrets.toml:{line}:{column}: deepgram api_key: environment variable `SB_TEST_DG_KEY` is not set")),
        "error located at the api_key value: {stderr}"
    );
    assert_clean("failed check", &stderr);
}
