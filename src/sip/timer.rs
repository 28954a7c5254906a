//! RFC 3261 §17 transaction timers: the T1/T2/T4 configuration and one table
//! holding every timer deadline of a transaction.
//!
//! Owns: [`TimerConfig`] (validated T1/T2/T4), the [`Timer`] names A–L and the
//! [`TimerTable`] of deadlines. Must not touch: messages, transports or the
//! clock. Deadlines are `Instant`s the caller computed from a `now` it was
//! given; nothing here reads the time.
//!
//! Written by hand rather than taken from a crate because it is a fixed array
//! of ten-odd `Option<Instant>` (the shape of quinn-proto's `TimerTable`) and a
//! timer-wheel crate would add allocation and a clock of its own.

use std::time::{Duration, Instant};

/// Errors of this module.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TimerError {
    /// The T1/T2/T4 values break a rule of RFC 3261 §17 or our sanity bounds.
    #[error("invalid SIP timer configuration: {0}")]
    InvalidConfig(&'static str),
}

/// Upper bound for any of T1/T2/T4, so `now + 64·T1` can never overflow.
const MAX_BASE_TIMER: Duration = Duration::from_secs(600);

/// The base timer values of RFC 3261 §17 (Table 4).
///
/// Constructed through [`TimerConfig::new`] (validated) or [`Default`], so a
/// transaction never sees a zero T1 or a T2 below T1.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TimerConfig {
    t1: Duration,
    t2: Duration,
    t4: Duration,
}

impl Default for TimerConfig {
    /// T1 = 500 ms (RTT estimate), T2 = 4 s, T4 = 5 s, as RFC 3261 recommends.
    fn default() -> Self {
        Self {
            t1: Duration::from_millis(500),
            t2: Duration::from_secs(4),
            t4: Duration::from_secs(5),
        }
    }
}

impl TimerConfig {
    /// Validates and builds a configuration.
    ///
    /// Rules: T1, T2 and T4 are non-zero, `T1 <= T2`, and each is at most
    /// 600 s (beyond that a transaction would outlive any sensible call set-up).
    pub fn new(t1: Duration, t2: Duration, t4: Duration) -> Result<Self, TimerError> {
        if t1.is_zero() || t2.is_zero() || t4.is_zero() {
            return Err(TimerError::InvalidConfig("T1, T2 and T4 must be non-zero"));
        }
        if t1 > t2 {
            return Err(TimerError::InvalidConfig("T1 must not exceed T2"));
        }
        if t1 > MAX_BASE_TIMER || t2 > MAX_BASE_TIMER || t4 > MAX_BASE_TIMER {
            return Err(TimerError::InvalidConfig(
                "T1, T2 and T4 must be at most 600 s",
            ));
        }
        Ok(Self { t1, t2, t4 })
    }

    /// T1: round-trip time estimate, the first retransmission interval.
    pub fn t1(&self) -> Duration {
        self.t1
    }

    /// T2: the cap on non-INVITE request and INVITE response retransmission intervals.
    pub fn t2(&self) -> Duration {
        self.t2
    }

    /// T4: how long a message may stay in the network.
    pub fn t4(&self) -> Duration {
        self.t4
    }

    /// 64·T1: the transaction timeout (Timers B, F, H, J and RFC 6026 Timer L).
    pub fn timeout_64_t1(&self) -> Duration {
        self.t1.saturating_mul(64)
    }
}

/// Timer D for unreliable transports: "at least 32 s" (RFC 3261 Table 4).
/// Fixed, not derived from T1: it covers the *server's* Timer H, whose T1 we
/// do not know.
pub const TIMER_D_UNRELIABLE: Duration = Duration::from_secs(32);

/// The named timers of RFC 3261 §17 plus Timer L of RFC 6026.
///
/// | timer | transaction | meaning |
/// |---|---|---|
/// | A | INVITE client | request retransmission (unreliable only) |
/// | B | INVITE client | transaction timeout, 64·T1 |
/// | D | INVITE client | wait for response retransmissions in Completed |
/// | E | non-INVITE client | request retransmission (unreliable only) |
/// | F | non-INVITE client | transaction timeout, 64·T1 |
/// | G | INVITE server | final response retransmission |
/// | H | INVITE server | wait for the ACK, 64·T1 |
/// | I | INVITE server | wait for ACK retransmissions in Confirmed |
/// | J | non-INVITE server | wait for request retransmissions in Completed |
/// | K | non-INVITE client | wait for response retransmissions in Completed |
/// | L | INVITE server | RFC 6026 Accepted state lifetime, 64·T1 |
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Timer {
    /// INVITE request retransmission.
    A,
    /// INVITE transaction timeout.
    B,
    /// INVITE client Completed wait.
    D,
    /// Non-INVITE request retransmission.
    E,
    /// Non-INVITE transaction timeout.
    F,
    /// INVITE final response retransmission.
    G,
    /// ACK wait.
    H,
    /// ACK retransmission absorption in Confirmed.
    I,
    /// Non-INVITE server Completed wait.
    J,
    /// Non-INVITE client Completed wait.
    K,
    /// RFC 6026 Accepted state lifetime.
    L,
}

impl Timer {
    /// Number of timers, the size of a [`TimerTable`].
    pub const COUNT: usize = 11;

    /// Every timer, in declaration order (the tie-break order when two
    /// timers share a deadline).
    pub const VALUES: [Timer; Timer::COUNT] = [
        Timer::A,
        Timer::B,
        Timer::D,
        Timer::E,
        Timer::F,
        Timer::G,
        Timer::H,
        Timer::I,
        Timer::J,
        Timer::K,
        Timer::L,
    ];

