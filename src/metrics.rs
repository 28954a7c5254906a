//! Prometheus metrics (DESIGN §5, issue 7 item 6): the one place that names
//! every metric, describes it (help text, unit) and renders the text
//! exposition for the admin listener's `GET /metrics`.
//!
//! Owns: the process-wide `metrics` recorder (`metrics-exporter-prometheus`
//! without its HTTP listener: the admin router serves [`render`]), the metric
//! names ([`names`]), the bucket bounds of the histograms, and small helpers
//! the tokio shell (`daemon`, `pipeline`) calls where things happen.
//! Must not touch: the sans-IO core (`sip`, `media`, `call`) never records a
//! metric; figures about calls and media come from the statistics those
//! modules already expose (`RtpSummary`, `CallRecord`), read by the call task.
//!
//! Label values are bounded: tenant ids (from configuration), 3-digit SIP
//! status codes, SIP methods from a fixed list (anything else is `other`),
//! pipeline kinds and a few fixed words. Never a call id, a number or free text.
//! The text format itself is the exporter's; nothing of it is written here.

use crate::call::{MediaQuality, MediaSession, RtpSummary};
use crate::media::quality::LatencyHistogram;
use crate::sip::message::{Message, Method};
use crate::store::retention::{ItemKind, SweepReport};
use ::metrics::{
    Gauge, Unit, counter, describe_counter, describe_gauge, describe_histogram, gauge, histogram,
};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// Metric names, in one place.
pub(crate) mod names {
    /// Gauge, always 1, labelled with the build's version.
    pub(crate) const BUILD_INFO: &str = "sipbridge_build_info";
    /// Gauge: seconds since the daemon started.
    pub(crate) const UPTIME: &str = "sipbridge_uptime_seconds";
    /// Gauge by `tenant`: calls admitted and not yet ended.
    pub(crate) const ACTIVE_CALLS: &str = "sipbridge_active_calls";
    /// Counter by `code` (and `tenant` when routed): call attempts by final response.
    pub(crate) const CALL_ATTEMPTS: &str = "sipbridge_call_attempts_total";
    /// Counter by `tenant`, `mode`, `result` and `reason`: finished agent transfers.
    pub(crate) const TRANSFERS: &str = "sipbridge_transfers_total";
    /// Counter by `method`: SIP requests received.
    pub(crate) const SIP_REQUESTS_RECEIVED: &str = "sipbridge_sip_requests_received_total";
    /// Counter by `code`: SIP responses received.
    pub(crate) const SIP_RESPONSES_RECEIVED: &str = "sipbridge_sip_responses_received_total";
    /// Counter by `method`: SIP requests sent.
    pub(crate) const SIP_REQUESTS_SENT: &str = "sipbridge_sip_requests_sent_total";
    /// Counter by `code`: SIP responses sent.
    pub(crate) const SIP_RESPONSES_SENT: &str = "sipbridge_sip_responses_sent_total";
    /// Counter: SIP messages received that did not parse.
    pub(crate) const SIP_MALFORMED: &str = "sipbridge_sip_malformed_total";
    /// Counter: valid RTP packets received.
    pub(crate) const RTP_PACKETS_RECEIVED: &str = "sipbridge_rtp_packets_received_total";
    /// Counter: RTP packets sent.
    pub(crate) const RTP_PACKETS_SENT: &str = "sipbridge_rtp_packets_sent_total";
    /// Counter: RTP packets lost (RFC 3550 cumulative loss).
    pub(crate) const RTP_PACKETS_LOST: &str = "sipbridge_rtp_packets_lost_total";
    /// Counter: datagrams on RTP ports ignored (wrong source, payload type, malformed).
    pub(crate) const RTP_PACKETS_REJECTED: &str = "sipbridge_rtp_packets_rejected_total";
    /// Counter: RTP packets from an address other than the call's (dropped).
    pub(crate) const RTP_PACKETS_WRONG_SOURCE: &str = "sipbridge_rtp_packets_wrong_source_total";
    /// Counter: RTP packets that arrived after their playout slot.
    pub(crate) const RTP_PACKETS_LATE: &str = "sipbridge_rtp_packets_late_total";
    /// Counter: RTP datagrams the kernel dropped before the daemon read them.
    pub(crate) const RTP_DROPPED_UNREAD: &str = "sipbridge_rtp_packets_dropped_unread_total";
    /// Counter: RTP packets not sent because the socket's send buffer was full.
    pub(crate) const RTP_SEND_DROPPED: &str = "sipbridge_rtp_send_dropped_total";
    /// Counter: 20 ms frames concealed at playout because their packet was lost or late.
    pub(crate) const RTP_FRAMES_CONCEALED: &str = "sipbridge_rtp_frames_concealed_total";
    /// Histogram: interarrival jitter of calls (RFC 3550 A.8), sampled.
    pub(crate) const RTP_JITTER: &str = "sipbridge_rtp_jitter_seconds";
    /// Histogram by `direction` (`in`, `out`): the bridge's added latency
    /// (inbound beyond the jitter buffer's target; outbound to the first RTP
    /// packet), every timed frame of a call, folded in at its end.
    pub(crate) const MEDIA_ADDED_LATENCY: &str = "sipbridge_media_added_latency_seconds";
    /// Histogram: a mark's arrival to its report, every played mark.
    pub(crate) const MARK_TO_PLAYOUT: &str = "sipbridge_media_mark_to_playout_seconds";
    /// Histogram: the estimated MOS (E-model) of each call with media.
    pub(crate) const CALL_MOS: &str = "sipbridge_call_mos";
    /// Counter by `kind`: pipeline connections established.
    pub(crate) const PIPELINE_CONNECTS: &str = "sipbridge_pipeline_connects_total";
    /// Counter by `kind`: pipeline connections that failed (at connect or mid-call).
    pub(crate) const PIPELINE_FAILURES: &str = "sipbridge_pipeline_failures_total";
    /// Counter by `kind`: pipeline connections established after a loss.
    pub(crate) const PIPELINE_RECONNECTS: &str = "sipbridge_pipeline_reconnects_total";
    /// Counter: caller frames dropped because the pipeline was behind.
    pub(crate) const CALLER_FRAMES_DROPPED: &str = "sipbridge_pipeline_caller_frames_dropped_total";
    /// Counter: bytes of sealed recording files written.
    pub(crate) const RECORDING_BYTES: &str = "sipbridge_recording_bytes_written_total";
    /// Counter: store operations dropped because the writer's queue was full.
    pub(crate) const STORE_DROPPED: &str = "sipbridge_store_queue_dropped_total";
    /// Gauge: free bytes on `var_dir`'s filesystem (for unprivileged users).
    pub(crate) const STORE_FREE_BYTES: &str = "sipbridge_store_free_bytes";
    /// Gauge: bytes of recordings in the spool, not yet in the S3 bucket.
    pub(crate) const RECORDING_SPOOL_BYTES: &str = "sipbridge_recording_spool_bytes";
    /// Counter by `result` (`ok`, `failed`): recordings uploads to the bucket.
    pub(crate) const RECORDING_UPLOADS: &str = "sipbridge_recording_uploads_total";
    /// Gauge: 1 while the store can write, 0 while it cannot (free space
    /// below `min_free_mb`, or a failed write since the last check).
    pub(crate) const STORE_WRITABLE: &str = "sipbridge_store_writable";
    /// Counter by `kind` (`database`, `recording`): writes that failed.
    pub(crate) const STORE_WRITE_FAILURES: &str = "sipbridge_store_write_failures_total";
    /// Gauge: database writes (CDRs, consent, recording states) waiting to be retried.
    pub(crate) const STORE_RETRY_PENDING: &str = "sipbridge_store_retry_pending";
    /// Counter: database writes stored on a retry.
    pub(crate) const STORE_RETRIED: &str = "sipbridge_store_retried_total";
    /// Counter: database writes lost because the retry queue was full.
    pub(crate) const STORE_RETRY_DROPPED: &str = "sipbridge_store_retry_dropped_total";
    /// Counter: group-commit batches the store thread committed.
    pub(crate) const STORE_BATCHES: &str = "sipbridge_store_batches_total";
    /// Counter: database writes those batches held.
    pub(crate) const STORE_BATCHED_WRITES: &str = "sipbridge_store_batched_writes_total";
    /// Counter by `kind`: objects deleted by the retention sweeper.
    pub(crate) const RETENTION_DELETIONS: &str = "sipbridge_retention_deletions_total";
    /// Counter by `kind`: retention deletions that failed (retried next sweep).
    pub(crate) const RETENTION_FAILURES: &str = "sipbridge_retention_failures_total";
    /// Counter by `result` (`ok`, `rejected`): configuration reloads.
    pub(crate) const CONFIG_RELOADS: &str = "sipbridge_config_reloads_total";
    /// Counter by `reason`: SIP messages dropped unanswered (rate limits,
    /// bans, unknown sources, scanners, …).
    pub(crate) const SIP_DROPPED: &str = "sipbridge_sip_dropped_total";
    /// Counter by `reason` (`digest`, `malformed`, `scanner`): sources banned.
    pub(crate) const SIP_BANS: &str = "sipbridge_sip_bans_total";
    /// Counter: digest checks that failed (wrong password, unknown user, …).
    pub(crate) const SIP_DIGEST_FAILURES: &str = "sipbridge_sip_digest_failures_total";
    /// Gauge: source addresses the rate limiter tracks now.
    pub(crate) const SIP_TRACKED_SOURCES: &str = "sipbridge_sip_tracked_sources";
    /// Counter by `tenant` and `result` (`ok`, `failed`): webhook delivery attempts.
    pub(crate) const WEBHOOK_DELIVERIES: &str = "sipbridge_webhook_deliveries_total";
    /// Counter by `tenant` and `reason` (`queue_full`, `expired`, `shutdown`,
    /// `reconfigured`): call events never delivered.
    pub(crate) const WEBHOOK_DROPPED: &str = "sipbridge_webhook_events_dropped_total";
    /// Gauge by `tenant`: call events waiting for the receiver.
    pub(crate) const WEBHOOK_QUEUED: &str = "sipbridge_webhook_events_queued";
    /// Gauge: ended calls kept only to answer retransmissions.
    pub(crate) const SIP_LINGERING_CALLS: &str = "sipbridge_sip_lingering_calls";
    /// Gauge: heap bytes of those entries.
    pub(crate) const SIP_LINGERING_BYTES: &str = "sipbridge_sip_lingering_bytes";
}

