//! The playout queue for agent audio ([`PlayoutQueue`]): PCM from the
//! pipeline, in any frame size, converted to 8 kHz, encoded to G.711 and
//! handed out as 20 ms frames paced from the call's timer, with Twilio-style
//! `mark`/`clear` bookkeeping. G.711 from the pipeline (a Twilio-mode agent's
//! µ-law, [`PlayoutQueue::push_g711`]) is cut into frames as it is: no
//! decoding, no filter, the same bytes out when the laws match.
//!
//! Owns the conversion (a [`Downsampler`] whose state carries across pushes),
//! framing, pacing, the marker bit and timestamp advance of each frame, marks
//! and the bound on queued audio. It does not build RTP packets (sequence
//! numbers, SSRC and the timestamp base belong to the RTP sender, which adds
//! [`PlayoutFrame::timestamp_advance`] to its timestamp before stamping each
//! frame), open sockets or read a clock: time comes in as `now`.
//!
//! # The stream model
//! Pushed audio forms one continuous stream of 8 kHz samples, cut into
//! 160-sample frames. At 16 kHz the half-band filter is used zero-phase: its
//! first [`Downsampler::delay_samples`] outputs (the filter's start-up, 13
//! samples = 1.6 ms) are dropped, so 16 kHz sample `2k` lands on 8 kHz sample
//! `k`, and the last 13 output samples of a push wait for the next push (the
//! filter's look-ahead). How the pushes are split never changes the output.
//!
//! A partial trailing frame waits for more audio. It is padded with silence
//! (zeros fed through the filter, which also flushes the look-ahead) and sent:
//! - at once on [`PlayoutQueue::end_of_stream`];
//! - at a tick where it is the head of the queue and a mark waits behind it
//!   (the mark requires it);
//! - at a tick where it is the head of the queue for the second tick running
//!   (the agent paused mid-frame). The first starved tick sends silence (or
//!   nothing), which gives a real-time producer 20 ms of slack, so it is not
//!   padded again and again.
//!
//! After padding, the next audio starts a fresh frame and a fresh filter: it
//! is converted exactly as if it were the first audio pushed.
//!
//! G.711 codes pushed form segments of their own: a push of codes after PCM
//! (or of PCM after codes) pads the current segment first, as
//! [`PlayoutQueue::end_of_stream`] would. A segment of codes has no filter
//! and no look-ahead; its partial frame is padded with the law's silence code.
//!
//! # Marks (Twilio Media Streams semantics)
//! A mark sits at the stream position of the audio pushed before it; it does
//! not pad or otherwise alter the audio. It is reported by
//! [`PlayoutQueue::poll_marks`] once every frame holding audio before it has
//! been sent, at the tick that sends the last of them; `played_at` is that
//! tick (the frame then takes 20 ms to play at the far end). A mark with no
//! unsent audio before it is reported at once, with `played_at` the tick of
//! the last audio frame sent (or `start` if none was).
//!
//! [`PlayoutQueue::clear`] (barge-in) drops every queued sample and reports
//! every pending mark at once with `cleared: true` and `played_at` the tick
//! of the last audio frame actually sent (when the agent's speech was cut),
//! as Twilio echoes every pending mark when a `clear` discards its audio.
//! Marks reported before the clear keep `cleared: false`.
//!
//! # Pacing and RTP timing
//! Slot `k` is due at `start + 20 ms·k`; each poll returns at most one frame
//! and the next slot is never due before its time. A poll at most
//! [`MAX_CATCH_UP_FRAMES`] slots late sends the missed slots back to back; a
//! later one skips to the current slot (queued audio is delayed, not
//! dropped, and the skipped slots are counted). When the queue is empty a
//! slot carries a silence frame, or nothing when `silence_when_empty` is
//! false. Either way [`PlayoutFrame::timestamp_advance`] is `160 ×` the slots
//! since the previous frame returned (for the first frame, since slot 0), so
//! the sender's RTP timestamp stays equal to `base + 160·slot`. The marker
//! bit is set on the first frame and on every frame that follows a slot
//! without a frame (RFC 3551 §4.1: the first packet of a talkspurt after a
//! period in which none were sent); silence frames fill the gaps, so with
//! `silence_when_empty` only the first frame (and frames after skipped slots)
//! carries it. With `silence_when_empty` false and nothing queued, the queue
//! asks for no wake-up ([`PlayoutQueue::next_deadline`] is `None`); audio
//! pushed later starts at the next slot boundary, never in a burst.
//!
//! # Bounds
//! Queued audio is capped (default [`DEFAULT_MAX_QUEUED`], see
//! [`PlayoutQueue::with_max_queued`]): a push beyond it is truncated and the
//! dropped samples counted. Pending marks are capped at [`MAX_MARKS`] and
//! their names at [`MAX_MARK_NAME_BYTES`].

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use super::g711::{self, Law};
use super::resample::{Downsampler, PipelineRate};

