//! HTTP Digest authentication for SIP, server side (RFC 3261 §22, RFC 2617,
//! RFC 7616 / RFC 8760 for SHA-256): we challenge trunks that have
//! credentials and check their `Authorization` / `Proxy-Authorization`.
//!
//! Owns: the challenge values (`WWW-Authenticate` / `Proxy-Authenticate`),
//! parsing the `Digest` credentials, stateless nonces, nonce-count replay
//! protection and the response check. MD5 and SHA-256, `qop=auth` only.
//!
//! Must not touch: SIP messages (header values come in as `&str`), the
//! credential store (the caller looks the password up by
//! [`DigestCredentials::username`]), clocks (`now_unix_secs` is passed in) or
//! a global RNG (challenges take an injected `RngCore`).
//!
//! Nonces are stateless: `base64url(timestamp_be64 ‖ random64 ‖
//! HMAC-SHA256(server_key, timestamp ‖ random))`, so authenticity and age are
//! checked without storage. Only the highest nonce-count seen per nonce is
//! kept, in a bounded table that forgets the oldest nonces first; a nonce
//! that may have been forgotten is answered as stale, never accepted blindly.
//!
//! The `Digest` auth-param parser is written by hand: it is ~80 lines, no
//! maintained crate parses the SIP flavour (RFC 3261 §25.1 `LWS`, quoted
//! pairs) on `&str` without pulling in an HTTP stack, and it must stay
//! bounded on hostile input.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hmac::{Hmac, KeyInit, Mac};
use md5::Md5;
use sha2::{Digest as _, Sha256};
use subtle::ConstantTimeEq;

use super::error::SipError;

/// Longest credentials header value we parse.
pub const MAX_AUTHORIZATION_LEN: usize = 4096;

/// Most auth-params accepted in one credentials value.
pub const MAX_PARAMS: usize = 32;

/// Default number of nonces whose nonce-count we remember.
pub const DEFAULT_NONCE_TABLE_LEN: usize = 4096;

const NONCE_STAMP_LEN: usize = 16;
const NONCE_RAW_LEN: usize = NONCE_STAMP_LEN + 32;

/// Digest hash algorithms we accept.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Algorithm {
    /// RFC 2617 MD5 (what most SIP equipment still uses).
    Md5,
    /// RFC 7616 / RFC 8760 SHA-256.
    Sha256,
}

impl Algorithm {
    /// The `algorithm=` token.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Md5 => "MD5",
            Self::Sha256 => "SHA-256",
        }
    }

    fn from_token(token: &str) -> Option<Self> {
        if token.eq_ignore_ascii_case("MD5") {
            Some(Self::Md5)
        } else if token.eq_ignore_ascii_case("SHA-256") {
            Some(Self::Sha256)
        } else {
            None
        }
    }

    /// Lower-case hex of the hash of `parts` joined by `:`.
    fn hex(self, parts: &[&[u8]]) -> String {
        fn run<D: sha2::Digest>(mut d: D, parts: &[&[u8]]) -> String {
            for (i, p) in parts.iter().enumerate() {
                if i > 0 {
                    d.update(b":");
                }
                d.update(p);
            }
            hex::encode(d.finalize())
        }
        match self {
            Self::Md5 => run(Md5::new(), parts),
            Self::Sha256 => run(Sha256::new(), parts),
        }
    }
}

/// The inputs of a `qop=auth` digest response (RFC 7616 §3.4.1).
#[derive(Debug, Clone, Copy)]
pub struct ResponseParams<'a> {
    /// `username`, unquoted.
    pub username: &'a str,
    /// `realm`, unquoted.
    pub realm: &'a str,
    /// The shared secret.
    pub password: &'a [u8],
    /// The SIP method of the request (`INVITE`, `BYE` …).
    pub method: &'a str,
    /// `uri` as the client sent it (the Request-URI).
    pub uri: &'a str,
    /// `nonce`, unquoted.
    pub nonce: &'a str,
    /// `nc`, eight hex digits.
    pub nc: &'a str,
    /// `cnonce`, unquoted.
    pub cnonce: &'a str,
    /// `qop`, here always `auth`.
    pub qop: &'a str,
}

/// `response = H(H(user:realm:password):nonce:nc:cnonce:qop:H(method:uri))`,
/// lower-case hex.
pub fn compute_response(algorithm: Algorithm, p: &ResponseParams<'_>) -> String {
    let ha1 = algorithm.hex(&[p.username.as_bytes(), p.realm.as_bytes(), p.password]);
    let ha2 = algorithm.hex(&[p.method.as_bytes(), p.uri.as_bytes()]);
    algorithm.hex(&[
        ha1.as_bytes(),
        p.nonce.as_bytes(),
        p.nc.as_bytes(),
        p.cnonce.as_bytes(),
        p.qop.as_bytes(),
        ha2.as_bytes(),
    ])
}

/// Why credentials were refused. [`DigestError::status`] gives the answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DigestError {
    /// No `Digest` credentials (empty value or another scheme).
    #[error("no Digest credentials")]
    Missing,
    /// The credentials do not parse, or a required parameter is missing.
    #[error("malformed Digest credentials")]
    Malformed,
    /// The username is not the one the caller has a password for.
    #[error("unknown user")]
    UnknownUser,
    /// The realm is not ours.
    #[error("wrong realm")]
    WrongRealm,
    /// `uri` differs from the Request-URI.
    #[error("digest uri does not match the Request-URI")]
    WrongUri,
    /// A nonce of ours, answered correctly, but too old (re-challenge with `stale=true`).
    #[error("stale nonce")]
    StaleNonce,
    /// Not a nonce we issued.
    #[error("nonce not issued by us")]
    BadNonce,
    /// The response hash is wrong (wrong password, or tampered parameters).
    #[error("wrong digest response")]
    WrongResponse,
    /// The nonce-count did not increase: a replay.
    #[error("nonce count replayed")]
    ReplayedNonceCount,
    /// An algorithm we do not accept (e.g. `MD5-sess`, `SHA-512-256`).
    #[error("unsupported algorithm")]
    UnsupportedAlgorithm,
    /// No `qop`, or a `qop` other than `auth`.
    #[error("unsupported qop")]
    UnsupportedQop,
}

