//! The tokio shell around the sans-IO core: sockets, one task per call,
//! signals. It owns no protocol logic: every decision is the switchboard's or
//! the call's; this module moves bytes and time between them and the OS.
//!
//! Shape (quinn's `ConnectionDriver`, hickory's `ServerFuture`): listener
//! tasks parse and dispatch; each call runs in its own task that owns its
//! `Call`, its RTP socket and one timer re-armed to `Call::poll_timeout`.

mod lifecycle;
mod records;
mod transport;

use crate::call::pipeline::{
    FALLBACK_MARK, FailureAction, PipelineSummary, PipelineSupervisor, SupervisorOutput,
};
use crate::call::{
    Call, CallEvent, CallOutput, CallRecord, Dispatch, HangupCause, MediaOutput, MediaSession,
    PcmFrame, Switchboard,
};
use crate::control::{CommandError, Control, LiveCall, ReloadError, ReloadSummary};
use crate::pipeline::{AgentCommand, CallInfo, PipelineHandle, PipelineSpec};
use crate::sip::message::Message;
use anyhow::Context;
use futures_util::future::BoxFuture;
use rand::SeedableRng;
use rand::rngs::StdRng;
use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
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
}

/// Per-call mailbox depth: beyond it, datagrams for a busy call are dropped
/// (UDP peers retransmit), so a flood cannot grow memory.
const CALL_QUEUE: usize = 64;

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
    pub(crate) transports: Transports,
    /// The store's writer (CDRs, consent, recordings); set once at start-up.
    pub(crate) records: Option<Arc<records::Records>>,
    /// Where RTP sockets bind: the first listener's IP (a reload may move it).
    pub(crate) rtp_bind: Mutex<std::net::IpAddr>,
    /// Signals, notifications, reload and drain (lifecycle.rs).
    pub(crate) life: lifecycle::Life,
    /// Tenants' fallback prompts (pipeline failure policy), loaded once.
    pub(crate) fallback_prompts: Mutex<HashMap<String, Arc<FallbackAudio>>>,
}

/// A tenant's fallback prompt as PCM at its pipeline rate, ready to queue.
#[derive(Debug)]
pub(crate) struct FallbackAudio {
    pcm: Vec<i16>,
    duration: std::time::Duration,
}

/// How a call connects to its network pipeline, and what it does when that fails.
#[derive(Debug)]
struct AgentPlan {
    spec: PipelineSpec,
    /// Deepgram beside the agent (`deepgram+agent`): one stream for the
    /// whole call, whatever happens to the agent's connections.
    stt: Option<crate::pipeline::deepgram::DeepgramTarget>,
    info: CallInfo,
    policy: crate::config::FailurePolicy,
    fallback: Option<Arc<FallbackAudio>>,
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
    let hashed_tenant = record.tenant.as_deref().is_none_or(|t| {
        lock(&shared.switchboard)
            .config()
            .tenant(t)
            .is_none_or(|t| t.hash_caller_numbers)
    });
    let mut value = serde_json::to_value(record).unwrap_or_default();
    if let Some(obj) = value.as_object_mut() {
        obj.insert("from".into(), crate::logging::number(&record.from).into());
        if hashed_tenant {
            obj.insert("to".into(), crate::logging::number(&record.to).into());
        }
    }
    let json = value.to_string();
    info!(
        target: "cdr",
        call_id = %record.call_id,
        tenant = record.tenant.as_deref().unwrap_or(""),
        trunk = record.trunk.as_deref().unwrap_or(""),
        result = record.result_code,
        cause = %record.cause,
        cdr = %json,
        "call record"
    );
}

impl Shared {
    /// Whether the daemon is draining (new calls refused).
    pub(crate) fn is_draining(&self) -> bool {
        lock(&self.switchboard).is_draining()
    }

