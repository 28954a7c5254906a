//! Opening an agent WebSocket, for every agent dialect (native, Twilio, Telnyx): the
//! upgrade request with the tenant's authentication (bearer token or HMAC
//! signature, `docs/agent-protocol.md`), TLS for `wss://` (rustls with the
//! webpki roots plus the tenant's `ca_file`), the connect time limit and the
//! message size limit.
//!
//! Owns: [`AgentError`], [`connect`], the signature recipe
//! ([`hmac_signature`]) and how a connection task reports to the call's
//! supervisor ([`open`], [`report_end`]). Must not touch: the messages on
//! the connection (the dialect modules own those). The WebSocket and TLS themselves are
//! tokio-tungstenite's and rustls'; nothing of RFC 6455 or TLS is written
//! here.

use super::{AgentCommand, AgentTarget, redact_url};
use crate::call::supervisor::ConnectionFailure;
use crate::config::AgentAuth;
use futures_util::StreamExt;
use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, SystemTime};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::Error as WsError;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::handshake::client::Request;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::{Connector, MaybeTlsStream, WebSocketStream};
use tracing::{debug, info, warn};

/// How long the connection (TCP + TLS + upgrade) may take at most, whatever
/// the tenant's `connect_timeout_ms` (its upper bound, 30 s, decides first).
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(35);
/// The socket send buffer towards the agent (Linux doubles it: about 2 s of
/// 16 kHz PCM in flight at most; beyond it frames wait in the 1 s queue of
/// [`super::AUDIO_QUEUE_FRAMES`], then are dropped and counted).
pub const SEND_BUFFER_BYTES: u32 = 32 * 1024;
/// Largest message accepted from the agent (about 32 s of PCM).
pub const MAX_MESSAGE_BYTES: usize = 1 << 20;

/// Header carrying the signing time (Unix seconds, decimal) with HMAC auth.
pub const TIMESTAMP_HEADER: &str = "x-sipbridge-timestamp";
/// Header carrying the call's SIP Call-ID with HMAC auth (signed).
pub const CALL_ID_HEADER: &str = "x-sipbridge-call-id";
/// Header carrying `v1=<hex HMAC-SHA256>` with HMAC auth.
pub const SIGNATURE_HEADER: &str = "x-sipbridge-signature";

/// An open agent connection.
pub(crate) type AgentSocket = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// Why an agent connection failed or ended (logged, never shown to callers;
/// never holds the URL's query or a secret).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AgentError {
    /// The URL could not be turned into a request.
    #[error("invalid agent URL")]
    InvalidUrl,
    /// The token, or the call id for a signed header, is not a valid HTTP
    /// header value.
    #[error("bearer token or call id is not a valid header value")]
    InvalidToken,
    /// The TLS settings could not be built (e.g. a `ca_file` certificate
    /// rustls does not accept).
    #[error("tls setup: {0}")]
    Tls(String),
    /// No connection within [`CONNECT_TIMEOUT`].
    #[error("connect timed out")]
    ConnectTimeout,
    /// The TCP connection could not be made (the OS's reason; no URL).
    #[error("connect: {0}")]
    Connect(String),
    /// The agent answered the upgrade with an HTTP status.
    #[error("upgrade rejected with HTTP {0}")]
    Rejected(u16),
    /// Any other WebSocket or I/O failure.
    #[error("websocket: {0}")]
    Ws(String),
}

impl From<WsError> for AgentError {
    fn from(e: WsError) -> AgentError {
        match e {
            WsError::Http(resp) => AgentError::Rejected(resp.status().as_u16()),
            // Url errors may quote the URL: keep only their kind.
            WsError::Url(_) => AgentError::InvalidUrl,
            other => AgentError::Ws(other.to_string()),
        }
    }
}

/// `v1=` and the lowercase hex HMAC-SHA256, keyed with `secret`, of
/// `"{timestamp}.{call_id}.{path}"`, where `path` is the request target of
/// the upgrade (path and query, as on the HTTP request line).
pub fn hmac_signature(secret: &[u8], timestamp: u64, call_id: &str, path: &str) -> String {
    // HMAC takes keys of any length; the error arm is unreachable in practice.
    let Ok(mut mac) = <Hmac<Sha256> as KeyInit>::new_from_slice(secret) else {
        return String::new();
    };
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(call_id.as_bytes());
    mac.update(b".");
    mac.update(path.as_bytes());
    format!("v1={}", hex::encode(mac.finalize().into_bytes()))
}

