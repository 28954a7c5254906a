//! The subset of Twilio's REST API that telephony agent frameworks call on the
//! calls they serve (docs/admin-api.md, "Twilio REST subset"), so a framework
//! written for Twilio Media Streams works unchanged, hang-up included:
//!
//! - `GET  /2010-04-01/Accounts/{AccountSid}/Calls/{CallSid}.json` — the call's state;
//! - `POST /2010-04-01/Accounts/{AccountSid}/Calls/{CallSid}.json` with
//!   `Status=completed` (or `canceled` before the answer) — hang up: the call's task
//!   sends BYE and its CDR says `agent-hangup`. This is what Pipecat's
//!   `TwilioFrameSerializer` does on `EndFrame` with `auto_hang_up=True`, pointed here by
//!   its `base_url`.
//!
//! `CallSid` is what Twilio mode sends as `start.callSid`: the call's SIP Call-ID
//! (percent-encoded in the path where it must be). Authentication is HTTP Basic
//! `{AccountSid}:{AuthToken}` against a tenant's `[tenant.twilio_api]`; a tenant sees
//! only its own calls, and any other call — finished, unknown or another tenant's —
//! answers Twilio's 404 with code 20404, byte-identical. Answers are shaped like
//! Twilio's (a Call resource; errors `{code, message, more_info, status}`), with the
//! caller's number in the tenant's stored form (its keyed hash when numbers are hashed).
//!
//! Written here rather than taken from a crate: no crate serves Twilio's API; this is a
//! few handlers over the daemon's live calls as `Control` shows them.

use super::AdminState;
use super::auth::token_hash;
use crate::call::HangupCause;
use crate::control::{CommandError, LiveCall};
use crate::store::db::{AuditAction, AuditEntry, ObjectKind, UnixMs, unix_ms};
use axum::Router;
use axum::extract::{Form, Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use base64::Engine as _;
use serde_json::{Value, json};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use subtle::ConstantTimeEq as _;
use tracing::{info, warn};

/// The API version Twilio's paths carry.
const API_VERSION: &str = "2010-04-01";

/// One tenant's Twilio-compatible account, as the API checks it.
#[derive(Clone)]
pub(super) struct Account {
    pub(super) tenant: String,
    pub(super) account_sid: String,
    /// SHA-256 of the auth token (compared in constant time).
    pub(super) token_hash: [u8; 32],
}

/// The Twilio REST routes (mounted on the admin listener).
pub(super) fn routes() -> Router<AdminState> {
    // `{*call}` is `{CallSid}.json`: the router has no suffix matching, and a Call-ID
    // may hold a `/`.
    Router::new()
        .route(
            "/2010-04-01/Accounts/{account_sid}/Calls/{*call}",
            get(fetch_call),
        )
        .route(
            "/2010-04-01/Accounts/{account_sid}/Calls/{*call}",
            post(update_call),
        )
}

/// A Twilio-shaped error answer.
#[derive(Debug)]
enum RestError {
    /// Missing or wrong credentials, or credentials of another account than the path's.
    Unauthorized,
    /// No such call for this account (finished, unknown or another tenant's).
    NotFound(String),
    /// A parameter this subset does not take.
    BadRequest(String),
    /// The call's mailbox is full (it is busy); try again.
    Busy,
}

impl IntoResponse for RestError {
    fn into_response(self) -> Response {
        let (status, code, message) = match self {
            RestError::Unauthorized => (StatusCode::UNAUTHORIZED, 20003, "Authenticate".to_owned()),
            RestError::NotFound(path) => (
                StatusCode::NOT_FOUND,
                20404,
                format!("The requested resource {path} was not found"),
            ),
            RestError::BadRequest(m) => (StatusCode::BAD_REQUEST, 20001, m),
            RestError::Busy => (
                StatusCode::SERVICE_UNAVAILABLE,
                20503,
                "The call is busy; try again".to_owned(),
            ),
        };
        let body = json!({
            "code": code,
            "message": message,
            "more_info": format!("https://www.twilio.com/docs/errors/{code}"),
            "status": status.as_u16(),
        });
        let mut response = (status, axum::Json(body)).into_response();
        if status == StatusCode::UNAUTHORIZED {
            response.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Basic realm=\"Twilio API\""),
            );
        }
        response
    }
}