    /// The agent pipeline a new call of `tenant` connects to, with what the
    /// `start` message tells it, and its failure policy.
    fn agent_for(&self, tenant: &str, invite: &crate::sip::message::Request) -> Option<AgentPlan> {
        use crate::pipeline::deepgram::DeepgramTarget;
        let (target, stt, sample_rate, policy, account_sid) = {
            let sb = lock(&self.switchboard);
            let t = sb.config().tenant(tenant)?;
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
            (target, stt, rate, t.pipeline_failure.clone(), account_sid)
        };
        let fallback = lock(&self.fallback_prompts).get(tenant).cloned();
        let info = CallInfo {
            sample_rate,
            call_id: invite.call_id().unwrap_or_default().to_owned(),
            tenant: tenant.to_owned(),
            account_sid,
            from: invite
                .from()
                .ok()
                .and_then(|f| f.uri.user_unescaped())
                .unwrap_or_default(),
            to: crate::call::dialed_number(invite).unwrap_or_default(),
            custom: invite
                .headers
                .iter()
                .filter(|(name, _)| {
                    name.len() > 2 && name.get(..2).is_some_and(|p| p.eq_ignore_ascii_case("x-"))
                })
                .map(|(n, v)| (n.to_owned(), v.to_owned()))
                .collect(),
        };
        Some(AgentPlan {
            spec: target,
            stt,
            info,
            policy,
            fallback,
        })
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
        sb.dispatch(
            Instant::now(),
            SystemTime::now(),
            raw,
            parsed,
            peer,
            |id| calls.contains_key(id),
            rng,
        )
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
                if let Some(tx) = tx
                    && tx.try_send(CallCommand::Sip(Box::new(msg), peer)).is_err()
                {
                    debug!(call_id = %id, "call mailbox full; message dropped");
                }
            }
            Dispatch::Reply { transmit, record } => {
                if let Some(record) = record {
                    log_cdr(self, &record);
                    if let Some(r) = &self.records {
                        r.rejected(&record);
                    }
                }
                self.transports.send(transmit).await;
            }
            Dispatch::Drop(why) => debug!(%peer.addr, why, "dropped"),
            Dispatch::NewCall(admitted) => self.start_call(*admitted, rng).await,
        }
    }

    async fn start_call(self: &Arc<Self>, mut admitted: crate::call::Admitted, rng: &mut StdRng) {
        // Bind the RTP port the SDP will advertise; skip ports other programs hold.
        let mut socket = None;
        for _ in 0..16 {
            let port = admitted.settings.media.rtp_port;
            let ip = *lock(&self.rtp_bind);
            match bind_pair(ip, port).await {
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
            warn!(%call_id, "no RTP port could be bound");
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
        let agent = self.agent_for(&admitted.settings.tenant, &admitted.invite);
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
                warn!(%call_id, error = %e, "call refused");
                lock(&self.switchboard).call_ended(&settings);
                return;
            }
        };
        let store = self.records.as_ref().map(|r| {
            let opt_out_key = lock(&self.switchboard)
                .config()
                .tenant(&settings.tenant)
                .and_then(|t| t.opt_out_key);
            records::CallStore::start(Arc::clone(r), row, settings.plan.record, opt_out_key)
        });
        let (tx, rx) = mpsc::channel(CALL_QUEUE);
        let entry = CallEntry {
            tx,
            info: Arc::clone(&live),
        };
        lock(&self.calls).insert(call_id.clone(), entry);
        let shared = Arc::clone(self);
        let span = info_span!("call", call_id = %call_id, tenant = %settings.tenant);
        tokio::spawn(
            async move {
                run_call(&shared, call, rtp, rx, call_rng, agent, store, &live).await;
                lock(&shared.calls).remove(&call_id);
            }
            .instrument(span),
        );
    }
}

/// Binds the RTP port and the RTCP port above it.
async fn bind_pair(ip: std::net::IpAddr, port: u16) -> std::io::Result<(UdpSocket, UdpSocket)> {
    let rtp = UdpSocket::bind((ip, port)).await?;
    let rtcp = UdpSocket::bind((ip, port.wrapping_add(1))).await?;
    Ok((rtp, rtcp))
}

async fn recv_on(
    sock: Option<&UdpSocket>,
    buf: &mut [u8],
) -> std::io::Result<(usize, std::net::SocketAddr)> {
    match sock {
        Some(s) => s.recv_from(buf).await,
        None => std::future::pending().await,
    }
}

