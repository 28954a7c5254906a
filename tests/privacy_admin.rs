#![allow(clippy::unwrap_used, clippy::expect_used)]
//! The admin API under load (issue 15): a tenant with 1,000 recordings is
//! listed page by page through `limit` and `cursor`, each page at most the
//! maximum, every recording exactly once, and another tenant's never; the
//! retention endpoints read only the token's tenant's rows; `/v1/audit` pages the same way.

mod common;

use common::http::get;
use common::{Daemon, ProfileSpec};
use sipbridge::store::db::{CallRow, CallerIdPolicy, RecordingRow, RecordingState, Store, unix_ms};
use std::collections::BTreeSet;
use std::path::PathBuf;

const ADMIN_TOKEN: &str = "sbadm_cHJpdmFjeS1hZG1pbi10b2tlbi0wMQ";

fn profile() -> String {
    let extra = "[[tenant]]\nid = \"other\"\npipeline = { kind = \"echo\" }\n";
    ProfileSpec {
        extra,
        ..ProfileSpec::default()
    }
    .render()
    .replace(
        "[profile.sip]",
        "[profile.admin]\nlisten = \"127.0.0.1:0\"\ntoken = \"env:SB_ADMIN_TOKEN\"\n\n[profile.sip]",
    )
}

/// Writes `n` complete recordings (rows only: listing reads no file) of
/// `tenant` into the database the daemon will open.
fn seed(store: &mut Store, tenant: &str, n: usize, now: i64) -> BTreeSet<String> {
    store.set_caller_policy(tenant, CallerIdPolicy::Plain);
    let mut ids = BTreeSet::new();
    for i in 0..n {
        let call_id = format!("{tenant}-call-{i}");
        // Some share a millisecond, so the cursor must order by id too.
        let at = now - 1_000_000 + (i as i64 / 3);
        store
            .insert_call(&CallRow {
                call_id: call_id.clone(),
                tenant: tenant.into(),
                trunk: "local".into(),
                from: "+15550001111".into(),
                to: "+15551230000".into(),
                started_at: at,
            })
            .unwrap();
        let id = format!("{tenant}{i:06}");
        store
            .insert_recording(&RecordingRow {
                id: id.clone(),
                call_id,
                tenant: tenant.into(),
                path: PathBuf::from(format!("/nonexistent/{id}.sbrec")),
                key_id: format!("{tenant}-k1"),
                created_at: at,
            })
            .unwrap();
        store
            .set_recording_state(&id, RecordingState::Complete, 1000, 1000)
            .unwrap();
        ids.insert(id);
    }
    ids
}

#[test]
fn privacy_admin_recordings_page_through_a_thousand() {
    let dir = tempfile::tempdir().unwrap();
    let var = dir.path().join("var");
    std::fs::create_dir(&var).unwrap();
    let now = unix_ms(std::time::SystemTime::now());
    let (demo, other) = {
        let mut store = Store::open(&var.join("sipbridge.db")).unwrap();
        (
            seed(&mut store, "demo", 1000, now),
            seed(&mut store, "other", 5, now),
        )
    };
    // The daemon's working directory holds `var/`: start it there.
    let profile = profile().replace(
        "var_dir = \"var\"",
        &format!(
            "var_dir = {}",
            toml::Value::String(var.display().to_string())
        ),
    );
    let daemon = Daemon::spawn_with_env(&profile, &[("SB_ADMIN_TOKEN", ADMIN_TOKEN)]);
    let addr = daemon.admin_addr();

    let mut seen = Vec::new();
    let mut cursor: Option<String> = None;
    let mut pages = 0;
    loop {
        let path = match &cursor {
            None => "/v1/recordings?tenant=demo&limit=300".to_owned(),
            Some(c) => format!("/v1/recordings?tenant=demo&limit=300&cursor={c}"),
        };
        let r = get(addr, &path, Some(ADMIN_TOKEN));
        assert_eq!(r.status, 200, "{}", r.text());
        let v = r.json();
        let page = v["recordings"].as_array().unwrap();
        assert!(page.len() <= 300);
        seen.extend(page.iter().map(|r| r["id"].as_str().unwrap().to_owned()));
        pages += 1;
        assert!(pages <= 10, "the pages never end");
        match v["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_owned()),
            None => break,
        }
    }
    assert_eq!(pages, 4);
    assert_eq!(seen.len(), 1000, "each recording exactly once");
    assert_eq!(seen.iter().cloned().collect::<BTreeSet<_>>(), demo);
    assert!(seen.iter().all(|id| !other.contains(id)));

    // Without a limit a page holds the default; beyond the maximum, the maximum.
    let r = get(addr, "/v1/recordings", Some(ADMIN_TOKEN)).json();
    assert_eq!(r["recordings"].as_array().unwrap().len(), 100);
    let r = get(addr, "/v1/recordings?limit=100000", Some(ADMIN_TOKEN)).json();
    assert_eq!(r["recordings"].as_array().unwrap().len(), 1000);
    assert!(r["next_cursor"].is_string());
    let bad = get(addr, "/v1/recordings?cursor=junk!", Some(ADMIN_TOKEN));
    assert_eq!(bad.status, 400);
}

