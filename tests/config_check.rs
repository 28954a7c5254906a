#![allow(clippy::unwrap_used, clippy::expect_used)]
//! `sipbridge check` end to end: the real binary on real files.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn sipbridge(dir: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_sipbridge"))
        .args(args)
        .current_dir(dir)
        .env_remove("SIPBRIDGE_LOG")
        .env_remove("RUST_LOG")
        .env_remove("CREDENTIALS_DIRECTORY")
        .output()
        .unwrap()
}

fn text(o: &Output) -> (String, String) {
    (
        String::from_utf8(o.stdout.clone()).unwrap(),
        String::from_utf8(o.stderr.clone()).unwrap(),
    )
}

/// An 8 kHz mono 16-bit WAV of `ms` milliseconds.
fn write_wav(path: &Path, ms: u32) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    let spec = hound::WavSpec {
        channels: 1,
        sample_rate: 8000,
        bits_per_sample: 16,
        sample_format: hound::SampleFormat::Int,
    };
    let mut w = hound::WavWriter::create(path, spec).unwrap();
    for i in 0..(8 * ms) {
        w.write_sample(((i % 40) as i16 - 20) * 100).unwrap();
    }
    w.finalize().unwrap();
}

/// A valid profile listening on `port`, with tenant `t<port>` and trunk `k<port>`.
fn profile(port: u16) -> String {
    format!(
        r#"[profile]
name = "p{port}"
max_calls = 10
rtp_ports = {{ start = {rtp}, end = {rtp_end} }}

[profile.listen]
udp = ["127.0.0.1:{port}"]

[[trunk]]
name = "k{port}"
allow = ["10.{octet}.0.0/16"]

[[tenant]]
id = "t{port}"
recording = true
prompt = "prompt.wav"
pipeline = {{ kind = "echo" }}

[[route]]
number = "+1{port}*"
tenant = "t{port}"
"#,
        rtp = u32::from(port) * 10,
        rtp_end = u32::from(port) * 10 + 99,
        octet = port % 250,
    )
}

/// 1-based line of the first line containing `needle`.
fn line_of(text: &str, needle: &str) -> usize {
    text.lines().position(|l| l.contains(needle)).unwrap() + 1
}

/// The stderr line for `file` at `line`, which must also contain `message`.
fn assert_reported(stderr: &str, file: &str, line: usize, message: &str) {
    let prefix = format!("{file}:{line}:");
    assert!(
        stderr
            .lines()
            .any(|l| l.starts_with(&prefix) && l.contains(message)),
        "expected `{prefix}… {message}` in:\n{stderr}"
    );
}

fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

#[test]
fn default_profile_passes_and_lists_the_demo_tenant() {
    let out = sipbridge(&repo_root(), &["check"]);
    let (stdout, stderr) = text(&out);
    assert_eq!(
        out.status.code(),
        Some(0),
        "stdout:\n{stdout}\nstderr:\n{stderr}"
    );
    assert!(stdout.contains("configuration sip-profiles/default.toml is valid"));
    assert!(stdout.contains("profile default (sip-profiles/default.toml)"));
    assert!(stdout.contains("listen: udp 127.0.0.1:5060, tcp 127.0.0.1:5060"));
    assert!(stdout.contains("local: allow [127.0.0.0/8, ::1/128]"));
    assert!(stdout.contains("  demo: recording on, transcripts off, opt-out key 9"));
    assert!(stdout.contains("    pipeline: echo"));
    assert!(
        stdout
            .contains("retention: recordings 90 d, transcripts 90 d, metadata 365 d, audit 400 d")
    );
    assert!(stdout.contains("* -> demo (any trunk)"));
}

#[test]
fn every_example_passes_with_its_secrets_provided() {
    let creds = tempfile::tempdir().unwrap();
    for (name, value) in [
        ("master.key", "0123456789abcdef0123456789abcdef"),
        ("pbx-password", "pbx-pass\n"),
        ("deepgram-api-key", "dg-key\n"),
        ("s3-access-key-id", "AKIAEXAMPLE\n"),
        ("s3-secret-access-key", "s3-example-secret\n"),
    ] {
        std::fs::write(creds.path().join(name), value).unwrap();
    }
    // The secure-trunking example's TLS identity: a real certificate and key.
    let ck = rcgen::generate_simple_self_signed(vec!["sbc.example.com".to_owned()]).unwrap();
    std::fs::write(creds.path().join("sip-tls-cert"), ck.cert.pem()).unwrap();
    std::fs::write(
        creds.path().join("sip-tls-key"),
        ck.signing_key.serialize_pem(),
    )
    .unwrap();
    std::fs::write(
        creds.path().join("pg-url"),
        "postgres://sipbridge@127.0.0.1:5432/sipbridge\n",
    )
    .unwrap();
    std::fs::write(
        creds.path().join("twilio-termination-password"),
        "termination-pw",
    )
    .unwrap();
    let examples = repo_root().join("sip-profiles/examples");
    let mut names: Vec<_> = std::fs::read_dir(&examples)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.ends_with(".toml"))
        .collect();
    names.sort();
    assert_eq!(
        names,
        [
            "pbx.toml",
            "postgres-store.toml",
            "s3-recordings.toml",
            "secure-trunking.toml",
            "telnyx.toml",
            "twilio.toml"
        ]
    );
    for name in names {
        let path = format!("sip-profiles/examples/{name}");
        let out = Command::new(env!("CARGO_BIN_EXE_sipbridge"))
            .args(["check", "--config", &path])
            .current_dir(repo_root())
            .env("DEEPGRAM_API_KEY", "dg-env-key")
            .env("AGENT_TOKEN", "agent-env-token")
            .env("EVENTS_SECRET", "events-env-secret-0123")
            .env("CREDENTIALS_DIRECTORY", creds.path())
            .output()
            .unwrap();
        let (stdout, stderr) = text(&out);
        assert_eq!(out.status.code(), Some(0), "{name}:\n{stdout}\n{stderr}");
        assert!(stdout.contains(&format!("configuration {path} is valid")));
    }
}

