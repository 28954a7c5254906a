//! The bridge side of the simulation: a `Switchboard` plus the live
//! `BridgedCall`s — the daemon's own call core, signalling, media, pipeline
//! supervisor, recording and consent together — driven as `src/daemon` drives
//! them (dispatch → ToCall / NewCall / Reply / Drop; every output acted on
//! after each input; `call_ended` on the `Ended` event; the call dropped once
//! `is_done`), with everything it does recorded for the invariants.
//!
//! Around each call it models the two peers that are not SIP: the caller's
//! RTP (20 ms PCMU from the SDP address once the caller has ACKed, seeded
//! loss and jitter, an opt-out key press on some calls) and the agent (a
//! WebSocket peer that connects after a seeded delay, fails its first
//! attempts or drops mid-call on some calls, and echoes what it hears).
//!
//! Owns: the bridge's state, its peers' models and its observation log.
//! Never reads the carrier's state.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use sipbridge::call::bridged::{
    AgentEvent, AgentPlan, BridgeEvent, BridgeInput, BridgeOutput, BridgeSetup, BridgedCall,
    Consent, PipelineOp, RecordingRules, StoreOp,
};
use sipbridge::call::supervisor::ConnectionFailure;
use sipbridge::call::{
    Call, CallRecord, CallSettings, Dispatch, HangupCause, Peer, Switchboard, TransportKind,
};
use sipbridge::config::FailurePolicy;
use sipbridge::sip::message::{Message, Method, parse_datagram};
use sipbridge::sip::sdp::Negotiated;

use super::net::CARRIER;

/// A final response the bridge sent: (Call-ID, top Via branch, CSeq method).
pub(crate) type FinalKey = (String, String, String);

/// The caller's RTP source (the carrier SDP's `c=`/`m=`).
pub(crate) const CALLER_RTP: &str = "192.0.2.10:40000";

/// The tenant's opt-out key in the simulation.
pub(crate) const OPT_OUT_KEY: char = '9';

/// What the simulated caller and agent do in one call (chosen by the seed).
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct MediaScript {
    /// The caller presses the opt-out key this long after its RTP starts.
    pub(crate) opt_out_after: Option<Duration>,
    /// Connection attempts the agent refuses before it accepts one.
    pub(crate) agent_refusals: u32,
    /// The agent drops its first connection this long after accepting it.
    pub(crate) agent_drop_after: Option<Duration>,
    /// The agent takes this long to accept (or refuse) a connection.
    pub(crate) agent_connect_delay: Duration,
    /// The agent pauses the recording this long after its first accepted
    /// connection, for this long (PCI: a card number read out).
    pub(crate) agent_pause: Option<(Duration, Duration)>,
}

/// One thing seen of a call, in the order the call core produced it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Seen {
    Confirmed,
    PromptFinished,
    /// A caller frame for the agent (media time in ms) or only for a stream
    /// beside it.
    PipelineAudio {
        to_agent: bool,
        media_ms: u64,
    },
    Connect {
        attempt: u32,
        backlog: usize,
    },
    Disconnect,
    StartRecording,
    DisclosureStarted,
    DisclosureFinished,
    /// One recorded tick: whether each channel (what we sent, the caller)
    /// held sound.
    RecordAudio {
        sent_sound: bool,
        caller_sound: bool,
    },
    /// The recording was paused (true) or resumed.
    Paused(bool),
    /// A key sent to the agent.
    AgentDtmf(char),
    OptedOut,
    /// An RTP packet to the caller.
    RtpOut,
    /// The agent's `stats` event: media time, loss in hundredths of a
    /// percent, MOS in hundredths, caller frames timed in.
    Stats {
        media_ms: u64,
        loss_bp: u64,
        mos_centi: u64,
        frames_in: u64,
    },
    Ended,
}

/// The caller's RTP stream of one call.
#[derive(Debug)]
struct CallerRtp {
    next: Instant,
    seq: u16,
    ts: u32,
    /// Opt-out key press: when, and how many of its packets are left.
    dtmf_at: Option<Instant>,
    dtmf_left: u8,
}

/// The agent of one call.
#[derive(Debug, Default)]
struct AgentModel {
    script: MediaScript,
    /// The open connection's attempt number.
    connected: Option<u32>,
    dropped_once: bool,
    paused_once: bool,
    /// Events due to the call core: (at, event); at most a few.
    due: Vec<(Instant, AgentEvent)>,
}

