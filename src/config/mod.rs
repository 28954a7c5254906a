//! sip-profiles configuration: loading, validation, secrets, and the lookups
//! the daemon uses per call (trunk by source address, route by dialed number).
//!
//! Owns: the TOML format documented in `docs/configuration.md`, every check
//! made before the daemon starts, and the resolved [`Config`]. Must not open
//! sockets, start tasks or write files (the master key is only *noted* as
//! "to be generated"; the daemon creates it).
//!
//! Relative paths (config files, `var_dir`, prompts, `file:` secrets) resolve
//! against the process working directory.

mod diagnostics;
pub mod number;
mod raw;
pub mod secret;
mod security;
pub mod tls;
mod validate;

use std::fmt::Write as _;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use ipnet::IpNet;

pub use diagnostics::{Diagnostic, Diagnostics, Severity};
pub use number::NumberPattern;
pub use secret::{Secret, SecretRef};
pub use security::SecuritySettings;

/// Loads a profile file, or every `*.toml` file of a directory (each one a
/// profile), and validates everything. Environment variables for `env:`
/// secrets come from the process environment.
pub fn load(path: &Path) -> Result<Config, Diagnostics> {
    load_with_env(path, &secret::process_env)
}

/// [`load`] with an explicit environment lookup (for tests and embedding).
pub fn load_with_env(
    path: &Path,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Config, Diagnostics> {
    validate::load(path, env, false)
}

/// [`load`] for the data commands (`export`, `erase`, `recordings`,
/// `retention`, `tenant delete`): they use the store, the master key and the
/// tenants' policies only, so a pipeline, agent, digest or admin secret that
/// cannot be resolved (an unset `env:` variable) is no error. Such a secret is
/// empty in the result: never use it to connect.
pub fn load_for_data(path: &Path) -> Result<Config, Diagnostics> {
    validate::load(path, &secret::process_env, true)
}

/// The validated configuration: profiles (listeners) plus one shared
/// namespace of trunks, tenants and routes gathered from all files.
#[derive(Debug)]
#[non_exhaustive]
pub struct Config {
    /// One per profile file.
    pub profiles: Vec<Profile>,
    /// All trunks, in file order.
    pub trunks: Vec<Trunk>,
    /// All tenants, in file order.
    pub tenants: Vec<Tenant>,
    /// All routes, in file order.
    pub routes: Vec<Route>,
    /// Things accepted with a note: inline secrets, a master key to be generated.
    pub warnings: Vec<Diagnostic>,
}

/// One profile: where sipbridge listens and its global settings.
#[derive(Debug)]
#[non_exhaustive]
pub struct Profile {
    /// Unique profile name.
    pub name: String,
    /// The file it was read from.
    pub file: PathBuf,
    /// State directory (database, recordings, generated master key).
    pub var_dir: PathBuf,
    /// Listening sockets per transport.
    pub listen: Listen,
    /// Public address written in Contact/Via/SDP when behind NAT.
    pub advertised_address: Option<IpAddr>,
    /// RTP/RTCP ports (inclusive range, even start).
    pub rtp_ports: PortRange,
    /// Concurrent calls across this profile.
    pub max_calls: u32,
    /// The key that wraps tenants' data keys.
    pub master_key: MasterKey,
    /// SIP timers and policies.
    pub sip: SipSettings,
    /// Media limits.
    pub media: MediaSettings,
    // Daemon lifecycle (issue 7).
    /// On SIGTERM, how long live calls may go on before they get BYE
    /// (`drain_grace_s`, default 30 s; new calls get 503 meanwhile).
    pub drain_grace: Duration,
    /// The admin HTTP API (`[profile.admin]`); `None`: not served.
    pub admin: Option<AdminSettings>,
    /// Limits against a hostile network (`[profile.security]`).
    pub security: SecuritySettings,
    /// What logs show of callers (`[profile.logging] caller_data`).
    pub log_caller_data: crate::logging::CallerData,
    /// Certificate and key of the TLS listeners (`[profile.tls]`); set
    /// whenever `listen.tls` is not empty.
    pub tls: Option<TlsIdentity>,
    /// When the store counts as unable to write (`[profile.store]`).
    pub store: StoreSettings,
    /// Where recordings are kept (`[profile.recordings]`).
    pub recordings: Recordings,
}

/// `[profile.recordings]`: where sealed recordings are kept (issue 16).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum Recordings {
    /// Files under `var_dir/recordings` (the default).
    #[default]
    Local,
    /// Objects in an S3-compatible bucket; `var_dir/recordings` is the spool.
    S3(S3Recordings),
}

/// `[profile.recordings] kind = "s3"`.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct S3Recordings {
    /// `http(s)://host[:port]` of the service.
    pub endpoint: String,
    /// The bucket (it must exist).
    pub bucket: String,
    /// The region requests are signed for.
    pub region: String,
    /// Access key id (a secret reference).
    pub access_key_id: Secret,
    /// Secret access key (a secret reference).
    pub secret_access_key: Secret,
    /// Bytes of recordings not yet in the bucket `var_dir` may hold
    /// (`spool_max_mb`, default 1024) before the store counts as unable to write.
    pub spool_max_bytes: u64,
}

/// Default `[profile.recordings] spool_max_mb`.
pub const DEFAULT_SPOOL_MAX_MB: u64 = 1024;

