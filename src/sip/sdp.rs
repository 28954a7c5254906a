//! SDP offer/answer (RFC 3264) for one G.711 audio stream plus RFC 4733
//! telephone-event.
//!
//! Owns: reading the peer's SDP (parsed by `ezk-sdp-types`), choosing the codec
//! by *our* preference order, mirroring the direction attribute (hold), and
//! writing our offers and answers with an `o=` version that only moves when
//! the body changes (RFC 3264 §8).
//!
//! Must not touch: SIP messages (the caller hands in bodies as bytes and puts
//! ours into its response), sockets, clocks or random numbers (the session id
//! comes from the caller).
//!
//! Written by hand on purpose: our own SDP is *printed* here rather than through
//! `ezk_sdp_types::SessionDescription`'s `Display`, because ezk's `MediaType`
//! has no variant for `image` (T.38) or `message`, and RFC 3264 §6 requires a
//! rejected stream to be answered with its own media type and protocol. For
//! the same reason such `m=` lines are renamed before ezk parses the peer's
//! body and their original tokens are kept beside it.

use std::fmt::Write as _;
use std::net::{IpAddr, SocketAddr};

use bytes::Bytes;
use bytesstr::BytesStr;
use ezk_sdp_types::{MediaDescription, MediaType, SessionDescription, TaggedAddress};

use super::error::SipError;
use super::sdes;
pub use super::sdes::{CryptoSuite, KeyMaterial, MAX_KEY_MATERIAL, SrtpParams};

/// Largest SDP body accepted from a peer.
pub const MAX_SDP_LEN: usize = 32 * 1024;

/// Most `m=` lines accepted in one body (each one costs a line in the answer).
pub const MAX_MEDIA_LINES: usize = 32;

/// DTMF events we accept and advertise (RFC 4733 §3.2: digits, `*`, `#`, A–D, flash).
const TELEPHONE_EVENTS: &str = "0-16";

/// Packetisation times we agree to follow when the peer asks for one.
const PTIME_RANGE_MS: std::ops::RangeInclusive<u32> = 10..=60;

/// Longest error text kept from the SDP parser.
const MAX_ERROR_TEXT: usize = 200;

/// Audio codecs the bridge speaks: G.711 µ-law and A-law.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Codec {
    /// G.711 µ-law, static payload type 0.
    Pcmu,
    /// G.711 A-law, static payload type 8.
    Pcma,
}

impl Codec {
    /// The static RTP payload type (RFC 3551 table 4).
    pub const fn static_payload_type(self) -> u8 {
        match self {
            Self::Pcmu => 0,
            Self::Pcma => 8,
        }
    }

    /// The encoding name used in `a=rtpmap`.
    pub const fn encoding_name(self) -> &'static str {
        match self {
            Self::Pcmu => "PCMU",
            Self::Pcma => "PCMA",
        }
    }

    /// RTP clock rate in Hz.
    pub const fn clock_rate(self) -> u32 {
        8000
    }

    fn from_static_payload_type(pt: u8) -> Option<Self> {
        match pt {
            0 => Some(Self::Pcmu),
            8 => Some(Self::Pcma),
            _ => None,
        }
    }

    fn from_rtpmap(encoding: &str, clock_rate: u32, channels: Option<&str>) -> Option<Self> {
        if clock_rate != 8000 || channels.is_some_and(|c| c.trim() != "1") {
            return None;
        }
        if encoding.eq_ignore_ascii_case("PCMU") {
            Some(Self::Pcmu)
        } else if encoding.eq_ignore_ascii_case("PCMA") {
            Some(Self::Pcma)
        } else {
            None
        }
    }
}

/// Media direction (RFC 3264 §5.1), always from the point of view of the side
/// that wrote it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Direction {
    /// Sends and receives.
    #[default]
    SendRecv,
    /// Sends only (the classic "hold" offer).
    SendOnly,
    /// Receives only.
    RecvOnly,
    /// Neither.
    Inactive,
}

impl Direction {
    /// Whether this side sends media.
    pub const fn sends(self) -> bool {
        matches!(self, Self::SendRecv | Self::SendOnly)
    }

    /// Whether this side receives media.
    pub const fn receives(self) -> bool {
        matches!(self, Self::SendRecv | Self::RecvOnly)
    }

    /// The direction with the given abilities.
    pub const fn from_flags(sends: bool, receives: bool) -> Self {
        match (sends, receives) {
            (true, true) => Self::SendRecv,
            (true, false) => Self::SendOnly,
            (false, true) => Self::RecvOnly,
            (false, false) => Self::Inactive,
        }
    }

    /// The other side's view: `sendonly` ↔ `recvonly`, the rest unchanged.
    pub const fn reversed(self) -> Self {
        Self::from_flags(self.receives(), self.sends())
    }

    /// The SDP attribute name.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::SendRecv => "sendrecv",
            Self::SendOnly => "sendonly",
            Self::RecvOnly => "recvonly",
            Self::Inactive => "inactive",
        }
    }

    fn from_ezk(d: ezk_sdp_types::Direction) -> Self {
        match d {
            ezk_sdp_types::Direction::SendRecv => Self::SendRecv,
            ezk_sdp_types::Direction::SendOnly => Self::SendOnly,
            ezk_sdp_types::Direction::RecvOnly => Self::RecvOnly,
            ezk_sdp_types::Direction::Inactive => Self::Inactive,
        }
    }
}

/// What we can do locally: where we receive RTP and which codecs we prefer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalMedia {
    /// The address we advertise in `c=` and `o=`.
    pub addr: IpAddr,
    /// The RTP port we receive on.
    pub rtp_port: u16,
    /// Codecs in our order of preference (the first one offered by the peer wins).
    pub codecs: Vec<Codec>,
    /// The payload type we offer for telephone-event (usually 101).
    pub telephone_event_pt: u8,
    /// The packetisation time we ask for, in milliseconds (usually 20).
    pub ptime_ms: u32,
    /// Whether media is SRTP (SDES keys, RFC 4568).
    pub encryption: Encryption,
    /// The signalling carrying this SDP is TLS end to end (`a=crypto` keys
    /// are only ever read or sent then).
    pub secure_signalling: bool,
    /// Our SRTP master key and salt (at least [`MAX_KEY_MATERIAL`] bytes,
    /// from the caller's RNG); `None`: we cannot do SRTP.
    pub srtp_key: Option<KeyMaterial>,
}

/// SRTP policy of a call (a trunk's `media_encryption`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Encryption {
    /// Plain RTP only.
    #[default]
    Off,
    /// SRTP when the peer offers it, plain RTP otherwise.
    Optional,
    /// SRTP only: a plain offer is 488.
    Required,
}

impl LocalMedia {
    /// PCMU then PCMA, telephone-event on 101, 20 ms packets.
    pub fn new(addr: IpAddr, rtp_port: u16) -> Self {
        Self {
            addr,
            rtp_port,
            codecs: vec![Codec::Pcmu, Codec::Pcma],
            telephone_event_pt: 101,
            ptime_ms: 20,
            encryption: Encryption::Off,
            secure_signalling: false,
            srtp_key: None,
        }
    }

