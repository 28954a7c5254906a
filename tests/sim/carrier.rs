//! The carrier side of the simulation: scripted UACs that behave like a real
//! carrier's user agent. Requests are written as literal SIP text (not with
//! the bridge's own dialog code, so the two sides do not share bugs); the
//! client transactions come from `sipbridge::sip::transaction`, which gives
//! Timer A/B/D/E/F/K behaviour: the INVITE is retransmitted until a
//! provisional, BYE/CANCEL until a final, a 487 is ACKed by the transaction.
//! The UAC ACKs every 2xx retransmission (same ACK bytes), answers the
//! bridge's BYE and re-INVITE with 200 (the same bytes on retransmission), and
//! retries a re-INVITE answered 491 after 2.1–4 s (RFC 3261 §14.1).
//!
//! Owns: the carrier's state and what it observed. Never reads the bridge.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use bytes::Bytes;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use sipbridge::sip::message::{Message, Request, Response, parse_datagram};
use sipbridge::sip::timer::TimerConfig;
use sipbridge::sip::transaction::{
    ClientInviteTransaction, ClientNonInviteTransaction, TransactionEvent, TransactionKey,
    TransactionOutput, Transport,
};

use super::net::BRIDGE_IP;

const SENT_BY: &str = "192.0.2.10:5060";
const CONTACT: &str = "<sip:carrier@192.0.2.10:5060>";
pub(crate) const DIALED: &str = "+15551230000";

/// A re-INVITE the UAC sends once the call is up.
#[derive(Debug, Clone)]
pub(crate) struct ReInviteStep {
    /// Wait after the previous step (the ACK, or the previous re-INVITE's final).
    pub(crate) after: Duration,
    /// SDP direction attribute of the offer.
    pub(crate) direction: &'static str,
    /// Extra header lines (`Session-Expires: 90;refresher=uac`).
    pub(crate) headers: Vec<String>,
}

/// What one UAC does.
#[derive(Debug, Clone)]
pub(crate) struct Script {
    /// SDP offer in the INVITE; `false` = delayed offer (answer in the ACK).
    pub(crate) offer_in_invite: bool,
    /// Extra INVITE header lines.
    pub(crate) headers: Vec<String>,
    /// Send CANCEL this long after the first provisional (if no final yet).
    pub(crate) cancel_after: Option<Duration>,
    /// ACK the 2xx (a broken caller never does).
    pub(crate) ack: bool,
    /// Re-INVITEs once the call is up.
    pub(crate) reinvites: Vec<ReInviteStep>,
    /// BYE this long after the last step; `None`: wait for the bridge's BYE.
    pub(crate) bye_after: Option<Duration>,
    /// Retry a re-INVITE answered 491 after a random wait in this range (ms);
    /// RFC 3261 §14.1 says 2.1–4 s for the Call-ID's owner.
    pub(crate) retry_491_ms: (u64, u64),
}

impl Script {
    pub(crate) fn basic(hold: Duration) -> Script {
        Script {
            offer_in_invite: true,
            headers: Vec::new(),
            cancel_after: None,
            ack: true,
            reinvites: Vec::new(),
            bye_after: Some(hold),
            retry_491_ms: (2100, 4000),
        }
    }
}

/// What the UAC saw.
#[derive(Debug, Default, Clone)]
pub(crate) struct UacLog {
    /// First final response to the INVITE.
    pub(crate) invite_final: Option<u16>,
    /// Body of the first 2xx to the INVITE.
    pub(crate) ok_body: Option<Bytes>,
    /// The first 2xx to the INVITE.
    pub(crate) ok: Option<Response>,
    /// First provisional statuses, in order.
    pub(crate) provisionals: Vec<u16>,
    pub(crate) cancel_sent: bool,
    pub(crate) cancel_final: Option<u16>,
    /// First final to each re-INVITE attempt, with its body.
    pub(crate) reinvite_finals: Vec<(u16, Bytes)>,
    pub(crate) bye_sent_at: Option<Instant>,
    pub(crate) bye_final: Option<u16>,
    /// First receipt of each distinct request from the bridge.
    pub(crate) bridge_requests: Vec<(Instant, Request)>,
    pub(crate) timeouts: Vec<&'static str>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Action {
    Cancel,
    ReInvite,
    Bye,
}

