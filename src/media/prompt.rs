//! The disclosure prompt: a WAV file converted once, at configuration load,
//! into 20 ms G.711 frames in both laws ([`Prompt`]), and a per-call player
//! that hands those frames out paced by the caller's clock ([`PromptPlayer`]).
//!
//! Owns WAV decoding (via `hound`), downmixing, conversion to 8 kHz (via
//! [`resample_offline`]) and framing. It does not build RTP packets (sequence
//! numbers, timestamps and SSRC belong to the RTP sender, which stamps
//! `base + 160·index`), open sockets or read a clock: `Prompt::load` is the
//! only file I/O and runs when the configuration is loaded, never per call;
//! the player is given `now` by the call's timer.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hound::{SampleFormat, WavReader};

use super::g711::{self, Law};
use super::resample::resample_offline;

/// Samples per 20 ms frame at 8 kHz.
pub const FRAME_SAMPLES: usize = 160;
/// The frame interval.
pub const FRAME_DURATION: Duration = Duration::from_millis(20);
/// Longest prompt accepted (a disclosure is a few seconds; this bounds memory).
pub const MAX_PROMPT_SECONDS: u32 = 120;
/// Lowest and highest WAV sample rates accepted.
pub const MIN_RATE_HZ: u32 = 8000;
/// See [`MIN_RATE_HZ`].
pub const MAX_RATE_HZ: u32 = 48000;
/// Most channels accepted (all are averaged into one).
pub const MAX_CHANNELS: u16 = 8;
/// How far behind its schedule a player may fall and still send every frame
/// (back to back) before it skips to the current one instead.
pub const MAX_CATCH_UP_FRAMES: u32 = 3;

/// Why a prompt could not be loaded.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PromptError {
    /// The file could not be read.
    #[error("cannot read prompt {path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The underlying error.
        source: std::io::Error,
    },
    /// Not a valid WAV file (or truncated).
    #[error("invalid WAV: {0}")]
    Wav(#[from] hound::Error),
    /// Sample rate outside 8–48 kHz.
    #[error("unsupported sample rate {0} Hz (8000..=48000)")]
    UnsupportedRate(u32),
    /// Sample format other than 8–32-bit integer PCM or 32-bit float.
    #[error("unsupported sample format: {bits}-bit {format}")]
    UnsupportedFormat {
        /// Bits per sample.
        bits: u16,
        /// "int" or "float".
        format: &'static str,
    },
    /// Zero or more than [`MAX_CHANNELS`] channels.
    #[error("unsupported channel count {0}")]
    UnsupportedChannels(u16),
    /// No samples at all.
    #[error("prompt has no audio")]
    Empty,
    /// Longer than [`MAX_PROMPT_SECONDS`].
    #[error("prompt is {seconds} s long; at most {MAX_PROMPT_SECONDS} s")]
    TooLong {
        /// The prompt's length, rounded up.
        seconds: u32,
    },
}

/// A prompt ready to play: mono 8 kHz PCM and its G.711 frames in both laws
/// (the last frame padded with silence). Shared between calls in an `Arc`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Prompt {
    pcm8k: Vec<i16>,
    mu: Vec<[u8; FRAME_SAMPLES]>,
    a: Vec<[u8; FRAME_SAMPLES]>,
}

impl Prompt {
    /// Reads and converts a WAV file. File I/O: call at configuration load,
    /// never on a call's path.
    pub fn load(path: impl AsRef<Path>) -> Result<Prompt, PromptError> {
        let path = path.as_ref();
        let bytes = std::fs::read(path).map_err(|source| PromptError::Io {
            path: path.display().to_string(),
            source,
        })?;
        Prompt::from_wav_bytes(&bytes)
    }