/// The `reason` label values of [`names::SIP_DROPPED`].
const DROP_REASONS: &[&str] = &[
    "rate_limited",
    "call_rate_limited",
    "banned",
    "unknown_source",
    "scanner",
    "malformed",
    "out_of_dialog",
    "other",
];

use names::*;

/// Upper bounds of the jitter histogram's buckets, in seconds.
pub(crate) const JITTER_BUCKETS: &[f64] =
    &[0.001, 0.002, 0.005, 0.01, 0.02, 0.03, 0.05, 0.1, 0.2, 0.5];

/// Upper bounds of the latency histograms' buckets, in seconds.
pub(crate) const LATENCY_BUCKETS: &[f64] = &[
    0.001, 0.002, 0.005, 0.01, 0.015, 0.02, 0.03, 0.04, 0.06, 0.1, 0.2, 0.5, 1.0, 2.0,
];

/// Upper bounds of the MOS histogram's buckets.
pub(crate) const MOS_BUCKETS: &[f64] = &[
    1.5, 2.0, 2.5, 3.0, 3.5, 3.8, 4.0, 4.1, 4.2, 4.3, 4.35, 4.4, 4.45, 4.5,
];

/// How often a live call reports its RTP counters (and one jitter sample).
pub(crate) const RTP_REPORT_INTERVAL: Duration = Duration::from_secs(5);

/// How often histogram samples are folded into their buckets when nobody
/// scrapes (bounds the exporter's memory; a scrape folds them too).
const UPKEEP_INTERVAL: Duration = Duration::from_secs(5);

/// SIP methods that get their own label value; anything else is `other`.
const METHODS: &[&str] = &[
    "INVITE",
    "ACK",
    "BYE",
    "CANCEL",
    "OPTIONS",
    "REGISTER",
    "UPDATE",
    "INFO",
    "PRACK",
    "REFER",
    "NOTIFY",
    "SUBSCRIBE",
    "MESSAGE",
    "PUBLISH",
];

/// An RTP packet not sent: its socket's send buffer was full (a media
/// socket never waits for room; see `daemon::rtp_socket`).
pub(crate) fn rtp_send_dropped() {
    counter!(RTP_SEND_DROPPED).increment(1);
}

/// `n` RTP datagrams dropped by the kernel: a call's receive buffer was
/// full (a flood, or a call that fell behind).
pub(crate) fn rtp_dropped_unread(n: u64) {
    counter!(RTP_DROPPED_UNREAD).increment(n);
}

