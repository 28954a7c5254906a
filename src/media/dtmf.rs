//! RFC 4733 telephone-events (DTMF digits carried in RTP): a receiver that
//! turns the packet stream into exactly one [`DtmfEvent`] per key press, and
//! a sender that produces the packet sequence for one press, paced by the
//! caller's clock.
//!
//! Owns only the 4-byte event payload and the per-press state. It does not
//! parse or build RTP headers (the `rtp` module hands over the timestamp,
//! marker and payload, and stamps outgoing packets), check payload types or
//! read a clock.
//!
//! Payload (RFC 4733 §2.3): `event (8) | E (1) R (1) volume (6) | duration (16)`.
//! A key press is identified by its RTP timestamp (the event's start); the
//! end bit is sent three times; the duration counts timestamp units since
//! the start.

use std::time::{Duration, Instant};

/// Size of one event payload.
pub const PAYLOAD_LEN: usize = 4;
/// Interval between update packets while a press lasts (and between the
/// three end packets), RFC 4733 §2.5.1.2: 50 ms is the recommended value.
pub const UPDATE_INTERVAL: Duration = Duration::from_millis(50);
/// End packets sent per press (RFC 4733 §2.5.1.4).
pub const END_REPEATS: u8 = 3;
/// Volume (−dBm0) put in sent packets.
pub const SEND_VOLUME: u8 = 10;
/// Highest event code handled: 0–9, `*`, `#`, A–D, flash (16).
pub const MAX_EVENT: u8 = 16;

/// Maps an RFC 4733 event code (0–16) to its digit: `0`–`9`, `*`, `#`,
/// `A`–`D`, and `!` for flash (16).
pub fn event_to_digit(event: u8) -> Option<char> {
    match event {
        0..=9 => char::from_digit(u32::from(event), 10),
        10 => Some('*'),
        11 => Some('#'),
        12..=15 => Some(char::from(b'A' + (event - 12))),
        16 => Some('!'),
        _ => None,
    }
}

/// The inverse of [`event_to_digit`] (letters in either case).
pub fn digit_to_event(digit: char) -> Option<u8> {
    match digit {
        '0'..='9' => digit.to_digit(10).and_then(|d| u8::try_from(d).ok()),
        '*' => Some(10),
        '#' => Some(11),
        'A'..='D' => Some(12 + (digit as u8 - b'A')),
        'a'..='d' => Some(12 + (digit as u8 - b'a')),
        '!' => Some(16),
        _ => None,
    }
}

/// Errors from [`DtmfSender::press`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DtmfError {
    /// Not a DTMF digit (`0`–`9`, `*`, `#`, `A`–`D`, `!`).
    #[error("not a DTMF digit: {0:?}")]
    InvalidDigit(char),
    /// Zero, or longer than the 16-bit duration field allows.
    #[error("press duration {0:?} out of range")]
    InvalidDuration(Duration),
    /// A press is still being sent.
    #[error("a DTMF press is still being sent")]
    Busy,
}

/// One key press, reported once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DtmfEvent {
    /// `0`–`9`, `*`, `#`, `A`–`D`, or `!` (flash).
    pub digit: char,
    /// The longest duration seen for the press, in milliseconds.
    pub duration_ms: u32,
    /// The RTP timestamp of the press's packets (its start).
    pub start_timestamp: u32,
}

/// Counters kept by a [`DtmfReceiver`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DtmfStats {
    /// Valid packets seen.
    pub packets: u64,
    /// Packets ignored as malformed (short, or event code > 16).
    pub malformed: u64,
    /// Packets of presses already reported, or older than them.
    pub stale: u64,
    /// Start packets (marker bit) seen.
    pub starts: u64,
    /// Events reported.
    pub events: u64,
}

#[derive(Debug, Clone, Copy)]
struct InProgress {
    timestamp: u32,
    event: u8,
    duration: u16,
}

