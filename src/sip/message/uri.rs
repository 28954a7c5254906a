//! URIs (`sip:`, `sips:`, `tel:`, anything else kept opaque), hosts and `;name=value`
//! parameter lists, plus the small lexical helpers the header parsers share.

use std::fmt;
use std::net::{Ipv4Addr, Ipv6Addr};

use super::ParseError;

/// RFC 3261 `token` characters (besides alphanumerics).
pub(crate) fn is_token_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || "-.!%*_+`'~".contains(c)
}

/// ASCII case-insensitive `starts_with` that never slices inside a UTF-8 sequence.
pub(crate) fn starts_with_ci(s: &str, prefix: &str) -> bool {
    s.get(..prefix.len())
        .is_some_and(|p| p.eq_ignore_ascii_case(prefix))
}

pub(crate) fn is_token(s: &str) -> bool {
    !s.is_empty() && s.chars().all(is_token_char)
}

fn bad(what: &str, s: &str) -> ParseError {
    ParseError::Invalid(format!("{what}: {:?}", truncate(s)))
}

pub(crate) fn truncate(s: &str) -> &str {
    match s.char_indices().nth(80) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

/// Splits `s` at each `sep` that is outside double quotes (with `\` escapes),
/// `<...>` and `[...]`. Returns an error on an unterminated quote.
pub(crate) fn split_outside(s: &str, sep: char) -> Result<Vec<&str>, ParseError> {
    let mut out = Vec::new();
    let mut start = 0;
    let mut in_quote = false;
    let mut escaped = false;
    let mut angle = false;
    let mut bracket = false;
    for (i, c) in s.char_indices() {
        if in_quote {
            if escaped {
                escaped = false;
            } else if c == '\\' {
                escaped = true;
            } else if c == '"' {
                in_quote = false;
            }
            continue;
        }
        match c {
            '"' => in_quote = true,
            '<' => angle = true,
            '>' => angle = false,
            '[' => bracket = true,
            ']' => bracket = false,
            _ if c == sep && !angle && !bracket => {
                out.push(&s[start..i]);
                start = i + c.len_utf8();
            }
            _ => {}
        }
    }
    if in_quote {
        return Err(bad("unterminated quoted string", s));
    }
    out.push(&s[start..]);
    Ok(out)
}

/// URI scheme. `sip`, `sips` and `tel` are recognised case-insensitively.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Scheme {
    /// `sip:`
    Sip,
    /// `sips:`
    Sips,
    /// `tel:` (RFC 3966)
    Tel,
    /// Anything else, as written (lower-cased).
    Other(String),
}

impl Scheme {
    /// The scheme name without the colon.
    pub fn as_str(&self) -> &str {
        match self {
            Scheme::Sip => "sip",
            Scheme::Sips => "sips",
            Scheme::Tel => "tel",
            Scheme::Other(s) => s,
        }
    }
}

impl fmt::Display for Scheme {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Host part of a SIP URI or Via sent-by.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Host {
    /// Host name as written.
    Domain(String),
    /// IPv4 literal.
    V4(Ipv4Addr),
    /// IPv6 reference (written in `[]`).
    V6(Ipv6Addr),
}

impl Host {
    /// Parses a host: `[v6]`, dotted IPv4, or a domain name.
    pub fn parse(s: &str) -> Result<Host, ParseError> {
        if let Some(inner) = s.strip_prefix('[') {
            let inner = inner
                .strip_suffix(']')
                .ok_or_else(|| bad("unterminated IPv6 reference", s))?;
            return parse_v6(inner)
                .map(Host::V6)
                .ok_or_else(|| bad("bad IPv6 address", s));
        }
        if s.is_empty() {
            return Err(bad("empty host", s));
        }
        if s.bytes().all(|b| b.is_ascii_digit() || b == b'.') {
            return s
                .parse::<Ipv4Addr>()
                .map(Host::V4)
                .map_err(|_| bad("bad IPv4 address", s));
        }
        if s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.' || b == b'_')
        {
            Ok(Host::Domain(s.to_owned()))
        } else {
            Err(bad("bad host", s))
        }
    }
}

/// IPv6 text, tolerating RFC 3261's three-colon ABNF bug (RFC 5118 §4.10).
fn parse_v6(s: &str) -> Option<Ipv6Addr> {
    s.parse::<Ipv6Addr>()
        .ok()
        .or_else(|| s.replacen(":::", "::", 1).parse::<Ipv6Addr>().ok())
}

impl fmt::Display for Host {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Host::Domain(d) => f.write_str(d),
            Host::V4(a) => write!(f, "{a}"),
            Host::V6(a) => write!(f, "[{a}]"),
        }
    }
}

