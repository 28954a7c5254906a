//! Fuzz target: see `../exercise_sdp.rs`.
#![no_main]

use libfuzzer_sys::fuzz_target;

#[path = "../exercise_sdp.rs"]
mod exercise;

fuzz_target!(|data: &[u8]| exercise::exercise(data));
