//! The tokio shell around the sans-IO core: sockets, one task per call,
//! signals. It owns no protocol logic: every decision is the switchboard's or
//! the call's; this module moves bytes and time between them and the OS.
//!
//! Shape (quinn's `ConnectionDriver`, hickory's `ServerFuture`): listener
//! tasks parse and dispatch; each call runs in its own task that owns its
//! `Call`, its RTP socket and one timer re-armed to `Call::poll_timeout`.
//! Listeners, the admin API and the store run on the main (multi-threaded)
//! runtime; the calls' tasks run on the media threads ([`media_pool`]), so
//! a call's packets, timers and wake-ups stay on one thread.

mod dial;
mod lifecycle;
pub(crate) mod media_pool;
mod reject_log;
mod rtp_socket;
mod sources;
mod store_link;
mod transport;
mod uploader;
pub(crate) mod webhooks;

use crate::call::bridged::{
    AgentEvent, AgentPlan as BridgeAgentPlan, BridgeEvent, BridgeInput, BridgeOutput, BridgeSetup,
    BridgedCall, FallbackAudio, PipelineOp, RecordingRules, TransferRules,
};
use crate::call::linger::{LingerReply, LingerTable};
use crate::call::supervisor::FailureAction;
use crate::call::transfer::TransferState;
use crate::call::{Call, CallRecord, Dispatch, HangupCause, Switchboard};
use crate::control::{CommandError, Control, LiveCall, ReloadError, ReloadSummary};
use crate::pipeline::{AgentCommand, CallInfo, PipelineHandle, PipelineSpec};
use crate::sip::message::Message;
use anyhow::Context;
use futures_util::future::BoxFuture;
use rand::SeedableRng;
use rand::rngs::StdRng;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::task::Poll;
use std::time::{Instant, SystemTime};
use tokio::net::UdpSocket;
use tokio::sync::mpsc;
use tracing::{Instrument, debug, info, info_span, warn};
pub use transport::Transports;

/// Messages to a call task.
#[derive(Debug)]
pub(crate) enum CallCommand {
    /// A SIP message for the call and where it came from.
    Sip(Box<Message>, crate::call::Peer),
    /// End the call.
    HangUp(HangupCause),
    /// Pause (`true`) or resume the recording and transcript (PCI).
    PauseRecording(bool),
    /// A bridge transfer's target leg, admitted and ready to dial.
    TargetLeg(Box<dial::PreparedLeg>),
    /// No target leg could be started; the status says why.
    TargetUnavailable(u16),
}

/// Per-call mailbox depth: beyond it, datagrams for a busy call are dropped
/// (UDP peers retransmit), so a flood cannot grow memory.
const CALL_QUEUE: usize = 64;
/// Ended calls kept to answer retransmissions ([`crate::call::linger`]):
/// 32 s of 1,000 calls/s, a few hundred bytes each.
const MAX_LINGERING_CALLS: usize = 40_000;

/// A live call as the daemon's maps hold it: its task's mailbox and what
/// the admin API shows about it.
pub(crate) struct CallEntry {
    pub(crate) tx: mpsc::Sender<CallCommand>,
    pub(crate) info: Arc<LiveCall>,
}

/// State shared by listener tasks and call tasks.
pub(crate) struct Shared {
    pub(crate) switchboard: Mutex<Switchboard>,
    pub(crate) calls: Mutex<HashMap<String, CallEntry>>,
    /// Ended calls compacted to what answers their retransmissions
    /// ([`crate::call::linger`]), after their tasks have gone.
    pub(crate) lingering: Mutex<LingerTable>,
    pub(crate) transports: Transports,
    /// The store's writer (CDRs, consent, recordings); set once at start-up.
    pub(crate) records: Option<Arc<store_link::Records>>,
    /// Where RTP sockets bind: the first listener's IP (a reload may move it).
    pub(crate) rtp_bind: Mutex<std::net::IpAddr>,
    /// Signals, notifications, reload and drain (lifecycle.rs).
    pub(crate) life: lifecycle::Life,
    /// Tenants' fallback prompts (pipeline failure policy), loaded once.
    pub(crate) fallback_prompts: Mutex<HashMap<String, Arc<FallbackAudio>>>,
    /// Tenants' hold prompts (`away_audio = "hold-prompt"`), loaded once.
    pub(crate) hold_prompts: Mutex<HashMap<String, Arc<crate::media::prompt::Prompt>>>,
    /// Rejected call attempts of the current interval, per source.
    pub(crate) reject_log: Mutex<reject_log::RejectLog>,
    /// Call event webhooks (`events_url`); emitters never wait.
    pub(crate) events: Arc<webhooks::Events>,
    /// The media threads the calls' tasks run on.
    pub(crate) media: media_pool::MediaPool,
}

/// How a call connects to its network pipeline (the shell's half: where to
/// connect), and what the call core needs to know of it (the policy).
#[derive(Debug)]
struct AgentPlan {
    spec: PipelineSpec,
    /// Deepgram beside the agent (`deepgram+agent`): one stream for the
    /// whole call, whatever happens to the agent's connections.
    stt: Option<crate::pipeline::deepgram::DeepgramTarget>,
    info: CallInfo,
    core: BridgeAgentPlan,
}

pub(crate) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic in another task while holding the lock must not take the daemon
    // down with it: the protected data stays consistent at every await point.
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Logs a call's CDR (`target: "cdr"`). The caller's number is masked, and
/// so is the dialled number of a tenant that hashes caller numbers (or of a
/// call with no known tenant), unless `[profile.logging] caller_data = "full"`:
/// the database keeps the real record, the log only a trace of it.
pub(crate) fn log_cdr(shared: &Shared, record: &CallRecord) {
    crate::metrics::call_attempt(record.result_code, record.tenant.as_deref());
    let json = masked_cdr(shared, record).to_string();
    info!(
        target: "cdr",
        call_id = %crate::logging::wire(&record.call_id),
        tenant = record.tenant.as_deref().unwrap_or(""),
        trunk = record.trunk.as_deref().unwrap_or(""),
        result = record.result_code,
        cause = %record.cause,
        cdr = %crate::logging::json_terminal_safe(json),
        "call record"
    );
}

/// A CDR as the CDR log and the `call.ended` event show it: the caller's
/// number masked, the dialled one too for a tenant that hashes caller
/// numbers (or a call with no known tenant), unless `caller_data = "full"`.
pub(crate) fn masked_cdr(shared: &Shared, record: &CallRecord) -> serde_json::Value {
    let (from, to) = masked_numbers(shared, record.tenant.as_deref(), &record.from, &record.to);
    let mut value = serde_json::to_value(record).unwrap_or_default();
    if let Some(obj) = value.as_object_mut() {
        obj.insert("from".into(), from.into());
        obj.insert("to".into(), to.into());
        obj.insert("recorded".into(), record.recording.recorded().into());
        // A transfer target may be a person's number: masked like one.
        if let (Some(t), Some(to)) = (
            &record.transfer,
            obj.get_mut("transfer").and_then(|t| t.get_mut("to")),
        ) {
            *to = crate::logging::scrub(&t.to).into_owned().into();
        }
    }
    value
}

/// The caller's and the dialled number as the CDR log shows them.
fn masked_numbers(shared: &Shared, tenant: Option<&str>, from: &str, to: &str) -> (String, String) {
    let hashed_tenant = tenant.is_none_or(|t| {
        lock(&shared.switchboard)
            .config()
            .tenant(t)
            .is_none_or(|t| t.hash_caller_numbers)
    });
    let to = if hashed_tenant {
        crate::logging::number(to)
    } else {
        to.to_owned()
    };
    (crate::logging::number(from), to)
}