pub(crate) struct Uac {
    pub(crate) call_id: String,
    script: Script,
    invite_branch: String,
    invite_head: InviteHead,
    invite_txn: Option<ClientInviteTransaction>,
    to_tag: Option<String>,
    target: String,
    seq: u32,
    /// The ACK sent for the 2xx to each INVITE CSeq, resent on retransmission.
    acks: HashMap<u32, Bytes>,
    cancel_txn: Option<ClientNonInviteTransaction>,
    bye_txn: Option<ClientNonInviteTransaction>,
    reinvite: Option<(u32, String, ClientInviteTransaction)>,
    step: usize,
    attempts: u32,
    sdp_version: u32,
    action: Option<(Instant, Action)>,
    /// Our response to each bridge request: (branch, method) → bytes.
    answered: HashMap<(String, String), Bytes>,
    timers: TimerConfig,
    pub(crate) log: UacLog,
}

#[derive(Debug, Clone)]
struct InviteHead {
    uri: String,
    via: String,
    from: String,
    to: String,
}

fn token(rng: &mut ChaCha8Rng) -> String {
    format!("{:012x}", rng.random::<u64>() >> 16)
}

/// Our SDP: PCMU, PCMA and telephone-event, with the given direction.
pub(crate) fn carrier_sdp(version: u32, direction: &str) -> String {
    format!(
        "v=0\r\no=carrier 4242 {version} IN IP4 192.0.2.10\r\ns=-\r\nc=IN IP4 192.0.2.10\r\nt=0 0\r\n\
         m=audio 40000 RTP/AVP 0 8 101\r\na=rtpmap:0 PCMU/8000\r\na=rtpmap:8 PCMA/8000\r\n\
         a=rtpmap:101 telephone-event/8000\r\na=fmtp:101 0-16\r\na=ptime:20\r\na={direction}\r\n"
    )
}

fn encode(start: &str, headers: &[String], body: &str) -> Bytes {
    let mut text = format!("{start}\r\n");
    for h in headers {
        text.push_str(h);
        text.push_str("\r\n");
    }
    if !body.is_empty() {
        text.push_str("Content-Type: application/sdp\r\n");
    }
    text.push_str(&format!("Content-Length: {}\r\n\r\n{body}", body.len()));
    Bytes::from(text)
}

fn key(branch: &str, method: &str) -> TransactionKey {
    TransactionKey::new(branch, SENT_BY, method).unwrap()
}

/// Transmits and events of one transaction's outputs.
fn drain(
    mut poll: impl FnMut() -> Option<TransactionOutput>,
    out: &mut Vec<Bytes>,
) -> Vec<TransactionEvent> {
    let mut events = Vec::new();
    while let Some(o) = poll() {
        match o {
            TransactionOutput::Transmit(b) => out.push(b),
            TransactionOutput::Event(e) => events.push(e),
        }
    }
    events
}

fn first_final(events: &[TransactionEvent]) -> Option<u16> {
    events.iter().find_map(|e| match e {
        TransactionEvent::ResponseReceived(s) if *s >= 200 => Some(*s),
        _ => None,
    })
}

fn timed_out(events: &[TransactionEvent]) -> bool {
    events
        .iter()
        .any(|e| matches!(e, TransactionEvent::TimedOut(_)))
}

impl Uac {
    /// Builds and sends the INVITE.
    pub(crate) fn start(
        now: Instant,
        call_id: String,
        script: Script,
        timers: TimerConfig,
        rng: &mut ChaCha8Rng,
        out: &mut Vec<Bytes>,
    ) -> Uac {
        let from_tag = token(rng);
        let invite_branch = format!("z9hG4bK{}", token(rng));
        let head = InviteHead {
            uri: format!("sip:{DIALED}@{BRIDGE_IP}:5060"),
            via: format!("Via: SIP/2.0/UDP {SENT_BY};branch={invite_branch};rport"),
            from: format!("From: \"Caller\" <sip:+15559870000@192.0.2.10>;tag={from_tag}"),
            to: format!("To: <sip:{DIALED}@{BRIDGE_IP}>"),
        };
        let mut headers = vec![
            head.via.clone(),
            "Max-Forwards: 70".to_owned(),
            head.from.clone(),
            head.to.clone(),
            format!("Call-ID: {call_id}"),
            "CSeq: 1 INVITE".to_owned(),
            format!("Contact: {CONTACT}"),
            "Allow: INVITE, ACK, CANCEL, BYE, OPTIONS".to_owned(),
        ];
        headers.extend(script.headers.iter().cloned());
        let body = if script.offer_in_invite {
            carrier_sdp(1, "sendrecv")
        } else {
            String::new()
        };
        let invite = encode(&format!("INVITE {} SIP/2.0", head.uri), &headers, &body);
        let mut txn = ClientInviteTransaction::new(
            now,
            key(&invite_branch, "INVITE"),
            Transport::Unreliable,
            timers,
            invite,
        );
        drain(|| txn.poll_output(), out);
        Uac {
            call_id,
            script,
            invite_branch,
            invite_head: head,
            invite_txn: Some(txn),
            to_tag: None,
            target: format!("sip:{DIALED}@{BRIDGE_IP}:5060"),
            seq: 1,
            acks: HashMap::new(),
            cancel_txn: None,
            bye_txn: None,
            reinvite: None,
            step: 0,
            attempts: 0,
            sdp_version: 1,
            action: None,
            answered: HashMap::new(),
            timers,
            log: UacLog::default(),
        }
    }

