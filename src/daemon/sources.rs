//! Which of a call task's sources woke it.
//!
//! A call task waits on a timer and on a few sources that are quiet most of
//! the call: its mailbox, the agent's connection, the RTCP socket, a
//! transfer target's sockets, the RTP socket while nothing comes on it. `select!` polls every one of them at every
//! wake-up, and a call wakes 50 times a second for its timer alone: at 1,000
//! calls that is 250,000 polls a second of channels and sockets that have
//! nothing, each on memory no other call shares (a cache miss apiece).
//!
//! Here each source is polled with a waker of its own, which records that
//! the source woke before waking the task; a wake-up polls only the sources
//! so recorded (and the timer). A source that gave something is polled again
//! next time (it may have more): it is left out only once it has said
//! `Pending`, which is when it has our waker.

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Wake, Waker};

/// The timer's place among the bits of a call task's waits (it is polled
/// at every wake-up, so it has no waker here).
pub(crate) const TIMER_TURN: u32 = 0;
/// The sources a call task polls only when they woke it, as bits.
pub(crate) const MAILBOX: u8 = 1 << 1;
pub(crate) const AGENT: u8 = 1 << 2;
pub(crate) const RTCP: u8 = 1 << 3;
pub(crate) const TARGET_RTP: u8 = 1 << 4;
pub(crate) const TARGET_RTCP: u8 = 1 << 5;
/// The RTP socket while it waits for a datagram (`rtp_socket`).
pub(crate) const RTP: u8 = 1 << 6;
const ALL: u8 = MAILBOX | AGENT | RTCP | TARGET_RTP | TARGET_RTCP | RTP;

#[derive(Default)]
struct Shared {
    woke: AtomicU8,
    /// The task's waker, set when it changes (for a task on a runtime: once).
    task: Mutex<Option<Waker>>,
}

struct SourceWaker {
    bit: u8,
    shared: Arc<Shared>,
}

impl Wake for SourceWaker {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.shared.woke.fetch_or(self.bit, Ordering::AcqRel);
        let task = self
            .shared
            .task
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(task) = &*task {
            task.wake_by_ref();
        }
    }
}

/// A call task's sources' wakers (made once per call).
pub(crate) struct Sources {
    shared: Arc<Shared>,
    wakers: [Waker; 6],
    /// The task waker last given to `shared` (compared here, on the task's
    /// own memory, so that a wake-up does not write the shared one).
    registered: Option<Waker>,
}

impl Sources {
    /// Every source counts as woken, so that the first wake-up polls each
    /// once (and each gets its waker).
    pub(crate) fn new() -> Sources {
        let shared = Arc::new(Shared::default());
        shared.woke.store(ALL, Ordering::Relaxed);
        let wakers = [MAILBOX, AGENT, RTCP, TARGET_RTP, TARGET_RTCP, RTP].map(|bit| {
            Waker::from(Arc::new(SourceWaker {
                bit,
                shared: Arc::clone(&shared),
            }))
        });
        Sources {
            shared,
            wakers,
            registered: None,
        }
    }

    /// The task is about to look at its sources: it is woken by any that
    /// wakes from now on, and gets those that woke since last time (cleared).
    pub(crate) fn begin(&mut self, cx: &Context<'_>) -> u8 {
        if !self
            .registered
            .as_ref()
            .is_some_and(|w| w.will_wake(cx.waker()))
        {
            let waker = cx.waker().clone();
            *self
                .shared
                .task
                .lock()
                .unwrap_or_else(PoisonError::into_inner) = Some(waker.clone());
            self.registered = Some(waker);
        }
        // Read first: at most wake-ups nothing woke but the timer.
        if self.shared.woke.load(Ordering::Acquire) == 0 {
            return 0;
        }
        self.shared.woke.swap(0, Ordering::AcqRel)
    }

    /// `bits` are to be polled at the next look (they are new, or were not
    /// reached, or gave something and may have more).
    pub(crate) fn mark(&self, bits: u8) {
        if bits != 0 {
            self.shared.woke.fetch_or(bits, Ordering::AcqRel);
        }
    }

    /// The waker to poll the source `bit` with.
    pub(crate) fn waker(&self, bit: u8) -> &Waker {
        &self.wakers[(bit.trailing_zeros() as usize).saturating_sub(1) % self.wakers.len()]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    struct Count(AtomicUsize);

    impl Wake for Count {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::Relaxed);
        }
    }

    #[test]
    fn a_source_that_wakes_is_recorded_and_wakes_the_task() {
        let mut s = Sources::new();
        let task = Arc::new(Count(AtomicUsize::new(0)));
        let waker = Waker::from(Arc::clone(&task));
        let cx = Context::from_waker(&waker);
        assert_eq!(s.begin(&cx), ALL, "all are polled the first time");
        assert_eq!(s.begin(&cx), 0);
        s.waker(RTCP).wake_by_ref();
        assert_eq!(task.0.load(Ordering::Relaxed), 1);
        s.begin(&cx);
        s.waker(AGENT).wake_by_ref();
        s.waker(MAILBOX).wake_by_ref();
        assert_eq!(s.begin(&cx), AGENT | MAILBOX);
        s.mark(TARGET_RTP);
        assert_eq!(s.begin(&cx), TARGET_RTP);
        assert_eq!(s.begin(&cx), 0);
        // The task's waker stays registered: every wake reaches it.
        s.waker(RTCP).wake_by_ref();
        s.waker(RTCP).wake_by_ref();
        assert_eq!(task.0.load(Ordering::Relaxed), 5);
    }

    #[test]
    fn a_new_task_waker_replaces_the_old_one() {
        let mut s = Sources::new();
        let (a, b) = (
            Arc::new(Count(AtomicUsize::new(0))),
            Arc::new(Count(AtomicUsize::new(0))),
        );
        let (wa, wb) = (Waker::from(Arc::clone(&a)), Waker::from(Arc::clone(&b)));
        s.begin(&Context::from_waker(&wa));
        s.begin(&Context::from_waker(&wb));
        s.waker(MAILBOX).wake_by_ref();
        assert_eq!(a.0.load(Ordering::Relaxed), 0);
        assert_eq!(b.0.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn each_source_has_its_own_waker() {
        let mut s = Sources::new();
        for bit in [MAILBOX, AGENT, RTCP, TARGET_RTP, TARGET_RTCP, RTP] {
            let waker = Waker::noop();
            let cx = Context::from_waker(waker);
            s.begin(&cx);
            s.waker(bit).wake_by_ref();
            assert_eq!(s.begin(&cx), bit);
        }
    }
}
