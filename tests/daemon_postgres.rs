//! Two daemons on one PostgreSQL store (`[profile.store] kind = "postgres"`,
//! issue 16), real processes on loopback: a server started by the test
//! (tests/common/pg.rs), two `sipbridge run` with their own var_dir and the
//! same master key, SIPp calls to each. The rows are asserted in PostgreSQL;
//! each node's CLI lists, exports and erases the other's recordings.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::pg::PgServer;
use common::{Daemon, ProfileSpec, sipp, sipp_scenario};

const MASTER: [u8; 32] = [0x37; 32];
const ADMIN_TOKEN: &str = "sbadm_Qm9yZWFsLWFkbWluLXRva2VuLTAx";

fn node_profile(var: &Path, url_file: &Path) -> String {
    std::fs::create_dir_all(var).unwrap();
    std::fs::set_permissions(var, std::fs::Permissions::from_mode(0o700)).unwrap();
    std::fs::write(var.join("master.key"), MASTER).unwrap();
    std::fs::set_permissions(
        var.join("master.key"),
        std::fs::Permissions::from_mode(0o600),
    )
    .unwrap();
    ProfileSpec {
        extra: &format!(
            "[profile.store]\nkind = \"postgres\"\nurl = \"file:{}\"\n\n\
             [profile.admin]\nlisten = \"127.0.0.1:0\"\ntoken = \"env:SB_ADMIN_TOKEN\"\n",
            url_file.display()
        ),
        ..ProfileSpec::default()
    }
    .render()
    .replace("recording = false\n", "recording = true\n")
    .replace(
        "var_dir = \"var\"",
        &format!("var_dir = \"{}\"", var.display()),
    )
}

fn sbrec_files(var: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![var.join("recordings")];
    while let Some(dir) = stack.pop() {
        for e in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if p.extension().is_some_and(|x| x == "sbrec") {
                out.push(p);
            }
        }
    }
    out
}

