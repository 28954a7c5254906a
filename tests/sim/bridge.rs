//! The bridge side of the simulation: a `Switchboard` plus the live `Call`s,
//! driven exactly as `src/daemon` drives them (dispatch → ToCall / NewCall /
//! Reply / Drop; drain `poll_output` after every input; `call_ended` on the
//! `Ended` event; drop the call once `is_finished`), with everything it does
//! recorded for the invariants.
//!
//! Owns: the bridge's state and its observation log. Never reads the
//! carrier's state.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use sipbridge::call::{
    Call, CallEvent, CallOutput, CallRecord, CallSettings, Dispatch, HangupCause, Peer,
    Switchboard, TransportKind,
};
use sipbridge::sip::message::{Message, parse_datagram};
use sipbridge::sip::sdp::Negotiated;

use super::net::CARRIER;

/// A final response the bridge sent: (Call-ID, top Via branch, CSeq method).
pub(crate) type FinalKey = (String, String, String);

pub(crate) struct Bridge {
    pub(crate) switchboard: Switchboard,
    pub(crate) calls: BTreeMap<String, Call>,
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
    /// Calls dropped after `is_finished`, with the time.
    pub(crate) finished: BTreeMap<String, Instant>,
    /// Hang-ups the test asked for: after this long past the call's creation.
    pub(crate) hangup_after: BTreeMap<String, Duration>,
    hangups: BTreeMap<(Instant, String), ()>,
    pub(crate) drops: Vec<&'static str>,
    /// Protocol violations noticed on the way (checked at the end).
    pub(crate) violations: Vec<String>,
    rng: ChaCha8Rng,
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

impl Bridge {
    pub(crate) fn new(switchboard: Switchboard, seed: u64, t0: Instant) -> Bridge {
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
            rng: ChaCha8Rng::seed_from_u64(seed ^ 0xb41d_6e00),
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
                let Some(call) = self.calls.get_mut(&id) else {
                    self.violations
                        .push(format!("ToCall for unknown call {id}"));
                    return;
                };
                match msg {
                    Message::Request(req) => call.handle_request(now, req, &mut self.rng),
                    Message::Response(resp) => call.handle_response(now, resp, &mut self.rng),
                }
                self.drain(now, &id, out);
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
                        self.holding.insert(id.clone(), settings);
                        self.calls.insert(id.clone(), call);
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

    fn drain(&mut self, now: Instant, id: &str, out: &mut Vec<Bytes>) {
        let Some(call) = self.calls.get_mut(id) else {
            return;
        };
        let mut outputs = Vec::new();
        while let Some(o) = call.poll_output() {
            outputs.push(o);
        }
        let finished = call.is_finished();
        for o in outputs {
            match o {
                CallOutput::Transmit(t) => self.transmit(now, id, t.dest, t.bytes, out),
                CallOutput::Event(CallEvent::Answered(neg)) => {
                    self.answered.entry(id.to_owned()).or_default().push(neg);
                }
                // The simulated tenant has no early media.
                CallOutput::Event(CallEvent::EarlyMedia(_)) => self
                    .violations
                    .push(format!("unexpected early media for {id} at {now:?}")),
                CallOutput::Event(CallEvent::MediaChanged(neg)) => {
                    self.media_changed
                        .entry(id.to_owned())
                        .or_default()
                        .push(neg);
                }
                CallOutput::Event(CallEvent::Ended(record)) => {
                    match self.holding.remove(id) {
                        Some(settings) => self.switchboard.call_ended(&settings),
                        None => self
                            .violations
                            .push(format!("second Ended for {id} at {now:?}")),
                    }
                    self.ended.push(*record);
                }
            }
        }
        if finished {
            if self.holding.contains_key(id) {
                self.violations
                    .push(format!("{id} finished without an Ended event"));
            }
            self.calls.remove(id);
            self.finished.insert(id.to_owned(), now);
        }
    }

    pub(crate) fn poll_timeout(&self) -> Option<Instant> {
        let calls = self.calls.values().filter_map(Call::poll_timeout);
        let hangups = self.hangups.keys().map(|(at, _)| *at);
        calls.chain(hangups).min()
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
            if let Some(call) = self.calls.get_mut(&key.1) {
                call.hang_up(now, HangupCause::Local, &mut self.rng);
                self.drain(now, &key.1, out);
            }
        }
        let due: Vec<String> = self
            .calls
            .iter()
            .filter(|(_, c)| c.poll_timeout().is_some_and(|t| t <= now))
            .map(|(id, _)| id.clone())
            .collect();
        for id in due {
            if let Some(call) = self.calls.get_mut(&id) {
                call.handle_timeout(now, &mut self.rng);
                self.drain(now, &id, out);
            }
        }
    }
}