/// Logs the summaries of a closed interval of rejected call attempts.
fn log_reject_summaries(summaries: Vec<reject_log::Summary>) {
    let secs = reject_log::INTERVAL.as_secs();
    for s in summaries {
        let reasons = crate::logging::wire(&s.reasons);
        match s.source {
            Some(ip) => info!(
                source = %ip,
                rejected = s.rejected,
                not_logged = s.suppressed,
                "{} requests from {ip} rejected in the last {secs} s ({} not logged one by one): {reasons}",
                s.rejected,
                s.suppressed,
            ),
            None => info!(
                rejected = s.rejected,
                "{} requests from further sources rejected in the last {secs} s (not logged one by one): {reasons}",
                s.rejected,
            ),
        }
    }
}

impl Shared {
    /// A rejected call attempt: counted, its CDR logged in full unless its
    /// source already had its share of full lines this interval (then it
    /// goes into the interval's summary line), its database row written.
    fn rejected_attempt(&self, record: &CallRecord) {
        let (full, summaries) = {
            let mut log = lock(&self.reject_log);
            let summaries = log.flush(Instant::now());
            let full = log.rejected(record.source.ip(), record.result_code, &record.cause);
            (full, summaries)
        };
        log_reject_summaries(summaries);
        if full {
            log_cdr(self, record);
        } else {
            crate::metrics::call_attempt(record.result_code, record.tenant.as_deref());
        }
        if let Some(r) = &self.records {
            r.rejected(record);
        }
    }

    /// Sends a live call's task a command, without waiting.
    fn command(&self, call_id: &str, cmd: CallCommand) -> Result<(), CommandError> {
        let tx = lock(&self.calls)
            .get(call_id)
            .map(|e| e.tx.clone())
            .ok_or(CommandError::Gone)?;
        tx.try_send(cmd).map_err(|e| match e {
            mpsc::error::TrySendError::Closed(_) => CommandError::Gone,
            mpsc::error::TrySendError::Full(_) => CommandError::Busy,
        })
    }

    /// Whether the daemon is draining (new calls refused).
    pub(crate) fn is_draining(&self) -> bool {
        lock(&self.switchboard).is_draining()
    }

    /// The agent pipeline a new call of `tenant` connects to, with what the
    /// `start` message tells it, and its failure policy.
    fn agent_for(
        &self,
        config: &crate::config::Config,
        tenant: &str,
        invite: &crate::sip::message::Request,
    ) -> Option<AgentPlan> {
        self.agent_for_call(
            config,
            tenant,
            crate::call::CallDirection::Inbound,
            invite.call_id().unwrap_or_default().to_owned(),
            invite
                .from()
                .ok()
                .and_then(|f| f.uri.user_unescaped())
                .unwrap_or_default(),
            crate::call::dialed_number(invite).unwrap_or_default(),
            invite
                .headers
                .iter()
                .filter(|(name, _)| {
                    name.len() > 2 && name.get(..2).is_some_and(|p| p.eq_ignore_ascii_case("x-"))
                })
                .map(|(n, v)| (n.to_owned(), v.to_owned()))
                .collect(),
        )
    }

    /// [`Shared::agent_for`] with what the `start` message says given
    /// directly (an outbound call has no INVITE of the peer's).
    #[allow(clippy::too_many_arguments)]
    fn agent_for_call(
        &self,
        config: &crate::config::Config,
        tenant: &str,
        direction: crate::call::CallDirection,
        call_id: String,
        from: String,
        to: String,
        custom: Vec<(String, String)>,
    ) -> Option<AgentPlan> {
        use crate::pipeline::deepgram::DeepgramTarget;
        let (target, stt, sample_rate, policy, account_sid, stats_interval) = {
            let t = config.tenant(tenant)?;
            let account_sid = t.twilio_api.as_ref().map(|a| a.account_sid.clone());
            let rate = t.pipeline_rate;
            let (target, stt) = match &t.pipeline {
                crate::config::Pipeline::Echo => return None,
                crate::config::Pipeline::Agent(a) => (PipelineSpec::for_agent(a), None),
                crate::config::Pipeline::Deepgram(d) => {
                    (PipelineSpec::Deepgram(DeepgramTarget::new(d, rate)), None)
                }
                crate::config::Pipeline::DeepgramAgent(d, a) => (
                    PipelineSpec::for_agent(a),
                    Some(DeepgramTarget::new(d, rate)),
                ),
            };
            (
                target,
                stt,
                rate,
                t.pipeline_failure.clone(),
                account_sid,
                t.stats_interval,
            )
        };
        let fallback = lock(&self.fallback_prompts).get(tenant).cloned();
        let hold_prompt = lock(&self.hold_prompts).get(tenant).cloned();
        let core = BridgeAgentPlan {
            policy,
            fallback,
            hold_prompt,
            beside_stt: stt.is_some(),
            deepgram_only: matches!(target, PipelineSpec::Deepgram(_)),
            // Only the native protocol has a `stats` event: Twilio- and
            // Telnyx-protocol agents would not understand it.
            stats_interval: stats_interval.filter(|_| matches!(target, PipelineSpec::Native(_))),
        };
        let info = CallInfo {
            sample_rate,
            call_id,
            direction,
            tenant: tenant.to_owned(),
            account_sid,
            from,
            to,
            custom,
        };
        Some(AgentPlan {
            spec: target,
            stt,
            info,
            core,
        })
    }

    /// Screens a message by its source and first line before it is parsed
    /// (rate limits, bans: [`crate::call::source_gate`]). False: drop it.
    pub(crate) fn screen(&self, ip: std::net::IpAddr, raw: &[u8]) -> bool {
        let head = &raw[..raw.len().min(256)];
        let first_line = head.split(|b| *b == b'\n').next().unwrap_or(head);
        match lock(&self.switchboard).screen(Instant::now(), ip, first_line) {
            Ok(()) => true,
            Err(why) => {
                crate::metrics::sip_dropped(why.as_str());
                false
            }
        }
    }

    fn decide(
        &self,
        raw: &[u8],
        parsed: Result<Message, crate::sip::message::ParseError>,
        peer: crate::call::Peer,
        rng: &mut StdRng,
    ) -> Dispatch {
        let calls = lock(&self.calls);
        let mut sb = lock(&self.switchboard);
        // Load shedding: while the store is behind, new calls get 503 (their
        // CDRs and recordings would otherwise be dropped).
        let behind = self.records.as_ref().is_some_and(|r| r.is_behind());
        if behind != sb.is_overloaded() {
            if behind {
                warn!("store behind: new calls get 503 until it catches up");
            } else {
                info!("store caught up: taking new calls again");
            }
            sb.set_overloaded(behind);
        }
        // A recording tenant's calls while the store cannot write: answered
        // unrecorded or refused (the writer thread logs the change).
        let writable = self.records.as_ref().is_none_or(|r| r.is_writable());
        if writable != sb.is_store_writable() {
            sb.set_store_writable(writable);
        }
        let now = Instant::now();
        let lingering = lock(&self.lingering);
        let dispatch = sb.dispatch(
            now,
            SystemTime::now(),
            raw,
            parsed,
            peer,
            |id| calls.contains_key(id) || lingering.contains(now, id),
            rng,
        );
        crate::metrics::security(&sb.security_counts());
        dispatch
    }

