//! Jitter buffer for one call's received audio, sans-IO, plus a decoded-domain
//! loss concealment helper.
//!
//! Owns: turning packets that arrive early, late, twice or not at all into
//! one frame per ptime on a fixed playout grid. Must not touch: sockets,
//! clocks (`now` is a parameter), decoding (payloads stay opaque `Bytes`),
//! RTP header checks (done by [`super::rtp::RtpReceiver`] before `push`).
//!
//! Model. The first packet of a stream anchors the grid: its timestamp plays
//! at `arrival + target_delay`, and the frame `n` ptimes later at that time
//! plus `n · ptime`. Packets are placed by RTP timestamp, not sequence
//! number, so sequence wrap, timestamp wrap and silence-suppression gaps need
//! no special case. A packet whose slot has been played is late (or a
//! duplicate, if that slot played audio); a slot with no packet when due is
//! [`Frame::Concealed`]. If a packet lands more than `max_delay` ahead of the
//! next slot, the oldest slots are dropped to make room (the grid keeps its
//! phase, the stream skips ahead). A new SSRC, a forward jump of more than
//! `resync_after` (or any jump past `max_delay` while nothing is buffered),
//! or a backward jump of more than `resync_after` confirmed by a second
//! consecutive packet, restarts the grid as for a first packet.
//!
//! With a playout clock set ([`JitterBuffer::with_playout_clock`]: the
//! owner pops only at that clock's ticks), the first slot is moved to the
//! tick nearest `arrival + target_delay` (never before the arrival): a slot
//! that fell between two ticks would otherwise wait up to a whole tick
//! beyond the target. The buffering then stays within half a tick of the
//! target, on average the target itself.
//!
//! Re-anchoring. A grid anchored on a packet that reached us late (the
//! first packets of a call are often handled late: a burst of call set-ups
//! keeps the task busy) would hold every later packet that much beyond the
//! target for the rest of the call. So the buffer watches how long each
//! packet waits for its slot: once per [`REANCHOR_WINDOW`] packets, if even
//! the shortest wait in the window (the packet that came latest) exceeded
//! the target by more than [`REANCHOR_TOLERANCE`], the grid moves that
//! excess earlier (the next slots fall due at once: nothing is dropped, the
//! buffered audio is handed out sooner). So every packet of the window
//! would still have waited at least the target: re-anchoring never takes
//! away margin the stream's jitter used. The first window holds the late
//! start itself, so a late start is gone within two windows (2 s). The
//! buffer only ever shrinks this way; a stream that arrives later than its
//! grid meets late packets and concealment, as before.
//!
//! Written by hand: the crates we looked at either own the clock (async
//! timers) or reorder by sequence number only, which cannot express our
//! playout-time contract.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use bytes::Bytes;

/// Packets per re-anchoring window (1 s at 20 ms).
pub const REANCHOR_WINDOW: u32 = 50;
/// Longest wait beyond the target a window may show without re-anchoring.
pub const REANCHOR_TOLERANCE: Duration = Duration::from_millis(2);

/// Errors of the jitter buffer (only configuration: pushes never fail).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum JitterError {
    /// Caller misuse: a configuration value out of range.
    #[error("invalid jitter buffer configuration: {0}")]
    InvalidConfig(&'static str),
}

/// Jitter buffer settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JitterConfig {
    /// Frame duration = negotiated ptime (one packet per frame).
    pub frame: Duration,
    /// RTP clock rate (8000 for G.711).
    pub clock_rate: u32,
    /// Delay from a stream's first arrival to its first playout.
    pub target_delay: Duration,
    /// Most audio held ahead of the playout point; beyond it the oldest
    /// frames are dropped.
    pub max_delay: Duration,
    /// A timestamp jump larger than this is a new stream, not jitter.
    pub resync_after: Duration,
}

