#![allow(clippy::unwrap_used, clippy::expect_used)]
//! The admin listener against the real daemon: `/healthz` and `/readyz`, and
//! unknown paths.

mod common;

use common::http;
use common::{Daemon, ProfileSpec};

fn spawn() -> Daemon {
    let toml = ProfileSpec {
        extra: "",
        ..ProfileSpec::default()
    }
    .render()
    .replace(
        "[profile.sip]",
        "[profile.admin]\nlisten = \"127.0.0.1:0\"\n\n[profile.sip]",
    );
    Daemon::spawn(&toml)
}

#[test]
fn healthz_and_readyz_answer_on_the_admin_listener() {
    let daemon = spawn();
    let addr = daemon.admin_addr();
    assert!(addr.ip().is_loopback());
    let health = http::get(addr, "/healthz", None);
    assert_eq!((health.status, health.text().as_str()), (200, "ok\n"));
    let ready = http::get(addr, "/readyz", None);
    assert_eq!((ready.status, ready.text().as_str()), (200, "ready\n"));
    assert_eq!(http::get(addr, "/nope", None).status, 404);
}
