//! The `/v1` endpoints of the admin API (documented in `docs/admin-api.md`
//! and `docs/admin-api.openapi.yaml`).
//!
//! Owns request parsing, the tenant scoping of every answer, the JSON shapes
//! and the one table that maps errors to HTTP statuses ([`ApiError`]). Must
//! not hold SQL or the semantics of erasure/export/retention: those are
//! `store::ops` and `store::db`, shared with the CLI. Store work runs on a
//! blocking thread, holding the API's connection for that request only.
//!
//! Audit rows (actor `admin-api:admin` or `admin-api:tenant:<id>`): link
//! issued (`recording-link`), download (`recording-export`), erasure (the
//! store's per-object rows), export (`data-export`), reload (`reload`).

use super::auth::Principal;
use super::links::{DEFAULT_TTL_S, LinkError};
use super::{AdminState, Api};
use crate::call::HangupCause;
use crate::control::{CommandError, LiveCall, ReloadError};
use crate::store::db::{
    AuditAction, AuditEntry, AuditFilter, CallFilter, DbError, ObjectKind, RecordingRecord,
    RecordingState, UnixMs, unix_ms,
};
use crate::store::ops::{self, DataStore, EraseTarget, ExportedCall, OpsError, format_time};
use crate::store::recording::{WavPieces, WavStream};
use crate::store::retention::{Expiry, ItemKind};
use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::rejection::QueryRejection;
use axum::extract::{FromRequestParts, Path, Query, State};
use axum::http::{HeaderValue, StatusCode, header, request::Parts};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use base64::Engine as _;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;
use tracing::{debug, error, info};

/// Rows per page when the query names no `limit`.
const DEFAULT_LIMIT: u32 = 100;
/// Largest `limit` accepted.
const MAX_LIMIT: u32 = 1000;
/// `Retry-After` (seconds) of a download refused for the tenant's cap.
const DOWNLOAD_RETRY_AFTER_S: u32 = 5;
/// `Retry-After` (seconds) of an outbound call refused for a call limit or
/// capacity.
const OUTBOUND_RETRY_AFTER_S: u32 = 5;
/// Longest `answer_timeout_s` of `POST /v1/calls`.
const MAX_ANSWER_TIMEOUT_S: u32 = 600;
/// Most `custom` parameters of `POST /v1/calls`, and their longest name and value.
const MAX_CUSTOM: usize = 32;
const MAX_CUSTOM_LEN: usize = 256;

/// The `/v1` routes (every one is in `docs/admin-api.openapi.yaml`; a test
/// checks).
pub(super) fn routes() -> Router<AdminState> {
    Router::new()
        .route("/v1/calls", get(list_calls).post(place_call))
        .route("/v1/calls/{call_id}", get(call_detail).delete(end_call))
        .route("/v1/calls/{call_id}/hangup", post(hang_up))
        .route("/v1/calls/{call_id}/pause_recording", post(pause_recording))
        .route(
            "/v1/calls/{call_id}/resume_recording",
            post(resume_recording),
        )
        .route("/v1/cdrs", get(list_cdrs))
        .route("/v1/cdrs/{call_id}", get(cdr_detail))
        .route("/v1/recordings", get(list_recordings))
        .route("/v1/recordings/{id}", get(recording_detail))
        .route("/v1/recordings/{id}/link", post(recording_link))
        .route("/v1/recordings/{id}/download", get(download))
        .route("/v1/transcripts/{call_id}", get(transcript))
        .route("/v1/retention", get(retention_status))
        .route("/v1/retention/dry-run", get(retention_dry_run))
        .route("/v1/erase", post(erase))
        .route("/v1/export", post(export))
        .route("/v1/reload", post(reload))
        .route("/v1/audit", get(audit_log))
        .route("/v1/security/bans", get(list_bans))
}

// ---- errors ------------------------------------------------------------------

