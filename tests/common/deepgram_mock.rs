//! A Deepgram live (`/v1/listen`) server for tests, written from
//! `shared/specs/deepgram-live.md` and independent of the bridge's client.
//!
//! Owns: one loopback listener (port 0) served by a tokio runtime on its own
//! thread until the [`DeepgramMock`] is dropped; the upgrade checks (path,
//! `Authorization: Token <key>` → 401 with `dg-error`, query → 400), the idle
//! close (1011 `NET-0001` after [`MockConfig::idle_timeout`] without a binary or
//! text frame), scripted server messages keyed on the audio received per
//! connection, the `Finalize`/`CloseStream` sequence (last Results, optionally
//! late, Metadata with the sha256 and duration of the audio, close 1000), and a log of
//! everything each connection saw, with arrival times.

use futures_util::{SinkExt, StreamExt};
use sha2::Digest;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};
use tokio::sync::Notify;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tokio_tungstenite::tungstenite::http::{HeaderValue, StatusCode};
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

/// Encodings the spec lists for `/v1/listen`.
const ENCODINGS: &[&str] = &[
    "linear16", "linear32", "flac", "alaw", "mulaw", "amr-nb", "amr-wb", "opus", "ogg-opus",
    "speex", "g729",
];
/// Models this mock knows.
const MODELS: &[&str] = &[
    "nova-3",
    "nova-2",
    "nova-2-phonecall",
    "nova-3-medical",
    "nova",
    "enhanced",
    "base",
];

/// A server message the script sends.
#[derive(Debug, Clone)]
pub(crate) enum Scripted {
    /// A `Results` message.
    Results {
        start: f64,
        duration: f64,
        text: String,
        confidence: f64,
        is_final: bool,
        speech_final: bool,
    },
    /// `SpeechStarted` at stream second `timestamp`.
    SpeechStarted { timestamp: f64 },
    /// `UtteranceEnd` with `last_word_end`.
    UtteranceEnd { last_word_end: f64 },
}

impl Scripted {
    /// A final Results span.
    pub(crate) fn final_result(start: f64, duration: f64, text: &str, confidence: f64) -> Self {
        Scripted::Results {
            start,
            duration,
            text: text.to_owned(),
            confidence,
            is_final: true,
            speech_final: true,
        }
    }

    /// An interim (not final) Results span.
    pub(crate) fn interim(start: f64, duration: f64, text: &str) -> Self {
        Scripted::Results {
            start,
            duration,
            text: text.to_owned(),
            confidence: 0.5,
            is_final: false,
            speech_final: false,
        }
    }

    fn json(&self, request_id: &str, from_finalize: bool) -> String {
        match self {
            Scripted::Results {
                start,
                duration,
                text,
                confidence,
                is_final,
                speech_final,
            } => serde_json::json!({
                "type": "Results",
                "channel_index": [0, 1],
                "start": start,
                "duration": duration,
                "is_final": is_final,
                "speech_final": speech_final,
                "from_finalize": from_finalize,
                "channel": {"alternatives": [{
                    "transcript": text,
                    "confidence": confidence,
                    "words": [],
                }]},
                "metadata": {
                    "request_id": request_id,
                    "model_uuid": "00000000-0000-0000-0000-000000000001",
                    "model_info": {"name": "mock", "version": "1", "arch": "mock"},
                },
            }),
            Scripted::SpeechStarted { timestamp } => serde_json::json!({
                "type": "SpeechStarted", "channel": [0, 1], "timestamp": timestamp,
            }),
            Scripted::UtteranceEnd { last_word_end } => serde_json::json!({
                "type": "UtteranceEnd", "channel": [0, 1], "last_word_end": last_word_end,
            }),
        }
        .to_string()
    }
}

/// What one connection does.
#[derive(Debug, Clone, Default)]
pub(crate) struct ConnScript {
    /// (audio seconds received on this connection, message): sent once that
    /// much audio has arrived.
    pub(crate) at_audio: Vec<(f64, Scripted)>,
    /// Sent on `Finalize` (with `from_finalize: true`) or, if none came, on
    /// `CloseStream`.
    pub(crate) on_close: Vec<Scripted>,
    /// Drop the TCP connection (no close frame) once this much audio arrived.
    pub(crate) drop_at_audio: Option<f64>,
}

