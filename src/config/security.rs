//! `[profile.security]`: the limits that keep a hostile network from taking
//! over calls or exhausting the daemon (threat model and every default in
//! `docs/security.md`).
//!
//! Owns: the section's TOML shape, its defaults and range checks. Must not
//! enforce anything (the switchboard, media and transports do).

use std::ops::Range;
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

/// `unknown_source` as written (`[profile.security]`, or the older
/// `[profile.sip]` spelling).
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum RawUnknownSource {
    Reject,
    Drop,
}

/// `[profile.security]` as written.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawSecurity {
    #[serde(default)]
    pub(crate) rtp_latch_window_ms: Option<Spanned<u32>>,
    #[serde(default)]
    pub(crate) digest_nonce_lifetime_s: Option<Spanned<u32>>,
    #[serde(default)]
    pub(crate) auth_failures_per_minute: Option<Spanned<u32>>,
    #[serde(default)]
    pub(crate) auth_ban_s: Option<Spanned<u32>>,
    #[serde(default)]
    pub(crate) never_ban: Option<Vec<Spanned<String>>>,
    #[serde(default)]
    pub(crate) max_unconfirmed_calls_per_source: Option<Spanned<u32>>,
    #[serde(default)]
    pub(crate) tcp_idle_timeout_s: Option<Spanned<u32>>,
    #[serde(default)]
    pub(crate) tcp_max_connections: Option<Spanned<u32>>,
    #[serde(default)]
    pub(crate) tcp_max_connections_per_source: Option<Spanned<u32>>,
    #[serde(default)]
    pub(crate) unknown_source: Option<RawUnknownSource>,
    #[serde(default)]
    pub(crate) requests_per_second_per_source: Option<Spanned<u32>>,
    #[serde(default)]
    pub(crate) request_burst_per_source: Option<Spanned<u32>>,
    #[serde(default)]
    pub(crate) calls_per_second_per_source: Option<Spanned<u32>>,
    #[serde(default)]
    pub(crate) call_burst_per_source: Option<Spanned<u32>>,
    #[serde(default)]
    pub(crate) malformed_ban_after: Option<Spanned<u32>>,
    #[serde(default)]
    pub(crate) malformed_window_s: Option<Spanned<u32>>,
    #[serde(default)]
    pub(crate) ban_s: Option<Spanned<u32>>,
    #[serde(default)]
    pub(crate) scanner_user_agents: Option<Vec<Spanned<String>>>,
    #[serde(default)]
    pub(crate) udp_receive_buffer_bytes: Option<Spanned<u32>>,
    #[serde(default)]
    pub(crate) trusted_proxies: Option<Vec<Spanned<String>>>,
    #[serde(default)]
    pub(crate) trusted_proxy_source_header: Option<Spanned<String>>,
}

