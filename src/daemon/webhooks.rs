//! Call event webhooks (issue 13 item 4; docs/webhooks.md,
//! docs/events.schema.json): each tenant with an `events_url` gets its
//! calls' events — `call.started`, `call.answered`, `call.ended` (the CDR as
//! the CDR log shows it), `recording.ready`, `transcript.ready`,
//! `transfer.started|completed|failed` — as signed HTTPS POSTs.
//!
//! Owns: [`Events`] — the typed emitters the call tasks, the store's writer
//! thread and the transfer code call, one bounded queue per tenant, one
//! delivery task per tenant, the HTTP client and the signature.
//! Must not touch: call state (emitters take what the shell already has),
//! the store, the wire protocols of SIP and the pipelines.
//!
//! Rules:
//! - An emitter never waits: it locks a queue for a push and returns. A full
//!   queue (`events_queue`, default 1000) drops its *oldest* event, counted
//!   in `sipbridge_webhook_events_dropped_total{reason="queue_full"}`.
//! - One task per tenant delivers its events one at a time, in the order
//!   they were emitted, so a call's events arrive in order. An event is
//!   retried after any failure (no connection, TLS, timeout, a non-2xx
//!   answer) with exponential back-off ([`BACKOFF_INITIAL`] doubling to
//!   [`BACKOFF_MAX`], times a random factor in [½, 1)) until it is
//!   [`MAX_AGE`] old; then it is dropped (`reason="expired"`). Later events
//!   wait behind it: a receiver that is down gets everything (up to the
//!   queue's size) once it is back.
//! - Every attempt is signed anew: `Sipbridge-Signature: t=<unix seconds>,
//!   v1=<hex HMAC-SHA256 of "<t>.<body>" under events_secret>`. The event's
//!   `id` stays the same across attempts (receivers de-duplicate by it).
//! - At shutdown the queues get [`SHUTDOWN_GRACE`] to empty; what is left is
//!   dropped (`reason="shutdown"`): events live in memory only.
//!
//! HTTP client: hyper's HTTP/1 connection API over tokio-rustls, a
//! keep-alive connection per tenant. hyper, hyper-util, http and
//! http-body-util were already built for axum (only hyper's `client` feature
//! is new); reqwest would have added ~40 crates to a 3-minute build for one
//! POST. The receiver's certificate must chain to the Mozilla roots or to
//! the tenant's `events_ca` (the same client configuration as outbound SIP
//! TLS, [`crate::config::tls::client_config`]).

use crate::config::EventsTarget;
use bytes::Bytes;
use hmac::{Hmac, KeyInit, Mac};
use http_body_util::{BodyExt, Full, Limited};
use rand::Rng;
use serde::Serialize;
use sha2::Sha256;
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};
use tokio::sync::Notify;
use tracing::{debug, info, warn};

/// The first retry's back-off before jitter.
pub(crate) const BACKOFF_INITIAL: Duration = Duration::from_secs(1);
/// Back-offs double up to this (before jitter).
pub(crate) const BACKOFF_MAX: Duration = Duration::from_secs(60);
/// An event not delivered by this age is dropped.
pub(crate) const MAX_AGE: Duration = Duration::from_secs(15 * 60);
/// One delivery attempt: connect, TLS, request and the answer's head.
pub(crate) const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the shutdown waits for the queues to empty.
pub(crate) const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);
/// The answer's body is read up to this (and then discarded).
const MAX_ANSWER_BODY: usize = 64 * 1024;
/// The signature header.
pub(crate) const SIGNATURE_HEADER: &str = "sipbridge-signature";

/// A call event type (`type` of the envelope); the list is
/// [`crate::config::EVENT_TYPES`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub(crate) enum EventType {
    /// The INVITE was accepted (the call has a task and an RTP port).
    CallStarted,
    /// The 200 OK was sent.
    CallAnswered,
    /// The call ended; its CDR.
    CallEnded,
    /// A recording was finished (complete, or partial after a failed write).
    RecordingReady,
    /// The call's transcript segments are all stored.
    TranscriptReady,
    /// A transfer began.
    TransferStarted,
    /// A transfer succeeded: the caller is with the target.
    TransferCompleted,
    /// A transfer failed: the caller stays with the agent.
    TransferFailed,
}

impl EventType {
    /// Every type, in [`crate::config::EVENT_TYPES`] order.
    #[cfg(test)]
    pub(crate) const ALL: [EventType; 8] = [
        EventType::CallStarted,
        EventType::CallAnswered,
        EventType::CallEnded,
        EventType::RecordingReady,
        EventType::TranscriptReady,
        EventType::TransferStarted,
        EventType::TransferCompleted,
        EventType::TransferFailed,
    ];