/// A SIP message dropped unanswered; `reason` is one of [`DROP_REASONS`].
pub(crate) fn sip_dropped(reason: &'static str) {
    let reason = if DROP_REASONS.contains(&reason) {
        reason
    } else {
        "other"
    };
    counter!(SIP_DROPPED, "reason" => reason).increment(1);
}

/// The metric label of a switchboard `Dispatch::Drop` reason.
pub(crate) fn drop_label(why: &str) -> &'static str {
    match why {
        "unknown source" => "unknown_source",
        "banned source" => "banned",
        "scanner" => "scanner",
        "unparseable" | "invalid request" | "invalid ACK" | "malformed: source banned" => {
            "malformed"
        }
        "in-dialog request from outside the dialog" | "response from outside the dialog" => {
            "out_of_dialog"
        }
        _ => "other",
    }
}

/// The switchboard's defence counters, as they stand.
pub(crate) fn security(counts: &crate::call::SecurityCounts) {
    for (reason, n) in counts.bans {
        counter!(SIP_BANS, "reason" => reason.as_str()).absolute(n);
    }
    counter!(SIP_DIGEST_FAILURES).absolute(counts.digest_failures);
    #[allow(clippy::cast_precision_loss)]
    gauge!(SIP_TRACKED_SOURCES).set(counts.tracked_sources as f64);
}

/// Ended calls held only to answer retransmissions, and their heap bytes.
pub(crate) fn lingering_calls(calls: usize, bytes: usize) {
    #[allow(clippy::cast_precision_loss)]
    {
        gauge!(SIP_LINGERING_CALLS).set(calls as f64);
        gauge!(SIP_LINGERING_BYTES).set(bytes as f64);
    }
}

/// The handle of the installed recorder, and when it was installed.
static INSTALLED: OnceLock<Option<(PrometheusHandle, Instant)>> = OnceLock::new();

/// The exporter as this daemon configures it (histograms with buckets).
fn builder() -> PrometheusBuilder {
    let with_buckets = || {
        PrometheusBuilder::new()
            .set_buckets_for_metric(Matcher::Full(RTP_JITTER.to_owned()), JITTER_BUCKETS)?
            .set_buckets_for_metric(
                Matcher::Full(MEDIA_ADDED_LATENCY.to_owned()),
                LATENCY_BUCKETS,
            )?
            .set_buckets_for_metric(Matcher::Full(MARK_TO_PLAYOUT.to_owned()), LATENCY_BUCKETS)?
            .set_buckets_for_metric(Matcher::Full(CALL_MOS.to_owned()), MOS_BUCKETS)
    };
    // Only an empty bucket list is refused, and none of these is empty; were
    // one, the histograms would render as summaries instead.
    with_buckets().unwrap_or_else(|_| PrometheusBuilder::new())
}