impl From<&DigestError> for SipError {
    /// Unparsable credentials are a malformed request; any other refusal asks
    /// for credentials again.
    fn from(e: &DigestError) -> SipError {
        match e {
            DigestError::Malformed => SipError::Malformed(e.to_string()),
            _ => SipError::Unauthorized,
        }
    }
}

impl DigestError {
    /// 400 for unparsable credentials; otherwise 401, meaning "challenge
    /// again" (407 when the caller challenges with `Proxy-Authenticate`).
    pub fn status(&self) -> u16 {
        SipError::from(self).code()
    }

    /// Whether the new challenge carries `stale=true`.
    pub fn is_stale(&self) -> bool {
        matches!(self, Self::StaleNonce)
    }

    /// Whether this refusal counts as a password guess for throttling: the
    /// credentials were there and wrong (not missing, stale or unsupported).
    pub fn is_guess(&self) -> bool {
        matches!(
            self,
            Self::UnknownUser
                | Self::WrongRealm
                | Self::WrongUri
                | Self::BadNonce
                | Self::WrongResponse
                | Self::ReplayedNonceCount
        )
    }
}

/// Parsed `Digest` credentials (RFC 3261 §25.1 `credentials`).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct DigestCredentials {
    /// `username`.
    pub username: String,
    /// `realm`.
    pub realm: String,
    /// `nonce`.
    pub nonce: String,
    /// `uri`.
    pub uri: String,
    /// `response` (hex).
    pub response: String,
    /// `algorithm`, absent meaning MD5.
    pub algorithm: Option<String>,
    /// `cnonce`.
    pub cnonce: Option<String>,
    /// `nc`.
    pub nc: Option<String>,
    /// `qop`.
    pub qop: Option<String>,
    /// `opaque` (we send none; kept for logs).
    pub opaque: Option<String>,
}

impl DigestCredentials {
    /// Parses an `Authorization` / `Proxy-Authorization` value. Unknown
    /// parameters are ignored; a known one given twice is malformed.
    pub fn parse(value: &str) -> Result<Self, DigestError> {
        if value.len() > MAX_AUTHORIZATION_LEN {
            return Err(DigestError::Malformed);
        }
        let value = value.trim_start_matches(is_lws);
        if value.is_empty() {
            return Err(DigestError::Missing);
        }
        let scheme_end = value.find(is_lws).unwrap_or(value.len());
        let (scheme, rest) = value.split_at(scheme_end);
        if !scheme.eq_ignore_ascii_case("Digest") {
            return Err(DigestError::Missing);
        }

        let mut c = Self::default();
        let (mut username, mut realm, mut nonce, mut uri, mut response) =
            (None, None, None, None, None);
        for (name, v) in AuthParams::new(rest) {
            let v = v?;
            let slot = match name.to_ascii_lowercase().as_str() {
                "username" => &mut username,
                "realm" => &mut realm,
                "nonce" => &mut nonce,
                "uri" => &mut uri,
                "response" => &mut response,
                "algorithm" => &mut c.algorithm,
                "cnonce" => &mut c.cnonce,
                "nc" => &mut c.nc,
                "qop" => &mut c.qop,
                "opaque" => &mut c.opaque,
                _ => continue,
            };
            if slot.replace(v).is_some() {
                return Err(DigestError::Malformed);
            }
        }
        match (username, realm, nonce, uri, response) {
            (Some(u), Some(r), Some(n), Some(uri), Some(resp)) => {
                c.username = u;
                c.realm = r;
                c.nonce = n;
                c.uri = uri;
                c.response = resp;
                Ok(c)
            }
            _ => Err(DigestError::Malformed),
        }
    }
}

fn is_lws(c: char) -> bool {
    matches!(c, ' ' | '\t' | '\r' | '\n')
}

/// Iterator over `name = (token | quoted-string)` pairs separated by commas,
/// with whitespace allowed anywhere between the pieces. Yields at most
/// [`MAX_PARAMS`] items, then an error if more follow; stops after the first error.
struct AuthParams<'a> {
    rest: &'a str,
    count: usize,
    failed: bool,
}

impl<'a> AuthParams<'a> {
    fn new(s: &'a str) -> Self {
        Self {
            rest: s,
            count: 0,
            failed: false,
        }
    }

    fn next_param(&mut self) -> Option<Result<(&'a str, String), DigestError>> {
        let s = self.rest.trim_start_matches(|c| is_lws(c) || c == ',');
        if s.is_empty() {
            return None;
        }
        if self.count == MAX_PARAMS {
            return Some(Err(DigestError::Malformed));
        }
        self.count += 1;
        let name_len = s.find(|c: char| !is_token_char(c)).unwrap_or(s.len());
        if name_len == 0 {
            return Some(Err(DigestError::Malformed));
        }
        let (name, s) = s.split_at(name_len);
        let Some(s) = s.trim_start_matches(is_lws).strip_prefix('=') else {
            return Some(Err(DigestError::Malformed));
        };
        let s = s.trim_start_matches(is_lws);
        let (value, s) = if let Some(quoted) = s.strip_prefix('"') {
            match unquote(quoted) {
                Some(pair) => pair,
                None => return Some(Err(DigestError::Malformed)),
            }
        } else {
            let end = s
                .find(|c: char| is_lws(c) || c == ',' || c == '"')
                .unwrap_or(s.len());
            if end == 0 {
                return Some(Err(DigestError::Malformed));
            }
            (s[..end].to_owned(), &s[end..])
        };
        let s = s.trim_start_matches(is_lws);
        if !(s.is_empty() || s.starts_with(',')) {
            return Some(Err(DigestError::Malformed));
        }
        self.rest = s;
        Some(Ok((name, value)))
    }
}

