#![allow(clippy::unwrap_used, clippy::expect_used)]
//! The agent pipeline path per caller frame (issue 5): serialisation plus the
//! WebSocket send, native (binary PCM) and Twilio mode (µ-law, base64, JSON),
//! with 500 concurrent streams to a local sink WebSocket server on 127.0.0.1.
//!
//! - `serialise/*`: the message building alone, one 20 ms caller frame as
//!   the call hands it over: 16 kHz PCM for a native agent; for Twilio mode
//!   the caller's 160 µ-law codes (`PipelineFormat::G711`; before issue 17,
//!   16 kHz PCM that the dialect downsampled and re-encoded).
//! - `streams500/*`: 500 real `PipelineHandle`s (the bridge's own connection
//!   tasks) fed one frame each per round. The bridge side runs on this thread
//!   (a current-thread runtime), the sink on another; the time reported is the
//!   CPU time of the bridge thread (`/proc/thread-self/schedstat`: user +
//!   kernel, so the loopback send's syscalls count) per frame, not wall time.
//!   A final fixed run prints CPU per frame, frames/s and dropped frames.

use criterion::{Criterion, criterion_group, criterion_main};
use futures_util::StreamExt;
use sipbridge::call::{G711Frame, PcmFrame};
use sipbridge::media::g711::{self, Law};
use sipbridge::media::resample::PipelineRate;
use sipbridge::pipeline::twilio::TwilioStream;
use sipbridge::pipeline::{AgentTarget, CallInfo, PipelineHandle, PipelineSpec, native};
use std::hint::black_box;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tokio::sync::Notify;
use tokio_tungstenite::tungstenite::Message;

const STREAMS: usize = 500;
/// Rounds (one frame per stream) in flight before waiting for the sink:
/// well under the 50-frame queue per stream, so nothing is dropped.
const ROUNDS_IN_FLIGHT: u64 = 10;

fn frame() -> PcmFrame {
    PcmFrame {
        samples: (0..320)
            .map(|n| {
                let t = f64::from(n) / 16_000.0;
                (6000.0 * (2.0 * std::f64::consts::PI * 440.0 * t).sin()) as i16
            })
            .collect(),
        rate: PipelineRate::Hz16000,
        media_time: Duration::ZERO,
        g711: None,
    }
}

/// The same 20 ms as a Twilio-mode call hands it over: 160 µ-law codes.
fn mu_law_frame() -> PcmFrame {
    let pcm: Vec<i16> = (0..160)
        .map(|n| {
            let t = f64::from(n) / 8_000.0;
            (6000.0 * (2.0 * std::f64::consts::PI * 440.0 * t).sin()) as i16
        })
        .collect();
    let mut codes = vec![0u8; 160];
    g711::encode(Law::Mu, &pcm, &mut codes);
    PcmFrame {
        samples: Vec::new(),
        rate: PipelineRate::Hz16000,
        media_time: Duration::ZERO,
        g711: Some(G711Frame {
            law: Law::Mu,
            codes: codes.into(),
        }),
    }
}

fn info(i: usize) -> CallInfo {
    CallInfo {
        call_id: format!("bench-{i}@127.0.0.1"),
        direction: sipbridge::call::CallDirection::Inbound,
        tenant: "bench".into(),
        account_sid: None,
        from: "+15550001111".into(),
        to: "+15551234567".into(),
        custom: Vec::new(),
        sample_rate: 16_000,
    }
}

/// CPU time this thread has run, in ns (Linux).
fn thread_cpu() -> Duration {
    let text = std::fs::read_to_string("/proc/thread-self/schedstat").unwrap_or_default();
    let ns = text
        .split_whitespace()
        .next()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    Duration::from_nanos(ns)
}

/// A sink WebSocket server on its own thread: counts caller frames (binary
/// messages, or Twilio `media` texts) over every connection, and wakes the
/// waiter once the count reaches the target.
struct Sink {
    port: u16,
    frames: Arc<AtomicU64>,
    target: Arc<AtomicU64>,
    reached: Arc<Notify>,
}

