//! The header list (ordered, case-insensitive, compact forms) and the typed header values
//! the signalling layers read: Via, name-addr (From/To/Contact/Route/Record-Route), CSeq.

use std::fmt;

use super::uri::{
    Host, Params, Uri, is_token, is_token_char, parse_hostport, split_outside, truncate,
};
use super::{Method, ParseError};

/// Compact form (RFC 3261 §7.3.3, RFC 3265, RFC 3515, RFC 3892, RFC 4028) → long name.
fn expand_compact(name: &str) -> &str {
    if name.len() != 1 {
        return name;
    }
    match name.as_bytes()[0].to_ascii_lowercase() {
        b'v' => "Via",
        b'i' => "Call-ID",
        b'f' => "From",
        b't' => "To",
        b'm' => "Contact",
        b'l' => "Content-Length",
        b'c' => "Content-Type",
        b'k' => "Supported",
        b's' => "Subject",
        b'o' => "Event",
        b'e' => "Content-Encoding",
        b'u' => "Allow-Events",
        b'r' => "Refer-To",
        b'b' => "Referred-By",
        b'x' => "Session-Expires",
        _ => name,
    }
}

/// Whether two header names denote the same header (case, compact forms).
pub fn same_header(a: &str, b: &str) -> bool {
    expand_compact(a).eq_ignore_ascii_case(expand_compact(b))
}

/// Ordered header lines `(name as written, value)`. Values are unfolded and trimmed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Headers(Vec<(String, String)>);

impl Headers {
    /// No headers.
    pub fn new() -> Self {
        Headers(Vec::new())
    }

    /// Value of the first line named `name`.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(n, _)| same_header(n, name))
            .map(|(_, v)| v.as_str())
    }

    /// Each line's value for `name`.
    pub fn get_all<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a str> + 'a {
        self.0
            .iter()
            .filter(move |(n, _)| same_header(n, name))
            .map(|(_, v)| v.as_str())
    }

    /// Comma-separated elements across every `name` line (quote-, `<>`- and
    /// `[]`-aware), trimmed, empty elements skipped. A line with an unterminated quote
    /// yields its whole value.
    pub fn values<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a str> + 'a {
        self.get_all(name)
            .flat_map(|v| split_outside(v, ',').unwrap_or_else(|_| vec![v]))
            .map(str::trim)
            .filter(|v| !v.is_empty())
    }

    /// Strict list split: every element must be non-empty.
    pub(crate) fn list(&self, name: &str) -> Result<Vec<&str>, ParseError> {
        let mut out = Vec::new();
        for (_, line) in self.0.iter().filter(|(n, _)| same_header(n, name)) {
            for v in split_outside(line, ',')? {
                let v = v.trim();
                if v.is_empty() {
                    return Err(ParseError::Invalid(format!("empty element in {name}")));
                }
                out.push(v);
            }
        }
        Ok(out)
    }

    /// Appends a line.
    pub fn push(&mut self, name: &str, value: impl Into<String>) {
        self.0.push((name.to_owned(), value.into()));
    }

    /// Replaces every `name` line by one line (at the first one's position).
    pub fn set(&mut self, name: &str, value: impl Into<String>) {
        let value = value.into();
        match self.0.iter().position(|(n, _)| same_header(n, name)) {
            Some(i) => {
                self.0[i].1 = value;
                let mut idx = 0;
                self.0.retain(|(n, _)| {
                    let keep = idx <= i || !same_header(n, name);
                    idx += 1;
                    keep
                });
            }
            None => self.push(name, value),
        }
    }

    /// Removes every `name` line.
    pub fn remove(&mut self, name: &str) {
        self.0.retain(|(n, _)| !same_header(n, name));
    }

    /// Lines in order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.0.iter().map(|(n, v)| (n.as_str(), v.as_str()))
    }

    /// Number of lines.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether there are no lines.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Inserts a line at the front (e.g. a new top Via).
    pub fn push_front(&mut self, name: &str, value: impl Into<String>) {
        self.0.insert(0, (name.to_owned(), value.into()));
    }

    /// Exactly one line with exactly one value, or an error naming the header.
    pub(crate) fn single(&self, name: &'static str) -> Result<&str, ParseError> {
        let mut it = self.get_all(name);
        match (it.next(), it.next()) {
            (Some(v), None) => Ok(v),
            (None, _) => Err(ParseError::MissingHeader(name)),
            (Some(_), Some(_)) => Err(ParseError::Invalid(format!("more than one {name}"))),
        }
    }

    /// All Via values, top first.
    pub fn vias(&self) -> Result<Vec<Via>, ParseError> {
        self.list("Via")?.into_iter().map(Via::parse).collect()
    }

    /// The top Via.
    pub fn top_via(&self) -> Result<Via, ParseError> {
        let first = self.get("Via").ok_or(ParseError::MissingHeader("Via"))?;
        let top = split_outside(first, ',')?
            .into_iter()
            .next()
            .unwrap_or(first);
        Via::parse(top)
    }

    /// From.
    pub fn from(&self) -> Result<NameAddr, ParseError> {
        NameAddr::parse(self.single("From")?)
    }

    /// To.
    pub fn to(&self) -> Result<NameAddr, ParseError> {
        NameAddr::parse(self.single("To")?)
    }

    /// Call-ID (must be one non-empty word).
    pub fn call_id(&self) -> Result<&str, ParseError> {
        let v = self.single("Call-ID")?;
        if v.is_empty() || v.contains(char::is_whitespace) {
            return Err(ParseError::Invalid("bad Call-ID".into()));
        }
        Ok(v)
    }

    /// CSeq.
    pub fn cseq(&self) -> Result<CSeq, ParseError> {
        CSeq::parse(self.single("CSeq")?)
    }

    /// Max-Forwards (0..=255), `None` when absent.
    pub fn max_forwards(&self) -> Result<Option<u32>, ParseError> {
        let mut it = self.get_all("Max-Forwards");
        let v = match (it.next(), it.next()) {
            (None, _) => return Ok(None),
            (Some(v), None) => v,
            _ => return Err(ParseError::Invalid("more than one Max-Forwards".into())),
        };
        match parse_decimal(v) {
            Some(n) if n <= 255 => Ok(Some(n)),
            _ => Err(ParseError::Invalid(format!(
                "bad Max-Forwards {:?}",
                truncate(v)
            ))),
        }
    }

    /// Contact values (a lone `*` wildcard is skipped).
    pub fn contacts(&self) -> Result<Vec<NameAddr>, ParseError> {
        self.list("Contact")?
            .into_iter()
            .filter(|v| *v != "*")
            .map(NameAddr::parse)
            .collect()
    }

    /// Record-Route values, top first.
    pub fn record_routes(&self) -> Result<Vec<NameAddr>, ParseError> {
        self.list("Record-Route")?
            .into_iter()
            .map(NameAddr::parse)
            .collect()
    }

    /// Route values, top first.
    pub fn routes(&self) -> Result<Vec<NameAddr>, ParseError> {
        self.list("Route")?
            .into_iter()
            .map(NameAddr::parse)
            .collect()
    }

    /// Content-Type value.
    pub fn content_type(&self) -> Option<&str> {
        self.get("Content-Type")
    }
}