impl<'a> Iterator for AuthParams<'a> {
    type Item = (&'a str, Result<String, DigestError>);

    fn next(&mut self) -> Option<Self::Item> {
        if self.failed {
            return None;
        }
        match self.next_param()? {
            Ok((name, value)) => Some((name, Ok(value))),
            Err(e) => {
                self.failed = true;
                Some(("", Err(e)))
            }
        }
    }
}

/// RFC 3261 §25.1 token characters.
fn is_token_char(c: char) -> bool {
    c.is_ascii_alphanumeric()
        || matches!(
            c,
            '-' | '.' | '!' | '%' | '*' | '_' | '+' | '`' | '\'' | '~'
        )
}

/// Reads a quoted-string body up to its closing quote (the opening one is
/// already consumed), resolving `\x` quoted pairs. Returns the value and the
/// rest after the closing quote.
fn unquote(s: &str) -> Option<(String, &str)> {
    let mut out = String::new();
    let mut chars = s.char_indices();
    while let Some((i, c)) = chars.next() {
        match c {
            '"' => return Some((out, s.get(i + 1..)?)),
            '\\' => match chars.next() {
                Some((_, '\r' | '\n')) | None => return None,
                Some((_, escaped)) => out.push(escaped),
            },
            _ => out.push(c),
        }
    }
    None
}

/// Writes `s` as a quoted-string body, escaping `"` and `\`; drops CR/LF.
fn quote(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' | '\\' => {
                out.push('\\');
                out.push(c);
            }
            '\r' | '\n' => {}
            _ => out.push(c),
        }
    }
    out.push('"');
    out
}

/// A `WWW-Authenticate` / `Proxy-Authenticate` challenge, client side: a
/// trunk challenged one of our requests (our outbound INVITE).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DigestChallenge {
    /// `realm`.
    pub realm: String,
    /// `nonce`.
    pub nonce: String,
    /// `algorithm` (absent: MD5).
    pub algorithm: Algorithm,
    /// The server offered `qop=auth` (else the RFC 2069 form is answered).
    pub qop_auth: bool,
    /// `opaque`, returned unchanged.
    pub opaque: Option<String>,
    /// `stale=true`: the previous answer was right but its nonce too old.
    pub stale: bool,
}

impl DigestChallenge {
    /// Parses a challenge value. Only `Digest` with MD5 or SHA-256 and, when
    /// a `qop` is given, one that includes `auth`.
    pub fn parse(value: &str) -> Result<Self, DigestError> {
        if value.len() > MAX_AUTHORIZATION_LEN {
            return Err(DigestError::Malformed);
        }
        let value = value.trim_start_matches(is_lws);
        let scheme_end = value.find(is_lws).unwrap_or(value.len());
        let (scheme, rest) = value.split_at(scheme_end);
        if !scheme.eq_ignore_ascii_case("Digest") {
            return Err(DigestError::Missing);
        }
        let (mut realm, mut nonce, mut algorithm, mut qop, mut opaque, mut stale) =
            (None, None, None, None, None, None);
        for (name, v) in AuthParams::new(rest) {
            let v = v?;
            let slot = match name.to_ascii_lowercase().as_str() {
                "realm" => &mut realm,
                "nonce" => &mut nonce,
                "algorithm" => &mut algorithm,
                "qop" => &mut qop,
                "opaque" => &mut opaque,
                "stale" => &mut stale,
                _ => continue,
            };
            if slot.replace(v).is_some() {
                return Err(DigestError::Malformed);
            }
        }
        let (Some(realm), Some(nonce)) = (realm, nonce) else {
            return Err(DigestError::Malformed);
        };
        let algorithm = match algorithm {
            None => Algorithm::Md5,
            Some(a) => Algorithm::from_token(&a).ok_or(DigestError::UnsupportedAlgorithm)?,
        };
        let qop_auth = match qop {
            None => false,
            Some(q) if q.split(',').any(|t| t.trim().eq_ignore_ascii_case("auth")) => true,
            Some(_) => return Err(DigestError::UnsupportedQop),
        };
        Ok(Self {
            realm,
            nonce,
            algorithm,
            qop_auth,
            opaque,
            stale: stale.is_some_and(|s| s.eq_ignore_ascii_case("true")),
        })
    }

    /// The `Authorization` / `Proxy-Authorization` value answering this
    /// challenge for `method` on `uri` (the Request-URI as sent), with
    /// nonce-count `nc` and our `cnonce` (from the caller's RNG).
    pub fn answer(
        &self,
        username: &str,
        password: &[u8],
        method: &str,
        uri: &str,
        cnonce: &str,
        nc: u32,
    ) -> String {
        let nc = format!("{nc:08x}");
        let response = if self.qop_auth {
            compute_response(
                self.algorithm,
                &ResponseParams {
                    username,
                    realm: &self.realm,
                    password,
                    method,
                    uri,
                    nonce: &self.nonce,
                    nc: &nc,
                    cnonce,
                    qop: "auth",
                },
            )
        } else {
            // RFC 2069 form (RFC 2617 §3.2.2.1 without qop).
            let ha1 = self
                .algorithm
                .hex(&[username.as_bytes(), self.realm.as_bytes(), password]);
            let ha2 = self.algorithm.hex(&[method.as_bytes(), uri.as_bytes()]);
            self.algorithm
                .hex(&[ha1.as_bytes(), self.nonce.as_bytes(), ha2.as_bytes()])
        };
        let mut out = format!(
            "Digest username={}, realm={}, nonce={}, uri={}, response={}, algorithm={}",
            quote(username),
            quote(&self.realm),
            quote(&self.nonce),
            quote(uri),
            quote(&response),
            self.algorithm.as_str(),
        );
        if self.qop_auth {
            out.push_str(&format!(", qop=auth, nc={nc}, cnonce={}", quote(cnonce)));
        }
        if let Some(opaque) = &self.opaque {
            out.push_str(&format!(", opaque={}", quote(opaque)));
        }
        out
    }
}