    /// Every transaction done and nothing scheduled.
    pub(crate) fn is_idle(&self) -> bool {
        self.invite_txn.is_none()
            && self.cancel_txn.is_none()
            && self.bye_txn.is_none()
            && self.reinvite.is_none()
            && self.action.is_none()
    }

    pub(crate) fn poll_timeout(&self) -> Option<Instant> {
        [
            self.invite_txn.as_ref().and_then(|t| t.poll_timeout()),
            self.cancel_txn.as_ref().and_then(|t| t.poll_timeout()),
            self.bye_txn.as_ref().and_then(|t| t.poll_timeout()),
            self.reinvite
                .as_ref()
                .and_then(|(_, _, t)| t.poll_timeout()),
            self.action.map(|(at, _)| at),
        ]
        .into_iter()
        .flatten()
        .min()
    }

    /// Headers of an in-dialog request from us.
    fn dialog_headers(&self, branch: &str, seq: u32, method: &str) -> Vec<String> {
        vec![
            format!("Via: SIP/2.0/UDP {SENT_BY};branch={branch};rport"),
            "Max-Forwards: 70".to_owned(),
            self.invite_head.from.clone(),
            format!(
                "{};tag={}",
                self.invite_head.to,
                self.to_tag.as_deref().unwrap_or_default()
            ),
            format!("Call-ID: {}", self.call_id),
            format!("CSeq: {seq} {method}"),
        ]
    }

    /// ACK for a non-2xx final: the INVITE's branch and Request-URI, the response's To.
    fn non2xx_ack(&self, branch_via: &str, uri: &str, seq: u32, resp: &Response) -> Bytes {
        let to = resp
            .headers
            .get("To")
            .map(str::to_owned)
            .unwrap_or_default();
        let headers = vec![
            branch_via.to_owned(),
            "Max-Forwards: 70".to_owned(),
            self.invite_head.from.clone(),
            format!("To: {to}"),
            format!("Call-ID: {}", self.call_id),
            format!("CSeq: {seq} ACK"),
        ];
        encode(&format!("ACK {uri} SIP/2.0"), &headers, "")
    }

    fn ack_2xx(&mut self, seq: u32, body: &str, rng: &mut ChaCha8Rng) -> Bytes {
        let branch = format!("z9hG4bK{}", token(rng));
        let headers = self.dialog_headers(&branch, seq, "ACK");
        let ack = encode(&format!("ACK {} SIP/2.0", self.target), &headers, body);
        self.acks.insert(seq, ack.clone());
        ack
    }

    fn next_step(&mut self, now: Instant) {
        self.action = if let Some(step) = self.script.reinvites.get(self.step) {
            Some((now + step.after, Action::ReInvite))
        } else {
            self.script.bye_after.map(|b| (now + b, Action::Bye))
        };
    }

    pub(crate) fn on_message(
        &mut self,
        now: Instant,
        msg: Message,
        rng: &mut ChaCha8Rng,
        out: &mut Vec<Bytes>,
    ) {
        match msg {
            Message::Response(resp) => self.on_response(now, resp, rng, out),
            Message::Request(req) => self.on_request(now, req, out),
        }
    }

