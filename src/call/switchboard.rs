//! The switchboard: everything decided before a call exists.
//!
//! Every datagram or stream message is handed here first. It either belongs to
//! a live call (routed by Call-ID), starts a new call (trunk identified by
//! source address and, where configured, digest auth; dialed number routed to a
//! tenant; limits checked), or gets a stateless answer (OPTIONS, errors,
//! rejections, 481 for unknown dialogs). Rejections are stateless (RFC 3261
//! §8.2.7): a bounded cache answers retransmitted INVITEs with the same bytes
//! so that each attempt is decided — and recorded — once.

use super::MediaPlan;
use super::session::SessionTimer;
use super::{
    ALLOW, CallRecord, CallSettings, HangupSide, LocalSip, Peer, SUPPORTED, Transmit, TransportKind,
};
use crate::config::Config;
use crate::media::prompt::Prompt;
use crate::media::resample::PipelineRate;
use crate::sip::digest::DigestServer;
use crate::sip::error::SipError;
use crate::sip::message::{
    Message, Method, ParseError, Request, Response, error_response, validate_request,
};
use crate::sip::sdp::LocalMedia;

/// The echo pipeline plays the caller back after this long.
const ECHO_DELAY: Duration = Duration::from_millis(500);
use bytes::Bytes;
use rand::RngCore;
use std::collections::{HashMap, VecDeque};
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

/// RTP port pairs from the profile's range, handed out round-robin so a
/// just-released port is not reused at once (late packets of the old call).
#[derive(Debug)]
pub struct PortAllocator {
    start: u16,
    pairs: usize,
    next: usize,
    used: Vec<bool>,
    in_use: usize,
}

impl PortAllocator {
    /// Pairs (even RTP port, RTCP = +1) within `[start, end]`.
    pub fn new(start: u16, end: u16) -> Self {
        let start = start + (start % 2);
        let pairs = if end > start {
            usize::from(end - start).div_ceil(2)
        } else {
            0
        };
        PortAllocator {
            start,
            pairs,
            next: 0,
            used: vec![false; pairs],
            in_use: 0,
        }
    }

    /// The next free even port, or `None` when every pair is taken.
    pub fn allocate(&mut self) -> Option<u16> {
        for i in 0..self.pairs {
            let idx = (self.next + i) % self.pairs;
            if !self.used[idx] {
                self.used[idx] = true;
                self.in_use += 1;
                self.next = (idx + 1) % self.pairs;
                return u16::try_from(idx * 2).ok().map(|off| self.start + off);
            }
        }
        None
    }

    /// Gives a port back.
    pub fn release(&mut self, port: u16) {
        let Some(off) = port.checked_sub(self.start) else {
            return;
        };
        let idx = usize::from(off / 2);
        if let Some(slot) = self.used.get_mut(idx)
            && *slot
        {
            *slot = false;
            self.in_use -= 1;
        }
    }

    /// Ports currently handed out.
    pub fn in_use(&self) -> usize {
        self.in_use
    }
}

/// Settings the switchboard applies to every call, from the profile.
#[derive(Debug, Clone)]
pub struct SwitchboardSettings {
    /// T1/T2/T4.
    pub timers: crate::sip::timer::TimerConfig,
    /// Advertised signalling address per transport.
    pub local_udp: LocalSip,
    /// Advertised signalling address for TCP.
    pub local_tcp: LocalSip,
    /// Advertised signalling address for TLS (port 5061 until a TLS
    /// listener is bound: the daemon sets it).
    pub local_tls: LocalSip,
    /// Address put into SDP `c=`.
    pub media_addr: IpAddr,
    /// Codec preference.
    pub codecs: Vec<crate::sip::sdp::Codec>,
    /// Delay between 180 and 200.
    pub answer_delay: Duration,
    /// Session interval we ask for.
    pub session_expires: Duration,
    /// Our Min-SE.
    pub min_se: Duration,
    /// RTP inactivity timeout.
    pub rtp_timeout: Option<Duration>,
    /// Maximum call length.
    pub max_duration: Option<Duration>,
    /// Unknown sources: true = drop silently, false = 403.
    pub drop_unknown_sources: bool,
    /// Calls at once across all tenants.
    pub max_calls: usize,
}

