#![allow(clippy::unwrap_used, clippy::expect_used)]
//! The Twilio REST subset on the admin listener (docs/admin-api.md), against the real
//! daemon with SIPp as the carrier: HTTP Basic `{AccountSid}:{AuthToken}` per tenant,
//! `GET …/Calls/{CallSid}.json` (state `in-progress`, the caller number in the tenant's
//! stored form), `POST` with `Status=completed` (the caller receives BYE, the CDR says
//! `agent-hangup`, an audit row names the Twilio API), and Twilio's error shapes: 401
//! code 20003 with `WWW-Authenticate` for wrong credentials or another account's path,
//! 404 code 20404 for another tenant's call, an unknown one and a finished one —
//! byte-identical —, 400 for a parameter the subset does not take. No auth token in any
//! log line.

mod common;

use base64::Engine as _;
use common::http::{self, Response};
use common::{Daemon, ProfileSpec, sipp, sipp_scenario};
use serde_json::Value;
use sha2::{Digest, Sha256};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

const ADMIN_TOKEN: &str = "sbadm_dHdpbGlvLXJlc3QtYWRtaW4tMDE";
const ACME_SID: &str = "AC00000000000000000000000000000acm";
const ACME_TOKEN: &str = "acme-twilio-auth-token-0123456789";
const GLOBEX_SID: &str = "AC0000000000000000000000000000glbx";
const GLOBEX_TOKEN: &str = "globex-twilio-auth-token-987654321";
const ACME_NUMBER: &str = "+15553330000";
const GLOBEX_NUMBER: &str = "+15554440000";

fn profile() -> String {
    let routes = format!(
        "[[route]]\nnumber = \"{ACME_NUMBER}\"\ntenant = \"demo\"\n\n\
         [[route]]\nnumber = \"{GLOBEX_NUMBER}\"\ntenant = \"globex\"\n"
    );
    let extra = format!(
        "[[tenant]]\nid = \"globex\"\npipeline = {{ kind = \"echo\" }}\n\
         [tenant.twilio_api]\naccount_sid = \"{GLOBEX_SID}\"\nauth_token = \"env:GLOBEX_TW\"\n"
    );
    let tenant = format!(
        "caller_numbers = \"hashed\"\n\
         [tenant.twilio_api]\naccount_sid = \"{ACME_SID}\"\nauth_token = \"env:ACME_TW\"\n"
    );
    ProfileSpec {
        tenant: &tenant,
        routes: Some(&routes),
        extra: &extra,
        ..ProfileSpec::default()
    }
    .render()
    .replace("allow = [\"127.0.0.0/8\"]\ntenant = \"demo\"\n", "allow = [\"127.0.0.0/8\"]\n")
    .replace(
        "[profile.sip]",
        "[profile.admin]\nlisten = \"127.0.0.1:0\"\ntoken = \"env:SB_ADMIN_TOKEN\"\n\n[profile.sip]",
    )
}

fn basic(user: &str, password: &str) -> String {
    let raw = format!("{user}:{password}");
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(raw)
    )
}

fn call_path(account: &str, call_id: &str) -> String {
    format!("/2010-04-01/Accounts/{account}/Calls/{call_id}.json")
}

fn rest_get(addr: SocketAddr, path: &str, auth: &str) -> Response {
    http::request(addr, "GET", path, &[("Authorization", auth)], b"")
}

fn rest_post(addr: SocketAddr, path: &str, auth: &str, form: &str) -> Response {
    http::request(
        addr,
        "POST",
        path,
        &[
            ("Authorization", auth),
            ("Content-Type", "application/x-www-form-urlencoded"),
        ],
        form.as_bytes(),
    )
}

#[track_caller]
fn twilio_error(r: &Response, status: u16, code: u64) {
    assert_eq!(r.status, status, "{}", r.text());
    let v = r.json();
    assert_eq!(v["code"], code, "{v}");
    assert_eq!(v["status"], status, "{v}");
    assert_eq!(
        v["more_info"],
        format!("https://www.twilio.com/docs/errors/{code}")
    );
}

