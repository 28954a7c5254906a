//! Semantic checks on parsed messages (RFC 3261 §8.2, §8.1.3.3) and best-effort error
//! responses built from raw bytes that did not parse.

use bytes::Bytes;

use super::framing::{find_head_end, leading_crlf};
use super::headers::parse_decimal;
use super::uri::starts_with_ci;
use super::{
    MAX_HEADERS, MAX_MESSAGE_SIZE, Method, NameAddr, Request, Response, Scheme, same_header,
};
use crate::sip::error::{SUPPORTED_OPTION_TAGS, SipError};

fn malformed(e: impl std::fmt::Display) -> SipError {
    SipError::Malformed(e.to_string())
}

/// Media type without parameters, lower-cased: `Application/SDP; x=y` → `application/sdp`.
fn media_type(v: &str) -> String {
    v.split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase()
}

/// Checks a parsed request before a UAS acts on it, in RFC 3261 §8.2 order:
/// mandatory headers and scalar ranges (400), unknown method (501), CSeq method (400),
/// Request-URI scheme (416), Require (420), body type/encoding (415), Accept (406).
///
/// Max-Forwards 0 is *not* an error here: a UAS handles such a request normally.
/// A top Via branch that is exactly the magic cookie `z9hG4bK` is rejected (400,
/// RFC 4475 §3.2.1) so the transaction layer never has to match on it.
pub fn validate_request(req: &Request) -> Result<(), SipError> {
    let h = &req.headers;
    let vias = h.vias().map_err(malformed)?;
    if vias.is_empty() {
        return Err(malformed("missing Via header"));
    }
    if vias[0].branch().is_some_and(|b| b == "z9hG4bK") {
        return Err(malformed("Via branch is only the magic cookie"));
    }
    h.from().map_err(malformed)?;
    h.to().map_err(malformed)?;
    h.call_id().map_err(malformed)?;
    let cseq = h.cseq().map_err(malformed)?;
    h.max_forwards().map_err(malformed)?;
    let contacts = h.contacts().map_err(malformed)?;
    for c in &contacts {
        if let Some(Some(e)) = c.params.get("expires") {
            parse_decimal(e).ok_or_else(|| malformed("bad Contact expires"))?;
        }
    }
    let mut expires = h.get_all("Expires");
    match (expires.next(), expires.next()) {
        (Some(v), None) => {
            parse_decimal(v).ok_or_else(|| malformed("bad Expires"))?;
        }
        (Some(_), Some(_)) => return Err(malformed("more than one Expires")),
        _ => {}
    }
    if matches!(req.method, Method::Extension(_)) {
        return Err(SipError::UnknownMethod);
    }
    if cseq.method != req.method {
        return Err(malformed("CSeq method does not match the request method"));
    }
    match req.uri.scheme {
        Scheme::Sip | Scheme::Sips | Scheme::Tel => {}
        Scheme::Other(_) => return Err(SipError::UnsupportedUriScheme),
    }
    if req.uri.headers.is_some() {
        return Err(malformed("Request-URI carries headers"));
    }
    if !matches!(req.method, Method::Ack | Method::Cancel) {
        let unsupported: Vec<String> = h
            .values("Require")
            .filter(|t| {
                !SUPPORTED_OPTION_TAGS
                    .iter()
                    .any(|s| s.eq_ignore_ascii_case(t))
            })
            .map(str::to_owned)
            .collect();
        if !unsupported.is_empty() {
            return Err(SipError::BadExtension(unsupported));
        }
    }
    let sdp_method = matches!(
        req.method,
        Method::Invite | Method::Update | Method::Ack | Method::Prack
    );
    if sdp_method && !req.body.is_empty() {
        let ct = req
            .content_type()
            .ok_or_else(|| malformed("body without Content-Type"))?;
        if media_type(ct) != "application/sdp" {
            return Err(SipError::UnsupportedMediaType);
        }
        if h.values("Content-Encoding")
            .any(|e| !e.eq_ignore_ascii_case("identity"))
        {
            return Err(SipError::UnsupportedMediaType);
        }
    }
    if matches!(req.method, Method::Invite | Method::Update) && h.get("Accept").is_some() {
        let ok = h
            .values("Accept")
            .map(media_type)
            .any(|t| t == "application/sdp" || t == "application/*" || t == "*/*");
        if !ok {
            return Err(SipError::NotAcceptable);
        }
    }
    Ok(())
}