fn sensitive(bytes: &[u8]) -> Result<HeaderValue, AgentError> {
    let mut value = HeaderValue::from_bytes(bytes).map_err(|_| AgentError::InvalidToken)?;
    value.set_sensitive(true);
    Ok(value)
}

/// The upgrade request for `target`, authenticated for `call_id` at
/// `now_unix` (seconds; only HMAC uses it).
pub(crate) fn request(
    target: &AgentTarget,
    call_id: &str,
    now_unix: u64,
) -> Result<Request, AgentError> {
    let mut req = target
        .url
        .as_str()
        .into_client_request()
        .map_err(|_| AgentError::InvalidUrl)?;
    match &target.auth {
        None => {}
        Some(AgentAuth::Bearer(token)) => {
            let mut value = b"Bearer ".to_vec();
            value.extend_from_slice(token.expose());
            req.headers_mut()
                .insert("authorization", sensitive(&value)?);
        }
        Some(AgentAuth::Hmac(secret)) => {
            // The request target exactly as tungstenite writes it on the
            // request line.
            let path = req
                .uri()
                .path_and_query()
                .map_or("/", |p| p.as_str())
                .to_owned();
            let signature = hmac_signature(secret.expose(), now_unix, call_id, &path);
            let headers = req.headers_mut();
            headers.insert(TIMESTAMP_HEADER, HeaderValue::from(now_unix));
            headers.insert(
                CALL_ID_HEADER,
                HeaderValue::from_str(call_id).map_err(|_| AgentError::InvalidToken)?,
            );
            headers.insert(SIGNATURE_HEADER, sensitive(signature.as_bytes())?);
        }
    }
    Ok(req)
}

fn ring() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The rustls client settings for a `wss://` agent: the webpki (Mozilla)
/// roots plus the tenant's `ca_file` certificates. Built with the `ring`
/// provider explicitly, so no process-wide default provider is needed.
fn tls_config(target: &AgentTarget) -> Result<Arc<rustls::ClientConfig>, AgentError> {
    static PUBLIC: OnceLock<Arc<rustls::ClientConfig>> = OnceLock::new();
    let build = |roots: rustls::RootCertStore| {
        rustls::ClientConfig::builder_with_provider(ring())
            .with_safe_default_protocol_versions()
            .map(|b| Arc::new(b.with_root_certificates(roots).with_no_client_auth()))
            .map_err(|e| AgentError::Tls(e.to_string()))
    };
    let mut roots = rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    if target.ca_certs.is_empty() {
        if let Some(config) = PUBLIC.get() {
            return Ok(config.clone());
        }
        let config = build(roots)?;
        return Ok(PUBLIC.get_or_init(|| config).clone());
    }
    for cert in &target.ca_certs {
        roots
            .add(cert.clone())
            .map_err(|e| AgentError::Tls(e.to_string()))?;
    }
    build(roots)
}

/// Opens the connection to `target` for the call `call_id` within
/// [`CONNECT_TIMEOUT`] (`wss://` over rustls, `ws://` in the clear).
pub(crate) async fn connect(
    target: &AgentTarget,
    call_id: &str,
) -> Result<AgentSocket, AgentError> {
    let now_unix = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let req = request(target, call_id, now_unix)?;
    let connector = if req.uri().scheme_str() == Some("wss") {
        Some(Connector::Rustls(tls_config(target)?))
    } else {
        None
    };
    let config = WebSocketConfig::default()
        .max_message_size(Some(MAX_MESSAGE_BYTES))
        .max_frame_size(Some(MAX_MESSAGE_BYTES));
    let (ws, _resp) = tokio::time::timeout(CONNECT_TIMEOUT, async {
        let tcp = tcp_connect(req.uri()).await?;
        tokio_tungstenite::client_async_tls_with_config(req, tcp, Some(config), connector)
            .await
            .map_err(AgentError::from)
    })
    .await
    .map_err(|_| AgentError::ConnectTimeout)??;
    Ok(ws)
}

