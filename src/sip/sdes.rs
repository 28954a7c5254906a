//! SDES key exchange for SRTP (RFC 4568 `a=crypto`): which crypto suites we
//! accept, reading the offerer's key, and writing ours.
//!
//! Owns: the suite table (AES_CM_128_HMAC_SHA1_80/_32, AES_256_CM_HMAC_SHA1_80/_32
//! of RFC 6188, AEAD_AES_128_GCM/256 of RFC 7714), the choice of one offered
//! `a=crypto` line, and [`KeyMaterial`], the master key and salt that never
//! prints (Debug shows only its length) and is wiped on drop. Must not touch:
//! RNGs (our key material comes from the caller), SRTP packet processing
//! (`media::srtp`).

use std::fmt;

use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD};
use zeroize::Zeroizing;

/// Longest master key + salt of any suite we speak (AES-256: 32 + 14).
pub const MAX_KEY_MATERIAL: usize = 46;

/// An SRTP crypto suite we can run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum CryptoSuite {
    /// AES-128 counter mode, HMAC-SHA1 with an 80-bit tag (RFC 4568 §6.2.1).
    AesCm128HmacSha1_80,
    /// AES-128 counter mode, HMAC-SHA1 with a 32-bit RTP tag.
    AesCm128HmacSha1_32,
    /// AES-256 counter mode, 80-bit tag (RFC 6188).
    AesCm256HmacSha1_80,
    /// AES-256 counter mode, 32-bit RTP tag (RFC 6188).
    AesCm256HmacSha1_32,
    /// AES-128-GCM AEAD (RFC 7714).
    AeadAes128Gcm,
    /// AES-256-GCM AEAD (RFC 7714).
    AeadAes256Gcm,
}

impl CryptoSuite {
    /// The SDP name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::AesCm128HmacSha1_80 => "AES_CM_128_HMAC_SHA1_80",
            Self::AesCm128HmacSha1_32 => "AES_CM_128_HMAC_SHA1_32",
            Self::AesCm256HmacSha1_80 => "AES_256_CM_HMAC_SHA1_80",
            Self::AesCm256HmacSha1_32 => "AES_256_CM_HMAC_SHA1_32",
            Self::AeadAes128Gcm => "AEAD_AES_128_GCM",
            Self::AeadAes256Gcm => "AEAD_AES_256_GCM",
        }
    }

    fn from_name(name: &str) -> Option<Self> {
        [
            Self::AesCm128HmacSha1_80,
            Self::AesCm128HmacSha1_32,
            Self::AesCm256HmacSha1_80,
            Self::AesCm256HmacSha1_32,
            Self::AeadAes128Gcm,
            Self::AeadAes256Gcm,
        ]
        .into_iter()
        .find(|s| s.as_str() == name)
    }

    /// Master key and master salt lengths in bytes.
    pub fn key_and_salt_len(self) -> (usize, usize) {
        match self {
            Self::AesCm128HmacSha1_80 | Self::AesCm128HmacSha1_32 => (16, 14),
            Self::AesCm256HmacSha1_80 | Self::AesCm256HmacSha1_32 => (32, 14),
            Self::AeadAes128Gcm => (16, 12),
            Self::AeadAes256Gcm => (32, 12),
        }
    }

    fn material_len(self) -> usize {
        let (k, s) = self.key_and_salt_len();
        k + s
    }
}

/// An SRTP master key followed by its master salt. Wiped on drop; Debug
/// prints only the length.
#[derive(Clone, PartialEq, Eq)]
pub struct KeyMaterial(Zeroizing<Vec<u8>>);

impl KeyMaterial {
    /// Wraps key material (key then salt).
    pub fn new(bytes: Vec<u8>) -> KeyMaterial {
        KeyMaterial(Zeroizing::new(bytes))
    }

    /// The master key and the master salt for `suite` (the material is at
    /// least that long: checked where it is made).
    pub fn split(&self, suite: CryptoSuite) -> (&[u8], &[u8]) {
        let (k, s) = suite.key_and_salt_len();
        let key = self.0.get(..k).unwrap_or_default();
        let salt = self.0.get(k..k + s).unwrap_or_default();
        (key, salt)
    }
}

impl fmt::Debug for KeyMaterial {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "KeyMaterial({} bytes)", self.0.len())
    }
}