#[test]
fn examples_without_their_secrets_name_each_missing_one() {
    let out = Command::new(env!("CARGO_BIN_EXE_sipbridge"))
        .args(["check", "--config", "sip-profiles/examples/twilio.toml"])
        .current_dir(repo_root())
        .env_remove("DEEPGRAM_API_KEY")
        .env_remove("AGENT_TOKEN")
        .env_remove("EVENTS_SECRET")
        .output()
        .unwrap();
    let (_, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(2));
    let src =
        std::fs::read_to_string(repo_root().join("sip-profiles/examples/twilio.toml")).unwrap();
    let f = "sip-profiles/examples/twilio.toml";
    assert_reported(
        &stderr,
        f,
        line_of(&src, "api_key = "),
        "`DEEPGRAM_API_KEY` is not set",
    );
    assert_reported(
        &stderr,
        f,
        line_of(&src, "auth = "),
        "`AGENT_TOKEN` is not set",
    );
    assert_reported(
        &stderr,
        f,
        line_of(&src, "events_secret = "),
        "`EVENTS_SECRET` is not set",
    );
}

#[test]
fn event_webhook_settings_are_checked() {
    let dir = tempfile::tempdir().unwrap();
    write_wav(&dir.path().join("prompt.wav"), 200);
    let ck = rcgen::generate_simple_self_signed(vec!["hooks.example.com".to_owned()]).unwrap();
    std::fs::write(dir.path().join("hooks-ca.pem"), ck.cert.pem()).unwrap();
    std::fs::write(dir.path().join("not-a-ca.pem"), "hello").unwrap();
    let good = profile(5031).replace(
        "pipeline = { kind = \"echo\" }",
        "pipeline = { kind = \"echo\" }\n\
         events_url = \"https://hooks.example.com:8443/sipbridge?src=pbx\"\n\
         events_secret = \"env:EVENTS_SECRET\"\n\
         events_ca = \"file:hooks-ca.pem\"\n\
         events_types = [\"call.ended\", \"transfer.*\"]\n\
         events_queue = 50",
    );
    std::fs::write(dir.path().join("good.toml"), &good).unwrap();
    let run = |name: &str| {
        let out = Command::new(env!("CARGO_BIN_EXE_sipbridge"))
            .args(["check", "--config", name])
            .current_dir(dir.path())
            .env("EVENTS_SECRET", "a-secret-of-24-bytes-xyz")
            .env_remove("SIPBRIDGE_LOG")
            .env_remove("RUST_LOG")
            .output()
            .unwrap();
        let (stdout, stderr) = text(&out);
        (out.status.code(), stdout, stderr)
    };
    let (code, stdout, stderr) = run("good.toml");
    assert_eq!(code, Some(0), "{stdout}\n{stderr}");
    assert!(
        stdout.contains(
            "    events: https://hooks.example.com:8443/sipbridge (call.ended, transfer.*; \
             queue 50; secret env:EVENTS_SECRET (sha256:"
        ),
        "{stdout}"
    );
    assert!(stdout.contains("; own CA)"), "{stdout}");
    assert!(
        !stdout.contains("src=pbx"),
        "the query is not shown: {stdout}"
    );
    assert!(!stdout.contains("a-secret-of-24-bytes-xyz"), "{stdout}");

    let bad = good
        .replace("https://hooks.example.com:8443", "http://hooks.example.com")
        .replace("file:hooks-ca.pem", "file:not-a-ca.pem")
        .replace("\"transfer.*\"", "\"call.exploded\"")
        .replace("events_queue = 50", "events_queue = 0");
    std::fs::write(dir.path().join("bad.toml"), &bad).unwrap();
    let (code, _, stderr) = run("bad.toml");
    assert_eq!(code, Some(2), "{stderr}");
    for (needle, message) in [
        ("events_url", "must start with https://"),
        ("events_ca", "events_ca:"),
        ("events_types", "unknown event type `call.exploded`"),
        (
            "events_queue",
            "events_queue 0 is out of range: write 1 to 100000",
        ),
    ] {
        assert_reported(&stderr, "bad.toml", line_of(&bad, needle), message);
    }

    let lonely = good
        .replace("events_secret = \"env:EVENTS_SECRET\"\n", "")
        .replace(
            "events_url = \"https://hooks.example.com:8443/sipbridge?src=pbx\"\n",
            "",
        );
    std::fs::write(dir.path().join("lonely.toml"), &lonely).unwrap();
    let (code, _, stderr) = run("lonely.toml");
    assert_eq!(code, Some(2), "{stderr}");
    assert_reported(
        &stderr,
        "lonely.toml",
        line_of(&lonely, "events_ca"),
        "events_ca needs events_url",
    );
    let no_secret = good.replace("events_secret = \"env:EVENTS_SECRET\"\n", "");
    std::fs::write(dir.path().join("nosecret.toml"), &no_secret).unwrap();
    let (code, _, stderr) = run("nosecret.toml");
    assert_eq!(code, Some(2), "{stderr}");
    assert_reported(
        &stderr,
        "nosecret.toml",
        line_of(&no_secret, "events_url"),
        "events_url needs events_secret",
    );
    let short = good.replace("env:EVENTS_SECRET", "short");
    std::fs::write(dir.path().join("short.toml"), &short).unwrap();
    let (code, _, stderr) = run("short.toml");
    assert_eq!(code, Some(2), "{stderr}");
    assert_reported(
        &stderr,
        "short.toml",
        line_of(&short, "events_secret"),
        "events_secret must be at least 16 bytes",
    );
}

