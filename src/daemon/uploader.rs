//! Moves spooled recordings to the S3 bucket (`[profile.recordings] kind = "s3"`).
//!
//! Owns one thread that, every [`TICK`], walks the spool (`var_dir/recordings`,
//! where the store thread writes each recording exactly as for local files) and
//! calls [`RecordingObjects::ship`] on every `.sbrec` file: a recording still
//! being written gets each whole 5 MiB part uploaded as it fills; one the store
//! thread closed (finished, cut short, or left by a crash and recovered at
//! start) gets its last part, the object is completed and the local file
//! removed. The store thread says which files are open through [`OpenSet`];
//! it holds the set's lock while it creates a file, so a new file is never
//! taken for a closed one.
//!
//! A failure (the service down, refused credentials) leaves the file in the
//! spool and is retried with exponential back-off per file (1 s doubling to
//! [`MAX_BACKOFF`]); object_store already retried each request. The spool's
//! size is published ([`Spool::bytes`]) so the store counts as unable to
//! write once it exceeds `spool_max_mb`: recording tenants' new calls are then
//! answered unrecorded or refused, as for a full disk. At start, multipart
//! uploads a crash left (named by `.upload` markers) are aborted before the
//! files are shipped again from their first byte.
//!
//! Must not touch: the sealed format, the database (rows keep the spool path,
//! from which the object key derives), protocol logic.

use crate::store::objects::{RecordingObjects, Shipped, UPLOAD_MARKER_EXTENSION, Upload};
use crate::store::recording::EXTENSION;
use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tracing::{info, warn};

/// How often the spool is walked.
const TICK: Duration = Duration::from_secs(1);
/// How long the last pass at shutdown may take.
const FINAL_PASS: Duration = Duration::from_secs(30);
/// Longest wait before a failed file is tried again.
const MAX_BACKOFF: Duration = Duration::from_secs(60);

/// Recordings the store thread is writing (their spool paths).
pub(crate) type OpenSet = Arc<Mutex<HashSet<PathBuf>>>;

/// What the uploader shares with the store thread.
#[derive(Debug, Default)]
pub(crate) struct Spool {
    /// Bytes of `.sbrec` files in the spool at the last walk.
    bytes: AtomicU64,
    stop: AtomicBool,
}

impl Spool {
    /// Bytes of recordings not yet in the bucket, at the last walk.
    pub(crate) fn bytes(&self) -> u64 {
        self.bytes.load(Ordering::Relaxed)
    }
}

/// A spooled file's upload and its retry state.
#[derive(Default)]
struct Entry {
    upload: Option<Upload>,
    failures: u32,
    next_try: Option<Instant>,
}

/// Told the spool path of each recording whose object was completed: the
/// store thread checks its row, and deletes the object again if the row was
/// deleted meanwhile (another node's erasure, while this one still spooled it).
pub(crate) type Uploaded = Box<dyn Fn(PathBuf) + Send>;

/// Starts the uploader thread; it ends when [`stop`] is called.
pub(crate) fn start(
    objects: Arc<RecordingObjects>,
    spool_dir: PathBuf,
    open: OpenSet,
    uploaded: Uploaded,
) -> std::io::Result<(Arc<Spool>, std::thread::JoinHandle<()>)> {
    let spool = Arc::new(Spool::default());
    let shared = Arc::clone(&spool);
    let thread = std::thread::Builder::new()
        .name("sipbridge-upload".into())
        .spawn(move || run(&objects, &spool_dir, &open, &shared, &uploaded))?;
    Ok((spool, thread))
}

/// Asks the uploader thread to end after its current file.
pub(crate) fn stop(spool: &Spool) {
    spool.stop.store(true, Ordering::Relaxed);
}

