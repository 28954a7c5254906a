//! Who is calling the admin API: bearer tokens checked against SHA-256
//! hashes, in constant time.
//!
//! Owns the token table (the admin token, hashed in memory when the
//! configuration is applied, and each tenant's `admin_token_sha256`, which
//! is only ever a hash) and the [`Principal`] a request acts as. Must not
//! log or return a token: only the principal is visible to the handlers.
//!
//! A tenant principal sees its own tenant only; the handlers ask
//! [`Principal::scope`] and answer 404 for anything else, so another tenant's
//! objects are indistinguishable from absent ones.

use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// Longest `Authorization` value looked at; longer ones are refused unread.
const MAX_AUTHORIZATION: usize = 1024;

/// Why a request is not authenticated (the answer is 401 either way).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub(crate) enum AuthError {
    /// No `Authorization` header.
    #[error("no bearer token")]
    Missing,
    /// Not `Bearer <token>`, or too long, or not visible ASCII.
    #[error("malformed Authorization header")]
    Malformed,
    /// A token that matches no configured hash.
    #[error("unknown token")]
    Unknown,
}

/// Whom a request acts for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Principal {
    /// The admin token: every tenant, and daemon-wide operations.
    Admin,
    /// A tenant's token: that tenant's objects only.
    Tenant(String),
}

impl Principal {
    /// The actor written into audit rows.
    pub(crate) fn actor(&self) -> String {
        match self {
            Principal::Admin => "admin-api:admin".to_owned(),
            Principal::Tenant(t) => format!("admin-api:tenant:{t}"),
        }
    }

    /// Whether objects of `tenant` are visible.
    pub(crate) fn sees(&self, tenant: &str) -> bool {
        match self {
            Principal::Admin => true,
            Principal::Tenant(t) => t == tenant,
        }
    }

    /// The tenant filter of a query that asked for `requested`: the admin
    /// gets what it asked for (`None`: every tenant); a tenant always gets
    /// its own, and asking for another gives `None` (the caller answers 404).
    pub(crate) fn scope(&self, requested: Option<&str>) -> Option<Option<String>> {
        match (self, requested) {
            (Principal::Admin, r) => Some(r.map(str::to_owned)),
            (Principal::Tenant(t), Some(r)) if r != t => None,
            (Principal::Tenant(t), _) => Some(Some(t.clone())),
        }
    }
}

/// SHA-256 of a token, the form tokens are compared (and configured) in.
pub(crate) fn token_hash(token: &[u8]) -> [u8; 32] {
    Sha256::digest(token).into()
}

/// The accepted tokens, as hashes.
#[derive(Clone, Default)]
pub(crate) struct Tokens {
    admin: Option<[u8; 32]>,
    tenants: Vec<(String, [u8; 32])>,
}

impl std::fmt::Debug for Tokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Hashes of random tokens are not secrets, but there is no reason to print them.
        f.debug_struct("Tokens")
            .field("admin", &self.admin.is_some())
            .field("tenants", &self.tenants.len())
            .finish()
    }
}

impl Tokens {
    /// The admin token (raw, hashed here) and each tenant's token hash.
    pub(crate) fn new(admin: Option<&[u8]>, tenants: Vec<(String, [u8; 32])>) -> Tokens {
        Tokens {
            admin: admin.map(token_hash),
            tenants,
        }
    }

    /// The principal of an `Authorization` header value. Every configured
    /// hash is compared, in constant time, whatever matches first.
    pub(crate) fn check(&self, authorization: Option<&[u8]>) -> Result<Principal, AuthError> {
        let value = authorization.ok_or(AuthError::Missing)?;
        if value.len() > MAX_AUTHORIZATION {
            return Err(AuthError::Malformed);
        }
        let (scheme, token) = match value.iter().position(|&b| b == b' ') {
            Some(i) => (&value[..i], value[i + 1..].trim_ascii()),
            None => return Err(AuthError::Malformed),
        };
        if !scheme.eq_ignore_ascii_case(b"bearer")
            || token.is_empty()
            || !token.iter().all(u8::is_ascii_graphic)
        {
            return Err(AuthError::Malformed);
        }
        let presented = token_hash(token);
        let mut found = None;
        if let Some(admin) = &self.admin
            && bool::from(admin.ct_eq(&presented))
        {
            found = Some(Principal::Admin);
        }
        for (tenant, hash) in &self.tenants {
            if bool::from(hash.ct_eq(&presented)) && found.is_none() {
                found = Some(Principal::Tenant(tenant.clone()));
            }
        }
        found.ok_or(AuthError::Unknown)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tokens() -> Tokens {
        Tokens::new(
            Some(b"admin-secret"),
            vec![
                ("acme".to_owned(), token_hash(b"acme-token")),
                ("globex".to_owned(), token_hash(b"globex-token")),
            ],
        )
    }

    #[test]
    fn tokens_map_to_their_principal() {
        let t = tokens();
        assert_eq!(t.check(Some(b"Bearer admin-secret")), Ok(Principal::Admin));
        assert_eq!(
            t.check(Some(b"bearer acme-token")),
            Ok(Principal::Tenant("acme".into()))
        );
        assert_eq!(
            t.check(Some(b"Bearer globex-token ")),
            Ok(Principal::Tenant("globex".into()))
        );
    }

    #[test]
    fn bad_tokens_are_refused() {
        let t = tokens();
        assert_eq!(t.check(None), Err(AuthError::Missing));
        assert_eq!(t.check(Some(b"admin-secret")), Err(AuthError::Malformed));
        assert_eq!(
            t.check(Some(b"Basic admin-secret")),
            Err(AuthError::Malformed)
        );
        assert_eq!(t.check(Some(b"Bearer ")), Err(AuthError::Malformed));
        assert_eq!(t.check(Some(b"Bearer a\x01b")), Err(AuthError::Malformed));
        assert_eq!(
            t.check(Some(b"Bearer admin-secreT")),
            Err(AuthError::Unknown)
        );
        assert_eq!(
            t.check(Some(b"Bearer acme-token2")),
            Err(AuthError::Unknown)
        );
        let long = [b"Bearer ".as_slice(), &[b'a'; 2000]].concat();
        assert_eq!(t.check(Some(&long)), Err(AuthError::Malformed));
        // No admin token configured: the admin secret means nothing.
        let tenants_only = Tokens::new(None, vec![("acme".into(), token_hash(b"acme-token"))]);
        assert_eq!(
            tenants_only.check(Some(b"Bearer admin-secret")),
            Err(AuthError::Unknown)
        );
    }

    #[test]
    fn a_tenant_is_scoped_to_itself() {
        let acme = Principal::Tenant("acme".into());
        assert_eq!(acme.scope(None), Some(Some("acme".into())));
        assert_eq!(acme.scope(Some("acme")), Some(Some("acme".into())));
        assert_eq!(acme.scope(Some("globex")), None);
        assert!(acme.sees("acme") && !acme.sees("globex"));
        assert_eq!(Principal::Admin.scope(None), Some(None));
        assert_eq!(
            Principal::Admin.scope(Some("globex")),
            Some(Some("globex".into()))
        );
        assert_eq!(acme.actor(), "admin-api:tenant:acme");
    }

    #[test]
    fn debug_shows_no_hashes() {
        let text = format!("{:?}", tokens());
        assert_eq!(text, "Tokens { admin: true, tenants: 2 }");
    }
}