    /// The wire name.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            EventType::CallStarted => "call.started",
            EventType::CallAnswered => "call.answered",
            EventType::CallEnded => "call.ended",
            EventType::RecordingReady => "recording.ready",
            EventType::TranscriptReady => "transcript.ready",
            EventType::TransferStarted => "transfer.started",
            EventType::TransferCompleted => "transfer.completed",
            EventType::TransferFailed => "transfer.failed",
        }
    }
}

/// A transfer, as `transfer.*` events describe it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub(crate) struct Transfer {
    /// The target as the daemon dials or refers it (`sip:…`, `tel:+…`).
    pub(crate) to: String,
    /// `blind` (REFER to the caller's side) or `bridge` (a second leg).
    pub(crate) mode: &'static str,
}

/// The envelope every event has (docs/events.schema.json).
#[derive(Debug, Clone, Serialize)]
struct Envelope {
    /// `evt_` + 24 hex digits, the same on every attempt.
    id: String,
    #[serde(rename = "type")]
    kind: &'static str,
    /// Unix milliseconds when it happened.
    created_at: i64,
    tenant: String,
    call_id: String,
    data: serde_json::Value,
}

/// One event waiting in a queue.
#[derive(Debug)]
struct Queued {
    envelope: Envelope,
    emitted: Instant,
}

/// One tenant's queue and its delivery task's switches.
struct TenantQueue {
    tenant: String,
    target: EventsTarget,
    tls: Arc<rustls::ClientConfig>,
    events: Mutex<VecDeque<Queued>>,
    /// An event was queued (one stored permit wakes the task).
    wake: Notify,
    /// The task holds an event it has not delivered or dropped yet.
    busy: AtomicBool,
    /// Replaced by a reload (or the daemon stops): the task hands what it
    /// holds to `successor` and ends.
    closed: AtomicBool,
    close: Notify,
    successor: Mutex<Option<Arc<TenantQueue>>>,
    /// Events dropped because the queue was full.
    dropped: AtomicU64,
}

impl TenantQueue {
    fn push(&self, q: Queued) {
        let len = {
            let mut events = super::lock(&self.events);
            if events.len() >= self.target.queue {
                events.pop_front();
                let n = self.dropped.fetch_add(1, Ordering::Relaxed) + 1;
                crate::metrics::webhook_dropped(&self.tenant, "queue_full", 1);
                if n.is_power_of_two() {
                    warn!(tenant = %self.tenant, dropped = n, "webhook queue full; oldest event dropped");
                }
            }
            events.push_back(q);
            events.len()
        };
        crate::metrics::webhook_queued(&self.tenant, len);
        self.wake.notify_one();
    }

    fn pop(&self) -> Option<Queued> {
        let mut events = super::lock(&self.events);
        let q = events.pop_front();
        if q.is_some() {
            self.busy.store(true, Ordering::Relaxed);
        }
        crate::metrics::webhook_queued(&self.tenant, events.len());
        q
    }

    fn idle(&self) -> bool {
        !self.busy.load(Ordering::Relaxed) && super::lock(&self.events).is_empty()
    }

    /// Hands the held event (front) and the queue to the successor, or
    /// drops them when there is none.
    fn hand_over(&self, held: Option<Queued>, reason: &'static str) {
        let mut rest: VecDeque<Queued> = std::mem::take(&mut *super::lock(&self.events));
        if let Some(h) = held {
            rest.push_front(h);
        }
        self.busy.store(false, Ordering::Relaxed);
        crate::metrics::webhook_queued(&self.tenant, 0);
        let successor = super::lock(&self.successor).clone();
        match successor {
            Some(next) => {
                let mut events = super::lock(&next.events);
                while let Some(q) = rest.pop_back() {
                    events.push_front(q);
                }
                while events.len() > next.target.queue {
                    events.pop_front();
                    crate::metrics::webhook_dropped(&self.tenant, "queue_full", 1);
                }
                drop(events);
                next.wake.notify_one();
            }
            None if !rest.is_empty() => {
                crate::metrics::webhook_dropped(&self.tenant, reason, rest.len() as u64);
                warn!(tenant = %self.tenant, dropped = rest.len(), reason, "call events dropped undelivered");
            }
            None => {}
        }
    }
}

/// The daemon's call event webhooks: typed emitters and one delivery task
/// per tenant that has an `events_url`.
#[derive(Default)]
pub(crate) struct Events {
    tenants: Mutex<HashMap<String, Arc<TenantQueue>>>,
}