/// The resolved `[profile.security]` of a profile.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct SecuritySettings {
    /// On a trunk with `behind_nat = true`: how long after the first packet
    /// from the SDP's or the signalling source's IP the call's RTP source may
    /// latch (then it is locked). Default 2 s.
    pub rtp_latch_window: Duration,
    /// How long a digest nonce we issued is accepted (default 30 s; each is
    /// also single-use per nonce-count, and burnt by a wrong answer).
    pub digest_nonce_lifetime: Duration,
    /// Failed digest checks per source (and per username) per minute before
    /// the source is banned (default 10).
    pub auth_failures_per_minute: u32,
    /// How long a banned source is ignored (default 600 s).
    pub auth_ban: Duration,
    /// Sources never banned, only throttled (a carrier's own hosts).
    pub never_ban: Vec<ipnet::IpNet>,
    /// Answered calls from one source address not yet confirmed by ACK
    /// (default 10); beyond it new INVITEs from there get 503.
    pub max_unconfirmed_calls_per_source: u32,
    /// A TCP connection that has not completed a message this long after it
    /// was opened, or after the last complete message while part of the next
    /// one is buffered, is closed (default 10 s).
    pub tcp_idle_timeout: Duration,
    /// TCP connections open at once per listener (default 1024).
    pub tcp_max_connections: u32,
    /// TCP connections open at once per source address and listener (default 32).
    pub tcp_max_connections_per_source: u32,
    /// Set when the profile says `unknown_source` here (it overrides the
    /// older `[profile.sip] unknown_source`; the resolved value is
    /// [`super::SipSettings::unknown_source`], default drop).
    pub unknown_source: Option<super::UnknownSource>,
    /// SIP messages per second per source (token-bucket refill; 0: no limit;
    /// default 50). Trusted sources (`never_ban`, the `allow` networks of
    /// trunks without digest) are never limited.
    pub requests_per_second_per_source: u32,
    /// Messages a source may send at once (bucket size, default 100).
    pub request_burst_per_source: u32,
    /// New INVITEs per second per source (0: no limit; default 5).
    pub calls_per_second_per_source: u32,
    /// INVITEs a source may send at once (default 20).
    pub call_burst_per_source: u32,
    /// Unparseable messages within `malformed_window` that ban a source
    /// (0: never; default 20).
    pub malformed_ban_after: u32,
    /// Window of `malformed_ban_after` (default 60 s).
    pub malformed_window: Duration,
    /// How long a malformed-message or scanner ban lasts (default 600 s).
    pub ban: Duration,
    /// Lower-case `User-Agent` substrings of scanners: a source that sends
    /// one is banned for `ban` (default [`DEFAULT_SCANNERS`]).
    pub scanner_user_agents: Vec<String>,
    /// SO_RCVBUF asked for on SIP UDP sockets (default 4 MiB; the kernel
    /// caps it at `net.core.rmem_max` unless the daemon may force it).
    pub udp_receive_buffer_bytes: u32,
    /// SIP proxies in front of the daemon (a Kamailio dispatcher): their
    /// requests are never rate-limited or banned, their OPTIONS pings are
    /// answered whatever `unknown_source` says, and the trunk of a request
    /// they relay is found from the address in
    /// [`SecuritySettings::trusted_proxy_source_header`], not from theirs.
    pub trusted_proxies: Vec<ipnet::IpNet>,
    /// The header a trusted proxy puts the caller's address in (default
    /// `X-Src-IP`). Read only on requests whose packet came from a
    /// [`SecuritySettings::trusted_proxies`] address (the last one of that
    /// name); anyone else's is ignored.
    pub trusted_proxy_source_header: String,
}

/// Default [`SecuritySettings::trusted_proxy_source_header`].
pub(crate) const DEFAULT_PROXY_SOURCE_HEADER: &str = "X-Src-IP";

/// Headers a caller writes or every hop rewrites: never the proxy's word on
/// where a request came from.
const NOT_A_SOURCE_HEADER: &[&str] = &[
    "via",
    "v",
    "from",
    "f",
    "to",
    "t",
    "call-id",
    "i",
    "cseq",
    "contact",
    "m",
    "route",
    "record-route",
    "max-forwards",
    "content-length",
    "l",
    "content-type",
    "c",
    "user-agent",
    "authorization",
    "proxy-authorization",
];

/// `User-Agent`s of SIP scanners and password crackers (SIPVicious and its
/// clones, sipcli, the Vax SDK's default, sundayddr, iWar, SIPScan).
pub(crate) const DEFAULT_SCANNERS: &[&str] = &[
    "friendly-scanner",
    "sipvicious",
    "sipcli",
    "vaxsipuseragent",
    "sundayddr",
    "iwar",
    "sipscan",
    "sip-scan",
];

/// Default [`SecuritySettings::rtp_latch_window`].
const DEFAULT_RTP_LATCH_WINDOW: Duration = Duration::from_secs(2);
/// Largest `rtp_latch_window_ms`.
const MAX_RTP_LATCH_WINDOW_MS: u32 = 10_000;