    /// Whether SDES keys may be exchanged at all (policy, TLS, our key).
    fn srtp_possible(&self) -> bool {
        self.encryption != Encryption::Off && self.secure_signalling && self.srtp_key.is_some()
    }
}

/// The outcome of one offer/answer exchange: what the media layer must do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Negotiated {
    /// The one audio codec both sides use.
    pub codec: Codec,
    /// Its RTP payload type (the peer's numbering when it used a dynamic one).
    pub payload_type: u8,
    /// telephone-event payload type, when both sides agreed on it.
    pub telephone_event_pt: Option<u8>,
    /// Where to send RTP; `None` when the peer's `c=` is `0.0.0.0`/`::`
    /// (RFC 3264 §8.4: send nothing to it).
    pub remote_rtp: Option<SocketAddr>,
    /// The peer's direction as its SDP means it: a `c=0.0.0.0` peer does not
    /// receive, so its `sendrecv` counts as `sendonly` here.
    pub remote_direction: Direction,
    /// What we do: send when `local_direction.sends()`, play out what we
    /// receive when `local_direction.receives()`.
    pub local_direction: Direction,
    /// Packetisation time to send with: the peer's `a=ptime` when it asks for
    /// one in 10–60 ms, otherwise ours.
    pub ptime_ms: u32,
    /// SRTP suite and keys; `None`: plain RTP.
    pub srtp: Option<SrtpParams>,
}

/// Offer/answer failures, each with the SIP status it answers (see [`SdpError::status`]).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SdpError {
    /// Not SDP we can read (not UTF-8, too large, a broken line, no `c=`).
    #[error("malformed SDP: {0}")]
    Malformed(String),
    /// No usable audio stream (no `m=audio`, or every one has port 0).
    #[error("no audio stream in SDP")]
    NoAudio,
    /// Audio offered, but only over a transport we do not speak (e.g. RTP/SAVP).
    #[error("unsupported media transport {0}")]
    UnsupportedTransport(String),
    /// The trunk requires SRTP and the offer has no usable `RTP/SAVP` stream
    /// (or came over signalling that is not TLS).
    #[error("media encryption required")]
    EncryptionRequired,
    /// Audio offered, but neither PCMU nor PCMA (in our list) among its formats.
    #[error("no common codec")]
    NoCommonCodec,
    /// The audio connection address is a host name; we do not resolve names here.
    #[error("connection address {0} is not an IP address")]
    UnresolvedAddress(String),
    /// `accept_answer` was called with no offer of ours outstanding (caller misuse).
    #[error("no offer is waiting for an answer")]
    NoPendingOffer,
}

impl SdpError {
    /// The SIP response status for this error when it comes from a request's
    /// SDP (the status table's code for the [`SipError`] it is).
    pub fn status(&self) -> u16 {
        SipError::from(self).code()
    }
}

impl From<&SdpError> for SipError {
    /// An SDP that does not parse is a malformed request (400); one we cannot
    /// answer is not acceptable here (488); our own misuse is internal (500).
    fn from(e: &SdpError) -> SipError {
        match e {
            SdpError::Malformed(why) => SipError::Malformed(why.clone()),
            SdpError::NoAudio
            | SdpError::UnsupportedTransport(_)
            | SdpError::EncryptionRequired
            | SdpError::NoCommonCodec
            | SdpError::UnresolvedAddress(_) => SipError::NotAcceptableHere,
            SdpError::NoPendingOffer => SipError::ServerInternal,
        }
    }
}

/// Our side of the SDP session of one dialog: the `o=` line and what we sent.
#[derive(Debug, Clone)]
pub struct SdpSession {
    username: String,
    session_id: u64,
    version: u64,
    /// Our last body rendered with version 0, to tell whether a new one changed.
    last_content: Option<String>,
    last_body: Option<Bytes>,
    pending_offer: Option<PendingOffer>,
}

#[derive(Debug, Clone)]
struct PendingOffer {
    codecs: Vec<Codec>,
    direction: Direction,
    ptime_ms: u32,
    /// The suite of our `a=crypto` line, when we offered SRTP.
    srtp: Option<CryptoSuite>,
}

impl SdpSession {
    /// A session whose `o=` line carries `username` and `session_id` (the
    /// caller draws the id from its injected RNG). The first body gets version 1.
    pub fn new(session_id: u64, username: &str) -> Self {
        let username: String = username
            .chars()
            .filter(|c| c.is_ascii_graphic())
            .take(64)
            .collect();
        Self {
            username: if username.is_empty() {
                "-".to_owned()
            } else {
                username
            },
            session_id,
            version: 1,
            last_content: None,
            last_body: None,
            pending_offer: None,
        }
    }

    /// The `o=` session version of our last body (1 before any).
    pub fn version(&self) -> u64 {
        self.version
    }

    /// The last body we produced (offer or answer), to resend unchanged when a
    /// re-INVITE without SDP or a session refresh asks for it.
    pub fn last_body(&self) -> Option<&Bytes> {
        self.last_body.as_ref()
    }

    /// Answers the peer's `offer` (RFC 3264 §6): picks the first codec of
    /// `local.codecs` that the offer carries, accepts telephone-event/8000
    /// with the offerer's payload type, mirrors the direction, and answers
    /// every other `m=` line with port 0.
    pub fn answer(
        &mut self,
        offer: &[u8],
        local: &LocalMedia,
    ) -> Result<(Negotiated, Bytes), SdpError> {
        let parsed = ParsedSdp::parse(offer)?;
        let chosen = choose_audio(&parsed, local)?;
        let md = &parsed.session.media_descriptions[chosen.index];
        let srtp = match (&chosen.crypto, &local.srtp_key) {
            (Some(c), Some(ours)) => Some(SrtpParams {
                suite: c.suite,
                tag: c.tag,
                local: ours.clone(),
                remote: c.key.clone(),
            }),
            _ => None,
        };

        let remote_ip = connection_ip(&parsed.session, md)?;
        let remote_direction = effective_direction(md.direction, remote_ip);
        let local_direction = remote_direction.reversed();
        let telephone_event_pt = find_telephone_event(md);

        let mut lines = Vec::with_capacity(parsed.raw.len());
        for (i, raw) in parsed.raw.iter().enumerate() {
            if i == chosen.index {
                lines.push(MLine::Audio(AudioLine {
                    port: local.rtp_port,
                    proto: raw.proto.clone(),
                    formats: vec![(chosen.payload_type, chosen.codec)],
                    telephone_event_pt,
                    ptime_ms: local.ptime_ms,
                    direction: local_direction,
                    crypto: srtp
                        .as_ref()
                        .map(|p| sdes::crypto_attribute(p.tag, p.suite, &p.local)),
                }));
            } else {
                lines.push(MLine::Rejected(raw.clone()));
            }
        }

        let negotiated = Negotiated {
            codec: chosen.codec,
            payload_type: chosen.payload_type,
            telephone_event_pt,
            remote_rtp: remote_ip.map(|ip| SocketAddr::new(ip, md.media.port)),
            remote_direction,
            local_direction,
            ptime_ms: ptime(&parsed.session, md).unwrap_or(local.ptime_ms),
            srtp,
        };
        self.pending_offer = None;
        let body = self.commit(local.addr, &lines);
        Ok((negotiated, body))
    }

