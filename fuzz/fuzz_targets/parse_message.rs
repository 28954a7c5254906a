//! Fuzz target: every SIP parser entry point on arbitrary bytes (see `../exercise.rs`).
#![no_main]

use libfuzzer_sys::fuzz_target;

#[path = "../exercise.rs"]
mod exercise;

fuzz_target!(|data: &[u8]| exercise::exercise(data));