pub(crate) struct Bridge {
    pub(crate) switchboard: Switchboard,
    pub(crate) calls: BTreeMap<String, BridgedCall>,
    /// Settings of calls whose `Ended` has not been seen yet (port and slot held).
    holding: BTreeMap<String, CallSettings>,
    /// `Call`s created per Call-ID.
    pub(crate) created: BTreeMap<String, u32>,
    /// `Ended` CDRs, in order.
    pub(crate) ended: Vec<CallRecord>,
    /// CDRs of attempts the switchboard rejected.
    pub(crate) rejected: Vec<CallRecord>,
    pub(crate) answered: BTreeMap<String, Vec<Negotiated>>,
    pub(crate) media_changed: BTreeMap<String, Vec<Negotiated>>,
    /// Distinct bytes of every final response, per transaction.
    pub(crate) finals: BTreeMap<FinalKey, BTreeSet<Bytes>>,
    /// Distinct branches of the BYEs the bridge sent, per Call-ID.
    pub(crate) byes: BTreeMap<String, BTreeSet<String>>,
    /// Calls dropped after `is_done`, with the time.
    pub(crate) finished: BTreeMap<String, Instant>,
    /// Hang-ups the test asked for: after this long past the call's creation.
    pub(crate) hangup_after: BTreeMap<String, Duration>,
    hangups: BTreeMap<(Instant, String), ()>,
    pub(crate) drops: Vec<&'static str>,
    /// Protocol violations noticed on the way (checked at the end).
    pub(crate) violations: Vec<String>,
    /// What each call's core did, in order, with the time.
    pub(crate) seen: BTreeMap<String, Vec<(Instant, Seen)>>,
    /// What the caller and the agent of a call do (default: nothing special).
    pub(crate) media_scripts: BTreeMap<String, MediaScript>,
    /// The tenant's failure policy (the agent's reconnects).
    pub(crate) policy: FailurePolicy,
    /// Share of the caller's RTP packets lost on the way.
    pub(crate) media_loss: f64,
    /// The tenant's `stats_interval_s` (a native agent's `stats` events).
    pub(crate) stats_interval: Option<Duration>,
    /// The tenant plays its prompt as early media (otherwise a violation).
    pub(crate) early_media_ok: bool,
    callers: BTreeMap<String, CallerRtp>,
    agents: BTreeMap<String, AgentModel>,
    /// Caller RTP in flight: (arrival, sequence) → (Call-ID, packet).
    rtp_in_flight: BTreeMap<(Instant, u64), (String, Bytes)>,
    rtp_sent: u64,
    rng: ChaCha8Rng,
    media_rng: ChaCha8Rng,
    t0: Instant,
    wall0: SystemTime,
}

fn carrier_peer() -> Peer {
    Peer {
        transport: TransportKind::Udp,
        addr: CARRIER,
        flow: 0,
    }
}

/// A 20 ms PCMU packet of the caller (a square wave, so it is not silence).
fn caller_packet(seq: u16, ts: u32) -> Bytes {
    let mut p = Vec::with_capacity(172);
    p.extend_from_slice(&[0x80, 0]);
    p.extend_from_slice(&seq.to_be_bytes());
    p.extend_from_slice(&ts.to_be_bytes());
    p.extend_from_slice(&0x5eed_ca11u32.to_be_bytes());
    p.extend((0..160).map(|i| if (i / 10) % 2 == 0 { 0x20 } else { 0xa0 }));
    Bytes::from(p)
}

/// An RFC 4733 telephone-event packet (payload type 101) for the opt-out key.
fn dtmf_packet(seq: u16, ts: u32, end: bool, duration: u16) -> Bytes {
    let mut p = Vec::with_capacity(16);
    p.extend_from_slice(&[0x80, 101]);
    p.extend_from_slice(&seq.to_be_bytes());
    p.extend_from_slice(&ts.to_be_bytes());
    p.extend_from_slice(&0x5eed_ca11u32.to_be_bytes());
    let event = OPT_OUT_KEY.to_digit(10).unwrap_or(9) as u8;
    p.push(event);
    p.push(if end { 0x80 | 10 } else { 10 });
    p.extend_from_slice(&duration.to_be_bytes());
    Bytes::from(p)
}

