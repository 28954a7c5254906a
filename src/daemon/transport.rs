//! SIP transports: UDP sockets and TCP connections, and the sending side
//! (`Transports::send`) that routes a `Transmit` to the right socket.
//!
//! UDP: a response goes out of the socket the request came in on (flow =
//! listener index). TCP: each accepted connection is a flow; responses and
//! in-dialog requests reuse it; if it has closed, a new connection is opened
//! to the peer address (RFC 3261 §18.2.2).

use super::{Shared, lock};
use crate::call::{Peer, Transmit, TransportKind};
use crate::sip::message::{StreamDecoder, parse_datagram};
use bytes::Bytes;
use rand::SeedableRng;
use rand::rngs::StdRng;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tracing::{debug, info, warn};

/// Largest SIP message accepted on a stream before the connection is closed.
const MAX_STREAM_MESSAGE: usize = 64 * 1024;
/// Outbound queue per TCP connection.
const TCP_QUEUE: usize = 256;
/// TCP flow ids start here, above any UDP listener index.
const FIRST_TCP_FLOW: u64 = 1 << 32;

/// The daemon's sockets, for sending.
pub struct Transports {
    udp: Vec<Arc<UdpSocket>>,
    tcp: Mutex<HashMap<u64, mpsc::Sender<Bytes>>>,
    next_flow: AtomicU64,
}

impl Transports {
    /// Sends one message; failures are logged, never fatal (SIP retransmits).
    pub(crate) async fn send(self: &Transports, t: Transmit) {
        match t.dest.transport {
            TransportKind::Udp => {
                let idx = usize::try_from(t.dest.flow).unwrap_or(usize::MAX);
                let Some(sock) = self.udp.get(idx).or_else(|| self.udp.first()) else {
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

/// Bound listeners, before their tasks start.
pub(crate) struct Listeners {
    udp: Vec<Arc<UdpSocket>>,
    tcp: Vec<TcpListener>,
}

/// Binds every listener of the profile and builds the shared state.
pub(crate) async fn bind_all(
    config: &Arc<crate::config::Config>,
    rng: &mut StdRng,
) -> anyhow::Result<(Shared, Listeners)> {
    let profile = match config.profiles.as_slice() {
        [profile] => profile,
        [] => anyhow::bail!("no profile to run"),
        _ => anyhow::bail!("`run` serves one profile; start one daemon per profile file"),
    };
    let mut udp = Vec::new();
    for addr in profile.listen.udp.iter().copied() {
        let sock = UdpSocket::bind(addr)
            .await
            .map_err(|e| anyhow::anyhow!("udp {addr}: {e}"))?;
        info!(transport = "udp", local = %sock.local_addr()?, "sip listener bound");
        udp.push(Arc::new(sock));
    }
    let mut tcp = Vec::new();
    for addr in profile.listen.tcp.iter().copied() {
        let l = TcpListener::bind(addr)
            .await
            .map_err(|e| anyhow::anyhow!("tcp {addr}: {e}"))?;
        info!(transport = "tcp", local = %l.local_addr()?, "sip listener bound");
        tcp.push(l);
    }
    let udp_local = udp.first().and_then(|s| s.local_addr().ok());
    let tcp_local = tcp.first().and_then(|l| l.local_addr().ok());
    let settings = crate::call::SwitchboardSettings::from_profile(profile, udp_local, tcp_local);
    let rtp_bind = udp_local
        .or(tcp_local)
        .map(|a| a.ip())
        .unwrap_or(std::net::IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED));
    let (start, end) = (profile.rtp_ports.start, profile.rtp_ports.end);
    let switchboard = crate::call::Switchboard::new(
        Arc::clone(config),
        settings,
        crate::call::PortAllocator::new(start, end),
        rng,
    );
    let shared = Shared {
        switchboard: Mutex::new(switchboard),
        calls: Mutex::new(HashMap::new()),
        transports: Transports {
            udp: udp.clone(),
            tcp: Mutex::new(HashMap::new()),
            next_flow: AtomicU64::new(FIRST_TCP_FLOW),
        },
        records: None,
        rtp_bind,
        fallback_prompts: Mutex::new(HashMap::new()),
    };
    Ok((shared, Listeners { udp, tcp }))
}

/// Starts one task per listener.
pub(crate) fn spawn_listeners(
    shared: &Arc<Shared>,
    listeners: Listeners,
    rng: &mut StdRng,
) -> JoinSet<()> {
    let mut set = JoinSet::new();
    for (idx, sock) in listeners.udp.into_iter().enumerate() {
        let shared = Arc::clone(shared);
        let rng = StdRng::from_rng(rng);
        set.spawn(udp_loop(shared, sock, idx as u64, rng));
    }
    for l in listeners.tcp {
        let shared = Arc::clone(shared);
        let rng = StdRng::from_rng(rng);
        set.spawn(tcp_accept_loop(shared, l, rng));
    }
    set
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
        let peer = Peer {
            transport: TransportKind::Udp,
            addr: from,
            flow,
        };
        let parsed = parse_datagram(raw);
        shared.inbound(raw, parsed, peer, &mut rng).await;
    }
}

async fn tcp_accept_loop(shared: Arc<Shared>, listener: TcpListener, mut rng: StdRng) {
    loop {
        let (stream, from) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                warn!(error = %e, "tcp accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let flow = shared.transports.next_flow.fetch_add(1, Ordering::Relaxed);
        let shared = Arc::clone(&shared);
        let rng = StdRng::from_rng(&mut rng);
        tokio::spawn(tcp_connection(shared, stream, from, flow, rng));
    }
}

async fn tcp_connection(
    shared: Arc<Shared>,
    stream: TcpStream,
    from: SocketAddr,
    flow: u64,
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
    'conn: loop {
        let n = match rd.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        decoder.push(&buf[..n]);
        loop {
            match decoder.next_message() {
                Ok(Some(msg)) => {
                    let raw = msg_bytes(&msg);
                    shared.inbound(&raw, Ok(msg), peer, &mut rng).await;
                }
                Ok(None) => break,
                Err(e) => {
                    // Framing lost (RFC 3261 §18.3): answer if we can, then close.
                    debug!(%from, error = %e, "tcp framing error; closing");
                    shared.inbound(&[], Err(e), peer, &mut rng).await;
                    break 'conn;
                }
            }
        }
    }
    lock(&shared.transports.tcp).remove(&flow);
    writer.abort();
}

fn msg_bytes(msg: &crate::sip::message::Message) -> Bytes {
    match msg {
        crate::sip::message::Message::Request(r) => r.encode(),
        crate::sip::message::Message::Response(r) => r.encode(),
    }
}
