//! Schema migrations of the metadata database, applied in order.
//!
//! Owns the SQL that creates and evolves the tables, for SQLite
//! ([`MIGRATIONS`]) and PostgreSQL ([`PG_MIGRATIONS`]); must not hold queries
//! that read or write rows (those live in `db`). On SQLite the version is
//! `PRAGMA user_version`; on PostgreSQL the one row of `schema_version`.
//! Version `n` means the first `n` migrations of that engine's list have been
//! applied. Migrations are never edited once shipped; a change is a new entry
//! in both lists, with the same meaning, so both engines hold the same tables,
//! columns, constraints and append-only audit log at the same version.

use super::DbError;
use super::conn::{Conn, Dialect};

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
    // v6: the call's last transfer the agent asked for (issue 13): the
    // target as sent (`tel:`/`sip:` URI), blind or bridge, its result and
    // the SIP status behind it. NULL when the agent asked for none.
    r#"
    ALTER TABLE calls ADD COLUMN transferred_to TEXT;
    ALTER TABLE calls ADD COLUMN transfer_mode TEXT CHECK (transfer_mode IN ('blind', 'bridge'));
    ALTER TABLE calls ADD COLUMN transfer_result TEXT CHECK (transfer_result IN
        ('accepted', 'completed', 'failed'));
    ALTER TABLE calls ADD COLUMN transfer_reason TEXT;
    ALTER TABLE calls ADD COLUMN transfer_status INTEGER;
    "#,
    V7_DIRECTION,
    V8_TRANSFER_LEG,
];

/// v7 on both engines: who placed the call (issue 13: outbound calls
/// through the admin API).
const V7_DIRECTION: &str = r#"
    ALTER TABLE calls ADD COLUMN direction TEXT NOT NULL DEFAULT 'inbound'
        CHECK (direction IN ('inbound', 'outbound'));
    "#;

/// v8 on both engines: a bridge transfer's other leg (issue 13): in the
/// caller's row the target leg's Call-ID, in the target leg's row the
/// caller's.
const V8_TRANSFER_LEG: &str = r#"
    ALTER TABLE calls ADD COLUMN transfer_leg TEXT;
    "#;

