//! The native agent protocol (`docs/agent-protocol.md`): one WebSocket per
//! call, JSON text messages for control, binary messages for 16-bit LE PCM.
//!
//! Owns: the message formats ([`start_message`], [`event_message`],
//! [`parse_agent_text`], PCM packing) and the connection task ([`run`]).
//! Must not touch: call or media state (it only talks to the call task
//! through the channels in [`Channels`]). The WebSocket itself is
//! tokio-tungstenite's; nothing of RFC 6455 is written here.

use super::{AgentCommand, AgentTarget, CallInfo, Event, redact_url};
use crate::call::pipeline::ConnectionFailure;
use futures_util::{SinkExt, StreamExt};
use std::time::Duration;
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tracing::{debug, info, warn};

/// How long the connection (TCP + upgrade) may take at most, whatever the
/// tenant's `connect_timeout_ms` (its upper bound, 30 s, decides first).
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(35);
/// How long the bridge waits, after `stop`, for the close handshake.
pub const CLOSE_TIMEOUT: Duration = Duration::from_secs(2);
/// The socket send buffer towards the agent (Linux doubles it: about 2 s of
/// 16 kHz PCM in flight at most; beyond it frames wait in the 1 s queue of
/// [`super::AUDIO_QUEUE_FRAMES`], then are dropped and counted).
pub const SEND_BUFFER_BYTES: u32 = 32 * 1024;
/// Largest message accepted from the agent (about 32 s of PCM).
pub const MAX_MESSAGE_BYTES: usize = 1 << 20;

/// Why an agent connection failed or ended (logged, never shown to callers).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AgentError {
    /// The URL could not be turned into a request.
    #[error("invalid agent URL")]
    InvalidUrl,
    /// The token is not a valid HTTP header value.
    #[error("bearer token is not a valid header value")]
    InvalidToken,
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

/// The task's ends of the channels to and from the call task.
#[derive(Debug)]
pub(crate) struct Channels {
    pub(crate) audio: mpsc::Receiver<Vec<i16>>,
    pub(crate) events: mpsc::Receiver<Event>,
    pub(crate) commands: mpsc::Sender<AgentCommand>,
}

/// The `start` message; `reconnect` is 0 on a call's first connection and n
/// on its n-th reconnect.
pub fn start_message(info: &CallInfo, reconnect: u32) -> String {
    let custom: serde_json::Map<String, serde_json::Value> = info
        .custom
        .iter()
        .map(|(k, v)| (k.clone(), serde_json::Value::String(v.clone())))
        .collect();
    serde_json::json!({
        "event": "start",
        "call_id": info.call_id,
        "tenant": info.tenant,
        "from": info.from,
        "to": info.to,
        "codec": "pcm_s16le",
        "sample_rate": info.sample_rate,
        "custom": custom,
        "reconnect": reconnect,
    })
    .to_string()
}

fn event_message(ev: &Event) -> String {
    match ev {
        Event::Dtmf(d) => serde_json::json!({"event": "dtmf", "digit": d.to_string()}),
        Event::Mark { name, cleared } => {
            serde_json::json!({"event": "mark", "name": name, "cleared": cleared})
        }
        Event::Transcript(t) => return super::deepgram::transcript_message(t),
    }
    .to_string()
}

/// The `stop` message.
pub fn stop_message() -> String {
    serde_json::json!({"event": "stop"}).to_string()
}

/// Samples as 16-bit little-endian bytes.
pub fn pcm_to_bytes(samples: &[i16]) -> Vec<u8> {
    samples.iter().flat_map(|s| s.to_le_bytes()).collect()
}

/// 16-bit little-endian bytes as samples (a trailing odd byte is ignored).
pub fn bytes_to_pcm(bytes: &[u8]) -> Vec<i16> {
    bytes
        .chunks_exact(2)
        .map(|c| i16::from_le_bytes([c[0], c[1]]))
        .collect()
}

/// A text message from the agent as a command; `None` for anything that is
/// not a known, well-formed event (ignored and logged by the caller).
pub fn parse_agent_text(text: &str) -> Option<AgentCommand> {
    let v: serde_json::Value = serde_json::from_str(text).ok()?;
    match v.get("event")?.as_str()? {
        "mark" => Some(AgentCommand::Mark(v.get("name")?.as_str()?.to_owned())),
        "clear" => Some(AgentCommand::Clear),
        "hangup" => Some(AgentCommand::HangUp),
        _ => None,
    }
}

