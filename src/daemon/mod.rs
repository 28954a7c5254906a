//! The tokio shell around the sans-IO core: sockets, one task per call,
//! signals. It owns no protocol logic: every decision is the switchboard's or
//! the call's; this module moves bytes and time between them and the OS.
//!
//! Shape (quinn's `ConnectionDriver`, hickory's `ServerFuture`): listener
//! tasks parse and dispatch; each call runs in its own task that owns its
//! `Call`, its RTP socket and one timer re-armed to `Call::poll_timeout`.

mod records;
mod transport;

use crate::call::{
    Call, CallEvent, CallOutput, CallRecord, Dispatch, HangupCause, MediaOutput, MediaSession,
    Switchboard, Transmit,
};
use crate::pipeline::{AgentCommand, CallInfo, PipelineHandle, PipelineSpec};
use crate::sip::message::Message;
use anyhow::Context;
use rand::SeedableRng;
use rand::rngs::StdRng;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Instant, SystemTime};
use tokio::net::UdpSocket;
use tokio::sync::mpsc;
use tracing::{Instrument, debug, info, info_span, warn};
pub use transport::Transports;

/// Messages to a call task.
#[derive(Debug)]
pub(crate) enum CallCommand {
    /// A SIP message for the call.
    Sip(Box<Message>),
    /// End the call.
    HangUp(HangupCause),
}

/// How long a shutdown waits for the BYEs of live calls to be answered.
const SHUTDOWN_GRACE: std::time::Duration = std::time::Duration::from_secs(5);

/// How long a shutdown waits for TCP peers to close their connections.
const TCP_CLOSE_GRACE: std::time::Duration = std::time::Duration::from_secs(1);

/// Per-call mailbox depth: beyond it, datagrams for a busy call are dropped
/// (UDP peers retransmit), so a flood cannot grow memory.
const CALL_QUEUE: usize = 64;

