//! Digest guessing throttle and ban, sans-IO (issue 19).
//!
//! Without it a source could try thousands of passwords a second against a
//! digest trunk. [`AuthGuard`] counts failed digest checks per source address
//! and per username in fixed windows: once a source reaches the limit within
//! a window it is banned for the ban period (its requests are ignored; the
//! ban expires), unless it is in the never-ban list, in which case further
//! checks in that window are refused without being made (throttled). A
//! username that reaches the limit (from any sources) has its checks refused
//! for the rest of the window, so a guessing run spread over many addresses
//! is still held to the limit per minute; it is never banned, which would let
//! an attacker lock the real trunk out for longer, and never-ban sources are
//! exempt from it (held to their own per-source limit only).
//!
//! Owns: the counters and bans. Must not touch: clocks (`now` is passed in),
//! SIP messages, sockets. Memory is bounded: at most [`MAX_TRACKED`] entries
//! per table; when full, entries whose window and ban have passed go first,
//! then the oldest unbanned ones.

use std::collections::HashMap;
use std::hash::Hash;
use std::net::IpAddr;
use std::time::{Duration, Instant};

use ipnet::IpNet;

/// Most sources (and usernames) tracked at once.
pub const MAX_TRACKED: usize = 16_384;
/// Longest username tracked as is (longer ones are cut: they are guesses).
const MAX_USER_LEN: usize = 128;

/// The limits (from `[profile.security]`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuthLimits {
    /// Failed checks allowed per source and per username in one window.
    pub failures: u32,
    /// The window (one minute by default).
    pub window: Duration,
    /// How long a source that reached the limit is ignored.
    pub ban: Duration,
    /// Sources never banned (only throttled): a trunk's own carrier hosts.
    pub never_ban: Vec<IpNet>,
}

/// Why a digest check is not made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthRefusal {
    /// The source is banned until the given time: ignore the request.
    Banned,
    /// Over the limit in this window (a never-ban source, or the username):
    /// refuse without checking.
    Throttled,
}

#[derive(Debug, Clone, Copy)]
struct Entry {
    window_start: Instant,
    failures: u32,
    banned_until: Option<Instant>,
}

impl Entry {
    fn fresh(now: Instant) -> Entry {
        Entry {
            window_start: now,
            failures: 0,
            banned_until: None,
        }
    }

    fn roll(&mut self, now: Instant, window: Duration) {
        if now.saturating_duration_since(self.window_start) >= window {
            self.window_start = now;
            self.failures = 0;
        }
    }

    fn idle(&self, now: Instant, window: Duration) -> bool {
        now.saturating_duration_since(self.window_start) >= window
            && self.banned_until.is_none_or(|t| now >= t)
    }
}

/// Failure counters and bans of one switchboard.
#[derive(Debug)]
pub struct AuthGuard {
    limits: AuthLimits,
    sources: HashMap<IpAddr, Entry>,
    users: HashMap<String, Entry>,
    bans: u64,
}

fn make_room<K: Eq + Hash + Clone>(map: &mut HashMap<K, Entry>, now: Instant, window: Duration) {
    if map.len() < MAX_TRACKED {
        return;
    }
    map.retain(|_, e| !e.idle(now, window));
    while map.len() >= MAX_TRACKED {
        let oldest = map
            .iter()
            .filter(|(_, e)| e.banned_until.is_none())
            .min_by_key(|(_, e)| e.window_start)
            .or_else(|| map.iter().min_by_key(|(_, e)| e.banned_until))
            .map(|(k, _)| k.clone());
        match oldest {
            Some(k) => {
                map.remove(&k);
            }
            None => break,
        }
    }
}

fn user_key(user: &str) -> String {
    let mut end = user.len().min(MAX_USER_LEN);
    while !user.is_char_boundary(end) {
        end -= 1;
    }
    user[..end].to_owned()
}

impl AuthGuard {
    /// A guard with `limits` and nothing counted.
    pub fn new(limits: AuthLimits) -> AuthGuard {
        AuthGuard {
            limits,
            sources: HashMap::new(),
            users: HashMap::new(),
            bans: 0,
        }
    }

    /// New limits (a reload); counters and bans stay.
    pub fn set_limits(&mut self, limits: AuthLimits) {
        self.limits = limits;
    }

    fn exempt(&self, ip: IpAddr) -> bool {
        self.limits.never_ban.iter().any(|n| n.contains(&ip))
    }

    /// Whether `ip` is banned at `now` (its requests are to be ignored).
    pub fn is_banned(&self, now: Instant, ip: IpAddr) -> bool {
        self.sources
            .get(&ip)
            .and_then(|e| e.banned_until)
            .is_some_and(|t| now < t)
    }

