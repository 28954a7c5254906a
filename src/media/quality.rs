//! Call quality figures, sans-IO: an estimated MOS from the ITU-T G.107
//! E-model, and a fixed-size latency histogram for per-call summaries.
//!
//! Owns: the arithmetic. Must not touch: clocks, sockets, the media path
//! (the media session feeds samples in; see `call::media`).
//!
//! # The E-model, simplified as RTP monitors use it
//! G.107 (06/2015) rates a connection by the transmission rating factor
//! `R = Ro − Is − Id − Ie,eff + A` (§7.1, eq. 7-1). With every parameter
//! that a bridge cannot observe at its default value (Table 3: SLR, RLR,
//! noise, sidetone, echo loss), `Ro − Is = 93.2` (§7.1; Appendix I), and the
//! advantage factor `A = 0` (wired access). What remains:
//!
//! - **Delay**, `Id`: only the absolute-delay term `Idd` (talker and listener
//!   echo are taken as fully cancelled, `Idte = Idle = 0`). For a one-way
//!   delay `Ta` in ms (eq. 7-27/7-28): `Idd = 0` for `Ta ≤ 100`, else
//!   `X = log2(Ta/100)` and `Idd = 25·((1 + X⁶)^(1/6) − 3·(1 + (X/3)⁶)^(1/6) + 2)`.
//! - **Equipment and loss**, `Ie,eff = Ie + (95 − Ie)·Ppl / (Ppl/BurstR + Bpl)`
//!   (eq. 7-29), with `Ppl` the packet loss in percent and `BurstR = 1`
//!   (random loss). For G.711, G.113 Appendix I gives `Ie = 0` and
//!   `Bpl = 4.3` for G.711 without the Appendix I packet-loss concealment of
//!   G.711 (`Bpl = 25.1` with it). Our concealment is a short fade of the last
//!   good frame, not G.711 Appendix I, so [`G711_BPL`] is the conservative
//!   4.3.
//! - **MOS** from R (G.107 Annex B, eq. B-4): `MOS = 1` for `R < 0`, `4.5`
//!   for `R > 100`, else `1 + 0.035·R + R·(R − 60)·(100 − R)·7·10⁻⁶`. So a
//!   perfect G.711 call (R = 93.2) rates 4.41.
//!
//! # Latency histograms
//! [`LatencyHistogram`] holds a fixed number of buckets (1 ms wide up to
//! 100 ms, 10 ms wide up to 1 s, one overflow bucket), whatever the call's
//! length: percentiles are the upper bound of the bucket that holds the rank,
//! the maximum is exact.

use std::time::Duration;

/// `Ro − Is` with G.107's default parameters (§7.1).
pub const R_DEFAULT: f64 = 93.2;
/// G.711's equipment impairment factor (G.113 Appendix I).
pub const G711_IE: f64 = 0.0;
/// G.711's packet-loss robustness factor without Appendix I PLC (G.113
/// Appendix I; see the module docs).
pub const G711_BPL: f64 = 4.3;

/// G.107's delay impairment `Idd` for a one-way (mouth-to-ear) delay in ms
/// (eq. 7-27/7-28); echo terms are taken as zero.
pub fn delay_impairment(one_way_ms: f64) -> f64 {
    if one_way_ms.is_nan() || one_way_ms <= 100.0 {
        return 0.0;
    }
    let x = (one_way_ms / 100.0).log2();
    25.0 * ((1.0 + x.powi(6)).powf(1.0 / 6.0) - 3.0 * (1.0 + (x / 3.0).powi(6)).powf(1.0 / 6.0)
        + 2.0)
}

/// G.107's effective equipment impairment `Ie,eff` (eq. 7-29) for random
/// loss (`BurstR = 1`) of `loss_pct` percent.
pub fn effective_equipment_impairment(ie: f64, bpl: f64, loss_pct: f64) -> f64 {
    let ppl = if loss_pct.is_nan() {
        0.0
    } else {
        loss_pct.clamp(0.0, 100.0)
    };
    ie + (95.0 - ie) * ppl / (ppl + bpl)
}

/// The simplified E-model's rating factor R for G.711 with `loss_pct`
/// percent random loss and `one_way_ms` one-way delay.
pub fn r_factor(one_way_ms: f64, loss_pct: f64) -> f64 {
    R_DEFAULT
        - delay_impairment(one_way_ms)
        - effective_equipment_impairment(G711_IE, G711_BPL, loss_pct)
}

/// MOS (conversational quality, estimated) from R (G.107 Annex B).
pub fn mos_from_r(r: f64) -> f64 {
    if r.is_nan() || r < 0.0 {
        1.0
    } else if r > 100.0 {
        4.5
    } else {
        // The cubic dips just below 1 for R < ~6.5: clamped to the scale.
        (1.0 + 0.035 * r + r * (r - 60.0) * (100.0 - r) * 7.0e-6).max(1.0)
    }
}