#[test]
fn broken_configurations_are_all_reported_in_one_run() {
    let dir = tempfile::tempdir().unwrap();
    write_wav(&dir.path().join("prompt.wav"), 200);
    let profiles = dir.path().join("profiles");
    std::fs::create_dir(&profiles).unwrap();

    let unknown_key = profile(5001).replace("max_calls = 10", "max_calls = 10\ncolour = \"blue\"");
    let missing_tenant = profile(5002).replace("tenant = \"t5002\"\n", "tenant = \"nobody\"\n");
    let bad_cidr = profile(5003).replace("10.3.0.0/16", "10.3.0.0/33");
    let odd_rtp = profile(5004).replace("start = 50040", "start = 50041");
    let missing_prompt = profile(5005).replace("\"prompt.wav\"", "\"no-such-prompt.wav\"");
    let two_errors = profile(5006)
        .replace("10.6.0.0/16", "not-a-network")
        .replace("pipeline = {", "opt_out_key = \"x\"\npipeline = {");
    let files = [
        (
            "a-unknown-key.toml",
            &unknown_key,
            vec![("colour", "unknown field `colour`")],
        ),
        (
            "b-missing-tenant.toml",
            &missing_tenant,
            vec![("nobody", "unknown tenant `nobody`")],
        ),
        (
            "c-bad-cidr.toml",
            &bad_cidr,
            vec![("10.3.0.0/33", "is not a CIDR")],
        ),
        (
            "d-odd-rtp.toml",
            &odd_rtp,
            vec![("rtp_ports", "must be even")],
        ),
        (
            "e-missing-prompt.toml",
            &missing_prompt,
            vec![("no-such-prompt", "prompt no-such-prompt.wav: cannot read")],
        ),
        (
            "f-two-errors.toml",
            &two_errors,
            vec![
                ("not-a-network", "is not a CIDR"),
                ("opt_out_key", "must be one DTMF key"),
            ],
        ),
    ];
    for (name, body, _) in &files {
        std::fs::write(profiles.join(name), body).unwrap();
    }

    let out = sipbridge(dir.path(), &["check", "--config", "profiles"]);
    let (stdout, stderr) = text(&out);
    assert_eq!(
        out.status.code(),
        Some(2),
        "stdout:\n{stdout}\nstderr:\n{stderr}"
    );
    let mut expected = 0;
    for (name, body, problems) in &files {
        for (needle, message) in problems {
            assert_reported(
                &stderr,
                &format!("profiles/{name}"),
                line_of(body, needle),
                message,
            );
            expected += 1;
        }
    }
    // Nothing else: one line per problem (no cascades), then the count.
    let error_lines: Vec<_> = stderr
        .lines()
        .filter(|l| l.starts_with("profiles/") && !l.contains(": warning: "))
        .collect();
    assert_eq!(error_lines.len(), expected, "{stderr}");
    assert!(stderr.contains(&format!("is invalid: {expected} error(s)")));
    assert!(!stdout.contains("is valid"));
}

#[test]
fn reports_columns_and_every_problem_of_one_file() {
    let dir = tempfile::tempdir().unwrap();
    write_wav(&dir.path().join("prompt.wav"), 200);
    let body = profile(5010)
        .replace("max_calls = 10", "max_calls = \"ten\"\nspeed = 3")
        .replace("number = \"+15010*\"", "number = \"+1-555\"");
    std::fs::write(dir.path().join("p.toml"), &body).unwrap();
    let out = sipbridge(dir.path(), &["check", "--config", "p.toml"]);
    let (_, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(2));
    let type_line = line_of(&body, "max_calls = \"ten\"");
    assert!(
        stderr.contains(&format!(
            "p.toml:{type_line}:13: invalid type: string \"ten\", expected u32"
        )),
        "{stderr}"
    );
    let key_line = line_of(&body, "speed");
    assert!(
        stderr.contains(&format!("p.toml:{key_line}:1: unknown field `speed`")),
        "{stderr}"
    );
    let num_line = line_of(&body, "+1-555");
    assert!(
        stderr.contains(&format!(
            "p.toml:{num_line}:10: `+1-555` is not an E.164 number"
        )),
        "{stderr}"
    );
    assert!(stderr.contains("is invalid: 3 error(s)"), "{stderr}");
}

#[test]
fn duplicate_names_routes_and_listeners_across_profiles() {
    let dir = tempfile::tempdir().unwrap();
    write_wav(&dir.path().join("prompt.wav"), 200);
    let first = profile(5020);
    // Same listener, same tenant id, same trunk name and the same route as `first`.
    let second = profile(5021)
        .replace("name = \"p5021\"", "name = \"p5020\"")
        .replace("127.0.0.1:5021", "0.0.0.0:5020")
        .replace("id = \"t5021\"", "id = \"t5020\"")
        .replace("name = \"k5021\"", "name = \"k5020\"")
        .replace("number = \"+15021*\"", "number = \"+15020*\"")
        .replace("tenant = \"t5021\"", "tenant = \"t5020\"");
    std::fs::create_dir(dir.path().join("d")).unwrap();
    std::fs::write(dir.path().join("d/1.toml"), &first).unwrap();
    std::fs::write(dir.path().join("d/2.toml"), &second).unwrap();
    let out = sipbridge(dir.path(), &["check", "--config", "d"]);
    let (_, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(2));
    assert_reported(
        &stderr,
        "d/2.toml",
        line_of(&second, "0.0.0.0:5020"),
        "conflicts with udp 127.0.0.1:5020 of profile `p5020` at d/1.toml:",
    );
    assert_reported(
        &stderr,
        "d/2.toml",
        line_of(&second, "name = \"p5020\""),
        "duplicate profile name `p5020` (first defined at d/1.toml:2:8)",
    );
    assert_reported(
        &stderr,
        "d/2.toml",
        line_of(&second, "id = "),
        "duplicate tenant id `t5020` (first defined at d/1.toml:",
    );
    assert_reported(
        &stderr,
        "d/2.toml",
        line_of(&second, "name = \"k5020\""),
        "duplicate trunk name `k5020`",
    );
    assert_reported(
        &stderr,
        "d/2.toml",
        line_of(&second, "number = "),
        "route +15020* overlaps the route at d/1.toml:",
    );
}

#[test]
fn unsupported_prompt_formats_are_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let spec = hound::WavSpec {
        channels: 1,
        sample_rate: 8000,
        bits_per_sample: 8,
        sample_format: hound::SampleFormat::Int,
    };
    let mut w = hound::WavWriter::create(dir.path().join("prompt.wav"), spec).unwrap();
    w.write_sample(1i8).unwrap();
    w.finalize().unwrap();
    std::fs::write(dir.path().join("notwav.wav"), b"ID3 this is an mp3").unwrap();
    let body = profile(5030).replace(
        "[[route]]",
        "[[tenant]]\nid = \"x\"\nprompt = \"notwav.wav\"\npipeline = { kind = \"echo\" }\n\n[[route]]",
    );
    std::fs::write(dir.path().join("p.toml"), &body).unwrap();
    let out = sipbridge(dir.path(), &["check", "--config", "p.toml"]);
    let (_, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(2));
    assert_reported(
        &stderr,
        "p.toml",
        line_of(&body, "\"prompt.wav\""),
        "8-bit Int samples; prompts must be 16-bit PCM",
    );
    assert_reported(
        &stderr,
        "p.toml",
        line_of(&body, "notwav"),
        "not a supported WAV file",
    );
}