/// A call's network pipeline: how to reach it, the supervisor that applies
/// the tenant's failure policy, the current connection (one handle per
/// attempt), and the caller audio held while reconnecting.
struct PipelineLink {
    spec: PipelineSpec,
    info: CallInfo,
    fallback: Option<Arc<FallbackAudio>>,
    supervisor: PipelineSupervisor,
    /// The agent's current connection (one per attempt).
    handle: Option<PipelineHandle>,
    /// Deepgram beside the agent, for the whole call (it reconnects by
    /// itself; the supervisor does not govern it).
    stt: Option<PipelineHandle>,
    /// Caller frames held between a loss and the next connection attempt
    /// (at most one handle queue's worth; the oldest go first).
    backlog: VecDeque<PcmFrame>,
    /// Frames dropped by handles already gone and by the backlog.
    dropped: u64,
}

impl PipelineLink {
    fn new(plan: AgentPlan, now: Instant, prompt_done: bool) -> PipelineLink {
        let mut supervisor =
            PipelineSupervisor::new(&plan.policy, plan.fallback.as_ref().map(|f| f.duration));
        if prompt_done {
            supervisor.prompt_finished(now);
        }
        supervisor.start(now);
        let stt = plan
            .stt
            .map(|t| PipelineHandle::spawn(PipelineSpec::Deepgram(t), plan.info.clone(), 0));
        PipelineLink {
            spec: plan.spec,
            stt,
            info: plan.info,
            fallback: plan.fallback,
            supervisor,
            handle: None,
            backlog: VecDeque::new(),
            dropped: 0,
        }
    }

    fn send_audio(&mut self, frame: PcmFrame) {
        use crate::call::pipeline::ConnectionState;
        if let Some(s) = &mut self.stt {
            s.send_audio(&frame);
        }
        if let Some(h) = &mut self.handle {
            h.send_audio(&frame);
        } else if matches!(
            self.supervisor.state(),
            ConnectionState::Reconnecting { .. }
        ) {
            if self.backlog.len() >= crate::pipeline::AUDIO_QUEUE_FRAMES {
                self.backlog.pop_front();
                self.dropped += 1;
            }
            self.backlog.push_back(frame);
        }
    }

    fn close(&mut self) {
        if let Some(h) = self.handle.take() {
            self.dropped += h.dropped_frames();
        }
    }

    fn summary(&self) -> PipelineSummary {
        PipelineSummary {
            dropped_frames: self.dropped
                + [&self.handle, &self.stt]
                    .into_iter()
                    .flatten()
                    .map(PipelineHandle::dropped_frames)
                    .sum::<u64>(),
            ..self.supervisor.summary()
        }
    }