/// Samples per 20 ms frame at 8 kHz.
pub const FRAME_SAMPLES: usize = 160;
/// The frame interval.
pub const FRAME_DURATION: Duration = Duration::from_millis(20);
/// Default bound on queued audio.
pub const DEFAULT_MAX_QUEUED: Duration = Duration::from_secs(60);
/// How many slots behind a poll may be and still send each missed slot
/// (back to back) instead of skipping to the current one.
pub const MAX_CATCH_UP_FRAMES: u64 = 3;
/// Most marks held at once (pending plus reported but not yet polled).
pub const MAX_MARKS: usize = 1024;
/// Longest mark name accepted, in bytes.
pub const MAX_MARK_NAME_BYTES: usize = 1024;

/// 8 kHz samples per millisecond.
const SAMPLES_PER_MS: u64 = 8;
/// `FRAME_SAMPLES` as u64, for stream positions.
const FRAME_LEN: u64 = FRAME_SAMPLES as u64;
/// Input samples converted per downsampler call: bounds scratch memory
/// whatever the size of a push.
const FEED_CHUNK: usize = 3200;
/// Zeros fed through the filter when padding.
const ZEROS: [i16; 512] = [0; 512];

/// Why a mark was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PlayoutError {
    /// [`MAX_MARKS`] marks are already held.
    #[error("too many marks held (at most {limit})")]
    TooManyMarks {
        /// The limit.
        limit: usize,
    },
    /// The mark's name is longer than [`MAX_MARK_NAME_BYTES`].
    #[error("mark name is {len} bytes; at most {limit}")]
    MarkNameTooLong {
        /// The name's length in bytes.
        len: usize,
        /// The limit.
        limit: usize,
    },
}

/// One 20 ms frame to send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlayoutFrame {
    /// The G.711 payload.
    pub payload: [u8; FRAME_SAMPLES],
    /// RTP timestamp units since the previous frame returned: 160 per slot,
    /// including slots that sent nothing or were skipped.
    pub timestamp_advance: u32,
    /// Set on the first frame and on the first frame after a gap.
    pub marker: bool,
    /// Whether this is filler silence (the queue was empty) rather than
    /// agent audio.
    pub is_silence: bool,
}

/// A mark whose audio has been sent, or cleared.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MarkEvent {
    /// The name the agent gave it.
    pub name: String,
    /// The tick that sent the last audio frame before it (see module docs).
    pub played_at: Instant,
    /// Whether [`PlayoutQueue::clear`] discarded audio before it.
    pub cleared: bool,
}

/// What a [`PlayoutQueue::clear`] discarded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cleared {
    /// Queued audio dropped, in milliseconds (rounded down).
    pub dropped_ms: u64,
    /// Marks reported as cleared.
    pub marks: usize,
}

#[derive(Debug, Clone)]
struct PendingMark {
    /// Stream position (8 kHz samples) just after the audio before it.
    position: u64,
    name: String,
}

/// Agent audio waiting to be played to the caller. See the module docs.
#[derive(Debug, Clone)]
pub struct PlayoutQueue {
    law: Law,
    rate: PipelineRate,
    start: Instant,
    silence_when_empty: bool,
    max_queued_samples: u64,

    downsampler: Downsampler,
    /// Input samples per 8 kHz sample: 1 or 2.
    factor: u64,
    /// The downsampler's delay in output samples (0 or 13).
    delay: u64,
    /// The filter runs causal (see [`PlayoutQueue::with_causal_filter`]).
    causal: bool,
    /// Downsampler outputs still to drop (start-up of the current segment).
    skip: usize,
    /// Stream position where the current segment (audio since the last
    /// padding or clear) starts; always a multiple of 160.
    segment_base: u64,
    /// Input samples pushed in the current segment.
    segment_in: u64,
    scratch: Vec<i16>,
    /// Converted samples not yet making a whole frame (< 160).
    partial: Vec<i16>,
    /// G.711 codes pushed in the current segment (0: a PCM segment, or
    /// nothing pushed since the last padding).
    segment_codes: u64,
    /// Codes of the current segment not yet making a whole frame (< 160).
    partial_codes: Vec<u8>,
    frames: VecDeque<[u8; FRAME_SAMPLES]>,
    /// Stream position of the next frame to send (160 × frames dequeued).
    sent_pos: u64,

