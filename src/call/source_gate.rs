//! The source gate: per-source rate limits and the ban list, applied to
//! every SIP message before it is parsed beyond its first line (issue 18).
//!
//! A message from a source that is *trusted* (a `never_ban` address, or an
//! address a trunk without digest credentials allows: the carrier's own
//! hosts) always passes. Any other source
//! - is dropped while it is banned (bans expire);
//! - draws one token per message from a per-source bucket (`requests`), and
//!   one more per `INVITE` from a second bucket (`calls`): an empty bucket
//!   drops the message;
//! - is banned for [`GateLimits::ban`] when it sends [`GateLimits::malformed`]
//!   unparseable messages within [`GateLimits::malformed_window`], or
//!   identifies as a known scanner by its `User-Agent`; and for the digest
//!   ban period when the switchboard's [`super::auth_guard::AuthGuard`]
//!   bans it for failing digest.
//!
//! Owns: the buckets, counters and bans. Must not touch: clocks (`now` is
//! passed in), sockets, message parsing beyond the first line. Memory is
//! bounded: at most [`MAX_TRACKED`] sources; when full, idle entries go
//! first, and while none is idle, messages from further untracked sources
//! are dropped (counted as rate-limited) rather than tracked.

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::{Duration, Instant};

use ipnet::IpNet;

/// Most sources tracked at once.
pub const MAX_TRACKED: usize = 16_384;
/// Longest `User-Agent` prefix compared with the scanner list.
const MAX_UA_SCAN: usize = 256;

/// The gate's limits (from `[profile.security]` and the trunks).
#[derive(Debug, Clone, PartialEq)]
pub struct GateLimits {
    /// Messages per second per source (bucket refill rate); 0: no limit.
    pub requests_per_second: f64,
    /// Messages a source may send at once (bucket size).
    pub requests_burst: f64,
    /// New `INVITE`s per second per source; 0: no limit.
    pub calls_per_second: f64,
    /// `INVITE`s a source may send at once.
    pub calls_burst: f64,
    /// Unparseable messages within `malformed_window` that ban a source
    /// (0: never).
    pub malformed: u32,
    /// The window of `malformed`.
    pub malformed_window: Duration,
    /// How long a malformed-message or scanner ban lasts.
    pub ban: Duration,
    /// Lower-case substrings of `User-Agent` values that ban a source.
    pub scanner_user_agents: Vec<String>,
    /// Sources never limited or banned.
    pub trusted: Vec<IpNet>,
}

impl Default for GateLimits {
    fn default() -> GateLimits {
        GateLimits {
            requests_per_second: 50.0,
            requests_burst: 100.0,
            calls_per_second: 5.0,
            calls_burst: 20.0,
            malformed: 20,
            malformed_window: Duration::from_secs(60),
            ban: Duration::from_secs(600),
            scanner_user_agents: Vec::new(),
            trusted: Vec::new(),
        }
    }
}

/// Why a source was banned.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum BanReason {
    /// Failed digest too often (the switchboard's auth guard).
    Digest,
    /// Too many unparseable messages.
    Malformed,
    /// Its `User-Agent` is a known scanner's.
    Scanner,
}

impl BanReason {
    /// The label used in metrics and the admin API.
    pub fn as_str(self) -> &'static str {
        match self {
            BanReason::Digest => "digest",
            BanReason::Malformed => "malformed",
            BanReason::Scanner => "scanner",
        }
    }
}

/// Why a message was dropped at the gate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum GateDrop {
    /// The source is banned.
    Banned,
    /// The source's message bucket is empty (or too many sources are tracked).
    RateLimited,
    /// The source's INVITE bucket is empty.
    CallRateLimited,
}

impl GateDrop {
    /// The label used in metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            GateDrop::Banned => "banned",
            GateDrop::RateLimited => "rate_limited",
            GateDrop::CallRateLimited => "call_rate_limited",
        }
    }
}

/// A ban in force, as the admin API lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ban {
    /// The banned source address.
    pub source: IpAddr,
    /// Why.
    pub reason: BanReason,
    /// Time left.
    pub remaining: Duration,
}

#[derive(Debug, Clone)]
struct Entry {
    requests: f64,
    calls: f64,
    refilled: Instant,
    malformed: u32,
    malformed_since: Instant,
    ban: Option<(Instant, BanReason)>,
}

/// Rate limits and bans of one daemon.
#[derive(Debug)]
pub struct SourceGate {
    limits: GateLimits,
    sources: HashMap<IpAddr, Entry>,
    bans: u64,
    /// Bans made, by reason (digest, malformed, scanner).
    bans_by: [u64; 3],
    /// When the table was last swept for idle entries while full (at most
    /// once a second: a sweep reads every entry).
    swept: Option<Instant>,
}