    /// Our offer: one audio stream with `local.codecs` (static payload types,
    /// in preference order) and telephone-event, sent with `direction`. Used
    /// for delayed offer (an INVITE without SDP gets this in our 200) and for
    /// our re-INVITEs. The version moves only when the body differs from our
    /// last one.
    pub fn offer(&mut self, local: &LocalMedia, direction: Direction) -> Bytes {
        let mut codecs: Vec<Codec> = Vec::with_capacity(local.codecs.len());
        for &c in &local.codecs {
            if !codecs.contains(&c) {
                codecs.push(c);
            }
        }
        // SRTP in our own offer only where plain RTP would be refused anyway.
        let srtp = (local.srtp_possible() && local.encryption == Encryption::Required)
            .then_some(CryptoSuite::AesCm128HmacSha1_80);
        let crypto = srtp
            .zip(local.srtp_key.as_ref())
            .map(|(suite, key)| sdes::crypto_attribute(1, suite, key));
        let line = MLine::Audio(AudioLine {
            port: local.rtp_port,
            proto: if crypto.is_some() {
                "RTP/SAVP"
            } else {
                "RTP/AVP"
            }
            .to_owned(),
            crypto,
            formats: codecs
                .iter()
                .map(|&c| (c.static_payload_type(), c))
                .collect(),
            telephone_event_pt: Some(local.telephone_event_pt),
            ptime_ms: local.ptime_ms,
            direction,
        });
        self.pending_offer = Some(PendingOffer {
            codecs,
            direction,
            ptime_ms: local.ptime_ms,
            srtp,
        });
        self.commit(local.addr, &[line])
    }

    /// Reads the peer's answer to our last [`offer`](Self::offer) (in the ACK
    /// after a delayed offer, or in the 200 to our re-INVITE).
    pub fn accept_answer(
        &mut self,
        answer: &[u8],
        local: &LocalMedia,
    ) -> Result<Negotiated, SdpError> {
        let pending = self.pending_offer.take().ok_or(SdpError::NoPendingOffer)?;
        let parsed = ParsedSdp::parse(answer)?;
        // We offered exactly one stream; RFC 3264 §6 keeps it first.
        let md = parsed
            .session
            .media_descriptions
            .first()
            .ok_or(SdpError::NoAudio)?;
        if md.media.media_type != MediaType::Audio {
            return Err(SdpError::Malformed(
                "answer's first m= line is not audio".to_owned(),
            ));
        }
        if md.media.port == 0 {
            return Err(SdpError::NoCommonCodec);
        }
        let (payload_type, codec) = md
            .media
            .fmts
            .iter()
            .find_map(|&pt| {
                payload_codec(md, pt)
                    .filter(|c| pending.codecs.contains(c))
                    .map(|c| (pt, c))
            })
            .ok_or(SdpError::NoCommonCodec)?;

        let srtp = match (pending.srtp, &local.srtp_key) {
            (Some(suite), Some(ours)) => {
                let c = sdes::answered(&md.crypto, suite).ok_or(SdpError::EncryptionRequired)?;
                Some(SrtpParams {
                    suite,
                    tag: c.tag,
                    local: ours.clone(),
                    remote: c.key,
                })
            }
            _ => None,
        };
        let remote_ip = connection_ip(&parsed.session, md)?;
        let remote_direction = effective_direction(md.direction, remote_ip);
        let mirrored = remote_direction.reversed();
        let local_direction = Direction::from_flags(
            pending.direction.sends() && mirrored.sends(),
            pending.direction.receives() && mirrored.receives(),
        );
        Ok(Negotiated {
            codec,
            payload_type,
            telephone_event_pt: find_telephone_event(md),
            remote_rtp: remote_ip.map(|ip| SocketAddr::new(ip, md.media.port)),
            remote_direction,
            local_direction,
            ptime_ms: ptime(&parsed.session, md).unwrap_or(pending.ptime_ms),
            srtp,
        })
    }

    /// Renders `lines`, bumping the version only when the content changed.
    fn commit(&mut self, addr: IpAddr, lines: &[MLine]) -> Bytes {
        let content = self.render(addr, lines, 0);
        match &self.last_content {
            Some(last) if *last == content => {
                if let Some(body) = &self.last_body {
                    return body.clone();
                }
            }
            Some(_) => self.version = self.version.saturating_add(1),
            None => {}
        }
        let body = Bytes::from(self.render(addr, lines, self.version));
        self.last_content = Some(content);
        self.last_body = Some(body.clone());
        body
    }

    fn render(&self, addr: IpAddr, lines: &[MLine], version: u64) -> String {
        let family = match addr {
            IpAddr::V4(_) => "IP4",
            IpAddr::V6(_) => "IP6",
        };
        let mut s = String::with_capacity(256);
        // `write!` into a String cannot fail.
        let _ = write!(
            s,
            "v=0\r\no={} {} {version} IN {family} {addr}\r\ns=-\r\nc=IN {family} {addr}\r\nt=0 0\r\n",
            self.username, self.session_id
        );
        for line in lines {
            match line {
                MLine::Rejected(raw) => {
                    // Echo the peer's media, proto and first format where they
                    // are well-formed tokens (RFC 4566 §5.14); otherwise print
                    // a placeholder we and any parser can read (a peer whose
                    // garbage m= line ezk tolerated must not get an answer
                    // nobody can parse — found by fuzz/fuzz_targets/sdp.rs).
                    let media = if is_token(&raw.media, false) {
                        raw.media.as_str()
                    } else {
                        "application"
                    };
                    let proto = if is_token(&raw.proto, true) {
                        raw.proto.as_str()
                    } else {
                        "RTP/AVP"
                    };
                    let fmt = raw
                        .first_fmt
                        .as_deref()
                        .filter(|f| is_token(f, false))
                        .unwrap_or("0");
                    let _ = write!(s, "m={media} 0 {proto} {fmt}\r\n");
                }
                MLine::Audio(a) => {
                    let _ = write!(s, "m=audio {} {}", a.port, a.proto);
                    for (pt, _) in &a.formats {
                        let _ = write!(s, " {pt}");
                    }
                    if let Some(te) = a.telephone_event_pt {
                        let _ = write!(s, " {te}");
                    }
                    s.push_str("\r\n");
                    for (pt, codec) in &a.formats {
                        let _ = write!(
                            s,
                            "a=rtpmap:{pt} {}/{}\r\n",
                            codec.encoding_name(),
                            codec.clock_rate()
                        );
                    }
                    if let Some(te) = a.telephone_event_pt {
                        let _ = write!(
                            s,
                            "a=rtpmap:{te} telephone-event/8000\r\na=fmtp:{te} {TELEPHONE_EVENTS}\r\n"
                        );
                    }
                    if let Some(crypto) = &a.crypto {
                        s.push_str(crypto);
                        s.push_str("\r\n");
                    }
                    let _ = write!(
                        s,
                        "a=ptime:{}\r\na={}\r\n",
                        a.ptime_ms,
                        a.direction.as_str()
                    );
                }
            }
        }
        s
    }
}

