#![allow(clippy::unwrap_used, clippy::expect_used)]
//! The admin API against the real daemon (issue 7 acceptance): two tenants with
//! recording on, SIPp calls to create data, then through HTTP: tenant isolation
//! (a tenant token gets 404 on the other tenant's calls, CDRs, recordings, links,
//! transcripts and erasure; 403 on reload), the admin token sees both, signed
//! download links (a valid one streams the decrypted WAV, byte-identical to the
//! store's own export and correlated with what the caller sent; expired and altered
//! ones get 403), audit rows for every link, download, export, erasure and reload,
//! hang-up through the API (SIPp receives the BYE), and no token in any response
//! body or daemon log line.

mod common;

use common::http::{self, Response};
use common::{Daemon, ProfileSpec, repo_path, sipp, sipp_scenario};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use sipbridge::media::g711;
use sipbridge::store::crypto::KeyRing;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

const ADMIN_TOKEN: &str = "sbadm_Qm9yZWFsLWFkbWluLXRva2VuLTAx";
const DEMO_TOKEN: &str = "sbt_ZGVtby10ZW5hbnQtdG9rZW4tMDAx";
const GLOBEX_TOKEN: &str = "sbt_Z2xvYmV4LXRlbmFudC10b2tlbi0w";
const DEMO_NUMBER: &str = "+15551110000";
const GLOBEX_NUMBER: &str = "+15552220000";
const CALLER: &str = "+15550001111";

fn sha256_hex(s: &str) -> String {
    hex::encode(Sha256::digest(s.as_bytes()))
}

/// Two tenants, `demo` and `globex`, both recording, each with its own token
/// hash; the admin token comes from the environment.
fn profile() -> String {
    let prompt = repo_path("sip-profiles/prompts/disclosure.wav");
    let routes = format!(
        "[[route]]\nnumber = \"{DEMO_NUMBER}\"\ntenant = \"demo\"\n\n\
         [[route]]\nnumber = \"{GLOBEX_NUMBER}\"\ntenant = \"globex\"\n"
    );
    let extra = format!(
        "[[tenant]]\nid = \"globex\"\nrecording = true\ncaller_numbers = \"hashed\"\nprompt = {}\n\
         pipeline = {{ kind = \"echo\" }}\nadmin_token_sha256 = \"{}\"\n",
        toml::Value::String(prompt.display().to_string()),
        sha256_hex(GLOBEX_TOKEN)
    );
    let tenant = format!("admin_token_sha256 = \"{}\"\n", sha256_hex(DEMO_TOKEN));
    let text = ProfileSpec {
        tenant: &tenant,
        routes: Some(&routes),
        extra: &extra,
        ..ProfileSpec::default()
    }
    .render();
    let text = text
        .replacen("recording = false\n", "recording = true\n", 1)
        .replace("allow = [\"127.0.0.0/8\"]\ntenant = \"demo\"\n", "allow = [\"127.0.0.0/8\"]\n")
        .replace(
            "[profile.sip]",
            "[profile.admin]\nlisten = \"127.0.0.1:0\"\ntoken = \"env:SB_ADMIN_TOKEN\"\n\n[profile.sip]",
        );
    assert!(text.contains("admin_token_sha256"), "{text}");
    text
}

fn spawn() -> Daemon {
    Daemon::spawn_with_env(&profile(), &[("SB_ADMIN_TOKEN", ADMIN_TOKEN)])
}

/// Every response body the test saw, to check no token leaked into one.
static BODIES: Mutex<Vec<Vec<u8>>> = Mutex::new(Vec::new());

fn keep(r: Response) -> Response {
    BODIES.lock().unwrap().push(r.body.clone());
    r
}

fn get(addr: SocketAddr, path: &str, token: Option<&str>) -> Response {
    keep(http::get(addr, path, token))
}

fn post(addr: SocketAddr, path: &str, token: Option<&str>, body: &Value) -> Response {
    let auth = token.map(|t| format!("Bearer {t}"));
    let mut headers = vec![("Content-Type", "application/json")];
    if let Some(a) = &auth {
        headers.push(("Authorization", a.as_str()));
    }
    keep(http::request(
        addr,
        "POST",
        path,
        &headers,
        body.to_string().as_bytes(),
    ))
}

