//! Recordings in S3-compatible object storage (`[profile.recordings] kind = "s3"`).
//!
//! Owns the S3 client (`object_store`'s, signing on `ring`, retries with
//! exponential back-off) and its private tokio runtime, the object key of a
//! recording, and the operations the daemon, the admin API and the CLI need:
//! multipart uploads of a sealed file as it grows ([`Upload`]), whole-file
//! upload (crash recovery), fetching an object into an open file (downloads),
//! deletion (retention, erasure). Must not touch the sealed format, SQL or
//! retention's selection: what is uploaded is the sealed `.sbrec` stream the
//! recording writer already encrypted, byte for byte, so neither the bucket nor
//! the wire ever sees plaintext audio.
//!
//! The object key mirrors the local layout under `var_dir`:
//! `recordings/<tenant>/<yyyy>/<mm>/<dd>/<file-id>.sbrec`, derived from the
//! last five components of the recording's path, so a daemon whose `var_dir`
//! differs (another node on the same database) finds the same object.
//!
//! Every call blocks its caller (the store thread, a CLI command, a blocking
//! task of the admin API) until the runtime finished the request: the caller
//! never needs a runtime of its own, and may run inside one's blocking pool.
//! Errors name the operation and the key, never a credential.

use crate::config::secret::Secret;
use object_store::aws::{AmazonS3, AmazonS3Builder};
use object_store::multipart::{MultipartStore, PartId};
use object_store::path::Path as ObjectPath;
use object_store::{BackoffConfig, ClientOptions, GetOptions, ObjectStore, RetryConfig};
use std::io::{self, Write};
use std::path::Path;
use std::sync::Arc;
use std::sync::mpsc;
use std::time::Duration;

/// S3's smallest part of a multipart upload (all but the last).
pub const MIN_PART_BYTES: u64 = 5 * 1024 * 1024;

/// Retries of one request (with back-off) before an operation fails.
const MAX_RETRIES: usize = 4;
/// Total time one request may spend retrying.
const RETRY_TIMEOUT: Duration = Duration::from_secs(20);
/// Time one HTTP request may take (a 5 MiB part on a slow link included).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);
/// Time to open a connection.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Where recordings go: the settings of a `kind = "s3"` section.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct S3Settings {
    /// `http(s)://host[:port]` of the S3-compatible service.
    pub endpoint: String,
    /// The bucket (must exist).
    pub bucket: String,
    /// The region requests are signed for.
    pub region: String,
    /// Access key id (a secret reference in the configuration).
    pub access_key_id: Secret,
    /// Secret access key (a secret reference in the configuration).
    pub secret_access_key: Secret,
    /// Bytes of recordings not yet in the bucket that `var_dir` may hold
    /// before the store counts as unable to write (`spool_max_mb`).
    pub spool_max_bytes: u64,
}

impl S3Settings {
    /// Settings from their parts (the configuration checks each).
    pub fn new(
        endpoint: String,
        bucket: String,
        region: String,
        access_key_id: Secret,
        secret_access_key: Secret,
        spool_max_bytes: u64,
    ) -> Self {
        Self {
            endpoint,
            bucket,
            region,
            access_key_id,
            secret_access_key,
            spool_max_bytes,
        }
    }
}

impl From<&crate::config::S3Recordings> for S3Settings {
    fn from(c: &crate::config::S3Recordings) -> Self {
        Self::new(
            c.endpoint.clone(),
            c.bucket.clone(),
            c.region.clone(),
            c.access_key_id.clone(),
            c.secret_access_key.clone(),
            c.spool_max_bytes,
        )
    }
}

/// Errors of the object store; messages hold the key, never a credential.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ObjectError {
    /// The request failed after its retries.
    #[error("object store {op} {key}: {source}")]
    Store {
        /// What was attempted.
        op: &'static str,
        /// The object.
        key: String,
        /// Why (object_store's error: status, service message).
        source: object_store::Error,
    },
    /// The object does not exist.
    #[error("object {0} not found")]
    NotFound(String),
    /// A local file (the spool).
    #[error("{0}")]
    Io(#[from] io::Error),
    /// The client could not be built (bad endpoint) or its runtime not started.
    #[error("object store client: {0}")]
    Client(String),
    /// The path is not a recording's (`…/<tenant>/<yyyy>/<mm>/<dd>/<id>.sbrec`).
    #[error("{0} is not a recording path")]
    NotARecordingPath(String),
}

