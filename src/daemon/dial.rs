//! Outbound calls (issue 13): the shell around [`OutboundLeg`]. Resolves the
//! trunk's proxy, has the switchboard admit the call, binds the RTP port and
//! drives the leg in the call's own task until it is answered or fails;
//! once answered, the leg becomes a [`Call`] and the task runs exactly what
//! an inbound call runs (`run_call`: disclosure, pipeline, recording).
//!
//! Must not decide anything: the switchboard admits, the leg and the call
//! decide; this module moves their bytes and time.

use super::{
    BoundPair, BridgeSetup, BridgedCall, CALL_QUEUE, CallCommand, CallEntry, PipelineLink,
    RecordingRules, Shared, TransferRules, bind_pair, lock, log_cdr, run_call, store_link,
};
use crate::call::outbound::{LegCredentials, LegEvent, LegOutput, OutboundLeg};
use crate::call::{Call, CallDirection, OutboundAdmitted, RecordingStatus};
use crate::control::{DialError, DialRequest, LiveCall};
use crate::sip::message::Message;
use rand::rngs::StdRng;
use rand::{RngCore, SeedableRng};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant, SystemTime};
use tokio::sync::mpsc;
use tracing::{Instrument, info, info_span, warn};

/// How long resolving a trunk's proxy name may take.
const RESOLVE_TIMEOUT: Duration = Duration::from_secs(3);

/// Places the call; returns its id once the INVITE is on its way.
pub(super) async fn dial(shared: &Arc<Shared>, request: DialRequest) -> Result<String, DialError> {
    let (tx, rx) = mpsc::channel(CALL_QUEUE);
    let prepared = prepare(shared, &request.call, tx).await?;
    let PreparedLeg {
        leg,
        settings,
        config,
        sockets,
        live,
        rng,
    } = prepared;
    let call_id = settings.call_id.clone();
    let shared2 = Arc::clone(shared);
    let span = info_span!(
        "call",
        call_id = %crate::logging::wire(&call_id),
        tenant = %settings.tenant
    );
    let id = call_id.clone();
    shared.media.spawn(
        async move {
            let task = Outbound {
                shared: &shared2,
                live: &live,
                settings,
                config,
                custom: request.custom,
            };
            task.run(leg, sockets, rx, rng).await;
            lock(&shared2.calls).remove(&id);
        }
        .instrument(span),
    );
    Ok(call_id)
}

/// A leg the switchboard admitted: its RTP port bound, its Call-ID routed
/// to `tx` (the task that will run it), its INVITE queued.
pub(crate) struct PreparedLeg {
    pub(super) leg: OutboundLeg,
    /// The call's settings once answered.
    pub(super) settings: crate::call::CallSettings,
    pub(super) config: Arc<crate::config::Config>,
    pub(super) sockets: BoundPair,
    pub(super) live: Arc<LiveCall>,
    pub(super) rng: StdRng,
}

impl std::fmt::Debug for PreparedLeg {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PreparedLeg")
            .field("call_id", &self.settings.call_id)
            .finish_non_exhaustive()
    }
}

impl PreparedLeg {
    /// Gives back what the leg holds (its slot, port and route) when no
    /// task will run it.
    pub(super) fn release(self, shared: &Shared) {
        lock(&shared.switchboard).call_ended(&self.settings);
        lock(&shared.calls).remove(&self.settings.call_id);
    }
}

