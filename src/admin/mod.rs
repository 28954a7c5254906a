//! The admin HTTP surface (DESIGN §5): health and readiness for operators and
//! load balancers, the authenticated `/v1` API (live calls, CDRs, recordings
//! and their signed download links, transcripts, retention, erasure, export,
//! reload, audit log), the Twilio REST subset agent frameworks hang up with
//! (`twilio_rest`) and the router `/metrics` mounts on.
//!
//! Owns: the admin listener (`[profile.admin] listen`, 127.0.0.1 in every
//! shipped profile), its axum router, bearer-token checks (`auth`), link
//! signing (`links`) and the handlers (`api`). Must not hold protocol state
//! nor import the daemon: it sees live calls, the configuration in force and
//! the reload through [`Control`] (which the daemon implements and hands to
//! [`start`]), and asks calls to act through it. Stored data is read and changed only
//! through `store::ops` and `store::db` on the API's own SQLite connection
//! (WAL: the daemon's store thread keeps writing meanwhile). Tokens and
//! policies are derived from the switchboard's configuration each time it
//! changes, so a reload moves them too. HTTP itself is axum/hyper's.

mod api;
mod auth;
mod conn;
mod links;
mod twilio_rest;

use crate::config::Config;
use crate::control::Control;
use crate::store::db::CallerIdPolicy;
use crate::store::ops::DataStore;
use crate::store::retention::RetentionPolicy;
use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, RwLock};
use tracing::{info, warn};

/// What every handler gets.
#[derive(Clone)]
pub(crate) struct AdminState {
    pub(crate) control: Arc<dyn Control>,
    pub(crate) api: Arc<Api>,
}

/// The `/v1` API's own state.
pub(crate) struct Api {
    /// The daemon; its configuration in force (`Control::config`: a reload
    /// that swaps it moves the API's tokens and policies with it, with no
    /// further wiring).
    control: Arc<dyn Control>,
    /// Settings derived from the configuration they were derived from.
    settings: RwLock<Option<(Arc<Config>, Arc<ApiSettings>)>>,
    /// The API's connection to the store (`None`: the daemon has no store).
    data: Option<Arc<Mutex<StoreConn>>>,
    links: links::LinkSigner,
    master_key: zeroize::Zeroizing<Vec<u8>>,
    /// Recording downloads running now, per tenant.
    downloads: Arc<api::DownloadSlots>,
}

/// The API's store connection and the settings whose caller-id policies it
/// was last given.
struct StoreConn {
    ds: DataStore,
    policies_of: Option<Arc<ApiSettings>>,
}

/// What the API takes from the configuration.
struct ApiSettings {
    tokens: auth::Tokens,
    /// The `/metrics` bearer token (`metrics_token`); `None`: open.
    metrics: Option<auth::Tokens>,
    callers: HashMap<String, CallerIdPolicy>,
    retention: HashMap<String, RetentionPolicy>,
    /// Tenants' Twilio-compatible accounts (`[tenant.twilio_api]`).
    twilio: Vec<twilio_rest::Account>,
    /// How long a recording download may take.
    download_deadline: std::time::Duration,
    /// Downloads of one tenant's recordings at once.
    max_downloads_per_tenant: u32,
}

impl ApiSettings {
    /// The admin token of the first profile, the tenants' token hashes,
    /// caller-id policies (keys derived from `master_key`) and retention.
    fn of(config: &Config, master_key: &[u8]) -> ApiSettings {
        let admin = config.profiles.first().and_then(|p| p.admin.as_ref());
        let admin_token = admin.and_then(|a| a.token.as_ref());
        let metrics = admin
            .and_then(|a| a.metrics_token.as_ref())
            .map(|t| auth::Tokens::new(Some(t.expose()), Vec::new()));
        let tenants = config
            .tenants
            .iter()
            .filter_map(|t| t.admin_token_sha256.map(|h| (t.id.clone(), h)))
            .collect();
        ApiSettings {
            tokens: auth::Tokens::new(admin_token.map(|s| s.expose()), tenants),
            metrics,
            callers: caller_policies(config, master_key),
            retention: config
                .tenants
                .iter()
                .map(|t| (t.id.clone(), RetentionPolicy::from(&t.retention)))
                .collect(),
            twilio: config
                .tenants
                .iter()
                .filter_map(|t| {
                    let api = t.twilio_api.as_ref()?;
                    Some(twilio_rest::Account {
                        tenant: t.id.clone(),
                        account_sid: api.account_sid.clone(),
                        token_hash: auth::token_hash(api.auth_token.expose()),
                    })
                })
                .collect(),
            download_deadline: admin.map_or(
                std::time::Duration::from_secs(u64::from(
                    crate::config::DEFAULT_DOWNLOAD_DEADLINE_S,
                )),
                |a| a.download_deadline,
            ),
            max_downloads_per_tenant: admin
                .map_or(crate::config::DEFAULT_MAX_DOWNLOADS_PER_TENANT, |a| {
                    a.max_downloads_per_tenant
                }),
        }
    }
}