impl ObjectError {
    /// As an I/O error (for the retention sweeper's deleter).
    pub fn into_io(self) -> io::Error {
        match self {
            ObjectError::Io(e) => e,
            ObjectError::NotFound(k) => io::Error::new(io::ErrorKind::NotFound, k),
            other => io::Error::other(other.to_string()),
        }
    }
}

type Result<T, E = ObjectError> = std::result::Result<T, E>;

/// The S3 client of one profile.
pub struct RecordingObjects {
    s3: Arc<AmazonS3>,
    bucket: String,
    spool_max_bytes: u64,
    /// The runtime thread's handle; the thread ends when `_stop` is dropped.
    rt: tokio::runtime::Handle,
    _stop: tokio::sync::oneshot::Sender<()>,
}

impl std::fmt::Debug for RecordingObjects {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RecordingObjects")
            .field("bucket", &self.bucket)
            .finish_non_exhaustive()
    }
}

/// The object key of the recording at `path`: `recordings/` and the path's
/// last five components (`<tenant>/<yyyy>/<mm>/<dd>/<id>.sbrec`).
pub fn object_key(path: &Path) -> Result<String> {
    let parts: Vec<&str> = path
        .components()
        .rev()
        .take(5)
        .map(|c| c.as_os_str().to_str().unwrap_or(""))
        .collect();
    let ok = parts.len() == 5
        && parts[0].ends_with(&format!(".{}", super::recording::EXTENSION))
        && parts[1].len() == 2
        && parts[2].len() == 2
        && parts[3].len() == 4
        && parts[1..4]
            .iter()
            .all(|p| p.bytes().all(|b| b.is_ascii_digit()))
        && super::crypto::validate_tenant(parts[4]).is_ok()
        && parts[0]
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'.');
    if !ok {
        return Err(ObjectError::NotARecordingPath(path.display().to_string()));
    }
    Ok(format!(
        "recordings/{}/{}/{}/{}/{}",
        parts[4], parts[3], parts[2], parts[1], parts[0]
    ))
}

impl RecordingObjects {
    /// The client a profile's `[profile.recordings]` asks for: none for
    /// local files (the default).
    pub fn for_config(r: &crate::config::Recordings) -> Result<Option<Arc<Self>>> {
        match r {
            crate::config::Recordings::S3(s3) => Ok(Some(Arc::new(Self::new(&s3.into())?))),
            _ => Ok(None),
        }
    }