/// A new call the switchboard admitted: create a `Call` with these settings
/// (the RTP port is already allocated; give it back with
/// [`Switchboard::call_ended`]).
#[derive(Debug)]
pub struct Admitted {
    /// The INVITE.
    pub invite: Request,
    /// Where it came from.
    pub peer: Peer,
    /// Settings for the call.
    pub settings: CallSettings,
}

/// What to do with an inbound message.
#[derive(Debug)]
pub enum Dispatch {
    /// Hand it to the live call with this Call-ID.
    ToCall(String, Message),
    /// Start a call.
    NewCall(Box<Admitted>),
    /// Send this answer; `record` is the CDR of a rejected call attempt.
    Reply {
        /// The response.
        transmit: Transmit,
        /// CDR of a rejected INVITE.
        record: Option<Box<CallRecord>>,
    },
    /// Ignore it (responses without a call, ACKs without a transaction,
    /// unknown sources when configured to drop, garbage).
    Drop(&'static str),
}

/// Remembered answers to rejected INVITEs (branch → bytes), bounded.
struct RejectCache {
    order: VecDeque<(String, Instant)>,
    answers: HashMap<String, Bytes>,
}

const REJECT_CACHE: usize = 4096;

impl RejectCache {
    fn get(&self, key: &str) -> Option<&Bytes> {
        self.answers.get(key)
    }

