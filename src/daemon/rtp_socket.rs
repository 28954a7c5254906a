//! A call's RTP socket, read at the call's own ticks rather than on
//! readiness.
//!
//! A call's media core needs the caller's packets only when its jitter
//! buffer plays a slot (every 20 ms); reading each packet the moment it
//! arrives bought nothing but cost, per packet: an epoll event, a task
//! wake-up, the read, and a second read that fails with `EAGAIN` (tokio
//! clears a socket's readiness only on `EAGAIN`). So the socket is not in
//! any epoll set at all. The call task reads it just before the jitter
//! buffer's slot (and at least every [`READ_EVERY`] when there is no slot
//! yet) with one `recvmmsg`, which takes everything queued and reports
//! `EAGAIN` inside the kernel, not as a second system call. Not being in an
//! epoll set also spares every sent packet the write-space wake-up the
//! kernel gives a socket that has waiters.
//!
//! The arrival time the core is given is the kernel's (`SO_TIMESTAMPNS`),
//! not the time of the read, so the jitter figures (RTCP, the quality
//! metrics) and the jitter buffer's clock are what they were when every
//! packet was read as it came.
//!
//! A read takes at most `BATCH * MAX_ROUNDS` datagrams; a flood beyond that
//! fills the socket's receive buffer and the kernel drops the rest. Those
//! drops are counted (`SO_RXQ_OVFL`: the socket's drop count comes with each
//! datagram queued after a drop) into
//! `sipbridge_rtp_packets_dropped_unread_total`.
//!
//! A call whose caller sends nothing (before the first packet, on hold,
//! between talkspurts with silence suppression) would pay an empty read
//! every 20 ms for it. So after [`IDLE_READS`] empty reads in a row the
//! socket waits the old way: registered with the runtime for readability
//! only, it wakes the task when a datagram comes, and is taken out of the
//! epoll set again as soon as one does. A call starts that way.
//!
//! Written here rather than through tokio: tokio's `UdpSocket` has no
//! `recvmmsg` and no ancillary data, and registering the socket at all
//! brings back the per-packet epoll work.

use nix::sys::socket::{
    ControlMessageOwned, MsgFlags, MultiHeaders, SockaddrStorage, recvmmsg, setsockopt, sockopt,
};
use std::cell::{Cell, RefCell};
use std::io::IoSliceMut;
use std::net::{SocketAddr, SocketAddrV4, SocketAddrV6, UdpSocket};
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant, SystemTime};

/// Longest a call with sockets goes without reading its RTP socket (before
/// the jitter buffer has a clock, and between slots if it stops).
pub(crate) const READ_EVERY: Duration = Duration::from_millis(20);

/// Empty reads in a row after which the socket waits for a datagram rather
/// than being read at every tick (500 ms of silence at one read per 20 ms).
const IDLE_READS: u32 = 25;

/// Datagrams taken by one `recvmmsg`.
const BATCH: usize = 8;

/// `recvmmsg` calls per read at most: what is queued beyond
/// `BATCH * MAX_ROUNDS` datagrams (640 ms of 20 ms audio) waits for the next
/// read, and a flood is bounded by the socket's receive buffer, which the
/// kernel drops from, not by anything held here.
const MAX_ROUNDS: usize = 4;

/// Largest datagram read whole; a longer one is read truncated, as before.
const DATAGRAM: usize = 2048;

/// The receive headers and buffers one media thread shares between its
/// calls (a read never yields, so one set per thread is enough).
///
/// nix 0.26's `recvmmsg` does not reset a header's address and control
/// lengths, which the kernel shrinks to what it wrote. So a set of headers
/// serves only sockets whose datagrams all have the same address length
/// (one set per address family) and the same ancillary data: the drop count
/// comes only once a socket has dropped something, so sockets that have
/// are read with sets of their own. A set that saw a datagram without its
/// timestamp is rebuilt.
struct Scratch {
    /// By address family (v4, v6) and whether the socket has dropped.
    headers: [[MultiHeaders<SockaddrStorage>; 2]; 2],
    bufs: Box<[[u8; DATAGRAM]; BATCH]>,
}

fn headers() -> MultiHeaders<SockaddrStorage> {
    MultiHeaders::preallocate(BATCH, Some(nix::cmsg_space!(nix::sys::time::TimeSpec, u32)))
}

thread_local! {
    static SCRATCH: RefCell<Option<Scratch>> = const { RefCell::new(None) };
}