/// PostgreSQL's migrations. v1..v5 are SQLite's v1..v5 in one step (the
/// PostgreSQL store starts at SQLite's v5): the same tables and columns, 64-bit
/// integers, `bytea` for ciphertext, and the same append-only audit log
/// (triggers refusing UPDATE, and DELETE of rows not older than
/// `audit_prune.before`). Entry `i` brings version `i` to `i + 1`.
pub const PG_MIGRATIONS: &[&str] = &[
    r#"
    CREATE TABLE calls (
        call_id                TEXT PRIMARY KEY NOT NULL,
        tenant                 TEXT NOT NULL,
        trunk                  TEXT NOT NULL,
        caller                 TEXT,
        callee                 TEXT NOT NULL,
        started_at             BIGINT NOT NULL,
        answered_at            BIGINT,
        ended_at               BIGINT,
        result_code            BIGINT,
        hangup_side            TEXT,
        cause                  TEXT,
        codec                  TEXT,
        rtp_packets            BIGINT,
        rtp_lost               BIGINT,
        rtp_jitter_ms          DOUBLE PRECISION,
        disclosure_started_at  BIGINT,
        disclosure_finished_at BIGINT,
        opt_out_at             BIGINT,
        legal_hold             BIGINT NOT NULL DEFAULT 0 CHECK (legal_hold IN (0, 1)),
        erased_at              BIGINT,
        frames_concealed       BIGINT,
        frames_dropped         BIGINT,
        recording              TEXT CHECK (recording IN
            ('off', 'not-started', 'recorded', 'partial', 'not-recorded', 'opted-out')),
        -- The daemon that took the call (its var_dir/node-id), so a daemon
        -- restarting closes only its own open CDRs, never a live call of
        -- another node. PostgreSQL only: SQLite has one daemon.
        node                   TEXT
    );
    CREATE INDEX calls_open_node ON calls (node) WHERE ended_at IS NULL;
    CREATE INDEX calls_tenant_caller ON calls (tenant, caller);
    CREATE INDEX calls_tenant_started ON calls (tenant, started_at);

    CREATE TABLE recordings (
        id          TEXT PRIMARY KEY NOT NULL,
        call_id     TEXT NOT NULL REFERENCES calls (call_id) ON DELETE CASCADE,
        tenant      TEXT NOT NULL,
        path        TEXT NOT NULL,
        size_bytes  BIGINT NOT NULL DEFAULT 0,
        duration_ms BIGINT NOT NULL DEFAULT 0,
        key_id      TEXT NOT NULL,
        state       TEXT NOT NULL CHECK (state IN ('recording', 'complete', 'partial', 'deleted')),
        created_at  BIGINT NOT NULL,
        legal_hold  BIGINT NOT NULL DEFAULT 0 CHECK (legal_hold IN (0, 1)),
        deleted_at  BIGINT
    );
    CREATE INDEX recordings_call ON recordings (call_id);
    CREATE INDEX recordings_tenant_created ON recordings (tenant, created_at);

    CREATE TABLE transcripts (
        id         TEXT PRIMARY KEY NOT NULL,
        call_id    TEXT NOT NULL REFERENCES calls (call_id) ON DELETE CASCADE,
        tenant     TEXT NOT NULL,
        speaker    TEXT NOT NULL CHECK (speaker IN ('caller', 'agent')),
        start_ms   BIGINT NOT NULL,
        end_ms     BIGINT NOT NULL,
        ciphertext BYTEA NOT NULL,
        key_id     TEXT NOT NULL,
        confidence DOUBLE PRECISION NOT NULL,
        created_at BIGINT NOT NULL
    );
    CREATE INDEX transcripts_call ON transcripts (call_id);
    CREATE INDEX transcripts_tenant_created ON transcripts (tenant, created_at);

    CREATE TABLE audit (
        id          BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        at          BIGINT NOT NULL,
        actor       TEXT NOT NULL,
        action      TEXT NOT NULL,
        object_kind TEXT NOT NULL,
        object_id   TEXT NOT NULL,
        tenant      TEXT NOT NULL,
        reason      TEXT NOT NULL
    );
    CREATE INDEX audit_tenant_at ON audit (tenant, at);

    CREATE TABLE audit_prune (before BIGINT NOT NULL);
    INSERT INTO audit_prune (before) VALUES (0);

    CREATE FUNCTION audit_no_update() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        RAISE EXCEPTION 'audit log is append-only';
    END $$;
    CREATE FUNCTION audit_no_delete() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        IF OLD.at >= (SELECT before FROM audit_prune) THEN
            RAISE EXCEPTION 'audit log is append-only';
        END IF;
        RETURN OLD;
    END $$;
    CREATE TRIGGER audit_no_update BEFORE UPDATE ON audit
        FOR EACH ROW EXECUTE FUNCTION audit_no_update();
    CREATE TRIGGER audit_no_delete BEFORE DELETE ON audit
        FOR EACH ROW EXECUTE FUNCTION audit_no_delete();
    CREATE TRIGGER audit_no_truncate BEFORE TRUNCATE ON audit
        FOR EACH STATEMENT EXECUTE FUNCTION audit_no_update();

    -- The tenants' data keys, wrapped by the master key (the 85 bytes of a
    -- SQLite store's var_dir/keys/<tenant>.key), so every daemon reads the
    -- same key and a destroyed key is gone for all of them.
    CREATE TABLE data_keys (
        tenant  TEXT PRIMARY KEY NOT NULL,
        wrapped BYTEA NOT NULL
    );
    "#,
    // v2..v5 of SQLite are in v1 above (PostgreSQL adds `calls.node`); these keep the version numbers of
    // both engines equal (a future migration is entry 5 of both lists).
    "",
    "",
    "",
    "",
    // v6: SQLite's v6 (the call's last transfer, issue 13).
    r#"
    ALTER TABLE calls ADD COLUMN transferred_to TEXT;
    ALTER TABLE calls ADD COLUMN transfer_mode TEXT CHECK (transfer_mode IN ('blind', 'bridge'));
    ALTER TABLE calls ADD COLUMN transfer_result TEXT CHECK (transfer_result IN
        ('accepted', 'completed', 'failed'));
    ALTER TABLE calls ADD COLUMN transfer_reason TEXT;
    ALTER TABLE calls ADD COLUMN transfer_status BIGINT;
    "#,
    V7_DIRECTION,
    V8_TRANSFER_LEG,
];