#[test]
fn missing_config_file_exits_2_with_its_name() {
    let dir = tempfile::tempdir().unwrap();
    let out = sipbridge(dir.path(), &["check", "--config", "nope.toml"]);
    let (_, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr.starts_with("nope.toml: cannot read configuration:"),
        "{stderr}"
    );
}

/// Outside the repository the default `sip-profiles/default.toml` is not found: the
/// error says where it was looked up and how to fix it, for `check` and for `run`.
#[test]
fn default_config_outside_the_repository_says_how_to_fix_it() {
    let dir = tempfile::tempdir().unwrap();
    for command in ["check", "run"] {
        let out = sipbridge(dir.path(), &[command]);
        let (_, stderr) = text(&out);
        assert_eq!(out.status.code(), Some(2), "{command}: {stderr}");
        assert!(
            stderr.contains("sip-profiles/default.toml: cannot read configuration"),
            "{command}: {stderr}"
        );
        let hint = stderr
            .lines()
            .find(|l| l.starts_with("hint: "))
            .unwrap_or_else(|| panic!("{command}: no hint in {stderr}"));
        assert!(hint.contains("--config PATH"), "{hint}");
        assert!(hint.contains("run sipbridge from the repository"), "{hint}");
        assert!(
            hint.contains(&dir.path().canonicalize().unwrap().display().to_string())
                || hint.contains(&dir.path().display().to_string()),
            "names the working directory: {hint}"
        );
    }
    // An absolute path that is missing needs no hint about the working directory.
    let missing = dir.path().join("nope.toml");
    let out = sipbridge(
        dir.path(),
        &["check", "--config", missing.to_str().unwrap()],
    );
    let (_, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(2));
    assert!(!stderr.contains("hint:"), "{stderr}");
}

#[test]
fn version_and_help() {
    let dir = tempfile::tempdir().unwrap();
    let out = sipbridge(dir.path(), &["--version"]);
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(
        text(&out).0.trim(),
        format!("sipbridge {}", env!("CARGO_PKG_VERSION"))
    );
    let out = sipbridge(dir.path(), &["--help"]);
    let (stdout, _) = text(&out);
    assert_eq!(out.status.code(), Some(0));
    for needle in [
        "check",
        "run",
        "--log-format",
        "--log-filter",
        "docs/configuration.md",
    ] {
        assert!(stdout.contains(needle), "{needle} missing from:\n{stdout}");
    }
}

#[test]
fn log_filter_and_format_come_from_flags_or_environment() {
    let root = repo_root();
    let run = |args: &[&str], env: &[(&str, &str)]| {
        let mut c = Command::new(env!("CARGO_BIN_EXE_sipbridge"));
        c.args(args)
            .current_dir(&root)
            .env_remove("SIPBRIDGE_LOG")
            .env_remove("RUST_LOG");
        for (k, v) in env {
            c.env(k, v);
        }
        let o = c.output().unwrap();
        assert_eq!(o.status.code(), Some(0));
        String::from_utf8(o.stderr).unwrap()
    };
    // Default filter is `info`: the debug line is absent.
    assert!(!run(&["check"], &[]).contains("checking configuration"));
    // stderr is not a terminal here, so `auto` logs JSON lines.
    let json = run(&["check"], &[("RUST_LOG", "debug")]);
    let line = json
        .lines()
        .find(|l| l.contains("checking configuration"))
        .unwrap();
    let v: serde_json::Value = serde_json::from_str(line).unwrap();
    assert_eq!(v["level"], "DEBUG");
    assert_eq!(v["config"], "sip-profiles/default.toml");
    // SIPBRIDGE_LOG wins over RUST_LOG, and --log-filter over both.
    assert!(
        !run(
            &["check"],
            &[("SIPBRIDGE_LOG", "warn"), ("RUST_LOG", "debug")]
        )
        .contains("checking")
    );
    let text = run(
        &["--log-format", "text", "--log-filter", "debug", "check"],
        &[("SIPBRIDGE_LOG", "warn")],
    );
    assert!(
        text.contains("DEBUG") && text.contains("checking configuration"),
        "{text}"
    );
    assert!(!text.trim_start().starts_with('{'));
}

#[test]
fn a_digest_trunk_without_allow_is_rejected() {
    let dir = tempfile::tempdir().unwrap();
    write_wav(&dir.path().join("prompt.wav"), 200);
    let body = profile(5011).replace(
        "allow = [\"10.11.0.0/16\"]\n",
        "[trunk.digest]\nusername = \"u\"\npassword = \"pw\"\n",
    );
    assert!(body.contains("[trunk.digest]"), "{body}");
    std::fs::write(dir.path().join("p.toml"), &body).unwrap();
    let out = sipbridge(dir.path(), &["check", "--config", "p.toml"]);
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(2), "{stdout}\n{stderr}");
    assert_reported(
        &stderr,
        "p.toml",
        line_of(&body, "name = \"k5011\""),
        "has [trunk.digest] but no `allow`",
    );
}