    /// Acts on one inbound message (already parsed or failed to parse).
    pub(crate) async fn inbound(
        self: &Arc<Self>,
        raw: &[u8],
        parsed: Result<Message, crate::sip::message::ParseError>,
        peer: crate::call::Peer,
        rng: &mut StdRng,
    ) {
        let dispatch = self.decide(raw, parsed, peer, rng);
        match dispatch {
            Dispatch::ToCall(id, msg) => {
                let tx = lock(&self.calls).get(&id).map(|e| e.tx.clone());
                if let Some(tx) = tx {
                    if tx.try_send(CallCommand::Sip(Box::new(msg), peer)).is_err() {
                        debug!(call_id = %crate::logging::wire(&id), "call mailbox full; message dropped");
                    }
                    return;
                }
                let reply = {
                    let mut lingering = lock(&self.lingering);
                    let reply = lingering.on_message(Instant::now(), &id, &msg, peer);
                    crate::metrics::lingering_calls(lingering.len(), lingering.heap_bytes());
                    reply
                };
                if let Some(LingerReply::Send(transmit)) = reply {
                    self.transports.send(transmit).await;
                }
            }
            Dispatch::Reply { transmit, record } => {
                if let Some(record) = record {
                    self.rejected_attempt(&record);
                }
                self.transports.send(transmit).await;
            }
            Dispatch::Drop(why) => {
                crate::metrics::sip_dropped(crate::metrics::drop_label(why));
                debug!(%peer.addr, why, "dropped");
            }
            Dispatch::NewCall(admitted) => self.start_call(*admitted, rng).await,
        }
    }

    async fn start_call(self: &Arc<Self>, mut admitted: crate::call::Admitted, rng: &mut StdRng) {
        // Bind the RTP port the SDP will advertise; skip ports other programs hold.
        let mut socket = None;
        for _ in 0..16 {
            let port = admitted.settings.media.rtp_port;
            let ip = *lock(&self.rtp_bind);
            match bind_pair(ip, port) {
                Ok(pair) => {
                    socket = Some(pair);
                    break;
                }
                Err(_) => {
                    let next = {
                        let mut sb = lock(&self.switchboard);
                        let next = sb.ports.allocate(rng);
                        sb.ports.release(port);
                        next
                    };
                    match next {
                        Some(p) => admitted.settings.media.rtp_port = p,
                        None => break,
                    }
                }
            }
        }
        let call_id = admitted.invite.call_id().unwrap_or_default().to_owned();
        let Some(rtp) = socket else {
            warn!(call_id = %crate::logging::wire(&call_id), "no RTP port could be bound");
            crate::metrics::call_attempt(503, Some(&admitted.settings.tenant));
            let (transmit, record) =
                lock(&self.switchboard).rtp_bind_failed(&admitted, SystemTime::now(), rng);
            log_cdr(self, &record);
            if let Some(r) = &self.records {
                r.rejected(&record);
            }
            self.transports.send(transmit).await;
            return;
        };
        let mut call_rng = StdRng::from_rng(rng);
        let settings = admitted.settings.clone();
        // The tenant as admitted: a reload since (the bind above awaits)
        // does not change what this call was admitted with.
        let config = Arc::clone(&admitted.config);
        let agent = self.agent_for(&config, &admitted.settings.tenant, &admitted.invite);
        let row = crate::store::db::CallRow {
            call_id: call_id.clone(),
            tenant: settings.tenant.clone(),
            trunk: settings.trunk.clone(),
            from: admitted
                .invite
                .from()
                .ok()
                .and_then(|f| f.uri.user_unescaped())
                .unwrap_or_default(),
            to: crate::call::dialed_number(&admitted.invite).unwrap_or_default(),
            started_at: crate::store::db::unix_ms(SystemTime::now()),
        };
        let live = Arc::new(LiveCall {
            call_id: call_id.clone(),
            tenant: row.tenant.clone(),
            trunk: row.trunk.clone(),
            from: row.from.clone(),
            to: row.to.clone(),
            started_at: row.started_at,
            answered_at: std::sync::atomic::AtomicI64::new(0),
            ended: std::sync::atomic::AtomicBool::new(false),
            direction: crate::call::CallDirection::Inbound,
            ringing: std::sync::atomic::AtomicBool::new(true),
        });
        let call = match Call::new(
            Instant::now(),
            SystemTime::now(),
            admitted.invite,
            admitted.peer,
            admitted.settings,
            &mut call_rng,
        ) {
            Ok(c) => c,
            Err(e) => {
                warn!(call_id = %crate::logging::wire(&call_id), error = %e, "call refused");
                lock(&self.switchboard).call_ended(&settings);
                return;
            }
        };
        let tenant = config.tenant(&settings.tenant);
        let (opt_out_key, paused_dtmf_to_agent) =
            tenant.map_or((None, false), |t| (t.opt_out_key, t.paused_dtmf_to_agent));
        let transfer = TransferRules {
            fallback_bridge: tenant.is_some_and(|t| t.transfer_fallback_bridge),
        };
        let store = self
            .records
            .as_ref()
            .map(|r| store_link::CallStore::start(Arc::clone(r), row));
        let link = agent.as_ref().map(PipelineLink::new);
        let setup = BridgeSetup {
            agent: agent.map(|a| a.core),
            recording: RecordingRules {
                record: settings.plan.record,
                opt_out_key,
                paused_dtmf_to_agent,
            },
            transfer,
        };
        // Boxed: the call is ~30 KB; inline, every move of the task's
        // future (into its task cell) would copy it, and touch it.
        let bridged = Box::new(BridgedCall::new(
            call,
            setup,
            Instant::now(),
            SystemTime::now(),
            &mut call_rng,
        ));
        let (tx, rx) = mpsc::channel(CALL_QUEUE);
        let entry = CallEntry {
            tx,
            info: Arc::clone(&live),
        };
        lock(&self.calls).insert(call_id.clone(), entry);
        if self.events.enabled(&live.tenant) {
            let (from, to) = masked_numbers(self, Some(&live.tenant), &live.from, &live.to);
            self.events.call_started(
                &live.tenant,
                &webhooks::CallStarted {
                    call_id: call_id.clone(),
                    trunk: live.trunk.clone(),
                    from,
                    to,
                    started_at: live.started_at,
                    recording: settings.plan.record,
                },
            );
        }
        let shared = Arc::clone(self);
        let span = info_span!(
            "call",
            call_id = %crate::logging::wire(&call_id),
            tenant = %settings.tenant
        );
        self.media.spawn(
            async move {
                run_call(&shared, bridged, rtp, rx, call_rng, link, store, &live).await;
                lock(&shared.calls).remove(&call_id);
            }
            .instrument(span),
        );
    }
}

/// A call's RTP socket and the RTCP socket above it, bound but not yet
/// registered with a runtime: the call's task registers them on the media
/// thread it runs on ([`media_pool`]).
pub(crate) struct BoundPair(std::net::UdpSocket, std::net::UdpSocket);

/// Binds the RTP port and the RTCP port above it.
fn bind_pair(ip: std::net::IpAddr, port: u16) -> std::io::Result<BoundPair> {
    let bind = |port: u16| {
        let s = std::net::UdpSocket::bind((ip, port))?;
        s.set_nonblocking(true)?;
        Ok::<_, std::io::Error>(s)
    };
    let rtp = bind(port)?;
    let rtcp = bind(port.wrapping_add(1))?;
    Ok(BoundPair(rtp, rtcp))
}

/// Registers a call's sockets on the media thread its task runs on: RTCP
/// with the runtime (it is read as it comes), RTP not at all (it is read at
/// the call's ticks, see [`rtp_socket`]). A socket the OS refuses leaves the
/// call without media.
fn register(pair: BoundPair) -> Option<(rtp_socket::RtpSocket, UdpSocket)> {
    let BoundPair(rtp, rtcp) = pair;
    rtp_socket::RtpSocket::new(rtp)
        .and_then(|mut rtp| {
            // Until the caller's first packet, it waits for it.
            rtp.wait();
            Ok((rtp, UdpSocket::from_std(rtcp)?))
        })
        .inspect_err(|e| warn!(error = %e, "RTP sockets could not be registered; no media"))
        .ok()
}

/// Registers a bridge transfer target leg's sockets with the runtime; both
/// are read as packets come (a leg lives for a transfer only).
fn register_target(pair: BoundPair) -> Option<(UdpSocket, UdpSocket)> {
    let BoundPair(rtp, rtcp) = pair;
    UdpSocket::from_std(rtp)
        .and_then(|rtp| Ok((rtp, UdpSocket::from_std(rtcp)?)))
        .inspect_err(|e| warn!(error = %e, "RTP sockets could not be registered; no media"))
        .ok()
}

