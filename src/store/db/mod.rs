//! Call metadata in SQLite: call detail records (CDRs) with consent events,
//! recordings' index, transcripts (as ciphertext) and the append-only audit log.
//!
//! Owns the database file and every SQL statement that reads or writes rows;
//! must not touch recording files (it hands their paths to whoever deletes
//! them), keys or plaintext transcripts (`crypto` seals those; this module
//! stores the sealed bytes and the key id). Time is always passed in as unix
//! milliseconds, never read from the clock, so tests run in virtual time.
//!
//! Tenant isolation: every method that is given a tenant scopes its statements
//! with `tenant = ?`, so an id from another tenant behaves as unknown.
//!
//! Durability: WAL journal with `synchronous=NORMAL`, `foreign_keys=ON`, a
//! busy timeout; every multi-row change (erasure, retention, recovery) runs in
//! one immediate transaction together with its audit rows. NORMAL (SQLite's
//! advice for WAL) syncs at checkpoints, not at every commit: a killed or
//! crashed daemon loses nothing committed, a power loss may roll back the
//! last commits, and the database stays consistent either way. FULL synced
//! the WAL on every CDR row and made the one writer thread fall behind at
//! about 1,000 calls/s (`scripts/load.sh`), dropping records instead.
//!
//! Group commit: the daemon's writer opens a batch ([`Store::begin_batch`]),
//! runs each queued write in a savepoint of its own ([`Store::batched`]: a
//! refused write is undone alone, the others stay) and commits the batch
//! once ([`Store::commit_batch`]); a write's own transaction (with its audit
//! row) is a savepoint inside the batch, so it is still all or nothing. A
//! batch that fails to commit is rolled back whole; the writer applies its
//! writes again.

mod caller_id;
pub mod conn;
pub mod schema;

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::time::Duration;

use conn::{Conn, Dialect, FromValue, Row, ToValue, Tx, Value, vals};

pub use caller_id::CallerIdPolicy;

use super::retention::{Expiry, ItemKind, RetentionItem, RetentionStore};
pub use super::time::{UnixMs, unix_ms};

/// How long a writer waits for another connection's lock before failing.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// Cause written into CDRs that were open when the daemon died.
pub const CRASH_RECOVERED_CAUSE: &str = "crash-recovered";

/// Actor name used in audit rows written by the retention sweeper.
pub const RETENTION_ACTOR: &str = "retention";

/// Errors of the metadata store.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DbError {
    /// SQLite failed (I/O, constraint, lock timeout, corrupt file).
    #[error("sqlite: {0}")]
    Sqlite(#[from] rusqlite::Error),
    /// PostgreSQL failed (connection, constraint, serialization).
    #[error("postgres: {0}")]
    Postgres(#[from] postgres::Error),
    /// A column held a value of another type than the code reads.
    #[error("column type: {0}")]
    Type(String),
    /// Preparing the database file failed.
    #[error("database file {path}: {source}")]
    File {
        /// The database path.
        path: PathBuf,
        /// What went wrong.
        source: std::io::Error,
    },
    /// The file was written by a newer build; refusing to touch it.
    #[error("database schema version {found} is newer than this build supports ({supported})")]
    SchemaTooNew {
        /// `user_version` found in the file.
        found: u32,
        /// Highest version this build knows.
        supported: u32,
    },
    /// SQLite would not switch to write-ahead logging.
    #[error("journal mode is {0:?}, expected \"wal\"")]
    NoWal(String),
    /// No caller-id policy was configured for the tenant (refusing to guess).
    #[error("no caller-id policy for tenant {0:?}")]
    NoCallerPolicy(String),
    /// A hashed caller-id policy with an empty key.
    #[error("caller-id hashing key is empty")]
    EmptyCallerKey,
    /// No such call for that tenant.
    #[error("unknown call {call_id:?} for tenant {tenant:?}")]
    UnknownCall {
        /// Tenant asked.
        tenant: String,
        /// Call id asked.
        call_id: String,
    },
    /// `finish_call` on a call that already has an end.
    #[error("call {0:?} has already ended")]
    CallAlreadyEnded(String),
    /// No such recording (for that tenant, if one was given).
    #[error("unknown recording {0:?}")]
    UnknownRecording(String),
    /// A recording state change that the lifecycle does not allow.
    #[error("recording {id:?}: cannot go from {from:?} to {to:?}")]
    InvalidTransition {
        /// Recording id.
        id: String,
        /// Current state.
        from: RecordingState,
        /// Requested state.
        to: RecordingState,
    },
    /// A row names a call of a different tenant.
    #[error("call {call_id:?} belongs to another tenant than {tenant:?}")]
    TenantMismatch {
        /// Tenant given with the row.
        tenant: String,
        /// The call it refers to.
        call_id: String,
    },
    /// A path that is not UTF-8 cannot be stored.
    #[error("path is not UTF-8: {0:?}")]
    NonUtf8Path(PathBuf),
    /// Deleting a tenant while some of its calls are under legal hold.
    #[error("tenant {tenant:?} has {} call(s) under legal hold", held.len())]
    LegalHold {
        /// Tenant.
        tenant: String,
        /// Held call ids.
        held: Vec<String>,
    },
    /// The caller asked for something the API does not do.
    #[error("misuse: {0}")]
    Misuse(&'static str),
}

/// Defines a fieldless enum stored as fixed text, with SQL conversions.
macro_rules! text_enum {
    ($(#[$m:meta])* $name:ident { $($(#[$vm:meta])* $var:ident = $s:literal),+ $(,)? }) => {
        $(#[$m])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
        pub enum $name { $($(#[$vm])* $var),+ }

        impl $name {
            /// The stored text.
            pub fn as_str(self) -> &'static str {
                match self { $(Self::$var => $s),+ }
            }
            /// Parses the stored text.
            pub fn parse(s: &str) -> Option<Self> {
                match s { $($s => Some(Self::$var),)+ _ => None }
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl ToValue for $name {
            fn to_value(&self) -> Value {
                Value::Text(self.as_str().to_owned())
            }
        }

        impl FromValue for $name {
            fn from_value(v: &Value) -> Result<Self, DbError> {
                let s = String::from_value(v)?;
                Self::parse(&s).ok_or_else(|| {
                    DbError::Type(format!("unknown {} {s:?}", stringify!($name)))
                })
            }
        }
    };
}

text_enum! {
    /// Lifecycle of a recording file.
    RecordingState {
        /// Being written (a crash leaves it here).
        Recording = "recording",
        /// Closed normally.
        Complete = "complete",
        /// Recovered after a crash: holds audio up to the last sealed chunk.
        Partial = "partial",
        /// File removed (retention, erasure, opt-out); the row stays until the CDR goes.
        Deleted = "deleted",
    }
}

text_enum! {
    /// Whether a call was recorded (its CDR's `recording` column).
    CallRecording {
        /// The tenant does not record.
        Off = "off",
        /// The tenant records, but the call was never confirmed (rejected,
        /// cancelled, never ACKed): nothing was recorded.
        NotStarted = "not-started",
        /// Recorded in full.
        Recorded = "recorded",
        /// Recorded up to a failed write (the store ran out of space); what
        /// was sealed before is kept.
        Partial = "partial",
        /// The tenant records, but the store could not write: the call was
        /// answered without a recording.
        NotRecorded = "not-recorded",
        /// The caller opted out: what was recorded was discarded.
        OptedOut = "opted-out",
    }
}

impl CallRecording {
    /// Whether audio of the call is kept.
    pub fn recorded(self) -> bool {
        matches!(self, Self::Recorded | Self::Partial)
    }
}

text_enum! {
    /// Which side ended the call.
    StoredHangupSide {
        /// The carrier / caller sent BYE or CANCEL.
        Remote = "remote",
        /// The bridge ended it (agent hang-up, timeout, shutdown).
        Local = "local",
    }
}

text_enum! {
    /// Who spoke a transcript segment.
    Speaker {
        /// The person calling.
        Caller = "caller",
        /// The AI agent (or the prompt).
        Agent = "agent",
    }
}

text_enum! {
    /// Kind of object an audit row is about.
    #[non_exhaustive]
    ObjectKind {
        /// A call / CDR.
        Call = "call",
        /// A recording.
        Recording = "recording",
        /// A transcript segment.
        Transcript = "transcript",
        /// A whole tenant.
        Tenant = "tenant",
        /// The daemon's configuration.
        Config = "config",
    }
}

text_enum! {
    /// What an audit row records.
    #[non_exhaustive]
    AuditAction {
        /// Retention deleted an object past its tenant's days.
        RetentionDelete = "retention-delete",
        /// Erased as part of an erasure by caller number.
        EraseCaller = "erase-caller",
        /// Erased as part of an erasure by call id.
        EraseCall = "erase-call",
        /// Erased as part of deleting a tenant.
        EraseTenant = "erase-tenant",
        /// The caller opted out of recording.
        ConsentOptOut = "consent-opt-out",
        /// A recording was deleted outside retention and erasure (e.g. opt-out).
        RecordingDelete = "recording-delete",
        /// A legal hold was placed.
        LegalHoldSet = "legal-hold-set",
        /// A legal hold was released.
        LegalHoldReleased = "legal-hold-released",
        /// A CDR left open by a crash was closed at start-up.
        CrashRecovered = "crash-recovered",
        /// A recording was decrypted and exported.
        RecordingExport = "recording-export",
        /// A caller's data was exported (portability).
        DataExport = "data-export",
        /// A tenant's data key was destroyed.
        KeyDestroyed = "key-destroyed",
        /// A time-limited download link to a recording was issued.
        RecordingLink = "recording-link",
        /// A configuration reload was requested.
        Reload = "reload",
        /// A live call was hung up by an operator (admin API).
        CallHangup = "call-hangup",
        /// A live call's recording was paused or resumed by an operator (PCI).
        RecordingPause = "recording-pause",
    }
}

/// A new call, written when the INVITE is accepted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CallRow {
    /// SIP Call-ID (unique).
    pub call_id: String,
    /// Tenant the call belongs to.
    pub tenant: String,
    /// Trunk it arrived on.
    pub trunk: String,
    /// Caller number as received; stored as the tenant's [`CallerIdPolicy`] says.
    pub from: String,
    /// Called number.
    pub to: String,
    /// When the INVITE arrived.
    pub started_at: UnixMs,
}

/// RTP receive statistics of a call.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RtpStats {
    /// Packets received.
    pub packets: u64,
    /// Packets lost (by sequence gaps).
    pub lost: u64,
    /// Interarrival jitter, milliseconds (RFC 3550).
    pub jitter_ms: f64,
}

/// A call's media frame counts (`frames_concealed`, `frames_dropped`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MediaFrames {
    /// Frames concealed at playout (lost or late packets).
    pub concealed: u64,
    /// Caller frames dropped on the way to the pipeline (it was behind or away).
    pub dropped: u64,
}

/// A call's last transfer (`transferred_to` and its result).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CallTransfer {
    /// The target as sent (`tel:+1…`, `sip:…`).
    pub to: String,
    /// `blind` or `bridge`.
    pub mode: String,
    /// `accepted` (the call ended before the outcome was known),
    /// `completed` or `failed`.
    pub result: String,
    /// Why it failed (`refused`, `target-failed`, `notify-timeout`, …).
    pub reason: Option<String>,
    /// The SIP status behind the result (the REFER's response or the
    /// NOTIFY's sipfrag status).
    pub status: Option<u16>,
    /// A bridge transfer's other leg: the target leg's Call-ID in the
    /// caller's row, the caller's in the target leg's.
    pub leg_call_id: Option<String>,
}

/// How a call ended.
#[derive(Debug, Clone, PartialEq)]
pub struct CallEnd {
    /// When it was answered (200 OK), if it was.
    pub answered_at: Option<UnixMs>,
    /// When it ended.
    pub ended_at: UnixMs,
    /// Final SIP status of the INVITE (200 for answered calls).
    pub result_code: u16,
    /// Which side hung up.
    pub hangup_side: StoredHangupSide,
    /// Why (free text, e.g. "bye", "agent-hangup", "rtp-timeout").
    pub cause: String,
    /// Negotiated codec, e.g. "PCMU/8000".
    pub codec: Option<String>,
    /// Media statistics.
    pub rtp: RtpStats,
}

/// The consent events a CDR records.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConsentEvent {
    /// The disclosure prompt started playing.
    DisclosureStarted,
    /// The disclosure prompt finished.
    DisclosureFinished,
    /// The caller pressed the opt-out key (audited).
    OptOut,
}

/// Consent record of a call.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Consent {
    /// Disclosure prompt start.
    pub disclosure_started_at: Option<UnixMs>,
    /// Disclosure prompt end.
    pub disclosure_finished_at: Option<UnixMs>,
    /// Opt-out key pressed.
    pub opt_out_at: Option<UnixMs>,
}

/// A CDR as stored and read back (the call core's record of a call attempt
/// is `call::CallRecord`; [`CallRow`] and [`CallEnd`] are what is written).
#[derive(Debug, Clone, PartialEq)]
pub struct StoredCdr {
    /// SIP Call-ID.
    pub call_id: String,
    /// `inbound` (a carrier called) or `outbound` (placed through the admin API).
    pub direction: String,
    /// Tenant.
    pub tenant: String,
    /// Trunk.
    pub trunk: String,
    /// Stored caller id (plain or `hmac-sha256:<hex>`); `None` once erased.
    pub caller: Option<String>,
    /// Called number.
    pub to: String,
    /// INVITE arrival.
    pub started_at: UnixMs,
    /// Answer time.
    pub answered_at: Option<UnixMs>,
    /// End time; `None` while the call is up.
    pub ended_at: Option<UnixMs>,
    /// Final SIP status.
    pub result_code: Option<u16>,
    /// Which side hung up (`None` while up or after crash recovery).
    pub hangup_side: Option<StoredHangupSide>,
    /// End cause.
    pub cause: Option<String>,
    /// Codec.
    pub codec: Option<String>,
    /// RTP statistics, once ended normally.
    pub rtp: Option<RtpStats>,
    /// Media frame counts, once ended normally (`None` for older rows).
    pub frames: Option<MediaFrames>,
    /// Whether the call was recorded, once ended normally (`None` for
    /// older rows, open calls and calls closed by crash recovery).
    pub recording: Option<CallRecording>,
    /// Consent events.
    pub consent: Consent,
    /// The call's last transfer, if the agent asked for one.
    pub transfer: Option<CallTransfer>,
    /// Under legal hold.
    pub legal_hold: bool,
    /// When the caller's PII was erased.
    pub erased_at: Option<UnixMs>,
}

/// A new recording, written when its file is created.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordingRow {
    /// Recording id (also bound into the sealed file).
    pub id: String,
    /// Call it belongs to.
    pub call_id: String,
    /// Tenant (must be the call's).
    pub tenant: String,
    /// Encrypted file path.
    pub path: PathBuf,
    /// Id of the tenant data key that seals it.
    pub key_id: String,
    /// Creation time.
    pub created_at: UnixMs,
}

/// A recording as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordingRecord {
    /// Recording id.
    pub id: String,
    /// Call.
    pub call_id: String,
    /// Tenant.
    pub tenant: String,
    /// Encrypted file path.
    pub path: PathBuf,
    /// File size in bytes.
    pub size_bytes: u64,
    /// Audio duration.
    pub duration_ms: u64,
    /// Data key id.
    pub key_id: String,
    /// Lifecycle state.
    pub state: RecordingState,
    /// Creation time.
    pub created_at: UnixMs,
    /// Under legal hold (the recording itself; a held call also holds it).
    pub legal_hold: bool,
    /// When the file was deleted.
    pub deleted_at: Option<UnixMs>,
}