/// Everything a handler can answer besides success.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub(crate) enum ApiError {
    /// No token, or one that matches nothing.
    #[error("missing or invalid bearer token")]
    Unauthorized,
    /// A tenant token on a daemon-wide operation.
    #[error("this operation needs the admin token")]
    AdminOnly,
    /// Absent, or another tenant's (never told apart).
    #[error("not found")]
    NotFound,
    /// A recording whose file was deleted.
    #[error("recording was deleted")]
    Gone,
    /// A bad query or body.
    #[error("{0}")]
    BadRequest(String),
    /// A download link that is expired or altered.
    #[error(transparent)]
    Link(#[from] LinkError),
    /// The object's state forbids it (still recording, legal hold, busy).
    #[error("{0}")]
    Conflict(String),
    /// A reload that did not happen.
    #[error("{}", reload_refusal(.0))]
    Reload(#[from] ReloadError),
    /// The daemon runs without a store.
    #[error("no store is open")]
    NoStore,
    /// Store, crypto or I/O failure (logged; the client sees no detail).
    #[error(transparent)]
    Ops(#[from] OpsError),
    /// The tenant has `max_downloads_per_tenant` downloads running.
    #[error("too many downloads of this tenant's recordings at once; retry later")]
    TooManyDownloads,
    /// An outbound call refused by the daemon (limits, trunk, target).
    #[error(transparent)]
    Dial(#[from] crate::control::DialError),
    /// A blocking task died.
    #[error("internal error")]
    Internal,
}

impl From<DbError> for ApiError {
    fn from(e: DbError) -> Self {
        ApiError::from(OpsError::from(e))
    }
}

impl ApiError {
    /// The one table from errors to statuses.
    fn status(&self) -> StatusCode {
        match self {
            ApiError::Unauthorized => StatusCode::UNAUTHORIZED,
            ApiError::AdminOnly | ApiError::Link(_) => StatusCode::FORBIDDEN,
            ApiError::NotFound => StatusCode::NOT_FOUND,
            ApiError::Gone => StatusCode::GONE,
            ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::Reload(ReloadError::Invalid(_)) => StatusCode::UNPROCESSABLE_ENTITY,
            // Draining, a change that needs a restart, a prompt or listener
            // that could not be set up: not done, the running one stays.
            ApiError::Conflict(_) | ApiError::Reload(_) => StatusCode::CONFLICT,
            ApiError::NoStore => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::TooManyDownloads => StatusCode::TOO_MANY_REQUESTS,
            ApiError::Dial(e) => {
                use crate::call::OutboundRefusal as R;
                use crate::control::DialError as D;
                match e {
                    D::Refused(R::TrunkNotAllowed) => StatusCode::FORBIDDEN,
                    D::Refused(R::BadRequest(_)) => StatusCode::BAD_REQUEST,
                    D::Refused(R::RateLimited | R::CallLimit) => StatusCode::TOO_MANY_REQUESTS,
                    D::Refused(R::Draining | R::NoCapacity) | D::NoListener => {
                        StatusCode::SERVICE_UNAVAILABLE
                    }
                    D::Unresolved => StatusCode::BAD_GATEWAY,
                }
            }
            ApiError::Ops(e) => match e {
                OpsError::UnknownRecording(_)
                | OpsError::Db(
                    DbError::UnknownCall { .. }
                    | DbError::UnknownRecording(_)
                    | DbError::TenantMismatch { .. },
                ) => StatusCode::NOT_FOUND,
                OpsError::RecordingDeleted(_) => StatusCode::GONE,
                OpsError::StillRecording(_)
                | OpsError::LegalHold { .. }
                | OpsError::Db(DbError::LegalHold { .. }) => StatusCode::CONFLICT,
                // In another node's spool, not uploaded yet: ask again.
                OpsError::NotInObjectStore(_) => StatusCode::SERVICE_UNAVAILABLE,
                _ => StatusCode::INTERNAL_SERVER_ERROR,
            },
            ApiError::Internal => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }
}

/// What the client reads of a refused reload: invalid files in one line (the
/// diagnostics follow in their own field), any other refusal as the daemon
/// words it.
fn reload_refusal(e: &ReloadError) -> String {
    match e {
        ReloadError::Invalid(_) => "configuration invalid; the running configuration stays".into(),
        other => other.to_string(),
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        // Error texts may quote a request's values (a caller number in a
        // malformed body): scrubbed like the logs (issue 15).
        let text = self.to_string();
        let mut body = json!({ "error": crate::logging::scrub(&text) });
        if status == StatusCode::INTERNAL_SERVER_ERROR {
            error!(error = %crate::logging::scrub(&text), "admin API request failed");
            body = json!({ "error": "internal error" });
        } else if status == StatusCode::NOT_FOUND {
            // Never echo which id or tenant was asked for.
            body = json!({ "error": "not found" });
        }
        if let ApiError::Reload(ReloadError::Invalid(diagnostics)) = &self {
            body["diagnostics"] = json!(diagnostics);
        }
        let mut resp = (status, axum::Json(body)).into_response();
        if status == StatusCode::UNAUTHORIZED {
            resp.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"sipbridge-admin\""),
            );
        }
        if status == StatusCode::TOO_MANY_REQUESTS
            || status == StatusCode::SERVICE_UNAVAILABLE
            || matches!(self, ApiError::Ops(OpsError::NotInObjectStore(_)))
        {
            let retry_after = match &self {
                // One second refills at least one call of the tenant's rate.
                ApiError::Dial(crate::control::DialError::Refused(
                    crate::call::OutboundRefusal::RateLimited,
                )) => 1,
                ApiError::Dial(_) => OUTBOUND_RETRY_AFTER_S,
                _ => DOWNLOAD_RETRY_AFTER_S,
            };
            if status == StatusCode::TOO_MANY_REQUESTS
                || matches!(self, ApiError::Dial(_))
                || matches!(self, ApiError::Ops(OpsError::NotInObjectStore(_)))
            {
                resp.headers_mut()
                    .insert(header::RETRY_AFTER, HeaderValue::from(retry_after));
            }
        }
        resp
    }
}

type ApiResult<T> = Result<T, ApiError>;

impl FromRequestParts<AdminState> for Principal {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AdminState) -> ApiResult<Self> {
        let header = parts
            .headers
            .get(header::AUTHORIZATION)
            .map(HeaderValue::as_bytes);
        state.api.settings().tokens.check(header).map_err(|e| {
            debug!(reason = %e, path = %parts.uri.path(), "admin API request refused");
            ApiError::Unauthorized
        })
    }
}

// ---- helpers -------------------------------------------------------------------

fn now_ms() -> UnixMs {
    unix_ms(SystemTime::now())
}

impl Api {
    /// Runs `f` on the API's store connection on a blocking thread.
    pub(super) async fn with_store<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut DataStore) -> ApiResult<T> + Send + 'static,
    ) -> ApiResult<T> {
        let data = Arc::clone(self.data.as_ref().ok_or(ApiError::NoStore)?);
        let settings = self.settings();
        tokio::task::spawn_blocking(move || {
            let mut conn = data
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            // After a reload, the connection learns the new caller-id policies.
            if !conn
                .policies_of
                .as_ref()
                .is_some_and(|s| Arc::ptr_eq(s, &settings))
            {
                for (tenant, policy) in &settings.callers {
                    conn.ds.set_caller_policy(tenant, policy.clone());
                }
                conn.policies_of = Some(settings);
            }
            f(&mut conn.ds)
        })
        .await
        .map_err(|_| ApiError::Internal)?
    }
}

/// The tenant filter for `principal` asking `requested` (404 when a tenant
/// asks for another).
fn scope(principal: &Principal, requested: Option<&str>) -> ApiResult<Option<String>> {
    principal.scope(requested).ok_or(ApiError::NotFound)
}

fn admin_only(principal: &Principal) -> ApiResult<()> {
    match principal {
        Principal::Admin => Ok(()),
        Principal::Tenant(_) => Err(ApiError::AdminOnly),
    }
}

fn query<T>(q: Result<Query<T>, QueryRejection>) -> ApiResult<T> {
    q.map(|Query(v)| v)
        .map_err(|e| ApiError::BadRequest(e.body_text()))
}

/// A JSON body, or the type's default for an empty one.
fn body<T: serde::de::DeserializeOwned + Default>(bytes: &Bytes) -> ApiResult<T> {
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Ok(T::default());
    }
    serde_json::from_slice(bytes).map_err(|e| ApiError::BadRequest(format!("body: {e}")))
}

fn time_param(name: &str, v: Option<&str>) -> ApiResult<Option<UnixMs>> {
    v.map(|s| {
        ops::parse_since(s).ok_or_else(|| {
            ApiError::BadRequest(format!(
                "{name}: expected RFC 3339 (2025-10-09T08:00:00Z), a date or unix seconds"
            ))
        })
    })
    .transpose()
}

fn limit_param(v: Option<u32>) -> ApiResult<u32> {
    match v.unwrap_or(DEFAULT_LIMIT) {
        0 => Err(ApiError::BadRequest("limit must be at least 1".into())),
        n => Ok(n.min(MAX_LIMIT)),
    }
}

const CURSOR: base64::engine::GeneralPurpose = base64::engine::general_purpose::URL_SAFE_NO_PAD;

// ---- live calls --------------------------------------------------------------

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct TenantQuery {
    tenant: Option<String>,
}

#[derive(Debug, Serialize)]
struct LiveCallJson {
    call_id: String,
    tenant: String,
    trunk: String,
    /// As the CDR stores it (keyed hash under `caller_numbers = "hashed"`).
    from: String,
    to: String,
    started_at: String,
    answered_at: Option<String>,
    /// `dialing` (outbound, nothing heard yet), `ringing` or `answered`.
    state: &'static str,
    /// `inbound` or `outbound`.
    direction: &'static str,
}

fn live_json(api: &Api, c: &LiveCall) -> LiveCallJson {
    use std::sync::atomic::Ordering;
    let answered = c.answered_at.load(Ordering::Relaxed);
    let state = if answered > 0 {
        "answered"
    } else if c.direction == crate::call::CallDirection::Outbound
        && !c.ringing.load(Ordering::Relaxed)
    {
        "dialing"
    } else {
        "ringing"
    };
    let from = match api.settings().callers.get(&c.tenant) {
        Some(policy) => policy.stored_form(&c.from).unwrap_or_default(),
        None => c.from.clone(),
    };
    LiveCallJson {
        call_id: c.call_id.clone(),
        tenant: c.tenant.clone(),
        trunk: c.trunk.clone(),
        from,
        to: c.to.clone(),
        started_at: format_time(c.started_at),
        answered_at: (answered > 0).then(|| format_time(answered)),
        state,
        direction: c.direction.as_str(),
    }
}

