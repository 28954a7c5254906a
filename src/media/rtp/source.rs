//! Which source address a call's RTP is taken from, sans-IO.
//!
//! An RTP port is reachable by anyone on the network, and RTP itself carries
//! nothing that proves who sent a packet (SRTP, beside this, does). So the
//! address is the only check plain RTP has, and it must be decided once and
//! then kept: a receiver that follows "whoever sent two packets last" hands
//! the call to an attacker who sprays the port range (issue 19).
//!
//! [`SourceLock`] implements two policies:
//! - [`RtpSourcePolicy::Strict`] (the default): only the exact address and
//!   port the SDP named (`c=` and `m=`) are accepted, for the whole call.
//! - [`RtpSourcePolicy::Latch`] (a trunk marked `behind_nat`): the phone's
//!   packets may come from another port (or its NAT's public address) than
//!   its SDP says. Until locked, packets from the SDP address are accepted;
//!   the first `latch_after` consecutive valid packets from one address whose
//!   IP is the SDP's or the signalling source's lock the call to that address,
//!   if they arrive within `window` of the first such packet. The lock is
//!   final: silence does not reopen it. A window that passes without a lock
//!   locks to the SDP address.
//!
//! A re-negotiation naming another address (a re-INVITE that passed the
//! dialog's source check) starts over with the new SDP address.
//!
//! Owns: the accept/reject decision on the source address only. Must not
//! touch: packet contents (the receiver validates and decides validity
//! before asking [`SourceLock::admit`]), sockets, clocks (`now` is passed in).

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

/// How a call's RTP source is chosen (from the trunk's configuration).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum RtpSourcePolicy {
    /// Only the SDP's address and port.
    #[default]
    Strict,
    /// Symmetric RTP behind NAT: latch once, within `window`, to the first
    /// packets from the SDP's IP or the signalling source's IP, then lock.
    Latch {
        /// How long after the first candidate packet a latch may happen.
        window: Duration,
        /// The IP the INVITE came from.
        signalling_ip: Option<IpAddr>,
    },
}

/// The state of the source decision of one call.
#[derive(Debug, Clone)]
pub struct SourceLock {
    policy: RtpSourcePolicy,
    sdp: SocketAddr,
    latch_after: u32,
    locked: Option<SocketAddr>,
    /// First candidate packet seen (the latch window's start).
    opened_at: Option<Instant>,
    /// Latch candidate and its consecutive valid packets.
    candidate: Option<(SocketAddr, u32)>,
    latches: u64,
}

impl SourceLock {
    /// A lock for a call whose SDP names `sdp`; `latch_after` ≥ 1 packets in a
    /// row latch under [`RtpSourcePolicy::Latch`].
    pub fn new(policy: RtpSourcePolicy, sdp: SocketAddr, latch_after: u32) -> Self {
        Self {
            policy,
            sdp,
            latch_after: latch_after.max(1),
            locked: None,
            opened_at: None,
            candidate: None,
            latches: 0,
        }
    }

    /// A re-negotiation named another address: decide afresh.
    pub fn set_sdp_address(&mut self, sdp: SocketAddr) {
        if sdp == self.sdp {
            return;
        }
        self.sdp = sdp;
        self.locked = None;
        self.opened_at = None;
        self.candidate = None;
    }

    /// The address media is locked to, once decided.
    pub fn locked(&self) -> Option<SocketAddr> {
        self.locked
    }

    /// How many times an address was locked (1 per SDP address at most).
    pub fn latches(&self) -> u64 {
        self.latches
    }

    /// Whether a valid packet from `from` at `now` is the call's media.
    pub fn admit(&mut self, now: Instant, from: SocketAddr) -> bool {
        if let Some(locked) = self.locked {
            return locked == from;
        }
        match self.policy {
            RtpSourcePolicy::Strict => {
                if from == self.sdp {
                    self.lock(from);
                    true
                } else {
                    false
                }
            }
            RtpSourcePolicy::Latch {
                window,
                signalling_ip,
            } => {
                let candidate_ip = from.ip() == self.sdp.ip() || Some(from.ip()) == signalling_ip;
                if !candidate_ip {
                    return false;
                }
                let opened = *self.opened_at.get_or_insert(now);
                if now.saturating_duration_since(opened) > window {
                    // Too late to latch to anything but the SDP address.
                    self.locked = Some(self.sdp);
                    self.latches += 1;
                    return from == self.sdp;
                }
                let run = match self.candidate {
                    Some((addr, n)) if addr == from => n.saturating_add(1),
                    _ => 1,
                };
                self.candidate = Some((from, run));
                if run >= self.latch_after {
                    self.lock(from);
                    return true;
                }
                from == self.sdp
            }
        }
    }

