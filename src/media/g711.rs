//! G.711 µ-law and A-law (ITU-T G.711, bit-exact with the G.191 reference
//! implementation `g711.c`): 8-bit codes ↔ 16-bit linear PCM.
//!
//! Owns only the sample conversion; framing, RTP and resampling live elsewhere
//! (`rtp`, `resample`). Pure functions, no state, no allocation.
//!
//! Written by hand rather than with `audio-codec-algorithms` 0.8 (DESIGN §7
//! allows either): the whole codec is ~80 lines, decoding is a 256-entry table
//! and encoding a 16 KiB (µ-law, indexed by the 14 significant bits) or
//! 4 KiB (A-law, 12 bits) table, all built at compile time by `const fn`s
//! that compute the segment with `leading_zeros` instead of G.191's search
//! loop; the hot path is one load per sample, and it saves a dependency that
//! is not in the build cache. `tests/media_g711.rs` checks all 256 codes and all
//! 65,536 inputs against an independent transcription of the G.191 loops.

/// Which G.711 companding law.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Law {
    /// µ-law (PCMU, RTP payload type 0): North America, Japan.
    Mu,
    /// A-law (PCMA, RTP payload type 8): Europe and most of the world.
    A,
}

impl Law {
    /// The static RTP payload type (RFC 3551): 0 for PCMU, 8 for PCMA.
    pub fn payload_type(self) -> u8 {
        match self {
            Law::Mu => 0,
            Law::A => 8,
        }
    }

    /// The code for digital silence (linear 0) in this law.
    pub fn silence(self) -> u8 {
        match self {
            Law::Mu => 0xFF,
            Law::A => 0xD5,
        }
    }
}

/// µ-law bias (33) in the 14-bit domain, scaled to 16-bit (×4).
const MU_BIAS: i32 = 0x84;
/// Largest biased magnitude in the 16-bit domain (0x1FFF in 14-bit, ×4).
const MU_CLIP: i32 = 0x7FFC;

const fn mu_decode_const(code: u8) -> i16 {
    let inv = !code;
    let exponent = ((inv >> 4) & 0x07) as i32;
    let mantissa = (inv & 0x0F) as i32;
    // Centre of the quantisation interval, minus the bias.
    let magnitude = (((mantissa << 1) | 0x21) << (exponent + 2)) - MU_BIAS;
    if code & 0x80 != 0 {
        magnitude as i16
    } else {
        -magnitude as i16
    }
}

const fn a_decode_const(code: u8) -> i16 {
    let v = code ^ 0x55;
    let exponent = ((v >> 4) & 0x07) as i32;
    let mantissa = (v & 0x0F) as i32;
    let magnitude = if exponent == 0 {
        (mantissa << 4) | 0x08
    } else {
        ((mantissa << 4) | 0x108) << (exponent - 1)
    };
    if code & 0x80 != 0 {
        magnitude as i16
    } else {
        -magnitude as i16
    }
}

const fn build_table(law: Law) -> [i16; 256] {
    let mut table = [0i16; 256];
    let mut i = 0;
    while i < 256 {
        table[i] = match law {
            Law::Mu => mu_decode_const(i as u8),
            Law::A => a_decode_const(i as u8),
        };
        i += 1;
    }
    table
}

static MU_TABLE: [i16; 256] = build_table(Law::Mu);
static A_TABLE: [i16; 256] = build_table(Law::A);

/// Decodes one µ-law code to 16-bit linear PCM.
#[inline]
pub fn mu_to_linear(code: u8) -> i16 {
    MU_TABLE[usize::from(code)]
}

/// Decodes one A-law code to 16-bit linear PCM.
#[inline]
pub fn a_to_linear(code: u8) -> i16 {
    A_TABLE[usize::from(code)]
}

const fn mu_encode_const(sample: i16) -> u8 {
    let s = sample as i32;
    // One's complement for negatives, exactly as G.191 (`~x >> 2`).
    let (magnitude, sign) = if s < 0 { (!s, 0x00) } else { (s, 0x80) };
    let biased = ((magnitude >> 2) << 2) + MU_BIAS;
    let biased = if biased > MU_CLIP { MU_CLIP } else { biased };
    // Segment: position of the highest set bit above bit 7 (bias guarantees bit 7).
    let exponent = (31 - biased.leading_zeros() as i32) - 7;
    let mantissa = (biased >> (exponent + 3)) & 0x0F;
    (sign | (((exponent << 4) | mantissa) ^ 0x7F)) as u8
}

const fn a_encode_const(sample: i16) -> u8 {
    let s = sample as i32;
    let (magnitude, sign) = if s < 0 {
        (!s >> 4, 0x00)
    } else {
        (s >> 4, 0x80)
    };
    // Segments 0 and 1 share a step size: codes 0..=31 are the magnitude itself.
    let code = if magnitude < 32 {
        magnitude
    } else {
        let shift = (31 - magnitude.leading_zeros() as i32) - 4;
        ((shift + 1) << 4) | ((magnitude >> shift) & 0x0F)
    };
    ((sign | code) ^ 0x55) as u8
}

/// µ-law codes indexed by the 14-bit sample `x >> 2` (G.711 ignores the two
/// LSBs, and `!x >> 2 == !(x >> 2)`, so the code depends on nothing else).
static MU_ENCODE: [u8; 1 << 14] = {
    let mut table = [0u8; 1 << 14];
    let mut i = 0;
    while i < (1 << 14) {
        // Sign-extend the 14-bit index back to a sample with zero LSBs.
        table[i] = mu_encode_const((((i as i32) << 18) >> 16) as i16);
        i += 1;
    }
    table
};

