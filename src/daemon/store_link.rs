//! The daemon's side of the store: CDRs, consent events and call recordings
//! written off the async hot path.
//!
//! Owns one writer thread that holds the SQLite [`Store`], the [`KeyRing`]
//! and every open [`RecordingWriter`]; call tasks talk to it through one
//! bounded channel with `try_send`, so a call task never waits on SQLite or
//! on a recording file (a full channel drops the message and counts it).
//! Messages of one call arrive in order because one task sends them.
//! Must not touch: protocol logic (the call and media sessions decide), the
//! sealed format or SQL (those are `store::*`).
//!
//! Recording audio is batched in the call task one second at a time (the
//! size of a sealed chunk), so each `Push` seals exactly one chunk at once:
//! a `kill -9` loses at most the second being gathered. The batch lives in
//! memory only and is zeroed when dropped.
//!
//! At start-up [`Records::open`] recovers what a crash left: recordings still
//! in state `recording` are verified chunk by chunk and marked `partial`
//! (unreadable ones are deleted, audited), then open CDRs are closed with
//! cause `crash-recovered`.

use crate::call::CallRecord;
use crate::call::bridged::{Consent, StoreOp};
use crate::store::crypto::KeyRing;
use crate::store::db::{
    CallEnd, CallRow, CallerIdPolicy, ConsentEvent, MediaFrames, RecordingRow, RecordingState,
    RtpStats, Store, StoredHangupSide, TranscriptRow, UnixMs, unix_ms,
};
use crate::store::recording::{FRAMES_PER_CHUNK, RecordingDate, RecordingWriter, SAMPLE_RATE};
use crate::store::retention::{RetentionPolicy, Sweeper};
use anyhow::Context;
use rand::SeedableRng;
use rand::rngs::StdRng;
use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, TrySendError, sync_channel};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;
use tracing::{error, info, warn};
use zeroize::Zeroizing;

/// Messages waiting for the writer thread, at most. One second of recording
/// is one message, so this covers seconds of a stalled disk at hundreds of calls.
const QUEUE: usize = 4096;

/// Name of the metadata database in `var_dir`.
pub(crate) const DB_FILE: &str = "sipbridge.db";

/// Work for the writer thread.
enum Op {
    InsertCall(CallRow),
    FinishCall {
        tenant: String,
        call_id: String,
        end: CallEnd,
        frames: MediaFrames,
    },
    Consent {
        tenant: String,
        call_id: String,
        event: ConsentEvent,
        at: UnixMs,
    },
    StartRecording {
        handle: u64,
        tenant: String,
        call_id: String,
        created_at: UnixMs,
    },
    Push {
        handle: u64,
        left: Zeroizing<Vec<i16>>,
        right: Zeroizing<Vec<i16>>,
    },
    FinishRecording {
        handle: u64,
    },
    DiscardRecording {
        handle: u64,
        tenant: String,
        at: UnixMs,
    },
    Transcript {
        tenant: String,
        call_id: String,
        id: String,
        transcript: Box<crate::pipeline::Transcript>,
        at: UnixMs,
    },
    /// A reloaded configuration's tenants (issue 7).
    Tenants {
        callers: Vec<(String, CallerIdPolicy)>,
        retention: HashMap<String, RetentionPolicy>,
    },
    Shutdown,
}

/// The store as the daemon uses it: a handle to the writer thread.
pub(crate) struct Records {
    tx: SyncSender<Op>,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
    next_handle: AtomicU64,
    dropped: AtomicU64,
    /// Operations queued and not yet taken by the writer thread.
    backlog: Arc<AtomicUsize>,
    /// Tenants that store transcripts (`transcripts = true`); replaced on reload.
    transcript_tenants: Mutex<HashSet<String>>,
    /// Ended calls whose pipeline may still send transcripts
    /// ([`CallStore::transcripts_after_end`]); the shutdown waits for them.
    tails: Arc<AtomicUsize>,
}