/// A transcript segment; `ciphertext` is sealed by `crypto` under `key_id`.
#[derive(Debug, Clone, PartialEq)]
pub struct TranscriptRow {
    /// Segment id (unique, e.g. `<call_id>/<seq>`).
    pub id: String,
    /// Call.
    pub call_id: String,
    /// Tenant (must be the call's).
    pub tenant: String,
    /// Who spoke.
    pub speaker: Speaker,
    /// Segment start, ms from call start.
    pub start_ms: u64,
    /// Segment end, ms from call start.
    pub end_ms: u64,
    /// Sealed text.
    pub ciphertext: Vec<u8>,
    /// Data key id.
    pub key_id: String,
    /// Recogniser confidence, 0..=1.
    pub confidence: f32,
    /// When stored.
    pub created_at: UnixMs,
}

/// An audit row to append.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AuditEntry<'a> {
    /// When.
    pub at: UnixMs,
    /// Who (operator name, `retention`, `caller`, `startup`, ...).
    pub actor: &'a str,
    /// What.
    pub action: AuditAction,
    /// Kind of object.
    pub object_kind: ObjectKind,
    /// Object id (never a caller number).
    pub object_id: &'a str,
    /// Tenant.
    pub tenant: &'a str,
    /// Why.
    pub reason: &'a str,
}

/// An audit row as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditRecord {
    /// Sequence number (strictly increasing).
    pub id: i64,
    /// When.
    pub at: UnixMs,
    /// Who.
    pub actor: String,
    /// What.
    pub action: AuditAction,
    /// Kind of object.
    pub object_kind: ObjectKind,
    /// Object id.
    pub object_id: String,
    /// Tenant.
    pub tenant: String,
    /// Why.
    pub reason: String,
}

/// Which audit rows to read; `None` fields match everything.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AuditFilter {
    /// Only this tenant.
    pub tenant: Option<String>,
    /// Only this action.
    pub action: Option<AuditAction>,
    /// Only this object id.
    pub object_id: Option<String>,
    /// Only rows at or after this time.
    pub since: Option<UnixMs>,
    /// Only rows with a larger id (paging).
    pub after_id: Option<i64>,
    /// At most this many rows.
    pub limit: Option<u32>,
}

/// Which CDRs [`Store::list_calls`] reads; `None` fields match everything.
/// Rows come ordered by (`started_at`, `call_id`), which is also the cursor.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CallFilter {
    /// Only this tenant.
    pub tenant: Option<String>,
    /// Only calls started at or after this time.
    pub since: Option<UnixMs>,
    /// Only calls started before this time.
    pub until: Option<UnixMs>,
    /// Only calls after this (`started_at`, `call_id`) in the order (paging).
    pub after: Option<(UnixMs, String)>,
    /// At most this many rows.
    pub limit: u32,
}

/// A recording whose row an erasure marked deleted: its file must go too.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ErasedRecording {
    /// Recording id.
    pub id: String,
    /// File to delete.
    pub path: PathBuf,
}