async fn list_calls(
    State(state): State<AdminState>,
    principal: Principal,
    q: Result<Query<TenantQuery>, QueryRejection>,
) -> ApiResult<axum::Json<Value>> {
    let q = query(q)?;
    let tenant = scope(&principal, q.tenant.as_deref())?;
    // An ended call's task may linger to absorb retransmissions: it is no
    // longer an active call (its CDR is written), so `Control` leaves it out.
    let calls: Vec<LiveCallJson> = (state.control.live_calls(tenant.as_deref()))
        .iter()
        .map(|c| live_json(&state.api, c))
        .collect();
    Ok(axum::Json(json!({ "calls": calls })))
}

/// The live call `call_id` if `principal` sees its tenant.
fn visible_call(
    state: &AdminState,
    principal: &Principal,
    call_id: &str,
) -> ApiResult<Arc<LiveCall>> {
    state
        .control
        .live_call(call_id)
        .filter(|c| principal.sees(&c.tenant))
        .ok_or(ApiError::NotFound)
}

async fn call_detail(
    State(state): State<AdminState>,
    principal: Principal,
    Path(call_id): Path<String>,
) -> ApiResult<axum::Json<LiveCallJson>> {
    let info = visible_call(&state, &principal, &call_id)?;
    Ok(axum::Json(live_json(&state.api, &info)))
}