/// Parses 1..=10 decimal digits (leading zeros allowed) into a u32.
pub(crate) fn parse_decimal(s: &str) -> Option<u32> {
    let s = s.trim();
    let digits = s.trim_start_matches('0');
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) || digits.len() > 10 {
        return None;
    }
    if digits.is_empty() {
        return Some(0);
    }
    digits.parse::<u32>().ok()
}

/// One Via value: `SIP/2.0/<transport> host[:port];params`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Via {
    /// Transport, upper-cased ("UDP", "TCP", "TLS", "SCTP", "WS", ...).
    pub transport: String,
    /// sent-by host.
    pub host: Host,
    /// sent-by port.
    pub port: Option<u16>,
    /// Via parameters (branch, received, rport, ...).
    pub params: Params,
}

impl Via {
    /// Parses one Via element. Whitespace is allowed around `/`, `;` and `=`.
    pub fn parse(s: &str) -> Result<Via, ParseError> {
        let err = || ParseError::Invalid(format!("bad Via {:?}", truncate(s)));
        let mut parts = s.splitn(3, '/');
        let proto = parts.next().ok_or_else(err)?.trim();
        let version = parts.next().ok_or_else(err)?.trim();
        let rest = parts.next().ok_or_else(err)?.trim_start();
        if !proto.eq_ignore_ascii_case("SIP") || version != "2.0" {
            return Err(err());
        }
        let t_end = rest.find(|c: char| !is_token_char(c)).ok_or_else(err)?;
        let transport = &rest[..t_end];
        if transport.is_empty() || !rest[t_end..].starts_with(char::is_whitespace) {
            return Err(err());
        }
        let rest = rest[t_end..].trim_start();
        let (sent_by, params) = match rest.find(';') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, ""),
        };
        let sent_by = sent_by.trim();
        if sent_by.contains(char::is_whitespace) {
            return Err(err());
        }
        let (host, port) = parse_hostport(sent_by)?;
        Ok(Via {
            transport: transport.to_ascii_uppercase(),
            host,
            port,
            params: Params::parse(params)?,
        })
    }

    /// `branch` value.
    pub fn branch(&self) -> Option<&str> {
        self.params.get("branch").flatten()
    }

    /// `received` value as written (may be a bracketed IPv6 reference).
    pub fn received(&self) -> Option<&str> {
        self.params.get("received").flatten()
    }

    /// `rport`: `None` absent, `Some(None)` requested (no value), `Some(Some(p))` filled.
    /// A value that is not a port counts as absent.
    pub fn rport(&self) -> Option<Option<u16>> {
        match self.params.get("rport")? {
            None => Some(None),
            Some(v) => v.parse::<u16>().ok().map(Some),
        }
    }
}