/// `[profile.store]`: the free-space watermark of `var_dir` (issue 19).
/// Below it, or after a write failed, the store counts as unable to write:
/// recording tenants' new calls are answered unrecorded or refused with 503
/// (their `on_store_failure`) until a check finds the space back.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct StoreSettings {
    /// Free bytes `var_dir`'s filesystem must keep (`min_free_mb`, default 64).
    pub min_free_bytes: u64,
    /// How often free space is checked and failed writes retried
    /// (`check_interval_s`, default 5 s).
    pub check_interval: Duration,
    /// Where the metadata (CDRs, recordings' index, transcripts, audit log,
    /// tenants' data keys) lives (`kind`, `url`).
    pub engine: StoreEngine,
}

/// `[profile.store] kind`: the metadata database.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum StoreEngine {
    /// `var_dir/sipbridge.db`, the embedded default.
    #[default]
    Sqlite,
    /// A PostgreSQL database several daemons share (issue 16); `url` is
    /// `postgres://user[:password]@host:port/db` or the key/value form,
    /// resolved from a secret reference.
    Postgres {
        /// The connection URL.
        url: Secret,
    },
}

/// Default `[profile.store] min_free_mb`.
pub const DEFAULT_MIN_FREE_MB: u64 = 64;
/// Default `[profile.store] check_interval_s`.
pub const DEFAULT_STORE_CHECK_S: u32 = 5;

impl Default for StoreSettings {
    fn default() -> Self {
        StoreSettings {
            min_free_bytes: DEFAULT_MIN_FREE_MB * 1024 * 1024,
            check_interval: Duration::from_secs(u64::from(DEFAULT_STORE_CHECK_S)),
            engine: StoreEngine::Sqlite,
        }
    }
}

/// What a recording tenant's new calls get while the store cannot write
/// (`on_store_failure`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum OnStoreFailure {
    /// Answer without recording; the CDR says `recording = "not-recorded"`
    /// (the default).
    #[default]
    AnswerUnrecorded,
    /// `503 Service Unavailable` with `Retry-After`.
    Reject,
}

/// The server certificate chain and private key (PEM, checked at load).
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct TlsIdentity {
    /// PEM certificate chain, leaf first.
    pub cert: Secret,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1).
    pub key: Secret,
    /// Extra PEM CAs (beside the Mozilla roots) that outbound TLS to a
    /// trunk accepts, e.g. a carrier's private CA.
    pub outbound_ca: Option<Secret>,
}

/// Whether a trunk's media is SRTP (RFC 3711, SDES keys of RFC 4568).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum MediaEncryption {
    /// SRTP only: a plain `RTP/AVP` offer gets 488.
    Required,
    /// SRTP when offered (over TLS), plain RTP otherwise.
    Optional,
    /// Plain RTP only (the default): an `RTP/SAVP`-only offer gets 488.
    #[default]
    Off,
}

/// The admin HTTP API of a profile (`[profile.admin]`).
#[derive(Debug)]
#[non_exhaustive]
pub struct AdminSettings {
    /// Where it listens (port 0: any free port, logged at start).
    pub listen: SocketAddr,
    /// The admin bearer token (`token = "<secret ref>"`); `None`: only
    /// tenant tokens are accepted.
    pub token: Option<Secret>,
    /// The bearer token `/metrics` asks for (`metrics_token`); `None`:
    /// `/metrics` is open like the health endpoints.
    pub metrics_token: Option<Secret>,
    /// How long one recording download may take, first byte to last
    /// (`download_deadline_s`); the connection is cut when it passes.
    pub download_deadline: Duration,
    /// Downloads of one tenant's recordings running at once
    /// (`max_downloads_per_tenant`); beyond it, 429 with `Retry-After`.
    pub max_downloads_per_tenant: u32,
}

/// Default `[profile.admin] download_deadline_s` (10 minutes: an hour-long
/// recording is 115 MB).
pub const DEFAULT_DOWNLOAD_DEADLINE_S: u32 = 600;

/// Largest `[profile.admin] download_deadline_s` (a day).
pub const MAX_DOWNLOAD_DEADLINE_S: u32 = 86_400;

/// Default `[profile.admin] max_downloads_per_tenant`.
pub const DEFAULT_MAX_DOWNLOADS_PER_TENANT: u32 = 4;

/// Largest `[profile.admin] max_downloads_per_tenant`.
pub const MAX_DOWNLOADS_PER_TENANT: u32 = 256;

/// Default `[profile] drain_grace_s`.
pub const DEFAULT_DRAIN_GRACE: Duration = Duration::from_secs(30);

/// Largest `[profile] drain_grace_s` (an hour: the daemon extends systemd's
/// stop timeout by the grace, and `EXTEND_TIMEOUT_USEC` holds a `u32`).
pub const MAX_DRAIN_GRACE_S: u32 = 3600;

/// Most media threads a profile may ask for (`[profile.media] threads`).
pub const MAX_MEDIA_THREADS: u32 = 256;

/// Media limits of a profile (`[profile.media]`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct MediaSettings {
    /// End a call after this long without RTP (not while on hold); default 30 s.
    pub rtp_timeout: Option<Duration>,
    /// End a call after this long whatever happens; default 4 h.
    pub max_call_duration: Option<Duration>,
    /// Media threads running the calls (0: one per core); fixed at start.
    pub threads: u32,
}