    /// A client for `settings` (no request is made: a wrong endpoint or
    /// credentials show at the first upload).
    pub fn new(settings: &S3Settings) -> Result<Self> {
        // reqwest's TLS is rustls without a built-in provider: the daemon's
        // (ring) serves, installed once per process.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let text = |s: &Secret, what: &str| {
            std::str::from_utf8(s.expose())
                .map(|v| v.trim().to_owned())
                .map_err(|_| ObjectError::Client(format!("{what} is not UTF-8")))
        };
        let retry = RetryConfig {
            backoff: BackoffConfig {
                init_backoff: Duration::from_millis(200),
                max_backoff: Duration::from_secs(5),
                base: 2.0,
            },
            max_retries: MAX_RETRIES,
            retry_timeout: RETRY_TIMEOUT,
        };
        let s3 = AmazonS3Builder::new()
            .with_endpoint(settings.endpoint.clone())
            .with_bucket_name(settings.bucket.clone())
            .with_region(settings.region.clone())
            .with_access_key_id(text(&settings.access_key_id, "access_key_id")?)
            .with_secret_access_key(text(&settings.secret_access_key, "secret_access_key")?)
            .with_allow_http(settings.endpoint.starts_with("http://"))
            .with_virtual_hosted_style_request(false)
            .with_retry(retry)
            .with_client_options(
                ClientOptions::new()
                    .with_timeout(REQUEST_TIMEOUT)
                    .with_connect_timeout(CONNECT_TIMEOUT)
                    .with_allow_http(settings.endpoint.starts_with("http://")),
            )
            .build()
            .map_err(|e| ObjectError::Client(e.to_string()))?;
        // A runtime on a thread of its own, so callers may block on it from
        // anywhere (even a blocking task of another runtime) and dropping this
        // client never drops a runtime inside an async context.
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| ObjectError::Client(e.to_string()))?;
        let handle = rt.handle().clone();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        std::thread::Builder::new()
            .name("sipbridge-s3".into())
            .spawn(move || {
                let _ = rt.block_on(stopped);
            })
            .map_err(|e| ObjectError::Client(e.to_string()))?;
        Ok(Self {
            s3: Arc::new(s3),
            bucket: settings.bucket.clone(),
            spool_max_bytes: settings.spool_max_bytes,
            rt: handle,
            _stop: stop,
        })
    }

    /// The bucket's name.
    pub fn bucket(&self) -> &str {
        &self.bucket
    }

    /// Bytes of not-yet-uploaded recordings `var_dir` may hold.
    pub fn spool_max_bytes(&self) -> u64 {
        self.spool_max_bytes
    }

    /// Runs `fut` on the client's runtime and waits for it, from any thread.
    fn run<T: Send + 'static>(
        &self,
        fut: impl std::future::Future<Output = T> + Send + 'static,
    ) -> Result<T> {
        let (tx, rx) = mpsc::sync_channel(1);
        self.rt.spawn(async move {
            let _ = tx.send(fut.await);
        });
        rx.recv()
            .map_err(|_| ObjectError::Client("runtime stopped".into()))
    }

    fn store_err(
        op: &'static str,
        key: &str,
    ) -> impl FnOnce(object_store::Error) -> ObjectError + use<> {
        let key = key.to_owned();
        move |source| match source {
            object_store::Error::NotFound { .. } => ObjectError::NotFound(key),
            source => ObjectError::Store { op, key, source },
        }
    }

    /// Deletes the object of the recording at `path` (and any multipart
    /// upload of it whose id `pending` names). A missing object is not an error.
    pub fn delete(&self, path: &Path, pending: Option<&str>) -> Result<()> {
        let key = object_key(path)?;
        let s3 = Arc::clone(&self.s3);
        let (k, pending) = (key.clone(), pending.map(str::to_owned));
        let r = self.run(async move {
            let p = ObjectPath::from(k.as_str());
            if let Some(id) = pending {
                // Already completed or aborted: nothing to abort.
                let _ = s3.abort_multipart(&p, &id).await;
            }
            use futures_util::StreamExt;
            let one = futures_util::stream::once(async move { Ok(p) }).boxed();
            let mut results = s3.delete_stream(one);
            match results.next().await {
                Some(Err(e)) => Err(e),
                _ => Ok(()),
            }
        })?;
        match r.map_err(Self::store_err("delete", &key)) {
            Ok(()) | Err(ObjectError::NotFound(_)) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Whether the recording at `path` is in the bucket.
    pub fn exists(&self, path: &Path) -> Result<bool> {
        let key = object_key(path)?;
        let s3 = Arc::clone(&self.s3);
        let k = key.clone();
        let r = self.run(async move {
            s3.get_opts(
                &ObjectPath::from(k.as_str()),
                GetOptions::new().with_head(true),
            )
            .await
        })?;
        match r.map_err(Self::store_err("head", &key)) {
            Ok(_) => Ok(true),
            Err(ObjectError::NotFound(_)) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Streams the object of the recording at `path` into `out` (ciphertext:
    /// the sealed file as it was uploaded); returns its length.
    pub fn fetch_into(&self, path: &Path, mut out: impl Write) -> Result<u64> {
        use futures_util::StreamExt;
        let key = object_key(path)?;
        let s3 = Arc::clone(&self.s3);
        let k = key.clone();
        // The body arrives in pieces through a bounded channel: constant memory.
        let (tx, rx) = mpsc::sync_channel::<Result<bytes::Bytes>>(4);
        let err = Self::store_err("get", &key);
        self.rt.spawn(async move {
            let got = match s3
                .get_opts(&ObjectPath::from(k.as_str()), GetOptions::default())
                .await
            {
                Ok(g) => g,
                Err(e) => {
                    let _ = tx.send(Err(err(e)));
                    return;
                }
            };
            let mut body = got.into_stream();
            while let Some(piece) = body.next().await {
                let piece = piece.map_err(|e| ObjectError::Store {
                    op: "get",
                    key: k.clone(),
                    source: e,
                });
                let stop = piece.is_err();
                let tx2 = tx.clone();
                let sent = tokio::task::spawn_blocking(move || tx2.send(piece).is_ok())
                    .await
                    .unwrap_or(false);
                if stop || !sent {
                    return;
                }
            }
        });
        let mut n = 0u64;
        for piece in rx {
            let piece = piece?;
            out.write_all(&piece)?;
            n += piece.len() as u64;
        }
        out.flush()?;
        Ok(n)
    }

    /// Starts a multipart upload of the recording at `path`.
    pub fn begin(&self, path: &Path) -> Result<Upload> {
        let key = object_key(path)?;
        let s3 = Arc::clone(&self.s3);
        let k = key.clone();
        let id = self
            .run(async move { s3.create_multipart(&ObjectPath::from(k.as_str())).await })?
            .map_err(Self::store_err("create multipart upload", &key))?;
        Ok(Upload {
            key,
            id,
            parts: Vec::new(),
            uploaded: 0,
        })
    }

    /// Uploads `data` as the next part of `upload`.
    pub fn put_part(&self, upload: &mut Upload, data: Vec<u8>) -> Result<()> {
        let s3 = Arc::clone(&self.s3);
        let (k, id, idx) = (upload.key.clone(), upload.id.clone(), upload.parts.len());
        let len = data.len() as u64;
        let part = self
            .run(async move {
                s3.put_part(&ObjectPath::from(k.as_str()), &id, idx, data.into())
                    .await
            })?
            .map_err(Self::store_err("upload part", &upload.key))?;
        upload.parts.push(part);
        upload.uploaded += len;
        Ok(())
    }

    /// Completes `upload`: the object exists from now on.
    pub fn complete(&self, upload: Upload) -> Result<()> {
        let s3 = Arc::clone(&self.s3);
        let (k, id, parts) = (upload.key.clone(), upload.id.clone(), upload.parts);
        self.run(async move {
            s3.complete_multipart(&ObjectPath::from(k.as_str()), &id, parts)
                .await
        })?
        .map_err(Self::store_err("complete multipart upload", &upload.key))?;
        Ok(())
    }

    /// Aborts `upload` (its parts are discarded by the service).
    pub fn abort(&self, key: &str, id: &str) -> Result<()> {
        let s3 = Arc::clone(&self.s3);
        let (k, i) = (key.to_owned(), id.to_owned());
        let r =
            self.run(async move { s3.abort_multipart(&ObjectPath::from(k.as_str()), &i).await })?;
        match r.map_err(Self::store_err("abort multipart upload", key)) {
            Ok(()) | Err(ObjectError::NotFound(_)) => Ok(()),
            Err(e) => Err(e),
        }
    }
}

/// What [`RecordingObjects::ship`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shipped {
    /// Parts were uploaded (or none was due): the file stays in the spool.
    Pending,
    /// The object is complete and the local file removed.
    Done,
    /// The local file is gone (opt-out, retention, erasure): any upload of it
    /// was aborted and any object of it deleted.
    Gone,
}

/// The file beside a spooled recording naming its multipart upload
/// (`<key>\n<upload id>\n`), so the next start aborts an upload a crash left.
fn marker(path: &Path) -> std::path::PathBuf {
    let mut m = path.as_os_str().to_owned();
    m.push(".upload");
    m.into()
}

/// Extension of the files [`marker`] writes.
pub const UPLOAD_MARKER_EXTENSION: &str = "upload";

impl RecordingObjects {
    /// One step of moving the spooled recording at `path` to the bucket:
    /// uploads every whole part ([`MIN_PART_BYTES`]) the file has grown by
    /// since the last step; once `closed` (the writer finished), the rest as
    /// the last part, completes the object and removes the local file. The
    /// file holds only sealed chunks, so only ciphertext is uploaded.
    ///
    /// On an error the upload is aborted (best effort) and `upload` reset: the
    /// next step starts again from the first byte, which the spool still holds.
    pub fn ship(&self, path: &Path, upload: &mut Option<Upload>, closed: bool) -> Result<Shipped> {
        let r = self.ship_inner(path, upload, closed);
        if r.is_err()
            && let Some(u) = upload.take()
        {
            let _ = self.abort(&u.key, &u.id);
            let _ = std::fs::remove_file(marker(path));
        }
        r
    }

    fn ship_inner(
        &self,
        path: &Path,
        upload: &mut Option<Upload>,
        closed: bool,
    ) -> Result<Shipped> {
        use std::io::{Read, Seek, SeekFrom};
        let mut file = match std::fs::File::open(path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return self.gone(path, upload);
            }
            Err(e) => return Err(e.into()),
        };
        let len = file.metadata()?.len();
        if upload.is_none() {
            if !closed && len < MIN_PART_BYTES {
                return Ok(Shipped::Pending);
            }
            let u = self.begin(path)?;
            write_marker(&marker(path), &u)?;
            *upload = Some(u);
        }
        let Some(u) = upload.as_mut() else {
            return Ok(Shipped::Pending);
        };
        loop {
            let left = len.saturating_sub(u.uploaded);
            let last = closed && left <= MIN_PART_BYTES;
            if !last && left < MIN_PART_BYTES {
                return Ok(Shipped::Pending);
            }
            if last && left == 0 && u.parts() > 0 {
                break;
            }
            let n = left.min(MIN_PART_BYTES);
            let mut part = vec![0u8; usize::try_from(n).unwrap_or(0)];
            file.seek(SeekFrom::Start(u.uploaded))?;
            file.read_exact(&mut part)?;
            self.put_part(u, part)?;
            if last {
                break;
            }
        }
        if !path.exists() {
            return self.gone(path, upload);
        }
        let Some(u) = upload.take() else {
            return Ok(Shipped::Pending);
        };
        self.complete(u)?;
        // Deleted (erasure, retention) while the last part was in flight:
        // the object must not outlive it.
        if !path.exists() {
            self.delete(path, None)?;
            let _ = std::fs::remove_file(marker(path));
            return Ok(Shipped::Gone);
        }
        std::fs::remove_file(path)?;
        let _ = std::fs::remove_file(marker(path));
        Ok(Shipped::Done)
    }

    fn gone(&self, path: &Path, upload: &mut Option<Upload>) -> Result<Shipped> {
        if let Some(u) = upload.take() {
            self.abort(&u.key, &u.id)?;
        }
        let _ = std::fs::remove_file(marker(path));
        Ok(Shipped::Gone)
    }

    /// The multipart upload a crash left for the spooled recording at `path`
    /// (named by its marker file): aborted, the marker removed. Returns
    /// whether there was one.
    pub fn abort_stale_upload(&self, path: &Path) -> Result<bool> {
        let m = marker(path);
        let text = match std::fs::read_to_string(&m) {
            Ok(t) => t,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
            Err(e) => return Err(e.into()),
        };
        let mut lines = text.lines();
        if let (Some(key), Some(id)) = (lines.next(), lines.next()) {
            self.abort(key, id)?;
        }
        std::fs::remove_file(&m)?;
        Ok(true)
    }

    /// Deletes the recording at `path` wherever it is: the spooled file (a
    /// missing one is fine), any multipart upload of it, and its object.
    pub fn remove_recording(&self, path: &Path) -> Result<()> {
        match std::fs::remove_file(path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e.into()),
        }
        self.abort_stale_upload(path)?;
        self.delete(path, None)
    }

    /// The sealed recording at `path` as an open file: the spooled file when
    /// this node still holds it, else the object fetched into an anonymous
    /// file in `tmp_dir` (created 0600, unlinked at once: ciphertext only,
    /// and nothing left behind).
    pub fn open_sealed(&self, path: &Path, tmp_dir: &Path) -> Result<std::fs::File> {
        match std::fs::File::open(path) {
            Ok(f) => return Ok(f),
            Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e.into()),
            Err(_) => {}
        }
        use std::os::unix::fs::OpenOptionsExt;
        let name = tmp_dir.join(format!(".fetch-{:016x}.tmp", rand::random::<u64>()));
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&name)?;
        let _ = std::fs::remove_file(&name);
        self.fetch_into(path, io::BufWriter::new(&mut file))?;
        use std::io::Seek;
        file.rewind()?;
        Ok(file)
    }
}