/// Parses `host[:port]` (host may be `[v6]`).
pub(crate) fn parse_hostport(s: &str) -> Result<(Host, Option<u16>), ParseError> {
    let (host, port) = if s.starts_with('[') {
        match s.find(']') {
            Some(end) => {
                let rest = &s[end + 1..];
                let port = if rest.is_empty() {
                    None
                } else {
                    Some(
                        rest.strip_prefix(':')
                            .ok_or_else(|| bad("junk after IPv6 reference", s))?,
                    )
                };
                (&s[..=end], port)
            }
            None => return Err(bad("unterminated IPv6 reference", s)),
        }
    } else {
        match s.split_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (s, None),
        }
    };
    let port = match port {
        None => None,
        Some(p) => Some(parse_port(p).ok_or_else(|| bad("bad port", s))?),
    };
    Ok((Host::parse(host)?, port))
}

fn parse_port(p: &str) -> Option<u16> {
    if p.is_empty() || p.len() > 5 || !p.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    p.parse().ok()
}

/// Ordered `;name[=value]` parameters. Names compare case-insensitively; values are kept
/// exactly as written (quoted strings keep their quotes).
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct Params(Vec<(String, Option<String>)>);

impl Params {
    /// An empty list.
    pub fn new() -> Self {
        Params(Vec::new())
    }

    /// Parses `;a=b;c` (leading `;` required unless `s` is blank). Whitespace around
    /// `;` and `=` is allowed. Empty parameters (`;;`) are an error.
    pub fn parse(s: &str) -> Result<Params, ParseError> {
        let s = s.trim();
        let mut out = Params::new();
        if s.is_empty() {
            return Ok(out);
        }
        let rest = s.strip_prefix(';').ok_or_else(|| bad("expected ';'", s))?;
        for item in split_outside(rest, ';')? {
            let (name, value) = match item.split_once('=') {
                Some((n, v)) => (n.trim(), Some(v.trim())),
                None => (item.trim(), None),
            };
            if !is_token(name) {
                return Err(bad("bad parameter name", item));
            }
            let unquoted_ws = |v: &str| !v.starts_with('"') && v.contains(char::is_whitespace);
            if value.is_some_and(|v| v.is_empty() || unquoted_ws(v)) {
                return Err(bad("bad parameter value", item));
            }
            out.0.push((name.to_owned(), value.map(str::to_owned)));
        }
        Ok(out)
    }

    /// `None`: absent; `Some(None)`: present without value; `Some(Some(v))`: value.
    pub fn get(&self, name: &str) -> Option<Option<&str>> {
        self.0
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_deref())
    }

    /// Whether `name` is present (with or without value).
    pub fn has(&self, name: &str) -> bool {
        self.get(name).is_some()
    }

    /// Replaces the first `name` in place, or appends it.
    pub fn set(&mut self, name: &str, value: Option<&str>) {
        match self
            .0
            .iter_mut()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
        {
            Some(slot) => slot.1 = value.map(str::to_owned),
            None => self.0.push((name.to_owned(), value.map(str::to_owned))),
        }
    }

    /// Removes every `name`.
    pub fn remove(&mut self, name: &str) {
        self.0.retain(|(n, _)| !n.eq_ignore_ascii_case(name));
    }

    /// Parameters in order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, Option<&str>)> {
        self.0.iter().map(|(n, v)| (n.as_str(), v.as_deref()))
    }

    /// Number of parameters.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Display for Params {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (n, v) in &self.0 {
            match v {
                Some(v) => write!(f, ";{n}={v}")?,
                None => write!(f, ";{n}")?,
            }
        }
        Ok(())
    }
}

/// A URI. For `sip`/`sips` every field is filled from the text; `tel:` puts the number in
/// `user` (as written) and its parameters in `params`; other schemes keep everything after
/// the colon in `opaque`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Uri {
    /// Scheme.
    pub scheme: Scheme,
    /// User part as written, `%`-escapes kept (tel: the number).
    pub user: Option<String>,
    /// Password as written.
    pub password: Option<String>,
    /// Host; `None` for tel: and opaque URIs.
    pub host: Option<Host>,
    /// Port.
    pub port: Option<u16>,
    /// URI parameters.
    pub params: Params,
    /// Header part after `?`, as written (still escaped).
    pub headers: Option<String>,
    /// Everything after `scheme:` for schemes other than sip/sips/tel.
    pub opaque: Option<String>,
}

impl Uri {
    /// A plain `sip:[user@]host[:port]` URI.
    pub fn sip(user: Option<&str>, host: Host, port: Option<u16>) -> Uri {
        Uri {
            scheme: Scheme::Sip,
            user: user.map(str::to_owned),
            password: None,
            host: Some(host),
            port,
            params: Params::new(),
            headers: None,
            opaque: None,
        }
    }