/// One datagram of a batch, as `recvmmsg` reported it.
#[derive(Clone, Copy)]
struct Got {
    len: usize,
    from: Option<SocketAddr>,
    /// The kernel's arrival time (wall clock).
    at: Option<SystemTime>,
    /// The socket's drop count when the datagram was queued.
    drops: Option<u32>,
}

/// How the socket is read.
#[derive(Debug)]
enum Mode {
    /// At the call's ticks; in no epoll set.
    Read(UdpSocket),
    /// Registered with the runtime: the first datagram wakes the task.
    Wait(tokio::net::UdpSocket),
    /// Only while changing from one to the other.
    Gone,
}

/// A call's RTP socket (see the module docs).
#[derive(Debug)]
pub(crate) struct RtpSocket {
    mode: Mode,
    v6: bool,
    /// Empty reads in a row.
    empty: u32,
    /// The kernel's drop count last seen (it only grows).
    drops: Cell<u32>,
    /// The socket has dropped: its datagrams carry the drop count.
    dropping: Cell<bool>,
}

impl RtpSocket {
    /// Takes a bound, non-blocking socket and asks the kernel to timestamp
    /// what it receives.
    pub(crate) fn new(sock: UdpSocket) -> std::io::Result<RtpSocket> {
        setsockopt(sock.as_raw_fd(), sockopt::ReceiveTimestampns, &true)?;
        setsockopt(sock.as_raw_fd(), sockopt::RxqOvfl, &1)?;
        let v6 = sock.local_addr()?.is_ipv6();
        Ok(RtpSocket {
            mode: Mode::Read(sock),
            v6,
            empty: 0,
            drops: Cell::new(0),
            dropping: Cell::new(false),
        })
    }

    /// Sends one datagram without waiting: a full send buffer drops it, like
    /// a packet lost on the way (counted), rather than stalling the call.
    pub(crate) fn send_to(&self, bytes: &[u8], to: SocketAddr) {
        let sent = match &self.mode {
            Mode::Read(s) => s.send_to(bytes, to),
            // Past tokio's write readiness, which it learns only at its
            // next turn: a send right after registering would be refused.
            Mode::Wait(s) => socket2::SockRef::from(s).send_to(bytes, &socket2::SockAddr::from(to)),
            Mode::Gone => return,
        };
        if let Err(e) = sent
            && e.kind() == std::io::ErrorKind::WouldBlock
        {
            crate::metrics::rtp_send_dropped();
        }
    }

    /// Reads what is queued (at most `BATCH * MAX_ROUNDS` datagrams) and
    /// gives each to `on` with its arrival time, read at `now` / `wall`
    /// (the same moment on the two clocks). An error the socket reports (an
    /// ICMP port-unreachable) is consumed and ignored. Returns how many
    /// datagrams were read.
    pub(crate) fn read(
        &mut self,
        now: Instant,
        wall: SystemTime,
        mut on: impl FnMut(Instant, SocketAddr, &[u8]),
    ) -> usize {
        SCRATCH.with(|cell| {
            let mut cell = cell.borrow_mut();
            let scratch = cell.get_or_insert_with(|| Scratch {
                headers: [[headers(), headers()], [headers(), headers()]],
                bufs: Box::new([[0; DATAGRAM]; BATCH]),
            });
            let mut total = 0;
            for _ in 0..MAX_ROUNDS {
                let mut got = [Got {
                    len: 0,
                    from: None,
                    at: None,
                    drops: None,
                }; BATCH];
                let n = self.receive(scratch, &mut got);
                self.count_drops(got[..n].iter().filter_map(|g| g.drops).max());
                for (i, g) in got[..n].iter().enumerate() {
                    let Some(from) = g.from else { continue };
                    // The kernel's time, as an instant: how long ago on the
                    // wall clock, taken from `now` (a wall clock stepped
                    // backwards gives the read's time).
                    let age =
                        g.at.and_then(|at| wall.duration_since(at).ok())
                            .unwrap_or_default();
                    let at = now.checked_sub(age).unwrap_or(now);
                    total += 1;
                    on(at, from, &scratch.bufs[i][..g.len]);
                }
                if n < BATCH {
                    break;
                }
            }
            self.empty = if total == 0 { self.empty + 1 } else { 0 };
            total
        })
    }

    /// The socket, while it is read at the ticks.
    fn sock(&self) -> Option<&UdpSocket> {
        match &self.mode {
            Mode::Read(s) => Some(s),
            Mode::Wait(_) | Mode::Gone => None,
        }
    }

    /// It is read at the call's ticks (not waiting for a datagram).
    pub(crate) fn is_read(&self) -> bool {
        matches!(self.mode, Mode::Read(_))
    }

