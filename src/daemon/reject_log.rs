//! Rate-limited logging of rejected call attempts (issue 19): a flood of
//! INVITEs that are refused (unknown source, no route, limits, digest) must
//! not write a full CDR line each — 107,000 rejects once wrote 77 MB of log.
//!
//! Owns the per-source tallies of one interval. Per source address, the
//! first [`FULL_LINES`] rejections of an interval are logged as full CDR
//! lines; the rest are counted by status and cause, and one summary line per
//! source ("N requests from X rejected in the last 10 s") closes the
//! interval. Memory is bounded: at most [`MAX_SOURCES`] sources and
//! [`MAX_REASONS`] reasons per source are told apart; beyond that they are
//! counted together. Must not touch: the CDR's content (`log_cdr`), the
//! database rows of rejected attempts (always written), metrics (always
//! counted).

use std::collections::HashMap;
use std::fmt::Write;
use std::net::IpAddr;
use std::time::{Duration, Instant};

/// Length of one interval.
pub(crate) const INTERVAL: Duration = Duration::from_secs(10);
/// Rejections per source and interval logged as full CDR lines.
pub(crate) const FULL_LINES: u32 = 5;
/// Sources told apart in one interval; more are summed as "other sources".
const MAX_SOURCES: usize = 1024;
/// Reasons told apart per source; more are summed as "other".
const MAX_REASONS: usize = 8;

/// One source's rejections in the current interval.
#[derive(Debug, Default)]
struct Tally {
    /// All rejections, logged or not.
    total: u64,
    /// Of those, not logged in full.
    suppressed: u64,
    /// `"403 rejected"` → count, of the suppressed ones.
    reasons: Vec<(String, u64)>,
}

impl Tally {
    fn count(&mut self, reason: &str) {
        self.suppressed += 1;
        if let Some(r) = self.reasons.iter_mut().find(|(k, _)| k == reason) {
            r.1 += 1;
        } else if self.reasons.len() < MAX_REASONS {
            self.reasons.push((reason.to_owned(), 1));
        } else if let Some(r) = self.reasons.iter_mut().find(|(k, _)| k == "other") {
            r.1 += 1;
        } else {
            self.reasons.push(("other".to_owned(), 1));
        }
    }

    fn reasons(&self) -> String {
        let mut out = String::new();
        for (i, (reason, n)) in self.reasons.iter().enumerate() {
            if i > 0 {
                out.push_str(", ");
            }
            let _ = write!(out, "{reason} ×{n}");
        }
        out
    }
}

/// A summary line to log at the end of an interval.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Summary {
    /// The source; `None` for the sources beyond [`MAX_SOURCES`], summed.
    pub(crate) source: Option<IpAddr>,
    /// Rejections in the interval, logged in full or not.
    pub(crate) rejected: u64,
    /// Of those, not logged in full.
    pub(crate) suppressed: u64,
    /// `"403 rejected ×120, 404 no-route ×3"`.
    pub(crate) reasons: String,
}

/// The rejections of the current interval.
#[derive(Debug)]
pub(crate) struct RejectLog {
    started: Instant,
    sources: HashMap<IpAddr, Tally>,
    /// Sources beyond [`MAX_SOURCES`]: their rejections, summed.
    others: Tally,
}

impl RejectLog {
    pub(crate) fn new(now: Instant) -> RejectLog {
        RejectLog {
            started: now,
            sources: HashMap::new(),
            others: Tally::default(),
        }
    }

    /// A rejected attempt from `source` with final `status` and `cause`:
    /// whether to log its full CDR line. (Call [`RejectLog::flush`] first
    /// when an interval may have ended.)
    pub(crate) fn rejected(&mut self, source: IpAddr, status: u16, cause: &str) -> bool {
        let known = self.sources.len();
        let tally = match self.sources.get_mut(&source) {
            Some(t) => t,
            None if known < MAX_SOURCES => self.sources.entry(source).or_default(),
            None => {
                self.others.total += 1;
                self.others.count(&format!("{status} {cause}"));
                return false;
            }
        };
        tally.total += 1;
        if tally.total <= u64::from(FULL_LINES) {
            return true;
        }
        tally.count(&format!("{status} {cause}"));
        false
    }

    /// When the interval is over: its summaries (sources whose rejections
    /// were not all logged in full), and a new interval starts. Before
    /// that: nothing.
    pub(crate) fn flush(&mut self, now: Instant) -> Vec<Summary> {
        if now.saturating_duration_since(self.started) < INTERVAL {
            return Vec::new();
        }
        self.started = now;
        let mut out: Vec<Summary> = self
            .sources
            .drain()
            .filter(|(_, t)| t.suppressed > 0)
            .map(|(ip, t)| Summary {
                source: Some(ip),
                rejected: t.total,
                suppressed: t.suppressed,
                reasons: t.reasons(),
            })
            .collect();
        out.sort_by_key(|s| s.source);
        if self.others.total > 0 {
            out.push(Summary {
                source: None,
                rejected: self.others.total,
                suppressed: self.others.suppressed,
                reasons: self.others.reasons(),
            });
        }
        self.others = Tally::default();
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_lines_in_full_then_one_summary_per_source_and_interval() {
        let t0 = Instant::now();
        let mut log = RejectLog::new(t0);
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let b: IpAddr = "192.0.2.2".parse().unwrap();
        let full = (0..1000)
            .filter(|i| log.rejected(a, 403, if i % 2 == 0 { "rejected" } else { "x" }))
            .count();
        assert_eq!(full, FULL_LINES as usize);
        assert!(
            log.rejected(b, 404, "no-route"),
            "another source logs in full"
        );
        assert!(
            log.flush(t0 + Duration::from_secs(1)).is_empty(),
            "mid-interval"
        );
        let s = log.flush(t0 + INTERVAL);
        assert_eq!(s.len(), 1, "{s:?}");
        assert_eq!(s[0].source, Some(a));
        assert_eq!(s[0].rejected, 1000);
        assert_eq!(s[0].suppressed, 995);
        assert_eq!(s[0].reasons, "403 x ×498, 403 rejected ×497");
        // A new interval: full lines again.
        assert!(log.rejected(a, 403, "rejected"));
        assert!(log.flush(t0 + INTERVAL * 2).is_empty());
    }

    #[test]
    fn sources_and_reasons_are_bounded() {
        let t0 = Instant::now();
        let mut log = RejectLog::new(t0);
        for i in 0..(MAX_SOURCES as u32 + 500) {
            let ip = IpAddr::from(std::net::Ipv4Addr::from(0x0a00_0000u32 + i));
            for r in 0..20 {
                log.rejected(ip, 403, &format!("cause {r}"));
            }
        }
        assert_eq!(log.sources.len(), MAX_SOURCES);
        assert!(
            log.sources
                .values()
                .all(|t| t.reasons.len() <= MAX_REASONS + 1)
        );
        let s = log.flush(t0 + INTERVAL);
        let other = s.last().unwrap();
        assert_eq!(other.source, None);
        assert_eq!(other.rejected, 500 * 20);
        assert_eq!(s.len(), MAX_SOURCES + 1);
    }
}
