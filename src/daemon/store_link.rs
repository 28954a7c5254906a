//! The daemon's side of the store: CDRs, consent events and call recordings
//! written off the async hot path.
//!
//! Owns one writer thread that holds the [`Store`] and the [`KeyRing`] and
//! indexes recordings; call tasks talk to it through one bounded channel with
//! `try_send`, so a call task never waits on the database or on a recording
//! file (a full channel drops the message and counts it). Messages of one
//! call arrive in order because one task sends them. The writer commits
//! what it takes from the queue together as one batch (group commit) and
//! hands each open [`RecordingWriter`]'s file work (creating the file,
//! chunks, last chunk and fsync, opt-out deletion) to one of [`IO_THREADS`]
//! threads, in order.
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
//! (those without audio are deleted with their file, audited), `.sbrec` files
//! no row names are deleted, then open CDRs are closed with cause
//! `crash-recovered`.
//!
//! A full disk (issue 19): the writer checks free space against
//! `[profile.store] min_free_mb` every `check_interval_s`, counts the store
//! unable to write from a failed write until the next check finds it fine,
//! and publishes whether the store can write; the daemon admits
//! recording tenants' calls by it (answered unrecorded, or 503). A recording
//! whose write fails stops (what was sealed is kept as `partial`); database
//! writes that fail wait in a bounded queue, in order, and are retried at each
//! check. Every CDR says whether its call was recorded.

use crate::call::CallRecord;
use crate::call::RecordingStatus;
use crate::call::bridged::{Consent, StoreOp};
use crate::config::StoreSettings;
use crate::store::crypto::KeyRing;
use crate::store::crypto::{DataKey, FileId};
use crate::store::db::{
    CallEnd, CallRecording, CallRow, CallTransfer, CallerIdPolicy, ConsentEvent, DbError,
    MediaFrames, RecordingRow, RecordingState, RtpStats, Store, StoredHangupSide, TranscriptRow,
    UnixMs, unix_ms,
};
use crate::store::objects::RecordingObjects;
use crate::store::recording::{
    EXTENSION, FRAMES_PER_CHUNK, RecordingDate, RecordingSummary, RecordingWriter, SAMPLE_RATE,
    SealedRecording, recording_path,
};
use crate::store::retention::{RetentionPolicy, Sweeper};
use anyhow::Context;
use rand::SeedableRng;
use rand::rngs::StdRng;
use std::collections::{HashMap, HashSet, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU8, AtomicU64, AtomicUsize, Ordering};
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
    /// The uploader completed a recording's object (`kind = "s3"`).
    Uploaded {
        path: PathBuf,
    },
    InsertCall(CallRow),
    MarkOutbound {
        tenant: String,
        call_id: String,
    },
    FinishCall(Box<CallFinish>),
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
        /// Where the writer tells the call's task that the recording failed.
        status: Arc<AtomicU8>,
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
        call_id: String,
        at: UnixMs,
    },
    Transcript {
        tenant: String,
        call_id: String,
        id: String,
        transcript: Box<crate::pipeline::Transcript>,
        at: UnixMs,
    },
    /// A call's transcript sink is gone (the call and its pipeline's tail
    /// ended): every segment it sent is ahead of this in the queue.
    TranscriptsDone {
        tenant: String,
        call_id: String,
    },
    /// A reloaded configuration's tenants (issue 7).
    Tenants {
        callers: Vec<(String, CallerIdPolicy)>,
        retention: HashMap<String, RetentionPolicy>,
    },
    Shutdown,
}

