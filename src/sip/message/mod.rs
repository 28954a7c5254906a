//! SIP message parse/print (RFC 3261 §7, §18.3, §20, §25), written by hand.
//!
//! Owns: bytes ⇄ [`Message`] (framing by Content-Length for datagrams and streams, size
//! limits), the typed views of the headers the signalling layers read (Via, name-addr,
//! CSeq, URIs), request validation and best-effort error responses. It must not touch
//! transactions, dialogs, sockets or clocks.
//!
//! Why not a crate: `rsip` mis-parses compact and folded headers, IPv6 and `tel:` URIs
//! and ignores Content-Length; the other SIP crates are tokio-bound or mis-split
//! multi-value headers (DESIGN §7). Parsing starts from `&[u8]` because bodies are
//! binary; the header section must be UTF-8.
//!
//! Liberal where RFC 4475 allows it (several SPs in the request line, trailing SP after
//! the version, spaces inside `< uri >`, no LWS before `<`, bare-LF line ends, RFC 5118
//! three-colon IPv6), strict on framing (Content-Length negative, duplicated, or longer
//! than the datagram is an error; streams need Content-Length).

mod framing;
mod headers;
mod uri;
mod validate;

use std::fmt;

use bytes::{BufMut, Bytes, BytesMut};

pub use framing::{StreamDecoder, parse_datagram};
pub use headers::{CSeq, Headers, NameAddr, Via, same_header};
pub use uri::{Host, Params, Scheme, Uri, unescape};
pub use validate::{error_response, validate_request, validate_response};

use super::error::{SipError, reason_phrase};

/// Largest message accepted (datagram or framed stream message), bytes.
pub const MAX_MESSAGE_SIZE: usize = 64 * 1024;
/// Most header lines accepted (after unfolding).
pub const MAX_HEADERS: usize = 256;
/// Longest header line accepted (after unfolding), bytes.
pub const MAX_HEADER_LINE: usize = 8 * 1024;

/// Why bytes could not be turned into a message or a header value into a typed view.
#[non_exhaustive]
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    /// Only whitespace/CRLF (keep-alive) where a message was expected.
    #[error("empty message")]
    Empty,
    /// Bad request or status line.
    #[error("bad start line: {0}")]
    StartLine(String),
    /// `SIP/x.y` other than 2.0 (→ 505).
    #[error("SIP version not supported: {0}")]
    VersionNotSupported(String),
    /// Header section is not valid UTF-8.
    #[error("header section is not UTF-8")]
    NotUtf8,
    /// Header section not terminated by an empty line.
    #[error("header section not terminated")]
    Unterminated,
    /// Bad header line (name, colon, continuation).
    #[error("bad header line: {0}")]
    HeaderLine(String),
    /// Content-Length negative, non-numeric, duplicated or missing on a stream.
    #[error("bad Content-Length: {0}")]
    ContentLength(String),
    /// Content-Length larger than the bytes that follow the header section.
    #[error("body truncated: Content-Length {expected}, {available} bytes present")]
    Truncated {
        /// Content-Length value.
        expected: usize,
        /// Bytes after the header section.
        available: usize,
    },
    /// A size limit was exceeded (the limit is given).
    #[error("message exceeds limit of {0}")]
    TooLarge(usize),
    /// A mandatory header is missing.
    #[error("missing {0} header")]
    MissingHeader(&'static str),
    /// A header value (URI, Via, name-addr, CSeq, ...) does not parse.
    #[error("{0}")]
    Invalid(String),
}

/// A message that does not parse is answered as the status table says
/// (`SipError::code`): 505 for another SIP version, 513 over the limits,
/// 400 otherwise.
impl From<ParseError> for SipError {
    fn from(e: ParseError) -> Self {
        match e {
            ParseError::VersionNotSupported(_) => SipError::VersionNotSupported,
            ParseError::TooLarge(_) => SipError::MessageTooLarge,
            other => SipError::Malformed(other.to_string()),
        }
    }
}

/// SIP method. Matching is case-sensitive (RFC 3261 §7.1).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Method {
    /// INVITE
    Invite,
    /// ACK
    Ack,
    /// BYE
    Bye,
    /// CANCEL
    Cancel,
    /// OPTIONS
    Options,
    /// REGISTER
    Register,
    /// UPDATE (RFC 3311)
    Update,
    /// INFO (RFC 6086)
    Info,
    /// PRACK (RFC 3262)
    Prack,
    /// REFER (RFC 3515)
    Refer,
    /// NOTIFY (RFC 6665)
    Notify,
    /// SUBSCRIBE (RFC 6665)
    Subscribe,
    /// MESSAGE (RFC 3428)
    Message,
    /// PUBLISH (RFC 3903)
    Publish,
    /// Any other token, as written.
    Extension(String),
}

impl Method {
    /// The method name.
    pub fn as_str(&self) -> &str {
        match self {
            Method::Invite => "INVITE",
            Method::Ack => "ACK",
            Method::Bye => "BYE",
            Method::Cancel => "CANCEL",
            Method::Options => "OPTIONS",
            Method::Register => "REGISTER",
            Method::Update => "UPDATE",
            Method::Info => "INFO",
            Method::Prack => "PRACK",
            Method::Refer => "REFER",
            Method::Notify => "NOTIFY",
            Method::Subscribe => "SUBSCRIBE",
            Method::Message => "MESSAGE",
            Method::Publish => "PUBLISH",
            Method::Extension(s) => s,
        }
    }
}

