//! SIP transports: UDP sockets and TCP connections, and the sending side
//! (`Transports::send`) that routes a `Transmit` to the right socket.
//!
//! UDP: a response goes out of the socket the request came in on (flow =
//! listener index). TCP: each accepted connection is a flow; responses and
//! in-dialog requests reuse it; if it has closed, a new connection is opened
//! to the peer address (RFC 3261 §18.2.2). TLS (`tls`, a part of this
//! module) shares the TCP path's framing and flow table.

mod tls;

use super::{Shared, lock};
use crate::call::{Peer, Transmit, TransportKind};
use crate::sip::message::{StreamDecoder, parse_datagram};
use bytes::Bytes;
use rand::SeedableRng;
use rand::rngs::StdRng;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::mpsc;
use tracing::{debug, info, warn};

/// Largest SIP message accepted on a stream before the connection is closed.
pub(super) const MAX_STREAM_MESSAGE: usize = 64 * 1024;
/// Outbound queue per TCP connection.
const TCP_QUEUE: usize = 256;
/// Outbound queue per TLS connection.
pub(super) const STREAM_QUEUE: usize = TCP_QUEUE;
/// TCP flow ids start here, above any UDP listener index.
const FIRST_TCP_FLOW: u64 = 1 << 32;

/// The daemon's sockets, for sending.
pub struct Transports {
    /// UDP listeners by flow id (their slot); a listener removed by a reload
    /// leaves `None`, so the flows of the others keep their meaning.
    udp: RwLock<Vec<Option<Arc<UdpSocket>>>>,
    /// TCP and TLS connections by flow id.
    pub(super) tcp: Mutex<HashMap<u64, mpsc::Sender<Bytes>>>,
    pub(super) next_flow: AtomicU64,
    /// Certificates and client authentication of SIP over TLS.
    pub(crate) tls: tls::TlsState,
}

impl Transports {
    pub(crate) fn new() -> Transports {
        Transports {
            udp: RwLock::new(Vec::new()),
            tcp: Mutex::new(HashMap::new()),
            next_flow: AtomicU64::new(FIRST_TCP_FLOW),
            tls: tls::TlsState::new(),
        }
    }

    /// The UDP socket of `flow`, or (its listener was removed by a reload)
    /// the first one still open.
    fn udp_socket(&self, flow: u64) -> Option<Arc<UdpSocket>> {
        let udp = self.udp.read().unwrap_or_else(PoisonError::into_inner);
        let idx = usize::try_from(flow).unwrap_or(usize::MAX);
        udp.get(idx)
            .and_then(Option::clone)
            .or_else(|| udp.iter().flatten().next().cloned())
    }

    /// Whether a UDP listener is open (outbound calls are sent from one).
    pub(crate) fn has_udp(&self) -> bool {
        self.udp_socket(0).is_some()
    }

    /// Sends one message; failures are logged, never fatal (SIP retransmits).
    pub(crate) async fn send(self: &Transports, t: Transmit) {
        crate::metrics::sip_sent(&t.bytes);
        match t.dest.transport {
            TransportKind::Udp => {
                let Some(sock) = self.udp_socket(t.dest.flow) else {
                    return;
                };
                if let Err(e) = sock.send_to(&t.bytes, t.dest.addr).await {
                    debug!(dest = %t.dest.addr, error = %e, "udp send failed");
                }
            }
            TransportKind::Tcp => {
                let tx = lock(&self.tcp).get(&t.dest.flow).cloned();
                match tx {
                    Some(tx) if tx.try_send(t.bytes.clone()).is_ok() => {}
                    _ => self.connect_and_send(t.dest.addr, t.bytes),
                }
            }
            TransportKind::Tls => {
                let tx = lock(&self.tcp).get(&t.dest.flow).cloned();
                match tx {
                    Some(tx) if tx.try_send(t.bytes.clone()).is_ok() => {}
                    _ => tls::connect_and_send(&self.tls, t.dest.addr, t.bytes),
                }
            }
        }
    }

    /// TCP connections currently open.
    pub(crate) fn open_connections(&self) -> usize {
        lock(&self.tcp).len()
    }

