//! Operator commands on stored data: listing and exporting recordings,
//! retention runs, erasure, data-portability export and tenant deletion (the
//! `sipbridge recordings|retention|erase|export|tenant` subcommands).
//!
//! Owns the order in which each command touches keys, files and rows, the
//! files it writes for the operator (decrypted WAVs 0600 created new,
//! export directories 0700) and its audit rows (actor [`CLI_ACTOR`]). Must
//! not hold SQL (that is `db`), the sealed format (`crypto`) or the
//! selection rule of retention (`retention`); reads no clock and no
//! configuration: time, master key, policies come in as parameters, so the
//! commands are tested in virtual time.
//!
//! Also defines how a transcript segment is sealed ([`seal_transcript`],
//! content type [`CONTENT_TRANSCRIPT_UTF8`]): the same sealed format as
//! recordings, one sealed stream per segment, so export can decrypt what the
//! pipelines store.
//!
//! Times are printed as RFC 3339 in UTC and `--since` accepts RFC 3339 or
//! unix seconds: the two conversions are written here (Hinnant's civil-date
//! algorithms, twenty lines) rather than adding a date crate for them.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::{DirBuilder, File, OpenOptions};
use std::io::{self, BufWriter, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rand::CryptoRng;
use serde::Serialize;

use super::crypto::{
    CryptoError, DataKey, FileId, HeaderMeta, KeyRing, SealedReader, SealedWriter,
    sealed::MAX_CHUNK_PLAINTEXT, validate_tenant,
};
use super::db::{
    AuditAction, AuditEntry, CallerIdPolicy, DbError, ErasedSummary, ObjectKind, RecordingRecord,
    RecordingState, Store, StoredCdr, UnixMs,
};
use super::objects::RecordingObjects;
use super::recording::{RecordingError, export_wav_from, recover_wav_from};
use super::retention::{
    DAY_MS, Expiry, ItemKind, RetentionPolicy, Selection, SweepReport, Sweeper,
};

/// Actor name written into audit rows by these commands.
pub const CLI_ACTOR: &str = "cli";

/// File name of the metadata database inside `var_dir`.
pub const DB_FILE: &str = "sipbridge.db";

/// Sealed-header content type of a transcript segment: UTF-8 text.
pub const CONTENT_TRANSCRIPT_UTF8: u8 = 2;

/// Errors of the operator commands.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum OpsError {
    /// The metadata database.
    #[error(transparent)]
    Db(#[from] DbError),
    /// Keys or a sealed file.
    #[error(transparent)]
    Crypto(#[from] CryptoError),
    /// Decrypting a recording.
    #[error(transparent)]
    Recording(#[from] RecordingError),
    /// A file or directory the command reads or writes.
    #[error("{path}: {source}")]
    Io {
        /// The path.
        path: PathBuf,
        /// What went wrong.
        source: io::Error,
    },
    /// No database where the profile says.
    #[error("no database at {0} (the daemon creates it on first start)")]
    NoDatabase(PathBuf),
    /// No such recording.
    #[error("unknown recording {0:?}")]
    UnknownRecording(String),
    /// The recording's file was deleted (retention, erasure, opt-out).
    #[error("recording {0:?} was deleted")]
    RecordingDeleted(String),
    /// The recording's object is not in the bucket (yet: the node that
    /// recorded it has not uploaded it from its spool).
    #[error(
        "recording is not in the object store yet (the node that recorded it is still uploading it)"
    )]
    NotInObjectStore(PathBuf),
    /// The recording is still being written by a running call.
    #[error("recording {0:?} is still being recorded")]
    StillRecording(String),
    /// A transcript that is not text.
    #[error("transcript {id:?}: {why}")]
    BadTranscript {
        /// Segment id.
        id: String,
        /// What is wrong.
        why: &'static str,
    },
    /// Writing JSON.
    #[error("json: {0}")]
    Json(#[from] serde_json::Error),
    /// Some recording files could not be removed (their rows say deleted).
    #[error("{} file(s) could not be removed, first {}: {}", .0.len(), .0[0].0.display(), .0[0].1)]
    FilesLeft(Vec<(PathBuf, io::Error)>),
    /// Refused: the tenant has data under legal hold.
    #[error("tenant {tenant:?} has {count} item(s) under legal hold; nothing was deleted")]
    LegalHold {
        /// Tenant.
        tenant: String,
        /// Held items.
        count: usize,
    },
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> OpsError + '_ {
    move |source| OpsError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// The database and key ring of one profile's `var_dir`.
#[derive(Debug)]
pub struct DataStore {
    var_dir: PathBuf,
    /// The metadata database.
    pub store: Store,
    /// The tenants' data keys.
    pub keyring: KeyRing,
    with_policy: HashSet<String>,
    /// The bucket recordings are in (`[profile.recordings] kind = "s3"`).
    objects: Option<Arc<RecordingObjects>>,
}

impl DataStore {
    /// Opens `var_dir/sipbridge.db` (which must exist: the CLI never creates
    /// a store) and the key ring under `master_key`. Every tenant named in
    /// `caller_policies` gets that policy; any other tenant is looked up as
    /// [`CallerIdPolicy::Plain`].
    pub fn open(
        var_dir: &Path,
        master_key: &[u8],
        caller_policies: HashMap<String, CallerIdPolicy>,
    ) -> Result<Self, OpsError> {
        Self::open_engine(
            var_dir,
            &crate::config::StoreEngine::Sqlite,
            master_key,
            caller_policies,
        )
    }

    /// [`DataStore::open`] on the engine of `[profile.store]`: the SQLite
    /// file (which must exist) or the PostgreSQL database.
    pub fn open_engine(
        var_dir: &Path,
        engine: &crate::config::StoreEngine,
        master_key: &[u8],
        caller_policies: HashMap<String, CallerIdPolicy>,
    ) -> Result<Self, OpsError> {
        let db = var_dir.join(DB_FILE);
        if *engine == crate::config::StoreEngine::Sqlite && !db.is_file() {
            return Err(OpsError::NoDatabase(db));
        }
        let mut store = Store::open_engine(engine, &db)?;
        let mut with_policy = HashSet::new();
        for (tenant, policy) in caller_policies {
            store.set_caller_policy(&tenant, policy);
            with_policy.insert(tenant);
        }
        let keyring = KeyRing::open_engine(var_dir, master_key, engine)?;
        Ok(Self {
            var_dir: var_dir.to_path_buf(),
            store,
            keyring,
            with_policy,
            objects: None,
        })
    }

    /// Recordings are objects in this bucket (spooled under `var_dir` while
    /// they are written): exports fetch them, deletions remove them.
    pub fn set_objects(&mut self, objects: Option<Arc<RecordingObjects>>) {
        self.objects = objects;
    }

    /// The profile's `var_dir`.
    pub fn var_dir(&self) -> &Path {
        &self.var_dir
    }

    /// The bucket recordings are in, if not local files.
    pub fn objects(&self) -> Option<&Arc<RecordingObjects>> {
        self.objects.as_ref()
    }

    /// The sealed recording at `path`, open: the local (or spooled) file,
    /// else its object fetched into an anonymous file under `var_dir`.
    pub fn open_sealed(&self, path: &Path) -> Result<File, OpsError> {
        match &self.objects {
            Some(o) => o
                .open_sealed(path, &self.var_dir)
                .map_err(|e| object_error(path, e)),
            None => File::open(path).map_err(io_err(path)),
        }
    }

    /// Deletes a recording's file (and, with a bucket, its object and any
    /// upload of it); a missing one counts as deleted.
    fn remove_recording(&self, path: &Path) -> io::Result<()> {
        match &self.objects {
            Some(o) => o.remove_recording(path).map_err(|e| e.into_io()),
            None => std::fs::remove_file(path),
        }
    }

    /// Sets `tenant`'s caller-id policy (e.g. after a configuration reload).
    pub fn set_caller_policy(&mut self, tenant: &str, policy: CallerIdPolicy) {
        self.store.set_caller_policy(tenant, policy);
        self.with_policy.insert(tenant.to_owned());
    }

    /// Makes sure `tenant` has a caller-id policy (plain unless configured).
    fn ensure_policy(&mut self, tenant: &str) {
        if self.with_policy.insert(tenant.to_owned()) {
            self.store.set_caller_policy(tenant, CallerIdPolicy::Plain);
        }
    }
}

/// An object-store failure on the recording at `path` as an [`OpsError`].
pub fn object_error(path: &Path, e: super::objects::ObjectError) -> OpsError {
    match e {
        super::objects::ObjectError::NotFound(_) => OpsError::NotInObjectStore(path.to_path_buf()),
        e => OpsError::Io {
            path: path.to_path_buf(),
            source: e.into_io(),
        },
    }
}

// ---- time ------------------------------------------------------------------

/// Days since 1970-01-01 of a proleptic Gregorian date.
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * (m + if m > 2 { -3 } else { 9 }) + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// The date of a day count since 1970-01-01.
fn civil_from_days(z: i64) -> (i64, i64, i64) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (
        if m <= 2 {
            yoe + era * 400 + 1
        } else {
            yoe + era * 400
        },
        m,
        d,
    )
}

/// `2025-10-09T08:07:06Z` (seconds precision, UTC).
pub fn format_time(ms: UnixMs) -> String {
    let secs = ms.div_euclid(1000);
    let (y, m, d) = civil_from_days(secs.div_euclid(86_400));
    let s = secs.rem_euclid(86_400);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        s / 3600,
        s / 60 % 60,
        s % 60
    )
}

/// Parses `--since`: unix seconds (all digits), an RFC 3339 date-time
/// (`2025-10-09T08:07:06Z`, `…+02:00`, fractional seconds allowed) or a date
/// (`2025-10-09`, midnight UTC). Returns unix milliseconds.
pub fn parse_since(s: &str) -> Option<UnixMs> {
    if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) {
        return s.parse::<i64>().ok()?.checked_mul(1000);
    }
    let b = s.as_bytes();
    let num = |r: std::ops::Range<usize>| -> Option<i64> {
        let part = b.get(r)?;
        if part.is_empty() || !part.iter().all(u8::is_ascii_digit) {
            return None;
        }
        std::str::from_utf8(part).ok()?.parse().ok()
    };
    let (y, mo, d) = (num(0..4)?, num(5..7)?, num(8..10)?);
    if b.get(4) != Some(&b'-') || b.get(7) != Some(&b'-') || !(1..=12).contains(&mo) {
        return None;
    }
    let month_days = days_from_civil(
        if mo == 12 { y + 1 } else { y },
        if mo == 12 { 1 } else { mo + 1 },
        1,
    ) - days_from_civil(y, mo, 1);
    if !(1..=month_days).contains(&d) {
        return None;
    }
    let day_ms = days_from_civil(y, mo, d) * DAY_MS;
    if b.len() == 10 {
        return Some(day_ms);
    }
    if !matches!(b.get(10), Some(b'T' | b't' | b' ')) {
        return None;
    }
    let (h, mi, se) = (num(11..13)?, num(14..16)?, num(17..19)?);
    if b.get(13) != Some(&b':') || b.get(16) != Some(&b':') || h > 23 || mi > 59 || se > 60 {
        return None;
    }
    let mut i = 19;
    let mut frac_ms = 0;
    if b.get(i) == Some(&b'.') {
        i += 1;
        let start = i;
        while b.get(i).is_some_and(u8::is_ascii_digit) {
            i += 1;
        }
        if i == start {
            return None;
        }
        let digits = &s[start..i.min(start + 3)];
        frac_ms = digits.parse::<i64>().ok()? * 10_i64.pow(3 - digits.len() as u32);
    }
    let offset_s = match b.get(i) {
        Some(b'Z' | b'z') if b.len() == i + 1 => 0,
        Some(sign @ (b'+' | b'-')) if b.len() == i + 6 && b[i + 3] == b':' => {
            let (oh, om) = (num(i + 1..i + 3)?, num(i + 4..i + 6)?);
            if oh > 23 || om > 59 {
                return None;
            }
            let o = oh * 3600 + om * 60;
            if *sign == b'+' { o } else { -o }
        }
        _ => return None,
    };
    Some(day_ms + ((h * 3600 + mi * 60 + se - offset_s) * 1000) + frac_ms)
}