/// An `a=crypto` line with every `|2^N` lifetime above 2^31 written as
/// `|2^31`. ezk-sdp-types 0.6.1 computes `2u32.pow(N)`, which overflows (a
/// panic where overflow checks are on) for N ≥ 32, and RFC 4568 allows up to
/// 2^48; every lifetime of at least 2^31 means the same to us (long enough,
/// see `sdes::choose`). Found by replaying the `sdp` fuzz corpus in a debug
/// build.
fn clamp_crypto_lifetimes(line: &str) -> std::borrow::Cow<'_, str> {
    if !line.contains("|2^") {
        return std::borrow::Cow::Borrowed(line);
    }
    let mut out = String::with_capacity(line.len());
    let mut rest = line;
    while let Some(at) = rest.find("|2^") {
        out.push_str(&rest[..at + 3]);
        rest = &rest[at + 3..];
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        let big = digits > 2 || rest[..digits].parse::<u32>().is_ok_and(|n| n > 31);
        if big {
            out.push_str("31");
            rest = &rest[digits..];
        }
    }
    out.push_str(rest);
    std::borrow::Cow::Owned(out)
}

/// Whether `s` is a non-empty run of letters, digits, `.`, `-`, `_` and `+`
/// (with `slashes`: such runs joined by single `/`, as `RTP/SAVP`).
fn is_token(s: &str, slashes: bool) -> bool {
    let part = |p: &str| {
        !p.is_empty()
            && p.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"._-+".contains(&b))
    };
    if slashes {
        s.split('/').all(part)
    } else {
        part(s)
    }
}

/// One `m=` line of ours.
enum MLine {
    Audio(AudioLine),
    Rejected(RawMLine),
}

struct AudioLine {
    port: u16,
    proto: String,
    formats: Vec<(u8, Codec)>,
    telephone_event_pt: Option<u8>,
    ptime_ms: u32,
    direction: Direction,
    /// Our `a=crypto` line (SRTP).
    crypto: Option<String>,
}

/// The tokens of a peer's `m=` line as written (ezk cannot keep all of them).
#[derive(Debug, Clone)]
struct RawMLine {
    media: String,
    proto: String,
    first_fmt: Option<String>,
}

struct ParsedSdp {
    session: SessionDescription,
    raw: Vec<RawMLine>,
}

impl ParsedSdp {
    fn parse(body: &[u8]) -> Result<Self, SdpError> {
        if body.len() > MAX_SDP_LEN {
            return Err(SdpError::Malformed(format!(
                "body of {} bytes exceeds {MAX_SDP_LEN}",
                body.len()
            )));
        }
        let text = std::str::from_utf8(body)
            .map_err(|_| SdpError::Malformed("body is not UTF-8".to_owned()))?;

        let mut normalized = String::with_capacity(text.len() + 64);
        let mut raw = Vec::new();
        for line in text.split(['\r', '\n']).filter(|l| !l.is_empty()) {
            if let Some(rest) = line.strip_prefix("m=") {
                if raw.len() == MAX_MEDIA_LINES {
                    return Err(SdpError::Malformed(format!(
                        "more than {MAX_MEDIA_LINES} m= lines"
                    )));
                }
                let mut tokens = rest.split_ascii_whitespace();
                let media = tokens.next().unwrap_or_default();
                let _port = tokens.next();
                let proto = tokens.next().unwrap_or_default();
                if media.is_empty() || proto.is_empty() {
                    return Err(SdpError::Malformed(format!("bad m= line {line:?}")));
                }
                raw.push(RawMLine {
                    media: media.to_owned(),
                    proto: proto.to_owned(),
                    first_fmt: tokens.next().map(str::to_owned),
                });
                if matches!(media, "audio" | "video" | "text" | "application") {
                    normalized.push_str(line);
                } else {
                    // ezk has no variant for this type; parse it as
                    // `application` and answer from `raw`.
                    let after_type = rest.trim_start().get(media.len()..).unwrap_or_default();
                    normalized.push_str("m=application");
                    normalized.push_str(after_type);
                }
            } else if line.starts_with("a=crypto:") {
                normalized.push_str(&clamp_crypto_lifetimes(line));
            } else {
                normalized.push_str(line);
            }
            normalized.push_str("\r\n");
        }

        let session = SessionDescription::parse(&BytesStr::from(normalized)).map_err(|e| {
            let mut text = e.to_string();
            if let Some((cut, _)) = text.char_indices().nth(MAX_ERROR_TEXT) {
                text.truncate(cut);
            }
            SdpError::Malformed(text)
        })?;
        if session.media_descriptions.len() != raw.len() {
            return Err(SdpError::Malformed("unreadable m= line".to_owned()));
        }
        Ok(Self { session, raw })
    }
}

struct ChosenAudio {
    index: usize,
    codec: Codec,
    payload_type: u8,
    /// The offer's `a=crypto` line we accept (an `RTP/SAVP` stream).
    crypto: Option<sdes::OfferedCrypto>,
}

/// The first audio stream (port ≠ 0) carrying a codec of ours, with the
/// codec picked by our preference order. SRTP streams (`RTP/SAVP(F)` with a
/// usable `a=crypto`) are taken first when the policy allows SRTP and the
/// signalling is TLS; plain `RTP/AVP(F)` ones unless SRTP is required.
fn choose_audio(parsed: &ParsedSdp, local: &LocalMedia) -> Result<ChosenAudio, SdpError> {
    let mut live_audio = false;
    let mut saw_rtp = false;
    let mut bad_transport = None;
    let mut plain_refused = false;
    let passes: &[bool] = match local.encryption {
        Encryption::Off => &[false],
        Encryption::Optional => &[true, false],
        Encryption::Required => &[true],
    };
    for &secure in passes {
        for (index, md) in parsed.session.media_descriptions.iter().enumerate() {
            if md.media.media_type != MediaType::Audio || md.media.port == 0 {
                continue;
            }
            live_audio = true;
            let proto = parsed.raw.get(index).map(|r| r.proto.as_str());
            let crypto = match (secure, proto) {
                (false, Some("RTP/AVP" | "RTP/AVPF")) => None,
                (true, Some("RTP/SAVP" | "RTP/SAVPF")) if local.srtp_possible() => {
                    match sdes::choose(&md.crypto) {
                        Some(c) => Some(c),
                        None => continue,
                    }
                }
                (true, Some("RTP/AVP" | "RTP/AVPF")) => {
                    plain_refused = true;
                    continue;
                }
                _ => {
                    bad_transport.get_or_insert_with(|| proto.unwrap_or_default().to_owned());
                    continue;
                }
            };
            saw_rtp = true;
            for &codec in &local.codecs {
                if let Some(&payload_type) = md
                    .media
                    .fmts
                    .iter()
                    .find(|&&pt| payload_codec(md, pt) == Some(codec))
                {
                    return Ok(ChosenAudio {
                        index,
                        codec,
                        payload_type,
                        crypto,
                    });
                }
            }
        }
    }
    if local.encryption == Encryption::Required && live_audio && !saw_rtp {
        return Err(SdpError::EncryptionRequired);
    }
    match (live_audio, saw_rtp, bad_transport) {
        (false, _, _) => Err(SdpError::NoAudio),
        (true, false, Some(proto)) if !plain_refused => Err(SdpError::UnsupportedTransport(proto)),
        (true, false, _) => Err(SdpError::EncryptionRequired),
        _ => Err(SdpError::NoCommonCodec),
    }
}