/// A-law codes indexed by the 12-bit sample `x >> 4`.
static A_ENCODE: [u8; 1 << 12] = {
    let mut table = [0u8; 1 << 12];
    let mut i = 0;
    while i < (1 << 12) {
        table[i] = a_encode_const((((i as i32) << 20) >> 16) as i16);
        i += 1;
    }
    table
};

/// Encodes one 16-bit linear sample to µ-law (the two LSBs are dropped, as in
/// G.191, which works on 14-bit samples).
#[inline]
pub fn linear_to_mu(sample: i16) -> u8 {
    MU_ENCODE[((sample >> 2) as u16 & 0x3FFF) as usize]
}

/// Encodes one 16-bit linear sample to A-law (the four LSBs are dropped, as
/// in G.191, which works on 13-bit samples).
#[inline]
pub fn linear_to_a(sample: i16) -> u8 {
    A_ENCODE[((sample >> 4) as u16 & 0x0FFF) as usize]
}

/// Decodes one code in `law`.
#[inline]
pub fn decode_sample(law: Law, code: u8) -> i16 {
    match law {
        Law::Mu => mu_to_linear(code),
        Law::A => a_to_linear(code),
    }
}

/// Encodes one sample in `law`.
#[inline]
pub fn encode_sample(law: Law, sample: i16) -> u8 {
    match law {
        Law::Mu => linear_to_mu(sample),
        Law::A => linear_to_a(sample),
    }
}

/// Decodes `codes` into `out`. Converts `min(codes.len(), out.len())` samples
/// (callers pass equal lengths; a short `out` never panics).
pub fn decode(law: Law, codes: &[u8], out: &mut [i16]) {
    let table = match law {
        Law::Mu => &MU_TABLE,
        Law::A => &A_TABLE,
    };
    for (o, &c) in out.iter_mut().zip(codes) {
        *o = table[usize::from(c)];
    }
}

/// Encodes `samples` into `out`. Converts `min(samples.len(), out.len())`
/// samples.
pub fn encode(law: Law, samples: &[i16], out: &mut [u8]) {
    match law {
        Law::Mu => {
            for (o, &s) in out.iter_mut().zip(samples) {
                *o = linear_to_mu(s);
            }
        }
        Law::A => {
            for (o, &s) in out.iter_mut().zip(samples) {
                *o = linear_to_a(s);
            }
        }
    }
}

/// Converts `codes` in law `from` to law `to` at 8 kHz (no resampling):
/// each code decoded and re-encoded, a copy when the laws are the same.
/// Converts `min(codes.len(), out.len())` codes.
pub fn transcode(from: Law, to: Law, codes: &[u8], out: &mut [u8]) {
    if from == to {
        let n = codes.len().min(out.len());
        out[..n].copy_from_slice(&codes[..n]);
        return;
    }
    for (o, &c) in out.iter_mut().zip(codes) {
        *o = encode_sample(to, decode_sample(from, c));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn published_anchor_values() {
        // Values from the G.711 tables: extremes and the zero codes.
        assert_eq!(mu_to_linear(0x00), -32124);
        assert_eq!(mu_to_linear(0x80), 32124);
        assert_eq!(mu_to_linear(0xFF), 0);
        assert_eq!(mu_to_linear(0x7F), 0);
        assert_eq!(mu_to_linear(0xFE), 8);
        assert_eq!(a_to_linear(0xD5), 8);
        assert_eq!(a_to_linear(0x55), -8);
        assert_eq!(a_to_linear(0xAA), 32256);
        assert_eq!(a_to_linear(0x2A), -32256);
        assert_eq!(linear_to_mu(0), 0xFF);
        assert_eq!(linear_to_mu(-1), 0x7F);
        assert_eq!(linear_to_a(0), 0xD5);
        assert_eq!(linear_to_a(-1), 0x55);
        assert_eq!(linear_to_mu(i16::MAX), 0x80);
        assert_eq!(linear_to_mu(i16::MIN), 0x00);
        assert_eq!(linear_to_a(i16::MAX), 0xAA);
        assert_eq!(linear_to_a(i16::MIN), 0x2A);
    }

    #[test]
    fn silence_codes_decode_to_zero_magnitude() {
        assert_eq!(decode_sample(Law::Mu, Law::Mu.silence()), 0);
        assert_eq!(decode_sample(Law::A, Law::A.silence()), 8);
        assert_eq!(Law::Mu.payload_type(), 0);
        assert_eq!(Law::A.payload_type(), 8);
    }

    /// A-law ↔ µ-law at 8 kHz: every code lands on the code of its
    /// decoded value in the other law; the same law is a copy.
    #[test]
    fn transcode_between_laws_and_copy_within_one() {
        let all: Vec<u8> = (0..=255).collect();
        let mut out = vec![0u8; 256];
        transcode(Law::A, Law::Mu, &all, &mut out);
        for (&a, &m) in all.iter().zip(&out) {
            assert_eq!(m, linear_to_mu(a_to_linear(a)));
        }
        transcode(Law::Mu, Law::A, &all, &mut out);
        for (&u, &a) in all.iter().zip(&out) {
            assert_eq!(a, linear_to_a(mu_to_linear(u)));
        }
        transcode(Law::Mu, Law::Mu, &all, &mut out);
        assert_eq!(out, all, "the same law: the same bytes, 0x7F included");
    }

    #[test]
    fn slice_functions_stop_at_the_shorter_buffer() {
        let mut out = [7i16; 2];
        decode(Law::Mu, &[0x80, 0x00, 0xFF], &mut out);
        assert_eq!(out, [32124, -32124]);
        let mut codes = [0u8; 4];
        encode(Law::A, &[0, -1], &mut codes);
        assert_eq!(codes, [0xD5, 0x55, 0, 0]);
    }
}