// ---- recordings ------------------------------------------------------------

/// A string from the wire (a Call-ID, a tenant-supplied name) made safe for a
/// terminal: control characters (escape sequences, NUL, newlines) and the
/// backslash are written as Rust escapes (`\u{1b}`, `\\`), so a hostile
/// Call-ID can neither drive the terminal nor forge table rows.
pub fn terminal_safe(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if c.is_control() || c == '\\' {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

/// The recordings table printed by `recordings list`: id, tenant, call,
/// created (UTC), duration, size in bytes, state. Never a caller number.
pub fn recordings_table(recs: &[RecordingRecord]) -> String {
    let header = [
        "ID", "TENANT", "CALL", "CREATED", "DURATION", "SIZE", "STATE",
    ];
    let rows: Vec<[String; 7]> = recs
        .iter()
        .map(|r| {
            [
                r.id.clone(),
                terminal_safe(&r.tenant),
                terminal_safe(&r.call_id),
                format_time(r.created_at),
                format!("{}.{}s", r.duration_ms / 1000, r.duration_ms % 1000 / 100),
                r.size_bytes.to_string(),
                r.state.to_string(),
            ]
        })
        .collect();
    let mut widths = header.map(str::len);
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let mut line = |cells: &[&str]| {
        let mut l = String::new();
        for (i, (cell, w)) in cells.iter().zip(widths).enumerate() {
            if i + 1 == cells.len() {
                l.push_str(cell);
            } else {
                l.push_str(&format!("{cell:<w$}  "));
            }
        }
        out.push_str(l.trim_end());
        out.push('\n');
    };
    line(&header);
    for row in &rows {
        line(&row.each_ref().map(String::as_str));
    }
    out
}

/// Creates `path` new (never overwriting or following a planted file) with
/// mode 0600.
fn create_private(path: &Path) -> Result<File, OpsError> {
    OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(io_err(path))
}

fn write_private(path: &Path, bytes: &[u8]) -> Result<(), OpsError> {
    let mut f = create_private(path)?;
    f.write_all(bytes)
        .and_then(|()| f.sync_all())
        .map_err(io_err(path))
}

/// Decrypts `rec` into a new 0600 WAV at `out`; a `partial` recording gives
/// every authenticated second. Returns the stereo frames written. On failure
/// nothing is left at `out`.
fn write_recording_wav(ds: &DataStore, rec: &RecordingRecord, out: &Path) -> Result<u64, OpsError> {
    match rec.state {
        RecordingState::Deleted => return Err(OpsError::RecordingDeleted(rec.id.clone())),
        RecordingState::Recording => return Err(OpsError::StillRecording(rec.id.clone())),
        RecordingState::Complete | RecordingState::Partial => {}
    }
    let keyring = &ds.keyring;
    let sealed = ds.open_sealed(&rec.path)?;
    let file = create_private(out)?;
    let result = (|| {
        let frames = if rec.state == RecordingState::Partial {
            let recovered = recover_wav_from(sealed, keyring)?;
            let mut w = BufWriter::new(&file);
            w.write_all(&recovered.wav).map_err(io_err(out))?;
            w.flush().map_err(io_err(out))?;
            recovered.frames
        } else {
            let mut w = BufWriter::new(&file);
            let frames = export_wav_from(sealed, keyring, &mut w)?;
            w.flush().map_err(io_err(out))?;
            frames
        };
        file.sync_all().map_err(io_err(out))?;
        Ok(frames)
    })();
    if result.is_err() {
        // The partial plaintext must not stay behind.
        let _ = std::fs::remove_file(out);
    }
    result
}

/// `recordings export ID --out FILE`: decrypts one recording into a new WAV
/// (0600) and audits it (`recording-export`, actor `cli`). If the audit row
/// cannot be written the WAV is removed again: no unaudited plaintext.
pub fn export_recording(
    ds: &mut DataStore,
    id: &str,
    out: &Path,
    now: UnixMs,
) -> Result<u64, OpsError> {
    let rec = ds
        .store
        .get_recording(None, id)?
        .ok_or_else(|| OpsError::UnknownRecording(id.to_owned()))?;
    let frames = write_recording_wav(ds, &rec, out)?;
    let reason = format!("decrypted to {}", out.display());
    let audited = ds.store.audit(&AuditEntry {
        at: now,
        actor: CLI_ACTOR,
        action: AuditAction::RecordingExport,
        object_kind: ObjectKind::Recording,
        object_id: &rec.id,
        tenant: &rec.tenant,
        reason: &reason,
    });
    if let Err(e) = audited {
        let _ = std::fs::remove_file(out);
        return Err(e.into());
    }
    Ok(frames)
}

// ---- retention -------------------------------------------------------------

/// One line of `retention run`: kind, id, tenant, age and the policy that
/// expired it.
pub fn expiry_line(e: &Expiry, now: UnixMs) -> String {
    let kind = match e.item.kind {
        ItemKind::Recording => "recording",
        ItemKind::Transcript => "transcript",
        ItemKind::Call => "call",
    };
    let age_days = now.saturating_sub(e.item.created_at).div_euclid(DAY_MS);
    format!(
        "{kind} {} tenant={} age={age_days}d created={} policy {}={}d",
        e.item.id,
        e.item.tenant,
        format_time(e.item.created_at),
        e.reason.field,
        e.reason.days
    )
}

/// What `retention run` did or would do.
#[derive(Debug)]
#[non_exhaustive]
pub enum RetentionOutcome {
    /// `--dry-run`: the selection, nothing deleted.
    DryRun(Selection),
    /// A real sweep.
    Swept(SweepReport),
}

impl RetentionOutcome {
    /// The report printed by the CLI, one item per line.
    pub fn render(&self, now: UnixMs) -> String {
        let mut out = String::new();
        let (verb, done, held, unknown) = match self {
            Self::DryRun(s) => ("would delete", &s.expired, &s.held, &s.unknown_tenants),
            Self::Swept(r) => ("deleted", &r.deleted, &r.held, &r.unknown_tenants),
        };
        for e in done {
            out.push_str(&format!("{verb}: {}\n", expiry_line(e, now)));
        }
        if let Self::Swept(r) = self {
            for e in &r.skipped {
                out.push_str(&format!(
                    "skipped (gone or held meanwhile): {}\n",
                    expiry_line(e, now)
                ));
            }
            for (e, err) in &r.failed {
                out.push_str(&format!(
                    "failed (kept for the next run): {}: {err}\n",
                    expiry_line(e, now)
                ));
            }
        }
        for e in held {
            out.push_str(&format!("kept (legal hold): {}\n", expiry_line(e, now)));
        }
        for (tenant, n) in unknown {
            out.push_str(&format!(
                "kept: {n} item(s) of tenant {tenant} (no retention policy configured)\n"
            ));
        }
        out.push_str(&format!("total: {verb} {} item(s)\n", done.len()));
        out
    }

    /// Whether some deletion failed.
    pub fn has_failures(&self) -> bool {
        matches!(self, Self::Swept(r) if !r.failed.is_empty())
    }
}

/// `retention run [--dry-run]`: applies the tenants' policies at `now`;
/// files first, then rows with their audit rows (see `retention::Sweeper`).
pub fn run_retention(
    ds: &mut DataStore,
    policy: &dyn Fn(&str) -> Option<RetentionPolicy>,
    now: UnixMs,
    dry_run: bool,
) -> Result<RetentionOutcome, OpsError> {
    let objects = ds.objects.clone();
    let deleter = |p: &Path| match &objects {
        Some(o) => o.remove_recording(p).map_err(|e| e.into_io()),
        None => std::fs::remove_file(p),
    };
    let sweeper = Sweeper::new(policy, &deleter);
    Ok(if dry_run {
        RetentionOutcome::DryRun(sweeper.dry_run(&ds.store, now)?)
    } else {
        RetentionOutcome::Swept(sweeper.run(&mut ds.store, now)?)
    })
}

// ---- erasure ---------------------------------------------------------------

/// What `erase` erases in a tenant.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum EraseTarget {
    /// Every call from this caller number.
    Caller(String),
    /// One call.
    Call(String),
    /// Every row of the tenant (its key stays: use `tenant delete` to shred).
    All,
}

/// Removes recording files whose rows are already marked deleted; a file
/// already missing counts as removed.
fn remove_files<'a>(
    ds: &DataStore,
    paths: impl IntoIterator<Item = &'a Path>,
) -> Result<usize, OpsError> {
    let mut removed = 0;
    let mut left = Vec::new();
    for path in paths {
        match ds.remove_recording(path) {
            Ok(()) => removed += 1,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => left.push((path.to_path_buf(), e)),
        }
    }
    if left.is_empty() {
        Ok(removed)
    } else {
        Err(OpsError::FilesLeft(left))
    }
}