    /// Parses a URI. No whitespace is allowed anywhere in it.
    pub fn parse(s: &str) -> Result<Uri, ParseError> {
        if s.is_empty() || s.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(bad("bad URI", s));
        }
        let (scheme, rest) = s
            .split_once(':')
            .ok_or_else(|| bad("URI without scheme", s))?;
        let first_alpha = scheme
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic());
        if !first_alpha
            || !scheme
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "+-.".contains(c))
        {
            return Err(bad("bad URI scheme", s));
        }
        let scheme = match scheme.to_ascii_lowercase().as_str() {
            "sip" => Scheme::Sip,
            "sips" => Scheme::Sips,
            "tel" => Scheme::Tel,
            other => Scheme::Other(other.to_owned()),
        };
        if rest.is_empty() {
            return Err(bad("empty URI", s));
        }
        match scheme {
            Scheme::Sip | Scheme::Sips => Self::parse_sip(scheme, rest),
            Scheme::Tel => {
                let (number, params) = match rest.find(';') {
                    Some(i) => (&rest[..i], &rest[i..]),
                    None => (rest, ""),
                };
                if number.is_empty()
                    || !number
                        .chars()
                        .all(|c| c.is_ascii_hexdigit() || "+-.()*#".contains(c))
                {
                    return Err(bad("bad tel number", s));
                }
                Ok(Uri {
                    scheme,
                    user: Some(number.to_owned()),
                    password: None,
                    host: None,
                    port: None,
                    params: Params::parse(params)?,
                    headers: None,
                    opaque: None,
                })
            }
            Scheme::Other(_) => Ok(Uri {
                scheme,
                user: None,
                password: None,
                host: None,
                port: None,
                params: Params::new(),
                headers: None,
                opaque: Some(rest.to_owned()),
            }),
        }
    }

    fn parse_sip(scheme: Scheme, rest: &str) -> Result<Uri, ParseError> {
        let (userinfo, after) = match rest.find('@') {
            Some(i) => (Some(&rest[..i]), &rest[i + 1..]),
            None => (None, rest),
        };
        let (user, password) = match userinfo {
            None => (None, None),
            Some(ui) => {
                let (u, p) = match ui.split_once(':') {
                    Some((u, p)) => (u, Some(p.to_owned())),
                    None => (ui, None),
                };
                if u.is_empty() {
                    return Err(bad("empty user part", rest));
                }
                (Some(u.to_owned()), p)
            }
        };
        let (before_headers, headers) = match after.split_once('?') {
            Some((b, h)) => (b, Some(h.to_owned())),
            None => (after, None),
        };
        let hp_end = match before_headers.strip_prefix('[') {
            Some(v6) => v6.find(']').map(|i| i + 1).unwrap_or(before_headers.len()),
            None => 0,
        };
        let (hostport, params) = match before_headers[hp_end..].find(';') {
            Some(i) => before_headers.split_at(hp_end + i),
            None => (before_headers, ""),
        };
        let (host, port) = parse_hostport(hostport)?;
        Ok(Uri {
            scheme,
            user,
            password,
            host: Some(host),
            port,
            params: Params::parse(params)?,
            headers,
            opaque: None,
        })
    }

    /// The user part with `%HH` escapes decoded (lossily to UTF-8); tel: the number.
    pub fn user_unescaped(&self) -> Option<String> {
        self.user.as_deref().map(unescape)
    }
}

/// Decodes `%HH` escapes; a `%` not followed by two hex digits is kept literally.
pub fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hi = b.get(i + 1).and_then(|&c| (c as char).to_digit(16));
            let lo = b.get(i + 2).and_then(|&c| (c as char).to_digit(16));
            if let (Some(hi), Some(lo)) = (hi, lo) {
                out.push((hi * 16 + lo) as u8);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

impl fmt::Display for Uri {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:", self.scheme)?;
        if let Some(o) = &self.opaque {
            return f.write_str(o);
        }
        if let Some(u) = &self.user {
            f.write_str(u)?;
            if let Some(p) = &self.password {
                write!(f, ":{p}")?;
            }
            if self.host.is_some() {
                f.write_str("@")?;
            }
        }
        if let Some(h) = &self.host {
            write!(f, "{h}")?;
        }
        if let Some(p) = self.port {
            write!(f, ":{p}")?;
        }
        write!(f, "{}", self.params)?;
        if let Some(h) = &self.headers {
            write!(f, "?{h}")?;
        }
        Ok(())
    }
}

impl std::str::FromStr for Uri {
    type Err = ParseError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Uri::parse(s)
    }
}
