//! RTCP for one call, sans-IO: when to send the next compound report, what
//! goes in it, and what the peer's reports say about our stream.
//!
//! Owns: the RFC 3550 §6.2/§6.3 report schedule (randomised 0.5–1.5 × the
//! interval, from the injected RNG), SR/RR + SDES CNAME building, LSR/DLSR,
//! parsing received SR/RR/BYE into [`RemoteStats`] and the round-trip time.
//! Must not touch: sockets, clocks (`now`, `wall` are parameters), the RTP
//! packets themselves ([`super::RtpReceiver`]/[`super::RtpSender`] do that).
//! Packets are built and parsed by the webrtc-rs `rtcp` crate. RFC 3550's
//! timer reconsideration and bandwidth scaling are not done: a call has two
//! participants, so the fixed ~5 s interval is what the RFC's formula gives.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use rand::RngCore;
use rtcp::goodbye::Goodbye;
use rtcp::packet::Packet;
use rtcp::receiver_report::ReceiverReport;
use rtcp::reception_report::ReceptionReport;
use rtcp::sender_report::SenderReport;
use rtcp::source_description::{
    SdesType, SourceDescription, SourceDescriptionChunk, SourceDescriptionItem,
};

use super::{ReportBlock, RtpError, RtpReceiver, RtpSender};

/// Seconds from 1900-01-01 (NTP era 0) to 1970-01-01.
const NTP_UNIX_OFFSET: u64 = 2_208_988_800;
/// How many of our own SRs we remember to match LSR echoes for RTT.
const SR_HISTORY: usize = 4;

/// Wall-clock time as a 64-bit NTP timestamp (RFC 3550 §4).
pub fn ntp_timestamp(wall: SystemTime) -> u64 {
    let since = wall.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = since.as_secs().wrapping_add(NTP_UNIX_OFFSET);
    let frac = (u64::from(since.subsec_nanos()) << 32) / 1_000_000_000;
    (secs << 32) | frac
}

/// The middle 32 bits of an NTP timestamp (the LSR field).
fn compact(ntp: u64) -> u32 {
    (ntp >> 16) as u32
}

/// A duration in 1/65536 s units (the DLSR field), saturating.
fn to_dlsr(d: Duration) -> u32 {
    let units = d.as_nanos() * 65_536 / 1_000_000_000;
    u32::try_from(units).unwrap_or(u32::MAX)
}

fn from_dlsr(units: u32) -> Duration {
    Duration::from_nanos(u64::from(units) * 1_000_000_000 / 65_536)
}

/// Sign-extend RFC 3550's 24-bit cumulative loss.
fn lost_from_wire(v: u32) -> i32 {
    ((v << 8) as i32) >> 8
}

/// The SR, RR and BYE packets of a compound RTCP datagram, the only ones we
/// read, each within the datagram by its length field (RFC 3550 §6.4);
/// the others (SDES, APP, feedback, XR, unknown types) are skipped unread.
/// `rtcp` 0.17.2 panics on some of those (a transport-layer NACK whose
/// length field is shorter than its FCI reads past it: found by
/// `fuzz/fuzz_targets/rtp.rs`), so they never reach its parser.
fn reports_only(data: &[u8]) -> Result<Vec<u8>, RtpError> {
    let mut out = Vec::new();
    let mut rest = data;
    while !rest.is_empty() {
        let (Some(&b0), Some(&pt), Some(&l0), Some(&l1)) =
            (rest.first(), rest.get(1), rest.get(2), rest.get(3))
        else {
            return Err(RtpError::RtcpMalformed(rtcp::Error::PacketTooShort));
        };
        if b0 >> 6 != 2 {
            return Err(RtpError::RtcpMalformed(rtcp::Error::BadVersion));
        }
        let len = 4 * (usize::from(u16::from_be_bytes([l0, l1])) + 1);
        let Some(packet) = rest.get(..len) else {
            return Err(RtpError::RtcpMalformed(rtcp::Error::PacketTooShort));
        };
        if matches!(pt, 200 | 201 | 203) {
            out.extend_from_slice(packet);
        }
        rest = &rest[len..];
    }
    Ok(out)
}