/// Checks a response before a UAC acts on it. Any error means: drop it silently
/// (RFC 3261 §8.1.3.3: exactly one Via; mandatory headers must parse).
pub fn validate_response(resp: &Response) -> Result<(), SipError> {
    let vias = resp.vias().map_err(malformed)?;
    if vias.len() != 1 {
        return Err(malformed("a response must carry exactly one Via"));
    }
    resp.from().map_err(malformed)?;
    resp.to().map_err(malformed)?;
    resp.call_id().map_err(malformed)?;
    resp.cseq().map_err(malformed)?;
    Ok(())
}

/// FNV-1a, for a stable To tag on stateless error responses (no randomness here).
fn fnv(data: &[u8]) -> u64 {
    data.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// Best-effort response to a request that failed to parse or validate: copies the raw
/// Via lines and the first From/To/Call-ID/CSeq it finds, adds a To tag when missing and
/// the error's extra headers. `None` for responses, ACKs, and input without a Via.
pub fn error_response(buf: &[u8], err: &SipError) -> Option<Bytes> {
    let buf = buf.get(..buf.len().min(MAX_MESSAGE_SIZE))?;
    let buf = buf.get(leading_crlf(buf)..)?;
    let head = buf.get(..find_head_end(buf, 0).unwrap_or(buf.len()))?;
    let mut raw_lines = head.split(|&b| b == b'\n');
    let first = String::from_utf8_lossy(raw_lines.next()?);
    let first_word = first.split_ascii_whitespace().next()?;
    if starts_with_ci(first_word, "SIP/") || first_word == "ACK" {
        return None;
    }
    // Unfold into (name, value) lines; lines that are not UTF-8 are skipped.
    let mut found: Vec<(String, String)> = Vec::new();
    let mut last_kept = false;
    for raw in raw_lines.take(MAX_HEADERS * 4) {
        let Ok(line) = std::str::from_utf8(raw) else {
            last_kept = false;
            continue;
        };
        let line = line.strip_suffix('\r').unwrap_or(line);
        if line.is_empty() {
            break;
        }
        if line.contains(['\r', '\0']) {
            last_kept = false;
            continue;
        }
        if line.starts_with([' ', '\t']) {
            if let (true, Some((_, v))) = (last_kept, found.last_mut()) {
                v.push(' ');
                v.push_str(line.trim());
            }
            continue;
        }
        last_kept = false;
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        let name = name.trim();
        let wanted = ["Via", "From", "To", "Call-ID", "CSeq"]
            .into_iter()
            .find(|w| same_header(name, w));
        let Some(canon) = wanted else { continue };
        if canon != "Via" && found.iter().any(|(n, _)| n == canon) {
            continue;
        }
        found.push((canon.to_owned(), value.trim().to_owned()));
        last_kept = true;
    }
    if !found.iter().any(|(n, v)| n == "Via" && !v.is_empty()) {
        return None;
    }
    let (status, reason) = err.status();
    let mut out = format!("SIP/2.0 {status} {reason}\r\n");
    for (n, v) in &found {
        out.push_str(n);
        out.push_str(": ");
        out.push_str(v);
        if n == "To" && NameAddr::parse(v).is_ok_and(|to| to.tag().is_none()) {
            let key: Vec<u8> = found
                .iter()
                .filter(|(n, _)| n == "Call-ID" || n == "From")
                .flat_map(|(_, v)| v.bytes())
                .collect();
            out.push_str(&format!(";tag={:08x}", fnv(&key) as u32));
        }
        out.push_str("\r\n");
    }
    for (n, v) in err.extra_headers() {
        out.push_str(&format!("{n}: {v}\r\n"));
    }
    out.push_str("Content-Length: 0\r\n\r\n");
    Some(Bytes::from(out))
}