#[track_caller]
fn status(r: &Response, want: u16) {
    assert_eq!(r.status, want, "{}", r.text());
}

/// `call_with_audio.xml` with the caller1 pcap at an absolute path.
fn audio_scenario(dir: &Path) -> PathBuf {
    let text = std::fs::read_to_string(repo_path("tests/sipp/call_with_audio.xml")).unwrap();
    let pcap = repo_path("fixtures/pcap/caller1_pcmu.pcap");
    let text = text.replace(
        "../../fixtures/pcap/caller1_pcmu.pcap",
        &pcap.display().to_string(),
    );
    let path = dir.join("scenario.xml");
    std::fs::write(&path, text).unwrap();
    path
}

/// Polls `GET /v1/recordings` (admin) until `n` recordings are complete.
fn wait_complete(addr: SocketAddr, n: usize) -> Vec<Value> {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let r = get(addr, "/v1/recordings", Some(ADMIN_TOKEN));
        status(&r, 200);
        let recs = r.json()["recordings"].as_array().unwrap().clone();
        if recs.iter().filter(|r| r["state"] == "complete").count() >= n {
            return recs;
        }
        assert!(Instant::now() < deadline, "recordings: {recs:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn caller1_pcm() -> Vec<i16> {
    std::fs::read(repo_path("fixtures/audio/caller1.ulaw"))
        .unwrap()
        .iter()
        .map(|&c| g711::mu_to_linear(c))
        .collect()
}

fn audit(addr: SocketAddr, token: &str, query: &str) -> Vec<Value> {
    let r = get(addr, &format!("/v1/audit?{query}"), Some(token));
    status(&r, 200);
    r.json()["entries"].as_array().unwrap().clone()
}

/// Replaces the `name=` value in a link's query.
fn with_param(url: &str, name: &str, value: &str) -> String {
    let (path, q) = url.split_once('?').unwrap();
    let q: Vec<String> = q
        .split('&')
        .map(|kv| {
            if kv.starts_with(&format!("{name}=")) {
                format!("{name}={value}")
            } else {
                kv.to_owned()
            }
        })
        .collect();
    format!("{path}?{}", q.join("&"))
}

fn param<'a>(url: &'a str, name: &str) -> &'a str {
    url.split_once('?')
        .unwrap()
        .1
        .split('&')
        .find_map(|kv| kv.strip_prefix(&format!("{name}=")))
        .unwrap()
}