/// The codec a payload type stands for: its `a=rtpmap` if present, else the
/// static table.
fn payload_codec(md: &MediaDescription, pt: u8) -> Option<Codec> {
    match md.rtpmap.iter().find(|m| m.payload == pt) {
        Some(m) => Codec::from_rtpmap(&m.encoding, m.clock_rate, m.params.as_deref()),
        None => Codec::from_static_payload_type(pt),
    }
}

fn find_telephone_event(md: &MediaDescription) -> Option<u8> {
    md.media.fmts.iter().copied().find(|&pt| {
        md.rtpmap.iter().any(|m| {
            m.payload == pt
                && m.encoding.eq_ignore_ascii_case("telephone-event")
                && m.clock_rate == 8000
        })
    })
}

/// The media-level `c=` or else the session-level one; `None` for the
/// unspecified address (old-style hold).
fn connection_ip(
    session: &SessionDescription,
    md: &MediaDescription,
) -> Result<Option<IpAddr>, SdpError> {
    let conn = md
        .connection
        .as_ref()
        .or(session.connection.as_ref())
        .ok_or_else(|| SdpError::Malformed("audio stream has no c= line".to_owned()))?;
    let ip = match &conn.address {
        TaggedAddress::IP4(ip) => IpAddr::V4(*ip),
        TaggedAddress::IP6(ip) => IpAddr::V6(*ip),
        TaggedAddress::IP4FQDN(name) | TaggedAddress::IP6FQDN(name) => {
            let mut name = name.to_string();
            name.truncate(MAX_ERROR_TEXT);
            return Err(SdpError::UnresolvedAddress(name));
        }
    };
    Ok((!ip.is_unspecified()).then_some(ip))
}

/// A peer at `c=0.0.0.0` receives nothing (RFC 3264 §8.4), whatever its
/// direction attribute says.
fn effective_direction(declared: ezk_sdp_types::Direction, ip: Option<IpAddr>) -> Direction {
    let d = Direction::from_ezk(declared);
    if ip.is_none() {
        Direction::from_flags(d.sends(), false)
    } else {
        d
    }
}

/// The peer's `a=ptime` (media level, else session level) when in range.
fn ptime(session: &SessionDescription, md: &MediaDescription) -> Option<u32> {
    md.attributes
        .iter()
        .chain(session.attributes.iter())
        .filter(|a| a.name == "ptime")
        .find_map(|a| a.value.as_deref()?.trim().parse::<u32>().ok())
        .filter(|p| PTIME_RANGE_MS.contains(p))
}

#[cfg(test)]
mod lifetime_tests {
    use super::clamp_crypto_lifetimes;