    /// Before checking credentials for `user` from `ip`: `Err` says why not.
    pub fn before_check(
        &mut self,
        now: Instant,
        ip: IpAddr,
        user: Option<&str>,
    ) -> Result<(), AuthRefusal> {
        let window = self.limits.window;
        if let Some(e) = self.sources.get_mut(&ip) {
            if let Some(until) = e.banned_until {
                if now < until {
                    return Err(AuthRefusal::Banned);
                }
                e.banned_until = None;
                e.failures = 0;
                e.window_start = now;
            }
            e.roll(now, window);
            if e.failures >= self.limits.failures {
                return Err(AuthRefusal::Throttled);
            }
        }
        // A never-ban source (the carrier) is held to its own limit only, so
        // guessing elsewhere cannot lock it out.
        if self.exempt(ip) {
            return Ok(());
        }
        if let Some(e) = user.and_then(|u| self.users.get_mut(&user_key(u))) {
            e.roll(now, window);
            if e.failures >= self.limits.failures {
                return Err(AuthRefusal::Throttled);
            }
        }
        Ok(())
    }

    /// A check for `user` from `ip` failed (wrong password, unknown user,
    /// forged or replayed nonce). Returns true when this failure banned `ip`.
    pub fn failed(&mut self, now: Instant, ip: IpAddr, user: Option<&str>) -> bool {
        let window = self.limits.window;
        let exempt = self.exempt(ip);
        make_room(&mut self.sources, now, window);
        let e = self.sources.entry(ip).or_insert_with(|| Entry::fresh(now));
        e.roll(now, window);
        e.failures = e.failures.saturating_add(1);
        let mut banned = false;
        if e.failures >= self.limits.failures && !exempt && e.banned_until.is_none() {
            e.banned_until = Some(now + self.limits.ban);
            self.bans += 1;
            banned = true;
        }
        if let Some(u) = user {
            make_room(&mut self.users, now, window);
            let e = self
                .users
                .entry(user_key(u))
                .or_insert_with(|| Entry::fresh(now));
            e.roll(now, window);
            e.failures = e.failures.saturating_add(1);
        }
        banned
    }

    /// Sources banned so far (for metrics and tests).
    pub fn bans(&self) -> u64 {
        self.bans
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn limits(never_ban: &[&str]) -> AuthLimits {
        AuthLimits {
            failures: 10,
            window: Duration::from_secs(60),
            ban: Duration::from_secs(600),
            never_ban: never_ban.iter().map(|n| n.parse().unwrap()).collect(),
        }
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn ten_failures_a_minute_then_banned_until_the_ban_expires() {
        let t0 = Instant::now();
        let mut g = AuthGuard::new(limits(&[]));
        let src = ip("198.51.100.9");
        let mut checked = 0;
        for i in 0..100u32 {
            let now = t0 + Duration::from_millis(u64::from(i) * 10);
            if g.before_check(now, src, Some("trunk")).is_ok() {
                checked += 1;
                g.failed(now, src, Some("trunk"));
            }
        }
        assert_eq!(checked, 10);
        assert_eq!(g.bans(), 1);
        // Still banned after the window, until the ban passes.
        let later = t0 + Duration::from_secs(120);
        assert_eq!(g.before_check(later, src, None), Err(AuthRefusal::Banned));
        assert!(g.is_banned(later, src));
        let after = t0 + Duration::from_secs(601);
        assert!(!g.is_banned(after, src));
        assert_eq!(g.before_check(after, src, None), Ok(()));
        // Another source is unaffected (except by the username's limit).
        assert_eq!(g.before_check(t0, ip("198.51.100.10"), None), Ok(()));
    }

    #[test]
    fn never_ban_sources_are_throttled_not_banned() {
        let t0 = Instant::now();
        let mut g = AuthGuard::new(limits(&["203.0.113.0/24"]));
        let carrier = ip("203.0.113.5");
        for _ in 0..10 {
            assert_eq!(g.before_check(t0, carrier, None), Ok(()));
            assert!(!g.failed(t0, carrier, None));
        }
        assert_eq!(
            g.before_check(t0, carrier, None),
            Err(AuthRefusal::Throttled)
        );
        assert!(!g.is_banned(t0, carrier));
        assert_eq!(g.bans(), 0);
        // The next window checks again.
        let next = t0 + Duration::from_secs(60);
        assert_eq!(g.before_check(next, carrier, None), Ok(()));
    }

    #[test]
    fn a_username_is_held_to_the_limit_across_sources() {
        let t0 = Instant::now();
        let mut g = AuthGuard::new(limits(&[]));
        let mut checked = 0;
        for i in 0..50u8 {
            let src = IpAddr::from([198, 51, 100, i]);
            if g.before_check(t0, src, Some("trunk")).is_ok() {
                checked += 1;
                g.failed(t0, src, Some("trunk"));
            }
        }
        assert_eq!(checked, 10);
        assert_eq!(g.bans(), 0, "one failure per source bans none");
        assert_eq!(
            g.before_check(
                t0 + Duration::from_secs(61),
                ip("198.51.100.200"),
                Some("trunk")
            ),
            Ok(())
        );
    }

    #[test]
    fn memory_is_bounded() {
        let t0 = Instant::now();
        let mut g = AuthGuard::new(limits(&[]));
        for i in 0..(MAX_TRACKED as u32 + 500) {
            let src = IpAddr::from(i.to_be_bytes());
            let user = format!("u{i}{}", "x".repeat(300));
            g.failed(t0, src, Some(&user));
        }
        assert!(g.sources.len() <= MAX_TRACKED);
        assert!(g.users.len() <= MAX_TRACKED);
        assert!(g.users.keys().all(|k| k.len() <= MAX_USER_LEN));
    }
}
