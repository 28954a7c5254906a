//! SIP over TLS (RFC 3261 §26.2): the `listen.tls` listeners' accept loop,
//! each TLS connection's read/write tasks, and outbound TLS when a
//! connection a dialog used has closed.
//!
//! The certificate lives in [`TlsState`], swapped on SIGHUP: a new
//! handshake uses the new certificate, connections already up (and their
//! calls) keep going. Framing is the TCP path's [`StreamDecoder`]; a
//! connection is a flow in the same table as TCP connections, so responses
//! and in-dialog requests reuse it (persistent connections, RFC 5923 §1).
//! Mutual TLS: a client from a trunk's addresses that sets `tls_client_ca`
//! must present a certificate that CA signed, or the connection is closed
//! before any SIP is read.

use crate::call::{Peer, TransportKind};
use crate::config::tls::ClientAuth;
use crate::daemon::{Shared, lock};
use crate::sip::message::StreamDecoder;
use bytes::Bytes;
use rand::SeedableRng;
use rand::rngs::StdRng;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tracing::{debug, info, warn};

/// Longest a TLS handshake may take before the connection is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest an outbound TCP connect + TLS handshake may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// What the TLS listeners and outbound TLS use right now.
#[derive(Clone)]
struct TlsConfig {
    server: Option<Arc<rustls::ServerConfig>>,
    client: Arc<rustls::ClientConfig>,
    client_auth: ClientAuth,
}

/// The daemon's TLS configuration, replaced as a whole on reload.
pub(crate) struct TlsState {
    current: RwLock<Option<TlsConfig>>,
    /// The daemon, for connections dialled from the sending side.
    shared: std::sync::OnceLock<std::sync::Weak<Shared>>,
}

impl TlsState {
    pub(crate) fn new() -> TlsState {
        TlsState {
            current: RwLock::new(None),
            shared: std::sync::OnceLock::new(),
        }
    }

    /// Builds the configuration of `profile` and `trunks` and puts it in
    /// force for new connections. On error the previous one stays.
    pub(crate) fn configure(
        &self,
        profile: &crate::config::Profile,
        trunks: &[crate::config::Trunk],
    ) -> anyhow::Result<()> {
        let client_auth = ClientAuth::new(trunks);
        let cas: Vec<&crate::config::Secret> = trunks
            .iter()
            .filter_map(|t| t.tls_client_ca.as_ref())
            .collect();
        let server = match &profile.tls {
            Some(identity) => Some(
                crate::config::tls::server_config(identity, &cas)
                    .map_err(|e| anyhow::anyhow!("tls: {e}"))?,
            ),
            None => None,
        };
        let outbound_ca = profile
            .tls
            .as_ref()
            .and_then(|t| t.outbound_ca.as_ref())
            .map(|s| s.expose());
        let client = crate::config::tls::client_config(outbound_ca)
            .map_err(|e| anyhow::anyhow!("tls outbound ca: {e}"))?;
        *self.current.write().unwrap_or_else(PoisonError::into_inner) = Some(TlsConfig {
            server,
            client,
            client_auth,
        });
        Ok(())
    }

    /// Lets outbound connections feed what they read to `shared`.
    pub(crate) fn attach(&self, shared: &Arc<Shared>) {
        let _ = self.shared.set(Arc::downgrade(shared));
    }

