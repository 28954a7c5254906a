//! How a caller's number is kept in the `calls` table, per tenant policy.
//!
//! Owns the mapping from a dialled number to its stored form; must not touch the
//! database. A keyed hash (HMAC-SHA256) instead of a plain hash, because phone
//! numbers are a small space: an unkeyed hash is reversed by enumeration. The
//! same key maps the same number to the same value, so lookup and erasure by
//! number still work.

use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;

use super::DbError;

/// Prefix of a hashed caller id in the `caller` column.
const HASH_PREFIX: &str = "hmac-sha256:";

/// How a tenant wants caller numbers stored.
#[derive(Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum CallerIdPolicy {
    /// The number as received.
    Plain,
    /// `hmac-sha256:<hex>` of the number under the tenant's key.
    Hashed {
        /// The HMAC key (a secret from the configuration).
        key: Vec<u8>,
    },
}

impl CallerIdPolicy {
    /// The policy a tenant's configuration asks for. A hashing key is derived
    /// from the master key and the tenant id (HMAC-SHA256), so the daemon and
    /// the CLI compute the same hashes without storing another secret, and a
    /// tenant's hashes are unlinkable to another tenant's.
    pub fn for_tenant(hash_numbers: bool, master_key: &[u8], tenant: &str) -> CallerIdPolicy {
        if !hash_numbers {
            return CallerIdPolicy::Plain;
        }
        // HMAC takes keys of any length; an error here cannot happen, and an
        // empty key is refused later by `stored_form` rather than used.
        let key = <Hmac<Sha256> as KeyInit>::new_from_slice(master_key)
            .map(|mut mac| {
                mac.update(b"sipbridge caller-id v1\0");
                mac.update(tenant.as_bytes());
                mac.finalize().into_bytes().to_vec()
            })
            .unwrap_or_default();
        CallerIdPolicy::Hashed { key }
    }
}

impl std::fmt::Debug for CallerIdPolicy {
    // The key is a secret: never print it.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Plain => f.write_str("Plain"),
            Self::Hashed { .. } => f.write_str("Hashed { key: <redacted> }"),
        }
    }
}

impl CallerIdPolicy {
    /// The value stored for `number` under this policy.
    pub fn stored_form(&self, number: &str) -> Result<String, DbError> {
        match self {
            Self::Plain => Ok(number.to_owned()),
            Self::Hashed { key } => {
                if key.is_empty() {
                    return Err(DbError::EmptyCallerKey);
                }
                let mut mac = <Hmac<Sha256> as KeyInit>::new_from_slice(key)
                    .map_err(|_| DbError::EmptyCallerKey)?;
                mac.update(number.as_bytes());
                let digest = mac.finalize().into_bytes();
                Ok(format!("{HASH_PREFIX}{}", hex::encode(digest)))
            }
        }
    }

    /// Every stored form under which `number` may have been written for this
    /// tenant: the current form, and under a hashing policy also the plain
    /// number (rows written before the tenant switched to hashing).
    pub(crate) fn lookup_forms(&self, number: &str) -> Result<Vec<String>, DbError> {
        let mut forms = vec![self.stored_form(number)?];
        if matches!(self, Self::Hashed { .. }) {
            forms.push(number.to_owned());
        }
        Ok(forms)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn plain_is_identity() {
        assert_eq!(
            CallerIdPolicy::Plain.stored_form("+4930123").unwrap(),
            "+4930123"
        );
    }

    #[test]
    fn hashed_is_rfc4231_hmac_sha256() {
        // RFC 4231 test case 2: key "Jefe", data "what do ya want for nothing?".
        let policy = CallerIdPolicy::Hashed {
            key: b"Jefe".to_vec(),
        };
        assert_eq!(
            policy.stored_form("what do ya want for nothing?").unwrap(),
            "hmac-sha256:5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }

    #[test]
    fn different_keys_give_different_forms() {
        let a = CallerIdPolicy::Hashed { key: b"a".to_vec() }
            .stored_form("+1")
            .unwrap();
        let b = CallerIdPolicy::Hashed { key: b"b".to_vec() }
            .stored_form("+1")
            .unwrap();
        assert_ne!(a, b);
    }

    #[test]
    fn empty_key_is_refused() {
        let policy = CallerIdPolicy::Hashed { key: Vec::new() };
        assert!(matches!(
            policy.stored_form("+1"),
            Err(DbError::EmptyCallerKey)
        ));
    }

    #[test]
    fn debug_hides_key() {
        let policy = CallerIdPolicy::Hashed {
            key: b"secret".to_vec(),
        };
        assert!(!format!("{policy:?}").contains("secret"));
    }
}
