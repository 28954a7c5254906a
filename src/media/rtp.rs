//! RTP for one call, sans-IO: [`RtpReceiver`] checks and accounts every
//! datagram that arrives on the call's RTP port, [`RtpSender`] numbers and
//! marshals what we send, and [`rtcp::RtcpScheduler`] reports both ways.
//!
//! Owns: RTP header validation, the source-address check (delegated to
//! [`source::SourceLock`]: SDP address only, or one latch behind NAT), payload-type checks,
//! RFC 3550 A.1/A.3/A.8 reception statistics, sequence/timestamp numbering.
//! Must not touch: sockets, clocks (`now`/`wall` are parameters), randomness
//! (the caller draws SSRC/initial values from its injected RNG), audio
//! samples (G.711, DTMF decoding and the jitter buffer live beside this).
//!
//! Header fields are read with the webrtc-rs `rtp` crate, but only after
//! [`check_layout`] has walked the packet's layout ourselves: `rtp` 0.17.2's
//! `Header::unmarshal` panics (`copy_to_bytes` past the end) on an RFC 8285
//! extension element longer than its block, accepts a padding count of 0, does
//! not check the version, and after an ID-15 element leaves the rest of the
//! extension block in the payload. The layout walk fixes all four and gives
//! us the payload as a zero-copy slice. The 12-byte header we send is written
//! by hand in [`RtpSender::packet`] because it has no failure case, while the
//! crate's `marshal` returns a `Result` for extensions and padding we never
//! emit; tests check the bytes against the crate's parser.

pub mod rtcp;
pub mod source;

pub use source::{RtpSourcePolicy, SourceLock};

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::{BufMut, Bytes, BytesMut};
use webrtc_util::marshal::Unmarshal;

/// Errors of the RTP/RTCP layer (RTP datagrams never error: they are
/// [`RtpInput::Rejected`] and counted).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RtpError {
    /// A received RTCP datagram did not parse.
    #[error("malformed RTCP: {0}")]
    RtcpMalformed(#[source] ::rtcp::Error),
    /// Building our RTCP report failed (a bug: the inputs are clamped).
    #[error("cannot marshal RTCP: {0}")]
    RtcpMarshal(#[source] ::rtcp::Error),
    /// Caller misuse: a configuration value out of range.
    #[error("invalid RTP configuration: {0}")]
    InvalidConfig(&'static str),
}

/// Fixed RTP header length (RFC 3550 §5.1).
const FIXED_HEADER: usize = 12;
/// RFC 3550 A.1: a jump of less than this many sequence numbers is accepted.
const MAX_DROPOUT: u16 = 3000;
/// RFC 3550 A.1: a packet at most this far behind is a reordered one.
const MAX_MISORDER: u16 = 100;
const SEQ_MOD: u32 = 1 << 16;

/// Why a datagram was ignored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum RejectReason {
    /// Shorter than the 12-byte fixed header.
    Truncated,
    /// Version field is not 2.
    BadVersion,
    /// The CSRC count points past the end of the datagram.
    CsrcOverrun,
    /// The header extension (or one of its RFC 8285 elements) runs past its end.
    ExtensionOverrun,
    /// P bit set with a padding count of 0 or longer than the payload.
    BadPadding,
    /// Neither the negotiated codec nor telephone-event.
    WrongPayloadType,
    /// From an address other than the one the call's media is locked to (the
    /// SDP's, or the one latched behind NAT).
    WrongSource,
    /// A sequence jump larger than RFC 3550 A.1's `MAX_DROPOUT`, not yet
    /// confirmed by a second sequential packet.
    SequenceJump,
    /// From the SSRC we switched away from moments ago (reordered across the
    /// switch); accepting it would reset the stream again.
    StaleSsrc,
}

/// Per-reason counts of ignored datagrams.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RejectCounts {
    pub truncated: u64,
    pub bad_version: u64,
    pub csrc_overrun: u64,
    pub extension_overrun: u64,
    pub bad_padding: u64,
    pub wrong_payload_type: u64,
    pub wrong_source: u64,
    pub sequence_jump: u64,
    pub stale_ssrc: u64,
}