/// Whether the message is an `INVITE` (its first line's method).
fn is_invite(first: &[u8]) -> bool {
    first.len() > 7 && first[..7].eq_ignore_ascii_case(b"INVITE ")
}

fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
        v4 => v4,
    }
}

impl SourceGate {
    /// A gate with `limits`, nothing counted.
    pub fn new(limits: GateLimits) -> SourceGate {
        SourceGate {
            limits,
            sources: HashMap::new(),
            bans: 0,
            bans_by: [0; 3],
            swept: None,
        }
    }

    /// New limits (a reload); buckets and bans stay, except that a source
    /// now trusted is unbanned.
    pub fn set_limits(&mut self, limits: GateLimits) {
        self.limits = limits;
        let trusted = self.limits.trusted.clone();
        self.sources
            .retain(|ip, _| !trusted.iter().any(|n| n.contains(ip)));
    }

    /// The limits in force.
    pub fn limits(&self) -> &GateLimits {
        &self.limits
    }

    /// Whether `ip` is never limited or banned.
    pub fn is_trusted(&self, ip: IpAddr) -> bool {
        let ip = canonical(ip);
        self.limits.trusted.iter().any(|n| n.contains(&ip))
    }

    /// Whether `ip` is banned at `now`.
    pub fn is_banned(&self, now: Instant, ip: IpAddr) -> bool {
        self.sources
            .get(&canonical(ip))
            .and_then(|e| e.ban)
            .is_some_and(|(until, _)| now < until)
    }

    fn idle(&self, e: &Entry, now: Instant) -> bool {
        let l = &self.limits;
        let since = now.saturating_duration_since(e.refilled).as_secs_f64();
        let requests_full = l.requests_per_second <= 0.0
            || e.requests + since * l.requests_per_second >= l.requests_burst;
        let calls_full =
            l.calls_per_second <= 0.0 || e.calls + since * l.calls_per_second >= l.calls_burst;
        requests_full
            && calls_full
            && (e.malformed == 0
                || now.saturating_duration_since(e.malformed_since) >= l.malformed_window)
            && e.ban.is_none_or(|(until, _)| now >= until)
    }

    /// The entry of `ip`, made if there is room.
    fn entry(&mut self, now: Instant, ip: IpAddr) -> Option<&mut Entry> {
        if !self.sources.contains_key(&ip) {
            let sweep_due = self
                .swept
                .is_none_or(|t| now.saturating_duration_since(t) >= Duration::from_secs(1));
            if self.sources.len() >= MAX_TRACKED && sweep_due {
                self.swept = Some(now);
                let idle: Vec<IpAddr> = self
                    .sources
                    .iter()
                    .filter(|(_, e)| self.idle(e, now))
                    .map(|(ip, _)| *ip)
                    .collect();
                for ip in idle {
                    self.sources.remove(&ip);
                }
            }
            if self.sources.len() >= MAX_TRACKED {
                return None;
            }
            let l = &self.limits;
            self.sources.insert(
                ip,
                Entry {
                    requests: l.requests_burst,
                    calls: l.calls_burst,
                    refilled: now,
                    malformed: 0,
                    malformed_since: now,
                    ban: None,
                },
            );
        }
        self.sources.get_mut(&ip)
    }

    /// Screens one message by its source and first line (nothing else of it
    /// is read): `Err` drops it.
    pub fn screen(&mut self, now: Instant, ip: IpAddr, first_line: &[u8]) -> Result<(), GateDrop> {
        let ip = canonical(ip);
        if self.is_trusted(ip) {
            return Ok(());
        }
        let (rps, burst) = (self.limits.requests_per_second, self.limits.requests_burst);
        let (cps, cburst) = (self.limits.calls_per_second, self.limits.calls_burst);
        let Some(e) = self.entry(now, ip) else {
            return Err(GateDrop::RateLimited);
        };
        if let Some((until, _)) = e.ban {
            if now < until {
                return Err(GateDrop::Banned);
            }
            e.ban = None;
        }
        let dt = now.saturating_duration_since(e.refilled).as_secs_f64();
        e.refilled = now;
        e.requests = (e.requests + dt * rps).min(burst);
        e.calls = (e.calls + dt * cps).min(cburst);
        // A dropped message takes no token from either bucket.
        if rps > 0.0 && e.requests < 1.0 {
            return Err(GateDrop::RateLimited);
        }
        let invite = cps > 0.0 && is_invite(first_line);
        if invite && e.calls < 1.0 {
            return Err(GateDrop::CallRateLimited);
        }
        if rps > 0.0 {
            e.requests -= 1.0;
        }
        if invite {
            e.calls -= 1.0;
        }
        Ok(())
    }

