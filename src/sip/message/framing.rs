//! Framing: where a message starts and ends (datagram or byte stream), the start line,
//! header lines (folding, limits) and Content-Length.

use bytes::{Bytes, BytesMut};

use super::uri::{is_token, starts_with_ci, truncate};
use super::{
    Headers, MAX_HEADER_LINE, MAX_HEADERS, MAX_MESSAGE_SIZE, Message, Method, ParseError, Request,
    Response, Uri,
};

#[derive(Debug)]
pub(crate) enum Start {
    Request(Method, Uri),
    Response(u16, String),
}

#[derive(Debug)]
pub(crate) struct Head {
    start: Start,
    headers: Headers,
    content_length: Option<usize>,
}

/// Offset just past the empty line that ends the header section, searching from `from`.
/// Accepts CRLF and bare LF line ends.
pub(crate) fn find_head_end(buf: &[u8], from: usize) -> Option<usize> {
    let mut i = from;
    while i < buf.len() {
        let nl = i + buf.get(i..)?.iter().position(|&b| b == b'\n')?;
        match (buf.get(nl + 1), buf.get(nl + 2)) {
            (Some(b'\n'), _) => return Some(nl + 2),
            (Some(b'\r'), Some(b'\n')) => return Some(nl + 3),
            _ => i = nl + 1,
        }
    }
    None
}

/// Number of leading CR/LF bytes (keep-alives and RFC 3261 §7.5 leading CRLFs).
pub(crate) fn leading_crlf(buf: &[u8]) -> usize {
    buf.iter()
        .take_while(|&&b| b == b'\r' || b == b'\n')
        .count()
}

/// Splits the header section text into lines without their CR/LF ends.
pub(crate) fn lines(head: &str) -> impl Iterator<Item = &str> {
    head.split('\n').map(|l| l.strip_suffix('\r').unwrap_or(l))
}

fn parse_start(line: &str) -> Result<Start, ParseError> {
    let bad = || ParseError::StartLine(truncate(line).to_owned());
    let check_version = |v: &str| {
        if v.eq_ignore_ascii_case("SIP/2.0") {
            Ok(())
        } else if v.len() > 4 && starts_with_ci(v, "SIP/") {
            Err(ParseError::VersionNotSupported(truncate(v).to_owned()))
        } else {
            Err(bad())
        }
    };
    if starts_with_ci(line, "SIP/") {
        let (version, rest) = line.split_once(' ').unwrap_or((line, ""));
        check_version(version)?;
        let rest = rest.trim_start();
        let (code, reason) = rest.split_once(' ').unwrap_or((rest, ""));
        if code.len() != 3 || !code.bytes().all(|b| b.is_ascii_digit()) {
            return Err(bad());
        }
        let status: u16 = code.parse().map_err(|_| bad())?;
        if !(100..=699).contains(&status) {
            return Err(bad());
        }
        return Ok(Start::Response(status, reason.trim().to_owned()));
    }
    let parts: Vec<&str> = line.split_ascii_whitespace().take(4).collect();
    let [method, uri, version] = parts[..] else {
        return Err(bad());
    };
    check_version(version)?;
    if !is_token(method) {
        return Err(bad());
    }
    let uri = Uri::parse(uri)?;
    Ok(Start::Request(Method::from(method), uri))
}

/// Parses the header section (`head` ends with the empty line).
pub(crate) fn parse_head(head: &[u8]) -> Result<Head, ParseError> {
    let text = std::str::from_utf8(head).map_err(|_| ParseError::NotUtf8)?;
    let mut it = lines(text);
    let start = parse_start(it.next().unwrap_or(""))?;
    let mut raw: Vec<(String, String)> = Vec::new();
    for line in it {
        if line.is_empty() {
            break;
        }
        if line.len() > MAX_HEADER_LINE {
            return Err(ParseError::TooLarge(MAX_HEADER_LINE));
        }
        if line.contains('\r') {
            return Err(ParseError::HeaderLine("bare CR".into()));
        }
        if line.starts_with([' ', '\t']) {
            let (_, value) = raw
                .last_mut()
                .ok_or_else(|| ParseError::HeaderLine("continuation before any header".into()))?;
            if value.len() + line.len() > MAX_HEADER_LINE {
                return Err(ParseError::TooLarge(MAX_HEADER_LINE));
            }
            let cont = line.trim();
            if !cont.is_empty() {
                if !value.is_empty() {
                    value.push(' ');
                }
                value.push_str(cont);
            }
            continue;
        }
        let (name, value) = line
            .split_once(':')
            .ok_or_else(|| ParseError::HeaderLine(truncate(line).to_owned()))?;
        let name = name.trim_end_matches([' ', '\t']);
        if !is_token(name) {
            return Err(ParseError::HeaderLine(truncate(line).to_owned()));
        }
        if raw.len() >= MAX_HEADERS {
            return Err(ParseError::TooLarge(MAX_HEADERS));
        }
        raw.push((name.to_owned(), value.trim().to_owned()));
    }
    let mut headers = Headers::new();
    for (n, v) in raw {
        headers.push(&n, v);
    }
    let content_length = content_length(&headers)?;
    Ok(Head {
        start,
        headers,
        content_length,
    })
}