impl RejectCounts {
    fn count(&mut self, reason: RejectReason) {
        let slot = match reason {
            RejectReason::Truncated => &mut self.truncated,
            RejectReason::BadVersion => &mut self.bad_version,
            RejectReason::CsrcOverrun => &mut self.csrc_overrun,
            RejectReason::ExtensionOverrun => &mut self.extension_overrun,
            RejectReason::BadPadding => &mut self.bad_padding,
            RejectReason::WrongPayloadType => &mut self.wrong_payload_type,
            RejectReason::WrongSource => &mut self.wrong_source,
            RejectReason::SequenceJump => &mut self.sequence_jump,
            RejectReason::StaleSsrc => &mut self.stale_ssrc,
        };
        *slot += 1;
    }

    /// Sum over all reasons.
    pub fn total(&self) -> u64 {
        self.truncated
            + self.bad_version
            + self.csrc_overrun
            + self.extension_overrun
            + self.bad_padding
            + self.wrong_payload_type
            + self.wrong_source
            + self.sequence_jump
            + self.stale_ssrc
    }
}

/// Reception statistics (RFC 3550 A.1, A.3, A.8), continued across SSRC
/// changes: counts add up over all streams, jitter and sequence state are the
/// current stream's.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RtpStats {
    /// Accepted packets, duplicates included (RFC 3550 `received`).
    pub packets_received: u64,
    /// Payload octets of accepted packets (padding excluded).
    pub bytes_received: u64,
    /// Packets expected: extended highest seq − base seq + 1, summed over streams.
    pub expected: u64,
    /// `expected − packets_received` (negative with duplicates).
    pub cumulative_lost: i64,
    /// Fraction lost (÷256) over the interval ending at the last report block.
    pub fraction_lost: u8,
    /// Interarrival jitter in timestamp units (RFC 3550 A.8).
    pub jitter: u32,
    /// Current stream's extended highest sequence number.
    pub extended_highest_seq: u32,
    /// Current SSRC, once a packet has been accepted.
    pub ssrc: Option<u32>,
    /// Number of SSRC changes after the first stream.
    pub ssrc_changes: u64,
    /// Number of times a source address was locked (at most once per SDP address).
    pub latches: u64,
    /// Ignored datagrams by reason.
    pub rejected: RejectCounts,
}

/// What one datagram turned out to be.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RtpInput {
    /// Audio in the negotiated codec.
    Media {
        seq: u16,
        timestamp: u32,
        ssrc: u32,
        payload_type: u8,
        marker: bool,
        payload: Bytes,
    },
    /// An RFC 4733 telephone-event packet (payload undecoded).
    TelephoneEvent {
        seq: u16,
        timestamp: u32,
        ssrc: u32,
        marker: bool,
        payload: Bytes,
    },
    /// Ignored (and counted in [`RtpStats::rejected`]).
    Rejected(RejectReason),
}

/// Per-call receiver settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RtpReceiverConfig {
    /// Negotiated codec payload type (0 PCMU, 8 PCMA).
    pub payload_type: u8,
    /// Negotiated telephone-event payload type, if any.
    pub telephone_event_pt: Option<u8>,
    /// RTP clock rate of the codec (8000 for G.711).
    pub clock_rate: u32,
    /// Consecutive valid packets from one address before it is latched
    /// (under [`RtpSourcePolicy::Latch`]).
    pub latch_after: u32,
    /// Which source addresses are the call's media.
    pub source: RtpSourcePolicy,
    /// After an SSRC change, packets of the previous SSRC arriving within
    /// this window are stale reorderings, not a switch back.
    pub ssrc_switch_guard: Duration,
}