    fn insert(&mut self, now: Instant, key: String, bytes: Bytes, ttl: Duration) {
        while let Some((k, at)) = self.order.front() {
            if self.order.len() >= REJECT_CACHE || now.saturating_duration_since(*at) > ttl {
                self.answers.remove(k);
                self.order.pop_front();
            } else {
                break;
            }
        }
        self.order.push_back((key.clone(), now));
        self.answers.insert(key, bytes);
    }
}

/// Counts of live calls, for limits.
#[derive(Debug, Default)]
struct Counts {
    total: usize,
    per_tenant: HashMap<String, usize>,
    per_trunk: HashMap<String, usize>,
}

/// Decides what to do with every inbound SIP message that is not (yet) a call's.
pub struct Switchboard {
    config: Arc<Config>,
    settings: SwitchboardSettings,
    digest: HashMap<String, DigestServer>,
    counts: Counts,
    /// RTP ports.
    pub ports: PortAllocator,
    rejected: RejectCache,
    draining: bool,
    /// The daemon cannot keep up (its store is behind): new INVITEs get 503.
    overloaded: bool,
    prompts: HashMap<String, Arc<Prompt>>,
}

fn stamp_via(req: &mut Request, peer: &Peer) {
    // RFC 3261 §18.2.1 `received`, RFC 3581 `rport`: remember where the request
    // really came from, so responses find their way through NAT.
    let Ok(mut via) = req.top_via() else {
        return;
    };
    let src_ip = peer.addr.ip();
    let host_is_src = match &via.host {
        crate::sip::message::Host::V4(ip) => IpAddr::V4(*ip) == src_ip,
        crate::sip::message::Host::V6(ip) => IpAddr::V6(*ip) == src_ip,
        crate::sip::message::Host::Domain(_) => false,
    };
    let wants_rport = via.rport().is_some();
    if host_is_src && !wants_rport {
        return;
    }
    if !host_is_src || wants_rport {
        via.params.set("received", Some(&src_ip.to_string()));
    }
    if wants_rport {
        via.params.set("rport", Some(&peer.addr.port().to_string()));
    }
    let mut values: Vec<String> = req.headers.values("Via").map(str::to_owned).collect();
    if let Some(first) = values.first_mut() {
        *first = via.to_string();
    }
    req.headers.remove("Via");
    for value in values.into_iter().rev() {
        req.headers.push_front("Via", value);
    }
}

/// The number a carrier dialed: the Request-URI user (or tel: number),
/// unescaped, without URI parameters such as `;phone-context` or `;npdi`.
pub fn dialed_number(req: &Request) -> Option<String> {
    let user = req.uri.user_unescaped()?;
    let number = user.split(';').next().unwrap_or_default().trim().to_owned();
    (!number.is_empty()).then_some(number)
}

impl SwitchboardSettings {
    /// Settings of a profile, given the addresses its listeners were bound to
    /// (a configured port 0 becomes the real port here).
    pub fn from_profile(
        profile: &crate::config::Profile,
        udp_local: Option<std::net::SocketAddr>,
        tcp_local: Option<std::net::SocketAddr>,
    ) -> SwitchboardSettings {
        let bound_ip = udp_local.or(tcp_local).map(|a| a.ip());
        // The advertised address wins; an unspecified bind (0.0.0.0) cannot be
        // advertised, so fall back to loopback, which `check` warns about.
        let host_ip = profile
            .advertised_address
            .or(bound_ip.filter(|ip| !ip.is_unspecified()))
            .unwrap_or(IpAddr::V4(std::net::Ipv4Addr::LOCALHOST));
        let host = host_ip.to_string();
        let host = if host_ip.is_ipv6() {
            format!("[{host}]")
        } else {
            host
        };
        let sip = &profile.sip;
        let timers =
            crate::sip::timer::TimerConfig::new(sip.t1, sip.t2, sip.t4).unwrap_or_default();
        SwitchboardSettings {
            timers,
            local_udp: LocalSip {
                host: host.clone(),
                port: udp_local.map_or(5060, |a| a.port()),
            },
            local_tcp: LocalSip {
                host: host.clone(),
                port: tcp_local.map_or(5060, |a| a.port()),
            },
            local_tls: LocalSip { host, port: 5061 },
            media_addr: host_ip,
            codecs: vec![crate::sip::sdp::Codec::Pcmu, crate::sip::sdp::Codec::Pcma],
            answer_delay: sip.answer_delay,
            session_expires: sip.session_expires,
            min_se: sip.min_se,
            rtp_timeout: profile.media.rtp_timeout,
            max_duration: profile.media.max_call_duration,
            drop_unknown_sources: sip.unknown_source == crate::config::UnknownSource::Drop,
            max_calls: usize::try_from(profile.max_calls).unwrap_or(usize::MAX),
        }
    }
}

impl Switchboard {
    /// The trunk's SRTP policy, and our master key + salt for the call when
    /// it may use SRTP (drawn from the injected RNG).
    fn srtp_for(
        &self,
        trunk: &str,
        rng: &mut impl RngCore,
    ) -> (
        crate::sip::sdp::Encryption,
        Option<crate::sip::sdp::KeyMaterial>,
    ) {
        use crate::config::MediaEncryption;
        use crate::sip::sdp::Encryption;
        let encryption = match self.config.trunk(trunk).map(|t| t.media_encryption) {
            Some(MediaEncryption::Required) => Encryption::Required,
            Some(MediaEncryption::Optional) => Encryption::Optional,
            _ => Encryption::Off,
        };
        let key = (encryption != Encryption::Off).then(|| {
            let mut bytes = vec![0u8; crate::sip::sdp::MAX_KEY_MATERIAL];
            rng.fill_bytes(&mut bytes);
            crate::sip::sdp::KeyMaterial::new(bytes)
        });
        (encryption, key)
    }

    /// The configuration the switchboard routes with.
    pub fn config(&self) -> &Arc<Config> {
        &self.config
    }

    /// A switchboard for this configuration.
    pub fn new(
        config: Arc<Config>,
        settings: SwitchboardSettings,
        ports: PortAllocator,
        rng: &mut impl RngCore,
    ) -> Self {
        let mut digest = HashMap::new();
        for trunk in &config.trunks {
            if let Some(creds) = &trunk.digest {
                let mut key = [0u8; 32];
                rng.fill_bytes(&mut key);
                digest.insert(
                    trunk.name.clone(),
                    DigestServer::new(&creds.realm, key, Duration::from_secs(300))
                        .with_algorithms(&creds.algorithms),
                );
            }
        }
        Switchboard {
            config,
            settings,
            digest,
            counts: Counts::default(),
            ports,
            rejected: RejectCache {
                order: VecDeque::new(),
                answers: HashMap::new(),
            },
            draining: false,
            overloaded: false,
            prompts: HashMap::new(),
        }
    }

