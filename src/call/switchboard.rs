//! The switchboard: everything decided before a call exists.
//!
//! Every datagram or stream message is handed here first. It either belongs to
//! a live call (routed by Call-ID), starts a new call (trunk identified by
//! source address and, where configured, digest auth; dialed number routed to a
//! tenant; limits checked), or gets a stateless answer (OPTIONS, errors,
//! rejections, 481 for unknown dialogs). Rejections are stateless (RFC 3261
//! §8.2.7): a bounded cache answers retransmitted INVITEs with the same bytes
//! so that each attempt is decided — and recorded — once.

use super::auth_guard::{AuthGuard, AuthLimits, AuthRefusal};
use super::session::SessionTimer;
use super::source_gate::{BanReason, GateDrop, GateLimits, SourceGate};
use super::{
    ALLOW, CallDirection, CallRecord, CallSettings, HangupSide, LocalSip, Peer, RecordingStatus,
    SUPPORTED, Transmit, TransportKind,
};
use super::{MediaPlan, PipelineFormat};
use crate::config::{Config, OnStoreFailure};
use crate::media::prompt::Prompt;
use crate::media::resample::PipelineRate;
use crate::media::rtp::RtpSourcePolicy;
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

/// RTP port pairs from the profile's range, each drawn uniformly at random
/// from the free ones (the caller's RNG): ports handed out in order let an
/// attacker guess the next call's port, and a just-released port is unlikely
/// to be reused at once (late packets of the old call).
#[derive(Debug)]
pub struct PortAllocator {
    start: u16,
    pairs: usize,
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
            used: vec![false; pairs],
            in_use: 0,
        }
    }

    /// A free even port chosen at random, or `None` when every pair is taken.
    pub fn allocate(&mut self, rng: &mut impl RngCore) -> Option<u16> {
        let free = self.pairs - self.in_use;
        if free == 0 {
            return None;
        }
        let nth = usize::try_from(rng.next_u64() % free as u64).unwrap_or(0);
        let idx = self
            .used
            .iter()
            .enumerate()
            .filter(|(_, used)| !**used)
            .nth(nth)
            .map(|(i, _)| i)?;
        self.used[idx] = true;
        self.in_use += 1;
        u16::try_from(idx * 2).ok().map(|off| self.start + off)
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

    /// Whether every pair is handed out.
    pub fn is_full(&self) -> bool {
        self.in_use >= self.pairs
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
    /// Behind-NAT trunks: how long a call's RTP source may latch.
    pub rtp_latch_window: Duration,
    /// How long a digest nonce is accepted.
    pub nonce_lifetime: Duration,
    /// Digest guessing throttle and ban.
    pub auth_limits: AuthLimits,
    /// Calls not yet confirmed by ACK, per source address.
    pub max_unconfirmed_per_source: usize,
    /// Per-source rate limits and bans (the switchboard adds the trusted
    /// sources from the trunks: [`Switchboard::new`]).
    pub gate: GateLimits,
    /// SIP proxies in front of the daemon (`[profile.security]
    /// trusted_proxies`): see [`Switchboard::caller_source`].
    pub trusted_proxies: Vec<ipnet::IpNet>,
    /// The header those proxies write the caller's address in.
    pub proxy_source_header: String,
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
    /// The configuration the call was admitted under: everything else the
    /// call needs of its tenant (pipeline, consent keys) is read from this,
    /// never from a configuration reloaded meanwhile.
    pub config: Arc<Config>,
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

/// Counters of the edge's defences since start ([`Switchboard::security_counts`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SecurityCounts {
    /// Sources banned, by reason: digest, malformed, scanner.
    pub bans: [(BanReason, u64); 3],
    /// Digest checks that failed.
    pub digest_failures: u64,
    /// Sources the gate tracks now.
    pub tracked_sources: usize,
}

/// `ip` with an IPv4-mapped IPv6 address as the IPv4 address.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
        v4 => v4,
    }
}

/// The address in a proxy's source header: `IP`, `IP:PORT`, `[IPv6]` or
/// `[IPv6]:PORT` (the port is not used); anything else is `None`.
fn parse_source_address(value: &str) -> Option<IpAddr> {
    let v = value.trim();
    if v.len() > 64 {
        return None;
    }
    if let Ok(ip) = v.parse::<IpAddr>() {
        return Some(ip);
    }
    if let Ok(sa) = v.parse::<std::net::SocketAddr>() {
        return Some(sa.ip());
    }
    v.strip_prefix('[')
        .and_then(|r| r.strip_suffix(']'))
        .and_then(|r| r.parse::<std::net::Ipv6Addr>().ok())
        .map(IpAddr::V6)
}