impl RtpReceiverConfig {
    /// Defaults: 8 kHz, the SDP address only ([`RtpSourcePolicy::Strict`]),
    /// latch after 2 packets where latching is allowed, 200 ms SSRC switch guard.
    pub fn new(payload_type: u8, telephone_event_pt: Option<u8>) -> Self {
        Self {
            payload_type,
            telephone_event_pt,
            clock_rate: 8000,
            latch_after: 2,
            source: RtpSourcePolicy::Strict,
            ssrc_switch_guard: Duration::from_millis(200),
        }
    }
}

/// A parsed, layout-checked packet.
#[derive(Debug)]
struct Parsed {
    marker: bool,
    payload_type: u8,
    seq: u16,
    timestamp: u32,
    ssrc: u32,
    payload: Bytes,
}

/// Walk the RTP layout (fixed header, CSRCs, extension and its RFC 8285
/// elements, padding) and return the payload range. Everything the `rtp`
/// crate would index is proven in bounds here first.
fn check_layout(d: &[u8]) -> Result<(usize, usize), RejectReason> {
    let header_len = check_header(d)?;
    let b0 = d[0];
    let mut payload_end = d.len();
    if b0 & 0x20 != 0 {
        let pad = usize::from(d.last().copied().unwrap_or(0));
        if pad == 0 || pad > d.len() - header_len {
            return Err(RejectReason::BadPadding);
        }
        payload_end -= pad;
    }
    Ok((header_len, payload_end))
}

/// Walk the RTP header (fixed part, CSRCs, extension and its RFC 8285
/// elements) and return its length: everything the `rtp` crate's header
/// parser reads is then in bounds. SRTP checks this before handing a packet
/// to `webrtc-srtp`, which parses the header (and panics on an extension
/// element longer than its block) before checking the authentication tag.
pub(crate) fn check_header(d: &[u8]) -> Result<usize, RejectReason> {
    let (Some(&b0), true) = (d.first(), d.len() >= FIXED_HEADER) else {
        return Err(RejectReason::Truncated);
    };
    if b0 >> 6 != 2 {
        return Err(RejectReason::BadVersion);
    }
    let mut header_len = FIXED_HEADER + 4 * usize::from(b0 & 0x0f);
    if d.len() < header_len {
        return Err(RejectReason::CsrcOverrun);
    }
    if b0 & 0x10 != 0 {
        let (Some(&[p0, p1, l0, l1]), ext_start) = (
            d.get(header_len..header_len + 4)
                .and_then(|s| <&[u8; 4]>::try_from(s).ok()),
            header_len + 4,
        ) else {
            return Err(RejectReason::ExtensionOverrun);
        };
        let profile = u16::from_be_bytes([p0, p1]);
        let ext_end = ext_start + 4 * usize::from(u16::from_be_bytes([l0, l1]));
        let block = d
            .get(ext_start..ext_end)
            .ok_or(RejectReason::ExtensionOverrun)?;
        walk_extension_elements(profile, block)?;
        header_len = ext_end;
    }
    Ok(header_len)
}

/// Check that every RFC 8285 element of a one-byte (0xBEDE) or two-byte
/// (0x1000, the only value the crate walks) extension block stays inside it.
fn walk_extension_elements(profile: u16, block: &[u8]) -> Result<(), RejectReason> {
    let mut i = 0;
    match profile {
        0xBEDE => {
            while let Some(&b) = block.get(i) {
                if b == 0 {
                    i += 1;
                    continue;
                }
                if b >> 4 == 15 {
                    break;
                }
                i += 2 + usize::from(b & 0x0f);
                if i > block.len() {
                    return Err(RejectReason::ExtensionOverrun);
                }
            }
        }
        0x1000 => {
            while let Some(&b) = block.get(i) {
                if b == 0 {
                    i += 1;
                    continue;
                }
                let len = block.get(i + 1).ok_or(RejectReason::ExtensionOverrun)?;
                i += 2 + usize::from(*len);
                if i > block.len() {
                    return Err(RejectReason::ExtensionOverrun);
                }
            }
        }
        _ => {}
    }
    Ok(())
}