    /// Swaps in a reloaded configuration (SIGHUP, admin API): calls admitted
    /// from now on use `config`, `settings` and `prompts`; live calls keep the
    /// `CallSettings` they were admitted with. Live-call counts stay. The RTP
    /// allocator is replaced only when the profile's range changed (ports of
    /// live calls outside the new range are ignored when they are released).
    /// A trunk whose digest realm and algorithms are unchanged keeps its
    /// server, so challenges issued before the reload stay valid.
    pub fn reconfigure(
        &mut self,
        config: Arc<Config>,
        settings: SwitchboardSettings,
        prompts: HashMap<String, Arc<Prompt>>,
        rng: &mut impl RngCore,
    ) {
        let range = |c: &Config| {
            c.profiles
                .first()
                .map(|p| (p.rtp_ports.start, p.rtp_ports.end))
        };
        if let Some((start, end)) = range(&config)
            && range(&self.config) != Some((start, end))
        {
            self.ports = PortAllocator::new(start, end);
        }
        let mut digest = HashMap::new();
        for trunk in &config.trunks {
            let Some(creds) = &trunk.digest else {
                continue;
            };
            let unchanged = self
                .config
                .trunk(&trunk.name)
                .and_then(|t| t.digest.as_ref())
                .is_some_and(|old| old.realm == creds.realm && old.algorithms == creds.algorithms);
            let server = match self.digest.remove(&trunk.name) {
                Some(server) if unchanged => server,
                _ => {
                    let mut key = [0u8; 32];
                    rng.fill_bytes(&mut key);
                    DigestServer::new(&creds.realm, key, Duration::from_secs(300))
                        .with_algorithms(&creds.algorithms)
                }
            };
            digest.insert(trunk.name.clone(), server);
        }
        self.digest = digest;
        self.config = config;
        self.settings = settings;
        self.prompts = prompts;
    }

    /// Whether new calls are being refused (SIGTERM drain).
    pub fn is_draining(&self) -> bool {
        self.draining
    }

    /// The tenants' disclosure prompts, loaded (once) by the caller.
    pub fn set_prompts(&mut self, prompts: HashMap<String, Arc<Prompt>>) {
        self.prompts = prompts;
    }

    /// Live calls.
    pub fn active_calls(&self) -> usize {
        self.counts.total
    }

    /// While `on`, new INVITEs get 503 + `Retry-After: 5` (load shedding: the
    /// shell sets it when what a call must write could not be kept); live
    /// calls and OPTIONS are unaffected.
    pub fn set_overloaded(&mut self, on: bool) {
        self.overloaded = on;
    }

    /// Whether [`Switchboard::set_overloaded`] is on.
    pub fn is_overloaded(&self) -> bool {
        self.overloaded
    }

    /// From now on new INVITEs get 503 + Retry-After and OPTIONS report 503.
    pub fn start_draining(&mut self) {
        self.draining = true;
    }

    /// A call admitted earlier ended: free its slot and RTP port.
    pub fn call_ended(&mut self, settings: &CallSettings) {
        self.counts.total = self.counts.total.saturating_sub(1);
        if let Some(n) = self.counts.per_tenant.get_mut(&settings.tenant) {
            *n = n.saturating_sub(1);
        }
        if let Some(n) = self.counts.per_trunk.get_mut(&settings.trunk) {
            *n = n.saturating_sub(1);
        }
        self.ports.release(settings.media.rtp_port);
    }

    fn reply(&self, dest: Peer, bytes: Bytes) -> Dispatch {
        Dispatch::Reply {
            transmit: Transmit { dest, bytes },
            record: None,
        }
    }