/// Whether `req` names a live call (its Call-ID, before validation).
fn has_call_id(req: &Request, has_call: &impl Fn(&str) -> bool) -> bool {
    req.call_id().is_ok_and(has_call)
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

/// Where a live call's in-dialog messages may come from: its trunk's
/// `allow` networks, or a host of the dialog (the INVITE's source, its
/// Contact — the remote target — and its Record-Route hosts, where they are
/// IP literals). Anyone else who learnt the Call-ID and tags could otherwise
/// end the call with a BYE or move its media with a re-INVITE (issue 19).
#[derive(Debug, Clone)]
struct DialogSources {
    trunk: String,
    hosts: Vec<IpAddr>,
    /// The INVITE's source address, while the call is not confirmed by ACK
    /// (it holds one of that source's unconfirmed slots).
    unconfirmed_from: Option<IpAddr>,
}

impl DialogSources {
    fn of(invite: &Request, peer: &Peer, caller: IpAddr, trunk: &str) -> DialogSources {
        let mut hosts = vec![peer.addr.ip()];
        let contacts = invite.contacts().unwrap_or_default();
        let routes = invite.record_routes().unwrap_or_default();
        for na in contacts.iter().chain(routes.iter()) {
            let ip = match &na.uri.host {
                Some(crate::sip::message::Host::V4(v4)) => IpAddr::V4(*v4),
                Some(crate::sip::message::Host::V6(v6)) => IpAddr::V6(*v6),
                _ => continue,
            };
            if !hosts.contains(&ip) {
                hosts.push(ip);
            }
        }
        hosts.truncate(16);
        DialogSources {
            trunk: trunk.to_owned(),
            hosts,
            unconfirmed_from: Some(caller),
        }
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
    /// Failed digest checks per source and username; bans.
    auth: AuthGuard,
    /// Per-source rate limits and the ban list (screened before parsing).
    gate: SourceGate,
    /// Digest checks that failed (wrong answers), for metrics.
    digest_failures: u64,
    counts: Counts,
    /// Live calls by Call-ID: where their in-dialog messages may come from.
    dialogs: HashMap<String, DialogSources>,
    /// Calls not yet confirmed by ACK, per source address.
    unconfirmed: HashMap<IpAddr, usize>,
    /// RTP ports.
    pub ports: PortAllocator,
    rejected: RejectCache,
    draining: bool,
    /// The daemon cannot keep up (its store is behind): new INVITEs get 503.
    overloaded: bool,
    /// The store can write (free space above the watermark, no failed
    /// write since the last check); when not, recording tenants' new calls
    /// are answered unrecorded or refused (`on_store_failure`).
    store_writable: bool,
    prompts: HashMap<String, Arc<Prompt>>,
    /// Outbound calls per second, per tenant: a token bucket each (tokens,
    /// last refill). At most one entry per configured tenant.
    outbound_buckets: HashMap<String, (f64, Instant)>,
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
            rtp_latch_window: profile.security.rtp_latch_window,
            nonce_lifetime: profile.security.digest_nonce_lifetime,
            auth_limits: AuthLimits {
                failures: profile.security.auth_failures_per_minute,
                window: Duration::from_secs(60),
                ban: profile.security.auth_ban,
                never_ban: profile.security.never_ban.clone(),
            },
            max_unconfirmed_per_source: usize::try_from(
                profile.security.max_unconfirmed_calls_per_source,
            )
            .unwrap_or(usize::MAX),
            gate: GateLimits {
                requests_per_second: f64::from(profile.security.requests_per_second_per_source),
                requests_burst: f64::from(profile.security.request_burst_per_source),
                calls_per_second: f64::from(profile.security.calls_per_second_per_source),
                calls_burst: f64::from(profile.security.call_burst_per_source),
                malformed: profile.security.malformed_ban_after,
                malformed_window: profile.security.malformed_window,
                ban: profile.security.ban,
                scanner_user_agents: profile.security.scanner_user_agents.clone(),
                trusted: profile.security.never_ban.clone(),
            },
            trusted_proxies: profile.security.trusted_proxies.clone(),
            proxy_source_header: profile.security.trusted_proxy_source_header.clone(),
        }
    }
}