/// Help text and unit of every metric, and the series that exist from the start.
fn describe() {
    describe_gauge!(
        BUILD_INFO,
        "Build information: always 1, labelled with the version."
    );
    describe_gauge!(UPTIME, Unit::Seconds, "Seconds since the daemon started.");
    describe_gauge!(
        ACTIVE_CALLS,
        Unit::Count,
        "Calls admitted and not yet ended, by tenant."
    );
    describe_counter!(
        CALL_ATTEMPTS,
        Unit::Count,
        "Call attempts by final response code (and tenant once routed), counted when the CDR is written."
    );
    describe_counter!(
        TRANSFERS,
        Unit::Count,
        "Agent transfers that finished, by tenant, mode, result (completed or failed) and reason (empty when completed)."
    );
    describe_counter!(
        SIP_REQUESTS_RECEIVED,
        Unit::Count,
        "SIP requests received, by method (retransmissions included)."
    );
    describe_counter!(
        SIP_RESPONSES_RECEIVED,
        Unit::Count,
        "SIP responses received, by status code (retransmissions included)."
    );
    describe_counter!(
        SIP_REQUESTS_SENT,
        Unit::Count,
        "SIP requests sent, by method (retransmissions included)."
    );
    describe_counter!(
        SIP_RESPONSES_SENT,
        Unit::Count,
        "SIP responses sent, by status code (retransmissions included)."
    );
    describe_counter!(
        SIP_MALFORMED,
        Unit::Count,
        "SIP messages received that did not parse."
    );
    describe_counter!(
        RTP_PACKETS_RECEIVED,
        Unit::Count,
        "Valid RTP packets received."
    );
    describe_counter!(RTP_PACKETS_SENT, Unit::Count, "RTP packets sent.");
    describe_counter!(
        RTP_DROPPED_UNREAD,
        Unit::Count,
        "RTP datagrams the kernel dropped because a call's receive buffer was full."
    );
    describe_counter!(
        RTP_SEND_DROPPED,
        Unit::Count,
        "RTP packets not sent because the socket's send buffer was full."
    );
    describe_counter!(
        RTP_PACKETS_LOST,
        Unit::Count,
        "RTP packets lost (RFC 3550 expected minus received)."
    );
    describe_counter!(
        RTP_PACKETS_REJECTED,
        Unit::Count,
        "Datagrams on RTP ports ignored: wrong source, payload type or malformed."
    );
    describe_counter!(
        RTP_PACKETS_WRONG_SOURCE,
        Unit::Count,
        "RTP packets from an address other than the call's (SDP or latched), dropped."
    );
    describe_counter!(
        RTP_PACKETS_LATE,
        Unit::Count,
        "RTP packets that arrived after their playout slot (discarded by the jitter buffer)."
    );
    describe_counter!(
        RTP_FRAMES_CONCEALED,
        Unit::Count,
        "20 ms frames concealed at playout because their packet was lost or late."
    );
    describe_histogram!(
        RTP_JITTER,
        Unit::Seconds,
        "RTP interarrival jitter (RFC 3550), sampled every 5 s of a call with media and at its end."
    );
    describe_histogram!(
        MEDIA_ADDED_LATENCY,
        Unit::Seconds,
        "Latency the bridge adds, by direction: in = RTP arrival to caller audio handed to the pipeline, beyond the jitter buffer's target; out = agent audio into an empty playout queue to its first RTP packet. Every timed frame, recorded when the call ends."
    );
    describe_histogram!(
        MARK_TO_PLAYOUT,
        Unit::Seconds,
        "A mark's arrival from the agent to its report (its audio sent), every played mark, recorded when the call ends."
    );
    describe_histogram!(
        CALL_MOS,
        "Estimated MOS (ITU-T G.107 E-model, simplified) of each call with media, at its end."
    );
    describe_counter!(
        PIPELINE_CONNECTS,
        Unit::Count,
        "Pipeline connections established, by kind."
    );
    describe_counter!(
        PIPELINE_FAILURES,
        Unit::Count,
        "Pipeline connections that failed at connect or mid-call, by kind."
    );
    describe_counter!(
        PIPELINE_RECONNECTS,
        Unit::Count,
        "Pipeline connections established after a loss (reconnects), by kind."
    );
    describe_counter!(
        CALLER_FRAMES_DROPPED,
        Unit::Count,
        "Caller audio frames dropped because the pipeline was behind."
    );
    describe_counter!(
        RECORDING_BYTES,
        Unit::Bytes,
        "Bytes of sealed recording files written."
    );
    describe_counter!(
        WEBHOOK_DELIVERIES,
        Unit::Count,
        "Call event webhook delivery attempts, by tenant and result (ok: a 2xx answer)."
    );
    describe_counter!(
        WEBHOOK_DROPPED,
        Unit::Count,
        "Call events never delivered, by tenant and reason (queue_full drops the oldest)."
    );
    describe_gauge!(
        WEBHOOK_QUEUED,
        Unit::Count,
        "Call events waiting for the tenant's webhook receiver."
    );
    describe_counter!(
        STORE_DROPPED,
        Unit::Count,
        "Store operations (CDR rows, recording audio) dropped because the writer queue was full."
    );
    describe_counter!(
        RETENTION_DELETIONS,
        Unit::Count,
        "Objects deleted by the retention sweeper, by kind (recording, transcript, call)."
    );
    describe_counter!(
        RETENTION_FAILURES,
        Unit::Count,
        "Retention deletions that failed (retried at the next sweep), by kind."
    );
    describe_counter!(
        CONFIG_RELOADS,
        Unit::Count,
        "Configuration reloads, by result (ok, rejected)."
    );
    describe_gauge!(
        STORE_FREE_BYTES,
        Unit::Bytes,
        "Free bytes on the filesystem of var_dir (checked every check_interval_s)."
    );
    describe_gauge!(
        RECORDING_SPOOL_BYTES,
        Unit::Bytes,
        "Bytes of recordings in the spool, not yet uploaded to the S3 bucket ([profile.recordings] kind = \"s3\")."
    );
    describe_counter!(
        RECORDING_UPLOADS,
        Unit::Count,
        "Recordings completed in the S3 bucket (result ok) and upload attempts that failed (result failed, retried)."
    );
    describe_gauge!(
        STORE_WRITABLE,
        "1 while the store can write; 0 while free space is below min_free_mb or a write failed since the last check."
    );
    describe_counter!(
        STORE_WRITE_FAILURES,
        Unit::Count,
        "Store writes that failed, by kind (database, recording)."
    );
    describe_gauge!(
        STORE_RETRY_PENDING,
        Unit::Count,
        "Database writes (CDRs, consent, recording states) waiting to be retried."
    );
    describe_counter!(
        STORE_RETRIED,
        Unit::Count,
        "Database writes stored on a retry after a failure."
    );
    describe_counter!(
        STORE_BATCHES,
        Unit::Count,
        "Group-commit batches the store thread committed (one transaction each)."
    );
    describe_counter!(
        STORE_BATCHED_WRITES,
        Unit::Count,
        "Database writes (CDR rows, consent, recording index and states, transcripts) committed in those batches."
    );
    describe_counter!(
        STORE_RETRY_DROPPED,
        Unit::Count,
        "Database writes lost because the retry queue was full."
    );
    describe_counter!(
        SIP_DROPPED,
        Unit::Count,
        "SIP messages dropped without an answer, by reason (rate_limited, call_rate_limited, banned, unknown_source, scanner, malformed, out_of_dialog, other)."
    );
    describe_counter!(
        SIP_BANS,
        Unit::Count,
        "Source addresses banned, by reason (digest, malformed, scanner)."
    );
    describe_counter!(
        SIP_DIGEST_FAILURES,
        Unit::Count,
        "Digest authentication checks that failed."
    );
    describe_gauge!(
        SIP_TRACKED_SOURCES,
        Unit::Count,
        "Source addresses the per-source rate limiter tracks."
    );
    describe_gauge!(
        SIP_LINGERING_CALLS,
        Unit::Count,
        "Ended calls kept only to answer retransmissions (Timers J, K, I, L), as compact entries."
    );
    describe_gauge!(
        SIP_LINGERING_BYTES,
        Unit::Bytes,
        "Heap bytes those entries hold (Call-IDs, branches, responses to resend)."
    );
    for reason in DROP_REASONS {
        counter!(SIP_DROPPED, "reason" => *reason).absolute(0);
    }
    for reason in ["digest", "malformed", "scanner"] {
        counter!(SIP_BANS, "reason" => reason).absolute(0);
    }
    counter!(SIP_DIGEST_FAILURES).absolute(0);
    gauge!(SIP_TRACKED_SOURCES).set(0.0);
    gauge!(SIP_LINGERING_CALLS).set(0.0);
    gauge!(SIP_LINGERING_BYTES).set(0.0);
    gauge!(BUILD_INFO, "version" => env!("CARGO_PKG_VERSION")).set(1.0);
    gauge!(UPTIME).set(0.0);
    for result in ["ok", "rejected"] {
        counter!(CONFIG_RELOADS, "result" => result).absolute(0);
    }
    for kind in ["database", "recording"] {
        counter!(STORE_WRITE_FAILURES, "kind" => kind).absolute(0);
    }
    counter!(STORE_RETRIED).absolute(0);
    counter!(STORE_RETRY_DROPPED).absolute(0);
    counter!(STORE_BATCHES).absolute(0);
    counter!(STORE_BATCHED_WRITES).absolute(0);
    gauge!(STORE_RETRY_PENDING).set(0.0);
}

/// Installs the process-wide recorder once (later calls do nothing) and,
/// inside a tokio runtime, a task that runs the exporter's upkeep. Called by
/// `daemon::run` before anything is counted.
pub(crate) fn install() {
    let mut first = false;
    let installed = INSTALLED.get_or_init(|| {
        first = true;
        match builder().install_recorder() {
            Ok(handle) => {
                describe();
                Some((handle, Instant::now()))
            }
            Err(e) => {
                tracing::warn!(error = %e, "metrics recorder not installed; /metrics stays empty");
                None
            }
        }
    });
    if let (true, Some((handle, _)), Ok(rt)) =
        (first, installed, tokio::runtime::Handle::try_current())
    {
        let handle = handle.clone();
        rt.spawn(async move {
            let mut tick = tokio::time::interval(UPKEEP_INTERVAL);
            loop {
                tick.tick().await;
                handle.run_upkeep();
            }
        });
    }
}