/// Admits an outbound leg (an API call, or a bridge transfer's target):
/// resolves the trunk's proxy, has the switchboard admit it (limits, port),
/// binds the port, adds the trunk's credentials, routes its Call-ID to `tx`
/// and builds the leg, its INVITE queued.
pub(super) async fn prepare(
    shared: &Arc<Shared>,
    request: &crate::call::OutboundRequest,
    tx: mpsc::Sender<CallCommand>,
) -> Result<PreparedLeg, DialError> {
    if !shared.transports.has_udp() {
        return Err(DialError::NoListener);
    }
    let proxy = {
        let config = Arc::clone(lock(&shared.switchboard).config());
        config
            .trunk(&request.trunk)
            .and_then(|t| t.outbound.as_ref())
            .filter(|o| o.tenants.contains(&request.tenant))
            .map(|o| o.proxy.clone())
            .ok_or(crate::call::OutboundRefusal::TrunkNotAllowed)?
    };
    let addr = tokio::time::timeout(RESOLVE_TIMEOUT, tokio::net::lookup_host(proxy.as_str()))
        .await
        .ok()
        .and_then(Result::ok)
        .and_then(|mut addrs| addrs.next())
        .ok_or(DialError::Unresolved)?;
    let mut rng = StdRng::from_os_rng();
    let call_id = format!("{:016x}{:016x}@sipbridge", rng.next_u64(), rng.next_u64());
    let admitted = lock(&shared.switchboard).admit_outbound(
        Instant::now(),
        request,
        addr,
        call_id.clone(),
        &mut rng,
    )?;
    let OutboundAdmitted {
        mut dial,
        settings,
        config,
    } = admitted;
    // The RTP port the SDP offers; on failure the call is refused.
    let ip = *lock(&shared.rtp_bind);
    let sockets = match bind_pair(ip, settings.media.rtp_port) {
        Ok(pair) => pair,
        Err(e) => {
            warn!(error = %e, "no RTP port could be bound for an outbound call");
            lock(&shared.switchboard).call_ended(&settings);
            return Err(crate::call::OutboundRefusal::NoCapacity.into());
        }
    };
    if let Some(out) = config.trunk(&dial.trunk).and_then(|t| t.outbound.as_ref())
        && let (Some(username), Some(password)) = (&out.username, &out.password)
    {
        dial.credentials = Some(LegCredentials {
            username: username.clone(),
            password: password.clone(),
        });
    }
    let live = Arc::new(LiveCall {
        call_id: call_id.clone(),
        tenant: settings.tenant.clone(),
        trunk: settings.trunk.clone(),
        from: dial.from.uri.user_unescaped().unwrap_or_default(),
        to: dial.to.uri.user_unescaped().unwrap_or_default(),
        started_at: crate::store::db::unix_ms(SystemTime::now()),
        answered_at: std::sync::atomic::AtomicI64::new(0),
        ended: std::sync::atomic::AtomicBool::new(false),
        direction: CallDirection::Outbound,
        ringing: std::sync::atomic::AtomicBool::new(false),
    });
    lock(&shared.calls).insert(
        call_id.clone(),
        CallEntry {
            tx,
            info: Arc::clone(&live),
        },
    );
    let leg = OutboundLeg::new(Instant::now(), SystemTime::now(), dial, &mut rng);
    info!(
        call_id = %crate::logging::wire(&call_id),
        tenant = %settings.tenant,
        trunk = %settings.trunk,
        proxy = %addr,
        "outbound call dialling"
    );
    Ok(PreparedLeg {
        leg,
        settings,
        config,
        sockets,
        live,
        rng,
    })
}

/// The status a bridge transfer reports when no leg could be started.
pub(super) fn unavailable_status(e: &DialError) -> u16 {
    use crate::call::OutboundRefusal as R;
    match e {
        DialError::Refused(R::TrunkNotAllowed) => 403,
        DialError::Refused(R::BadRequest(_)) => 400,
        DialError::Refused(R::RateLimited) => 429,
        DialError::Refused(_) | DialError::Unresolved | DialError::NoListener => 503,
    }
}

/// One outbound call's task, before the answer.
struct Outbound<'a> {
    shared: &'a Arc<Shared>,
    live: &'a Arc<LiveCall>,
    settings: crate::call::CallSettings,
    config: Arc<crate::config::Config>,
    custom: Vec<(String, String)>,
}