/// The estimated MOS of a G.711 call (see the module docs).
pub fn estimated_mos(one_way_ms: f64, loss_pct: f64) -> f64 {
    mos_from_r(r_factor(one_way_ms, loss_pct))
}

/// 1 ms buckets below this many ms.
const FINE_MS: u64 = 100;
/// 10 ms buckets below this many ms.
const COARSE_MS: u64 = 1000;
/// Buckets: 100 fine, 90 coarse, one overflow.
const BUCKETS: usize = (FINE_MS + (COARSE_MS - FINE_MS) / 10 + 1) as usize;

/// A bounded latency histogram (see the module docs).
#[derive(Clone, PartialEq, Eq)]
pub struct LatencyHistogram {
    counts: [u32; BUCKETS],
    total: u64,
    max: Duration,
}

impl Default for LatencyHistogram {
    fn default() -> Self {
        LatencyHistogram {
            counts: [0; BUCKETS],
            total: 0,
            max: Duration::ZERO,
        }
    }
}

impl std::fmt::Debug for LatencyHistogram {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LatencyHistogram")
            .field("count", &self.total)
            .field("p50_ms", &self.percentile_ms(50.0))
            .field("max", &self.max)
            .finish()
    }
}

fn bucket_of(ms_floor: u64) -> usize {
    let i = if ms_floor < FINE_MS {
        ms_floor
    } else if ms_floor < COARSE_MS {
        FINE_MS + (ms_floor - FINE_MS) / 10
    } else {
        BUCKETS as u64 - 1
    };
    usize::try_from(i).unwrap_or(BUCKETS - 1)
}

/// The upper bound of bucket `i` in ms (`None` for the overflow bucket).
fn upper_ms(i: usize) -> Option<u64> {
    let i = i as u64;
    if i < FINE_MS {
        Some(i + 1)
    } else if i < BUCKETS as u64 - 1 {
        Some(FINE_MS + (i - FINE_MS + 1) * 10)
    } else {
        None
    }
}

impl LatencyHistogram {
    /// Adds one sample.
    pub fn record(&mut self, d: Duration) {
        let ms = u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
        let b = &mut self.counts[bucket_of(ms)];
        *b = b.saturating_add(1);
        self.total = self.total.saturating_add(1);
        self.max = self.max.max(d);
    }

    /// Samples recorded.
    pub fn count(&self) -> u64 {
        self.total
    }

    /// The largest sample.
    pub fn max(&self) -> Duration {
        self.max
    }

    /// The `p`-th percentile (0–100) in ms, as the upper bound of the bucket
    /// holding that rank (never above the maximum); `None` without samples.
    pub fn percentile_ms(&self, p: f64) -> Option<f64> {
        if self.total == 0 {
            return None;
        }
        let rank = ((p.clamp(0.0, 100.0) / 100.0) * self.total as f64).ceil() as u64;
        let rank = rank.max(1);
        let max_ms = self.max.as_secs_f64() * 1000.0;
        let mut seen = 0u64;
        for (i, c) in self.counts.iter().enumerate() {
            seen += u64::from(*c);
            if seen >= rank {
                return Some(upper_ms(i).map_or(max_ms, |u| (u as f64).min(max_ms)));
            }
        }
        Some(max_ms)
    }