/// Encode a (clamped) cumulative loss as 24-bit two's complement.
fn lost_to_wire(v: i32) -> u32 {
    (v.clamp(-(1 << 23), (1 << 23) - 1) as u32) & 0x00ff_ffff
}

/// RTCP settings for one call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RtcpConfig {
    /// Mean report interval (RFC 3550 minimum: 5 s).
    pub interval: Duration,
    /// Our SDES CNAME.
    pub cname: String,
}

impl RtcpConfig {
    pub fn new(cname: impl Into<String>) -> Self {
        Self {
            interval: Duration::from_secs(5),
            cname: cname.into(),
        }
    }
}

/// The peer's view of our stream, and what it says about itself.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RemoteStats {
    /// Reports received (SR or RR) that carried a block about our SSRC.
    pub reports: u64,
    /// Fraction of our packets they lost (÷256) in their last interval.
    pub fraction_lost: u8,
    /// Cumulative packets of ours they lost (24-bit signed).
    pub cumulative_lost: i32,
    pub extended_highest_seq: u32,
    /// Their interarrival jitter for our stream, timestamp units.
    pub jitter: u32,
    /// Round-trip time from their LSR/DLSR echo of one of our SRs.
    pub rtt: Option<Duration>,
    /// When the last block about our stream arrived.
    pub last_report_at: Option<Instant>,
    /// Their SSRC as seen in their SR/RR.
    pub ssrc: Option<u32>,
    /// Their sender packet/octet counts from their last SR.
    pub sender_packets: Option<u32>,
    pub sender_octets: Option<u32>,
    /// They sent BYE.
    pub bye: bool,
}

/// Schedules and builds our RTCP, and digests the peer's.
#[derive(Debug, Clone)]
pub struct RtcpScheduler {
    config: RtcpConfig,
    local_ssrc: u32,
    next_at: Instant,
    /// Our sender packet count at the last report (an SR is sent only if
    /// we sent media since).
    packets_at_last_report: Option<u32>,
    /// Compact NTP of our recent SRs and when we sent them.
    our_srs: [Option<(u32, Instant)>; SR_HISTORY],
    our_sr_next: usize,
    /// Compact NTP of the peer's last SR and when it arrived (LSR/DLSR).
    their_sr: Option<(u32, Instant)>,
    remote: RemoteStats,
}

impl RtcpScheduler {
    /// First report after 0.5–1.5 × the interval from `now`.
    pub fn new(
        config: RtcpConfig,
        local_ssrc: u32,
        now: Instant,
        rng: &mut impl RngCore,
    ) -> Result<Self, RtpError> {
        if config.interval.is_zero() {
            return Err(RtpError::InvalidConfig("RTCP interval must not be 0"));
        }
        if config.cname.is_empty() || config.cname.len() > 255 {
            return Err(RtpError::InvalidConfig("CNAME must be 1-255 bytes"));
        }
        let mut s = Self {
            config,
            local_ssrc,
            next_at: now,
            packets_at_last_report: None,
            our_srs: [None; SR_HISTORY],
            our_sr_next: 0,
            their_sr: None,
            remote: RemoteStats::default(),
        };
        s.next_at = now + s.randomised_interval(rng);
        Ok(s)
    }

    fn randomised_interval(&self, rng: &mut impl RngCore) -> Duration {
        // Uniform factor in [0.5, 1.5) with 2^-32 resolution.
        let u = f64::from(rng.next_u32()) / 4_294_967_296.0;
        self.config.interval.mul_f64(0.5 + u)
    }

    /// When [`Self::poll_transmit`] next has something to send.
    pub fn poll_timeout(&self) -> Instant {
        self.next_at
    }

    /// What the peer told us.
    pub fn remote_stats(&self) -> &RemoteStats {
        &self.remote
    }