impl JitterConfig {
    /// 8 kHz, target 40 ms, maximum 200 ms, resync on 1 s jumps.
    pub fn new(ptime: Duration) -> Self {
        Self {
            frame: ptime,
            clock_rate: 8000,
            target_delay: Duration::from_millis(40),
            max_delay: Duration::from_millis(200),
            resync_after: Duration::from_secs(1),
        }
    }
}

/// One ptime of output.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    /// The packet for this slot.
    Audio { payload: Bytes, timestamp: u32 },
    /// Nothing arrived in time for this slot: conceal (see [`conceal`]) —
    /// `consecutive` counts concealed slots in a row, from 1.
    Concealed { timestamp: u32, consecutive: u32 },
}

/// What happened to a pushed packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum PushOutcome {
    /// Placed in its slot.
    Buffered,
    /// Started a new grid (first packet, new SSRC, or timestamp jump);
    /// playout of this packet is at `plays_at`.
    Resynced { plays_at: Instant },
    /// Placed after dropping this many of the oldest slots (overflow).
    Overflow { dropped: u32 },
    /// Its slot already holds (or played) this timestamp.
    Duplicate,
    /// Its slot has already been played.
    Late,
    /// A large backward jump, waiting for a second packet to confirm it.
    JumpPending,
    /// From the SSRC we just switched away from (reordered across the switch).
    StaleSsrc,
}

/// Counters since creation.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct JitterStats {
    pub pushed: u64,
    pub played: u64,
    pub concealed: u64,
    pub duplicates: u64,
    pub late: u64,
    /// Frames (with audio) dropped because the buffer exceeded `max_delay`.
    pub overflow_dropped: u64,
    pub resyncs: u64,
    /// Frames (with audio) discarded by a resync.
    pub resync_dropped: u64,
    pub jump_pending: u64,
    pub stale_ssrc: u64,
    /// Times the grid moved earlier (see the module docs).
    pub reanchors: u64,
}

/// The playout grid of one stream.
#[derive(Debug, Clone)]
struct Playout {
    ssrc: u32,
    /// Timestamp of the next slot to play.
    head_ts: u32,
    /// When the next slot plays.
    head_time: Instant,
    /// `slots[i]` holds the payload for `head_ts + i · spf`.
    slots: VecDeque<Option<Bytes>>,
    /// Bit i: the slot `i + 1` before the head played audio.
    played_audio: u64,
    concealed_run: u32,
    /// Packets placed in the current re-anchoring window.
    window_packets: u32,
    /// The shortest wait (slot time − arrival) in the window.
    window_min_wait: Duration,
}

/// Reorders, de-duplicates and paces one call's received audio.
#[derive(Debug, Clone)]
pub struct JitterBuffer {
    config: JitterConfig,
    /// Samples per frame.
    spf: u32,
    /// Slots ahead of the head we hold at most.
    capacity: usize,
    /// `resync_after` in slots.
    jump_slots: i64,
    playout: Option<Playout>,
    previous_ssrc: Option<(u32, Instant)>,
    /// Timestamp of an unconfirmed large backward jump.
    pending_jump: Option<u32>,
    /// The owner's playout clock: origin and period.
    clock: Option<(Instant, Duration)>,
    stats: JitterStats,
}

impl JitterBuffer {
    pub fn new(config: JitterConfig) -> Result<Self, JitterError> {
        let spf_wide = config.frame.as_nanos() * u128::from(config.clock_rate) / 1_000_000_000;
        let spf =
            u32::try_from(spf_wide).map_err(|_| JitterError::InvalidConfig("frame too long"))?;
        if spf == 0 {
            return Err(JitterError::InvalidConfig(
                "frame must hold at least one sample",
            ));
        }
        if config.target_delay > config.max_delay {
            return Err(JitterError::InvalidConfig(
                "target_delay must not exceed max_delay",
            ));
        }
        let slots = |d: Duration| d.as_nanos() / config.frame.as_nanos();
        let capacity = usize::try_from(slots(config.max_delay).clamp(1, 1000)).unwrap_or(1000);
        let jump_slots = i64::try_from(slots(config.resync_after).max(1)).unwrap_or(i64::MAX);
        Ok(Self {
            config,
            spf,
            capacity,
            jump_slots,
            playout: None,
            previous_ssrc: None,
            pending_jump: None,
            clock: None,
            stats: JitterStats::default(),
        })
    }