/// What an erasure did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ErasedSummary {
    /// Calls whose caller id was blanked (or, for a tenant, rows deleted).
    pub calls: Vec<String>,
    /// Transcript segments deleted.
    pub transcripts: Vec<String>,
    /// Recordings marked deleted; the caller deletes these files.
    pub recordings: Vec<ErasedRecording>,
    /// Calls left untouched because they are under legal hold.
    pub held: Vec<String>,
}

/// Which object a legal hold is placed on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HoldTarget {
    /// A call: holds its CDR, recordings and transcripts.
    Call,
    /// One recording (its call's CDR and transcripts are then kept too).
    Recording,
}

const CALL_COLUMNS: &str = "call_id, tenant, trunk, caller, callee, started_at, answered_at, \
     ended_at, result_code, hangup_side, cause, codec, rtp_packets, rtp_lost, rtp_jitter_ms, \
     disclosure_started_at, disclosure_finished_at, opt_out_at, legal_hold, erased_at, \
     frames_concealed, frames_dropped, recording, transferred_to, transfer_mode, \
     transfer_result, transfer_reason, transfer_status, direction, transfer_leg";

const RECORDING_COLUMNS: &str = "id, call_id, tenant, path, size_bytes, duration_ms, key_id, \
     state, created_at, legal_hold, deleted_at";

const TRANSCRIPT_COLUMNS: &str =
    "id, call_id, tenant, speaker, start_ms, end_ms, ciphertext, key_id, confidence, created_at";

/// SQL condition true when call `c` or one of its recordings is under legal hold.
const CALL_HELD: &str = "(c.legal_hold = 1 OR EXISTS \
     (SELECT 1 FROM recordings h WHERE h.call_id = c.call_id AND h.legal_hold = 1))";

fn call_from_row(r: &Row) -> Result<StoredCdr, DbError> {
    let packets: Option<u64> = r.get(12)?;
    let lost: Option<u64> = r.get(13)?;
    let jitter: Option<f64> = r.get(14)?;
    let rtp = match (packets, lost, jitter) {
        (Some(packets), Some(lost), Some(jitter_ms)) => Some(RtpStats {
            packets,
            lost,
            jitter_ms,
        }),
        _ => None,
    };
    Ok(StoredCdr {
        call_id: r.get(0)?,
        tenant: r.get(1)?,
        trunk: r.get(2)?,
        caller: r.get(3)?,
        to: r.get(4)?,
        started_at: r.get(5)?,
        answered_at: r.get(6)?,
        ended_at: r.get(7)?,
        result_code: r.get(8)?,
        hangup_side: r.get(9)?,
        cause: r.get(10)?,
        codec: r.get(11)?,
        rtp,
        consent: Consent {
            disclosure_started_at: r.get(15)?,
            disclosure_finished_at: r.get(16)?,
            opt_out_at: r.get(17)?,
        },
        legal_hold: r.get(18)?,
        erased_at: r.get(19)?,
        frames: match (r.get::<Option<u64>>(20)?, r.get::<Option<u64>>(21)?) {
            (Some(concealed), Some(dropped)) => Some(MediaFrames { concealed, dropped }),
            _ => None,
        },
        recording: r.get(22)?,
        transfer: match (r.get::<Option<String>>(23)?, r.get::<Option<String>>(25)?) {
            (Some(to), Some(result)) => Some(CallTransfer {
                to,
                mode: r.get::<Option<String>>(24)?.unwrap_or_default(),
                result,
                reason: r.get(26)?,
                status: r.get(27)?,
                leg_call_id: r.get(29)?,
            }),
            _ => None,
        },
        direction: r.get(28)?,
    })
}

fn recording_from_row(r: &Row) -> Result<RecordingRecord, DbError> {
    Ok(RecordingRecord {
        id: r.get(0)?,
        call_id: r.get(1)?,
        tenant: r.get(2)?,
        path: PathBuf::from(r.get::<String>(3)?),
        size_bytes: r.get(4)?,
        duration_ms: r.get(5)?,
        key_id: r.get(6)?,
        state: r.get(7)?,
        created_at: r.get(8)?,
        legal_hold: r.get(9)?,
        deleted_at: r.get(10)?,
    })
}

fn transcript_from_row(r: &Row) -> Result<TranscriptRow, DbError> {
    Ok(TranscriptRow {
        id: r.get(0)?,
        call_id: r.get(1)?,
        tenant: r.get(2)?,
        speaker: r.get(3)?,
        start_ms: r.get(4)?,
        end_ms: r.get(5)?,
        ciphertext: r.get(6)?,
        key_id: r.get(7)?,
        confidence: r.get::<f64>(8)? as f32,
        created_at: r.get(9)?,
    })
}

fn audit_from_row(r: &Row) -> Result<AuditRecord, DbError> {
    Ok(AuditRecord {
        id: r.get(0)?,
        at: r.get(1)?,
        actor: r.get(2)?,
        action: r.get(3)?,
        object_kind: r.get(4)?,
        object_id: r.get(5)?,
        tenant: r.get(6)?,
        reason: r.get(7)?,
    })
}

fn path_text(path: &Path) -> Result<&str, DbError> {
    path.to_str()
        .ok_or_else(|| DbError::NonUtf8Path(path.to_path_buf()))
}

fn insert_audit(conn: &Conn, e: &AuditEntry<'_>) -> Result<i64, DbError> {
    conn.query_one(
        "INSERT INTO audit (at, actor, action, object_kind, object_id, tenant, reason) \
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7) RETURNING id",
        &vals![
            e.at,
            e.actor,
            e.action,
            e.object_kind,
            e.object_id,
            e.tenant,
            e.reason
        ],
    )?
    .get(0)
}

/// Checks that `call_id` exists and belongs to `tenant`.
fn check_call_tenant(conn: &Conn, tenant: &str, call_id: &str) -> Result<(), DbError> {
    let owner: Option<String> = conn.query_row(
        "SELECT tenant FROM calls WHERE call_id = ?1",
        &vals![call_id],
        |r| r.get(0),
    )?;
    match owner {
        Some(t) if t == tenant => Ok(()),
        Some(_) => Err(DbError::TenantMismatch {
            tenant: tenant.to_owned(),
            call_id: call_id.to_owned(),
        }),
        None => Err(DbError::UnknownCall {
            tenant: tenant.to_owned(),
            call_id: call_id.to_owned(),
        }),
    }
}

/// Who erases what, passed down to the per-call erasure.
struct Eraser<'a> {
    tenant: &'a str,
    actor: &'a str,
    action: AuditAction,
    reason: &'a str,
    now: UnixMs,
}

impl Eraser<'_> {
    fn audit(&self, tx: &Tx<'_>, kind: ObjectKind, id: &str) -> Result<(), DbError> {
        insert_audit(
            tx,
            &AuditEntry {
                at: self.now,
                actor: self.actor,
                action: self.action,
                object_kind: kind,
                object_id: id,
                tenant: self.tenant,
                reason: self.reason,
            },
        )?;
        Ok(())
    }

    /// Erases one call's PII unless it is held: deletes its transcripts, marks
    /// its live recordings deleted, blanks the caller id.
    fn erase_call(
        &self,
        tx: &Tx<'_>,
        call_id: &str,
        out: &mut ErasedSummary,
    ) -> Result<(), DbError> {
        let held: bool = tx
            .query_row(
                &format!(
                    "SELECT {CALL_HELD} FROM calls c WHERE c.call_id = ?1 AND c.tenant = ?2{}",
                    tx.dialect().for_update()
                ),
                &vals![call_id, self.tenant],
                |r| r.get(0),
            )?
            .ok_or_else(|| DbError::UnknownCall {
                tenant: self.tenant.to_owned(),
                call_id: call_id.to_owned(),
            })?;
        if held {
            out.held.push(call_id.to_owned());
            return Ok(());
        }
        let transcripts = ids(
            tx,
            "SELECT id FROM transcripts WHERE call_id = ?1 AND tenant = ?2 ORDER BY id",
            call_id,
            self.tenant,
        )?;
        tx.execute(
            "DELETE FROM transcripts WHERE call_id = ?1 AND tenant = ?2",
            &vals![call_id, self.tenant],
        )?;
        for id in &transcripts {
            self.audit(tx, ObjectKind::Transcript, id)?;
        }
        out.transcripts.extend(transcripts);

        let recordings = tx.query_map(
            "SELECT id, path FROM recordings WHERE call_id = ?1 AND tenant = ?2 \
             AND state != 'deleted' ORDER BY id",
            &vals![call_id, self.tenant],
            |r| {
                Ok(ErasedRecording {
                    id: r.get(0)?,
                    path: PathBuf::from(r.get::<String>(1)?),
                })
            },
        )?;
        tx.execute(
            "UPDATE recordings SET state = 'deleted', deleted_at = ?3 \
             WHERE call_id = ?1 AND tenant = ?2 AND state != 'deleted'",
            &vals![call_id, self.tenant, self.now],
        )?;
        for rec in &recordings {
            self.audit(tx, ObjectKind::Recording, &rec.id)?;
        }
        out.recordings.extend(recordings);

        tx.execute(
            "UPDATE calls SET caller = NULL, erased_at = ?3 WHERE call_id = ?1 AND tenant = ?2",
            &vals![call_id, self.tenant, self.now],
        )?;
        self.audit(tx, ObjectKind::Call, call_id)?;
        out.calls.push(call_id.to_owned());
        Ok(())
    }
}