    /// Converts an in-memory WAV file: any channel count up to
    /// [`MAX_CHANNELS`] (averaged to mono), 8–48 kHz, 8/16/24/32-bit integer
    /// or 32-bit float samples.
    pub fn from_wav_bytes(bytes: &[u8]) -> Result<Prompt, PromptError> {
        let mut reader = WavReader::new(bytes)?;
        let spec = reader.spec();
        if !(MIN_RATE_HZ..=MAX_RATE_HZ).contains(&spec.sample_rate) {
            return Err(PromptError::UnsupportedRate(spec.sample_rate));
        }
        if spec.channels == 0 || spec.channels > MAX_CHANNELS {
            return Err(PromptError::UnsupportedChannels(spec.channels));
        }
        let frames = reader.duration();
        if frames > MAX_PROMPT_SECONDS.saturating_mul(spec.sample_rate) {
            return Err(PromptError::TooLong {
                seconds: frames.div_ceil(spec.sample_rate),
            });
        }
        let channels = usize::from(spec.channels);
        // Interleaved samples scaled to the 16-bit range, as f64.
        let interleaved: Vec<f64> = match (spec.sample_format, spec.bits_per_sample) {
            (SampleFormat::Int, bits @ 1..=32) => {
                let scale = 2f64.powi(16 - i32::from(bits));
                reader
                    .samples::<i32>()
                    .map(|s| s.map(|v| f64::from(v) * scale))
                    .collect::<Result<_, _>>()?
            }
            (SampleFormat::Float, 32) => reader
                .samples::<f32>()
                .map(|s| s.map(|v| f64::from(v) * 32768.0))
                .collect::<Result<_, _>>()?,
            (format, bits) => {
                return Err(PromptError::UnsupportedFormat {
                    bits,
                    format: match format {
                        SampleFormat::Int => "int",
                        SampleFormat::Float => "float",
                    },
                });
            }
        };
        let mono: Vec<i16> = interleaved
            .chunks_exact(channels)
            .map(|frame| {
                let mean = frame.iter().sum::<f64>() / channels as f64;
                mean.round().clamp(f64::from(i16::MIN), f64::from(i16::MAX)) as i16
            })
            .collect();
        Prompt::from_pcm(&mono, spec.sample_rate)
    }

    /// Builds a prompt from mono PCM at `rate_hz` (8–48 kHz).
    pub fn from_pcm(samples: &[i16], rate_hz: u32) -> Result<Prompt, PromptError> {
        if !(MIN_RATE_HZ..=MAX_RATE_HZ).contains(&rate_hz) {
            return Err(PromptError::UnsupportedRate(rate_hz));
        }
        if samples.is_empty() {
            return Err(PromptError::Empty);
        }
        let seconds = (samples.len() as u64).div_ceil(u64::from(rate_hz));
        if seconds > u64::from(MAX_PROMPT_SECONDS) {
            return Err(PromptError::TooLong {
                seconds: u32::try_from(seconds).unwrap_or(u32::MAX),
            });
        }
        let pcm8k = resample_offline(samples, rate_hz, 8000);
        if pcm8k.is_empty() {
            return Err(PromptError::Empty);
        }
        let mut mu = Vec::with_capacity(pcm8k.len().div_ceil(FRAME_SAMPLES));
        let mut a = Vec::with_capacity(mu.capacity());
        for chunk in pcm8k.chunks(FRAME_SAMPLES) {
            let mut padded = [0i16; FRAME_SAMPLES];
            padded[..chunk.len()].copy_from_slice(chunk);
            let mut frame = [0u8; FRAME_SAMPLES];
            g711::encode(Law::Mu, &padded, &mut frame);
            mu.push(frame);
            g711::encode(Law::A, &padded, &mut frame);
            a.push(frame);
        }
        Ok(Prompt { pcm8k, mu, a })
    }

    /// The 20 ms G.711 payloads in `law`.
    pub fn frames(&self, law: Law) -> &[[u8; FRAME_SAMPLES]] {
        match law {
            Law::Mu => &self.mu,
            Law::A => &self.a,
        }
    }

    /// The number of 20 ms frames.
    pub fn frame_count(&self) -> u32 {
        // Bounded by MAX_PROMPT_SECONDS · 50.
        u32::try_from(self.mu.len()).unwrap_or(u32::MAX)
    }

    /// The mono 8 kHz PCM (unpadded), e.g. for cross-correlation in tests.
    pub fn pcm8k(&self) -> &[i16] {
        &self.pcm8k
    }

    /// Playing time: frame count × 20 ms.
    pub fn duration(&self) -> Duration {
        FRAME_DURATION * self.frame_count()
    }
}