impl Sink {
    fn start() -> Sink {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let port = listener.local_addr().unwrap().port();
        let frames = Arc::new(AtomicU64::new(0));
        let target = Arc::new(AtomicU64::new(u64::MAX));
        let reached = Arc::new(Notify::new());
        let (f, t, r) = (frames.clone(), target.clone(), reached.clone());
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener).unwrap();
                while let Ok((tcp, _)) = listener.accept().await {
                    let (f, t, r) = (f.clone(), t.clone(), r.clone());
                    tokio::spawn(async move {
                        let Ok(mut ws) = tokio_tungstenite::accept_async(tcp).await else {
                            return;
                        };
                        while let Some(Ok(msg)) = ws.next().await {
                            let counted = match &msg {
                                Message::Binary(_) => true,
                                Message::Text(t) => t.starts_with(r#"{"event":"media""#),
                                _ => false,
                            };
                            if counted
                                && f.fetch_add(1, Ordering::Relaxed) + 1
                                    >= t.load(Ordering::Relaxed)
                            {
                                r.notify_one();
                            }
                        }
                    });
                }
            });
        });
        Sink {
            port,
            frames,
            target,
            reached,
        }
    }

    /// Waits until `n` frames have arrived in all.
    async fn wait_for(&self, n: u64) {
        self.target.store(n, Ordering::Relaxed);
        while self.frames.load(Ordering::Relaxed) < n {
            // `notify_one` stores a permit, so a wake-up between the check and
            // the await is not lost; the timeout only guards a stuck sink.
            let _ = tokio::time::timeout(Duration::from_millis(100), self.reached.notified()).await;
        }
    }
}

/// 500 pipeline connections of one mode to the sink, on `rt`.
fn connect_all(rt: &tokio::runtime::Runtime, sink: &Sink, twilio: bool) -> Vec<PipelineHandle> {
    rt.block_on(async {
        let handles: Vec<PipelineHandle> = (0..STREAMS)
            .map(|i| {
                let target = AgentTarget {
                    url: format!("ws://127.0.0.1:{}/bench", sink.port),
                    auth: None,
                    ca_certs: Vec::new(),
                };
                let spec = if twilio {
                    PipelineSpec::Twilio(target)
                } else {
                    PipelineSpec::Native(target)
                };
                PipelineHandle::spawn(spec, info(i), 0)
            })
            .collect();
        // Let every task connect and send its start.
        tokio::time::sleep(Duration::from_secs(2)).await;
        handles
    })
}

/// Sends `frames` caller frames round-robin over the handles and waits until
/// the sink has them; returns the CPU time of this (the bridge's) thread.
fn run_frames(
    rt: &tokio::runtime::Runtime,
    sink: &Sink,
    handles: &mut [PipelineHandle],
    frame: &PcmFrame,
    frames: u64,
) -> Duration {
    let rounds = frames.div_ceil(STREAMS as u64).max(1);
    rt.block_on(async {
        let base = sink.frames.load(Ordering::Relaxed);
        let cpu0 = thread_cpu();
        let mut sent = 0u64;
        for round in 0..rounds {
            for h in handles.iter_mut() {
                h.send_audio(frame);
            }
            sent += STREAMS as u64;
            if (round + 1) % ROUNDS_IN_FLIGHT == 0 {
                sink.wait_for(base + sent).await;
            }
        }
        sink.wait_for(base + sent).await;
        (thread_cpu() - cpu0).mul_f64(frames as f64 / sent as f64)
    })
}

fn bench(c: &mut Criterion) {
    let f = frame();
    let mu = mu_law_frame();
    let mut group = c.benchmark_group("serialise");
    group.bench_function("native_binary_640", |b| {
        b.iter(|| Message::binary(native::pcm_to_bytes(black_box(&f.samples))))
    });
    let mut stream =
        TwilioStream::new(&info(0), "MZ0123456789abcdef0123456789abcdef".into()).unwrap();
    group.bench_function("twilio_media_json", |b| {
        b.iter(|| Message::text(stream.media_message(black_box(&mu))))
    });
    group.finish();

    let sink = Sink::start();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut group = c.benchmark_group("streams500");
    group.sample_size(10);
    group.measurement_time(Duration::from_secs(10));
    for (name, twilio) in [("native", false), ("twilio", true)] {
        let mut handles = connect_all(&rt, &sink, twilio);
        let f = if twilio { &mu } else { &f };
        group.bench_function(format!("{name}_cpu_per_frame"), |b| {
            b.iter_custom(|iters| run_frames(&rt, &sink, &mut handles, f, iters))
        });
        // A fixed run for the note: CPU per frame and frames/s on this thread.
        let frames = 100 * STREAMS as u64;
        let wall = Instant::now();
        let cpu = run_frames(&rt, &sink, &mut handles, f, frames);
        let wall = wall.elapsed();
        let dropped: u64 = handles.iter().map(PipelineHandle::dropped_frames).sum();
        eprintln!(
            "{name}: {frames} frames over {STREAMS} streams: {:.2} µs CPU/frame, {:.0} frames/s (wall {:?}), {dropped} dropped",
            cpu.as_secs_f64() * 1e6 / frames as f64,
            frames as f64 / wall.as_secs_f64(),
            wall
        );
        rt.block_on(async {
            drop(handles);
            tokio::time::sleep(Duration::from_millis(500)).await;
        });
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