/// `erase --tenant T (--caller N | --call ID | --all) --reason R` (and the
/// admin API's erase, with its own `actor`): in one transaction deletes the transcripts, marks the recordings deleted and
/// blanks the caller id of the CDRs (for `All`: deletes every row of the
/// tenant), each object audited with `reason`; then removes the recording
/// files. Calls under legal hold are skipped and listed (`All` is refused).
pub fn erase(
    ds: &mut DataStore,
    tenant: &str,
    target: &EraseTarget,
    actor: &str,
    reason: &str,
    now: UnixMs,
) -> Result<ErasedSummary, OpsError> {
    validate_tenant(tenant)?;
    ds.ensure_policy(tenant);
    let summary = match target {
        EraseTarget::Caller(number) => ds.store.erase_caller(tenant, number, actor, reason, now)?,
        EraseTarget::Call(id) => ds.store.erase_call(tenant, id, actor, reason, now)?,
        EraseTarget::All => match ds.store.erase_tenant(tenant, actor, reason, now) {
            Err(DbError::LegalHold { tenant, held }) => {
                return Err(OpsError::LegalHold {
                    tenant,
                    count: held.len(),
                });
            }
            other => other?,
        },
    };
    remove_files(ds, summary.recordings.iter().map(|r| r.path.as_path()))?;
    ds.store.checkpoint()?;
    Ok(summary)
}