/// Asks the call's task to end it with BYE (or a final response before the
/// answer); the CDR's cause is `local-hangup`.
async fn hang_up(
    State(state): State<AdminState>,
    principal: Principal,
    Path(call_id): Path<String>,
) -> ApiResult<(StatusCode, axum::Json<Value>)> {
    let info = visible_call(&state, &principal, &call_id)?;
    taken(state.control.hang_up(&call_id, HangupCause::Local))?;
    info!(call_id = %crate::logging::wire(&call_id), actor = %principal.actor(), "hang-up requested through the admin API");
    audit_call(
        &state,
        &principal,
        &info,
        AuditAction::CallHangup,
        "hung up",
    )
    .await?;
    Ok((
        StatusCode::ACCEPTED,
        axum::Json(json!({ "call_id": call_id, "hangup": "requested" })),
    ))
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct PlaceCall {
    to: String,
    from: String,
    trunk: String,
    #[serde(default)]
    custom: BTreeMap<String, String>,
    answer_timeout_s: Option<u32>,
}

/// `POST /v1/calls`: places an outbound call through one of the tenant's
/// trunks (a tenant token only: the call runs the tenant's pipeline). 201
/// with the call's id once the INVITE is on its way; its progress is
/// `GET /v1/calls/{id}`, its end the CDR.
async fn place_call(
    State(state): State<AdminState>,
    principal: Principal,
    bytes: Bytes,
) -> ApiResult<(StatusCode, axum::Json<Value>)> {
    let Principal::Tenant(tenant) = &principal else {
        return Err(ApiError::BadRequest(
            "outbound calls are placed with a tenant token (the call runs that tenant's pipeline)"
                .into(),
        ));
    };
    let req: PlaceCall =
        serde_json::from_slice(&bytes).map_err(|e| ApiError::BadRequest(format!("body: {e}")))?;
    if req
        .answer_timeout_s
        .is_some_and(|t| t == 0 || t > MAX_ANSWER_TIMEOUT_S)
    {
        return Err(ApiError::BadRequest(format!(
            "answer_timeout_s must be 1-{MAX_ANSWER_TIMEOUT_S}"
        )));
    }
    if req.custom.len() > MAX_CUSTOM
        || req
            .custom
            .iter()
            .any(|(k, v)| k.is_empty() || k.len() > MAX_CUSTOM_LEN || v.len() > MAX_CUSTOM_LEN)
    {
        return Err(ApiError::BadRequest(format!(
            "custom: at most {MAX_CUSTOM} parameters, names 1-{MAX_CUSTOM_LEN} and values up to {MAX_CUSTOM_LEN} bytes"
        )));
    }
    let request = crate::control::DialRequest {
        call: crate::call::OutboundRequest {
            tenant: tenant.clone(),
            trunk: req.trunk,
            to: req.to,
            from: req.from,
            answer_timeout: req
                .answer_timeout_s
                .map(|s| std::time::Duration::from_secs(u64::from(s))),
        },
        custom: req.custom.into_iter().collect(),
    };
    let call_id = state.control.clone().dial(request).await?;
    info!(call_id = %crate::logging::wire(&call_id), actor = %principal.actor(), "outbound call placed through the admin API");
    let body = match state.control.live_call(&call_id) {
        Some(c) => serde_json::to_value(live_json(&state.api, &c)).unwrap_or_default(),
        None => json!({ "call_id": call_id, "direction": "outbound" }),
    };
    Ok((StatusCode::CREATED, axum::Json(body)))
}

/// `DELETE /v1/calls/{id}`: ends the call — CANCEL while an outbound call
/// rings, BYE once answered, a final response to an inbound call not yet
/// answered. The same as `POST /v1/calls/{id}/hangup`.
async fn end_call(
    state: State<AdminState>,
    principal: Principal,
    call_id: Path<String>,
) -> ApiResult<(StatusCode, axum::Json<Value>)> {
    hang_up(state, principal, call_id).await
}

/// PCI pause: the call's recording gets silence and its transcript nothing
/// until `resume_recording` (or the call's end); the CDR lists the stretch.
async fn pause_recording(
    State(state): State<AdminState>,
    principal: Principal,
    Path(call_id): Path<String>,
) -> ApiResult<(StatusCode, axum::Json<Value>)> {
    set_paused(state, principal, call_id, true).await
}

/// Ends a PCI pause.
async fn resume_recording(
    State(state): State<AdminState>,
    principal: Principal,
    Path(call_id): Path<String>,
) -> ApiResult<(StatusCode, axum::Json<Value>)> {
    set_paused(state, principal, call_id, false).await
}

async fn set_paused(
    state: AdminState,
    principal: Principal,
    call_id: String,
    pause: bool,
) -> ApiResult<(StatusCode, axum::Json<Value>)> {
    let info = visible_call(&state, &principal, &call_id)?;
    let what = if pause { "paused" } else { "resumed" };
    taken(state.control.pause_recording(&call_id, pause))?;
    info!(call_id = %crate::logging::wire(&call_id), actor = %principal.actor(), "recording {what} through the admin API");
    let done = format!("recording {what}");
    audit_call(
        &state,
        &principal,
        &info,
        AuditAction::RecordingPause,
        &done,
    )
    .await?;
    Ok((
        StatusCode::ACCEPTED,
        axum::Json(json!({ "call_id": call_id, "recording": what })),
    ))
}

/// A command sent to a live call: taken, or the call is gone (404) or its
/// mailbox full (409).
fn taken(sent: Result<(), CommandError>) -> ApiResult<()> {
    match sent {
        Ok(()) => Ok(()),
        Err(CommandError::Gone) => Err(ApiError::NotFound),
        Err(CommandError::Busy) => Err(ApiError::Conflict("the call is busy; try again".into())),
    }
}

/// Audits an operator's command to a live call as `action`, with the reason
/// "`done` through the admin API".
async fn audit_call(
    state: &AdminState,
    principal: &Principal,
    info: &LiveCall,
    action: AuditAction,
    done: &str,
) -> ApiResult<()> {
    let actor = principal.actor();
    let tenant = info.tenant.clone();
    let id = info.call_id.clone();
    let reason = format!("{done} through the admin API");
    state
        .api
        .with_store(move |ds| {
            ds.store.audit(&AuditEntry {
                at: now_ms(),
                actor: &actor,
                action,
                object_kind: ObjectKind::Call,
                object_id: &id,
                tenant: &tenant,
                reason: &reason,
            })?;
            Ok(())
        })
        .await
}

// ---- CDRs --------------------------------------------------------------------

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct CdrQuery {
    tenant: Option<String>,
    since: Option<String>,
    until: Option<String>,
    limit: Option<u32>,
    cursor: Option<String>,
}

fn cdr_cursor(at: UnixMs, call_id: &str) -> String {
    CURSOR.encode(format!("{at}:{call_id}"))
}

fn parse_cdr_cursor(c: &str) -> ApiResult<(UnixMs, String)> {
    let bad = || ApiError::BadRequest("cursor: not one this API issued".into());
    let raw = String::from_utf8(CURSOR.decode(c).map_err(|_| bad())?).map_err(|_| bad())?;
    let (at, id) = raw.split_once(':').ok_or_else(bad)?;
    Ok((at.parse().map_err(|_| bad())?, id.to_owned()))
}

fn cdr_json(ds: &DataStore, c: &crate::store::db::StoredCdr) -> ApiResult<ExportedCall> {
    let recordings = ds
        .store
        .recordings_of_call(&c.tenant, &c.call_id)?
        .into_iter()
        .filter(|r| r.state != RecordingState::Deleted)
        .map(|r| r.id)
        .collect();
    Ok(ExportedCall::new(c, recordings))
}

async fn list_cdrs(
    State(state): State<AdminState>,
    principal: Principal,
    q: Result<Query<CdrQuery>, QueryRejection>,
) -> ApiResult<axum::Json<Value>> {
    let q = query(q)?;
    let filter = CallFilter {
        tenant: scope(&principal, q.tenant.as_deref())?,
        since: time_param("since", q.since.as_deref())?,
        until: time_param("until", q.until.as_deref())?,
        after: q.cursor.as_deref().map(parse_cdr_cursor).transpose()?,
        limit: limit_param(q.limit)?,
    };
    state
        .api
        .with_store(move |ds| {
            let calls = ds.store.list_calls(&filter)?;
            let next = (calls.len() == filter.limit as usize)
                .then(|| calls.last().map(|c| cdr_cursor(c.started_at, &c.call_id)))
                .flatten();
            let items = calls
                .iter()
                .map(|c| cdr_json(ds, c))
                .collect::<ApiResult<Vec<_>>>()?;
            Ok(axum::Json(json!({ "cdrs": items, "next_cursor": next })))
        })
        .await
}

async fn cdr_detail(
    State(state): State<AdminState>,
    principal: Principal,
    Path(call_id): Path<String>,
) -> ApiResult<axum::Json<ExportedCall>> {
    let tenant = scope(&principal, None)?;
    state
        .api
        .with_store(move |ds| {
            let call = ds
                .store
                .call_by_id(tenant.as_deref(), &call_id)?
                .ok_or(ApiError::NotFound)?;
            Ok(axum::Json(cdr_json(ds, &call)?))
        })
        .await
}

// ---- recordings --------------------------------------------------------------

#[derive(Debug, Serialize)]
struct RecordingJson {
    id: String,
    call_id: String,
    tenant: String,
    created_at: String,
    duration_ms: u64,
    /// Bytes of the sealed file.
    size_bytes: u64,
    state: &'static str,
    legal_hold: bool,
}

impl From<&RecordingRecord> for RecordingJson {
    fn from(r: &RecordingRecord) -> Self {
        RecordingJson {
            id: r.id.clone(),
            call_id: r.call_id.clone(),
            tenant: r.tenant.clone(),
            created_at: format_time(r.created_at),
            duration_ms: r.duration_ms,
            size_bytes: r.size_bytes,
            state: r.state.as_str(),
            legal_hold: r.legal_hold,
        }
    }
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RecordingsQuery {
    tenant: Option<String>,
    since: Option<String>,
    limit: Option<u32>,
    cursor: Option<String>,
}

async fn list_recordings(
    State(state): State<AdminState>,
    principal: Principal,
    q: Result<Query<RecordingsQuery>, QueryRejection>,
) -> ApiResult<axum::Json<Value>> {
    let q = query(q)?;
    let tenant = scope(&principal, q.tenant.as_deref())?;
    let since = time_param("since", q.since.as_deref())?;
    let limit = limit_param(q.limit)?;
    // The same cursor shape as the CDRs': `(created_at, id)` of the last item.
    let after = q.cursor.as_deref().map(parse_cdr_cursor).transpose()?;
    state
        .api
        .with_store(move |ds| {
            let after = after.as_ref().map(|(at, id)| (*at, id.as_str()));
            let recs = ds
                .store
                .list_recordings_page(tenant.as_deref(), since, after, limit)?;
            let next = (recs.len() == limit as usize)
                .then(|| recs.last().map(|r| cdr_cursor(r.created_at, &r.id)))
                .flatten();
            let recs: Vec<RecordingJson> = recs.iter().map(RecordingJson::from).collect();
            Ok(axum::Json(
                json!({ "recordings": recs, "next_cursor": next }),
            ))
        })
        .await
}

/// The recording `id` if `principal` sees it.
fn visible_recording(
    ds: &DataStore,
    principal: &Principal,
    id: &str,
) -> ApiResult<RecordingRecord> {
    let tenant = scope(principal, None)?;
    ds.store
        .get_recording(tenant.as_deref(), id)?
        .ok_or(ApiError::NotFound)
}

async fn recording_detail(
    State(state): State<AdminState>,
    principal: Principal,
    Path(id): Path<String>,
) -> ApiResult<axum::Json<RecordingJson>> {
    state
        .api
        .with_store(move |ds| {
            let rec = visible_recording(ds, &principal, &id)?;
            Ok(axum::Json(RecordingJson::from(&rec)))
        })
        .await
}

fn downloadable(rec: &RecordingRecord) -> ApiResult<()> {
    match rec.state {
        RecordingState::Complete | RecordingState::Partial => Ok(()),
        RecordingState::Deleted => Err(ApiError::Gone),
        RecordingState::Recording => Err(ApiError::Conflict(
            "the recording is still being written".into(),
        )),
    }
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct LinkRequest {
    /// Lifetime in seconds (default 300, at most 86400).
    ttl_s: Option<u64>,
}

#[derive(Debug, Serialize)]
struct LinkJson {
    recording_id: String,
    /// Path and query, relative to the admin API's base URL.
    url: String,
    expires_at: String,
    /// Unix seconds.
    expires: u64,
}

/// Issues a link for `rec` to `principal` (audited `recording-link`).
fn issue_link(
    api: &Api,
    ds: &mut DataStore,
    principal: &Principal,
    rec: &RecordingRecord,
    ttl_s: u64,
    now: UnixMs,
) -> ApiResult<LinkJson> {
    let actor = principal.actor();
    let now_s = u64::try_from(now / 1000).unwrap_or(0);
    let link = api.links.link(&rec.id, &actor, now_s, ttl_s);
    let expires_ms = i64::try_from(link.expires.saturating_mul(1000)).unwrap_or(i64::MAX);
    ds.store.audit(&AuditEntry {
        at: now,
        actor: &actor,
        action: AuditAction::RecordingLink,
        object_kind: ObjectKind::Recording,
        object_id: &rec.id,
        tenant: &rec.tenant,
        reason: &format!("download link valid until {}", format_time(expires_ms)),
    })?;
    Ok(LinkJson {
        recording_id: rec.id.clone(),
        url: link.path,
        expires_at: format_time(expires_ms),
        expires: link.expires,
    })
}

async fn recording_link(
    State(state): State<AdminState>,
    principal: Principal,
    Path(id): Path<String>,
    bytes: Bytes,
) -> ApiResult<(StatusCode, axum::Json<LinkJson>)> {
    let req: LinkRequest = body(&bytes)?;
    let ttl_s = req.ttl_s.unwrap_or(DEFAULT_TTL_S);
    if ttl_s == 0 {
        return Err(ApiError::BadRequest("ttl_s must be at least 1".into()));
    }
    let api = Arc::clone(&state.api);
    state
        .api
        .with_store(move |ds| {
            let rec = visible_recording(ds, &principal, &id)?;
            downloadable(&rec)?;
            let link = issue_link(&api, ds, &principal, &rec, ttl_s, now_ms())?;
            Ok((StatusCode::CREATED, axum::Json(link)))
        })
        .await
}

#[derive(Debug, Deserialize)]
struct DownloadQuery {
    expires: u64,
    by: String,
    sig: String,
}

/// Recording downloads running now, per tenant (`max_downloads_per_tenant`).
#[derive(Debug, Default)]
pub(super) struct DownloadSlots {
    running: Mutex<HashMap<String, u32>>,
}

impl DownloadSlots {
    /// A slot for one more download of `tenant`'s recordings, if fewer than
    /// `max` run; freed when the slot is dropped (the body ended, failed or
    /// its connection closed).
    fn take(self: &Arc<Self>, tenant: &str, max: u32) -> Option<DownloadSlot> {
        let mut running = self
            .running
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let n = running.entry(tenant.to_owned()).or_insert(0);
        if *n >= max {
            return None;
        }
        *n += 1;
        Some(DownloadSlot {
            slots: Arc::clone(self),
            tenant: tenant.to_owned(),
        })
    }
}

/// One running download (see [`DownloadSlots::take`]).
#[derive(Debug)]
struct DownloadSlot {
    slots: Arc<DownloadSlots>,
    tenant: String,
}

impl Drop for DownloadSlot {
    fn drop(&mut self) {
        let mut running = self
            .slots
            .running
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(n) = running.get_mut(&self.tenant) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                running.remove(&self.tenant);
            }
        }
    }
}

/// A download's body: pulled by hyper piece by piece, each piece decrypted
/// on a blocking thread only while hyper asks for it. A client that stops
/// reading stops the pulls: no thread waits for it and nothing more is
/// decrypted; the connection's deadline then cuts it.
struct DownloadBody {
    pieces: Option<WavPieces>,
    deadline: tokio::time::Instant,
    recording: String,
    /// The last byte was handed to hyper.
    finished: bool,
    started: std::time::Instant,
    /// Held until the body is dropped.
    _slot: DownloadSlot,
}

impl Drop for DownloadBody {
    fn drop(&mut self) {
        if !self.finished {
            info!(
                recording = %self.recording,
                after_ms = self.started.elapsed().as_millis(),
                "recording download cut before its last byte (deadline, client gone or error)"
            );
        }
    }
}

impl DownloadBody {
    /// The next piece, or `None` at the end; an error aborts the response (a
    /// truncated transfer, never a short file that looks whole).
    async fn next(mut self) -> Option<(Result<Bytes, std::io::Error>, Self)> {
        let mut pieces = self.pieces.take()?;
        let pulled = tokio::time::timeout_at(
            self.deadline,
            tokio::task::spawn_blocking(move || {
                let piece = pieces.next_piece();
                (pieces, piece)
            }),
        )
        .await;
        let failure = match pulled {
            Ok(Ok((pieces, Ok(Some(piece))))) => {
                // Hyper may stop polling once Content-Length bytes are out.
                self.finished = pieces.is_done();
                self.pieces = Some(pieces);
                // The plaintext leaves its zeroing buffer for the socket.
                return Some((Ok(Bytes::copy_from_slice(&piece)), self));
            }
            Ok(Ok((_, Ok(None)))) => {
                self.finished = true;
                return None;
            }
            Ok(Ok((_, Err(e)))) => e.to_string(),
            Ok(Err(_)) => "the decrypting task died".to_owned(),
            Err(_) => "the download deadline passed".to_owned(),
        };
        debug!(recording = %self.recording, reason = %failure, "recording download aborted");
        Some((Err(std::io::Error::other(failure)), self))
    }
}

/// `GET` on a signed link: the decrypted WAV, streamed (nothing written to
/// disk). No bearer token: the link is the authorisation. Audited
/// `recording-export` with the actor the link was issued to.
///
/// At most `max_downloads_per_tenant` run at once for the recording's
/// tenant (429 with `Retry-After` beyond); each must end within
/// `download_deadline_s`, after which its connection is closed whether or
/// not the client reads.
async fn download(
    State(state): State<AdminState>,
    Path(id): Path<String>,
    extensions: axum::http::Extensions,
    q: Result<Query<DownloadQuery>, QueryRejection>,
) -> ApiResult<Response> {
    let q = q.map_err(|_| ApiError::Link(LinkError::Tampered))?.0;
    let now = now_ms();
    let now_s = u64::try_from(now / 1000).unwrap_or(0);
    state
        .api
        .links
        .verify(&id, &q.by, q.expires, &q.sig, now_s)?;
    let settings = state.api.settings();
    let deadline = tokio::time::Instant::now() + settings.download_deadline;
    let max = settings.max_downloads_per_tenant;
    let slots = Arc::clone(&state.api.downloads);
    let link_tenant = q.by.strip_prefix("admin-api:tenant:").map(str::to_owned);
    let (rec, slot, key, fetch) = state
        .api
        .with_store(move |ds| {
            let rec = ds
                .store
                .get_recording(link_tenant.as_deref(), &id)?
                .ok_or(ApiError::NotFound)?;
            downloadable(&rec)?;
            let slot = slots.take(&rec.tenant, max).ok_or_else(|| {
                info!(tenant = %rec.tenant, max, "recording download refused: the tenant's downloads are at their cap");
                ApiError::TooManyDownloads
            })?;
            let key = ds.keyring.load(&rec.tenant).map_err(|e| ApiError::Ops(e.into()))?;
            let fetch = ds.objects().map(|o| (Arc::clone(o), ds.var_dir().to_path_buf()));
            Ok((rec, slot, key, fetch))
        })
        .await?;
    // Authenticating the whole file reads all of it: off the API's store
    // connection, which other requests share. A recording in the bucket and
    // no longer in this node's spool is fetched first (ciphertext, into an
    // anonymous file), then decrypted chunk by chunk like a local one.
    let (path, whole) = (rec.path.clone(), rec.state == RecordingState::Complete);
    let stream = tokio::task::spawn_blocking(move || {
        let file = match &fetch {
            Some((objects, tmp)) => objects
                .open_sealed(&path, tmp)
                .map_err(|e| ops::object_error(&path, e))?,
            None => std::fs::File::open(&path)
                .map_err(|e| OpsError::from(crate::store::recording::RecordingError::Io(e)))?,
        };
        WavStream::from_file(file, key, whole).map_err(OpsError::from)
    })
    .await
    .map_err(|_| ApiError::Internal)?
    .map_err(ApiError::Ops)?;
    let (audited, actor) = (rec.clone(), q.by);
    state
        .api
        .with_store(move |ds| {
            // Audited before the first byte: no unaudited plaintext leaves.
            ds.store.audit(&AuditEntry {
                at: now,
                actor: &actor,
                action: AuditAction::RecordingExport,
                object_kind: ObjectKind::Recording,
                object_id: &audited.id,
                tenant: &audited.tenant,
                reason: "downloaded through a signed admin API link",
            })?;
            Ok(())
        })
        .await?;
    info!(recording = %rec.id, tenant = %rec.tenant, frames = stream.frames(), "recording download started");
    let len = stream.len();
    let pieces = stream.into_pieces().map_err(|e| ApiError::Ops(e.into()))?;
    // The connection is this download's alone (`Connection: close`), so its
    // write deadline is the download's.
    if let Some(axum::extract::ConnectInfo(conn)) =
        extensions.get::<axum::extract::ConnectInfo<super::conn::ConnDeadline>>()
    {
        conn.set(deadline);
    }
    let body = DownloadBody {
        pieces: Some(pieces),
        deadline,
        recording: rec.id.clone(),
        finished: false,
        started: std::time::Instant::now(),
        _slot: slot,
    };
    let body = Body::from_stream(futures_util::stream::unfold(body, DownloadBody::next));
    let headers = [
        (header::CONTENT_TYPE, "audio/wav".to_owned()),
        (header::CONTENT_LENGTH, len.to_string()),
        (
            header::CONTENT_DISPOSITION,
            format!("attachment; filename=\"{}.wav\"", rec.id),
        ),
        (header::CACHE_CONTROL, "no-store".to_owned()),
        (header::CONNECTION, "close".to_owned()),
    ];
    Ok((headers, body).into_response())
}

// ---- transcripts ---------------------------------------------------------------

async fn transcript(
    State(state): State<AdminState>,
    principal: Principal,
    Path(call_id): Path<String>,
) -> ApiResult<axum::Json<Value>> {
    let tenant = scope(&principal, None)?;
    state
        .api
        .with_store(move |ds| {
            let call = ds
                .store
                .call_by_id(tenant.as_deref(), &call_id)?
                .ok_or(ApiError::NotFound)?;
            let segments = ops::call_transcripts(ds, &call.tenant, &call.call_id)?;
            Ok(axum::Json(json!({
                "call_id": call.call_id,
                "tenant": call.tenant,
                "segments": segments,
            })))
        })
        .await
}

// ---- retention -----------------------------------------------------------------

fn kind_name(k: ItemKind) -> &'static str {
    match k {
        ItemKind::Recording => "recording",
        ItemKind::Transcript => "transcript",
        ItemKind::Call => "call",
    }
}