#[test]
fn metrics_behind_a_bearer_token_when_configured() {
    const METRICS_TOKEN: &str = "sbm_bWV0cmljcy10b2tlbi1mb3ItdGVzdHM";
    let profile = profile().replace(
        "token = \"env:SB_ADMIN_TOKEN\"\n",
        "token = \"env:SB_ADMIN_TOKEN\"\nmetrics_token = \"env:SB_METRICS_TOKEN\"\n",
    );
    let daemon = Daemon::spawn_with_env(
        &profile,
        &[
            ("SB_ADMIN_TOKEN", ADMIN_TOKEN),
            ("SB_METRICS_TOKEN", METRICS_TOKEN),
        ],
    );
    let addr = daemon.admin_addr();
    let open = get(addr, "/metrics", None);
    assert_eq!(open.status, 401);
    assert!(!open.text().contains("sipbridge_"));
    assert_eq!(get(addr, "/metrics", Some("wrong")).status, 401);
    let ok = get(addr, "/metrics", Some(METRICS_TOKEN));
    assert_eq!(ok.status, 200);
    assert!(ok.text().contains("sipbridge_"), "{}", ok.text());
    // Health stays open.
    assert_eq!(get(addr, "/healthz", None).status, 200);
}

/// A tenant's token on `/v1/retention` and `/v1/retention/dry-run` reads its
/// own rows only: another tenant's row that cannot be read (its creation
/// time damaged in the database) does not fail the tenant's answer, while
/// the admin's, which reads every tenant, fails on it.
#[test]
fn privacy_retention_endpoints_read_only_the_token_tenants_rows() {
    use sha2::{Digest, Sha256};
    const DEMO_TOKEN: &str = "sbt_cmV0ZW50aW9uLWRlbW8tdG9rZW4tMDE";
    let dir = tempfile::tempdir().unwrap();
    let var = dir.path().join("var");
    std::fs::create_dir(&var).unwrap();
    let now = unix_ms(std::time::SystemTime::now());
    let db = var.join("sipbridge.db");
    let (demo, _other) = {
        let mut store = Store::open(&db).unwrap();
        (
            seed(&mut store, "demo", 3, now),
            seed(&mut store, "other", 2, now),
        )
    };
    let hash = hex::encode(Sha256::digest(DEMO_TOKEN.as_bytes()));
    let profile = profile()
        .replace(
            "var_dir = \"var\"",
            &format!(
                "var_dir = {}",
                toml::Value::String(var.display().to_string())
            ),
        )
        .replacen(
            "pipeline = { kind = \"echo\" }\n",
            &format!("pipeline = {{ kind = \"echo\" }}\nadmin_token_sha256 = \"{hash}\"\n"),
            1,
        );
    let daemon = Daemon::spawn_with_env(&profile, &[("SB_ADMIN_TOKEN", ADMIN_TOKEN)]);
    let addr = daemon.admin_addr();

    // Before the damage both views answer.
    let r = get(addr, "/v1/retention", Some(DEMO_TOKEN));
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(get(addr, "/v1/retention", Some(ADMIN_TOKEN)).status, 200);

    // Damage one of `other`'s recording rows (a time that is not a number).
    let conn = rusqlite::Connection::open(&db).unwrap();
    conn.busy_timeout(std::time::Duration::from_secs(5))
        .unwrap();
    let n = conn
        .execute(
            "UPDATE recordings SET created_at = 'damaged' WHERE tenant = 'other'",
            [],
        )
        .unwrap();
    assert_eq!(n, 2);

    let r = get(addr, "/v1/retention", Some(DEMO_TOKEN));
    assert_eq!(r.status, 200, "{}", r.text());
    let v = r.json();
    let tenants = v["tenants"].as_object().unwrap();
    assert_eq!(tenants.keys().collect::<Vec<_>>(), ["demo"]);
    assert_eq!(
        v["tenants"]["demo"]["stored"]["recordings"],
        demo.len() as u64
    );
    let r = get(addr, "/v1/retention/dry-run", Some(DEMO_TOKEN));
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(!r.text().contains("other"), "{}", r.text());
    // Asking for the other tenant is still not found.
    assert_eq!(
        get(addr, "/v1/retention?tenant=other", Some(DEMO_TOKEN)).status,
        404
    );
    // The admin's view reads every tenant's rows: it meets the damage.
    assert_eq!(get(addr, "/v1/retention", Some(ADMIN_TOKEN)).status, 500);
}