/// Runs a one-column text query with a single tenant parameter.
fn tenant_ids(conn: &Conn, sql: &str, tenant: &str) -> Result<Vec<String>, DbError> {
    conn.query_map(sql, &vals![tenant], |r| r.get(0))
}

/// Runs a one-column text query with (call_id or other key, tenant) parameters.
fn ids(conn: &Conn, sql: &str, a: &str, tenant: &str) -> Result<Vec<String>, DbError> {
    conn.query_map(sql, &vals![a, tenant], |r| r.get(0))
}

/// The metadata database. Not `Sync`: the daemon keeps it on one thread (or
/// behind a mutex); writes take `&mut self`.
#[derive(Debug)]
pub struct Store {
    conn: Conn,
    caller_policies: HashMap<String, CallerIdPolicy>,
    /// This daemon's id among several on one PostgreSQL database.
    node: Option<String>,
}

impl Store {
    /// Opens (creating if needed, mode 0600) and migrates the database at `path`.
    pub fn open(path: &Path) -> Result<Self, DbError> {
        create_private(path)?;
        let conn = rusqlite::Connection::open(path)?;
        conn.busy_timeout(BUSY_TIMEOUT)?;
        conn.pragma_update(None, "foreign_keys", true)?;
        let mode: String =
            conn.pragma_update_and_check(None, "journal_mode", "WAL", |r| r.get(0))?;
        if !mode.eq_ignore_ascii_case("wal") {
            return Err(DbError::NoWal(mode));
        }
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        // Deleted and blanked values are overwritten with zeros, not left in
        // free pages where a copy of the file would still show them (issue 15).
        conn.pragma_update(None, "secure_delete", true)?;
        let conn = Conn::sqlite(conn);
        schema::migrate(&conn)?;
        Ok(Self {
            conn,
            caller_policies: HashMap::new(),
            node: None,
        })
    }

    /// Connects to the PostgreSQL database at `url` (`postgres://user@host:port/db`
    /// or the key/value form; no TLS: a loopback or unix-socket connection, or a
    /// tunnel) and migrates it. Several daemons may do this at once: the
    /// migrations run under an advisory lock.
    pub fn open_postgres(url: &str) -> Result<Self, DbError> {
        let conn = Conn::connect_postgres(url)?;
        schema::migrate(&conn)?;
        Ok(Self {
            conn,
            caller_policies: HashMap::new(),
            node: None,
        })
    }

    /// Names this daemon among several sharing a PostgreSQL database: its
    /// new CDRs carry the id, and start-up recovery
    /// ([`Store::close_crashed_calls`], [`Store::open_recordings_of_crashed`])
    /// touches only its own rows. Without it (and always on SQLite, which
    /// one daemon owns) recovery takes every open row.
    pub fn set_node(&mut self, node: &str) {
        self.node = Some(node.to_owned());
    }

    /// `AND <column> = ?n` restricting recovery to this node's calls on
    /// PostgreSQL once a node is set; empty otherwise.
    fn node_filter(&self, column: &str, n: usize) -> String {
        match (self.conn.dialect(), &self.node) {
            (Dialect::Postgres, Some(_)) => format!(" AND {column} = ?{n}"),
            _ => String::new(),
        }
    }

    fn node_param(&self) -> Vec<Value> {
        match (self.conn.dialect(), &self.node) {
            (Dialect::Postgres, Some(n)) => vec![Value::Text(n.clone())],
            _ => Vec::new(),
        }
    }

    /// Opens the store `engine` names (`[profile.store] kind`): the SQLite
    /// file at `sqlite_path`, or the PostgreSQL database at its `url`.
    pub fn open_engine(
        engine: &crate::config::StoreEngine,
        sqlite_path: &Path,
    ) -> Result<Self, DbError> {
        match engine {
            crate::config::StoreEngine::Sqlite => Self::open(sqlite_path),
            crate::config::StoreEngine::Postgres { url } => {
                let url = std::str::from_utf8(url.expose())
                    .map_err(|_| DbError::Misuse("store url is not UTF-8"))?;
                Self::open_postgres(url.trim())
            }
        }
    }

    /// Which engine this store runs on.
    pub fn dialect(&self) -> Dialect {
        self.conn.dialect()
    }

    /// Sets how `tenant`'s caller numbers are stored and looked up.
    pub fn set_caller_policy(&mut self, tenant: &str, policy: CallerIdPolicy) {
        self.caller_policies.insert(tenant.to_owned(), policy);
    }

    fn caller_policy(&self, tenant: &str) -> Result<&CallerIdPolicy, DbError> {
        self.caller_policies
            .get(tenant)
            .ok_or_else(|| DbError::NoCallerPolicy(tenant.to_owned()))
    }

    /// Schema version of the open database.
    pub fn schema_version(&self) -> Result<u32, DbError> {
        schema::version(&self.conn)
    }

    /// Current journal mode (`"wal"`; PostgreSQL: `"postgres"`).
    pub fn journal_mode(&self) -> Result<String, DbError> {
        match self.conn.as_sqlite() {
            Some(c) => Ok(c.pragma_query_value(None, "journal_mode", |r| r.get(0))?),
            None => Ok("postgres".to_owned()),
        }
    }

    /// Whether foreign keys are enforced on this connection (always on PostgreSQL).
    pub fn foreign_keys(&self) -> Result<bool, DbError> {
        match self.conn.as_sqlite() {
            Some(c) => Ok(c.pragma_query_value(None, "foreign_keys", |r| r.get(0))?),
            None => Ok(true),
        }
    }

