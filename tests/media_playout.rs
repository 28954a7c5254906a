#![allow(clippy::unwrap_used, clippy::expect_used)]
//! The playout queue in virtual time: pacing, frame-size independence, tone
//! fidelity, mark and clear timing, silence/no-silence timestamps, the bound.

use std::f64::consts::PI;
use std::time::{Duration, Instant};

use sipbridge::media::g711::{self, Law};
use sipbridge::media::playout::{
    Cleared, MAX_MARK_NAME_BYTES, MAX_MARKS, MarkEvent, PlayoutError, PlayoutFrame, PlayoutQueue,
};
use sipbridge::media::resample::{Downsampler, PipelineRate};

const RATES: [PipelineRate; 2] = [PipelineRate::Hz8000, PipelineRate::Hz16000];

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

fn tone(freq: f64, rate: PipelineRate, len: usize, amplitude: f64) -> Vec<i16> {
    let r = f64::from(rate.hz());
    (0..len)
        .map(|n| (amplitude * (2.0 * PI * freq * n as f64 / r).sin()).round() as i16)
        .collect()
}

/// Speech-like test signal: two tones plus deterministic noise.
fn signal(rate: PipelineRate, len: usize) -> Vec<i16> {
    let r = f64::from(rate.hz());
    let mut x: u32 = 0x1234_5678;
    (0..len)
        .map(|n| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            let noise = f64::from(x % 2001) - 1000.0;
            let t = n as f64 / r;
            (6000.0 * (2.0 * PI * 440.0 * t).sin() + 3000.0 * (2.0 * PI * 2900.0 * t).sin() + noise)
                .round() as i16
        })
        .collect()
}

fn samples(rate: PipelineRate, millis: usize) -> usize {
    rate.hz() as usize / 1000 * millis
}

fn decode(law: Law, frames: &[PlayoutFrame]) -> Vec<i16> {
    let mut out = Vec::new();
    for f in frames {
        let mut pcm = [0i16; 160];
        g711::decode(law, &f.payload, &mut pcm);
        out.extend_from_slice(&pcm);
    }
    out
}

fn correlation(a: &[i16], b: &[i16]) -> f64 {
    let n = a.len().min(b.len());
    let (mut ab, mut aa, mut bb) = (0.0, 0.0, 0.0);
    for (&x, &y) in a[..n].iter().zip(&b[..n]) {
        let (x, y) = (f64::from(x), f64::from(y));
        ab += x * y;
        aa += x * x;
        bb += y * y;
    }
    ab / (aa * bb).sqrt()
}

/// Polls at every deadline until the queue has nothing left: the audio
/// frames (silence frames are left out).
fn play_out(q: &mut PlayoutQueue) -> Vec<PlayoutFrame> {
    let mut out = Vec::new();
    while q.queued_ms() > 0 || q.audio_frames_sent() == 0 {
        let Some(at) = q.next_deadline() else { break };
        if let Some(f) = q.poll(at)
            && !f.is_silence
        {
            out.push(f);
        }
    }
    out
}

/// Pushes `input` in pieces of the given sizes (cycled), then ends the
/// stream and plays everything out.
fn frames_for(rate: PipelineRate, input: &[i16], sizes: &[usize]) -> Vec<PlayoutFrame> {
    let start = Instant::now();
    let mut q = PlayoutQueue::new(Law::Mu, rate, start, false);
    let mut rest = input;
    for &size in sizes.iter().cycle() {
        if rest.is_empty() {
            break;
        }
        let (head, tail) = rest.split_at(size.min(rest.len()));
        assert_eq!(q.push_pcm(head), head.len());
        rest = tail;
    }
    q.end_of_stream();
    play_out(&mut q)
}

/// Polls every millisecond from `from` to `to` (exclusive), draining each
/// instant: (ms, frame) pairs.
fn poll_each_ms(
    q: &mut PlayoutQueue,
    start: Instant,
    from: u64,
    to: u64,
) -> Vec<(u64, PlayoutFrame)> {
    let mut out = Vec::new();
    for t in from..to {
        while let Some(f) = q.poll(start + ms(t)) {
            out.push((t, f));
        }
    }
    out
}