fn expiry_json(e: &Expiry) -> Value {
    json!({
        "kind": kind_name(e.item.kind),
        "id": e.item.id,
        "tenant": e.item.tenant,
        "created_at": format_time(e.item.created_at),
        "expires_at": format_time(e.reason.expires_at),
        "policy": { "field": e.reason.field, "days": e.reason.days },
    })
}

/// What a sweep at `now` would do to `items` (one tenant's, or every
/// tenant's for the admin), under the policies in force.
fn dry_run(
    api: &Api,
    items: &[crate::store::retention::RetentionItem],
    now: UnixMs,
) -> crate::store::retention::Selection {
    let policies = api.settings().retention.clone();
    let policy = move |t: &str| policies.get(t).copied();
    crate::store::retention::expired(now, items, &policy)
}

fn bump(v: &mut Value) {
    *v = json!(v.as_u64().unwrap_or(0) + 1);
}

/// The status object of tenant `t`, created with its policy and zero counts.
fn tenant_entry<'a>(
    tenants: &'a mut BTreeMap<String, Value>,
    policies: &std::collections::HashMap<String, crate::store::retention::RetentionPolicy>,
    t: &str,
) -> &'a mut Value {
    tenants.entry(t.to_owned()).or_insert_with(|| {
        json!({
            "policy": policies.get(t).map(|p| json!({
                "recordings_days": p.recordings_days,
                "transcripts_days": p.transcripts_days,
                "metadata_days": p.metadata_days,
            })),
            "stored": { "recordings": 0, "transcripts": 0, "calls": 0 },
            "legal_hold": 0,
            "due_now": 0,
        })
    })
}