impl Bridge {
    pub(crate) fn new(switchboard: Switchboard, seed: u64, t0: Instant) -> Bridge {
        let policy = switchboard
            .config()
            .tenants
            .first()
            .map(|t| t.pipeline_failure.clone())
            .unwrap_or_default();
        Bridge {
            switchboard,
            calls: BTreeMap::new(),
            holding: BTreeMap::new(),
            created: BTreeMap::new(),
            ended: Vec::new(),
            rejected: Vec::new(),
            answered: BTreeMap::new(),
            media_changed: BTreeMap::new(),
            finals: BTreeMap::new(),
            byes: BTreeMap::new(),
            finished: BTreeMap::new(),
            hangup_after: BTreeMap::new(),
            hangups: BTreeMap::new(),
            drops: Vec::new(),
            violations: Vec::new(),
            seen: BTreeMap::new(),
            media_scripts: BTreeMap::new(),
            policy,
            media_loss: 0.0,
            stats_interval: None,
            early_media_ok: false,
            callers: BTreeMap::new(),
            agents: BTreeMap::new(),
            rtp_in_flight: BTreeMap::new(),
            rtp_sent: 0,
            rng: ChaCha8Rng::seed_from_u64(seed ^ 0xb41d_6e00),
            media_rng: ChaCha8Rng::seed_from_u64(seed ^ 0x3ed1_a000),
            t0,
            // A fixed wall clock: 2025-01-01T00:00:00Z + virtual time.
            wall0: SystemTime::UNIX_EPOCH + Duration::from_secs(1_735_689_600),
        }
    }

    pub(crate) fn wall(&self, now: Instant) -> SystemTime {
        self.wall0 + now.duration_since(self.t0)
    }

    /// The virtual instant of a wall time the bridge wrote into a CDR.
    pub(crate) fn instant_of(&self, wall: SystemTime) -> Instant {
        self.t0 + wall.duration_since(self.wall0).unwrap()
    }

    fn see(&mut self, now: Instant, id: &str, what: Seen) {
        self.seen
            .entry(id.to_owned())
            .or_default()
            .push((now, what));
    }

    /// Feeds one input to a call and acts on everything it says.
    fn input(&mut self, now: Instant, id: &str, input: BridgeInput, out: &mut Vec<Bytes>) {
        let Some(call) = self.calls.get_mut(id) else {
            return;
        };
        call.handle(now, input, &mut self.rng);
        self.drain(now, id, out);
    }

    pub(crate) fn receive(&mut self, now: Instant, raw: &[u8], out: &mut Vec<Bytes>) {
        let parsed = parse_datagram(raw);
        let calls = &self.calls;
        let dispatch = self.switchboard.dispatch(
            now,
            self.wall(now),
            raw,
            parsed,
            carrier_peer(),
            |id| calls.contains_key(id),
            &mut self.rng,
        );
        match dispatch {
            Dispatch::ToCall(id, msg) => {
                if !self.calls.contains_key(&id) {
                    self.violations
                        .push(format!("ToCall for unknown call {id}"));
                    return;
                }
                // The caller starts talking once it has ACKed the answer.
                if let Message::Request(req) = &msg
                    && req.method == Method::Ack
                    && !self.callers.contains_key(&id)
                {
                    self.start_caller(now, &id);
                }
                self.input(
                    now,
                    &id,
                    BridgeInput::Sip(Box::new(msg), carrier_peer()),
                    out,
                );
            }
            Dispatch::NewCall(admitted) => {
                let id = admitted.invite.call_id().unwrap().to_owned();
                *self.created.entry(id.clone()).or_default() += 1;
                let settings = admitted.settings.clone();
                match Call::new(
                    now,
                    self.wall(now),
                    admitted.invite,
                    admitted.peer,
                    admitted.settings,
                    &mut self.rng,
                ) {
                    Ok(call) => {
                        let setup = BridgeSetup {
                            agent: Some(AgentPlan {
                                policy: self.policy.clone(),
                                fallback: None,
                                hold_prompt: None,
                                beside_stt: false,
                                deepgram_only: false,
                                stats_interval: self.stats_interval,
                            }),
                            recording: RecordingRules {
                                record: settings.plan.record,
                                opt_out_key: Some(OPT_OUT_KEY),
                                paused_dtmf_to_agent: false,
                            },
                            transfer: Default::default(),
                        };
                        let script = self.media_scripts.get(&id).copied().unwrap_or_default();
                        self.agents.insert(
                            id.clone(),
                            AgentModel {
                                script,
                                ..AgentModel::default()
                            },
                        );
                        let bridged =
                            BridgedCall::new(call, setup, now, self.wall(now), &mut self.rng);
                        self.holding.insert(id.clone(), settings);
                        self.calls.insert(id.clone(), bridged);
                        if let Some(after) = self.hangup_after.get(&id) {
                            self.hangups.insert((now + *after, id.clone()), ());
                        }
                        self.drain(now, &id, out);
                    }
                    Err(e) => {
                        self.violations
                            .push(format!("Call::new refused an admitted INVITE {id}: {e}"));
                        self.switchboard.call_ended(&settings);
                    }
                }
            }
            Dispatch::Reply { transmit, record } => {
                if let Some(record) = record {
                    self.rejected.push(*record);
                }
                self.transmit(now, "switchboard", transmit.dest, transmit.bytes, out);
            }
            Dispatch::Drop(why) => self.drops.push(why),
        }
    }