#[test]
fn frames_come_exactly_20_ms_apart_with_continuous_timestamps() {
    for rate in RATES {
        let start = Instant::now();
        let mut q = PlayoutQueue::new(Law::A, rate, start, true);
        q.push_pcm(&signal(rate, samples(rate, 1000)));
        q.end_of_stream();
        assert_eq!(q.queued_ms(), 1000);
        let sent = poll_each_ms(&mut q, start, 0, 1500);
        assert_eq!(sent.len(), 75, "{rate:?}");
        for (k, (t, f)) in sent.iter().enumerate() {
            assert_eq!(*t, 20 * k as u64, "{rate:?} frame {k}");
            assert_eq!(f.timestamp_advance, if k == 0 { 0 } else { 160 });
            assert_eq!(f.marker, k == 0);
            assert_eq!(f.is_silence, k >= 50, "{rate:?} frame {k}");
            if f.is_silence {
                assert_eq!(f.payload, [Law::A.silence(); 160]);
            }
        }
        assert_eq!(q.audio_frames_sent(), 50);
        assert_eq!(q.frames_skipped(), 0);
        assert_eq!(q.next_deadline(), Some(start + ms(1500)));
    }
}

#[test]
fn any_push_sizes_give_the_frames_of_one_big_push() {
    for rate in RATES {
        let input = signal(rate, samples(rate, 2345));
        let reference = frames_for(rate, &input, &[input.len()]);
        assert_eq!(reference.len(), 118, "{rate:?}: 2345 ms is 117.25 frames");
        let seven_ms = samples(rate, 7);
        let twenty_ms = samples(rate, 20);
        let one_s = samples(rate, 1000);
        for sizes in [
            vec![1],
            vec![seven_ms],
            vec![twenty_ms],
            vec![one_s],
            vec![13, 97, 1, 331, seven_ms, 2],
        ] {
            let got = frames_for(rate, &input, &sizes);
            assert_eq!(got.len(), reference.len(), "{rate:?} {sizes:?}");
            for (k, (a, b)) in got.iter().zip(&reference).enumerate() {
                assert_eq!(a, b, "{rate:?} sizes {sizes:?}: frame {k} differs");
            }
            assert_eq!(decode(Law::Mu, &got), decode(Law::Mu, &reference));
        }
    }
}

#[test]
fn a_tone_pushed_in_odd_sizes_decodes_back_to_the_tone() {
    for rate in RATES {
        for freq in [300.0, 1000.0, 3300.0] {
            let input = tone(freq, rate, samples(rate, 1500), 12000.0);
            let frames = frames_for(rate, &input, &[1, 37, 113, 320, 7, 999]);
            let got = decode(Law::Mu, &frames);
            assert_eq!(got.len(), 12000, "1.5 s is exactly 75 frames");

            // Reference path: one-shot downsample (its start-up delay
            // removed, as the queue aligns zero-phase), G.711 round trip.
            let mut down = Downsampler::new(rate);
            let mut reference = Vec::new();
            down.process(&input, &mut reference);
            let reference = &reference[down.delay_samples()..];
            let mut codes = vec![0u8; reference.len()];
            g711::encode(Law::Mu, reference, &mut codes);
            let mut round_trip = vec![0i16; codes.len()];
            g711::decode(Law::Mu, &codes, &mut round_trip);

            let c = correlation(&got, &round_trip);
            assert!(c >= 0.99, "{rate:?} {freq} Hz: correlation {c}");
            // Before the reference runs out, the two are sample-identical.
            assert_eq!(&got[..round_trip.len()], &round_trip[..], "{rate:?} {freq}");
            // Zero-phase: lines up with the tone sampled directly at 8 kHz.
            let direct = tone(freq, PipelineRate::Hz8000, 12000, 12000.0);
            let c = correlation(&got[..12000], &direct);
            assert!(c >= 0.99, "{rate:?} {freq} Hz: alignment {c}");
        }
    }
}