fn parse(data: &Bytes) -> Result<Parsed, RejectReason> {
    let (header_len, payload_end) = check_layout(data)?;
    // The layout walk above proved every read of the crate's parser in
    // bounds; an error here would be a crate change, counted as truncation.
    let header = rtp::header::Header::unmarshal(&mut data.slice(..header_len))
        .map_err(|_| RejectReason::Truncated)?;
    Ok(Parsed {
        marker: header.marker,
        payload_type: header.payload_type,
        seq: header.sequence_number,
        timestamp: header.timestamp,
        ssrc: header.ssrc,
        payload: data.slice(header_len..payload_end),
    })
}

/// Result of [`Stream::update_seq`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SeqUpdate {
    Accepted,
    /// An unconfirmed jump larger than `MAX_DROPOUT`: drop the packet.
    Jump,
    /// The jump was confirmed: the sequence state restarted; these are the
    /// counts of the part before the restart.
    Restarted {
        expected: u64,
        received: u64,
    },
}

/// RFC 3550 A.1 sequence state and A.8 jitter state of one SSRC.
#[derive(Debug, Clone)]
struct Stream {
    ssrc: u32,
    max_seq: u16,
    /// Wrap count shifted left by 16.
    cycles: u32,
    base_seq: u32,
    bad_seq: u32,
    received: u64,
    expected_prior: u64,
    received_prior: u64,
    /// Last relative transit time (arrival − timestamp), timestamp units.
    transit: Option<u32>,
    /// Jitter × 16 (RFC 3550 A.8 integer form).
    jitter_q4: u64,
}

impl Stream {
    fn new(ssrc: u32, seq: u16) -> Self {
        let mut s = Self {
            ssrc,
            max_seq: seq,
            cycles: 0,
            base_seq: 0,
            bad_seq: 0,
            received: 0,
            expected_prior: 0,
            received_prior: 0,
            transit: None,
            jitter_q4: 0,
        };
        s.init_seq(seq);
        s
    }

    fn init_seq(&mut self, seq: u16) {
        self.base_seq = u32::from(seq);
        self.max_seq = seq;
        self.bad_seq = SEQ_MOD + 1;
        self.cycles = 0;
        self.received = 0;
        self.expected_prior = 0;
        self.received_prior = 0;
    }

    /// RFC 3550 A.1 `update_seq` without probation (latching plays that
    /// role).
    fn update_seq(&mut self, seq: u16) -> SeqUpdate {
        let udelta = seq.wrapping_sub(self.max_seq);
        let mut outcome = SeqUpdate::Accepted;
        if udelta < MAX_DROPOUT {
            if seq < self.max_seq {
                self.cycles = self.cycles.wrapping_add(SEQ_MOD);
            }
            self.max_seq = seq;
        } else if u32::from(udelta) <= SEQ_MOD - u32::from(MAX_MISORDER) {
            if u32::from(seq) == self.bad_seq {
                // Two sequential packets after a jump: the sender restarted.
                outcome = SeqUpdate::Restarted {
                    expected: self.expected(),
                    received: self.received,
                };
                self.init_seq(seq);
            } else {
                self.bad_seq = (u32::from(seq) + 1) & (SEQ_MOD - 1);
                return SeqUpdate::Jump;
            }
        }
        // else: duplicate or reordered, counted below like RFC 3550 does.
        self.received += 1;
        outcome
    }

    fn extended_max(&self) -> u32 {
        self.cycles.wrapping_add(u32::from(self.max_seq))
    }

    fn expected(&self) -> u64 {
        (u64::from(self.cycles) + u64::from(self.max_seq) + 1)
            .saturating_sub(u64::from(self.base_seq))
    }

    /// RFC 3550 A.8 with the arrival time already in timestamp units.
    fn update_jitter(&mut self, arrival: u32, timestamp: u32) {
        let transit = arrival.wrapping_sub(timestamp);
        if let Some(last) = self.transit {
            let d = u64::from((transit.wrapping_sub(last) as i32).unsigned_abs());
            self.jitter_q4 = (self.jitter_q4 + d).saturating_sub((self.jitter_q4 + 8) >> 4);
        }
        self.transit = Some(transit);
    }
}