/// The SRTP session both sides agreed on: one suite, the tag of the
/// `a=crypto` line, and a key per direction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SrtpParams {
    /// The suite.
    pub suite: CryptoSuite,
    /// The `a=crypto` tag.
    pub tag: u32,
    /// What we encrypt with (ours, sent in our SDP).
    pub local: KeyMaterial,
    /// What the peer encrypts with (from its SDP).
    pub remote: KeyMaterial,
}

/// The peer's acceptable `a=crypto` line: tag, suite, key material.
pub(crate) struct OfferedCrypto {
    pub(crate) tag: u32,
    pub(crate) suite: CryptoSuite,
    pub(crate) key: KeyMaterial,
}

/// The first of the peer's `a=crypto` lines (its order of preference,
/// RFC 4568 §6.1) that we can run: a known suite, one inline key of the
/// right length, no MKI, no lifetime below 2^31 and no session parameters
/// (UNENCRYPTED_SRTP and friends are refused rather than half-honoured).
pub(crate) fn choose(lines: &[ezk_sdp_types::SrtpCrypto]) -> Option<OfferedCrypto> {
    lines.iter().find_map(|c| {
        let suite = CryptoSuite::from_name(c.suite.as_str())?;
        if !c.params.is_empty() {
            return None;
        }
        let [key] = c.keys.as_slice() else {
            return None;
        };
        if key.mki.is_some() || key.lifetime.is_some_and(|l| l < (1 << 31)) {
            return None;
        }
        let bytes = Zeroizing::new(decode(&key.key_and_salt)?);
        (bytes.len() == suite.material_len()).then(|| OfferedCrypto {
            tag: c.tag,
            suite,
            key: KeyMaterial::new(bytes.to_vec()),
        })
    })
}

/// Reads the key from our own answer's line with `tag` (in the peer's answer
/// to our offer).
pub(crate) fn answered(
    lines: &[ezk_sdp_types::SrtpCrypto],
    offered: CryptoSuite,
) -> Option<OfferedCrypto> {
    choose(lines).filter(|c| c.suite == offered)
}

fn decode(text: &str) -> Option<Vec<u8>> {
    STANDARD
        .decode(text)
        .or_else(|_| STANDARD_NO_PAD.decode(text))
        .ok()
}

/// `a=crypto:TAG SUITE inline:KEY` for our side, without the line ending.
/// The line carries a key: it goes only into SDP sent over TLS.
pub(crate) fn crypto_attribute(tag: u32, suite: CryptoSuite, local: &KeyMaterial) -> String {
    let (k, s) = local.split(suite);
    let mut material = Zeroizing::new(Vec::with_capacity(k.len() + s.len()));
    material.extend_from_slice(k);
    material.extend_from_slice(s);
    format!(
        "a=crypto:{tag} {} inline:{}",
        suite.as_str(),
        STANDARD.encode(material.as_slice())
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_material_never_prints() {
        let k = KeyMaterial::new(vec![0x41; 30]);
        assert_eq!(format!("{k:?}"), "KeyMaterial(30 bytes)");
    }

    #[test]
    fn split_gives_key_then_salt() {
        let k = KeyMaterial::new((0u8..46).collect());
        let (key, salt) = k.split(CryptoSuite::AeadAes128Gcm);
        assert_eq!(key, &(0u8..16).collect::<Vec<_>>()[..]);
        assert_eq!(salt, &(16u8..28).collect::<Vec<_>>()[..]);
    }

    #[test]
    fn our_attribute_round_trips_through_the_parser() {
        let k = KeyMaterial::new((0u8..46).collect());
        let line = crypto_attribute(3, CryptoSuite::AesCm128HmacSha1_32, &k);
        let text = line.strip_prefix("a=crypto:").unwrap();
        let src = bytes::Bytes::from(text.to_owned());
        let within = std::str::from_utf8(&src).unwrap();
        let (_, parsed) = ezk_sdp_types::SrtpCrypto::parse(&src, within).unwrap();
        let chosen = choose(&[parsed]).unwrap();
        assert_eq!(
            (chosen.tag, chosen.suite),
            (3, CryptoSuite::AesCm128HmacSha1_32)
        );
        assert_eq!(chosen.key.split(chosen.suite), k.split(chosen.suite));
    }
}