/// Our nonce's identity: issue time and its random part.
type NonceStamp = (u64, [u8; 8]);

/// The server side of Digest: issues challenges and verifies answers.
#[derive(Clone)]
pub struct DigestServer {
    realm: String,
    /// HMAC-SHA256 keyed with the server key, cloned per use.
    mac: Hmac<Sha256>,
    nonce_lifetime: Duration,
    algorithms: Vec<Algorithm>,
    /// Highest nonce-count accepted per nonce, oldest nonce first.
    nonce_counts: BTreeMap<NonceStamp, u32>,
    nonce_table_len: usize,
    /// Issue time of the newest nonce dropped from `nonce_counts`.
    forgotten_up_to: Option<u64>,
}

impl fmt::Debug for DigestServer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DigestServer")
            .field("realm", &self.realm)
            .field("nonce_lifetime", &self.nonce_lifetime)
            .field("algorithms", &self.algorithms)
            .field("tracked_nonces", &self.nonce_counts.len())
            .finish_non_exhaustive()
    }
}

impl DigestServer {
    /// A server for `realm` with SHA-256 and MD5 enabled. `server_key` comes
    /// from the caller's RNG at start-up; nonces from another key are refused.
    pub fn new(realm: &str, server_key: [u8; 32], nonce_lifetime: Duration) -> Self {
        // HMAC pads a short key with zeros to the block size (RFC 2104 §2), so
        // this is HMAC with the 32-byte key, built without a fallible call.
        let mut block = [0u8; 64];
        block[..32].copy_from_slice(&server_key);
        let mac = Hmac::<Sha256>::new(&block.into());
        Self {
            realm: realm.to_owned(),
            mac,
            nonce_lifetime,
            algorithms: vec![Algorithm::Sha256, Algorithm::Md5],
            nonce_counts: BTreeMap::new(),
            nonce_table_len: DEFAULT_NONCE_TABLE_LEN,
            forgotten_up_to: None,
        }
    }

    /// Restricts (and orders) the algorithms offered and accepted; an empty
    /// list keeps the current one.
    pub fn with_algorithms(mut self, algorithms: &[Algorithm]) -> Self {
        let mut list: Vec<Algorithm> = Vec::new();
        for &a in algorithms {
            if !list.contains(&a) {
                list.push(a);
            }
        }
        if !list.is_empty() {
            self.algorithms = list;
        }
        self
    }

    /// How many nonces' counts are remembered (at least 1).
    pub fn with_nonce_table_len(mut self, len: usize) -> Self {
        self.nonce_table_len = len.max(1);
        self
    }

    /// The realm we challenge with.
    pub fn realm(&self) -> &str {
        &self.realm
    }

    /// `WWW-Authenticate` (or `Proxy-Authenticate`) values, one per enabled
    /// algorithm, SHA-256 first (RFC 8760 §2.4: the client takes the first it
    /// supports), all with one fresh nonce.
    pub fn challenge(
        &self,
        now_unix_secs: u64,
        rng: &mut impl rand::RngCore,
        stale: bool,
    ) -> Vec<String> {
        let nonce = self.mint_nonce(now_unix_secs, rng);
        let realm = quote(&self.realm);
        self.algorithms
            .iter()
            .map(|a| {
                let mut v = format!(
                    "Digest realm={realm}, nonce=\"{nonce}\", algorithm={}, qop=\"auth\"",
                    a.as_str()
                );
                if stale {
                    v.push_str(", stale=true");
                }
                v
            })
            .collect()
    }

    /// Checks `authorization` for a request with `method` and `request_uri`
    /// against the caller's `username`/`password`. On success the nonce-count
    /// is recorded, so the same header never passes twice.
    pub fn verify(
        &mut self,
        authorization: &str,
        method: &str,
        request_uri: &str,
        username: &str,
        password: &[u8],
        now_unix_secs: u64,
    ) -> Result<(), DigestError> {
        let creds = DigestCredentials::parse(authorization)?;
        self.verify_credentials(
            &creds,
            method,
            request_uri,
            username,
            password,
            now_unix_secs,
        )
    }

    /// [`verify`](Self::verify) for credentials already parsed (to look the
    /// password up by their username first).
    pub fn verify_credentials(
        &mut self,
        creds: &DigestCredentials,
        method: &str,
        request_uri: &str,
        username: &str,
        password: &[u8],
        now_unix_secs: u64,
    ) -> Result<(), DigestError> {
        let algorithm = match &creds.algorithm {
            None => Algorithm::Md5,
            Some(token) => Algorithm::from_token(token).ok_or(DigestError::UnsupportedAlgorithm)?,
        };
        if !self.algorithms.contains(&algorithm) {
            return Err(DigestError::UnsupportedAlgorithm);
        }
        match &creds.qop {
            Some(q) if q.eq_ignore_ascii_case("auth") => {}
            _ => return Err(DigestError::UnsupportedQop),
        }
        let (Some(cnonce), Some(nc_text)) = (&creds.cnonce, &creds.nc) else {
            return Err(DigestError::Malformed);
        };
        let nc = parse_nc(nc_text)?;
        if creds.realm != self.realm {
            return Err(DigestError::WrongRealm);
        }
        if creds.username != username {
            return Err(DigestError::UnknownUser);
        }
        if creds.uri != request_uri {
            return Err(DigestError::WrongUri);
        }
        let stamp = self.check_nonce(&creds.nonce)?;

        let expected = compute_response(
            algorithm,
            &ResponseParams {
                username,
                realm: &self.realm,
                password,
                method,
                uri: &creds.uri,
                nonce: &creds.nonce,
                nc: nc_text,
                cnonce,
                qop: "auth",
            },
        );
        let given = creds.response.to_ascii_lowercase();
        if !bool::from(expected.as_bytes().ct_eq(given.as_bytes())) {
            // A wrong answer burns the nonce: every further guess needs a new
            // challenge (and so passes the caller's throttle again).
            let _ = self.record_nonce_count(stamp, u32::MAX, now_unix_secs);
            return Err(DigestError::WrongResponse);
        }

        let lifetime = self.nonce_lifetime.as_secs();
        let issued = stamp.0;
        let expired = issued.saturating_add(lifetime) < now_unix_secs;
        let from_future = issued > now_unix_secs.saturating_add(lifetime);
        if expired || from_future {
            return Err(DigestError::StaleNonce);
        }
        self.record_nonce_count(stamp, nc, now_unix_secs)
    }