/// Per tenant: its policy, what is stored, what is held, what is due now.
async fn retention_status(
    State(state): State<AdminState>,
    principal: Principal,
    q: Result<Query<TenantQuery>, QueryRejection>,
) -> ApiResult<axum::Json<Value>> {
    let q = query(q)?;
    let tenant = scope(&principal, q.tenant.as_deref())?;
    let api = Arc::clone(&state.api);
    state
        .api
        .with_store(move |ds| {
            let now = now_ms();
            // A tenant's token reads only its own rows.
            let items = ds.store.retention_items_of(tenant.as_deref())?;
            let sel = dry_run(&api, &items, now);
            let policies = api.settings().retention.clone();
            let mut tenants: BTreeMap<String, Value> = BTreeMap::new();
            let visible = |t: &str| tenant.as_deref().is_none_or(|s| s == t);
            for t in policies.keys().filter(|t| visible(t)) {
                tenant_entry(&mut tenants, &policies, t);
            }
            for i in items.iter().filter(|i| visible(&i.tenant)) {
                let e = tenant_entry(&mut tenants, &policies, &i.tenant);
                let key = match i.kind {
                    ItemKind::Recording => "recordings",
                    ItemKind::Transcript => "transcripts",
                    ItemKind::Call => "calls",
                };
                bump(&mut e["stored"][key]);
                if i.legal_hold {
                    bump(&mut e["legal_hold"]);
                }
            }
            for x in &sel.expired {
                bump(&mut tenant_entry(&mut tenants, &policies, &x.item.tenant)["due_now"]);
            }
            Ok(axum::Json(json!({
                "now": format_time(now),
                "sweep_interval_s": 3600,
                "tenants": tenants,
            })))
        })
        .await
}