/// The numbers one RTCP reception report block carries (RFC 3550 §6.4.1),
/// before LSR/DLSR are added by the scheduler.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReportBlock {
    pub ssrc: u32,
    pub fraction_lost: u8,
    /// Clamped to the 24-bit signed range.
    pub cumulative_lost: i32,
    pub extended_highest_seq: u32,
    pub jitter: u32,
}

/// Receives the RTP of one call.
#[derive(Debug, Clone)]
pub struct RtpReceiver {
    config: RtpReceiverConfig,
    source: SourceLock,
    stream: Option<Stream>,
    /// Previous SSRC and when we switched away from it.
    previous_ssrc: Option<(u32, Instant)>,
    prior_expected: u64,
    prior_received: u64,
    /// Origin of the arrival clock used for jitter.
    epoch: Option<Instant>,
    last_packet_at: Option<Instant>,
    stats: RtpStats,
}

impl RtpReceiver {
    /// `sdp_addr` is the remote `c=`/`m=` address from the SDP.
    pub fn new(config: RtpReceiverConfig, sdp_addr: SocketAddr) -> Result<Self, RtpError> {
        if config.latch_after == 0 {
            return Err(RtpError::InvalidConfig("latch_after must be at least 1"));
        }
        if config.clock_rate == 0 {
            return Err(RtpError::InvalidConfig("clock_rate must not be 0"));
        }
        Ok(Self {
            source: SourceLock::new(config.source, sdp_addr, config.latch_after),
            config,
            stream: None,
            previous_ssrc: None,
            prior_expected: 0,
            prior_received: 0,
            epoch: None,
            last_packet_at: None,
            stats: RtpStats::default(),
        })
    }

    /// A re-INVITE changed the remote address: decide the source afresh
    /// (the same address keeps its lock).
    pub fn set_sdp_address(&mut self, addr: SocketAddr) {
        self.source.set_sdp_address(addr);
    }

    /// The source address media is locked to, once decided.
    pub fn latched_source(&self) -> Option<SocketAddr> {
        self.source.locked()
    }

    /// When the last accepted packet arrived (for the RTP timeout).
    pub fn last_packet_at(&self) -> Option<Instant> {
        self.last_packet_at
    }

    /// Statistics so far.
    pub fn stats(&self) -> &RtpStats {
        &self.stats
    }

    /// Check and account one datagram from the RTP socket.
    pub fn on_datagram(&mut self, now: Instant, from: SocketAddr, data: Bytes) -> RtpInput {
        match self.accept(now, from, data) {
            Ok(input) => input,
            Err(reason) => {
                self.stats.rejected.count(reason);
                RtpInput::Rejected(reason)
            }
        }
    }

    fn accept(
        &mut self,
        now: Instant,
        from: SocketAddr,
        data: Bytes,
    ) -> Result<RtpInput, RejectReason> {
        let p = parse(&data)?;
        let is_event = Some(p.payload_type) == self.config.telephone_event_pt;
        if p.payload_type != self.config.payload_type && !is_event {
            return Err(RejectReason::WrongPayloadType);
        }
        if !self.source.admit(now, from) {
            return Err(RejectReason::WrongSource);
        }
        self.stats.latches = self.source.latches();
        self.update_stream(now, &p, is_event)?;
        self.last_packet_at = Some(now);
        self.stats.bytes_received += p.payload.len() as u64;
        Ok(if is_event {
            RtpInput::TelephoneEvent {
                seq: p.seq,
                timestamp: p.timestamp,
                ssrc: p.ssrc,
                marker: p.marker,
                payload: p.payload,
            }
        } else {
            RtpInput::Media {
                seq: p.seq,
                timestamp: p.timestamp,
                ssrc: p.ssrc,
                payload_type: p.payload_type,
                marker: p.marker,
                payload: p.payload,
            }
        })
    }