impl Default for MediaSettings {
    fn default() -> MediaSettings {
        MediaSettings {
            rtp_timeout: Some(Duration::from_secs(30)),
            max_call_duration: Some(Duration::from_secs(4 * 3600)),
            threads: 0,
        }
    }
}

/// Listening addresses per transport.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Listen {
    /// UDP sockets.
    pub udp: Vec<SocketAddr>,
    /// TCP sockets.
    pub tcp: Vec<SocketAddr>,
    /// TLS sockets (SIP over TLS, RFC 3261 §26.2; certificate in `[profile.tls]`).
    pub tls: Vec<SocketAddr>,
}

/// An inclusive port range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PortRange {
    /// First port (even: RTP uses even ports, RTCP the next odd one).
    pub start: u16,
    /// Last port, inclusive.
    pub end: u16,
}

impl PortRange {
    /// How many ports the range holds.
    pub fn len(&self) -> u32 {
        u32::from(self.end) - u32::from(self.start) + 1
    }

    /// Never true for a validated range.
    pub fn is_empty(&self) -> bool {
        self.end < self.start
    }

    /// Calls the range can carry at two ports (RTP + RTCP) each.
    pub fn calls(&self) -> u32 {
        self.len() / 2
    }
}

/// The master key: loaded, or to be generated by the daemon at first start.
#[derive(Debug)]
#[non_exhaustive]
pub enum MasterKey {
    /// Read from `env:`, `file:`, `credential:` or inline.
    Loaded(Secret),
    /// `file:PATH` that does not exist yet; the daemon generates it (0600).
    ToGenerate(PathBuf),
}

/// What to do with requests from an address no trunk allows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum UnknownSource {
    /// Answer 403 Forbidden.
    Reject,
    /// Send nothing (scanners).
    Drop,
}

/// SIP timer values (RFC 3261 §17) and session-timer policy (RFC 4028).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct SipSettings {
    /// RTT estimate (default 500 ms).
    pub t1: Duration,
    /// Maximum retransmit interval for non-INVITE requests and INVITE responses (default 4 s).
    pub t2: Duration,
    /// Maximum time a message stays in the network (default 5 s).
    pub t4: Duration,
    /// Session-Expires we ask for (default 1800 s).
    pub session_expires: Duration,
    /// Smallest Session-Expires we accept (default and floor 90 s).
    pub min_se: Duration,
    /// Requests from sources no trunk allows (default: drop, no answer).
    /// Set by `[profile.security] unknown_source`, or the older spelling
    /// `[profile.sip] unknown_source` when the former is absent.
    pub unknown_source: UnknownSource,
    /// Ringing time between 180 and 200 (default 0: answer at once).
    pub answer_delay: Duration,
}

impl Default for SipSettings {
    fn default() -> SipSettings {
        SipSettings {
            t1: Duration::from_millis(500),
            t2: Duration::from_millis(4000),
            t4: Duration::from_millis(5000),
            session_expires: Duration::from_secs(1800),
            min_se: Duration::from_secs(90),
            unknown_source: UnknownSource::Drop,
            answer_delay: Duration::ZERO,
        }
    }
}

/// A carrier, PBX or SBC that may send calls.
#[derive(Debug)]
#[non_exhaustive]
pub struct Trunk {
    /// Unique trunk name.
    pub name: String,
    /// Source networks allowed to send requests (IPv4 and IPv6).
    pub allow: Vec<IpNet>,
    /// Digest credentials the trunk must present (401 challenge), if any.
    pub digest: Option<DigestCredentials>,
    /// When set, calls from this trunk reach only this tenant's routes.
    pub tenant: Option<String>,
    /// Concurrent calls from this trunk.
    pub max_calls: Option<u32>,
    /// The trunk's phones may be behind NAT (`behind_nat`): a call's RTP
    /// latches once to the first packets from the SDP's or the signalling
    /// source's IP (any port) instead of the SDP's address and port only.
    pub behind_nat: bool,
    /// SRTP policy for this trunk's calls.
    pub media_encryption: MediaEncryption,
    /// PEM CA bundle: TLS connections from this trunk's addresses must present
    /// a client certificate it signed (mutual TLS); `None`: none asked for.
    pub tls_client_ca: Option<Secret>,
    /// Calls we place through this trunk (`[trunk.outbound]`); `None`: the
    /// trunk takes inbound calls only.
    pub outbound: Option<OutboundTrunk>,
}

/// Where and how we dial out through a trunk (`[trunk.outbound]`).
#[derive(Debug)]
#[non_exhaustive]
pub struct OutboundTrunk {
    /// `host:port` of the carrier's SIP proxy (a name is resolved at dial time).
    pub proxy: String,
    /// Transport to it (UDP).
    pub transport: OutboundTransport,
    /// Digest credentials for the carrier's 401/407 challenges.
    pub username: Option<String>,
    /// The password (a secret reference).
    pub password: Option<Secret>,
    /// Host part of our From URI; `None`: our advertised SIP address.
    pub from_domain: Option<String>,
    /// Tenants allowed to dial through this trunk (default: the trunk's `tenant`).
    pub tenants: Vec<String>,
    /// Default ringing time before CANCEL when the request gives none.
    pub answer_timeout: std::time::Duration,
}

/// Transport for outbound INVITEs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum OutboundTransport {
    /// Datagrams, from the first UDP listener (responses come back to it).
    Udp,
}