    /// If a report is due, build it (SR if we sent media since the last
    /// report, RR otherwise; plus SDES CNAME) and schedule the next one.
    pub fn poll_transmit(
        &mut self,
        now: Instant,
        wall: SystemTime,
        sender: Option<&RtpSender>,
        receiver: &mut RtpReceiver,
        rng: &mut impl RngCore,
    ) -> Result<Option<Bytes>, RtpError> {
        if now < self.next_at {
            return Ok(None);
        }
        self.next_at = now + self.randomised_interval(rng);
        let reports: Vec<ReceptionReport> = receiver
            .report_block()
            .map(|b| self.reception_report(now, b))
            .into_iter()
            .collect();
        let sent_media = sender.filter(|s| {
            self.packets_at_last_report != Some(s.packets_sent()) && s.packets_sent() > 0
        });
        let first: Box<dyn Packet + Send + Sync> = if let Some(tx) = sent_media {
            let ntp = ntp_timestamp(wall);
            self.our_srs[self.our_sr_next] = Some((compact(ntp), now));
            self.our_sr_next = (self.our_sr_next + 1) % SR_HISTORY;
            Box::new(SenderReport {
                ssrc: self.local_ssrc,
                ntp_time: ntp,
                // The timestamp of the next packet: our audio is paced, so
                // this is "now" on the media clock to within one frame.
                rtp_time: tx.next_timestamp(),
                packet_count: tx.packets_sent(),
                octet_count: tx.octets_sent(),
                reports,
                profile_extensions: Bytes::new(),
            })
        } else {
            Box::new(ReceiverReport {
                ssrc: self.local_ssrc,
                reports,
                profile_extensions: Bytes::new(),
            })
        };
        if let Some(tx) = sender {
            self.packets_at_last_report = Some(tx.packets_sent());
        }
        let sdes = Box::new(SourceDescription {
            chunks: vec![SourceDescriptionChunk {
                source: self.local_ssrc,
                items: vec![SourceDescriptionItem {
                    sdes_type: SdesType::SdesCname,
                    text: Bytes::copy_from_slice(self.config.cname.as_bytes()),
                }],
            }],
        });
        rtcp::packet::marshal(&[first, sdes])
            .map(Some)
            .map_err(RtpError::RtcpMarshal)
    }

    /// A BYE for our SSRC, to send when we hang up.
    pub fn bye(&self) -> Result<Bytes, RtpError> {
        let bye: Box<dyn Packet + Send + Sync> = Box::new(Goodbye {
            sources: vec![self.local_ssrc],
            reason: Bytes::new(),
        });
        rtcp::packet::marshal(&[bye]).map_err(RtpError::RtcpMarshal)
    }

    fn reception_report(&self, now: Instant, b: ReportBlock) -> ReceptionReport {
        let (lsr, dlsr) = match self.their_sr {
            Some((lsr, at)) => (lsr, to_dlsr(now.saturating_duration_since(at))),
            None => (0, 0),
        };
        ReceptionReport {
            ssrc: b.ssrc,
            fraction_lost: b.fraction_lost,
            total_lost: lost_to_wire(b.cumulative_lost),
            last_sequence_number: b.extended_highest_seq,
            jitter: b.jitter,
            last_sender_report: lsr,
            delay: dlsr,
        }
    }

    /// Digest one received RTCP datagram (compound or not). Only its SR, RR
    /// and BYE packets are read ([`reports_only`]).
    pub fn on_rtcp(&mut self, now: Instant, data: &[u8]) -> Result<(), RtpError> {
        let reports = reports_only(data)?;
        if reports.is_empty() {
            return Ok(());
        }
        let packets =
            rtcp::packet::unmarshal(&mut &reports[..]).map_err(RtpError::RtcpMalformed)?;
        for p in &packets {
            let any = p.as_any();
            if let Some(sr) = any.downcast_ref::<SenderReport>() {
                self.their_sr = Some((compact(sr.ntp_time), now));
                self.remote.ssrc = Some(sr.ssrc);
                self.remote.sender_packets = Some(sr.packet_count);
                self.remote.sender_octets = Some(sr.octet_count);
                self.digest_blocks(now, &sr.reports);
            } else if let Some(rr) = any.downcast_ref::<ReceiverReport>() {
                self.remote.ssrc = Some(rr.ssrc);
                self.digest_blocks(now, &rr.reports);
            } else if let Some(bye) = any.downcast_ref::<Goodbye>()
                && self.remote.ssrc.is_none_or(|s| bye.sources.contains(&s))
            {
                self.remote.bye = true;
            }
        }
        Ok(())
    }