#[test]
fn a_mark_is_reported_at_the_tick_that_sends_its_last_audio() {
    for rate in RATES {
        let start = Instant::now();
        let mut q = PlayoutQueue::new(Law::Mu, rate, start, true);
        // 50 ms: two whole frames and half a frame.
        q.push_pcm(&signal(rate, samples(rate, 50)));
        q.mark("utt-1".to_string()).unwrap();
        let mut frames = Vec::new();
        for t in 0..100 {
            while let Some(f) = q.poll(start + ms(t)) {
                frames.push((t, f));
            }
            let event = q.poll_marks();
            if t < 40 {
                assert_eq!(event, None, "{rate:?}: mark reported at {t} ms");
            } else if t == 40 {
                assert_eq!(
                    event,
                    Some(MarkEvent {
                        name: "utt-1".into(),
                        played_at: start + ms(40),
                        cleared: false,
                    })
                );
            } else {
                assert_eq!(event, None);
            }
        }
        let kinds: Vec<(u64, bool)> = frames.iter().map(|(t, f)| (*t, f.is_silence)).collect();
        assert_eq!(
            kinds,
            vec![(0, false), (20, false), (40, false), (60, true), (80, true)],
            "{rate:?}: the half frame before the mark is padded and sent at once"
        );
        // The padded frame: 80 samples of audio, then silence.
        let last = &frames[2].1.payload;
        assert!(last[..60].iter().any(|&c| c != Law::Mu.silence()));
        assert!(
            last[120..].iter().all(|&c| c == Law::Mu.silence()),
            "{rate:?}"
        );
    }
}

#[test]
fn a_mark_between_pushes_does_not_change_the_audio() {
    for rate in RATES {
        let input = signal(rate, samples(rate, 60));
        let (a, b) = input.split_at(samples(rate, 30));
        let start = Instant::now();
        let mut q = PlayoutQueue::new(Law::Mu, rate, start, false);
        q.push_pcm(a);
        q.mark("half".into()).unwrap();
        q.push_pcm(b);
        q.end_of_stream();
        assert_eq!(q.poll(start).map(|f| f.is_silence), Some(false));
        assert_eq!(q.poll_marks(), None, "30 ms of audio is not all in frame 0");
        let second = q.poll(start + ms(20)).unwrap();
        assert_eq!(
            q.poll_marks(),
            Some(MarkEvent {
                name: "half".into(),
                played_at: start + ms(20),
                cleared: false
            })
        );
        let mut got = vec![second];
        got.extend(play_out(&mut q));
        let mut want = frames_for(rate, &input, &[input.len()]);
        want.remove(0);
        assert_eq!(got, want, "{rate:?}");
    }
}

#[test]
fn a_mark_with_nothing_before_it_is_reported_at_once() {
    let start = Instant::now();
    let mut q = PlayoutQueue::new(Law::Mu, PipelineRate::Hz16000, start, true);
    q.mark("first".into()).unwrap();
    assert_eq!(
        q.poll_marks(),
        Some(MarkEvent {
            name: "first".into(),
            played_at: start,
            cleared: false
        })
    );
    q.push_pcm(&signal(PipelineRate::Hz16000, 640));
    q.end_of_stream();
    let sent = poll_each_ms(&mut q, start, 0, 200);
    assert_eq!(sent.iter().filter(|(_, f)| !f.is_silence).count(), 2);
    // Two marks in a row after the audio has gone: both at once, stamped
    // with the tick of the last audio frame.
    q.mark("a".into()).unwrap();
    q.mark("b".into()).unwrap();
    let names: Vec<(String, Instant)> = std::iter::from_fn(|| q.poll_marks())
        .map(|e| (e.name, e.played_at))
        .collect();
    assert_eq!(
        names,
        vec![("a".into(), start + ms(20)), ("b".into(), start + ms(20))]
    );
}