#[test]
fn check_validates_the_tls_certificate_and_key() {
    let dir = tempfile::tempdir().unwrap();
    write_wav(&dir.path().join("prompt.wav"), 200);
    let a = rcgen::generate_simple_self_signed(vec!["a.example".to_owned()]).unwrap();
    let b = rcgen::generate_simple_self_signed(vec!["b.example".to_owned()]).unwrap();
    std::fs::write(dir.path().join("cert.pem"), a.cert.pem()).unwrap();
    std::fs::write(dir.path().join("key.pem"), a.signing_key.serialize_pem()).unwrap();
    std::fs::write(
        dir.path().join("other-key.pem"),
        b.signing_key.serialize_pem(),
    )
    .unwrap();
    std::fs::write(dir.path().join("junk.pem"), "not a certificate\n").unwrap();
    let with_tls = |cert: &str, key: &str| {
        profile(5061).replace(
            "udp = [\"127.0.0.1:5061\"]\n",
            &format!(
                "tls = [\"127.0.0.1:5061\"]\n\n[profile.tls]\ncert = \"file:{cert}\"\nkey = \"file:{key}\"\n"
            ),
        )
    };
    let check = |name: &str, body: &str| {
        std::fs::write(dir.path().join(name), body).unwrap();
        let out = Command::new(env!("CARGO_BIN_EXE_sipbridge"))
            .args(["check", "--config", name])
            .current_dir(dir.path())
            .output()
            .unwrap();
        let (stdout, stderr) = text(&out);
        (out.status.code(), stdout, stderr)
    };

    let good = with_tls("cert.pem", "key.pem");
    let (code, stdout, stderr) = check("good.toml", &good);
    assert_eq!(code, Some(0), "{stdout}\n{stderr}");
    assert!(stdout.contains("listen: tls 127.0.0.1:5061"), "{stdout}");

    let mismatched = with_tls("cert.pem", "other-key.pem");
    let (code, _, stderr) = check("mismatched.toml", &mismatched);
    assert_eq!(code, Some(2), "{stderr}");
    assert_reported(
        &stderr,
        "mismatched.toml",
        line_of(&mismatched, "cert = "),
        "certificate and key do not form a usable identity",
    );

    let junk = with_tls("junk.pem", "key.pem");
    let (code, _, stderr) = check("junk.toml", &junk);
    assert_eq!(code, Some(2), "{stderr}");
    assert_reported(
        &stderr,
        "junk.toml",
        line_of(&junk, "cert = "),
        "CERTIFICATE",
    );

    let missing = with_tls("no-such.pem", "key.pem");
    let (code, _, stderr) = check("missing.toml", &missing);
    assert_eq!(code, Some(2), "{stderr}");
    assert_reported(
        &stderr,
        "missing.toml",
        line_of(&missing, "cert = "),
        "cannot read",
    );

    let no_table = profile(5061).replace("udp = [", "tls = [");
    let (code, _, stderr) = check("no-table.toml", &no_table);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(
        stderr.contains("listen.tls needs [profile.tls]"),
        "{stderr}"
    );
}

#[test]
fn telnyx_mode_and_its_encoding_are_checked() {
    let dir = tempfile::tempdir().unwrap();
    write_wav(&dir.path().join("prompt.wav"), 200);
    let agent = |port: u16, keys: &str, extra_tenant: &str| {
        profile(port).replace(
            "pipeline = { kind = \"echo\" }",
            &format!(
                "{extra_tenant}pipeline = {{ kind = \"agent\", url = \"ws://127.0.0.1:9/\"{keys} }}"
            ),
        )
    };
    // Valid: PCMA on an 8 kHz pipeline, and the PCMU default.
    let good = dir.path().join("good");
    std::fs::create_dir(&good).unwrap();
    std::fs::write(
        good.join("a.toml"),
        agent(
            5030,
            ", mode = \"telnyx\", encoding = \"PCMA\"",
            "pipeline_rate = 8000\n",
        ),
    )
    .unwrap();
    std::fs::write(good.join("b.toml"), agent(5031, ", mode = \"telnyx\"", "")).unwrap();
    std::fs::write(
        good.join("c.toml"),
        agent(5032, ", mode = \"telnyx\", encoding = \"L16\"", ""),
    )
    .unwrap();
    let out = sipbridge(dir.path(), &["check", "--config", "good"]);
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(0), "{stdout}\n{stderr}");
    assert!(stdout.contains("mode telnyx (PCMA)"), "{stdout}");
    assert!(stdout.contains("mode telnyx (PCMU)"), "{stdout}");
    assert!(stdout.contains("mode telnyx (L16)"), "{stdout}");

    let bad = dir.path().join("bad");
    std::fs::create_dir(&bad).unwrap();
    let files = [
        (
            "a.toml",
            agent(5033, ", mode = \"twilio\", encoding = \"PCMU\"", ""),
            "encoding",
            "`encoding` applies only to mode = \"telnyx\"",
        ),
        (
            "b.toml",
            agent(5034, ", mode = \"telnyx\", encoding = \"l16\"", ""),
            "encoding",
            "telnyx encoding `l16` must be `PCMU`, `PCMA` or `L16`",
        ),
        (
            "c.toml",
            agent(
                5035,
                ", mode = \"telnyx\", encoding = \"L16\"",
                "pipeline_rate = 8000\n",
            ),
            "encoding",
            "telnyx encoding `L16` is 16 kHz: it needs pipeline_rate 16000",
        ),
        (
            "d.toml",
            profile(5036).replace(
                "pipeline = { kind = \"echo\" }",
                "pipeline = { kind = \"echo\", encoding = \"PCMU\" }",
            ),
            "encoding",
            "`encoding` does not apply to pipeline kind `echo`",
        ),
        (
            "e.toml",
            agent(5037, ", mode = \"telnix\"", ""),
            "telnix",
            "agent mode `telnix` must be `native`, `twilio` or `telnyx`",
        ),
    ];
    for (name, body, _, _) in &files {
        std::fs::write(bad.join(name), body).unwrap();
    }
    let out = sipbridge(dir.path(), &["check", "--config", "bad"]);
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(2), "{stdout}\n{stderr}");
    for (name, body, needle, message) in &files {
        assert_reported(
            &stderr,
            &format!("bad/{name}"),
            line_of(body, needle),
            message,
        );
    }
    assert!(
        stderr.contains(&format!("is invalid: {} error(s)", files.len())),
        "{stderr}"
    );
}