    fn update_stream(
        &mut self,
        now: Instant,
        p: &Parsed,
        is_event: bool,
    ) -> Result<(), RejectReason> {
        let same = self.stream.as_ref().is_some_and(|s| s.ssrc == p.ssrc);
        if !same {
            if let Some((old, at)) = self.previous_ssrc
                && old == p.ssrc
                && now.saturating_duration_since(at) < self.config.ssrc_switch_guard
            {
                return Err(RejectReason::StaleSsrc);
            }
            if let Some(old) = self.stream.take() {
                self.prior_expected += old.expected();
                self.prior_received += old.received;
                self.previous_ssrc = Some((old.ssrc, now));
                self.stats.ssrc_changes += 1;
            }
            self.stream = Some(Stream::new(p.ssrc, p.seq));
        }
        let epoch = *self.epoch.get_or_insert(now);
        let clock_rate = u128::from(self.config.clock_rate);
        let Some(s) = self.stream.as_mut() else {
            return Err(RejectReason::Truncated);
        };
        if same {
            match s.update_seq(p.seq) {
                SeqUpdate::Accepted => {}
                SeqUpdate::Jump => return Err(RejectReason::SequenceJump),
                SeqUpdate::Restarted { expected, received } => {
                    self.prior_expected += expected;
                    self.prior_received += received;
                }
            }
        }
        if !same {
            s.received = 1;
        }
        if !is_event {
            let arrival = (now.saturating_duration_since(epoch).as_nanos() * clock_rate
                / 1_000_000_000) as u32;
            s.update_jitter(arrival, p.timestamp);
        }
        let (expected, received, ext, jitter, ssrc) = (
            s.expected(),
            s.received,
            s.extended_max(),
            (s.jitter_q4 >> 4) as u32,
            s.ssrc,
        );
        self.stats.packets_received = self.prior_received + received;
        self.stats.expected = self.prior_expected + expected;
        self.stats.cumulative_lost =
            self.stats.expected as i64 - self.stats.packets_received as i64;
        self.stats.extended_highest_seq = ext;
        self.stats.jitter = jitter;
        self.stats.ssrc = Some(ssrc);
        Ok(())
    }

    /// Build the reception report block for the current stream and start a
    /// new loss interval (RFC 3550 A.3). `None` before any packet.
    pub fn report_block(&mut self) -> Option<ReportBlock> {
        let s = self.stream.as_mut()?;
        let expected = s.expected();
        let expected_interval = expected.saturating_sub(s.expected_prior);
        let received_interval = s.received.saturating_sub(s.received_prior);
        s.expected_prior = expected;
        s.received_prior = s.received;
        let lost_interval = expected_interval as i64 - received_interval as i64;
        let fraction_lost = if expected_interval == 0 || lost_interval <= 0 {
            0
        } else {
            ((lost_interval << 8) / expected_interval as i64).min(255) as u8
        };
        self.stats.fraction_lost = fraction_lost;
        let lost = expected as i64 - s.received as i64;
        Some(ReportBlock {
            ssrc: s.ssrc,
            fraction_lost,
            cumulative_lost: lost.clamp(-(1 << 23), (1 << 23) - 1) as i32,
            extended_highest_seq: s.extended_max(),
            jitter: (s.jitter_q4 >> 4) as u32,
        })
    }
}

/// Numbers and marshals the RTP we send for one call.
#[derive(Debug, Clone)]
pub struct RtpSender {
    ssrc: u32,
    seq: u16,
    timestamp: u32,
    payload_type: u8,
    packets_sent: u32,
    octets_sent: u32,
}

impl RtpSender {
    /// `ssrc`, `initial_seq` and `initial_ts` come from the caller's RNG
    /// (RFC 3550 §5.1: random initial values).
    pub fn new(ssrc: u32, initial_seq: u16, initial_ts: u32, payload_type: u8) -> Self {
        Self {
            ssrc,
            seq: initial_seq,
            timestamp: initial_ts,
            payload_type,
            packets_sent: 0,
            octets_sent: 0,
        }
    }