/// Turns received telephone-event packets into one event per key press.
///
/// An event is reported on the first end packet of a press; its duplicates,
/// retransmissions and late updates are recognised by their timestamp and
/// ignored. A press whose start was lost is still reported from its end
/// packet. A press whose three end packets were all lost is reported when the
/// next press begins, or by [`DtmfReceiver::flush`].
#[derive(Debug, Clone)]
pub struct DtmfReceiver {
    clock_rate: u32,
    current: Option<InProgress>,
    last_reported: Option<u32>,
    stats: DtmfStats,
}

/// Whether RTP timestamp `a` is after `b` (serial arithmetic, RFC 1982).
fn is_after(a: u32, b: u32) -> bool {
    (a.wrapping_sub(b) as i32) > 0
}

impl DtmfReceiver {
    /// A receiver for a telephone-event stream with this RTP clock rate
    /// (8000 for `telephone-event/8000`).
    pub fn new(clock_rate: u32) -> DtmfReceiver {
        DtmfReceiver {
            clock_rate: clock_rate.max(1),
            current: None,
            last_reported: None,
            stats: DtmfStats::default(),
        }
    }

    /// Handles one packet's timestamp, marker bit and payload; returns the
    /// press it completes, if any.
    pub fn on_packet(
        &mut self,
        rtp_timestamp: u32,
        marker: bool,
        payload: &[u8],
    ) -> Option<DtmfEvent> {
        let (event, end, duration) = match payload {
            [event, flags, d0, d1, ..] if *event <= MAX_EVENT => {
                (*event, flags & 0x80 != 0, u16::from_be_bytes([*d0, *d1]))
            }
            _ => {
                self.stats.malformed += 1;
                return None;
            }
        };
        self.stats.packets += 1;
        if marker {
            self.stats.starts += 1;
        }
        if let Some(last) = self.last_reported
            && !is_after(rtp_timestamp, last)
        {
            self.stats.stale += 1;
            return None;
        }
        let mut completed = None;
        match self.current {
            Some(ref mut c) if c.timestamp == rtp_timestamp => {
                c.duration = c.duration.max(duration);
            }
            Some(c) if !is_after(rtp_timestamp, c.timestamp) => {
                // From an older press never seen: too late to matter.
                self.stats.stale += 1;
                return None;
            }
            previous => {
                // A new press. One still open lost all its end packets: it
                // ended when this one began.
                if let Some(p) = previous {
                    completed = Some(self.report(p));
                }
                self.current = Some(InProgress {
                    timestamp: rtp_timestamp,
                    event,
                    duration,
                });
                if completed.is_some() {
                    // Report this press from one of its later end packets.
                    return completed;
                }
            }
        }
        if end && let Some(c) = self.current.take() {
            return Some(self.report(c));
        }
        completed
    }

    fn report(&mut self, press: InProgress) -> DtmfEvent {
        self.last_reported = Some(press.timestamp);
        self.stats.events += 1;
        let ms = u64::from(press.duration) * 1000 / u64::from(self.clock_rate);
        DtmfEvent {
            digit: event_to_digit(press.event).unwrap_or('?'),
            duration_ms: u32::try_from(ms).unwrap_or(u32::MAX),
            start_timestamp: press.timestamp,
        }
    }

    /// Reports a press whose end never arrived (call it when the stream
    /// stops, e.g. on RTP timeout or hang-up).
    pub fn flush(&mut self) -> Option<DtmfEvent> {
        let press = self.current.take()?;
        Some(self.report(press))
    }

    /// The counters so far.
    pub fn stats(&self) -> DtmfStats {
        self.stats
    }
}

/// One telephone-event packet to send: the RTP layer puts `payload` in a
/// packet with this `timestamp` and `marker` (and the negotiated
/// telephone-event payload type).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DtmfPacket {
    /// The 4-byte event payload.
    pub payload: [u8; PAYLOAD_LEN],
    /// Set on the first packet of a press.
    pub marker: bool,
    /// The press's RTP timestamp (the same on every packet of the press).
    pub timestamp: u32,
    /// Whether this is one of the end packets.
    pub end: bool,
}