/// Digest credentials expected from a trunk.
#[derive(Debug)]
#[non_exhaustive]
pub struct DigestCredentials {
    /// Expected username.
    pub username: String,
    /// Expected password.
    pub password: Secret,
    /// Realm in our challenges.
    pub realm: String,
    /// Algorithms offered, in order of preference (challenges list them in
    /// this order; default SHA-256 then MD5, RFC 8760).
    pub algorithms: Vec<crate::sip::digest::Algorithm>,
}

/// A business using sipbridge, with its privacy settings and pipeline.
#[derive(Debug)]
#[non_exhaustive]
pub struct Tenant {
    /// Unique tenant id.
    pub id: String,
    /// Store call recordings.
    pub recording: bool,
    /// Store transcripts.
    pub transcripts: bool,
    /// Disclosure prompt played before anything else.
    pub prompt: Option<Prompt>,
    /// DTMF key (0-9, *, #) that opts the caller out of recording.
    pub opt_out_key: Option<char>,
    /// Keys pressed while the recording is paused (PCI) reach the agent as
    /// they are; by default (false) each reaches it as `*`.
    pub paused_dtmf_to_agent: bool,
    /// The caller's audio reaches the pipeline only once the disclosure
    /// prompt has finished (default true).
    pub caller_audio_after_prompt: bool,
    /// Sample rate of the PCM exchanged with the pipeline: 8000 or 16000 (default).
    pub pipeline_rate: u32,
    /// Play the prompt in 183 Session Progress and answer after it.
    pub early_media: bool,
    /// What new calls get while the store cannot write (recording tenants).
    pub on_store_failure: OnStoreFailure,
    /// Store caller numbers as received, or as a keyed hash (erasure and
    /// export by number still work: the hash is recomputed from the number).
    pub hash_caller_numbers: bool,
    /// Retention in days.
    pub retention: Retention,
    /// What handles the caller's audio.
    pub pipeline: Pipeline,
    /// What a call does when its network pipeline fails (unused by `echo`).
    pub pipeline_failure: FailurePolicy,
    /// Concurrent calls for this tenant.
    pub max_calls: Option<u32>,
    /// Outbound calls per second this tenant may start (`max_outbound_cps`, default 1).
    pub max_outbound_cps: u32,
    /// The trunk a bridge transfer dials through (`transfer_trunk`); `None`:
    /// the trunk the call came in on (or went out through).
    pub transfer_trunk: Option<String>,
    /// A blind transfer the caller's side refuses is tried again as a bridge
    /// transfer (`transfer_fallback = "bridge"`).
    pub transfer_fallback_bridge: bool,
    /// SHA-256 of the tenant's admin API bearer token
    /// (`admin_token_sha256`); `None`: the tenant has no API access.
    pub admin_token_sha256: Option<[u8; 32]>,
    /// The account the Twilio-compatible REST subset (`/2010-04-01/…`) answers
    /// for this tenant; `None`: not served for it.
    pub twilio_api: Option<TwilioApi>,
    /// Send a native-protocol agent a `stats` event this often
    /// (`stats_interval_s`, 1–3600 s); `None` (the default): never.
    pub stats_interval: Option<std::time::Duration>,
    /// Call event webhooks (`events_url`, …); `None`: no events are sent.
    pub events: Option<EventsTarget>,
}

/// Every call event type a webhook receiver can get (docs/webhooks.md,
/// docs/events.schema.json), in the order of a call.
pub const EVENT_TYPES: &[&str] = &[
    "call.started",
    "call.answered",
    "call.ended",
    "recording.ready",
    "transcript.ready",
    "transfer.started",
    "transfer.completed",
    "transfer.failed",
];

/// Default of `events_queue`: events waiting per tenant, at most.
pub const DEFAULT_EVENTS_QUEUE: usize = 1000;
/// Largest `events_queue`.
pub const MAX_EVENTS_QUEUE: u32 = 100_000;

/// A tenant's call event webhook receiver (`events_url`, `events_secret`,
/// `events_ca`, `events_types`, `events_queue`).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct EventsTarget {
    /// The URL as configured (`https://host[:port]/path[?query]`).
    pub url: String,
    /// Host name or IP address (IPv6 without brackets).
    pub host: String,
    /// TCP port (443 unless the URL names one).
    pub port: u16,
    /// Path and query of the request line.
    pub path: String,
    /// The HMAC-SHA256 key of `Sipbridge-Signature`.
    pub secret: Secret,
    /// Extra CA certificates (PEM) the receiver's chain may end at.
    pub ca: Option<Secret>,
    /// Event types sent: exact names or `family.*`; empty: all.
    pub types: Vec<String>,
    /// Events waiting for the receiver, at most (the oldest is dropped).
    pub queue: usize,
}

impl EventsTarget {
    /// The URL as logs and `check` show it: `https://host:port/path`, no
    /// query (receivers sometimes take a key there).
    pub fn display_url(&self) -> String {
        let path = self.path.split('?').next().unwrap_or("/");
        if self.host.contains(':') {
            format!("https://[{}]:{}{path}", self.host, self.port)
        } else {
            format!("https://{}:{}{path}", self.host, self.port)
        }
    }

    /// Whether events of type `kind` go to this receiver.
    pub fn wants(&self, kind: &str) -> bool {
        self.types.is_empty()
            || self.types.iter().any(|t| match t.strip_suffix(".*") {
                Some(family) => kind
                    .strip_prefix(family)
                    .is_some_and(|rest| rest.starts_with('.')),
                None => t == kind,
            })
    }
}