    fn start_caller(&mut self, now: Instant, id: &str) {
        let script = self.media_scripts.get(id).copied().unwrap_or_default();
        self.callers.insert(
            id.to_owned(),
            CallerRtp {
                next: now,
                seq: self.media_rng.random(),
                ts: self.media_rng.random(),
                dtmf_at: script.opt_out_after.map(|d| now + d),
                dtmf_left: 6,
            },
        );
    }

    /// The caller sends its packets due by `now` (20 ms apart; the opt-out
    /// key as 3 + 3 telephone-event packets in place of speech).
    fn caller_sends(&mut self, now: Instant) {
        let due: Vec<String> = self
            .callers
            .iter()
            .filter(|(_, c)| c.next <= now)
            .map(|(id, _)| id.clone())
            .collect();
        for id in due {
            let Some(c) = self.callers.get_mut(&id) else {
                continue;
            };
            while c.next <= now {
                let at = c.next;
                let packet = match c.dtmf_at {
                    Some(t) if t <= at && c.dtmf_left > 0 => {
                        c.dtmf_left -= 1;
                        let n = 6 - c.dtmf_left;
                        dtmf_packet(c.seq, c.ts, n > 3, u16::from(n) * 160)
                    }
                    _ => {
                        c.ts = c.ts.wrapping_add(160);
                        caller_packet(c.seq, c.ts)
                    }
                };
                c.seq = c.seq.wrapping_add(1);
                c.next += Duration::from_millis(20);
                if !self.media_rng.random_bool(self.media_loss) {
                    let delay = Duration::from_millis(self.media_rng.random_range(5..=40));
                    self.rtp_sent += 1;
                    self.rtp_in_flight
                        .insert((at + delay, self.rtp_sent), (id.clone(), packet));
                }
            }
        }
    }

    fn transmit(
        &mut self,
        now: Instant,
        who: &str,
        dest: Peer,
        bytes: Bytes,
        out: &mut Vec<Bytes>,
    ) {
        if dest != carrier_peer() {
            self.violations
                .push(format!("{who} sent to {dest:?}, not the carrier"));
        }
        match parse_datagram(&bytes) {
            Ok(Message::Response(resp)) if resp.status >= 200 => {
                let key = (
                    resp.call_id().unwrap().to_owned(),
                    resp.top_via()
                        .unwrap()
                        .branch()
                        .unwrap_or_default()
                        .to_owned(),
                    resp.cseq().unwrap().method.as_str().to_owned(),
                );
                self.finals.entry(key).or_default().insert(bytes.clone());
            }
            Ok(Message::Request(req)) if req.method.as_str() == "BYE" => {
                self.byes
                    .entry(req.call_id().unwrap().to_owned())
                    .or_default()
                    .insert(
                        req.top_via()
                            .unwrap()
                            .branch()
                            .unwrap_or_default()
                            .to_owned(),
                    );
            }
            Ok(_) => {}
            Err(e) => self
                .violations
                .push(format!("{who} sent unparseable bytes at {now:?}: {e}")),
        }
        out.push(bytes);
    }

    /// Acts on everything the call says; what the agent answers at once
    /// (its echo) goes back in, until the call is quiet.
    fn drain(&mut self, now: Instant, id: &str, out: &mut Vec<Bytes>) {
        for _ in 0..64 {
            let Some(call) = self.calls.get_mut(id) else {
                return;
            };
            let mut outputs = Vec::new();
            while let Some(o) = call.poll_output() {
                outputs.push(o);
            }
            let done = call.is_done();
            let mut replies = Vec::new();
            for o in outputs {
                self.output(now, id, o, out, &mut replies);
            }
            if done {
                if self.holding.contains_key(id) {
                    self.violations
                        .push(format!("{id} finished without an Ended event"));
                }
                self.calls.remove(id);
                self.callers.remove(id);
                self.agents.remove(id);
                self.finished.insert(id.to_owned(), now);
                return;
            }
            if replies.is_empty() {
                return;
            }
            for r in replies {
                if let Some(call) = self.calls.get_mut(id) {
                    call.handle(now, BridgeInput::Agent(r), &mut self.rng);
                }
            }
        }
        self.violations
            .push(format!("{id}: the call core never went quiet at {now:?}"));
    }

