//! The admin HTTP surface (DESIGN §5): health and readiness for operators and
//! load balancers, and the router the admin API and `/metrics` mount on.
//!
//! Owns: the admin listener (`[profile.admin] listen`, 127.0.0.1 in every
//! shipped profile) and its axum router. Must not hold protocol state: it
//! reads the daemon's [`Shared`] and asks call tasks to act through their
//! mailboxes, like the SIP listeners do. HTTP itself is axum/hyper's.

use crate::daemon::Shared;
use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use std::net::SocketAddr;
use std::sync::Arc;
use tracing::{info, warn};

/// What every handler gets.
#[derive(Clone)]
pub(crate) struct AdminState {
    pub(crate) shared: Arc<Shared>,
}

/// The admin router: `/healthz`, `/readyz`.
pub(crate) fn router(state: AdminState) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(state)
}

/// Liveness: the process answers HTTP.
async fn healthz() -> &'static str {
    "ok\n"
}

/// Readiness: listeners bound and the store open (the listener is only
/// started then), and not draining — a draining daemon refuses new calls.
async fn readyz(State(state): State<AdminState>) -> (StatusCode, &'static str) {
    if state.shared.is_draining() {
        (StatusCode::SERVICE_UNAVAILABLE, "draining\n")
    } else {
        (StatusCode::OK, "ready\n")
    }
}

/// Prometheus scrape: the text exposition format 0.0.4 (`src/metrics.rs`).
/// Unauthenticated like the health endpoints (docs/admin-api.md): it holds
/// counts labelled by tenant id, code, method and kind, never a call id,
/// a number or a secret.
async fn metrics() -> ([(axum::http::header::HeaderName, &'static str); 1], String) {
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        crate::metrics::render(),
    )
}

/// Binds the admin listener and serves `router` on it in a new task; logs
/// `admin API listening` with the bound address (tests bind port 0).
pub(crate) async fn spawn(
    addr: SocketAddr,
    router: Router,
) -> std::io::Result<tokio::task::JoinHandle<()>> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;
    info!(addr = %local, "admin API listening");
    Ok(tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, router).await {
            warn!(error = %e, "admin API stopped");
        }
    }))
}