/// The text exposition (format 0.0.4) of every metric, with the uptime
/// updated now. Empty when no recorder is installed.
pub(crate) fn render() -> String {
    match INSTALLED.get() {
        Some(Some((handle, started))) => render_with(handle, started.elapsed()),
        _ => String::new(),
    }
}

/// Renders `handle` after setting the uptime gauge of the current recorder.
fn render_with(handle: &PrometheusHandle, uptime: Duration) -> String {
    gauge!(UPTIME).set(uptime.as_secs_f64());
    handle.render()
}

/// The label value of a status code: its three digits, `other` if out of range.
fn code_label(code: u16) -> String {
    if (100..=699).contains(&code) {
        code.to_string()
    } else {
        "other".to_owned()
    }
}

/// The label value of a method name (from the fixed list, else `other`).
fn method_label(name: &str) -> &'static str {
    METHODS
        .iter()
        .find(|m| **m == name)
        .copied()
        .unwrap_or("other")
}

fn method_label_of(method: &Method) -> &'static str {
    match method {
        Method::Extension(_) => "other",
        known => method_label(known.as_str()),
    }
}

/// One SIP message received: `Some` parsed, `None` unparseable.
pub(crate) fn sip_received(msg: Option<&Message>) {
    match msg {
        Some(Message::Request(r)) => {
            counter!(SIP_REQUESTS_RECEIVED, "method" => method_label_of(&r.method)).increment(1);
        }
        Some(Message::Response(r)) => {
            counter!(SIP_RESPONSES_RECEIVED, "code" => code_label(r.status)).increment(1);
        }
        None => counter!(SIP_MALFORMED).increment(1),
    }
}

/// One SIP message sent, as encoded bytes: a response (`SIP/2.0 NNN`) by
/// code, a request by the method token of its start line.
pub(crate) fn sip_sent(bytes: &[u8]) {
    if let Some(rest) = bytes.strip_prefix(b"SIP/2.0 ") {
        let code = rest
            .get(..3)
            .and_then(|d| std::str::from_utf8(d).ok())
            .and_then(|d| d.parse::<u16>().ok())
            .unwrap_or(0);
        counter!(SIP_RESPONSES_SENT, "code" => code_label(code)).increment(1);
    } else {
        let token = bytes.split(|b| *b == b' ').next().unwrap_or_default();
        let method = std::str::from_utf8(token).map_or("other", method_label);
        counter!(SIP_REQUESTS_SENT, "method" => method).increment(1);
    }
}

/// A call attempt ended with final response `code` (its CDR was written).
pub(crate) fn call_attempt(code: u16, tenant: Option<&str>) {
    let code = code_label(code);
    match tenant {
        Some(t) => counter!(CALL_ATTEMPTS, "code" => code, "tenant" => t.to_owned()).increment(1),
        None => counter!(CALL_ATTEMPTS, "code" => code).increment(1),
    }
}

/// An agent transfer of a `tenant`'s call finished (`result` `completed`
/// or `failed`, with its `reason`).
pub(crate) fn transfer_finished(
    tenant: &str,
    mode: &'static str,
    result: &'static str,
    reason: &'static str,
) {
    counter!(
        TRANSFERS,
        "tenant" => tenant.to_owned(),
        "mode" => mode,
        "result" => result,
        "reason" => reason
    )
    .increment(1);
}

/// One active call of a tenant: counted in [`names::ACTIVE_CALLS`] from
/// creation until dropped.
#[derive(Debug)]
pub(crate) struct ActiveCall(Gauge);

impl ActiveCall {
    /// A call of `tenant` started.
    pub(crate) fn start(tenant: &str) -> ActiveCall {
        let g = gauge!(ACTIVE_CALLS, "tenant" => tenant.to_owned());
        g.increment(1.0);
        ActiveCall(g)
    }
}

impl Drop for ActiveCall {
    fn drop(&mut self) {
        self.0.decrement(1.0);
    }
}

/// Turns one call's cumulative RTP statistics into counter increments:
/// every [`RTP_REPORT_INTERVAL`] while the call runs and once at its end,
/// each time with the difference to what was already reported, plus one
/// jitter sample when packets arrived since the last report.
#[derive(Debug, Default)]
pub(crate) struct RtpMeter {
    reported: Reported,
    next: Option<Instant>,
}

#[derive(Debug, Default, Clone, Copy)]
struct Reported {
    packets_in: u64,
    packets_out: u64,
    lost: u64,
    rejected: u64,
    wrong_source: u64,
    concealed: u64,
    late: u64,
}

impl RtpMeter {
    /// A meter with nothing reported.
    pub(crate) fn new() -> RtpMeter {
        RtpMeter::default()
    }

    /// The call's timer fired at `now`: reports if the interval has passed.
    pub(crate) fn tick(&mut self, now: Instant, media: &MediaSession) {
        match self.next {
            None => self.next = Some(now + RTP_REPORT_INTERVAL),
            Some(t) if now >= t => {
                self.report(&RtpSummary::of(media), jitter_seconds(media));
                self.next = Some(now + RTP_REPORT_INTERVAL);
            }
            Some(_) => {}
        }
    }

    /// The call ended; `media` is its media session if it had one: its
    /// last counters, and its quality figures into the histograms.
    pub(crate) fn finish(&mut self, media: Option<&MediaSession>) {
        if let Some(m) = media {
            self.report(&RtpSummary::of(m), jitter_seconds(m));
            report_quality(&m.quality());
        }
    }

    /// Adds what `s` has beyond what was reported, and `jitter` (seconds)
    /// as a sample if packets arrived since. Loss can go down (duplicates
    /// count against it): only its new maximum is reported.
    fn report(&mut self, s: &RtpSummary, jitter: f64) {
        let r = &mut self.reported;
        let lost = u64::try_from(s.lost).unwrap_or(0);
        let add = |name: &'static str, now: u64, before: &mut u64| {
            if now > *before {
                counter!(name).increment(now - *before);
                *before = now;
            }
        };
        let had_packets = s.packets_in > r.packets_in;
        add(RTP_PACKETS_RECEIVED, s.packets_in, &mut r.packets_in);
        add(RTP_PACKETS_SENT, s.packets_out, &mut r.packets_out);
        add(RTP_PACKETS_LOST, lost, &mut r.lost);
        add(RTP_PACKETS_REJECTED, s.rejected, &mut r.rejected);
        add(
            RTP_PACKETS_WRONG_SOURCE,
            s.wrong_source,
            &mut r.wrong_source,
        );
        add(RTP_FRAMES_CONCEALED, s.concealed, &mut r.concealed);
        add(RTP_PACKETS_LATE, s.late, &mut r.late);
        if had_packets {
            histogram!(RTP_JITTER).record(jitter);
        }
    }
}