/// The account whose Basic credentials `headers` carry, if they are right and name the
/// path's account.
fn authenticate(state: &AdminState, headers: &HeaderMap, path_sid: &str) -> Option<Account> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, encoded) = value.split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let decoded = zeroize::Zeroizing::new(
        base64::engine::general_purpose::STANDARD
            .decode(encoded.trim())
            .ok()?,
    );
    let colon = decoded.iter().position(|&b| b == b':')?;
    let (user, token) = (&decoded[..colon], &decoded[colon + 1..]);
    let presented = token_hash(token);
    let settings = state.api.settings();
    let account = settings
        .twilio
        .iter()
        .find(|a| a.account_sid.as_bytes() == user)?;
    let token_ok: bool = account.token_hash.ct_eq(&presented).into();
    (token_ok && account.account_sid == path_sid).then(|| account.clone())
}

/// `{CallSid}.json` → `CallSid` (the `.json` suffix is required, as Twilio's is for JSON).
fn call_sid(rest: &str) -> Option<&str> {
    rest.strip_suffix(".json").filter(|s| !s.is_empty())
}

/// The live call `sid` of `account`'s tenant, or Twilio's 404.
fn visible(
    state: &AdminState,
    account: &Account,
    sid: &str,
    path: &str,
) -> Result<Arc<LiveCall>, RestError> {
    state
        .control
        .live_call(sid)
        .filter(|c| c.tenant == account.tenant)
        .ok_or_else(|| RestError::NotFound(path.to_owned()))
}

/// The resource path of a call, as Twilio writes it in `uri`.
fn resource_path(account_sid: &str, call: &str) -> String {
    format!("/{API_VERSION}/Accounts/{account_sid}/Calls/{call}")
}

/// A Twilio Call resource for `c` with `status`.
fn call_json(state: &AdminState, account: &Account, c: &LiveCall, status: &str) -> Value {
    let answered = c.answered_at.load(Ordering::Relaxed);
    let from = match state.api.settings().callers.get(&c.tenant) {
        Some(policy) => policy.stored_form(&c.from).unwrap_or_default(),
        None => c.from.clone(),
    };
    let now = unix_ms(std::time::SystemTime::now());
    let ended = status == "completed" || status == "canceled";
    json!({
        "sid": c.call_id,
        "account_sid": account.account_sid,
        "api_version": API_VERSION,
        "direction": "inbound",
        "from": from,
        "from_formatted": from,
        "to": c.to,
        "to_formatted": c.to,
        "status": status,
        "date_created": rfc2822(c.started_at),
        "date_updated": rfc2822(now),
        "start_time": (answered > 0).then(|| rfc2822(answered)),
        "end_time": ended.then(|| rfc2822(now)),
        "duration": (ended && answered > 0).then(|| ((now - answered).max(0) / 1000).to_string()),
        "parent_call_sid": null,
        "answered_by": null,
        "caller_name": null,
        "forwarded_from": null,
        "price": null,
        "price_unit": "USD",
        "uri": format!("{}.json", resource_path(&account.account_sid, &c.call_id)),
        "subresource_uris": {},
    })
}

/// `ringing` before the answer, `in-progress` after.
fn live_status(c: &LiveCall) -> &'static str {
    if c.answered_at.load(Ordering::Relaxed) > 0 {
        "in-progress"
    } else {
        "ringing"
    }
}

async fn fetch_call(
    State(state): State<AdminState>,
    Path((account_sid, rest)): Path<(String, String)>,
    headers: HeaderMap,
) -> Result<axum::Json<Value>, RestError> {
    let account = authenticate(&state, &headers, &account_sid).ok_or_else(|| {
        warn!("twilio REST: request refused (credentials)");
        RestError::Unauthorized
    })?;
    let path = resource_path(&account_sid, &rest);
    let sid = call_sid(&rest).ok_or_else(|| RestError::NotFound(path.clone()))?;
    let info = visible(&state, &account, sid, &path)?;
    Ok(axum::Json(call_json(
        &state,
        &account,
        &info,
        live_status(&info),
    )))
}

