#![allow(clippy::unwrap_used, clippy::expect_used)]
//! The agent pipeline's `auth` (bearer string or `{ kind, secret }` table) and `ca_file`
//! keys: what `check` accepts, what it rejects (unknown keys included), and that the
//! secret never appears in its diagnostics.

mod agent_util;
mod common;

use sipbridge::config::{self, AgentAuth, Pipeline};
use std::path::Path;

const SECRET: &str = "auth-Qp55-secret-value";

fn env(name: &str) -> Option<String> {
    (name == "AGENT_SECRET").then(|| SECRET.to_owned())
}

fn profile_with(pipeline_keys: &str) -> String {
    common::ProfileSpec::default()
        .render_for("config_agent_auth")
        .replace(
            r#"pipeline = { kind = "echo" }"#,
            &format!(
                r#"pipeline = {{ kind = "agent", url = "wss://a.example/x"{pipeline_keys} }}"#
            ),
        )
}

fn load(dir: &Path, text: &str) -> Result<config::Config, String> {
    let path = dir.join("profile.toml");
    std::fs::write(&path, text).unwrap();
    config::load_with_env(&path, &env).map_err(|d| d.to_string())
}

fn agent_auth(cfg: &config::Config) -> Option<&AgentAuth> {
    match &cfg.tenants[0].pipeline {
        Pipeline::Agent(a) => a.auth.as_ref(),
        other => panic!("{other:?}"),
    }
}

#[test]
fn bearer_string_and_tables_are_accepted() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = load(dir.path(), &profile_with(r#", auth = "env:AGENT_SECRET""#)).unwrap();
    match agent_auth(&cfg) {
        Some(AgentAuth::Bearer(s)) => assert_eq!(s.expose(), SECRET.as_bytes()),
        other => panic!("{other:?}"),
    }
    let cfg = load(
        dir.path(),
        &profile_with(r#", auth = { kind = "hmac", secret = "env:AGENT_SECRET" }"#),
    )
    .unwrap();
    match agent_auth(&cfg) {
        Some(AgentAuth::Hmac(s)) => assert_eq!(s.expose(), SECRET.as_bytes()),
        other => panic!("{other:?}"),
    }
    let cfg = load(
        dir.path(),
        &profile_with(r#", auth = { kind = "bearer", secret = "env:AGENT_SECRET" }"#),
    )
    .unwrap();
    assert!(matches!(agent_auth(&cfg), Some(AgentAuth::Bearer(_))));
    assert!(!format!("{cfg:?}").contains(SECRET));
}

#[test]
fn bad_auth_tables_are_rejected_without_showing_the_secret() {
    let dir = tempfile::tempdir().unwrap();
    for (keys, message) in [
        (
            r#", auth = { kind = "hmac", secret = "env:AGENT_SECRET", algo = "md5" }"#,
            "unknown key `algo` in agent auth",
        ),
        (
            r#", auth = { kind = "rsa", secret = "env:AGENT_SECRET" }"#,
            "agent auth kind `rsa` must be `bearer` or `hmac`",
        ),
        (
            r#", auth = { secret = "env:AGENT_SECRET" }"#,
            "agent auth needs `kind`",
        ),
        (r#", auth = { kind = "hmac" }"#, "agent auth needs `secret`"),
        (", auth = 42", "agent auth must be a secret reference"),
        (
            r#", auth = { kind = "hmac", secret = "env:NOPE" }"#,
            "agent auth: ",
        ),
        (r#", colour = "blue""#, "unknown field `colour`"),
    ] {
        let err = load(dir.path(), &profile_with(keys)).expect_err(keys);
        assert!(err.contains(message), "{keys}: {err}");
        assert!(!err.contains(SECRET), "{err}");
    }
}

#[test]
fn ca_file_is_loaded_and_checked() {
    let dir = tempfile::tempdir().unwrap();
    let (_, ca) = agent_util::private_ca_server(dir.path());
    let cfg = load(
        dir.path(),
        &profile_with(&format!(r#", ca_file = "{}""#, ca.display())),
    )
    .unwrap();
    match &cfg.tenants[0].pipeline {
        Pipeline::Agent(a) => {
            let ca_file = a.ca_file.as_ref().unwrap();
            assert_eq!(ca_file.path, ca);
            assert_eq!(ca_file.certs.len(), 1);
        }
        other => panic!("{other:?}"),
    }

    let garbage = dir.path().join("garbage.pem");
    std::fs::write(&garbage, "hello, no certificate here\n").unwrap();
    let not_a_cert = dir.path().join("not-a-cert.pem");
    std::fs::write(
        &not_a_cert,
        "-----BEGIN CERTIFICATE-----\nAQID\n-----END CERTIFICATE-----\n",
    )
    .unwrap();
    for (path, message) in [
        (dir.path().join("missing.pem"), "cannot read"),
        (garbage, "holds no CERTIFICATE block"),
        (not_a_cert, "not valid trust anchors"),
    ] {
        let err = load(
            dir.path(),
            &profile_with(&format!(r#", ca_file = "{}""#, path.display())),
        )
        .expect_err(message);
        assert!(err.contains(message), "{err}");
    }

    // Only for agents; a warning (not an error) on a ws:// url.
    let text = common::ProfileSpec::default()
        .render_for("config_agent_auth")
        .replace(
            r#"pipeline = { kind = "echo" }"#,
            &format!(
                r#"pipeline = {{ kind = "echo", ca_file = "{}" }}"#,
                ca.display()
            ),
        );
    let err = load(dir.path(), &text).unwrap_err();
    assert!(
        err.contains("`ca_file` does not apply to pipeline kind `echo`"),
        "{err}"
    );
    let text = profile_with(&format!(r#", ca_file = "{}""#, ca.display()))
        .replace("wss://a.example/x", "ws://a.example/x");
    assert!(load(dir.path(), &text).is_ok());
}