/// The summary line printed after an erasure.
pub fn erase_summary(s: &ErasedSummary) -> String {
    let mut out = format!(
        "erased: {} call(s), {} recording(s), {} transcript segment(s)\n",
        s.calls.len(),
        s.recordings.len(),
        s.transcripts.len()
    );
    for id in &s.held {
        out.push_str(&format!("kept (legal hold): call {id}\n"));
    }
    out
}

// ---- transcripts -----------------------------------------------------------

/// Seals one transcript segment's text under the tenant's data key (a fresh
/// file id per segment; text longer than a chunk spans several chunks).
pub fn seal_transcript(
    key: &DataKey,
    text: &str,
    created_unix: u64,
    rng: &mut impl CryptoRng,
) -> Result<Vec<u8>, CryptoError> {
    let meta = HeaderMeta {
        content_type: CONTENT_TRANSCRIPT_UTF8,
        created_unix,
    };
    let mut w = SealedWriter::new(Vec::new(), key, FileId::random(rng), meta)?;
    let bytes = text.as_bytes();
    let mut chunks: Vec<&[u8]> = bytes.chunks(MAX_CHUNK_PLAINTEXT).collect();
    let last = chunks.pop().unwrap_or(&[]);
    for c in chunks {
        w.write_chunk(c)?;
    }
    w.finish(last)
}