/// `[tenant.twilio_api]`: what telephony frameworks written for Twilio (Pipecat's
/// `auto_hang_up`) authenticate with, HTTP Basic `{account_sid}:{auth_token}`.
#[derive(Debug)]
#[non_exhaustive]
pub struct TwilioApi {
    /// The account SID in the request path and the Basic user name; unique
    /// across tenants.
    pub account_sid: String,
    /// The Basic password.
    pub auth_token: Secret,
}

/// A checked disclosure prompt file.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Prompt {
    /// Path as configured.
    pub path: PathBuf,
    /// Sample rate in Hz (8000–48000).
    pub sample_rate: u32,
    /// 1 or 2.
    pub channels: u16,
    /// Length in milliseconds.
    pub duration_ms: u64,
}

/// Retention periods in days.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct Retention {
    /// Recordings (default 90).
    pub recordings_days: u32,
    /// Transcripts (default 90).
    pub transcripts_days: u32,
    /// Call metadata / CDRs (default 365).
    pub metadata_days: u32,
    /// Audit rows (default 400, or the longest of the others if longer;
    /// never shorter than that).
    pub audit_days: u32,
}

impl Default for Retention {
    fn default() -> Retention {
        Retention {
            recordings_days: 90,
            transcripts_days: 90,
            metadata_days: 365,
            audit_days: 400,
        }
    }
}

/// The pipeline a tenant's calls feed.
#[derive(Debug)]
#[non_exhaustive]
pub enum Pipeline {
    /// Plays the caller back (no network).
    Echo,
    /// Deepgram live speech-to-text.
    Deepgram(DeepgramSettings),
    /// An agent over WebSocket.
    Agent(AgentSettings),
    /// Deepgram transcripts forwarded to an agent.
    DeepgramAgent(DeepgramSettings, AgentSettings),
}

impl Pipeline {
    /// The `kind` as written in configuration.
    pub fn kind(&self) -> &'static str {
        match self {
            Pipeline::Echo => "echo",
            Pipeline::Deepgram(_) => "deepgram",
            Pipeline::Agent(_) => "agent",
            Pipeline::DeepgramAgent(..) => "deepgram+agent",
        }
    }
}

/// What a tenant's calls do when their network pipeline (agent, Deepgram)
/// cannot be reached, rejects the bridge, drops, or (agents) stays silent:
/// the keys `on_failure`, `fallback_prompt`, `reconnect_attempts`,
/// `reconnect_within_ms`, `connect_timeout_ms`, `agent_silence_s`,
/// `away_audio` and `hold_prompt` of the tenant's `pipeline` table.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct FailurePolicy {
    /// What happens once reconnecting has not helped.
    pub on_failure: OnFailure,
    /// Played before hanging up (`on_failure = "fallback"`); none: hang up at once.
    pub fallback_prompt: Option<Prompt>,
    /// Reconnects tried per outage (0: none).
    pub reconnect_attempts: u32,
    /// An outage ends within this long (from the loss), reconnected or given up.
    pub reconnect_within: Duration,
    /// One connection attempt (TCP connect and upgrade) may take this long.
    pub connect_timeout: Duration,
    /// An agent that sends neither audio nor a mark for this long after the
    /// disclosure prompt has ended has failed (None: never).
    pub agent_silence: Option<Duration>,
    /// What the caller hears while the agent is away (reconnecting).
    pub away_audio: AwayAudio,
}

/// What the caller hears while the agent's connection is being
/// re-established (`away_audio`, `hold_prompt`).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum AwayAudio {
    /// A soft hiss (about −45 dBov): the line is audibly alive (the default).
    #[default]
    ComfortNoise,
    /// Nothing (silence frames keep the RTP stream going).
    Silence,
    /// The tenant's hold prompt (a WAV file, converted like the disclosure
    /// prompt), looped, from its start each time the agent goes away.
    HoldPrompt(Prompt),
}

impl Default for FailurePolicy {
    fn default() -> FailurePolicy {
        FailurePolicy {
            on_failure: OnFailure::Fallback,
            fallback_prompt: None,
            reconnect_attempts: 10,
            reconnect_within: Duration::from_millis(10_000),
            connect_timeout: Duration::from_millis(3000),
            agent_silence: None,
            away_audio: AwayAudio::ComfortNoise,
        }
    }
}

/// The decision once a pipeline has failed for good.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum OnFailure {
    /// Play the fallback prompt (if any), then hang up with BYE (the default:
    /// a caller is never left in dead air).
    Fallback,
    /// Keep the call up without the pipeline (recording continues if on); the
    /// caller, the RTP timeout or the maximum duration ends it.
    Continue,
}

/// Longest fallback prompt accepted: the caller hears it before the bridge
/// hangs up, so it is a short apology, not content.
pub const MAX_FALLBACK_PROMPT: Duration = Duration::from_secs(30);

/// Deepgram live settings.
#[derive(Debug)]
#[non_exhaustive]
pub struct DeepgramSettings {
    /// Model name, e.g. `nova-3`.
    pub model: String,
    /// BCP-47 language, e.g. `en-US`.
    pub language: String,
    /// API key.
    pub api_key: Secret,
    /// `endpointing`: pause in ms that ends an utterance; `Some(0)` sends
    /// `endpointing=false`, `None` leaves Deepgram's default.
    pub endpointing_ms: Option<u32>,
    /// `interim_results` (default false).
    pub interim_results: bool,
    /// `utterance_end_ms` (needs `interim_results`).
    pub utterance_end_ms: Option<u32>,
    /// `vad_events` (default false).
    pub vad_events: bool,
    /// `ws://` or `wss://` scheme, host and optional port (and path prefix)
    /// that `/v1/listen` is appended to; default [`DEEPGRAM_BASE_URL`].
    pub base_url: String,
}

