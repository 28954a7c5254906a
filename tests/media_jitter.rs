#![allow(clippy::unwrap_used, clippy::expect_used)]
//! The receive path in virtual time: `RtpSender` → seeded network (loss,
//! ±30 ms jitter, reordering, duplicates) → `RtpReceiver` → `JitterBuffer`,
//! popped by a 20 ms media clock. An independent oracle computes, from the
//! arrival times alone, which frame each tick must yield; the test asserts
//! the exact output sequence and the receiver's RFC 3550 counts.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use sipbridge::media::jitter::{Frame, JitterBuffer, JitterConfig};
use sipbridge::media::rtp::{RtpInput, RtpReceiver, RtpReceiverConfig, RtpSender};

const FRAME: Duration = Duration::from_millis(20);
const TARGET: Duration = Duration::from_millis(40);

/// One stream the sender emits: its packets are `first..first + count` in
/// the global send order.
struct Segment {
    ssrc: u32,
    first: usize,
    count: usize,
    initial_seq: u16,
    initial_ts: u32,
}

/// A datagram in flight.
#[derive(Clone)]
struct Arrival {
    at: Duration,
    /// Global packet index.
    index: usize,
    data: Bytes,
}

struct Scenario {
    arrivals: Vec<Arrival>,
    segments: Vec<Segment>,
    /// Segment of each global packet index.
    segment_of: Vec<usize>,
}

/// 20 ms packets; 5 % loss, delay 50 ms ± 30 ms (so packets 20 ms apart
/// reorder), 3 % duplicated (the copy with its own delay).
fn simulate(seed: u64, segments: Vec<Segment>) -> Scenario {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut arrivals = Vec::new();
    let mut segment_of = Vec::new();
    for (s, seg) in segments.iter().enumerate() {
        let mut tx = RtpSender::new(seg.ssrc, seg.initial_seq, seg.initial_ts, 0);
        for i in seg.first..seg.first + seg.count {
            segment_of.push(s);
            let payload = (i as u32).to_be_bytes().repeat(40);
            let data = tx.packet(&payload, i == seg.first, 160);
            let sent = FRAME * i as u32;
            if i == 0 {
                // The call's first packet is a fast one: the worst case for
                // later packets, which then miss their slots (late).
                arrivals.push(Arrival {
                    at: sent + Duration::from_millis(20),
                    index: i,
                    data,
                });
                continue;
            }
            if rng.random_bool(0.05) {
                continue;
            }
            let copies = if rng.random_bool(0.03) { 2 } else { 1 };
            for _ in 0..copies {
                let delay = Duration::from_micros(rng.random_range(20_000..=80_000));
                arrivals.push(Arrival {
                    at: sent + delay,
                    index: i,
                    data: data.clone(),
                });
            }
        }
    }
    arrivals.sort_by_key(|a| a.at);
    Scenario {
        arrivals,
        segments,
        segment_of,
    }
}

/// What a tick must yield, by the contract: the stream whose first arrival
/// is the latest one at or before the tick plays its slot
/// n = ⌊(tick − first arrival − target) / 20 ms⌋, which is the packet
/// `first index + n` if some copy of it arrived by the tick.
#[derive(Debug, PartialEq, Eq)]
enum Expected {
    Nothing,
    Audio(usize),
    Concealed(u32),
}

fn oracle(sc: &Scenario, ticks: &[Duration]) -> Vec<Expected> {
    // First arrival time and index per segment.
    let mut anchors: BTreeMap<usize, (Duration, usize)> = BTreeMap::new();
    for a in &sc.arrivals {
        anchors
            .entry(sc.segment_of[a.index])
            .or_insert((a.at, a.index));
    }
    let mut first_copy: BTreeMap<usize, Duration> = BTreeMap::new();
    for a in &sc.arrivals {
        first_copy.entry(a.index).or_insert(a.at);
    }
    let mut concealed_run = 0;
    ticks
        .iter()
        .map(|&t| {
            let Some((&seg, &(anchor, first))) = anchors
                .iter()
                .filter(|(_, (at, _))| *at <= t)
                .max_by_key(|(_, (at, _))| *at)
            else {
                return Expected::Nothing;
            };
            let start = anchor + TARGET;
            if t < start {
                concealed_run = 0;
                return Expected::Nothing;
            }
            let n = ((t - start).as_micros() / FRAME.as_micros()) as usize;
            let index = first + n;
            let in_segment = index < sc.segments[seg].first + sc.segments[seg].count;
            if in_segment && first_copy.get(&index).is_some_and(|&at| at <= t) {
                concealed_run = 0;
                Expected::Audio(index)
            } else {
                concealed_run += 1;
                Expected::Concealed(concealed_run)
            }
        })
        .collect()
}

struct Run {
    outputs: Vec<Expected>,
    receiver: RtpReceiver,
    jitter: JitterBuffer,
}