impl Events {
    /// Starts (or, after a reload, keeps, replaces or stops) one delivery
    /// task per tenant with an `events_url`. A changed receiver takes over
    /// the old one's queue. Call within the tokio runtime.
    pub(crate) fn configure(&self, tenants: &[crate::config::Tenant]) {
        self.configure_targets(
            tenants
                .iter()
                .filter_map(|t| Some((t.id.as_str(), t.events.as_ref()?))),
        );
    }

    /// [`Events::configure`] with each tenant's receiver.
    fn configure_targets<'a>(&self, targets: impl Iterator<Item = (&'a str, &'a EventsTarget)>) {
        let mut map = super::lock(&self.tenants);
        let mut next = HashMap::new();
        for (id, target) in targets {
            if let Some(q) = map.get(id)
                && q.target == *target
            {
                next.insert(id.to_owned(), Arc::clone(q));
                continue;
            }
            let tls = match crate::config::tls::client_config(
                target.ca.as_ref().map(crate::config::Secret::expose),
            ) {
                Ok(c) => c,
                Err(e) => {
                    // Checked at load; a CA that stopped parsing since is logged.
                    warn!(tenant = %id, error = %e, "events_ca unusable; call events not sent");
                    continue;
                }
            };
            let q = Arc::new(TenantQueue {
                tenant: id.to_owned(),
                target: target.clone(),
                tls,
                events: Mutex::new(VecDeque::new()),
                wake: Notify::new(),
                busy: AtomicBool::new(false),
                closed: AtomicBool::new(false),
                close: Notify::new(),
                successor: Mutex::new(None),
                dropped: AtomicU64::new(0),
            });
            info!(tenant = %id, url = %crate::logging::wire(&target.display_url()), "call events webhook");
            tokio::spawn(deliver(Arc::clone(&q)));
            if let Some(old) = map.get(id) {
                *super::lock(&old.successor) = Some(Arc::clone(&q));
            }
            next.insert(id.to_owned(), q);
        }
        for (_, old) in map.drain() {
            let kept = next.get(&old.tenant).is_some_and(|q| Arc::ptr_eq(q, &old));
            if !kept {
                old.closed.store(true, Ordering::Relaxed);
                old.close.notify_one();
            }
        }
        *map = next;
    }

    /// Waits until every queue is empty, at most `grace`, then stops the
    /// delivery tasks; what is left is dropped and counted.
    pub(crate) async fn shutdown(&self, grace: Duration) {
        let deadline = Instant::now() + grace;
        loop {
            let idle = super::lock(&self.tenants).values().all(|q| q.idle());
            if idle || Instant::now() >= deadline {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        for (_, q) in super::lock(&self.tenants).drain() {
            q.closed.store(true, Ordering::Relaxed);
            q.close.notify_one();
        }
    }

    /// Queues one event for `tenant`'s receiver, if it has one that wants
    /// this type. Never waits.
    fn emit(&self, tenant: &str, call_id: &str, kind: EventType, data: serde_json::Value) {
        let Some(q) = super::lock(&self.tenants).get(tenant).cloned() else {
            return;
        };
        if !q.target.wants(kind.as_str()) {
            return;
        }
        let id: [u8; 12] = rand::rng().random();
        let envelope = Envelope {
            id: format!("evt_{}", hex::encode(id)),
            kind: kind.as_str(),
            created_at: crate::store::db::unix_ms(SystemTime::now()),
            tenant: tenant.to_owned(),
            call_id: call_id.to_owned(),
            data,
        };
        q.push(Queued {
            envelope,
            emitted: Instant::now(),
        });
    }

    /// Whether `tenant` has a receiver (so emitters can skip building data).
    pub(crate) fn enabled(&self, tenant: &str) -> bool {
        super::lock(&self.tenants).contains_key(tenant)
    }

    /// `call.started`: the INVITE was accepted. Numbers as the CDR log shows them.
    pub(crate) fn call_started(&self, tenant: &str, call: &CallStarted) {
        self.emit(
            tenant,
            &call.call_id,
            EventType::CallStarted,
            to_value(call),
        );
    }

    /// `call.answered`: the 200 OK was sent.
    pub(crate) fn call_answered(&self, tenant: &str, call_id: &str, answered_at: i64, codec: &str) {
        let data = serde_json::json!({ "answered_at": answered_at, "codec": codec });
        self.emit(tenant, call_id, EventType::CallAnswered, data);
    }

    /// `call.ended`: the call's CDR as the CDR log shows it (no audio).
    pub(crate) fn call_ended(&self, tenant: &str, call_id: &str, cdr: serde_json::Value) {
        let data = serde_json::json!({ "cdr": cdr });
        self.emit(tenant, call_id, EventType::CallEnded, data);
    }

    /// `recording.ready`: a recording was finished (never its key or path).
    pub(crate) fn recording_ready(&self, tenant: &str, call_id: &str, rec: &RecordingReady) {
        self.emit(tenant, call_id, EventType::RecordingReady, to_value(rec));
    }

    /// `transcript.ready`: all `segments` of the call's transcript are stored.
    pub(crate) fn transcript_ready(&self, tenant: &str, call_id: &str, segments: u64) {
        let data = serde_json::json!({ "segments": segments });
        self.emit(tenant, call_id, EventType::TranscriptReady, data);
    }

    /// `transfer.started`: the daemon began transferring the call.
    pub(crate) fn transfer_started(&self, tenant: &str, call_id: &str, t: &Transfer) {
        self.emit(tenant, call_id, EventType::TransferStarted, to_value(t));
    }

    /// `transfer.completed`: the caller is with the target; `sip_status` is
    /// the target's (bridge) or the NOTIFY sipfrag's (blind) final status.
    pub(crate) fn transfer_completed(
        &self,
        tenant: &str,
        call_id: &str,
        t: &Transfer,
        sip_status: Option<u16>,
    ) {
        let mut data = to_value(t);
        data["sip_status"] = sip_status.into();
        self.emit(tenant, call_id, EventType::TransferCompleted, data);
    }

    /// `transfer.failed`: the caller stays with the agent; `reason` is one
    /// word (`busy`, `no-answer`, `rejected`, `timeout`, …).
    pub(crate) fn transfer_failed(
        &self,
        tenant: &str,
        call_id: &str,
        t: &Transfer,
        reason: &str,
        sip_status: Option<u16>,
    ) {
        let mut data = to_value(t);
        data["reason"] = reason.into();
        data["sip_status"] = sip_status.into();
        self.emit(tenant, call_id, EventType::TransferFailed, data);
    }
}

fn to_value(v: &impl Serialize) -> serde_json::Value {
    serde_json::to_value(v).unwrap_or_default()
}

/// `call.started`'s data.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct CallStarted {
    #[serde(skip)]
    pub(crate) call_id: String,
    pub(crate) trunk: String,
    /// Masked as in the CDR log.
    pub(crate) from: String,
    /// Masked when the tenant hashes caller numbers, as in the CDR log.
    pub(crate) to: String,
    /// Unix milliseconds the INVITE arrived.
    pub(crate) started_at: i64,
    /// Whether the tenant records this call (the caller may still opt out).
    pub(crate) recording: bool,
}

