//! The one table that maps SIP-level failures to wire responses (status code, reason
//! phrase, and the extra headers RFC 3261 requires with them).
//!
//! Owns: [`SipError`], its status table ([`SipError::code`]) and the reason phrases
//! of every status code ([`reason_phrase`]): the only place in the crate that maps
//! SIP failures to status codes and codes to phrases. The other layers' errors
//! (`message::ParseError`, `sdp::SdpError`, `digest::DigestError`) convert into
//! [`SipError`] beside their own definitions, so this module imports none of them.
//! It does not build messages (see `message::error_response` and
//! `Response::for_error`) and never looks at sockets.

/// Methods a UAS on this daemon answers; sent in `Allow` with 405/501.
pub const ALLOWED_METHODS: &str = "INVITE, ACK, CANCEL, BYE, OPTIONS, UPDATE";
/// Option tags we support (RFC 4028 session timers); sent in `Supported`.
pub const SUPPORTED_OPTION_TAGS: &[&str] = &["timer"];

/// A SIP-level failure that is answered with a final response.
#[non_exhaustive]
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SipError {
    /// Syntax error, missing or duplicated mandatory header, value out of range.
    #[error("malformed message: {0}")]
    Malformed(String),
    /// `SIP/x.y` other than 2.0.
    #[error("SIP version not supported")]
    VersionNotSupported,
    /// Message over the size limits (whole message, header count, line length).
    #[error("message too large")]
    MessageTooLarge,
    /// Max-Forwards reached 0 where we would have to forward.
    #[error("too many hops")]
    TooManyHops,
    /// Method we do not know at all.
    #[error("unknown method")]
    UnknownMethod,
    /// Method we know but do not accept here (e.g. REGISTER).
    #[error("method not allowed")]
    MethodNotAllowed,
    /// `Require` lists option tags we do not support (listed in `Unsupported`).
    #[error("bad extension: {0:?}")]
    BadExtension(Vec<String>),
    /// Body type (or encoding) we cannot read.
    #[error("unsupported media type")]
    UnsupportedMediaType,
    /// Request-URI scheme other than sip/sips/tel.
    #[error("unsupported URI scheme")]
    UnsupportedUriScheme,
    /// `Accept` excludes every body type we could answer with.
    #[error("not acceptable")]
    NotAcceptable,
    /// Source not allowed (CIDR allow-list, failed auth policy).
    #[error("forbidden")]
    Forbidden,
    /// No route for the Request-URI.
    #[error("not found")]
    NotFound,
    /// In-dialog request or CANCEL that matches nothing.
    #[error("call/transaction does not exist")]
    CallDoesNotExist,
    /// Session-Expires below our Min-SE (RFC 4028 §6).
    #[error("session interval too small (min {min_se} s)")]
    IntervalTooBrief {
        /// Our minimum, sent back in `Min-SE`.
        min_se: u32,
    },
    /// Credentials missing, stale or wrong: challenge again (401, or 407 when
    /// the challenge goes in `Proxy-Authenticate`; the caller builds it).
    #[error("unauthorized")]
    Unauthorized,
    /// Callee busy / per-tenant limit reached.
    #[error("busy here")]
    BusyHere,
    /// No common codec or unusable SDP.
    #[error("not acceptable here")]
    NotAcceptableHere,
    /// Global overload; `Retry-After` in seconds when given.
    #[error("service unavailable")]
    ServiceUnavailable {
        /// Seconds for `Retry-After`.
        retry_after: Option<u32>,
    },
    /// Bug or unexpected state on our side.
    #[error("server internal error")]
    ServerInternal,
}

impl SipError {
    /// The status code for this error: the single table.
    pub fn code(&self) -> u16 {
        match self {
            SipError::Malformed(_) => 400,
            SipError::Unauthorized => 401,
            SipError::Forbidden => 403,
            SipError::NotFound => 404,
            SipError::MethodNotAllowed => 405,
            SipError::NotAcceptable => 406,
            SipError::UnsupportedMediaType => 415,
            SipError::UnsupportedUriScheme => 416,
            SipError::BadExtension(_) => 420,
            SipError::IntervalTooBrief { .. } => 422,
            SipError::CallDoesNotExist => 481,
            SipError::TooManyHops => 483,
            SipError::BusyHere => 486,
            SipError::NotAcceptableHere => 488,
            SipError::ServerInternal => 500,
            SipError::UnknownMethod => 501,
            SipError::ServiceUnavailable { .. } => 503,
            SipError::VersionNotSupported => 505,
            SipError::MessageTooLarge => 513,
        }
    }

