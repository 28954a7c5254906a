//! `.ci/check-module-cycles.sh` must fail on a cycle between top-level modules or between
//! the sibling submodules of one, naming a file:line of each edge, pass on a one-way
//! graph, and pass on this crate.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::process::{Command, Output};

fn check(root: &Path) -> Output {
    Command::new("bash")
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join(".ci/check-module-cycles.sh"))
        .arg(root)
        .output()
        .unwrap()
}

fn write(root: &Path, rel: &str, text: &str) {
    let path = root.join(rel);
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, text).unwrap();
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[test]
fn this_crate_has_no_cycle() {
    let out = check(Path::new(env!("CARGO_MANIFEST_DIR")));
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    assert!(stdout.contains("  admin -> control  ("), "{stdout}");
    assert!(!stdout.contains("admin -> daemon"), "{stdout}");
}

#[test]
fn passes_on_a_one_way_graph_and_prints_it() {
    let dir = tempfile::tempdir().unwrap();
    write(
        dir.path(),
        "src/lib.rs",
        "pub mod a;\npub mod b;\npub mod c;\n",
    );
    write(
        dir.path(),
        "src/a/mod.rs",
        "use crate::b::X;\nuse crate::{c, b::Y};\n",
    );
    write(dir.path(), "src/b.rs", "pub fn f() { crate::c::g() }\n");
    write(dir.path(), "src/c.rs", "pub fn g() {}\n");
    let out = check(dir.path());
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let stdout = text(&out.stdout);
    assert!(stdout.contains("  a -> b  (2)"), "{stdout}");
    assert!(stdout.contains("  a -> c  (1)"), "{stdout}");
    assert!(stdout.contains("  b -> c  (1)"), "{stdout}");
    assert!(stdout.contains("  c -> (nothing)"), "{stdout}");
}

#[test]
fn comments_tests_and_strings_do_not_count() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "src/a.rs", "use crate::b::X;\n");
    write(
        dir.path(),
        "src/b.rs",
        "//! Not `crate::a`.\n// use crate::a;\nlet s = \"crate::a::x\"; // crate::a::y\n\
         #[cfg(test)]\nmod tests { use crate::a::Z; }\n",
    );
    let out = check(dir.path());
    assert_eq!(out.status.code(), Some(0), "{out:?}");
}

#[test]
fn fails_on_a_cycle_between_top_level_modules() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "src/admin/mod.rs", "mod api;\n");
    write(
        dir.path(),
        "src/admin/api.rs",
        "use crate::daemon::{Shared, lock};\n",
    );
    write(
        dir.path(),
        "src/daemon/mod.rs",
        "fn run() {\n    crate::admin::start();\n}\n",
    );
    let out = check(dir.path());
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains("cycle in the crate: admin <-> daemon"),
        "{stderr}"
    );
    assert!(
        stderr.contains("admin -> daemon  (1 reference(s), e.g. src/admin/api.rs:1)"),
        "{stderr}"
    );
    assert!(
        stderr.contains("daemon -> admin  (1 reference(s), e.g. src/daemon/mod.rs:2)"),
        "{stderr}"
    );
}

#[test]
fn super_that_climbs_out_of_a_top_level_module_counts() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "src/a.rs", "use super::b::X;\n");
    write(dir.path(), "src/b.rs", "use crate::a::Y;\n");
    let out = check(dir.path());
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(
        text(&out.stderr).contains("cycle in the crate: a <-> b"),
        "{out:?}"
    );
}

#[test]
fn fails_on_a_cycle_between_sibling_submodules() {
    let dir = tempfile::tempdir().unwrap();
    write(
        dir.path(),
        "src/store/mod.rs",
        "pub mod db;\npub mod retention;\n",
    );
    write(
        dir.path(),
        "src/store/db/mod.rs",
        "use super::retention::Item;\n",
    );
    write(
        dir.path(),
        "src/store/retention.rs",
        "use super::db::{\n    Store,\n    DbError,\n};\n",
    );
    let out = check(dir.path());
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains("cycle in store: db <-> retention"),
        "{stderr}"
    );
    assert!(
        stderr.contains("retention -> db  (1 reference(s), e.g. src/store/retention.rs:1)"),
        "{stderr}"
    );
}

#[test]
fn a_child_may_use_its_parent_and_a_grandchild_its_grandparent() {
    let dir = tempfile::tempdir().unwrap();
    write(
        dir.path(),
        "src/daemon/mod.rs",
        "mod transport;\nuse transport::Bound;\n",
    );
    write(
        dir.path(),
        "src/daemon/transport.rs",
        "mod tls;\nuse super::{Shared, lock};\nuse tls::accept;\n",
    );
    write(
        dir.path(),
        "src/daemon/transport/tls.rs",
        "use crate::daemon::Shared;\nuse super::Transports;\nuse super::super::lock;\n",
    );
    let out = check(dir.path());
    assert_eq!(out.status.code(), Some(0), "{out:?}");
}