/// `recording.ready`'s data.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct RecordingReady {
    /// The recording's id (the admin API's `/v1/recordings/{id}`).
    pub(crate) recording_id: String,
    /// `complete`, or `partial` (a write failed; what was sealed is kept).
    pub(crate) state: &'static str,
    pub(crate) duration_ms: u64,
    /// Size of the sealed file.
    pub(crate) bytes: u64,
}

/// The `Sipbridge-Signature` value for `body` signed at unix second `t`.
pub(crate) fn signature(secret: &[u8], t: u64, body: &[u8]) -> String {
    let mut mac = <Hmac<Sha256> as KeyInit>::new_from_slice(secret)
        .unwrap_or_else(|_| <Hmac<Sha256> as KeyInit>::new(&Default::default()));
    mac.update(t.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    format!("t={t},v1={}", hex::encode(mac.finalize().into_bytes()))
}

/// The back-off before retry `attempt` (1-based), jittered by `r` in [0, 1).
pub(crate) fn backoff(attempt: u32, r: f64) -> Duration {
    let base = BACKOFF_INITIAL
        .saturating_mul(1u32 << attempt.saturating_sub(1).min(16))
        .min(BACKOFF_MAX);
    base.mul_f64(0.5 + r.clamp(0.0, 1.0) / 2.0)
}

/// Why one delivery attempt failed (no secrets, no bodies).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub(crate) enum DeliveryError {
    #[error("connect: {0}")]
    Connect(std::io::Error),
    #[error("TLS: {0}")]
    Tls(std::io::Error),
    #[error("HTTP: {0}")]
    Http(String),
    #[error("answered {0}")]
    Status(u16),
    #[error("no answer within {}s", ATTEMPT_TIMEOUT.as_secs())]
    Timeout,
}

type Sender = hyper::client::conn::http1::SendRequest<Full<Bytes>>;

/// One tenant's HTTPS client: one keep-alive connection, reopened as needed.
struct Client {
    queue: Arc<TenantQueue>,
    conn: Option<Sender>,
}

