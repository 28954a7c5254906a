//! Audio comparison for tests: normalised cross-correlation (NCC) of what a side
//! heard or what a recording holds against what was sent, written from the
//! definition, independent of the bridge's code.

/// Normalised cross-correlation of `needle` with `hay[lag..]` (zero beyond its end).
pub(crate) fn ncc(hay: &[f64], needle: &[f64], lag: usize) -> f64 {
    let (mut dot, mut e_hay, mut e_needle) = (0.0, 0.0, 0.0);
    for (i, n) in needle.iter().enumerate() {
        let h = hay.get(lag + i).copied().unwrap_or(0.0);
        dot += h * n;
        e_hay += h * h;
        e_needle += n * n;
    }
    let d = (e_hay * e_needle).sqrt();
    if d <= f64::EPSILON { 0.0 } else { dot / d }
}

/// The best NCC of `needle` over every lag in `hay`, and that lag.
pub(crate) fn best_ncc(hay: &[f64], needle: &[f64]) -> (f64, usize) {
    (0..hay.len().saturating_sub(needle.len()) + 1)
        .map(|l| (ncc(hay, needle, l), l))
        .fold((f64::MIN, 0), |a, b| if b.0 > a.0 { b } else { a })
}

/// Segmental match of `needle` in `hay`, for audio that passed through a peer
/// which may stall (a Python agent, SIPp playing a pcap on a loaded host): a stalled peer makes the bridge send silence for a while and
/// then the rest of its audio later, so one lag cannot fit the whole needle. The
/// needle is cut into `window`-sample pieces; each piece with speech in it is
/// matched on its own, over lags within `slack` samples of where the whole needle
/// fits best. Returns the best NCC of each voiced piece, in order.
pub(crate) fn segment_nccs(hay: &[f64], needle: &[f64], window: usize, slack: usize) -> Vec<f64> {
    // Where the whole needle fits best, found on every 4th sample (16 times less
    // work in a debug build; each piece is then searched sample by sample).
    let every4 = |x: &[f64]| x.iter().step_by(4).copied().collect::<Vec<f64>>();
    let (_, lag0) = best_ncc(&every4(hay), &every4(needle));
    let lag0 = lag0 * 4;
    let loudest = needle
        .chunks(window)
        .map(|w| w.iter().map(|s| s * s).sum::<f64>() / w.len() as f64)
        .fold(0.0_f64, f64::max);
    needle
        .chunks_exact(window)
        .enumerate()
        .filter(|(_, w)| w.iter().map(|s| s * s).sum::<f64>() / window as f64 > loudest / 100.0)
        .map(|(k, piece)| {
            let centre = lag0 + k * window;
            let last = hay.len().saturating_sub(window);
            (centre.saturating_sub(slack)..=(centre + slack).min(last))
                .map(|l| ncc(hay, piece, l))
                .fold(f64::MIN, f64::max)
        })
        .collect()
}

/// The share of `needle`'s voiced 250 ms pieces (at 8 kHz) found in `hay` with
/// NCC ≥ 0.9, each within 500 ms of where the whole fits best, and every
/// piece's NCC. Robust to a peer's stall (a gap, then the rest later), which
/// one lag over the whole needle is not; unrelated audio or noise scores near 0.
pub(crate) fn pieces_found(hay: &[i16], needle: &[i16]) -> (f64, Vec<f64>) {
    let hay: Vec<f64> = hay.iter().map(|&s| f64::from(s)).collect();
    let needle: Vec<f64> = needle.iter().map(|&s| f64::from(s)).collect();
    let pieces = segment_nccs(&hay, &needle, 2000, 4000);
    let good = pieces.iter().filter(|&&p| p >= 0.9).count();
    (good as f64 / pieces.len().max(1) as f64, pieces)
}