    fn write_tx(&mut self) -> Result<Tx<'_>, DbError> {
        self.conn.begin()
    }

    // ---- group commit ------------------------------------------------------

    /// Opens a group-commit batch: the writes until [`Store::commit_batch`]
    /// share one transaction (on SQLite: one WAL append and lock; on
    /// PostgreSQL: one WAL flush). Refused inside a transaction.
    pub fn begin_batch(&mut self) -> Result<(), DbError> {
        self.conn.begin_batch()
    }

    /// Whether a batch is open.
    pub fn in_batch(&self) -> bool {
        self.conn.in_batch()
    }

    /// Commits the open batch. On failure nothing of it stays (it is rolled
    /// back whole): the caller applies its writes again.
    pub fn commit_batch(&mut self) -> Result<(), DbError> {
        self.conn.commit_batch()
    }

    /// Rolls the open batch back, whole (no-op without one).
    pub fn rollback_batch(&mut self) {
        self.conn.rollback_batch();
    }

    /// Runs one write: inside a batch in a savepoint of its own, released
    /// when `f` succeeds and rolled back when it fails, so a refused write
    /// leaves nothing of itself and does not abort the batch (PostgreSQL
    /// aborts the whole transaction on a failed statement otherwise).
    /// Outside a batch `f` runs as it is (each method is atomic by itself).
    pub fn batched<R>(
        &mut self,
        f: impl FnOnce(&mut Store) -> Result<R, DbError>,
    ) -> Result<R, DbError> {
        if !self.conn.in_batch() {
            return f(self);
        }
        let depth = self.conn.enter_savepoint()?;
        let result = f(self);
        self.conn.leave_savepoint(depth, result.is_ok())?;
        result
    }

    /// Write transactions this store's connection committed: a batch counts
    /// once however many writes it holds; a write outside a transaction
    /// counts once.
    pub fn commits(&self) -> u64 {
        self.conn.commits()
    }

    // ---- calls -------------------------------------------------------------

    /// Writes a new CDR, storing the caller as the tenant's policy says.
    pub fn insert_call(&mut self, call: &CallRow) -> Result<(), DbError> {
        let caller = self.caller_policy(&call.tenant)?.stored_form(&call.from)?;
        let values = vals![
            call.call_id,
            call.tenant,
            call.trunk,
            caller,
            call.to,
            call.started_at,
            self.node
        ];
        match self.conn.dialect() {
            Dialect::Sqlite => self.conn.execute(
                "INSERT INTO calls (call_id, tenant, trunk, caller, callee, started_at) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                &values[..6],
            )?,
            Dialect::Postgres => self.conn.execute(
                "INSERT INTO calls (call_id, tenant, trunk, caller, callee, started_at, node) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                &values,
            )?,
        };
        Ok(())
    }

    /// Closes a CDR.
    pub fn finish_call(
        &mut self,
        tenant: &str,
        call_id: &str,
        end: &CallEnd,
    ) -> Result<(), DbError> {
        self.close_with(tenant, call_id, end, "", &[])
    }

    /// Closes a CDR with its media frame counts, whether it was recorded
    /// and its transfer, in one statement: a retried close (the disk was
    /// full) is all or nothing.
    pub fn close_call(
        &mut self,
        tenant: &str,
        call_id: &str,
        end: &CallEnd,
        frames: MediaFrames,
        recording: CallRecording,
        transfer: Option<&CallTransfer>,
    ) -> Result<(), DbError> {
        let to = transfer.map(|t| t.to.clone());
        let mode = transfer.map(|t| t.mode.clone());
        let result = transfer.map(|t| t.result.clone());
        let reason = transfer.and_then(|t| t.reason.clone());
        let status = transfer.and_then(|t| t.status);
        let leg = transfer.and_then(|t| t.leg_call_id.clone());
        self.close_with(
            tenant,
            call_id,
            end,
            ", frames_concealed = ?12, frames_dropped = ?13, recording = ?14, \
             transferred_to = ?15, transfer_mode = ?16, transfer_result = ?17, \
             transfer_reason = ?18, transfer_status = ?19, transfer_leg = ?20",
            &vals![
                frames.concealed,
                frames.dropped,
                recording,
                to,
                mode,
                result,
                reason,
                status,
                leg
            ],
        )
    }

    /// Marks a CDR as an outbound call (placed through the admin API).
    pub fn mark_outbound(&mut self, tenant: &str, call_id: &str) -> Result<(), DbError> {
        let n = self.conn.execute(
            "UPDATE calls SET direction = 'outbound' WHERE call_id = ?1 AND tenant = ?2",
            &vals![call_id, tenant],
        )?;
        if n == 0 {
            check_call_tenant(&self.conn, tenant, call_id)?;
        }
        Ok(())
    }

    /// The one statement that closes a CDR: the end's columns, then
    /// `more_columns` (assignments from `?12` on) with `more` values.
    fn close_with(
        &mut self,
        tenant: &str,
        call_id: &str,
        end: &CallEnd,
        more_columns: &str,
        more: &[Value],
    ) -> Result<(), DbError> {
        let sql = format!(
            "UPDATE calls SET answered_at = ?3, ended_at = ?4, result_code = ?5, hangup_side = ?6, \
             cause = ?7, codec = ?8, rtp_packets = ?9, rtp_lost = ?10, rtp_jitter_ms = ?11\
             {more_columns} WHERE call_id = ?1 AND tenant = ?2 AND ended_at IS NULL"
        );
        let mut values = Vec::from(vals![
            call_id,
            tenant,
            end.answered_at,
            end.ended_at,
            end.result_code,
            end.hangup_side,
            end.cause,
            end.codec,
            end.rtp.packets,
            end.rtp.lost,
            end.rtp.jitter_ms,
        ]);
        values.extend_from_slice(more);
        let n = self.conn.execute(&sql, &values)?;
        if n == 0 {
            check_call_tenant(&self.conn, tenant, call_id)?;
            return Err(DbError::CallAlreadyEnded(call_id.to_owned()));
        }
        Ok(())
    }

    /// Records a consent event on the CDR; an opt-out is also audited.
    pub fn record_consent(
        &mut self,
        tenant: &str,
        call_id: &str,
        event: ConsentEvent,
        at: UnixMs,
    ) -> Result<(), DbError> {
        let column = match event {
            ConsentEvent::DisclosureStarted => "disclosure_started_at",
            ConsentEvent::DisclosureFinished => "disclosure_finished_at",
            ConsentEvent::OptOut => "opt_out_at",
        };
        let tx = self.write_tx()?;
        let n = tx.execute(
            &format!("UPDATE calls SET {column} = ?3 WHERE call_id = ?1 AND tenant = ?2"),
            &vals![call_id, tenant, at],
        )?;
        if n == 0 {
            return Err(DbError::UnknownCall {
                tenant: tenant.to_owned(),
                call_id: call_id.to_owned(),
            });
        }
        if event == ConsentEvent::OptOut {
            insert_audit(
                &tx,
                &AuditEntry {
                    at,
                    actor: "caller",
                    action: AuditAction::ConsentOptOut,
                    object_kind: ObjectKind::Call,
                    object_id: call_id,
                    tenant,
                    reason: "caller pressed the opt-out key",
                },
            )?;
        }
        tx.commit()?;
        Ok(())
    }

    /// Places or releases a legal hold (audited).
    #[allow(clippy::too_many_arguments)]
    pub fn set_legal_hold(
        &mut self,
        tenant: &str,
        target: HoldTarget,
        id: &str,
        hold: bool,
        actor: &str,
        reason: &str,
        now: UnixMs,
    ) -> Result<(), DbError> {
        let (sql, kind) = match target {
            HoldTarget::Call => (
                "UPDATE calls SET legal_hold = ?3 WHERE call_id = ?1 AND tenant = ?2",
                ObjectKind::Call,
            ),
            HoldTarget::Recording => (
                "UPDATE recordings SET legal_hold = ?3 WHERE id = ?1 AND tenant = ?2",
                ObjectKind::Recording,
            ),
        };
        let tx = self.write_tx()?;
        if tx.execute(sql, &vals![id, tenant, hold])? == 0 {
            return Err(match target {
                HoldTarget::Call => DbError::UnknownCall {
                    tenant: tenant.to_owned(),
                    call_id: id.to_owned(),
                },
                HoldTarget::Recording => DbError::UnknownRecording(id.to_owned()),
            });
        }
        let action = if hold {
            AuditAction::LegalHoldSet
        } else {
            AuditAction::LegalHoldReleased
        };
        insert_audit(
            &tx,
            &AuditEntry {
                at: now,
                actor,
                action,
                object_kind: kind,
                object_id: id,
                tenant,
                reason,
            },
        )?;
        tx.commit()?;
        Ok(())
    }

    /// One CDR of `tenant`.
    pub fn get_call(&self, tenant: &str, call_id: &str) -> Result<Option<StoredCdr>, DbError> {
        self.conn.query_row(
            &format!("SELECT {CALL_COLUMNS} FROM calls WHERE call_id = ?1 AND tenant = ?2"),
            &vals![call_id, tenant],
            call_from_row,
        )
    }

    /// One CDR, scoped to `tenant` when given.
    pub fn call_by_id(
        &self,
        tenant: Option<&str>,
        call_id: &str,
    ) -> Result<Option<StoredCdr>, DbError> {
        self.conn.query_row(
            &format!(
                "SELECT {CALL_COLUMNS} FROM calls WHERE call_id = ?1 \
                     AND (CAST(?2 AS TEXT) IS NULL OR tenant = ?2)"
            ),
            &vals![call_id, tenant],
            call_from_row,
        )
    }

    /// CDRs matching `filter`, ordered by (`started_at`, `call_id`).
    pub fn list_calls(&self, filter: &CallFilter) -> Result<Vec<StoredCdr>, DbError> {
        let (after_at, after_id) = match &filter.after {
            Some((at, id)) => (Some(*at), Some(id.as_str())),
            None => (None, None),
        };
        self.conn.query_map(&format!(
            "SELECT {CALL_COLUMNS} FROM calls WHERE (CAST(?1 AS TEXT) IS NULL OR tenant = ?1) \
             AND (CAST(?2 AS BIGINT) IS NULL OR started_at >= ?2) AND (CAST(?3 AS BIGINT) IS NULL OR started_at < ?3) \
             AND (CAST(?4 AS BIGINT) IS NULL OR started_at > ?4 OR (started_at = ?4 AND call_id > ?5)) \
             ORDER BY started_at, call_id LIMIT ?6"
        ), &vals![
                filter.tenant,
                filter.since,
                filter.until,
                after_at,
                after_id,
                filter.limit
            ],
            call_from_row,)
    }

    /// The CDRs of `tenant` whose caller is `number` (matched through the
    /// tenant's caller-id policy, so hashed ids are found by number too).
    pub fn calls_by_caller(&self, tenant: &str, number: &str) -> Result<Vec<StoredCdr>, DbError> {
        let forms = self.caller_policy(tenant)?.lookup_forms(number)?;
        let mut out = Vec::new();
        let sql = format!(
            "SELECT {CALL_COLUMNS} FROM calls WHERE tenant = ?1 AND caller = ?2 \
             ORDER BY started_at, call_id"
        );
        for form in &forms {
            out.extend(
                self.conn
                    .query_map(&sql, &vals![tenant, form], call_from_row)?,
            );
        }
        out.sort_by(|a, b| (a.started_at, &a.call_id).cmp(&(b.started_at, &b.call_id)));
        Ok(out)
    }

    /// Closes every CDR that has no end: at start-up these are calls the
    /// previous process was handling when it died. Cause `crash-recovered`,
    /// ended at `now` (the true end is unknown), audited. Returns their ids.
    pub fn close_crashed_calls(&mut self, now: UnixMs) -> Result<Vec<String>, DbError> {
        let sql = format!(
            "SELECT call_id, tenant FROM calls WHERE ended_at IS NULL{} ORDER BY call_id{}",
            self.node_filter("node", 1),
            self.conn.dialect().for_update()
        );
        let params = self.node_param();
        let tx = self.write_tx()?;
        let open: Vec<(String, String)> =
            tx.query_map(&sql, &params, |r| Ok((r.get(0)?, r.get(1)?)))?;
        for (call_id, tenant) in &open {
            tx.execute(
                "UPDATE calls SET ended_at = ?2, cause = ?3 WHERE call_id = ?1",
                &vals![call_id, now, CRASH_RECOVERED_CAUSE],
            )?;
            insert_audit(
                &tx,
                &AuditEntry {
                    at: now,
                    actor: "startup",
                    action: AuditAction::CrashRecovered,
                    object_kind: ObjectKind::Call,
                    object_id: call_id,
                    tenant,
                    reason: "call was open when the previous process stopped",
                },
            )?;
        }
        tx.commit()?;
        Ok(open.into_iter().map(|(id, _)| id).collect())
    }

    // ---- recordings --------------------------------------------------------

    /// Indexes a new recording in state `recording`.
    pub fn insert_recording(&mut self, rec: &RecordingRow) -> Result<(), DbError> {
        let path = path_text(&rec.path)?;
        let tx = self.write_tx()?;
        check_call_tenant(&tx, &rec.tenant, &rec.call_id)?;
        tx.execute(
            "INSERT INTO recordings (id, call_id, tenant, path, key_id, state, created_at) \
             VALUES (?1, ?2, ?3, ?4, ?5, 'recording', ?6)",
            &vals![
                rec.id,
                rec.call_id,
                rec.tenant,
                path,
                rec.key_id,
                rec.created_at
            ],
        )?;
        tx.commit()?;
        Ok(())
    }

    /// Closes a recording: `state` is `Complete` (normal end) or `Partial`
    /// (recovered after a crash), with the final size and duration. Deleting
    /// goes through [`Store::delete_recording`] so it is audited.
    pub fn set_recording_state(
        &mut self,
        id: &str,
        state: RecordingState,
        size_bytes: u64,
        duration_ms: u64,
    ) -> Result<(), DbError> {
        let tx = self.write_tx()?;
        let from: RecordingState = tx
            .query_row(
                &format!(
                    "SELECT state FROM recordings WHERE id = ?1{}",
                    tx.dialect().for_update()
                ),
                &vals![id],
                |r| r.get(0),
            )?
            .ok_or_else(|| DbError::UnknownRecording(id.to_owned()))?;
        let allowed = from == RecordingState::Recording
            && matches!(state, RecordingState::Complete | RecordingState::Partial);
        if !allowed {
            return Err(DbError::InvalidTransition {
                id: id.to_owned(),
                from,
                to: state,
            });
        }
        tx.execute(
            "UPDATE recordings SET state = ?2, size_bytes = ?3, duration_ms = ?4 WHERE id = ?1",
            &vals![id, state, size_bytes, duration_ms],
        )?;
        tx.commit()?;
        Ok(())
    }

    /// Marks a recording deleted (e.g. after an opt-out) with an audit row;
    /// returns its path for the file deleter. Refused under legal hold.
    pub fn delete_recording(
        &mut self,
        tenant: &str,
        id: &str,
        actor: &str,
        reason: &str,
        now: UnixMs,
    ) -> Result<PathBuf, DbError> {
        let tx = self.write_tx()?;
        let rec = tx
            .query_row(
                &format!(
                    "SELECT {RECORDING_COLUMNS} FROM recordings WHERE id = ?1 AND tenant = ?2{}",
                    tx.dialect().for_update()
                ),
                &vals![id, tenant],
                recording_from_row,
            )?
            .ok_or_else(|| DbError::UnknownRecording(id.to_owned()))?;
        if rec.state == RecordingState::Deleted {
            return Err(DbError::InvalidTransition {
                id: id.to_owned(),
                from: rec.state,
                to: RecordingState::Deleted,
            });
        }
        let held: bool = tx
            .query_one(
                &format!("SELECT {CALL_HELD} FROM calls c WHERE c.call_id = ?1"),
                &vals![rec.call_id],
            )?
            .get(0)?;
        if held {
            return Err(DbError::LegalHold {
                tenant: tenant.to_owned(),
                held: vec![rec.call_id],
            });
        }
        tx.execute(
            "UPDATE recordings SET state = 'deleted', deleted_at = ?2 WHERE id = ?1",
            &vals![id, now],
        )?;
        insert_audit(
            &tx,
            &AuditEntry {
                at: now,
                actor,
                action: AuditAction::RecordingDelete,
                object_kind: ObjectKind::Recording,
                object_id: id,
                tenant,
                reason,
            },
        )?;
        tx.commit()?;
        Ok(rec.path)
    }

    /// One recording, scoped to `tenant` when given.
    pub fn get_recording(
        &self,
        tenant: Option<&str>,
        id: &str,
    ) -> Result<Option<RecordingRecord>, DbError> {
        self.conn.query_row(
            &format!(
                "SELECT {RECORDING_COLUMNS} FROM recordings \
                     WHERE id = ?1 AND (CAST(?2 AS TEXT) IS NULL OR tenant = ?2)"
            ),
            &vals![id, tenant],
            recording_from_row,
        )
    }

    /// Recordings that still have a file (not `deleted`), oldest first,
    /// optionally of one tenant and created at or after `since`.
    pub fn list_recordings(
        &self,
        tenant: Option<&str>,
        since: Option<UnixMs>,
    ) -> Result<Vec<RecordingRecord>, DbError> {
        self.conn.query_map(
            &format!(
                "SELECT {RECORDING_COLUMNS} FROM recordings WHERE state != 'deleted' \
                 AND (CAST(?1 AS TEXT) IS NULL OR tenant = ?1) AND (CAST(?2 AS BIGINT) IS NULL OR created_at >= ?2) \
                 ORDER BY created_at, id"
            ),
            &vals![tenant, since],
            recording_from_row,
        )
    }

    /// One page of [`Store::list_recordings`]: at most `limit` recordings
    /// after `after` (`(created_at, id)` of the last one of the page before).
    pub fn list_recordings_page(
        &self,
        tenant: Option<&str>,
        since: Option<UnixMs>,
        after: Option<(UnixMs, &str)>,
        limit: u32,
    ) -> Result<Vec<RecordingRecord>, DbError> {
        let (after_at, after_id) = after.unzip();
        self.conn.query_map(&format!(
            "SELECT {RECORDING_COLUMNS} FROM recordings WHERE state != 'deleted' \
             AND (CAST(?1 AS TEXT) IS NULL OR tenant = ?1) AND (CAST(?2 AS BIGINT) IS NULL OR created_at >= ?2) \
             AND (CAST(?3 AS BIGINT) IS NULL OR created_at > ?3 OR (created_at = ?3 AND id > ?4)) \
             ORDER BY created_at, id LIMIT ?5"
        ), &vals![tenant, since, after_at, after_id, limit],
            recording_from_row,)
    }

    /// All recordings of one call of `tenant` (any state).
    pub fn recordings_of_call(
        &self,
        tenant: &str,
        call_id: &str,
    ) -> Result<Vec<RecordingRecord>, DbError> {
        self.conn.query_map(
            &format!(
                "SELECT {RECORDING_COLUMNS} FROM recordings WHERE call_id = ?1 AND tenant = ?2 \
             ORDER BY created_at, id"
            ),
            &vals![call_id, tenant],
            recording_from_row,
        )
    }

    /// Recordings still in state `recording`: at start-up, files the previous
    /// process was writing when it died, to verify and mark `partial`.
    pub fn open_recordings_of_crashed(&self) -> Result<Vec<RecordingRecord>, DbError> {
        let node = self.node_filter("c.node", 1);
        let of_node = if node.is_empty() {
            String::new()
        } else {
            format!(
                " AND EXISTS (SELECT 1 FROM calls c WHERE c.call_id = recordings.call_id{node})"
            )
        };
        self.conn.query_map(
            &format!(
                "SELECT {RECORDING_COLUMNS} FROM recordings WHERE state = 'recording'{of_node} \
                 ORDER BY created_at, id"
            ),
            &self.node_param(),
            recording_from_row,
        )
    }

    // ---- transcripts -------------------------------------------------------

    /// Stores a sealed transcript segment.
    pub fn insert_transcript(&mut self, t: &TranscriptRow) -> Result<(), DbError> {
        let tx = self.write_tx()?;
        check_call_tenant(&tx, &t.tenant, &t.call_id)?;
        tx.execute(
            &format!(
                "INSERT INTO transcripts ({TRANSCRIPT_COLUMNS}) \
                      VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)"
            ),
            &vals![
                t.id,
                t.call_id,
                t.tenant,
                t.speaker,
                t.start_ms,
                t.end_ms,
                t.ciphertext,
                t.key_id,
                f64::from(t.confidence),
                t.created_at
            ],
        )?;
        tx.commit()?;
        Ok(())
    }

    /// Transcript segments of one call of `tenant`, in speaking order.
    pub fn transcripts_of_call(
        &self,
        tenant: &str,
        call_id: &str,
    ) -> Result<Vec<TranscriptRow>, DbError> {
        self.conn.query_map(
            &format!(
                "SELECT {TRANSCRIPT_COLUMNS} FROM transcripts WHERE call_id = ?1 AND tenant = ?2 \
             ORDER BY start_ms, id"
            ),
            &vals![call_id, tenant],
            transcript_from_row,
        )
    }

    // ---- erasure -----------------------------------------------------------

    /// Stores a call's media frame counts (with its end).
    pub fn set_call_frames(
        &mut self,
        tenant: &str,
        call_id: &str,
        frames: MediaFrames,
    ) -> Result<(), DbError> {
        self.conn.execute(
            "UPDATE calls SET frames_concealed = ?1, frames_dropped = ?2 \
             WHERE call_id = ?3 AND tenant = ?4",
            &vals![frames.concealed, frames.dropped, call_id, tenant],
        )?;
        Ok(())
    }

    /// Ids of every recording the index knows that is not deleted (a
    /// recording's file is named `<id>.sbrec`): at start-up, a file whose
    /// name is not among them is an orphan.
    pub fn live_recording_ids(&self) -> Result<std::collections::HashSet<String>, DbError> {
        Ok(self
            .conn
            .query_map(
                "SELECT id FROM recordings WHERE state != 'deleted'",
                &[],
                |r| r.get::<String>(0),
            )?
            .into_iter()
            .collect())
    }

    /// Deletes the audit rows of `tenant` older than `before` (unix ms):
    /// audit retention (`audit_days`). Returns how many went. The only way
    /// audit rows are ever deleted (a trigger refuses any other DELETE).
    pub fn prune_audit(&mut self, tenant: &str, before: UnixMs) -> Result<usize, DbError> {
        let tx = self.write_tx()?;
        tx.execute("UPDATE audit_prune SET before = ?1", &vals![before])?;
        let n = tx.execute(
            "DELETE FROM audit WHERE tenant = ?1 AND at < ?2",
            &vals![tenant, before],
        )?;
        tx.execute("UPDATE audit_prune SET before = 0", &[])?;
        tx.commit()?;
        Ok(n)
    }

    /// Tenants that have audit rows.
    pub fn audit_tenants(&self) -> Result<Vec<String>, DbError> {
        self.conn.query_map(
            "SELECT DISTINCT tenant FROM audit ORDER BY tenant",
            &[],
            |r| r.get(0),
        )
    }

    /// Copies the WAL into the database file and truncates it, so the old
    /// page images an erasure replaced are gone from the WAL too. Best effort:
    /// while another connection reads, the WAL stays until its next checkpoint.
    pub fn checkpoint(&self) -> Result<(), DbError> {
        // PostgreSQL has no file of ours to truncate: VACUUM is its business.
        if let Some(c) = self.conn.as_sqlite() {
            c.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))?;
        }
        Ok(())
    }

    /// Erases everything about caller `number` in `tenant` only: deletes their
    /// transcripts, marks their recordings deleted (paths returned for the file
    /// deleter), blanks the caller id in their CDRs. One transaction; every
    /// object audited (the audit names call/recording/transcript ids, never the
    /// number). Calls under legal hold are left and listed in `held`.
    pub fn erase_caller(
        &mut self,
        tenant: &str,
        number: &str,
        actor: &str,
        reason: &str,
        now: UnixMs,
    ) -> Result<ErasedSummary, DbError> {
        let forms = self.caller_policy(tenant)?.lookup_forms(number)?;
        let eraser = Eraser {
            tenant,
            actor,
            action: AuditAction::EraseCaller,
            reason,
            now,
        };
        let tx = self.write_tx()?;
        // Selected inside the write transaction, so a call inserted meanwhile
        // by another connection cannot slip between selection and erasure.
        let mut calls: BTreeSet<(UnixMs, String)> = BTreeSet::new();
        let sql = format!(
            "SELECT started_at, call_id FROM calls WHERE caller = ?1 AND tenant = ?2{}",
            tx.dialect().for_update()
        );
        for form in &forms {
            calls.extend(tx.query_map(&sql, &vals![form, tenant], |r| Ok((r.get(0)?, r.get(1)?)))?);
        }
        let call_ids: Vec<String> = calls.into_iter().map(|(_, id)| id).collect();
        let mut out = ErasedSummary::default();
        for call_id in &call_ids {
            eraser.erase_call(&tx, call_id, &mut out)?;
        }
        tx.commit()?;
        Ok(out)
    }

    /// Erases one call of `tenant` (as [`Store::erase_caller`] does per call).
    pub fn erase_call(
        &mut self,
        tenant: &str,
        call_id: &str,
        actor: &str,
        reason: &str,
        now: UnixMs,
    ) -> Result<ErasedSummary, DbError> {
        let eraser = Eraser {
            tenant,
            actor,
            action: AuditAction::EraseCall,
            reason,
            now,
        };
        let tx = self.write_tx()?;
        check_call_tenant(&tx, tenant, call_id)?;
        let mut out = ErasedSummary::default();
        eraser.erase_call(&tx, call_id, &mut out)?;
        tx.commit()?;
        Ok(out)
    }

    /// Deletes every row of `tenant` (CDRs, recordings, transcripts; audit rows
    /// stay), auditing each object and the tenant. Returns every recording path
    /// ever indexed for it so leftovers are removed too. Refused while any of
    /// its calls is under legal hold. The caller destroys the tenant's data key
    /// before calling this (crypto-shredding).
    pub fn erase_tenant(
        &mut self,
        tenant: &str,
        actor: &str,
        reason: &str,
        now: UnixMs,
    ) -> Result<ErasedSummary, DbError> {
        let eraser = Eraser {
            tenant,
            actor,
            action: AuditAction::EraseTenant,
            reason,
            now,
        };
        let tx = self.write_tx()?;
        if tx.dialect() == Dialect::Postgres {
            // What SQLite's immediate transaction gives: no other daemon
            // writes these tables until the tenant is gone, so every row
            // deleted below was listed and audited.
            tx.batch("LOCK TABLE calls, recordings, transcripts IN SHARE ROW EXCLUSIVE MODE")?;
        }
        let held = tenant_ids(
            &tx,
            &format!(
                "SELECT c.call_id FROM calls c WHERE c.tenant = ?1 AND {CALL_HELD} \
                 ORDER BY c.call_id"
            ),
            tenant,
        )?;
        if !held.is_empty() {
            return Err(DbError::LegalHold {
                tenant: tenant.to_owned(),
                held,
            });
        }
        let out = ErasedSummary {
            recordings: tx.query_map(
                "SELECT id, path FROM recordings WHERE tenant = ?1 ORDER BY id",
                &vals![tenant],
                |r| {
                    Ok(ErasedRecording {
                        id: r.get(0)?,
                        path: PathBuf::from(r.get::<String>(1)?),
                    })
                },
            )?,
            transcripts: tenant_ids(
                &tx,
                "SELECT id FROM transcripts WHERE tenant = ?1 ORDER BY id",
                tenant,
            )?,
            calls: tenant_ids(
                &tx,
                "SELECT call_id FROM calls WHERE tenant = ?1 ORDER BY call_id",
                tenant,
            )?,
            ..ErasedSummary::default()
        };
        tx.execute("DELETE FROM transcripts WHERE tenant = ?1", &vals![tenant])?;
        tx.execute("DELETE FROM recordings WHERE tenant = ?1", &vals![tenant])?;
        tx.execute("DELETE FROM calls WHERE tenant = ?1", &vals![tenant])?;
        for rec in &out.recordings {
            eraser.audit(&tx, ObjectKind::Recording, &rec.id)?;
        }
        for id in &out.transcripts {
            eraser.audit(&tx, ObjectKind::Transcript, id)?;
        }
        for id in &out.calls {
            eraser.audit(&tx, ObjectKind::Call, id)?;
        }
        eraser.audit(&tx, ObjectKind::Tenant, tenant)?;
        tx.commit()?;
        Ok(out)
    }

    // ---- audit -------------------------------------------------------------

    /// Appends an audit row; returns its id.
    pub fn audit(&mut self, entry: &AuditEntry<'_>) -> Result<i64, DbError> {
        insert_audit(&self.conn, entry)
    }

    /// Audit rows matching `filter`, oldest first.
    pub fn audit_log(&self, filter: &AuditFilter) -> Result<Vec<AuditRecord>, DbError> {
        // No limit is i64::MAX: SQLite reads -1 as "none", PostgreSQL refuses it.
        let limit = filter.limit.map_or(i64::MAX, i64::from);
        self.conn.query_map(
            "SELECT id, at, actor, action, object_kind, object_id, tenant, reason FROM audit \
             WHERE (CAST(?1 AS TEXT) IS NULL OR tenant = ?1) AND (CAST(?2 AS TEXT) IS NULL OR action = ?2) \
             AND (CAST(?3 AS TEXT) IS NULL OR object_id = ?3) AND (CAST(?4 AS BIGINT) IS NULL OR at >= ?4) \
             AND (CAST(?5 AS BIGINT) IS NULL OR id > ?5) ORDER BY id LIMIT ?6",
            &vals![
                filter.tenant,
                filter.action,
                filter.object_id,
                filter.since,
                filter.after_id,
                limit
            ],
            audit_from_row,)
    }

    // ---- retention ---------------------------------------------------------

    /// Everything retention may delete: recordings that have a finished file
    /// (`complete`/`partial`), transcripts, and ended CDRs. A call counts as
    /// held if it or any of its recordings is; its recordings and transcripts
    /// inherit the call's hold.
    pub fn retention_items(&self) -> Result<Vec<RetentionItem>, DbError> {
        self.retention_items_of(None)
    }

    /// [`Store::retention_items`] of one tenant (`None`: every tenant); the
    /// other tenants' rows are not read.
    pub fn retention_items_of(&self, tenant: Option<&str>) -> Result<Vec<RetentionItem>, DbError> {
        let queries = [
            (
                ItemKind::Recording,
                "SELECT r.id, r.tenant, r.created_at, (r.legal_hold = 1 OR c.legal_hold = 1) \
                 FROM recordings r JOIN calls c ON c.call_id = r.call_id \
                 WHERE r.state IN ('complete', 'partial') AND (CAST(?1 AS TEXT) IS NULL OR r.tenant = ?1) \
                 ORDER BY r.created_at, r.id"
                    .to_owned(),
            ),
            (
                ItemKind::Transcript,
                format!(
                    "SELECT t.id, t.tenant, t.created_at, {CALL_HELD} \
                     FROM transcripts t JOIN calls c ON c.call_id = t.call_id \
                     WHERE (CAST(?1 AS TEXT) IS NULL OR t.tenant = ?1) \
                     ORDER BY t.created_at, t.id"
                ),
            ),
            (
                ItemKind::Call,
                format!(
                    "SELECT c.call_id, c.tenant, c.started_at, {CALL_HELD} FROM calls c \
                     WHERE c.ended_at IS NOT NULL AND (CAST(?1 AS TEXT) IS NULL OR c.tenant = ?1) \
                     ORDER BY c.started_at, c.call_id"
                ),
            ),
        ];
        let mut out = Vec::new();
        for (kind, sql) in &queries {
            out.extend(self.conn.query_map(sql, &vals![tenant], |r| {
                Ok(RetentionItem {
                    kind: *kind,
                    id: r.get(0)?,
                    tenant: r.get(1)?,
                    created_at: r.get(2)?,
                    legal_hold: r.get(3)?,
                })
            })?);
        }
        Ok(out)
    }

    /// Applies one retention decision to the rows, audited with its reason, in
    /// one transaction. The sweeper deletes files first (a recording's file,
    /// and for a call every live recording file of it). A recording is marked
    /// `deleted`; a transcript row is removed; a call is removed with all its
    /// recordings and transcripts (each audited). Re-checks the legal hold.
    /// Returns `false` if the object was already gone or is now held.
    pub fn delete_expired(&mut self, expiry: &Expiry, now: UnixMs) -> Result<bool, DbError> {
        let item = &expiry.item;
        let reason = expiry.reason.to_string();
        let tx = self.write_tx()?;
        let audit = |tx: &Tx<'_>, kind: ObjectKind, id: &str| {
            insert_audit(
                tx,
                &AuditEntry {
                    at: now,
                    actor: RETENTION_ACTOR,
                    action: AuditAction::RetentionDelete,
                    object_kind: kind,
                    object_id: id,
                    tenant: &item.tenant,
                    reason: &reason,
                },
            )
        };
        let done = match item.kind {
            ItemKind::Recording => {
                let n = tx.execute(
                    "UPDATE recordings SET state = 'deleted', deleted_at = ?3 \
                     WHERE id = ?1 AND tenant = ?2 AND state IN ('complete', 'partial') \
                     AND legal_hold = 0 AND NOT EXISTS (SELECT 1 FROM calls c \
                     WHERE c.call_id = recordings.call_id AND c.legal_hold = 1)",
                    &vals![item.id, item.tenant, now],
                )?;
                if n == 1 {
                    audit(&tx, ObjectKind::Recording, &item.id)?;
                }
                n == 1
            }
            ItemKind::Transcript => {
                let n = tx.execute(
                    &format!(
                        "DELETE FROM transcripts WHERE id = ?1 AND tenant = ?2 AND NOT EXISTS \
                         (SELECT 1 FROM calls c WHERE c.call_id = transcripts.call_id \
                         AND {CALL_HELD})"
                    ),
                    &vals![item.id, item.tenant],
                )?;
                if n == 1 {
                    audit(&tx, ObjectKind::Transcript, &item.id)?;
                }
                n == 1
            }
            ItemKind::Call => {
                // Locked on PostgreSQL: a second daemon sweeping the same
                // call waits here, then finds it gone.
                let held: Option<bool> = tx.query_row(
                    &format!(
                        "SELECT {CALL_HELD} FROM calls c WHERE c.call_id = ?1 AND c.tenant = ?2{}",
                        tx.dialect().for_update()
                    ),
                    &vals![item.id, item.tenant],
                    |r| r.get(0),
                )?;
                if held == Some(false) {
                    let recordings = ids(
                        &tx,
                        "SELECT id FROM recordings WHERE call_id = ?1 AND tenant = ?2 ORDER BY id",
                        &item.id,
                        &item.tenant,
                    )?;
                    let transcripts = ids(
                        &tx,
                        "SELECT id FROM transcripts WHERE call_id = ?1 AND tenant = ?2 ORDER BY id",
                        &item.id,
                        &item.tenant,
                    )?;
                    let n = tx.execute(
                        "DELETE FROM calls WHERE call_id = ?1 AND tenant = ?2",
                        &vals![item.id, item.tenant],
                    )?;
                    if n == 0 {
                        return Ok(false);
                    }
                    for id in &recordings {
                        audit(&tx, ObjectKind::Recording, id)?;
                    }
                    for id in &transcripts {
                        audit(&tx, ObjectKind::Transcript, id)?;
                    }
                    audit(&tx, ObjectKind::Call, &item.id)?;
                    true
                } else {
                    false
                }
            }
        };
        tx.commit()?;
        Ok(done)
    }
}

