//! A throw-away PostgreSQL server for integration tests ([`PgServer`]).
//!
//! Owns: `initdb` into a temporary directory, starting `postgres` on a free
//! 127.0.0.1 port (its unix socket in the same directory, so it never touches
//! `/var/run/postgresql`), waiting until it accepts connections, creating
//! databases, and stopping the server on drop.
//!
//! PostgreSQL refuses to run as root: when the test runs as root the server runs
//! as the `postgres` user that Debian's `postgresql` package creates
//! (`scripts/install-test-deps.sh` installs it), through `setpriv`, which execs,
//! so the child's pid is the server's. The binaries come from
//! `$SIPBRIDGE_PG_BIN`, else the newest `/usr/lib/postgresql/<n>/bin`, else `PATH`.
//!
//! Authentication is `trust` for the superuser `sipbridge` on loopback only: the
//! server is reachable from this host for the lifetime of the test and no longer.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use tempfile::TempDir;

/// The superuser `initdb` creates; tests connect as it.
pub(crate) const PG_USER: &str = "sipbridge";

/// A running PostgreSQL server, stopped (fast shutdown, then SIGKILL) on drop.
pub(crate) struct PgServer {
    dir: TempDir,
    port: u16,
    child: Option<Child>,
}

/// The directory holding `initdb`, `postgres`, `pg_ctl`.
pub(crate) fn pg_bin_dir() -> Option<PathBuf> {
    if let Some(dir) = std::env::var_os("SIPBRIDGE_PG_BIN") {
        return Some(PathBuf::from(dir));
    }
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let v = e.file_name().to_str()?.parse::<u32>().ok()?;
            let bin = e.path().join("bin");
            bin.join("postgres").exists().then_some((v, bin))
        })
        .collect();
    versions.sort();
    versions.pop().map(|(_, bin)| bin)
}