    fn digest_blocks(&mut self, now: Instant, blocks: &[ReceptionReport]) {
        for b in blocks.iter().filter(|b| b.ssrc == self.local_ssrc) {
            self.remote.reports += 1;
            self.remote.fraction_lost = b.fraction_lost;
            self.remote.cumulative_lost = lost_from_wire(b.total_lost);
            self.remote.extended_highest_seq = b.last_sequence_number;
            self.remote.jitter = b.jitter;
            self.remote.last_report_at = Some(now);
            if b.last_sender_report != 0
                && let Some((_, sent_at)) = self
                    .our_srs
                    .iter()
                    .flatten()
                    .find(|(c, _)| *c == b.last_sender_report)
            {
                // RFC 3550 §6.4.1: RTT = A − LSR − DLSR, with A and LSR taken
                // from our monotonic clock instead of NTP.
                self.remote.rtt = Some(
                    now.saturating_duration_since(*sent_at)
                        .saturating_sub(from_dlsr(b.delay)),
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ntp_conversion() {
        let wall = UNIX_EPOCH + Duration::new(1_700_000_000, 500_000_000);
        let ntp = ntp_timestamp(wall);
        assert_eq!(ntp >> 32, 1_700_000_000 + NTP_UNIX_OFFSET);
        assert_eq!(ntp & 0xffff_ffff, 1 << 31);
        assert_eq!(
            compact(ntp),
            (((1_700_000_000 + NTP_UNIX_OFFSET) & 0xffff) << 16) as u32 | 0x8000
        );
    }

    /// The fuzzer's find (fuzz/corpus/rtp/crash-99ef0c1b…): a transport-layer
    /// NACK (PT 205, FMT 1) whose length field covers only its SSRCs made the
    /// `rtcp` crate read past it. Such packets are skipped; an RR beside them
    /// is still read, and a length past the datagram is an error.
    #[test]
    fn feedback_packets_are_skipped_and_reports_still_read() {
        let now = Instant::now();
        let mut s = RtcpScheduler::new(
            RtcpConfig::new("t"),
            0x1234,
            now,
            &mut <rand::rngs::StdRng as rand::SeedableRng>::seed_from_u64(1),
        )
        .unwrap();
        // NACK: V=2 FMT=1, PT 205, length 2 (sender and media SSRC, no FCI).
        let mut d = vec![0x81, 205, 0, 2, 0, 0, 0, 1, 0, 0, 0, 2];
        // RR from SSRC 9 with one block about our SSRC 0x1234.
        d.extend_from_slice(&[0x81, 201, 0, 7, 0, 0, 0, 9, 0, 0, 0x12, 0x34]);
        d.extend_from_slice(&[0; 20]);
        s.on_rtcp(now, &d).unwrap();
        assert_eq!(s.remote_stats().ssrc, Some(9));
        assert_eq!(s.remote_stats().reports, 1);
        // Only the NACK: nothing read, no error.
        s.on_rtcp(now, &d[..12]).unwrap();
        // A length past the end.
        assert!(s.on_rtcp(now, &[0x81, 201, 0, 9, 0, 0, 0, 9]).is_err());
    }

    #[test]
    fn loss_wire_encoding() {
        assert_eq!(lost_to_wire(-1), 0x00ff_ffff);
        assert_eq!(lost_from_wire(0x00ff_ffff), -1);
        assert_eq!(lost_to_wire(1 << 24), 0x007f_ffff);
        assert_eq!(lost_from_wire(lost_to_wire(-5000)), -5000);
        assert_eq!(to_dlsr(Duration::from_millis(1500)), 98_304);
        assert_eq!(from_dlsr(98_304), Duration::from_millis(1500));
    }
}
