//! An S3-compatible object store on loopback for tests: moto's server mode
//! (`moto_server`, installed by `scripts/install-test-deps.sh` in a virtual
//! environment at `$SIPBRIDGE_MOTO_VENV`, default `/opt/moto-venv`).
//!
//! [`S3Server::start`] runs it on a free 127.0.0.1 port, waits until it answers and
//! creates one bucket; dropping the value kills the process. Objects live in the
//! server's memory, so [`S3Server::stop`] + [`S3Server::restart`] models an outage
//! (restart comes back on the same port, empty, with the bucket created again).
//!
//! The accessors talk plain HTTP/1.1 with [`super::http`] (moto checks no request
//! signature), so a test sees exactly the bytes the bucket holds.

use super::http;
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Access key id every test profile gives the daemon (moto accepts any).
pub(crate) const ACCESS_KEY_ID: &str = "AKIATESTSIPBRIDGE0001";
/// Secret access key every test profile gives the daemon; tests grep logs for it.
pub(crate) const SECRET_ACCESS_KEY: &str = "s3-secret-never-in-logs-9f27c1d04e";
/// Region the server is addressed with.
pub(crate) const REGION: &str = "us-east-1";

/// How long [`S3Server::start`] waits for the server to answer.
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// The `moto_server` binary.
pub(crate) fn moto_server() -> PathBuf {
    let venv = std::env::var("SIPBRIDGE_MOTO_VENV").unwrap_or_else(|_| "/opt/moto-venv".into());
    PathBuf::from(venv).join("bin/moto_server")
}

/// A running S3-compatible server with one bucket.
pub(crate) struct S3Server {
    child: Option<Child>,
    addr: SocketAddr,
    bucket: String,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl S3Server {
    /// Starts the server on a free loopback port and creates `bucket`.
    pub(crate) fn start(bucket: &str) -> S3Server {
        let dir = tempfile::tempdir().expect("temp dir for the S3 server");
        let port = super::free_port();
        let mut s = S3Server {
            child: None,
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            bucket: bucket.to_owned(),
            log: dir.path().join("moto.log"),
            _dir: dir,
        };
        s.restart();
        s
    }

    /// `http://127.0.0.1:<port>`: the `endpoint` of a `[profile.recordings]` section.
    pub(crate) fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The loopback address the server listens on.
    pub(crate) fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The bucket created at start.
    pub(crate) fn bucket(&self) -> &str {
        &self.bucket
    }

    /// A `[profile.recordings]` section for this server, credentials as inline secret
    /// values (`ACCESS_KEY_ID`, `SECRET_ACCESS_KEY`). The daemon spools what is not
    /// uploaded yet under its `var_dir/recordings`.
    pub(crate) fn recordings_section(&self) -> String {
        format!(
            "[profile.recordings]\nkind = \"s3\"\nendpoint = \"{}\"\nbucket = \"{}\"\n\
             region = \"{REGION}\"\naccess_key_id = \"{ACCESS_KEY_ID}\"\n\
             secret_access_key = \"{SECRET_ACCESS_KEY}\"\n",
            self.endpoint(),
            self.bucket,
        )
    }

    /// Kills the server (an outage): requests to it are refused until [`restart`](Self::restart).
    pub(crate) fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the server again on the same port (empty: moto keeps objects in memory)
    /// and creates the bucket. Panics with the server's log if it does not come up.
    pub(crate) fn restart(&mut self) {
        self.stop();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("moto log file");
        let child = Command::new(moto_server())
            .args(["-H", "127.0.0.1", "-p", &self.addr.port().to_string()])
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log fd"))
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot run {} ({e}); run scripts/install-test-deps.sh",
                    moto_server().display()
                )
            });
        self.child = Some(child);
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if TcpStream::connect_timeout(&self.addr, Duration::from_millis(200)).is_ok() {
                let r = http::request(self.addr, "PUT", &format!("/{}", self.bucket), &[], b"");
                if r.status == 200 {
                    return;
                }
            }
            if Instant::now() > deadline {
                panic!(
                    "moto_server did not start on {}: {}",
                    self.addr,
                    std::fs::read_to_string(&self.log).unwrap_or_default()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Keys of the bucket's objects under `prefix` (at most 1000), sorted.
    pub(crate) fn list(&self, prefix: &str) -> Vec<String> {
        let r = http::get(
            self.addr,
            &format!("/{}?list-type=2&prefix={prefix}", self.bucket),
            None,
        );
        assert_eq!(r.status, 200, "list {prefix}: {}", r.text());
        let mut keys = xml_values(&r.text(), "Key");
        keys.sort();
        keys
    }

    /// The object's bytes, `None` when there is no such object.
    pub(crate) fn get(&self, key: &str) -> Option<Vec<u8>> {
        let r = http::get(self.addr, &format!("/{}/{key}", self.bucket), None);
        match r.status {
            200 => Some(r.body),
            404 => None,
            s => panic!("GET {key}: status {s}: {}", r.text()),
        }
    }

    /// Deletes an object behind the daemon's back (a lost object, or one not
    /// uploaded yet as another node would see it).
    pub(crate) fn delete(&self, key: &str) {
        let r = http::request(
            self.addr,
            "DELETE",
            &format!("/{}/{key}", self.bucket),
            &[],
            b"",
        );
        assert!(matches!(r.status, 200 | 204), "DELETE {key}: {}", r.text());
    }

    /// Multipart uploads started and neither completed nor aborted: their keys.
    pub(crate) fn pending_uploads(&self) -> Vec<String> {
        let r = http::get(self.addr, &format!("/{}?uploads", self.bucket), None);
        assert_eq!(r.status, 200, "list uploads: {}", r.text());
        xml_values(&r.text(), "Key")
    }

    /// The server's log so far (requests it served), for failure messages.
    pub(crate) fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The text of every `<tag>…</tag>` in `xml` (no nesting in what S3 lists).
fn xml_values(xml: &str, tag: &str) -> Vec<String> {
    let (open, close) = (format!("<{tag}>"), format!("</{tag}>"));
    let mut out = Vec::new();
    let mut rest = xml;
    while let Some(i) = rest.find(&open) {
        let after = &rest[i + open.len()..];
        let Some(j) = after.find(&close) else { break };
        out.push(after[..j].to_owned());
        rest = &after[j + close.len()..];
    }
    out
}