    /// The non-empty buckets as (a representative value in seconds: the
    /// bucket's midpoint, or the maximum for the overflow bucket; count), for
    /// folding into a process-wide histogram.
    pub fn buckets(&self) -> impl Iterator<Item = (f64, u32)> + '_ {
        self.counts
            .iter()
            .enumerate()
            .filter(|(_, c)| **c > 0)
            .map(|(i, c)| {
                let value = match (i.checked_sub(1).and_then(upper_ms), upper_ms(i)) {
                    (_, None) => self.max.as_secs_f64(),
                    (lo, Some(hi)) => {
                        let lo = lo.unwrap_or(0);
                        (lo + hi) as f64 / 2000.0
                    }
                };
                (value, *c)
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64, eps: f64) -> bool {
        (a - b).abs() <= eps
    }

    /// G.107: the default parameters give R = 93.2, MOS 4.41 (Annex B).
    #[test]
    fn default_connection_rates_4_41() {
        assert!(close(r_factor(0.0, 0.0), 93.2, 1e-9));
        assert!(close(mos_from_r(93.2), 4.41, 0.005));
        assert!(close(estimated_mos(50.0, 0.0), 4.41, 0.005));
    }

    /// Annex B's MOS(R) at the edges and at the category boundaries of G.109
    /// (R = 50 → 2.58, 60 → 3.10, 70 → 3.60, 80 → 4.03, 90 → 4.34).
    #[test]
    fn mos_from_r_matches_g107_annex_b() {
        assert_eq!(mos_from_r(-5.0), 1.0);
        assert_eq!(mos_from_r(0.0), 1.0);
        assert_eq!(mos_from_r(101.0), 4.5);
        assert_eq!(mos_from_r(f64::NAN), 1.0);
        for (r, mos) in [
            (50.0, 2.58),
            (60.0, 3.10),
            (70.0, 3.60),
            (80.0, 4.03),
            (90.0, 4.34),
            (100.0, 4.5),
        ] {
            assert!(close(mos_from_r(r), mos, 0.01), "R {r}: {}", mos_from_r(r));
        }
    }

    /// Idd is zero up to 100 ms and grows with delay (eq. 7-28 by hand):
    /// 150 ms → 0.16, 200 ms → 3.04, 300 ms → 14.76, 400 ms → 24.07;
    /// monotonic.
    #[test]
    fn delay_curve() {
        assert_eq!(delay_impairment(0.0), 0.0);
        assert_eq!(delay_impairment(100.0), 0.0);
        assert!(close(delay_impairment(200.0), 3.04, 0.01));
        assert!(close(delay_impairment(150.0), 0.16, 0.01));
        assert!(close(delay_impairment(300.0), 14.76, 0.01));
        assert!(close(delay_impairment(400.0), 24.07, 0.01));
        let mut last = 0.0;
        for ms in (100..1000).step_by(10) {
            let idd = delay_impairment(f64::from(ms));
            assert!(idd >= last, "monotonic at {ms}");
            last = idd;
        }
        // G.114: up to 150 ms one way is transparent to most applications.
        assert!(close(estimated_mos(150.0, 0.0), 4.41, 0.01));
        assert!(close(estimated_mos(300.0, 0.0), 3.96, 0.01));
        assert!(close(estimated_mos(400.0, 0.0), 3.56, 0.01));
    }

    /// Loss: Ie,eff = 95·Ppl/(Ppl + 4.3) for G.711: 1 % → 17.92 (R 75.28,
    /// MOS 3.83), 2 % → 30.16, 5 % → 51.08 (R 42.12, MOS 2.17); 100 % →
    /// 91.08 (MOS 1).
    #[test]
    fn loss_curve() {
        assert_eq!(effective_equipment_impairment(0.0, G711_BPL, 0.0), 0.0);
        assert!(close(
            effective_equipment_impairment(0.0, G711_BPL, 1.0),
            17.92,
            0.01
        ));
        assert!(close(
            effective_equipment_impairment(0.0, G711_BPL, 2.0),
            30.16,
            0.01
        ));
        assert!(close(r_factor(0.0, 1.0), 75.28, 0.01));
        assert!(close(estimated_mos(0.0, 1.0), 3.83, 0.01));
        assert!(close(r_factor(0.0, 5.0), 42.12, 0.01));
        assert!(close(estimated_mos(0.0, 5.0), 2.17, 0.01));
        assert_eq!(estimated_mos(0.0, 100.0), 1.0);
        assert!(close(
            effective_equipment_impairment(0.0, G711_BPL, 100.0),
            91.08,
            0.01
        ));
        let mut last = 5.0;
        for tenths in 0..200 {
            let mos = estimated_mos(20.0, f64::from(tenths) / 10.0);
            assert!(mos <= last, "MOS falls with loss");
            last = mos;
        }
    }

    #[test]
    fn histogram_is_bounded_and_reports_percentiles() {
        let mut h = LatencyHistogram::default();
        assert_eq!(h.percentile_ms(50.0), None);
        for ms in 0..100u64 {
            h.record(Duration::from_micros(ms * 1000 + 300));
        }
        assert_eq!(h.count(), 100);
        assert_eq!(h.percentile_ms(50.0), Some(50.0));
        assert_eq!(h.percentile_ms(99.0), Some(99.0));
        assert!(close(h.percentile_ms(100.0).unwrap(), 99.3, 1e-9));
        h.record(Duration::from_millis(455));
        h.record(Duration::from_secs(7));
        assert_eq!(h.max(), Duration::from_secs(7));
        assert_eq!(h.percentile_ms(100.0), Some(7000.0));
        let folded: u32 = h.buckets().map(|(_, c)| c).sum();
        assert_eq!(folded, 102);
        assert!(h.buckets().any(|(v, _)| close(v, 0.455, 1e-9)));
        assert!(h.buckets().any(|(v, _)| close(v, 7.0, 1e-9)));
        // A million samples: the same few hundred bytes.
        for _ in 0..1_000_000 {
            h.record(Duration::from_millis(3));
        }
        assert_eq!(h.percentile_ms(50.0), Some(4.0));
        assert!(std::mem::size_of::<LatencyHistogram>() < 1024);
    }
}