/// Folds one call's latency histograms (each bucket at its midpoint) and
/// its MOS into the process-wide histograms.
fn report_quality(q: &MediaQuality) {
    let fold = |h: &LatencyHistogram, target: ::metrics::Histogram| {
        for (value, count) in h.buckets() {
            target.record_many(value, count as usize);
        }
    };
    fold(
        &q.latency_in_beyond_target,
        histogram!(MEDIA_ADDED_LATENCY, "direction" => "in"),
    );
    fold(
        &q.latency_out,
        histogram!(MEDIA_ADDED_LATENCY, "direction" => "out"),
    );
    fold(&q.mark_to_playout, histogram!(MARK_TO_PLAYOUT));
    if let Some(mos) = q.mos {
        histogram!(CALL_MOS).record(mos);
    }
}

/// The current interarrival jitter in seconds: RFC 3550 keeps it in
/// timestamp units, and G.711's RTP clock is 8000 Hz (finer than the whole
/// milliseconds of [`RtpSummary::jitter_ms`]).
fn jitter_seconds(media: &MediaSession) -> f64 {
    f64::from(media.rtp_stats().jitter) / 8000.0
}

/// A pipeline of `kind` (`agent`, `deepgram`, …) connected.
pub(crate) fn pipeline_connected(kind: &'static str) {
    counter!(PIPELINE_CONNECTS, "kind" => kind).increment(1);
}

/// A pipeline of `kind` failed (at connect or mid-call).
pub(crate) fn pipeline_failed(kind: &'static str) {
    counter!(PIPELINE_FAILURES, "kind" => kind).increment(1);
}

/// A pipeline of `kind` connected again after a loss.
pub(crate) fn pipeline_reconnect(kind: &'static str) {
    counter!(PIPELINE_RECONNECTS, "kind" => kind).increment(1);
}

/// A call's pipeline dropped `n` caller frames (it was behind).
pub(crate) fn caller_frames_dropped(n: u64) {
    counter!(CALLER_FRAMES_DROPPED).increment(n);
}

/// `n` bytes of sealed recording written.
pub(crate) fn recording_bytes(n: u64) {
    if n > 0 {
        counter!(RECORDING_BYTES).increment(n);
    }
}

/// One webhook delivery attempt for `tenant`.
pub(crate) fn webhook_delivery(tenant: &str, ok: bool) {
    let result = if ok { "ok" } else { "failed" };
    counter!(WEBHOOK_DELIVERIES, "tenant" => tenant.to_owned(), "result" => result).increment(1);
}

/// `n` call events for `tenant` dropped undelivered.
pub(crate) fn webhook_dropped(tenant: &str, reason: &'static str, n: u64) {
    counter!(WEBHOOK_DROPPED, "tenant" => tenant.to_owned(), "reason" => reason).increment(n);
}

/// Call events waiting for `tenant`'s receiver now.
pub(crate) fn webhook_queued(tenant: &str, n: usize) {
    gauge!(WEBHOOK_QUEUED, "tenant" => tenant.to_owned()).set(n as f64);
}

/// The store writer's queue was full: one operation dropped.
pub(crate) fn store_dropped() {
    counter!(STORE_DROPPED).increment(1);
}

/// The store's free space and whether it can write (writer thread).
pub(crate) fn store_state(free_bytes: Option<u64>, writable: bool) {
    if let Some(free) = free_bytes {
        gauge!(STORE_FREE_BYTES).set(free as f64);
    }
    gauge!(STORE_WRITABLE).set(if writable { 1.0 } else { 0.0 });
}

/// Bytes of recordings waiting in the spool for the bucket (uploader thread).
pub(crate) fn recording_spool(bytes: u64) {
    gauge!(RECORDING_SPOOL_BYTES).set(bytes as f64);
}

/// A recording's upload to the bucket completed (`ok`) or failed (`failed`).
pub(crate) fn recording_upload(result: &'static str) {
    counter!(RECORDING_UPLOADS, "result" => result).increment(1);
}

/// A store write failed: `database` or `recording`.
pub(crate) fn store_write_failed(kind: &'static str) {
    counter!(STORE_WRITE_FAILURES, "kind" => kind).increment(1);
}

/// The retry queue's length now, with `stored` writes stored on a retry
/// and `dropped` lost (queue full) since the last report.
/// A group-commit batch of `writes` database writes committed (store thread).
pub(crate) fn store_batch(writes: usize) {
    counter!(STORE_BATCHES).increment(1);
    counter!(STORE_BATCHED_WRITES).increment(writes as u64);
}

pub(crate) fn store_retry(pending: usize, stored: u64, dropped: u64) {
    gauge!(STORE_RETRY_PENDING).set(pending as f64);
    if stored > 0 {
        counter!(STORE_RETRIED).increment(stored);
    }
    if dropped > 0 {
        counter!(STORE_RETRY_DROPPED).increment(dropped);
    }
}

fn kind_label(kind: ItemKind) -> &'static str {
    match kind {
        ItemKind::Recording => "recording",
        ItemKind::Transcript => "transcript",
        ItemKind::Call => "call",
    }
}

/// What one retention sweep deleted and failed to delete.
pub(crate) fn retention_swept(report: &SweepReport) {
    for e in &report.deleted {
        counter!(RETENTION_DELETIONS, "kind" => kind_label(e.item.kind)).increment(1);
    }
    for (e, _) in &report.failed {
        counter!(RETENTION_FAILURES, "kind" => kind_label(e.item.kind)).increment(1);
    }
}