    fn output(
        &mut self,
        now: Instant,
        id: &str,
        o: BridgeOutput,
        out: &mut Vec<Bytes>,
        replies: &mut Vec<AgentEvent>,
    ) {
        match o {
            BridgeOutput::Sip(t) => self.transmit(now, id, t.dest, t.bytes, out),
            BridgeOutput::Rtp { to, .. } => {
                if to != CALLER_RTP.parse::<SocketAddr>().unwrap() {
                    self.violations
                        .push(format!("{id}: RTP sent to {to}, not the caller"));
                }
                self.see(now, id, Seen::RtpOut);
            }
            BridgeOutput::Rtcp { .. } => {}
            // No simulated agent asks for a transfer.
            BridgeOutput::DialTarget { .. }
            | BridgeOutput::TargetRtp { .. }
            | BridgeOutput::TargetRtcp { .. }
            | BridgeOutput::TargetReleased { .. } => self.violations.push(format!(
                "{id}: a transfer target's output without a transfer"
            )),
            BridgeOutput::Pipeline(op) => self.pipeline(now, id, op, replies),
            BridgeOutput::Store(op) => {
                let seen = match op {
                    StoreOp::StartRecording(_) => Seen::StartRecording,
                    StoreOp::Consent(Consent::DisclosureStarted, _) => Seen::DisclosureStarted,
                    StoreOp::Consent(Consent::DisclosureFinished, _) => Seen::DisclosureFinished,
                    StoreOp::Audio { left, right } => Seen::RecordAudio {
                        sent_sound: right.iter().any(|s| s.unsigned_abs() > 64),
                        caller_sound: left.iter().any(|s| s.unsigned_abs() > 64),
                    },
                    StoreOp::OptedOut(_) => Seen::OptedOut,
                    StoreOp::Paused(p, _) => Seen::Paused(p),
                };
                self.see(now, id, seen);
            }
            BridgeOutput::Event(ev) => match ev {
                BridgeEvent::Answered(neg) => {
                    self.answered.entry(id.to_owned()).or_default().push(neg);
                }
                // The simulated tenant has no early media.
                BridgeEvent::EarlyMedia(_) if !self.early_media_ok => self
                    .violations
                    .push(format!("unexpected early media for {id} at {now:?}")),
                BridgeEvent::MediaChanged(neg) => {
                    self.media_changed
                        .entry(id.to_owned())
                        .or_default()
                        .push(neg);
                }
                BridgeEvent::MediaFailed(e) => self.violations.push(format!("{id}: no media: {e}")),
                BridgeEvent::Confirmed => self.see(now, id, Seen::Confirmed),
                BridgeEvent::PromptFinished => self.see(now, id, Seen::PromptFinished),
                BridgeEvent::Ended { record, .. } => {
                    match self.holding.remove(id) {
                        Some(settings) => self.switchboard.call_ended(&settings),
                        None => self
                            .violations
                            .push(format!("second Ended for {id} at {now:?}")),
                    }
                    self.see(now, id, Seen::Ended);
                    // The caller stops talking; the agent is gone.
                    self.callers.remove(id);
                    self.ended.push(*record);
                }
                _ => {}
            },
        }
    }