    /// The next command of the agent's connection, or a transcript of the
    /// Deepgram stream beside it (its other commands mean nothing here).
    async fn recv(&mut self) -> AgentCommand {
        let (handle, stt) = (&mut self.handle, &mut self.stt);
        loop {
            let from_agent = async {
                match handle.as_mut() {
                    Some(h) => h.recv().await,
                    None => std::future::pending().await,
                }
            };
            let from_stt = async {
                match stt.as_mut() {
                    Some(h) => h.recv().await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                cmd = from_agent => return cmd,
                cmd = from_stt => if let AgentCommand::Transcript(_) = cmd {
                    return cmd;
                },
            }
        }
    }
}

/// One call's task: owns the `Call`, its media session, its RTP/RTCP sockets,
/// its pipeline link and its timer.
#[allow(clippy::too_many_arguments)]
async fn run_call(
    shared: &Arc<Shared>,
    mut call: Call,
    sockets: (UdpSocket, UdpSocket),
    mut rx: mpsc::Receiver<CallCommand>,
    mut rng: StdRng,
    mut agent: Option<AgentPlan>,
    mut store: Option<records::CallStore>,
    live: &LiveCall,
) {
    let mut link: Option<PipelineLink> = None;
    let mut sockets = Some(sockets);
    let mut media: Option<MediaSession> = None;
    let mut rtp_buf = vec![0u8; 2048];
    let mut rtcp_buf = vec![0u8; 2048];
    let mut ended_settings = Some(call.settings().clone());
    let mut shutting_down = false;
    let mut active = Some(crate::metrics::ActiveCall::start(&call.settings().tenant));
    let mut rtp_meter = crate::metrics::RtpMeter::new();
    // Answered (200 sent) but not yet confirmed: the recording and the
    // pipeline wait for the ACK, or the first RTP from the SDP address, so a
    // source that ignores our answers gets nothing recorded (issue 19).
    let mut awaiting_ack: Option<crate::sip::sdp::Negotiated> = None;
    // The packet that confirmed the call (it arrived before the ACK): fed to
    // the media session once that has started, so none of the caller's audio
    // is lost to the race between the ACK and the first RTP.
    let mut confirming_rtp: Option<(Instant, std::net::SocketAddr, bytes::Bytes)> = None;
    info!(port = call.settings().media.rtp_port, "call started");
    loop {
        if awaiting_ack.is_some()
            && (call.is_confirmed() || confirming_rtp.is_some())
            && !call.is_ended()
        {
            lock(&shared.switchboard).call_confirmed(&live.call_id);
            if let Some(neg) = awaiting_ack.take() {
                if media.is_none() {
                    media = start_media(&mut call, &neg, store.as_mut(), &mut rng);
                }
                if let Some(m) = &media
                    && let Some(plan) = agent.take()
                {
                    let mut l = PipelineLink::new(plan, Instant::now(), m.prompt_done());
                    apply_supervisor(&mut l, &mut call, media.as_mut(), &mut rng);
                    link = Some(l);
                }
            }
        }
        if let Some(m) = &mut media
            && let Some((at, from, data)) = confirming_rtp.take()
            && m.on_rtp(at, from, data)
        {
            call.media_activity(at);
        }
        if let (Some(m), Some((rtp, rtcp))) = (&mut media, &sockets) {
            while let Some(out) = m.poll_output() {
                match out {
                    MediaOutput::Rtp { to, bytes } => {
                        let _ = rtp.send_to(&bytes, to).await;
                    }
                    MediaOutput::Rtcp { to, bytes } => {
                        let _ = rtcp.send_to(&bytes, to).await;
                    }
                    // The echo pipeline runs inside the media session; the
                    // network ones get frames, DTMF and marks here.
                    MediaOutput::CallerAudio(frame) => {
                        if let Some(l) = &mut link {
                            l.send_audio(frame);
                        }
                    }
                    MediaOutput::Dtmf(ev) => {
                        debug!(duration_ms = ev.duration_ms, "dtmf received");
                        if let Some(s) = &mut store
                            && s.dtmf(ev.digit)
                        {
                            info!("caller opted out: recording discarded and stopped");
                            m.stop_recording();
                        }
                        if let Some(h) = link.as_mut().and_then(|l| l.handle.as_mut()) {
                            h.send_dtmf(ev.digit);
                        }
                    }
                    MediaOutput::PromptFinished => {
                        info!("disclosure prompt finished");
                        if let Some(s) = &store {
                            s.prompt_finished();
                        }
                        call.prompt_finished(Instant::now());
                        if let Some(l) = &mut link {
                            l.supervisor.prompt_finished(Instant::now());
                        }
                    }
                    MediaOutput::Record { left, right } => {
                        if let Some(s) = &mut store {
                            s.audio(&left, &right);
                        }
                    }
                    MediaOutput::Mark(mark) => {
                        debug!(name = %mark.name, cleared = mark.cleared, "mark played");
                        let Some(l) = &mut link else { continue };
                        match &mut l.handle {
                            Some(h) => h.send_mark(mark.name, mark.cleared),
                            None if mark.name == FALLBACK_MARK && !mark.cleared => {
                                info!("fallback prompt played");
                                l.supervisor.fallback_played(Instant::now());
                            }
                            None => {}
                        }
                    }
                }
            }
        }
        if let Some(l) = &mut link {
            apply_supervisor(l, &mut call, media.as_mut(), &mut rng);
        }
        // Act on everything the call has to say.
        while let Some(out) = call.poll_output() {
            match out {
                CallOutput::Transmit(t) => shared.transports.send(t).await,
                CallOutput::Event(CallEvent::EarlyMedia(neg)) => {
                    info!(codec = ?neg.codec, remote = ?neg.remote_rtp, "early media");
                    media = start_media(&mut call, &neg, store.as_mut(), &mut rng);
                }
                CallOutput::Event(CallEvent::Answered(neg)) => {
                    info!(codec = ?neg.codec, remote = ?neg.remote_rtp, "answered");
                    live.answered_at.store(
                        crate::store::db::unix_ms(SystemTime::now()),
                        std::sync::atomic::Ordering::Relaxed,
                    );
                    awaiting_ack = Some(neg);
                }
                CallOutput::Event(CallEvent::MediaChanged(neg)) => {
                    info!(direction = ?neg.remote_direction, remote = ?neg.remote_rtp, "media changed");
                    if let Some(m) = &mut media {
                        m.update(&neg);
                    }
                    // On hold (the caller no longer listens) an agent has
                    // nothing to say: no silence timer meanwhile.
                    if let Some(l) = &mut link {
                        l.supervisor
                            .set_held(Instant::now(), !neg.remote_direction.receives());
                    }
                }
                CallOutput::Event(CallEvent::Ended(mut record)) => {
                    live.ended.store(true, std::sync::atomic::Ordering::Relaxed);
                    if let Some(m) = &media {
                        record.rtp = Some(crate::call::RtpSummary::of(m));
                    }
                    rtp_meter.finish(media.as_ref());
                    if let Some(mut l) = link.take() {
                        // Deepgram closes its stream now; the transcripts it
                        // still sends (its last Results) reach the store. An
                        // agent connection is simply dropped (`stop`, close).
                        let deepgram_only = matches!(l.spec, PipelineSpec::Deepgram(_));
                        let streams = [l.stt.take(), l.handle.take_if(|_| deepgram_only)];
                        for h in streams.into_iter().flatten() {
                            l.dropped += h.dropped_frames();
                            let rest = h.finish();
                            if let Some(s) = &store {
                                s.transcripts_after_end(rest);
                            }
                        }
                        l.close();
                        let summary = l.summary();
                        if summary.dropped_frames > 0 {
                            crate::metrics::caller_frames_dropped(summary.dropped_frames);
                            warn!(
                                dropped = summary.dropped_frames,
                                "pipeline was behind; caller frames dropped"
                            );
                        }
                        record.pipeline = Some(summary);
                    }
                    log_cdr(shared, &record);
                    if let Some(s) = &mut store {
                        s.ended(&record);
                    }
                    media = None;
                    sockets = None;
                    if let Some(settings) = ended_settings.take() {
                        lock(&shared.switchboard).call_ended(&settings);
                    }
                    drop(active.take());
                }
            }
        }
        // During shutdown a call is done once its BYE is answered (or timed
        // out): the lingering retransmission absorbers are not waited for.
        if call.is_finished() || (shutting_down && call.is_ended() && !call.bye_pending()) {
            break;
        }
        let deadline = [
            call.poll_timeout(),
            media.as_ref().map(MediaSession::poll_timeout),
            link.as_ref().and_then(|l| l.supervisor.poll_timeout()),
        ]
        .into_iter()
        .flatten()
        .min();
        let sleep = async {
            match deadline {
                Some(t) => tokio::time::sleep_until(t.into()).await,
                None => std::future::pending().await,
            }
        };
        let recv_rtp = recv_on(sockets.as_ref().map(|s| &s.0), &mut rtp_buf);
        let recv_rtcp = recv_on(sockets.as_ref().map(|s| &s.1), &mut rtcp_buf);
        let from_agent = async {
            match &mut link {
                Some(l) => l.recv().await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            cmd = from_agent => match cmd {
                AgentCommand::Transcript(t) => {
                    // Beside an agent, the agent hears it too.
                    if let Some(h) = link.as_mut().and_then(|l| l.handle.as_mut()) {
                        h.send_transcript(t.clone());
                    }
                    if let Some(s) = &store {
                        s.transcript(t);
                    }
                }
                cmd => if let Some(l) = &mut link {
                    apply_agent(cmd, l, &mut call, media.as_mut(), &mut rng);
                },
            },
            cmd = rx.recv() => match cmd {
                Some(CallCommand::Sip(msg, from)) => match *msg {
                    Message::Request(req) => {
                        call.handle_request_from(Instant::now(), req, from, &mut rng);
                    }
                    Message::Response(resp) => call.handle_response(Instant::now(), resp, &mut rng),
                },
                Some(CallCommand::HangUp(cause)) => {
                    shutting_down |= cause == HangupCause::Shutdown;
                    call.hang_up(Instant::now(), cause, &mut rng);
                }
                None => {
                    shutting_down = true;
                    call.hang_up(Instant::now(), HangupCause::Shutdown, &mut rng);
                }
            },
            () = sleep => {
                let now = Instant::now();
                call.handle_timeout(now, &mut rng);
                if let Some(m) = &mut media {
                    m.handle_timeout(now, SystemTime::now(), &mut rng);
                    rtp_meter.tick(now, m);
                }
                if let Some(l) = &mut link {
                    l.supervisor.handle_timeout(now, &mut rng);
                }
            }
            r = recv_rtp => if let Ok((n, from)) = r {
                let now = Instant::now();
                let data = bytes::Bytes::copy_from_slice(&rtp_buf[..n]);
                if media.is_none()
                    && awaiting_ack.as_ref().is_some_and(|n| n.remote_rtp == Some(from))
                    && confirming_rtp.is_none()
                {
                    confirming_rtp = Some((now, from, data.clone()));
                }
                if let Some(m) = &mut media && m.on_rtp(now, from, data) {
                    call.media_activity(now);
                }
            },
            r = recv_rtcp => if let Ok((n, _)) = r && let Some(m) = &mut media {
                m.on_rtcp(Instant::now(), &rtcp_buf[..n]);
            },
        }
    }
    debug!("call task finished");
}

/// Starts a call's media; the store hears of it (the recording opens).
fn start_media(
    call: &mut Call,
    neg: &crate::sip::sdp::Negotiated,
    store: Option<&mut records::CallStore>,
    rng: &mut StdRng,
) -> Option<MediaSession> {
    let plan = call.settings().plan.clone();
    let has_prompt = plan.prompt.is_some();
    match MediaSession::new(Instant::now(), neg, plan, rng) {
        Ok(m) => {
            if let Some(s) = store {
                s.media_started(has_prompt);
            }
            Some(m)
        }
        Err(e) => {
            warn!(error = %e, "no media for this call");
            call.hang_up(Instant::now(), HangupCause::MediaFailed, rng);
            None
        }
    }
}

/// Does what the pipeline supervisor asks: (re)connect, drop the
/// connection, give up per the tenant's policy, hang up after the fallback.
fn apply_supervisor(
    link: &mut PipelineLink,
    call: &mut Call,
    mut media: Option<&mut MediaSession>,
    rng: &mut StdRng,
) {
    while let Some(out) = link.supervisor.poll_output() {
        match out {
            SupervisorOutput::Connect { attempt } => {
                link.close();
                if attempt > 0 {
                    info!(
                        attempt,
                        held_frames = link.backlog.len(),
                        "reconnecting to the agent"
                    );
                }
                let mut handle =
                    PipelineHandle::spawn(link.spec.clone(), link.info.clone(), attempt);
                for frame in link.backlog.drain(..) {
                    handle.send_audio(&frame);
                }
                link.handle = Some(handle);
            }
            SupervisorOutput::Disconnect => link.close(),
            SupervisorOutput::GaveUp { reason, action } => {
                link.close();
                link.dropped += link.backlog.len() as u64;
                link.backlog.clear();
                match action {
                    FailureAction::Continue => warn!(
                        %reason,
                        "agent pipeline given up; call continues without agent"
                    ),
                    FailureAction::HangUp => {
                        warn!(%reason, "agent pipeline given up; hanging up");
                        call.hang_up(Instant::now(), HangupCause::PipelineFailed, rng);
                    }
                    FailureAction::PlayFallback => {
                        warn!(
                            %reason,
                            "agent pipeline given up; playing the fallback prompt, then hanging up"
                        );
                        match (media.as_deref_mut(), &link.fallback) {
                            (Some(m), Some(f)) => {
                                m.clear();
                                let queued = m.push_pipeline_audio(&f.pcm);
                                if queued < f.pcm.len() {
                                    debug!(
                                        dropped = f.pcm.len() - queued,
                                        "fallback prompt truncated"
                                    );
                                }
                                if m.mark(FALLBACK_MARK.to_owned()).is_err() {
                                    // No mark will come: the supervisor's bound hangs up.
                                    debug!("fallback mark not queued");
                                }
                            }
                            _ => link.supervisor.fallback_played(Instant::now()),
                        }
                    }
                }
            }
            SupervisorOutput::HangUp => {
                info!("hanging up after the pipeline failure");
                call.hang_up(Instant::now(), HangupCause::PipelineFailed, rng);
            }
        }
    }
}

/// Applies one message from the call's pipeline connection.
fn apply_agent(
    cmd: AgentCommand,
    link: &mut PipelineLink,
    call: &mut Call,
    media: Option<&mut MediaSession>,
    rng: &mut StdRng,
) {
    let now = Instant::now();
    match (cmd, media) {
        (AgentCommand::Connected, _) => link.supervisor.on_connected(now),
        (AgentCommand::Failed(failure), _) => {
            // The connection task has ended (and logged why).
            link.close();
            link.supervisor.on_failed(now, failure, rng);
        }
        (AgentCommand::HangUp, _) => {
            info!("agent asked to hang up");
            call.hang_up(now, HangupCause::AgentHangup, rng);
        }
        (AgentCommand::Play(pcm), Some(m)) => {
            link.supervisor.on_agent_output(now);
            let accepted = m.push_pipeline_audio(&pcm);
            if accepted < pcm.len() {
                debug!(
                    dropped = pcm.len() - accepted,
                    "playout queue full; agent audio dropped"
                );
            }
        }
        (AgentCommand::Mark(name), Some(m)) => {
            link.supervisor.on_agent_output(now);
            if let Err(e) = m.mark(name) {
                debug!(error = %e, "agent mark dropped");
            }
        }
        (AgentCommand::Clear, Some(m)) => m.clear(),
        // Handled by `run_call` (they go to the store).
        (AgentCommand::Transcript(_), _) => {}
        (_, None) => {}
    }
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
        let tx = lock(&self.calls)
            .get(call_id)
            .map(|e| e.tx.clone())
            .ok_or(CommandError::Gone)?;
        tx.try_send(CallCommand::HangUp(cause))
            .map_err(|e| match e {
                mpsc::error::TrySendError::Closed(_) => CommandError::Gone,
                mpsc::error::TrySendError::Full(_) => CommandError::Busy,
            })
    }

    fn reload(self: Arc<Self>) -> BoxFuture<'static, Result<ReloadSummary, ReloadError>> {
        Box::pin(async move { lifecycle::reload(&self).await })
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
        transports: bound.transports,
        records: None,
        rtp_bind: Mutex::new(bound.rtp_bind),
        life: lifecycle::Life::new(&config_path),
        fallback_prompts: Mutex::new(HashMap::new()),
    };
    let bound = bound.listeners;
    lock(&shared.switchboard).set_prompts(load_prompts(&config)?);
    *lock(&shared.fallback_prompts) = load_fallback_prompts(&config)?;
    ensure_master_key(&config, &mut os_rng)?;
    let mut master_key = None;
    let mut key_fingerprint = None;
    if let Some(profile) = config.profiles.first() {
        let key = records::master_key_bytes(&profile.master_key)?;
        key_fingerprint = Some(lifecycle::fingerprint(&key));
        let records = records::Records::open(&profile.var_dir, &key, &config.tenants)
            .with_context(|| format!("opening the store in {}", profile.var_dir.display()))?;
        info!(var_dir = %profile.var_dir.display(), "store open");
        shared.records = Some(Arc::new(records));
        master_key = Some(key);
    }
    let shared = Arc::new(shared);
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
    info!("stopped");
    Ok(())
}