    marks: VecDeque<PendingMark>,
    events: VecDeque<MarkEvent>,

    next_slot: u64,
    last_sent_slot: Option<u64>,
    /// Nothing was queued at the last poll (and no silence is sent): slots
    /// that passed were idle, not late.
    idle: bool,
    /// The last tick found only a partial frame and waited.
    head_waited: bool,
    last_audio_at: Instant,

    frames_skipped: u64,
    truncated: u64,
    audio_frames_sent: u64,
}

impl PlayoutQueue {
    /// An empty queue for a call sending `law`, fed PCM at `rate`, whose slot
    /// 0 is due at `start`; when empty it sends silence frames if
    /// `silence_when_empty`, else nothing. Queued audio is capped at
    /// [`DEFAULT_MAX_QUEUED`].
    pub fn new(law: Law, rate: PipelineRate, start: Instant, silence_when_empty: bool) -> Self {
        let downsampler = Downsampler::new(rate);
        let delay = downsampler.delay_samples() as u64;
        let factor = match rate {
            PipelineRate::Hz8000 => 1,
            PipelineRate::Hz16000 => 2,
        };
        PlayoutQueue {
            law,
            rate,
            start,
            silence_when_empty,
            max_queued_samples: duration_to_samples(DEFAULT_MAX_QUEUED),
            downsampler,
            factor,
            delay,
            causal: false,
            skip: usize::try_from(delay).unwrap_or(0),
            segment_base: 0,
            segment_in: 0,
            scratch: Vec::new(),
            partial: Vec::with_capacity(FRAME_SAMPLES),
            segment_codes: 0,
            partial_codes: Vec::new(),
            frames: VecDeque::new(),
            sent_pos: 0,
            marks: VecDeque::new(),
            events: VecDeque::new(),
            next_slot: 0,
            last_sent_slot: None,
            idle: !silence_when_empty,
            head_waited: false,
            last_audio_at: start,
            frames_skipped: 0,
            truncated: 0,
            audio_frames_sent: 0,
        }
    }

    /// Runs the 16 kHz filter causal instead of zero-phase: its start-up
    /// outputs are kept (the stream starts with the filter's 13-sample, 1.6 ms
    /// delay) instead of dropped, so every whole 20 ms the pipeline pushes
    /// completes a whole frame at once; the filter's look-ahead is then the
    /// last 1.6 ms of the audio pushed, which a tick with nothing else to
    /// send pads and sends at once. Marks stay at the end of the audio
    /// pushed before them, less that 1.6 ms. Meant for a live call: it
    /// trades 1.6 ms of delay for a frame's wait (20 ms). A no-op at 8 kHz;
    /// call before pushing.
    pub fn with_causal_filter(mut self) -> Self {
        self.causal = true;
        self.skip = 0;
        self
    }

    /// Moves the slot clock so that the next slot is due at `now` (the
    /// caller re-phases its send clock to the start of a talkspurt). Slot
    /// numbers run on: the next frame's timestamp advance stays 160.
    pub fn rephase(&mut self, now: Instant) {
        let nanos = (FRAME_DURATION.as_nanos() as u64).saturating_mul(self.next_slot);
        if let Some(start) = now.checked_sub(Duration::from_nanos(nanos)) {
            self.start = start;
        }
    }

    /// Sets the bound on queued audio (rounded down to whole 8 kHz samples).
    pub fn with_max_queued(mut self, max: Duration) -> Self {
        self.max_queued_samples = duration_to_samples(max);
        self
    }

    /// Queues PCM at the pipeline rate, any length. Returns how many samples
    /// were accepted; the rest (beyond the bound on queued audio) is dropped
    /// and counted in [`PlayoutQueue::truncated_samples`].
    pub fn push_pcm(&mut self, pcm: &[i16]) -> usize {
        if self.segment_codes > 0 {
            self.pad_segment();
        }
        let room = self
            .max_queued_samples
            .saturating_sub(self.queued_samples());
        let allowed = usize::try_from(room.saturating_mul(self.factor))
            .unwrap_or(usize::MAX)
            .min(pcm.len());
        let (take, dropped) = pcm.split_at(allowed);
        self.truncated = self.truncated.saturating_add(dropped.len() as u64);
        for chunk in take.chunks(FEED_CHUNK) {
            self.feed(chunk);
        }
        allowed
    }