async fn update_call(
    State(state): State<AdminState>,
    Path((account_sid, rest)): Path<(String, String)>,
    headers: HeaderMap,
    Form(params): Form<Vec<(String, String)>>,
) -> Result<axum::Json<Value>, RestError> {
    let account = authenticate(&state, &headers, &account_sid).ok_or_else(|| {
        warn!("twilio REST: request refused (credentials)");
        RestError::Unauthorized
    })?;
    let path = resource_path(&account_sid, &rest);
    let sid = call_sid(&rest).ok_or_else(|| RestError::NotFound(path.clone()))?;
    let mut status = None;
    for (name, value) in &params {
        match name.as_str() {
            "Status" => status = Some(value.as_str()),
            other => {
                return Err(RestError::BadRequest(format!(
                    "Parameter {} is not supported by this Twilio-compatible API",
                    other.escape_debug()
                )));
            }
        }
    }
    let info = visible(&state, &account, sid, &path)?;
    let answered = info.answered_at.load(Ordering::Relaxed) > 0;
    let ends = match status {
        Some("completed") => true,
        // Twilio: `canceled` ends a call that is not yet answered, and does nothing to one
        // in progress.
        Some("canceled") => !answered,
        Some(other) => {
            return Err(RestError::BadRequest(format!(
                "Status {} is not one of completed, canceled",
                other.escape_debug()
            )));
        }
        None => false,
    };
    if !ends {
        return Ok(axum::Json(call_json(
            &state,
            &account,
            &info,
            live_status(&info),
        )));
    }
    match state.control.hang_up(sid, HangupCause::AgentHangup) {
        Ok(()) => {}
        Err(CommandError::Gone) => return Err(RestError::NotFound(path)),
        Err(CommandError::Busy) => return Err(RestError::Busy),
    }
    let actor = format!("twilio-api:tenant:{}", account.tenant);
    info!(call_id = %crate::logging::wire(&info.call_id), %actor, "hang-up requested through the Twilio REST API");
    let (tenant, id) = (info.tenant.clone(), info.call_id.clone());
    let audit = state
        .api
        .with_store(move |ds| {
            ds.store.audit(&AuditEntry {
                at: unix_ms(std::time::SystemTime::now()),
                actor: &actor,
                action: AuditAction::CallHangup,
                object_kind: ObjectKind::Call,
                object_id: &id,
                tenant: &tenant,
                reason: "hung up through the Twilio REST API",
            })?;
            Ok(())
        })
        .await;
    if let Err(e) = audit {
        // The call is ending either way; a daemon without a store has no audit log.
        warn!(error = %e, "twilio REST: hang-up not audited");
    }
    let status = if answered { "completed" } else { "canceled" };
    Ok(axum::Json(call_json(&state, &account, &info, status)))
}

/// RFC 2822 date as Twilio writes it: `Thu, 03 Dec 2026 14:22:04 +0000`.
fn rfc2822(ms: UnixMs) -> String {
    const DAYS: [&str; 7] = ["Thu", "Fri", "Sat", "Sun", "Mon", "Tue", "Wed"];
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    // `format_time` gives `YYYY-MM-DDTHH:MM:SSZ`; reuse its calendar.
    let iso = crate::store::ops::format_time(ms);
    let field = |r: std::ops::Range<usize>| iso.get(r).unwrap_or("0").to_owned();
    let month: usize = field(5..7).parse().unwrap_or(1);
    let weekday = DAYS[ms.div_euclid(86_400_000).rem_euclid(7) as usize];
    format!(
        "{weekday}, {} {} {} {} +0000",
        field(8..10),
        MONTHS[month.clamp(1, 12) - 1],
        field(0..4),
        field(11..19)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates_are_written_as_twilio_writes_them() {
        assert_eq!(rfc2822(0), "Thu, 01 Jan 1970 00:00:00 +0000");
        // 2026-12-03T14:22:04Z was a Thursday.
        assert_eq!(
            rfc2822(1_796_307_724_000),
            "Thu, 03 Dec 2026 14:22:04 +0000"
        );
        assert_eq!(rfc2822(951_782_400_000), "Tue, 29 Feb 2000 00:00:00 +0000");
    }

    #[test]
    fn the_call_sid_is_the_path_before_dot_json() {
        assert_eq!(call_sid("abc@127.0.0.1.json"), Some("abc@127.0.0.1"));
        assert_eq!(call_sid("a/b.json"), Some("a/b"));
        assert_eq!(call_sid("abc"), None);
        assert_eq!(call_sid(".json"), None);
    }
}