/// Decrypts a segment sealed by [`seal_transcript`] (fails on any damage,
/// another tenant's key or a destroyed key).
pub fn open_transcript(key: &DataKey, id: &str, sealed: &[u8]) -> Result<String, OpsError> {
    let reader = SealedReader::new(sealed, key)?;
    if reader.header().content_type != CONTENT_TRANSCRIPT_UTF8 {
        return Err(OpsError::BadTranscript {
            id: id.to_owned(),
            why: "not a transcript",
        });
    }
    String::from_utf8(reader.read_all()?).map_err(|_| OpsError::BadTranscript {
        id: id.to_owned(),
        why: "not UTF-8",
    })
}

// ---- data-portability export -------------------------------------------------

/// One CDR as exported (`calls.json`, the admin API): times in RFC 3339.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ExportedCall {
    /// SIP Call-ID.
    pub call_id: String,
    /// Tenant.
    pub tenant: String,
    /// Trunk.
    pub trunk: String,
    /// As stored: the number, or its keyed hash under a hashing tenant.
    pub caller: Option<String>,
    /// Called number.
    pub to: String,
    /// INVITE arrival.
    pub started_at: String,
    /// Answer.
    pub answered_at: Option<String>,
    /// End.
    pub ended_at: Option<String>,
    /// Final SIP status.
    pub result_code: Option<u16>,
    /// `remote` or `local`.
    pub hangup_side: Option<&'static str>,
    /// End cause.
    pub cause: Option<String>,
    /// Codec.
    pub codec: Option<String>,
    /// RTP packets received.
    pub rtp_packets: Option<u64>,
    /// RTP packets lost.
    pub rtp_lost: Option<u64>,
    /// Interarrival jitter, ms.
    pub rtp_jitter_ms: Option<f64>,
    /// Frames concealed at playout (lost or late packets).
    pub frames_concealed: Option<u64>,
    /// Caller frames dropped on the way to the pipeline.
    pub frames_dropped: Option<u64>,
    /// `inbound` or `outbound` (placed through the admin API).
    pub direction: String,
    /// Whether the call was recorded (`off`, `not-started`, `recorded`,
    /// `partial`, `not-recorded`, `opted-out`); `null` for older rows and
    /// calls closed by crash recovery.
    pub recording: Option<&'static str>,
    /// Disclosure prompt start.
    pub disclosure_started_at: Option<String>,
    /// Disclosure prompt end.
    pub disclosure_finished_at: Option<String>,
    /// Opt-out key pressed.
    pub opt_out_at: Option<String>,
    /// The target of the call's last transfer (absent without one).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub transferred_to: Option<String>,
    /// `blind` or `bridge`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub transfer_mode: Option<String>,
    /// `completed`, `failed`, or `accepted` (the call ended before the
    /// outcome was known).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub transfer_result: Option<String>,
    /// Why it failed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub transfer_reason: Option<String>,
    /// The SIP status behind the result.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub transfer_status: Option<u16>,
    /// A bridge transfer's other leg's Call-ID.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub transfer_leg: Option<String>,
    /// Ids of the exported recordings of the call.
    pub recordings: Vec<String>,
}