/// `/v1/audit` pages like the other lists: `limit` (at most 1000) and the
/// `next_cursor` of the page before; every row of the tenant exactly once,
/// and a tenant token pages through its own rows only.
#[test]
fn audit_log_pages_through_every_row_of_the_tenant() {
    use sha2::{Digest, Sha256};
    use sipbridge::store::db::{AuditAction, AuditEntry, ObjectKind};
    const DEMO_TOKEN: &str = "sbt_YXVkaXQtcGFnaW5nLWRlbW8tdG9rZW4tMQ";
    let dir = tempfile::tempdir().unwrap();
    let var = dir.path().join("var");
    std::fs::create_dir(&var).unwrap();
    let now = unix_ms(std::time::SystemTime::now());
    {
        let mut store = Store::open(&var.join("sipbridge.db")).unwrap();
        for (tenant, n) in [("demo", 1150), ("other", 7)] {
            for i in 0..n {
                store
                    .audit(&AuditEntry {
                        at: now - 1000 + i,
                        actor: "test",
                        action: AuditAction::RecordingLink,
                        object_kind: ObjectKind::Recording,
                        object_id: &format!("{tenant}-{i}"),
                        tenant,
                        reason: "seeded",
                    })
                    .unwrap();
            }
        }
    }
    let hash = hex::encode(Sha256::digest(DEMO_TOKEN.as_bytes()));
    let profile = profile()
        .replace(
            "var_dir = \"var\"",
            &format!(
                "var_dir = {}",
                toml::Value::String(var.display().to_string())
            ),
        )
        .replacen(
            "pipeline = { kind = \"echo\" }\n",
            &format!("pipeline = {{ kind = \"echo\" }}\nadmin_token_sha256 = \"{hash}\"\n"),
            1,
        );
    let daemon = Daemon::spawn_with_env(&profile, &[("SB_ADMIN_TOKEN", ADMIN_TOKEN)]);
    let addr = daemon.admin_addr();

    for (token, query) in [
        (ADMIN_TOKEN, "tenant=demo&action=recording-link&limit=400"),
        (DEMO_TOKEN, "action=recording-link&limit=400"),
    ] {
        let mut seen = Vec::new();
        let mut cursor: Option<String> = None;
        for page in 1.. {
            assert!(page <= 10, "the pages never end");
            let path = match &cursor {
                None => format!("/v1/audit?{query}"),
                Some(c) => format!("/v1/audit?{query}&cursor={c}"),
            };
            let r = get(addr, &path, Some(token));
            assert_eq!(r.status, 200, "{}", r.text());
            let v = r.json();
            let rows = v["entries"].as_array().unwrap();
            assert!(rows.len() <= 400);
            for row in rows {
                assert_eq!(row["tenant"], "demo", "{row}");
                seen.push(row["object_id"].as_str().unwrap().to_owned());
            }
            match v["next_cursor"].as_str() {
                Some(c) => cursor = Some(c.to_owned()),
                None => break,
            }
        }
        let unique: BTreeSet<_> = seen.iter().cloned().collect();
        assert_eq!(seen.len(), 1150, "each row exactly once");
        assert_eq!(unique.len(), 1150);
    }
    // Beyond the maximum, the maximum.
    let r = get(
        addr,
        "/v1/audit?tenant=demo&limit=100000",
        Some(ADMIN_TOKEN),
    )
    .json();
    assert_eq!(r["entries"].as_array().unwrap().len(), 1000);
    assert!(r["next_cursor"].is_string());
    assert_eq!(
        get(addr, "/v1/audit?cursor=x1", Some(ADMIN_TOKEN)).status,
        400
    );
}
