//! The admin HTTP surface (DESIGN §5): health and readiness for operators and
//! load balancers, the authenticated `/v1` API (live calls, CDRs, recordings
//! and their signed download links, transcripts, retention, erasure, export,
//! reload, audit log) and the router `/metrics` mounts on.
//!
//! Owns: the admin listener (`[profile.admin] listen`, 127.0.0.1 in every
//! shipped profile), its axum router, bearer-token checks (`auth`), link
//! signing (`links`) and the handlers (`api`). Must not hold protocol state:
//! it reads the daemon's [`Shared`] and asks call tasks to act through their
//! mailboxes, like the SIP listeners do. Stored data is read and changed only
//! through `store::ops` and `store::db` on the API's own SQLite connection
//! (WAL: the daemon's store thread keeps writing meanwhile). HTTP itself is
//! axum/hyper's.

mod api;
mod auth;
mod links;

use crate::config::Config;
use crate::daemon::Shared;
use crate::store::db::CallerIdPolicy;
use crate::store::ops::DataStore;
use crate::store::retention::RetentionPolicy;
use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use futures_util::future::BoxFuture;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, RwLock};
use tracing::{info, warn};

/// Why a reload did not happen.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub(crate) enum ReloadError {
    /// The new configuration is invalid; the running one stays. One line per
    /// diagnostic.
    #[error("configuration invalid; the running configuration stays")]
    Invalid(Vec<String>),
    /// This daemon cannot reload (yet), or one is already running.
    #[error("{0}")]
    Unavailable(String),
}

/// What `POST /v1/reload` runs: the daemon's reload, whatever it is. The
/// JSON value on success is returned to the client as is.
pub(crate) type ReloadFn =
    Arc<dyn Fn() -> BoxFuture<'static, Result<serde_json::Value, ReloadError>> + Send + Sync>;

/// What every handler gets.
#[derive(Clone)]
pub(crate) struct AdminState {
    pub(crate) shared: Arc<Shared>,
    pub(crate) api: Arc<Api>,
}

/// The `/v1` API's own state.
pub(crate) struct Api {
    settings: RwLock<ApiSettings>,
    /// The API's connection to the store (`None`: the daemon has no store).
    data: Option<Arc<Mutex<DataStore>>>,
    links: links::LinkSigner,
    reload: ReloadFn,
    master_key: zeroize::Zeroizing<Vec<u8>>,
}

/// What the API takes from the configuration (replaced on reload).
#[derive(Default)]
struct ApiSettings {
    tokens: auth::Tokens,
    callers: HashMap<String, CallerIdPolicy>,
    retention: HashMap<String, RetentionPolicy>,
}

impl Api {
    /// The API of `config`'s first profile: its tokens, the link key derived
    /// from `master_key`, the store connection `data` and the daemon's `reload`.
    pub(crate) fn new(
        config: &Config,
        master_key: &[u8],
        data: Option<DataStore>,
        reload: ReloadFn,
    ) -> Api {
        let api = Api {
            settings: RwLock::new(ApiSettings::default()),
            data: data.map(|d| Arc::new(Mutex::new(d))),
            links: links::LinkSigner::from_master(master_key),
            reload,
            master_key: zeroize::Zeroizing::new(master_key.to_vec()),
        };
        api.apply_config(config);
        api
    }

    /// Takes tokens, caller-id and retention policies from `config` (at
    /// start, and after a reload). The master key does not change on reload.
    pub(crate) fn apply_config(&self, config: &Config) {
        let admin_token = config
            .profiles
            .first()
            .and_then(|p| p.admin.as_ref())
            .and_then(|a| a.token.as_ref());
        let tenants = config
            .tenants
            .iter()
            .filter_map(|t| t.admin_token_sha256.map(|h| (t.id.clone(), h)))
            .collect();
        let callers: HashMap<String, CallerIdPolicy> = config
            .tenants
            .iter()
            .map(|t| {
                let p = CallerIdPolicy::for_tenant(t.hash_caller_numbers, &self.master_key, &t.id);
                (t.id.clone(), p)
            })
            .collect();
        if let Some(data) = &self.data {
            let mut ds = crate::daemon::lock(data);
            for (tenant, policy) in &callers {
                ds.store.set_caller_policy(tenant, policy.clone());
            }
        }
        let settings = ApiSettings {
            tokens: auth::Tokens::new(admin_token.map(|s| s.expose()), tenants),
            callers,
            retention: config
                .tenants
                .iter()
                .map(|t| (t.id.clone(), RetentionPolicy::from(&t.retention)))
                .collect(),
        };
        *self
            .settings
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = settings;
    }