    /// The owner pops at `origin + k · period` only: each stream's first
    /// slot is placed on the tick nearest its target (see the module docs).
    pub fn with_playout_clock(mut self, origin: Instant, period: Duration) -> Self {
        if !period.is_zero() {
            self.clock = Some((origin, period));
        }
        self
    }

    /// The configured target delay.
    pub fn target_delay(&self) -> Duration {
        self.config.target_delay
    }

    /// When a stream whose first packet arrives at `now` starts playing.
    fn first_playout(&self, now: Instant) -> Instant {
        let target = now + self.config.target_delay;
        let Some((origin, period)) = self.clock else {
            return target;
        };
        let since = target.saturating_duration_since(origin);
        let period_ns = period.as_nanos();
        let k = (since.as_nanos() + period_ns / 2) / period_ns;
        let mut at =
            origin + Duration::from_nanos(u64::try_from(k * period_ns).unwrap_or(u64::MAX));
        if target < origin {
            at = origin;
        }
        while at < now {
            at += period;
        }
        at
    }

    pub fn stats(&self) -> &JitterStats {
        &self.stats
    }

    /// When the next slot is due (`None` before the first packet).
    pub fn next_playout_at(&self) -> Option<Instant> {
        self.playout.as_ref().map(|p| p.head_time)
    }

    /// Frames with audio currently held.
    pub fn buffered(&self) -> usize {
        self.playout
            .as_ref()
            .map_or(0, |p| p.slots.iter().flatten().count())
    }

    /// Offer one packet (already checked by the RTP receiver).
    pub fn push(&mut self, now: Instant, ssrc: u32, timestamp: u32, payload: Bytes) -> PushOutcome {
        self.stats.pushed += 1;
        let outcome = self.place(now, ssrc, timestamp, payload);
        match outcome {
            PushOutcome::Duplicate => self.stats.duplicates += 1,
            PushOutcome::Late => self.stats.late += 1,
            PushOutcome::JumpPending => self.stats.jump_pending += 1,
            PushOutcome::StaleSsrc => self.stats.stale_ssrc += 1,
            PushOutcome::Overflow { dropped } => self.stats.overflow_dropped += u64::from(dropped),
            PushOutcome::Resynced { .. } => self.stats.resyncs += 1,
            PushOutcome::Buffered => {}
        }
        outcome
    }