    fn connect_and_send(&self, addr: SocketAddr, bytes: Bytes) {
        // The original connection is gone: open a new one (RFC 3261 §18.2.2).
        tokio::spawn(async move {
            match tokio::time::timeout(std::time::Duration::from_secs(5), TcpStream::connect(addr))
                .await
            {
                Ok(Ok(mut s)) => {
                    if let Err(e) = s.write_all(&bytes).await {
                        debug!(%addr, error = %e, "tcp send failed");
                    }
                }
                _ => debug!(%addr, "tcp connect failed"),
            }
        });
    }
}

/// A bound socket, before its task starts.
pub(crate) enum Socket {
    Udp(Arc<UdpSocket>),
    Tcp(TcpListener),
    Tls(TcpListener),
}

/// A listener bound for a configured address, not yet serving.
pub(crate) struct Bound {
    /// The address as configured (`127.0.0.1:0` stays that: the key a reload
    /// compares with).
    pub(crate) configured: SocketAddr,
    /// The address actually bound.
    pub(crate) local: SocketAddr,
    socket: Socket,
}

impl Bound {
    pub(crate) fn kind(&self) -> TransportKind {
        match self.socket {
            Socket::Udp(_) => TransportKind::Udp,
            Socket::Tcp(_) => TransportKind::Tcp,
            Socket::Tls(_) => TransportKind::Tls,
        }
    }
}

/// A serving listener: its addresses and its task.
pub(crate) struct Listener {
    pub(crate) kind: TransportKind,
    pub(crate) configured: SocketAddr,
    pub(crate) local: SocketAddr,
    /// The UDP flow id (slot in `Transports::udp`).
    udp_slot: Option<usize>,
    task: tokio::task::JoinHandle<()>,
}

impl Listener {
    /// The listener's task ended: it loops until aborted, so it panicked.
    pub(crate) fn failed(&self) -> bool {
        self.task.is_finished()
    }

    /// Stops accepting on this listener and closes its socket (TCP
    /// connections it accepted stay open until their peers close them).
    pub(crate) fn stop(self, shared: &Shared) {
        self.task.abort();
        if let Some(slot) = self.udp_slot {
            let mut udp = shared
                .transports
                .udp
                .write()
                .unwrap_or_else(PoisonError::into_inner);
            if let Some(s) = udp.get_mut(slot) {
                *s = None;
            }
        }
        info!(transport = kind_name(self.kind), local = %self.local, "sip listener closed");
    }
}

pub(crate) fn kind_name(kind: TransportKind) -> &'static str {
    match kind {
        TransportKind::Udp => "udp",
        TransportKind::Tcp => "tcp",
        TransportKind::Tls => "tls",
    }
}

/// Asks for a `bytes` receive buffer (SO_RCVBUF) on a SIP UDP socket, so a
/// burst (300 BYEs at once from one carrier) waits in the kernel instead of
/// being dropped there. Linux caps the request at `net.core.rmem_max` (and
/// reports twice what it grants); a smaller grant is logged.
fn size_receive_buffer(sock: &UdpSocket, addr: SocketAddr, bytes: u32) {
    let sock = socket2::SockRef::from(sock);
    let wanted = usize::try_from(bytes).unwrap_or(usize::MAX);
    if let Err(e) = sock.set_recv_buffer_size(wanted) {
        warn!(%addr, error = %e, "SO_RCVBUF not set");
        return;
    }
    match sock.recv_buffer_size() {
        Ok(got) if got < wanted => warn!(
            %addr,
            wanted,
            got,
            "udp receive buffer smaller than configured (raise net.core.rmem_max)"
        ),
        Ok(got) => debug!(%addr, got, "udp receive buffer"),
        Err(_) => {}
    }
}