#[test]
fn clear_stops_playout_at_the_next_tick_and_reports_pending_marks() {
    for silence in [true, false] {
        let rate = PipelineRate::Hz16000;
        let start = Instant::now();
        let mut q = PlayoutQueue::new(Law::Mu, rate, start, silence);
        q.push_pcm(&signal(rate, samples(rate, 60)));
        q.mark("early".into()).unwrap();
        q.push_pcm(&signal(rate, samples(rate, 2000)));
        q.mark("m1".into()).unwrap();
        q.push_pcm(&signal(rate, samples(rate, 1000)));
        q.mark("m2".into()).unwrap();
        let sent = poll_each_ms(&mut q, start, 0, 106);
        assert_eq!(sent.len(), 6);
        assert!(sent.iter().all(|(_, f)| !f.is_silence));
        assert_eq!(q.queued_ms(), 3060 - 120);

        // Barge-in at 105 ms.
        let cleared = q.clear();
        assert_eq!(
            cleared,
            Cleared {
                dropped_ms: 2940,
                marks: 2
            }
        );
        assert_eq!(q.queued_ms(), 0);
        let events: Vec<MarkEvent> = std::iter::from_fn(|| q.poll_marks()).collect();
        let played = |name: &str, at: u64, cleared: bool| MarkEvent {
            name: name.into(),
            played_at: start + ms(at),
            cleared,
        };
        assert_eq!(
            events,
            vec![
                played("early", 40, false),
                played("m1", 100, true),
                played("m2", 100, true)
            ],
            "silence {silence}"
        );

        // The next tick (120 ms, within one frame of the clear) plays no
        // agent audio.
        if silence {
            assert_eq!(q.next_deadline(), Some(start + ms(120)));
            let f = q.poll(start + ms(120)).unwrap();
            assert!(f.is_silence);
            assert_eq!(f.payload, [Law::Mu.silence(); 160]);
            assert_eq!((f.timestamp_advance, f.marker), (160, false));
        } else {
            assert_eq!(q.next_deadline(), None);
            assert_eq!(q.poll(start + ms(120)), None);
        }

        // New audio after the clear starts afresh: the same frames a new
        // queue would send for it.
        let fresh = signal(rate, samples(rate, 40));
        q.push_pcm(&fresh);
        q.end_of_stream();
        let after = poll_each_ms(&mut q, start, 121, 200);
        let audio: Vec<&PlayoutFrame> = after
            .iter()
            .map(|(_, f)| f)
            .filter(|f| !f.is_silence)
            .collect();
        let want = frames_for(rate, &fresh, &[fresh.len()]);
        assert_eq!(audio.len(), 2);
        assert_eq!(audio[0].payload, want[0].payload);
        assert_eq!(audio[1].payload, want[1].payload);
        assert_eq!(after[0].0, 140);
        assert_eq!(
            after[0].1.marker, !silence,
            "a gap before it only without silence"
        );
        assert_eq!(
            after[0].1.timestamp_advance,
            if silence { 160 } else { 320 }
        );
    }
}

#[test]
fn without_silence_nothing_is_sent_but_timestamps_stay_continuous() {
    let rate = PipelineRate::Hz8000;
    let start = Instant::now();
    let mut q = PlayoutQueue::new(Law::Mu, rate, start, false);
    assert_eq!(q.next_deadline(), None);
    assert_eq!(q.poll(start), None);
    q.push_pcm(&signal(rate, 320));
    assert_eq!(
        q.next_deadline(),
        Some(start + ms(20)),
        "slot 0 passed idle"
    );
    let mut sent = poll_each_ms(&mut q, start, 0, 150);
    assert_eq!(q.next_deadline(), None);
    // Audio pushed mid-slot (150.5 ms) waits for the next slot boundary.
    let late = start + Duration::from_micros(150_500);
    q.push_pcm(&signal(rate, 320));
    assert_eq!(q.poll(late), None);
    assert_eq!(q.next_deadline(), Some(start + ms(160)));
    sent.extend(poll_each_ms(&mut q, start, 151, 300));
    let summary: Vec<(u64, u32, bool)> = sent
        .iter()
        .map(|(t, f)| (*t, f.timestamp_advance, f.marker))
        .collect();
    assert_eq!(
        summary,
        vec![
            (20, 160, true),
            (40, 160, false),
            (160, 6 * 160, true),
            (180, 160, false)
        ]
    );
    assert!(sent.iter().all(|(_, f)| !f.is_silence));
    // The advances add up to 160 per slot since `start`.
    let total: u32 = sent.iter().map(|(_, f)| f.timestamp_advance).sum();
    assert_eq!(total, 160 * 9);
}