    fn lock(&mut self, addr: SocketAddr) {
        self.locked = Some(addr);
        self.candidate = None;
        self.latches += 1;
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn strict_takes_only_the_sdp_address_and_port() {
        let t0 = Instant::now();
        let mut lock = SourceLock::new(RtpSourcePolicy::Strict, addr("192.0.2.1:4000"), 2);
        assert!(
            !lock.admit(t0, addr("192.0.2.1:4002")),
            "same IP, other port"
        );
        assert!(!lock.admit(t0, addr("198.51.100.9:4000")));
        assert!(lock.admit(t0, addr("192.0.2.1:4000")));
        assert_eq!(lock.locked(), Some(addr("192.0.2.1:4000")));
        for _ in 0..10 {
            assert!(!lock.admit(t0 + Duration::from_secs(5), addr("198.51.100.9:4000")));
        }
    }

    #[test]
    fn latch_only_from_sdp_or_signalling_ip_within_the_window_then_locked() {
        let t0 = Instant::now();
        let policy = RtpSourcePolicy::Latch {
            window: Duration::from_secs(2),
            signalling_ip: Some("203.0.113.5".parse().unwrap()),
        };
        let mut lock = SourceLock::new(policy, addr("10.0.0.2:4000"), 2);
        // An attacker's spray never becomes a candidate.
        for _ in 0..5 {
            assert!(!lock.admit(t0, addr("198.51.100.9:5000")));
        }
        // The NAT's public address (the signalling IP) latches after 2.
        assert!(!lock.admit(t0, addr("203.0.113.5:31000")));
        assert!(lock.admit(t0, addr("203.0.113.5:31000")));
        assert_eq!(lock.locked(), Some(addr("203.0.113.5:31000")));
        // Locked for good: the same IP on another port after long silence is refused.
        let later = t0 + Duration::from_secs(30);
        assert!(!lock.admit(later, addr("203.0.113.5:31002")));
        assert!(!lock.admit(later, addr("203.0.113.5:31002")));
        assert!(lock.admit(later, addr("203.0.113.5:31000")));
        assert_eq!(lock.latches(), 1);
    }

    #[test]
    fn a_window_without_a_latch_locks_to_the_sdp_address() {
        let t0 = Instant::now();
        let policy = RtpSourcePolicy::Latch {
            window: Duration::from_millis(500),
            signalling_ip: None,
        };
        let mut lock = SourceLock::new(policy, addr("10.0.0.2:4000"), 3);
        assert!(!lock.admit(t0, addr("10.0.0.2:4444")));
        assert!(!lock.admit(t0 + Duration::from_secs(1), addr("10.0.0.2:4444")));
        assert_eq!(lock.locked(), Some(addr("10.0.0.2:4000")));
        assert!(!lock.admit(t0 + Duration::from_secs(1), addr("10.0.0.2:4444")));
        assert!(lock.admit(t0 + Duration::from_secs(1), addr("10.0.0.2:4000")));
    }

    #[test]
    fn a_new_sdp_address_starts_over() {
        let t0 = Instant::now();
        let mut lock = SourceLock::new(RtpSourcePolicy::Strict, addr("192.0.2.1:4000"), 2);
        assert!(lock.admit(t0, addr("192.0.2.1:4000")));
        lock.set_sdp_address(addr("192.0.2.1:4000"));
        assert_eq!(lock.locked(), Some(addr("192.0.2.1:4000")), "same address");
        lock.set_sdp_address(addr("192.0.2.7:6000"));
        assert!(!lock.admit(t0, addr("192.0.2.1:4000")));
        assert!(lock.admit(t0, addr("192.0.2.7:6000")));
    }
}