/// Binds one listener (a UDP one with a `udp_receive_buffer`-byte SO_RCVBUF).
pub(crate) async fn bind(
    kind: TransportKind,
    addr: SocketAddr,
    udp_receive_buffer: u32,
) -> anyhow::Result<Bound> {
    let name = kind_name(kind);
    let socket = match kind {
        TransportKind::Udp => {
            let sock = UdpSocket::bind(addr)
                .await
                .map_err(|e| anyhow::anyhow!("{name} {addr}: {e}"))?;
            size_receive_buffer(&sock, addr, udp_receive_buffer);
            Socket::Udp(Arc::new(sock))
        }
        TransportKind::Tcp => Socket::Tcp(
            TcpListener::bind(addr)
                .await
                .map_err(|e| anyhow::anyhow!("{name} {addr}: {e}"))?,
        ),
        TransportKind::Tls => Socket::Tls(
            TcpListener::bind(addr)
                .await
                .map_err(|e| anyhow::anyhow!("{name} {addr}: {e}"))?,
        ),
    };
    let local = match &socket {
        Socket::Udp(s) => s.local_addr()?,
        Socket::Tcp(l) | Socket::Tls(l) => l.local_addr()?,
    };
    info!(transport = name, local = %local, "sip listener bound");
    Ok(Bound {
        configured: addr,
        local,
        socket,
    })
}

/// A profile's listen addresses, in order: UDP first, then TCP, then TLS.
pub(crate) fn wanted(profile: &crate::config::Profile) -> Vec<(TransportKind, SocketAddr)> {
    let udp = profile.listen.udp.iter().map(|a| (TransportKind::Udp, *a));
    let tcp = profile.listen.tcp.iter().map(|a| (TransportKind::Tcp, *a));
    let tls = profile.listen.tls.iter().map(|a| (TransportKind::Tls, *a));
    udp.chain(tcp).chain(tls).collect()
}

/// The switchboard's settings and the RTP bind address for a profile served
/// by `listeners` (the first UDP and first TCP listener are advertised).
pub(crate) fn settings_for<'a>(
    profile: &crate::config::Profile,
    listeners: impl Iterator<Item = (TransportKind, SocketAddr)> + Clone + 'a,
) -> (crate::call::SwitchboardSettings, std::net::IpAddr) {
    let first = |kind| {
        listeners
            .clone()
            .find(|(k, _)| *k == kind)
            .map(|(_, local)| local)
    };
    let (udp_local, tcp_local) = (first(TransportKind::Udp), first(TransportKind::Tcp));
    let tls_local = first(TransportKind::Tls);
    let mut settings =
        crate::call::SwitchboardSettings::from_profile(profile, udp_local, tcp_local);
    if let Some(tls) = tls_local {
        settings.local_tls.port = tls.port();
    }
    let rtp_bind = udp_local
        .or(tcp_local)
        .or(tls_local)
        .map(|a| a.ip())
        .unwrap_or(std::net::IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED));
    (settings, rtp_bind)
}

/// Binds every listener of the profile and sets up what the shared state is
/// built from: the switchboard for those listeners, the address RTP sockets
/// bind to, and the sending side (its TLS configured).
pub(crate) async fn bind_all(
    config: &Arc<crate::config::Config>,
    rng: &mut StdRng,
) -> anyhow::Result<BoundAll> {
    let profile = match config.profiles.as_slice() {
        [profile] => profile,
        [] => anyhow::bail!("no profile to run"),
        _ => anyhow::bail!("`run` serves one profile; start one daemon per profile file"),
    };
    let mut bound = Vec::new();
    for (kind, addr) in wanted(profile) {
        bound.push(bind(kind, addr, profile.security.udp_receive_buffer_bytes).await?);
    }
    let (settings, rtp_bind) = settings_for(profile, bound.iter().map(|b| (b.kind(), b.local)));
    let (start, end) = (profile.rtp_ports.start, profile.rtp_ports.end);
    let switchboard = crate::call::Switchboard::new(
        Arc::clone(config),
        settings,
        crate::call::PortAllocator::new(start, end),
        rng,
    );
    let transports = Transports::new();
    transports.tls.configure(profile, &config.trunks)?;
    Ok(BoundAll {
        switchboard,
        rtp_bind,
        transports,
        listeners: bound,
    })
}

/// What [`bind_all`] set up.
pub(crate) struct BoundAll {
    pub(crate) switchboard: crate::call::Switchboard,
    /// Where RTP sockets bind: the first listener's IP.
    pub(crate) rtp_bind: std::net::IpAddr,
    pub(crate) transports: Transports,
    /// The bound listeners, not started yet ([`start`]).
    pub(crate) listeners: Vec<Bound>,
}