/// Percent-encodes what a path segment cannot hold as is (SIPp's Call-IDs have `@`,
/// which may stay; anything else outside unreserved characters is encoded).
fn encode_segment(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' | b'@' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

#[test]
fn twilio_rest_fetch_and_hang_up_with_basic_auth_scoped_to_the_tenant() {
    let daemon = Daemon::spawn_with_env(
        &profile(),
        &[
            ("SB_ADMIN_TOKEN", ADMIN_TOKEN),
            ("ACME_TW", ACME_TOKEN),
            ("GLOBEX_TW", GLOBEX_TOKEN),
        ],
    );
    let addr = daemon.admin_addr();
    let udp = daemon.udp_addr();
    let carrier = std::thread::spawn(move || {
        sipp(
            &sipp_scenario("bridge_bye.xml"),
            udp,
            &["-s", ACME_NUMBER, "-timeout", "20s"],
        )
    });
    // The call, once answered, through the admin API.
    let started = Instant::now();
    let call_id = loop {
        let r = http::get(addr, "/v1/calls", Some(ADMIN_TOKEN));
        let calls = r.json()["calls"].as_array().unwrap().clone();
        if let Some(c) = calls.iter().find(|c| c["state"] == "answered") {
            break c["call_id"].as_str().unwrap().to_owned();
        }
        assert!(started.elapsed() < Duration::from_secs(10), "{calls:?}");
        std::thread::sleep(Duration::from_millis(50));
    };
    let acme = basic(ACME_SID, ACME_TOKEN);
    let path = call_path(ACME_SID, &encode_segment(&call_id));

    // The call's state, shaped like Twilio's Call resource.
    let r = rest_get(addr, &path, &acme);
    assert_eq!(r.status, 200, "{}", r.text());
    let v = r.json();
    assert_eq!(v["sid"], call_id.as_str());
    assert_eq!(v["account_sid"], ACME_SID);
    assert_eq!(v["status"], "in-progress");
    assert_eq!(v["direction"], "inbound");
    assert_eq!(v["api_version"], "2010-04-01");
    assert_eq!(v["to"], ACME_NUMBER);
    // This tenant hashes caller numbers: the API shows only the stored form.
    let from = v["from"].as_str().unwrap();
    assert!(from.starts_with("hmac-sha256:"), "{from}");
    assert!(!r.text().contains("15550001111"), "{}", r.text());
    assert!(v["start_time"].as_str().unwrap().ends_with(" +0000"), "{v}");
    assert_eq!(
        v["uri"],
        format!("/2010-04-01/Accounts/{ACME_SID}/Calls/{call_id}.json")
    );

    // Credentials: a wrong token, no header, another account's path with right
    // credentials, a bearer token instead of Basic.
    for auth in [
        basic(ACME_SID, "not-the-token-at-all-000"),
        basic(ACME_SID, GLOBEX_TOKEN),
        format!("Bearer {ADMIN_TOKEN}"),
    ] {
        let r = rest_get(addr, &path, &auth);
        twilio_error(&r, 401, 20003);
        assert_eq!(
            r.header("www-authenticate"),
            Some("Basic realm=\"Twilio API\"")
        );
    }
    twilio_error(&http::request(addr, "GET", &path, &[], b""), 401, 20003);
    let globex = basic(GLOBEX_SID, GLOBEX_TOKEN);
    twilio_error(&rest_get(addr, &path, &globex), 401, 20003);

    // Another tenant's account sees no such call, exactly as for an unknown one; and
    // cannot end it.
    let foreign = rest_get(
        addr,
        &call_path(GLOBEX_SID, &encode_segment(&call_id)),
        &globex,
    );
    twilio_error(&foreign, 404, 20404);
    let unknown = rest_get(addr, &call_path(GLOBEX_SID, "CA0000"), &globex);
    twilio_error(&unknown, 404, 20404);
    let shape = |r: &Response| {
        let mut v = r.json();
        v["message"] = Value::Null;
        v
    };
    assert_eq!(shape(&foreign), shape(&unknown));
    twilio_error(
        &rest_post(
            addr,
            &call_path(GLOBEX_SID, &encode_segment(&call_id)),
            &globex,
            "Status=completed",
        ),
        404,
        20404,
    );
    // Not part of the subset: refused, the call goes on.
    let r = rest_post(
        addr,
        &path,
        &acme,
        "Url=http%3A%2F%2Fexample.invalid%2Ftwiml",
    );
    twilio_error(&r, 400, 20001);
    // `canceled` does nothing to a call in progress (as on Twilio).
    let r = rest_post(addr, &path, &acme, "Status=canceled");
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["status"], "in-progress");

    // Hang up, as Pipecat's auto_hang_up does.
    let asked = Instant::now();
    let r = rest_post(addr, &path, &acme, "Status=completed");
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["status"], "completed");
    let result = carrier.join().unwrap();
    result.assert_success();
    assert!(result.messages.contains("BYE sip:"), "{}", result.report());
    assert!(
        asked.elapsed() < Duration::from_secs(5),
        "{:?}",
        asked.elapsed()
    );
    let cdr = daemon
        .wait_for_cdr(Duration::from_secs(5), |c| c["call_id"] == call_id.as_str())
        .unwrap();
    assert_eq!(cdr["cause"], "agent-hangup");
    assert_eq!(cdr["hangup_side"], "bridge");

    // Finished: Twilio's 404 20404 (what Pipecat treats as "already terminated").
    let deadline = Instant::now() + Duration::from_secs(5);
    let gone = loop {
        let r = rest_get(addr, &path, &acme);
        if r.status == 404 || Instant::now() > deadline {
            break r;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    twilio_error(&gone, 404, 20404);
    twilio_error(
        &rest_post(addr, &path, &acme, "Status=completed"),
        404,
        20404,
    );

    // Audited under the Twilio API's actor.
    let r = http::get(addr, "/v1/audit?action=call-hangup", Some(ADMIN_TOKEN));
    assert_eq!(r.status, 200, "{}", r.text());
    let rows = r.json()["entries"].as_array().cloned().unwrap_or_default();
    assert_eq!(rows.len(), 1, "{}", r.text());
    assert_eq!(rows[0]["actor"], "twilio-api:tenant:demo");
    assert_eq!(rows[0]["object_id"], call_id.as_str());

    let token_hash = hex::encode(Sha256::digest(ACME_TOKEN.as_bytes()));
    for line in daemon.logs() {
        for secret in [ACME_TOKEN, GLOBEX_TOKEN, token_hash.as_str()] {
            assert!(!line.contains(secret), "secret in the log: {line}");
        }
    }
}