/// The gate's limits for `config`: `settings.gate` with the trusted sources
/// completed, and the auth guard's never-ban list the same: `never_ban`, the
/// trusted proxies (each relays many callers: limits and bans apply to the
/// callers it names, [`Switchboard::caller_source`]), and
/// the `allow` networks of trunks identified by address alone (no digest).
/// A trunk with digest credentials is not trusted by address: its `allow`
/// is often the whole internet.
fn with_trusted(config: &Config, mut settings: SwitchboardSettings) -> SwitchboardSettings {
    let mut trusted = settings.gate.trusted.clone();
    trusted.extend(settings.trusted_proxies.iter().copied());
    for trunk in config.trunks.iter().filter(|t| t.digest.is_none()) {
        trusted.extend(trunk.allow.iter().copied());
    }
    trusted.sort();
    trusted.dedup();
    settings.gate.trusted = trusted.clone();
    settings.auth_limits.never_ban = trusted;
    settings
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
        let settings = with_trusted(&config, settings);
        let mut digest = HashMap::new();
        for trunk in &config.trunks {
            if let Some(creds) = &trunk.digest {
                let mut key = [0u8; 32];
                rng.fill_bytes(&mut key);
                digest.insert(
                    trunk.name.clone(),
                    DigestServer::new(&creds.realm, key, settings.nonce_lifetime)
                        .with_algorithms(&creds.algorithms),
                );
            }
        }
        Switchboard {
            config,
            auth: AuthGuard::new(settings.auth_limits.clone()),
            gate: SourceGate::new(settings.gate.clone()),
            digest_failures: 0,
            settings,
            digest,
            counts: Counts::default(),
            dialogs: HashMap::new(),
            unconfirmed: HashMap::new(),
            ports,
            rejected: RejectCache {
                order: VecDeque::new(),
                answers: HashMap::new(),
            },
            draining: false,
            overloaded: false,
            store_writable: true,
            prompts: HashMap::new(),
            outbound_buckets: HashMap::new(),
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
        let settings = with_trusted(&config, settings);
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
                .is_some_and(|old| old.realm == creds.realm && old.algorithms == creds.algorithms)
                && settings.nonce_lifetime == self.settings.nonce_lifetime;
            let server = match self.digest.remove(&trunk.name) {
                Some(server) if unchanged => server,
                _ => {
                    let mut key = [0u8; 32];
                    rng.fill_bytes(&mut key);
                    DigestServer::new(&creds.realm, key, settings.nonce_lifetime)
                        .with_algorithms(&creds.algorithms)
                }
            };
            digest.insert(trunk.name.clone(), server);
        }
        self.digest = digest;
        self.auth.set_limits(settings.auth_limits.clone());
        self.gate.set_limits(settings.gate.clone());
        self.config = config;
        self.settings = settings;
        self.prompts = prompts;
    }

    /// Screens a message by its source and first line, before it is parsed
    /// ([`SourceGate::screen`]): `Err` drops it unanswered.
    pub fn screen(&mut self, now: Instant, ip: IpAddr, first_line: &[u8]) -> Result<(), GateDrop> {
        self.gate.screen(now, ip, first_line)
    }

    /// Whether `ip` is banned now (a TCP/TLS connection from it is closed
    /// as soon as it is accepted).
    pub fn is_banned_at(&self, now: Instant, ip: IpAddr) -> bool {
        self.gate.is_banned(now, ip)
    }

    /// Bans in force (at most `max`), longest remaining first.
    pub fn bans_in_force(&self, now: Instant, max: usize) -> Vec<super::source_gate::Ban> {
        self.gate.bans_in_force(now, max)
    }

    /// Counters of the edge's defences since start (for metrics).
    pub fn security_counts(&self) -> SecurityCounts {
        SecurityCounts {
            bans: self.gate.bans_by_reason(),
            digest_failures: self.digest_failures,
            tracked_sources: self.gate.tracked(),
        }
    }

    /// Whether some trunk allows `ip` by address.
    fn source_known(&self, ip: IpAddr) -> bool {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
            v4 => v4,
        };
        self.config.trunk_for_source(ip).is_some()
    }

    /// Whether `ip` is one of the trusted proxies.
    pub fn is_trusted_proxy(&self, ip: IpAddr) -> bool {
        let ip = canonical(ip);
        self.settings
            .trusted_proxies
            .iter()
            .any(|n| n.contains(&ip))
    }

    /// The address a request came from, for trunk matching, digest bans and
    /// the unconfirmed-call limit: the packet's source, except that a request
    /// from a trusted proxy is the caller's whose address the proxy wrote in
    /// the source header (the last one of that name: a proxy appends its own
    /// after any the caller sent). A proxied request without a readable one
    /// is the proxy's own. The header of anyone else is never read.
    pub fn caller_source(&self, req: &Request, packet_source: IpAddr) -> IpAddr {
        if !self.is_trusted_proxy(packet_source) {
            return packet_source;
        }
        req.headers
            .values(&self.settings.proxy_source_header)
            .last()
            .and_then(parse_source_address)
            .map_or(packet_source, canonical)
    }

    /// Whether a new call would be refused now whoever sent it: draining, the
    /// store behind (`overloaded`), the global `max_calls` reached, or no RTP
    /// port free. OPTIONS report it as 503, so that a load balancer sends
    /// new calls elsewhere.
    pub fn refuses_new_calls(&self) -> bool {
        self.draining
            || self.overloaded
            || self.counts.total >= self.settings.max_calls
            || self.ports.is_full()
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

    /// Whether the store can write (the shell checks free space and failed
    /// writes); see `on_store_failure`. Live calls are unaffected.
    pub fn set_store_writable(&mut self, writable: bool) {
        self.store_writable = writable;
    }

    /// Whether [`Switchboard::set_store_writable`] is on.
    pub fn is_store_writable(&self) -> bool {
        self.store_writable
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
        self.call_confirmed(&settings.call_id);
        self.dialogs.remove(&settings.call_id);
        self.counts.total = self.counts.total.saturating_sub(1);
        if let Some(n) = self.counts.per_tenant.get_mut(&settings.tenant) {
            *n = n.saturating_sub(1);
        }
        if let Some(n) = self.counts.per_trunk.get_mut(&settings.trunk) {
            *n = n.saturating_sub(1);
        }
        self.ports.release(settings.media.rtp_port);
    }

    /// The caller ACKed our 200 (or its media arrived from the SDP address):
    /// the call no longer holds one of its source's unconfirmed slots.
    pub fn call_confirmed(&mut self, call_id: &str) {
        let Some(ip) = self
            .dialogs
            .get_mut(call_id)
            .and_then(|d| d.unconfirmed_from.take())
        else {
            return;
        };
        if let Some(n) = self.unconfirmed.get_mut(&ip) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.unconfirmed.remove(&ip);
            }
        }
    }

    /// Calls from `ip` not yet confirmed by ACK.
    pub fn unconfirmed_from(&self, ip: IpAddr) -> usize {
        self.unconfirmed.get(&ip).copied().unwrap_or(0)
    }

    /// No RTP port of an admitted call could be bound: frees its slot and
    /// returns the `503` (with a To tag and `Retry-After`) to send and the
    /// CDR of the attempt (cause `no-rtp-ports`).
    pub fn rtp_bind_failed(
        &mut self,
        admitted: &Admitted,
        wall_now: SystemTime,
        rng: &mut impl RngCore,
    ) -> (Transmit, CallRecord) {
        self.call_ended(&admitted.settings);
        let req = &admitted.invite;
        let mut resp = Response::for_request(req, 503);
        if let Ok(mut to) = req.to() {
            to.params
                .set("tag", Some(&format!("{:016x}", rng.next_u64())));
            resp.headers.set("To", to.to_string());
        }
        resp.headers.push("Retry-After", "5");
        let record = CallRecord {
            call_id: admitted.settings.call_id.clone(),
            direction: CallDirection::Inbound,
            tenant: Some(admitted.settings.tenant.clone()),
            trunk: Some(admitted.settings.trunk.clone()),
            from: req
                .from()
                .ok()
                .and_then(|f| f.uri.user_unescaped())
                .unwrap_or_default(),
            to: dialed_number(req).unwrap_or_default(),
            source: admitted.peer.addr,
            started_at: wall_now,
            answered_at: None,
            ended_at: Some(wall_now),
            result_code: 503,
            hangup_side: HangupSide::Bridge,
            cause: "no-rtp-ports".to_owned(),
            codec: None,
            rtp: None,
            pipeline: None,
            recording_paused: Vec::new(),
            recording: if self
                .config
                .tenant(&admitted.settings.tenant)
                .is_some_and(|t| t.recording)
            {
                RecordingStatus::NotStarted
            } else {
                RecordingStatus::Off
            },
            quality: None,
            transfer: None,
        };
        let transmit = Transmit {
            dest: crate::call::response_dest(req, admitted.peer),
            bytes: resp.encode(),
        };
        (transmit, record)
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
        let ip = peer.addr.ip();
        let msg = match parsed {
            Ok(m) => m,
            Err(e) => {
                if self.gate.malformed(now, ip) {
                    return Dispatch::Drop("malformed: source banned");
                }
                if self.settings.drop_unknown_sources
                    && !self.source_known(ip)
                    && !self.is_trusted_proxy(ip)
                {
                    return Dispatch::Drop("unknown source");
                }
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
                    Ok(id) if has_call(id) && !self.dialog_source_allowed(id, &peer) => {
                        Dispatch::Drop("response from outside the dialog")
                    }
                    Ok(id) if has_call(id) => {
                        Dispatch::ToCall(id.to_owned(), Message::Response(resp))
                    }
                    _ => Dispatch::Drop("response without a call"),
                };
            }
            Message::Request(req) => req,
        };
        if let Some(ua) = req.headers.get("User-Agent")
            && self.gate.user_agent(now, ip, ua)
        {
            return Dispatch::Drop("scanner");
        }
        // Behind a trusted proxy the caller is whom the proxy names; the
        // proxy itself is never an unknown source.
        let from_proxy = self.is_trusted_proxy(ip);
        let caller = self.caller_source(&req, ip);
        if self.settings.drop_unknown_sources
            && !from_proxy
            && !self.source_known(ip)
            && !has_call_id(&req, &has_call)
        {
            // Nothing at all for a source no trunk allows: not even a 400
            // tells a scanner there is a SIP service here.
            return Dispatch::Drop("unknown source");
        }
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
            if !self.dialog_source_allowed(&call_id, &peer) {
                // Silently: an answer would tell a spoofer the dialog exists.
                return Dispatch::Drop("in-dialog request from outside the dialog");
            }
            return Dispatch::ToCall(call_id, Message::Request(req));
        }
        // From here on every answer goes where the request's Via says.
        let reply_to = super::response_dest(&req, peer);
        let in_dialog = req.to().ok().is_some_and(|t| t.tag().is_some());
        if req.method != Method::Invite && !from_proxy && !self.source_known(ip) {
            // `unknown_source = "reject"`: 403 to anything but a new call
            // (which gets its 403 and CDR in `admit`); never an answer to ACK.
            if req.method == Method::Ack {
                return Dispatch::Drop("ACK without a transaction");
            }
            let mut resp = Response::for_request(&req, 403);
            if let Ok(mut to) = req.to()
                && to.tag().is_none()
            {
                to.params
                    .set("tag", Some(&format!("{:016x}", rng.next_u64())));
                resp.headers.set("To", to.to_string());
            }
            return self.reply(reply_to, resp.encode());
        }
        match (&req.method, in_dialog) {
            (Method::Ack, _) => Dispatch::Drop("ACK without a transaction"),
            (Method::Options, _) => {
                // A load balancer's health ping: 503 while a new call would be.
                let refusing = self.refuses_new_calls();
                let status = if refusing { 503 } else { 200 };
                let mut resp = Response::for_request(&req, status);
                // RFC 3261 §8.2.6.2: a final response carries a To tag.
                if let Ok(mut to) = req.to()
                    && to.tag().is_none()
                {
                    to.params
                        .set("tag", Some(&format!("{:016x}", rng.next_u64())));
                    resp.headers.set("To", to.to_string());
                }
                resp.headers.push("Allow", ALLOW);
                resp.headers.push("Accept", "application/sdp");
                resp.headers.push("Supported", SUPPORTED);
                if refusing {
                    let retry_after = if self.draining { "30" } else { "5" };
                    resp.headers.push("Retry-After", retry_after);
                }
                self.reply(reply_to, resp.encode())
            }
            (Method::Invite, false) => self.admit(now, wall_now, req, peer, caller, rng),
            (Method::Extension(_), _) => {
                let mut resp = Response::for_request(&req, 501);
                resp.headers.push("Allow", ALLOW);
                self.reply(reply_to, resp.encode())
            }
            (Method::Cancel | Method::Bye | Method::Invite | Method::Update | Method::Info, _) => {
                self.reply(reply_to, Response::for_request(&req, 481).encode())
            }
            _ => {
                let mut resp = Response::for_request(&req, 405);
                resp.headers.push("Allow", ALLOW);
                self.reply(reply_to, resp.encode())
            }
        }
    }

    /// Whether a message for live call `call_id` may come from `peer`: its
    /// trunk allows the source, or the source is a host of the dialog. A call
    /// the switchboard did not admit (none in the daemon) needs a source some
    /// trunk allows.
    fn dialog_source_allowed(&self, call_id: &str, peer: &Peer) -> bool {
        let ip = match peer.addr.ip() {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
            v4 => v4,
        };
        match self.dialogs.get(call_id) {
            Some(d) => {
                d.hosts.contains(&ip)
                    || self
                        .config
                        .trunk(&d.trunk)
                        .is_some_and(|t| t.allow.iter().any(|n| n.contains(&ip)))
            }
            None => self.config.trunk_for_source(ip).is_some(),
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
            pipeline_format: tenant.map_or(PipelineFormat::Pcm, |t| pipeline_format(&t.pipeline)),
            echo_delay: echo.then_some(ECHO_DELAY),
            record: tenant.is_some_and(|t| t.recording),
            rtp_source: RtpSourcePolicy::Strict,
        }
    }

    /// A new INVITE from `peer`; `caller` is the address it came from
    /// ([`Switchboard::caller_source`]: the peer's, or the one a trusted
    /// proxy named).
    #[allow(clippy::too_many_arguments)]
    fn admit(
        &mut self,
        now: Instant,
        wall_now: SystemTime,
        req: Request,
        peer: Peer,
        caller: IpAddr,
        rng: &mut impl RngCore,
    ) -> Dispatch {
        let from_proxy = self.is_trusted_proxy(peer.addr.ip());
        let branch_key = format!(
            "{}|{}",
            req.call_id().unwrap_or_default(),
            req.top_via()
                .ok()
                .and_then(|v| v.branch().map(str::to_owned))
                .unwrap_or_default()
        );
        let reply_to = super::response_dest(&req, peer);
        if let Some(bytes) = self.rejected.get(&branch_key) {
            // A retransmission of an INVITE we already rejected.
            return self.reply(reply_to, bytes.clone());
        }
        let dialed = dialed_number(&req);
        let mut record = CallRecord {
            call_id: req.call_id().unwrap_or_default().to_owned(),
            direction: CallDirection::Inbound,
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
            recording_paused: Vec::new(),
            recording: RecordingStatus::Off,
            quality: None,
            transfer: None,
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
                transmit: Transmit {
                    dest: reply_to,
                    bytes,
                },
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
        if self.auth.is_banned(now, caller) {
            // Failed digest too often: ignored until the ban expires.
            return Dispatch::Drop("banned source");
        }
        if req.max_forwards().ok().flatten() == Some(0) {
            return reject(self, &mut record, 483, vec![], true);
        }
        // 1. Trunk by source address (behind a trusted proxy: the caller's).
        let Some(trunk) = self.config.trunk_for_source(caller) else {
            // A trusted proxy gets its 403: silence would only make it retry
            // the call on the next node.
            if self.settings.drop_unknown_sources && !from_proxy {
                return Dispatch::Drop("unknown source");
            }
            return reject(self, &mut record, 403, vec![], true);
        };
        let trunk_name = trunk.name.clone();
        record.trunk = Some(trunk_name.clone());
        // 2. Digest, where the trunk has credentials. A retransmitted INVITE
        // gets the same challenge (same nonce) from the cache, so each attempt
        // is challenged — and recorded — once.
        if let (Some(creds), true) = (&trunk.digest, self.digest.contains_key(&trunk_name)) {
            let unix = wall_now
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0);
            let uri = req.uri.to_string();
            let ip = caller;
            let authorization = req.headers.get("Authorization");
            let user = authorization
                .and_then(|a| crate::sip::digest::DigestCredentials::parse(a).ok())
                .map(|c| c.username);
            if authorization.is_some() {
                match self.auth.before_check(now, ip, user.as_deref()) {
                    Ok(()) => {}
                    Err(AuthRefusal::Banned) => return Dispatch::Drop("banned source"),
                    Err(AuthRefusal::Throttled) => {
                        record.cause = "auth: throttled".to_owned();
                        return reject(self, &mut record, 403, vec![], false);
                    }
                }
            }
            let Some(server) = self.digest.get_mut(&trunk_name) else {
                return Dispatch::Drop("no digest server");
            };
            let verdict = match authorization {
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
            if let Err(e) = &verdict
                && e.is_guess()
            {
                self.digest_failures += 1;
                if self.auth.failed(now, ip, user.as_deref()) {
                    let ban = self.settings.auth_limits.ban;
                    self.gate.ban(now, ip, BanReason::Digest, ban);
                    record.cause = format!("auth: {e}; source banned");
                    return reject(self, &mut record, 403, vec![], false);
                }
            }
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
        // 3b. A recording tenant while the store cannot write (issue 19):
        // answered unrecorded, or refused, as the tenant chose.
        let (records, on_store_failure) = self
            .config
            .tenant(&tenant_id)
            .map_or((false, OnStoreFailure::default()), |t| {
                (t.recording, t.on_store_failure)
            });
        if records {
            record.recording = RecordingStatus::NotStarted;
        }
        let store_unavailable = records && !self.store_writable;
        if store_unavailable && on_store_failure == OnStoreFailure::Reject {
            record.cause = "store-unavailable".to_owned();
            record.recording = RecordingStatus::NotRecorded;
            return reject(
                self,
                &mut record,
                503,
                vec![("Retry-After", "30".to_owned())],
                true,
            );
        }
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
        // 6. Calls from this source the caller never confirmed (no ACK): a
        // source that ignores our answers cannot hold every slot until Timer H.
        if self.unconfirmed_from(caller) >= self.settings.max_unconfirmed_per_source {
            record.cause = "unconfirmed-limit".to_owned();
            return reject(
                self,
                &mut record,
                503,
                vec![("Retry-After", "5".to_owned())],
                true,
            );
        }
        // 7. An RTP port pair.
        let Some(rtp_port) = self.ports.allocate(rng) else {
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
        let mut plan = self.media_plan(&tenant_id);
        if store_unavailable {
            plan.record = false;
        }
        if trunk.behind_nat {
            plan.rtp_source = RtpSourcePolicy::Latch {
                window: self.settings.rtp_latch_window,
                signalling_ip: Some(caller),
            };
        }
        let early_media = plan.prompt.is_some()
            && self
                .config
                .tenant(&tenant_id)
                .is_some_and(|t| t.early_media);
        self.dialogs.insert(
            record.call_id.clone(),
            DialogSources::of(&req, &peer, caller, &trunk_name),
        );
        *self.unconfirmed.entry(caller).or_default() += 1;
        let settings = CallSettings {
            call_id: record.call_id.clone(),
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
            store_unavailable,
        };
        Dispatch::NewCall(Box::new(Admitted {
            invite: req,
            peer,
            settings,
            config: Arc::clone(&self.config),
        }))
    }
}

/// An outbound call the admin API asked for (`POST /v1/calls`).
#[derive(Debug, Clone)]
pub struct OutboundRequest {
    /// The tenant whose token asked.
    pub tenant: String,
    /// The trunk to dial through.
    pub trunk: String,
    /// Whom to call: `+15551234567`, `tel:+1…` or a `sip:` URI.
    pub to: String,
    /// Our number (From user part).
    pub from: String,
    /// Ringing time before CANCEL; `None`: the trunk's default.
    pub answer_timeout: Option<Duration>,
}

/// Why an outbound call was not started.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum OutboundRefusal {
    /// The daemon is draining.
    #[error("the daemon is shutting down")]
    Draining,
    /// No such trunk, no `[trunk.outbound]`, or not one this tenant may use.
    #[error("trunk not available to this tenant")]
    TrunkNotAllowed,
    /// `to` or `from` is unusable.
    #[error("{0}")]
    BadRequest(String),
    /// The tenant's `max_outbound_cps` is used up: try again after the delay.
    #[error("outbound call rate limit reached (max_outbound_cps)")]
    RateLimited,
    /// The tenant's or the trunk's `max_calls` are all in use.
    #[error("call limit reached (max_calls)")]
    CallLimit,
    /// The daemon's `max_calls`, or no RTP port free.
    #[error("no capacity for another call")]
    NoCapacity,
}

/// An outbound call the switchboard admitted: dial it with `dial` (the RTP
/// port is allocated; give it back with [`Switchboard::call_ended`] on
/// `settings`, whatever happens).
#[derive(Debug)]
pub struct OutboundAdmitted {
    /// The leg's settings (no credentials: the shell adds the secret).
    pub dial: super::outbound::DialSettings,
    /// The call's settings once answered.
    pub settings: CallSettings,
    /// The configuration it was admitted under.
    pub config: Arc<Config>,
}

/// The phone number in `to` (`+1555…`, `tel:+1555…`), for a Request-URI at
/// the trunk's proxy; or a `sip:` URI as given.
fn outbound_target(to: &str, proxy_host: &str) -> Result<crate::sip::message::Uri, String> {
    use crate::sip::message::Uri;
    let to = to.trim();
    if to.len() > 256 {
        return Err("`to` is too long".into());
    }
    if to.starts_with("sip:") || to.starts_with("sips:") {
        let uri = Uri::parse(to).map_err(|_| "`to` is not a valid SIP URI".to_owned())?;
        if uri.host.is_none() {
            return Err("`to` has no host".into());
        }
        return Ok(uri);
    }
    let number = to.strip_prefix("tel:").unwrap_or(to);
    let number = number.split(';').next().unwrap_or_default();
    let digits = number.strip_prefix('+').unwrap_or(number);
    if digits.is_empty()
        || digits.len() > 32
        || !digits
            .chars()
            .all(|c| c.is_ascii_digit() || matches!(c, '*' | '#'))
    {
        return Err("`to` must be a phone number (+15551234567), a tel: or a sip: URI".into());
    }
    Uri::parse(&format!("sip:{number}@{proxy_host}"))
        .map_err(|_| "`to` is not usable with this trunk".to_owned())
}

impl Switchboard {
    /// Admits an outbound call (admin API): checks the tenant may use the
    /// trunk, its call rate (`max_outbound_cps`) and the call limits
    /// (tenant, trunk, daemon), allocates the RTP port, and returns the
    /// leg's and the call's settings. `proxy` is the trunk's proxy, resolved
    /// by the shell; `call_id` and the SDP's RNG draws are the caller's.
    pub fn admit_outbound(
        &mut self,
        now: Instant,
        req: &OutboundRequest,
        proxy: std::net::SocketAddr,
        call_id: String,
        rng: &mut impl RngCore,
    ) -> Result<OutboundAdmitted, OutboundRefusal> {
        use crate::sip::message::{Host, NameAddr, Uri};
        if self.draining {
            return Err(OutboundRefusal::Draining);
        }
        let trunk = self
            .config
            .trunk(&req.trunk)
            .filter(|t| {
                t.outbound
                    .as_ref()
                    .is_some_and(|o| o.tenants.contains(&req.tenant))
            })
            .ok_or(OutboundRefusal::TrunkNotAllowed)?;
        let Some(out) = &trunk.outbound else {
            return Err(OutboundRefusal::TrunkNotAllowed);
        };
        let tenant = self
            .config
            .tenant(&req.tenant)
            .ok_or(OutboundRefusal::TrunkNotAllowed)?;
        let proxy_host = match proxy.ip() {
            IpAddr::V4(v4) => format!("{v4}:{}", proxy.port()),
            IpAddr::V6(v6) => format!("[{v6}]:{}", proxy.port()),
        };
        let request_uri =
            outbound_target(&req.to, &proxy_host).map_err(OutboundRefusal::BadRequest)?;
        let from_user = req.from.trim();
        let from_digits = from_user.strip_prefix('+').unwrap_or(from_user);
        if from_digits.is_empty()
            || from_user.len() > 32
            || !from_digits.chars().all(|c| c.is_ascii_digit())
        {
            return Err(OutboundRefusal::BadRequest(
                "`from` must be a phone number (+15551234567)".into(),
            ));
        }
        // Limits: the daemon's first, then the tenant's and trunk's.
        if self.counts.total >= self.settings.max_calls {
            return Err(OutboundRefusal::NoCapacity);
        }
        let tenant_now = self
            .counts
            .per_tenant
            .get(&req.tenant)
            .copied()
            .unwrap_or(0);
        let trunk_now = self.counts.per_trunk.get(&req.trunk).copied().unwrap_or(0);
        if tenant.max_calls.is_some_and(|m| tenant_now >= m as usize)
            || trunk.max_calls.is_some_and(|m| trunk_now >= m as usize)
        {
            return Err(OutboundRefusal::CallLimit);
        }
        // The tenant's call rate: a bucket of `max_outbound_cps` tokens,
        // refilled at that many per second.
        let cps = f64::from(tenant.max_outbound_cps.max(1));
        let bucket = self
            .outbound_buckets
            .entry(req.tenant.clone())
            .or_insert((cps, now));
        let elapsed = now.saturating_duration_since(bucket.1).as_secs_f64();
        bucket.0 = (bucket.0 + elapsed * cps).min(cps);
        bucket.1 = now;
        if bucket.0 < 1.0 {
            return Err(OutboundRefusal::RateLimited);
        }
        let Some(rtp_port) = self.ports.allocate(rng) else {
            return Err(OutboundRefusal::NoCapacity);
        };
        if let Some(b) = self.outbound_buckets.get_mut(&req.tenant) {
            b.0 -= 1.0;
        }
        self.counts.total += 1;
        *self
            .counts
            .per_tenant
            .entry(req.tenant.clone())
            .or_default() += 1;
        *self.counts.per_trunk.entry(req.trunk.clone()).or_default() += 1;
        self.dialogs.insert(
            call_id.clone(),
            DialogSources {
                trunk: req.trunk.clone(),
                hosts: vec![proxy.ip()],
                unconfirmed_from: None,
            },
        );
        let local = self.settings.local_udp.clone();
        let from_host = out
            .from_domain
            .clone()
            .unwrap_or_else(|| local.host.clone());
        let from_uri = Uri::parse(&format!("sip:{from_user}@{from_host}"))
            .unwrap_or_else(|_| Uri::sip(Some(from_user), Host::Domain(from_host), None));
        let mut to_uri = request_uri.clone();
        to_uri.params = crate::sip::message::Params::new();
        let media = LocalMedia {
            addr: self.settings.media_addr,
            rtp_port,
            codecs: self.settings.codecs.clone(),
            telephone_event_pt: 101,
            ptime_ms: 20,
            encryption: crate::sip::sdp::Encryption::Off,
            secure_signalling: false,
            srtp_key: None,
        };
        let dest = Peer {
            transport: TransportKind::Udp,
            addr: proxy,
            flow: 0,
        };
        let dial = super::outbound::DialSettings {
            call_id: call_id.clone(),
            tenant: req.tenant.clone(),
            trunk: req.trunk.clone(),
            request_uri,
            from: NameAddr::new(from_uri),
            to: NameAddr::new(to_uri),
            dest,
            local: local.clone(),
            media: media.clone(),
            timers: self.settings.timers,
            credentials: None,
            answer_timeout: req.answer_timeout.unwrap_or(out.answer_timeout),
            extra_headers: Vec::new(),
        };
        let plan = self.media_plan(&req.tenant);
        let store_unavailable = plan.record && !self.store_writable;
        let mut plan = plan;
        if store_unavailable {
            plan.record = false;
        }
        let settings = CallSettings {
            call_id,
            tenant: req.tenant.clone(),
            trunk: req.trunk.clone(),
            timers: self.settings.timers,
            local,
            media,
            answer_delay: Duration::ZERO,
            session_expires: self.settings.session_expires,
            min_se: self.settings.min_se,
            rtp_timeout: self.settings.rtp_timeout,
            max_duration: self.settings.max_duration,
            plan,
            early_media: false,
            store_unavailable,
        };
        Ok(OutboundAdmitted {
            dial,
            settings,
            config: Arc::clone(&self.config),
        })
    }
}

/// What caller audio a tenant's pipeline takes: 8 kHz G.711 for an agent
/// that speaks it (Twilio mode: µ-law; Telnyx PCMU/PCMA), passed through with
/// no resampling round trip (and PCM beside it for a Deepgram stream); PCM at
/// the pipeline rate for everything else.
fn pipeline_format(pipeline: &crate::config::Pipeline) -> PipelineFormat {
    use crate::config::{AgentMode, Pipeline, TelnyxEncoding};
    use crate::media::g711::Law;
    let (agent, with_pcm) = match pipeline {
        Pipeline::Agent(a) => (a, false),
        Pipeline::DeepgramAgent(_, a) => (a, true),
        Pipeline::Echo | Pipeline::Deepgram(_) => return PipelineFormat::Pcm,
    };
    let law = match agent.mode {
        AgentMode::Twilio | AgentMode::Telnyx(TelnyxEncoding::Pcmu) => Law::Mu,
        AgentMode::Telnyx(TelnyxEncoding::Pcma) => Law::A,
        AgentMode::Native | AgentMode::Telnyx(TelnyxEncoding::L16) => return PipelineFormat::Pcm,
    };
    PipelineFormat::G711 { law, with_pcm }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_proxys_source_header_holds_an_address_and_nothing_else() {
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        for (value, want) in [
            ("198.51.100.7", Some(ip("198.51.100.7"))),
            (" 198.51.100.7 ", Some(ip("198.51.100.7"))),
            ("198.51.100.7:5060", Some(ip("198.51.100.7"))),
            ("2001:db8::5", Some(ip("2001:db8::5"))),
            ("[2001:db8::5]", Some(ip("2001:db8::5"))),
            ("[2001:db8::5]:5060", Some(ip("2001:db8::5"))),
            ("", None),
            ("carrier.example.com", None),
            ("198.51.100.7, 203.0.113.9", None),
            ("198.51.100.7.evil", None),
            ("[198.51.100.7]", None),
        ] {
            assert_eq!(parse_source_address(value), want, "{value:?}");
        }
        let long = format!("1.2.3.4{}", "0".repeat(100));
        assert_eq!(parse_source_address(&long), None);
    }

    #[test]
    fn ports_are_random_distinct_and_released() {
        use rand::SeedableRng;
        let mut rng = rand::rngs::StdRng::seed_from_u64(19);
        let mut p = PortAllocator::new(20000, 20005);
        let mut got: Vec<u16> = (0..3).filter_map(|_| p.allocate(&mut rng)).collect();
        assert_eq!(p.allocate(&mut rng), None);
        assert_eq!(p.in_use(), 3);
        got.sort_unstable();
        assert_eq!(got, vec![20000, 20002, 20004]);
        p.release(20002);
        p.release(20002);
        assert_eq!(p.in_use(), 2);
        assert_eq!(p.allocate(&mut rng), Some(20002), "the only free pair");
        p.release(19000);
        assert_eq!(p.in_use(), 3);

        // Not in order: 20 allocations from a 1000-pair range are not the
        // sequence a round-robin allocator hands out, and all are even.
        let mut big = PortAllocator::new(20000, 21999);
        let seq: Vec<u16> = (0..20).filter_map(|_| big.allocate(&mut rng)).collect();
        assert_eq!(seq.len(), 20);
        assert!(seq.iter().all(|p| p % 2 == 0 && (20000..22000).contains(p)));
        let ascending = seq.windows(2).filter(|w| w[1] == w[0] + 2).count();
        assert!(ascending < 3, "consecutive pairs: {seq:?}");
        let mut uniq = seq.clone();
        uniq.sort_unstable();
        uniq.dedup();
        assert_eq!(uniq.len(), 20);
    }
}