fn request(
    target: &AgentTarget,
) -> Result<tokio_tungstenite::tungstenite::handshake::client::Request, AgentError> {
    let mut req = target
        .url
        .as_str()
        .into_client_request()
        .map_err(|_| AgentError::InvalidUrl)?;
    if let Some(token) = &target.auth {
        let mut value = b"Bearer ".to_vec();
        value.extend_from_slice(token.expose());
        let mut value = HeaderValue::from_bytes(&value).map_err(|_| AgentError::InvalidToken)?;
        value.set_sensitive(true);
        req.headers_mut().insert("authorization", value);
    }
    Ok(req)
}

/// The connection task: connect, report [`AgentCommand::Connected`], send
/// `start`, then relay both ways until the call task drops its handle
/// (→ `stop`, close) or the connection fails. A failure is logged once with
/// the call id, the attempt and the redacted URL, and reported as
/// [`AgentCommand::Failed`]; what follows (reconnect, fallback, carry on) is
/// the call's supervisor's decision. If the handle is dropped while
/// connecting, the attempt is abandoned at once.
pub(crate) async fn run(target: AgentTarget, info: CallInfo, attempt: u32, mut chans: Channels) {
    let url = redact_url(&target.url);
    let call_id = info.call_id.clone();
    let ws = tokio::select! {
        ws = connect(&target) => ws,
        () = chans.commands.closed() => {
            debug!(%call_id, %url, attempt, "agent connection attempt abandoned");
            return;
        }
    };
    let result = match ws {
        Ok(ws) => {
            info!(%call_id, %url, attempt, "agent connected");
            crate::metrics::pipeline_connected("agent");
            if attempt > 0 {
                crate::metrics::pipeline_reconnect("agent");
            }
            if chans.commands.send(AgentCommand::Connected).await.is_err() {
                return;
            }
            session(ws, &info, attempt, &mut chans)
                .await
                .map_err(|e| (e, ConnectionFailure::Dropped))
        }
        Err(e) => {
            let failure = match e {
                AgentError::Rejected(status) => ConnectionFailure::Rejected(status),
                AgentError::ConnectTimeout => ConnectionFailure::ConnectTimeout,
                _ => ConnectionFailure::Unreachable,
            };
            Err((e, failure))
        }
    };
    match result {
        Ok(()) => info!(%call_id, %url, attempt, "agent session ended"),
        Err((e, failure)) => {
            crate::metrics::pipeline_failed("agent");
            warn!(%call_id, %url, attempt, error = %e, "agent pipeline failed");
            let _ = chans.commands.send(AgentCommand::Failed(failure)).await;
        }
    }
}

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// TCP connect and upgrade, bounded by [`CONNECT_TIMEOUT`] (the supervisor's
/// tenant `connect_timeout` is shorter and normally decides first).
async fn connect(target: &AgentTarget) -> Result<Ws, AgentError> {
    let req = request(target)?;
    let config = WebSocketConfig::default()
        .max_message_size(Some(MAX_MESSAGE_BYTES))
        .max_frame_size(Some(MAX_MESSAGE_BYTES));
    let (ws, _resp) = tokio::time::timeout(CONNECT_TIMEOUT, async {
        if req.uri().scheme_str() != Some("ws") {
            return Err(AgentError::Connect(
                "only ws:// is built in (no TLS)".to_owned(),
            ));
        }
        let tcp = tcp_connect(req.uri()).await?;
        let stream = tokio_tungstenite::MaybeTlsStream::Plain(tcp);
        tokio_tungstenite::client_async_with_config(req, stream, Some(config))
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
) -> Result<tokio::net::TcpStream, AgentError> {
    let host = uri.host().ok_or(AgentError::InvalidUrl)?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let port = uri.port_u16().unwrap_or(80);
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

/// Relays both ways until the call task drops its handle (`Ok`) or the
/// connection fails.
async fn relay(ws: &mut Ws, chans: &mut Channels) -> Result<(), AgentError> {
    loop {
        tokio::select! {
            frame = chans.audio.recv() => match frame {
                Some(pcm) => ws.send(Message::binary(pcm_to_bytes(&pcm))).await?,
                None => return Ok(()),
            },
            ev = chans.events.recv() => match ev {
                Some(ev) => ws.send(Message::text(event_message(&ev))).await?,
                None => return Ok(()),
            },
            msg = ws.next() => match msg {
                Some(Ok(Message::Binary(bytes))) => {
                    let cmd = AgentCommand::Play(bytes_to_pcm(&bytes));
                    if chans.commands.send(cmd).await.is_err() {
                        return Ok(());
                    }
                }
                Some(Ok(Message::Text(text))) => match parse_agent_text(&text) {
                    Some(cmd) => {
                        if chans.commands.send(cmd).await.is_err() {
                            return Ok(());
                        }
                    }
                    None => debug!("agent message ignored"),
                },
                Some(Ok(Message::Close(_))) | None => {
                    return Err(AgentError::Ws("agent closed the connection".to_owned()));
                }
                Some(Ok(_)) => {}
                Some(Err(e)) => return Err(e.into()),
            },
        }
    }
}

async fn session(
    mut ws: Ws,
    info: &CallInfo,
    attempt: u32,
    chans: &mut Channels,
) -> Result<(), AgentError> {
    ws.send(Message::text(start_message(info, attempt))).await?;
    // The call task dropping its handle ends the relay even while a send
    // waits for an agent that stopped reading.
    let dropped = chans.commands.clone();
    tokio::select! {
        r = relay(&mut ws, chans) => r?,
        () = dropped.closed() => {}
    }
    // The call ended: send what is still queued, then stop, then close — all
    // bounded, so an agent that stopped reading cannot keep this task alive.
    let _ = tokio::time::timeout(CLOSE_TIMEOUT, async {
        while let Ok(pcm) = chans.audio.try_recv() {
            ws.send(Message::binary(pcm_to_bytes(&pcm))).await?;
        }
        while let Ok(ev) = chans.events.try_recv() {
            ws.send(Message::text(event_message(&ev))).await?;
        }
        ws.send(Message::text(stop_message())).await?;
        ws.close(None).await?;
        while ws.next().await.is_some() {}
        Ok::<(), WsError>(())
    })
    .await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn start_message_has_every_field() {
        let info = CallInfo {
            call_id: "abc@h".into(),
            tenant: "demo".into(),
            from: "+1555".into(),
            to: "+1666".into(),
            custom: vec![("X-Order".into(), "42".into())],
            sample_rate: 16_000,
        };
        let v: serde_json::Value = serde_json::from_str(&start_message(&info, 2)).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"event":"start","call_id":"abc@h","tenant":"demo",
                "from":"+1555","to":"+1666","codec":"pcm_s16le","sample_rate":16000,
                "custom":{"X-Order":"42"},"reconnect":2})
        );
    }

    #[test]
    fn events_and_stop() {
        assert_eq!(
            event_message(&Event::Dtmf('5')),
            r#"{"digit":"5","event":"dtmf"}"#
        );
        let v: serde_json::Value = serde_json::from_str(&event_message(&Event::Mark {
            name: "m1".into(),
            cleared: false,
        }))
        .unwrap();
        assert_eq!(
            v,
            serde_json::json!({"event":"mark","name":"m1","cleared":false})
        );
        assert_eq!(stop_message(), r#"{"event":"stop"}"#);
    }

    #[test]
    fn agent_text_parsing() {
        assert_eq!(
            parse_agent_text(r#"{"event":"mark","name":"a"}"#),
            Some(AgentCommand::Mark("a".into()))
        );
        assert_eq!(
            parse_agent_text(r#"{"event":"clear"}"#),
            Some(AgentCommand::Clear)
        );
        assert_eq!(
            parse_agent_text(r#"{"event":"hangup"}"#),
            Some(AgentCommand::HangUp)
        );
        assert_eq!(parse_agent_text(r#"{"event":"mark"}"#), None);
        assert_eq!(parse_agent_text(r#"{"event":"nope"}"#), None);
        assert_eq!(parse_agent_text("not json"), None);
        assert_eq!(parse_agent_text(r#"[1,2]"#), None);
    }

    #[test]
    fn pcm_round_trip_little_endian() {
        let bytes = pcm_to_bytes(&[1, -2, i16::MAX]);
        assert_eq!(bytes, vec![1, 0, 0xfe, 0xff, 0xff, 0x7f]);
        assert_eq!(bytes_to_pcm(&bytes), vec![1, -2, i16::MAX]);
        assert_eq!(bytes_to_pcm(&[1, 0, 9]), vec![1]);
    }

    #[test]
    fn bearer_header_is_set_and_sensitive() {
        let target = AgentTarget {
            url: "ws://127.0.0.1:1/agent?k=v".into(),
            auth: Some(crate::config::Secret::new(
                b"tok".to_vec(),
                crate::config::SecretRef::Env("T".into()),
            )),
        };
        let req = request(&target).unwrap();
        let h = req.headers().get("authorization").unwrap();
        assert_eq!(h.as_bytes(), b"Bearer tok");
        assert!(h.is_sensitive());
        assert!(!format!("{target:?}").contains("tok"));
        assert!(!format!("{target:?}").contains("k=v"));
    }
}