fn write_marker(path: &Path, u: &Upload) -> io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(format!("{}\n{}\n", u.key, u.id).as_bytes())?;
    f.sync_all()
}

/// A multipart upload in progress.
#[derive(Debug)]
pub struct Upload {
    key: String,
    id: String,
    parts: Vec<PartId>,
    uploaded: u64,
}

impl Upload {
    /// The object key.
    pub fn key(&self) -> &str {
        &self.key
    }

    /// The service's upload id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Bytes uploaded in parts so far.
    pub fn uploaded(&self) -> u64 {
        self.uploaded
    }

    /// Parts uploaded so far.
    pub fn parts(&self) -> usize {
        self.parts.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn object_keys_mirror_the_local_layout_and_refuse_other_paths() {
        assert_eq!(
            object_key(Path::new(
                "/var/lib/sb/recordings/acme/2026/12/07/0123abcd.sbrec"
            ))
            .unwrap(),
            "recordings/acme/2026/12/07/0123abcd.sbrec"
        );
        for bad in [
            "/x/acme/2026/12/07/0123abcd.wav",
            "/x/acme/2026/1/07/0123abcd.sbrec",
            "/x/../2026/12/07/0123abcd.sbrec",
            "2026/12/07/0123abcd.sbrec",
        ] {
            assert!(object_key(Path::new(bad)).is_err(), "{bad}");
        }
    }
}