    /// Nothing came in the last [`IDLE_READS`] reads.
    pub(crate) fn is_idle(&self) -> bool {
        self.empty >= IDLE_READS
    }

    /// Waits for a datagram instead of being read at every tick (needs the
    /// runtime). A socket the runtime refuses (`from_std` consumes what it
    /// is given, so it gets a duplicate) is still read at every tick.
    pub(crate) fn wait(&mut self) {
        self.empty = 0;
        let Mode::Read(sock) = &self.mode else {
            return;
        };
        match sock.try_clone().and_then(tokio::net::UdpSocket::from_std) {
            // The duplicate refers to the same socket: the original goes.
            Ok(s) => self.mode = Mode::Wait(s),
            Err(e) => tracing::debug!(error = %e, "RTP socket read at every tick"),
        }
    }

    /// While waiting: ready once a datagram came (the socket is then taken
    /// out of the runtime and read at the ticks again). Never ready while
    /// read at the ticks.
    pub(crate) fn poll_arrival(&mut self, cx: &mut std::task::Context<'_>) -> std::task::Poll<()> {
        let Mode::Wait(s) = &self.mode else {
            return std::task::Poll::Pending;
        };
        if s.poll_recv_ready(cx).is_pending() {
            return std::task::Poll::Pending;
        }
        if let Mode::Wait(s) = std::mem::replace(&mut self.mode, Mode::Gone) {
            self.mode = match s.into_std() {
                Ok(s) => Mode::Read(s),
                Err(e) => {
                    tracing::warn!(error = %e, "RTP socket could not be deregistered; no media");
                    Mode::Gone
                }
            };
        }
        std::task::Poll::Ready(())
    }

    /// One `recvmmsg` into `scratch`; what each datagram was, in `got`.
    fn receive(&self, scratch: &mut Scratch, got: &mut [Got; BATCH]) -> usize {
        let Some(fd) = self.sock().map(AsRawFd::as_raw_fd) else {
            return 0;
        };
        let Scratch { headers, bufs } = scratch;
        let headers = &mut headers[usize::from(self.v6)][usize::from(self.dropping.get())];
        let mut rebuild = false;
        let mut cut = false;
        let n = {
            let iovs = bufs.each_mut().map(|b| [IoSliceMut::new(b)]);
            let results = loop {
                match recvmmsg(fd, headers, &iovs, MsgFlags::MSG_DONTWAIT, None) {
                    Err(nix::errno::Errno::EINTR) => continue,
                    Err(_) => return 0,
                    Ok(r) => break r,
                }
            };
            let mut n = 0;
            for (slot, m) in got.iter_mut().zip(results) {
                let at = m.cmsgs().find_map(|c| match c {
                    ControlMessageOwned::ScmTimestampns(t) => Some(
                        SystemTime::UNIX_EPOCH
                            + Duration::new(
                                u64::try_from(t.tv_sec()).unwrap_or(0),
                                u32::try_from(t.tv_nsec()).unwrap_or(0),
                            ),
                    ),
                    _ => None,
                });
                let drops = m.cmsgs().find_map(|c| match c {
                    ControlMessageOwned::RxqOvfl(n) => Some(n),
                    _ => None,
                });
                rebuild |= at.is_none();
                cut |= m.flags.contains(MsgFlags::MSG_CTRUNC);
                *slot = Got {
                    len: m.bytes.min(DATAGRAM),
                    from: m.address.and_then(|a| socket_addr(&a)),
                    at,
                    drops,
                };
                n += 1;
            }
            n
        };
        if rebuild {
            *headers = self::headers();
        }
        if cut {
            // The drop count did not fit where datagrams carried none: this
            // socket has dropped, and is read with the sets for that from
            // now on (the count is the socket's total: the next datagram
            // brings it).
            self.dropping.set(true);
        }
        n
    }
}

impl RtpSocket {
    /// Datagrams the kernel dropped on this socket so far, as last reported.
    #[cfg(test)]
    fn dropped(&self) -> u32 {
        self.drops.get()
    }

    /// The kernel reported the socket's drop count `seen`: what is new is
    /// counted.
    fn count_drops(&self, seen: Option<u32>) {
        let Some(seen) = seen else { return };
        let new = seen.wrapping_sub(self.drops.get());
        // The count only grows; a smaller one is an older datagram's.
        if new > 0 && new < u32::MAX / 2 {
            self.drops.set(seen);
            crate::metrics::rtp_dropped_unread(u64::from(new));
        }
    }
}