/// One frame handed out by a [`PromptPlayer`]: the RTP payload, whether the
/// packet carries the marker bit, and the frame's index in the prompt (the
/// RTP timestamp is `base + 160·index`, so skipped frames leave a gap in
/// timestamps, as they would in real time).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PromptFrame {
    /// The G.711 payload.
    pub payload: [u8; FRAME_SAMPLES],
    /// Set on the first frame played (start of a talkspurt).
    pub marker: bool,
    /// Frame index within the prompt.
    pub index: u32,
}

/// Plays a [`Prompt`] for one call: frame `i` is due at `start + 20 ms·i`.
/// The caller polls at [`PromptPlayer::next_deadline`]; a poll returns at
/// most one frame. If the caller fell more than [`MAX_CATCH_UP_FRAMES`]
/// behind, the missed frames are skipped instead of being sent in a burst.
#[derive(Debug, Clone)]
pub struct PromptPlayer {
    prompt: Arc<Prompt>,
    law: Law,
    start: Instant,
    next: u32,
    sent: u32,
    skipped: u32,
}

impl PromptPlayer {
    /// A player whose first frame is due at `start`.
    pub fn new(prompt: Arc<Prompt>, law: Law, start: Instant) -> PromptPlayer {
        PromptPlayer {
            prompt,
            law,
            start,
            next: 0,
            sent: 0,
            skipped: 0,
        }
    }

    fn deadline(&self, index: u32) -> Instant {
        self.start + FRAME_DURATION * index
    }

    /// The frame due at `now`, if any.
    pub fn poll(&mut self, now: Instant) -> Option<PromptFrame> {
        if self.is_finished() || now < self.deadline(self.next) {
            return None;
        }
        let elapsed = now.saturating_duration_since(self.start);
        let due = u32::try_from(elapsed.as_nanos() / FRAME_DURATION.as_nanos()).unwrap_or(u32::MAX);
        let behind = due.saturating_sub(self.next);
        if behind > MAX_CATCH_UP_FRAMES {
            self.skipped = self.skipped.saturating_add(behind);
            self.next = due;
        }
        let index = self.next;
        let total = self.prompt.frame_count();
        if index >= total {
            // Skipped past the end.
            self.skipped = self.skipped.saturating_sub(index - total);
            self.next = total;
            return None;
        }
        let payload = *self
            .prompt
            .frames(self.law)
            .get(usize::try_from(index).ok()?)?;
        self.next += 1;
        let marker = self.sent == 0;
        self.sent += 1;
        Some(PromptFrame {
            payload,
            marker,
            index,
        })
    }

    /// When the next frame is due; `None` once finished.
    pub fn next_deadline(&self) -> Option<Instant> {
        (!self.is_finished()).then(|| self.deadline(self.next))
    }

    /// Whether every frame has been sent or skipped.
    pub fn is_finished(&self) -> bool {
        self.next >= self.prompt.frame_count()
    }

    /// Once finished: when the prompt's audio ends on the schedule
    /// (`start + duration`), i.e. when caller audio may reach the pipeline.
    pub fn finished_at(&self) -> Option<Instant> {
        self.is_finished()
            .then(|| self.start + self.prompt.duration())
    }

    /// Frames sent so far.
    pub fn frames_sent(&self) -> u32 {
        self.sent
    }

    /// Frames skipped because the caller polled late.
    pub fn frames_skipped(&self) -> u32 {
        self.skipped
    }

