//! The call detail record: one per call attempt, rejected ones included.
//! Written as a log line now (`target: "cdr"`), to the database when the
//! store lands.

use serde::Serialize;
use std::net::SocketAddr;
use std::time::{SystemTime, UNIX_EPOCH};

/// Which side ended the call.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum HangupSide {
    /// Not ended (or never started).
    None,
    /// The caller (BYE, CANCEL).
    Caller,
    /// The bridge (rejection, timeout, local hang-up).
    Bridge,
}

/// One call attempt.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CallRecord {
    /// SIP Call-ID.
    pub call_id: String,
    /// Tenant, once routed.
    pub tenant: Option<String>,
    /// Trunk, once identified.
    pub trunk: Option<String>,
    /// Caller (From user part).
    pub from: String,
    /// Dialed number (Request-URI user part).
    pub to: String,
    /// Signalling source address.
    pub source: SocketAddr,
    /// INVITE received.
    #[serde(serialize_with = "unix_ms")]
    pub started_at: SystemTime,
    /// 200 OK sent.
    #[serde(serialize_with = "opt_unix_ms")]
    pub answered_at: Option<SystemTime>,
    /// Call ended.
    #[serde(serialize_with = "opt_unix_ms")]
    pub ended_at: Option<SystemTime>,
    /// Final response to the INVITE (200 for answered calls).
    pub result_code: u16,
    /// Who hung up.
    pub hangup_side: HangupSide,
    /// Why (see `HangupCause::as_str`).
    pub cause: String,
    /// Negotiated codec.
    pub codec: Option<String>,
    /// Media statistics, for answered calls.
    pub rtp: Option<RtpSummary>,
    /// Network pipeline statistics (connections, dropped frames, failure),
    /// for answered calls with one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pipeline: Option<super::supervisor::PipelineSummary>,
    /// Stretches during which the recording and the transcript were paused
    /// (PCI: the agent or the admin API asked), in order.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub recording_paused: Vec<PausedStretch>,
    /// Whether the call was recorded, as far as the call knows; the store
    /// link corrects it when a write failed (issue 19).
    pub recording: RecordingStatus,
}

/// Whether a call was recorded (its CDR's `recording`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum RecordingStatus {
    /// The tenant does not record.
    #[default]
    Off,
    /// The tenant records, but the call never got as far as a recording
    /// (rejected, cancelled, never confirmed).
    NotStarted,
    /// Recorded.
    Recorded,
    /// Recorded up to a failed write (what was sealed before is kept).
    Partial,
    /// The tenant records, but the store could not write: answered without
    /// a recording (`on_store_failure = "answer-unrecorded"`), or refused.
    NotRecorded,
    /// The caller opted out: the recording was discarded.
    OptedOut,
}

impl RecordingStatus {
    /// Whether audio of the call is kept.
    pub fn recorded(self) -> bool {
        matches!(self, Self::Recorded | Self::Partial)
    }
}

/// A stretch of a call that was not recorded or transcribed (PCI pause).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct PausedStretch {
    /// When the pause began (Unix ms in the CDR).
    #[serde(serialize_with = "unix_ms")]
    pub paused_at: SystemTime,
    /// When it ended: resumed, or the call's end.
    #[serde(serialize_with = "unix_ms")]
    pub resumed_at: SystemTime,
}

/// RTP statistics of a call (RFC 3550 receive side, plus what we sent).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct RtpSummary {
    /// Valid RTP packets received.
    pub packets_in: u64,
    /// Packets lost (expected − received).
    pub lost: i64,
    /// Interarrival jitter at the end, in milliseconds.
    pub jitter_ms: u32,
    /// Datagrams ignored (wrong source, payload type, malformed).
    pub rejected: u64,
    /// Of those, valid RTP from an address other than the call's (the SDP's,
    /// or the one latched behind NAT): injection or hijack attempts.
    pub wrong_source: u64,
    /// RTP packets sent.
    pub packets_out: u64,
    /// Frames concealed at playout for lost or late packets (a gap that
    /// audio followed; at most the 60 ms fade per gap: a stream that stops
    /// is not loss).
    pub concealed: u64,
    /// Packets that arrived after their playout slot (discarded).
    pub late: u64,
    /// Outbound 20 ms frames not sent because the media task stalled for
    /// more than 60 ms (shorter delays are caught up, every frame sent).
    pub send_skipped: u64,
    /// Agent audio frames dropped (the oldest) because more than the
    /// prompt's length plus 2 s of it arrived while the disclosure played.
    pub agent_dropped: u64,
}

impl RtpSummary {
    /// The statistics of a media session.
    pub fn of(media: &super::MediaSession) -> RtpSummary {
        let stats = media.rtp_stats();
        let counters = media.counters();
        RtpSummary {
            packets_in: stats.packets_received,
            lost: stats.cumulative_lost,
            jitter_ms: stats.jitter / 8,
            rejected: stats.rejected.total(),
            wrong_source: stats.rejected.wrong_source,
            packets_out: counters.rtp_out,
            concealed: counters.concealed,
            late: media.jitter_stats().late,
            send_skipped: counters.ticks_skipped,
            agent_dropped: counters.agent_frames_dropped,
        }
    }
}

fn to_ms(t: &SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn unix_ms<S: serde::Serializer>(t: &SystemTime, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_u64(to_ms(t))
}

fn opt_unix_ms<S: serde::Serializer>(t: &Option<SystemTime>, s: S) -> Result<S::Ok, S::Error> {
    match t {
        Some(t) => s.serialize_some(&to_ms(t)),
        None => s.serialize_none(),
    }
}

impl CallRecord {
    /// Call duration from answer to end, when answered.
    pub fn talk_time(&self) -> Option<std::time::Duration> {
        let answered = self.answered_at?;
        self.ended_at?.duration_since(answered).ok()
    }
}