    /// Queues 8 kHz G.711 codes in `law`, any length: cut into frames as
    /// they are (converted code by code when `law` is not the call's).
    /// Returns how many codes were accepted; the rest (beyond the bound on
    /// queued audio) is dropped and counted in
    /// [`PlayoutQueue::truncated_samples`].
    pub fn push_g711(&mut self, law: Law, codes: &[u8]) -> usize {
        if self.segment_in > 0 {
            self.pad_segment();
        }
        let room = self
            .max_queued_samples
            .saturating_sub(self.queued_samples());
        let allowed = usize::try_from(room).unwrap_or(usize::MAX).min(codes.len());
        let (mut take, dropped) = codes.split_at(allowed);
        self.truncated = self.truncated.saturating_add(dropped.len() as u64);
        self.segment_codes = self.segment_codes.saturating_add(allowed as u64);
        if !self.partial_codes.is_empty() {
            let n = (FRAME_SAMPLES - self.partial_codes.len()).min(take.len());
            let start = self.partial_codes.len();
            self.partial_codes.resize(start + n, 0);
            g711::transcode(law, self.law, &take[..n], &mut self.partial_codes[start..]);
            take = &take[n..];
            if self.partial_codes.len() == FRAME_SAMPLES {
                let mut frame = [0u8; FRAME_SAMPLES];
                frame.copy_from_slice(&self.partial_codes);
                self.frames.push_back(frame);
                self.partial_codes.clear();
            }
        }
        let whole = take.chunks_exact(FRAME_SAMPLES);
        let rest = whole.remainder();
        for chunk in whole {
            let mut frame = [0u8; FRAME_SAMPLES];
            g711::transcode(law, self.law, chunk, &mut frame);
            self.frames.push_back(frame);
        }
        if !rest.is_empty() {
            self.partial_codes.resize(rest.len(), 0);
            g711::transcode(law, self.law, rest, &mut self.partial_codes);
        }
        allowed
    }

    /// Places a mark after the audio pushed so far.
    pub fn mark(&mut self, name: String) -> Result<(), PlayoutError> {
        if name.len() > MAX_MARK_NAME_BYTES {
            return Err(PlayoutError::MarkNameTooLong {
                len: name.len(),
                limit: MAX_MARK_NAME_BYTES,
            });
        }
        if self.marks.len() + self.events.len() >= MAX_MARKS {
            return Err(PlayoutError::TooManyMarks { limit: MAX_MARKS });
        }
        let position = self.input_end() - self.lead();
        if position <= self.sent_pos {
            self.events.push_back(MarkEvent {
                name,
                played_at: self.last_audio_at,
                cleared: false,
            });
        } else {
            self.marks.push_back(PendingMark { position, name });
        }
        Ok(())
    }

    /// The agent's audio stream ended (for now): pads the partial trailing
    /// frame with silence and queues it. Audio pushed afterwards starts a
    /// fresh frame.
    pub fn end_of_stream(&mut self) {
        self.pad_segment();
    }

    /// Barge-in: drops everything queued at once. Pending marks are reported
    /// by [`PlayoutQueue::poll_marks`] with `cleared: true`.
    pub fn clear(&mut self) -> Cleared {
        let dropped = self.queued_samples();
        self.frames.clear();
        self.partial.clear();
        self.partial_codes.clear();
        self.reset_segment(self.sent_pos);
        self.head_waited = false;
        let marks = self.marks.len();
        for m in self.marks.drain(..) {
            self.events.push_back(MarkEvent {
                name: m.name,
                played_at: self.last_audio_at,
                cleared: true,
            });
        }
        Cleared {
            dropped_ms: dropped / SAMPLES_PER_MS,
            marks,
        }
    }