    /// The agent's side of a pipeline operation.
    fn pipeline(&mut self, now: Instant, id: &str, op: PipelineOp, replies: &mut Vec<AgentEvent>) {
        let seen = match &op {
            PipelineOp::Connect { attempt, backlog } => Some(Seen::Connect {
                attempt: *attempt,
                backlog: backlog.len(),
            }),
            PipelineOp::Disconnect => Some(Seen::Disconnect),
            PipelineOp::Dtmf(d) => Some(Seen::AgentDtmf(*d)),
            PipelineOp::Stats {
                media_time,
                quality,
            } => Some(Seen::Stats {
                media_ms: media_time.as_millis() as u64,
                loss_bp: (quality.loss_pct * 100.0).round() as u64,
                mos_centi: (quality.mos.unwrap_or(0.0) * 100.0).round() as u64,
                frames_in: quality.latency_in_ms.count,
            }),
            PipelineOp::Audio {
                frame, to_agent, ..
            } => Some(Seen::PipelineAudio {
                to_agent: *to_agent,
                media_ms: frame.media_time.as_millis() as u64,
            }),
            _ => None,
        };
        if let Some(seen) = seen {
            self.see(now, id, seen);
        }
        let Some(agent) = self.agents.get_mut(id) else {
            return;
        };
        match op {
            PipelineOp::Connect { attempt, .. } => {
                agent.connected = None;
                agent
                    .due
                    .retain(|(_, e)| !matches!(e, AgentEvent::Failed(_)));
                let at = now + agent.script.agent_connect_delay;
                if attempt < agent.script.agent_refusals {
                    agent
                        .due
                        .push((at, AgentEvent::Failed(ConnectionFailure::Unreachable)));
                } else {
                    agent.connected = Some(attempt);
                    agent.due.push((at, AgentEvent::Connected));
                    if let Some((after, len)) = agent.script.agent_pause
                        && !agent.paused_once
                    {
                        agent.paused_once = true;
                        agent
                            .due
                            .push((at + after, AgentEvent::PauseRecording(true)));
                        agent
                            .due
                            .push((at + after + len, AgentEvent::PauseRecording(false)));
                    }
                    if let Some(d) = agent.script.agent_drop_after
                        && !agent.dropped_once
                    {
                        agent.dropped_once = true;
                        agent
                            .due
                            .push((at + d, AgentEvent::Failed(ConnectionFailure::Dropped)));
                    }
                }
            }
            PipelineOp::Disconnect | PipelineOp::Close { .. } => {
                agent.connected = None;
                agent.due.clear();
            }
            // The agent echoes what it hears.
            PipelineOp::Audio {
                frame,
                to_agent: true,
                ..
            } if agent.connected.is_some() => {
                replies.push(AgentEvent::Play(sipbridge::call::PipelineAudio::Pcm(
                    frame.samples,
                )));
            }
            _ => {}
        }
    }

    pub(crate) fn poll_timeout(&self) -> Option<Instant> {
        let calls = self.calls.values().filter_map(BridgedCall::poll_timeout);
        let hangups = self.hangups.keys().map(|(at, _)| *at);
        let callers = self.callers.values().map(|c| c.next);
        let rtp = self.rtp_in_flight.keys().next().map(|(at, _)| *at);
        let agents = self
            .agents
            .values()
            .flat_map(|a| a.due.iter().map(|(at, _)| *at));
        calls
            .chain(hangups)
            .chain(callers)
            .chain(rtp)
            .chain(agents)
            .min()
    }

    pub(crate) fn handle_timeout(&mut self, now: Instant, out: &mut Vec<Bytes>) {
        let due: Vec<(Instant, String)> = self
            .hangups
            .keys()
            .filter(|(at, _)| *at <= now)
            .cloned()
            .collect();
        for key in due {
            self.hangups.remove(&key);
            self.input(now, &key.1, BridgeInput::HangUp(HangupCause::Local), out);
        }
        self.caller_sends(now);
        while let Some(entry) = self.rtp_in_flight.first_entry() {
            if entry.key().0 > now {
                break;
            }
            let (id, data) = entry.remove();
            let from: SocketAddr = CALLER_RTP.parse().unwrap();
            self.input(now, &id, BridgeInput::Rtp { from, data }, out);
        }
        let agent_due: Vec<(String, AgentEvent)> = self
            .agents
            .iter_mut()
            .flat_map(|(id, a)| {
                let (due, later): (Vec<_>, Vec<_>) =
                    a.due.drain(..).partition(|(at, _)| *at <= now);
                a.due = later;
                due.into_iter()
                    .map(|(_, e)| (id.clone(), e))
                    .collect::<Vec<_>>()
            })
            .collect();
        for (id, ev) in agent_due {
            if matches!(ev, AgentEvent::Failed(_))
                && let Some(a) = self.agents.get_mut(&id)
            {
                a.connected = None;
            }
            self.input(now, &id, BridgeInput::Agent(ev), out);
        }
        let due: Vec<String> = self
            .calls
            .iter()
            .filter(|(_, c)| c.poll_timeout().is_some_and(|t| t <= now))
            .map(|(id, _)| id.clone())
            .collect();
        for id in due {
            self.input(now, &id, BridgeInput::Timeout, out);
        }
    }
}
