//! The configuration exactly as written: serde structs with `deny_unknown_fields`.
//!
//! Owns: the TOML shape (key names, types, defaults). Values that need checks
//! with a location (addresses, CIDRs, numbers, secret references, paths) stay
//! `Spanned<String>` here and are checked in `validate`, so one bad value does
//! not hide the others. Must not do I/O or cross-reference checks.

use serde::Deserialize;
use toml::Spanned;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawProfile {
    pub(crate) name: Spanned<String>,
    #[serde(default)]
    pub(crate) var_dir: Option<Spanned<String>>,
    pub(crate) listen: Spanned<RawListen>,
    #[serde(default)]
    pub(crate) advertised_address: Option<Spanned<String>>,
    #[serde(default)]
    pub(crate) rtp_ports: Option<Spanned<RawPortRange>>,
    #[serde(default)]
    pub(crate) max_calls: Option<Spanned<u32>>,
    #[serde(default)]
    pub(crate) master_key: Option<Spanned<String>>,
    #[serde(default)]
    pub(crate) sip: Option<Spanned<RawSip>>,
    #[serde(default)]
    pub(crate) media: Option<Spanned<RawMedia>>,
    // Daemon lifecycle (issue 7).
    #[serde(default)]
    pub(crate) drain_grace_s: Option<Spanned<u32>>,
    #[serde(default)]
    pub(crate) admin: Option<Spanned<RawAdmin>>,
    #[serde(default)]
    pub(crate) security: Option<super::security::RawSecurity>,
    /// `[profile.logging]` (issue 15).
    #[serde(default)]
    pub(crate) logging: Option<Spanned<RawLogging>>,
    /// `[profile.tls]`: certificate and key of the `listen.tls` listeners.
    #[serde(default)]
    pub(crate) tls: Option<Spanned<RawTls>>,
    /// `[profile.store]`: the free-space watermark (issue 19).
    #[serde(default)]
    pub(crate) store: Option<Spanned<RawStore>>,
    /// `[profile.recordings]`: where recordings are kept (issue 16).
    #[serde(default)]
    pub(crate) recordings: Option<Spanned<RawRecordings>>,
}

/// `[profile.recordings]`: local files (default) or an S3-compatible bucket.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawRecordings {
    #[serde(default)]
    pub(crate) kind: Option<Spanned<String>>,
    #[serde(default)]
    pub(crate) endpoint: Option<Spanned<String>>,
    #[serde(default)]
    pub(crate) bucket: Option<Spanned<String>>,
    #[serde(default)]
    pub(crate) region: Option<Spanned<String>>,
    #[serde(default)]
    pub(crate) access_key_id: Option<Spanned<String>>,
    #[serde(default)]
    pub(crate) secret_access_key: Option<Spanned<String>>,
    #[serde(default)]
    pub(crate) spool_max_mb: Option<Spanned<u64>>,
}

/// `[profile.store]`: when the store counts as unable to write.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawStore {
    #[serde(default)]
    pub(crate) min_free_mb: Option<Spanned<u64>>,
    #[serde(default)]
    pub(crate) check_interval_s: Option<Spanned<u32>>,
    /// `"sqlite"` (default) or `"postgres"` (issue 16).
    #[serde(default)]
    pub(crate) kind: Option<Spanned<String>>,
    /// The PostgreSQL URL, as a secret reference (it may hold a password).
    #[serde(default)]
    pub(crate) url: Option<Spanned<String>>,
}

/// A recording tenant's `on_store_failure`.
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub(crate) enum RawOnStoreFailure {
    AnswerUnrecorded,
    Reject,
}

/// `[profile.logging]`: what logs may show of callers.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawLogging {
    #[serde(default)]
    pub(crate) caller_data: Option<Spanned<RawCallerData>>,
}

/// `caller_data = "masked" | "full"`.
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum RawCallerData {
    Masked,
    Full,
}

/// `[profile.tls]`: secret references of the PEM certificate chain and key.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawTls {
    pub(crate) cert: Spanned<String>,
    pub(crate) key: Spanned<String>,
    #[serde(default)]
    pub(crate) outbound_ca: Option<Spanned<String>>,
}