    fn on_response(
        &mut self,
        now: Instant,
        resp: Response,
        rng: &mut ChaCha8Rng,
        out: &mut Vec<Bytes>,
    ) {
        let Ok(cseq) = resp.cseq() else {
            return;
        };
        let branch = resp
            .top_via()
            .ok()
            .and_then(|v| v.branch().map(str::to_owned))
            .unwrap_or_default();
        match cseq.method.as_str() {
            "INVITE" if cseq.seq == 1 => self.on_invite_response(now, resp, rng, out),
            "INVITE" => self.on_reinvite_response(now, cseq.seq, &branch, resp, rng, out),
            "BYE" => {
                if let Some(txn) = &mut self.bye_txn {
                    let _ = txn.on_response(now, resp.status);
                    let events = drain(|| txn.poll_output(), out);
                    if let Some(s) = first_final(&events) {
                        self.log.bye_final = Some(s);
                    }
                    if txn.is_terminated() {
                        self.bye_txn = None;
                    }
                }
            }
            "CANCEL" => {
                if let Some(txn) = &mut self.cancel_txn {
                    let _ = txn.on_response(now, resp.status);
                    let events = drain(|| txn.poll_output(), out);
                    if let Some(s) = first_final(&events) {
                        self.log.cancel_final = Some(s);
                    }
                    if txn.is_terminated() {
                        self.cancel_txn = None;
                    }
                }
            }
            _ => {}
        }
    }

    fn on_invite_response(
        &mut self,
        now: Instant,
        resp: Response,
        rng: &mut ChaCha8Rng,
        out: &mut Vec<Bytes>,
    ) {
        let status = resp.status;
        let mut events = Vec::new();
        let ack = self.non2xx_ack(&self.invite_head.via, &self.invite_head.uri, 1, &resp);
        if let Some(txn) = &mut self.invite_txn {
            let _ = txn.on_response(now, status, || ack);
            events = drain(|| txn.poll_output(), out);
            if txn.is_terminated() {
                self.invite_txn = None;
            }
        }
        let surfaced = events.contains(&TransactionEvent::ResponseReceived(status));
        match status {
            100..=199 => {
                if surfaced {
                    self.log.provisionals.push(status);
                }
                if status > 100
                    && self.log.invite_final.is_none()
                    && self.action.is_none()
                    && !self.log.cancel_sent
                    && let Some(after) = self.script.cancel_after
                {
                    self.action = Some((now + after, Action::Cancel));
                }
            }
            200..=299 => {
                let first = self.log.invite_final.is_none();
                if first {
                    self.log.invite_final = Some(status);
                    self.log.ok_body = Some(resp.body.clone());
                    self.to_tag = resp.to().ok().and_then(|t| t.tag().map(str::to_owned));
                    if let Some(contact) = resp.contacts().ok().and_then(|c| c.into_iter().next()) {
                        self.target = contact.uri.to_string();
                    }
                    self.log.ok = Some(resp.clone());
                    self.action = None;
                }
                if !self.script.ack {
                    return;
                }
                if let Some(ack) = self.acks.get(&1) {
                    out.push(ack.clone());
                    return;
                }
                let body = if self.script.offer_in_invite {
                    String::new()
                } else {
                    carrier_sdp(1, "sendrecv")
                };
                let ack = self.ack_2xx(1, &body, rng);
                out.push(ack);
                if first {
                    self.next_step(now);
                }
            }
            _ => {
                if surfaced && self.log.invite_final.is_none() {
                    self.log.invite_final = Some(status);
                    self.action = None;
                }
            }
        }
    }

    fn on_reinvite_response(
        &mut self,
        now: Instant,
        seq: u32,
        branch: &str,
        resp: Response,
        rng: &mut ChaCha8Rng,
        out: &mut Vec<Bytes>,
    ) {
        let status = resp.status;
        let mut first = None;
        let via = format!("Via: SIP/2.0/UDP {SENT_BY};branch={branch};rport");
        let ack = self.non2xx_ack(&via, &self.target, seq, &resp);
        if let Some((rseq, rbranch, txn)) = &mut self.reinvite
            && *rseq == seq
            && rbranch == branch
        {
            let _ = txn.on_response(now, status, || ack);
            let events = drain(|| txn.poll_output(), out);
            first = first_final(&events);
            if txn.is_terminated() {
                self.reinvite = None;
            }
        }
        if (200..300).contains(&status) {
            if let Some(ack) = self.acks.get(&seq) {
                out.push(ack.clone());
                return;
            }
            let ack = self.ack_2xx(seq, "", rng);
            out.push(ack);
        }
        let Some(status) = first else {
            return;
        };
        self.log.reinvite_finals.push((status, resp.body.clone()));
        if status == 491 && self.attempts < 5 {
            let (lo, hi) = self.script.retry_491_ms;
            let wait = Duration::from_millis(rng.random_range(lo..=hi));
            self.action = Some((now + wait, Action::ReInvite));
            return;
        }
        self.step += 1;
        self.attempts = 0;
        self.next_step(now);
    }

