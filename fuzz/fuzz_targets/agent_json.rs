//! Fuzz target: see `../exercise_agent.rs`.
#![no_main]

use libfuzzer_sys::fuzz_target;

#[path = "../exercise_agent.rs"]
mod exercise;

fuzz_target!(|data: &[u8]| exercise::exercise(data));
