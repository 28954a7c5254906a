#![allow(clippy::unwrap_used, clippy::expect_used)]
//! Replays every file of the committed fuzz corpora (`fuzz/corpus/<target>/`)
//! through the fuzz targets' own functions, without cargo-fuzz or nightly: a
//! crash the fuzzers found (its input is kept in the corpus) stays fixed.

#[path = "../fuzz/exercise.rs"]
mod exercise;
#[path = "../fuzz/exercise_agent.rs"]
mod exercise_agent;
#[path = "../fuzz/exercise_rtp.rs"]
mod exercise_rtp;
#[path = "../fuzz/exercise_sdp.rs"]
mod exercise_sdp;

/// Runs `f` on every file of `fuzz/corpus/<target>`; returns how many. The
/// corpora are the seeds, the crash inputs (`crash-*`) and what the runs of
/// docs/security.md added (`-set_cover_merge=1`).
fn replay(target: &str, f: fn(&[u8])) -> usize {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/corpus")
        .join(target);
    let mut n = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        let data = std::fs::read(&path).unwrap();
        let res = std::panic::catch_unwind(|| f(&data));
        assert!(res.is_ok(), "corpus file {} panicked", path.display());
        n += 1;
    }
    n
}

#[test]
fn replay_parse_message_corpus() {
    let n = replay("parse_message", exercise::exercise);
    // the torture files (49 + 12 + 12), our own literals and what the fuzzer added
    assert!(n >= 1500, "corpus has only {n} files");
}

#[test]
fn replay_sdp_corpus() {
    let n = replay("sdp", exercise_sdp::exercise);
    assert!(n >= 1500, "corpus has only {n} files");
}

#[test]
fn replay_rtp_corpus() {
    let n = replay("rtp", exercise_rtp::exercise);
    assert!(n >= 250, "corpus has only {n} files");
}

#[test]
fn replay_agent_json_corpus() {
    let n = replay("agent_json", exercise_agent::exercise);
    assert!(n >= 700, "corpus has only {n} files");
}