    fn get(&self) -> Option<TlsConfig> {
        self.current
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

/// Accepts TCP connections on a `listen.tls` socket and runs a TLS session on
/// each, under the same connection caps as TCP (`[profile.security]`).
pub(super) async fn accept_loop(shared: Arc<Shared>, listener: TcpListener, mut rng: StdRng) {
    let counts = Arc::new(Mutex::new(super::TcpCounts::default()));
    let mut refused = 0u64;
    loop {
        let (stream, from) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                warn!(error = %e, "tls accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Some(slot) = super::admit_connection(&shared, &counts, from, &mut refused, "tls")
        else {
            drop(stream);
            continue;
        };
        let shared = Arc::clone(&shared);
        let rng = StdRng::from_rng(&mut rng);
        tokio::spawn(async move {
            if let Err(e) = accept_one(shared, stream, from, rng).await {
                debug!(%from, error = %e, "tls connection refused");
            }
            drop(slot);
        });
    }
}

async fn accept_one(
    shared: Arc<Shared>,
    stream: TcpStream,
    from: SocketAddr,
    rng: StdRng,
) -> anyhow::Result<()> {
    let config = shared
        .transports
        .tls
        .get()
        .ok_or_else(|| anyhow::anyhow!("no TLS configuration"))?;
    let server = config
        .server
        .ok_or_else(|| anyhow::anyhow!("no TLS certificate"))?;
    let acceptor = tokio_rustls::TlsAcceptor::from(server);
    // A handshake is the first thing a connection must complete.
    let (_, _, idle) = super::tcp_limits(&shared);
    let tls = tokio::time::timeout(HANDSHAKE_TIMEOUT.min(idle), acceptor.accept(stream))
        .await
        .map_err(|_| anyhow::anyhow!("handshake timed out"))??;
    let chain = tls.get_ref().1.peer_certificates().unwrap_or_default();
    let now = rustls_pki_types::UnixTime::now();
    if let Err(e) = config.client_auth.permits(from.ip(), chain, now) {
        warn!(%from, error = %e, "tls client refused");
        return Ok(());
    }
    let flow = shared.transports.next_flow();
    session(shared, tls, from, flow, Some(idle), rng).await;
    Ok(())
}

/// One TLS connection (accepted or dialled): registers it as `flow`,
/// decodes SIP from it and writes what is queued for it, until it closes.
/// An accepted one (`idle` set) must complete a message within `idle` of
/// opening, and of starting each message, as on TCP.
async fn session<S>(
    shared: Arc<Shared>,
    stream: S,
    from: SocketAddr,
    flow: u64,
    idle: Option<Duration>,
    mut rng: StdRng,
) where
    S: AsyncRead + AsyncWrite + Send + 'static,
{
    let (mut rd, mut wr) = tokio::io::split(stream);
    let (tx, mut rx) = mpsc::channel::<Bytes>(super::STREAM_QUEUE);
    shared.transports.register_stream(flow, tx);
    let writer = tokio::spawn(async move {
        while let Some(b) = rx.recv().await {
            if wr.write_all(&b).await.is_err() || wr.flush().await.is_err() {
                break;
            }
        }
        let _ = wr.shutdown().await;
    });
    let mut decoder = StreamDecoder::new(super::MAX_STREAM_MESSAGE);
    let mut buf = vec![0u8; 16 * 1024];
    let peer = Peer {
        transport: TransportKind::Tls,
        addr: from,
        flow,
    };
    let mut any_message = false;
    let mut since = tokio::time::Instant::now();
    'conn: loop {
        let read = rd.read(&mut buf);
        let waiting = !any_message || decoder.buffered() > 0;
        let got = match idle {
            Some(idle) if waiting => match tokio::time::timeout_at(since + idle, read).await {
                Ok(r) => r,
                Err(_) => {
                    debug!(%from, "tls connection sent no complete message in time; closing");
                    break;
                }
            },
            _ => read.await,
        };
        let n = match got {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if !waiting {
            since = tokio::time::Instant::now();
        }
        decoder.push(&buf[..n]);
        loop {
            match decoder.next_message() {
                Ok(Some(msg)) => {
                    any_message = true;
                    since = tokio::time::Instant::now();
                    crate::metrics::sip_received(Some(&msg));
                    let raw = super::msg_bytes(&msg);
                    if !shared.screen(from.ip(), &raw) {
                        continue;
                    }
                    shared.inbound(&raw, Ok(msg), peer, &mut rng).await;
                }
                Ok(None) => break,
                Err(e) => {
                    debug!(%from, error = %e, "tls framing error; closing");
                    crate::metrics::sip_received(None);
                    shared.inbound(&[], Err(e), peer, &mut rng).await;
                    break 'conn;
                }
            }
        }
    }
    shared.transports.unregister_stream(flow);
    writer.abort();
}

/// The connection of a TLS flow is gone: dial `addr` over TLS, verifying
/// its certificate against the configured roots and its IP address, send
/// `bytes`, and keep the connection as a new flow for what comes back.
pub(super) fn connect_and_send(state: &TlsState, addr: SocketAddr, bytes: Bytes) {
    let (Some(config), Some(shared)) = (state.get(), state.shared.get().and_then(|w| w.upgrade()))
    else {
        debug!(%addr, "no tls configuration to dial with");
        return;
    };
    tokio::spawn(async move {
        let connector = tokio_rustls::TlsConnector::from(config.client);
        let name = rustls_pki_types::ServerName::IpAddress(addr.ip().into());
        let dial = async {
            let tcp = TcpStream::connect(addr).await?;
            connector.connect(name, tcp).await
        };
        match tokio::time::timeout(CONNECT_TIMEOUT, dial).await {
            Ok(Ok(mut tls)) => {
                if let Err(e) = tls.write_all(&bytes).await {
                    debug!(%addr, error = %e, "tls send failed");
                    return;
                }
                info!(%addr, "outbound tls connection up");
                let flow = shared.transports.next_flow();
                session(shared, tls, addr, flow, None, StdRng::from_os_rng()).await;
            }
            Ok(Err(e)) => warn!(%addr, error = %e, "outbound tls failed"),
            Err(_) => warn!(%addr, "outbound tls timed out"),
        }
    });
}

impl super::Transports {
    fn next_flow(&self) -> u64 {
        self.next_flow.fetch_add(1, Ordering::Relaxed)
    }

    fn register_stream(&self, flow: u64, tx: mpsc::Sender<Bytes>) {
        lock(&self.tcp).insert(flow, tx);
    }

    fn unregister_stream(&self, flow: u64) {
        lock(&self.tcp).remove(&flow);
    }
}
