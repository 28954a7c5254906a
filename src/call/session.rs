//! Session timers (RFC 4028) for one call: what we answer to Session-Expires
//! and Min-SE, when we refresh (we are the refresher) and when an unrefreshed
//! session ends (the peer is the refresher and fell silent).

use crate::sip::error::SipError;
use crate::sip::message::{Headers, Request};
use std::time::{Duration, Instant};

/// The negotiated session timer of a call.
#[derive(Debug, Clone)]
pub(crate) struct SessionTimer {
    interval: Duration,
    /// We (the UAS) refresh; else the caller does.
    we_refresh: bool,
    /// The caller supports timers (`Supported: timer`), so we add `Require: timer`.
    peer_supports: bool,
    next_refresh: Option<Instant>,
    expires_at: Option<Instant>,
}

/// Parses `Session-Expires: 1800;refresher=uac` → (1800 s, Some("uac")).
pub(crate) fn parse_session_expires(value: &str) -> Option<(Duration, Option<String>)> {
    let mut parts = value.split(';');
    let secs: u64 = parts.next()?.trim().parse().ok()?;
    let mut refresher = None;
    for p in parts {
        let mut kv = p.splitn(2, '=');
        let k = kv.next().unwrap_or_default().trim();
        if k.eq_ignore_ascii_case("refresher") {
            refresher = kv.next().map(|v| v.trim().to_ascii_lowercase());
        }
    }
    Some((Duration::from_secs(secs), refresher))
}

fn has_option_tag(headers: &Headers, header: &str, tag: &str) -> bool {
    headers
        .values(header)
        .any(|v| v.trim().eq_ignore_ascii_case(tag))
}

impl SessionTimer {
    /// Decides the session timer for an INVITE (RFC 4028 §9). `Ok(None)`: no
    /// timer (the caller neither supports nor asks for one). An interval below
    /// our Min-SE is `SipError::IntervalTooBrief` (422 with Min-SE).
    pub(crate) fn negotiate(
        invite: &Request,
        ours: Duration,
        min_se: Duration,
    ) -> Result<Option<SessionTimer>, SipError> {
        let peer_supports = has_option_tag(&invite.headers, "Supported", "timer")
            || has_option_tag(&invite.headers, "Require", "timer");
        let requested = invite.headers.get("Session-Expires").map(|v| {
            parse_session_expires(v)
                .ok_or_else(|| SipError::Malformed("bad Session-Expires".to_owned()))
        });
        let requested = match requested {
            Some(r) => Some(r?),
            None => None,
        };
        let peer_min = invite
            .headers
            .get("Min-SE")
            .and_then(|v| v.split(';').next())
            .and_then(|v| v.trim().parse::<u64>().ok())
            .map(Duration::from_secs)
            .unwrap_or(Duration::ZERO);
        if let Some((se, _)) = &requested
            && *se < min_se
        {
            return Err(SipError::IntervalTooBrief {
                min_se: u32::try_from(min_se.as_secs()).unwrap_or(u32::MAX),
            });
        }
        if !peer_supports && requested.is_none() {
            return Ok(None);
        }
        let (interval, refresher) = match requested {
            Some((se, refresher)) => (se, refresher),
            None => (ours.max(min_se).max(peer_min), None),
        };
        // Without caller support the UAS must refresh (RFC 4028 §9).
        let we_refresh = if peer_supports {
            refresher.as_deref() == Some("uas")
        } else {
            true
        };
        Ok(Some(SessionTimer {
            interval,
            we_refresh,
            peer_supports,
            next_refresh: None,
            expires_at: None,
        }))
    }

    /// Headers of our 2xx (and UPDATE 200s).
    pub(crate) fn apply(&self, headers: &mut Headers) {
        let who = if self.we_refresh { "uas" } else { "uac" };
        headers.push(
            "Session-Expires",
            format!("{};refresher={who}", self.interval.as_secs()),
        );
        if self.peer_supports {
            headers.push("Require", "timer");
        }
    }

    /// Headers of our refreshing re-INVITE: we are the refresher. In the new
    /// transaction we are the UAC, so "refresher=uac" names us.
    pub(crate) fn apply_refresh(&self, headers: &mut Headers) {
        headers.push(
            "Session-Expires",
            format!("{};refresher=uac", self.interval.as_secs()),
        );
    }

    /// The dialog is confirmed: start counting.
    pub(crate) fn start(&mut self, now: Instant) {
        self.refreshed(now);
    }

    /// A refresh succeeded (ours or the caller's re-INVITE/UPDATE).
    pub(crate) fn refreshed(&mut self, now: Instant) {
        if self.we_refresh {
            self.next_refresh = Some(now + self.interval / 2);
            self.expires_at = Some(now + self.interval);
        } else {
            // RFC 4028 §10: the non-refresher sends BYE "before" expiry:
            // at interval − min(32 s, interval/3).
            let margin = Duration::from_secs(32).min(self.interval / 3);
            self.next_refresh = None;
            self.expires_at = Some(now + self.interval - margin);
        }
    }

    /// Our refresh was sent; do not send another until it completes.
    pub(crate) fn refresh_sent(&mut self, _now: Instant) {
        self.next_refresh = None;
    }

    /// Our refresh failed with a non-fatal error: try again a quarter interval later.
    pub(crate) fn retry_later(&mut self, now: Instant) {
        if self.we_refresh {
            self.next_refresh = Some(now + self.interval / 4);
        }
    }

    pub(crate) fn refresh_due(&self, now: Instant) -> bool {
        self.next_refresh.is_some_and(|t| now >= t)
    }

    pub(crate) fn expired(&self, now: Instant) -> bool {
        self.expires_at.is_some_and(|t| now >= t)
    }

    pub(crate) fn next_timeout(&self) -> Option<Instant> {
        match (self.next_refresh, self.expires_at) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_session_expires() {
        let (d, r) = parse_session_expires("1800;refresher=uas").unwrap();
        assert_eq!(d, Duration::from_secs(1800));
        assert_eq!(r.as_deref(), Some("uas"));
        let (d, r) = parse_session_expires(" 90 ").unwrap();
        assert_eq!(d, Duration::from_secs(90));
        assert!(r.is_none());
        assert!(parse_session_expires("soon").is_none());
    }
}