    fn place(&mut self, now: Instant, ssrc: u32, timestamp: u32, payload: Bytes) -> PushOutcome {
        let Some(p) = self.playout.as_mut() else {
            return self.resync(now, ssrc, timestamp, payload);
        };
        if p.ssrc != ssrc {
            if let Some((old, at)) = self.previous_ssrc
                && old == ssrc
                && now.saturating_duration_since(at) < self.config.max_delay
            {
                return PushOutcome::StaleSsrc;
            }
            self.previous_ssrc = Some((p.ssrc, now));
            return self.resync(now, ssrc, timestamp, payload);
        }
        let spf = i64::from(self.spf);
        let delta = i64::from(timestamp.wrapping_sub(p.head_ts) as i32);
        let k = (delta + spf / 2).div_euclid(spf);
        if k < -self.jump_slots {
            let confirmed = self.pending_jump.is_some_and(|prev| {
                let step = i64::from(timestamp.wrapping_sub(prev) as i32);
                (1..=3 * spf).contains(&step)
            });
            if confirmed {
                return self.resync(now, ssrc, timestamp, payload);
            }
            self.pending_jump = Some(timestamp);
            return PushOutcome::JumpPending;
        }
        self.pending_jump = None;
        if k < 0 {
            let back = k.unsigned_abs() - 1;
            return if back < 64 && p.played_audio & (1 << back) != 0 {
                PushOutcome::Duplicate
            } else {
                PushOutcome::Late
            };
        }
        let cap = self.capacity as i64;
        let holds_audio = p.slots.iter().any(Option::is_some);
        if k >= cap + self.jump_slots || (k >= cap && !holds_audio) {
            return self.resync(now, ssrc, timestamp, payload);
        }
        let mut dropped = 0;
        let mut k = k;
        while k >= cap {
            if let Some(Some(_)) = p.slots.pop_front() {
                dropped += 1;
            }
            p.head_ts = p.head_ts.wrapping_add(self.spf);
            p.played_audio <<= 1;
            k -= 1;
        }
        let idx = usize::try_from(k).unwrap_or(0);
        if p.slots.len() <= idx {
            p.slots.resize(idx + 1, None);
        }
        match p.slots.get_mut(idx) {
            Some(slot @ None) => *slot = Some(payload),
            _ => return PushOutcome::Duplicate,
        }
        let slot_time = p.head_time + self.config.frame * u32::try_from(k).unwrap_or(0);
        p.window_min_wait = p
            .window_min_wait
            .min(slot_time.saturating_duration_since(now));
        p.window_packets += 1;
        if p.window_packets >= REANCHOR_WINDOW {
            let excess = p.window_min_wait.saturating_sub(self.config.target_delay);
            if excess > REANCHOR_TOLERANCE
                && let Some(earlier) = p.head_time.checked_sub(excess)
            {
                p.head_time = earlier;
                self.stats.reanchors += 1;
            }
            p.window_packets = 0;
            p.window_min_wait = Duration::MAX;
        }
        if dropped > 0 {
            PushOutcome::Overflow { dropped }
        } else {
            PushOutcome::Buffered
        }
    }

    fn resync(&mut self, now: Instant, ssrc: u32, timestamp: u32, payload: Bytes) -> PushOutcome {
        if let Some(old) = self.playout.take() {
            self.stats.resync_dropped += old.slots.iter().flatten().count() as u64;
        }
        let plays_at = self.first_playout(now);
        self.pending_jump = None;
        self.playout = Some(Playout {
            ssrc,
            head_ts: timestamp,
            head_time: plays_at,
            slots: VecDeque::from([Some(payload)]),
            played_audio: 0,
            concealed_run: 0,
            window_packets: 1,
            window_min_wait: plays_at.saturating_duration_since(now),
        });
        PushOutcome::Resynced { plays_at }
    }

    /// The frame for the next slot if it is due at `now` (one per call; a
    /// caller that fell behind calls again). `None` before playout starts
    /// and between slots.
    pub fn pop(&mut self, now: Instant) -> Option<Frame> {
        let p = self.playout.as_mut()?;
        if now < p.head_time {
            return None;
        }
        let timestamp = p.head_ts;
        let slot = p.slots.pop_front().flatten();
        p.head_ts = p.head_ts.wrapping_add(self.spf);
        p.head_time += self.config.frame;
        p.played_audio <<= 1;
        Some(match slot {
            Some(payload) => {
                p.played_audio |= 1;
                p.concealed_run = 0;
                self.stats.played += 1;
                Frame::Audio { payload, timestamp }
            }
            None => {
                p.concealed_run = p.concealed_run.saturating_add(1);
                self.stats.concealed += 1;
                Frame::Concealed {
                    timestamp,
                    consecutive: p.concealed_run,
                }
            }
        })
    }
}

/// Concealment fades to silence over this many frames (60 ms at 20 ms ptime).
pub const CONCEAL_FADE_FRAMES: usize = 3;