fn cli(config: &Path, args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_sipbridge"))
        .args(args)
        .arg("--config")
        .arg(config)
        .env("SIPBRIDGE_LOG", "warn")
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn listed(out: &str) -> Vec<String> {
    let mut ids: Vec<String> = out
        .lines()
        .skip(1)
        .filter_map(|l| l.split_whitespace().next().map(str::to_owned))
        .collect();
    ids.sort();
    ids
}

#[test]
fn two_daemons_record_into_one_postgres_and_each_sees_the_others_recordings() {
    let pg = PgServer::start();
    let url = pg.create_database("sipbridge");
    let tmp = tempfile::tempdir().unwrap();
    let url_file = tmp.path().join("pg-url");
    std::fs::write(&url_file, format!("{url}\n")).unwrap();
    let (var_a, var_b) = (tmp.path().join("var-a"), tmp.path().join("var-b"));
    let (text_a, text_b) = (
        node_profile(&var_a, &url_file),
        node_profile(&var_b, &url_file),
    );
    let (config_a, config_b) = (tmp.path().join("a.toml"), tmp.path().join("b.toml"));
    std::fs::write(&config_a, &text_a).unwrap();
    std::fs::write(&config_b, &text_b).unwrap();
    let env = [("SB_ADMIN_TOKEN", ADMIN_TOKEN)];
    let a = Daemon::spawn_with_env(&text_a, &env);
    let b = Daemon::spawn_with_env(&text_b, &env);
    for d in [&a, &b] {
        let r = sipp(
            &sipp_scenario("basic_call.xml"),
            d.udp_addr(),
            &["-s", "+15551234567", "-m", "2", "-l", "2"],
        );
        r.assert_success();
        let cdrs = d.wait_for_cdrs(2, Duration::from_secs(15));
        assert!(
            cdrs.iter().all(|c| c["recording"] == "recorded"),
            "{cdrs:?}"
        );
    }
    // Rows land in PostgreSQL once the store threads flush.
    let db = "sipbridge";
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    while pg.query_i64(
        db,
        "SELECT count(*) FROM recordings WHERE state = 'complete'",
    ) < 4
    {
        assert!(
            std::time::Instant::now() < deadline,
            "recordings not complete in PostgreSQL"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(
        pg.query_i64(
            db,
            "SELECT count(*) FROM calls WHERE recording = 'recorded' AND ended_at IS NOT NULL"
        ),
        4
    );
    // Two nodes, two calls each, each node's id from its var_dir.
    let node_a = std::fs::read_to_string(var_a.join("node-id")).unwrap();
    let node_b = std::fs::read_to_string(var_b.join("node-id")).unwrap();
    assert_ne!(node_a, node_b);
    for node in [&node_a, &node_b] {
        assert_eq!(
            pg.query_i64(
                db,
                &format!("SELECT count(*) FROM calls WHERE node = '{node}'")
            ),
            2
        );
    }
    // One data key for the tenant, in the database, used by both nodes.
    assert_eq!(pg.query_i64(db, "SELECT count(*) FROM data_keys"), 1);
    assert!(!var_a.join("keys").join("demo.key").exists());
    assert_eq!(sbrec_files(&var_a).len(), 2);
    assert_eq!(sbrec_files(&var_b).len(), 2);

    // Either node's CLI lists all four and exports the other's recording.
    let from_a = listed(&cli(&config_a, &["recordings", "list"]));
    assert_eq!(from_a.len(), 4, "{from_a:?}");
    assert_eq!(listed(&cli(&config_b, &["recordings", "list"])), from_a);
    let b_file = &sbrec_files(&var_b)[0];
    let b_id = b_file.file_stem().unwrap().to_str().unwrap().to_owned();
    let wav = tmp.path().join("b-via-a.wav");
    cli(
        &config_a,
        &[
            "recordings",
            "export",
            &b_id,
            "--out",
            wav.to_str().unwrap(),
        ],
    );
    let bytes = std::fs::read(&wav).unwrap();
    assert_eq!(&bytes[..4], b"RIFF");
    assert!(bytes.len() > 44 + 8000, "{} bytes", bytes.len());

    // The admin API of B lists A's recordings; a link B signs downloads from A.
    let a_file = &sbrec_files(&var_a)[0];
    let a_id = a_file.file_stem().unwrap().to_str().unwrap().to_owned();
    let page = common::http::get(b.admin_addr(), "/v1/recordings", Some(ADMIN_TOKEN));
    assert_eq!(page.status, 200, "{}", page.text());
    let mut api_ids: Vec<String> = page.json()["recordings"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["id"].as_str().unwrap().to_owned())
        .collect();
    api_ids.sort();
    assert_eq!(api_ids, from_a);
    let auth = format!("Bearer {ADMIN_TOKEN}");
    let link = common::http::request(
        b.admin_addr(),
        "POST",
        &format!("/v1/recordings/{a_id}/link"),
        &[
            ("Authorization", &auth),
            ("Content-Type", "application/json"),
        ],
        b"{}",
    );
    assert_eq!(link.status, 201, "{}", link.text());
    let url = link.json()["url"].as_str().unwrap().to_owned();
    for node in [&a, &b] {
        let wav = common::http::get(node.admin_addr(), &url, None);
        assert_eq!(wav.status, 200, "{}", wav.text());
        assert_eq!(&wav.body[..4], b"RIFF");
        assert!(wav.body.len() > 44 + 8000);
    }

    // Erasure on B deletes A's recordings too: rows, files.
    let out = cli(
        &config_b,
        &["erase", "--tenant", "demo", "--all", "--reason", "test"],
    );
    assert!(out.contains("4 recording(s)"), "{out}");
    assert_eq!(
        pg.query_i64(
            db,
            "SELECT count(*) FROM recordings WHERE state != 'deleted'"
        ),
        0
    );
    assert!(sbrec_files(&var_a).is_empty() && sbrec_files(&var_b).is_empty());
    drop((a, b));
}