impl ExportedCall {
    /// The exported form of a stored CDR, listing `recordings`.
    pub fn new(c: &StoredCdr, recordings: Vec<String>) -> Self {
        let t = |v: Option<UnixMs>| v.map(format_time);
        Self {
            call_id: c.call_id.clone(),
            tenant: c.tenant.clone(),
            trunk: c.trunk.clone(),
            caller: c.caller.clone(),
            to: c.to.clone(),
            started_at: format_time(c.started_at),
            answered_at: t(c.answered_at),
            ended_at: t(c.ended_at),
            result_code: c.result_code,
            hangup_side: c.hangup_side.map(|h| h.as_str()),
            cause: c.cause.clone(),
            codec: c.codec.clone(),
            rtp_packets: c.rtp.map(|r| r.packets),
            rtp_lost: c.rtp.map(|r| r.lost),
            rtp_jitter_ms: c.rtp.map(|r| r.jitter_ms),
            frames_concealed: c.frames.map(|f| f.concealed),
            frames_dropped: c.frames.map(|f| f.dropped),
            recording: c.recording.map(|r| r.as_str()),
            direction: c.direction.clone(),
            disclosure_started_at: t(c.consent.disclosure_started_at),
            disclosure_finished_at: t(c.consent.disclosure_finished_at),
            opt_out_at: t(c.consent.opt_out_at),
            transferred_to: c.transfer.as_ref().map(|x| x.to.clone()),
            transfer_mode: c.transfer.as_ref().map(|x| x.mode.clone()),
            transfer_result: c.transfer.as_ref().map(|x| x.result.clone()),
            transfer_reason: c.transfer.as_ref().and_then(|x| x.reason.clone()),
            transfer_status: c.transfer.as_ref().and_then(|x| x.status),
            transfer_leg: c.transfer.as_ref().and_then(|x| x.leg_call_id.clone()),
            recordings,
        }
    }
}

/// One decrypted transcript segment as exported.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ExportedTranscript {
    /// Segment id.
    pub id: String,
    /// Call.
    pub call_id: String,
    /// `caller` or `agent`.
    pub speaker: &'static str,
    /// Start, ms from call start.
    pub start_ms: u64,
    /// End, ms from call start.
    pub end_ms: u64,
    /// Recogniser confidence.
    pub confidence: f32,
    /// The text.
    pub text: String,
}

/// Every transcript segment of one call of `tenant`, decrypted, in speaking
/// order (the tenant's key is loaded only if there is a segment).
pub fn call_transcripts(
    ds: &DataStore,
    tenant: &str,
    call_id: &str,
) -> Result<Vec<ExportedTranscript>, OpsError> {
    let mut key: Option<DataKey> = None;
    let mut out = Vec::new();
    for t in ds.store.transcripts_of_call(tenant, call_id)? {
        let k = match &key {
            Some(k) => k,
            None => key.insert(ds.keyring.load(tenant)?),
        };
        let text = open_transcript(k, &t.id, &t.ciphertext)?;
        out.push(ExportedTranscript {
            id: t.id,
            call_id: t.call_id,
            speaker: t.speaker.as_str(),
            start_ms: t.start_ms,
            end_ms: t.end_ms,
            confidence: t.confidence,
            text,
        });
    }
    Ok(out)
}