    /// The frame for the slot due at `now`, if any (at most one per call;
    /// call again at [`PlayoutQueue::next_deadline`]).
    pub fn poll(&mut self, now: Instant) -> Option<PlayoutFrame> {
        if now < self.deadline(self.next_slot) {
            return None;
        }
        let due = self.slot_at(now);
        let has_audio = self.queued_samples() > 0;
        if !has_audio && !self.silence_when_empty {
            self.idle = true;
            self.next_slot = due.saturating_add(1);
            return None;
        }
        let slot = if self.idle {
            // Audio arrived after idle slots: start on a slot boundary.
            self.idle = false;
            let slot = if now == self.deadline(due) {
                due
            } else {
                due.saturating_add(1)
            };
            if slot > due {
                self.next_slot = slot;
                return None;
            }
            slot
        } else {
            let behind = due - self.next_slot;
            if behind > MAX_CATCH_UP_FRAMES {
                self.frames_skipped = self.frames_skipped.saturating_add(behind);
                due
            } else {
                self.next_slot
            }
        };
        self.next_slot = slot.saturating_add(1);
        let at = self.deadline(slot);

        let audio = match self.frames.pop_front() {
            Some(frame) => Some(frame),
            None if has_audio
                && (!self.marks.is_empty() || self.head_waited || self.only_tail()) =>
            {
                self.pad_segment();
                self.frames.pop_front()
            }
            None => {
                self.head_waited = has_audio;
                None
            }
        };
        match audio {
            Some(payload) => {
                self.head_waited = false;
                self.sent_pos = self.sent_pos.saturating_add(FRAME_LEN);
                self.audio_frames_sent = self.audio_frames_sent.saturating_add(1);
                self.last_audio_at = at;
                self.release_marks(at);
                Some(self.emit(slot, payload, false))
            }
            None if self.silence_when_empty => {
                Some(self.emit(slot, [self.law.silence(); FRAME_SAMPLES], true))
            }
            None => None,
        }
    }

    /// The next reported mark, in order.
    pub fn poll_marks(&mut self) -> Option<MarkEvent> {
        self.events.pop_front()
    }

    /// When to poll next: the next slot's time (possibly already past), or
    /// `None` when nothing is queued and no silence is sent (push audio,
    /// then ask again).
    pub fn next_deadline(&self) -> Option<Instant> {
        if !self.silence_when_empty && self.queued_samples() == 0 {
            None
        } else {
            Some(self.deadline(self.next_slot))
        }
    }

    /// Audio queued and not yet sent, in milliseconds (rounded down),
    /// including a partial frame and the filter's look-ahead.
    pub fn queued_ms(&self) -> u64 {
        self.queued_samples() / SAMPLES_PER_MS
    }

    /// Input samples (at the pipeline rate) dropped because the queue was
    /// full.
    pub fn truncated_samples(&self) -> u64 {
        self.truncated
    }

    /// Slots skipped because a poll came more than [`MAX_CATCH_UP_FRAMES`]
    /// slots late.
    pub fn frames_skipped(&self) -> u64 {
        self.frames_skipped
    }

    /// Frames of agent audio sent so far (not counting silence).
    pub fn audio_frames_sent(&self) -> u64 {
        self.audio_frames_sent
    }

    /// Drops up to `n` of the oldest whole frames queued (never the partial
    /// frame still being filled), as if they had been sent: marks behind
    /// them fall due. Returns the frames dropped.
    pub fn drop_oldest_frames(&mut self, n: u64) -> u64 {
        let mut dropped = 0;
        while dropped < n && self.frames.pop_front().is_some() {
            self.sent_pos = self.sent_pos.saturating_add(FRAME_LEN);
            dropped += 1;
        }
        self.release_marks(self.last_audio_at);
        dropped
    }

    /// Reports (as played at `at`) the marks whose audio is all behind the
    /// stream position sent so far.
    fn release_marks(&mut self, at: Instant) {
        while let Some(m) = self.marks.front() {
            if m.position > self.sent_pos {
                break;
            }
            if let Some(m) = self.marks.pop_front() {
                self.events.push_back(MarkEvent {
                    name: m.name,
                    played_at: at,
                    cleared: false,
                });
            }
        }
    }

    /// 8 kHz samples queued and not yet sent.
    pub fn queued(&self) -> u64 {
        self.queued_samples()
    }

    /// The law frames are encoded in.
    pub fn law(&self) -> Law {
        self.law
    }

    /// The rate PCM is pushed at.
    pub fn rate(&self) -> PipelineRate {
        self.rate
    }

    /// Stream position just after the audio pushed so far (with a causal
    /// filter, its delayed tail included).
    fn input_end(&self) -> u64 {
        if self.segment_codes > 0 {
            return self.segment_base + self.segment_codes;
        }
        if self.segment_in == 0 {
            return self.segment_base;
        }
        self.segment_base + self.lead() + self.segment_in.div_ceil(self.factor)
    }

    /// Samples the causal filter delays the segment's audio by (0 when
    /// zero-phase or when nothing was pushed since the last padding).
    fn lead(&self) -> u64 {
        if self.causal && self.segment_in > 0 {
            self.delay
        } else {
            0
        }
    }

