//! The PostgreSQL test harness (`tests/common/pg.rs`) starts a real server,
//! creates databases, and stops the server on drop.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::pg::PgServer;

#[test]
fn starts_creates_a_database_and_stops_on_drop() {
    let pg = PgServer::start();
    let url = pg.create_database("harness");
    assert!(url.ends_with("/harness"), "{url}");
    let mut c = pg.client("harness");
    c.batch_execute("CREATE TABLE t (x bigint); INSERT INTO t VALUES (41), (1)")
        .unwrap();
    assert_eq!(pg.query_i64("harness", "SELECT sum(x)::bigint FROM t"), 42);
    assert!(
        pg.socket_dir()
            .join(format!(".s.PGSQL.{}", pg.port()))
            .exists()
    );
    let pid = pg.pid().unwrap();
    drop(c);
    drop(pg);
    assert!(
        !std::path::Path::new(&format!("/proc/{pid}")).exists()
            || std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .map(|s| s.contains(") Z "))
                .unwrap_or(true),
        "postgres {pid} still running after drop"
    );
}