/// A datagram from `sock` into `buf`: its length and source. A socket the
/// task does not have is never ready. An error (e.g. an ICMP port-unreachable
/// reported on the socket) is consumed and ignored.
fn poll_datagram(
    sock: Option<&UdpSocket>,
    cx: &mut std::task::Context<'_>,
    buf: &mut [u8],
) -> Poll<Option<(usize, std::net::SocketAddr)>> {
    let Some(sock) = sock else {
        return Poll::Pending;
    };
    let mut rb = tokio::io::ReadBuf::new(buf);
    match sock.poll_recv_from(cx, &mut rb) {
        Poll::Ready(Ok(from)) => Poll::Ready(Some((rb.filled().len(), from))),
        Poll::Ready(Err(_)) => Poll::Ready(None),
        Poll::Pending => Poll::Pending,
    }
}

/// Sends one media datagram: straight away when the socket takes it (the
/// usual case: no readiness future per packet), else once it is writable.
/// A failed send is dropped like a lost packet.
async fn send_datagram(sock: &UdpSocket, bytes: &[u8], to: std::net::SocketAddr) {
    match sock.try_send_to(bytes, to) {
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
            let _ = sock.send_to(bytes, to).await;
        }
        _ => {}
    }
}

/// A call's network pipeline as the shell holds it: where to connect, the
/// agent's current connection (one handle per attempt) and the Deepgram
/// stream beside it. What to do with them is the call core's decision
/// ([`PipelineOp`]).
struct PipelineLink {
    spec: PipelineSpec,
    /// Deepgram beside the agent, opened once for the whole call.
    stt_target: Option<crate::pipeline::deepgram::DeepgramTarget>,
    info: CallInfo,
    /// The agent's current connection (one per attempt).
    handle: Option<PipelineHandle>,
    /// Deepgram beside the agent, for the whole call (it reconnects by
    /// itself; the supervisor does not govern it).
    stt: Option<PipelineHandle>,
    /// Frames dropped by handles already gone.
    dropped: u64,
}

impl PipelineLink {
    fn new(plan: &AgentPlan) -> PipelineLink {
        PipelineLink {
            spec: plan.spec.clone(),
            stt_target: plan.stt.clone(),
            info: plan.info.clone(),
            handle: None,
            stt: None,
            dropped: 0,
        }
    }

    fn close(&mut self) {
        if let Some(h) = self.handle.take() {
            self.dropped += h.dropped_frames();
        }
    }

    /// Does what the call core asks of the pipeline.
    fn apply(&mut self, op: PipelineOp, store: Option<&store_link::CallStore>) {
        match op {
            PipelineOp::Open => {
                if let Some(t) = self.stt_target.take() {
                    self.stt = Some(PipelineHandle::spawn(
                        PipelineSpec::Deepgram(t),
                        self.info.clone(),
                        0,
                    ));
                }
            }
            PipelineOp::Connect { attempt, backlog } => {
                self.close();
                let mut handle =
                    PipelineHandle::spawn(self.spec.clone(), self.info.clone(), attempt);
                for frame in &backlog {
                    handle.send_audio(frame);
                }
                self.handle = Some(handle);
            }
            PipelineOp::Disconnect => self.close(),
            PipelineOp::Audio {
                frame,
                to_agent,
                stt_silence,
            } => {
                if let Some(s) = &mut self.stt {
                    if stt_silence {
                        let silent = crate::call::PcmFrame {
                            samples: vec![0; frame.samples.len()],
                            ..frame.clone()
                        };
                        s.send_audio(&silent);
                    } else {
                        s.send_audio(&frame);
                    }
                }
                if to_agent && let Some(h) = &mut self.handle {
                    h.send_audio(&frame);
                }
            }
            PipelineOp::Dtmf(digit) => {
                if let Some(h) = &mut self.handle {
                    h.send_dtmf(digit);
                }
            }
            PipelineOp::Mark { name, cleared } => {
                if let Some(h) = &mut self.handle {
                    h.send_mark(name, cleared);
                }
            }
            PipelineOp::Stats {
                media_time,
                quality,
            } => {
                if let Some(h) = &mut self.handle {
                    h.send_stats(media_time, quality);
                }
            }
            PipelineOp::Transfer(update) => {
                if let Some(h) = &mut self.handle {
                    h.send_transfer(update);
                }
            }
            PipelineOp::Close { deepgram_only } => {
                // Deepgram closes its stream now; the transcripts it still
                // sends (its last Results) reach the store. An agent
                // connection is simply dropped (`stop`, close).
                let streams = [self.stt.take(), self.handle.take_if(|_| deepgram_only)];
                for h in streams.into_iter().flatten() {
                    self.dropped += h.dropped_frames();
                    let rest = h.finish();
                    if let Some(s) = store {
                        s.transcripts_after_end(rest);
                    }
                }
                self.close();
            }
        }
    }

    /// The next command of the agent's connection, or a transcript of the
    /// Deepgram stream beside it (its other commands mean nothing here).
    fn poll_recv(&mut self, cx: &mut std::task::Context<'_>) -> Poll<AgentCommand> {
        if let Some(h) = &mut self.handle
            && let Poll::Ready(cmd) = h.poll_recv(cx)
        {
            return Poll::Ready(cmd);
        }
        if let Some(stt) = &mut self.stt {
            while let Poll::Ready(cmd) = stt.poll_recv(cx) {
                if let AgentCommand::Transcript(_) = cmd {
                    return Poll::Ready(cmd);
                }
            }
        }
        Poll::Pending
    }
}

/// What one call task holds besides the call itself.
struct CallTask<'a> {
    shared: &'a Arc<Shared>,
    live: &'a LiveCall,
    /// The call's RTP and RTCP sockets.
    sockets: Option<(rtp_socket::RtpSocket, UdpSocket)>,
    link: Option<PipelineLink>,
    store: Option<store_link::CallStore>,
    ended_settings: Option<crate::call::CallSettings>,
    active: Option<crate::metrics::ActiveCall>,
    rtp_meter: crate::metrics::RtpMeter,
    /// A bridge transfer's target leg: its sockets and settings while it
    /// holds a slot, its Call-ID until the task ends.
    target: Option<TargetShell>,
}

/// What the task holds for a bridge transfer's target leg.
struct TargetShell {
    sockets: Option<(UdpSocket, UdpSocket)>,
    settings: Option<crate::call::CallSettings>,
    live: Arc<LiveCall>,
}

impl TargetShell {
    /// The leg is done with (the task ends, or a new leg replaces it): its
    /// route goes, and a slot it still holds (its task was stopped before
    /// the leg was released) is given back.
    fn release(self, shared: &Shared) {
        lock(&shared.calls).remove(&self.live.call_id);
        if let Some(settings) = self.settings {
            lock(&shared.switchboard).call_ended(&settings);
        }
    }
}

