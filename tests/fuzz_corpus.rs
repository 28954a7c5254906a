#![allow(clippy::unwrap_used, clippy::expect_used)]
//! Replays every file of the committed fuzz corpus (`fuzz/corpus/parse_message/`)
//! through the fuzz target's function, without cargo-fuzz or nightly.

#[path = "../fuzz/exercise.rs"]
mod exercise;

#[test]
fn replay_parse_message_corpus() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/parse_message");
    let mut n = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        let data = std::fs::read(&path).unwrap();
        let res = std::panic::catch_unwind(|| exercise::exercise(&data));
        assert!(res.is_ok(), "corpus file {} panicked", path.display());
        n += 1;
    }
    // the torture files (49 + 12 + 12) plus our own literals
    assert!(n >= 90, "corpus has only {n} files");
}