/// Where Deepgram live is reached unless a tenant sets `base_url`.
pub const DEEPGRAM_BASE_URL: &str = "wss://api.deepgram.com";

/// Agent WebSocket settings.
#[derive(Debug)]
#[non_exhaustive]
pub struct AgentSettings {
    /// `ws://` or `wss://` URL.
    pub url: String,
    /// Wire protocol.
    pub mode: AgentMode,
    /// How the bridge authenticates to the agent, if at all.
    pub auth: Option<AgentAuth>,
    /// Extra trust anchors for a `wss://` agent behind a private CA.
    pub ca_file: Option<CaFile>,
}

/// How the bridge proves itself to a tenant's agent on the WebSocket upgrade.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum AgentAuth {
    /// `Authorization: Bearer <secret>`.
    Bearer(Secret),
    /// `X-Sipbridge-Signature`: an HMAC-SHA256 keyed with the secret over the
    /// timestamp, call id and request path (docs/agent-protocol.md).
    Hmac(Secret),
}

impl AgentAuth {
    /// The secret, whichever the kind.
    pub fn secret(&self) -> &Secret {
        match self {
            AgentAuth::Bearer(s) | AgentAuth::Hmac(s) => s,
        }
    }

    /// `bearer` or `hmac`, as written in configuration.
    pub fn kind(&self) -> &'static str {
        match self {
            AgentAuth::Bearer(_) => "bearer",
            AgentAuth::Hmac(_) => "hmac",
        }
    }
}

/// A PEM file of CA certificates, loaded and checked by `sipbridge check`.
#[derive(Clone)]
#[non_exhaustive]
pub struct CaFile {
    /// Where it was read from.
    pub path: PathBuf,
    /// The certificates it holds (at least one), DER.
    pub certs: Vec<rustls_pki_types::CertificateDer<'static>>,
}

impl std::fmt::Debug for CaFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CaFile")
            .field("path", &self.path)
            .field("certs", &self.certs.len())
            .finish()
    }
}

/// Agent wire protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum AgentMode {
    /// sipbridge's own protocol.
    Native,
    /// Twilio Media Streams compatible.
    Twilio,
    /// Telnyx Media Streaming compatible (bidirectional RTP mode), in this
    /// stream encoding.
    Telnyx(TelnyxEncoding),
}

/// The audio encoding of a Telnyx-mode stream, both ways (Telnyx's
/// `media_format.encoding` and `stream_bidirectional_codec`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum TelnyxEncoding {
    /// G.711 µ-law, 8000 Hz (Telnyx's default).
    Pcmu,
    /// G.711 A-law, 8000 Hz.
    Pcma,
    /// 16-bit linear PCM, 16000 Hz, network byte order (RTP L16); needs a
    /// `pipeline_rate` of 16000.
    L16,
}

impl TelnyxEncoding {
    /// The name as Telnyx writes it (and as configured).
    pub fn name(self) -> &'static str {
        match self {
            TelnyxEncoding::Pcmu => "PCMU",
            TelnyxEncoding::Pcma => "PCMA",
            TelnyxEncoding::L16 => "L16",
        }
    }

    /// The encoding named `name` (case-sensitive, as Telnyx's API).
    pub fn from_name(name: &str) -> Option<TelnyxEncoding> {
        match name {
            "PCMU" => Some(TelnyxEncoding::Pcmu),
            "PCMA" => Some(TelnyxEncoding::Pcma),
            "L16" => Some(TelnyxEncoding::L16),
            _ => None,
        }
    }

    /// Samples per second on the stream.
    pub fn sample_rate(self) -> u32 {
        match self {
            TelnyxEncoding::Pcmu | TelnyxEncoding::Pcma => 8000,
            TelnyxEncoding::L16 => 16_000,
        }
    }
}

/// A dialed number (pattern) sent to a tenant.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Route {
    /// Exact number or prefix.
    pub number: NumberPattern,
    /// Target tenant id.
    pub tenant: String,
    /// Only calls from these trunks match (None: any trunk).
    pub trunks: Option<Vec<String>>,
}

impl Config {
    /// The tenant with this id.
    pub fn tenant(&self, id: &str) -> Option<&Tenant> {
        self.tenants.iter().find(|t| t.id == id)
    }

    /// The trunk with this name.
    pub fn trunk(&self, name: &str) -> Option<&Trunk> {
        self.trunks.iter().find(|t| t.name == name)
    }