/// A call's end, for its CDR.
struct CallFinish {
    tenant: String,
    call_id: String,
    end: CallEnd,
    frames: MediaFrames,
    /// As the call saw it; the writer corrects it when a write failed.
    recording: CallRecording,
    /// The call's last transfer.
    transfer: Option<CallTransfer>,
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
    /// Whether the store can write (the writer thread decides).
    health: Arc<Health>,
    /// The uploader to the bucket (`[profile.recordings] kind = "s3"`).
    uploader: Mutex<Option<(Arc<super::uploader::Spool>, std::thread::JoinHandle<()>)>>,
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
        settings: StoreSettings,
        events: Arc<super::webhooks::Events>,
        objects: Option<Arc<RecordingObjects>>,
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
        let keyring = KeyRing::open_engine(var_dir, master_key, &settings.engine)
            .context("opening the key ring")?;
        let db = var_dir.join(DB_FILE);
        let mut store =
            Store::open_engine(&settings.engine, &db).with_context(|| match settings.engine {
                crate::config::StoreEngine::Postgres { ref url } => {
                    format!("opening the PostgreSQL store ({})", url.source())
                }
                _ => format!("opening database {}", db.display()),
            })?;
        for t in tenants {
            let policy = CallerIdPolicy::for_tenant(t.hash_caller_numbers, master_key, &t.id);
            store.set_caller_policy(&t.id, policy);
        }
        if let crate::config::StoreEngine::Postgres { .. } = settings.engine {
            let node = node_id(var_dir).context("reading var_dir/node-id")?;
            info!(node = %node, "store: PostgreSQL, shared with other nodes");
            store.set_node(&node);
        }
        if let Err(e) = recover(&mut store, &keyring, var_dir, unix_ms(SystemTime::now())) {
            // Not fatal: a disk too full for the clean-up's writes must not
            // keep the daemon down (recording tenants then fail closed); what
            // is left is cleaned up at the next start.
            error!(error = %format!("{e:#}"), "start-up recovery incomplete; the next start tries again");
        }
        let (tx, rx) = sync_channel(QUEUE);
        let backlog = Arc::new(AtomicUsize::new(0));
        let health = Arc::new(Health {
            writable: true.into(),
        });
        let open_paths = super::uploader::OpenSet::default();
        let uploader = match &objects {
            Some(o) => {
                let (tx, backlog) = (tx.clone(), Arc::clone(&backlog));
                let uploaded: super::uploader::Uploaded = Box::new(move |path| {
                    backlog.fetch_add(1, Ordering::Relaxed);
                    if tx.send(Op::Uploaded { path }).is_err() {
                        backlog.fetch_sub(1, Ordering::Relaxed);
                    }
                });
                Some(
                    super::uploader::start(
                        Arc::clone(o),
                        var_dir.join("recordings"),
                        Arc::clone(&open_paths),
                        uploaded,
                    )
                    .context("starting the recording uploader")?,
                )
            }
            None => None,
        };
        let mut writer = Writer {
            objects,
            open_paths,
            spool: uploader.as_ref().map(|(s, _)| Arc::clone(s)),
            spool_full: false,
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
            failed: HashMap::new(),
            settings,
            health: Arc::clone(&health),
            low_space: false,
            failed_since_check: false,
            retry: VecDeque::new(),
            retried: 0,
            retry_dropped: 0,
            retry_dropped_total: 0,
            events,
            transcripts_stored: HashMap::new(),
            group: false,
            batch_log: Vec::new(),
            ready: Vec::new(),
            batches: 0,
            batched_writes: 0,
            recording_io: RecordingIo::start().context("starting the recording I/O threads")?,
            syncing: HashMap::new(),
        };
        // Free space is known before the first call is admitted.
        writer.check();
        let thread = std::thread::Builder::new()
            .name("sipbridge-store".into())
            .spawn(move || {
                writer.run(rx);
            })
            .context("starting the store thread")?;
        Ok(Records {
            tx,
            thread: Mutex::new(Some(thread)),
            next_handle: AtomicU64::new(1),
            dropped: AtomicU64::new(0),
            backlog,
            transcript_tenants: Mutex::new(transcript_tenants(tenants)),
            tails: Arc::new(AtomicUsize::new(0)),
            health,
            uploader: Mutex::new(uploader),
        })
    }

    /// Ended calls whose pipeline is still closing its stream: transcripts
    /// may yet arrive for them (the drain waits until this is 0, bounded).
    pub(crate) fn transcript_tails(&self) -> usize {
        self.tails.load(Ordering::Relaxed)
    }

    /// Whether the store can write: free space above `min_free_mb` and no
    /// failed write since the last check. When not, recording tenants' new
    /// calls are answered unrecorded or refused (`on_store_failure`).
    pub(crate) fn is_writable(&self) -> bool {
        self.health.writable.load(Ordering::Relaxed)
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

    /// The CDR of `call_id` (opened just before) is an outbound call's.
    pub(crate) fn mark_outbound(&self, tenant: &str, call_id: &str) {
        self.send(Op::MarkOutbound {
            tenant: tenant.to_owned(),
            call_id: call_id.to_owned(),
        });
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
        self.send(Op::FinishCall(Box::new(CallFinish {
            tenant,
            call_id: record.call_id.clone(),
            end: call_end(record),
            frames: media_frames(record),
            recording: call_recording(record.recording),
            transfer: call_transfer(record),
        })));
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
        // After the store thread: every recording is closed for its last pass.
        let uploader = self
            .uploader
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take();
        if let Some((spool, t)) = uploader {
            super::uploader::stop(&spool);
            if t.join().is_err() {
                error!("recording uploader panicked");
            }
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

/// The database's form of whether a call was recorded.
fn call_recording(status: RecordingStatus) -> CallRecording {
    match status {
        RecordingStatus::Off => CallRecording::Off,
        RecordingStatus::NotStarted => CallRecording::NotStarted,
        RecordingStatus::Recorded => CallRecording::Recorded,
        RecordingStatus::Partial => CallRecording::Partial,
        RecordingStatus::NotRecorded => CallRecording::NotRecorded,
        RecordingStatus::OptedOut => CallRecording::OptedOut,
    }
}

/// The database's form of the call's last transfer.
fn call_transfer(record: &CallRecord) -> Option<CallTransfer> {
    record.transfer.as_ref().map(|t| CallTransfer {
        to: t.to.clone(),
        mode: t.mode.as_str().to_owned(),
        result: t.result.to_owned(),
        reason: t.reason.map(str::to_owned),
        status: t.status,
        leg_call_id: t.leg_call_id.clone(),
    })
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
    /// Set by the writer thread when the recording could not be started
    /// ([`REC_NOT_RECORDED`]) or was cut short ([`REC_PARTIAL`]).
    recording_status: Arc<AtomicU8>,
    /// The recording the writer stopped (disk full): an opt-out still
    /// discards what it kept.
    stopped_handle: Option<u64>,
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

impl Drop for TranscriptSink {
    /// The last holder (the call's store link, or the task that took the
    /// pipeline's last transcripts) is gone: `transcript.ready` can go out
    /// once the writer has stored what was sent.
    fn drop(&mut self) {
        if self.next.load(Ordering::Relaxed) > 1 {
            self.records.send(Op::TranscriptsDone {
                tenant: std::mem::take(&mut self.tenant),
                call_id: std::mem::take(&mut self.call_id),
            });
        }
    }
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
            recording_status: Arc::new(AtomicU8::new(REC_OK)),
            stopped_handle: None,
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
            status: Arc::clone(&self.recording_status),
        });
        self.recording = Some(Batch {
            handle,
            left: Zeroizing::new(Vec::with_capacity(FRAMES_PER_CHUNK)),
            right: Zeroizing::new(Vec::with_capacity(FRAMES_PER_CHUNK)),
        });
    }

    /// One tick of recorded audio; a full second goes to the writer.
    fn audio(&mut self, left: &[i16], right: &[i16]) {
        if self.recording.is_some() && self.recording_status.load(Ordering::Relaxed) != REC_OK {
            // The writer could not start it or stopped it (disk full): the
            // audio gathered here would go nowhere.
            self.stopped_handle = self.recording.take().map(|b| b.handle);
        }
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
        // A recording cut short by a full disk is discarded too (what was
        // sealed of it is kept as `partial` otherwise).
        let handle = self
            .recording
            .take()
            .map(|b| b.handle)
            .or(self.stopped_handle.take());
        if let Some(handle) = handle {
            self.records.send(Op::DiscardRecording {
                handle,
                tenant: self.tenant.clone(),
                call_id: self.call_id.clone(),
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

    /// Corrects what the call believes of its recording with what the
    /// writer thread reported so far (not started, or cut short by a full
    /// disk): the CDR log line says the same as the database. A write that
    /// fails after this (the last second) is corrected in the database only.
    pub(crate) fn correct(&self, record: &mut CallRecord) {
        if record.recording != RecordingStatus::Recorded {
            return;
        }
        match self.recording_status.load(Ordering::Relaxed) {
            REC_NOT_RECORDED => record.recording = RecordingStatus::NotRecorded,
            REC_PARTIAL => record.recording = RecordingStatus::Partial,
            _ => {}
        }
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
        self.records.send(Op::FinishCall(Box::new(CallFinish {
            tenant: self.tenant.clone(),
            call_id: self.call_id.clone(),
            end: call_end(record),
            frames: media_frames(record),
            recording: call_recording(record.recording),
            transfer: call_transfer(record),
        })));
    }
}

/// Size of the file at `path` now (0 if unknown): recording bytes written are
/// counted as the growth of the sealed file, header and chunk overhead included.
fn file_len(path: &Path) -> u64 {
    std::fs::metadata(path).map_or(0, |m| m.len())
}

/// This daemon's id among nodes sharing one PostgreSQL store: 16 random hex
/// digits in `var_dir/node-id` (0600), created at the first start. It marks
/// the CDRs this daemon opens, so its start-up recovery closes only those.
fn node_id(var_dir: &Path) -> anyhow::Result<String> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt;
    let path = var_dir.join("node-id");
    match std::fs::read_to_string(&path) {
        Ok(s) if !s.trim().is_empty() => return Ok(s.trim().to_owned()),
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e.into()),
    }
    let mut raw = [0u8; 8];
    rand::RngCore::fill_bytes(&mut rand::rng(), &mut raw);
    let id = hex::encode(raw);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&path)?;
    f.write_all(id.as_bytes())?;
    f.sync_all()?;
    Ok(id)
}

/// Start-up recovery: recordings left in state `recording` are verified and
/// marked `partial`, or deleted when they hold no audio (a crash or a full
/// disk right after the file was created; nothing unreadable is kept, so
/// no zero-byte `.sbrec` stays behind); `.sbrec` files the index does not
/// know are deleted (a crash between creating the file and indexing it);
/// then open CDRs are closed as crash-recovered.
fn recover(
    store: &mut Store,
    keyring: &KeyRing,
    var_dir: &Path,
    now: UnixMs,
) -> anyhow::Result<()> {
    use crate::store::crypto::CryptoError;
    use crate::store::recording::RecordingError;
    for rec in store
        .open_recordings_of_crashed()
        .context("listing crashed recordings")?
    {
        let empty = |store: &mut Store, why: &str| -> anyhow::Result<()> {
            match std::fs::remove_file(&rec.path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => {
                    // The row stays `recording`: the next start tries again.
                    error!(recording = %rec.id, path = %rec.path.display(), error = %e,
                        "recording without audio could not be removed");
                    return Ok(());
                }
            }
            warn!(recording = %rec.id, why, "recording the previous process was writing holds no audio; deleted");
            store
                .delete_recording(&rec.tenant, &rec.id, "startup", why, now)
                .context("deleting a recording without audio")?;
            Ok(())
        };
        match crate::store::recording::recover_wav(&rec.path, keyring) {
            Ok(r) if r.frames == 0 => empty(store, "no sealed audio after a crash or a full disk")?,
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
            Err(RecordingError::Io(e)) if e.kind() == std::io::ErrorKind::NotFound => {
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
            // Not even the header was written: there is nothing to decrypt.
            Err(RecordingError::Crypto(CryptoError::TruncatedHeader)) => {
                empty(store, "file ends inside its header (crash or full disk)")?;
            }
            Err(RecordingError::Io(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                empty(store, "file ends inside its header (crash or full disk)")?;
            }
            Err(e) => {
                // Not deleted: the cause may be fixable (e.g. the wrong master
                // key); the next start tries again.
                error!(recording = %rec.id, path = %rec.path.display(), error = %e,
                    "crashed recording cannot be verified; left in state recording");
            }
        }
    }
    remove_unindexed(store, var_dir)?;
    let closed = store
        .close_crashed_calls(now)
        .context("closing crashed calls")?;
    if !closed.is_empty() {
        info!(calls = closed.len(), "closed CDRs left open by a crash");
    }
    Ok(())
}

/// Deletes `.sbrec` files under `var_dir/recordings` whose name is no live
/// recording's id: retention would never reach them. Only this daemon
/// writes there. By name, not path: a moved `var_dir` keeps its files.
fn remove_unindexed(store: &Store, var_dir: &Path) -> anyhow::Result<()> {
    let known = store
        .live_recording_ids()
        .context("listing recording ids")?;
    let mut stack = vec![var_dir.join("recordings")];
    let (mut removed, mut failed) = (0u64, 0u64);
    while let Some(dir) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            let Ok(kind) = entry.file_type() else {
                continue;
            };
            if kind.is_dir() {
                stack.push(path);
            } else if kind.is_file()
                && path.extension().is_some_and(|e| e == EXTENSION)
                && !path
                    .file_stem()
                    .and_then(|s| s.to_str())
                    .is_some_and(|id| known.contains(id))
            {
                match std::fs::remove_file(&path) {
                    Ok(()) => removed += 1,
                    Err(e) => {
                        failed += 1;
                        error!(path = %path.display(), error = %e, "unindexed recording file could not be removed");
                    }
                }
            }
        }
    }
    if removed > 0 {
        warn!(
            removed,
            failed, "removed recording files no recording row names (crash or full disk)"
        );
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

/// Database writes kept for a retry when they fail for want of space (or
/// another I/O error): CDRs, consent events and recording states must not
/// be lost silently while the disk is full (issue 19).
const RETRY_QUEUE: usize = 10_000;

/// A database write that can be retried.
#[derive(Debug)]
enum DbWrite {
    InsertCall(CallRow),
    MarkOutbound {
        tenant: String,
        call_id: String,
    },
    CloseCall {
        tenant: String,
        call_id: String,
        end: CallEnd,
        frames: MediaFrames,
        recording: CallRecording,
        transfer: Option<CallTransfer>,
    },
    Consent {
        tenant: String,
        call_id: String,
        event: ConsentEvent,
        at: UnixMs,
    },
    RecordingState {
        id: String,
        state: RecordingState,
        size: u64,
        duration_ms: u64,
    },
    DeleteRecording {
        tenant: String,
        id: String,
        actor: &'static str,
        reason: &'static str,
        at: UnixMs,
    },
    InsertRecording(RecordingRow),
    InsertTranscript(TranscriptRow),
}

impl DbWrite {
    fn apply(&self, store: &mut Store) -> Result<(), DbError> {
        match self {
            DbWrite::InsertCall(row) => store.insert_call(row),
            DbWrite::MarkOutbound { tenant, call_id } => store.mark_outbound(tenant, call_id),
            DbWrite::CloseCall {
                tenant,
                call_id,
                end,
                frames,
                recording,
                transfer,
            } => store.close_call(tenant, call_id, end, *frames, *recording, transfer.as_ref()),
            DbWrite::Consent {
                tenant,
                call_id,
                event,
                at,
            } => store.record_consent(tenant, call_id, *event, *at),
            DbWrite::RecordingState {
                id,
                state,
                size,
                duration_ms,
            } => store.set_recording_state(id, *state, *size, *duration_ms),
            DbWrite::DeleteRecording {
                tenant,
                id,
                actor,
                reason,
                at,
            } => store
                .delete_recording(tenant, id, actor, reason, *at)
                .map(|_| ()),
            DbWrite::InsertRecording(row) => store.insert_recording(row),
            DbWrite::InsertTranscript(row) => store.insert_transcript(row),
        }
    }

    /// What it is, for a log line (no caller data).
    fn what(&self) -> &'static str {
        match self {
            DbWrite::InsertCall(_) => "CDR",
            DbWrite::MarkOutbound { .. } => "CDR direction",
            DbWrite::CloseCall { .. } => "CDR end",
            DbWrite::Consent { .. } => "consent event",
            DbWrite::RecordingState { .. } => "recording state",
            DbWrite::DeleteRecording { .. } => "recording deletion",
            DbWrite::InsertRecording(_) => "recording index",
            DbWrite::InsertTranscript(_) => "transcript segment",
        }
    }
}

/// Whether a failed database write may succeed later (space freed, lock
/// released) rather than being wrong in itself.
fn retryable(e: &DbError) -> bool {
    use rusqlite::ErrorCode;
    match e {
        DbError::Sqlite(rusqlite::Error::SqliteFailure(f, _)) => matches!(
            f.code,
            ErrorCode::DiskFull
                | ErrorCode::SystemIoFailure
                | ErrorCode::DatabaseBusy
                | ErrorCode::DatabaseLocked
                | ErrorCode::CannotOpen
                | ErrorCode::ReadOnly
        ),
        // PostgreSQL: a broken or refused connection (the next statement
        // reconnects), or a server-side condition that passes: connection
        // exceptions (08), serialization failures and deadlocks (40),
        // insufficient resources (53), operator intervention such as a
        // restart (57).
        DbError::Postgres(e) => {
            e.is_closed()
                || e.as_db_error().is_none_or(|d| {
                    ["08", "40", "53", "57"]
                        .iter()
                        .any(|class| d.code().code().starts_with(class))
                })
        }
        _ => false,
    }
}

/// Free bytes for unprivileged users on the filesystem of `dir`.
fn free_bytes(dir: &Path) -> Option<u64> {
    let st = nix::sys::statvfs::statvfs(dir).ok()?;
    #[allow(clippy::useless_conversion)]
    let (avail, frsize) = (
        u64::from(st.blocks_available()),
        u64::from(st.fragment_size()),
    );
    Some(avail.saturating_mul(frsize))
}

/// Whether the store can write, shared by the writer thread (which decides)
/// and the daemon (which admits calls by it).
#[derive(Debug)]
struct Health {
    writable: std::sync::atomic::AtomicBool,
}

/// An open recording.
struct OpenRecording {
    meta: RecordingMeta,
    path: PathBuf,
    /// The writer, written through by the recording's I/O thread; empty
    /// once a write failed (or the recording was finished or discarded).
    slot: Slot,
}

/// Where an open recording's writer lives, shared with its I/O thread.
type Slot = Arc<Mutex<Option<RecordingWriter>>>;

/// Whose an open recording is.
struct RecordingMeta {
    id: String,
    tenant: String,
    call_id: String,
    /// What the call's task learns of a failure (see [`CallStore`]).
    status: Arc<AtomicU8>,
}

/// How a call's recording failed.
#[derive(Debug)]
enum Failed {
    /// Not started, or nothing of it kept.
    NotRecorded,
    /// Stopped; what was sealed is kept (an opt-out still deletes it).
    Partial { id: String, path: PathBuf },
}

impl Failed {
    fn outcome(&self) -> CallRecording {
        match self {
            Failed::NotRecorded => CallRecording::NotRecorded,
            Failed::Partial { .. } => CallRecording::Partial,
        }
    }
}

/// [`RecordingMeta::status`] values.
const REC_OK: u8 = 0;
const REC_NOT_RECORDED: u8 = 1;
const REC_PARTIAL: u8 = 2;

/// The writer thread's state.
struct Writer {
    /// The bucket recordings go to (`kind = "s3"`); `None` for local files.
    objects: Option<Arc<RecordingObjects>>,
    /// Recordings being written, for the uploader (empty for local files).
    open_paths: super::uploader::OpenSet,
    /// The uploader's spool size (`kind = "s3"`).
    spool: Option<Arc<super::uploader::Spool>>,
    /// The spool was above `spool_max_mb` at the last check.
    spool_full: bool,
    /// Shared with [`Records`]: decremented for every operation taken.
    backlog: Arc<AtomicUsize>,
    store: Store,
    keyring: KeyRing,
    var_dir: PathBuf,
    rng: StdRng,
    /// Open recordings by handle.
    open: HashMap<u64, OpenRecording>,
    /// Calls whose recording failed (not started, or cut short): what their
    /// CDR's `recording` says instead of what the call believed.
    failed: HashMap<String, Failed>,
    /// Each tenant's retention policy, for the sweeper.
    policies: HashMap<String, RetentionPolicy>,
    settings: StoreSettings,
    health: Arc<Health>,
    /// Free space was below `min_free_mb` at the last check.
    low_space: bool,
    /// A write failed since the last check.
    failed_since_check: bool,
    /// Database writes waiting for a retry, oldest first.
    retry: VecDeque<DbWrite>,
    /// Stored on a retry, and lost for a full queue, since the last report.
    retried: u64,
    retry_dropped: u64,
    retry_dropped_total: u64,
    /// `recording.ready` and `transcript.ready` go out from here.
    events: Arc<super::webhooks::Events>,
    /// Transcript segments stored per call whose sink is still open.
    transcripts_stored: HashMap<String, u64>,
    /// The operations being applied were taken from the queue together:
    /// their database writes share one transaction (group commit).
    group: bool,
    /// Writes applied in the open batch, in order: applied again, one by
    /// one, if the batch fails to commit.
    batch_log: Vec<DbWrite>,
    /// `recording.ready` / `transcript.ready` waiting for the batch that
    /// stores their rows to commit.
    ready: Vec<Ready>,
    /// Batches committed and the writes they held (tests, log).
    batches: u64,
    batched_writes: u64,
    /// The threads that write recordings' files.
    recording_io: RecordingIo,
    /// Calls whose recording waits for its fsync, with their CDR end once
    /// it arrived (it is stored after the recording's state).
    syncing: HashMap<String, Option<Box<CallFinish>>>,
}

/// An event sent once the rows it announces are committed.
enum Ready {
    Recording {
        tenant: String,
        call_id: String,
        rec: super::webhooks::RecordingReady,
    },
    Transcript {
        tenant: String,
        call_id: String,
        segments: u64,
    },
}

/// Operations the writer takes from the queue at most before it commits
/// them as one batch. Bounds how long a batch holds the database's write
/// lock (the admin API's erasure waits for it) and how many writes a failed
/// commit applies again.
const MAX_BATCH: usize = 512;

impl Writer {
    /// The writer thread: takes what is queued (up to [`MAX_BATCH`]
    /// operations at once), applies it with one commit, until `Shutdown`.
    /// Returns itself for tests.
    fn run(mut self, rx: Receiver<Op>) -> Writer {
        // DESIGN §4: the retention sweeper runs at start-up and on an interval,
        // here on the thread that owns the database. Free space is checked
        // and failed writes retried every `check_interval_s`.
        let mut next_sweep = std::time::Instant::now();
        let mut next_check = std::time::Instant::now() + self.settings.check_interval;
        let mut ops = Vec::with_capacity(MAX_BATCH);
        loop {
            let now = std::time::Instant::now();
            if now >= next_check {
                self.check();
                next_check = now + self.settings.check_interval;
            }
            if now >= next_sweep && self.writable() {
                self.sweep();
                next_sweep = now + SWEEP_INTERVAL;
            }
            let mut wait = next_sweep
                .min(next_check)
                .saturating_duration_since(std::time::Instant::now());
            if !self.syncing.is_empty() || !self.open.is_empty() {
                wait = wait.min(SYNC_POLL);
            }
            match rx.recv_timeout(wait) {
                Ok(op) => ops.push(op),
                Err(RecvTimeoutError::Disconnected) => break,
                Err(RecvTimeoutError::Timeout) => {
                    if !self.syncing.is_empty() || !self.open.is_empty() {
                        self.apply_group(&mut ops);
                    }
                    continue;
                }
            }
            while ops.len() < MAX_BATCH {
                match rx.try_recv() {
                    Ok(op) => ops.push(op),
                    Err(_) => break,
                }
            }
            self.backlog.fetch_sub(ops.len(), Ordering::Relaxed);
            if self.apply_group(&mut ops) {
                break;
            }
        }
        // What is left, in one batch: open recordings are finished, the
        // sync threads' last reports taken, the CDRs that waited for them
        // closed (also when a report never came: a sync thread died).
        self.group = true;
        let handles: Vec<u64> = self.open.keys().copied().collect();
        for handle in handles {
            self.finish(handle);
        }
        self.recording_io.stop();
        self.take_synced();
        let waiting: Vec<Box<CallFinish>> = self.syncing.drain().filter_map(|(_, f)| f).collect();
        for f in waiting {
            self.finish_call(*f);
        }
        self.group = false;
        self.end_batch();
        self.flush_retries();
        if !self.retry.is_empty() {
            error!(
                lost = self.retry.len(),
                "store writes lost at shutdown: the database still cannot write (disk full?)"
            );
        }
        self.send_ready();
        if self.batches > 0 {
            info!(
                batches = self.batches,
                writes = self.batched_writes,
                "store writes committed in batches"
            );
        }
        self
    }

    /// Applies operations taken from the queue together, after the sync
    /// threads' reports: their database writes share one transaction (group
    /// commit: one commit, on SQLite one WAL append, instead of one per row).
    /// Returns whether `Shutdown` was among them (what follows it is not
    /// applied).
    fn apply_group(&mut self, ops: &mut Vec<Op>) -> bool {
        self.group = true;
        self.take_synced();
        let mut stop = false;
        for op in ops.drain(..) {
            if let Op::Shutdown = op {
                stop = true;
                break;
            }
            self.apply(op);
        }
        ops.clear();
        self.group = false;
        self.end_batch();
        self.send_ready();
        stop
    }

    /// Commits the open batch, if any. When the commit fails nothing of the
    /// batch is stored: its writes are applied again one by one (those that
    /// still fail wait for a retry, in order, as any failed write).
    fn end_batch(&mut self) {
        if !self.store.in_batch() {
            return;
        }
        match self.store.commit_batch() {
            Ok(()) => {
                self.batches += 1;
                self.batched_writes += self.batch_log.len() as u64;
                crate::metrics::store_batch(self.batch_log.len());
                self.batch_log.clear();
            }
            Err(e) => {
                warn!(writes = self.batch_log.len(), error = %e,
                    "store batch could not commit; its writes are applied one by one");
                self.replay_batch();
            }
        }
    }

    /// The open batch failed (or was rolled back): its writes, one by one.
    fn replay_batch(&mut self) {
        self.store.rollback_batch();
        let group = std::mem::replace(&mut self.group, false);
        for w in std::mem::take(&mut self.batch_log) {
            self.db(w);
        }
        self.group = group;
    }

    /// Sends the events whose rows are committed (or failed for good).
    fn send_ready(&mut self) {
        for r in self.ready.drain(..) {
            match r {
                Ready::Recording {
                    tenant,
                    call_id,
                    rec,
                } => self.events.recording_ready(&tenant, &call_id, &rec),
                Ready::Transcript {
                    tenant,
                    call_id,
                    segments,
                } => self.events.transcript_ready(&tenant, &call_id, segments),
            }
        }
    }

    /// An event for the rows just written: sent after their batch commits.
    fn announce(&mut self, r: Ready) {
        self.ready.push(r);
        if !self.store.in_batch() {
            self.send_ready();
        }
    }

    fn writable(&self) -> bool {
        self.health.writable.load(Ordering::Relaxed)
    }

    /// Every `check_interval_s`: free space against the watermark (one log
    /// line when it crosses, either way), the retry queue, and whether the
    /// store counts as writable until the next check.
    fn check(&mut self) {
        let free = free_bytes(&self.var_dir);
        let min = self.settings.min_free_bytes;
        let low = free.is_some_and(|f| f < min);
        if low != self.low_space {
            let free_mb = free.unwrap_or(0) / (1024 * 1024);
            let min_free_mb = min / (1024 * 1024);
            if low {
                warn!(
                    free_mb,
                    min_free_mb,
                    var_dir = %self.var_dir.display(),
                    "store free space below min_free_mb: recording tenants' new calls are answered \
                     unrecorded or refused (on_store_failure) until it recovers"
                );
            } else {
                info!(
                    free_mb,
                    min_free_mb,
                    var_dir = %self.var_dir.display(),
                    "store free space back above min_free_mb"
                );
            }
            self.low_space = low;
        }
        self.flush_retries();
        let spool_full = self.spool_full();
        let writable = !low && !spool_full && !self.failed_since_check && self.retry.is_empty();
        self.failed_since_check = false;
        self.set_writable(writable);
        crate::metrics::store_state(free, writable);
    }

    /// Whether recordings waiting for the bucket exceed `spool_max_mb` (one
    /// log line when it crosses, either way).
    fn spool_full(&mut self) -> bool {
        let (Some(spool), Some(objects)) = (&self.spool, &self.objects) else {
            return false;
        };
        let (bytes, max) = (spool.bytes(), objects.spool_max_bytes());
        let full = bytes > max;
        if full != self.spool_full {
            let (spool_mb, spool_max_mb) = (bytes / (1024 * 1024), max / (1024 * 1024));
            if full {
                warn!(
                    spool_mb,
                    spool_max_mb,
                    "recordings waiting for the object store exceed spool_max_mb: recording \
                     tenants' new calls are answered unrecorded or refused (on_store_failure) \
                     until uploads catch up"
                );
            } else {
                info!(
                    spool_mb,
                    spool_max_mb, "recording spool back under spool_max_mb"
                );
            }
            self.spool_full = full;
        }
        full
    }

    /// Deletes a recording's file: locally, or the spooled file, any upload
    /// and the object when recordings go to a bucket.
    fn remove_recording_file(&self, path: &Path) -> std::io::Result<()> {
        match &self.objects {
            Some(o) => o.remove_recording(path).map_err(|e| e.into_io()),
            None => std::fs::remove_file(path),
        }
    }

    /// The store thread no longer writes the recording at `path`.
    fn closed(&self, path: &Path) {
        self.open_paths
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(path);
    }

    fn set_writable(&mut self, writable: bool) {
        let was = self.health.writable.swap(writable, Ordering::Relaxed);
        if was && !writable && !self.low_space {
            warn!(
                "store write failed: recording tenants' new calls are answered unrecorded or \
                 refused (on_store_failure) until a check finds it writable"
            );
        } else if !was && writable {
            info!("store writable again");
        }
    }

    /// A write failed for want of space (or another I/O error): the store
    /// does not count as writable until the next check.
    fn write_failed(&mut self, kind: &'static str) {
        crate::metrics::store_write_failed(kind);
        self.failed_since_check = true;
        self.set_writable(false);
    }

    /// A database write, or its place in the retry queue: while writes wait
    /// there, later ones queue behind them, so a call's end is never stored
    /// before its start.
    fn db(&mut self, w: DbWrite) {
        if !self.retry.is_empty() {
            self.queue_retry(w);
            return;
        }
        if let Err(failed) = self.db_now(w) {
            let (w, e) = *failed;
            if retryable(&e) {
                warn!(what = w.what(), error = %e, "store write failed; kept for a retry");
                self.write_failed("database");
                self.queue_retry(w);
            } else {
                warn!(what = w.what(), error = %e, "store write refused");
            }
        }
    }

    /// Applies one database write now, inside the group's batch when the
    /// operations came together (the batch opens at the first write). A
    /// write that fails for a reason that may pass (disk full, connection
    /// lost) ends the batch: the writes before it are applied again one by
    /// one, since SQLite may have rolled the whole transaction back. Returns
    /// the write with its error when it failed (nothing of it is stored).
    fn db_now(&mut self, w: DbWrite) -> Result<(), Box<(DbWrite, DbError)>> {
        if !self.retry.is_empty() {
            // Not ahead of older writes waiting for a retry.
            return Err(Box::new((
                w,
                DbError::Misuse("older writes wait for a retry"),
            )));
        }
        if self.group
            && !self.store.in_batch()
            && let Err(e) = self.store.begin_batch()
        {
            // One by one then; a retryable cause shows in the write too.
            warn!(error = %e, "store batch could not begin");
        }
        match self.store.batched(|s| w.apply(s)) {
            Ok(()) => {
                if self.store.in_batch() {
                    self.batch_log.push(w);
                }
                Ok(())
            }
            Err(e) => {
                if self.store.in_batch() && retryable(&e) {
                    self.replay_batch();
                }
                Err(Box::new((w, e)))
            }
        }
    }

    fn queue_retry(&mut self, w: DbWrite) {
        if self.retry.len() >= RETRY_QUEUE {
            self.retry_dropped += 1;
            self.retry_dropped_total += 1;
        } else {
            self.retry.push_back(w);
        }
    }

    /// Retries the queued writes in order, up to the first that still fails;
    /// reports (one log line per check while any wait) and counts them.
    fn flush_retries(&mut self) {
        let waiting = self.retry.len();
        let mut error = None;
        while let Some(w) = self.retry.front() {
            match w.apply(&mut self.store) {
                Ok(()) => self.retried += 1,
                Err(e) if retryable(&e) => {
                    error = Some(e.to_string());
                    break;
                }
                Err(e) => warn!(what = w.what(), error = %e, "retried store write refused"),
            }
            self.retry.pop_front();
        }
        if !self.retry.is_empty() || self.retry_dropped > 0 {
            warn!(
                pending = self.retry.len(),
                stored = self.retried,
                dropped = self.retry_dropped,
                dropped_total = self.retry_dropped_total,
                error = error.as_deref().unwrap_or(""),
                "store writes waiting for a retry (CDRs, consent, recording states)"
            );
        } else if waiting > 0 {
            info!(
                stored = self.retried,
                "store writes kept for a retry are stored"
            );
        }
        crate::metrics::store_retry(self.retry.len(), self.retried, self.retry_dropped);
        if error.is_some() {
            crate::metrics::store_write_failed("database");
            self.failed_since_check = true;
        }
        self.retried = 0;
        self.retry_dropped = 0;
    }

    /// Deletes what the tenants' retention policies say has expired (each
    /// deletion audited by the store); a tenant no longer configured keeps
    /// its data.
    fn sweep(&mut self) {
        let policies = &self.policies;
        let policy = |tenant: &str| policies.get(tenant).copied();
        let objects = self.objects.clone();
        let deleter = |p: &Path| match &objects {
            Some(o) => o.remove_recording(p).map_err(|e| e.into_io()),
            None => std::fs::remove_file(p),
        };
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
            Op::InsertCall(row) => self.db(DbWrite::InsertCall(row)),
            Op::MarkOutbound { tenant, call_id } => {
                self.db(DbWrite::MarkOutbound { tenant, call_id });
            }
            Op::FinishCall(f) => match self.syncing.get_mut(&f.call_id) {
                // Its recording waits for its fsync: the CDR closes after
                // the recording's state is stored (and corrected by it).
                Some(waiting) => *waiting = Some(f),
                None => self.finish_call(*f),
            },
            Op::Consent {
                tenant,
                call_id,
                event,
                at,
            } => self.db(DbWrite::Consent {
                tenant,
                call_id,
                event,
                at,
            }),
            Op::StartRecording {
                handle,
                tenant,
                call_id,
                created_at,
                status,
            } => self.start(handle, tenant, call_id, created_at, status),
            Op::Push {
                handle,
                left,
                right,
            } => {
                if let Some(rec) = self.open.get(&handle) {
                    let slot = Arc::clone(&rec.slot);
                    self.io(
                        handle,
                        IoJob::Push {
                            handle,
                            slot,
                            left,
                            right,
                        },
                    );
                }
            }
            Op::FinishRecording { handle } => self.finish(handle),
            Op::DiscardRecording {
                handle,
                tenant,
                call_id,
                at,
            } => {
                let kept = match self.open.remove(&handle) {
                    Some(rec) => {
                        // After the audio queued for it; the row is marked
                        // deleted now (start-up removes a file left behind).
                        self.io(
                            handle,
                            IoJob::Discard {
                                slot: rec.slot,
                                id: rec.meta.id.clone(),
                            },
                        );
                        self.closed(&rec.path);
                        Some(rec.meta.id)
                    }
                    // Stopped by a full disk and kept as `partial`.
                    None => match self.failed.remove(&call_id) {
                        Some(Failed::Partial { id, path }) => {
                            if let Err(e) = self.remove_recording_file(&path) {
                                warn!(recording = %id, error = %e, "opt-out: removing the file failed (start-up retries)");
                            }
                            Some(id)
                        }
                        Some(other) => {
                            self.failed.insert(call_id, other);
                            None
                        }
                        None => None,
                    },
                };
                if let Some(id) = kept {
                    self.db(DbWrite::DeleteRecording {
                        tenant,
                        id,
                        actor: "caller",
                        reason: "consent opt-out",
                        at,
                    });
                }
            }
            Op::Transcript {
                tenant,
                call_id,
                id,
                transcript,
                at,
            } => {
                match self.transcript(&tenant, &call_id, id, &transcript, at) {
                    Ok(()) => {
                        if self.transcripts_stored.len() >= RETRY_QUEUE
                            && !self.transcripts_stored.contains_key(&call_id)
                        {
                            // Their `TranscriptsDone` was lost (queue full).
                            self.transcripts_stored.clear();
                        }
                        *self.transcripts_stored.entry(call_id).or_default() += 1;
                    }
                    Err(e) => {
                        warn!(call_id = %crate::logging::wire(&call_id), error = %e, "transcript not stored");
                    }
                }
            }
            Op::TranscriptsDone { tenant, call_id } => {
                if let Some(segments) = self.transcripts_stored.remove(&call_id) {
                    self.announce(Ready::Transcript {
                        tenant,
                        call_id,
                        segments,
                    });
                }
            }
            Op::Tenants { callers, retention } => {
                for (tenant, policy) in callers {
                    self.store.set_caller_policy(&tenant, policy);
                }
                self.policies = retention;
            }
            Op::Uploaded { path } => self.uploaded(&path),
            Op::Shutdown => {}
        }
    }

    /// The uploader completed the object of the recording at `path`: if its
    /// row is gone or deleted (erased on another node while this one still
    /// spooled it), the object is deleted again.
    fn uploaded(&mut self, path: &Path) {
        let Some(objects) = &self.objects else {
            return;
        };
        let Some(id) = path.file_stem().and_then(|s| s.to_str()) else {
            return;
        };
        let live = match self.store.get_recording(None, id) {
            Ok(Some(r)) => r.state != RecordingState::Deleted,
            Ok(None) => false,
            // Unknown: keep the object; retention or erasure will reach it.
            Err(_) => true,
        };
        if !live {
            match objects.delete(path, None) {
                Ok(()) => {
                    warn!(recording = %id, "recording deleted while it was uploading: its object is deleted too");
                }
                Err(e) => {
                    error!(recording = %id, error = %e, "the object of a deleted recording could not be deleted");
                }
            }
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
        self.db_now(DbWrite::InsertTranscript(TranscriptRow {
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
        }))
        .map_err(|f| f.1)?;
        Ok(())
    }

    /// Opens a call's recording (indexed here, its file created by its I/O
    /// thread), unless the store cannot write: then the call goes on
    /// unrecorded and its CDR says so (fail closed).
    fn start(
        &mut self,
        handle: u64,
        tenant: String,
        call_id: String,
        created_at: UnixMs,
        status: Arc<AtomicU8>,
    ) {
        let not_recorded = |w: &mut Writer, why: &str| {
            warn!(call_id = %crate::logging::wire(&call_id), why, "recording not started; the call goes on unrecorded");
            status.store(REC_NOT_RECORDED, Ordering::Relaxed);
            w.failed.insert(call_id.clone(), Failed::NotRecorded);
        };
        if !self.writable() {
            // Its CDR row may still wait in the retry queue, too.
            not_recorded(self, "the store cannot write (disk full)");
            return;
        }
        match self.index(&tenant, &call_id, created_at) {
            Ok(new) => {
                info!(call_id = %crate::logging::wire(&call_id), recording = %new.id, "recording started");
                if self.objects.is_some() {
                    // The uploader walks the spool under this lock: the file
                    // is known to be open before it exists.
                    self.open_paths
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner)
                        .insert(new.path.clone());
                }
                let slot: Slot = Arc::new(Mutex::new(None));
                self.open.insert(
                    handle,
                    OpenRecording {
                        meta: RecordingMeta {
                            id: new.id,
                            tenant,
                            call_id,
                            status,
                        },
                        path: new.path,
                        slot: Arc::clone(&slot),
                    },
                );
                // Before the audio queued after it, on the same thread; a
                // failure comes back as a failed write (`recording_failed`).
                self.io(
                    handle,
                    IoJob::Create {
                        handle,
                        slot,
                        file: new.file,
                    },
                );
            }
            Err(e) => {
                let io = e.chain().any(|c| {
                    c.downcast_ref::<std::io::Error>().is_some()
                        || c.downcast_ref::<DbError>().is_some_and(retryable)
                });
                if io {
                    self.write_failed("recording");
                }
                not_recorded(self, &format!("{e:#}"));
            }
        }
    }

    /// Indexes a new recording of the call (its row, state `recording`)
    /// under a fresh file id. Its file is created by the recording's I/O
    /// thread (creating a file is the costliest thing a recorded call asks
    /// of the file system: ext4 searches its inode bitmap): the store
    /// thread only writes rows. A crash before the file exists leaves a row
    /// whose file is missing, which start-up recovery marks deleted.
    fn index(
        &mut self,
        tenant: &str,
        call_id: &str,
        created_at: UnixMs,
    ) -> anyhow::Result<NewRecording> {
        let key = self.keyring.data_key(tenant, &mut self.rng)?;
        let date = utc_date(created_at).context("recording date out of range")?;
        let created_unix = u64::try_from(created_at / 1000).unwrap_or(0);
        let file_id = FileId::random(&mut self.rng);
        let path = recording_path(&self.var_dir, tenant, date, &file_id);
        let id = file_id.to_hex();
        self.db_now(DbWrite::InsertRecording(RecordingRow {
            id: id.clone(),
            call_id: call_id.to_owned(),
            tenant: tenant.to_owned(),
            path: path.clone(),
            key_id: key.id().to_string(),
            created_at,
        }))
        .map_err(|failed| failed.1)?;
        Ok(NewRecording {
            id,
            path,
            file: Box::new(NewFile {
                var_dir: self.var_dir.clone(),
                key,
                date,
                created_unix,
                file_id,
            }),
        })
    }

    /// A write into an open recording failed (the disk is full): it stops.
    fn recording_failed(&mut self, handle: u64, e: &crate::store::recording::RecordingError) {
        let Some(rec) = self.open.remove(&handle) else {
            return;
        };
        warn!(recording = %rec.meta.id, error = %e, "recording write failed; the recording stops here");
        // Closed (the I/O thread emptied the slot already).
        drop(slot_take(&rec.slot));
        self.salvage(rec.meta, &rec.path);
        self.closed(&rec.path);
    }

    /// After a failed write: what was sealed before is kept and marked
    /// `partial`; a file with no whole second is deleted (audited). The
    /// CDR says which.
    fn salvage(&mut self, rec: RecordingMeta, path: &Path) {
        self.write_failed("recording");
        let frames = crate::store::recording::WavStream::open(path, &self.keyring, false)
            .map_or(0, |s| s.frames());
        let at = unix_ms(SystemTime::now());
        let outcome = if frames > 0 {
            self.db(DbWrite::RecordingState {
                id: rec.id.clone(),
                state: RecordingState::Partial,
                size: file_len(path),
                duration_ms: duration_ms(frames),
            });
            rec.status.store(REC_PARTIAL, Ordering::Relaxed);
            self.announce(Ready::Recording {
                tenant: rec.tenant.clone(),
                call_id: rec.call_id.clone(),
                rec: super::webhooks::RecordingReady {
                    recording_id: rec.id.clone(),
                    state: "partial",
                    duration_ms: duration_ms(frames),
                    bytes: file_len(path),
                },
            });
            Failed::Partial {
                id: rec.id,
                path: path.to_owned(),
            }
        } else {
            match std::fs::remove_file(path) {
                // Its I/O thread could not create it.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => {
                    warn!(error = %e, "recording without audio could not be removed (start-up retries)");
                }
                Ok(()) => {}
            }
            self.db(DbWrite::DeleteRecording {
                tenant: rec.tenant,
                id: rec.id,
                actor: "store",
                reason: "no audio could be written (disk full)",
                at,
            });
            rec.status.store(REC_NOT_RECORDED, Ordering::Relaxed);
            Failed::NotRecorded
        };
        if self.failed.len() >= RETRY_QUEUE {
            // Their CDR ends were lost (queue full): nothing will take them.
            self.failed.clear();
        }
        self.failed.insert(rec.call_id, outcome);
    }

    /// Hands a recording's end to its I/O thread (after its queued audio):
    /// the last chunk is sealed and the file fsynced there; its state is
    /// stored when that is done ([`Writer::synced`]).
    fn finish(&mut self, handle: u64) {
        let Some(rec) = self.open.remove(&handle) else {
            return;
        };
        self.syncing.insert(rec.meta.call_id.clone(), None);
        self.io(
            handle,
            IoJob::Finish {
                slot: rec.slot,
                meta: rec.meta,
                path: rec.path,
            },
        );
    }

    /// Queues a job on the I/O thread of recording `handle` (waits while
    /// that thread is 256 jobs behind: the store queue then fills and the
    /// daemon sheds calls); runs it here when the threads are gone.
    fn io(&mut self, handle: u64, job: IoJob) {
        if let Err(job) = self.recording_io.send(handle, job)
            && let Some(done) = job.run()
        {
            self.io_done(done);
        }
    }

    fn io_done(&mut self, done: IoDone) {
        match done {
            IoDone::Synced(s) => self.synced(s),
            IoDone::PushFailed { handle, error } => self.recording_failed(handle, &error),
        }
    }

    /// What the recordings' I/O threads reported since the last look.
    fn take_synced(&mut self) {
        while let Ok(done) = self.recording_io.done.try_recv() {
            self.io_done(done);
        }
    }

    /// A recording's fsync is done: its state is stored (`complete`, or
    /// `partial` when the sync failed), `recording.ready` goes out, and the
    /// call's CDR closes if it waited for this.
    fn synced(&mut self, s: Synced) {
        let call_id = s.meta.call_id.clone();
        match s.result {
            Ok(summary) => {
                self.db(DbWrite::RecordingState {
                    id: s.meta.id.clone(),
                    state: RecordingState::Complete,
                    size: summary.bytes,
                    duration_ms: duration_ms(summary.frames),
                });
                self.announce(Ready::Recording {
                    tenant: s.meta.tenant,
                    call_id: s.meta.call_id,
                    rec: super::webhooks::RecordingReady {
                        recording_id: s.meta.id,
                        state: "complete",
                        duration_ms: duration_ms(summary.frames),
                        bytes: summary.bytes,
                    },
                });
            }
            Err(e) => {
                warn!(recording = %s.meta.id, error = %e, "finishing the recording failed");
                self.salvage(s.meta, &s.path);
            }
        }
        self.closed(&s.path);
        if let Some(Some(f)) = self.syncing.remove(&call_id) {
            self.finish_call(*f);
        }
    }

    /// Closes a call's CDR, saying what became of its recording.
    fn finish_call(&mut self, f: CallFinish) {
        let CallFinish {
            tenant,
            call_id,
            end,
            frames,
            recording,
            transfer,
        } = f;
        let recording = match self.failed.remove(&call_id) {
            // The caller's opt-out stands: what was kept is gone.
            Some(_) if recording == CallRecording::OptedOut => recording,
            Some(f) => f.outcome(),
            None => recording,
        };
        self.db(DbWrite::CloseCall {
            tenant,
            call_id,
            end,
            frames,
            recording,
            transfer,
        });
    }
}

/// Threads that write recordings: each recording's audio chunks, last
/// chunk, fsync or opt-out deletion run in order on one of them (chosen by
/// its handle), so the store thread only writes rows, and fsyncs issued in
/// parallel share the filesystem's journal commits (0.43 ms each one after
/// another, 0.10 ms each 16 at a time on this project's test VM).
const IO_THREADS: usize = 4;

/// How much nicer than the daemon's other threads the recording I/O threads
/// are (Linux: per thread; each step is ~1.25× less CPU share when the CPUs
/// are contended; capped at 19).
const IO_NICE: i32 = 5;

/// Jobs waiting for one I/O thread, at most (a second of audio each).
const IO_QUEUE: usize = 256;

/// How often the idle writer looks for the I/O threads' reports while
/// recordings are open or finishing.
const SYNC_POLL: std::time::Duration = std::time::Duration::from_millis(5);

/// Work for a recording's I/O thread.
enum IoJob {
    /// Creates the indexed recording's file (directories, file, sealed
    /// header) into `slot`.
    Create {
        handle: u64,
        slot: Slot,
        file: Box<NewFile>,
    },
    Push {
        handle: u64,
        slot: Slot,
        left: Zeroizing<Vec<i16>>,
        right: Zeroizing<Vec<i16>>,
    },
    Finish {
        slot: Slot,
        meta: RecordingMeta,
        path: PathBuf,
    },
    Discard {
        slot: Slot,
        id: String,
    },
}

/// A recording indexed by the store thread: its id, path, and what its I/O
/// thread needs to create its file.
struct NewRecording {
    id: String,
    path: PathBuf,
    file: Box<NewFile>,
}

/// A recording file to create ([`RecordingWriter::create_as`]).
struct NewFile {
    var_dir: PathBuf,
    key: DataKey,
    date: RecordingDate,
    created_unix: u64,
    file_id: FileId,
}

/// An I/O thread's report.
enum IoDone {
    Synced(Synced),
    /// A chunk could not be written (disk full): the writer is dropped, its
    /// later jobs do nothing.
    PushFailed {
        handle: u64,
        error: crate::store::recording::RecordingError,
    },
}

/// A finished recording: synced, or why not.
struct Synced {
    meta: RecordingMeta,
    path: PathBuf,
    result: Result<RecordingSummary, crate::store::recording::RecordingError>,
}

fn slot_take(slot: &Slot) -> Option<RecordingWriter> {
    slot.lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .take()
}

impl IoJob {
    /// Does the job; what the store thread must hear of it.
    fn run(self) -> Option<IoDone> {
        match self {
            IoJob::Create { handle, slot, file } => match RecordingWriter::create_as(
                &file.var_dir,
                &file.key,
                file.date,
                file.created_unix,
                file.file_id,
            ) {
                Ok(writer) => {
                    crate::metrics::recording_bytes(writer.bytes_written());
                    *slot
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(writer);
                    None
                }
                // No file is left behind; the writer salvages nothing and
                // marks the row deleted (audited), the call not recorded.
                Err(error) => Some(IoDone::PushFailed { handle, error }),
            },
            IoJob::Push {
                handle,
                slot,
                left,
                right,
            } => {
                let mut guard = slot
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                // Failed or finished before: nothing to write to.
                let writer = guard.as_mut()?;
                let before = writer.bytes_written();
                let pushed = writer.push(&left, &right);
                crate::metrics::recording_bytes(writer.bytes_written() - before);
                match pushed {
                    Ok(()) => None,
                    Err(error) => {
                        *guard = None;
                        Some(IoDone::PushFailed { handle, error })
                    }
                }
            }
            IoJob::Finish { slot, meta, path } => {
                let result = match slot_take(&slot) {
                    Some(writer) => {
                        let before = writer.bytes_written();
                        writer.seal().and_then(SealedRecording::sync).inspect(|s| {
                            crate::metrics::recording_bytes(s.bytes.saturating_sub(before));
                        })
                    }
                    None => Err(std::io::Error::other("an earlier write of it failed").into()),
                };
                Some(IoDone::Synced(Synced { meta, path, result }))
            }
            IoJob::Discard { slot, id } => {
                if let Some(writer) = slot_take(&slot)
                    && let Err(e) = writer.discard()
                {
                    warn!(recording = %id, error = %e, "opt-out: removing the file failed");
                }
                None
            }
        }
    }
}

/// The recordings' I/O threads and their channels.
struct RecordingIo {
    /// One queue per thread; empty once stopped.
    jobs: Vec<SyncSender<IoJob>>,
    done: Receiver<IoDone>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl RecordingIo {
    /// Starts the threads. The writer looks at their reports before each
    /// batch, and at least every [`SYNC_POLL`] while any may come.
    fn start() -> std::io::Result<RecordingIo> {
        let (done_tx, done) = std::sync::mpsc::channel();
        let mut jobs = Vec::with_capacity(IO_THREADS);
        let mut threads = Vec::with_capacity(IO_THREADS);
        for i in 0..IO_THREADS {
            let (tx, rx) = sync_channel::<IoJob>(IO_QUEUE);
            let done_tx = done_tx.clone();
            let thread = std::thread::Builder::new()
                .name(format!("sipbridge-rec{i}"))
                .spawn(move || {
                    // Below the media and the store thread when the CPUs are
                    // short: a lagging recording backs up into its bounded
                    // queue (and the store's 503), not into late audio.
                    let me = Some(rustix::thread::gettid());
                    if let Err(e) = rustix::process::getpriority_process(me).and_then(|nice| {
                        rustix::process::setpriority_process(me, (nice + IO_NICE).min(19))
                    }) {
                        warn!(error = %e, "recording I/O thread: nice value not set");
                    }
                    while let Ok(job) = rx.recv() {
                        if let Some(d) = job.run()
                            && done_tx.send(d).is_err()
                        {
                            break;
                        }
                    }
                })?;
            jobs.push(tx);
            threads.push(thread);
        }
        Ok(RecordingIo {
            jobs,
            done,
            threads,
        })
    }

    /// Queues `job` on recording `handle`'s thread; gives it back when the
    /// threads are gone.
    fn send(&self, handle: u64, job: IoJob) -> Result<(), IoJob> {
        if self.jobs.is_empty() {
            return Err(job);
        }
        let i = usize::try_from(handle % self.jobs.len() as u64).unwrap_or(0);
        self.jobs[i].send(job).map_err(|e| e.0)
    }

    /// Lets the threads finish what they were given, and waits for them.
    fn stop(&mut self) {
        self.jobs.clear();
        for t in self.threads.drain(..) {
            if t.join().is_err() {
                error!("recording I/O thread panicked");
            }
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

    /// A writer on `dir` with tenant `demo` and one open call `c1`.
    fn writer(dir: &Path) -> Writer {
        let keyring = KeyRing::open(dir, &[7u8; 32]).unwrap();
        let mut store = Store::open(&dir.join(DB_FILE)).unwrap();
        store.set_caller_policy("demo", CallerIdPolicy::Plain);
        store
            .insert_call(&CallRow {
                call_id: "c1".into(),
                tenant: "demo".into(),
                trunk: "t".into(),
                from: "+15550001111".into(),
                to: "+15551234567".into(),
                started_at: 1_767_312_000_000,
            })
            .unwrap();
        Writer {
            objects: None,
            open_paths: Default::default(),
            spool: None,
            spool_full: false,
            backlog: Arc::new(AtomicUsize::new(0)),
            store,
            keyring,
            var_dir: dir.to_owned(),
            rng: StdRng::seed_from_u64(19),
            open: HashMap::new(),
            failed: HashMap::new(),
            policies: HashMap::new(),
            settings: StoreSettings::default(),
            health: Arc::new(Health {
                writable: true.into(),
            }),
            low_space: false,
            failed_since_check: false,
            retry: VecDeque::new(),
            retried: 0,
            retry_dropped: 0,
            retry_dropped_total: 0,
            events: Arc::default(),
            transcripts_stored: HashMap::new(),
            group: false,
            batch_log: Vec::new(),
            ready: Vec::new(),
            batches: 0,
            batched_writes: 0,
            recording_io: RecordingIo::start().unwrap(),
            syncing: HashMap::new(),
        }
    }

    /// A recording stopped by a failed write keeps what was sealed (`partial`);
    /// the caller's opt-out afterwards still deletes it, and the CDR says
    /// `opted-out`. Without an opt-out the CDR says `partial`.
    #[test]
    fn a_recording_cut_by_the_disk_is_partial_and_an_opt_out_still_deletes_it() {
        for opt_out in [false, true] {
            let dir = tempfile::tempdir().unwrap();
            let mut w = writer(dir.path());
            let status = Arc::new(AtomicU8::new(REC_OK));
            start_recording(&mut w, &status);
            let second = Zeroizing::new(vec![100i16; FRAMES_PER_CHUNK]);
            w.apply(Op::Push {
                handle: 1,
                left: second.clone(),
                right: second,
            });
            // The second is written by the recording's I/O thread.
            let path = w.open[&1].path.clone();
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
            while file_len(&path) < 32_000 && std::time::Instant::now() < deadline {
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
            // The next write fails (as on a full disk): what the writer does then.
            let rec = w.open.remove(&1).unwrap();
            drop(slot_take(&rec.slot));
            w.salvage(rec.meta, &path);
            assert_eq!(status.load(Ordering::Relaxed), REC_PARTIAL);
            assert!(!w.writable(), "a failed write makes the store unwritable");
            let id = w.store.recordings_of_call("demo", "c1").unwrap()[0]
                .id
                .clone();
            let state = |w: &Writer| w.store.recordings_of_call("demo", "c1").unwrap()[0].state;
            assert_eq!(state(&w), RecordingState::Partial);
            let mut recording = CallRecording::Recorded;
            if opt_out {
                w.apply(Op::DiscardRecording {
                    handle: 1,
                    tenant: "demo".into(),
                    call_id: "c1".into(),
                    at: 1_767_312_005_000,
                });
                assert!(!path.exists(), "the opted-out partial file is deleted");
                assert_eq!(state(&w), RecordingState::Deleted);
                recording = CallRecording::OptedOut;
            } else {
                assert!(path.exists());
            }
            w.apply(Op::FinishCall(Box::new(CallFinish {
                tenant: "demo".into(),
                call_id: "c1".into(),
                end: CallEnd {
                    answered_at: Some(1_767_312_000_000),
                    ended_at: 1_767_312_010_000,
                    result_code: 200,
                    hangup_side: StoredHangupSide::Remote,
                    cause: "caller-bye".into(),
                    codec: None,
                    rtp: RtpStats {
                        packets: 0,
                        lost: 0,
                        jitter_ms: 0.0,
                    },
                },
                frames: MediaFrames::default(),
                recording,
                transfer: None,
            })));
            let cdr = w.store.get_call("demo", "c1").unwrap().unwrap();
            let want = if opt_out {
                CallRecording::OptedOut
            } else {
                CallRecording::Partial
            };
            assert_eq!(cdr.recording, Some(want), "{id}");
        }
    }

    /// Starts recording 1 of call `c1` of tenant `demo`, its status in `status`.
    fn start_recording(w: &mut Writer, status: &Arc<AtomicU8>) {
        w.apply(Op::StartRecording {
            handle: 1,
            tenant: "demo".into(),
            call_id: "c1".into(),
            created_at: 1_767_312_000_000,
            status: Arc::clone(status),
        });
    }

    /// Waits (bounded) until `done` says so, taking the I/O threads' reports.
    fn wait_for(w: &mut Writer, mut done: impl FnMut(&mut Writer) -> bool) {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while !done(w) {
            assert!(std::time::Instant::now() < deadline, "timed out");
            std::thread::sleep(std::time::Duration::from_millis(5));
            w.take_synced();
        }
    }

    /// Issue 17: a recording's file is created by its I/O thread, not by the
    /// store thread: the store thread indexes it (row `recording`, its path)
    /// and goes on while that thread is busy; the file appears, with its
    /// sealed header, once the thread gets to it, and the audio queued after
    /// it lands in it.
    #[test]
    fn a_recording_is_indexed_at_once_and_its_file_created_by_its_io_thread() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = writer(dir.path());
        // Recording 1's I/O thread is held up by a job waiting for this lock.
        let blocker: Slot = Arc::new(Mutex::new(None));
        let held = blocker.lock().unwrap();
        let second = Zeroizing::new(vec![100i16; FRAMES_PER_CHUNK]);
        assert!(
            w.recording_io
                .send(
                    1,
                    IoJob::Push {
                        handle: 1,
                        slot: Arc::clone(&blocker),
                        left: second.clone(),
                        right: second.clone(),
                    },
                )
                .is_ok()
        );
        let status = Arc::new(AtomicU8::new(REC_OK));
        start_recording(&mut w, &status);
        let path = w.open[&1].path.clone();
        let rows = w.store.recordings_of_call("demo", "c1").unwrap();
        assert_eq!(rows.len(), 1);
        assert_eq!(rows[0].state, RecordingState::Recording);
        assert_eq!(rows[0].path, path);
        assert!(
            path.ends_with(format!("demo/2026/01/02/{}.{EXTENSION}", rows[0].id)),
            "{}",
            path.display()
        );
        assert!(!path.exists(), "the store thread did not create the file");
        w.apply(Op::Push {
            handle: 1,
            left: second.clone(),
            right: second,
        });
        w.apply(Op::FinishRecording { handle: 1 });
        drop(held);
        wait_for(&mut w, |w| w.syncing.is_empty());
        assert_eq!(status.load(Ordering::Relaxed), REC_OK);
        let rows = w.store.recordings_of_call("demo", "c1").unwrap();
        assert_eq!(rows[0].state, RecordingState::Complete);
        let wav = crate::store::recording::export_wav(&path, &w.keyring).unwrap();
        let samples: Vec<i16> = wav[44..]
            .chunks_exact(2)
            .map(|b| i16::from_le_bytes([b[0], b[1]]))
            .collect();
        assert_eq!(samples.len(), 2 * FRAMES_PER_CHUNK, "one second, stereo");
        assert!(samples.iter().all(|&s| s == 100));
    }

    /// A recording whose file its I/O thread cannot create (here the
    /// tenant's directory is a file) is not recorded: its row is marked
    /// deleted (audited, no audio written), the call hears of it, no file
    /// is left, and the CDR says `not-recorded`.
    #[test]
    fn a_recording_whose_file_cannot_be_created_is_not_recorded() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = writer(dir.path());
        std::fs::create_dir_all(dir.path().join("recordings")).unwrap();
        std::fs::write(dir.path().join("recordings/demo"), b"in the way").unwrap();
        let status = Arc::new(AtomicU8::new(REC_OK));
        start_recording(&mut w, &status);
        let path = w.open[&1].path.clone();
        wait_for(&mut w, |w| w.open.is_empty());
        assert_eq!(status.load(Ordering::Relaxed), REC_NOT_RECORDED);
        let rows = w.store.recordings_of_call("demo", "c1").unwrap();
        assert_eq!(rows.len(), 1);
        assert_eq!(rows[0].state, RecordingState::Deleted);
        let audit = w
            .store
            .audit_log(&crate::store::db::AuditFilter {
                object_id: Some(rows[0].id.clone()),
                ..Default::default()
            })
            .unwrap();
        assert_eq!(audit.len(), 1, "{audit:?}");
        assert_eq!(audit[0].actor, "store");
        assert!(!path.exists());
        // Audio and the end that were queued meanwhile go nowhere.
        let second = Zeroizing::new(vec![100i16; FRAMES_PER_CHUNK]);
        w.apply(Op::Push {
            handle: 1,
            left: second.clone(),
            right: second,
        });
        w.apply(Op::FinishRecording { handle: 1 });
        w.apply(Op::FinishCall(Box::new(CallFinish {
            tenant: "demo".into(),
            call_id: "c1".into(),
            end: cdr_end(1_767_312_010_000),
            frames: MediaFrames::default(),
            recording: CallRecording::Recorded,
            transfer: None,
        })));
        let cdr = w.store.get_call("demo", "c1").unwrap().unwrap();
        assert_eq!(cdr.recording, Some(CallRecording::NotRecorded));
        assert!(!dir.path().join("recordings/demo").is_dir());
    }

    /// The recording I/O threads run [`IO_NICE`] nicer than the thread that
    /// started them: when the CPUs are short the media goes first.
    #[test]
    fn recording_io_threads_run_below_the_media() {
        // Field 19 of /proc/.../stat (nice), counted after the parenthesised name.
        let nice_of = |stat: &str| -> i32 {
            let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
            rest.split_whitespace().nth(16).unwrap().parse().unwrap()
        };
        let here = nice_of(&std::fs::read_to_string("/proc/thread-self/stat").unwrap());
        let want = (here + IO_NICE).min(19);
        let mut io = RecordingIo::start().unwrap();
        let nice_of_io_threads = || -> Vec<i32> {
            let mut nice = Vec::new();
            for task in std::fs::read_dir("/proc/self/task").unwrap().flatten() {
                let comm = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
                if !comm.starts_with("sipbridge-rec") {
                    continue;
                }
                if let Ok(stat) = std::fs::read_to_string(task.path().join("stat")) {
                    nice.push(nice_of(&stat));
                }
            }
            nice
        };
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            let nice = nice_of_io_threads();
            if nice.len() >= IO_THREADS && nice.iter().all(|&n| n == want) {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "{nice:?}, want {want}"
            );
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        let after = nice_of(&std::fs::read_to_string("/proc/thread-self/stat").unwrap());
        assert_eq!(after, here, "the other threads keep theirs");
        io.stop();
    }

    fn cdr_end(at: UnixMs) -> CallEnd {
        CallEnd {
            answered_at: Some(at - 1000),
            ended_at: at,
            result_code: 200,
            hangup_side: StoredHangupSide::Remote,
            cause: "caller-bye".into(),
            codec: None,
            rtp: RtpStats {
                packets: 50,
                lost: 0,
                jitter_ms: 0.0,
            },
        }
    }

    /// Group commit (issue 17): what is queued when the writer looks is
    /// taken together and committed once: 40 recorded calls (CDR, consent,
    /// recording index, a second of audio, recording state, CDR end) are
    /// one commit, every row and file in place.
    #[test]
    fn queued_calls_are_stored_with_one_commit() {
        let dir = tempfile::tempdir().unwrap();
        let w = writer(dir.path());
        let (tx, rx) = sync_channel(QUEUE);
        const CALLS: u64 = 40;
        let t0 = 1_767_312_000_000;
        for n in 0..CALLS {
            let call_id = format!("g{n}");
            let at = t0 + i64::try_from(n).unwrap();
            tx.send(Op::InsertCall(CallRow {
                call_id: call_id.clone(),
                tenant: "demo".into(),
                trunk: "t".into(),
                from: "+15550001111".into(),
                to: "+15551234567".into(),
                started_at: at,
            }))
            .unwrap();
            tx.send(Op::StartRecording {
                handle: n + 1,
                tenant: "demo".into(),
                call_id: call_id.clone(),
                created_at: at,
                status: Arc::new(AtomicU8::new(REC_OK)),
            })
            .unwrap();
            tx.send(Op::Consent {
                tenant: "demo".into(),
                call_id: call_id.clone(),
                event: ConsentEvent::DisclosureStarted,
                at,
            })
            .unwrap();
            let second = Zeroizing::new(vec![100i16; FRAMES_PER_CHUNK]);
            tx.send(Op::Push {
                handle: n + 1,
                left: second.clone(),
                right: second,
            })
            .unwrap();
            tx.send(Op::FinishRecording { handle: n + 1 }).unwrap();
            tx.send(Op::FinishCall(Box::new(CallFinish {
                tenant: "demo".into(),
                call_id,
                end: cdr_end(at + 2000),
                frames: MediaFrames::default(),
                recording: CallRecording::Recorded,
                transfer: None,
            })))
            .unwrap();
        }
        tx.send(Op::Shutdown).unwrap();
        let before = w.store.commits();
        let w = w.run(rx);
        // The lot, then (at shutdown) the recordings' states once their
        // fsyncs are done and the CDR ends that waited for them.
        assert!(
            w.store.commits() - before <= 2,
            "{}",
            w.store.commits() - before
        );
        assert!(w.batches <= 2);
        // Per call: CDR, recording index, consent, recording state, CDR end.
        assert_eq!(w.batched_writes, CALLS * 5);
        for n in 0..CALLS {
            let call_id = format!("g{n}");
            let cdr = w.store.get_call("demo", &call_id).unwrap().unwrap();
            assert_eq!(cdr.recording, Some(CallRecording::Recorded));
            assert!(cdr.ended_at.is_some() && cdr.consent.disclosure_started_at.is_some());
            let recs = w.store.recordings_of_call("demo", &call_id).unwrap();
            assert_eq!(recs.len(), 1);
            assert_eq!(recs[0].state, RecordingState::Complete);
            assert_eq!(recs[0].duration_ms, 1000, "{call_id}");
            let wav = crate::store::recording::export_wav(&recs[0].path, &w.keyring).unwrap();
            assert_eq!(wav.len(), 44 + FRAMES_PER_CHUNK * 4);
        }
        assert!(w.ready.is_empty(), "every recording.ready went out");
    }

    /// A batch that cannot commit is rolled back whole: its writes are
    /// applied again one by one, so nothing of it is lost.
    #[test]
    fn a_batch_that_fails_is_applied_again_write_by_write() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = writer(dir.path());
        w.group = true;
        for n in 0..3 {
            w.apply(Op::InsertCall(CallRow {
                call_id: format!("r{n}"),
                tenant: "demo".into(),
                trunk: "t".into(),
                from: "+15550001111".into(),
                to: "+15551234567".into(),
                started_at: 1_767_312_000_000,
            }));
        }
        assert!(w.store.in_batch());
        assert_eq!(w.batch_log.len(), 3);
        // As when COMMIT fails: the batch is gone, its writes come again.
        let before = w.store.commits();
        w.replay_batch();
        assert!(!w.store.in_batch());
        assert!(w.batch_log.is_empty());
        assert_eq!(w.store.commits() - before, 3);
        for n in 0..3 {
            assert!(
                w.store
                    .get_call("demo", &format!("r{n}"))
                    .unwrap()
                    .is_some()
            );
        }
        // The group goes on in a new batch.
        w.apply(Op::InsertCall(CallRow {
            call_id: "r3".into(),
            tenant: "demo".into(),
            trunk: "t".into(),
            from: "+15550001111".into(),
            to: "+15551234567".into(),
            started_at: 1_767_312_000_000,
        }));
        assert!(w.store.in_batch());
        w.group = false;
        w.end_batch();
        assert!(w.store.get_call("demo", "r3").unwrap().is_some());
    }
}