impl CallTask<'_> {
    /// Carries out one output of the call core.
    async fn output(&mut self, out: BridgeOutput) {
        match out {
            BridgeOutput::Sip(t) => self.shared.transports.send(t).await,
            BridgeOutput::Rtp { to, bytes } => {
                if let Some((rtp, _)) = &self.sockets {
                    rtp.send_to(&bytes, to);
                }
            }
            BridgeOutput::Rtcp { to, bytes } => {
                if let Some((_, rtcp)) = &self.sockets {
                    send_datagram(rtcp, &bytes, to).await;
                }
            }
            BridgeOutput::Pipeline(op) => {
                if let Some(l) = &mut self.link {
                    l.apply(op, self.store.as_ref());
                }
            }
            BridgeOutput::Store(op) => {
                if let Some(s) = &mut self.store {
                    s.apply(op);
                }
            }
            BridgeOutput::Event(ev) => self.event(ev),
            BridgeOutput::DialTarget { target } => self.dial_target(&target),
            BridgeOutput::TargetRtp { to, bytes } => {
                if let Some((rtp, _)) = self.target.as_ref().and_then(|t| t.sockets.as_ref()) {
                    send_datagram(rtp, &bytes, to).await;
                }
            }
            BridgeOutput::TargetRtcp { to, bytes } => {
                if let Some((_, rtcp)) = self.target.as_ref().and_then(|t| t.sockets.as_ref()) {
                    send_datagram(rtcp, &bytes, to).await;
                }
            }
            BridgeOutput::TargetReleased { record } => self.target_released(&record),
        }
    }

    /// A bridge transfer: the target's leg is admitted and its port bound
    /// off the call's path (a proxy name may take a while to resolve); the
    /// result comes back through the call's own mailbox.
    fn dial_target(&mut self, target: &crate::call::transfer::TransferTarget) {
        let config = Arc::clone(lock(&self.shared.switchboard).config());
        let trunk = config
            .tenant(&self.live.tenant)
            .and_then(|t| t.transfer_trunk.clone())
            .unwrap_or_else(|| self.live.trunk.clone());
        // The caller's number shows at the target when it is one; else ours.
        let is_number = |s: &str| {
            let d = s.strip_prefix('+').unwrap_or(s);
            !d.is_empty() && d.len() <= 32 && d.chars().all(|c| c.is_ascii_digit())
        };
        let from = [&self.live.from, &self.live.to]
            .into_iter()
            .find(|n| is_number(n))
            .cloned()
            .unwrap_or_default();
        let request = crate::call::OutboundRequest {
            tenant: self.live.tenant.clone(),
            trunk,
            to: target.to_string(),
            from,
            answer_timeout: None,
        };
        let tx = lock(&self.shared.calls)
            .get(&self.live.call_id)
            .map(|e| e.tx.clone());
        let Some(tx) = tx else { return };
        let shared = Arc::clone(self.shared);
        tokio::spawn(
            async move {
                let cmd = match dial::prepare(&shared, &request, tx.clone()).await {
                    Ok(leg) => CallCommand::TargetLeg(Box::new(leg)),
                    Err(e) => {
                        info!(error = %e, "transfer target could not be dialled");
                        CallCommand::TargetUnavailable(dial::unavailable_status(&e))
                    }
                };
                if let Err(mpsc::error::SendError(CallCommand::TargetLeg(leg))) = tx.send(cmd).await
                {
                    leg.release(&shared);
                }
            }
            .in_current_span(),
        );
    }

    /// The target leg is over: its CDR, its slot and port back.
    fn target_released(&mut self, record: &CallRecord) {
        let Some(t) = &mut self.target else { return };
        t.live
            .ended
            .store(true, std::sync::atomic::Ordering::Relaxed);
        t.sockets = None;
        log_cdr(self.shared, record);
        if let Some(r) = &self.shared.records {
            r.rejected(record);
            r.mark_outbound(&t.live.tenant, &t.live.call_id);
        }
        if let Some(settings) = t.settings.take() {
            lock(&self.shared.switchboard).call_ended(&settings);
        }
    }

    fn event(&mut self, ev: BridgeEvent) {
        match ev {
            BridgeEvent::EarlyMedia(neg) => {
                info!(codec = ?neg.codec, remote = ?neg.remote_rtp, "early media");
            }
            BridgeEvent::Answered(neg) => {
                info!(codec = ?neg.codec, remote = ?neg.remote_rtp, "answered");
                let at = crate::store::db::unix_ms(SystemTime::now());
                self.live
                    .answered_at
                    .store(at, std::sync::atomic::Ordering::Relaxed);
                self.shared.events.call_answered(
                    &self.live.tenant,
                    &self.live.call_id,
                    at,
                    neg.codec.encoding_name(),
                );
            }
            BridgeEvent::Confirmed => {
                lock(&self.shared.switchboard).call_confirmed(&self.live.call_id);
            }
            BridgeEvent::MediaChanged(neg) => {
                info!(direction = ?neg.remote_direction, remote = ?neg.remote_rtp, "media changed");
            }
            BridgeEvent::MediaFailed(error) => warn!(%error, "no media for this call"),
            BridgeEvent::PromptFinished => info!("disclosure prompt finished"),
            BridgeEvent::Dtmf { duration_ms, .. } => debug!(duration_ms, "dtmf received"),
            BridgeEvent::OptedOut => info!("caller opted out: recording discarded and stopped"),
            BridgeEvent::Paused(true) => info!("recording and transcript paused"),
            BridgeEvent::Paused(false) => info!("recording and transcript resumed"),
            BridgeEvent::MarkPlayed { name, cleared } => {
                debug!(name = %name, cleared, "mark played");
            }
            BridgeEvent::Reconnecting { attempt, held } => {
                info!(attempt, held_frames = held, "reconnecting to the agent");
            }
            BridgeEvent::GaveUp { reason, action } => match action {
                FailureAction::Continue => warn!(
                    %reason,
                    "agent pipeline given up; call continues without agent"
                ),
                FailureAction::HangUp => warn!(%reason, "agent pipeline given up; hanging up"),
                FailureAction::PlayFallback => warn!(
                    %reason,
                    "agent pipeline given up; playing the fallback prompt, then hanging up"
                ),
            },
            BridgeEvent::FallbackTruncated(dropped) => {
                debug!(dropped, "fallback prompt truncated");
            }
            BridgeEvent::FallbackPlayed => info!("fallback prompt played"),
            BridgeEvent::HangingUpAfterFailure => info!("hanging up after the pipeline failure"),
            BridgeEvent::AgentHangUp => info!("agent asked to hang up"),
            BridgeEvent::PlayoutFull(dropped) => {
                debug!(dropped, "playout queue full; agent audio dropped");
            }
            BridgeEvent::MarkDropped(name) => debug!(mark = %name, "mark dropped"),
            BridgeEvent::DtmfRefused(why) => warn!(%why, "agent's DTMF refused"),
            BridgeEvent::Transfer(u) => {
                let reason = match u.state {
                    crate::call::transfer::TransferState::Failed(f) => f.as_str(),
                    _ => "",
                };
                info!(
                    to = %crate::logging::wire(&crate::logging::scrub(&u.to)),
                    mode = u.mode.as_str(),
                    result = u.state.result(),
                    status = u.status,
                    reason,
                    "transfer"
                );
                if u.state.is_final() {
                    crate::metrics::transfer_finished(
                        &self.live.tenant,
                        u.mode.as_str(),
                        u.state.result(),
                        reason,
                    );
                }
                let hook = webhooks::Transfer {
                    to: u.to.clone(),
                    mode: u.mode.as_str(),
                };
                let (events, tenant, id) =
                    (&self.shared.events, &self.live.tenant, &self.live.call_id);
                match u.state {
                    TransferState::Accepted => events.transfer_started(tenant, id, &hook),
                    TransferState::Completed => {
                        events.transfer_completed(tenant, id, &hook, u.status);
                    }
                    TransferState::Failed(_) => {
                        events.transfer_failed(tenant, id, &hook, reason, u.status);
                    }
                    TransferState::Progress => {}
                }
            }
            BridgeEvent::Ended { mut record, media } => {
                self.live
                    .ended
                    .store(true, std::sync::atomic::Ordering::Relaxed);
                self.rtp_meter.finish(media.as_deref());
                if let (Some(summary), Some(l)) = (&mut record.pipeline, &self.link) {
                    summary.dropped_frames += l.dropped;
                    if summary.dropped_frames > 0 {
                        crate::metrics::caller_frames_dropped(summary.dropped_frames);
                        warn!(
                            dropped = summary.dropped_frames,
                            "pipeline was behind; caller frames dropped"
                        );
                    }
                }
                if let Some(s) = &self.store {
                    s.correct(&mut record);
                }
                log_cdr(self.shared, &record);
                if self.shared.events.enabled(&self.live.tenant) {
                    let cdr = masked_cdr(self.shared, &record);
                    self.shared
                        .events
                        .call_ended(&self.live.tenant, &self.live.call_id, cdr);
                }
                if let Some(mut s) = self.store.take() {
                    s.ended(&record);
                    // The call is over for the store (the pipeline's last
                    // transcripts go through the tails `Close` started): the
                    // task may linger for retransmissions, the store link not,
                    // so `transcript.ready` does not wait for it.
                    drop(s);
                }
                self.sockets = None;
                if let Some(settings) = self.ended_settings.take() {
                    lock(&self.shared.switchboard).call_ended(&settings);
                }
                drop(self.active.take());
            }
        }
    }
}