/// The retention sweeper's view of the store: the inherent methods above,
/// and the files behind an item.
impl RetentionStore for Store {
    type Error = DbError;

    fn retention_items(&self) -> Result<Vec<RetentionItem>, DbError> {
        Store::retention_items(self)
    }

    fn files_of(&self, item: &RetentionItem) -> Result<Vec<PathBuf>, DbError> {
        Ok(match item.kind {
            ItemKind::Transcript => Vec::new(),
            ItemKind::Recording => self
                .get_recording(Some(&item.tenant), &item.id)?
                .filter(|r| matches!(r.state, RecordingState::Complete | RecordingState::Partial))
                .map(|r| r.path)
                .into_iter()
                .collect(),
            ItemKind::Call => self
                .recordings_of_call(&item.tenant, &item.id)?
                .into_iter()
                .map(|r| r.path)
                .collect(),
        })
    }

    fn delete_expired(&mut self, expiry: &Expiry, now: UnixMs) -> Result<bool, DbError> {
        Store::delete_expired(self, expiry, now)
    }

    fn audit_tenants(&self) -> Result<Vec<String>, DbError> {
        Store::audit_tenants(self)
    }

    fn prune_audit(&mut self, tenant: &str, before: UnixMs) -> Result<usize, DbError> {
        Store::prune_audit(self, tenant, before)
    }
}

