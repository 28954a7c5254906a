#![allow(clippy::unwrap_used, clippy::expect_used)]
//! The data subcommands of `cli_store.rs`, every test of it, with
//! `[profile.store] kind = "postgres"`: each test's profile points at a fresh
//! database of a real PostgreSQL server (tests/common/pg.rs), its URL in a
//! file named by `url = "file:…"`. The two-node test there runs here.

mod common;

#[path = "cli_store.rs"]
mod cli_semantics;

use std::path::Path;

use common::pg::PgServer;
use sipbridge::config::{Secret, SecretRef, StoreEngine};

/// The `[profile.store]` lines and engine of a test directory: a fresh
/// database, its URL in `dir/pg-url`.
fn store_engine(dir: &Path) -> (String, StoreEngine) {
    let url = PgServer::shared().fresh_database("cli");
    let file = dir.join("pg-url");
    std::fs::write(&file, &url).unwrap();
    (
        format!(
            "\n[profile.store]\nkind = \"postgres\"\nurl = \"file:{}\"\n",
            file.display()
        ),
        StoreEngine::Postgres {
            url: Secret::new(url.into_bytes(), SecretRef::File(file)),
        },
    )
}