impl Client {
    async fn connect(&self) -> Result<Sender, DeliveryError> {
        let t = &self.queue.target;
        let tcp = tokio::net::TcpStream::connect((t.host.as_str(), t.port))
            .await
            .map_err(DeliveryError::Connect)?;
        let _ = tcp.set_nodelay(true);
        let name = rustls_pki_types::ServerName::try_from(t.host.clone())
            .map_err(|e| DeliveryError::Tls(std::io::Error::other(e.to_string())))?;
        let tls = tokio_rustls::TlsConnector::from(Arc::clone(&self.queue.tls))
            .connect(name, tcp)
            .await
            .map_err(DeliveryError::Tls)?;
        let (sender, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls))
                .await
                .map_err(|e| DeliveryError::Http(e.to_string()))?;
        // Ends when the sender is dropped or the server closes.
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(sender)
    }

    /// POSTs `body`, signed now; Ok on a 2xx answer. A kept-alive
    /// connection the receiver closed meanwhile (idle timeouts) is replaced
    /// once at no cost to the attempt.
    async fn post(
        &mut self,
        ev: &Envelope,
        body: &Bytes,
        attempt: u32,
    ) -> Result<(), DeliveryError> {
        let reused = match self.conn.take() {
            Some(mut s) if !s.is_closed() => s.ready().await.is_ok().then_some(s),
            _ => None,
        };
        let was_reused = reused.is_some();
        let mut sender = match reused {
            Some(s) => s,
            None => self.connect().await?,
        };
        let answer = match sender.send_request(self.request(ev, body, attempt)?).await {
            Ok(a) => a,
            Err(e) if was_reused => {
                debug!(tenant = %self.queue.tenant, error = %e, "kept-alive connection failed; reconnecting");
                sender = self.connect().await?;
                sender
                    .send_request(self.request(ev, body, attempt)?)
                    .await
                    .map_err(|e| DeliveryError::Http(e.to_string()))?
            }
            Err(e) => return Err(DeliveryError::Http(e.to_string())),
        };
        let status = answer.status();
        // Read (and drop) a bounded body so the connection can be reused.
        if Limited::new(answer.into_body(), MAX_ANSWER_BODY)
            .collect()
            .await
            .is_ok()
        {
            self.conn = Some(sender);
        }
        if status.is_success() {
            Ok(())
        } else {
            Err(DeliveryError::Status(status.as_u16()))
        }
    }

    /// The signed request for one attempt.
    fn request(
        &self,
        ev: &Envelope,
        body: &Bytes,
        attempt: u32,
    ) -> Result<http::Request<Full<Bytes>>, DeliveryError> {
        let t = &self.queue.target;
        let now = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let host = if t.host.contains(':') {
            format!("[{}]:{}", t.host, t.port)
        } else {
            format!("{}:{}", t.host, t.port)
        };
        http::Request::post(t.path.as_str())
            .header(http::header::HOST, host)
            .header(http::header::CONTENT_TYPE, "application/json")
            .header(
                http::header::USER_AGENT,
                concat!("sipbridge/", env!("CARGO_PKG_VERSION")),
            )
            .header(SIGNATURE_HEADER, signature(t.secret.expose(), now, body))
            .header("sipbridge-event-id", ev.id.as_str())
            .header("sipbridge-event-type", ev.kind)
            .header("sipbridge-delivery-attempt", attempt)
            .body(Full::new(body.clone()))
            .map_err(|e| DeliveryError::Http(e.to_string()))
    }
}