    /// Decides what to do with one inbound message. `raw` is the datagram (or
    /// framed stream message) it was parsed from; `has_call` tells whether a
    /// live call owns a Call-ID.
    #[allow(clippy::too_many_arguments)]
    pub fn dispatch(
        &mut self,
        now: Instant,
        wall_now: SystemTime,
        raw: &[u8],
        parsed: Result<Message, ParseError>,
        peer: Peer,
        has_call: impl Fn(&str) -> bool,
        rng: &mut impl RngCore,
    ) -> Dispatch {
        let msg = match parsed {
            Ok(m) => m,
            Err(e) => {
                let err = SipError::from(e);
                return match error_response(raw, &err) {
                    Some(bytes) => self.reply(peer, bytes),
                    None => Dispatch::Drop("unparseable"),
                };
            }
        };
        let mut req = match msg {
            Message::Response(resp) => {
                return match resp.call_id() {
                    Ok(id) if has_call(id) => {
                        Dispatch::ToCall(id.to_owned(), Message::Response(resp))
                    }
                    _ => Dispatch::Drop("response without a call"),
                };
            }
            Message::Request(req) => req,
        };
        if let Err(e) = validate_request(&req) {
            if req.method == Method::Ack {
                return Dispatch::Drop("invalid ACK");
            }
            return match error_response(raw, &e) {
                Some(bytes) => self.reply(peer, bytes),
                None => Dispatch::Drop("invalid request"),
            };
        }
        stamp_via(&mut req, &peer);
        let Ok(call_id) = req.call_id().map(str::to_owned) else {
            return Dispatch::Drop("no Call-ID");
        };
        if has_call(&call_id) {
            return Dispatch::ToCall(call_id, Message::Request(req));
        }
        let in_dialog = req.to().ok().is_some_and(|t| t.tag().is_some());
        match (&req.method, in_dialog) {
            (Method::Ack, _) => Dispatch::Drop("ACK without a transaction"),
            (Method::Options, _) => {
                let status = if self.draining { 503 } else { 200 };
                let mut resp = Response::for_request(&req, status);
                resp.headers.push("Allow", ALLOW);
                resp.headers.push("Accept", "application/sdp");
                resp.headers.push("Supported", SUPPORTED);
                if self.draining {
                    resp.headers.push("Retry-After", "30");
                }
                self.reply(peer, resp.encode())
            }
            (Method::Invite, false) => self.admit(now, wall_now, req, peer, rng),
            (Method::Extension(_), _) => {
                let mut resp = Response::for_request(&req, 501);
                resp.headers.push("Allow", ALLOW);
                self.reply(peer, resp.encode())
            }
            (Method::Cancel | Method::Bye | Method::Invite | Method::Update | Method::Info, _) => {
                self.reply(peer, Response::for_request(&req, 481).encode())
            }
            _ => {
                let mut resp = Response::for_request(&req, 405);
                resp.headers.push("Allow", ALLOW);
                self.reply(peer, resp.encode())
            }
        }
    }

    fn media_plan(&self, tenant_id: &str) -> MediaPlan {
        let tenant = self.config.tenant(tenant_id);
        let echo = matches!(
            tenant.map(|t| &t.pipeline),
            Some(crate::config::Pipeline::Echo)
        );
        MediaPlan {
            prompt: self.prompts.get(tenant_id).cloned(),
            gate_until_prompt_done: tenant.is_none_or(|t| t.caller_audio_after_prompt),
            pipeline_rate: tenant
                .and_then(|t| PipelineRate::from_hz(t.pipeline_rate))
                .unwrap_or(PipelineRate::Hz16000),
            echo_delay: echo.then_some(ECHO_DELAY),
            record: tenant.is_some_and(|t| t.recording),
        }
    }