    /// Bans `ip` for `period` (unless trusted). True when it was not banned.
    pub fn ban(&mut self, now: Instant, ip: IpAddr, reason: BanReason, period: Duration) -> bool {
        let ip = canonical(ip);
        if self.is_trusted(ip) {
            return false;
        }
        let Some(e) = self.entry(now, ip) else {
            return false;
        };
        if e.ban.is_some_and(|(until, _)| now < until) {
            return false;
        }
        e.ban = Some((now + period, reason));
        self.bans += 1;
        self.bans_by[match reason {
            BanReason::Digest => 0,
            BanReason::Malformed => 1,
            BanReason::Scanner => 2,
        }] += 1;
        true
    }

    /// A message from `ip` did not parse. Returns true when this banned it.
    pub fn malformed(&mut self, now: Instant, ip: IpAddr) -> bool {
        let ip = canonical(ip);
        let (limit, window, ban) = (
            self.limits.malformed,
            self.limits.malformed_window,
            self.limits.ban,
        );
        if limit == 0 || self.is_trusted(ip) {
            return false;
        }
        let Some(e) = self.entry(now, ip) else {
            return false;
        };
        if now.saturating_duration_since(e.malformed_since) >= window {
            e.malformed = 0;
            e.malformed_since = now;
        }
        e.malformed = e.malformed.saturating_add(1);
        if e.malformed >= limit {
            e.malformed = 0;
            return self.ban(now, ip, BanReason::Malformed, ban);
        }
        false
    }

    /// Whether `user_agent` names a known scanner.
    pub fn is_scanner(&self, user_agent: &str) -> bool {
        let mut end = user_agent.len().min(MAX_UA_SCAN);
        while !user_agent.is_char_boundary(end) {
            end -= 1;
        }
        let ua = user_agent[..end].to_ascii_lowercase();
        self.limits
            .scanner_user_agents
            .iter()
            .any(|s| !s.is_empty() && ua.contains(s.as_str()))
    }

    /// A parsed request from `ip` said `user_agent`: a scanner's bans the
    /// source. Returns true when the message is to be dropped.
    pub fn user_agent(&mut self, now: Instant, ip: IpAddr, user_agent: &str) -> bool {
        if !self.is_scanner(user_agent) || self.is_trusted(ip) {
            return false;
        }
        let ban = self.limits.ban;
        self.ban(now, ip, BanReason::Scanner, ban);
        true
    }

    /// Bans in force at `now`, soonest to expire last (at most `max`).
    pub fn bans_in_force(&self, now: Instant, max: usize) -> Vec<Ban> {
        let mut out: Vec<Ban> = self
            .sources
            .iter()
            .filter_map(|(ip, e)| {
                let (until, reason) = e.ban?;
                (now < until).then(|| Ban {
                    source: *ip,
                    reason,
                    remaining: until - now,
                })
            })
            .collect();
        out.sort_by(|a, b| b.remaining.cmp(&a.remaining).then(a.source.cmp(&b.source)));
        out.truncate(max);
        out
    }

    /// Bans made so far.
    pub fn bans(&self) -> u64 {
        self.bans
    }

    /// Bans made so far, by reason.
    pub fn bans_by_reason(&self) -> [(BanReason, u64); 3] {
        [
            (BanReason::Digest, self.bans_by[0]),
            (BanReason::Malformed, self.bans_by[1]),
            (BanReason::Scanner, self.bans_by[2]),
        ]
    }