/// The tenants whose calls store transcripts (`transcripts = true`).
fn transcript_tenants(tenants: &[crate::config::Tenant]) -> HashSet<String> {
    tenants
        .iter()
        .filter(|t| t.transcripts)
        .map(|t| t.id.clone())
        .collect()
}

/// The master key's bytes: the configured secret, or the file the daemon
/// generated. Must be exactly 32 bytes.
pub(crate) fn master_key_bytes(
    key: &crate::config::MasterKey,
) -> anyhow::Result<Zeroizing<Vec<u8>>> {
    let (bytes, source) = match key {
        crate::config::MasterKey::Loaded(secret) => (
            Zeroizing::new(secret.expose().to_vec()),
            secret.source().to_string(),
        ),
        crate::config::MasterKey::ToGenerate(path) => (
            Zeroizing::new(
                std::fs::read(path)
                    .with_context(|| format!("reading master key {}", path.display()))?,
            ),
            format!("file:{}", path.display()),
        ),
    };
    if bytes.len() != crate::store::crypto::KEY_LEN {
        anyhow::bail!(
            "master key {source}: must be exactly {} bytes, got {}",
            crate::store::crypto::KEY_LEN,
            bytes.len()
        );
    }
    Ok(bytes)
}

/// How often the retention sweeper runs (and once at start-up).
const SWEEP_INTERVAL: std::time::Duration = std::time::Duration::from_secs(3600);

impl Records {
    /// Opens the database and key ring of `var_dir`, recovers what a crash
    /// left, sets every tenant's caller-id policy (`caller_numbers`) and
    /// retention policy, and starts the writer thread.
    pub(crate) fn open(
        var_dir: &Path,
        master_key: &[u8],
        tenants: &[crate::config::Tenant],
    ) -> anyhow::Result<Records> {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(var_dir)
            .with_context(|| format!("creating var_dir {}", var_dir.display()))?;
        // Recording paths go into the database: absolute, so a restart from
        // another working directory still finds them.
        let var_dir = &std::fs::canonicalize(var_dir)
            .with_context(|| format!("resolving var_dir {}", var_dir.display()))?;
        let keyring = KeyRing::open(var_dir, master_key).context("opening the key ring")?;
        let db = var_dir.join(DB_FILE);
        let mut store =
            Store::open(&db).with_context(|| format!("opening database {}", db.display()))?;
        for t in tenants {
            let policy = CallerIdPolicy::for_tenant(t.hash_caller_numbers, master_key, &t.id);
            store.set_caller_policy(&t.id, policy);
        }
        recover(&mut store, &keyring, unix_ms(SystemTime::now()))?;
        let (tx, rx) = sync_channel(QUEUE);
        let backlog = Arc::new(AtomicUsize::new(0));
        let writer = Writer {
            backlog: Arc::clone(&backlog),
            store,
            keyring,
            var_dir: var_dir.to_owned(),
            rng: StdRng::from_os_rng(),
            open: HashMap::new(),
            policies: tenants
                .iter()
                .map(|t| (t.id.clone(), RetentionPolicy::from(&t.retention)))
                .collect(),
        };
        let thread = std::thread::Builder::new()
            .name("sipbridge-store".into())
            .spawn(move || writer.run(rx))
            .context("starting the store thread")?;
        Ok(Records {
            tx,
            thread: Mutex::new(Some(thread)),
            next_handle: AtomicU64::new(1),
            dropped: AtomicU64::new(0),
            backlog,
            transcript_tenants: Mutex::new(transcript_tenants(tenants)),
            tails: Arc::new(AtomicUsize::new(0)),
        })
    }

    /// Ended calls whose pipeline is still closing its stream: transcripts
    /// may yet arrive for them (the drain waits until this is 0, bounded).
    pub(crate) fn transcript_tails(&self) -> usize {
        self.tails.load(Ordering::Relaxed)
    }