    /// The law this player encodes in.
    pub fn law(&self) -> Law {
        self.law
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use hound::{WavSpec, WavWriter};
    use std::f64::consts::PI;
    use std::io::Cursor;

    fn wav_bytes(
        rate: u32,
        channels: u16,
        seconds: f64,
        sample: impl Fn(usize, u16) -> i16,
    ) -> Vec<u8> {
        let spec = WavSpec {
            channels,
            sample_rate: rate,
            bits_per_sample: 16,
            sample_format: SampleFormat::Int,
        };
        let mut cursor = Cursor::new(Vec::new());
        {
            let mut w = WavWriter::new(&mut cursor, spec).unwrap();
            let n = (seconds * f64::from(rate)).round() as usize;
            for i in 0..n {
                for ch in 0..channels {
                    w.write_sample(sample(i, ch)).unwrap();
                }
            }
            w.finalize().unwrap();
        }
        cursor.into_inner()
    }

    fn tone_1k(rate: u32) -> impl Fn(usize, u16) -> i16 {
        move |i, _| (8000.0 * (2.0 * PI * 1000.0 * i as f64 / f64::from(rate)).sin()).round() as i16
    }

    /// Amplitude at `freq` in 8 kHz PCM (single DFT bin).
    fn amplitude_at(x: &[i16], freq: f64) -> f64 {
        let w = 2.0 * PI * freq / 8000.0;
        let (mut re, mut im) = (0.0, 0.0);
        for (n, &s) in x.iter().enumerate() {
            re += f64::from(s) * (w * n as f64).cos();
            im -= f64::from(s) * (w * n as f64).sin();
        }
        2.0 * (re * re + im * im).sqrt() / x.len() as f64
    }

    fn zero_crossings(x: &[i16]) -> usize {
        x.windows(2).filter(|w| (w[0] < 0) != (w[1] < 0)).count()
    }

    fn check_tone_survives(prompt: &Prompt, expected_amplitude: f64) {
        // Drop the edges; 1 s of 1 kHz has 2000 zero crossings.
        let mid = &prompt.pcm8k()[400..7600];
        let crossings = zero_crossings(mid);
        assert!(
            (1798..=1802).contains(&crossings),
            "{crossings} crossings in 0.9 s"
        );
        let amp = amplitude_at(mid, 1000.0);
        assert!(
            (amp / expected_amplitude - 1.0).abs() < 0.01,
            "amplitude {amp}"
        );
        let off = amplitude_at(mid, 1500.0);
        assert!(
            off < expected_amplitude * 0.001,
            "energy off the tone: {off}"
        );
    }

    #[test]
    fn eight_khz_mono_is_used_sample_for_sample() {
        let bytes = wav_bytes(8000, 1, 1.0, tone_1k(8000));
        let prompt = Prompt::from_wav_bytes(&bytes).unwrap();
        let expected: Vec<i16> = (0..8000).map(|i| tone_1k(8000)(i, 0)).collect();
        assert_eq!(prompt.pcm8k(), &expected[..]);
        assert_eq!(prompt.frame_count(), 50);
        assert_eq!(prompt.duration(), Duration::from_secs(1));
        let mut want = [0u8; 160];
        g711::encode(Law::Mu, &expected[160..320], &mut want);
        assert_eq!(prompt.frames(Law::Mu)[1], want);
        g711::encode(Law::A, &expected[160..320], &mut want);
        assert_eq!(prompt.frames(Law::A)[1], want);
        check_tone_survives(&prompt, 8000.0);
    }

    #[test]
    fn last_frame_is_padded_with_silence() {
        // 170 samples: one full frame plus 10 samples.
        let bytes = wav_bytes(8000, 1, 170.0 / 8000.0, |_, _| 1000);
        let prompt = Prompt::from_wav_bytes(&bytes).unwrap();
        assert_eq!(prompt.frame_count(), 2);
        let last = prompt.frames(Law::Mu)[1];
        assert!(last[..10].iter().all(|&c| c == g711::linear_to_mu(1000)));
        assert!(last[10..].iter().all(|&c| c == Law::Mu.silence()));
        assert!(
            prompt.frames(Law::A)[1][10..]
                .iter()
                .all(|&c| c == Law::A.silence())
        );
    }

    #[test]
    fn sixteen_khz_stereo_is_downmixed_and_resampled() {
        let bytes = wav_bytes(16000, 2, 1.0, tone_1k(16000));
        let prompt = Prompt::from_wav_bytes(&bytes).unwrap();
        assert!(
            (49..=51).contains(&prompt.frame_count()),
            "{}",
            prompt.frame_count()
        );
        check_tone_survives(&prompt, 8000.0);
    }

    #[test]
    fn stereo_downmix_averages_the_channels() {
        // Left = tone, right = inverted tone: the mix is silence.
        let t = tone_1k(16000);
        let bytes = wav_bytes(
            16000,
            2,
            0.5,
            move |i, ch| if ch == 0 { t(i, 0) } else { -t(i, 0) },
        );
        let prompt = Prompt::from_wav_bytes(&bytes).unwrap();
        assert!(prompt.pcm8k().iter().all(|&s| s.abs() <= 1));
        // Left = tone, right = silence: half the amplitude.
        let t = tone_1k(16000);
        let bytes = wav_bytes(
            16000,
            2,
            1.0,
            move |i, ch| if ch == 0 { t(i, 0) } else { 0 },
        );
        let prompt = Prompt::from_wav_bytes(&bytes).unwrap();
        let amp = amplitude_at(&prompt.pcm8k()[400..7600], 1000.0);
        assert!((amp - 4000.0).abs() < 40.0, "{amp}");
    }

    #[test]
    fn cd_and_dvd_rates_keep_duration_and_tone() {
        for rate in [44100, 48000, 11025, 22050, 32000] {
            let bytes = wav_bytes(rate, 1, 1.0, tone_1k(rate));
            let prompt = Prompt::from_wav_bytes(&bytes).unwrap();
            assert!(
                (49..=51).contains(&prompt.frame_count()),
                "{rate}: {}",
                prompt.frame_count()
            );
            assert_eq!(prompt.pcm8k().len(), 8000, "{rate}");
            check_tone_survives(&prompt, 8000.0);
        }
    }

    #[test]
    fn high_frequencies_do_not_alias_into_the_telephone_band() {
        // 5 kHz at 44.1 kHz would alias to 3 kHz at 8 kHz without filtering.
        let bytes = wav_bytes(44100, 1, 1.0, |i, _| {
            (8000.0 * (2.0 * PI * 5000.0 * i as f64 / 44100.0).sin()).round() as i16
        });
        let prompt = Prompt::from_wav_bytes(&bytes).unwrap();
        let alias = amplitude_at(&prompt.pcm8k()[400..7600], 3000.0);
        assert!(
            alias < 8000.0 * 10f64.powf(-60.0 / 20.0),
            "alias amplitude {alias}"
        );
    }

    #[test]
    fn float_and_24_bit_wavs_load() {
        let spec = WavSpec {
            channels: 1,
            sample_rate: 8000,
            bits_per_sample: 32,
            sample_format: SampleFormat::Float,
        };
        let mut cursor = Cursor::new(Vec::new());
        {
            let mut w = WavWriter::new(&mut cursor, spec).unwrap();
            for v in [0.5f32, -0.25, 1.5] {
                w.write_sample(v).unwrap();
            }
            w.finalize().unwrap();
        }
        let prompt = Prompt::from_wav_bytes(&cursor.into_inner()).unwrap();
        assert_eq!(prompt.pcm8k(), &[16384, -8192, 32767]);

        let spec = WavSpec {
            bits_per_sample: 24,
            sample_format: SampleFormat::Int,
            ..spec
        };
        let mut cursor = Cursor::new(Vec::new());
        {
            let mut w = WavWriter::new(&mut cursor, spec).unwrap();
            for v in [0x10_0000i32, -0x40_0000] {
                w.write_sample(v).unwrap();
            }
            w.finalize().unwrap();
        }
        let prompt = Prompt::from_wav_bytes(&cursor.into_inner()).unwrap();
        assert_eq!(prompt.pcm8k(), &[4096, -16384]);
    }

    #[test]
    fn bad_inputs_are_rejected_with_the_right_error() {
        assert!(matches!(
            Prompt::from_wav_bytes(b"RIFF\x00\x00"),
            Err(PromptError::Wav(_))
        ));
        assert!(matches!(
            Prompt::from_wav_bytes(b"not a wav at all"),
            Err(PromptError::Wav(_))
        ));
        let bytes = wav_bytes(7000, 1, 0.1, |_, _| 0);
        assert!(matches!(
            Prompt::from_wav_bytes(&bytes),
            Err(PromptError::UnsupportedRate(7000))
        ));
        let bytes = wav_bytes(96000, 1, 0.1, |_, _| 0);
        assert!(matches!(
            Prompt::from_wav_bytes(&bytes),
            Err(PromptError::UnsupportedRate(96000))
        ));
        let bytes = wav_bytes(8000, 1, 0.0, |_, _| 0);
        assert!(matches!(
            Prompt::from_wav_bytes(&bytes),
            Err(PromptError::Empty)
        ));
        let long = vec![0i16; 8000 * 121];
        assert!(matches!(
            Prompt::from_pcm(&long, 8000),
            Err(PromptError::TooLong { seconds: 121 })
        ));
        assert!(matches!(
            Prompt::load("/nonexistent/prompt.wav"),
            Err(PromptError::Io { .. })
        ));
    }

    #[test]
    fn load_reads_a_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p.wav");
        std::fs::write(&path, wav_bytes(48000, 1, 0.5, tone_1k(48000))).unwrap();
        let prompt = Prompt::load(&path).unwrap();
        assert_eq!(prompt.frame_count(), 25);
    }