/// The TCP connection, with a small send buffer ([`SEND_BUFFER_BYTES`]) so an
/// agent that reads slower than real time makes the bridge drop frames
/// within seconds instead of queueing minutes of audio in the kernel.
/// (tokio-tungstenite's own connect gives no access to the socket options.)
async fn tcp_connect(
    uri: &tokio_tungstenite::tungstenite::http::Uri,
) -> Result<TcpStream, AgentError> {
    let host = uri.host().ok_or(AgentError::InvalidUrl)?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let default_port = if uri.scheme_str() == Some("wss") {
        443
    } else {
        80
    };
    let port = uri.port_u16().unwrap_or(default_port);
    let mut last = AgentError::Connect("no address".to_owned());
    let addrs = tokio::net::lookup_host((host, port))
        .await
        .map_err(|e| AgentError::Connect(e.to_string()))?;
    for addr in addrs {
        let socket = if addr.is_ipv4() {
            tokio::net::TcpSocket::new_v4()
        } else {
            tokio::net::TcpSocket::new_v6()
        }
        .map_err(|e| AgentError::Connect(e.to_string()))?;
        socket
            .set_send_buffer_size(SEND_BUFFER_BYTES)
            .map_err(|e| AgentError::Connect(e.to_string()))?;
        match socket.connect(addr).await {
            Ok(stream) => {
                stream
                    .set_nodelay(true)
                    .map_err(|e| AgentError::Connect(e.to_string()))?;
                return Ok(stream);
            }
            Err(e) => last = AgentError::Connect(e.to_string()),
        }
    }
    Err(last)
}

/// A connection task's first step, for every agent dialect: connects, and
/// reports [`AgentCommand::Connected`] or, on failure, logs it once (call
/// id, attempt, redacted URL — never a secret) and reports
/// [`AgentCommand::Failed`]; what follows (reconnect, fallback, carry on) is
/// the call's supervisor's decision. `None`: nothing more to do (failed, or
/// the call task dropped its handle while connecting).
pub(crate) async fn open(
    target: &AgentTarget,
    call_id: &str,
    attempt: u32,
    commands: &mpsc::Sender<AgentCommand>,
    kind: &'static str,
) -> Option<AgentSocket> {
    let url = redact_url(&target.url);
    let ws = tokio::select! {
        ws = connect(target, call_id) => ws,
        () = commands.closed() => {
            debug!(call_id = %crate::logging::wire(call_id), %url, attempt, "agent connection attempt abandoned");
            return None;
        }
    };
    match ws {
        Ok(ws) => {
            info!(call_id = %crate::logging::wire(call_id), %url, attempt, mode = kind, "agent connected");
            crate::metrics::pipeline_connected("agent");
            if attempt > 0 {
                crate::metrics::pipeline_reconnect("agent");
            }
            commands.send(AgentCommand::Connected).await.ok()?;
            Some(ws)
        }
        Err(e) => {
            let failure = match e {
                AgentError::Rejected(status) => ConnectionFailure::Rejected(status),
                AgentError::ConnectTimeout => ConnectionFailure::ConnectTimeout,
                _ => ConnectionFailure::Unreachable,
            };
            crate::metrics::pipeline_failed("agent");
            warn!(call_id = %crate::logging::wire(call_id), %url, attempt, mode = kind, error = %e, "agent pipeline failed");
            let _ = commands.send(AgentCommand::Failed(failure)).await;
            None
        }
    }
}

/// Ends a session from the bridge's side: the close handshake, then what
/// the agent still sends is read and dropped until it closes too. Callers
/// bound it in time.
pub(crate) async fn close(ws: &mut AgentSocket) -> Result<(), WsError> {
    ws.close(None).await?;
    while ws.next().await.is_some() {}
    Ok(())
}

