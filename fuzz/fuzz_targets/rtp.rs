//! Fuzz target: see `../exercise_rtp.rs`.
#![no_main]

use libfuzzer_sys::fuzz_target;

#[path = "../exercise_rtp.rs"]
mod exercise;

fuzz_target!(|data: &[u8]| exercise::exercise(data));