/// What a data-portability export holds for one caller of one tenant, read
/// and decrypted (transcripts) but not yet written anywhere: the CLI writes
/// it into a directory, the admin API answers it as JSON with download links.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ExportBundle {
    /// The caller's CDRs, each listing its exportable recordings.
    pub calls: Vec<ExportedCall>,
    /// Their transcript segments, decrypted.
    pub transcripts: Vec<ExportedTranscript>,
    /// Recordings that can be decrypted (`complete` or `partial`).
    pub recordings: Vec<RecordingRecord>,
    /// Recordings not exported because a call is still recording them.
    pub still_recording: Vec<String>,
}

/// Reads everything `export` exports for caller `number` of `tenant` (that
/// tenant only). Writes nothing and audits nothing: see [`audit_export`].
pub fn collect_export(
    ds: &mut DataStore,
    tenant: &str,
    number: &str,
) -> Result<ExportBundle, OpsError> {
    validate_tenant(tenant)?;
    ds.ensure_policy(tenant);
    let mut bundle = ExportBundle::default();
    for c in ds.store.calls_by_caller(tenant, number)? {
        let mut exported = Vec::new();
        for rec in ds.store.recordings_of_call(tenant, &c.call_id)? {
            match rec.state {
                RecordingState::Deleted => continue,
                RecordingState::Recording => {
                    bundle.still_recording.push(rec.id.clone());
                    continue;
                }
                RecordingState::Complete | RecordingState::Partial => {}
            }
            if !safe_file_stem(&rec.id) {
                return Err(OpsError::UnknownRecording(rec.id.clone()));
            }
            exported.push(rec.id.clone());
            bundle.recordings.push(rec);
        }
        bundle.calls.push(ExportedCall::new(&c, exported));
        bundle
            .transcripts
            .extend(call_transcripts(ds, tenant, &c.call_id)?);
    }
    Ok(bundle)
}

/// Audits an export: one `data-export` row per call and one for the tenant
/// (object ids, never the number), by `actor` with `reason`.
pub fn audit_export(
    ds: &mut DataStore,
    tenant: &str,
    bundle: &ExportBundle,
    actor: &str,
    reason: &str,
    now: UnixMs,
) -> Result<(), OpsError> {
    let mut audit = |kind, id: &str| {
        ds.store.audit(&AuditEntry {
            at: now,
            actor,
            action: AuditAction::DataExport,
            object_kind: kind,
            object_id: id,
            tenant,
            reason,
        })
    };
    bundle
        .calls
        .iter()
        .try_for_each(|c| audit(ObjectKind::Call, &c.call_id).map(drop))
        .and_then(|()| audit(ObjectKind::Tenant, tenant).map(drop))?;
    Ok(())
}

/// What `export` wrote.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ExportReport {
    /// Calls in `calls.json`.
    pub calls: usize,
    /// Segments in `transcripts.json`.
    pub transcripts: usize,
    /// WAVs written under `recordings/`.
    pub recordings: Vec<String>,
    /// Recordings not exported because a call is still recording them.
    pub still_recording: Vec<String>,
}

/// `export --tenant T --caller N --out DIR`: writes into a new directory
/// (0700) `calls.json`, `transcripts.json` and `recordings/<id>.wav`
/// (decrypted; files 0600) for that caller in that tenant only. Audited: one
/// `data-export` row per call and one for the tenant (object ids, never the
/// number). On failure the directory is removed again.
pub fn export_caller(
    ds: &mut DataStore,
    tenant: &str,
    number: &str,
    out: &Path,
    now: UnixMs,
) -> Result<ExportReport, OpsError> {
    let bundle = collect_export(ds, tenant, number)?;
    DirBuilder::new()
        .mode(0o700)
        .create(out)
        .map_err(io_err(out))?;
    let report = match write_export(ds, &bundle, out) {
        Ok(r) => r,
        Err(e) => {
            let _ = std::fs::remove_dir_all(out);
            return Err(e);
        }
    };
    let reason = format!("data export to {}", out.display());
    if let Err(e) = audit_export(ds, tenant, &bundle, CLI_ACTOR, &reason, now) {
        let _ = std::fs::remove_dir_all(out);
        return Err(e);
    }
    Ok(report)
}