/// A configuration reload was applied (`ok`) or rejected whole.
pub(crate) fn reload(ok: bool) {
    let result = if ok { "ok" } else { "rejected" };
    counter!(CONFIG_RELOADS, "result" => result).increment(1);
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use crate::sip::message::parse_datagram;

    /// Runs `f` against a fresh recorder configured like the daemon's and
    /// returns the exposition afterwards (uptime set to `uptime`).
    fn scrape(uptime: Duration, f: impl FnOnce()) -> String {
        let recorder = builder().build_recorder();
        let handle = recorder.handle();
        ::metrics::with_local_recorder(&recorder, || {
            describe();
            f();
            render_with(&handle, uptime)
        })
    }

    /// The sample line of `series` (name plus labels as rendered), exactly.
    fn sample<'a>(text: &'a str, series: &str) -> Option<&'a str> {
        text.lines()
            .find(|l| l.starts_with(series) && l.as_bytes().get(series.len()) == Some(&b' '))
            .map(|l| &l[series.len() + 1..])
    }

    #[test]
    fn render_describes_every_family_and_sets_uptime() {
        let text = scrape(Duration::from_millis(2500), || {
            call_attempt(404, None);
            call_attempt(200, Some("demo"));
            call_attempt(200, Some("demo"));
            let _call = ActiveCall::start("demo");
        });
        assert_eq!(sample(&text, "sipbridge_uptime_seconds"), Some("2.5"));
        assert_eq!(
            sample(&text, "sipbridge_build_info{version=\"0.1.0\"}"),
            Some("1")
        );
        assert_eq!(
            sample(&text, "sipbridge_call_attempts_total{code=\"404\"}"),
            Some("1")
        );
        assert_eq!(
            sample(
                &text,
                "sipbridge_call_attempts_total{code=\"200\",tenant=\"demo\"}"
            ),
            Some("2")
        );
        // The guard was dropped: the gauge is back to 0.
        assert_eq!(
            sample(&text, "sipbridge_active_calls{tenant=\"demo\"}"),
            Some("0")
        );
        assert_eq!(
            sample(&text, "sipbridge_config_reloads_total{result=\"rejected\"}"),
            Some("0")
        );
        // Every family that has samples has HELP and TYPE lines first.
        for line in text
            .lines()
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
        {
            let name = line.split(['{', ' ']).next().unwrap();
            assert!(
                text.contains(&format!("# HELP {name} ")),
                "no HELP for {name} in\n{text}"
            );
            assert!(
                text.contains(&format!("# TYPE {name} ")),
                "no TYPE for {name} in\n{text}"
            );
        }
        assert!(text.contains("# TYPE sipbridge_call_attempts_total counter\n"));
        assert!(text.contains("# TYPE sipbridge_active_calls gauge\n"));
    }

    #[test]
    fn sip_messages_are_counted_by_bounded_labels() {
        let invite = parse_datagram(
            b"INVITE sip:+15551230000@h SIP/2.0\r\nVia: SIP/2.0/UDP h:5060;branch=z9hG4bK1\r\nFrom: <sip:a@h>;tag=1\r\nTo: <sip:b@h>\r\nCall-ID: c1\r\nCSeq: 1 INVITE\r\nMax-Forwards: 70\r\nContent-Length: 0\r\n\r\n",
        )
        .unwrap();
        let odd = parse_datagram(
            b"FROB sip:h SIP/2.0\r\nVia: SIP/2.0/UDP h:5060;branch=z9hG4bK2\r\nFrom: <sip:a@h>;tag=1\r\nTo: <sip:b@h>\r\nCall-ID: c2\r\nCSeq: 1 FROB\r\nMax-Forwards: 70\r\nContent-Length: 0\r\n\r\n",
        )
        .unwrap();
        let text = scrape(Duration::ZERO, || {
            sip_received(Some(&invite));
            sip_received(Some(&invite));
            sip_received(Some(&odd));
            sip_received(None);
            sip_sent(b"SIP/2.0 100 Trying\r\n\r\n");
            sip_sent(b"SIP/2.0 404 Not Found\r\n\r\n");
            sip_sent(b"SIP/2.0 404 Not Found\r\n\r\n");
            sip_sent(b"SIP/2.0 9");
            sip_sent(b"BYE sip:a@h SIP/2.0\r\n\r\n");
            sip_sent(b"X-CUSTOM-12345 sip:a@h SIP/2.0\r\n\r\n");
        });
        let expect = [
            (
                "sipbridge_sip_requests_received_total{method=\"INVITE\"}",
                "2",
            ),
            (
                "sipbridge_sip_requests_received_total{method=\"other\"}",
                "1",
            ),
            ("sipbridge_sip_malformed_total", "1"),
            ("sipbridge_sip_responses_sent_total{code=\"100\"}", "1"),
            ("sipbridge_sip_responses_sent_total{code=\"404\"}", "2"),
            ("sipbridge_sip_responses_sent_total{code=\"other\"}", "1"),
            ("sipbridge_sip_requests_sent_total{method=\"BYE\"}", "1"),
            ("sipbridge_sip_requests_sent_total{method=\"other\"}", "1"),
        ];
        for (series, value) in expect {
            assert_eq!(sample(&text, series), Some(value), "{series} in\n{text}");
        }
        assert!(
            !text.contains("FROB") && !text.contains("X-CUSTOM"),
            "{text}"
        );
    }

    fn summary(packets_in: u64, packets_out: u64, lost: i64) -> RtpSummary {
        RtpSummary {
            packets_in,
            lost,
            jitter_ms: 0,
            rejected: 1,
            wrong_source: 1,
            packets_out,
            concealed: 3,
            late: 4,
            send_skipped: 0,
            agent_dropped: 0,
        }
    }

    #[test]
    fn rtp_meter_reports_deltas_and_samples_jitter() {
        let text = scrape(Duration::ZERO, || {
            let mut meter = RtpMeter::new();
            meter.report(&summary(100, 90, 2), 0.004);
            // Loss went down (a duplicate): nothing more reported for it.
            meter.report(&summary(150, 140, 1), 0.012);
            // No new packets: no jitter sample.
            meter.report(&summary(150, 160, 5), 0.5);
            meter.finish(None);
        });
        let expect = [
            ("sipbridge_rtp_packets_received_total", "150"),
            ("sipbridge_rtp_packets_sent_total", "160"),
            ("sipbridge_rtp_packets_lost_total", "5"),
            ("sipbridge_rtp_packets_rejected_total", "1"),
            ("sipbridge_rtp_packets_wrong_source_total", "1"),
            ("sipbridge_rtp_frames_concealed_total", "3"),
            ("sipbridge_rtp_packets_late_total", "4"),
            ("sipbridge_rtp_jitter_seconds_count", "2"),
            ("sipbridge_rtp_jitter_seconds_sum", "0.016"),
            ("sipbridge_rtp_jitter_seconds_bucket{le=\"0.005\"}", "1"),
            ("sipbridge_rtp_jitter_seconds_bucket{le=\"0.01\"}", "1"),
            ("sipbridge_rtp_jitter_seconds_bucket{le=\"0.02\"}", "2"),
            ("sipbridge_rtp_jitter_seconds_bucket{le=\"+Inf\"}", "2"),
        ];
        for (series, value) in expect {
            assert_eq!(sample(&text, series), Some(value), "{series} in\n{text}");
        }
        assert!(text.contains("# TYPE sipbridge_rtp_jitter_seconds histogram\n"));
    }

    /// A PCMU session with no prompt that has received `packets` 20 ms
    /// packets from 127.0.0.1:40000, 20 ms apart from `t0`.
    fn media_with_packets(t0: Instant, packets: u16) -> MediaSession {
        use crate::sip::sdp::{Codec, Direction, Negotiated};
        use rand::SeedableRng;
        let neg = Negotiated {
            srtp: None,
            codec: Codec::Pcmu,
            payload_type: 0,
            telephone_event_pt: None,
            remote_rtp: Some(std::net::SocketAddr::from(([127, 0, 0, 1], 40000))),
            remote_direction: Direction::SendRecv,
            local_direction: Direction::SendRecv,
            ptime_ms: 20,
        };
        let plan = crate::call::MediaPlan {
            prompt: None,
            gate_until_prompt_done: false,
            pipeline_rate: crate::media::resample::PipelineRate::Hz8000,
            pipeline_format: Default::default(),
            echo_delay: None,
            record: false,
            rtp_source: crate::media::rtp::RtpSourcePolicy::Strict,
        };
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let mut m = MediaSession::new(t0, &neg, plan, &mut rng).unwrap();
        for seq in 0..packets {
            let mut p = vec![0x80, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x12, 0x34];
            p[2..4].copy_from_slice(&seq.to_be_bytes());
            p[4..8].copy_from_slice(&(u32::from(seq) * 160).to_be_bytes());
            p.extend_from_slice(&[0xff; 160]);
            let at = t0 + Duration::from_millis(20) * u32::from(seq);
            assert!(m.on_rtp(at, ([127, 0, 0, 1], 40000).into(), p.into()));
        }
        m
    }

    #[test]
    fn rtp_meter_ticks_every_interval_then_finishes() {
        let t0 = Instant::now();
        let media = media_with_packets(t0, 10);
        let mut meter = RtpMeter::new();
        let first = scrape(Duration::ZERO, || {
            meter.tick(t0, &media); // arms the interval
            meter.tick(t0 + RTP_REPORT_INTERVAL - Duration::from_millis(1), &media);
        });
        assert_eq!(sample(&first, "sipbridge_rtp_packets_received_total"), None);
        let second = scrape(Duration::ZERO, || {
            meter.tick(t0 + RTP_REPORT_INTERVAL, &media);
            // Reported already: the end adds nothing.
            meter.finish(Some(&media));
        });
        assert_eq!(
            sample(&second, "sipbridge_rtp_packets_received_total"),
            Some("10"),
            "{second}"
        );
        assert_eq!(
            sample(&second, "sipbridge_rtp_jitter_seconds_count"),
            Some("1")
        );
        let more = media_with_packets(t0, 12);
        let third = scrape(Duration::ZERO, || meter.finish(Some(&more)));
        assert_eq!(
            sample(&third, "sipbridge_rtp_packets_received_total"),
            Some("2"),
            "{third}"
        );
    }

    #[test]
    fn store_pipeline_and_reload_helpers() {
        let text = scrape(Duration::ZERO, || {
            pipeline_connected("agent");
            pipeline_failed("agent");
            pipeline_failed("agent");
            pipeline_reconnect("agent");
            caller_frames_dropped(7);
            recording_bytes(0);
            recording_bytes(1234);
            store_dropped();
            recording_spool(4096);
            recording_upload("ok");
            recording_upload("failed");
            recording_upload("failed");
            reload(true);
            reload(false);
            reload(false);
        });
        let expect = [
            ("sipbridge_pipeline_connects_total{kind=\"agent\"}", "1"),
            ("sipbridge_pipeline_failures_total{kind=\"agent\"}", "2"),
            ("sipbridge_pipeline_reconnects_total{kind=\"agent\"}", "1"),
            ("sipbridge_pipeline_caller_frames_dropped_total", "7"),
            ("sipbridge_recording_bytes_written_total", "1234"),
            ("sipbridge_store_queue_dropped_total", "1"),
            ("sipbridge_recording_spool_bytes", "4096"),
            ("sipbridge_recording_uploads_total{result=\"ok\"}", "1"),
            ("sipbridge_recording_uploads_total{result=\"failed\"}", "2"),
            ("sipbridge_config_reloads_total{result=\"ok\"}", "1"),
            ("sipbridge_config_reloads_total{result=\"rejected\"}", "2"),
        ];
        for (series, value) in expect {
            assert_eq!(sample(&text, series), Some(value), "{series} in\n{text}");
        }
    }

    fn expiry(kind: ItemKind) -> crate::store::retention::Expiry {
        crate::store::retention::Expiry {
            item: crate::store::retention::RetentionItem {
                kind,
                id: "x".into(),
                tenant: "demo".into(),
                created_at: 0,
                legal_hold: false,
            },
            reason: crate::store::retention::ExpiryReason {
                field: "recordings_days",
                days: 1,
                created_at: 0,
                expires_at: 1,
            },
        }
    }

    #[test]
    fn retention_sweeps_count_deletions_and_failures_by_kind() {
        let report = SweepReport {
            deleted: vec![
                expiry(ItemKind::Recording),
                expiry(ItemKind::Recording),
                expiry(ItemKind::Call),
            ],
            failed: vec![(expiry(ItemKind::Transcript), std::io::Error::other("busy"))],
            held: vec![expiry(ItemKind::Call)],
            ..SweepReport::default()
        };
        let text = scrape(Duration::ZERO, || retention_swept(&report));
        let expect = [
            (
                "sipbridge_retention_deletions_total{kind=\"recording\"}",
                "2",
            ),
            ("sipbridge_retention_deletions_total{kind=\"call\"}", "1"),
            (
                "sipbridge_retention_failures_total{kind=\"transcript\"}",
                "1",
            ),
        ];
        for (series, value) in expect {
            assert_eq!(sample(&text, series), Some(value), "{series} in\n{text}");
        }
        assert_eq!(
            sample(
                &text,
                "sipbridge_retention_deletions_total{kind=\"transcript\"}"
            ),
            None
        );
    }

    #[test]
    fn the_global_recorder_renders_after_install() {
        install();
        install();
        let text = render();
        assert!(
            text.contains("# TYPE sipbridge_uptime_seconds gauge\n"),
            "{text}"
        );
        assert!(
            text.contains("sipbridge_build_info{version=\"0.1.0\"} 1\n"),
            "{text}"
        );
    }
}