    fn mint_nonce(&self, now_unix_secs: u64, rng: &mut impl rand::RngCore) -> String {
        let mut raw = [0u8; NONCE_RAW_LEN];
        raw[..8].copy_from_slice(&now_unix_secs.to_be_bytes());
        rng.fill_bytes(&mut raw[8..NONCE_STAMP_LEN]);
        let tag = self
            .mac
            .clone()
            .chain_update(&raw[..NONCE_STAMP_LEN])
            .finalize()
            .into_bytes();
        raw[NONCE_STAMP_LEN..].copy_from_slice(&tag);
        URL_SAFE_NO_PAD.encode(raw)
    }

    /// Authenticates a nonce of ours (constant-time tag check) and returns its stamp.
    fn check_nonce(&self, nonce: &str) -> Result<NonceStamp, DigestError> {
        if nonce.len() != NONCE_RAW_LEN.div_ceil(3) * 4 {
            return Err(DigestError::BadNonce);
        }
        let raw = URL_SAFE_NO_PAD
            .decode(nonce)
            .map_err(|_| DigestError::BadNonce)?;
        let (stamp, tag) = raw
            .split_at_checked(NONCE_STAMP_LEN)
            .ok_or(DigestError::BadNonce)?;
        self.mac
            .clone()
            .chain_update(stamp)
            .verify_slice(tag)
            .map_err(|_| DigestError::BadNonce)?;
        let (time, random) = stamp.split_at(8);
        let time: [u8; 8] = time.try_into().map_err(|_| DigestError::BadNonce)?;
        let random: [u8; 8] = random.try_into().map_err(|_| DigestError::BadNonce)?;
        Ok((u64::from_be_bytes(time), random))
    }

    fn record_nonce_count(
        &mut self,
        stamp: NonceStamp,
        nc: u32,
        now_unix_secs: u64,
    ) -> Result<(), DigestError> {
        if let Some(last) = self.nonce_counts.get_mut(&stamp) {
            if nc <= *last {
                return Err(DigestError::ReplayedNonceCount);
            }
            *last = nc;
            return Ok(());
        }
        // Its count may have been dropped from the table: make the client
        // fetch a fresh nonce rather than risk accepting a replay.
        if self.forgotten_up_to.is_some_and(|t| stamp.0 <= t) {
            return Err(DigestError::StaleNonce);
        }
        self.nonce_counts.insert(stamp, nc);

        let lifetime = self.nonce_lifetime.as_secs();
        while let Some((&(issued, _), _)) = self.nonce_counts.first_key_value() {
            let expired = issued.saturating_add(lifetime) < now_unix_secs;
            if !expired && self.nonce_counts.len() <= self.nonce_table_len {
                break;
            }
            self.nonce_counts.pop_first();
            self.forgotten_up_to = Some(self.forgotten_up_to.map_or(issued, |t| t.max(issued)));
        }
        Ok(())
    }
}