/// Creates the database file with mode 0600 if it does not exist, so the WAL
/// and shared-memory files SQLite derives from it are private too.
fn create_private(path: &Path) -> Result<(), DbError> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(path)
        .map(drop)
        .map_err(|source| DbError::File {
            path: path.to_path_buf(),
            source,
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store_with_calls() -> (tempfile::TempDir, Store) {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Store::open(&dir.path().join("db.sqlite")).unwrap();
        for t in ["acme", "globex"] {
            s.set_caller_policy(t, CallerIdPolicy::Plain);
        }
        // Two calls share a start time: the call id orders them.
        for (id, tenant, at) in [
            ("c1", "acme", 1_000),
            ("c3", "acme", 2_000),
            ("c2", "acme", 2_000),
            ("g1", "globex", 1_500),
            ("c4", "acme", 3_000),
        ] {
            s.insert_call(&CallRow {
                call_id: id.into(),
                tenant: tenant.into(),
                trunk: "t".into(),
                from: "+1555".into(),
                to: "+1666".into(),
                started_at: at,
            })
            .unwrap();
        }
        (dir, s)
    }

    fn ids(calls: &[StoredCdr]) -> Vec<&str> {
        calls.iter().map(|c| c.call_id.as_str()).collect()
    }

    #[test]
    fn list_calls_filters_and_pages_in_start_order() {
        let (_dir, s) = store_with_calls();
        let all = CallFilter {
            limit: 100,
            ..CallFilter::default()
        };
        assert_eq!(
            ids(&s.list_calls(&all).unwrap()),
            ["c1", "g1", "c2", "c3", "c4"]
        );
        let acme = CallFilter {
            tenant: Some("acme".into()),
            since: Some(1_500),
            until: Some(3_000),
            limit: 100,
            ..CallFilter::default()
        };
        assert_eq!(ids(&s.list_calls(&acme).unwrap()), ["c2", "c3"]);
        let mut page = CallFilter {
            limit: 2,
            ..CallFilter::default()
        };
        let mut seen = Vec::new();
        loop {
            let calls = s.list_calls(&page).unwrap();
            seen.extend(ids(&calls).into_iter().map(str::to_owned));
            match calls.last() {
                Some(c) if calls.len() == 2 => page.after = Some((c.started_at, c.call_id.clone())),
                _ => break,
            }
        }
        assert_eq!(seen, ["c1", "g1", "c2", "c3", "c4"]);
        assert_eq!(s.call_by_id(Some("globex"), "c1").unwrap(), None);
        assert_eq!(
            s.call_by_id(None, "c1").unwrap().map(|c| c.tenant),
            Some("acme".to_owned())
        );
    }

    #[test]
    fn audit_log_pages_by_id() {
        let (_dir, mut s) = store_with_calls();
        for (i, tenant) in ["acme", "globex", "acme", "acme"].iter().enumerate() {
            s.audit(&AuditEntry {
                at: i as i64,
                actor: "test",
                action: AuditAction::Reload,
                object_kind: ObjectKind::Config,
                object_id: "x",
                tenant,
                reason: "r",
            })
            .unwrap();
        }
        let page = |after_id, limit| {
            s.audit_log(&AuditFilter {
                tenant: Some("acme".into()),
                after_id,
                limit,
                ..AuditFilter::default()
            })
            .unwrap()
            .iter()
            .map(|r| r.at)
            .collect::<Vec<_>>()
        };
        assert_eq!(page(None, None), [0, 2, 3]);
        assert_eq!(page(None, Some(2)), [0, 2]);
        let third_id = s.audit_log(&AuditFilter::default()).unwrap()[2].id;
        assert_eq!(page(Some(third_id), Some(2)), [3]);
    }
}