#[test]
fn with_silence_every_slot_carries_a_frame_and_one_marker() {
    let rate = PipelineRate::Hz8000;
    let start = Instant::now();
    let mut q = PlayoutQueue::new(Law::A, rate, start, true);
    q.push_pcm(&signal(rate, 320));
    let mut sent = poll_each_ms(&mut q, start, 0, 151);
    q.push_pcm(&signal(rate, 320));
    sent.extend(poll_each_ms(&mut q, start, 151, 220));
    let summary: Vec<(u64, bool)> = sent.iter().map(|(t, f)| (*t, f.is_silence)).collect();
    let want: Vec<(u64, bool)> = (0..11)
        .map(|k| (20 * k, !matches!(k, 0 | 1 | 8 | 9)))
        .collect();
    assert_eq!(summary, want);
    for (k, (_, f)) in sent.iter().enumerate() {
        assert_eq!(f.timestamp_advance, if k == 0 { 0 } else { 160 });
        assert_eq!(f.marker, k == 0);
    }
}

#[test]
fn a_late_poll_catches_up_a_little_but_skips_a_jump_without_losing_audio() {
    let rate = PipelineRate::Hz8000;
    let input = signal(rate, 16000);
    let all = frames_for(rate, &input, &[input.len()]);
    let start = Instant::now();
    let mut q = PlayoutQueue::new(Law::Mu, rate, start, true);
    q.push_pcm(&input);
    assert_eq!(q.poll(start).unwrap().payload, all[0].payload);
    // 60 ms: slots 1, 2, 3 are due (2 behind): all sent, back to back.
    let now = start + ms(60);
    let caught: Vec<PlayoutFrame> = std::iter::from_fn(|| q.poll(now)).collect();
    assert_eq!(caught.len(), 3);
    for (k, f) in caught.iter().enumerate() {
        assert_eq!(f.payload, all[k + 1].payload);
        assert_eq!((f.timestamp_advance, f.marker), (160, false));
    }
    // 260 ms: slots 4..=13 due, 9 behind: skip to slot 13, one frame, the
    // next audio in line (delayed, not dropped).
    let now = start + ms(260);
    let jumped: Vec<PlayoutFrame> = std::iter::from_fn(|| q.poll(now)).collect();
    assert_eq!(jumped.len(), 1);
    assert_eq!(jumped[0].payload, all[4].payload);
    assert_eq!(jumped[0].timestamp_advance, 10 * 160);
    assert!(jumped[0].marker);
    assert_eq!(q.frames_skipped(), 9);
    assert_eq!(q.next_deadline(), Some(start + ms(280)));
    assert_eq!(q.poll(start + ms(279)), None);
    assert_eq!(q.poll(start + ms(280)).unwrap().payload, all[5].payload);
}