    /// Marshal one packet of the negotiated payload type at the current
    /// timestamp, then advance the sequence number by one and the timestamp
    /// by `timestamp_advance` (this packet's duration in samples).
    pub fn packet(&mut self, payload: &[u8], marker: bool, timestamp_advance: u32) -> Bytes {
        let out = self.packet_with(self.payload_type, self.timestamp, payload, marker);
        self.timestamp = self.timestamp.wrapping_add(timestamp_advance);
        out
    }

    /// Marshal one packet with an explicit payload type and timestamp (RFC
    /// 4733 events keep their start timestamp); the sequence number advances,
    /// the running timestamp does not.
    pub fn packet_with(
        &mut self,
        payload_type: u8,
        timestamp: u32,
        payload: &[u8],
        marker: bool,
    ) -> Bytes {
        let mut buf = BytesMut::with_capacity(FIXED_HEADER + payload.len());
        buf.put_u8(0x80);
        buf.put_u8((u8::from(marker) << 7) | (payload_type & 0x7f));
        buf.put_u16(self.seq);
        buf.put_u32(timestamp);
        buf.put_u32(self.ssrc);
        buf.put_slice(payload);
        self.seq = self.seq.wrapping_add(1);
        self.packets_sent = self.packets_sent.wrapping_add(1);
        self.octets_sent = self.octets_sent.wrapping_add(payload.len() as u32);
        buf.freeze()
    }

    /// Advance the timestamp without sending (a pause in our audio).
    pub fn skip(&mut self, timestamp_advance: u32) {
        self.timestamp = self.timestamp.wrapping_add(timestamp_advance);
    }

    pub fn ssrc(&self) -> u32 {
        self.ssrc
    }

    /// The RTP timestamp the next packet gets.
    pub fn timestamp(&self) -> u32 {
        self.timestamp
    }

    /// Sequence number of the next packet.
    pub fn next_seq(&self) -> u16 {
        self.seq
    }

    /// Timestamp of the next packet.
    pub fn next_timestamp(&self) -> u32 {
        self.timestamp
    }

    /// Packets sent (SR sender's packet count, wraps like RFC 3550's).
    pub fn packets_sent(&self) -> u32 {
        self.packets_sent
    }