    #[test]
    fn lifetimes_above_2_pow_31_are_clamped_and_others_kept() {
        let l = "a=crypto:1 AES_CM_128_HMAC_SHA1_80 inline:QUFB|2^48|1:1";
        assert_eq!(
            clamp_crypto_lifetimes(l),
            "a=crypto:1 AES_CM_128_HMAC_SHA1_80 inline:QUFB|2^31|1:1"
        );
        let l = "a=crypto:1 X inline:QUFB|2^20 inline:QkJC|2^99999999999999";
        assert_eq!(
            clamp_crypto_lifetimes(l),
            "a=crypto:1 X inline:QUFB|2^20 inline:QkJC|2^31"
        );
        assert_eq!(
            clamp_crypto_lifetimes("a=crypto:1 X inline:QUFB|2^"),
            "a=crypto:1 X inline:QUFB|2^"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{Ipv4Addr, Ipv6Addr};

    fn local() -> LocalMedia {
        LocalMedia::new(IpAddr::V4(Ipv4Addr::new(203, 0, 113, 5)), 40000)
    }

    fn sdp(lines: &[&str]) -> Vec<u8> {
        let mut s = lines.join("\r\n");
        s.push_str("\r\n");
        s.into_bytes()
    }

    fn text(b: &Bytes) -> &str {
        std::str::from_utf8(b).unwrap()
    }

    const TWILIO: &[&str] = &[
        "v=0",
        "o=root 1634567890 1634567890 IN IP4 168.86.128.10",
        "s=Twilio Media Gateway",
        "c=IN IP4 168.86.128.10",
        "t=0 0",
        "m=audio 14520 RTP/AVP 0 8 101",
        "a=rtpmap:0 PCMU/8000",
        "a=rtpmap:8 PCMA/8000",
        "a=rtpmap:101 telephone-event/8000",
        "a=fmtp:101 0-16",
        "a=ptime:20",
        "a=maxptime:150",
        "a=sendrecv",
    ];

    #[test]
    fn twilio_offer_gets_exact_pcmu_answer() {
        let mut s = SdpSession::new(4242, "sipbridge");
        let (n, body) = s.answer(&sdp(TWILIO), &local()).unwrap();
        assert_eq!(
            text(&body),
            "v=0\r\n\
             o=sipbridge 4242 1 IN IP4 203.0.113.5\r\n\
             s=-\r\n\
             c=IN IP4 203.0.113.5\r\n\
             t=0 0\r\n\
             m=audio 40000 RTP/AVP 0 101\r\n\
             a=rtpmap:0 PCMU/8000\r\n\
             a=rtpmap:101 telephone-event/8000\r\n\
             a=fmtp:101 0-16\r\n\
             a=ptime:20\r\n\
             a=sendrecv\r\n"
        );
        assert_eq!(
            n,
            Negotiated {
                srtp: None,
                codec: Codec::Pcmu,
                payload_type: 0,
                telephone_event_pt: Some(101),
                remote_rtp: Some("168.86.128.10:14520".parse().unwrap()),
                remote_direction: Direction::SendRecv,
                local_direction: Direction::SendRecv,
                ptime_ms: 20,
            }
        );
    }

    #[test]
    fn our_preference_beats_offer_order() {
        let mut l = local();
        l.codecs = vec![Codec::Pcma, Codec::Pcmu];
        let (n, body) = SdpSession::new(1, "b").answer(&sdp(TWILIO), &l).unwrap();
        assert_eq!(n.codec, Codec::Pcma);
        assert_eq!(n.payload_type, 8);
        assert!(text(&body).contains("m=audio 40000 RTP/AVP 8 101\r\na=rtpmap:8 PCMA/8000\r\n"));
    }

    #[test]
    fn direction_mirrors() {
        for (offered, answered) in [
            ("sendonly", "recvonly"),
            ("recvonly", "sendonly"),
            ("inactive", "inactive"),
            ("sendrecv", "sendrecv"),
        ] {
            let mut lines = TWILIO.to_vec();
            let last = lines.len() - 1;
            let attr = format!("a={offered}");
            lines[last] = &attr;
            let (n, body) = SdpSession::new(1, "b")
                .answer(&sdp(&lines), &local())
                .unwrap();
            assert!(
                text(&body).ends_with(&format!("a={answered}\r\n")),
                "{offered}"
            );
            assert_eq!(n.local_direction.as_str(), answered);
            assert_eq!(n.remote_direction.as_str(), offered);
        }
    }

    #[test]
    fn session_level_direction_is_inherited() {
        let mut lines = TWILIO.to_vec();
        lines.pop();
        lines.insert(4, "a=sendonly");
        let (n, body) = SdpSession::new(1, "b")
            .answer(&sdp(&lines), &local())
            .unwrap();
        assert_eq!(n.local_direction, Direction::RecvOnly);
        assert!(text(&body).ends_with("a=recvonly\r\n"));
    }

    #[test]
    fn old_style_hold_zero_address() {
        let mut lines = TWILIO.to_vec();
        lines[3] = "c=IN IP4 0.0.0.0";
        let (n, body) = SdpSession::new(1, "b")
            .answer(&sdp(&lines), &local())
            .unwrap();
        assert_eq!(n.remote_rtp, None);
        assert_eq!(n.remote_direction, Direction::SendOnly);
        assert_eq!(n.local_direction, Direction::RecvOnly);
        assert!(text(&body).ends_with("a=recvonly\r\n"));
        assert!(text(&body).contains("c=IN IP4 203.0.113.5\r\n"));
    }

    #[test]
    fn version_moves_only_when_body_changes() {
        let mut s = SdpSession::new(77, "b");
        let (_, first) = s.answer(&sdp(TWILIO), &local()).unwrap();
        assert!(text(&first).contains("o=b 77 1 IN IP4"));
        // Same offer again (session refresh): same body, same version.
        let (_, again) = s.answer(&sdp(TWILIO), &local()).unwrap();
        assert_eq!(first, again);
        // Hold: body changes, version 2.
        let mut hold = TWILIO.to_vec();
        let last = hold.len() - 1;
        hold[last] = "a=sendonly";
        let (_, held) = s.answer(&sdp(&hold), &local()).unwrap();
        assert!(text(&held).contains("o=b 77 2 IN IP4"));
        // Unhold: back to sendrecv, version 3 (never goes back).
        let (_, resumed) = s.answer(&sdp(TWILIO), &local()).unwrap();
        assert!(text(&resumed).contains("o=b 77 3 IN IP4"));
        assert_eq!(s.version(), 3);
        assert_eq!(s.last_body(), Some(&resumed));
    }

    #[test]
    fn only_g729_is_488() {
        let lines = [
            "v=0",
            "o=- 1 1 IN IP4 192.0.2.1",
            "s=-",
            "c=IN IP4 192.0.2.1",
            "t=0 0",
            "m=audio 5004 RTP/AVP 18 101",
            "a=rtpmap:18 G729/8000",
            "a=fmtp:18 annexb=no",
            "a=rtpmap:101 telephone-event/8000",
        ];
        let err = SdpSession::new(1, "b")
            .answer(&sdp(&lines), &local())
            .unwrap_err();
        assert_eq!(err, SdpError::NoCommonCodec);
        assert_eq!(err.status(), 488);
    }

    #[test]
    fn no_audio_is_488() {
        let lines = [
            "v=0",
            "o=- 1 1 IN IP4 192.0.2.1",
            "s=-",
            "c=IN IP4 192.0.2.1",
            "t=0 0",
            "m=video 5004 RTP/AVP 96",
            "a=rtpmap:96 H264/90000",
        ];
        let err = SdpSession::new(1, "b")
            .answer(&sdp(&lines), &local())
            .unwrap_err();
        assert_eq!(err, SdpError::NoAudio);
        assert_eq!(err.status(), 488);
    }

    #[test]
    fn srtp_only_is_unsupported_transport() {
        let mut lines = TWILIO.to_vec();
        lines[5] = "m=audio 14520 RTP/SAVP 0 8 101";
        let err = SdpSession::new(1, "b")
            .answer(&sdp(&lines), &local())
            .unwrap_err();
        assert_eq!(err, SdpError::UnsupportedTransport("RTP/SAVP".to_owned()));
        assert_eq!(err.status(), 488);
    }

    fn srtp_local(encryption: Encryption, secure: bool) -> LocalMedia {
        LocalMedia {
            encryption,
            secure_signalling: secure,
            srtp_key: Some(KeyMaterial::new((100u8..146).collect())),
            ..local()
        }
    }

    /// An SDES offer: `RTP/SAVP` with a GCM line the peer prefers, then AES_CM_80.
    const SDES_OFFER: &[&str] = &[
        "v=0",
        "o=- 1 1 IN IP4 192.0.2.1",
        "s=-",
        "c=IN IP4 192.0.2.1",
        "t=0 0",
        "m=audio 5006 RTP/SAVP 0 101",
        "a=rtpmap:101 telephone-event/8000",
        "a=crypto:1 F8_128_HMAC_SHA1_80 inline:WVNfX19zZW1jdGwgKCkgewkyMjA7fQp9CnVubGVz",
        "a=crypto:2 AES_CM_128_HMAC_SHA1_80 inline:WVNfX19zZW1jdGwgKCkgewkyMjA7fQp9CnVubGVz",
    ];

    #[test]
    fn sdes_offer_over_tls_is_answered_with_our_own_key() {
        for enc in [Encryption::Optional, Encryption::Required] {
            let local = srtp_local(enc, true);
            let (n, body) = SdpSession::new(1, "b")
                .answer(&sdp(SDES_OFFER), &local)
                .unwrap();
            let srtp = n.srtp.expect("srtp negotiated");
            // F8 is not ours: the offerer's second choice, tag 2.
            assert_eq!(
                (srtp.tag, srtp.suite),
                (2, CryptoSuite::AesCm128HmacSha1_80)
            );
            let body = text(&body);
            assert!(body.contains("m=audio 40000 RTP/SAVP 0 101\r\n"), "{body}");
            let ours = sdes::crypto_attribute(2, CryptoSuite::AesCm128HmacSha1_80, &srtp.local);
            assert!(body.contains(&format!("{ours}\r\n")), "{body}");
            assert_eq!(srtp.remote.split(srtp.suite).0, b"YS___semctl () {");
            assert!(!body.contains("WVNfX19zZW1jdGwgKCkgewkyMjA7fQp9CnVubGVz"));
        }
    }

    #[test]
    fn sdes_keys_are_never_taken_over_plain_signalling() {
        // Optional over UDP/TCP: the SAVP-only offer cannot be answered.
        let err = SdpSession::new(1, "b")
            .answer(&sdp(SDES_OFFER), &srtp_local(Encryption::Optional, false))
            .unwrap_err();
        assert_eq!(err.status(), 488);
        // Required over UDP/TCP: refused too, with the encryption error.
        let err = SdpSession::new(1, "b")
            .answer(&sdp(SDES_OFFER), &srtp_local(Encryption::Required, false))
            .unwrap_err();
        assert_eq!(err, SdpError::EncryptionRequired);
        assert_eq!(err.status(), 488);
    }

    #[test]
    fn required_refuses_a_plain_offer_and_optional_takes_it() {
        let err = SdpSession::new(1, "b")
            .answer(&sdp(TWILIO), &srtp_local(Encryption::Required, true))
            .unwrap_err();
        assert_eq!(err, SdpError::EncryptionRequired);
        assert_eq!(err.status(), 488);
        let (n, body) = SdpSession::new(1, "b")
            .answer(&sdp(TWILIO), &srtp_local(Encryption::Optional, true))
            .unwrap();
        assert!(n.srtp.is_none());
        assert!(!text(&body).contains("a=crypto"));
    }

    #[test]
    fn optional_prefers_the_srtp_stream_of_a_best_effort_offer() {
        let lines = [
            "v=0",
            "o=- 1 1 IN IP4 192.0.2.1",
            "s=-",
            "c=IN IP4 192.0.2.1",
            "t=0 0",
            "m=audio 5004 RTP/AVP 0",
            "m=audio 5006 RTP/SAVP 0",
            "a=crypto:1 AES_CM_128_HMAC_SHA1_32 inline:WVNfX19zZW1jdGwgKCkgewkyMjA7fQp9CnVubGVz",
        ];
        let (n, body) = SdpSession::new(1, "b")
            .answer(&sdp(&lines), &srtp_local(Encryption::Optional, true))
            .unwrap();
        assert_eq!(n.remote_rtp, Some("192.0.2.1:5006".parse().unwrap()));
        assert_eq!(n.srtp.unwrap().suite, CryptoSuite::AesCm128HmacSha1_32);
        assert!(text(&body).contains("m=audio 0 RTP/AVP 0\r\nm=audio 40000 RTP/SAVP 0\r\n"));
    }

    #[test]
    fn a_required_delayed_offer_is_srtp_and_reads_the_answer_key() {
        let local = srtp_local(Encryption::Required, true);
        let mut s = SdpSession::new(1, "b");
        let offer = s.offer(&local, Direction::SendRecv);
        let offer = text(&offer);
        assert!(offer.contains("RTP/SAVP"), "{offer}");
        assert!(
            offer.contains("a=crypto:1 AES_CM_128_HMAC_SHA1_80 inline:"),
            "{offer}"
        );
        let answer = sdp(&[
            "v=0",
            "o=- 1 1 IN IP4 192.0.2.1",
            "s=-",
            "c=IN IP4 192.0.2.1",
            "t=0 0",
            "m=audio 5006 RTP/SAVP 0",
            "a=crypto:1 AES_CM_128_HMAC_SHA1_80 inline:WVNfX19zZW1jdGwgKCkgewkyMjA7fQp9CnVubGVz",
        ]);
        let n = s.accept_answer(&answer, &local).unwrap();
        assert_eq!(
            n.srtp
                .unwrap()
                .remote
                .split(CryptoSuite::AesCm128HmacSha1_80)
                .0,
            b"YS___semctl () {"
        );
        // An answer without a key to our SRTP offer is not taken.
        let _ = s.offer(&local, Direction::SendRecv);
        let plain = sdp(TWILIO);
        assert_eq!(
            s.accept_answer(&plain, &local),
            Err(SdpError::EncryptionRequired)
        );
    }

    #[test]
    fn srtp_and_rtp_streams_pick_rtp_and_reject_srtp() {
        let lines = [
            "v=0",
            "o=- 1 1 IN IP4 192.0.2.1",
            "s=-",
            "c=IN IP4 192.0.2.1",
            "t=0 0",
            "m=audio 5006 RTP/SAVP 0",
            "a=crypto:1 AES_CM_128_HMAC_SHA1_80 inline:WVNfX19zZW1jdGwgKCkgewkyMjA7fQp9CnVubGVz",
            "m=audio 5004 RTP/AVP 0",
        ];
        let (n, body) = SdpSession::new(1, "b")
            .answer(&sdp(&lines), &local())
            .unwrap();
        assert_eq!(n.remote_rtp, Some("192.0.2.1:5004".parse().unwrap()));
        assert!(
            text(&body).contains("t=0 0\r\nm=audio 0 RTP/SAVP 0\r\nm=audio 40000 RTP/AVP 0\r\n")
        );
    }

    #[test]
    fn malformed_is_400() {
        for body in [
            &b"\xff\xfe"[..],
            b"v=0\r\nm=audio x RTP/AVP 0\r\n",
            b"v=0\r\ns=-\r\nt=0 0\r\n",
            b"",
        ] {
            let err = SdpSession::new(1, "b").answer(body, &local()).unwrap_err();
            assert!(matches!(err, SdpError::Malformed(_)), "{err:?}");
            assert_eq!(err.status(), 400);
        }
        let huge = vec![b'a'; MAX_SDP_LEN + 1];
        assert!(matches!(
            SdpSession::new(1, "b").answer(&huge, &local()),
            Err(SdpError::Malformed(_))
        ));
    }

    #[test]
    fn missing_connection_is_malformed() {
        let lines = [
            "v=0",
            "o=- 1 1 IN IP4 192.0.2.1",
            "s=-",
            "t=0 0",
            "m=audio 5004 RTP/AVP 0",
        ];
        assert!(matches!(
            SdpSession::new(1, "b").answer(&sdp(&lines), &local()),
            Err(SdpError::Malformed(_))
        ));
    }

    #[test]
    fn fqdn_connection_is_unresolved() {
        let mut lines = TWILIO.to_vec();
        lines[3] = "c=IN IP4 media.example.com";
        assert_eq!(
            SdpSession::new(1, "b").answer(&sdp(&lines), &local()),
            Err(SdpError::UnresolvedAddress("media.example.com".to_owned()))
        );
    }

    #[test]
    fn ptime_from_peer_when_in_range() {
        let mut lines = TWILIO.to_vec();
        lines[10] = "a=ptime:30";
        let (n, body) = SdpSession::new(1, "b")
            .answer(&sdp(&lines), &local())
            .unwrap();
        assert_eq!(n.ptime_ms, 30);
        assert!(text(&body).contains("a=ptime:20\r\n"));
        lines[10] = "a=ptime:500";
        let (n, _) = SdpSession::new(1, "b")
            .answer(&sdp(&lines), &local())
            .unwrap();
        assert_eq!(n.ptime_ms, 20);
    }

    #[test]
    fn ipv6_local_address() {
        let mut l = local();
        l.addr = IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 5));
        let (_, body) = SdpSession::new(9, "b").answer(&sdp(TWILIO), &l).unwrap();
        assert!(
            text(&body).contains("o=b 9 1 IN IP6 2001:db8::5\r\ns=-\r\nc=IN IP6 2001:db8::5\r\n")
        );
    }