/// One tenant's delivery task: pops events in order and delivers each,
/// retrying with back-off until it is [`MAX_AGE`] old.
async fn deliver(q: Arc<TenantQueue>) {
    let mut client = Client {
        queue: Arc::clone(&q),
        conn: None,
    };
    let mut failing = false;
    loop {
        if q.closed.load(Ordering::Relaxed) {
            q.hand_over(None, "shutdown");
            return;
        }
        let Some(ev) = q.pop() else {
            tokio::select! {
                () = q.wake.notified() => {}
                () = q.close.notified() => {}
            }
            continue;
        };
        let body = Bytes::from(serde_json::to_vec(&ev.envelope).unwrap_or_default());
        let mut attempt = 0u32;
        loop {
            attempt += 1;
            let result =
                tokio::time::timeout(ATTEMPT_TIMEOUT, client.post(&ev.envelope, &body, attempt))
                    .await
                    .unwrap_or(Err(DeliveryError::Timeout));
            crate::metrics::webhook_delivery(&q.tenant, result.is_ok());
            match result {
                Ok(()) => {
                    if failing {
                        info!(tenant = %q.tenant, "webhook receiver accepts events again");
                        failing = false;
                    }
                    debug!(tenant = %q.tenant, event = ev.envelope.kind, attempt, "call event delivered");
                    q.busy.store(false, Ordering::Relaxed);
                    break;
                }
                Err(e) => {
                    client.conn = None;
                    if !failing {
                        warn!(tenant = %q.tenant, error = %e, "webhook delivery failed; retrying with back-off");
                        failing = true;
                    } else {
                        debug!(tenant = %q.tenant, error = %e, attempt, "webhook delivery failed");
                    }
                    let wait = backoff(attempt, rand::rng().random());
                    if ev.emitted.elapsed() + wait > MAX_AGE {
                        warn!(tenant = %q.tenant, event = ev.envelope.kind, id = %ev.envelope.id, attempts = attempt, "call event expired undelivered");
                        crate::metrics::webhook_dropped(&q.tenant, "expired", 1);
                        q.busy.store(false, Ordering::Relaxed);
                        break;
                    }
                    let closed = tokio::select! {
                        () = tokio::time::sleep(wait) => q.closed.load(Ordering::Relaxed),
                        () = q.close.notified() => true,
                    };
                    if closed {
                        q.hand_over(Some(ev), "shutdown");
                        return;
                    }
                }
            }
        }
    }
}