    /// Whether the writer is so far behind that new calls should wait
    /// (seven eighths of the queue in use; the rest is headroom for the live
    /// calls' recording audio and CDR ends): the daemon then sheds new
    /// INVITEs with 503 rather than lose records. A last resort: the queue
    /// swings widely under load, and a lower mark turned away calls the
    /// writer would have stored (`scripts/load.sh`, 1,000 calls/s).
    pub(crate) fn is_behind(&self) -> bool {
        self.backlog.load(Ordering::Relaxed) > QUEUE / 8 * 7
    }

    fn send(&self, op: Op) {
        // Counted before it is queued, so the writer's decrement never comes
        // first; taken back if it was not queued.
        self.backlog.fetch_add(1, Ordering::Relaxed);
        let sent = self.tx.try_send(op);
        if sent.is_err() {
            self.backlog.fetch_sub(1, Ordering::Relaxed);
        }
        match sent {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => {
                crate::metrics::store_dropped();
                let n = self.dropped.fetch_add(1, Ordering::Relaxed) + 1;
                warn!(dropped = n, "store queue full; record dropped");
            }
            Err(TrySendError::Disconnected(_)) => {
                self.dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// A rejected call attempt: its CDR opened and closed at once. Attempts
    /// without a tenant (no route) are only logged: a CDR row needs a tenant.
    pub(crate) fn rejected(&self, record: &CallRecord) {
        let Some(tenant) = record.tenant.clone() else {
            return;
        };
        self.send(Op::InsertCall(CallRow {
            call_id: record.call_id.clone(),
            tenant: tenant.clone(),
            trunk: record.trunk.clone().unwrap_or_default(),
            from: record.from.clone(),
            to: record.to.clone(),
            started_at: unix_ms(record.started_at),
        }));
        self.send(Op::FinishCall {
            tenant,
            call_id: record.call_id.clone(),
            end: call_end(record),
            frames: media_frames(record),
        });
    }

    /// A reloaded configuration (SIGHUP, admin API): every tenant's caller-id
    /// and retention policy from now on. A tenant no longer configured keeps
    /// its caller-id policy (its live calls' CDRs still close) but loses its
    /// retention policy, as at a restart (its data is kept).
    pub(crate) fn configure(&self, master_key: &[u8], tenants: &[crate::config::Tenant]) {
        *self
            .transcript_tenants
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = transcript_tenants(tenants);
        self.send(Op::Tenants {
            callers: tenants
                .iter()
                .map(|t| {
                    let policy =
                        CallerIdPolicy::for_tenant(t.hash_caller_numbers, master_key, &t.id);
                    (t.id.clone(), policy)
                })
                .collect(),
            retention: tenants
                .iter()
                .map(|t| (t.id.clone(), RetentionPolicy::from(&t.retention)))
                .collect(),
        });
    }

    /// Shuts the writer down after the queue drains: open recordings are
    /// finished (marked complete). Blocks; call from a blocking context.
    pub(crate) fn shutdown(&self) {
        let dropped = self.dropped.load(Ordering::Relaxed);
        if dropped > 0 {
            warn!(dropped, "store messages dropped while running (queue full)");
        }
        self.backlog.fetch_add(1, Ordering::Relaxed);
        let _ = self.tx.send(Op::Shutdown);
        let thread = self
            .thread
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take();
        if let Some(t) = thread
            && t.join().is_err()
        {
            error!("store thread panicked");
        }
    }
}

/// A call's concealed (playout) and dropped (pipeline) frame counts.
fn media_frames(record: &CallRecord) -> MediaFrames {
    MediaFrames {
        concealed: record.rtp.map_or(0, |r| r.concealed),
        dropped: record.pipeline.as_ref().map_or(0, |p| p.dropped_frames),
    }
}

/// What the database says about how a call ended.
fn call_end(record: &CallRecord) -> CallEnd {
    CallEnd {
        answered_at: record.answered_at.map(unix_ms),
        ended_at: unix_ms(record.ended_at.unwrap_or_else(SystemTime::now)),
        result_code: record.result_code,
        hangup_side: match record.hangup_side {
            crate::call::HangupSide::Caller => StoredHangupSide::Remote,
            _ => StoredHangupSide::Local,
        },
        cause: record.cause.clone(),
        codec: record.codec.clone(),
        rtp: record.rtp.map_or(
            RtpStats {
                packets: 0,
                lost: 0,
                jitter_ms: 0.0,
            },
            |r| RtpStats {
                packets: r.packets_in,
                lost: u64::try_from(r.lost).unwrap_or(0),
                jitter_ms: f64::from(r.jitter_ms),
            },
        ),
    }
}

/// One call's link to the store, owned by its task.
pub(crate) struct CallStore {
    records: Arc<Records>,
    tenant: String,
    call_id: String,
    recording: Option<Batch>,
    /// Transcript segments are stored (the tenant keeps transcripts and the
    /// caller has not opted out); shared with the task that takes the
    /// pipeline's last transcripts after the call.
    transcripts: Arc<TranscriptSink>,
}

/// Where a call's transcript segments go: numbered `<call_id>/<n>` in the
/// order they arrive.
struct TranscriptSink {
    records: Arc<Records>,
    tenant: String,
    call_id: String,
    enabled: std::sync::atomic::AtomicBool,
    /// The recording is paused (PCI): segments arriving meanwhile are dropped.
    paused: std::sync::atomic::AtomicBool,
    next: AtomicU64,
}

/// One ended call's transcript tail, counted in [`Records::transcript_tails`]
/// while it lives.
struct TailGuard(Arc<AtomicUsize>);

impl TailGuard {
    fn new(count: &Arc<AtomicUsize>) -> TailGuard {
        count.fetch_add(1, Ordering::Relaxed);
        TailGuard(Arc::clone(count))
    }
}

impl Drop for TailGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// How long the store listens for a pipeline's last transcripts after a call
/// (the pipeline's own close wait is shorter; this only bounds the task).
const TRANSCRIPT_TAIL: std::time::Duration = std::time::Duration::from_secs(15);

impl TranscriptSink {
    fn store(&self, t: crate::pipeline::Transcript) {
        if !self.enabled.load(Ordering::Relaxed) || self.paused.load(Ordering::Relaxed) {
            return;
        }
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        self.records.send(Op::Transcript {
            tenant: self.tenant.clone(),
            call_id: self.call_id.clone(),
            id: format!("{}/{n}", self.call_id),
            transcript: Box::new(t),
            at: unix_ms(SystemTime::now()),
        });
    }
}

/// An open recording and the second of audio being gathered for it.
struct Batch {
    handle: u64,
    left: Zeroizing<Vec<i16>>,
    right: Zeroizing<Vec<i16>>,
}

impl CallStore {
    /// Opens the call's CDR (the INVITE was accepted).
    pub(crate) fn start(records: Arc<Records>, row: CallRow) -> CallStore {
        let transcripts = Arc::new(TranscriptSink {
            records: Arc::clone(&records),
            tenant: row.tenant.clone(),
            call_id: row.call_id.clone(),
            enabled: records
                .transcript_tenants
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .contains(&row.tenant)
                .into(),
            paused: false.into(),
            next: AtomicU64::new(1),
        });
        let store = CallStore {
            tenant: row.tenant.clone(),
            call_id: row.call_id.clone(),
            records,
            recording: None,
            transcripts,
        };
        store.records.send(Op::InsertCall(row));
        store
    }

    /// Does what the call core decided ([`StoreOp`]).
    pub(crate) fn apply(&mut self, op: StoreOp) {
        match op {
            StoreOp::StartRecording(at) => self.start_recording(at),
            StoreOp::Consent(Consent::DisclosureStarted, at) => {
                self.consent(ConsentEvent::DisclosureStarted, at);
            }
            StoreOp::Consent(Consent::DisclosureFinished, at) => {
                self.consent(ConsentEvent::DisclosureFinished, at);
            }
            StoreOp::Audio { left, right } => self.audio(&left, &right),
            StoreOp::OptedOut(at) => self.opted_out(at),
            // Transcripts of a paused stretch are not kept (the stream got
            // silence meanwhile; a segment still in flight is dropped too).
            StoreOp::Paused(paused, _) => self.transcripts.paused.store(paused, Ordering::Relaxed),
        }
    }

    fn consent(&self, event: ConsentEvent, at: SystemTime) {
        self.records.send(Op::Consent {
            tenant: self.tenant.clone(),
            call_id: self.call_id.clone(),
            event,
            at: unix_ms(at),
        });
    }

    /// The call's recording opens (the media started: it begins with the
    /// disclosure prompt).
    fn start_recording(&mut self, at: SystemTime) {
        if self.recording.is_some() {
            return;
        }
        let handle = self.records.next_handle.fetch_add(1, Ordering::Relaxed);
        self.records.send(Op::StartRecording {
            handle,
            tenant: self.tenant.clone(),
            call_id: self.call_id.clone(),
            created_at: unix_ms(at),
        });
        self.recording = Some(Batch {
            handle,
            left: Zeroizing::new(Vec::with_capacity(FRAMES_PER_CHUNK)),
            right: Zeroizing::new(Vec::with_capacity(FRAMES_PER_CHUNK)),
        });
    }

    /// One tick of recorded audio; a full second goes to the writer.
    fn audio(&mut self, left: &[i16], right: &[i16]) {
        let Some(b) = &mut self.recording else {
            return;
        };
        b.left.extend_from_slice(left);
        b.right.extend_from_slice(right);
        if b.left.len() >= FRAMES_PER_CHUNK {
            let left = std::mem::replace(
                &mut b.left,
                Zeroizing::new(Vec::with_capacity(FRAMES_PER_CHUNK)),
            );
            let right = std::mem::replace(
                &mut b.right,
                Zeroizing::new(Vec::with_capacity(FRAMES_PER_CHUNK)),
            );
            let handle = b.handle;
            self.records.send(Op::Push {
                handle,
                left,
                right,
            });
        }
    }

    /// The caller opted out (the call core's decision): the recording is
    /// discarded, transcript storage stops, and the opt-out is audited.
    fn opted_out(&mut self, at: SystemTime) {
        self.transcripts.enabled.store(false, Ordering::Relaxed);
        let at = unix_ms(at);
        if let Some(b) = self.recording.take() {
            self.records.send(Op::DiscardRecording {
                handle: b.handle,
                tenant: self.tenant.clone(),
                at,
            });
        }
        self.records.send(Op::Consent {
            tenant: self.tenant.clone(),
            call_id: self.call_id.clone(),
            event: ConsentEvent::OptOut,
            at,
        });
    }

    /// A final transcript segment: sealed under the tenant's data key and
    /// stored by the writer thread when the tenant keeps transcripts;
    /// dropped otherwise.
    pub(crate) fn transcript(&self, t: crate::pipeline::Transcript) {
        self.transcripts.store(t);
    }

    /// After the call: the transcripts the pipeline still sends while it
    /// closes its stream are stored too (a task that ends when the pipeline
    /// does, or after [`TRANSCRIPT_TAIL`]).
    pub(crate) fn transcripts_after_end(
        &self,
        mut rest: tokio::sync::mpsc::Receiver<crate::pipeline::AgentCommand>,
    ) {
        let sink = Arc::clone(&self.transcripts);
        // Counted from now until the task ends, however it ends.
        let tail = TailGuard::new(&self.records.tails);
        tokio::spawn(async move {
            let _tail = tail;
            let _ = tokio::time::timeout(TRANSCRIPT_TAIL, async {
                while let Some(cmd) = rest.recv().await {
                    if let crate::pipeline::AgentCommand::Transcript(t) = cmd {
                        sink.store(t);
                    }
                }
            })
            .await;
        });
    }

    /// The call ended: the recording is finished and the CDR closed.
    pub(crate) fn ended(&mut self, record: &CallRecord) {
        if let Some(b) = self.recording.take() {
            if !b.left.is_empty() {
                self.records.send(Op::Push {
                    handle: b.handle,
                    left: b.left,
                    right: b.right,
                });
            }
            self.records.send(Op::FinishRecording { handle: b.handle });
        }
        self.records.send(Op::FinishCall {
            tenant: self.tenant.clone(),
            call_id: self.call_id.clone(),
            end: call_end(record),
            frames: media_frames(record),
        });
    }
}

/// Size of the file at `path` now (0 if unknown): recording bytes written are
/// counted as the growth of the sealed file, header and chunk overhead included.
fn file_len(path: &Path) -> u64 {
    std::fs::metadata(path).map_or(0, |m| m.len())
}

/// Start-up recovery: recordings left in state `recording` are verified and
/// marked `partial` (or deleted when nothing can be read), then open CDRs
/// are closed as crash-recovered.
fn recover(store: &mut Store, keyring: &KeyRing, now: UnixMs) -> anyhow::Result<()> {
    for rec in store
        .open_recordings_of_crashed()
        .context("listing crashed recordings")?
    {
        match crate::store::recording::recover_wav(&rec.path, keyring) {
            Ok(r) => {
                let size = std::fs::metadata(&rec.path).map_or(0, |m| m.len());
                store
                    .set_recording_state(
                        &rec.id,
                        RecordingState::Partial,
                        size,
                        duration_ms(r.frames),
                    )
                    .context("marking a recording partial")?;
                info!(
                    recording = %rec.id,
                    duration_ms = duration_ms(r.frames),
                    stopped_by = r.stopped_by.as_ref().map(ToString::to_string).unwrap_or_default(),
                    "recovered a recording the previous process was writing"
                );
            }
            Err(crate::store::recording::RecordingError::Io(e))
                if e.kind() == std::io::ErrorKind::NotFound =>
            {
                // Created in the database but the file is gone: nothing to keep.
                warn!(recording = %rec.id, "crashed recording has no file; marking it deleted");
                store
                    .delete_recording(
                        &rec.tenant,
                        &rec.id,
                        "startup",
                        "file missing after a crash",
                        now,
                    )
                    .context("deleting a recording without file")?;
            }
            Err(e) => {
                // Not deleted: the cause may be fixable (e.g. the wrong master
                // key); the next start tries again.
                error!(recording = %rec.id, path = %rec.path.display(), error = %e,
                    "crashed recording cannot be verified; left in state recording");
            }
        }
    }
    let closed = store
        .close_crashed_calls(now)
        .context("closing crashed calls")?;
    if !closed.is_empty() {
        info!(calls = closed.len(), "closed CDRs left open by a crash");
    }
    Ok(())
}

fn duration_ms(frames: u64) -> u64 {
    frames * 1000 / u64::from(SAMPLE_RATE)
}

/// The UTC calendar date of a unix time in milliseconds (proleptic
/// Gregorian, days-from-civil inverted; no date crate is a dependency).
fn utc_date(ms: UnixMs) -> Option<RecordingDate> {
    let days = ms.div_euclid(86_400_000);
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    RecordingDate::new(
        u16::try_from(year).ok()?,
        u8::try_from(month).ok()?,
        u8::try_from(day).ok()?,
    )
    .ok()
}

/// The writer thread's state.
struct Writer {
    /// Shared with [`Records`]: decremented for every operation taken.
    backlog: Arc<AtomicUsize>,
    store: Store,
    keyring: KeyRing,
    var_dir: PathBuf,
    rng: StdRng,
    /// Open recordings by handle: (recording id, writer).
    open: HashMap<u64, (String, RecordingWriter)>,
    /// Each tenant's retention policy, for the sweeper.
    policies: HashMap<String, RetentionPolicy>,
}

impl Writer {
    fn run(mut self, rx: Receiver<Op>) {
        // DESIGN §4: the retention sweeper runs at start-up and on an interval,
        // here on the thread that owns the database.
        let mut next_sweep = std::time::Instant::now();
        loop {
            if std::time::Instant::now() >= next_sweep {
                self.sweep();
                next_sweep = std::time::Instant::now() + SWEEP_INTERVAL;
            }
            let wait = next_sweep.saturating_duration_since(std::time::Instant::now());
            let received = rx.recv_timeout(wait);
            if received.is_ok() {
                self.backlog.fetch_sub(1, Ordering::Relaxed);
            }
            match received {
                Ok(Op::Shutdown) | Err(RecvTimeoutError::Disconnected) => break,
                Ok(op) => self.apply(op),
                Err(RecvTimeoutError::Timeout) => {}
            }
        }
        let handles: Vec<u64> = self.open.keys().copied().collect();
        for handle in handles {
            self.finish(handle);
        }
    }

    /// Deletes what the tenants' retention policies say has expired (each
    /// deletion audited by the store); a tenant no longer configured keeps
    /// its data.
    fn sweep(&mut self) {
        let policies = &self.policies;
        let policy = |tenant: &str| policies.get(tenant).copied();
        let deleter = |p: &Path| std::fs::remove_file(p);
        let sweeper = Sweeper::new(&policy, &deleter);
        match sweeper.run(&mut self.store, unix_ms(SystemTime::now())) {
            Ok(report) => {
                crate::metrics::retention_swept(&report);
                info!(
                    deleted = report.deleted.len(),
                    failed = report.failed.len(),
                    held = report.held.len(),
                    "retention sweep"
                );
            }
            Err(e) => error!(error = %e, "retention sweep failed"),
        }
    }

    fn apply(&mut self, op: Op) {
        match op {
            Op::InsertCall(row) => {
                if let Err(e) = self.store.insert_call(&row) {
                    warn!(call_id = %row.call_id, error = %e, "CDR not stored");
                }
            }
            Op::FinishCall {
                tenant,
                call_id,
                end,
                frames,
            } => {
                if let Err(e) = self
                    .store
                    .finish_call(&tenant, &call_id, &end)
                    .and_then(|()| self.store.set_call_frames(&tenant, &call_id, frames))
                {
                    warn!(%call_id, error = %e, "CDR end not stored");
                }
            }
            Op::Consent {
                tenant,
                call_id,
                event,
                at,
            } => {
                if let Err(e) = self.store.record_consent(&tenant, &call_id, event, at) {
                    warn!(%call_id, ?event, error = %e, "consent event not stored");
                }
            }
            Op::StartRecording {
                handle,
                tenant,
                call_id,
                created_at,
            } => {
                if let Err(e) = self.start(handle, &tenant, &call_id, created_at) {
                    warn!(%call_id, error = %e, "recording not started");
                }
            }
            Op::Push {
                handle,
                left,
                right,
            } => {
                if let Some((id, w)) = self.open.get_mut(&handle) {
                    let before = file_len(w.path());
                    let pushed = w.push(&left, &right);
                    crate::metrics::recording_bytes(file_len(w.path()).saturating_sub(before));
                    if let Err(e) = pushed {
                        // The file keeps what was sealed; the row stays
                        // `recording` and becomes `partial` at the next start.
                        warn!(recording = %id, error = %e, "recording write failed; stopped");
                        self.open.remove(&handle);
                    }
                }
            }
            Op::FinishRecording { handle } => self.finish(handle),
            Op::DiscardRecording { handle, tenant, at } => {
                if let Some((id, w)) = self.open.remove(&handle) {
                    if let Err(e) = w.discard() {
                        warn!(recording = %id, error = %e, "opt-out: removing the file failed");
                    }
                    if let Err(e) =
                        self.store
                            .delete_recording(&tenant, &id, "caller", "consent opt-out", at)
                    {
                        warn!(recording = %id, error = %e, "opt-out: recording row not deleted");
                    }
                }
            }
            Op::Transcript {
                tenant,
                call_id,
                id,
                transcript,
                at,
            } => {
                if let Err(e) = self.transcript(&tenant, &call_id, id, &transcript, at) {
                    warn!(%call_id, error = %e, "transcript not stored");
                }
            }
            Op::Tenants { callers, retention } => {
                for (tenant, policy) in callers {
                    self.store.set_caller_policy(&tenant, policy);
                }
                self.policies = retention;
            }
            Op::Shutdown => {}
        }
    }

    fn transcript(
        &mut self,
        tenant: &str,
        call_id: &str,
        id: String,
        t: &crate::pipeline::Transcript,
        at: UnixMs,
    ) -> anyhow::Result<()> {
        let key = self.keyring.data_key(tenant, &mut self.rng)?;
        let created_unix = u64::try_from(at / 1000).unwrap_or(0);
        let ciphertext =
            crate::store::ops::seal_transcript(&key, &t.text, created_unix, &mut self.rng)?;
        self.store.insert_transcript(&TranscriptRow {
            id,
            call_id: call_id.to_owned(),
            tenant: tenant.to_owned(),
            speaker: t.speaker,
            start_ms: t.start_ms,
            end_ms: t.end_ms,
            ciphertext,
            key_id: key.id().to_string(),
            confidence: t.confidence,
            created_at: at,
        })?;
        Ok(())
    }

    fn start(
        &mut self,
        handle: u64,
        tenant: &str,
        call_id: &str,
        created_at: UnixMs,
    ) -> anyhow::Result<()> {
        let key = self.keyring.data_key(tenant, &mut self.rng)?;
        let date = utc_date(created_at).context("recording date out of range")?;
        let created_unix = u64::try_from(created_at / 1000).unwrap_or(0);
        let writer =
            RecordingWriter::create(&self.var_dir, &key, date, created_unix, &mut self.rng)?;
        let id = writer.file_id().to_hex();
        let row = RecordingRow {
            id: id.clone(),
            call_id: call_id.to_owned(),
            tenant: tenant.to_owned(),
            path: writer.path().to_owned(),
            key_id: key.id().to_string(),
            created_at,
        };
        if let Err(e) = self.store.insert_recording(&row) {
            // No row, no file: nothing unindexed stays on disk.
            let _ = writer.discard();
            return Err(e.into());
        }
        info!(%call_id, recording = %id, "recording started");
        crate::metrics::recording_bytes(file_len(writer.path()));
        self.open.insert(handle, (id, writer));
        Ok(())
    }

    fn finish(&mut self, handle: u64) {
        let Some((id, w)) = self.open.remove(&handle) else {
            return;
        };
        let before = file_len(w.path());
        match w.finish() {
            Ok(s) => {
                crate::metrics::recording_bytes(s.bytes.saturating_sub(before));
                if let Err(e) = self.store.set_recording_state(
                    &id,
                    RecordingState::Complete,
                    s.bytes,
                    duration_ms(s.frames),
                ) {
                    warn!(recording = %id, error = %e, "recording state not stored");
                }
            }
            Err(e) => warn!(recording = %id, error = %e, "finishing the recording failed"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utc_dates() {
        assert_eq!(utc_date(0), RecordingDate::new(1970, 1, 1).ok());
        // 2024-02-29T23:59:59.999Z and the next millisecond.
        assert_eq!(
            utc_date(1_709_251_199_999),
            RecordingDate::new(2024, 2, 29).ok()
        );
        assert_eq!(
            utc_date(1_709_251_200_000),
            RecordingDate::new(2024, 3, 1).ok()
        );
        assert_eq!(
            utc_date(1_798_761_600_000),
            RecordingDate::new(2027, 1, 1).ok()
        );
        assert_eq!(utc_date(-1), None);
    }

    #[test]
    fn master_key_must_be_32_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("master.key");
        std::fs::write(&path, [7u8; 31]).unwrap();
        let err = master_key_bytes(&crate::config::MasterKey::ToGenerate(path.clone()))
            .unwrap_err()
            .to_string();
        assert!(err.contains("exactly 32 bytes, got 31"), "{err}");
        std::fs::write(&path, [7u8; 32]).unwrap();
        let key = master_key_bytes(&crate::config::MasterKey::ToGenerate(path)).unwrap();
        assert_eq!(key.as_slice(), &[7u8; 32]);
    }
}