    #[test]
    fn username_is_sanitised() {
        let (_, body) = SdpSession::new(3, "a b\r\n")
            .answer(&sdp(TWILIO), &local())
            .unwrap();
        assert!(text(&body).contains("o=ab 3 1 "));
        let (_, body) = SdpSession::new(3, " ")
            .answer(&sdp(TWILIO), &local())
            .unwrap();
        assert!(text(&body).contains("o=- 3 1 "));
    }

    #[test]
    fn delayed_offer_then_answer() {
        let mut s = SdpSession::new(5, "b");
        let offer = s.offer(&local(), Direction::SendRecv);
        assert_eq!(
            text(&offer),
            "v=0\r\n\
             o=b 5 1 IN IP4 203.0.113.5\r\n\
             s=-\r\n\
             c=IN IP4 203.0.113.5\r\n\
             t=0 0\r\n\
             m=audio 40000 RTP/AVP 0 8 101\r\n\
             a=rtpmap:0 PCMU/8000\r\n\
             a=rtpmap:8 PCMA/8000\r\n\
             a=rtpmap:101 telephone-event/8000\r\n\
             a=fmtp:101 0-16\r\n\
             a=ptime:20\r\n\
             a=sendrecv\r\n"
        );
        let answer = sdp(&[
            "v=0",
            "o=- 9 9 IN IP4 198.51.100.7",
            "s=-",
            "c=IN IP4 198.51.100.7",
            "t=0 0",
            "m=audio 30000 RTP/AVP 8 101",
            "a=rtpmap:8 PCMA/8000",
            "a=rtpmap:101 telephone-event/8000",
            "a=fmtp:101 0-15",
            "a=recvonly",
        ]);
        let n = s.accept_answer(&answer, &local()).unwrap();
        assert_eq!(
            n,
            Negotiated {
                srtp: None,
                codec: Codec::Pcma,
                payload_type: 8,
                telephone_event_pt: Some(101),
                remote_rtp: Some("198.51.100.7:30000".parse().unwrap()),
                remote_direction: Direction::RecvOnly,
                local_direction: Direction::SendOnly,
                ptime_ms: 20,
            }
        );
        // The offer is consumed.
        assert_eq!(
            s.accept_answer(&answer, &local()),
            Err(SdpError::NoPendingOffer)
        );
        assert_eq!(SdpError::NoPendingOffer.status(), 500);
    }