    fn admit(
        &mut self,
        now: Instant,
        wall_now: SystemTime,
        req: Request,
        peer: Peer,
        rng: &mut impl RngCore,
    ) -> Dispatch {
        let branch_key = format!(
            "{}|{}",
            req.call_id().unwrap_or_default(),
            req.top_via()
                .ok()
                .and_then(|v| v.branch().map(str::to_owned))
                .unwrap_or_default()
        );
        if let Some(bytes) = self.rejected.get(&branch_key) {
            // A retransmission of an INVITE we already rejected.
            return self.reply(peer, bytes.clone());
        }
        let dialed = dialed_number(&req);
        let mut record = CallRecord {
            call_id: req.call_id().unwrap_or_default().to_owned(),
            tenant: None,
            trunk: None,
            from: req
                .from()
                .ok()
                .and_then(|f| f.uri.user_unescaped())
                .unwrap_or_default(),
            to: dialed.clone().unwrap_or_default(),
            source: peer.addr,
            started_at: wall_now,
            answered_at: None,
            ended_at: Some(wall_now),
            result_code: 0,
            hangup_side: HangupSide::Bridge,
            cause: "rejected".to_owned(),
            codec: None,
            rtp: None,
            pipeline: None,
        };
        let ttl = self.settings.timers.timeout_64_t1();
        let reject_tag = format!("{:016x}", rng.next_u64());
        let reject = |sb: &mut Switchboard,
                      record: &mut CallRecord,
                      status: u16,
                      extra: Vec<(&str, String)>,
                      cache: bool| {
            let mut resp = Response::for_request(&req, status);
            if status > 100 {
                let mut to = req.to().ok();
                if let Some(to) = &mut to {
                    to.params.set("tag", Some(&reject_tag));
                    resp.headers.set("To", to.to_string());
                }
            }
            for (name, value) in extra {
                resp.headers.push(name, value);
            }
            let bytes = resp.encode();
            if cache {
                sb.rejected
                    .insert(now, branch_key.clone(), bytes.clone(), ttl);
            }
            record.result_code = status;
            Dispatch::Reply {
                transmit: Transmit { dest: peer, bytes },
                record: Some(Box::new(record.clone())),
            }
        };
        // Draining: come back after the restart; overloaded: in a moment.
        if self.draining || self.overloaded {
            let retry_after = if self.draining { "30" } else { "5" };
            return reject(
                self,
                &mut record,
                503,
                vec![("Retry-After", retry_after.to_owned())],
                true,
            );
        }
        if req.max_forwards().ok().flatten() == Some(0) {
            return reject(self, &mut record, 483, vec![], true);
        }
        // 1. Trunk by source address.
        let Some(trunk) = self.config.trunk_for_source(peer.addr.ip()) else {
            if self.settings.drop_unknown_sources {
                return Dispatch::Drop("unknown source");
            }
            return reject(self, &mut record, 403, vec![], true);
        };
        let trunk_name = trunk.name.clone();
        record.trunk = Some(trunk_name.clone());
        // 2. Digest, where the trunk has credentials. A retransmitted INVITE
        // gets the same challenge (same nonce) from the cache, so each attempt
        // is challenged — and recorded — once.
        if let (Some(creds), Some(server)) = (&trunk.digest, self.digest.get_mut(&trunk_name)) {
            let unix = wall_now
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0);
            let uri = req.uri.to_string();
            let verdict = match req.headers.get("Authorization") {
                None => Err(crate::sip::digest::DigestError::Missing),
                Some(auth) => server.verify(
                    auth,
                    req.method.as_str(),
                    &uri,
                    &creds.username,
                    creds.password.expose(),
                    unix,
                ),
            };
            if let Err(e) = verdict {
                let stale = matches!(e, crate::sip::digest::DigestError::StaleNonce);
                let challenges = server.challenge(unix, rng, stale);
                let extra = challenges
                    .into_iter()
                    .map(|c| ("WWW-Authenticate", c))
                    .collect();
                record.cause = format!("auth: {e}");
                return reject(self, &mut record, 401, extra, true);
            }
        }
        // 3. Route the dialed number to a tenant.
        let Some(number) = dialed else {
            return reject(self, &mut record, 404, vec![], true);
        };
        let Some(route) = self.config.route(&number, &trunk_name) else {
            record.cause = "no-route".to_owned();
            return reject(self, &mut record, 404, vec![], true);
        };
        let tenant_id = route.tenant.clone();
        record.tenant = Some(tenant_id.clone());
        // 4. Session timer floor (RFC 4028 §6: 422 with our Min-SE).
        if let Err(e) =
            SessionTimer::negotiate(&req, self.settings.session_expires, self.settings.min_se)
        {
            let (status, _) = e.status();
            let extra = e.extra_headers().into_iter().collect();
            return reject(self, &mut record, status, extra, true);
        }
        // 5. Limits: global → 503 + Retry-After; tenant/trunk → 486.
        if self.counts.total >= self.settings.max_calls {
            record.cause = "global-limit".to_owned();
            return reject(
                self,
                &mut record,
                503,
                vec![("Retry-After", "5".to_owned())],
                true,
            );
        }
        let tenant_max = self
            .config
            .tenant(&tenant_id)
            .and_then(|t| t.max_calls)
            .map(|m| m as usize);
        let trunk_max = trunk.max_calls.map(|m| m as usize);
        let tenant_now = self.counts.per_tenant.get(&tenant_id).copied().unwrap_or(0);
        let trunk_now = self.counts.per_trunk.get(&trunk_name).copied().unwrap_or(0);
        if tenant_max.is_some_and(|m| tenant_now >= m) || trunk_max.is_some_and(|m| trunk_now >= m)
        {
            record.cause = "busy".to_owned();
            return reject(self, &mut record, 486, vec![], true);
        }
        // 6. An RTP port pair.
        let Some(rtp_port) = self.ports.allocate() else {
            record.cause = "no-rtp-ports".to_owned();
            return reject(
                self,
                &mut record,
                503,
                vec![("Retry-After", "5".to_owned())],
                true,
            );
        };
        self.counts.total += 1;
        *self.counts.per_tenant.entry(tenant_id.clone()).or_default() += 1;
        *self.counts.per_trunk.entry(trunk_name.clone()).or_default() += 1;
        let local = match peer.transport {
            TransportKind::Udp => self.settings.local_udp.clone(),
            TransportKind::Tcp => self.settings.local_tcp.clone(),
            TransportKind::Tls => self.settings.local_tls.clone(),
        };
        let (encryption, srtp_key) = self.srtp_for(&trunk_name, rng);
        let plan = self.media_plan(&tenant_id);
        let early_media = plan.prompt.is_some()
            && self
                .config
                .tenant(&tenant_id)
                .is_some_and(|t| t.early_media);
        let settings = CallSettings {
            tenant: tenant_id,
            trunk: trunk_name,
            timers: self.settings.timers,
            local,
            media: LocalMedia {
                addr: self.settings.media_addr,
                rtp_port,
                codecs: self.settings.codecs.clone(),
                telephone_event_pt: 101,
                ptime_ms: 20,
                encryption,
                secure_signalling: peer.transport == TransportKind::Tls,
                srtp_key,
            },
            answer_delay: self.settings.answer_delay,
            session_expires: self.settings.session_expires,
            min_se: self.settings.min_se,
            rtp_timeout: self.settings.rtp_timeout,
            max_duration: self.settings.max_duration,
            plan,
            early_media,
        };
        Dispatch::NewCall(Box::new(Admitted {
            invite: req,
            peer,
            settings,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_round_robin_and_release() {
        let mut p = PortAllocator::new(20000, 20005);
        assert_eq!(p.allocate(), Some(20000));
        assert_eq!(p.allocate(), Some(20002));
        assert_eq!(p.allocate(), Some(20004));
        assert_eq!(p.allocate(), None);
        assert_eq!(p.in_use(), 3);
        p.release(20002);
        p.release(20002);
        assert_eq!(p.in_use(), 2);
        assert_eq!(p.allocate(), Some(20002));
        p.release(19000);
        assert_eq!(p.in_use(), 3);
    }
}