/// The version this build writes (the same on both engines).
pub const CURRENT_VERSION: u32 = MIGRATIONS.len() as u32;

/// The key of the PostgreSQL advisory lock held while migrating, so daemons
/// starting at once migrate one after the other ("sipbridge" in ASCII).
const PG_MIGRATION_LOCK: i64 = 0x7369_7062_7269_6467;

/// The schema version of the database behind `conn`.
pub fn version(conn: &Conn) -> Result<u32, DbError> {
    match conn.as_sqlite() {
        Some(c) => Ok(c.pragma_query_value(None, "user_version", |r| r.get::<_, u32>(0))?),
        None => {
            let exists: bool = conn
                .query_one("SELECT to_regclass('schema_version') IS NOT NULL", &[])?
                .get(0)?;
            if !exists {
                return Ok(0);
            }
            Ok(conn
                .query_opt("SELECT version FROM schema_version", &[])?
                .map(|r| r.get::<u32>(0))
                .transpose()?
                .unwrap_or(0))
        }
    }
}

/// Applies every migration past the database's version, each in its own
/// transaction together with the version bump, so a crash leaves the
/// database at a whole version (PostgreSQL's DDL is transactional too).
/// Refuses a database written by a newer build. On PostgreSQL each step holds
/// an advisory lock and re-reads the version inside it: two daemons starting
/// at once apply each migration once.
pub fn migrate(conn: &Conn) -> Result<u32, DbError> {
    let (list, dialect) = match conn.dialect() {
        Dialect::Sqlite => (MIGRATIONS, Dialect::Sqlite),
        Dialect::Postgres => (PG_MIGRATIONS, Dialect::Postgres),
    };
    debug_assert_eq!(list.len(), MIGRATIONS.len());
    loop {
        let tx = conn.begin()?;
        if dialect == Dialect::Postgres {
            tx.query_one(
                "SELECT pg_advisory_xact_lock(?1)::text",
                &super::conn::vals![PG_MIGRATION_LOCK],
            )?;
            tx.batch(
                "CREATE TABLE IF NOT EXISTS schema_version (version BIGINT NOT NULL); \
                 INSERT INTO schema_version (version) SELECT 0 \
                 WHERE NOT EXISTS (SELECT 1 FROM schema_version)",
            )?;
        }
        let found = version(&tx)?;
        if found > CURRENT_VERSION {
            return Err(DbError::SchemaTooNew {
                found,
                supported: CURRENT_VERSION,
            });
        }
        let Some(sql) = list.get(found as usize) else {
            tx.commit()?;
            return Ok(CURRENT_VERSION);
        };
        if !sql.is_empty() {
            tx.batch(sql)?;
        }
        match dialect {
            Dialect::Sqlite => tx.batch(&format!("PRAGMA user_version = {}", found + 1))?,
            Dialect::Postgres => {
                tx.execute(
                    "UPDATE schema_version SET version = ?1",
                    &super::conn::vals![found + 1],
                )?;
            }
        }
        tx.commit()?;
    }
}