#[test]
fn admin_download_limits_are_checked() {
    let dir = tempfile::tempdir().unwrap();
    write_wav(&dir.path().join("prompt.wav"), 200);
    let admin = "\n[profile.admin]\nlisten = \"127.0.0.1:0\"\n";
    let with =
        |lines: &str| profile(5101).replace("\n[[trunk]]", &format!("{admin}{lines}\n[[trunk]]"));
    // In range: valid.
    let good = with("download_deadline_s = 30\nmax_downloads_per_tenant = 2\n");
    std::fs::write(dir.path().join("good.toml"), &good).unwrap();
    let out = sipbridge(dir.path(), &["check", "--config", "good.toml"]);
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(0), "{stdout}\n{stderr}");

    // Zero and beyond the maximum: each reported on its line.
    let bad = with("download_deadline_s = 0\nmax_downloads_per_tenant = 100000\n");
    std::fs::write(dir.path().join("bad.toml"), &bad).unwrap();
    let out = sipbridge(dir.path(), &["check", "--config", "bad.toml"]);
    let (_, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert_reported(
        &stderr,
        "bad.toml",
        line_of(&bad, "download_deadline_s"),
        "download_deadline_s 0 is out of range: write 1 to 86400",
    );
    assert_reported(
        &stderr,
        "bad.toml",
        line_of(&bad, "max_downloads_per_tenant"),
        "max_downloads_per_tenant 100000 is out of range: write 1 to 256",
    );
}

/// Issue 16: `[profile.store] kind = "postgres"` needs `url`, a secret
/// reference holding a PostgreSQL URL; the summary names where the URL comes
/// from, never the URL; wrong kinds and URLs are reported on their lines.
#[test]
fn postgres_store_settings_are_checked() {
    let dir = tempfile::tempdir().unwrap();
    write_wav(&dir.path().join("prompt.wav"), 200);
    std::fs::write(
        dir.path().join("pg-url"),
        "postgres://sipbridge:s3cret-pw@127.0.0.1:5432/sipbridge\n",
    )
    .unwrap();
    let good = profile(5031).replace(
        "[[trunk]]",
        "[profile.store]\nkind = \"postgres\"\nurl = \"file:pg-url\"\n\n[[trunk]]",
    );
    std::fs::write(dir.path().join("good.toml"), &good).unwrap();
    let out = sipbridge(dir.path(), &["check", "--config", "good.toml"]);
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(0), "{stdout}\n{stderr}");
    assert!(
        stdout.contains("metadata: PostgreSQL (url from file:pg-url)"),
        "{stdout}"
    );
    assert!(!stdout.contains("s3cret-pw") && !stderr.contains("s3cret-pw"));

    let cases = [
        (
            good.replace("kind = \"postgres\"", "kind = \"mysql\""),
            "kind",
            "store kind \"mysql\" is not \"sqlite\" or \"postgres\"",
        ),
        (
            good.replace("url = \"file:pg-url\"\n", ""),
            "kind",
            "kind = \"postgres\" needs url",
        ),
        (
            good.replace("kind = \"postgres\"", "kind = \"sqlite\""),
            "url",
            "url is for kind = \"postgres\"",
        ),
        (
            good.replace("file:pg-url", "file:missing-url"),
            "url",
            "store url: cannot read secret file",
        ),
        (
            good.replace("file:pg-url", "file:not-a-url"),
            "url",
            "store url (file:not-a-url) is not a PostgreSQL connection URL",
        ),
    ];
    std::fs::write(dir.path().join("not-a-url"), "mysql://h/db").unwrap();
    for (i, (bad, key, message)) in cases.iter().enumerate() {
        let name = format!("bad{i}.toml");
        std::fs::write(dir.path().join(&name), bad).unwrap();
        let out = sipbridge(dir.path(), &["check", "--config", &name]);
        let (_, stderr) = text(&out);
        assert_eq!(out.status.code(), Some(2), "{name}: {stderr}");
        let line = bad
            .lines()
            .position(|l| l.starts_with(&format!("{key} =")))
            .unwrap()
            + 1;
        assert_reported(&stderr, &name, line, message);
    }
}