    fn settings(&self) -> std::sync::RwLockReadGuard<'_, ApiSettings> {
        self.settings
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// A fresh bearer token (`sbt_` and the unpadded base64url of 32 random
/// bytes) and the hex SHA-256 the configuration stores for it
/// (`sipbridge admin-token`).
pub fn new_token(rng: &mut impl rand::CryptoRng) -> (String, String) {
    use base64::Engine as _;
    let mut bytes = zeroize::Zeroizing::new([0u8; 32]);
    rng.fill_bytes(bytes.as_mut());
    let token = format!(
        "sbt_{}",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes.as_ref())
    );
    let hash = hex::encode(auth::token_hash(token.as_bytes()));
    (token, hash)
}

/// The reload `daemon::run` wires until the SIGHUP path exists: it loads
/// and validates the configuration at `path` (the file, or the directory of
/// profiles, `run` was started with) and applies nothing — an invalid
/// configuration gets its diagnostics (422), a valid one 409 "reload not
/// available".
pub(crate) fn check_only_reload(path: std::path::PathBuf) -> ReloadFn {
    Arc::new(move || {
        let path = path.clone();
        Box::pin(async move {
            let loaded = tokio::task::spawn_blocking(move || crate::config::load(&path)).await;
            match loaded {
                Ok(Ok(_)) => Err(ReloadError::Unavailable(
                    "reload not available: the configuration is valid but this build cannot \
                     apply it without a restart"
                        .into(),
                )),
                Ok(Err(diags)) => Err(ReloadError::Invalid(
                    diags.items().iter().map(ToString::to_string).collect(),
                )),
                Err(_) => Err(ReloadError::Unavailable(
                    "the configuration check did not finish".into(),
                )),
            }
        })
    })
}

/// Where `config` was loaded from: the profile file, or the directory of
/// several profile files.
pub(crate) fn config_source(config: &Config) -> std::path::PathBuf {
    match config.profiles.as_slice() {
        [one] => one.file.clone(),
        many => many
            .first()
            .and_then(|p| p.file.parent())
            .map(std::path::Path::to_path_buf)
            .unwrap_or_default(),
    }
}

/// Opens the API's own store connection (the daemon's store must be open:
/// the database exists) and serves the admin router on `listen`.
pub(crate) async fn start(
    config: &Config,
    shared: Arc<Shared>,
    listen: SocketAddr,
    master_key: Option<&[u8]>,
    reload: ReloadFn,
) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    use anyhow::Context;
    let data = match (config.profiles.first(), master_key, &shared.records) {
        (Some(profile), Some(key), Some(_)) => {
            let policies = config
                .tenants
                .iter()
                .map(|t| {
                    let p = CallerIdPolicy::for_tenant(t.hash_caller_numbers, key, &t.id);
                    (t.id.clone(), p)
                })
                .collect();
            Some(
                DataStore::open(&profile.var_dir, key, policies)
                    .context("opening the admin API's store connection")?,
            )
        }
        _ => None,
    };
    let api = Api::new(config, master_key.unwrap_or_default(), data, reload);
    let router = router(AdminState {
        shared,
        api: Arc::new(api),
    });
    spawn(listen, router)
        .await
        .with_context(|| format!("binding the admin API on {listen}"))
}

/// The admin router: `/healthz`, `/readyz`, the `/v1` API and
/// [`extra_routes`].
pub(crate) fn router(state: AdminState) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .merge(api::routes())
        .with_state(state)
        .merge(extra_routes())
}

/// Routes other modules mount on the admin listener without the API's state
/// or authentication: `/metrics` goes here (`crate::metrics::render`).
fn extra_routes() -> Router {
    Router::new()
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

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn a_new_token_authenticates_against_its_printed_hash() {
        let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(1);
        let (token, hash) = new_token(&mut rng);
        assert_eq!(token.len(), 4 + 43);
        assert!(token.starts_with("sbt_"));
        let mut h = [0u8; 32];
        hex::decode_to_slice(&hash, &mut h).unwrap();
        let tokens = auth::Tokens::new(None, vec![("acme".into(), h)]);
        let header = format!("Bearer {token}");
        assert_eq!(
            tokens.check(Some(header.as_bytes())),
            Ok(auth::Principal::Tenant("acme".into()))
        );
        assert_ne!(new_token(&mut rng).0, token);
    }
}