impl Outbound<'_> {
    async fn run(
        self,
        mut leg: OutboundLeg,
        sockets: BoundPair,
        mut rx: mpsc::Receiver<CallCommand>,
        mut rng: StdRng,
    ) {
        let answered = loop {
            let mut done = None;
            while let Some(out) = leg.poll_output() {
                match out {
                    LegOutput::Transmit(t) => self.shared.transports.send(t).await,
                    LegOutput::Event(LegEvent::Progress(status)) => {
                        info!(status, "outbound call progress");
                        self.live.ringing.store(true, Ordering::Relaxed);
                    }
                    LegOutput::Event(LegEvent::EarlyMedia(neg)) => {
                        info!(remote = ?neg.remote_rtp, "outbound call: early media");
                    }
                    LegOutput::Event(LegEvent::Answered) => done = Some(true),
                    LegOutput::Event(LegEvent::Failed(f)) => {
                        info!(
                            reason = f.as_str(),
                            status = f.status(),
                            "outbound call not answered"
                        );
                        done = Some(false);
                    }
                }
            }
            match done {
                Some(true) => break leg.take_answered(),
                Some(false) => break None,
                None => {}
            }
            let deadline = leg.poll_timeout();
            let sleep = async {
                match deadline {
                    Some(t) => tokio::time::sleep_until(t.into()).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                cmd = rx.recv() => {
                    let now = Instant::now();
                    match cmd {
                        Some(CallCommand::Sip(msg, _)) => {
                            if let Message::Response(resp) = *msg {
                                leg.handle_response(now, resp, &mut rng);
                            }
                        }
                        Some(CallCommand::HangUp(_)) | None => leg.cancel(now, &mut rng),
                        Some(CallCommand::PauseRecording(_)) => {}
                        Some(CallCommand::TargetLeg(leg)) => leg.release(self.shared),
                        Some(CallCommand::TargetUnavailable(_)) => {}
                    }
                }
                () = sleep => leg.handle_timeout(Instant::now(), &mut rng),
            }
        };
        let Some(answered) = answered else {
            self.not_answered(&leg);
            return;
        };
        self.answered(answered, sockets, rx, rng).await;
    }

    /// The CDR of an attempt nobody answered; the slot and port go back.
    fn not_answered(&self, leg: &OutboundLeg) {
        let mut record = leg.record().clone();
        if self.settings.plan.record {
            record.recording = RecordingStatus::NotStarted;
        }
        self.live.ended.store(true, Ordering::Relaxed);
        log_cdr(self.shared, &record);
        if let Some(r) = &self.shared.records {
            r.rejected(&record);
            r.mark_outbound(&self.settings.tenant, &self.settings.call_id);
        }
        lock(&self.shared.switchboard).call_ended(&self.settings);
    }

    /// Answered: from here on the call is run like an inbound one.
    async fn answered(
        self,
        answered: crate::call::outbound::AnsweredLeg,
        sockets: BoundPair,
        rx: mpsc::Receiver<CallCommand>,
        mut rng: StdRng,
    ) {
        let settings = self.settings.clone();
        let from = answered.record.from.clone();
        let to = answered.record.to.clone();
        let row = crate::store::db::CallRow {
            call_id: settings.call_id.clone(),
            tenant: settings.tenant.clone(),
            trunk: settings.trunk.clone(),
            from: from.clone(),
            to: to.clone(),
            started_at: self.live.started_at,
        };
        let call = Call::from_answered(Instant::now(), answered, settings.clone());
        let agent = self.shared.agent_for_call(
            &self.config,
            &settings.tenant,
            CallDirection::Outbound,
            settings.call_id.clone(),
            from,
            to,
            self.custom.clone(),
        );
        let tenant = self.config.tenant(&settings.tenant);
        let (opt_out_key, paused_dtmf_to_agent) =
            tenant.map_or((None, false), |t| (t.opt_out_key, t.paused_dtmf_to_agent));
        let transfer = TransferRules {
            fallback_bridge: tenant.is_some_and(|t| t.transfer_fallback_bridge),
        };
        let store = self
            .shared
            .records
            .as_ref()
            .map(|r| store_link::CallStore::start(Arc::clone(r), row));
        if let Some(r) = &self.shared.records {
            r.mark_outbound(&settings.tenant, &settings.call_id);
        }
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
        let bridged = Box::new(BridgedCall::new(
            call,
            setup,
            Instant::now(),
            SystemTime::now(),
            &mut rng,
        ));
        run_call(
            self.shared,
            bridged,
            sockets,
            rx,
            rng,
            link,
            store,
            self.live,
        )
        .await;
    }
}