    /// Sources tracked now.
    pub fn tracked(&self) -> usize {
        self.sources.len()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn gate() -> SourceGate {
        SourceGate::new(GateLimits {
            requests_per_second: 10.0,
            requests_burst: 20.0,
            calls_per_second: 2.0,
            calls_burst: 4.0,
            malformed: 5,
            malformed_window: Duration::from_secs(60),
            ban: Duration::from_secs(600),
            scanner_user_agents: vec!["friendly-scanner".into(), "sipvicious".into()],
            trusted: vec!["203.0.113.0/24".parse().unwrap()],
        })
    }

    #[test]
    fn a_burst_then_the_refill_rate() {
        let t0 = Instant::now();
        let mut g = gate();
        let src = ip("198.51.100.1");
        let passed = (0..100)
            .filter(|_| g.screen(t0, src, b"OPTIONS sip:x SIP/2.0").is_ok())
            .count();
        assert_eq!(passed, 20);
        // One second later: 10 more.
        let t1 = t0 + Duration::from_secs(1);
        let passed = (0..100)
            .filter(|_| g.screen(t1, src, b"OPTIONS sip:x SIP/2.0").is_ok())
            .count();
        assert_eq!(passed, 10);
        // Another source has its own bucket.
        assert!(
            g.screen(t1, ip("198.51.100.2"), b"BYE sip:x SIP/2.0")
                .is_ok()
        );
    }

    #[test]
    fn invites_have_their_own_bucket() {
        let t0 = Instant::now();
        let mut g = gate();
        let src = ip("198.51.100.1");
        let got: Vec<_> = (0..6)
            .map(|_| g.screen(t0, src, b"INVITE sip:x SIP/2.0"))
            .collect();
        assert_eq!(got.iter().filter(|r| r.is_ok()).count(), 4);
        assert_eq!(got[5], Err(GateDrop::CallRateLimited));
        assert!(g.screen(t0, src, b"ACK sip:x SIP/2.0").is_ok());
    }

    #[test]
    fn trusted_sources_are_never_limited_or_banned() {
        let t0 = Instant::now();
        let mut g = gate();
        let carrier = ip("203.0.113.9");
        for _ in 0..1000 {
            assert!(g.screen(t0, carrier, b"INVITE sip:x SIP/2.0").is_ok());
        }
        assert!(!g.ban(t0, carrier, BanReason::Digest, Duration::from_secs(60)));
        assert!(!g.user_agent(t0, carrier, "friendly-scanner"));
        for _ in 0..100 {
            assert!(!g.malformed(t0, carrier));
        }
        assert!(!g.is_banned(t0, carrier));
        assert_eq!(g.tracked(), 0);
    }

    #[test]
    fn malformed_messages_ban_and_the_ban_expires() {
        let t0 = Instant::now();
        let mut g = gate();
        let src = ip("198.51.100.7");
        for i in 0..4 {
            assert!(!g.malformed(t0 + Duration::from_secs(i), src));
        }
        assert!(g.malformed(t0 + Duration::from_secs(4), src));
        let t = t0 + Duration::from_secs(5);
        assert_eq!(
            g.screen(t, src, b"OPTIONS x SIP/2.0"),
            Err(GateDrop::Banned)
        );
        let bans = g.bans_in_force(t, 10);
        assert_eq!(bans.len(), 1);
        assert_eq!(bans[0].reason, BanReason::Malformed);
        let after = t0 + Duration::from_secs(605);
        assert!(g.screen(after, src, b"OPTIONS x SIP/2.0").is_ok());
        assert!(g.bans_in_force(after, 10).is_empty());
        // Spread out beyond the window: never banned.
        let mut g = gate();
        for i in 0..20 {
            assert!(!g.malformed(t0 + Duration::from_secs(i * 30), src));
        }
    }

    #[test]
    fn scanner_user_agents_ban_case_insensitively() {
        let t0 = Instant::now();
        let mut g = gate();
        let src = ip("198.51.100.8");
        assert!(!g.user_agent(t0, src, "Linphone/5.2"));
        assert!(g.user_agent(t0, src, "Friendly-Scanner"));
        assert!(g.is_banned(t0, src));
        assert!(g.user_agent(t0, ip("198.51.100.9"), "x sipvicious 0.3.8"));
        assert_eq!(g.bans(), 2);
    }

    #[test]
    fn v4_mapped_v6_is_the_same_source() {
        let t0 = Instant::now();
        let mut g = gate();
        g.ban(
            t0,
            ip("198.51.100.1"),
            BanReason::Digest,
            Duration::from_secs(9),
        );
        assert!(g.is_banned(t0, ip("::ffff:198.51.100.1")));
        assert!(g.is_trusted(ip("::ffff:203.0.113.1")));
    }

    #[test]
    fn memory_is_bounded() {
        let t0 = Instant::now();
        let mut g = gate();
        for i in 0..(MAX_TRACKED as u32 + 500) {
            let src = IpAddr::from((0x0a00_0000 + i).to_be_bytes());
            let _ = g.screen(t0, src, b"INVITE x SIP/2.0");
        }
        assert!(g.tracked() <= MAX_TRACKED);
        // Once the entries are idle they make room again.
        let later = t0 + Duration::from_secs(60);
        assert!(
            g.screen(later, ip("192.0.2.77"), b"INVITE x SIP/2.0")
                .is_ok()
        );
        assert!(g.tracked() <= MAX_TRACKED);
    }
}