    fn on_request(&mut self, now: Instant, req: Request, out: &mut Vec<Bytes>) {
        let branch = req
            .top_via()
            .ok()
            .and_then(|v| v.branch().map(str::to_owned))
            .unwrap_or_default();
        let method = req.method.as_str().to_owned();
        let k = (branch, method.clone());
        if let Some(resp) = self.answered.get(&k) {
            out.push(resp.clone());
            return;
        }
        if method == "ACK" {
            // ACK for our 200 to the bridge's re-INVITE: nothing to do.
            self.log.bridge_requests.push((now, req));
            return;
        }
        let resp = match method.as_str() {
            "BYE" if self.to_tag.is_some() => {
                self.action = None;
                Response::for_request(&req, 200)
            }
            "BYE" => Response::for_request(&req, 481),
            "INVITE" => {
                self.sdp_version += 1;
                let mut r = Response::for_request(&req, 200);
                r.headers.push("Contact", CONTACT);
                if let Some(se) = req.headers.get("Session-Expires") {
                    r.headers.push("Session-Expires", se);
                    r.headers.push("Require", "timer");
                }
                r.headers.push("Content-Type", "application/sdp");
                r.body = Bytes::from(carrier_sdp(self.sdp_version, "sendrecv"));
                r
            }
            _ => Response::for_request(&req, 501),
        };
        // The bridge's requests carry our From tag in their To already.
        let bytes = resp.encode();
        self.answered.insert(k, bytes.clone());
        self.log.bridge_requests.push((now, req));
        out.push(bytes);
    }

    pub(crate) fn handle_timeout(
        &mut self,
        now: Instant,
        rng: &mut ChaCha8Rng,
        out: &mut Vec<Bytes>,
    ) {
        if let Some(txn) = &mut self.invite_txn {
            txn.handle_timeout(now);
            let events = drain(|| txn.poll_output(), out);
            if timed_out(&events) {
                self.log.timeouts.push("INVITE");
            }
            if txn.is_terminated() {
                self.invite_txn = None;
            }
        }
        if let Some(txn) = &mut self.cancel_txn {
            txn.handle_timeout(now);
            if timed_out(&drain(|| txn.poll_output(), out)) {
                self.log.timeouts.push("CANCEL");
            }
            if txn.is_terminated() {
                self.cancel_txn = None;
            }
        }
        if let Some(txn) = &mut self.bye_txn {
            txn.handle_timeout(now);
            if timed_out(&drain(|| txn.poll_output(), out)) {
                self.log.timeouts.push("BYE");
            }
            if txn.is_terminated() {
                self.bye_txn = None;
            }
        }
        let mut reinvite_gave_up = false;
        if let Some((_, _, txn)) = &mut self.reinvite {
            txn.handle_timeout(now);
            if timed_out(&drain(|| txn.poll_output(), out)) {
                self.log.timeouts.push("re-INVITE");
                reinvite_gave_up = true;
            }
            if txn.is_terminated() {
                self.reinvite = None;
            }
        }
        if reinvite_gave_up {
            self.step += 1;
            self.attempts = 0;
            self.next_step(now);
        }
        if let Some((at, action)) = self.action
            && at <= now
        {
            self.action = None;
            self.act(now, action, rng, out);
        }
    }