/// Whether a recording id can name a file in the export directory.
fn safe_file_stem(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 128
        && !id.starts_with('.')
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

fn write_export(
    ds: &DataStore,
    bundle: &ExportBundle,
    out: &Path,
) -> Result<ExportReport, OpsError> {
    let rec_dir = out.join("recordings");
    DirBuilder::new()
        .mode(0o700)
        .create(&rec_dir)
        .map_err(io_err(&rec_dir))?;
    for rec in &bundle.recordings {
        write_recording_wav(ds, rec, &rec_dir.join(format!("{}.wav", rec.id)))?;
    }
    write_private(
        &out.join("calls.json"),
        &serde_json::to_vec_pretty(&bundle.calls)?,
    )?;
    write_private(
        &out.join("transcripts.json"),
        &serde_json::to_vec_pretty(&bundle.transcripts)?,
    )?;
    Ok(ExportReport {
        calls: bundle.calls.len(),
        transcripts: bundle.transcripts.len(),
        recordings: bundle.recordings.iter().map(|r| r.id.clone()).collect(),
        still_recording: bundle.still_recording.clone(),
    })
}

// ---- tenant deletion -------------------------------------------------------

/// What `tenant delete` did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TenantDeleteReport {
    /// Whether a data key existed and was destroyed.
    pub key_destroyed: bool,
    /// Rows deleted (and audited).
    pub summary: ErasedSummary,
}

/// `tenant delete T --yes`: crypto-shredding. Refuses if anything of the
/// tenant is under legal hold (checked before the key goes; the row deletion
/// re-checks). Then destroys the tenant's data key (audited
/// `key-destroyed`), removes `var_dir/recordings/<tenant>/` and every file
/// its rows index, then deletes its rows (each audited `erase-tenant`).
pub fn delete_tenant(
    ds: &mut DataStore,
    tenant: &str,
    reason: &str,
    now: UnixMs,
) -> Result<TenantDeleteReport, OpsError> {
    validate_tenant(tenant)?;
    let held = ds
        .store
        .retention_items()?
        .iter()
        .filter(|i| i.tenant == tenant && i.legal_hold)
        .count()
        + ds.store
            .list_recordings(Some(tenant), None)?
            .iter()
            .filter(|r| r.legal_hold)
            .count();
    if held > 0 {
        return Err(OpsError::LegalHold {
            tenant: tenant.to_owned(),
            count: held,
        });
    }
    let key_destroyed = ds.keyring.destroy(tenant)?;
    ds.store.audit(&AuditEntry {
        at: now,
        actor: CLI_ACTOR,
        action: AuditAction::KeyDestroyed,
        object_kind: ObjectKind::Tenant,
        object_id: tenant,
        tenant,
        reason,
    })?;
    let dir = ds.var_dir.join("recordings").join(tenant);
    match std::fs::remove_dir_all(&dir) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(io_err(&dir)(e)),
    }
    let indexed: Vec<PathBuf> = ds
        .store
        .list_recordings(Some(tenant), None)?
        .into_iter()
        .map(|r| r.path)
        .collect();
    remove_files(ds, indexed.iter().map(PathBuf::as_path))?;
    let summary = match ds.store.erase_tenant(tenant, CLI_ACTOR, reason, now) {
        Err(DbError::LegalHold { tenant, held }) => {
            return Err(OpsError::LegalHold {
                tenant,
                count: held.len(),
            });
        }
        other => other?,
    };
    // Files indexed only by rows already marked deleted (leftovers).
    remove_files(ds, summary.recordings.iter().map(|r| r.path.as_path()))?;
    Ok(TenantDeleteReport {
        key_destroyed,
        summary,
    })
}

/// Counts per kind of what a tenant deletion removed, for the CLI.
pub fn tenant_delete_summary(tenant: &str, r: &TenantDeleteReport) -> String {
    let mut counts = BTreeMap::new();
    counts.insert("calls", r.summary.calls.len());
    counts.insert("recordings", r.summary.recordings.len());
    counts.insert("transcript segments", r.summary.transcripts.len());
    let mut out = format!(
        "tenant {tenant}: data key {}\n",
        if r.key_destroyed {
            "destroyed"
        } else {
            "was already absent"
        }
    );
    for (what, n) in counts {
        out.push_str(&format!("deleted {n} {what}\n"));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_strings_are_escaped_for_the_terminal() {
        assert_eq!(terminal_safe("abc@host"), "abc@host");
        assert_eq!(
            terminal_safe("x\u{1b}[2J\0y\r\nz\\"),
            "x\\u{1b}[2J\\u{0}y\\r\\nz\\\\"
        );
        assert_eq!(terminal_safe("é☎"), "é☎");
    }

    #[test]
    fn time_round_trips_and_parses_offsets() {
        assert_eq!(format_time(0), "1970-01-01T00:00:00Z");
        assert_eq!(format_time(951_782_400_000), "2000-02-29T00:00:00Z");
        assert_eq!(parse_since("951782400"), Some(951_782_400_000));
        assert_eq!(parse_since("2000-02-29"), Some(951_782_400_000));
        assert_eq!(
            parse_since("2000-02-29T01:00:00.25+01:00"),
            Some(951_782_400_250)
        );
        assert_eq!(
            parse_since("2025-10-09T08:07:06Z").map(format_time),
            Some("2025-10-09T08:07:06Z".to_owned())
        );
        for bad in [
            "",
            "2001-02-29",
            "2000-13-01",
            "2000-01-01T24:00:00Z",
            "2000-01-01T00:00:00",
            "yesterday",
            "2000-01-01T00:00:00.Z",
        ] {
            assert_eq!(parse_since(bad), None, "{bad}");
        }
    }
}
