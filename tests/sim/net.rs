//! The simulated network between the carrier and the bridge: a queue of
//! datagrams in flight, each with its own delivery time (str0m's `netem`
//! shape). Seeded impairment: loss, duplication and a random delay per copy,
//! so that messages reorder. A tamper hook drops chosen datagrams on purpose.
//!
//! Owns: delivery order and time, and the logs of what each side sent and
//! received. Never touches either peer's state.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use bytes::Bytes;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// The carrier's signalling address (TEST-NET-1).
pub(crate) const CARRIER: SocketAddr =
    SocketAddr::new(IpAddr::V4(Ipv4Addr::new(192, 0, 2, 10)), 5060);
/// The bridge's advertised signalling address (TEST-NET-2).
pub(crate) const BRIDGE_IP: &str = "198.51.100.1";

/// One end of the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Side {
    Carrier,
    Bridge,
}

impl Side {
    pub(crate) fn other(self) -> Side {
        match self {
            Side::Carrier => Side::Bridge,
            Side::Bridge => Side::Carrier,
        }
    }
}

/// What the network does to each datagram.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Impairment {
    /// Probability that a datagram is lost.
    pub(crate) loss: f64,
    /// Probability that a (not lost) datagram arrives twice.
    pub(crate) duplicate: f64,
    /// Each copy's delay, uniform in this inclusive range.
    pub(crate) delay: (Duration, Duration),
}

impl Impairment {
    /// No loss, no duplication, a fixed delay.
    pub(crate) fn clean(delay: Duration) -> Impairment {
        Impairment {
            loss: 0.0,
            duplicate: 0.0,
            delay: (delay, delay),
        }
    }
}

/// Decides, for a datagram `from` a side, whether to drop it on purpose.
pub(crate) type Tamper = Box<dyn FnMut(Side, &[u8]) -> bool>;

/// A logged datagram.
#[derive(Debug, Clone)]
pub(crate) struct Logged {
    pub(crate) at: Instant,
    pub(crate) from: Side,
    pub(crate) bytes: Bytes,
}

pub(crate) struct Net {
    /// (delivery time, send order) → (destination, bytes).
    queue: BTreeMap<(Instant, u64), (Side, Bytes)>,
    seq: u64,
    impairment: Impairment,
    rng: ChaCha8Rng,
    tamper: Option<Tamper>,
    /// Everything each side handed to the network, before impairment.
    pub(crate) sent: Vec<Logged>,
    /// Everything that arrived, with its arrival time.
    pub(crate) delivered: Vec<Logged>,
}

impl Net {
    pub(crate) fn new(impairment: Impairment, seed: u64) -> Net {
        assert!(
            impairment.delay.0 > Duration::ZERO,
            "a zero delay would let a reply arrive in the instant it was caused"
        );
        Net {
            queue: BTreeMap::new(),
            seq: 0,
            impairment,
            rng: ChaCha8Rng::seed_from_u64(seed),
            tamper: None,
            sent: Vec::new(),
            delivered: Vec::new(),
        }
    }

    pub(crate) fn set_tamper(&mut self, tamper: Tamper) {
        self.tamper = Some(tamper);
    }

    pub(crate) fn send(&mut self, now: Instant, from: Side, bytes: Bytes) {
        self.sent.push(Logged {
            at: now,
            from,
            bytes: bytes.clone(),
        });
        if let Some(tamper) = &mut self.tamper
            && tamper(from, &bytes)
        {
            return;
        }
        if self.rng.random_bool(self.impairment.loss) {
            return;
        }
        let copies = if self.rng.random_bool(self.impairment.duplicate) {
            2
        } else {
            1
        };
        let (lo, hi) = self.impairment.delay;
        for _ in 0..copies {
            let delay = if hi > lo {
                lo + Duration::from_micros(
                    self.rng
                        .random_range(0..=u64::try_from((hi - lo).as_micros()).unwrap()),
                )
            } else {
                lo
            };
            self.seq += 1;
            self.queue
                .insert((now + delay, self.seq), (from.other(), bytes.clone()));
        }
    }

    pub(crate) fn next_delivery(&self) -> Option<Instant> {
        self.queue.keys().next().map(|(at, _)| *at)
    }

    /// The next datagram due at or before `now`.
    pub(crate) fn pop_due(&mut self, now: Instant) -> Option<(Side, Bytes)> {
        let (&(at, seq), _) = self.queue.iter().next()?;
        if at > now {
            return None;
        }
        let (to, bytes) = self.queue.remove(&(at, seq))?;
        self.delivered.push(Logged {
            at,
            from: to.other(),
            bytes: bytes.clone(),
        });
        Some((to, bytes))
    }
}