#[test]
fn a_partial_frame_waits_one_tick_for_more_audio_then_is_padded() {
    let rate = PipelineRate::Hz8000;
    let start = Instant::now();
    let input = signal(rate, 400);
    let mut q = PlayoutQueue::new(Law::Mu, rate, start, true);
    q.push_pcm(&input[..240]);
    assert!(!q.poll(start).unwrap().is_silence);
    // 80 samples wait: the tick at 20 ms sends silence.
    assert!(q.poll(start + ms(20)).unwrap().is_silence);
    // More audio arrives: the frame is completed, not padded.
    q.push_pcm(&input[240..340]);
    let f = q.poll(start + ms(40)).unwrap();
    let mut want = [0u8; 160];
    g711::encode(Law::Mu, &input[160..320], &mut want);
    assert_eq!(f.payload, want);
    // 20 samples left: one tick of waiting, then padded and sent.
    assert!(q.poll(start + ms(60)).unwrap().is_silence);
    assert_eq!(q.queued_ms(), 2);
    let f = q.poll(start + ms(80)).unwrap();
    assert!(!f.is_silence);
    let mut want = [Law::Mu.silence(); 160];
    g711::encode(Law::Mu, &input[320..340], &mut want[..20]);
    assert_eq!(f.payload, want);
    assert_eq!(q.queued_ms(), 0);
    assert_eq!(q.audio_frames_sent(), 3);
}

#[test]
fn pushes_beyond_the_bound_are_truncated_and_counted() {
    let rate = PipelineRate::Hz16000;
    let start = Instant::now();
    let mut q =
        PlayoutQueue::new(Law::Mu, rate, start, true).with_max_queued(Duration::from_secs(1));
    let input = signal(rate, 24000);
    assert_eq!(q.push_pcm(&input), 16000);
    assert_eq!(q.truncated_samples(), 8000);
    assert_eq!(q.queued_ms(), 1000);
    assert_eq!(q.push_pcm(&input[..10]), 0);
    assert_eq!(q.truncated_samples(), 8010);
    // 10 frames played: 200 ms of room.
    for k in 0..10 {
        assert!(!q.poll(start + ms(20 * k)).unwrap().is_silence);
    }
    assert_eq!(q.queued_ms(), 800);
    assert_eq!(q.push_pcm(&input[..8000]), 3200);
    assert_eq!(q.truncated_samples(), 8010 + 4800);
    assert_eq!(q.queued_ms(), 1000);
    // What was accepted plays in order: the first second, then 200 ms.
    let mut played = 10;
    while let Some(at) = q.next_deadline() {
        if q.queued_ms() == 0 {
            break;
        }
        if q.poll(at).is_some_and(|f| !f.is_silence) {
            played += 1;
        }
    }
    assert_eq!(played, 60);

    // The default bound is 60 s.
    let mut q = PlayoutQueue::new(Law::Mu, PipelineRate::Hz8000, start, false);
    let minute = vec![100i16; 8000 * 61];
    assert_eq!(q.push_pcm(&minute), 8000 * 60);
    assert_eq!(q.truncated_samples(), 8000);
    assert_eq!(q.queued_ms(), 60_000);
}

#[test]
fn marks_are_bounded_in_number_and_name_length() {
    let start = Instant::now();
    let mut q = PlayoutQueue::new(Law::Mu, PipelineRate::Hz8000, start, true);
    assert_eq!(
        q.mark("x".repeat(MAX_MARK_NAME_BYTES + 1)),
        Err(PlayoutError::MarkNameTooLong {
            len: MAX_MARK_NAME_BYTES + 1,
            limit: MAX_MARK_NAME_BYTES
        })
    );
    q.mark("x".repeat(MAX_MARK_NAME_BYTES)).unwrap();
    q.push_pcm(&[1; 160]);
    for k in 1..MAX_MARKS {
        q.mark(k.to_string()).unwrap();
    }
    assert_eq!(
        q.mark("one too many".into()),
        Err(PlayoutError::TooManyMarks { limit: MAX_MARKS })
    );
    // Draining the reported ones makes room again.
    assert_eq!(q.poll_marks().unwrap().name.len(), MAX_MARK_NAME_BYTES);
    q.mark("fits".into()).unwrap();
    q.poll(start).unwrap();
    assert_eq!(std::iter::from_fn(|| q.poll_marks()).count(), MAX_MARKS);
}