/// The mock's settings.
#[derive(Debug, Clone)]
pub(crate) struct MockConfig {
    /// The API key it accepts.
    pub(crate) key: String,
    /// Close with 1011 NET-0001 after this long without a frame (Deepgram: ~10 s).
    pub(crate) idle_timeout: Duration,
    /// One script per connection, in connection order (later ones: empty).
    pub(crate) scripts: Vec<ConnScript>,
    /// Refuse every upgrade that passes the checks with this status (e.g. 503).
    pub(crate) reject_status: Option<u16>,
    /// Results every connection sends after `CloseStream` (before Metadata),
    /// once [`MockConfig::close_stream_delay`] has passed: Deepgram's last
    /// results arriving while the bridge is closing.
    pub(crate) on_close_stream: Vec<Scripted>,
    /// How long the mock waits after `CloseStream` before it answers.
    pub(crate) close_stream_delay: Duration,
}

impl MockConfig {
    /// Accepts `key`, 10 s idle limit, no script.
    pub(crate) fn new(key: &str) -> Self {
        MockConfig {
            key: key.to_owned(),
            idle_timeout: Duration::from_secs(10),
            scripts: Vec::new(),
            reject_status: None,
            on_close_stream: Vec::new(),
            close_stream_delay: Duration::ZERO,
        }
    }
}

/// How a connection ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Ended {
    /// Still open.
    Open,
    /// After `CloseStream` (or an empty binary frame): Metadata, then close 1000.
    CloseStream,
    /// The idle timer fired: close 1011 NET-0001.
    Idle,
    /// Dropped by the script or by [`DeepgramMock::drop_connections`].
    Dropped,
    /// The client closed or vanished first.
    Client,
}

/// What one connection attempt saw.
#[derive(Debug, Clone)]
pub(crate) struct ConnLog {
    /// HTTP status of the upgrade answer (101, 400, 401).
    pub(crate) status: u16,
    pub(crate) path: String,
    pub(crate) query: HashMap<String, String>,
    pub(crate) authorization: Option<String>,
    pub(crate) opened: Instant,
    /// Binary frames with arrival times.
    pub(crate) frames: Vec<(Instant, Vec<u8>)>,
    /// Text frames with arrival times.
    pub(crate) texts: Vec<(Instant, String)>,
    /// Messages the mock sent (JSON text).
    pub(crate) sent: Vec<String>,
    pub(crate) ended: Ended,
}

impl ConnLog {
    /// The audio of this connection as 16-bit LE samples.
    pub(crate) fn pcm(&self) -> Vec<i16> {
        let bytes: Vec<u8> = self.frames.iter().flat_map(|(_, b)| b.clone()).collect();
        bytes
            .chunks_exact(2)
            .map(|c| i16::from_le_bytes([c[0], c[1]]))
            .collect()
    }

    /// The `type` of each text message received, in order.
    pub(crate) fn text_types(&self) -> Vec<String> {
        self.texts
            .iter()
            .map(|(_, t)| {
                serde_json::from_str::<serde_json::Value>(t)
                    .ok()
                    .and_then(|v| v["type"].as_str().map(str::to_owned))
                    .unwrap_or_else(|| format!("<invalid {t}>"))
            })
            .collect()
    }
}

/// A running mock. Dropping it stops it.
pub(crate) struct DeepgramMock {
    port: u16,
    log: Arc<Mutex<Vec<ConnLog>>>,
    drop_now: Arc<Notify>,
    stop: Arc<Notify>,
    thread: Option<thread::JoinHandle<()>>,
}

