//! A scripted native-protocol agent (docs/agent-protocol.md) for failure and back-pressure
//! tests: one WebSocket server on a free loopback port whose n-th accepted connection
//! follows the n-th [`Behaviour`] of its script. Once the script is used up the listener
//! is closed, so further connection attempts are refused by the OS.
//!
//! Owns: its thread, its tokio runtime and what each connection saw ([`ConnLog`]). It
//! knows the protocol only from the documentation: text frames are JSON with `event`,
//! binary frames are PCM.

use futures_util::StreamExt;
use serde_json::Value;
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::Duration;
use tokio::net::TcpStream;
use tokio::sync::oneshot;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tokio_tungstenite::tungstenite::http::StatusCode;

/// What one connection does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Behaviour {
    /// Answer the upgrade with this HTTP status.
    Reject(u16),
    /// Accept TCP and never answer the upgrade request.
    Hang,
    /// Upgrade and read everything; never send.
    Silent,
    /// Upgrade, read `start`, then drop the connection without a close handshake.
    DropAfterStart,
    /// Upgrade, then never read from the socket again (with a small receive buffer,
    /// the bridge's sends soon block).
    NeverRead,
    /// Upgrade, send this text message right after `start`, then read everything.
    /// `{streamSid}` in it becomes the `start` message's `streamSid` (Twilio mode).
    SayAfterStart(&'static str),
}

/// What one connection saw.
#[derive(Debug, Default, Clone)]
pub(crate) struct ConnLog {
    /// The upgrade request's `Authorization` header.
    pub(crate) auth: Option<String>,
    /// The request path and query.
    pub(crate) uri: String,
    /// Text messages, parsed.
    pub(crate) texts: Vec<Value>,
    /// Binary messages received.
    pub(crate) frames: usize,
}

/// The text messages of `event` the connections got, in order.
pub(crate) fn events_named(conns: &[ConnLog], event: &str) -> Vec<Value> {
    conns
        .iter()
        .flat_map(|c| c.texts.iter())
        .filter(|v| v["event"] == event)
        .cloned()
        .collect()
}

/// A running scripted agent. Stops (and drops its connections, after up to 2 s for those
/// still reading to see the bridge's last messages) on [`TestAgent::finish`] or drop.
pub(crate) struct TestAgent {
    port: u16,
    stop: Option<oneshot::Sender<Duration>>,
    thread: Option<JoinHandle<()>>,
    conns: Arc<Mutex<Vec<ConnLog>>>,
}

/// Receive buffer of accepted sockets: small, so an agent that stops reading pushes back
/// on the bridge within a second or two instead of after megabytes.
const RECV_BUFFER: u32 = 4096;

impl TestAgent {
    /// Starts the agent on `127.0.0.1:0`.
    pub(crate) fn spawn(script: Vec<Behaviour>) -> TestAgent {
        TestAgent::spawn_on(0, script)
    }

    /// Starts the agent on `127.0.0.1:port` (0: any free port), e.g. again on the
    /// port of one that was killed.
    pub(crate) fn spawn_on(port: u16, script: Vec<Behaviour>) -> TestAgent {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.set_recv_buffer_size(RECV_BUFFER).unwrap();
        socket.set_reuseaddr(true).unwrap();
        socket
            .bind(std::net::SocketAddr::from(([127, 0, 0, 1], port)))
            .unwrap();
        let port = socket.local_addr().unwrap().port();
        let conns = Arc::new(Mutex::new(Vec::new()));
        let (stop_tx, stop_rx) = oneshot::channel();
        let shared = Arc::clone(&conns);
        let (bound_tx, bound_rx) = std::sync::mpsc::channel();
        let thread = thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(serve(socket, script, shared, stop_rx, bound_tx));
        });
        bound_rx
            .recv_timeout(Duration::from_secs(5))
            .expect("agent listening");
        TestAgent {
            port,
            stop: Some(stop_tx),
            thread: Some(thread),
            conns,
        }
    }

    /// The port it listens on.
    pub(crate) fn port(&self) -> u16 {
        self.port
    }

    /// What the connections saw so far, in accept order.
    pub(crate) fn conns(&self) -> Vec<ConnLog> {
        self.conns.lock().unwrap().clone()
    }

    /// Waits up to `timeout` until `n` connections were accepted.
    pub(crate) fn wait_for_conns(&self, n: usize, timeout: Duration) -> bool {
        let deadline = std::time::Instant::now() + timeout;
        while std::time::Instant::now() < deadline {
            if self.conns.lock().unwrap().len() >= n {
                return true;
            }
            thread::sleep(Duration::from_millis(10));
        }
        false
    }

    /// Stops the agent and returns what its connections saw.
    pub(crate) fn finish(mut self) -> Vec<ConnLog> {
        self.shutdown();
        self.conns()
    }

    /// Kills the agent as a crash would: its listener and every connection are cut at
    /// once (no close handshake, no grace). Returns what its connections saw.
    pub(crate) fn kill(mut self) -> Vec<ConnLog> {
        self.stop_within(Duration::ZERO);
        self.conns()
    }

    fn shutdown(&mut self) {
        self.stop_within(Duration::from_secs(2));
    }

    fn stop_within(&mut self, grace: Duration) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(grace);
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for TestAgent {
    fn drop(&mut self) {
        self.shutdown();
    }
}