fn content_length(headers: &Headers) -> Result<Option<usize>, ParseError> {
    let mut cls = headers.get_all("Content-Length");
    Ok(match (cls.next(), cls.next()) {
        (None, _) => None,
        (Some(v), None) => {
            if v.is_empty() || v.len() > 10 || !v.bytes().all(|b| b.is_ascii_digit()) {
                return Err(ParseError::ContentLength(truncate(v).to_owned()));
            }
            Some(
                v.parse::<usize>()
                    .map_err(|_| ParseError::ContentLength(v.to_owned()))?,
            )
        }
        (Some(_), Some(_)) => return Err(ParseError::ContentLength("duplicated".into())),
    })
}

fn build(head: Head, body: Bytes) -> Message {
    match head.start {
        Start::Request(method, uri) => Message::Request(Request {
            method,
            uri,
            headers: head.headers,
            body,
        }),
        Start::Response(status, reason) => Message::Response(Response {
            status,
            reason,
            headers: head.headers,
            body,
        }),
    }
}

/// Parses one UDP datagram. Leading CRLFs are skipped; bytes after Content-Length are
/// ignored; without Content-Length the body is the rest of the datagram (RFC 3261 §18.3).
pub fn parse_datagram(buf: &[u8]) -> Result<Message, ParseError> {
    if buf.len() > MAX_MESSAGE_SIZE {
        return Err(ParseError::TooLarge(MAX_MESSAGE_SIZE));
    }
    let buf = buf.get(leading_crlf(buf)..).unwrap_or_default();
    if buf.iter().all(u8::is_ascii_whitespace) {
        return Err(ParseError::Empty);
    }
    let end = find_head_end(buf, 0).ok_or(ParseError::Unterminated)?;
    let (head_bytes, rest) = buf.split_at(end);
    let head = parse_head(head_bytes)?;
    let body = match head.content_length {
        Some(n) => rest.get(..n).ok_or(ParseError::Truncated {
            expected: n,
            available: rest.len(),
        })?,
        None => rest,
    };
    Ok(build(head, Bytes::copy_from_slice(body)))
}

/// Frames messages on a byte stream (TCP/TLS) by Content-Length, which is mandatory.
/// Push received bytes, then call [`StreamDecoder::next_message`] until it returns
/// `Ok(None)`. An `Err` means framing is lost: close the connection.
#[derive(Debug)]
pub struct StreamDecoder {
    buf: BytesMut,
    max_message: usize,
    /// Bytes of `buf` already searched for the end of the header section.
    scanned: usize,
    /// Header section of the message in progress: (head, head length, body length).
    pending: Option<(Box<Head>, usize, usize)>,
    keepalives: u64,
}

impl StreamDecoder {
    /// A decoder that refuses messages larger than `max_message` bytes.
    pub fn new(max_message: usize) -> Self {
        StreamDecoder {
            buf: BytesMut::new(),
            max_message,
            scanned: 0,
            pending: None,
            keepalives: 0,
        }
    }

    /// Appends received bytes.
    pub fn push(&mut self, data: &[u8]) {
        self.buf.extend_from_slice(data);
    }

    /// Bytes buffered and not yet returned as a message.
    pub fn buffered(&self) -> usize {
        self.buf.len()
    }

    /// How many CRLF keep-alive bytes runs were skipped between messages so far.
    pub fn keepalives(&self) -> u64 {
        self.keepalives
    }

    /// The next complete message, `Ok(None)` if more bytes are needed.
    pub fn next_message(&mut self) -> Result<Option<Message>, ParseError> {
        if self.pending.is_none() {
            let skip = leading_crlf(&self.buf);
            if skip > 0 {
                let _ = self.buf.split_to(skip);
                self.scanned = 0;
                self.keepalives += 1;
            }
            let Some(end) = find_head_end(&self.buf, self.scanned.saturating_sub(3)) else {
                self.scanned = self.buf.len();
                if self.buf.len() > self.max_message {
                    return Err(ParseError::TooLarge(self.max_message));
                }
                return Ok(None);
            };
            if end > self.max_message {
                return Err(ParseError::TooLarge(self.max_message));
            }
            let head = parse_head(self.buf.get(..end).unwrap_or_default())?;
            let cl = head
                .content_length
                .ok_or_else(|| ParseError::ContentLength("missing on a stream".into()))?;
            if end.saturating_add(cl) > self.max_message {
                return Err(ParseError::TooLarge(self.max_message));
            }
            self.pending = Some((Box::new(head), end, cl));
        }
        let Some((_, end, cl)) = &self.pending else {
            return Ok(None);
        };
        let (end, cl) = (*end, *cl);
        if self.buf.len() < end + cl {
            return Ok(None);
        }
        let Some((head, _, _)) = self.pending.take() else {
            return Ok(None);
        };
        let mut msg = self.buf.split_to(end + cl);
        let body = msg.split_off(end).freeze();
        self.scanned = 0;
        Ok(Some(build(*head, body)))
    }
}