#[cfg(test)]
#[path = "../../tests/common/json_schema.rs"]
mod json_schema;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Secret, SecretRef};

    const KEY: &[u8] = b"0123456789abcdef-test";

    /// A local HTTPS receiver (certificate from a test CA): records each
    /// body, answers 200. Returns its port, the CA (PEM) and the bodies.
    async fn receiver() -> (u16, String, Arc<Mutex<Vec<(http::HeaderMap, Bytes)>>>) {
        receiver_with(false).await
    }

    /// [`receiver`]; with `drop_second`, each connection's second request
    /// gets no answer: the connection is dropped (a receiver's idle
    /// timeout racing the next event).
    async fn receiver_with(
        drop_second: bool,
    ) -> (u16, String, Arc<Mutex<Vec<(http::HeaderMap, Bytes)>>>) {
        use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair, SanType};
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca_key = KeyPair::generate().unwrap();
        let ca_pem = params.self_signed(&ca_key).unwrap().pem();
        let issuer = Issuer::new(params, ca_key);
        let mut leaf = CertificateParams::new(Vec::<String>::new()).unwrap();
        leaf.subject_alt_names
            .push(SanType::IpAddress([127, 0, 0, 1].into()));
        let key = KeyPair::generate().unwrap();
        let cert = leaf.signed_by(&key, &issuer).unwrap();
        let identity = crate::config::TlsIdentity {
            cert: Secret::new(cert.pem().into_bytes(), SecretRef::Inline),
            key: Secret::new(key.serialize_pem().into_bytes(), SecretRef::Inline),
            outbound_ca: None,
        };
        let config = crate::config::tls::server_config(&identity, &[]).unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(config);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let hits = Arc::new(Mutex::new(Vec::new()));
        let record = Arc::clone(&hits);
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let acceptor = acceptor.clone();
                let record = Arc::clone(&record);
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let on_conn = Arc::new(std::sync::atomic::AtomicUsize::new(0));
                    let service = hyper::service::service_fn(
                        move |req: http::Request<hyper::body::Incoming>| {
                            let record = Arc::clone(&record);
                            let nth = on_conn.fetch_add(1, Ordering::SeqCst);
                            async move {
                                if drop_second && nth == 1 {
                                    return Err(std::io::Error::other("dropped"));
                                }
                                let headers = req.headers().clone();
                                let body = req
                                    .into_body()
                                    .collect()
                                    .await
                                    .map_err(std::io::Error::other)?
                                    .to_bytes();
                                record.lock().unwrap().push((headers, body));
                                Ok::<_, std::io::Error>(http::Response::new(
                                    Full::new(Bytes::new()),
                                ))
                            }
                        },
                    );
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(tls), service)
                        .await;
                });
            }
        });
        (port, ca_pem, hits)
    }

    fn target(port: u16, ca: &str, types: &[&str], queue: usize) -> EventsTarget {
        EventsTarget {
            url: format!("https://127.0.0.1:{port}/hook"),
            host: "127.0.0.1".into(),
            port,
            path: "/hook".into(),
            secret: Secret::new(KEY.to_vec(), SecretRef::Inline),
            ca: Some(Secret::new(ca.as_bytes().to_vec(), SecretRef::Inline)),
            types: types.iter().map(|t| (*t).to_owned()).collect(),
            queue,
        }
    }

    async fn wait_for(
        hits: &Mutex<Vec<(http::HeaderMap, Bytes)>>,
        n: usize,
    ) -> Vec<serde_json::Value> {
        for _ in 0..500 {
            if hits.lock().unwrap().len() >= n {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let hits = hits.lock().unwrap();
        for (headers, body) in hits.iter() {
            let sig = headers[SIGNATURE_HEADER].to_str().unwrap();
            let t: u64 = sig
                .strip_prefix("t=")
                .and_then(|r| r.split(',').next())
                .unwrap()
                .parse()
                .unwrap();
            let mut mac = <Hmac<Sha256> as KeyInit>::new_from_slice(KEY).unwrap();
            mac.update(format!("{t}.").as_bytes());
            mac.update(body);
            let v1 = sig.split(",v1=").nth(1).unwrap();
            mac.verify_slice(&hex::decode(v1).unwrap()).unwrap();
        }
        hits.iter()
            .map(|(_, b)| serde_json::from_slice(b).unwrap())
            .collect()
    }

    fn schema() -> serde_json::Value {
        let text = include_str!("../../docs/events.schema.json");
        serde_json::from_str(text).unwrap()
    }

    /// The transfer code's emitters reach the receiver, signed, in order,
    /// valid against the schema; types the filter leaves out are not sent.
    #[tokio::test]
    async fn transfer_events_are_sent_signed_filtered_and_valid() {
        let (port, ca, hits) = receiver().await;
        let events = Events::default();
        let t = target(port, &ca, &["transfer.*", "transcript.ready"], 10);
        events.configure_targets([("acme", &t)].into_iter());
        let blind = Transfer {
            to: "tel:+15557654321".into(),
            mode: "blind",
        };
        let bridge = Transfer {
            to: "sip:desk@pbx.example.com".into(),
            mode: "bridge",
        };
        events.call_answered("acme", "c1", 1, "PCMU");
        events.transfer_started("acme", "c1", &blind);
        events.transfer_failed("acme", "c1", &blind, "refused", Some(403));
        events.transfer_started("acme", "c1", &bridge);
        events.transfer_completed("acme", "c1", &bridge, Some(200));
        events.transcript_ready("acme", "c1", 7);
        events.transfer_started("other-tenant", "c2", &bridge);
        let got = wait_for(&hits, 5).await;
        let kinds: Vec<&str> = got.iter().map(|v| v["type"].as_str().unwrap()).collect();
        assert_eq!(
            kinds,
            [
                "transfer.started",
                "transfer.failed",
                "transfer.started",
                "transfer.completed",
                "transcript.ready"
            ]
        );
        let schema = schema();
        for v in &got {
            let errors = super::json_schema::violations(&schema, v);
            assert!(errors.is_empty(), "{v}: {errors:?}");
            assert_eq!(v["tenant"], "acme");
            assert_eq!(v["call_id"], "c1");
        }
        assert_eq!(got[1]["data"]["reason"], "refused");
        assert_eq!(got[1]["data"]["sip_status"], 403);
        assert_eq!(got[3]["data"]["to"], "sip:desk@pbx.example.com");
        assert_eq!(got[4]["data"]["segments"], 7);
        events.shutdown(Duration::from_secs(1)).await;
    }

    /// The schema names exactly the types the daemon sends.
    #[test]
    fn the_schema_lists_every_type() {
        let schema = schema();
        let listed: Vec<&str> = schema["properties"]["type"]["enum"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap())
            .collect();
        assert_eq!(listed, crate::config::EVENT_TYPES);
        let branches = schema["oneOf"].as_array().unwrap();
        assert_eq!(branches.len(), crate::config::EVENT_TYPES.len());
    }

    /// The schema rejects what the daemon must never send.
    #[test]
    fn the_schema_rejects_a_wrong_event() {
        let schema = schema();
        let ok = serde_json::json!({"id": "evt_0123456789abcdef01234567", "type": "transcript.ready",
            "created_at": 1, "tenant": "a", "call_id": "c", "data": {"segments": 2}});
        assert!(super::json_schema::violations(&schema, &ok).is_empty());
        for bad in [
            serde_json::json!({"type": "transcript.ready"}),
            serde_json::json!({"id": "evt_0123456789abcdef01234567", "type": "call.exploded",
                "created_at": 1, "tenant": "a", "call_id": "c", "data": {}}),
            serde_json::json!({"id": "evt_0123456789abcdef01234567", "type": "recording.ready",
                "created_at": 1, "tenant": "a", "call_id": "c",
                "data": {"recording_id": "r", "state": "complete", "duration_ms": 1, "bytes": 2, "key": "k"}}),
        ] {
            assert!(
                !super::json_schema::violations(&schema, &bad).is_empty(),
                "{bad}"
            );
        }
    }

    /// A kept-alive connection that fails on reuse is replaced at once: the
    /// event goes out on its first attempt over a new connection.
    #[tokio::test]
    async fn a_dead_kept_alive_connection_costs_no_attempt() {
        let (port, ca, hits) = receiver_with(true).await;
        let events = Events::default();
        let t = target(port, &ca, &[], 10);
        events.configure_targets([("acme", &t)].into_iter());
        for n in 1..=3 {
            events.transcript_ready("acme", &format!("c{n}"), n);
            wait_for(&hits, usize::try_from(n).unwrap()).await;
        }
        let hits = hits.lock().unwrap().clone();
        assert_eq!(hits.len(), 3);
        for (headers, _) in &hits {
            assert_eq!(headers["sipbridge-delivery-attempt"], "1");
        }
        events.shutdown(Duration::from_secs(1)).await;
    }

    /// A full queue drops its oldest event and counts it; the newest stay.
    #[tokio::test]
    async fn a_full_queue_drops_the_oldest() {
        let events = Events::default();
        // Nothing listens on port 9 of 127.0.0.1 (discard): deliveries fail.
        let t = target(9, "", &[], 2);
        let mut t = t;
        t.ca = None;
        events.configure_targets([("acme", &t)].into_iter());
        let q = super::super::lock(&events.tenants)["acme"].clone();
        // Let the task take the first event and hold it in its back-off.
        events.transcript_ready("acme", "held", 1);
        for _ in 0..100 {
            if q.busy.load(Ordering::Relaxed) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        for n in 1..=5 {
            events.transcript_ready("acme", &format!("c{n}"), n);
        }
        let queued: Vec<String> = super::super::lock(&q.events)
            .iter()
            .map(|e| e.envelope.call_id.clone())
            .collect();
        assert_eq!(queued, ["c4", "c5"]);
        assert_eq!(q.dropped.load(Ordering::Relaxed), 3);
        events.shutdown(Duration::ZERO).await;
    }

    /// A reload that changes the receiver hands the old one's queue (and the
    /// event it was retrying) to the new one, in order.
    #[tokio::test]
    async fn a_new_receiver_takes_over_the_queue() {
        let events = Events::default();
        let mut down = target(9, "", &[], 10);
        down.ca = None;
        events.configure_targets([("acme", &down)].into_iter());
        for n in 1..=3 {
            events.transcript_ready("acme", &format!("c{n}"), n);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        let (port, ca, hits) = receiver().await;
        let up = target(port, &ca, &[], 10);
        events.configure_targets([("acme", &up)].into_iter());
        let got = wait_for(&hits, 3).await;
        let calls: Vec<&str> = got.iter().map(|v| v["call_id"].as_str().unwrap()).collect();
        assert_eq!(calls, ["c1", "c2", "c3"]);
        events.shutdown(Duration::from_secs(1)).await;
    }

    #[test]
    fn types_match_the_configuration_list() {
        let names: Vec<&str> = EventType::ALL.iter().map(|t| t.as_str()).collect();
        assert_eq!(names, crate::config::EVENT_TYPES);
    }

    #[test]
    fn signature_is_hmac_sha256_of_timestamp_dot_body() {
        // RFC 4231 does not cover this framing: the value is computed here
        // with the primitive directly, and pinned for the docs' example.
        let sig = signature(b"whsec_0123456789abcdef", 1_700_000_000, b"{\"a\":1}");
        let mut mac = <Hmac<Sha256> as KeyInit>::new_from_slice(b"whsec_0123456789abcdef").unwrap();
        mac.update(b"1700000000.{\"a\":1}");
        let want = hex::encode(mac.finalize().into_bytes());
        assert_eq!(sig, format!("t=1700000000,v1={want}"));
    }

    #[test]
    fn backoff_doubles_to_the_cap_with_jitter_in_half_to_one() {
        assert_eq!(backoff(1, 0.0), Duration::from_millis(500));
        assert_eq!(backoff(1, 0.999_999).as_millis(), 999);
        assert_eq!(backoff(2, 0.0), Duration::from_secs(1));
        assert_eq!(backoff(3, 0.0), Duration::from_secs(2));
        assert_eq!(backoff(7, 0.0), Duration::from_secs(30));
        assert_eq!(backoff(8, 0.0), Duration::from_secs(30));
        assert_eq!(backoff(40, 0.0), Duration::from_secs(30));
    }
}
