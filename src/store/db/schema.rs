//! Schema migrations of the metadata database, applied in order.
//!
//! Owns the SQL that creates and evolves the tables; must not hold queries that
//! read or write rows (those live in `db`). The version is SQLite's
//! `PRAGMA user_version`: version `n` means `MIGRATIONS[..n]` have been applied.
//! Migrations are never edited once shipped; a change is a new entry.

use rusqlite::{Connection, TransactionBehavior};

use super::DbError;

/// Migration `i` brings a database from version `i` to version `i + 1`.
pub const MIGRATIONS: &[&str] = &[
    // v1: call detail records, recordings, the append-only audit log.
    r#"
    CREATE TABLE calls (
        call_id                TEXT PRIMARY KEY NOT NULL,
        tenant                 TEXT NOT NULL,
        trunk                  TEXT NOT NULL,
        caller                 TEXT,             -- plain number or 'hmac-sha256:<hex>'; NULL once erased
        callee                 TEXT NOT NULL,
        started_at             INTEGER NOT NULL, -- unix ms
        answered_at            INTEGER,
        ended_at               INTEGER,
        result_code            INTEGER,
        hangup_side            TEXT,
        cause                  TEXT,
        codec                  TEXT,
        rtp_packets            INTEGER,
        rtp_lost               INTEGER,
        rtp_jitter_ms          REAL,
        disclosure_started_at  INTEGER,
        disclosure_finished_at INTEGER,
        opt_out_at             INTEGER,
        legal_hold             INTEGER NOT NULL DEFAULT 0 CHECK (legal_hold IN (0, 1)),
        erased_at              INTEGER
    );
    CREATE INDEX calls_tenant_caller ON calls (tenant, caller);
    CREATE INDEX calls_tenant_started ON calls (tenant, started_at);

    CREATE TABLE recordings (
        id          TEXT PRIMARY KEY NOT NULL,
        call_id     TEXT NOT NULL REFERENCES calls (call_id) ON DELETE CASCADE,
        tenant      TEXT NOT NULL,
        path        TEXT NOT NULL,
        size_bytes  INTEGER NOT NULL DEFAULT 0,
        duration_ms INTEGER NOT NULL DEFAULT 0,
        key_id      TEXT NOT NULL,
        state       TEXT NOT NULL CHECK (state IN ('recording', 'complete', 'partial', 'deleted')),
        created_at  INTEGER NOT NULL,
        legal_hold  INTEGER NOT NULL DEFAULT 0 CHECK (legal_hold IN (0, 1)),
        deleted_at  INTEGER
    );
    CREATE INDEX recordings_call ON recordings (call_id);
    CREATE INDEX recordings_tenant_created ON recordings (tenant, created_at);

    CREATE TABLE audit (
        id          INTEGER PRIMARY KEY AUTOINCREMENT,
        at          INTEGER NOT NULL,
        actor       TEXT NOT NULL,
        action      TEXT NOT NULL,
        object_kind TEXT NOT NULL,
        object_id   TEXT NOT NULL,
        tenant      TEXT NOT NULL,
        reason      TEXT NOT NULL
    );
    CREATE INDEX audit_tenant_at ON audit (tenant, at);
    CREATE TRIGGER audit_no_update BEFORE UPDATE ON audit
        BEGIN SELECT RAISE(ABORT, 'audit log is append-only'); END;
    CREATE TRIGGER audit_no_delete BEFORE DELETE ON audit
        BEGIN SELECT RAISE(ABORT, 'audit log is append-only'); END;
    "#,
    // v2: transcripts (text is ciphertext sealed with the tenant key).
    r#"
    CREATE TABLE transcripts (
        id         TEXT PRIMARY KEY NOT NULL,
        call_id    TEXT NOT NULL REFERENCES calls (call_id) ON DELETE CASCADE,
        tenant     TEXT NOT NULL,
        speaker    TEXT NOT NULL CHECK (speaker IN ('caller', 'agent')),
        start_ms   INTEGER NOT NULL,
        end_ms     INTEGER NOT NULL,
        ciphertext BLOB NOT NULL,
        key_id     TEXT NOT NULL,
        confidence REAL NOT NULL,
        created_at INTEGER NOT NULL
    );
    CREATE INDEX transcripts_call ON transcripts (call_id);
    CREATE INDEX transcripts_tenant_created ON transcripts (tenant, created_at);
    "#,
    // v3: audit rows under their own retention (issue 15). Still append-only:
    // a row can be deleted only when it is older than `audit_prune.before`,
    // which `Store::prune_audit` raises inside its own transaction and sets
    // back to 0 (no row) before committing.
    r#"
    CREATE TABLE audit_prune (before INTEGER NOT NULL);
    INSERT INTO audit_prune (before) VALUES (0);
    DROP TRIGGER audit_no_delete;
    CREATE TRIGGER audit_no_delete BEFORE DELETE ON audit
        WHEN OLD.at >= (SELECT before FROM audit_prune)
        BEGIN SELECT RAISE(ABORT, 'audit log is append-only'); END;
    "#,
    // v4: media frame counts of a call (issue 15): concealed at playout,
    // dropped on the way to the pipeline.
    r#"
    ALTER TABLE calls ADD COLUMN frames_concealed INTEGER;
    ALTER TABLE calls ADD COLUMN frames_dropped INTEGER;
    "#,
    // v5: whether the call was recorded (issue 19: a full disk must not
    // leave a call that claims a recording it does not have). NULL for
    // older rows and open calls.
    r#"
    ALTER TABLE calls ADD COLUMN recording TEXT CHECK (recording IN
        ('off', 'not-started', 'recorded', 'partial', 'not-recorded', 'opted-out'));
    "#,
    // v6: who placed the call (issue 13: outbound calls through the admin API).
    r#"
    ALTER TABLE calls ADD COLUMN direction TEXT NOT NULL DEFAULT 'inbound'
        CHECK (direction IN ('inbound', 'outbound'));
    "#,
];

/// The version this build writes.
pub const CURRENT_VERSION: u32 = MIGRATIONS.len() as u32;

/// Reads `PRAGMA user_version`.
pub fn version(conn: &Connection) -> Result<u32, DbError> {
    Ok(conn.pragma_query_value(None, "user_version", |r| r.get::<_, u32>(0))?)
}

/// Applies every migration past the database's version, each in its own
/// immediate transaction together with the version bump, so a crash leaves the
/// database at a whole version. Refuses a database written by a newer build.
pub fn migrate(conn: &mut Connection) -> Result<u32, DbError> {
    let found = version(conn)?;
    if found > CURRENT_VERSION {
        return Err(DbError::SchemaTooNew {
            found,
            supported: CURRENT_VERSION,
        });
    }
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(found as usize) {
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        tx.execute_batch(sql)?;
        tx.pragma_update(None, "user_version", (i + 1) as u32)?;
        tx.commit()?;
    }
    Ok(CURRENT_VERSION)
}