/// A kernel address as a std one (only the two IP families reach a UDP
/// socket).
fn socket_addr(a: &SockaddrStorage) -> Option<SocketAddr> {
    if let Some(v4) = a.as_sockaddr_in() {
        return Some(SocketAddr::V4(SocketAddrV4::from(*v4)));
    }
    let v6 = a.as_sockaddr_in6()?;
    Some(SocketAddr::V6(SocketAddrV6::from(*v6)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::task::Poll;

    fn pair(ip: &str) -> (RtpSocket, UdpSocket) {
        let rx = UdpSocket::bind((ip, 0)).expect("bind");
        rx.set_nonblocking(true).expect("nonblocking");
        let tx = UdpSocket::bind((ip, 0)).expect("bind");
        (RtpSocket::new(rx).expect("rtp socket"), tx)
    }

    fn read_all(
        s: &mut RtpSocket,
        now: Instant,
        wall: SystemTime,
    ) -> Vec<(Instant, SocketAddr, Vec<u8>)> {
        let mut out = Vec::new();
        s.read(now, wall, |at, from, data| {
            out.push((at, from, data.to_vec()))
        });
        out
    }

    #[test]
    fn reads_everything_queued_in_order_with_the_kernels_arrival_time() {
        let (mut rx, tx) = pair("127.0.0.1");
        let to = rx.sock().expect("socket").local_addr().expect("addr");
        for i in 0..11u8 {
            tx.send_to(&[i; 172], to).expect("send");
        }
        // The datagrams are queued a while before the read.
        std::thread::sleep(Duration::from_millis(30));
        let (now, wall) = (Instant::now(), SystemTime::now());
        let got = read_all(&mut rx, now, wall);
        assert_eq!(got.len(), 11, "two batches: 8 and 3");
        for (i, (at, from, data)) in got.iter().enumerate() {
            assert_eq!(*from, tx.local_addr().expect("addr"));
            assert_eq!(data, &vec![i as u8; 172]);
            let age = now - *at;
            assert!(
                age >= Duration::from_millis(25) && age < Duration::from_secs(5),
                "arrival {age:?} before the read: the kernel's time, not the read's"
            );
        }
        assert!(read_all(&mut rx, Instant::now(), SystemTime::now()).is_empty());
    }

    #[test]
    fn a_flood_is_read_a_bounded_batch_at_a_time() {
        let (mut rx, tx) = pair("127.0.0.1");
        let to = rx.sock().expect("socket").local_addr().expect("addr");
        let sent = BATCH * MAX_ROUNDS + 5;
        for _ in 0..sent {
            tx.send_to(&[0x80; 12], to).expect("send");
        }
        std::thread::sleep(Duration::from_millis(10));
        let first = rx.read(Instant::now(), SystemTime::now(), |_, _, _| {});
        assert_eq!(first, BATCH * MAX_ROUNDS);
        let rest = rx.read(Instant::now(), SystemTime::now(), |_, _, _| {});
        assert_eq!(rest, 5);
    }

    #[test]
    fn what_the_kernel_dropped_from_a_full_buffer_is_counted() {
        let (mut rx, tx) = pair("127.0.0.1");
        // The smallest receive buffer the kernel allows: a few datagrams.
        setsockopt(rx.sock().expect("socket").as_raw_fd(), sockopt::RcvBuf, &0).expect("rcvbuf");
        let to = rx.sock().expect("socket").local_addr().expect("addr");
        let sent = 200u32;
        for _ in 0..sent {
            tx.send_to(&[0x80; 172], to).expect("send");
        }
        std::thread::sleep(Duration::from_millis(10));
        let read = rx.read(Instant::now(), SystemTime::now(), |_, _, _| {});
        assert!(read > 0 && read < sent as usize, "read {read}");
        // Nothing more queued: the kernel dropped the rest.
        assert_eq!(rx.read(Instant::now(), SystemTime::now(), |_, _, _| {}), 0);
        // The count comes with the datagrams queued after the drops: the
        // first is read where there was no room for it (the socket is then
        // read where there is), the next one brings it.
        let after = |rx: &mut RtpSocket| {
            tx.send_to(&[0x80; 172], to).expect("send");
            std::thread::sleep(Duration::from_millis(5));
            assert_eq!(rx.read(Instant::now(), SystemTime::now(), |_, _, _| {}), 1);
            rx.dropped()
        };
        let first = after(&mut rx);
        assert!(first == 0 || first == sent - read as u32, "{first}");
        assert_eq!(after(&mut rx), sent - read as u32);
        // Later datagrams carry the same count: nothing is counted twice.
        assert_eq!(after(&mut rx), sent - read as u32);
        // A socket that never dropped, read on the same thread, is not
        // disturbed, and neither is this one by it.
        let (mut quiet, qtx) = pair("127.0.0.1");
        for _ in 0..3 {
            qtx.send_to(
                &[1; 20],
                quiet.sock().expect("socket").local_addr().expect("addr"),
            )
            .expect("send");
            std::thread::sleep(Duration::from_millis(2));
            let got = read_all(&mut quiet, Instant::now(), SystemTime::now());
            assert_eq!(got.len(), 1);
            assert!(got[0].0 <= Instant::now());
            assert_eq!(quiet.dropped(), 0);
            assert_eq!(after(&mut rx), sent - read as u32);
        }
    }

    #[test]
    fn ipv6_and_ipv4_calls_on_one_thread_keep_their_addresses() {
        let (mut rx4, tx4) = pair("127.0.0.1");
        let (mut rx6, tx6) = pair("::1");
        for round in 0..3u8 {
            tx4.send_to(
                &[round],
                rx4.sock().expect("socket").local_addr().expect("addr"),
            )
            .expect("send");
            tx6.send_to(
                &[round; 40],
                rx6.sock().expect("socket").local_addr().expect("addr"),
            )
            .expect("send");
            std::thread::sleep(Duration::from_millis(5));
            let g4 = read_all(&mut rx4, Instant::now(), SystemTime::now());
            let g6 = read_all(&mut rx6, Instant::now(), SystemTime::now());
            assert_eq!(g4.len(), 1);
            assert_eq!(g6.len(), 1);
            assert_eq!(g4[0].1, tx4.local_addr().expect("addr"));
            assert_eq!(g6[0].1, tx6.local_addr().expect("addr"));
            assert_eq!(g6[0].2, vec![round; 40]);
        }
    }

    #[test]
    fn an_oversized_datagram_is_read_truncated() {
        let (mut rx, tx) = pair("127.0.0.1");
        tx.send_to(
            &[7; DATAGRAM + 100],
            rx.sock().expect("socket").local_addr().expect("addr"),
        )
        .expect("send");
        std::thread::sleep(Duration::from_millis(5));
        let got = read_all(&mut rx, Instant::now(), SystemTime::now());
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].2.len(), DATAGRAM);
    }

    /// Silence: after `IDLE_READS` empty reads the socket waits for a
    /// datagram (registered with the runtime), sends still go out, and the
    /// first datagram makes it ready and readable at the ticks again, with
    /// the kernel's arrival time.
    #[tokio::test(flavor = "current_thread")]
    async fn a_silent_socket_waits_and_the_next_datagram_wakes_it() {
        let (mut rx, tx) = pair("127.0.0.1");
        let to = rx.sock().expect("socket").local_addr().expect("addr");
        for _ in 0..IDLE_READS {
            assert!(!rx.is_idle());
            assert_eq!(rx.read(Instant::now(), SystemTime::now(), |_, _, _| {}), 0);
        }
        assert!(rx.is_idle());
        rx.wait();
        assert!(!rx.is_read() && !rx.is_idle());
        // Not ready while nothing comes.
        let pending = std::future::poll_fn(|cx| Poll::Ready(rx.poll_arrival(cx))).await;
        assert!(pending.is_pending());
        // What the call sends still goes out while it waits.
        rx.send_to(&[9; 33], tx.local_addr().expect("addr"));
        let mut buf = [0; 64];
        tx.set_read_timeout(Some(Duration::from_secs(2)))
            .expect("timeout");
        assert_eq!(tx.recv_from(&mut buf).expect("recv").0, 33);
        let sent = Instant::now();
        tx.send_to(&[5; 172], to).expect("send");
        tokio::time::timeout(
            Duration::from_secs(2),
            std::future::poll_fn(|cx| rx.poll_arrival(cx)),
        )
        .await
        .expect("woken by the datagram");
        assert!(rx.is_read());
        tokio::time::sleep(Duration::from_millis(20)).await;
        let got = read_all(&mut rx, Instant::now(), SystemTime::now());
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].2, vec![5; 172]);
        assert!(
            got[0].0 >= sent.checked_sub(Duration::from_millis(5)).unwrap_or(sent)
                && got[0].0 < sent + Duration::from_millis(15),
            "arrival {:?} after the send, read 20 ms later",
            got[0].0 - sent.min(got[0].0)
        );
    }

    #[test]
    fn an_empty_socket_reads_nothing() {
        let (mut rx, _tx) = pair("127.0.0.1");
        assert_eq!(rx.read(Instant::now(), SystemTime::now(), |_, _, _| {}), 0);
    }
}