/// What a call task's wait gave: the timer, or one of its sources
/// ([`sources`]) with what it had.
enum Woke {
    Timer,
    Mailbox(Option<CallCommand>),
    Agent(AgentCommand),
    Rtcp(Option<(usize, std::net::SocketAddr)>),
    TargetRtp(Option<(usize, std::net::SocketAddr)>),
    TargetRtcp(Option<(usize, std::net::SocketAddr)>),
    /// A datagram came on the RTP socket while it waited for one.
    RtpArrived,
}

/// The timer and the six [`sources`] a call task waits on.
const WAITS: usize = 7;

/// One call's task: socket/select glue around its [`BridgedCall`], which
/// makes every decision; the task owns the RTP/RTCP sockets, the pipeline's
/// connections, the link to the store and the timer.
#[allow(clippy::too_many_arguments)]
async fn run_call(
    shared: &Arc<Shared>,
    mut bridged: Box<BridgedCall>,
    sockets: BoundPair,
    mut rx: mpsc::Receiver<CallCommand>,
    mut rng: StdRng,
    link: Option<PipelineLink>,
    store: Option<store_link::CallStore>,
    live: &LiveCall,
) {
    let settings = bridged.call().settings().clone();
    let mut task = CallTask {
        shared,
        live,
        sockets: register(sockets),
        link,
        store,
        active: Some(crate::metrics::ActiveCall::start(&settings.tenant)),
        ended_settings: Some(settings),
        rtp_meter: crate::metrics::RtpMeter::new(),
        target: None,
    };
    let mut rtcp_buf = vec![0u8; 2048];
    // A bridge transfer's target leg's buffers, once there is one.
    let mut target_rtp_buf = Vec::new();
    let mut target_rtcp_buf = Vec::new();
    let timer = tokio::time::sleep_until(far_future().into());
    tokio::pin!(timer);
    let mut armed: Option<Instant> = None;
    // When the RTP socket is read next at the latest (the first wake-up
    // reads it), and the time last given to the core (it never goes back).
    let mut next_read = Instant::now();
    let mut last_now = next_read;
    let mut waits = sources::Sources::new();
    let mut turn = 0;
    info!(
        port = bridged.call().settings().media.rtp_port,
        "call started"
    );
    loop {
        while let Some(out) = bridged.poll_output() {
            if let BridgeOutput::Pipeline(PipelineOp::Open | PipelineOp::Connect { .. }) = &out {
                // A new connection: looked at once, so it has our waker.
                waits.mark(sources::AGENT);
            }
            task.output(out).await;
        }
        if bridged.is_done() {
            break;
        }
        // Ended, with nothing left but answering retransmissions: keep only
        // that (a few hundred bytes) and let the call go.
        if bridged.can_compact()
            && let Some(residue) = bridged.call().compact()
        {
            // Under the calls lock, so that no message for this Call-ID is
            // routed to this task's mailbox after it stops reading it.
            let mut calls = lock(&shared.calls);
            let mut lingering = lock(&shared.lingering);
            lingering.insert(Instant::now(), residue);
            crate::metrics::lingering_calls(lingering.len(), lingering.heap_bytes());
            calls.remove(&live.call_id);
            break;
        }
        // One timer for the task's life, moved only when its next deadline
        // moves (re-registering it on every wake-up costs more): the core's,
        // or the RTP socket's next read if sooner.
        let deadline = bridged.poll_timeout();
        let reading = task.sockets.as_ref().is_some_and(|s| s.0.is_read());
        let wake = match (deadline, reading) {
            (Some(d), true) => Some(d.min(next_read)),
            (None, true) => Some(next_read),
            (d, false) => d,
        };
        if wake != armed || timer.is_elapsed() {
            timer.as_mut().reset(wake.unwrap_or_else(far_future).into());
            armed = wake;
        }
        // Each source is polled through its poll method, not a future built
        // and dropped per wake-up (that added and removed a readiness waiter
        // per socket per wake-up), and only when it woke the task
        // ([`sources`]): the timer's wake-ups, 50 a second, touch nothing
        // else. The first source looked at turns round from one wake-up to
        // the next, so none is always served first.
        turn = (turn + 1) % WAITS;
        let woke = {
            let target = task.target.as_ref().and_then(|t| t.sockets.as_ref());
            let (mut rtp, rtcp) = match &mut task.sockets {
                Some((rtp, rtcp)) => (Some(rtp), Some(&*rtcp)),
                None => (None, None),
            };
            let link = &mut task.link;
            std::future::poll_fn(|cx| {
                let woken = waits.begin(cx);
                let mut idle = 0u8;
                for k in 0..WAITS {
                    let bit = 1u8 << ((turn + k) % WAITS);
                    // The timer: bit 0 of the turn, polled at every wake-up.
                    if bit == 1 << sources::TIMER_TURN {
                        if armed.is_some() && timer.as_mut().poll(cx).is_ready() {
                            waits.mark(woken & !idle);
                            return Poll::Ready(Woke::Timer);
                        }
                        continue;
                    }
                    if woken & bit == 0 {
                        continue;
                    }
                    let mut cx = std::task::Context::from_waker(waits.waker(bit));
                    let ready = match bit {
                        sources::MAILBOX => rx.poll_recv(&mut cx).map(Woke::Mailbox),
                        sources::AGENT => match link {
                            Some(l) => l.poll_recv(&mut cx).map(Woke::Agent),
                            None => Poll::Pending,
                        },
                        sources::RTCP => {
                            poll_datagram(rtcp, &mut cx, &mut rtcp_buf).map(Woke::Rtcp)
                        }
                        sources::RTP => match rtp.as_deref_mut() {
                            Some(r) => r.poll_arrival(&mut cx).map(|()| Woke::RtpArrived),
                            None => Poll::Pending,
                        },
                        sources::TARGET_RTP => {
                            poll_datagram(target.map(|s| &s.0), &mut cx, &mut target_rtp_buf)
                                .map(Woke::TargetRtp)
                        }
                        sources::TARGET_RTCP => {
                            poll_datagram(target.map(|s| &s.1), &mut cx, &mut target_rtcp_buf)
                                .map(Woke::TargetRtcp)
                        }
                        _ => Poll::Pending,
                    };
                    match ready {
                        Poll::Ready(w) => {
                            // This one may have more; those not reached yet
                            // are still to be looked at.
                            waits.mark(woken & !idle);
                            return Poll::Ready(w);
                        }
                        Poll::Pending => idle |= bit,
                    }
                }
                Poll::Pending
            })
            .await
        };
        // A datagram on the waiting RTP socket: it is read now.
        let arrived = matches!(woke, Woke::RtpArrived);
        let input = match woke {
            Woke::Timer | Woke::RtpArrived => BridgeInput::Timeout,
            Woke::Agent(cmd) => match cmd {
                AgentCommand::Transcript(t) => {
                    // Beside an agent, the agent hears it too.
                    if let Some(h) = task.link.as_mut().and_then(|l| l.handle.as_mut()) {
                        h.send_transcript(t.clone());
                    }
                    if let Some(s) = &task.store {
                        s.transcript(t);
                    }
                    continue;
                }
                AgentCommand::Play(pcm) => BridgeInput::Agent(AgentEvent::Play(pcm)),
                AgentCommand::Mark(name) => BridgeInput::Agent(AgentEvent::Mark(name)),
                AgentCommand::Clear => BridgeInput::Agent(AgentEvent::Clear),
                AgentCommand::HangUp => BridgeInput::Agent(AgentEvent::HangUp),
                AgentCommand::Connected => BridgeInput::Agent(AgentEvent::Connected),
                AgentCommand::Failed(f) => BridgeInput::Agent(AgentEvent::Failed(f)),
                AgentCommand::PauseRecording(p) => {
                    BridgeInput::Agent(AgentEvent::PauseRecording(p))
                }
                AgentCommand::SendDtmf(keys) => BridgeInput::Agent(AgentEvent::SendDtmf(keys)),
                AgentCommand::Transfer { to, mode } => {
                    BridgeInput::Agent(AgentEvent::Transfer { to, mode })
                }
            },
            Woke::Mailbox(cmd) => match cmd {
                Some(CallCommand::Sip(msg, from)) => BridgeInput::Sip(msg, from),
                Some(CallCommand::HangUp(cause)) => BridgeInput::HangUp(cause),
                Some(CallCommand::PauseRecording(p)) => BridgeInput::PauseRecording(p),
                Some(CallCommand::TargetLeg(leg)) => {
                    let dial::PreparedLeg {
                        leg,
                        settings,
                        sockets,
                        live,
                        ..
                    } = *leg;
                    // A second transfer after a failed one: the first leg's route goes.
                    if let Some(old) = task.target.take() {
                        old.release(shared);
                    }
                    target_rtp_buf.resize(2048, 0);
                    target_rtcp_buf.resize(2048, 0);
                    task.target = Some(TargetShell {
                        sockets: register_target(sockets),
                        settings: Some(settings.clone()),
                        live,
                    });
                    // New sockets: looked at once, so they have our waker.
                    waits.mark(sources::TARGET_RTP | sources::TARGET_RTCP);
                    BridgeInput::TargetLeg {
                        leg: Box::new(leg),
                        settings: Box::new(settings),
                    }
                }
                Some(CallCommand::TargetUnavailable(status)) => {
                    BridgeInput::TargetUnavailable(status)
                }
                None => BridgeInput::HangUp(HangupCause::Shutdown),
            },
            Woke::TargetRtp(r) => match r {
                Some((n, from)) => BridgeInput::TargetRtp {
                    from,
                    data: bytes::Bytes::copy_from_slice(&target_rtp_buf[..n]),
                },
                None => continue,
            },
            Woke::TargetRtcp(r) => match r {
                Some((n, _)) => {
                    BridgeInput::TargetRtcp(bytes::Bytes::copy_from_slice(&target_rtcp_buf[..n]))
                }
                None => continue,
            },
            Woke::Rtcp(r) => match r {
                Some((n, _)) => BridgeInput::Rtcp(bytes::Bytes::copy_from_slice(&rtcp_buf[..n])),
                None => continue,
            },
        };
        let now = Instant::now().max(last_now);
        if !matches!(input, BridgeInput::Timeout) {
            bridged.handle(now, input, &mut rng);
            last_now = now;
            continue;
        }
        // The RTP socket is read just before the jitter buffer's slot, so
        // what arrived in time is played in it; each packet goes in at the
        // kernel's arrival time (kept in order with what the core saw).
        let slot_due = || {
            bridged
                .media()
                .and_then(crate::call::MediaSession::next_slot_at)
                .is_some_and(|t| t <= now)
        };
        let mut read = 0;
        if let Some((rtp, _)) = &mut task.sockets
            && rtp.is_read()
            && (arrived || now >= next_read || slot_due())
        {
            next_read = now + rtp_socket::READ_EVERY;
            read = rtp.read(now, SystemTime::now(), |at, from, data| {
                let at = at.clamp(last_now, now);
                last_now = at;
                let data = bytes::Bytes::copy_from_slice(data);
                bridged.handle(at, BridgeInput::Rtp { from, data }, &mut rng);
            });
            if rtp.is_idle() {
                // Nothing for a while: wait for the next datagram instead.
                rtp.wait();
                waits.mark(sources::RTP);
            }
        }
        last_now = now;
        // The core's deadline, or one a packet just read made due (asked
        // again only then: it is not free).
        let due = |d: Option<Instant>| d.is_some_and(|d| d <= now);
        if due(deadline) || (read > 0 && due(bridged.poll_timeout())) {
            bridged.handle(now, BridgeInput::Timeout, &mut rng);
            if let Some(m) = bridged.media() {
                task.rtp_meter.tick(now, m);
            }
        }
    }
    if let Some(t) = task.target.take() {
        t.release(shared);
    }
    debug!("call task finished");
}