    /// The trunk whose allow-list holds `ip` with the longest prefix (most
    /// specific CIDR wins). IPv4-mapped IPv6 sources (`::ffff:a.b.c.d`) are
    /// matched as IPv4.
    pub fn trunk_for_source(&self, ip: IpAddr) -> Option<&Trunk> {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
            v4 => v4,
        };
        self.trunks
            .iter()
            .flat_map(|t| t.allow.iter().map(move |n| (t, n)))
            .filter(|(_, n)| n.contains(&ip))
            .max_by_key(|(_, n)| n.prefix_len())
            .map(|(t, _)| t)
    }

    /// The route for a dialed number arriving on `trunk` (see [`number`] for
    /// normalisation). Exact numbers beat prefixes, longer prefixes beat
    /// shorter ones. A route restricted to other trunks, or to a tenant other
    /// than the one the trunk is dedicated to, does not match.
    pub fn route(&self, dialed_number: &str, trunk: &str) -> Option<&Route> {
        let digits = number::normalise(dialed_number)?;
        let dedicated = self.trunk(trunk).and_then(|t| t.tenant.as_deref());
        self.routes
            .iter()
            .filter(|r| {
                r.trunks
                    .as_ref()
                    .is_none_or(|ts| ts.iter().any(|t| t == trunk))
            })
            .filter(|r| dedicated.is_none_or(|d| d == r.tenant))
            .filter_map(|r| r.number.specificity(&digits).map(|s| (s, r)))
            .max_by_key(|(s, _)| *s)
            .map(|(_, r)| r)
    }

    /// A human summary: profiles, listeners, trunks, tenants, routes,
    /// pipelines and retention. Secrets appear as their source and fingerprint.
    pub fn summary(&self) -> String {
        let mut out = String::new();
        // Writing to a String cannot fail; results are ignored deliberately.
        for p in &self.profiles {
            let _ = writeln!(out, "profile {} ({})", p.name, p.file.display());
            let listeners: Vec<String> = p
                .listen
                .udp
                .iter()
                .map(|a| format!("udp {a}"))
                .chain(p.listen.tcp.iter().map(|a| format!("tcp {a}")))
                .chain(p.listen.tls.iter().map(|a| format!("tls {a}")))
                .collect();
            let _ = writeln!(out, "  listen: {}", listeners.join(", "));
            if let Some(a) = p.advertised_address {
                let _ = writeln!(out, "  advertised address: {a}");
            }
            let _ = writeln!(
                out,
                "  rtp ports: {}-{} ({} calls); max calls: {}",
                p.rtp_ports.start,
                p.rtp_ports.end,
                p.rtp_ports.calls(),
                p.max_calls
            );
            let key = match &p.master_key {
                MasterKey::Loaded(s) => format!("{} ({})", s.source(), s.fingerprint()),
                MasterKey::ToGenerate(path) => {
                    format!("file:{} (will be generated on first start)", path.display())
                }
            };
            let _ = writeln!(out, "  var_dir: {}; master key: {key}", p.var_dir.display());
            let _ = writeln!(out, "  drain grace: {} s", p.drain_grace.as_secs());
            let _ = writeln!(
                out,
                "  store: min free {} MiB, checked every {} s",
                p.store.min_free_bytes / (1024 * 1024),
                p.store.check_interval.as_secs()
            );
            match &p.recordings {
                Recordings::Local => {
                    let _ = writeln!(out, "  recordings: local files under var_dir");
                }
                Recordings::S3(s3) => {
                    let _ = writeln!(
                        out,
                        "  recordings: s3 bucket {} at {} (region {}, key id {}, secret {}), spool max {} MiB",
                        s3.bucket,
                        s3.endpoint,
                        s3.region,
                        s3.access_key_id.source(),
                        s3.secret_access_key.source(),
                        s3.spool_max_bytes / (1024 * 1024)
                    );
                }
            }
            if let StoreEngine::Postgres { url } = &p.store.engine {
                let _ = writeln!(
                    out,
                    "  metadata: PostgreSQL (url from {}), data keys in its data_keys table",
                    url.source()
                );
            }
            let s = &p.sip;
            let _ = writeln!(
                out,
                "  sip: T1 {} ms, T2 {} ms, T4 {} ms, session-expires {} s, min-se {} s, unknown sources: {}",
                s.t1.as_millis(),
                s.t2.as_millis(),
                s.t4.as_millis(),
                s.session_expires.as_secs(),
                s.min_se.as_secs(),
                match s.unknown_source {
                    UnknownSource::Reject => "reject (403)",
                    UnknownSource::Drop => "drop",
                }
            );
        }
        let _ = writeln!(out, "trunks: {}", self.trunks.len());
        for t in &self.trunks {
            let allow: Vec<String> = t.allow.iter().map(ToString::to_string).collect();
            let digest = t.digest.as_ref().map_or("none".to_owned(), |d| {
                format!(
                    "user {} realm {} password {} ({})",
                    d.username,
                    d.realm,
                    d.password.source(),
                    d.password.fingerprint()
                )
            });
            let _ = writeln!(
                out,
                "  {}: allow [{}]; digest: {digest}; tenant: {}; max calls: {}",
                t.name,
                allow.join(", "),
                t.tenant.as_deref().unwrap_or("any"),
                limit(t.max_calls)
            );
        }
        let _ = writeln!(out, "tenants: {}", self.tenants.len());
        for t in &self.tenants {
            let prompt = t.prompt.as_ref().map_or("none".to_owned(), |p| {
                format!(
                    "{} ({} Hz, {}, {:.1} s)",
                    p.path.display(),
                    p.sample_rate,
                    if p.channels == 1 { "mono" } else { "stereo" },
                    p.duration_ms as f64 / 1000.0
                )
            });
            let _ = writeln!(
                out,
                "  {}: recording {}, transcripts {}, opt-out key {}, max calls: {}",
                t.id,
                on_off(t.recording),
                on_off(t.transcripts),
                t.opt_out_key.map_or("none".to_owned(), String::from),
                limit(t.max_calls)
            );
            let _ = writeln!(out, "    prompt: {prompt}");
            if t.recording {
                let _ = writeln!(
                    out,
                    "    store cannot write: {}",
                    match t.on_store_failure {
                        OnStoreFailure::AnswerUnrecorded => "answer unrecorded",
                        OnStoreFailure::Reject => "reject (503)",
                    }
                );
            }
            let _ = writeln!(out, "    pipeline: {}", describe_pipeline(&t.pipeline));
            if !matches!(t.pipeline, Pipeline::Echo) {
                let _ = writeln!(
                    out,
                    "    on failure: {}",
                    describe_failure(&t.pipeline_failure)
                );
            }
            if let Some(api) = &t.twilio_api {
                let _ = writeln!(
                    out,
                    "    twilio REST API: account {} auth token {} ({})",
                    api.account_sid,
                    api.auth_token.source(),
                    api.auth_token.fingerprint()
                );
            }
            if let Some(e) = &t.events {
                let types = if e.types.is_empty() {
                    "all events".to_owned()
                } else {
                    e.types.join(", ")
                };
                let _ = writeln!(
                    out,
                    "    events: {} ({types}; queue {}; secret {} ({}){})",
                    crate::logging::wire(&e.display_url()),
                    e.queue,
                    e.secret.source(),
                    e.secret.fingerprint(),
                    if e.ca.is_some() { "; own CA" } else { "" }
                );
            }
            let r = &t.retention;
            let _ = writeln!(
                out,
                "    retention: recordings {} d, transcripts {} d, metadata {} d, audit {} d",
                r.recordings_days, r.transcripts_days, r.metadata_days, r.audit_days
            );
        }
        let _ = writeln!(out, "routes: {}", self.routes.len());
        for r in &self.routes {
            let trunks = r.trunks.as_ref().map_or("any trunk".to_owned(), |t| {
                format!("trunks {}", t.join(", "))
            });
            let _ = writeln!(out, "  {} -> {} ({trunks})", r.number, r.tenant);
        }
        out
    }
}