#[test]
fn privacy_tenant_isolation_on_every_endpoint_signed_links_and_audit() {
    let tmp = tempfile::tempdir().unwrap();
    let daemon = spawn();
    let addr = daemon.admin_addr();
    let sc = audio_scenario(tmp.path());
    let dn = std::thread::spawn({
        let (sc, udp) = (sc.clone(), daemon.udp_addr());
        move || sipp(&sc, udp, &["-s", DEMO_NUMBER])
    });
    sipp(&sc, daemon.udp_addr(), &["-s", GLOBEX_NUMBER]).assert_success();
    dn.join().unwrap().assert_success();
    let recs = wait_complete(addr, 2);
    let rec_of = |tenant: &str| {
        recs.iter()
            .find(|r| r["tenant"] == tenant)
            .unwrap_or_else(|| panic!("no {tenant} recording in {recs:?}"))
            .clone()
    };
    let (demo_rec, globex_rec) = (rec_of("demo"), rec_of("globex"));
    let demo_id = demo_rec["id"].as_str().unwrap();
    let globex_id = globex_rec["id"].as_str().unwrap();
    let demo_call = demo_rec["call_id"].as_str().unwrap();
    let globex_call = globex_rec["call_id"].as_str().unwrap();

    // No token, a wrong token, a malformed header: 401 with a Bearer challenge.
    for token in [None, Some("sbt_wrong"), Some(&DEMO_TOKEN[..10])] {
        let r = get(addr, "/v1/recordings", token);
        status(&r, 401);
        assert_eq!(
            r.header("www-authenticate"),
            Some("Bearer realm=\"sipbridge-admin\"")
        );
    }
    let r = keep(http::request(
        addr,
        "GET",
        "/v1/calls",
        &[("Authorization", &format!("Basic {DEMO_TOKEN}"))],
        b"",
    ));
    status(&r, 401);

    // The admin sees both tenants; each tenant sees itself only.
    let ids = |r: &Response, key: &str, field: &str| -> Vec<String> {
        let mut v: Vec<String> = r.json()[key]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x[field].as_str().unwrap().to_owned())
            .collect();
        v.sort();
        v
    };
    let mut both = vec![demo_call.to_owned(), globex_call.to_owned()];
    both.sort();
    assert_eq!(
        ids(&get(addr, "/v1/cdrs", Some(ADMIN_TOKEN)), "cdrs", "call_id"),
        both
    );
    assert_eq!(
        ids(&get(addr, "/v1/cdrs", Some(DEMO_TOKEN)), "cdrs", "call_id"),
        vec![demo_call.to_owned()]
    );
    assert_eq!(
        ids(
            &get(addr, "/v1/recordings", Some(GLOBEX_TOKEN)),
            "recordings",
            "id"
        ),
        vec![globex_id.to_owned()]
    );
    let cdr = get(addr, &format!("/v1/cdrs/{demo_call}"), Some(DEMO_TOKEN));
    status(&cdr, 200);
    let cdr = cdr.json();
    assert_eq!(
        (
            &cdr["tenant"],
            &cdr["caller"],
            &cdr["to"],
            &cdr["result_code"]
        ),
        (
            &json!("demo"),
            &json!(CALLER),
            &json!(DEMO_NUMBER),
            &json!(200)
        )
    );
    assert_eq!(cdr["recordings"], json!([demo_id]));
    // Paging: one CDR per page, the cursor leads to the second, then the end.
    let p1 = get(addr, "/v1/cdrs?limit=1", Some(ADMIN_TOKEN)).json();
    assert_eq!(p1["cdrs"].as_array().unwrap().len(), 1);
    let cursor = p1["next_cursor"].as_str().unwrap();
    let p2 = get(
        addr,
        &format!("/v1/cdrs?limit=1&cursor={cursor}"),
        Some(ADMIN_TOKEN),
    )
    .json();
    assert_ne!(p2["cdrs"][0]["call_id"], p1["cdrs"][0]["call_id"]);
    let cursor = p2["next_cursor"].as_str().unwrap();
    let p3 = get(
        addr,
        &format!("/v1/cdrs?limit=1&cursor={cursor}"),
        Some(ADMIN_TOKEN),
    )
    .json();
    assert_eq!(p3, json!({ "cdrs": [], "next_cursor": null }));

    // Tenant demo asking for globex's objects: 404, exactly as for absent ones.
    for path in [
        format!("/v1/cdrs/{globex_call}"),
        format!("/v1/recordings/{globex_id}"),
        format!("/v1/transcripts/{globex_call}"),
        "/v1/cdrs?tenant=globex".to_owned(),
        "/v1/recordings?tenant=globex".to_owned(),
        "/v1/audit?tenant=globex".to_owned(),
        "/v1/retention?tenant=globex".to_owned(),
        "/v1/calls/nonexistent".to_owned(),
    ] {
        let r = get(addr, &path, Some(DEMO_TOKEN));
        assert_eq!(
            (r.status, r.text()),
            (404, "{\"error\":\"not found\"}".into()),
            "{path}"
        );
    }
    let absent = get(
        addr,
        "/v1/recordings/00000000000000000000000000000000",
        Some(DEMO_TOKEN),
    );
    assert_eq!(
        absent.body,
        get(
            addr,
            &format!("/v1/recordings/{globex_id}"),
            Some(DEMO_TOKEN)
        )
        .body
    );
    status(
        &post(
            addr,
            &format!("/v1/recordings/{globex_id}/link"),
            Some(DEMO_TOKEN),
            &json!({}),
        ),
        404,
    );
    status(
        &post(
            addr,
            "/v1/erase",
            Some(DEMO_TOKEN),
            &json!({ "tenant": "globex", "call": globex_call, "reason": "test" }),
        ),
        404,
    );
    status(
        &post(
            addr,
            "/v1/erase",
            Some(DEMO_TOKEN),
            &json!({ "tenant": "demo", "call": globex_call, "reason": "test" }),
        ),
        404,
    );
    status(
        &post(
            addr,
            "/v1/export",
            Some(DEMO_TOKEN),
            &json!({ "tenant": "globex", "caller": CALLER }),
        ),
        404,
    );
    status(&post(addr, "/v1/reload", Some(DEMO_TOKEN), &json!({})), 403);
    // Globex's data is untouched by all that.
    assert_eq!(
        get(
            addr,
            &format!("/v1/recordings/{globex_id}"),
            Some(GLOBEX_TOKEN)
        )
        .json()["state"],
        "complete"
    );
    let t = get(
        addr,
        &format!("/v1/transcripts/{demo_call}"),
        Some(DEMO_TOKEN),
    );
    status(&t, 200);
    assert_eq!(t.json()["segments"], json!([]));

    // A valid link streams the decrypted WAV.
    let link = post(
        addr,
        &format!("/v1/recordings/{demo_id}/link"),
        Some(DEMO_TOKEN),
        &json!({}),
    );
    status(&link, 201);
    let url = link.json()["url"].as_str().unwrap().to_owned();
    assert_eq!(param(&url, "by"), "admin-api:tenant:demo");
    let wav = get(addr, &url, None);
    status(&wav, 200);
    assert_eq!(wav.header("content-type"), Some("audio/wav"));
    assert_eq!(&wav.body[..4], b"RIFF");
    assert_eq!(&wav.body[8..16], b"WAVEfmt ");
    let frames = demo_rec["duration_ms"].as_u64().unwrap() * 8;
    assert_eq!(wav.body.len() as u64, 44 + frames * 4);
    assert_eq!(
        wav.header("content-length"),
        Some(wav.body.len().to_string().as_str())
    );
    let master = std::fs::read(daemon.dir().join("var/master.key")).unwrap();
    let keyring = KeyRing::open(&daemon.dir().join("var"), &master).unwrap();
    let path = sipbridge::store::db::Store::open(&daemon.dir().join("var/sipbridge.db"))
        .unwrap()
        .get_recording(Some("demo"), demo_id)
        .unwrap()
        .unwrap()
        .path;
    assert_eq!(
        wav.body,
        sipbridge::store::recording::export_wav(&path, &keyring).unwrap()
    );
    let mut reader = hound::WavReader::new(std::io::Cursor::new(&wav.body)).unwrap();
    assert_eq!(
        (reader.spec().channels, reader.spec().sample_rate),
        (2, 8000)
    );
    let left: Vec<i16> = reader
        .samples::<i16>()
        .step_by(2)
        .map(Result::unwrap)
        .collect();
    // SIPp plays the pcap on a loaded host: matched in pieces (`pieces_found`).
    let (found, pieces) = common::audio::pieces_found(&left, &caller1_pcm());
    assert!(found >= 0.8, "left channel vs caller1: pieces {pieces:.3?}");

    // Altered links: 403, whatever part changed.
    let sig = param(&url, "sig").to_owned();
    let flipped = format!(
        "{}{}",
        if sig.starts_with('0') { "1" } else { "0" },
        &sig[1..]
    );
    let expires: u64 = param(&url, "expires").parse().unwrap();
    for bad in [
        with_param(&url, "sig", &flipped),
        with_param(&url, "expires", &(expires + 3600).to_string()),
        with_param(&url, "by", "admin-api:admin"),
        url.replace(demo_id, globex_id),
        url.split_once('?').unwrap().0.to_owned(),
    ] {
        let r = get(addr, &bad, None);
        assert_eq!(r.status, 403, "{bad}: {}", r.text());
    }
    // An expired link: 403 once its second has passed.
    let short = post(
        addr,
        &format!("/v1/recordings/{demo_id}/link"),
        Some(ADMIN_TOKEN),
        &json!({ "ttl_s": 1 }),
    );
    status(&short, 201);
    let short_url = short.json()["url"].as_str().unwrap().to_owned();
    std::thread::sleep(Duration::from_millis(2100));
    let r = get(addr, &short_url, None);
    assert_eq!(
        (r.status, r.text()),
        (403, "{\"error\":\"link expired\"}".into())
    );

    // Link issue and download are audited, by whom and for which tenant.
    let exports = audit(addr, ADMIN_TOKEN, "action=recording-export");
    assert_eq!(exports.len(), 1, "{exports:?}");
    assert_eq!(
        (
            &exports[0]["object_id"],
            &exports[0]["actor"],
            &exports[0]["tenant"]
        ),
        (
            &json!(demo_id),
            &json!("admin-api:tenant:demo"),
            &json!("demo")
        )
    );
    let links = audit(addr, ADMIN_TOKEN, "action=recording-link");
    assert_eq!(links.len(), 2, "{links:?}");
    // Globex sees none of demo's audit rows.
    assert!(
        audit(addr, GLOBEX_TOKEN, "")
            .iter()
            .all(|e| e["tenant"] == "globex")
    );

    // Export: the caller's CDR and a working link per recording; audited.
    let ex = post(
        addr,
        "/v1/export",
        Some(DEMO_TOKEN),
        &json!({ "tenant": "demo", "caller": CALLER }),
    );
    status(&ex, 200);
    let ex = ex.json();
    assert_eq!(ex["calls"].as_array().unwrap().len(), 1);
    assert_eq!(ex["calls"][0]["call_id"], demo_call);
    assert_eq!(ex["recordings"][0]["recording_id"], demo_id);
    let r = get(addr, ex["recordings"][0]["url"].as_str().unwrap(), None);
    status(&r, 200);
    assert_eq!(r.body, wav.body);
    let data_export = audit(addr, DEMO_TOKEN, "action=data-export");
    let objects: Vec<&str> = data_export
        .iter()
        .map(|e| e["object_id"].as_str().unwrap())
        .collect();
    assert_eq!(objects, vec![demo_call, "demo"]);
    assert_eq!(audit(addr, ADMIN_TOKEN, "action=recording-export").len(), 2);

    // Retention: status and dry-run, scoped.
    let ret = get(addr, "/v1/retention", Some(DEMO_TOKEN));
    status(&ret, 200);
    let ret = ret.json();
    assert_eq!(
        ret["tenants"]
            .as_object()
            .unwrap()
            .keys()
            .collect::<Vec<_>>(),
        vec!["demo"]
    );
    assert_eq!(
        ret["tenants"]["demo"]["stored"],
        json!({ "recordings": 1, "transcripts": 0, "calls": 1 })
    );
    assert_eq!(ret["tenants"]["demo"]["policy"]["recordings_days"], 90);
    let dry = get(addr, "/v1/retention/dry-run", Some(ADMIN_TOKEN));
    status(&dry, 200);
    assert_eq!(dry.json()["would_delete"], json!([]));

    // Erase demo's call: the store's semantics, audited with the API's actor.
    let er = post(
        addr,
        "/v1/erase",
        Some(DEMO_TOKEN),
        &json!({ "tenant": "demo", "call": demo_call, "reason": "caller asked" }),
    );
    status(&er, 200);
    let er = er.json();
    assert_eq!(
        (&er["calls"], &er["recordings"]),
        (&json!([demo_call]), &json!([demo_id]))
    );
    let erased = audit(addr, ADMIN_TOKEN, "action=erase-call");
    assert!(!erased.is_empty());
    assert!(
        erased
            .iter()
            .all(|e| e["actor"] == "admin-api:tenant:demo" && e["reason"] == "caller asked")
    );
    assert!(!path.exists(), "the recording file is deleted");
    assert_eq!(
        get(addr, &format!("/v1/recordings/{demo_id}"), Some(DEMO_TOKEN)).json()["state"],
        "deleted"
    );
    status(&get(addr, &url, None), 410);
    assert_eq!(
        get(addr, &format!("/v1/cdrs/{demo_call}"), Some(DEMO_TOKEN)).json()["caller"],
        Value::Null
    );

    // Reload: admin only, audited whatever the outcome.
    // A valid (unchanged) configuration is applied: the same path as SIGHUP.
    let r = post(addr, "/v1/reload", Some(ADMIN_TOKEN), &json!({}));
    status(&r, 200);
    let summary = r.json();
    assert_eq!(summary["tenants"], 2, "{summary}");
    assert!(
        summary["listeners_kept"].as_u64().unwrap() >= 2,
        "{summary}"
    );
    assert!(
        daemon
            .wait_for_log(Duration::from_secs(5), |l| l
                .contains("configuration reloaded"))
            .is_some()
    );
    std::fs::write(daemon.dir().join("profile.toml"), "[profile]\nname = 1\n").unwrap();
    let r = post(addr, "/v1/reload", Some(ADMIN_TOKEN), &json!({}));
    status(&r, 422);
    assert!(
        !r.json()["diagnostics"].as_array().unwrap().is_empty(),
        "{}",
        r.text()
    );
    let reloads = audit(addr, ADMIN_TOKEN, "action=reload");
    assert_eq!(reloads.len(), 2, "{reloads:?}");
    assert_eq!(reloads[0]["actor"], "admin-api:admin");
    assert_eq!(reloads[0]["reason"], "reloaded");
    assert!(
        reloads[1]["reason"]
            .as_str()
            .unwrap()
            .starts_with("rejected")
    );
    assert_eq!(audit(addr, ADMIN_TOKEN, "action=reload&limit=1").len(), 1);

    // No token in any response body or log line.
    let bodies = BODIES.lock().unwrap();
    let logs = daemon.logs();
    for token in [ADMIN_TOKEN, DEMO_TOKEN, GLOBEX_TOKEN] {
        for b in bodies.iter() {
            assert!(
                !String::from_utf8_lossy(b).contains(token),
                "token in a response"
            );
        }
        assert!(logs.iter().all(|l| !l.contains(token)), "token in the log");
    }
}