/// Issue 19: `[profile.store]` and `on_store_failure` are checked with their locations;
/// `on_store_failure` on a tenant that does not record is a warning.
#[test]
fn store_failure_settings_are_checked() {
    let dir = tempfile::tempdir().unwrap();
    write_wav(&dir.path().join("prompt.wav"), 200);
    let good = profile(5030)
        .replace(
            "[[trunk]]",
            "[profile.store]\nmin_free_mb = 256\ncheck_interval_s = 10\n\n[[trunk]]",
        )
        .replace(
            "pipeline = { kind = \"echo\" }",
            "pipeline = { kind = \"echo\" }\non_store_failure = \"reject\"",
        );
    std::fs::write(dir.path().join("good.toml"), &good).unwrap();
    let out = sipbridge(dir.path(), &["check", "--config", "good.toml"]);
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(0), "{stdout}\n{stderr}");
    assert!(!stdout.contains("on_store_failure"), "{stdout}");
    assert!(
        stdout.contains("store: min free 256 MiB, checked every 10 s"),
        "{stdout}"
    );
    assert!(
        stdout.contains("    store cannot write: reject (503)"),
        "{stdout}"
    );

    let unrecorded = good.replace("recording = true", "recording = false");
    std::fs::write(dir.path().join("warn.toml"), &unrecorded).unwrap();
    let out = sipbridge(dir.path(), &["check", "--config", "warn.toml"]);
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert_reported(
        &stdout,
        "warn.toml",
        line_of(&unrecorded, "on_store_failure"),
        "on_store_failure has no effect: tenant `t5030` does not record",
    );

    let bad = good
        .replace("min_free_mb = 256", "min_free_mb = 2000000000")
        .replace("check_interval_s = 10", "check_interval_s = 0");
    std::fs::write(dir.path().join("bad.toml"), &bad).unwrap();
    let out = sipbridge(dir.path(), &["check", "--config", "bad.toml"]);
    let (_, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert_reported(
        &stderr,
        "bad.toml",
        line_of(&bad, "min_free_mb"),
        "min_free_mb 2000000000 is larger than 1 PiB",
    );
    assert_reported(
        &stderr,
        "bad.toml",
        line_of(&bad, "check_interval_s"),
        "check_interval_s 0 must be 1 to 3600",
    );

    let unknown = good.replace("\"reject\"", "\"drop\"");
    std::fs::write(dir.path().join("unknown.toml"), &unknown).unwrap();
    let out = sipbridge(dir.path(), &["check", "--config", "unknown.toml"]);
    let (_, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert_reported(
        &stderr,
        "unknown.toml",
        line_of(&unknown, "on_store_failure"),
        "unknown variant `drop`, expected `answer-unrecorded` or `reject`",
    );
}

/// Issue 16: `[profile.security] trusted_proxies` and `trusted_proxy_source_header` are
/// checked, each wrong value named by file:line; a right one passes.
#[test]
fn trusted_proxies_are_checked() {
    let dir = tempfile::tempdir().unwrap();
    write_wav(&dir.path().join("prompt.wav"), 200);
    let security = |body: &str| {
        profile(5011).replace(
            "[profile.listen]",
            &format!("[profile.security]\n{body}\n\n[profile.listen]"),
        )
    };
    let good = security(
        "trusted_proxies = [\"10.9.0.5\", \"fd00::/64\"]\ntrusted_proxy_source_header = \"X-Src-IP\"",
    );
    std::fs::write(dir.path().join("good.toml"), &good).unwrap();
    let out = sipbridge(dir.path(), &["check", "--config", "good.toml"]);
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(0), "{stdout}\n{stderr}");

    let bad = security(
        "trusted_proxies = [\"10.9.0.5\",\n  \"proxy.example.com\",\n  \"0.0.0.0/0\"]\n\
         trusted_proxy_source_header = \"Via\"",
    );
    std::fs::write(dir.path().join("bad.toml"), &bad).unwrap();
    let out = sipbridge(dir.path(), &["check", "--config", "bad.toml"]);
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(2), "{stdout}\n{stderr}");
    assert_reported(
        &stderr,
        "bad.toml",
        line_of(&bad, "proxy.example.com"),
        "trusted_proxies `proxy.example.com` is not a CIDR or IP address",
    );
    assert_reported(
        &stderr,
        "bad.toml",
        line_of(&bad, "0.0.0.0/0"),
        "would trust every address",
    );
    assert_reported(
        &stderr,
        "bad.toml",
        line_of(&bad, "trusted_proxy_source_header"),
        "trusted_proxy_source_header `Via` is a header callers write",
    );
    let spaced = security("trusted_proxy_source_header = \"X Src\"");
    std::fs::write(dir.path().join("spaced.toml"), &spaced).unwrap();
    let out = sipbridge(dir.path(), &["check", "--config", "spaced.toml"]);
    let (_, stderr) = text(&out);
    assert_reported(
        &stderr,
        "spaced.toml",
        line_of(&spaced, "trusted_proxy_source_header"),
        "is not a header name",
    );
}