impl Default for SecuritySettings {
    fn default() -> SecuritySettings {
        SecuritySettings {
            rtp_latch_window: DEFAULT_RTP_LATCH_WINDOW,
            digest_nonce_lifetime: Duration::from_secs(30),
            auth_failures_per_minute: 10,
            auth_ban: Duration::from_secs(600),
            never_ban: Vec::new(),
            max_unconfirmed_calls_per_source: 10,
            tcp_idle_timeout: Duration::from_secs(10),
            tcp_max_connections: 1024,
            tcp_max_connections_per_source: 32,
            unknown_source: None,
            requests_per_second_per_source: 50,
            request_burst_per_source: 100,
            calls_per_second_per_source: 5,
            call_burst_per_source: 20,
            malformed_ban_after: 20,
            malformed_window: Duration::from_secs(60),
            ban: Duration::from_secs(600),
            scanner_user_agents: DEFAULT_SCANNERS.iter().map(|s| (*s).to_owned()).collect(),
            udp_receive_buffer_bytes: 4 * 1024 * 1024,
            trusted_proxies: Vec::new(),
            trusted_proxy_source_header: DEFAULT_PROXY_SOURCE_HEADER.to_owned(),
        }
    }
}

/// Checks a `[profile.security]` section; errors carry the span of the value.
pub(crate) fn resolve(
    raw: Option<&RawSecurity>,
) -> (SecuritySettings, Vec<(Range<usize>, String)>) {
    let mut s = SecuritySettings::default();
    let mut errors = Vec::new();
    let Some(r) = raw else {
        return (s, errors);
    };
    let mut ranged = |v: &Option<Spanned<u32>>, name: &str, lo: u32, hi: u32| -> Option<u32> {
        let v = v.as_ref()?;
        let n = *v.get_ref();
        if n < lo || n > hi {
            errors.push((v.span(), format!("{name} {n} must be {lo} to {hi}")));
            return None;
        }
        Some(n)
    };
    if let Some(n) = ranged(
        &r.digest_nonce_lifetime_s,
        "digest_nonce_lifetime_s",
        5,
        300,
    ) {
        s.digest_nonce_lifetime = Duration::from_secs(u64::from(n));
    }
    if let Some(n) = ranged(
        &r.auth_failures_per_minute,
        "auth_failures_per_minute",
        1,
        1000,
    ) {
        s.auth_failures_per_minute = n;
    }
    if let Some(n) = ranged(&r.auth_ban_s, "auth_ban_s", 1, 86_400) {
        s.auth_ban = Duration::from_secs(u64::from(n));
    }
    if let Some(n) = ranged(
        &r.max_unconfirmed_calls_per_source,
        "max_unconfirmed_calls_per_source",
        1,
        100_000,
    ) {
        s.max_unconfirmed_calls_per_source = n;
    }
    if let Some(n) = ranged(&r.tcp_idle_timeout_s, "tcp_idle_timeout_s", 1, 3600) {
        s.tcp_idle_timeout = Duration::from_secs(u64::from(n));
    }
    if let Some(n) = ranged(&r.tcp_max_connections, "tcp_max_connections", 1, 1_000_000) {
        s.tcp_max_connections = n;
    }
    if let Some(n) = ranged(
        &r.tcp_max_connections_per_source,
        "tcp_max_connections_per_source",
        1,
        1_000_000,
    ) {
        s.tcp_max_connections_per_source = n;
    }
    s.unknown_source = r.unknown_source.map(|u| match u {
        RawUnknownSource::Reject => super::UnknownSource::Reject,
        RawUnknownSource::Drop => super::UnknownSource::Drop,
    });
    let counts: [(&Option<Spanned<u32>>, &str, u32, &mut u32); 5] = [
        (
            &r.requests_per_second_per_source,
            "requests_per_second_per_source",
            0,
            &mut s.requests_per_second_per_source,
        ),
        (
            &r.request_burst_per_source,
            "request_burst_per_source",
            1,
            &mut s.request_burst_per_source,
        ),
        (
            &r.calls_per_second_per_source,
            "calls_per_second_per_source",
            0,
            &mut s.calls_per_second_per_source,
        ),
        (
            &r.call_burst_per_source,
            "call_burst_per_source",
            1,
            &mut s.call_burst_per_source,
        ),
        (
            &r.malformed_ban_after,
            "malformed_ban_after",
            0,
            &mut s.malformed_ban_after,
        ),
    ];
    for (v, name, lo, slot) in counts {
        if let Some(n) = ranged(v, name, lo, 1_000_000) {
            *slot = n;
        }
    }
    if let Some(n) = ranged(&r.malformed_window_s, "malformed_window_s", 1, 86_400) {
        s.malformed_window = Duration::from_secs(u64::from(n));
    }
    if let Some(n) = ranged(&r.ban_s, "ban_s", 1, 604_800) {
        s.ban = Duration::from_secs(u64::from(n));
    }
    if let Some(n) = ranged(
        &r.udp_receive_buffer_bytes,
        "udp_receive_buffer_bytes",
        65_536,
        1 << 30,
    ) {
        s.udp_receive_buffer_bytes = n;
    }
    if let Some(list) = &r.scanner_user_agents {
        s.scanner_user_agents.clear();
        for v in list {
            let text = v.get_ref().trim().to_ascii_lowercase();
            if text.is_empty() || text.len() > 128 {
                errors.push((
                    v.span(),
                    "scanner_user_agents entries must be 1 to 128 characters".to_owned(),
                ));
            } else {
                s.scanner_user_agents.push(text);
            }
        }
    }
    for v in r.never_ban.iter().flatten() {
        let text = v.get_ref();
        let net = text
            .parse::<ipnet::IpNet>()
            .or_else(|_| text.parse::<std::net::IpAddr>().map(ipnet::IpNet::from));
        match net {
            Ok(net) => s.never_ban.push(net),
            Err(_) => errors.push((
                v.span(),
                format!("never_ban `{text}` is not a CIDR or IP address"),
            )),
        }
    }
    for v in r.trusted_proxies.iter().flatten() {
        let text = v.get_ref();
        let net = text
            .parse::<ipnet::IpNet>()
            .or_else(|_| text.parse::<std::net::IpAddr>().map(ipnet::IpNet::from));
        match net {
            Ok(net) if net.prefix_len() == 0 => errors.push((
                v.span(),
                format!(
                    "trusted_proxies `{text}` would trust every address to say where a call \
                     came from: list the proxies' own addresses"
                ),
            )),
            Ok(net) => s.trusted_proxies.push(net.trunc()),
            Err(_) => errors.push((
                v.span(),
                format!("trusted_proxies `{text}` is not a CIDR or IP address"),
            )),
        }
    }
    if let Some(v) = &r.trusted_proxy_source_header {
        let name = v.get_ref().trim();
        let token = !name.is_empty()
            && name.len() <= 64
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_.!%*+`'~".contains(&b));
        if !token {
            errors.push((
                v.span(),
                format!(
                    "trusted_proxy_source_header `{name}` is not a header name (1 to 64 letters, \
                     digits or -_.!%*+`'~)"
                ),
            ));
        } else if NOT_A_SOURCE_HEADER
            .iter()
            .any(|h| h.eq_ignore_ascii_case(name))
        {
            errors.push((
                v.span(),
                format!(
                    "trusted_proxy_source_header `{name}` is a header callers write: use one \
                     only the proxy sets, e.g. `{DEFAULT_PROXY_SOURCE_HEADER}`"
                ),
            ));
        } else {
            s.trusted_proxy_source_header = name.to_owned();
        }
    }
    if let Some(v) = &r.rtp_latch_window_ms {
        let ms = *v.get_ref();
        if ms == 0 || ms > MAX_RTP_LATCH_WINDOW_MS {
            errors.push((
                v.span(),
                format!("rtp_latch_window_ms {ms} must be 1 to {MAX_RTP_LATCH_WINDOW_MS}"),
            ));
        } else {
            s.rtp_latch_window = Duration::from_millis(u64::from(ms));
        }
    }
    (s, errors)
}