/// `nc`: exactly eight hex digits, not zero.
fn parse_nc(text: &str) -> Result<u32, DigestError> {
    if text.len() != 8 || !text.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(DigestError::Malformed);
    }
    match u32::from_str_radix(text, 16) {
        Ok(0) | Err(_) => Err(DigestError::Malformed),
        Ok(n) => Ok(n),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;

    const KEY: [u8; 32] = [7; 32];
    const URI: &str = "sip:+15551230000@bridge.example.com";
    const NOW: u64 = 1_750_000_000;

    fn server() -> DigestServer {
        DigestServer::new("bridge.example.com", KEY, Duration::from_secs(300))
    }

    /// Pulls the nonce out of a challenge value.
    fn nonce_of(challenge: &str) -> String {
        let (_, rest) = challenge.split_once("nonce=\"").unwrap();
        rest.split('"').next().unwrap().to_owned()
    }

    fn authorization(alg: Algorithm, nonce: &str, nc: &str, password: &[u8], uri: &str) -> String {
        let response = compute_response(
            alg,
            &ResponseParams {
                username: "trunk1",
                realm: "bridge.example.com",
                password,
                method: "INVITE",
                uri,
                nonce,
                nc,
                cnonce: "0a4f113b",
                qop: "auth",
            },
        );
        format!(
            "Digest username=\"trunk1\", realm=\"bridge.example.com\", nonce=\"{nonce}\", \
             uri=\"{uri}\", response=\"{response}\", algorithm={}, cnonce=\"0a4f113b\", \
             qop=auth, nc={nc}",
            alg.as_str()
        )
    }

    fn fresh_nonce(s: &DigestServer, now: u64, seed: u64) -> String {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        nonce_of(&s.challenge(now, &mut rng, false)[0])
    }

    #[test]
    fn client_answer_passes_our_own_server_check() {
        for alg in [Algorithm::Md5, Algorithm::Sha256] {
            let mut s = server().with_algorithms(&[alg]);
            let mut rng = ChaCha8Rng::seed_from_u64(7);
            let challenge = s.challenge(NOW, &mut rng, false).remove(0);
            let parsed = DigestChallenge::parse(&challenge).unwrap();
            assert_eq!(parsed.algorithm, alg);
            assert!(parsed.qop_auth);
            let value = parsed.answer("trunk", b"s3cret", "INVITE", "sip:+1555@h", "abc", 1);
            let creds = DigestCredentials::parse(&value).unwrap();
            assert_eq!(creds.nc.as_deref(), Some("00000001"));
            assert_eq!(
                s.verify_credentials(&creds, "INVITE", "sip:+1555@h", "trunk", b"s3cret", NOW + 1),
                Ok(())
            );
            let wrong = parsed.answer("trunk", b"wrong", "INVITE", "sip:+1555@h", "abc", 2);
            let creds = DigestCredentials::parse(&wrong).unwrap();
            assert_eq!(
                s.verify_credentials(&creds, "INVITE", "sip:+1555@h", "trunk", b"s3cret", NOW + 1),
                Err(DigestError::WrongResponse)
            );
        }
    }

    #[test]
    fn client_challenge_parsing() {
        // RFC 2617 §3.5 example (no qop here: the RFC 2069 answer form).
        let c = DigestChallenge::parse(
            "Digest realm=\"testrealm@host.com\", nonce=\"dcd98b7102dd2f0e8b11d0f600bfb0c093\", opaque=\"5ccc069c403ebaf9f0171e9517f40e41\", stale=TRUE",
        )
        .unwrap();
        assert_eq!(c.realm, "testrealm@host.com");
        assert!(!c.qop_auth && c.stale);
        assert_eq!(c.algorithm, Algorithm::Md5);
        let v = c.answer(
            "Mufasa",
            b"Circle Of Life",
            "GET",
            "/dir/index.html",
            "x",
            1,
        );
        // RFC 2069 §2.4 response for these values (no qop).
        assert!(
            v.contains("response=\"670fd8c2df070c60b045671b8b24ff02\""),
            "{v}"
        );
        assert!(v.contains("opaque=\"5ccc069c403ebaf9f0171e9517f40e41\""));
        assert!(!v.contains("qop"));
        assert_eq!(
            DigestChallenge::parse("Digest realm=\"r\", nonce=\"n\", algorithm=MD5-sess"),
            Err(DigestError::UnsupportedAlgorithm)
        );
        assert_eq!(
            DigestChallenge::parse("Digest realm=\"r\", nonce=\"n\", qop=\"auth-int\""),
            Err(DigestError::UnsupportedQop)
        );
        assert_eq!(
            DigestChallenge::parse("Basic realm=\"r\""),
            Err(DigestError::Missing)
        );
        assert_eq!(
            DigestChallenge::parse("Digest realm=\"r\""),
            Err(DigestError::Malformed)
        );
    }

    #[test]
    fn rfc2617_md5_vector() {
        let r = compute_response(
            Algorithm::Md5,
            &ResponseParams {
                username: "Mufasa",
                realm: "testrealm@host.com",
                password: b"Circle Of Life",
                method: "GET",
                uri: "/dir/index.html",
                nonce: "dcd98b7102dd2f0e8b11d0f600bfb0c093",
                nc: "00000001",
                cnonce: "0a4f113b",
                qop: "auth",
            },
        );
        assert_eq!(r, "6629fae49393a05397450978507c4ef1");
    }

    #[test]
    fn rfc7616_vectors() {
        let p = ResponseParams {
            username: "Mufasa",
            realm: "http-auth@example.org",
            password: b"Circle of Life",
            method: "GET",
            uri: "/dir/index.html",
            nonce: "7ypf/xlj9XXwfDPEoM4URrv/xwf94BcCAzFZH4GiTo0v",
            nc: "00000001",
            cnonce: "f2/wE4q74E6zIJEtWaHKaf5wv/H5QzzpXusqGemxURZJ",
            qop: "auth",
        };
        assert_eq!(
            compute_response(Algorithm::Sha256, &p),
            "753927fa0e85d155564e2e272a28d1802ca10daf4496794697cf8db5856cb6c1"
        );
        assert_eq!(
            compute_response(Algorithm::Md5, &p),
            "8ca523f5e9506fed4657c9700eebdbec"
        );
    }

    #[test]
    fn parses_rfc2617_authorization_header() {
        let c = DigestCredentials::parse(
            "Digest username=\"Mufasa\",\r\n                 realm=\"testrealm@host.com\",\r\n                 nonce=\"dcd98b7102dd2f0e8b11d0f600bfb0c093\",\r\n                 uri=\"/dir/index.html\",\r\n                 qop=auth,\r\n                 nc=00000001,\r\n                 cnonce=\"0a4f113b\",\r\n                 response=\"6629fae49393a05397450978507c4ef1\",\r\n                 opaque=\"5ccc069c403ebaf9f0171e9517f40e41\"",
        )
        .unwrap();
        assert_eq!(c.username, "Mufasa");
        assert_eq!(c.realm, "testrealm@host.com");
        assert_eq!(c.nonce, "dcd98b7102dd2f0e8b11d0f600bfb0c093");
        assert_eq!(c.uri, "/dir/index.html");
        assert_eq!(c.qop.as_deref(), Some("auth"));
        assert_eq!(c.nc.as_deref(), Some("00000001"));
        assert_eq!(c.cnonce.as_deref(), Some("0a4f113b"));
        assert_eq!(c.response, "6629fae49393a05397450978507c4ef1");
        assert_eq!(
            c.opaque.as_deref(),
            Some("5ccc069c403ebaf9f0171e9517f40e41")
        );
        assert_eq!(c.algorithm, None);
    }

    #[test]
    fn parser_handles_escapes_spacing_and_unknown_params() {
        let c = DigestCredentials::parse(
            "  digest   Username = \"a\\\"b\\\\c\" ,, realm=r,nonce=\"n, with comma\" ,\
             uri=\"sip:x\",response=abc, foo=\"bar\", baz=qux ,",
        )
        .unwrap();
        assert_eq!(c.username, "a\"b\\c");
        assert_eq!(c.realm, "r");
        assert_eq!(c.nonce, "n, with comma");
        assert_eq!(c.response, "abc");
    }

    #[test]
    fn parser_rejects_bad_input() {
        for (input, want) in [
            ("", DigestError::Missing),
            ("   ", DigestError::Missing),
            ("Basic QWxhZGRpbjpvcGVuIHNlc2FtZQ==", DigestError::Missing),
            ("Digest", DigestError::Malformed),
            ("Digest username=\"a", DigestError::Malformed),
            ("Digest username", DigestError::Malformed),
            ("Digest username=", DigestError::Malformed),
            ("Digest username=a b=c", DigestError::Malformed),
            ("Digest =a", DigestError::Malformed),
            (
                "Digest username=a, username=b, realm=r, nonce=n, uri=u, response=x",
                DigestError::Malformed,
            ),
            ("Digest username=\"a\\\r\n\"", DigestError::Malformed),
        ] {
            assert_eq!(DigestCredentials::parse(input), Err(want), "{input:?}");
        }
        let long = format!("Digest username=\"{}\"", "a".repeat(MAX_AUTHORIZATION_LEN));
        assert_eq!(DigestCredentials::parse(&long), Err(DigestError::Malformed));
        let many: String = (0..=MAX_PARAMS).map(|i| format!("p{i}=v,")).collect();
        assert_eq!(
            DigestCredentials::parse(&format!("Digest {many}")),
            Err(DigestError::Malformed)
        );
    }

    #[test]
    fn challenge_values() {
        let s = DigestServer::new("a \"quoted\" realm", KEY, Duration::from_secs(60));
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        let values = s.challenge(NOW, &mut rng, true);
        assert_eq!(values.len(), 2);
        let nonce = nonce_of(&values[0]);
        assert_eq!(nonce.len(), 64);
        assert_eq!(
            values[0],
            format!(
                "Digest realm=\"a \\\"quoted\\\" realm\", nonce=\"{nonce}\", algorithm=SHA-256, qop=\"auth\", stale=true"
            )
        );
        assert_eq!(
            values[1],
            format!(
                "Digest realm=\"a \\\"quoted\\\" realm\", nonce=\"{nonce}\", algorithm=MD5, qop=\"auth\", stale=true"
            )
        );
        let md5_only = s.clone().with_algorithms(&[Algorithm::Md5]);
        assert_eq!(md5_only.challenge(NOW, &mut rng, false).len(), 1);
        assert!(!md5_only.challenge(NOW, &mut rng, false)[0].contains("stale"));
    }

    #[test]
    fn round_trip_both_algorithms() {
        for alg in [Algorithm::Sha256, Algorithm::Md5] {
            let mut s = server();
            let nonce = fresh_nonce(&s, NOW, 2);
            let h = authorization(alg, &nonce, "00000001", b"s3cret", URI);
            assert_eq!(
                s.verify(&h, "INVITE", URI, "trunk1", b"s3cret", NOW + 5),
                Ok(())
            );
            // The same header again is a replay.
            assert_eq!(
                s.verify(&h, "INVITE", URI, "trunk1", b"s3cret", NOW + 6),
                Err(DigestError::ReplayedNonceCount)
            );
            // The next count is fine, a lower one is not.
            let h3 = authorization(alg, &nonce, "00000003", b"s3cret", URI);
            assert_eq!(
                s.verify(&h3, "INVITE", URI, "trunk1", b"s3cret", NOW + 7),
                Ok(())
            );
            let h2 = authorization(alg, &nonce, "00000002", b"s3cret", URI);
            assert_eq!(
                s.verify(&h2, "INVITE", URI, "trunk1", b"s3cret", NOW + 8),
                Err(DigestError::ReplayedNonceCount)
            );
        }
    }

    #[test]
    fn missing_algorithm_means_md5() {
        let mut s = server();
        let nonce = fresh_nonce(&s, NOW, 3);
        let h = authorization(Algorithm::Md5, &nonce, "00000001", b"pw", URI)
            .replace(", algorithm=MD5", "");
        assert_eq!(s.verify(&h, "INVITE", URI, "trunk1", b"pw", NOW), Ok(()));
        let mut sha_only = server().with_algorithms(&[Algorithm::Sha256]);
        let h = authorization(Algorithm::Md5, &nonce, "00000001", b"pw", URI);
        assert_eq!(
            sha_only.verify(&h, "INVITE", URI, "trunk1", b"pw", NOW),
            Err(DigestError::UnsupportedAlgorithm)
        );
    }

    #[test]
    fn refusals() {
        let mut s = server();
        let nonce = fresh_nonce(&s, NOW, 4);
        let good = authorization(Algorithm::Sha256, &nonce, "00000001", b"pw", URI);
        let v = |s: &mut DigestServer, h: &str, user: &str, pw: &[u8], uri: &str, now| {
            s.verify(h, "INVITE", uri, user, pw, now)
        };
        assert_eq!(
            v(&mut s, &good, "trunk1", b"wrong", URI, NOW),
            Err(DigestError::WrongResponse)
        );
        assert_eq!(
            v(&mut s, &good, "trunk2", b"pw", URI, NOW),
            Err(DigestError::UnknownUser)
        );
        assert_eq!(
            v(
                &mut s,
                &good,
                "trunk1",
                b"pw",
                "sip:other@bridge.example.com",
                NOW
            ),
            Err(DigestError::WrongUri)
        );
        // Signed for a different method: the hash differs.
        assert_eq!(
            s.verify(&good, "BYE", URI, "trunk1", b"pw", NOW),
            Err(DigestError::WrongResponse)
        );
        let other_realm = good.replace("realm=\"bridge.example.com\"", "realm=\"evil\"");
        assert_eq!(
            v(&mut s, &other_realm, "trunk1", b"pw", URI, NOW),
            Err(DigestError::WrongRealm)
        );
        let sess = good.replace("algorithm=SHA-256", "algorithm=SHA-256-sess");
        assert_eq!(
            v(&mut s, &sess, "trunk1", b"pw", URI, NOW),
            Err(DigestError::UnsupportedAlgorithm)
        );
        let int = good.replace("qop=auth", "qop=auth-int");
        assert_eq!(
            v(&mut s, &int, "trunk1", b"pw", URI, NOW),
            Err(DigestError::UnsupportedQop)
        );
        let no_qop = good.replace(", qop=auth", "");
        assert_eq!(
            v(&mut s, &no_qop, "trunk1", b"pw", URI, NOW),
            Err(DigestError::UnsupportedQop)
        );
        let bad_nc = good.replace("nc=00000001", "nc=1");
        assert_eq!(
            v(&mut s, &bad_nc, "trunk1", b"pw", URI, NOW),
            Err(DigestError::Malformed)
        );
        let zero_nc = good.replace("nc=00000001", "nc=00000000");
        assert_eq!(
            v(&mut s, &zero_nc, "trunk1", b"pw", URI, NOW),
            Err(DigestError::Malformed)
        );
        // A wrong answer burnt the nonce (one guess per challenge): even the
        // right answer to it is refused now, and counts as a guess.
        assert_eq!(
            v(&mut s, &good, "trunk1", b"pw", URI, NOW),
            Err(DigestError::ReplayedNonceCount)
        );
        assert!(DigestError::ReplayedNonceCount.is_guess());
        assert!(!DigestError::StaleNonce.is_guess() && !DigestError::Missing.is_guess());
        let nonce = fresh_nonce(&s, NOW, 5);
        let good = authorization(Algorithm::Sha256, &nonce, "00000001", b"pw", URI);
        assert_eq!(v(&mut s, &good, "trunk1", b"pw", URI, NOW), Ok(()));
        assert_eq!(DigestError::Malformed.status(), 400);
        assert_eq!(DigestError::WrongResponse.status(), 401);
        assert!(DigestError::StaleNonce.is_stale() && !DigestError::BadNonce.is_stale());
    }

    #[test]
    fn expired_nonce_is_stale() {
        let mut s = server();
        let nonce = fresh_nonce(&s, NOW, 5);
        let h = authorization(Algorithm::Sha256, &nonce, "00000001", b"pw", URI);
        assert_eq!(
            s.verify(&h, "INVITE", URI, "trunk1", b"pw", NOW + 301),
            Err(DigestError::StaleNonce)
        );
        assert_eq!(
            s.verify(&h, "INVITE", URI, "trunk1", b"pw", NOW + 300),
            Ok(())
        );
        // A stale nonce with the wrong password is a wrong response, not stale.
        let h2 = authorization(Algorithm::Sha256, &nonce, "00000002", b"bad", URI);
        assert_eq!(
            s.verify(&h2, "INVITE", URI, "trunk1", b"pw", NOW + 1000),
            Err(DigestError::WrongResponse)
        );
    }

    #[test]
    fn forged_and_foreign_nonces_are_bad() {
        let mut s = server();
        let nonce = fresh_nonce(&s, NOW, 6);
        // Flip one character of the tag.
        let mut forged: Vec<char> = nonce.chars().collect();
        forged[40] = if forged[40] == 'A' { 'B' } else { 'A' };
        let forged: String = forged.into_iter().collect();
        // Another server key.
        let other = DigestServer::new("bridge.example.com", [8; 32], Duration::from_secs(300));
        let foreign = fresh_nonce(&other, NOW, 6);
        // Change the timestamp to extend the lifetime.
        let mut raw = URL_SAFE_NO_PAD.decode(&nonce).unwrap();
        raw[7] ^= 1;
        let retimed = URL_SAFE_NO_PAD.encode(raw);
        for n in [
            forged.as_str(),
            &foreign,
            &retimed,
            "dcd98b7102dd2f0e8b11d0f600bfb0c093",
            "",
        ] {
            let h = authorization(Algorithm::Md5, n, "00000001", b"pw", URI);
            assert_eq!(
                s.verify(&h, "INVITE", URI, "trunk1", b"pw", NOW),
                Err(DigestError::BadNonce),
                "{n}"
            );
        }
    }

    #[test]
    fn forgotten_nonces_are_stale_not_replayable() {
        let mut s = server().with_nonce_table_len(2);
        let n1 = fresh_nonce(&s, NOW, 10);
        let n2 = fresh_nonce(&s, NOW + 1, 11);
        let n3 = fresh_nonce(&s, NOW + 2, 12);
        let h1 = authorization(Algorithm::Sha256, &n1, "00000001", b"pw", URI);
        for (n, t) in [(&n1, 0), (&n2, 1), (&n3, 2)] {
            let h = authorization(Algorithm::Sha256, n, "00000001", b"pw", URI);
            assert_eq!(
                s.verify(&h, "INVITE", URI, "trunk1", b"pw", NOW + t),
                Ok(())
            );
        }
        // n1 was evicted: replaying its header must not pass.
        assert_eq!(
            s.verify(&h1, "INVITE", URI, "trunk1", b"pw", NOW + 3),
            Err(DigestError::StaleNonce)
        );
        // n3 is still tracked.
        let h3 = authorization(Algorithm::Sha256, &n3, "00000001", b"pw", URI);
        assert_eq!(
            s.verify(&h3, "INVITE", URI, "trunk1", b"pw", NOW + 3),
            Err(DigestError::ReplayedNonceCount)
        );
    }

    #[test]
    fn expired_nonces_leave_the_table() {
        let mut s = server();
        for i in 0..10 {
            let n = fresh_nonce(&s, NOW + i, i);
            let h = authorization(Algorithm::Md5, &n, "00000001", b"pw", URI);
            assert_eq!(
                s.verify(&h, "INVITE", URI, "trunk1", b"pw", NOW + i),
                Ok(())
            );
        }
        assert_eq!(s.nonce_counts.len(), 10);
        let n = fresh_nonce(&s, NOW + 1000, 99);
        let h = authorization(Algorithm::Md5, &n, "00000001", b"pw", URI);
        assert_eq!(
            s.verify(&h, "INVITE", URI, "trunk1", b"pw", NOW + 1000),
            Ok(())
        );
        assert_eq!(s.nonce_counts.len(), 1);
    }

    #[test]
    fn debug_hides_the_key() {
        let d = format!("{:?}", server());
        assert!(d.contains("bridge.example.com"));
        assert!(!d.contains("mac"));
    }
}