/// Starts the task of a bound listener.
pub(crate) fn start(shared: &Arc<Shared>, bound: Bound, rng: &mut StdRng) -> Listener {
    let rng = StdRng::from_rng(rng);
    let kind = bound.kind();
    let (udp_slot, task) = match bound.socket {
        Socket::Udp(sock) => {
            let slot = {
                let mut udp = shared
                    .transports
                    .udp
                    .write()
                    .unwrap_or_else(PoisonError::into_inner);
                udp.push(Some(Arc::clone(&sock)));
                udp.len() - 1
            };
            let task = tokio::spawn(udp_loop(Arc::clone(shared), sock, slot as u64, rng));
            (Some(slot), task)
        }
        Socket::Tcp(l) => (
            None,
            tokio::spawn(tcp_accept_loop(Arc::clone(shared), l, rng)),
        ),
        Socket::Tls(l) => {
            shared.transports.tls.attach(shared);
            (
                None,
                tokio::spawn(tls::accept_loop(Arc::clone(shared), l, rng)),
            )
        }
    };
    Listener {
        kind,
        configured: bound.configured,
        local: bound.local,
        udp_slot,
        task,
    }
}

async fn udp_loop(shared: Arc<Shared>, sock: Arc<UdpSocket>, flow: u64, mut rng: StdRng) {
    let mut buf = vec![0u8; 65_536];
    loop {
        let (n, from) = match sock.recv_from(&mut buf).await {
            Ok(x) => x,
            Err(e) => {
                // ICMP port unreachable surfaces here on some systems: not fatal.
                debug!(error = %e, "udp recv error");
                continue;
            }
        };
        let raw = &buf[..n];
        if raw.iter().all(|b| matches!(b, b'\r' | b'\n' | b' ' | 0)) {
            continue; // keep-alive
        }
        // Rate limits and bans, on the first line only: a flood costs a
        // lookup per datagram, never a parse.
        if !shared.screen(from.ip(), raw) {
            continue;
        }
        let peer = Peer {
            transport: TransportKind::Udp,
            addr: from,
            flow,
        };
        let parsed = parse_datagram(raw);
        crate::metrics::sip_received(parsed.as_ref().ok());
        shared.inbound(raw, parsed, peer, &mut rng).await;
    }
}

/// Open TCP connections of one listener, in total and per source address
/// (`[profile.security]` caps them; a connection over a cap is closed at once).
#[derive(Default)]
pub(super) struct TcpCounts {
    total: usize,
    per_source: HashMap<std::net::IpAddr, usize>,
}

/// Gives a connection's place back when its task ends, however it ends.
pub(super) struct TcpSlot {
    counts: Arc<Mutex<TcpCounts>>,
    ip: std::net::IpAddr,
}

impl Drop for TcpSlot {
    fn drop(&mut self) {
        let mut c = lock(&self.counts);
        c.total = c.total.saturating_sub(1);
        if let Some(n) = c.per_source.get_mut(&self.ip) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                c.per_source.remove(&self.ip);
            }
        }
    }
}

pub(super) fn tcp_limits(shared: &Shared) -> (usize, usize, std::time::Duration) {
    let sb = lock(&shared.switchboard);
    let s = sb
        .config()
        .profiles
        .first()
        .map(|p| p.security.clone())
        .unwrap_or_default();
    let n = |v: u32| usize::try_from(v).unwrap_or(usize::MAX);
    (
        n(s.tcp_max_connections),
        n(s.tcp_max_connections_per_source),
        s.tcp_idle_timeout,
    )
}

/// A connection just accepted from `from`: its place under the connection
/// caps, or `None` (over a cap, or its source is banned: close it at once;
/// `refused` counts those, logged at the 1st, 2nd, 4th … refusal).
pub(super) fn admit_connection(
    shared: &Shared,
    counts: &Arc<Mutex<TcpCounts>>,
    from: SocketAddr,
    refused: &mut u64,
    kind: &'static str,
) -> Option<TcpSlot> {
    if lock(&shared.switchboard).is_banned_at(std::time::Instant::now(), from.ip()) {
        crate::metrics::sip_dropped("banned");
        return None;
    }
    let (max_total, max_per_source, _) = tcp_limits(shared);
    let slot = {
        let mut c = lock(counts);
        let mine = c.per_source.get(&from.ip()).copied().unwrap_or(0);
        if c.total >= max_total || mine >= max_per_source {
            None
        } else {
            c.total += 1;
            *c.per_source.entry(from.ip()).or_default() += 1;
            Some(TcpSlot {
                counts: Arc::clone(counts),
                ip: from.ip(),
            })
        }
    };
    if slot.is_none() {
        *refused += 1;
        if refused.is_power_of_two() {
            warn!(%from, refused = *refused, transport = kind, "connection over the connection caps; closed");
        }
    }
    slot
}