    fn act(&mut self, now: Instant, action: Action, rng: &mut ChaCha8Rng, out: &mut Vec<Bytes>) {
        match action {
            Action::Cancel => {
                if self.log.invite_final.is_some() {
                    return;
                }
                // CANCEL: the INVITE's Request-URI, Via (branch), From, To, Call-ID, CSeq number.
                let headers = vec![
                    self.invite_head.via.clone(),
                    "Max-Forwards: 70".to_owned(),
                    self.invite_head.from.clone(),
                    self.invite_head.to.clone(),
                    format!("Call-ID: {}", self.call_id),
                    "CSeq: 1 CANCEL".to_owned(),
                ];
                let cancel = encode(
                    &format!("CANCEL {} SIP/2.0", self.invite_head.uri),
                    &headers,
                    "",
                );
                let mut txn = ClientNonInviteTransaction::new(
                    now,
                    key(&self.invite_branch, "CANCEL"),
                    Transport::Unreliable,
                    self.timers,
                    cancel,
                );
                drain(|| txn.poll_output(), out);
                self.cancel_txn = Some(txn);
                self.log.cancel_sent = true;
            }
            Action::ReInvite => {
                let Some(step) = self.script.reinvites.get(self.step).cloned() else {
                    return;
                };
                self.seq += 1;
                self.sdp_version += 1;
                self.attempts += 1;
                let branch = format!("z9hG4bK{}", token(rng));
                let mut headers = self.dialog_headers(&branch, self.seq, "INVITE");
                headers.push(format!("Contact: {CONTACT}"));
                headers.extend(step.headers.iter().cloned());
                let body = carrier_sdp(self.sdp_version, step.direction);
                let invite = encode(&format!("INVITE {} SIP/2.0", self.target), &headers, &body);
                let mut txn = ClientInviteTransaction::new(
                    now,
                    key(&branch, "INVITE"),
                    Transport::Unreliable,
                    self.timers,
                    invite,
                );
                drain(|| txn.poll_output(), out);
                self.reinvite = Some((self.seq, branch, txn));
            }
            Action::Bye => {
                self.seq += 1;
                let branch = format!("z9hG4bK{}", token(rng));
                let headers = self.dialog_headers(&branch, self.seq, "BYE");
                let bye = encode(&format!("BYE {} SIP/2.0", self.target), &headers, "");
                let mut txn = ClientNonInviteTransaction::new(
                    now,
                    key(&branch, "BYE"),
                    Transport::Unreliable,
                    self.timers,
                    bye,
                );
                drain(|| txn.poll_output(), out);
                self.bye_txn = Some(txn);
                self.log.bye_sent_at = Some(now);
            }
        }
    }
}

/// Every scripted UAC of one simulation, demultiplexed by Call-ID.
pub(crate) struct Carrier {
    pub(crate) uacs: BTreeMap<String, Uac>,
    /// UACs still to start: (time, Call-ID) → script.
    pending: BTreeMap<(Instant, String), Script>,
    timers: TimerConfig,
    rng: ChaCha8Rng,
    /// Datagrams for no known Call-ID, or that did not parse.
    pub(crate) strays: Vec<Bytes>,
}

impl Carrier {
    pub(crate) fn new(timers: TimerConfig, seed: u64) -> Carrier {
        Carrier {
            uacs: BTreeMap::new(),
            pending: BTreeMap::new(),
            timers,
            rng: ChaCha8Rng::seed_from_u64(seed ^ 0xca77_1e70),
            strays: Vec::new(),
        }
    }

    pub(crate) fn schedule(&mut self, at: Instant, call_id: String, script: Script) {
        self.pending.insert((at, call_id), script);
    }

    pub(crate) fn poll_timeout(&self) -> Option<Instant> {
        let uacs = self.uacs.values().filter_map(Uac::poll_timeout);
        let pending = self.pending.keys().map(|(at, _)| *at);
        uacs.chain(pending).min()
    }

    pub(crate) fn receive(&mut self, now: Instant, raw: &Bytes, out: &mut Vec<Bytes>) {
        let Ok(msg) = parse_datagram(raw) else {
            self.strays.push(raw.clone());
            return;
        };
        let id = msg.headers().call_id().unwrap_or_default().to_owned();
        match self.uacs.get_mut(&id) {
            Some(uac) => uac.on_message(now, msg, &mut self.rng, out),
            None => self.strays.push(raw.clone()),
        }
    }

    pub(crate) fn handle_timeout(&mut self, now: Instant, out: &mut Vec<Bytes>) {
        let due: Vec<(Instant, String)> = self
            .pending
            .keys()
            .filter(|(at, _)| *at <= now)
            .cloned()
            .collect();
        for k in due {
            if let Some(script) = self.pending.remove(&k) {
                let uac = Uac::start(now, k.1.clone(), script, self.timers, &mut self.rng, out);
                self.uacs.insert(k.1, uac);
            }
        }
        for uac in self.uacs.values_mut() {
            if uac.poll_timeout().is_some_and(|t| t <= now) {
                uac.handle_timeout(now, &mut self.rng, out);
            }
        }
    }
}
