//! Time-limited signed download links to recordings.
//!
//! Owns the link format and its key: `…/download?expires=<unix s>&by=<actor>
//! &sig=<hex>`, where `sig` is HMAC-SHA256 over the recording id, the actor
//! the link was issued to and the expiry, under a key derived from the master
//! key (HMAC of a fixed label), so links survive restarts and need no stored
//! state. Must not read the clock: `now` comes in, so expiry is tested in
//! virtual time. The signature authorises one recording until `expires`; it
//! is not a reusable credential and may appear in logs.

use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;
use zeroize::Zeroizing;

/// Label the link key is derived under (changing it invalidates every link).
const KEY_LABEL: &[u8] = b"sipbridge admin download link v1";

/// Longest lifetime a link may be issued for.
pub(crate) const MAX_TTL_S: u64 = 24 * 3600;

/// Lifetime when the request names none.
pub(crate) const DEFAULT_TTL_S: u64 = 300;

/// Why a link is refused (403 either way).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub(crate) enum LinkError {
    /// The signature does not match (any part altered, or another key).
    #[error("link signature invalid")]
    Tampered,
    /// Authentic, but past its expiry.
    #[error("link expired")]
    Expired,
}

/// Signs and verifies links.
pub(crate) struct LinkSigner {
    key: Zeroizing<Vec<u8>>,
}

impl std::fmt::Debug for LinkSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("LinkSigner(<key redacted>)")
    }
}

fn mac(key: &[u8]) -> Hmac<Sha256> {
    // HMAC accepts keys of any length: this cannot fail.
    <Hmac<Sha256> as KeyInit>::new_from_slice(key)
        .unwrap_or_else(|_| <Hmac<Sha256> as KeyInit>::new(&Default::default()))
}

impl LinkSigner {
    /// The signer whose key derives from `master_key`.
    pub(crate) fn from_master(master_key: &[u8]) -> LinkSigner {
        let mut m = mac(master_key);
        m.update(KEY_LABEL);
        LinkSigner {
            key: Zeroizing::new(m.finalize().into_bytes().to_vec()),
        }
    }

    fn mac_of(&self, recording: &str, actor: &str, expires: u64) -> Hmac<Sha256> {
        let mut m = mac(&self.key);
        // Length-prefixed fields: no two (id, actor) pairs encode alike.
        for field in [recording.as_bytes(), actor.as_bytes()] {
            m.update(&(field.len() as u64).to_be_bytes());
            m.update(field);
        }
        m.update(&expires.to_be_bytes());
        m
    }

    /// The hex signature of a link to `recording` for `actor` until `expires`.
    pub(crate) fn sign(&self, recording: &str, actor: &str, expires: u64) -> String {
        hex::encode(
            self.mac_of(recording, actor, expires)
                .finalize()
                .into_bytes(),
        )
    }

    /// The path and query of a link issued at `now` (unix s) for `ttl_s`.
    pub(crate) fn link(&self, recording: &str, actor: &str, now: u64, ttl_s: u64) -> SignedLink {
        let expires = now.saturating_add(ttl_s.min(MAX_TTL_S));
        let sig = self.sign(recording, actor, expires);
        SignedLink {
            path: format!(
                "/v1/recordings/{recording}/download?expires={expires}&by={actor}&sig={sig}"
            ),
            expires,
        }
    }

    /// Checks a presented link at `now` (unix s): the signature first (in
    /// constant time), then the expiry.
    pub(crate) fn verify(
        &self,
        recording: &str,
        actor: &str,
        expires: u64,
        sig_hex: &str,
        now: u64,
    ) -> Result<(), LinkError> {
        let mut sig = [0u8; 32];
        hex::decode_to_slice(sig_hex, &mut sig).map_err(|_| LinkError::Tampered)?;
        self.mac_of(recording, actor, expires)
            .verify_slice(&sig)
            .map_err(|_| LinkError::Tampered)?;
        if now >= expires {
            return Err(LinkError::Expired);
        }
        Ok(())
    }
}

/// A link as issued.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct SignedLink {
    /// Path and query, relative to the admin API's base URL.
    pub(crate) path: String,
    /// Unix seconds after which it is refused.
    pub(crate) expires: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    const T0: u64 = 1_800_000_000;

    fn query(link: &SignedLink, name: &str) -> String {
        let q = link.path.split_once('?').unwrap().1;
        q.split('&')
            .find_map(|kv| kv.strip_prefix(&format!("{name}=")))
            .unwrap()
            .to_owned()
    }

    #[test]
    fn privacy_expiring_links_a_link_is_valid_until_it_expires() {
        let s = LinkSigner::from_master(&[1u8; 32]);
        let link = s.link("abc123", "admin-api:admin", T0, 300);
        assert_eq!(link.expires, T0 + 300);
        assert!(
            link.path
                .starts_with("/v1/recordings/abc123/download?expires=1800000300&")
        );
        let sig = query(&link, "sig");
        assert_eq!(sig.len(), 64);
        let ok = |now| s.verify("abc123", "admin-api:admin", T0 + 300, &sig, now);
        assert_eq!(ok(T0), Ok(()));
        assert_eq!(ok(T0 + 299), Ok(()));
        assert_eq!(ok(T0 + 300), Err(LinkError::Expired));
        assert_eq!(ok(T0 + 86_400), Err(LinkError::Expired));
    }

    #[test]
    fn any_change_is_tampering() {
        let s = LinkSigner::from_master(&[1u8; 32]);
        let link = s.link("abc123", "admin-api:tenant:acme", T0, 60);
        let sig = query(&link, "sig");
        let exp = T0 + 60;
        let by = "admin-api:tenant:acme";
        assert_eq!(
            s.verify("abc124", by, exp, &sig, T0),
            Err(LinkError::Tampered)
        );
        assert_eq!(
            s.verify("abc123", "admin-api:admin", exp, &sig, T0),
            Err(LinkError::Tampered)
        );
        // A later expiry is refused even though the link would still be valid.
        assert_eq!(
            s.verify("abc123", by, exp + 3600, &sig, T0),
            Err(LinkError::Tampered)
        );
        let mut flipped = sig.clone().into_bytes();
        flipped[10] = if flipped[10] == b'0' { b'1' } else { b'0' };
        let flipped = String::from_utf8(flipped).unwrap();
        assert_eq!(
            s.verify("abc123", by, exp, &flipped, T0),
            Err(LinkError::Tampered)
        );
        assert_eq!(
            s.verify("abc123", by, exp, &sig[..62], T0),
            Err(LinkError::Tampered)
        );
        assert_eq!(
            s.verify("abc123", by, exp, "zz", T0),
            Err(LinkError::Tampered)
        );
        // Tampered and expired: reported as tampered.
        assert_eq!(
            s.verify("abc124", by, exp, &sig, exp + 1),
            Err(LinkError::Tampered)
        );
        // Another master key signs differently.
        let other = LinkSigner::from_master(&[2u8; 32]);
        assert_eq!(
            other.verify("abc123", by, exp, &sig, T0),
            Err(LinkError::Tampered)
        );
    }

    #[test]
    fn lifetimes_are_capped() {
        let s = LinkSigner::from_master(&[1u8; 32]);
        assert_eq!(s.link("r", "a", T0, u64::MAX).expires, T0 + MAX_TTL_S);
        assert_eq!(s.link("r", "a", u64::MAX - 1, 10).expires, u64::MAX);
    }
}