    /// Payload octets sent (SR sender's octet count).
    pub fn octets_sent(&self) -> u32 {
        self.octets_sent
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header_bytes(b0: u8) -> Vec<u8> {
        vec![b0, 0, 0, 1, 0, 0, 0, 2, 0, 0, 0, 3]
    }

    #[test]
    #[should_panic]
    fn crate_header_unmarshal_panics_on_overlong_one_byte_element() {
        // Why check_layout exists: X bit, 0xBEDE, 1 word, element id 1 len 16.
        let mut d = header_bytes(0x90);
        d.extend_from_slice(&[0xbe, 0xde, 0, 1, 0x1f, 0, 0, 0]);
        let _ = rtp::header::Header::unmarshal(&mut Bytes::from(d));
    }

    #[test]
    fn layout_rejects_overlong_extension_elements() {
        let mut d = header_bytes(0x90);
        d.extend_from_slice(&[0xbe, 0xde, 0, 1, 0x1f, 0, 0, 0]);
        assert_eq!(check_layout(&d), Err(RejectReason::ExtensionOverrun));
        let mut d = header_bytes(0x90);
        d.extend_from_slice(&[0x10, 0x00, 0, 1, 0x01, 0x05, 0, 0]);
        assert_eq!(check_layout(&d), Err(RejectReason::ExtensionOverrun));
        let mut d = header_bytes(0x90);
        d.extend_from_slice(&[0x10, 0x00, 0, 1, 0, 0, 0, 0x07]);
        assert_eq!(check_layout(&d), Err(RejectReason::ExtensionOverrun));
    }

    #[test]
    fn id_15_ends_the_extension_but_not_the_block() {
        // One-byte block of 2 words: element id 1 (1 byte), then ID 15, then junk.
        let mut d = header_bytes(0x90);
        d.extend_from_slice(&[
            0xbe, 0xde, 0, 2, 0x10, 0xaa, 0xf3, 0xff, 0xff, 0xff, 0xff, 0xff,
        ]);
        d.extend_from_slice(b"PAYLOAD");
        let p = parse(&Bytes::from(d)).unwrap();
        assert_eq!(&p.payload[..], b"PAYLOAD");
    }

    #[test]
    fn padding_rules() {
        let mut d = header_bytes(0xa0);
        d.extend_from_slice(&[1, 2, 3, 0, 0, 3]);
        let p = parse(&Bytes::from(d)).unwrap();
        assert_eq!(&p.payload[..], &[1, 2, 3]);
        let mut d = header_bytes(0xa0);
        d.extend_from_slice(&[1, 2, 0]);
        assert_eq!(check_layout(&d), Err(RejectReason::BadPadding));
        let mut d = header_bytes(0xa0);
        d.extend_from_slice(&[1, 2, 4]);
        assert_eq!(check_layout(&d), Err(RejectReason::BadPadding));
        assert_eq!(
            check_layout(&header_bytes(0xa0)),
            Err(RejectReason::BadPadding)
        );
    }

    #[test]
    fn csrc_version_and_truncation() {
        assert_eq!(check_layout(&[0x80; 11]), Err(RejectReason::Truncated));
        assert_eq!(check_layout(&[]), Err(RejectReason::Truncated));
        assert_eq!(
            check_layout(&header_bytes(0x40)),
            Err(RejectReason::BadVersion)
        );
        let mut d = header_bytes(0x82);
        d.extend_from_slice(&[0, 0, 0, 9, 0, 0, 0]);
        assert_eq!(check_layout(&d), Err(RejectReason::CsrcOverrun));
        d.push(0);
        assert_eq!(check_layout(&d), Ok((20, 20)));
        let d = header_bytes(0x90);
        assert_eq!(check_layout(&d), Err(RejectReason::ExtensionOverrun));
    }

    #[test]
    fn sender_bytes_match_the_crate_parser() {
        let mut tx = RtpSender::new(0xdead_beef, 65535, u32::MAX - 100, 8);
        let a = tx.packet(&[0xd5; 160], true, 160);
        let b = tx.packet(&[0x55; 160], false, 160);
        let pa = rtp::packet::Packet::unmarshal(&mut a.clone()).unwrap();
        let pb = rtp::packet::Packet::unmarshal(&mut b.clone()).unwrap();
        assert_eq!(
            (pa.header.version, pa.header.marker, pa.header.payload_type),
            (2, true, 8)
        );
        assert_eq!(
            (pa.header.sequence_number, pa.header.timestamp),
            (65535, u32::MAX - 100)
        );
        assert_eq!((pb.header.sequence_number, pb.header.timestamp), (0, 59));
        assert!(!pb.header.marker);
        assert_eq!(pa.header.ssrc, 0xdead_beef);
        assert_eq!(&pb.payload[..], &[0x55; 160][..]);
        assert_eq!((tx.packets_sent(), tx.octets_sent()), (2, 320));
        // Byte-identical to the crate's own marshal.
        use webrtc_util::marshal::Marshal;
        assert_eq!(pa.marshal().unwrap(), a);
    }

    #[test]
    fn jitter_integer_form_matches_rfc3550_a8() {
        let mut s = Stream::new(1, 0);
        // Transit times 0, 80, 0 (timestamp units): D = 80 then 80.
        s.update_jitter(1000, 1000);
        s.update_jitter(1240, 1160);
        assert_eq!(s.jitter_q4, 80);
        s.update_jitter(1320, 1320);
        // 80 + 80 - ((80 + 8) >> 4) = 155
        assert_eq!(s.jitter_q4, 155);
        assert_eq!(s.jitter_q4 >> 4, 9);
    }
}