fn caller_policies(config: &Config, master_key: &[u8]) -> HashMap<String, CallerIdPolicy> {
    config
        .tenants
        .iter()
        .map(|t| {
            let p = CallerIdPolicy::for_tenant(t.hash_caller_numbers, master_key, &t.id);
            (t.id.clone(), p)
        })
        .collect()
}

impl Api {
    /// The API reading the configuration in force from `control`, signing
    /// links under a key derived from `master_key`, on the store connection
    /// `data`.
    pub(crate) fn new(
        control: Arc<dyn Control>,
        master_key: &[u8],
        data: Option<DataStore>,
    ) -> Api {
        Api {
            control,
            settings: RwLock::new(None),
            data: data.map(|ds| {
                Arc::new(Mutex::new(StoreConn {
                    ds,
                    policies_of: None,
                }))
            }),
            links: links::LinkSigner::from_master(master_key),
            master_key: zeroize::Zeroizing::new(master_key.to_vec()),
            downloads: Arc::default(),
        }
    }

    /// The settings of the configuration in force, derived again only when
    /// it changed.
    fn settings(&self) -> Arc<ApiSettings> {
        let config = self.control.config();
        if let Some((of, s)) = &*self
            .settings
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            && Arc::ptr_eq(of, &config)
        {
            return Arc::clone(s);
        }
        let s = Arc::new(ApiSettings::of(&config, &self.master_key));
        *self
            .settings
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some((config, Arc::clone(&s)));
        s
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

/// Opens the API's own store connection (the daemon's store must be open:
/// the database exists) and serves the admin router on `listen`.
pub(crate) async fn start(
    config: &Config,
    control: Arc<dyn Control>,
    listen: SocketAddr,
    master_key: Option<&[u8]>,
) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    use anyhow::Context;
    let data = match (config.profiles.first(), master_key, control.has_store()) {
        (Some(profile), Some(key), true) => {
            let mut ds = DataStore::open_engine(
                &profile.var_dir,
                &profile.store.engine,
                key,
                caller_policies(config, key),
            )
            .context("opening the admin API's store connection")?;
            ds.set_objects(
                crate::store::objects::RecordingObjects::for_config(&profile.recordings)
                    .context("[profile.recordings]: the object store client")?,
            );
            Some(ds)
        }
        _ => None,
    };
    let api = Api::new(Arc::clone(&control), master_key.unwrap_or_default(), data);
    let router = router(AdminState {
        control,
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
        .route("/metrics", get(metrics))
        .merge(api::routes())
        .merge(twilio_rest::routes())
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
    if state.control.is_draining() {
        (StatusCode::SERVICE_UNAVAILABLE, "draining\n")
    } else {
        (StatusCode::OK, "ready\n")
    }
}

/// Prometheus scrape: the text exposition format 0.0.4 (`src/metrics.rs`).
/// It holds counts labelled by tenant id, code, method and kind, never a
/// call id, a number or a secret. Unauthenticated like the health endpoints
/// unless `[profile.admin] metrics_token` is set: then it asks for that
/// bearer token (401 otherwise).
async fn metrics(
    State(state): State<AdminState>,
    headers: axum::http::HeaderMap,
) -> axum::response::Response {
    use axum::response::IntoResponse as _;
    if let Some(tokens) = &state.api.settings().metrics {
        let header = headers
            .get(axum::http::header::AUTHORIZATION)
            .map(axum::http::HeaderValue::as_bytes);
        if tokens.check(header).is_err() {
            return (
                StatusCode::UNAUTHORIZED,
                [(
                    axum::http::header::WWW_AUTHENTICATE,
                    "Bearer realm=\"sipbridge-metrics\"",
                )],
                "unauthorized\n",
            )
                .into_response();
        }
    }
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        crate::metrics::render(),
    )
        .into_response()
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
    // Each request sees its connection's write deadline (`ConnectInfo`).
    let service = router.into_make_service_with_connect_info::<conn::ConnDeadline>();
    Ok(tokio::spawn(async move {
        if let Err(e) = axum::serve(conn::AdminListener(listener), service).await {
            warn!(error = %e, "admin API stopped");
        }
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    /// A daemon with no calls whose configuration a test swaps.
    struct FakeControl(Mutex<Arc<Config>>);

    impl Control for FakeControl {
        fn config(&self) -> Arc<Config> {
            Arc::clone(&self.0.lock().unwrap())
        }
        fn is_draining(&self) -> bool {
            false
        }
        fn has_store(&self) -> bool {
            false
        }
        fn live_calls(&self, _: Option<&str>) -> Vec<Arc<crate::control::LiveCall>> {
            Vec::new()
        }
        fn live_call(&self, _: &str) -> Option<Arc<crate::control::LiveCall>> {
            None
        }
        fn hang_up(
            &self,
            _: &str,
            _: crate::call::HangupCause,
        ) -> Result<(), crate::control::CommandError> {
            Err(crate::control::CommandError::Gone)
        }
        fn pause_recording(&self, _: &str, _: bool) -> Result<(), crate::control::CommandError> {
            Err(crate::control::CommandError::Gone)
        }
        fn reload(
            self: Arc<Self>,
        ) -> futures_util::future::BoxFuture<
            'static,
            Result<crate::control::ReloadSummary, crate::control::ReloadError>,
        > {
            Box::pin(async { Err(crate::control::ReloadError::Draining) })
        }
        fn bans(&self, _: usize) -> Vec<crate::call::source_gate::Ban> {
            Vec::new()
        }
        fn dial(
            self: Arc<Self>,
            _: crate::control::DialRequest,
        ) -> futures_util::future::BoxFuture<'static, Result<String, crate::control::DialError>>
        {
            Box::pin(async { Err(crate::control::DialError::NoListener) })
        }
    }

    /// A configuration whose tenant `acme` accepts `token`.
    fn config_with(dir: &std::path::Path, token: &str) -> Arc<Config> {
        let path = dir.join(format!("{token}.toml"));
        let text = format!(
            "[profile]\nname = \"p\"\nvar_dir = \"{var}\"\nmaster_key = \"env:K\"\n\
             [profile.listen]\nudp = [\"127.0.0.1:0\"]\n\n\
             [[tenant]]\nid = \"acme\"\npipeline = {{ kind = \"echo\" }}\n\
             admin_token_sha256 = \"{hash}\"\n",
            var = dir.join("var").display(),
            hash = hex::encode(auth::token_hash(token.as_bytes())),
        );
        std::fs::write(&path, text).unwrap();
        let key = "k".repeat(32);
        let env = move |name: &str| (name == "K").then(|| key.clone());
        Arc::new(crate::config::load_with_env(&path, &env).unwrap())
    }

    #[test]
    fn tokens_follow_the_configuration_in_force() {
        let dir = tempfile::tempdir().unwrap();
        let first = config_with(dir.path(), "token-one");
        let control = Arc::new(FakeControl(Mutex::new(Arc::clone(&first))));
        let api = Api::new(Arc::clone(&control) as Arc<dyn Control>, &[3u8; 32], None);
        let check = |t: &str| {
            api.settings()
                .tokens
                .check(Some(format!("Bearer {t}").as_bytes()))
        };
        let acme = Ok(auth::Principal::Tenant("acme".into()));
        assert_eq!(check("token-one"), acme);
        let cached = api.settings();
        assert!(
            Arc::ptr_eq(&cached, &api.settings()),
            "derived once per configuration"
        );
        // A reload swaps the configuration: the old token stops working.
        *control.0.lock().unwrap() = config_with(dir.path(), "token-two");
        assert_eq!(check("token-one"), Err(auth::AuthError::Unknown));
        assert_eq!(check("token-two"), acme);
        assert!(!Arc::ptr_eq(&cached, &api.settings()));
    }

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
