//! Finished calls, compacted: what must outlive a call's end (RFC 3261's
//! Timers J, K, I and L, and RFC 6026's absorption of retransmissions) kept as
//! a few keys and the exact bytes to resend, not as the whole [`Call`].
//!
//! Owns: [`Lingering`] (one ended call's residue, built by
//! [`Call::compact`]) and [`LingerTable`] (all of them, bounded, oldest
//! first).
//!
//! Must not touch: sockets, the clock (`now` is passed in), the call's media
//! or pipeline state: by the time a call is compacted those are released.
//!
//! Why: a call that ends with the caller's BYE keeps that BYE's server
//! transaction for Timer J (64·T1 = 32 s on UDP) to answer retransmissions
//! of the BYE with the same 200. Holding the whole call for that long made a
//! daemon at 1,000 calls/s of 1 s calls hold ~32,000 finished calls — each
//! with its INVITE, SDP, dialog, CDR and the media session's buffers —
//! several KB apiece (issue 17). A [`Lingering`] entry is the Call-ID, each
//! pending transaction's branch and method, where its responses go, and the
//! response bytes themselves (shared, not copied: `Bytes`).
//!
//! A call is compacted only once none of its transactions sends anything on
//! its own (see [`Settled`]): every retransmission it still owes is a reply
//! to one from the peer. Anything that is not such a retransmission is
//! answered as for a call that no longer exists: 481 for requests (RFC 3261
//! §12.2.2), silence for ACKs and responses.
//!
//! [`Call`]: super::Call
//! [`Call::compact`]: super::Call::compact
//! [`Settled`]: crate::sip::transaction::Settled

use std::collections::{HashMap, VecDeque};
use std::time::Instant;

use bytes::Bytes;

use super::{Peer, Transmit, branch_of, response_dest};
use crate::sip::message::{Message, Method, Response};

/// One transaction of an ended call that still answers retransmissions.
#[derive(Debug, Clone)]
pub(super) struct Pending {
    /// The request's Via branch (RFC 3261 §17.2.3 matching, with the method).
    pub(super) branch: String,
    pub(super) method: Method,
    /// Where its responses go (the request's own Via and source).
    pub(super) dest: Peer,
    /// Resent, unchanged, to each retransmission; `None`: absorbed silently.
    pub(super) resend: Option<Bytes>,
}

/// An ended call's residue: see the module docs.
#[derive(Debug, Clone)]
pub struct Lingering {
    call_id: String,
    until: Instant,
    pending: Vec<Pending>,
}

/// What to do with a message for a lingering call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LingerReply {
    /// Send these bytes (a stored response again, or a 481).
    Send(Transmit),
    /// Absorbed: an ACK, a response to our BYE, a retransmission answered by
    /// nothing.
    Absorbed,
}

impl Lingering {
    pub(super) fn new(call_id: String, until: Instant, pending: Vec<Pending>) -> Self {
        Lingering {
            call_id,
            until,
            pending,
        }
    }

    /// The Call-ID it answers for.
    pub fn call_id(&self) -> &str {
        &self.call_id
    }

    /// When every transaction it stands for would have terminated.
    pub fn until(&self) -> Instant {
        self.until
    }

    /// Bytes held on the heap (Call-ID, branches, responses), for the bound
    /// in [`LingerTable`] and the tests that keep it small.
    pub fn heap_bytes(&self) -> usize {
        self.call_id.len()
            + self
                .pending
                .iter()
                .map(|p| {
                    std::mem::size_of::<Pending>()
                        + p.branch.len()
                        + p.resend.as_ref().map_or(0, Bytes::len)
                })
                .sum::<usize>()
    }

    /// A message for this Call-ID that came from `source`.
    pub fn on_message(&self, msg: &Message, source: Peer) -> LingerReply {
        let req = match msg {
            Message::Response(_) => return LingerReply::Absorbed,
            Message::Request(req) => req,
        };
        if req.method == Method::Ack {
            return LingerReply::Absorbed;
        }
        let branch = branch_of(req);
        if let Some(p) = self
            .pending
            .iter()
            .find(|p| p.method == req.method && p.branch == branch)
        {
            return match &p.resend {
                Some(bytes) => LingerReply::Send(Transmit {
                    dest: p.dest,
                    bytes: bytes.clone(),
                }),
                None => LingerReply::Absorbed,
            };
        }
        LingerReply::Send(Transmit {
            dest: response_dest(req, source),
            bytes: Response::for_request(req, 481).encode(),
        })
    }
}

/// Every lingering call of the daemon, looked up by Call-ID, forgotten when
/// its time is up, and bounded: past `max` entries the oldest is forgotten
/// early (its peer's late retransmissions then get a 481 instead of the
/// stored response, the same as a call whose Timer J ran out).
#[derive(Debug)]
pub struct LingerTable {
    max: usize,
    calls: HashMap<String, Lingering>,
    /// Call-IDs in insertion order with their `until`, for expiry.
    order: VecDeque<(Instant, String)>,
    heap: usize,
}

impl LingerTable {
    /// An empty table holding at most `max` calls.
    pub fn new(max: usize) -> Self {
        LingerTable {
            max: max.max(1),
            calls: HashMap::new(),
            order: VecDeque::new(),
            heap: 0,
        }
    }

    /// Calls held.
    pub fn len(&self) -> usize {
        self.calls.len()
    }

    /// Whether it holds none.
    pub fn is_empty(&self) -> bool {
        self.calls.is_empty()
    }

    /// Heap bytes of the entries' contents (see [`Lingering::heap_bytes`]).
    pub fn heap_bytes(&self) -> usize {
        self.heap
    }

    /// Keeps `call` until its `until`, forgetting expired entries first.
    pub fn insert(&mut self, now: Instant, call: Lingering) {
        self.expire(now);
        if call.until <= now {
            return;
        }
        while self.calls.len() >= self.max {
            if !self.pop_oldest() {
                break;
            }
        }
        self.order.push_back((call.until, call.call_id.clone()));
        self.heap += call.heap_bytes();
        if let Some(old) = self.calls.insert(call.call_id.clone(), call) {
            self.heap = self.heap.saturating_sub(old.heap_bytes());
        }
    }

    /// Whether `call_id` lingers (and has not expired by `now`).
    pub fn contains(&self, now: Instant, call_id: &str) -> bool {
        self.calls.get(call_id).is_some_and(|c| c.until > now)
    }

    /// Answers `msg` for a lingering call; `None` if `call_id` does not
    /// linger (any more).
    pub fn on_message(
        &mut self,
        now: Instant,
        call_id: &str,
        msg: &Message,
        source: Peer,
    ) -> Option<LingerReply> {
        self.expire(now);
        self.calls
            .get(call_id)
            .map(|call| call.on_message(msg, source))
    }

    /// Forgets every entry whose time is up.
    pub fn expire(&mut self, now: Instant) {
        // `until` is not monotonic in insertion order (UDP and TCP calls,
        // Timer L vs J), so walk while the front is due; a later-due entry
        // in front only delays the next ones' removal, and `contains` checks
        // `until` itself.
        while self.order.front().is_some_and(|(until, _)| *until <= now) {
            self.pop_oldest();
        }
    }

    fn pop_oldest(&mut self) -> bool {
        let Some((until, id)) = self.order.pop_front() else {
            return false;
        };
        // A Call-ID inserted twice has two order entries: remove the map's
        // only when this is its current one.
        if self.calls.get(&id).is_some_and(|c| c.until == until)
            && let Some(old) = self.calls.remove(&id)
        {
            self.heap = self.heap.saturating_sub(old.heap_bytes());
        }
        true
    }
}