async fn serve(
    socket: tokio::net::TcpSocket,
    script: Vec<Behaviour>,
    conns: Arc<Mutex<Vec<ConnLog>>>,
    mut stop: oneshot::Receiver<Duration>,
    bound: std::sync::mpsc::Sender<()>,
) {
    let listener = socket.listen(16).unwrap();
    let _ = bound.send(());
    let mut tasks = Vec::new();
    for behaviour in script {
        let stream = tokio::select! {
            r = listener.accept() => match r {
                Ok((stream, _)) => stream,
                Err(_) => break,
            },
            _ = &mut stop => return,
        };
        let index = {
            let mut c = conns.lock().unwrap();
            c.push(ConnLog::default());
            c.len() - 1
        };
        let conns = Arc::clone(&conns);
        tasks.push(tokio::spawn(connection(stream, behaviour, index, conns)));
    }
    // Script used up: refuse whatever comes next.
    drop(listener);
    let grace = stop.await.unwrap_or(Duration::ZERO);
    // A connection still reading gets a moment to take what the bridge sent last (its
    // `stop` and close frame) before it is cut; one that hangs or never reads is cut then.
    let grace = tokio::time::Instant::now() + grace;
    for mut t in tasks {
        if tokio::time::timeout_at(grace, &mut t).await.is_err() {
            t.abort();
        }
    }
}

async fn connection(
    stream: TcpStream,
    behaviour: Behaviour,
    index: usize,
    conns: Arc<Mutex<Vec<ConnLog>>>,
) {
    if behaviour == Behaviour::Hang {
        // Hold the socket, read nothing, answer nothing.
        let _held = stream;
        return std::future::pending::<()>().await;
    }
    let record = |f: &dyn Fn(&mut ConnLog)| f(&mut conns.lock().unwrap()[index]);
    #[allow(clippy::result_large_err)] // tungstenite's callback signature
    let ws = tokio_tungstenite::accept_hdr_async(stream, |req: &Request, resp| {
        record(&|c: &mut ConnLog| {
            c.auth = req
                .headers()
                .get("authorization")
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned);
            c.uri = req.uri().to_string();
        });
        if let Behaviour::Reject(status) = behaviour {
            let mut refusal = ErrorResponse::new(Some("refused".to_owned()));
            *refusal.status_mut() = StatusCode::from_u16(status).unwrap();
            return Err(refusal);
        }
        Ok::<Response, _>(resp)
    })
    .await;
    let Ok(mut ws) = ws else { return };
    if behaviour == Behaviour::NeverRead {
        let _held = ws;
        return std::future::pending::<()>().await;
    }
    while let Some(Ok(msg)) = ws.next().await {
        match msg {
            Message::Text(text) => {
                let v: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
                let start = v["event"] == "start";
                record(&|c: &mut ConnLog| c.texts.push(v.clone()));
                if start && behaviour == Behaviour::DropAfterStart {
                    return;
                }
                if let (true, Behaviour::SayAfterStart(text)) = (start, behaviour) {
                    use futures_util::SinkExt;
                    let sid = v["streamSid"].as_str().unwrap_or_default();
                    let text = text.replace("{streamSid}", sid);
                    if ws.send(Message::text(text)).await.is_err() {
                        return;
                    }
                }
            }
            Message::Binary(_) => record(&|c: &mut ConnLog| c.frames += 1),
            Message::Close(_) => {
                let _ = ws.close(None).await;
                break;
            }
            _ => {}
        }
    }
}