impl DeepgramMock {
    /// Starts the mock on `127.0.0.1:0`.
    pub(crate) fn start(config: MockConfig) -> DeepgramMock {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        listener.set_nonblocking(true).unwrap();
        let log = Arc::new(Mutex::new(Vec::new()));
        let drop_now = Arc::new(Notify::new());
        let stop = Arc::new(Notify::new());
        let (l2, d2, s2) = (Arc::clone(&log), Arc::clone(&drop_now), Arc::clone(&stop));
        let thread = thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener).unwrap();
                let config = Arc::new(config);
                loop {
                    tokio::select! {
                        () = s2.notified() => break,
                        accepted = listener.accept() => {
                            let Ok((stream, _)) = accepted else { continue };
                            let index = {
                                let mut log = l2.lock().unwrap();
                                log.push(ConnLog {
                                    status: 0,
                                    path: String::new(),
                                    query: HashMap::new(),
                                    authorization: None,
                                    opened: Instant::now(),
                                    frames: Vec::new(),
                                    texts: Vec::new(),
                                    sent: Vec::new(),
                                    ended: Ended::Open,
                                });
                                log.len() - 1
                            };
                            tokio::spawn(serve(
                                stream,
                                index,
                                Arc::clone(&config),
                                Arc::clone(&l2),
                                Arc::clone(&d2),
                            ));
                        }
                    }
                }
            });
        });
        DeepgramMock {
            port,
            log,
            drop_now,
            stop,
            thread: Some(thread),
        }
    }

    /// `ws://127.0.0.1:PORT`, for a tenant's `base_url`.
    pub(crate) fn base_url(&self) -> String {
        format!("ws://127.0.0.1:{}", self.port)
    }

    /// Every connection attempt so far.
    pub(crate) fn connections(&self) -> Vec<ConnLog> {
        self.log.lock().unwrap().clone()
    }

    /// Drops every open connection now (no close frame).
    pub(crate) fn drop_connections(&self) {
        self.drop_now.notify_waiters();
    }

    /// Waits up to `timeout` until `pred` holds for the connection log.
    pub(crate) fn wait_until(
        &self,
        timeout: Duration,
        pred: impl Fn(&[ConnLog]) -> bool,
    ) -> Vec<ConnLog> {
        let deadline = Instant::now() + timeout;
        loop {
            let conns = self.connections();
            if pred(&conns) || Instant::now() >= deadline {
                return conns;
            }
            thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for DeepgramMock {
    fn drop(&mut self) {
        self.stop.notify_one();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn uuid_like(n: usize) -> String {
    format!("8c8ebea9-dbec-45fa-a035-{n:012x}")
}

fn json_error(
    status: StatusCode,
    dg_error: &str,
    body: serde_json::Value,
    id: &str,
) -> ErrorResponse {
    let mut resp = ErrorResponse::new(Some(body.to_string()));
    *resp.status_mut() = status;
    let headers = resp.headers_mut();
    headers.insert("dg-error", HeaderValue::from_str(dg_error).unwrap());
    headers.insert("dg-request-id", HeaderValue::from_str(id).unwrap());
    headers.insert("content-type", HeaderValue::from_static("application/json"));
    resp
}

/// The upgrade decision (spec §1, §7.1): `Ok(())` or the refusal.
#[allow(clippy::result_large_err)] // tungstenite's refusal type
fn check_upgrade(req: &Request, key: &str, id: &str) -> Result<(), ErrorResponse> {
    if req.uri().path() != "/v1/listen" {
        return Err(json_error(
            StatusCode::NOT_FOUND,
            "Not found.",
            serde_json::json!({"err_code": "NOT_FOUND", "err_msg": "Not found.", "request_id": id}),
            id,
        ));
    }
    let auth = req
        .headers()
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    let (scheme, given) = auth.split_once(char::is_whitespace).unwrap_or(("", ""));
    if !scheme.eq_ignore_ascii_case("token") || given.trim() != key {
        return Err(json_error(
            StatusCode::UNAUTHORIZED,
            "Invalid credentials.",
            serde_json::json!({"err_code": "INVALID_AUTH", "err_msg": "Invalid credentials.", "request_id": id}),
            id,
        ));
    }
    let query = parse_query(req.uri().query().unwrap_or_default());
    #[allow(clippy::result_large_err)]
    let bad = |why: String| {
        Err(json_error(
            StatusCode::BAD_REQUEST,
            &why,
            serde_json::json!({"err_code": "INVALID_QUERY_PARAMETER",
                "err_msg": format!("Failed to deserialize query parameters: {why}"), "request_id": id}),
            id,
        ))
    };
    if let Some(enc) = query.get("encoding") {
        if !ENCODINGS.contains(&enc.as_str()) {
            return bad(format!("unknown encoding {enc}"));
        }
        match query.get("sample_rate").map(|r| r.parse::<u32>()) {
            Some(Ok(r)) if r > 0 => {}
            _ => return bad("sample_rate must be a positive integer".into()),
        }
    }
    if let Some(model) = query.get("model")
        && !MODELS.contains(&model.as_str())
    {
        return bad(format!("unknown model {model}"));
    }
    if let Some(c) = query.get("channels")
        && c.parse::<u16>().map_or(true, |c| c == 0)
    {
        return bad("channels must be a positive integer".into());
    }
    Ok(())
}

fn percent_decode(s: &str) -> String {
    let hex = |b: u8| char::from(b).to_digit(16).map(|d| d as u8);
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let escaped = match (bytes[i], bytes.get(i + 1), bytes.get(i + 2)) {
            (b'%', Some(&h), Some(&l)) => hex(h).zip(hex(l)).map(|(h, l)| h * 16 + l),
            _ => None,
        };
        match (escaped, bytes[i]) {
            (Some(b), _) => {
                out.push(b);
                i += 3;
                continue;
            }
            (None, b'+') => out.push(b' '),
            (None, b) => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// `a=1&b=x%20y` → map (last value wins).
pub(crate) fn parse_query(q: &str) -> HashMap<String, String> {
    q.split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (percent_decode(k), percent_decode(v))
        })
        .collect()
}

async fn serve(
    stream: tokio::net::TcpStream,
    index: usize,
    config: Arc<MockConfig>,
    log: Arc<Mutex<Vec<ConnLog>>>,
    drop_now: Arc<Notify>,
) {
    let id = uuid_like(index);
    let mut seen = (String::new(), HashMap::new(), None, 101u16);
    #[allow(clippy::result_large_err)] // tungstenite's callback signature
    let ws = tokio_tungstenite::accept_hdr_async(stream, |req: &Request, mut resp: Response| {
        seen.0 = req.uri().path().to_owned();
        seen.1 = parse_query(req.uri().query().unwrap_or_default());
        seen.2 = req
            .headers()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let checked = check_upgrade(req, &config.key, &id).and_then(|()| match config.reject_status {
            Some(status) => Err(json_error(
                StatusCode::from_u16(status).unwrap(),
                "Service unavailable.",
                serde_json::json!({"err_code": "UNAVAILABLE", "err_msg": "Service unavailable.", "request_id": id}),
                &id,
            )),
            None => Ok(()),
        });
        match checked {
            Ok(()) => {
                resp.headers_mut()
                    .insert("dg-request-id", HeaderValue::from_str(&id).unwrap());
                Ok(resp)
            }
            Err(refusal) => {
                seen.3 = refusal.status().as_u16();
                // Logged before the refusal is written: a client that has
                // read it finds it in the log (the update after the await
                // below could come after the client's next step).
                log.lock().unwrap()[index].status = seen.3;
                Err(refusal)
            }
        }
    })
    .await;
    {
        let mut l = log.lock().unwrap();
        let c = &mut l[index];
        c.path = seen.0;
        c.query = seen.1.clone();
        c.authorization = seen.2;
        c.status = seen.3;
        if ws.is_err() {
            c.ended = Ended::Client;
        }
    }
    let Ok(mut ws) = ws else { return };
    let rate: f64 = seen
        .1
        .get("sample_rate")
        .and_then(|r| r.parse().ok())
        .unwrap_or(16_000.0);
    let channels: f64 = seen
        .1
        .get("channels")
        .and_then(|r| r.parse().ok())
        .unwrap_or(1.0);
    let script = config
        .scripts
        .get(index_among_upgraded(&log, index))
        .cloned()
        .unwrap_or_default();
    let mut pending: Vec<(f64, Scripted)> = script.at_audio.clone();
    let mut on_close = Some(script.on_close.clone());
    let mut audio_bytes: usize = 0;
    let mut sha = sha2::Sha256::new();
    let mut last_frame = tokio::time::Instant::now();
    let set_ended = |e: Ended| log.lock().unwrap()[index].ended = e;
    loop {
        let idle_at = last_frame + config.idle_timeout;
        let dropper = drop_now.notified();
        tokio::select! {
            () = dropper => {
                set_ended(Ended::Dropped);
                return; // TCP dropped without a close frame
            }
            () = tokio::time::sleep_until(idle_at) => {
                let _ = ws.close(Some(CloseFrame {
                    code: CloseCode::Error,
                    reason: "NET-0001: no audio received within the timeout".into(),
                })).await;
                set_ended(Ended::Idle);
                return;
            }
            msg = ws.next() => {
                let Some(Ok(msg)) = msg else {
                    set_ended(Ended::Client);
                    return;
                };
                let now = Instant::now();
                let mut close_stream = false;
                match msg {
                    Message::Binary(bytes) => {
                        last_frame = tokio::time::Instant::now();
                        if bytes.is_empty() {
                            close_stream = true; // deprecated CloseStream form
                        } else {
                            audio_bytes += bytes.len();
                            sha.update(&bytes);
                            log.lock().unwrap()[index].frames.push((now, bytes.to_vec()));
                        }
                    }
                    Message::Text(text) => {
                        last_frame = tokio::time::Instant::now();
                        log.lock().unwrap()[index].texts.push((now, text.to_string()));
                        let kind = serde_json::from_str::<serde_json::Value>(&text)
                            .ok()
                            .and_then(|v| v["type"].as_str().map(str::to_owned));
                        match kind.as_deref() {
                            Some("Finalize") => {
                                for s in on_close.take().unwrap_or_default() {
                                    let m = s.json(&id, true);
                                    log.lock().unwrap()[index].sent.push(m.clone());
                                    if ws.send(Message::text(m)).await.is_err() {
                                        set_ended(Ended::Client);
                                        return;
                                    }
                                }
                            }
                            Some("CloseStream") => close_stream = true,
                            _ => {} // KeepAlive and unknown types: no reply
                        }
                    }
                    Message::Close(_) => {
                        set_ended(Ended::Client);
                        return;
                    }
                    _ => {}
                }
                if close_stream {
                    tokio::time::sleep(config.close_stream_delay).await;
                    let mut out: Vec<String> = on_close
                        .take()
                        .unwrap_or_default()
                        .iter()
                        .chain(&config.on_close_stream)
                        .map(|s| s.json(&id, false))
                        .collect();
                    let digest = std::mem::replace(&mut sha, sha2::Sha256::new()).finalize();
                    out.push(serde_json::json!({
                        "type": "Metadata",
                        "transaction_key": "deprecated",
                        "request_id": id,
                        "sha256": hex::encode(digest),
                        "created": "2026-01-01T00:00:00.000Z",
                        "duration": audio_bytes as f64 / (rate * 2.0 * channels),
                        "channels": channels as u64,
                    }).to_string());
                    for m in out {
                        log.lock().unwrap()[index].sent.push(m.clone());
                        let _ = ws.send(Message::text(m)).await;
                    }
                    let _ = ws.close(Some(CloseFrame { code: CloseCode::Normal, reason: "".into() })).await;
                    set_ended(Ended::CloseStream);
                    // Let the close handshake finish (bounded).
                    let _ = tokio::time::timeout(Duration::from_secs(1), async {
                        while ws.next().await.is_some() {}
                    }).await;
                    return;
                }
                let audio_s = audio_bytes as f64 / (rate * 2.0 * channels);
                if script.drop_at_audio.is_some_and(|d| audio_s >= d) {
                    set_ended(Ended::Dropped);
                    return;
                }
                let due: Vec<Scripted> = pending
                    .iter()
                    .filter(|(at, _)| *at <= audio_s)
                    .map(|(_, s)| s.clone())
                    .collect();
                pending.retain(|(at, _)| *at > audio_s);
                for s in due {
                    let m = s.json(&id, false);
                    log.lock().unwrap()[index].sent.push(m.clone());
                    if ws.send(Message::text(m)).await.is_err() {
                        set_ended(Ended::Client);
                        return;
                    }
                }
            }
        }
    }
}

/// The position of connection `index` among the upgraded (101) connections:
/// refused attempts do not use up a script.
fn index_among_upgraded(log: &Arc<Mutex<Vec<ConnLog>>>, index: usize) -> usize {
    let log = log.lock().unwrap();
    log.iter().take(index).filter(|c| c.status == 101).count()
}