impl From<&str> for Method {
    fn from(s: &str) -> Self {
        match s {
            "INVITE" => Method::Invite,
            "ACK" => Method::Ack,
            "BYE" => Method::Bye,
            "CANCEL" => Method::Cancel,
            "OPTIONS" => Method::Options,
            "REGISTER" => Method::Register,
            "UPDATE" => Method::Update,
            "INFO" => Method::Info,
            "PRACK" => Method::Prack,
            "REFER" => Method::Refer,
            "NOTIFY" => Method::Notify,
            "SUBSCRIBE" => Method::Subscribe,
            "MESSAGE" => Method::Message,
            "PUBLISH" => Method::Publish,
            other => Method::Extension(other.to_owned()),
        }
    }
}

impl fmt::Display for Method {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A SIP request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// Method.
    pub method: Method,
    /// Request-URI.
    pub uri: Uri,
    /// Header lines in order.
    pub headers: Headers,
    /// Body (exactly Content-Length bytes).
    pub body: Bytes,
}

/// A SIP response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    /// Status code 100..=699.
    pub status: u16,
    /// Reason phrase (may be empty).
    pub reason: String,
    /// Header lines in order.
    pub headers: Headers,
    /// Body.
    pub body: Bytes,
}

/// A request or a response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    /// Request.
    Request(Request),
    /// Response.
    Response(Response),
}

impl Message {
    /// Header lines.
    pub fn headers(&self) -> &Headers {
        match self {
            Message::Request(r) => &r.headers,
            Message::Response(r) => &r.headers,
        }
    }

    /// Serialises (Content-Length set from the body).
    pub fn encode(&self) -> Bytes {
        match self {
            Message::Request(r) => r.encode(),
            Message::Response(r) => r.encode(),
        }
    }
}

/// Writes header lines with Content-Length replaced by (or appended as) the body length.
fn encode_with(start: fmt::Arguments<'_>, headers: &Headers, body: &Bytes) -> Bytes {
    use std::fmt::Write as _;
    let mut head = String::with_capacity(512);
    let _ = write!(head, "{start}\r\n");
    let mut cl_written = false;
    for (n, v) in headers.iter() {
        if same_header(n, "Content-Length") {
            if !cl_written {
                let _ = write!(head, "{n}: {}\r\n", body.len());
                cl_written = true;
            }
            continue;
        }
        let _ = write!(head, "{n}: {v}\r\n");
    }
    if !cl_written {
        let _ = write!(head, "Content-Length: {}\r\n", body.len());
    }
    head.push_str("\r\n");
    let mut out = BytesMut::with_capacity(head.len() + body.len());
    out.put_slice(head.as_bytes());
    out.put_slice(body);
    out.freeze()
}

macro_rules! header_accessors {
    () => {
        /// All Via values, top first.
        pub fn vias(&self) -> Result<Vec<Via>, ParseError> {
            self.headers.vias()
        }
        /// Top Via.
        pub fn top_via(&self) -> Result<Via, ParseError> {
            self.headers.top_via()
        }
        /// From.
        pub fn from(&self) -> Result<NameAddr, ParseError> {
            self.headers.from()
        }
        /// To.
        pub fn to(&self) -> Result<NameAddr, ParseError> {
            self.headers.to()
        }
        /// Call-ID.
        pub fn call_id(&self) -> Result<&str, ParseError> {
            self.headers.call_id()
        }
        /// CSeq.
        pub fn cseq(&self) -> Result<CSeq, ParseError> {
            self.headers.cseq()
        }
        /// Contact values.
        pub fn contacts(&self) -> Result<Vec<NameAddr>, ParseError> {
            self.headers.contacts()
        }
        /// Record-Route values, top first.
        pub fn record_routes(&self) -> Result<Vec<NameAddr>, ParseError> {
            self.headers.record_routes()
        }
        /// Content-Type.
        pub fn content_type(&self) -> Option<&str> {
            self.headers.content_type()
        }
    };
}

impl Request {
    header_accessors!();

    /// Max-Forwards (`None` when absent; error when > 255 or not a number).
    pub fn max_forwards(&self) -> Result<Option<u32>, ParseError> {
        self.headers.max_forwards()
    }

    /// Route values, top first.
    pub fn routes(&self) -> Result<Vec<NameAddr>, ParseError> {
        self.headers.routes()
    }

    /// Serialises the request; Content-Length is set from the body.
    pub fn encode(&self) -> Bytes {
        encode_with(
            format_args!("{} {} SIP/2.0", self.method, self.uri),
            &self.headers,
            &self.body,
        )
    }
}

impl Response {
    header_accessors!();

    /// A response to `req`: every Via, From, To, Call-ID and CSeq line copied in order,
    /// the default reason phrase, no body.
    pub fn for_request(req: &Request, status: u16) -> Response {
        let mut headers = Headers::new();
        for (n, v) in req.headers.iter() {
            if ["Via", "From", "To", "Call-ID", "CSeq"]
                .iter()
                .any(|h| same_header(n, h))
            {
                headers.push(n, v);
            }
        }
        Response {
            status,
            reason: reason_phrase(status).to_owned(),
            headers,
            body: Bytes::new(),
        }
    }

    /// [`Response::for_request`] with the error's status, reason and extra headers.
    pub fn for_error(req: &Request, err: &SipError) -> Response {
        let (status, reason) = err.status();
        let mut r = Response::for_request(req, status);
        r.reason = reason.to_owned();
        for (n, v) in err.extra_headers() {
            r.headers.push(n, v);
        }
        r
    }

    /// Serialises the response; Content-Length is set from the body.
    pub fn encode(&self) -> Bytes {
        encode_with(
            format_args!("SIP/2.0 {} {}", self.status, self.reason),
            &self.headers,
            &self.body,
        )
    }
}