    /// The status code and its reason phrase ([`reason_phrase`]).
    pub fn status(&self) -> (u16, &'static str) {
        let code = self.code();
        (code, reason_phrase(code))
    }

    /// Headers RFC 3261/4028 require alongside this status.
    pub fn extra_headers(&self) -> Vec<(&'static str, String)> {
        match self {
            SipError::BadExtension(tags) => vec![("Unsupported", tags.join(", "))],
            SipError::UnsupportedMediaType => vec![
                ("Accept", "application/sdp".to_owned()),
                ("Accept-Encoding", "identity".to_owned()),
            ],
            SipError::MethodNotAllowed | SipError::UnknownMethod => {
                vec![("Allow", ALLOWED_METHODS.to_owned())]
            }
            SipError::IntervalTooBrief { min_se } => vec![("Min-SE", min_se.to_string())],
            SipError::ServiceUnavailable {
                retry_after: Some(s),
            } => vec![("Retry-After", s.to_string())],
            _ => Vec::new(),
        }
    }
}

/// Default reason phrase for a status code (RFC 3261 §21 and extensions).
pub fn reason_phrase(status: u16) -> &'static str {
    match status {
        100 => "Trying",
        180 => "Ringing",
        181 => "Call Is Being Forwarded",
        182 => "Queued",
        183 => "Session Progress",
        200 => "OK",
        202 => "Accepted",
        301 => "Moved Permanently",
        302 => "Moved Temporarily",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        406 => "Not Acceptable",
        407 => "Proxy Authentication Required",
        408 => "Request Timeout",
        413 => "Request Entity Too Large",
        415 => "Unsupported Media Type",
        416 => "Unsupported URI Scheme",
        420 => "Bad Extension",
        421 => "Extension Required",
        422 => "Session Interval Too Small",
        423 => "Interval Too Brief",
        480 => "Temporarily Unavailable",
        481 => "Call/Transaction Does Not Exist",
        482 => "Loop Detected",
        483 => "Too Many Hops",
        484 => "Address Incomplete",
        486 => "Busy Here",
        487 => "Request Terminated",
        488 => "Not Acceptable Here",
        491 => "Request Pending",
        500 => "Server Internal Error",
        501 => "Not Implemented",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Server Time-out",
        505 => "Version Not Supported",
        513 => "Message Too Large",
        600 => "Busy Everywhere",
        603 => "Decline",
        604 => "Does Not Exist Anywhere",
        606 => "Not Acceptable",
        _ => class_phrase(status),
    }
}

fn class_phrase(status: u16) -> &'static str {
    match status {
        100..=199 => "Session Progress",
        200..=299 => "OK",
        300..=399 => "Redirection",
        400..=499 => "Client Error",
        500..=599 => "Server Error",
        _ => "Global Failure",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_matches_issue() {
        assert_eq!(SipError::Malformed("x".into()).status().0, 400);
        assert_eq!(SipError::VersionNotSupported.status().0, 505);
        assert_eq!(SipError::TooManyHops.status().0, 483);
        assert_eq!(SipError::UnknownMethod.status().0, 501);
        assert_eq!(SipError::MethodNotAllowed.status().0, 405);
        assert_eq!(SipError::BadExtension(vec![]).status().0, 420);
        assert_eq!(SipError::UnsupportedMediaType.status().0, 415);
        assert_eq!(SipError::UnsupportedUriScheme.status().0, 416);
        assert_eq!(SipError::Unauthorized.status(), (401, "Unauthorized"));
        assert_eq!(SipError::BusyHere.status(), (486, "Busy Here"));
    }

    #[test]
    fn extra_headers() {
        let e = SipError::BadExtension(vec!["a".into(), "b".into()]);
        assert_eq!(e.extra_headers(), vec![("Unsupported", "a, b".to_owned())]);
        assert_eq!(
            SipError::MethodNotAllowed.extra_headers()[0],
            ("Allow", ALLOWED_METHODS.to_owned())
        );
        assert_eq!(
            SipError::IntervalTooBrief { min_se: 90 }.extra_headers(),
            vec![("Min-SE", "90".to_owned())]
        );
        assert!(SipError::NotFound.extra_headers().is_empty());
    }
}