/// The first answered call `token` sees in `/v1/calls`, waiting up to 10 s from `started`.
fn answered_call(addr: SocketAddr, token: &str, started: Instant) -> Value {
    loop {
        let r = get(addr, "/v1/calls", Some(token));
        status(&r, 200);
        let calls = r.json()["calls"].as_array().unwrap().clone();
        if let Some(c) = calls.iter().find(|c| c["state"] == "answered") {
            return c.clone();
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "no answered call: {calls:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn hang_up_through_the_api_sends_bye() {
    let daemon = spawn();
    let addr = daemon.admin_addr();
    let udp = daemon.udp_addr();
    let started = Instant::now();
    let carrier = std::thread::spawn(move || {
        sipp(
            &sipp_scenario("bridge_bye.xml"),
            udp,
            &["-s", GLOBEX_NUMBER, "-timeout", "20s"],
        )
    });
    let call = answered_call(addr, GLOBEX_TOKEN, started);
    assert_eq!(
        (&call["tenant"], &call["to"]),
        (&json!("globex"), &json!(GLOBEX_NUMBER))
    );
    // Globex hashes caller numbers: the live call shows the stored form.
    let from = call["from"].as_str().unwrap().to_owned();
    assert!(from.starts_with("hmac-sha256:"), "{from}");
    let call_id = call["call_id"].as_str().unwrap();
    // The other tenant neither sees nor ends it.
    assert_eq!(
        get(addr, "/v1/calls", Some(DEMO_TOKEN)).json()["calls"],
        json!([])
    );
    status(
        &get(addr, &format!("/v1/calls/{call_id}"), Some(DEMO_TOKEN)),
        404,
    );
    status(
        &post(
            addr,
            &format!("/v1/calls/{call_id}/hangup"),
            Some(DEMO_TOKEN),
            &json!({}),
        ),
        404,
    );
    status(
        &get(addr, &format!("/v1/calls/{call_id}"), Some(ADMIN_TOKEN)),
        200,
    );
    let asked = Instant::now();
    let r = post(
        addr,
        &format!("/v1/calls/{call_id}/hangup"),
        Some(GLOBEX_TOKEN),
        &json!({}),
    );
    status(&r, 202);
    let result = carrier.join().unwrap();
    result.assert_success();
    assert!(result.messages.contains("BYE sip:"), "{}", result.report());
    assert!(
        asked.elapsed() < Duration::from_secs(5),
        "{:?}",
        asked.elapsed()
    );
    let cdr = daemon
        .wait_for_cdr(Duration::from_secs(5), |c| c["call_id"] == call_id)
        .unwrap();
    assert_eq!(cdr["cause"], "local-hangup");
    let hangups = audit(addr, GLOBEX_TOKEN, "action=call-hangup");
    assert_eq!(hangups.len(), 1, "{hangups:?}");
    assert_eq!(hangups[0]["object_id"], call_id);
    assert_eq!(hangups[0]["actor"], "admin-api:tenant:globex");
    assert_eq!(hangups[0]["tenant"], "globex");
    let stored = get(addr, &format!("/v1/cdrs/{call_id}"), Some(GLOBEX_TOKEN));
    assert_eq!(stored.json()["caller"].as_str(), Some(from.as_str()));
    // Ended: no longer an active call (its CDR has it).
    assert_eq!(
        get(addr, "/v1/calls", Some(ADMIN_TOKEN)).json()["calls"],
        json!([])
    );
    status(
        &get(addr, &format!("/v1/calls/{call_id}"), Some(ADMIN_TOKEN)),
        404,
    );
}

#[test]
fn admin_token_prints_a_token_and_its_hash() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_sipbridge"))
        .args(["admin-token", "--tenant", "acme"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    let mut lines = text.lines();
    let token = lines.next().unwrap().strip_prefix("token: sbt_").unwrap();
    let config = lines.next().unwrap();
    let token = format!("sbt_{token}");
    assert_eq!(
        config,
        format!(
            "admin_token_sha256 = \"{}\"  # [[tenant]] id = \"acme\"",
            sha256_hex(&token)
        )
    );
    assert_eq!(lines.next(), None);
}

/// PCI pause through the admin API: only the call's tenant (or the admin) may pause it;
/// a pause and a resume are audited and the CDR lists the stretch.
#[test]
fn privacy_pci_pause_through_the_admin_api_is_audited_and_in_the_cdr() {
    let daemon = spawn();
    let addr = daemon.admin_addr();
    let udp = daemon.udp_addr();
    let started = Instant::now();
    let carrier = std::thread::spawn(move || {
        sipp(
            &sipp_scenario("bridge_bye.xml"),
            udp,
            &["-s", GLOBEX_NUMBER, "-timeout", "20s"],
        )
    });
    let call_id = answered_call(addr, GLOBEX_TOKEN, started)["call_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let path = |what: &str| format!("/v1/calls/{call_id}/{what}");
    status(
        &post(addr, &path("pause_recording"), Some(DEMO_TOKEN), &json!({})),
        404,
    );
    let r = post(
        addr,
        &path("pause_recording"),
        Some(GLOBEX_TOKEN),
        &json!({}),
    );
    status(&r, 202);
    assert_eq!(r.json()["recording"], "paused");
    std::thread::sleep(Duration::from_millis(700));
    let r = post(
        addr,
        &path("resume_recording"),
        Some(GLOBEX_TOKEN),
        &json!({}),
    );
    status(&r, 202);
    assert_eq!(r.json()["recording"], "resumed");
    status(
        &post(addr, &path("hangup"), Some(GLOBEX_TOKEN), &json!({})),
        202,
    );
    carrier.join().unwrap().assert_success();
    let cdr = daemon
        .wait_for_cdr(Duration::from_secs(5), |c| c["call_id"] == call_id.as_str())
        .unwrap();
    let stretches = cdr["recording_paused"]
        .as_array()
        .expect("recording_paused");
    assert_eq!(stretches.len(), 1, "{cdr}");
    let ms =
        stretches[0]["resumed_at"].as_u64().unwrap() - stretches[0]["paused_at"].as_u64().unwrap();
    assert!((600..2000).contains(&ms), "paused {ms} ms");
    let rows = audit(addr, GLOBEX_TOKEN, "action=recording-pause");
    assert_eq!(rows.len(), 2, "{rows:?}");
    assert!(rows.iter().all(|r| r["object_id"] == call_id.as_str()));
    // A call that is gone: 404.
    status(
        &post(
            addr,
            &path("pause_recording"),
            Some(GLOBEX_TOKEN),
            &json!({}),
        ),
        404,
    );
}