impl fmt::Display for Via {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SIP/2.0/{} {}", self.transport, self.host)?;
        if let Some(p) = self.port {
            write!(f, ":{p}")?;
        }
        write!(f, "{}", self.params)
    }
}

/// `[display] <uri>;params` or `uri;params` (From, To, Contact, Route, Record-Route).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NameAddr {
    /// Display name, unquoted and unescaped (token form kept as written).
    pub display: Option<String>,
    /// The URI.
    pub uri: Uri,
    /// Header parameters (tag, expires, q, ...), not URI parameters.
    pub params: Params,
}

impl NameAddr {
    /// A bare `<uri>`.
    pub fn new(uri: Uri) -> Self {
        NameAddr {
            display: None,
            uri,
            params: Params::new(),
        }
    }

    /// Parses a name-addr or addr-spec with parameters.
    pub fn parse(s: &str) -> Result<NameAddr, ParseError> {
        let s = s.trim();
        let err = |why: &str| ParseError::Invalid(format!("{why} in {:?}", truncate(s)));
        let (display, rest) = if let Some(q) = s.strip_prefix('"') {
            let (text, used) = read_quoted(q).ok_or_else(|| err("unterminated quoted string"))?;
            let rest = q[used..].trim_start();
            if !rest.starts_with('<') {
                return Err(err("quoted display name without <uri>"));
            }
            (Some(text), rest)
        } else if let Some(lt) = s.find('<') {
            let disp = s[..lt].trim();
            if !disp.split_whitespace().all(is_token) {
                return Err(err("bad display name"));
            }
            let disp = (!disp.is_empty()).then(|| disp.to_owned());
            (disp, &s[lt..])
        } else {
            // addr-spec: the URI ends at the first ';' (RFC 3261 §20.10).
            let (uri, params) = match s.find(';') {
                Some(i) => (&s[..i], &s[i..]),
                None => (s, ""),
            };
            let uri = uri.trim();
            if uri.contains(['?', ',']) {
                return Err(err("URI with '?' or ',' must be in <>"));
            }
            return Ok(NameAddr {
                display: None,
                uri: Uri::parse(uri)?,
                params: Params::parse(params)?,
            });
        };
        let inner = rest.strip_prefix('<').ok_or_else(|| err("expected <"))?;
        let gt = inner.find('>').ok_or_else(|| err("missing >"))?;
        // Liberal (RFC 4475 §3.1.2.14): spaces just inside <> are ignored.
        let uri = Uri::parse(inner[..gt].trim())?;
        let params = Params::parse(&inner[gt + 1..])?;
        Ok(NameAddr {
            display,
            uri,
            params,
        })
    }

    /// `tag` parameter.
    pub fn tag(&self) -> Option<&str> {
        self.params.get("tag").flatten()
    }
}

/// Reads a quoted string body (after the opening quote). Returns the unescaped text and
/// the number of bytes consumed including the closing quote.
pub(crate) fn read_quoted(s: &str) -> Option<(String, usize)> {
    let mut out = String::new();
    let mut chars = s.char_indices();
    while let Some((i, c)) = chars.next() {
        match c {
            '\\' => out.push(chars.next()?.1),
            '"' => return Some((out, i + 1)),
            _ => out.push(c),
        }
    }
    None
}

impl fmt::Display for NameAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(d) = &self.display {
            f.write_str("\"")?;
            for c in d.chars() {
                if c == '"' || c == '\\' {
                    f.write_str("\\")?;
                }
                write!(f, "{c}")?;
            }
            f.write_str("\" ")?;
        }
        write!(f, "<{}>{}", self.uri, self.params)
    }
}

/// CSeq: sequence number and method.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CSeq {
    /// Sequence number (≤ 2^32-1).
    pub seq: u32,
    /// Method.
    pub method: Method,
}

impl CSeq {
    /// Parses `<digits> LWS <method>`.
    pub fn parse(s: &str) -> Result<CSeq, ParseError> {
        let err = || ParseError::Invalid(format!("bad CSeq {:?}", truncate(s)));
        let mut it = s.split_whitespace();
        let seq = it.next().and_then(parse_decimal).ok_or_else(err)?;
        let method = it.next().filter(|m| is_token(m)).ok_or_else(err)?;
        if it.next().is_some() {
            return Err(err());
        }
        Ok(CSeq {
            seq,
            method: Method::from(method),
        })
    }
}

impl fmt::Display for CSeq {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.seq, self.method)
    }
}