    fn two_second_prompt() -> Arc<Prompt> {
        Arc::new(Prompt::from_pcm(&vec![500i16; 16000], 8000).unwrap())
    }

    #[test]
    fn player_sends_exactly_one_frame_per_20ms_of_virtual_time() {
        let prompt = two_second_prompt();
        let start = Instant::now();
        let mut player = PromptPlayer::new(prompt.clone(), Law::Mu, start);
        let mut sent = Vec::new();
        // Poll every millisecond for 2.1 s.
        for ms in 0..2100u64 {
            let now = start + Duration::from_millis(ms);
            while let Some(f) = player.poll(now) {
                sent.push((ms, f));
            }
        }
        assert_eq!(sent.len(), 100);
        for (k, (ms, frame)) in sent.iter().enumerate() {
            assert_eq!(*ms, 20 * k as u64, "frame {k} sent at {ms} ms");
            assert_eq!(frame.index, k as u32);
            assert_eq!(frame.marker, k == 0);
            assert_eq!(frame.payload, prompt.frames(Law::Mu)[k]);
        }
        assert!(player.is_finished());
        assert_eq!(player.next_deadline(), None);
        assert_eq!(player.finished_at(), Some(start + Duration::from_secs(2)));
        assert_eq!(player.frames_skipped(), 0);
    }