#[derive(Debug, Clone, Copy)]
struct Press {
    event: u8,
    timestamp: u32,
    start: Instant,
    /// Total duration in timestamp units.
    units: u16,
    duration: Duration,
    /// Updates sent so far.
    updates: u32,
    /// End packets sent so far.
    ends: u8,
}

/// Sends key presses as RFC 4733 packets: a start packet (marker), an
/// update every 50 ms while the key is down, then three end packets 50 ms
/// apart, all with the press's timestamp.
#[derive(Debug, Clone)]
pub struct DtmfSender {
    clock_rate: u32,
    press: Option<Press>,
}

impl DtmfSender {
    /// A sender for a stream with this RTP clock rate (usually 8000).
    pub fn new(clock_rate: u32) -> DtmfSender {
        DtmfSender {
            clock_rate: clock_rate.max(1),
            press: None,
        }
    }

    fn units(&self, d: Duration) -> u64 {
        d.as_nanos()
            .saturating_mul(u128::from(self.clock_rate))
            .div_euclid(1_000_000_000) as u64
    }

    /// Starts sending `digit` held for `duration`, beginning at `now`;
    /// `timestamp` is the stream's RTP timestamp at `now`.
    pub fn press(
        &mut self,
        digit: char,
        duration: Duration,
        now: Instant,
        timestamp: u32,
    ) -> Result<(), DtmfError> {
        if self.press.is_some() {
            return Err(DtmfError::Busy);
        }
        let event = digit_to_event(digit).ok_or(DtmfError::InvalidDigit(digit))?;
        let units = u16::try_from(self.units(duration))
            .ok()
            .filter(|&u| u > 0)
            .ok_or(DtmfError::InvalidDuration(duration))?;
        self.press = Some(Press {
            event,
            timestamp,
            start: now,
            units,
            duration,
            updates: 0,
            ends: 0,
        });
        Ok(())
    }

    /// When the next packet is due; `None` when idle.
    pub fn next_deadline(&self) -> Option<Instant> {
        let p = self.press.as_ref()?;
        let update_at = UPDATE_INTERVAL * p.updates;
        Some(if update_at < p.duration {
            p.start + update_at
        } else {
            p.start + p.duration + UPDATE_INTERVAL * u32::from(p.ends)
        })
    }

    /// The packet due at `now`, if any (call again until `None`).
    pub fn poll(&mut self, now: Instant) -> Option<DtmfPacket> {
        let due = self.next_deadline()?;
        if now < due {
            return None;
        }
        let min_units = self.units(Duration::from_millis(20));
        let p = self.press.as_mut()?;
        let update_at = UPDATE_INTERVAL * p.updates;
        let (end, units, marker) = if update_at < p.duration {
            let elapsed = (u64::from(self.clock_rate) * update_at.as_millis() as u64 / 1000)
                .max(min_units)
                .min(u64::from(p.units));
            let marker = p.updates == 0;
            p.updates += 1;
            (false, u16::try_from(elapsed).unwrap_or(p.units), marker)
        } else {
            p.ends += 1;
            (true, p.units, false)
        };
        let flags = (if end { 0x80 } else { 0 }) | SEND_VOLUME;
        let d = units.to_be_bytes();
        let packet = DtmfPacket {
            payload: [p.event, flags, d[0], d[1]],
            marker,
            timestamp: p.timestamp,
            end,
        };
        if p.ends >= END_REPEATS {
            self.press = None;
        }
        Some(packet)
    }

    /// Whether no press is being sent.
    pub fn is_idle(&self) -> bool {
        self.press.is_none()
    }
}

