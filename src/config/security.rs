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

/// `[profile.security]` as written.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawSecurity {
    #[serde(default)]
    pub(crate) rtp_latch_window_ms: Option<Spanned<u32>>,
}

/// The resolved `[profile.security]` of a profile.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct SecuritySettings {
    /// On a trunk with `behind_nat = true`: how long after the first packet
    /// from the SDP's or the signalling source's IP the call's RTP source may
    /// latch (then it is locked). Default 2 s.
    pub rtp_latch_window: Duration,
}

/// Default [`SecuritySettings::rtp_latch_window`].
const DEFAULT_RTP_LATCH_WINDOW: Duration = Duration::from_secs(2);
/// Largest `rtp_latch_window_ms`.
const MAX_RTP_LATCH_WINDOW_MS: u32 = 10_000;

impl Default for SecuritySettings {
    fn default() -> SecuritySettings {
        SecuritySettings {
            rtp_latch_window: DEFAULT_RTP_LATCH_WINDOW,
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