    #[test]
    fn player_polled_at_its_deadlines_follows_them() {
        let start = Instant::now();
        let mut player = PromptPlayer::new(two_second_prompt(), Law::A, start);
        assert_eq!(
            player.poll(start.checked_sub(Duration::from_millis(1)).unwrap()),
            None
        );
        let mut count = 0;
        while let Some(deadline) = player.next_deadline() {
            assert_eq!(deadline, start + FRAME_DURATION * count);
            let f = player.poll(deadline).unwrap();
            assert_eq!(f.index, count);
            assert_eq!(player.poll(deadline), None, "two frames at one instant");
            assert_eq!(
                player.finished_at(),
                (count == 99).then(|| start + Duration::from_secs(2))
            );
            count += 1;
        }
        assert_eq!(count, 100);
        assert_eq!(player.law(), Law::A);
    }

    #[test]
    fn small_lateness_catches_up_but_a_jump_skips() {
        let start = Instant::now();
        let mut player = PromptPlayer::new(two_second_prompt(), Law::Mu, start);
        assert_eq!(player.poll(start).unwrap().index, 0);
        // 60 ms late: frames 1, 2, 3 are due (2 behind): all sent.
        let now = start + Duration::from_millis(60);
        let got: Vec<u32> = std::iter::from_fn(|| player.poll(now))
            .map(|f| f.index)
            .collect();
        assert_eq!(got, vec![1, 2, 3]);
        // Jump 200 ms: frames 4..=13 due, 9 behind > 3: skip to 13.
        let now = start + Duration::from_millis(260);
        let got: Vec<PromptFrame> = std::iter::from_fn(|| player.poll(now)).collect();
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].index, 13);
        assert!(!got[0].marker);
        assert_eq!(player.frames_skipped(), 9);
        assert_eq!(
            player.next_deadline(),
            Some(start + Duration::from_millis(280))
        );
        // Jump past the end: nothing sent, finished, the scheduled end kept.
        assert_eq!(player.poll(start + Duration::from_secs(5)), None);
        assert!(player.is_finished());
        assert_eq!(player.frames_sent(), 5);
        assert_eq!(player.frames_sent() + player.frames_skipped(), 100);
        assert_eq!(player.finished_at(), Some(start + Duration::from_secs(2)));
    }
}