/// State shared by listener tasks and call tasks.
pub(crate) struct Shared {
    pub(crate) switchboard: Mutex<Switchboard>,
    pub(crate) calls: Mutex<HashMap<String, mpsc::Sender<CallCommand>>>,
    pub(crate) transports: Transports,
    /// The store's writer (CDRs, consent, recordings); set once at start-up.
    pub(crate) records: Option<Arc<records::Records>>,
    pub(crate) rtp_bind: std::net::IpAddr,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic in another task while holding the lock must not take the daemon
    // down with it: the protected data stays consistent at every await point.
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

pub(crate) fn log_cdr(record: &CallRecord) {
    let json = serde_json::to_string(record).unwrap_or_default();
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
    /// The agent pipeline a new call of `tenant` connects to, with what the
    /// `start` message tells it (native or Twilio mode).
    fn agent_for(
        &self,
        tenant: &str,
        invite: &crate::sip::message::Request,
    ) -> Option<(PipelineSpec, CallInfo)> {
        let (target, sample_rate) = {
            let sb = lock(&self.switchboard);
            let t = sb.config().tenant(tenant)?;
            let rate = t.pipeline_rate;
            let target = match &t.pipeline {
                crate::config::Pipeline::Echo => return None,
                crate::config::Pipeline::Agent(a) => Some(PipelineSpec::for_agent(a)),
                _ => None,
            };
            let Some(target) = target else {
                // Accepted by `check`, not connected by this build (issue 5).
                warn!(
                    pipeline = t.pipeline.kind(),
                    "pipeline not supported yet: the call gets the prompt, then silence"
                );
                return None;
            };
            (target, rate)
        };
        let info = CallInfo {
            sample_rate,
            call_id: invite.call_id().unwrap_or_default().to_owned(),
            tenant: tenant.to_owned(),
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
        Some((target, info))
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
                let tx = lock(&self.calls).get(&id).cloned();
                if let Some(tx) = tx
                    && tx.try_send(CallCommand::Sip(Box::new(msg))).is_err()
                {
                    debug!(call_id = %id, "call mailbox full; message dropped");
                }
            }
            Dispatch::Reply { transmit, record } => {
                if let Some(record) = record {
                    log_cdr(&record);
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
            match bind_pair(self.rtp_bind, port).await {
                Ok(pair) => {
                    socket = Some(pair);
                    break;
                }
                Err(_) => {
                    let next = {
                        let mut sb = lock(&self.switchboard);
                        let next = sb.ports.allocate();
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
            lock(&self.switchboard).call_ended(&admitted.settings);
            let mut resp = crate::sip::message::Response::for_request(&admitted.invite, 503);
            resp.headers.push("Retry-After", "5");
            self.transports
                .send(Transmit {
                    dest: admitted.peer,
                    bytes: resp.encode(),
                })
                .await;
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
        lock(&self.calls).insert(call_id.clone(), tx);
        let shared = Arc::clone(self);
        let span = info_span!("call", call_id = %call_id, tenant = %settings.tenant);
        tokio::spawn(
            async move {
                run_call(&shared, call, rtp, rx, call_rng, agent, store).await;
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

/// One call's task: owns the `Call`, its media session, its RTP/RTCP sockets
/// and its timer.
async fn run_call(
    shared: &Arc<Shared>,
    mut call: Call,
    sockets: (UdpSocket, UdpSocket),
    mut rx: mpsc::Receiver<CallCommand>,
    mut rng: StdRng,
    mut agent: Option<(PipelineSpec, CallInfo)>,
    mut store: Option<records::CallStore>,
) {
    let mut pipeline: Option<PipelineHandle> = None;
    let mut sockets = Some(sockets);
    let mut media: Option<MediaSession> = None;
    let mut rtp_buf = vec![0u8; 2048];
    let mut rtcp_buf = vec![0u8; 2048];
    let mut ended_settings = Some(call.settings().clone());
    let mut shutting_down = false;
    info!(port = call.settings().media.rtp_port, "call started");
    loop {
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
                        if let Some(p) = &mut pipeline {
                            p.send_audio(&frame);
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
                        if let Some(p) = &mut pipeline {
                            p.send_dtmf(ev.digit);
                        }
                    }
                    MediaOutput::PromptFinished => {
                        info!("disclosure prompt finished");
                        if let Some(s) = &store {
                            s.prompt_finished();
                        }
                        call.prompt_finished(Instant::now());
                    }
                    MediaOutput::Record { left, right } => {
                        if let Some(s) = &mut store {
                            s.audio(&left, &right);
                        }
                    }
                    MediaOutput::Mark(mark) => {
                        debug!(name = %mark.name, cleared = mark.cleared, "mark played");
                        if let Some(p) = &mut pipeline {
                            p.send_mark(mark.name, mark.cleared);
                        }
                    }
                }
            }
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
                    if media.is_none() {
                        media = start_media(&mut call, &neg, store.as_mut(), &mut rng);
                    }
                    if media.is_some() {
                        pipeline = agent
                            .take()
                            .map(|(spec, info)| PipelineHandle::spawn(spec, info));
                    }
                }
                CallOutput::Event(CallEvent::MediaChanged(neg)) => {
                    info!(direction = ?neg.remote_direction, remote = ?neg.remote_rtp, "media changed");
                    if let Some(m) = &mut media {
                        m.update(&neg);
                    }
                }
                CallOutput::Event(CallEvent::Ended(mut record)) => {
                    if let Some(m) = &media {
                        record.rtp = Some(crate::call::RtpSummary::of(m));
                    }
                    log_cdr(&record);
                    if let Some(s) = &mut store {
                        s.ended(&record);
                    }
                    if let Some(p) = pipeline.take()
                        && p.dropped_frames() > 0
                    {
                        warn!(
                            dropped = p.dropped_frames(),
                            "pipeline was behind; caller frames dropped"
                        );
                    }
                    media = None;
                    sockets = None;
                    if let Some(settings) = ended_settings.take() {
                        lock(&shared.switchboard).call_ended(&settings);
                    }
                }
            }
        }
        // During shutdown a call is done once its BYE is answered (or timed
        // out): the lingering retransmission absorbers are not waited for.
        if call.is_finished() || (shutting_down && call.is_ended() && !call.bye_pending()) {
            break;
        }
        let deadline = match (
            call.poll_timeout(),
            media.as_ref().map(MediaSession::poll_timeout),
        ) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        let sleep = async {
            match deadline {
                Some(t) => tokio::time::sleep_until(t.into()).await,
                None => std::future::pending().await,
            }
        };
        let recv_rtp = recv_on(sockets.as_ref().map(|s| &s.0), &mut rtp_buf);
        let recv_rtcp = recv_on(sockets.as_ref().map(|s| &s.1), &mut rtcp_buf);
        let from_agent = async {
            match &mut pipeline {
                Some(p) => p.recv().await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            cmd = from_agent => apply_agent(cmd, &mut call, media.as_mut(), &mut rng),
            cmd = rx.recv() => match cmd {
                Some(CallCommand::Sip(msg)) => match *msg {
                    Message::Request(req) => call.handle_request(Instant::now(), req, &mut rng),
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
                }
            }
            r = recv_rtp => if let Ok((n, from)) = r {
                let now = Instant::now();
                let data = bytes::Bytes::copy_from_slice(&rtp_buf[..n]);
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

/// Applies one command from the call's agent pipeline.
fn apply_agent(
    cmd: AgentCommand,
    call: &mut Call,
    media: Option<&mut MediaSession>,
    rng: &mut StdRng,
) {
    match (cmd, media) {
        (AgentCommand::HangUp, _) => {
            info!("agent asked to hang up");
            call.hang_up(Instant::now(), HangupCause::Local, rng);
        }
        (AgentCommand::Play(pcm), Some(m)) => {
            let accepted = m.push_pipeline_audio(&pcm);
            if accepted < pcm.len() {
                debug!(
                    dropped = pcm.len() - accepted,
                    "playout queue full; agent audio dropped"
                );
            }
        }
        (AgentCommand::Mark(name), Some(m)) => {
            if let Err(e) = m.mark(name) {
                debug!(error = %e, "agent mark dropped");
            }
        }
        (AgentCommand::Clear, Some(m)) => m.clear(),
        (_, None) => {}
    }
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

/// Runs the daemon until SIGINT/SIGTERM.
pub async fn run(config: Arc<crate::config::Config>) -> anyhow::Result<()> {
    let mut os_rng = StdRng::from_os_rng();
    let (shared, listeners) = transport::bind_all(&config, &mut os_rng)
        .await
        .context("binding listeners")?;
    lock(&shared.switchboard).set_prompts(load_prompts(&config)?);
    ensure_master_key(&config, &mut os_rng)?;
    let mut shared = shared;
    if let Some(profile) = config.profiles.first() {
        let key = records::master_key_bytes(&profile.master_key)?;

        let records = records::Records::open(&profile.var_dir, &key, &config.tenants)
            .with_context(|| format!("opening the store in {}", profile.var_dir.display()))?;
        info!(var_dir = %profile.var_dir.display(), "store open");
        shared.records = Some(Arc::new(records));
    }
    let shared = Arc::new(shared);
    let mut tasks = transport::spawn_listeners(&shared, listeners, &mut os_rng);
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("installing SIGTERM handler")?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => info!("SIGINT: ending calls"),
        _ = term.recv() => info!("SIGTERM: ending calls"),
    }
    lock(&shared.switchboard).start_draining();
    let senders: Vec<_> = lock(&shared.calls).values().cloned().collect();
    for tx in senders {
        let _ = tx.send(CallCommand::HangUp(HangupCause::Shutdown)).await;
    }
    // Wait (bounded) until every call's BYE is answered or has timed out, so
    // TCP connections stay open for the 200s and lost BYEs are retransmitted;
    // new INVITEs meanwhile get 503.
    let deadline = Instant::now() + SHUTDOWN_GRACE;
    while !lock(&shared.calls).is_empty() && Instant::now() < deadline {
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    // Then give TCP peers a moment to close their connections first (a peer
    // may still be finishing its side of the last transaction).
    let deadline = Instant::now() + TCP_CLOSE_GRACE;
    while shared.transports.open_connections() > 0 && Instant::now() < deadline {
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    tasks.abort_all();
    if let Some(records) = shared.records.clone() {
        // Drains the queue: CDRs closed, open recordings finished.
        let _ = tokio::task::spawn_blocking(move || records.shutdown()).await;
    }
    info!("stopped");
    Ok(())
}