/// A connection task's last step: a session that ended with an error is
/// logged once and reported as [`ConnectionFailure::Dropped`].
pub(crate) async fn report_end<E: std::fmt::Display>(
    target: &AgentTarget,
    call_id: &str,
    attempt: u32,
    result: Result<(), E>,
    commands: &mpsc::Sender<AgentCommand>,
    kind: &'static str,
) {
    let url = redact_url(&target.url);
    match result {
        Ok(()) => {
            info!(call_id = %crate::logging::wire(call_id), %url, attempt, mode = kind, "agent session ended")
        }
        Err(e) => {
            crate::metrics::pipeline_failed("agent");
            warn!(call_id = %crate::logging::wire(call_id), %url, attempt, mode = kind, error = %e, "agent pipeline failed");
            let _ = commands
                .send(AgentCommand::Failed(ConnectionFailure::Dropped))
                .await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Secret, SecretRef};

    fn secret(s: &str) -> Secret {
        Secret::new(s.as_bytes().to_vec(), SecretRef::Env("S".into()))
    }

    fn target(url: &str, auth: Option<AgentAuth>) -> AgentTarget {
        AgentTarget {
            url: url.into(),
            auth,
            ca_certs: Vec::new(),
        }
    }

    /// Against Python's `hmac.new(b"Jefe", b"1700000000.abc@host./v1/call?x=1",
    /// hashlib.sha256).hexdigest()`.
    #[test]
    fn hmac_signature_is_hmac_sha256_of_ts_call_id_path() {
        assert_eq!(
            hmac_signature(b"Jefe", 1_700_000_000, "abc@host", "/v1/call?x=1"),
            "v1=5f136ad2acfcf08a86a83f4f2d11db7525645d403155d618bf57bd285da779b5"
        );
    }

    #[test]
    fn bearer_header_is_set_and_sensitive() {
        let t = target(
            "ws://127.0.0.1:1/agent?k=v",
            Some(AgentAuth::Bearer(secret("tok"))),
        );
        let req = request(&t, "c1", 5).unwrap();
        let h = req.headers().get("authorization").unwrap();
        assert_eq!(h.as_bytes(), b"Bearer tok");
        assert!(h.is_sensitive());
        assert!(req.headers().get(SIGNATURE_HEADER).is_none());
        assert!(!format!("{t:?}").contains("tok"));
        assert!(!format!("{t:?}").contains("k=v"));
    }

    #[test]
    fn hmac_headers_sign_timestamp_call_id_and_request_target() {
        let t = target(
            "wss://agent.example:8443/v1/call?x=1",
            Some(AgentAuth::Hmac(secret("s3cret"))),
        );
        let req = request(&t, "abc@host", 1_700_000_000).unwrap();
        let h = req.headers();
        assert_eq!(h.get(TIMESTAMP_HEADER).unwrap(), "1700000000");
        assert_eq!(h.get(CALL_ID_HEADER).unwrap(), "abc@host");
        let sig = h.get(SIGNATURE_HEADER).unwrap();
        assert!(sig.is_sensitive());
        assert_eq!(
            sig.to_str().unwrap(),
            hmac_signature(b"s3cret", 1_700_000_000, "abc@host", "/v1/call?x=1")
        );
        assert!(h.get("authorization").is_none());
        // No path in the URL: the request line says `/`, and so does the signature.
        let t = target("ws://h:1", Some(AgentAuth::Hmac(secret("k"))));
        let req = request(&t, "c", 2).unwrap();
        assert_eq!(
            req.headers()
                .get(SIGNATURE_HEADER)
                .unwrap()
                .to_str()
                .unwrap(),
            hmac_signature(b"k", 2, "c", "/")
        );
    }

    /// tokio-tungstenite's own `connect_async_with_config` (what other
    /// pipelines call) handles `wss://` too: against a server that is not
    /// TLS it fails in the handshake, not with "TLS support not compiled in",
    /// and does not panic for want of a crypto provider.
    #[tokio::test]
    async fn plain_connect_async_speaks_wss() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let server = tokio::spawn(async move {
            use tokio::io::AsyncWriteExt;
            let (mut tcp, _) = listener.accept().await.unwrap();
            let _ = tcp.write_all(b"HTTP/1.1 200 OK\r\n\r\n").await;
        });
        let err = tokio_tungstenite::connect_async_with_config(
            format!("wss://127.0.0.1:{port}/x"),
            None,
            false,
        )
        .await
        .unwrap_err();
        assert!(
            !matches!(
                err,
                WsError::Url(tokio_tungstenite::tungstenite::error::UrlError::TlsFeatureNotEnabled)
            ),
            "{err}"
        );
        assert!(matches!(err, WsError::Io(_) | WsError::Tls(_)), "{err}");
        server.await.unwrap();
    }

    #[test]
    fn tls_config_adds_ca_certs_and_rejects_garbage() {
        let t = target("wss://h/", None);
        let public = tls_config(&t).unwrap();
        assert!(Arc::ptr_eq(&public, &tls_config(&t).unwrap()), "cached");
        let mut bad = target("wss://h/", None);
        bad.ca_certs = vec![rustls_pki_types::CertificateDer::from(vec![1u8, 2, 3])];
        assert!(matches!(tls_config(&bad), Err(AgentError::Tls(_))));
    }
}