fn on_off(b: bool) -> &'static str {
    if b { "on" } else { "off" }
}

fn limit(n: Option<u32>) -> String {
    n.map_or("unlimited".to_owned(), |n| n.to_string())
}

fn describe_pipeline(p: &Pipeline) -> String {
    let dg = |d: &DeepgramSettings| {
        format!(
            "model {} language {} api_key {} ({})",
            d.model,
            d.language,
            d.api_key.source(),
            d.api_key.fingerprint()
        )
    };
    let agent = |a: &AgentSettings| {
        let auth = a.auth.as_ref().map_or("none".to_owned(), |auth| {
            let s = auth.secret();
            format!("{} {} ({})", auth.kind(), s.source(), s.fingerprint())
        });
        let ca = a.ca_file.as_ref().map_or(String::new(), |c| {
            format!(" ca_file {} ({} certs)", c.path.display(), c.certs.len())
        });
        let mode = match a.mode {
            AgentMode::Native => "native".to_owned(),
            AgentMode::Twilio => "twilio".to_owned(),
            AgentMode::Telnyx(e) => format!("telnyx ({})", e.name()),
        };
        // A URL may carry credentials in its query or userinfo: print neither.
        format!("url {} mode {mode} auth {auth}{ca}", redact_url(&a.url))
    };
    match p {
        Pipeline::Echo => "echo".to_owned(),
        Pipeline::Deepgram(d) => format!("deepgram: {}", dg(d)),
        Pipeline::Agent(a) => format!("agent: {}", agent(a)),
        Pipeline::DeepgramAgent(d, a) => format!("deepgram+agent: {}; {}", dg(d), agent(a)),
    }
}

fn describe_failure(f: &FailurePolicy) -> String {
    let then = match (f.on_failure, &f.fallback_prompt) {
        (OnFailure::Continue, _) => "continue without it".to_owned(),
        (OnFailure::Fallback, None) => "hang up".to_owned(),
        (OnFailure::Fallback, Some(p)) => format!(
            "play {} ({:.1} s), then hang up",
            p.path.display(),
            p.duration_ms as f64 / 1000.0
        ),
    };
    let silence = f
        .agent_silence
        .map_or("off".to_owned(), |d| format!("{} s", d.as_secs()));
    let away = match &f.away_audio {
        AwayAudio::ComfortNoise => "comfort noise".to_owned(),
        AwayAudio::Silence => "silence".to_owned(),
        AwayAudio::HoldPrompt(p) => format!(
            "hold prompt {} ({:.1} s, looped)",
            p.path.display(),
            p.duration_ms as f64 / 1000.0
        ),
    };
    format!(
        "{} reconnects within {} ms (connect timeout {} ms, {away} meanwhile), agent silence {silence}; then {then}",
        f.reconnect_attempts,
        f.reconnect_within.as_millis(),
        f.connect_timeout.as_millis()
    )
}

/// A URL for logs and summaries: scheme, host, port and path only — no
/// userinfo, no query, no fragment (they may hold secrets). Anything that is
/// not `scheme://…` is not printed at all.
pub fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return "<invalid url>".to_owned();
    };
    let end = rest.find(['?', '#']).unwrap_or(rest.len());
    let rest = &rest[..end];
    let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    let host = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    format!("{scheme}://{host}{path}")
}