    #[test]
    fn offer_version_and_direction() {
        let mut s = SdpSession::new(5, "b");
        let first = s.offer(&local(), Direction::SendRecv);
        let same = s.offer(&local(), Direction::SendRecv);
        assert_eq!(first, same);
        let hold = s.offer(&local(), Direction::SendOnly);
        assert!(text(&hold).contains("o=b 5 2 IN IP4"));
        assert!(text(&hold).ends_with("a=sendonly\r\n"));
    }

    #[test]
    fn answer_rejecting_our_stream_or_codec() {
        let mut s = SdpSession::new(5, "b");
        let mut l = local();
        l.codecs = vec![Codec::Pcmu];
        s.offer(&l, Direction::SendRecv);
        let rejected = sdp(&[
            "v=0",
            "o=- 9 9 IN IP4 198.51.100.7",
            "s=-",
            "c=IN IP4 198.51.100.7",
            "t=0 0",
            "m=audio 0 RTP/AVP 0",
        ]);
        assert_eq!(
            s.accept_answer(&rejected, &local()),
            Err(SdpError::NoCommonCodec)
        );
        s.offer(&l, Direction::SendRecv);
        // PCMA was never offered: an answer choosing it is not acceptable.
        let wrong = sdp(&[
            "v=0",
            "o=- 9 9 IN IP4 198.51.100.7",
            "s=-",
            "c=IN IP4 198.51.100.7",
            "t=0 0",
            "m=audio 30000 RTP/AVP 8",
        ]);
        assert_eq!(
            s.accept_answer(&wrong, &local()),
            Err(SdpError::NoCommonCodec)
        );
    }

    #[test]
    fn answer_to_our_hold_and_their_zero_address() {
        let mut s = SdpSession::new(5, "b");
        s.offer(&local(), Direction::SendOnly);
        let answer = sdp(&[
            "v=0",
            "o=- 9 9 IN IP4 0.0.0.0",
            "s=-",
            "c=IN IP4 0.0.0.0",
            "t=0 0",
            "m=audio 30000 RTP/AVP 0",
            "a=sendrecv",
        ]);
        let n = s.accept_answer(&answer, &local()).unwrap();
        assert_eq!(n.remote_rtp, None);
        assert_eq!(n.remote_direction, Direction::SendOnly);
        // We offered sendonly, the peer does not receive: nothing flows.
        assert_eq!(n.local_direction, Direction::Inactive);
    }

    #[test]
    fn direction_helpers() {
        assert_eq!(Direction::SendOnly.reversed(), Direction::RecvOnly);
        assert_eq!(Direction::Inactive.reversed(), Direction::Inactive);
        assert!(Direction::SendRecv.sends() && Direction::SendRecv.receives());
        assert_eq!(Direction::from_flags(false, false), Direction::Inactive);
        assert_eq!(Codec::Pcma.static_payload_type(), 8);
        assert_eq!(Codec::Pcmu.clock_rate(), 8000);
    }

    #[test]
    fn rtpmap_overrides_static_table() {
        // A broken offer mapping PT 0 to PCMA: believe the rtpmap.
        let lines = [
            "v=0",
            "o=- 1 1 IN IP4 192.0.2.1",
            "s=-",
            "c=IN IP4 192.0.2.1",
            "t=0 0",
            "m=audio 5004 RTP/AVP 0",
            "a=rtpmap:0 PCMA/8000",
        ];
        let (n, _) = SdpSession::new(1, "b")
            .answer(&sdp(&lines), &local())
            .unwrap();
        assert_eq!((n.codec, n.payload_type), (Codec::Pcma, 0));
        // Stereo PCMU is not ours.
        let lines = [
            "v=0",
            "o=- 1 1 IN IP4 192.0.2.1",
            "s=-",
            "c=IN IP4 192.0.2.1",
            "t=0 0",
            "m=audio 5004 RTP/AVP 96",
            "a=rtpmap:96 PCMU/8000/2",
        ];
        assert_eq!(
            SdpSession::new(1, "b").answer(&sdp(&lines), &local()),
            Err(SdpError::NoCommonCodec)
        );
    }

    #[test]
    fn too_many_media_lines() {
        let mut lines = vec!["v=0", "o=- 1 1 IN IP4 192.0.2.1", "s=-", "t=0 0"];
        lines.extend(std::iter::repeat_n(
            "m=video 0 RTP/AVP 96",
            MAX_MEDIA_LINES + 1,
        ));
        assert!(matches!(
            SdpSession::new(1, "b").answer(&sdp(&lines), &local()),
            Err(SdpError::Malformed(_))
        ));
    }
}