    fn index(self) -> usize {
        self as usize
    }
}

/// One optional deadline per [`Timer`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TimerTable {
    data: [Option<Instant>; Timer::COUNT],
}

impl TimerTable {
    /// Arms `timer` to fire at `at`, replacing any earlier deadline.
    pub fn set(&mut self, timer: Timer, at: Instant) {
        self.data[timer.index()] = Some(at);
    }

    /// Disarms `timer`.
    pub fn stop(&mut self, timer: Timer) {
        self.data[timer.index()] = None;
    }

    /// Disarms every timer.
    pub fn stop_all(&mut self) {
        self.data = [None; Timer::COUNT];
    }

    /// The deadline of `timer`, if armed.
    pub fn get(&self, timer: Timer) -> Option<Instant> {
        self.data[timer.index()]
    }

    /// Whether `timer` is armed.
    pub fn is_set(&self, timer: Timer) -> bool {
        self.data[timer.index()].is_some()
    }

    /// The earliest armed deadline.
    pub fn next_timeout(&self) -> Option<Instant> {
        self.data.iter().flatten().min().copied()
    }

    /// The timers due at `now` (deadline `<= now`), earliest deadline first,
    /// ties in [`Timer::VALUES`] order. Does not disarm them.
    pub fn expired(&self, now: Instant) -> impl Iterator<Item = Timer> + '_ {
        let mut due: [Option<(Instant, Timer)>; Timer::COUNT] = [None; Timer::COUNT];
        for (slot, timer) in due.iter_mut().zip(Timer::VALUES) {
            *slot = self
                .get(timer)
                .filter(|at| *at <= now)
                .map(|at| (at, timer));
        }
        due.sort_unstable();
        due.into_iter().flatten().map(|(_, timer)| timer)
    }

    /// Disarms and returns the earliest timer due at `now`, if any.
    ///
    /// A transaction's `handle_timeout` loops on this, so a timer re-armed by
    /// its own handler (to a later deadline) is not fired twice in one call,
    /// and timers fire in deadline order even when `now` is late.
    pub fn pop_expired(&mut self, now: Instant) -> Option<Timer> {
        let timer = self.expired(now).next()?;
        self.stop(timer);
        Some(timer)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn default_config_is_rfc_values() {
        let cfg = TimerConfig::default();
        assert_eq!(cfg.t1(), 500 * MS);
        assert_eq!(cfg.t2(), 4000 * MS);
        assert_eq!(cfg.t4(), 5000 * MS);
        assert_eq!(cfg.timeout_64_t1(), Duration::from_secs(32));
    }

    #[test]
    fn config_validation() {
        assert!(TimerConfig::new(100 * MS, 100 * MS, MS).is_ok());
        assert_eq!(
            TimerConfig::new(5000 * MS, 4000 * MS, MS),
            Err(TimerError::InvalidConfig("T1 must not exceed T2"))
        );
        assert!(TimerConfig::new(Duration::ZERO, MS, MS).is_err());
        assert!(TimerConfig::new(MS, MS, Duration::ZERO).is_err());
        assert!(TimerConfig::new(MS, Duration::from_secs(601), MS).is_err());
        assert!(TimerConfig::new(MS, MS, Duration::from_secs(601)).is_err());
    }

    #[test]
    fn table_set_stop_get_next() {
        let t0 = Instant::now();
        let mut table = TimerTable::default();
        assert_eq!(table.next_timeout(), None);
        table.set(Timer::H, t0 + 32_000 * MS);
        table.set(Timer::G, t0 + 500 * MS);
        assert_eq!(table.get(Timer::G), Some(t0 + 500 * MS));
        assert!(table.is_set(Timer::H));
        assert!(!table.is_set(Timer::A));
        assert_eq!(table.next_timeout(), Some(t0 + 500 * MS));
        table.set(Timer::G, t0 + 1500 * MS);
        assert_eq!(table.next_timeout(), Some(t0 + 1500 * MS));
        table.stop(Timer::G);
        assert_eq!(table.next_timeout(), Some(t0 + 32_000 * MS));
        table.stop_all();
        assert_eq!(table.next_timeout(), None);
    }

    #[test]
    fn expired_is_ordered_by_deadline_then_name() {
        let t0 = Instant::now();
        let mut table = TimerTable::default();
        table.set(Timer::L, t0 + 10 * MS);
        table.set(Timer::H, t0 + 10 * MS);
        table.set(Timer::A, t0 + 20 * MS);
        table.set(Timer::K, t0 + 5 * MS);
        table.set(Timer::B, t0 + 30 * MS);
        let due: Vec<Timer> = table.expired(t0 + 20 * MS).collect();
        assert_eq!(due, vec![Timer::K, Timer::H, Timer::L, Timer::A]);
        assert_eq!(table.expired(t0 + 4 * MS).count(), 0);
        // expired() does not disarm; pop_expired() does, one at a time.
        assert_eq!(table.pop_expired(t0 + 20 * MS), Some(Timer::K));
        assert_eq!(table.pop_expired(t0 + 20 * MS), Some(Timer::H));
        assert!(!table.is_set(Timer::H));
        assert_eq!(table.pop_expired(t0 + 20 * MS), Some(Timer::L));
        assert_eq!(table.pop_expired(t0 + 20 * MS), Some(Timer::A));
        assert_eq!(table.pop_expired(t0 + 20 * MS), None);
        assert_eq!(table.next_timeout(), Some(t0 + 30 * MS));
    }
}