#[test]
fn recordings_settings_are_checked() {
    let dir = tempfile::tempdir().unwrap();
    write_wav(&dir.path().join("prompt.wav"), 200);
    let good = profile(5031).replace(
        "[[trunk]]",
        "[profile.recordings]\nkind = \"s3\"\nendpoint = \"https://s3.example.com\"\n\
         bucket = \"call-recordings\"\nregion = \"eu-west-1\"\naccess_key_id = \"env:S3_KEY_ID\"\n\
         secret_access_key = \"env:S3_SECRET\"\nspool_max_mb = 512\n\n[[trunk]]",
    );
    std::fs::write(dir.path().join("good.toml"), &good).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_sipbridge"))
        .args(["check", "--config", "good.toml"])
        .current_dir(dir.path())
        .env("S3_KEY_ID", "AKIAEXAMPLE")
        .env("S3_SECRET", "s3-secret-never-shown-4f1a")
        .output()
        .unwrap();
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(0), "{stdout}\n{stderr}");
    assert!(
        stdout.contains(
            "recordings: s3 bucket call-recordings at https://s3.example.com (region eu-west-1, \
             key id env:S3_KEY_ID, secret env:S3_SECRET), spool max 512 MiB"
        ),
        "{stdout}"
    );
    assert!(!stdout.contains("s3-secret-never-shown") && !stderr.contains("s3-secret-never-shown"));

    // Without the secrets: each missing one named at its line.
    let out = Command::new(env!("CARGO_BIN_EXE_sipbridge"))
        .args(["check", "--config", "good.toml"])
        .current_dir(dir.path())
        .env_remove("S3_KEY_ID")
        .env_remove("S3_SECRET")
        .output()
        .unwrap();
    let (_, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert_reported(
        &stderr,
        "good.toml",
        line_of(&good, "secret_access_key"),
        "recordings secret_access_key: environment variable `S3_SECRET` is not set",
    );

    let bad = good
        .replace("kind = \"s3\"", "kind = \"s3\"\n")
        .replace("https://s3.example.com", "s3.example.com")
        .replace("call-recordings", "Call_Recordings")
        .replace("spool_max_mb = 512", "spool_max_mb = 0")
        .replace("region = \"eu-west-1\"\n", "");
    std::fs::write(dir.path().join("bad.toml"), &bad).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_sipbridge"))
        .args(["check", "--config", "bad.toml"])
        .current_dir(dir.path())
        .env("S3_KEY_ID", "AKIAEXAMPLE")
        .env("S3_SECRET", "s3-secret-never-shown-4f1a")
        .output()
        .unwrap();
    let (_, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert_reported(
        &stderr,
        "bad.toml",
        line_of(&bad, "endpoint"),
        "endpoint `s3.example.com` is not an http:// or https:// URL",
    );
    assert_reported(
        &stderr,
        "bad.toml",
        line_of(&bad, "bucket"),
        "bucket `Call_Recordings` is not a valid S3 bucket name",
    );
    assert_reported(
        &stderr,
        "bad.toml",
        line_of(&bad, "spool_max_mb"),
        "spool_max_mb 0 must be 1 to 1048576",
    );
    assert_reported(
        &stderr,
        "bad.toml",
        line_of(&bad, "[profile.recordings]"),
        "[profile.recordings] kind = \"s3\" needs region",
    );

    let other = good.replace("kind = \"s3\"", "kind = \"gcs\"");
    std::fs::write(dir.path().join("kind.toml"), &other).unwrap();
    let out = sipbridge(dir.path(), &["check", "--config", "kind.toml"]);
    let (_, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert_reported(
        &stderr,
        "kind.toml",
        line_of(&other, "kind = \"gcs\""),
        "recordings kind `gcs` is not \"local\" or \"s3\"",
    );

    let local = good.replace("kind = \"s3\"", "kind = \"local\"");
    std::fs::write(dir.path().join("local.toml"), &local).unwrap();
    let out = sipbridge(dir.path(), &["check", "--config", "local.toml"]);
    let (_, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert_reported(
        &stderr,
        "local.toml",
        line_of(&local, "bucket"),
        "bucket is only for kind = \"s3\" recordings",
    );
}

#[test]
fn outbound_trunk_values_are_checked_with_their_line() {
    let dir = tempfile::tempdir().unwrap();
    write_wav(&dir.path().join("prompt.wav"), 200);
    let toml = profile(5090).replace(
        "allow = [\"10.90.0.0/16\"]\n",
        "allow = [\"10.90.0.0/16\"]\n\n[trunk.outbound]\nproxy = \"carrier.example\"\n\
         transport = \"sctp\"\nusername = \"u\"\ntenants = [\"nobody\"]\nanswer_timeout_s = 0\n",
    ) + "\n[[tenant]]\nid = \"x\"\npipeline = { kind = \"echo\" }\nmax_outbound_cps = 0\n";
    std::fs::write(dir.path().join("p.toml"), &toml).unwrap();
    let out = sipbridge(dir.path(), &["check", "--config", "p.toml"]);
    let (_, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    let f = "p.toml";
    assert_reported(&stderr, f, line_of(&toml, "proxy = "), "is not `host:port`");
    assert_reported(
        &stderr,
        f,
        line_of(&toml, "transport = "),
        "outbound calls use udp",
    );
    assert_reported(
        &stderr,
        f,
        line_of(&toml, "username = "),
        "without `password`",
    );
    assert_reported(
        &stderr,
        f,
        line_of(&toml, "tenants = "),
        "unknown tenant `nobody`",
    );
    assert_reported(
        &stderr,
        f,
        line_of(&toml, "answer_timeout_s = "),
        "out of range",
    );
    assert_reported(
        &stderr,
        f,
        line_of(&toml, "max_outbound_cps = "),
        "at least 1",
    );

    // A valid one passes, and the trunk's tenant may dial by default.
    let good = profile(5091).replace(
        "allow = [\"10.91.0.0/16\"]\n",
        "allow = [\"10.91.0.0/16\"]\ntenant = \"t5091\"\n\n[trunk.outbound]\nproxy = \"192.0.2.10:5060\"\n\
         username = \"u\"\npassword = \"env:SB_TEST_OUT_PW\"\nfrom_domain = \"sbc.example.com\"\n",
    );
    std::fs::write(dir.path().join("good.toml"), &good).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_sipbridge"))
        .args(["check", "--config", "good.toml"])
        .current_dir(dir.path())
        .env("SB_TEST_OUT_PW", "pw")
        .output()
        .unwrap();
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(0), "{stdout}\n{stderr}");
}

#[test]
fn transfer_settings_are_checked_with_their_line() {
    let dir = tempfile::tempdir().unwrap();
    write_wav(&dir.path().join("prompt.wav"), 200);
    // k5092 has no [trunk.outbound]; `nope` is no trunk at all.
    let toml = profile(5092).replace(
        "pipeline = { kind = \"echo\" }\n",
        "pipeline = { kind = \"echo\" }\ntransfer_trunk = \"k5092\"\ntransfer_fallback = \"maybe\"\n",
    ) + "\n[[tenant]]\nid = \"x\"\npipeline = { kind = \"echo\" }\ntransfer_trunk = \"nope\"\n";
    std::fs::write(dir.path().join("p.toml"), &toml).unwrap();
    let out = sipbridge(dir.path(), &["check", "--config", "p.toml"]);
    let (_, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    let f = "p.toml";
    assert_reported(
        &stderr,
        f,
        line_of(&toml, "transfer_trunk = \"k5092\""),
        "transfer_trunk `k5092` has no [trunk.outbound] that tenant `t5092` may use",
    );
    assert_reported(
        &stderr,
        f,
        line_of(&toml, "transfer_fallback = "),
        "transfer_fallback `maybe` is not `none` or `bridge`",
    );
    assert_reported(
        &stderr,
        f,
        line_of(&toml, "transfer_trunk = \"nope\""),
        "transfer_trunk names unknown trunk `nope`",
    );

    // A trunk the tenant may dial out on passes.
    let good = profile(5093).replace(
        "allow = [\"10.93.0.0/16\"]\n",
        "allow = [\"10.93.0.0/16\"]\ntenant = \"t5093\"\n\n[trunk.outbound]\nproxy = \"192.0.2.10:5060\"\n",
    )
    .replace(
        "pipeline = { kind = \"echo\" }\n",
        "pipeline = { kind = \"echo\" }\ntransfer_trunk = \"k5093\"\ntransfer_fallback = \"bridge\"\n",
    );
    std::fs::write(dir.path().join("good.toml"), &good).unwrap();
    let out = sipbridge(dir.path(), &["check", "--config", "good.toml"]);
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(0), "{stdout}\n{stderr}");
}

#[test]
fn media_threads_are_checked_with_their_line() {
    let dir = tempfile::tempdir().unwrap();
    write_wav(&dir.path().join("prompt.wav"), 200);
    let toml = profile(5094).replace(
        "[profile.listen]",
        "[profile.media]\nthreads = 300\n\n[profile.listen]",
    );
    std::fs::write(dir.path().join("p.toml"), &toml).unwrap();
    let out = sipbridge(dir.path(), &["check", "--config", "p.toml"]);
    let (_, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert_reported(
        &stderr,
        "p.toml",
        line_of(&toml, "threads = 300"),
        "[profile.media] threads: 300 is more than 256 (0 = one per core)",
    );

    let good = profile(5095).replace(
        "[profile.listen]",
        "[profile.media]\nthreads = 2\n\n[profile.listen]",
    );
    std::fs::write(dir.path().join("good.toml"), &good).unwrap();
    let out = sipbridge(dir.path(), &["check", "--config", "good.toml"]);
    let (_, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
}