fn pg_program(name: &str) -> PathBuf {
    match pg_bin_dir() {
        Some(dir) => dir.join(name),
        None => PathBuf::from(name),
    }
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

/// `uid:gid` of the `postgres` account.
fn postgres_ids() -> (u32, u32) {
    let id = |flag: &str| -> u32 {
        let out = Command::new("id")
            .args([flag, "postgres"])
            .output()
            .expect("run id");
        assert!(
            out.status.success(),
            "no `postgres` user: run `bash scripts/install-test-deps.sh` (Debian's postgresql package creates it)"
        );
        String::from_utf8_lossy(&out.stdout)
            .trim()
            .parse()
            .expect("numeric id")
    };
    (id("-u"), id("-g"))
}

/// A command for a PostgreSQL program, as the `postgres` user when we are root.
fn pg_command(program: &str) -> Command {
    let path = pg_program(program);
    if is_root() {
        let mut c = Command::new("setpriv");
        c.args([
            "--reuid=postgres",
            "--regid=postgres",
            "--init-groups",
            "--",
        ]);
        c.arg(path);
        c
    } else {
        Command::new(path)
    }
}

fn chown_tree(path: &Path, uid: u32, gid: u32) {
    std::os::unix::fs::chown(path, Some(uid), Some(gid)).expect("chown");
    if path.is_dir() {
        for e in std::fs::read_dir(path).expect("read_dir").flatten() {
            chown_tree(&e.path(), uid, gid);
        }
    }
}

impl PgServer {
    /// Initialises a cluster and starts it; panics (with the server's log) when
    /// it does not accept connections within 30 s.
    pub(crate) fn start() -> PgServer {
        let dir = tempfile::Builder::new()
            .prefix("sipbridge-pg-")
            .tempdir()
            .expect("tempdir");
        if is_root() {
            let (uid, gid) = postgres_ids();
            chown_tree(dir.path(), uid, gid);
        }
        let data = dir.path().join("data");
        let out = pg_command("initdb")
            .arg("-D")
            .arg(&data)
            .args(["-U", PG_USER, "-A", "trust", "-E", "UTF8", "--no-sync"])
            .arg("--no-instructions")
            .stdin(Stdio::null())
            .output()
            .expect("spawn initdb (bash scripts/install-test-deps.sh installs postgresql)");
        assert!(
            out.status.success(),
            "initdb failed: {}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let port = super::free_port();
        let log = std::fs::File::create(dir.path().join("postgres.log")).expect("log file");
        if is_root() {
            let (uid, gid) = postgres_ids();
            chown_tree(&dir.path().join("postgres.log"), uid, gid);
        }
        let child = pg_command("postgres")
            .arg("-D")
            .arg(&data)
            .args(["-p", &port.to_string()])
            .arg("-k")
            .arg(dir.path())
            .args([
                "-c",
                "listen_addresses=127.0.0.1",
                "-c",
                "fsync=off",
                "-c",
                "synchronous_commit=off",
                "-c",
                "full_page_writes=off",
                "-c",
                "max_connections=200",
            ])
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("dup log"))
            .stderr(log)
            .spawn()
            .expect("spawn postgres");
        let mut server = PgServer {
            dir,
            port,
            child: Some(child),
        };
        server.wait_ready();
        server
    }

    fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if let Some(child) = self.child.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                panic!("postgres exited with {status}:\n{}", self.log());
            }
            if ::postgres::Client::connect(&self.url("postgres"), ::postgres::NoTls).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!(
            "postgres did not accept connections in 30 s:\n{}",
            self.log()
        );
    }

    /// One server for the whole test process, started on first use. Statics
    /// are never dropped, so a watchdog shell stops the server (fast
    /// shutdown) once this process has exited.
    pub(crate) fn shared() -> &'static PgServer {
        static SHARED: OnceLock<PgServer> = OnceLock::new();
        SHARED.get_or_init(|| {
            let server = PgServer::start();
            let me = std::process::id();
            let pg = server.pid().expect("running");
            // Outlives this process by design: it is what stops the server.
            #[allow(clippy::zombie_processes)]
            Command::new("sh")
                .arg("-c")
                .arg(format!(
                    "while kill -0 {me} 2>/dev/null; do sleep 0.5; done; kill -INT {pg}"
                ))
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("spawn postgres watchdog");
            server
        })
    }

    /// Creates a database with a name no other call in this process got
    /// (`<prefix>_<n>`) and returns its URL.
    pub(crate) fn fresh_database(&self, prefix: &str) -> String {
        static N: AtomicU32 = AtomicU32::new(0);
        let name = format!("{prefix}_{}", N.fetch_add(1, Ordering::Relaxed));
        self.create_database(&name)
    }

    /// The TCP port on 127.0.0.1.
    pub(crate) fn port(&self) -> u16 {
        self.port
    }

    /// The directory holding the unix socket `.s.PGSQL.<port>`.
    pub(crate) fn socket_dir(&self) -> &Path {
        self.dir.path()
    }

    /// `postgres://sipbridge@127.0.0.1:<port>/<db>`: a URL the daemon's
    /// `[profile.store] url` accepts (write it to a file and use `file:PATH`).
    pub(crate) fn url(&self, db: &str) -> String {
        format!("postgres://{PG_USER}@127.0.0.1:{}/{db}", self.port)
    }

    /// Creates database `name` (fresh, empty) and returns its URL.
    pub(crate) fn create_database(&self, name: &str) -> String {
        let mut c = self.client("postgres");
        c.batch_execute(&format!("CREATE DATABASE \"{name}\""))
            .expect("CREATE DATABASE");
        self.url(name)
    }

    /// A client connected to database `db`, for asserting rows.
    pub(crate) fn client(&self, db: &str) -> ::postgres::Client {
        ::postgres::Client::connect(&self.url(db), ::postgres::NoTls)
            .expect("connect to test postgres")
    }

    /// One `i64` from a query returning one row and one integer column (use
    /// `count(*)` or cast to `bigint`).
    pub(crate) fn query_i64(&self, db: &str, sql: &str) -> i64 {
        let row = self.client(db).query_one(sql, &[]).expect(sql);
        row.get::<_, i64>(0)
    }

    /// The server's log so far.
    pub(crate) fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("postgres.log")).unwrap_or_default()
    }

    /// The server's pid (the `postgres` postmaster itself).
    pub(crate) fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }
}

impl Drop for PgServer {
    fn drop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        // SIGINT is PostgreSQL's fast shutdown: abort sessions, exit.
        let _ = Command::new("kill")
            .args(["-INT", &child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = child.kill();
        let _ = child.wait();
    }
}