/// What a retention run would delete now (nothing is deleted).
async fn retention_dry_run(
    State(state): State<AdminState>,
    principal: Principal,
    q: Result<Query<TenantQuery>, QueryRejection>,
) -> ApiResult<axum::Json<Value>> {
    let q = query(q)?;
    let tenant = scope(&principal, q.tenant.as_deref())?;
    let api = Arc::clone(&state.api);
    state
        .api
        .with_store(move |ds| {
            let now = now_ms();
            let items = ds.store.retention_items_of(tenant.as_deref())?;
            let sel = dry_run(&api, &items, now);
            Ok(axum::Json(json!({
                "now": format_time(now),
                "would_delete": sel.expired.iter().map(expiry_json).collect::<Vec<_>>(),
                "held": sel.held.iter().map(expiry_json).collect::<Vec<_>>(),
                "unknown_tenants": sel.unknown_tenants,
            })))
        })
        .await
}

// ---- erase and export ------------------------------------------------------------

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct EraseRequest {
    tenant: String,
    caller: Option<String>,
    call: Option<String>,
    #[serde(default)]
    all: bool,
    reason: String,
}

/// `sipbridge erase` over HTTP: the same `ops::erase`, audited per object
/// with the API's actor.
async fn erase(
    State(state): State<AdminState>,
    principal: Principal,
    bytes: Bytes,
) -> ApiResult<axum::Json<Value>> {
    let req: EraseRequest =
        serde_json::from_slice(&bytes).map_err(|e| ApiError::BadRequest(format!("body: {e}")))?;
    let target = match (req.caller, req.call, req.all) {
        (Some(n), None, false) => EraseTarget::Caller(n),
        (None, Some(c), false) => EraseTarget::Call(c),
        (None, None, true) => EraseTarget::All,
        _ => {
            return Err(ApiError::BadRequest(
                "give exactly one of caller, call, all".into(),
            ));
        }
    };
    if req.reason.trim().is_empty() {
        return Err(ApiError::BadRequest("reason must not be empty".into()));
    }
    if !principal.sees(&req.tenant) {
        return Err(ApiError::NotFound);
    }
    let tenant = req.tenant;
    let reason = req.reason;
    state
        .api
        .with_store(move |ds| {
            let s = ops::erase(ds, &tenant, &target, &principal.actor(), &reason, now_ms())?;
            info!(%tenant, actor = %principal.actor(), calls = s.calls.len(),
                recordings = s.recordings.len(), "erased through the admin API");
            Ok(axum::Json(json!({
                "tenant": tenant,
                "calls": s.calls,
                "recordings": s.recordings.iter().map(|r| &r.id).collect::<Vec<_>>(),
                "transcripts": s.transcripts,
                "held": s.held,
            })))
        })
        .await
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct ExportRequest {
    tenant: String,
    caller: String,
    /// Lifetime of the recordings' download links (default 300 s).
    ttl_s: Option<u64>,
}

/// `sipbridge export` over HTTP: the same `ops::collect_export`, answered as
/// JSON with a signed download link per recording instead of WAV files.
async fn export(
    State(state): State<AdminState>,
    principal: Principal,
    bytes: Bytes,
) -> ApiResult<axum::Json<Value>> {
    let req: ExportRequest =
        serde_json::from_slice(&bytes).map_err(|e| ApiError::BadRequest(format!("body: {e}")))?;
    if !principal.sees(&req.tenant) {
        return Err(ApiError::NotFound);
    }
    let ttl_s = req.ttl_s.unwrap_or(DEFAULT_TTL_S).max(1);
    let api = Arc::clone(&state.api);
    state
        .api
        .with_store(move |ds| {
            let now = now_ms();
            let bundle = ops::collect_export(ds, &req.tenant, &req.caller)?;
            ops::audit_export(
                ds,
                &req.tenant,
                &bundle,
                &principal.actor(),
                "data export through the admin API",
                now,
            )?;
            let links = bundle
                .recordings
                .iter()
                .map(|r| issue_link(&api, ds, &principal, r, ttl_s, now))
                .collect::<ApiResult<Vec<_>>>()?;
            Ok(axum::Json(json!({
                "tenant": req.tenant,
                "calls": bundle.calls,
                "transcripts": bundle.transcripts,
                "recordings": links,
                "still_recording": bundle.still_recording,
            })))
        })
        .await
}

// ---- reload --------------------------------------------------------------------

/// Runs the daemon's reload; audited whatever the outcome.
/// Most bans one `GET /v1/security/bans` lists.
const MAX_BANS_LISTED: usize = 1000;

/// The SIP ban list (admin token only): each banned source, why, and the
/// seconds left (rounded up).
async fn list_bans(
    State(state): State<AdminState>,
    principal: Principal,
) -> ApiResult<axum::Json<Value>> {
    admin_only(&principal)?;
    let bans: Vec<Value> = state
        .control
        .bans(MAX_BANS_LISTED)
        .into_iter()
        .map(|b| {
            json!({
                "source": b.source.to_string(),
                "reason": b.reason.as_str(),
                "expires_in_s": b.remaining.as_millis().div_ceil(1000),
            })
        })
        .collect();
    Ok(axum::Json(json!({ "bans": bans })))
}

async fn reload(
    State(state): State<AdminState>,
    principal: Principal,
) -> ApiResult<axum::Json<Value>> {
    admin_only(&principal)?;
    let outcome = Arc::clone(&state.control).reload().await;
    let reason = match &outcome {
        Ok(_) => "reloaded".to_owned(),
        Err(ReloadError::Invalid(d)) => format!("rejected: {} diagnostic(s)", d.len()),
        Err(why) => format!("not done: {why}"),
    };
    info!(actor = %principal.actor(), outcome = %reason, "reload requested through the admin API");
    let actor = principal.actor();
    state
        .api
        .with_store(move |ds| {
            ds.store.audit(&AuditEntry {
                at: now_ms(),
                actor: &actor,
                action: AuditAction::Reload,
                object_kind: ObjectKind::Config,
                object_id: "sip-profiles",
                tenant: "",
                reason: &reason,
            })?;
            Ok(())
        })
        .await?;
    // The summary as JSON, returned to the client as is.
    Ok(axum::Json(
        serde_json::to_value(outcome?).unwrap_or_default(),
    ))
}

// ---- audit log -------------------------------------------------------------------

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct AuditQuery {
    tenant: Option<String>,
    action: Option<String>,
    object_id: Option<String>,
    since: Option<String>,
    limit: Option<u32>,
    cursor: Option<String>,
}

async fn audit_log(
    State(state): State<AdminState>,
    principal: Principal,
    q: Result<Query<AuditQuery>, QueryRejection>,
) -> ApiResult<axum::Json<Value>> {
    let q = query(q)?;
    let action = q
        .action
        .as_deref()
        .map(|a| {
            AuditAction::parse(a)
                .ok_or_else(|| ApiError::BadRequest(format!("unknown action {a:?}")))
        })
        .transpose()?;
    let after_id = q
        .cursor
        .as_deref()
        .map(|c| {
            c.parse::<i64>()
                .map_err(|_| ApiError::BadRequest("cursor: not one this API issued".into()))
        })
        .transpose()?;
    let filter = AuditFilter {
        tenant: scope(&principal, q.tenant.as_deref())?,
        action,
        object_id: q.object_id,
        since: time_param("since", q.since.as_deref())?,
        after_id,
        limit: Some(limit_param(q.limit)?),
    };
    state
        .api
        .with_store(move |ds| {
            let rows = ds.store.audit_log(&filter)?;
            let next = (Some(rows.len() as u32) == filter.limit)
                .then(|| rows.last().map(|r| r.id.to_string()))
                .flatten();
            let items: Vec<Value> = rows
                .iter()
                .map(|r| {
                    json!({
                        "id": r.id,
                        "at": format_time(r.at),
                        "at_ms": r.at,
                        "actor": r.actor,
                        "action": r.action.as_str(),
                        "object_kind": r.object_kind.as_str(),
                        "object_id": r.object_id,
                        "tenant": r.tenant,
                        "reason": r.reason,
                    })
                })
                .collect();
            Ok(axum::Json(json!({ "entries": items, "next_cursor": next })))
        })
        .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn error_bodies_do_not_echo_caller_numbers() {
        // What serde says of `{"tenant":"demo","caller":15559998888,…}`.
        let e = serde_json::from_slice::<EraseRequest>(
            br#"{"tenant":"demo","caller":15559998888,"reason":"x"}"#,
        )
        .map_err(|e| ApiError::BadRequest(format!("body: {e}")))
        .unwrap_err();
        assert!(e.to_string().contains("15559998888"), "{e}");
        let resp = e.into_response();
        assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
        let body = axum::body::to_bytes(resp.into_body(), 1 << 16)
            .await
            .unwrap();
        let body = String::from_utf8(body.to_vec()).unwrap();
        assert!(!body.contains("5559998888"), "{body}");
        assert!(body.contains("15559•••88"), "{body}");
    }

    /// `(method, path)` of every `.route(…)` in the admin module's sources.
    fn routes_in_source() -> Vec<(String, String)> {
        let mut out = Vec::new();
        for src in [
            include_str!("api.rs"),
            include_str!("mod.rs"),
            include_str!("twilio_rest.rs"),
        ] {
            for line in src.lines() {
                let line = line.trim();
                let Some(rest) = line.strip_prefix(".route(\"") else {
                    continue;
                };
                let Some((path, handler)) = rest.split_once("\", ") else {
                    continue;
                };
                let method = handler.split('(').next().unwrap_or_default();
                // A catch-all `{*name}` is written `{name}` in OpenAPI.
                let path = path.replace("{*", "{");
                out.push((method.to_owned(), path.clone()));
                // Chained methods: `get(a).post(b).delete(c)`.
                for chained in ["get", "post", "put", "patch", "delete"] {
                    if handler.contains(&format!(").{chained}(")) {
                        out.push((chained.to_owned(), path.clone()));
                    }
                }
            }
        }
        out
    }

    #[test]
    fn every_route_is_in_the_openapi_file() {
        let yaml = include_str!("../../docs/admin-api.openapi.yaml");
        let routes = routes_in_source();
        assert!(routes.len() >= 18, "{routes:?}");
        for (method, path) in routes {
            let start = yaml
                .find(&format!("\n  {path}:\n"))
                .unwrap_or_else(|| panic!("{path} missing from the OpenAPI file"));
            let section = &yaml[start + 1..];
            let end = section[1..].find("\n  /").map_or(section.len(), |e| e + 1);
            assert!(
                section[..end].contains(&format!("\n    {method}:\n")),
                "{method} {path} missing from the OpenAPI file"
            );
        }
    }

    #[test]
    fn download_slots_cap_each_tenant_and_free_on_drop() {
        let slots = Arc::new(DownloadSlots::default());
        let a1 = slots.take("acme", 2).unwrap();
        let a2 = slots.take("acme", 2).unwrap();
        assert!(slots.take("acme", 2).is_none(), "acme is at its cap");
        // Another tenant has its own.
        let b1 = slots.take("beta", 2).unwrap();
        drop(a1);
        let a3 = slots.take("acme", 2).unwrap();
        // A lower cap after a reload applies to new downloads at once.
        assert!(slots.take("acme", 1).is_none());
        drop((a2, a3, b1));
        assert!(slots.running.lock().unwrap().is_empty());
        assert_eq!(ApiError::TooManyDownloads.status().as_u16(), 429);
        let resp = ApiError::TooManyDownloads.into_response();
        assert_eq!(resp.headers().get(header::RETRY_AFTER).unwrap(), "5");
    }

    #[test]
    fn cdr_cursors_round_trip_and_reject_junk() {
        let c = cdr_cursor(1_700_000_000_123, "abc:def@host");
        assert_eq!(
            parse_cdr_cursor(&c).unwrap(),
            (1_700_000_000_123, "abc:def@host".to_owned())
        );
        for bad in ["", "!!", &CURSOR.encode("nocolon"), &CURSOR.encode("x:y")] {
            assert!(
                matches!(parse_cdr_cursor(bad), Err(ApiError::BadRequest(_))),
                "{bad}"
            );
        }
    }

    #[test]
    fn statuses_follow_the_table() {
        let s = |e: ApiError| e.status().as_u16();
        assert_eq!(s(ApiError::Unauthorized), 401);
        assert_eq!(s(ApiError::Link(LinkError::Expired)), 403);
        assert_eq!(s(ApiError::Link(LinkError::Tampered)), 403);
        assert_eq!(s(ApiError::AdminOnly), 403);
        assert_eq!(s(ApiError::Reload(ReloadError::Draining)), 409);
        assert_eq!(
            s(ApiError::Reload(ReloadError::NeedsRestart("x".into()))),
            409
        );
        assert_eq!(s(ApiError::Reload(ReloadError::Invalid(vec![]))), 422);
        assert_eq!(
            ApiError::Reload(ReloadError::Invalid(vec!["a".into()])).to_string(),
            "configuration invalid; the running configuration stays"
        );
        assert_eq!(
            ApiError::Reload(ReloadError::Draining).to_string(),
            "the daemon is draining; reload refused"
        );
        assert_eq!(
            s(ApiError::from(DbError::TenantMismatch {
                tenant: "a".into(),
                call_id: "c".into()
            })),
            404
        );
        assert_eq!(s(ApiError::Ops(OpsError::StillRecording("r".into()))), 409);
        assert_eq!(
            s(ApiError::Ops(OpsError::RecordingDeleted("r".into()))),
            410
        );
        let resp = ApiError::Unauthorized.into_response();
        assert_eq!(
            resp.headers().get(header::WWW_AUTHENTICATE).unwrap(),
            "Bearer realm=\"sipbridge-admin\""
        );
    }
}