fn run(
    objects: &RecordingObjects,
    spool_dir: &Path,
    open: &OpenSet,
    spool: &Spool,
    uploaded: &Uploaded,
) {
    let mut entries: HashMap<PathBuf, Entry> = HashMap::new();
    let mut first = true;
    while !spool.stop.load(Ordering::Relaxed) {
        let (files, markers, bytes) = {
            // Under the lock: the store thread creates files holding it.
            let open = open
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            let (files, markers, bytes) = walk(spool_dir);
            let files: Vec<(PathBuf, bool)> = files
                .into_iter()
                .map(|p| {
                    let closed = !open.contains(&p);
                    (p, closed)
                })
                .collect();
            (files, markers, bytes)
        };
        spool.bytes.store(bytes, Ordering::Relaxed);
        crate::metrics::recording_spool(bytes);
        if first {
            first = false;
            if !files.is_empty() {
                info!(
                    files = files.len(),
                    bytes, "recordings in the spool: uploading them to the bucket"
                );
            }
        }
        // Markers whose file is gone: a crash after the file left the spool.
        for m in markers {
            let file = m.with_extension("");
            if !file.exists()
                && let Err(e) = objects.abort_stale_upload(&file)
            {
                warn!(error = %e, "aborting a multipart upload a crash left failed");
            }
        }
        // Files that left the spool outside the uploader (opt-out, retention,
        // erasure): their uploads are aborted.
        let present: HashSet<&PathBuf> = files.iter().map(|(p, _)| p).collect();
        let gone: Vec<PathBuf> = entries
            .keys()
            .filter(|p| !present.contains(p))
            .cloned()
            .collect();
        for p in gone {
            if let Some(mut e) = entries.remove(&p)
                && let Err(e) = objects.ship(&p, &mut e.upload, true)
            {
                warn!(path = %p.display(), error = %e, "aborting the upload of a deleted recording failed");
            }
        }
        for (path, closed) in &files {
            if spool.stop.load(Ordering::Relaxed) {
                break;
            }
            let fresh = !entries.contains_key(path);
            let entry = entries.entry(path.clone()).or_default();
            if fresh && let Err(e) = objects.abort_stale_upload(path) {
                warn!(path = %path.display(), error = %e, "aborting a multipart upload a crash left failed");
            }
            if entry.next_try.is_some_and(|t| Instant::now() < t) {
                continue;
            }
            match objects.ship(path, &mut entry.upload, *closed) {
                Ok(Shipped::Pending) => {
                    entry.failures = 0;
                    entry.next_try = None;
                }
                Ok(Shipped::Done) => {
                    crate::metrics::recording_upload("ok");
                    uploaded(path.clone());
                    if entry.failures > 0 {
                        info!(path = %path.display(), "recording uploaded after the object store recovered");
                    } else {
                        info!(path = %path.display(), "recording uploaded");
                    }
                    entries.remove(path);
                }
                Ok(Shipped::Gone) => {
                    entries.remove(path);
                }
                Err(e) => {
                    crate::metrics::recording_upload("failed");
                    entry.failures += 1;
                    let wait = Duration::from_secs(1u64 << entry.failures.min(6)).min(MAX_BACKOFF);
                    entry.next_try = Some(Instant::now() + wait);
                    warn!(
                        path = %path.display(),
                        failures = entry.failures,
                        retry_in_s = wait.as_secs(),
                        error = %e,
                        "recording upload failed; kept in the spool"
                    );
                }
            }
        }
        std::thread::sleep(TICK);
    }
    // Shutting down: the store thread finished every recording, so each file
    // left is whole; one last pass, bounded, so a node leaving for good does
    // not keep them (the next start ships what is still here).
    let deadline = Instant::now() + FINAL_PASS;
    let (files, _, _) = walk(spool_dir);
    let mut left = 0usize;
    for path in files {
        if Instant::now() >= deadline {
            left += 1;
            continue;
        }
        let mut upload = entries.remove(&path).and_then(|e| e.upload);
        match objects.ship(&path, &mut upload, true) {
            Ok(Shipped::Done) => {
                info!(path = %path.display(), "recording uploaded");
                uploaded(path);
            }
            Ok(_) => {}
            Err(e) => {
                left += 1;
                warn!(path = %path.display(), error = %e, "recording upload failed at shutdown; the next start retries");
            }
        }
    }
    if left > 0 {
        warn!(
            files = left,
            "recordings left in the spool at shutdown; the next start uploads them"
        );
    }
}

/// The `.sbrec` files and `.upload` markers under `dir`, and the files' total size.
fn walk(dir: &Path) -> (Vec<PathBuf>, Vec<PathBuf>, u64) {
    let (mut files, mut markers, mut bytes) = (Vec::new(), Vec::new(), 0u64);
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            let Ok(kind) = e.file_type() else { continue };
            let p = e.path();
            if kind.is_dir() {
                stack.push(p);
            } else if kind.is_file() {
                match p.extension().and_then(|x| x.to_str()) {
                    Some(x) if x == EXTENSION => {
                        bytes += e.metadata().map_or(0, |m| m.len());
                        files.push(p);
                    }
                    Some(x) if x == UPLOAD_MARKER_EXTENSION => markers.push(p),
                    _ => {}
                }
            }
        }
    }
    files.sort();
    (files, markers, bytes)
}