/// Drive receiver and buffer; ticks every 20 ms at a 7 ms phase. Arrivals
/// at or before a tick are handled before it.
fn run(sc: &Scenario, ticks: &[Duration]) -> Run {
    let base = Instant::now();
    let from: SocketAddr = "192.0.2.10:4000".parse().unwrap();
    let mut receiver = RtpReceiver::new(RtpReceiverConfig::new(0, Some(101)), from).unwrap();
    let mut jitter = JitterBuffer::new(JitterConfig::new(FRAME)).unwrap();
    let mut next = 0;
    let mut outputs = Vec::new();
    for &t in ticks {
        while let Some(a) = sc.arrivals.get(next).filter(|a| a.at <= t) {
            next += 1;
            let now = base + a.at;
            if let RtpInput::Media {
                ssrc,
                timestamp,
                payload,
                ..
            } = receiver.on_datagram(now, from, a.data.clone())
            {
                jitter.push(now, ssrc, timestamp, payload);
            }
        }
        outputs.push(match jitter.pop(base + t) {
            None => Expected::Nothing,
            Some(Frame::Audio { payload, timestamp }) => {
                let index = u32::from_be_bytes(payload[..4].try_into().unwrap()) as usize;
                let seg = &sc.segments[sc.segment_of[index]];
                let offset = (index - seg.first) as u32 * 160;
                assert_eq!(
                    timestamp,
                    seg.initial_ts.wrapping_add(offset),
                    "timestamp of packet {index}"
                );
                Expected::Audio(index)
            }
            Some(Frame::Concealed { consecutive, .. }) => Expected::Concealed(consecutive),
        });
    }
    Run {
        outputs,
        receiver,
        jitter,
    }
}

fn ticks(until: Duration) -> Vec<Duration> {
    let mut t = Duration::from_millis(7);
    let mut v = Vec::new();
    while t < until {
        v.push(t);
        t += FRAME;
    }
    v
}

fn played(outputs: &[Expected]) -> Vec<usize> {
    outputs
        .iter()
        .filter_map(|o| match o {
            Expected::Audio(i) => Some(*i),
            _ => None,
        })
        .collect()
}

#[test]
fn ten_seconds_through_a_lossy_network_with_seq_and_timestamp_wrap() {
    let sc = simulate(
        42,
        vec![Segment {
            ssrc: 0x1234_5678,
            first: 0,
            count: 500,
            initial_seq: 65_400,
            initial_ts: u32::MAX - 160 * 200,
        }],
    );
    let ticks = ticks(Duration::from_millis(10_200));
    let r = run(&sc, &ticks);
    let expected = oracle(&sc, &ticks);
    assert_eq!(r.outputs, expected);

    // Every sent frame at most once, in order; the impairments were real.
    let played = played(&r.outputs);
    assert!(played.windows(2).all(|w| w[0] < w[1]));
    let concealed = r
        .outputs
        .iter()
        .filter(|o| matches!(o, Expected::Concealed(_)))
        .count();
    assert!(
        played.len() > 300 && concealed > 100,
        "played {} concealed {concealed}",
        played.len()
    );
    let js = r.jitter.stats();
    assert!(js.duplicates > 0 && js.late > 0, "{js:?}");
    assert_eq!(js.played as usize, played.len());

    // Playout starts exactly at first arrival + 40 ms (first tick at or after).
    let first_at = sc.arrivals[0].at;
    let first_out = r
        .outputs
        .iter()
        .position(|o| *o != Expected::Nothing)
        .unwrap();
    assert!(ticks[first_out] >= first_at + TARGET && ticks[first_out] < first_at + TARGET + FRAME);

    // RFC 3550 A.1/A.3 counts: seq wrapped 65400 → 0 at packet 136.
    let first_index = sc.arrivals[0].index;
    let max_index = sc.arrivals.iter().map(|a| a.index).max().unwrap();
    let stats = r.receiver.stats();
    assert_eq!(stats.packets_received, sc.arrivals.len() as u64);
    assert_eq!(stats.expected, (max_index - first_index + 1) as u64);
    assert_eq!(
        stats.cumulative_lost,
        stats.expected as i64 - sc.arrivals.len() as i64
    );
    assert_eq!(
        stats.extended_highest_seq,
        (1 << 16) + (65_400 + max_index as u32 - (1 << 16))
    );
    assert_eq!(stats.rejected.total(), 0);
}

#[test]
fn ssrc_change_mid_stream_restarts_playout() {
    let sc = simulate(
        7,
        vec![
            Segment {
                ssrc: 1111,
                first: 0,
                count: 250,
                initial_seq: 100,
                initial_ts: 5_000,
            },
            Segment {
                ssrc: 2222,
                first: 250,
                count: 250,
                initial_seq: 40_000,
                initial_ts: 3_000_000_000,
            },
        ],
    );
    let ticks = ticks(Duration::from_millis(10_200));
    let r = run(&sc, &ticks);
    assert_eq!(r.outputs, oracle(&sc, &ticks));

    let played = played(&r.outputs);
    assert!(played.windows(2).all(|w| w[0] < w[1]));
    assert!(played.iter().any(|&i| i < 250) && played.iter().any(|&i| i >= 250));
    // The switch leaves a gap of "nothing" until the new stream's start.
    let switch_at = sc.arrivals.iter().find(|a| a.index >= 250).unwrap().at;
    let gap: Vec<_> = ticks
        .iter()
        .zip(&r.outputs)
        .filter(|(t, _)| **t >= switch_at && **t < switch_at + TARGET)
        .collect();
    assert!(!gap.is_empty() && gap.iter().all(|(_, o)| **o == Expected::Nothing));
    let stats = r.receiver.stats();
    assert_eq!((stats.ssrc, stats.ssrc_changes), (Some(2222), 1));
    assert_eq!(r.jitter.stats().resyncs, 2);
}

#[test]
fn several_seeds_hold_the_contract() {
    for seed in 100..110 {
        let sc = simulate(
            seed,
            vec![Segment {
                ssrc: seed as u32,
                first: 0,
                count: 150,
                initial_seq: 65_500,
                initial_ts: u32::MAX - 1000,
            }],
        );
        let ticks = ticks(Duration::from_millis(3_200));
        assert_eq!(run(&sc, &ticks).outputs, oracle(&sc, &ticks), "seed {seed}");
    }
}