/// `[profile.admin]`: the admin HTTP API (absent: no API).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawAdmin {
    pub(crate) listen: Spanned<String>,
    /// Secret reference of the admin bearer token (hashed in memory at load).
    #[serde(default)]
    pub(crate) token: Option<Spanned<String>>,
    /// Secret reference of the bearer token `/metrics` asks for (issue 15).
    #[serde(default)]
    pub(crate) metrics_token: Option<Spanned<String>>,
    /// Seconds a recording download may take, start to last byte.
    #[serde(default)]
    pub(crate) download_deadline_s: Option<Spanned<u32>>,
    /// Downloads of one tenant's recordings running at once.
    #[serde(default)]
    pub(crate) max_downloads_per_tenant: Option<Spanned<u32>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawMedia {
    #[serde(default)]
    pub(crate) rtp_timeout_s: Option<Spanned<u32>>,
    #[serde(default)]
    pub(crate) max_call_duration_s: Option<Spanned<u32>>,
    #[serde(default)]
    pub(crate) threads: Option<Spanned<u32>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawListen {
    #[serde(default)]
    pub(crate) udp: Vec<Spanned<String>>,
    #[serde(default)]
    pub(crate) tcp: Vec<Spanned<String>>,
    #[serde(default)]
    pub(crate) tls: Vec<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawPortRange {
    pub(crate) start: Spanned<u16>,
    pub(crate) end: Spanned<u16>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawSip {
    #[serde(default)]
    pub(crate) t1_ms: Option<Spanned<u32>>,
    #[serde(default)]
    pub(crate) t2_ms: Option<Spanned<u32>>,
    #[serde(default)]
    pub(crate) t4_ms: Option<Spanned<u32>>,
    #[serde(default)]
    pub(crate) session_expires_s: Option<Spanned<u32>>,
    #[serde(default)]
    pub(crate) min_se_s: Option<Spanned<u32>>,
    #[serde(default)]
    pub(crate) unknown_source: Option<RawUnknownSource>,
    #[serde(default)]
    pub(crate) answer_delay_ms: Option<Spanned<u32>>,
}

pub(crate) use super::security::RawUnknownSource;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawTrunk {
    pub(crate) name: Spanned<String>,
    #[serde(default)]
    pub(crate) allow: Vec<Spanned<String>>,
    #[serde(default)]
    pub(crate) digest: Option<Spanned<RawDigest>>,
    #[serde(default)]
    pub(crate) tenant: Option<Spanned<String>>,
    #[serde(default)]
    pub(crate) max_calls: Option<Spanned<u32>>,
    #[serde(default)]
    pub(crate) behind_nat: bool,
    pub(crate) media_encryption: Option<RawMediaEncryption>,
    /// Secret reference of a PEM CA bundle: TLS clients from this trunk's
    /// addresses must present a certificate it signed (mutual TLS).
    #[serde(default)]
    pub(crate) tls_client_ca: Option<Spanned<String>>,
    /// Calls we place through this trunk (`[trunk.outbound]`, issue 13).
    #[serde(default)]
    pub(crate) outbound: Option<Spanned<RawOutbound>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawOutbound {
    /// `host:port` our INVITEs go to (the carrier's SIP proxy).
    pub(crate) proxy: Spanned<String>,
    #[serde(default)]
    pub(crate) transport: Option<Spanned<String>>,
    #[serde(default)]
    pub(crate) username: Option<Spanned<String>>,
    #[serde(default)]
    pub(crate) password: Option<Spanned<String>>,
    #[serde(default)]
    pub(crate) from_domain: Option<Spanned<String>>,
    #[serde(default)]
    pub(crate) tenants: Option<Vec<Spanned<String>>>,
    #[serde(default)]
    pub(crate) answer_timeout_s: Option<Spanned<u32>>,
}

#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum RawMediaEncryption {
    Required,
    Optional,
    Off,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawDigest {
    pub(crate) username: Spanned<String>,
    pub(crate) password: Spanned<String>,
    #[serde(default)]
    pub(crate) realm: Option<Spanned<String>>,
    #[serde(default)]
    pub(crate) algorithms: Option<Vec<Spanned<String>>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawTenant {
    pub(crate) id: Spanned<String>,
    #[serde(default)]
    pub(crate) recording: bool,
    #[serde(default)]
    pub(crate) transcripts: bool,
    #[serde(default)]
    pub(crate) prompt: Option<Spanned<String>>,
    #[serde(default)]
    pub(crate) opt_out_key: Option<Spanned<String>>,
    #[serde(default)]
    pub(crate) paused_dtmf_to_agent: bool,
    #[serde(default)]
    pub(crate) caller_audio_after_prompt: Option<bool>,
    #[serde(default)]
    pub(crate) pipeline_rate: Option<Spanned<u32>>,
    #[serde(default)]
    pub(crate) early_media: bool,
    /// What a recording tenant's new calls get while the store cannot write.
    #[serde(default)]
    pub(crate) on_store_failure: Option<Spanned<RawOnStoreFailure>>,
    #[serde(default)]
    pub(crate) stats_interval_s: Option<Spanned<u32>>,
    #[serde(default)]
    pub(crate) caller_numbers: Option<RawCallerNumbers>,
    #[serde(default)]
    pub(crate) retention: Option<Spanned<RawRetention>>,
    pub(crate) pipeline: Spanned<RawPipeline>,
    #[serde(default)]
    pub(crate) max_calls: Option<Spanned<u32>>,
    /// Outbound calls this tenant may start per second (admin API).
    #[serde(default)]
    pub(crate) max_outbound_cps: Option<Spanned<u32>>,
    /// The trunk a bridge transfer dials through (default: the call's own).
    #[serde(default)]
    pub(crate) transfer_trunk: Option<Spanned<String>>,
    /// What follows a blind transfer the caller's side refuses: `none` or `bridge`.
    #[serde(default)]
    pub(crate) transfer_fallback: Option<Spanned<String>>,
    /// SHA-256 (hex) of the tenant's admin API bearer token.
    #[serde(default)]
    pub(crate) admin_token_sha256: Option<Spanned<String>>,
    /// Credentials for the Twilio-compatible REST subset (`[tenant.twilio_api]`).
    #[serde(default)]
    pub(crate) twilio_api: Option<Spanned<RawTwilioApi>>,
    /// Call event webhooks: the receiver's `https://` URL.
    #[serde(default)]
    pub(crate) events_url: Option<Spanned<String>>,
    /// Secret reference of the webhooks' HMAC-SHA256 key.
    #[serde(default)]
    pub(crate) events_secret: Option<Spanned<String>>,
    /// Secret reference of a PEM CA bundle the receiver's certificate may
    /// chain to (besides the Mozilla roots).
    #[serde(default)]
    pub(crate) events_ca: Option<Spanned<String>>,
    /// Event types sent (`call.ended`, `transfer.*`, …); absent: all.
    #[serde(default)]
    pub(crate) events_types: Option<Spanned<Vec<Spanned<String>>>>,
    /// Events waiting for the receiver, at most.
    #[serde(default)]
    pub(crate) events_queue: Option<Spanned<u32>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawTwilioApi {
    pub(crate) account_sid: Spanned<String>,
    pub(crate) auth_token: Spanned<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawRetention {
    #[serde(default)]
    pub(crate) recordings_days: Option<Spanned<u32>>,
    #[serde(default)]
    pub(crate) transcripts_days: Option<Spanned<u32>>,
    #[serde(default)]
    pub(crate) metadata_days: Option<Spanned<u32>>,
    #[serde(default)]
    pub(crate) audit_days: Option<Spanned<u32>>,
}

/// One flat table for every pipeline kind; `validate` checks which keys
/// belong to which kind, so each misplaced key gets its own location.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawPipeline {
    pub(crate) kind: Spanned<String>,
    #[serde(default)]
    pub(crate) model: Option<Spanned<String>>,
    #[serde(default)]
    pub(crate) language: Option<Spanned<String>>,
    #[serde(default)]
    pub(crate) api_key: Option<Spanned<String>>,
    #[serde(default)]
    pub(crate) endpointing_ms: Option<Spanned<u32>>,
    #[serde(default)]
    pub(crate) interim_results: Option<Spanned<bool>>,
    #[serde(default)]
    pub(crate) utterance_end_ms: Option<Spanned<u32>>,
    #[serde(default)]
    pub(crate) vad_events: Option<Spanned<bool>>,
    #[serde(default)]
    pub(crate) base_url: Option<Spanned<String>>,
    #[serde(default)]
    pub(crate) url: Option<Spanned<String>>,
    #[serde(default)]
    pub(crate) mode: Option<Spanned<String>>,
    /// Telnyx mode's stream encoding: `PCMU`, `PCMA` or `L16`.
    #[serde(default)]
    pub(crate) encoding: Option<Spanned<String>>,
    /// `"<secret ref>"` (bearer) or `{ kind = "bearer" | "hmac", secret = "<secret ref>" }`;
    /// the table's keys are checked in `validate`.
    #[serde(default)]
    pub(crate) auth: Option<Spanned<toml::Value>>,
    #[serde(default)]
    pub(crate) ca_file: Option<Spanned<String>>,
    #[serde(default)]
    pub(crate) on_failure: Option<Spanned<String>>,
    #[serde(default)]
    pub(crate) fallback_prompt: Option<Spanned<String>>,
    #[serde(default)]
    pub(crate) reconnect_attempts: Option<Spanned<u32>>,
    #[serde(default)]
    pub(crate) reconnect_within_ms: Option<Spanned<u32>>,
    #[serde(default)]
    pub(crate) connect_timeout_ms: Option<Spanned<u32>>,
    #[serde(default)]
    pub(crate) agent_silence_s: Option<Spanned<u32>>,
    #[serde(default)]
    pub(crate) away_audio: Option<Spanned<String>>,
    #[serde(default)]
    pub(crate) hold_prompt: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawRoute {
    pub(crate) number: Spanned<String>,
    pub(crate) tenant: Spanned<String>,
    #[serde(default)]
    pub(crate) trunks: Option<Vec<Spanned<String>>>,
}

#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum RawCallerNumbers {
    Plain,
    Hashed,
}