    /// With a causal filter: everything queued is the filter's look-ahead
    /// (the tail of audio already converted), no whole or partial frame of
    /// converted audio waits.
    fn only_tail(&self) -> bool {
        self.causal
            && self.delay > 0
            && self.frames.is_empty()
            && self.partial.is_empty()
            && self.segment_in > 0
    }

    /// Samples (8 kHz) pushed and not yet sent.
    fn queued_samples(&self) -> u64 {
        self.input_end().saturating_sub(self.sent_pos)
    }

    fn deadline(&self, slot: u64) -> Instant {
        // 2^64 ns is 584 years: never overflows an `Instant`.
        let nanos = (FRAME_DURATION.as_nanos() as u64).saturating_mul(slot);
        self.start + Duration::from_nanos(nanos)
    }

    fn slot_at(&self, now: Instant) -> u64 {
        let elapsed = now.saturating_duration_since(self.start);
        u64::try_from(elapsed.as_nanos() / FRAME_DURATION.as_nanos()).unwrap_or(u64::MAX)
    }

    /// Converts `input`, appends it to the stream and cuts whole frames.
    fn feed(&mut self, input: &[i16]) {
        self.segment_in = self.segment_in.saturating_add(input.len() as u64);
        self.scratch.clear();
        self.downsampler.process(input, &mut self.scratch);
        let skip = self.skip.min(self.scratch.len());
        self.skip -= skip;
        let mut rest = self.scratch.get(skip..).unwrap_or_default();
        if !self.partial.is_empty() {
            let take = (FRAME_SAMPLES - self.partial.len()).min(rest.len());
            let (head, tail) = rest.split_at(take);
            self.partial.extend_from_slice(head);
            rest = tail;
            if self.partial.len() == FRAME_SAMPLES {
                self.frames.push_back(encode_frame(self.law, &self.partial));
                self.partial.clear();
            }
        }
        let whole = rest.chunks_exact(FRAME_SAMPLES);
        self.partial.extend_from_slice(whole.remainder());
        for chunk in whole {
            self.frames.push_back(encode_frame(self.law, chunk));
        }
    }

    /// Feeds zeros until the audio of the current segment (look-ahead
    /// included) fills whole frames, then starts a fresh segment.
    fn pad_segment(&mut self) {
        if self.segment_codes > 0 {
            if !self.partial_codes.is_empty() {
                let mut frame = [self.law.silence(); FRAME_SAMPLES];
                frame[..self.partial_codes.len()].copy_from_slice(&self.partial_codes);
                self.frames.push_back(frame);
                self.partial_codes.clear();
            }
            let target = self.input_end().div_ceil(FRAME_LEN) * FRAME_LEN;
            self.reset_segment(target);
            return;
        }
        if self.segment_in == 0 {
            return;
        }
        let target = self.input_end().div_ceil(FRAME_LEN) * FRAME_LEN;
        // Downsampler outputs needed, counting the ones dropped at start-up.
        let dropped = if self.causal { 0 } else { self.delay };
        let outputs = target - self.segment_base + dropped;
        let mut zeros = (outputs * self.factor).saturating_sub(self.segment_in);
        while zeros > 0 {
            let n = usize::try_from(zeros)
                .unwrap_or(ZEROS.len())
                .min(ZEROS.len());
            self.feed(&ZEROS[..n]);
            zeros -= n as u64;
        }
        debug_assert!(self.partial.is_empty());
        self.partial.clear();
        self.reset_segment(target);
    }

    fn reset_segment(&mut self, base: u64) {
        self.segment_base = base;
        self.segment_in = 0;
        self.segment_codes = 0;
        self.downsampler.reset();
        self.skip = if self.causal {
            0
        } else {
            usize::try_from(self.delay).unwrap_or(0)
        };
    }

    fn emit(&mut self, slot: u64, payload: [u8; FRAME_SAMPLES], is_silence: bool) -> PlayoutFrame {
        let (since, marker) = match self.last_sent_slot {
            Some(last) => (slot.saturating_sub(last), slot != last.saturating_add(1)),
            None => (slot, true),
        };
        self.last_sent_slot = Some(slot);
        PlayoutFrame {
            payload,
            // RTP timestamps wrap modulo 2^32: so does the advance.
            timestamp_advance: since.wrapping_mul(FRAME_LEN) as u32,
            marker,
            is_silence,
        }
    }
}

