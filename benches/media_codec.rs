//! Per-20 ms-frame cost of the codec path (issue 4): 160 µ-law codes →
//! decode → 16 kHz, and 320 samples at 16 kHz → 8 kHz → µ-law. The RTP parse
//! and jitter-buffer share is measured in the RTP benchmarks.

use criterion::{Criterion, criterion_group, criterion_main};
use sipbridge::media::g711::{self, Law};
use sipbridge::media::resample::{Downsampler, PipelineRate, Upsampler};
use std::hint::black_box;

fn speech_like(len: usize, rate: f64) -> Vec<i16> {
    (0..len)
        .map(|n| {
            let t = n as f64 / rate;
            (6000.0 * (2.0 * std::f64::consts::PI * 440.0 * t).sin()
                + 3000.0 * (2.0 * std::f64::consts::PI * 1870.0 * t).sin()) as i16
        })
        .collect()
}

fn bench(c: &mut Criterion) {
    let mut codes = [0u8; 160];
    g711::encode(Law::Mu, &speech_like(160, 8000.0), &mut codes);
    let mut up = Upsampler::new(PipelineRate::Hz16000);
    let mut pcm = [0i16; 160];
    let mut wide = Vec::with_capacity(320);
    c.bench_function("decode_mu_160_upsample_16k", |b| {
        b.iter(|| {
            g711::decode(Law::Mu, black_box(&codes), &mut pcm);
            wide.clear();
            up.process(&pcm, &mut wide);
            black_box(&wide);
        })
    });

    let input = speech_like(320, 16000.0);
    let mut down = Downsampler::new(PipelineRate::Hz16000);
    let mut narrow = Vec::with_capacity(160);
    let mut out = [0u8; 160];
    c.bench_function("downsample_320_encode_mu", |b| {
        b.iter(|| {
            narrow.clear();
            down.process(black_box(&input), &mut narrow);
            g711::encode(Law::Mu, &narrow, &mut out);
            black_box(&out);
        })
    });

    // The resampler alone, one 20 ms frame each way (the two above add G.711).
    let narrow_in = speech_like(160, 8000.0);
    let mut up_only = Upsampler::new(PipelineRate::Hz16000);
    c.bench_function("upsample_160_16k", |b| {
        b.iter(|| {
            wide.clear();
            up_only.process(black_box(&narrow_in), &mut wide);
            black_box(&wide);
        })
    });
    let mut down_only = Downsampler::new(PipelineRate::Hz16000);
    c.bench_function("downsample_320_8k", |b| {
        b.iter(|| {
            narrow.clear();
            down_only.process(black_box(&input), &mut narrow);
            black_box(&narrow);
        })
    });

    c.bench_function("decode_mu_160", |b| {
        b.iter(|| {
            g711::decode(Law::Mu, black_box(&codes), &mut pcm);
            black_box(&pcm);
        })
    });
    c.bench_function("encode_mu_160", |b| {
        b.iter(|| {
            g711::encode(Law::Mu, black_box(&pcm), &mut out);
            black_box(&out);
        })
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