async fn tcp_accept_loop(shared: Arc<Shared>, listener: TcpListener, mut rng: StdRng) {
    let counts = Arc::new(Mutex::new(TcpCounts::default()));
    let mut refused = 0u64;
    loop {
        let (stream, from) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                warn!(error = %e, "tcp accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let Some(slot) = admit_connection(&shared, &counts, from, &mut refused, "tcp") else {
            drop(stream);
            continue;
        };
        let (_, _, idle) = tcp_limits(&shared);
        let flow = shared.transports.next_flow.fetch_add(1, Ordering::Relaxed);
        let shared = Arc::clone(&shared);
        let rng = StdRng::from_rng(&mut rng);
        tokio::spawn(async move {
            tcp_connection(shared, stream, from, flow, idle, rng).await;
            drop(slot);
        });
    }
}

async fn tcp_connection(
    shared: Arc<Shared>,
    stream: TcpStream,
    from: SocketAddr,
    flow: u64,
    idle: std::time::Duration,
    mut rng: StdRng,
) {
    let (mut rd, mut wr) = stream.into_split();
    let (tx, mut rx) = mpsc::channel::<Bytes>(TCP_QUEUE);
    lock(&shared.transports.tcp).insert(flow, tx);
    let writer = tokio::spawn(async move {
        while let Some(b) = rx.recv().await {
            if wr.write_all(&b).await.is_err() {
                break;
            }
        }
    });
    let mut decoder = StreamDecoder::new(MAX_STREAM_MESSAGE);
    let mut buf = vec![0u8; 16 * 1024];
    let peer = Peer {
        transport: TransportKind::Tcp,
        addr: from,
        flow,
    };
    // Until its first complete message, and while part of a message is
    // buffered, a connection must make progress within `idle`: half-sent
    // headers and silent connections cannot hold a descriptor and a buffer.
    let mut any_message = false;
    let mut since = tokio::time::Instant::now();
    'conn: loop {
        let read = rd.read(&mut buf);
        let waiting = !any_message || decoder.buffered() > 0;
        let got = if waiting {
            match tokio::time::timeout_at(since + idle, read).await {
                Ok(r) => r,
                Err(_) => {
                    debug!(%from, "tcp connection sent no complete message in time; closing");
                    break;
                }
            }
        } else {
            read.await
        };
        let n = match got {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if !waiting {
            // A new message starts now, after an idle (but complete) spell.
            since = tokio::time::Instant::now();
        }
        decoder.push(&buf[..n]);
        loop {
            match decoder.next_message() {
                Ok(Some(msg)) => {
                    any_message = true;
                    since = tokio::time::Instant::now();
                    crate::metrics::sip_received(Some(&msg));
                    let raw = msg_bytes(&msg);
                    if !shared.screen(from.ip(), &raw) {
                        continue;
                    }
                    shared.inbound(&raw, Ok(msg), peer, &mut rng).await;
                }
                Ok(None) => break,
                Err(e) => {
                    // Framing lost (RFC 3261 §18.3): answer if we can, then close.
                    debug!(%from, error = %e, "tcp framing error; closing");
                    crate::metrics::sip_received(None);
                    shared.inbound(&[], Err(e), peer, &mut rng).await;
                    break 'conn;
                }
            }
        }
    }
    lock(&shared.transports.tcp).remove(&flow);
    writer.abort();
}

pub(super) fn msg_bytes(msg: &crate::sip::message::Message) -> Bytes {
    match msg {
        crate::sip::message::Message::Request(r) => r.encode(),
        crate::sip::message::Message::Response(r) => r.encode(),
    }
}