fn encode_frame(law: Law, samples: &[i16]) -> [u8; FRAME_SAMPLES] {
    let mut frame = [law.silence(); FRAME_SAMPLES];
    g711::encode(law, samples, &mut frame);
    frame
}

fn duration_to_samples(d: Duration) -> u64 {
    u64::try_from(d.as_millis())
        .unwrap_or(u64::MAX)
        .saturating_mul(SAMPLES_PER_MS)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    #[test]
    fn padding_fills_whole_frames_for_every_input_length() {
        for rate in [PipelineRate::Hz8000, PipelineRate::Hz16000] {
            let f = if rate == PipelineRate::Hz8000 { 1 } else { 2 };
            for n in 0..700u64 {
                let mut q = PlayoutQueue::new(Law::Mu, rate, Instant::now(), true);
                let pcm = vec![1000i16; n as usize];
                q.push_pcm(&pcm);
                assert_eq!(q.input_end(), n.div_ceil(f), "{rate:?} {n}");
                q.end_of_stream();
                let frames = n.div_ceil(f).div_ceil(FRAME_LEN);
                assert_eq!(q.frames.len() as u64, frames, "{rate:?} {n}");
                assert!(q.partial.is_empty());
                assert_eq!(q.segment_base, frames * FRAME_LEN);
                assert_eq!((q.segment_in, q.skip as u64), (0, q.delay));
                assert_eq!(q.queued_samples(), frames * FRAME_LEN);
            }
        }
    }

    #[test]
    fn the_filter_start_up_is_dropped_once_per_segment() {
        let mut q = PlayoutQueue::new(Law::Mu, PipelineRate::Hz16000, Instant::now(), true);
        q.push_pcm(&[0; 20]);
        assert_eq!((q.skip, q.partial.len()), (3, 0));
        q.push_pcm(&[0; 10]);
        assert_eq!((q.skip, q.partial.len()), (0, 2));
        q.end_of_stream();
        assert_eq!(q.skip, 13);
        q.push_pcm(&[0; 30]);
        // The padded frame is dropped too: the stream restarts at the next
        // frame to send.
        assert_eq!(q.clear().dropped_ms, 20 + 1);
        assert_eq!((q.skip, q.segment_base, q.sent_pos), (13, 0, 0));
    }

    /// Causal at 16 kHz: 20 ms pushed is a whole frame at once (the
    /// one-shot causal downsample of it, sample for sample); with nothing
    /// more pushed the next tick sends the filter's tail padded, not a
    /// silence frame first; a mark sits before the tail.
    #[test]
    fn causal_filter_completes_a_frame_per_push_and_flushes_its_tail() {
        let start = Instant::now();
        let mut q =
            PlayoutQueue::new(Law::Mu, PipelineRate::Hz16000, start, true).with_causal_filter();
        let pcm: Vec<i16> = (0..320).map(|i| ((i * 37) % 2000 - 1000) as i16).collect();
        q.push_pcm(&pcm);
        q.mark("end".into()).unwrap();
        assert_eq!(q.frames.len(), 1);
        assert_eq!(q.queued_samples(), 160 + 13);
        let mut reference = Vec::new();
        Downsampler::new(PipelineRate::Hz16000).process(&pcm, &mut reference);
        let f = q.poll(start).unwrap();
        assert_eq!(f.payload, encode_frame(Law::Mu, &reference));
        assert!(!f.is_silence);
        assert_eq!(q.poll_marks().map(|m| m.name), Some("end".into()));
        let tail = q.poll(start + FRAME_DURATION).unwrap();
        assert!(!tail.is_silence, "the tail goes at once");
        let mut rest = Downsampler::new(PipelineRate::Hz16000);
        let mut all = Vec::new();
        rest.process(&pcm, &mut all);
        rest.process(&[0; 320], &mut all);
        assert_eq!(tail.payload, encode_frame(Law::Mu, &all[160..320]));
        assert_eq!(q.queued_samples(), 0);
        assert!(q.poll(start + FRAME_DURATION * 2).unwrap().is_silence);
    }

    /// G.711 pushed in any split comes out as the same bytes, frame by
    /// frame, with no filter delay; a mark sits right after its codes; a
    /// partial frame is padded with the law's silence code; PCM after codes
    /// starts a fresh frame (and the other way round).
    #[test]
    fn g711_codes_pass_through_as_the_same_bytes() {
        let start = Instant::now();
        let mut q =
            PlayoutQueue::new(Law::Mu, PipelineRate::Hz16000, start, true).with_causal_filter();
        let codes: Vec<u8> = (0..400u32).map(|i| (i * 7 % 256) as u8).collect();
        // 400 codes in uneven pushes: 2 whole frames and 80 codes.
        for part in [
            &codes[..37],
            &codes[37..200],
            &codes[200..320],
            &codes[320..],
        ] {
            assert_eq!(q.push_g711(Law::Mu, part), part.len());
        }
        q.mark("after".into()).unwrap();
        assert_eq!(q.queued_samples(), 400);
        let f = q.poll(start).unwrap();
        assert_eq!(&f.payload[..], &codes[..160]);
        assert!(!f.is_silence);
        assert_eq!(q.poll_marks(), None);
        let f = q.poll(start + FRAME_DURATION).unwrap();
        assert_eq!(&f.payload[..], &codes[160..320]);
        // The mark waits behind the partial frame, which is padded and sent.
        let f = q.poll(start + FRAME_DURATION * 2).unwrap();
        assert_eq!(&f.payload[..80], &codes[320..]);
        assert!(f.payload[80..].iter().all(|&c| c == Law::Mu.silence()));
        assert_eq!(q.poll_marks().map(|m| m.name), Some("after".into()));
        assert_eq!(q.queued_samples(), 0);

        // PCM after codes pads the codes and starts on a frame boundary.
        q.push_g711(Law::Mu, &codes[..10]);
        q.push_pcm(&[1000; 320]);
        assert_eq!(q.frames.len(), 2);
        assert_eq!(&q.frames[0][..10], &codes[..10]);
        assert_eq!(q.segment_base, 4 * FRAME_LEN);
        // Codes after PCM pad the PCM (and its filter tail) first.
        q.push_g711(Law::Mu, &codes[..160]);
        assert_eq!(
            q.frames.back().map(|f| f.to_vec()),
            Some(codes[..160].to_vec())
        );
        assert_eq!(q.queued_samples(), 4 * FRAME_LEN);
        assert_eq!(q.clear().dropped_ms, 80);
        assert!(q.partial_codes.is_empty() && q.frames.is_empty());
    }

    /// Codes in the other law are converted code by code at 8 kHz; the
    /// bound on queued audio counts codes as samples.
    #[test]
    fn g711_in_the_other_law_is_transcoded_and_bounded() {
        let start = Instant::now();
        let mut q = PlayoutQueue::new(Law::A, PipelineRate::Hz8000, start, true)
            .with_max_queued(Duration::from_millis(40));
        let mu: Vec<u8> = (0..=255).cycle().take(400).collect();
        assert_eq!(q.push_g711(Law::Mu, &mu), 320);
        assert_eq!(q.truncated_samples(), 80);
        let f = q.poll(start).unwrap();
        let expected: Vec<u8> = mu[..160]
            .iter()
            .map(|&c| g711::linear_to_a(g711::mu_to_linear(c)))
            .collect();
        assert_eq!(f.payload.to_vec(), expected);
    }

    #[test]
    fn rephase_makes_the_next_slot_due_now() {
        let start = Instant::now();
        let mut q = PlayoutQueue::new(Law::Mu, PipelineRate::Hz8000, start, true);
        assert!(q.poll(start).is_some());
        let now = start + Duration::from_micros(7_300);
        assert_eq!(q.poll(now), None);
        q.rephase(now);
        assert_eq!(q.next_deadline(), Some(now));
        let f = q.poll(now).unwrap();
        assert_eq!((f.timestamp_advance, f.marker), (160, false));
        assert_eq!(q.next_deadline(), Some(now + FRAME_DURATION));
    }

    #[test]
    fn timestamp_advance_wraps_like_rtp_timestamps() {
        let start = Instant::now();
        let mut q = PlayoutQueue::new(Law::Mu, PipelineRate::Hz8000, start, true);
        let f = q.emit(0, [0; FRAME_SAMPLES], true);
        assert_eq!((f.timestamp_advance, f.marker), (0, true));
        // 2^27 slots (31 days) are 5·2^32 timestamp units: wraps to 0.
        let slot = 1u64 << 27;
        let f = q.emit(slot, [0; FRAME_SAMPLES], true);
        assert_eq!((f.timestamp_advance, f.marker), (0, true));
        let f = q.emit(slot + 1, [0; FRAME_SAMPLES], true);
        assert_eq!((f.timestamp_advance, f.marker), (160, false));
        assert_eq!(q.deadline(3), start + Duration::from_millis(60));
        assert_eq!(q.slot_at(start + Duration::from_micros(59_999)), 2);
    }
}
