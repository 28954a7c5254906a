#![allow(clippy::unwrap_used, clippy::expect_used)]
//! G.711 against an independent transcription of the ITU-T G.191 reference
//! loops (`ulaw_compress`, `ulaw_expand`, `alaw_compress`, `alaw_expand`):
//! all 256 codes and all 65,536 inputs, for both laws.

use sipbridge::media::g711::{self, Law};

/// G.191 `ulaw_compress` for one sample, loop for loop.
fn ref_ulaw_compress(x: i16) -> u8 {
    let x = i32::from(x);
    let mut absno = if x < 0 {
        ((!x) >> 2) + 33
    } else {
        (x >> 2) + 33
    };
    if absno > 0x1FFF {
        absno = 0x1FFF;
    }
    let mut i = absno >> 6;
    let mut segno = 1;
    while i != 0 {
        segno += 1;
        i >>= 1;
    }
    let high_nibble = 0x0008 - segno;
    let mut low_nibble = (absno >> segno) & 0x000F;
    low_nibble = 0x000F - low_nibble;
    let mut out = (high_nibble << 4) | low_nibble;
    if x >= 0 {
        out |= 0x0080;
    }
    out as u8
}

/// G.191 `ulaw_expand` for one code.
fn ref_ulaw_expand(code: u8) -> i16 {
    let code = i32::from(code);
    let sign = if code < 0x80 { -1 } else { 1 };
    let mantissa = !code;
    let exponent = (mantissa >> 4) & 0x0007;
    let segment = exponent + 1;
    let mantissa = mantissa & 0x000F;
    let step = 4 << segment;
    (sign * ((0x0080 << exponent) + step * mantissa + step / 2 - 4 * 33)) as i16
}

/// G.191 `alaw_compress` for one sample.
fn ref_alaw_compress(x: i16) -> u8 {
    let x = i32::from(x);
    let mut ix = if x < 0 { (!x) >> 4 } else { x >> 4 };
    if ix > 15 {
        let mut iexp = 1;
        while ix > 16 + 15 {
            ix >>= 1;
            iexp += 1;
        }
        ix -= 16;
        ix += iexp << 4;
    }
    if x >= 0 {
        ix |= 0x0080;
    }
    (ix ^ 0x0055) as u8
}

/// G.191 `alaw_expand` for one code.
fn ref_alaw_expand(code: u8) -> i16 {
    let mut ix = i32::from(code) ^ 0x0055;
    ix &= 0x007F;
    let iexp = ix >> 4;
    let mut mant = ix & 0x000F;
    if iexp > 0 {
        mant += 16;
    }
    mant = (mant << 4) + 0x0008;
    if iexp > 1 {
        mant <<= iexp - 1;
    }
    (if code > 127 { mant } else { -mant }) as i16
}

#[test]
fn mu_law_decode_matches_g191_on_all_256_codes() {
    let codes: Vec<u8> = (0..=255).collect();
    let mut out = vec![0i16; 256];
    g711::decode(Law::Mu, &codes, &mut out);
    for code in 0..=255u8 {
        let want = ref_ulaw_expand(code);
        assert_eq!(out[usize::from(code)], want, "µ-law code {code:#04x}");
        assert_eq!(g711::mu_to_linear(code), want);
        assert_eq!(g711::decode_sample(Law::Mu, code), want);
    }
}

#[test]
fn a_law_decode_matches_g191_on_all_256_codes() {
    let codes: Vec<u8> = (0..=255).collect();
    let mut out = vec![0i16; 256];
    g711::decode(Law::A, &codes, &mut out);
    for code in 0..=255u8 {
        let want = ref_alaw_expand(code);
        assert_eq!(out[usize::from(code)], want, "A-law code {code:#04x}");
        assert_eq!(g711::a_to_linear(code), want);
        assert_eq!(g711::decode_sample(Law::A, code), want);
    }
}

fn all_inputs() -> Vec<i16> {
    (i16::MIN..=i16::MAX).collect()
}

#[test]
fn mu_law_encode_matches_g191_on_all_65536_inputs() {
    let input = all_inputs();
    let mut codes = vec![0u8; input.len()];
    g711::encode(Law::Mu, &input, &mut codes);
    for (&x, &c) in input.iter().zip(&codes) {
        assert_eq!(c, ref_ulaw_compress(x), "µ-law input {x}");
        assert_eq!(g711::encode_sample(Law::Mu, x), c);
    }
}

#[test]
fn a_law_encode_matches_g191_on_all_65536_inputs() {
    let input = all_inputs();
    let mut codes = vec![0u8; input.len()];
    g711::encode(Law::A, &input, &mut codes);
    for (&x, &c) in input.iter().zip(&codes) {
        assert_eq!(c, ref_alaw_compress(x), "A-law input {x}");
        assert_eq!(g711::encode_sample(Law::A, x), c);
    }
}

/// Quantisation step (16-bit domain) of the segment a decoded value lies in.
fn mu_step(code: u8) -> i32 {
    let exponent = i32::from((!code >> 4) & 0x07);
    8 << exponent
}

fn a_step(code: u8) -> i32 {
    let exponent = i32::from(((code ^ 0x55) >> 4) & 0x07);
    16 << exponent.max(1).saturating_sub(1)
}

#[test]
fn mu_law_round_trip_error_is_within_half_a_step_plus_truncation() {
    for x in all_inputs() {
        let code = g711::linear_to_mu(x);
        let y = i32::from(g711::mu_to_linear(code));
        let err = (i32::from(x) - y).abs();
        if i32::from(x).abs() > 32124 + 4 * 16 {
            // Overload region: clipped to the largest code.
            assert_eq!(y.abs(), 32124, "input {x}");
            continue;
        }
        // Half the interval, plus the 2 LSBs G.711 drops and the one's
        // complement on negatives.
        let bound = mu_step(code) / 2 + 4;
        assert!(
            err <= bound,
            "input {x}: decoded {y}, error {err} > {bound}"
        );
    }
}

#[test]
fn a_law_round_trip_error_is_within_half_a_step() {
    for x in all_inputs() {
        let code = g711::linear_to_a(x);
        let y = i32::from(g711::a_to_linear(code));
        let err = (i32::from(x) - y).abs();
        let bound = a_step(code) / 2 + 1;
        assert!(
            err <= bound,
            "input {x}: decoded {y}, error {err} > {bound}"
        );
    }
}

#[test]
fn decoded_values_re_encode_to_the_same_code() {
    // Every reconstruction level is a fixed point of encode∘decode (except
    // µ-law's negative zero 0x7F, which G.191 maps to positive zero 0xFF).
    for code in 0..=255u8 {
        let a = g711::linear_to_a(g711::a_to_linear(code));
        assert_eq!(a, code, "A-law {code:#04x}");
        let mu = g711::linear_to_mu(g711::mu_to_linear(code));
        let want = if code == 0x7F { 0xFF } else { code };
        assert_eq!(mu, want, "µ-law {code:#04x}");
    }
}