/// A deadline that never comes (a day away), for a timer with nothing to
/// wait for.
fn far_future() -> Instant {
    Instant::now() + std::time::Duration::from_secs(86_400)
}

/// Loads every tenant's fallback prompt once, as PCM at the tenant's
/// pipeline rate (it is queued like agent audio).
fn load_fallback_prompts(
    config: &crate::config::Config,
) -> anyhow::Result<HashMap<String, Arc<FallbackAudio>>> {
    use crate::media::resample::{PipelineRate, Upsampler};
    let mut out = HashMap::new();
    for tenant in &config.tenants {
        let Some(p) = &tenant.pipeline_failure.fallback_prompt else {
            continue;
        };
        let prompt = crate::media::prompt::Prompt::load(&p.path).with_context(|| {
            format!("tenant {}: fallback prompt {}", tenant.id, p.path.display())
        })?;
        let pcm = match PipelineRate::from_hz(tenant.pipeline_rate) {
            Some(rate @ PipelineRate::Hz16000) => {
                let mut up = Vec::with_capacity(prompt.pcm8k().len() * 2);
                Upsampler::new(rate).process(prompt.pcm8k(), &mut up);
                up
            }
            _ => prompt.pcm8k().to_vec(),
        };
        info!(tenant = %tenant.id, ms = prompt.duration().as_millis() as u64, "fallback prompt loaded");
        out.insert(
            tenant.id.clone(),
            Arc::new(FallbackAudio {
                pcm,
                duration: prompt.duration(),
            }),
        );
    }
    Ok(out)
}

/// Loads every tenant's hold prompt once (converted to 8 kHz G.711 frames
/// like the disclosure prompt; looped while the agent is away).
fn load_hold_prompts(
    config: &crate::config::Config,
) -> anyhow::Result<HashMap<String, Arc<crate::media::prompt::Prompt>>> {
    let mut out = HashMap::new();
    for tenant in &config.tenants {
        let crate::config::AwayAudio::HoldPrompt(p) = &tenant.pipeline_failure.away_audio else {
            continue;
        };
        let prompt = crate::media::prompt::Prompt::load(&p.path)
            .with_context(|| format!("tenant {}: hold prompt {}", tenant.id, p.path.display()))?;
        info!(tenant = %tenant.id, ms = prompt.duration().as_millis() as u64, "hold prompt loaded");
        out.insert(tenant.id.clone(), Arc::new(prompt));
    }
    Ok(out)
}

/// Loads every tenant's disclosure prompt once (converted to 8 kHz G.711 frames).
fn load_prompts(
    config: &crate::config::Config,
) -> anyhow::Result<HashMap<String, Arc<crate::media::prompt::Prompt>>> {
    let mut prompts = HashMap::new();
    for tenant in &config.tenants {
        if let Some(p) = &tenant.prompt {
            let prompt = crate::media::prompt::Prompt::load(&p.path)
                .with_context(|| format!("tenant {}: prompt {}", tenant.id, p.path.display()))?;
            info!(tenant = %tenant.id, ms = prompt.duration().as_millis() as u64, "disclosure prompt loaded");
            prompts.insert(tenant.id.clone(), Arc::new(prompt));
        }
    }
    Ok(prompts)
}