/// Decoded-domain concealment for the `n_consecutive`-th lost frame (from 1)
/// after the last good frame `prev`: the good frame played alternately
/// backwards and forwards (so every frame edge continues from the sample
/// before it: no click) under a linear fade that reaches silence after
/// [`CONCEAL_FADE_FRAMES`] frames. Returns a frame of `prev.len()` samples.
pub fn conceal(prev: &[i16], n_consecutive: u32) -> Vec<i16> {
    let len = prev.len();
    let fade = (len * CONCEAL_FADE_FRAMES) as i64;
    let n = usize::try_from(n_consecutive.max(1)).unwrap_or(usize::MAX);
    let start = (n - 1).saturating_mul(len) as i64;
    let backwards = n % 2 == 1;
    (0..len)
        .map(|i| {
            let src = if backwards {
                prev[len - 1 - i]
            } else {
                prev[i]
            };
            let remaining = (fade - start - i as i64 - 1).max(0);
            (i64::from(src) * remaining / fade.max(1)) as i16
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn buffer() -> JitterBuffer {
        JitterBuffer::new(JitterConfig::new(Duration::from_millis(20))).unwrap()
    }

    fn b(x: u8) -> Bytes {
        Bytes::from(vec![x; 160])
    }

    #[test]
    fn config_is_checked() {
        let mut c = JitterConfig::new(Duration::ZERO);
        assert!(JitterBuffer::new(c.clone()).is_err());
        c.frame = Duration::from_millis(20);
        c.target_delay = Duration::from_millis(300);
        assert_eq!(
            JitterBuffer::new(c).unwrap_err(),
            JitterError::InvalidConfig("target_delay must not exceed max_delay")
        );
    }

    /// With a 20 ms playout clock, a first packet arriving 3 ms after a
    /// tick plays at the tick nearest arrival + 40 ms (37 ms later, not the
    /// 57 ms the next tick after 43 ms would give); one arriving 13 ms after
    /// a tick plays at the tick after (47 ms later).
    #[test]
    fn playout_clock_puts_the_first_slot_on_the_nearest_tick() {
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        let mut jb = buffer().with_playout_clock(t0, ms(20));
        assert_eq!(
            jb.push(t0 + ms(3), 7, 0, b(1)),
            PushOutcome::Resynced {
                plays_at: t0 + ms(40)
            }
        );
        let mut jb = buffer().with_playout_clock(t0, ms(20));
        assert_eq!(
            jb.push(t0 + ms(13), 7, 0, b(1)),
            PushOutcome::Resynced {
                plays_at: t0 + ms(60)
            }
        );
        // Before the clock's origin: never earlier than the origin.
        let mut jb = buffer().with_playout_clock(t0 + ms(100), ms(20));
        assert_eq!(
            jb.push(t0, 7, 0, b(1)),
            PushOutcome::Resynced {
                plays_at: t0 + ms(100)
            }
        );
    }

    #[test]
    fn first_packet_plays_after_target_delay() {
        let t0 = Instant::now();
        let mut jb = buffer();
        assert_eq!(
            jb.push(t0, 7, 1000, b(1)),
            PushOutcome::Resynced {
                plays_at: t0 + Duration::from_millis(40)
            }
        );
        assert_eq!(jb.pop(t0 + Duration::from_millis(39)), None);
        assert_eq!(
            jb.pop(t0 + Duration::from_millis(40)),
            Some(Frame::Audio {
                payload: b(1),
                timestamp: 1000
            })
        );
        assert_eq!(jb.pop(t0 + Duration::from_millis(41)), None);
        assert_eq!(
            jb.pop(t0 + Duration::from_millis(60)),
            Some(Frame::Concealed {
                timestamp: 1160,
                consecutive: 1
            })
        );
    }

    #[test]
    fn late_and_duplicate_are_told_apart() {
        let t0 = Instant::now();
        let mut jb = buffer();
        jb.push(t0, 7, 0, b(1));
        assert_eq!(jb.push(t0, 7, 0, b(1)), PushOutcome::Duplicate);
        let _ = jb.pop(t0 + Duration::from_millis(40));
        let _ = jb.pop(t0 + Duration::from_millis(60));
        assert_eq!(
            jb.push(t0 + Duration::from_millis(61), 7, 0, b(1)),
            PushOutcome::Duplicate
        );
        assert_eq!(
            jb.push(t0 + Duration::from_millis(61), 7, 160, b(2)),
            PushOutcome::Late
        );
        assert_eq!((jb.stats().duplicates, jb.stats().late), (2, 1));
    }

    #[test]
    fn overflow_drops_the_oldest() {
        let t0 = Instant::now();
        let mut jb = buffer();
        for i in 0..10u32 {
            assert!(matches!(
                jb.push(t0, 7, i * 160, b(i as u8)),
                PushOutcome::Buffered | PushOutcome::Resynced { .. }
            ));
        }
        assert_eq!(
            jb.push(t0, 7, 11 * 160, b(11)),
            PushOutcome::Overflow { dropped: 2 }
        );
        let f = jb.pop(t0 + Duration::from_millis(40));
        assert_eq!(
            f,
            Some(Frame::Audio {
                payload: b(2),
                timestamp: 320
            })
        );
    }

    #[test]
    fn forward_jump_with_empty_buffer_resyncs() {
        let t0 = Instant::now();
        let mut jb = buffer();
        jb.push(t0, 7, 0, b(1));
        let _ = jb.pop(t0 + Duration::from_millis(40));
        // 500 ms of silence suppression, then a talkspurt.
        let t1 = t0 + Duration::from_millis(540);
        assert_eq!(
            jb.push(t1, 7, 4000 + 160, b(2)),
            PushOutcome::Resynced {
                plays_at: t1 + Duration::from_millis(40)
            }
        );
    }

    #[test]
    fn backward_jump_needs_confirmation() {
        let t0 = Instant::now();
        let mut jb = buffer();
        jb.push(t0, 7, 1_000_000, b(1));
        assert_eq!(jb.push(t0, 7, 5, b(2)), PushOutcome::JumpPending);
        assert!(matches!(
            jb.push(t0, 7, 165, b(3)),
            PushOutcome::Resynced { .. }
        ));
    }

    #[test]
    fn stale_ssrc_after_switch_is_ignored() {
        let t0 = Instant::now();
        let mut jb = buffer();
        jb.push(t0, 1, 0, b(1));
        assert!(matches!(
            jb.push(t0, 2, 9000, b(2)),
            PushOutcome::Resynced { .. }
        ));
        assert_eq!(jb.push(t0, 1, 160, b(3)), PushOutcome::StaleSsrc);
        assert!(matches!(
            jb.push(t0 + Duration::from_secs(1), 1, 160, b(3)),
            PushOutcome::Resynced { .. }
        ));
        assert_eq!(jb.stats().resync_dropped, 2);
    }

    #[test]
    fn conceal_fades_without_clicks() {
        let prev: Vec<i16> = (0..160)
            .map(|i| ((i as f64 * 0.3).sin() * 8000.0) as i16)
            .collect();
        let max_step = prev.windows(2).map(|w| (w[1] - w[0]).abs()).max().unwrap();
        let mut out = prev.clone();
        for n in 1..=4 {
            out.extend(conceal(&prev, n));
        }
        for w in out.windows(2) {
            assert!(
                (w[1] - w[0]).abs() <= max_step + 20,
                "step {} > {}",
                (w[1] - w[0]).abs(),
                max_step
            );
        }
        assert!(
            out[160 * 3 + 159].abs() <= 20,
            "almost silent at the end of the fade"
        );
        assert!(out[160 * 4..].iter().all(|&s| s == 0));
        assert_eq!(
            conceal(&prev, 1)[0],
            ((i64::from(prev[159]) * 479) / 480) as i16
        );
    }
}
