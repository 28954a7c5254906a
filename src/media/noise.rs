//! Comfort noise for the caller while the agent is away (a dropped agent
//! connection being re-established): a soft, steady hiss at about −45 dBov,
//! so the caller hears that the line is alive rather than dead air.
//!
//! Owns: the noise generator — a xorshift32 sequence (seeded by the caller,
//! so the media core stays deterministic and testable in virtual time)
//! through a one-pole low-pass filter, which takes the harshness off white
//! noise. Written here because it is twenty lines: RFC 3389 CN packets
//! would need the far end to have negotiated payload type 13, which
//! carriers rarely offer; in-band noise works with every G.711 peer.

use crate::media::g711::{self, Law};

/// Samples per 20 ms frame at 8 kHz.
const FRAME: usize = 160;
/// Peak amplitude of the white noise before the filter (the filtered
/// output's RMS is about 180, −45 dBov).
const AMPLITUDE: i32 = 900;

/// A comfort-noise source.
#[derive(Debug, Clone)]
pub struct ComfortNoise {
    state: u32,
    filtered: i32,
}

impl ComfortNoise {
    /// A generator seeded with `seed` (any value; 0 is replaced).
    pub fn new(seed: u32) -> ComfortNoise {
        ComfortNoise {
            state: if seed == 0 { 0x9e37_79b9 } else { seed },
            filtered: 0,
        }
    }

    fn next_sample(&mut self) -> i16 {
        let mut x = self.state;
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        self.state = x;
        let white = (x % (2 * AMPLITUDE as u32 + 1)) as i32 - AMPLITUDE;
        // y += (x − y) / 2: a gentle low-pass.
        self.filtered += (white - self.filtered) / 2;
        self.filtered as i16
    }

    /// The next 20 ms of noise, as linear PCM at 8 kHz.
    pub fn pcm_frame(&mut self) -> [i16; FRAME] {
        let mut pcm = [0i16; FRAME];
        for s in &mut pcm {
            *s = self.next_sample();
        }
        pcm
    }

    /// The next 20 ms of noise, G.711-encoded.
    pub fn frame(&mut self, law: Law) -> [u8; FRAME] {
        let pcm = self.pcm_frame();
        let mut payload = [0u8; FRAME];
        for (out, s) in payload.iter_mut().zip(pcm) {
            *out = g711::encode_sample(law, s);
        }
        payload
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rms(pcm: &[i16]) -> f64 {
        (pcm.iter().map(|&s| f64::from(s).powi(2)).sum::<f64>() / pcm.len() as f64).sqrt()
    }

    #[test]
    fn noise_is_soft_steady_and_deterministic() {
        let mut a = ComfortNoise::new(7);
        let mut b = ComfortNoise::new(7);
        let frames: Vec<[i16; FRAME]> = (0..50).map(|_| a.pcm_frame()).collect();
        assert_eq!(frames[0], b.pcm_frame(), "same seed, same noise");
        for f in &frames {
            let level = rms(f);
            // Audible (not digital silence) but soft: −52 to −38 dBov.
            assert!((80.0..400.0).contains(&level), "frame RMS {level}");
        }
        assert_ne!(frames[0], frames[1], "not a repeating frame");
        // Through G.711 it stays noise, not the silence code.
        let payload = a.frame(Law::Mu);
        assert!(payload.iter().any(|&c| c != Law::Mu.silence()));
    }
}