/// DESIGN §5: the default profile records, so on first start a missing
/// `file:` master key is generated (0600 in a 0700 directory) and logged by
/// fingerprint only. `credential:`/`env:` keys are never generated: a missing
/// one is a configuration error reported by `check`.
fn ensure_master_key(config: &crate::config::Config, rng: &mut StdRng) -> anyhow::Result<()> {
    use rand::RngCore;
    use sha2::Digest;
    use std::io::Write;
    use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
    for profile in &config.profiles {
        let crate::config::MasterKey::ToGenerate(path) = &profile.master_key else {
            continue;
        };
        if path.as_os_str().is_empty() || path.exists() {
            continue;
        }
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .with_context(|| format!("creating {}", dir.display()))?;
        }
        let mut key = [0u8; 32];
        rng.fill_bytes(&mut key);
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
            .with_context(|| format!("creating master key {}", path.display()))?;
        file.write_all(&key)?;
        file.sync_all()?;
        let fp = sha2::Sha256::digest(key);
        info!(path = %path.display(), fingerprint = %format!("sha256:{}…", hex::encode(&fp[..2])), "generated master key");
    }
    Ok(())
}

/// What the admin API may ask of the daemon (`control`): views of the call
/// table and the switchboard, hang-ups through the calls' mailboxes, and the
/// SIGHUP reload ([`lifecycle::reload`]).
impl Control for Shared {
    fn config(&self) -> Arc<crate::config::Config> {
        Arc::clone(lock(&self.switchboard).config())
    }

    fn bans(&self, max: usize) -> Vec<crate::call::source_gate::Ban> {
        lock(&self.switchboard).bans_in_force(Instant::now(), max)
    }

    fn is_draining(&self) -> bool {
        Shared::is_draining(self)
    }

    fn has_store(&self) -> bool {
        self.records.is_some()
    }

    fn live_calls(&self, tenant: Option<&str>) -> Vec<Arc<LiveCall>> {
        let ended = |c: &LiveCall| c.ended.load(std::sync::atomic::Ordering::Relaxed);
        let mut calls: Vec<_> = lock(&self.calls)
            .values()
            .filter(|e| tenant.is_none_or(|t| e.info.tenant == t) && !ended(&e.info))
            .map(|e| Arc::clone(&e.info))
            .collect();
        calls.sort_by(|a, b| (a.started_at, &a.call_id).cmp(&(b.started_at, &b.call_id)));
        calls
    }

    fn live_call(&self, call_id: &str) -> Option<Arc<LiveCall>> {
        lock(&self.calls)
            .get(call_id)
            .filter(|e| !e.info.ended.load(std::sync::atomic::Ordering::Relaxed))
            .map(|e| Arc::clone(&e.info))
    }

    fn hang_up(&self, call_id: &str, cause: HangupCause) -> Result<(), CommandError> {
        self.command(call_id, CallCommand::HangUp(cause))
    }

    fn pause_recording(&self, call_id: &str, pause: bool) -> Result<(), CommandError> {
        self.command(call_id, CallCommand::PauseRecording(pause))
    }

    fn reload(self: Arc<Self>) -> BoxFuture<'static, Result<ReloadSummary, ReloadError>> {
        Box::pin(async move { lifecycle::reload(&self).await })
    }

    fn dial(
        self: Arc<Self>,
        request: crate::control::DialRequest,
    ) -> BoxFuture<'static, Result<String, crate::control::DialError>> {
        Box::pin(async move { dial::dial(&self, request).await })
    }
}

/// Runs the daemon on the configuration read from `config_path` until it is
/// stopped: SIGHUP reloads `config_path`, SIGTERM drains, SIGINT (or a second
/// SIGTERM) ends the calls at once (see `lifecycle`).
pub async fn run(
    config: Arc<crate::config::Config>,
    config_path: std::path::PathBuf,
) -> anyhow::Result<()> {
    crate::metrics::install();
    if let Some(p) = config.profiles.first() {
        crate::logging::set_caller_data(p.log_caller_data);
    }
    let signals = lifecycle::Signals::install()?;
    let mut os_rng = StdRng::from_os_rng();
    let bound = transport::bind_all(&config, &mut os_rng)
        .await
        .context("binding listeners")?;
    let mut shared = Shared {
        switchboard: Mutex::new(bound.switchboard),
        calls: Mutex::new(HashMap::new()),
        lingering: Mutex::new(LingerTable::new(MAX_LINGERING_CALLS)),
        transports: bound.transports,
        records: None,
        rtp_bind: Mutex::new(bound.rtp_bind),
        life: lifecycle::Life::new(&config_path),
        fallback_prompts: Mutex::new(HashMap::new()),
        hold_prompts: Mutex::new(HashMap::new()),
        reject_log: Mutex::new(reject_log::RejectLog::new(Instant::now())),
        events: Arc::new(webhooks::Events::default()),
        media: media_pool::MediaPool::start(
            config
                .profiles
                .first()
                .map_or(0, |p| p.media.threads as usize),
        )
        .context("starting the media threads")?,
    };
    info!(threads = shared.media.threads(), "media threads started");
    shared.events.configure(&config.tenants);
    let bound = bound.listeners;
    lock(&shared.switchboard).set_prompts(load_prompts(&config)?);
    *lock(&shared.fallback_prompts) = load_fallback_prompts(&config)?;
    *lock(&shared.hold_prompts) = load_hold_prompts(&config)?;
    ensure_master_key(&config, &mut os_rng)?;
    let mut master_key = None;
    let mut key_fingerprint = None;
    if let Some(profile) = config.profiles.first() {
        let key = store_link::master_key_bytes(&profile.master_key)?;
        key_fingerprint = Some(lifecycle::fingerprint(&key));
        let objects = crate::store::objects::RecordingObjects::for_config(&profile.recordings)
            .context("[profile.recordings]: the object store client")?;
        if let Some(o) = &objects {
            info!(bucket = %o.bucket(), "recordings go to the object store");
        }
        let records = store_link::Records::open(
            &profile.var_dir,
            &key,
            &config.tenants,
            profile.store.clone(),
            Arc::clone(&shared.events),
            objects,
        )
        .with_context(|| format!("opening the store in {}", profile.var_dir.display()))?;
        info!(var_dir = %profile.var_dir.display(), "store open");
        shared.records = Some(Arc::new(records));
        master_key = Some(key);
    }
    let shared = Arc::new(shared);
    // Closes each interval of rejected attempts with its summary lines, also
    // when no further rejection comes to do it.
    let reject_summaries = {
        let shared = Arc::clone(&shared);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
            loop {
                tick.tick().await;
                let summaries = lock(&shared.reject_log).flush(Instant::now());
                log_reject_summaries(summaries);
            }
        })
    };
    let listeners = bound
        .into_iter()
        .map(|b| transport::start(&shared, b, &mut os_rng))
        .collect();
    let admin = match config.profiles.first().and_then(|p| p.admin.as_ref()) {
        Some(a) => {
            // The admin API sees the daemon through `Control` only; its
            // `POST /v1/reload` runs the same reload as SIGHUP.
            let control: Arc<dyn Control> = Arc::clone(&shared) as Arc<dyn Control>;
            Some(
                crate::admin::start(
                    &config,
                    control,
                    a.listen,
                    master_key.as_deref().map(Vec::as_slice),
                )
                .await?,
            )
        }
        None => None,
    };
    drop(master_key);
    shared.life.started(listeners, key_fingerprint).await;
    lifecycle::serve(&shared, signals).await;
    if let Some(admin) = admin {
        admin.abort();
    }
    reject_summaries.abort();
    shared.media.stop();
    info!("stopped");
    Ok(())
}