/// The two frequencies (low, high) of a DTMF key (ITU-T Q.23), `None` for
/// flash and anything else.
pub fn key_frequencies(digit: char) -> Option<(f64, f64)> {
    const LOW: [f64; 4] = [697.0, 770.0, 852.0, 941.0];
    const HIGH: [f64; 4] = [1209.0, 1336.0, 1477.0, 1633.0];
    let (row, col) = match digit.to_ascii_uppercase() {
        '1' => (0, 0),
        '2' => (0, 1),
        '3' => (0, 2),
        'A' => (0, 3),
        '4' => (1, 0),
        '5' => (1, 1),
        '6' => (1, 2),
        'B' => (1, 3),
        '7' => (2, 0),
        '8' => (2, 1),
        '9' => (2, 2),
        'C' => (2, 3),
        '*' => (3, 0),
        '0' => (3, 1),
        '#' => (3, 2),
        'D' => (3, 3),
        _ => return None,
    };
    Some((LOW[row], HIGH[col]))
}

/// 160 samples (20 ms at 8 kHz) of the in-band tone of `digit`, starting
/// `offset` samples into the tone (so consecutive frames join without a
/// click): both frequencies at about −9 dBm0 each. Silence for a key that
/// has no tone.
pub fn tone_frame(digit: char, offset: u32) -> [i16; 160] {
    let mut pcm = [0i16; 160];
    let Some((low, high)) = key_frequencies(digit) else {
        return pcm;
    };
    for (i, s) in pcm.iter_mut().enumerate() {
        let t = f64::from(offset + i as u32) / 8000.0;
        let v = 5000.0 * (2.0 * std::f64::consts::PI * low * t).sin()
            + 5000.0 * (2.0 * std::f64::consts::PI * high * t).sin();
        *s = v as i16;
    }
    pcm
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    fn payload(event: u8, end: bool, duration: u16) -> [u8; 4] {
        let d = duration.to_be_bytes();
        [event, if end { 0x80 | 10 } else { 10 }, d[0], d[1]]
    }

    /// Feeds packets (timestamp, marker, payload); returns the events.
    fn feed(rx: &mut DtmfReceiver, packets: &[(u32, bool, [u8; 4])]) -> Vec<DtmfEvent> {
        packets
            .iter()
            .filter_map(|(ts, m, p)| rx.on_packet(*ts, *m, p))
            .collect()
    }

    fn press(ts: u32, event: u8) -> Vec<(u32, bool, [u8; 4])> {
        vec![
            (ts, true, payload(event, false, 160)),
            (ts, false, payload(event, false, 400)),
            (ts, false, payload(event, false, 800)),
            (ts, false, payload(event, true, 960)),
            (ts, false, payload(event, true, 960)),
            (ts, false, payload(event, true, 960)),
        ]
    }

    fn ev(digit: char, duration_ms: u32, start_timestamp: u32) -> DtmfEvent {
        DtmfEvent {
            digit,
            duration_ms,
            start_timestamp,
        }
    }

    #[test]
    fn digits_map_both_ways() {
        for e in 0..=16 {
            assert_eq!(digit_to_event(event_to_digit(e).unwrap()), Some(e));
        }
        assert_eq!(event_to_digit(10), Some('*'));
        assert_eq!(event_to_digit(11), Some('#'));
        assert_eq!(event_to_digit(15), Some('D'));
        assert_eq!(event_to_digit(17), None);
        assert_eq!(digit_to_event('b'), Some(13));
        assert_eq!(digit_to_event('x'), None);
    }

    #[test]
    fn a_normal_press_with_three_end_packets_is_one_event() {
        let mut rx = DtmfReceiver::new(8000);
        let packets = press(1000, 5);
        let results: Vec<Option<DtmfEvent>> = packets
            .iter()
            .map(|(t, m, p)| rx.on_packet(*t, *m, p))
            .collect();
        // Reported on the first end packet, not before, not again.
        assert_eq!(results[..3], [None, None, None]);
        assert_eq!(results[3], Some(ev('5', 120, 1000)));
        assert_eq!(results[4..], [None, None]);
        let s = rx.stats();
        assert_eq!((s.packets, s.events, s.starts, s.stale), (6, 1, 1, 2));
    }

    #[test]
    fn retransmitted_and_duplicated_packets_do_not_repeat_the_event() {
        let mut rx = DtmfReceiver::new(8000);
        let mut packets = press(2000, 11);
        // Every packet twice, and the start again after the end.
        packets = packets.into_iter().flat_map(|p| [p, p]).collect();
        packets.push((2000, true, payload(11, false, 160)));
        assert_eq!(feed(&mut rx, &packets), vec![ev('#', 120, 2000)]);
    }

    #[test]
    fn reordered_end_packets_still_give_one_event_with_the_final_duration() {
        let mut rx = DtmfReceiver::new(8000);
        let p = press(3000, 1);
        let packets = [p[0], p[3], p[1], p[4], p[2], p[5]];
        assert_eq!(feed(&mut rx, &packets), vec![ev('1', 120, 3000)]);
    }

    #[test]
    fn a_lost_start_or_only_an_end_packet_still_yields_the_event_once() {
        let mut rx = DtmfReceiver::new(8000);
        let p = press(4000, 9);
        assert_eq!(feed(&mut rx, &p[1..]), vec![ev('9', 120, 4000)]);
        let mut rx = DtmfReceiver::new(8000);
        assert_eq!(feed(&mut rx, &p[5..]), vec![ev('9', 120, 4000)]);
        assert_eq!(rx.stats().starts, 0);
    }

    #[test]
    fn two_presses_of_the_same_digit_are_two_events() {
        let mut rx = DtmfReceiver::new(8000);
        let mut packets = press(5000, 7);
        packets.extend(press(5000 + 1760, 7));
        assert_eq!(
            feed(&mut rx, &packets),
            vec![ev('7', 120, 5000), ev('7', 120, 6760)]
        );
    }

    #[test]
    fn a_late_end_of_the_previous_press_is_ignored() {
        let mut rx = DtmfReceiver::new(8000);
        let first = press(100, 2);
        let second = press(2000, 3);
        let packets = [
            first[0], first[3], second[0], first[4], second[3], first[5], second[4],
        ];
        assert_eq!(
            feed(&mut rx, &packets),
            vec![ev('2', 120, 100), ev('3', 120, 2000)]
        );
    }

    #[test]
    fn a_press_whose_ends_were_all_lost_is_reported_when_the_next_begins() {
        let mut rx = DtmfReceiver::new(8000);
        let first = press(100, 4);
        let second = press(3000, 6);
        let mut packets = first[..3].to_vec();
        packets.extend(second);
        assert_eq!(
            feed(&mut rx, &packets),
            vec![ev('4', 100, 100), ev('6', 120, 3000)]
        );
        // Or by flush, when the stream stops.
        let mut rx = DtmfReceiver::new(8000);
        assert!(feed(&mut rx, &first[..2]).is_empty());
        assert_eq!(rx.flush(), Some(ev('4', 50, 100)));
        assert_eq!(rx.flush(), None);
    }

    #[test]
    fn timestamps_wrapping_around_zero_are_ordered() {
        let mut rx = DtmfReceiver::new(8000);
        let mut packets = press(u32::MAX - 100, 0);
        packets.extend(press(500, 0));
        packets.push((u32::MAX - 100, false, payload(0, true, 960)));
        assert_eq!(
            feed(&mut rx, &packets),
            vec![ev('0', 120, u32::MAX - 100), ev('0', 120, 500)]
        );
    }

    #[test]
    fn malformed_payloads_are_ignored_and_counted() {
        let mut rx = DtmfReceiver::new(8000);
        assert_eq!(rx.on_packet(1, true, &[]), None);
        assert_eq!(rx.on_packet(1, true, &[5, 0x80, 0]), None);
        assert_eq!(rx.on_packet(1, true, &payload(17, true, 960)), None);
        assert_eq!(rx.on_packet(1, true, &payload(255, true, 960)), None);
        assert_eq!(rx.stats().malformed, 4);
        assert_eq!(rx.stats().packets, 0);
        // Longer payloads: the first event is used.
        assert_eq!(
            rx.on_packet(1, true, &[12, 0x8A, 0x03, 0xC0, 0xFF, 0xFF]),
            Some(ev('A', 120, 1))
        );
    }

    #[test]
    fn durations_use_the_clock_rate() {
        let mut rx = DtmfReceiver::new(16000);
        assert_eq!(
            rx.on_packet(9, false, &payload(3, true, 1600)),
            Some(ev('3', 100, 9))
        );
    }

    #[test]
    fn sender_emits_start_updates_and_three_ends_on_schedule() {
        let mut tx = DtmfSender::new(8000);
        let t0 = Instant::now();
        tx.press('5', Duration::from_millis(120), t0, 777).unwrap();
        assert_eq!(
            tx.press('1', Duration::from_millis(100), t0, 1),
            Err(DtmfError::Busy)
        );
        let mut got = Vec::new();
        for ms in 0..400u64 {
            let now = t0 + Duration::from_millis(ms);
            while let Some(p) = tx.poll(now) {
                got.push((ms, p));
            }
        }
        let expect = [
            (0, true, false, 160u16),
            (50, false, false, 400),
            (100, false, false, 800),
            (120, false, true, 960),
            (170, false, true, 960),
            (220, false, true, 960),
        ];
        assert_eq!(got.len(), expect.len());
        for ((ms, p), (ems, marker, end, dur)) in got.iter().zip(expect) {
            assert_eq!(*ms, ems);
            assert_eq!(p.marker, marker);
            assert_eq!(p.end, end);
            assert_eq!(p.timestamp, 777);
            assert_eq!(
                p.payload,
                [
                    5,
                    (if end { 0x80 } else { 0 }) | 10,
                    (dur >> 8) as u8,
                    dur as u8
                ]
            );
        }
        assert!(tx.is_idle());
        assert_eq!(tx.next_deadline(), None);
        // Idle again: a new press is accepted.
        tx.press('#', Duration::from_millis(60), t0, 2000).unwrap();
        assert_eq!(tx.next_deadline(), Some(t0));
    }

    #[test]
    fn sender_rejects_bad_input() {
        let mut tx = DtmfSender::new(8000);
        let t0 = Instant::now();
        assert_eq!(
            tx.press('x', Duration::from_millis(100), t0, 0),
            Err(DtmfError::InvalidDigit('x'))
        );
        assert!(matches!(
            tx.press('1', Duration::ZERO, t0, 0),
            Err(DtmfError::InvalidDuration(_))
        ));
        assert!(matches!(
            tx.press('1', Duration::from_secs(9), t0, 0),
            Err(DtmfError::InvalidDuration(_))
        ));
        assert!(tx.is_idle());
    }

    #[test]
    fn sender_to_receiver_round_trip_gives_one_event_per_press() {
        let mut tx = DtmfSender::new(8000);
        let mut rx = DtmfReceiver::new(8000);
        let t0 = Instant::now();
        let mut events = Vec::new();
        let mut ts = 40_000u32;
        for (i, digit) in "1*9#D".chars().enumerate() {
            let start = t0 + Duration::from_millis(500 * i as u64);
            tx.press(digit, Duration::from_millis(160), start, ts)
                .unwrap();
            while let Some(at) = tx.next_deadline() {
                let p = tx.poll(at).unwrap();
                if let Some(e) = rx.on_packet(p.timestamp, p.marker, &p.payload) {
                    events.push(e);
                }
            }
            ts = ts.wrapping_add(4000);
        }
        let want: Vec<DtmfEvent> = "1*9#D"
            .chars()
            .enumerate()
            .map(|(i, d)| ev(d, 160, 40_000 + 4000 * i as u32))
            .collect();
        assert_eq!(events, want);
    }
}
