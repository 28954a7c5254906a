//! Recording cost per call-second with many concurrent calls: stereo PCM
//! interleaving + AES-256-GCM sealing + one write per second per call, into
//! real files in a temporary directory.
//!
//! `cargo bench --bench recording` runs 500 concurrent recordings of 20 s
//! each, pushing 20 ms frames round-robin (as 500 call tasks would), and
//! prints CPU µs per call-second and disk bytes per call-minute. CPU time is
//! this thread's on-CPU time (user + kernel, from /proc/thread-self/schedstat),
//! so the write syscalls count; the kernel's later writeback does not.
//! Without `--bench` (as under `cargo test --all-targets`) it runs a few
//! writers for two seconds as a smoke test.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use rand::SeedableRng;
use rand_chacha::ChaCha20Rng;
use sipbridge::store::crypto::KeyRing;
use sipbridge::store::recording::{RecordingDate, RecordingWriter};
use std::time::Instant;

const FRAME: usize = 160;

fn cpu_ns() -> u64 {
    let s = std::fs::read_to_string("/proc/thread-self/schedstat").unwrap();
    s.split_whitespace().next().unwrap().parse().unwrap()
}

fn main() {
    let full = std::env::args().any(|a| a == "--bench");
    let (writers, seconds, tenants) = if full { (500, 20, 10) } else { (5, 2, 2) };
    let tmp = tempfile::tempdir().unwrap();
    let var = tmp.path();
    let ring = KeyRing::open(var, &[0x11; 32]).unwrap();
    let mut rng = ChaCha20Rng::seed_from_u64(42);
    let date = RecordingDate::new(2025, 3, 7).unwrap();
    let keys: Vec<_> = (0..tenants)
        .map(|t| ring.data_key(&format!("tenant{t}"), &mut rng).unwrap())
        .collect();

    let (c0, w0) = (cpu_ns(), Instant::now());
    let mut recs: Vec<RecordingWriter> = (0..writers)
        .map(|i| {
            RecordingWriter::create(var, &keys[i % tenants], date, 1_741_305_600, &mut rng).unwrap()
        })
        .collect();
    let create_cpu = cpu_ns() - c0;

    // One 20 ms frame per channel, different per frame index.
    let frames_per_call = seconds * 50;
    let frame_audio: Vec<(Vec<i16>, Vec<i16>)> = (0..50)
        .map(|f| {
            let l = (0..FRAME).map(|n| ((f * FRAME + n) * 37 % 4000) as i16 - 2000);
            let r = (0..FRAME).map(|n| ((f * FRAME + n) * 11 % 3000) as i16 - 1500);
            (l.collect(), r.collect())
        })
        .collect();
    let c1 = cpu_ns();
    for f in 0..frames_per_call {
        let (l, r) = &frame_audio[f % 50];
        for rec in &mut recs {
            rec.push(l, r).unwrap();
        }
    }
    let push_cpu = cpu_ns() - c1;
    let c2 = cpu_ns();
    let mut disk_bytes = 0u64;
    for rec in recs {
        disk_bytes += rec.finish().unwrap().bytes;
    }
    let finish_cpu = cpu_ns() - c2;
    let wall = w0.elapsed();

    let call_seconds = (writers * seconds) as f64;
    let total_cpu = (create_cpu + push_cpu + finish_cpu) as f64;
    println!(
        "recording bench: {writers} concurrent writers x {seconds} s, 20 ms pushes round-robin"
    );
    println!(
        "  steady state (push+seal+write): {:.1} CPU us per call-second",
        push_cpu as f64 / 1e3 / call_seconds
    );
    println!(
        "  including create + finish (fsync): {:.1} CPU us per call-second",
        total_cpu / 1e3 / call_seconds
    );
    println!(
        "  create {:.1} us/call, finish {:.1} us/call (CPU)",
        create_cpu as f64 / 1e3 / writers as f64,
        finish_cpu as f64 / 1e3 / writers as f64
    );
    println!(
        "  real-time capacity: {:.0} concurrent recordings per core (steady state)",
        call_seconds * 1e9 / push_cpu as f64
    );
    println!(
        "  disk: {:.0} bytes per call-minute (raw PCM 1920000), total {disk_bytes} bytes",
        disk_bytes as f64 / call_seconds * 60.0
    );
    println!("  wall {:.2} s", wall.as_secs_f64());
}
