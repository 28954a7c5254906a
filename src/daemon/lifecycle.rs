//! The daemon's lifecycle (issue 7, DESIGN §5): signals, systemd
//! notifications, configuration reload and the SIGTERM drain.
//!
//! Owns the main loop [`serve`] that runs once the listeners are bound and
//! the store is open, [`reload`] (SIGHUP; the admin API reaches the same
//! function through `control::Control`), and the shutdown sequence. Must not touch call state: it talks
//! to calls only through their mailboxes (`CallCommand::HangUp`) and to the
//! switchboard through `reconfigure`/`start_draining`.
//!
//! Notifications go through the `sd-notify` crate (a datagram to
//! `$NOTIFY_SOCKET`; nothing is sent when it is unset):
//! - `READY=1` + `STATUS=` once serving; `STATUS=` again when the number of
//!   live calls changes;
//! - `WATCHDOG=1` every half `$WATCHDOG_USEC`, from this loop and only after
//!   it could take the switchboard and call-table locks and saw every
//!   listener task alive, so a stalled or deadlocked daemon stops pinging;
//! - `RELOADING=1` + `MONOTONIC_USEC=` when a reload starts, `READY=1` when it
//!   is done (applied or rejected);
//! - `STOPPING=1` on SIGTERM/SIGINT.
//!
//! Signals: SIGHUP reloads. SIGTERM drains: new INVITEs get 503 with
//! Retry-After and OPTIONS 503, live calls go on until they end or
//! `[profile] drain_grace_s` passes, then get BYE. SIGINT, or a second
//! SIGTERM, ends the calls with BYE at once. Either way the transcripts the
//! ended calls' pipelines still send are awaited (bounded), the store is
//! finalised (open recordings finished, CDRs closed, transcripts written) and
//! the exit status is 0.

use super::transport::{self, Listener};
use super::{CallCommand, Shared, lock};
use crate::call::{HangupCause, TransportKind};
use crate::control::{ReloadError, ReloadSummary};
use rand::SeedableRng;
use rand::rngs::StdRng;
use sd_notify::NotifyState;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio::signal::unix::{Signal, SignalKind, signal};
use tokio::time::Instant;
use tracing::{debug, error, info, warn};

/// How long the shutdown waits for the BYEs of live calls to be answered.
const BYE_GRACE: Duration = Duration::from_secs(5);

/// How long the shutdown waits for TCP peers to close their connections.
const TCP_CLOSE_GRACE: Duration = Duration::from_secs(1);

/// How long the shutdown waits, after the last call ended, for the
/// transcripts its pipeline still sends while closing (Deepgram's last
/// Results after `CloseStream` come within its close wait).
const TRANSCRIPT_GRACE: Duration =
    Duration::from_secs(crate::pipeline::deepgram::CLOSE_WAIT.as_secs() + 1);

/// Added to systemd's stop timeout on drain beyond the grace and the waits.
const STOP_MARGIN: Duration = Duration::from_secs(10);

/// How often the loop looks at the number of live calls (STATUS, drain end).
const STATUS_TICK: Duration = Duration::from_millis(100);

/// Lifecycle state kept in [`Shared`].
pub(crate) struct Life {
    /// The profile file `run` was started with; a reload reads it again.
    config_path: PathBuf,
    /// Held for the whole of a reload, so reloads never interleave.
    state: tokio::sync::Mutex<Serving>,
}

/// What a reload changes besides the switchboard.
#[derive(Default)]
struct Serving {
    /// In the profile's order: UDP addresses, then TCP.
    listeners: Vec<Listener>,
    /// SHA-256 of the master key the store was opened with.
    master_key: Option<[u8; 32]>,
}

impl Life {
    pub(crate) fn new(config_path: &Path) -> Life {
        Life {
            config_path: config_path.to_owned(),
            state: tokio::sync::Mutex::new(Serving::default()),
        }
    }

    /// Hands over the started listeners and the fingerprint of the store's
    /// master key ([`fingerprint`]).
    pub(crate) async fn started(&self, listeners: Vec<Listener>, master_key: Option<[u8; 32]>) {
        let mut state = self.state.lock().await;
        state.listeners = listeners;
        state.master_key = master_key;
    }
}

/// SHA-256 of a master key: what a reload compares (the key itself is not kept).
pub(crate) fn fingerprint(key: &[u8]) -> [u8; 32] {
    use sha2::Digest;
    sha2::Sha256::digest(key).into()
}

/// Sends notifications to the service manager. A failure is logged, never
/// fatal: the daemon works the same without systemd.
fn notify(states: &[NotifyState<'_>]) {
    if let Err(e) = sd_notify::notify(states) {
        debug!(error = %e, "sd_notify failed");
    }
}

/// The `STATUS=` line: live calls, and whether the daemon is draining.
fn status_text(calls: usize, draining: bool) -> String {
    let noun = if calls == 1 { "call" } else { "calls" };
    if draining {
        format!("draining: {calls} active {noun}")
    } else {
        format!("serving: {calls} active {noun}")
    }
}

/// Calls admitted and not ended yet (an ended call's task may linger a while
/// to absorb retransmissions; it is not counted).
fn active_calls(shared: &Shared) -> usize {
    lock(&shared.switchboard).active_calls()
}

fn current_status(shared: &Shared) -> String {
    let sb = lock(&shared.switchboard);
    status_text(sb.active_calls(), sb.is_draining())
}

/// The signals the daemon acts on, installed before anything else starts so
/// an early SIGTERM is queued rather than fatal.
pub(crate) struct Signals {
    term: Signal,
    int: Signal,
    hup: Signal,
}

impl Signals {
    pub(crate) fn install() -> anyhow::Result<Signals> {
        let install = |kind, name| {
            signal(kind).map_err(|e| anyhow::anyhow!("installing the {name} handler: {e}"))
        };
        Ok(Signals {
            term: install(SignalKind::terminate(), "SIGTERM")?,
            int: install(SignalKind::interrupt(), "SIGINT")?,
            hup: install(SignalKind::hangup(), "SIGHUP")?,
        })
    }
}

/// Where the main loop is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Serving,
    /// SIGTERM: new calls refused; live calls end on their own until this.
    Draining {
        until: Instant,
    },
}

/// Whether the daemon may tell the watchdog it is alive: the locks every
/// datagram needs can be taken and no listener task has died.
fn healthy(shared: &Shared) -> bool {
    drop(lock(&shared.switchboard));
    drop(lock(&shared.calls));
    match shared.life.state.try_lock() {
        Ok(state) => !state.listeners.iter().any(Listener::failed),
        // A reload holds it for a moment; the listeners are looked at next time.
        Err(_) => true,
    }
}

/// The main loop, from READY to the end of the shutdown: signals, watchdog,
/// status, drain. Returns once every call has ended and the store is final.
pub(crate) async fn serve(shared: &Arc<Shared>, mut signals: Signals) {
    let mut status = current_status(shared);
    notify(&[NotifyState::Ready, NotifyState::Status(&status)]);
    info!(status = %status, "ready");

    let watchdog = sd_notify::watchdog_enabled().filter(|d| !d.is_zero());
    let mut watchdog_tick = watchdog.map(|d| {
        let mut t = tokio::time::interval(d / 2);
        t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        t
    });
    if let Some(d) = watchdog {
        info!(
            watchdog_ms = d.as_millis() as u64,
            "systemd watchdog enabled"
        );
    }
    let mut status_tick = tokio::time::interval(STATUS_TICK);
    let mut phase = Phase::Serving;
    let mut was_healthy = true;
    loop {
        let watchdog_due = async {
            match &mut watchdog_tick {
                Some(t) => {
                    t.tick().await;
                }
                None => std::future::pending().await,
            }
        };
        let grace_over = async {
            match phase {
                Phase::Draining { until } => tokio::time::sleep_until(until).await,
                Phase::Serving => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = signals.term.recv() => match phase {
                Phase::Serving => {
                    // The grace of the configuration in force (a reload may have changed it).
                    let grace = {
                        let mut sb = lock(&shared.switchboard);
                        sb.start_draining();
                        sb.config()
                            .profiles
                            .first()
                            .map_or(crate::config::DEFAULT_DRAIN_GRACE, |p| p.drain_grace)
                    };
                    // systemd's stop timeout must outlast the grace plus the
                    // BYE and TCP waits after it, whatever TimeoutStopSec= says.
                    let stop_within =
                        grace + BYE_GRACE + TCP_CLOSE_GRACE + TRANSCRIPT_GRACE
                            + super::webhooks::SHUTDOWN_GRACE
                            + STOP_MARGIN;
                    let usec = u32::try_from(stop_within.as_micros()).unwrap_or(u32::MAX);
                    notify(&[NotifyState::Stopping, NotifyState::ExtendTimeoutUsec(usec)]);
                    let calls = active_calls(shared);
                    info!(grace_s = grace.as_secs(), calls, "SIGTERM: draining");
                    phase = Phase::Draining { until: Instant::now() + grace };
                }
                Phase::Draining { .. } => {
                    info!("second SIGTERM: ending calls now");
                    break;
                }
            },
            _ = signals.int.recv() => {
                if phase == Phase::Serving {
                    notify(&[NotifyState::Stopping]);
                }
                info!("SIGINT: ending calls");
                break;
            }
            _ = signals.hup.recv() => {
                info!("SIGHUP: reloading the configuration");
                // In its own task, so this loop keeps pinging the watchdog
                // and hearing signals while prompts load; reloads are
                // serialised by `Life::state`. Logged (and notified) inside;
                // the old configuration stays on error.
                let shared = Arc::clone(shared);
                tokio::spawn(async move {
                    let _ = reload(&shared).await;
                });
            }
            () = watchdog_due => {
                let ok = healthy(shared);
                if ok {
                    notify(&[NotifyState::Watchdog]);
                } else if was_healthy {
                    error!("a listener task died: watchdog pings stopped");
                }
                was_healthy = ok;
            }
            () = grace_over => {
                let calls = active_calls(shared);
                info!(calls, "drain grace over: ending calls");
                break;
            }
            _ = status_tick.tick() => {
                let now = current_status(shared);
                if now != status {
                    notify(&[NotifyState::Status(&now)]);
                    status = now;
                }
                if matches!(phase, Phase::Draining { .. }) && active_calls(shared) == 0 {
                    info!("drained: no calls left");
                    break;
                }
            }
        }
    }
    shut_down(shared, &mut signals).await;
}

/// Ends every live call with BYE, waits (bounded) for the BYEs to be
/// answered, TCP peers to close and the ended calls' pipelines to hand over
/// their last transcripts, stops the listeners, finalises the store and
/// gives the call event queues [`super::webhooks::SHUTDOWN_GRACE`] to
/// empty. A further SIGTERM/SIGINT cuts the waits short.
async fn shut_down(shared: &Arc<Shared>, signals: &mut Signals) {
    lock(&shared.switchboard).start_draining();
    // Until every call's BYE is answered or has timed out, so TCP connections
    // stay open for the 200s and lost BYEs are retransmitted; new INVITEs
    // meanwhile get 503. A call admitted just before the drain may enter the
    // call table only now: every pass tells the calls not yet told. Then TCP
    // peers get a moment to close first (a peer may still be finishing its
    // side of the last transaction).
    let waits = async {
        let mut told = std::collections::HashSet::new();
        let deadline = Instant::now() + BYE_GRACE;
        loop {
            let untold: Vec<_> = lock(&shared.calls)
                .iter()
                .filter(|(id, _)| !told.contains(*id))
                .map(|(id, e)| (id.clone(), e.tx.clone()))
                .collect();
            for (id, tx) in untold {
                // A full mailbox is tried again on the next pass.
                if !matches!(
                    tx.try_send(CallCommand::HangUp(HangupCause::Shutdown)),
                    Err(tokio::sync::mpsc::error::TrySendError::Full(_))
                ) {
                    told.insert(id);
                }
            }
            if lock(&shared.calls).is_empty() || Instant::now() >= deadline {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        wait_until(Instant::now() + TCP_CLOSE_GRACE, || {
            shared.transports.open_connections() == 0
        })
        .await;
        // The ended calls' pipelines may still be closing their streams:
        // their last transcripts reach the store before it closes.
        if let Some(records) = &shared.records {
            let tails = records.transcript_tails();
            if tails > 0 {
                debug!(calls = tails, "waiting for the last transcripts");
                wait_until(Instant::now() + TRANSCRIPT_GRACE, || {
                    records.transcript_tails() == 0
                })
                .await;
                let left = records.transcript_tails();
                if left > 0 {
                    warn!(
                        calls = left,
                        "pipelines still closing at exit: their last transcripts are lost"
                    );
                }
            }
        }
    };
    let hurried = tokio::select! {
        () = waits => false,
        _ = signals.term.recv() => {
            info!("SIGTERM: not waiting for the BYEs");
            true
        }
        _ = signals.int.recv() => {
            info!("SIGINT: not waiting for the BYEs");
            true
        }
    };
    let listeners = std::mem::take(&mut shared.life.state.lock().await.listeners);
    for l in listeners {
        l.stop(shared);
    }
    if let Some(records) = shared.records.clone() {
        // Drains the queue: CDRs closed, open recordings finished.
        let _ = tokio::task::spawn_blocking(move || records.shutdown()).await;
    }
    // The last call events (call.ended, recording.ready) get a bounded
    // moment to reach their receivers, unless a signal hurries the exit.
    let grace = if hurried {
        Duration::ZERO
    } else {
        super::webhooks::SHUTDOWN_GRACE
    };
    tokio::select! {
        () = shared.events.shutdown(grace) => {}
        _ = signals.term.recv() => shared.events.shutdown(Duration::ZERO).await,
        _ = signals.int.recv() => shared.events.shutdown(Duration::ZERO).await,
    }
}

/// Polls `done` every 20 ms until it holds or `deadline` passes.
async fn wait_until(deadline: Instant, done: impl Fn() -> bool) {
    while !done() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Re-reads the configuration `run` was started with and, if the whole of it
/// is valid, applies it: calls admitted from now on use the new trunks,
/// tenants, routes, pipelines and prompts; live calls keep the settings they
/// started with; listeners whose address left the profile are closed, new
/// ones opened, unchanged ones kept (their sockets untouched); the store
/// stays open. Rejected whole otherwise. Notifies `RELOADING=1` then
/// `READY=1` either way, and logs the outcome. SIGHUP and the admin API both
/// call this; concurrent calls run one after the other.
pub(crate) async fn reload(shared: &Arc<Shared>) -> Result<ReloadSummary, ReloadError> {
    let mut state = shared.life.state.lock().await;
    if lock(&shared.switchboard).is_draining() {
        warn!("reload refused: draining");
        return Err(ReloadError::Draining);
    }
    match NotifyState::monotonic_usec_now() {
        Ok(now) => notify(&[NotifyState::Reloading, now]),
        Err(e) => {
            debug!(error = %e, "no monotonic clock for MONOTONIC_USEC");
            notify(&[NotifyState::Reloading]);
        }
    }
    let result = apply(shared, &mut state).await;
    drop(state);
    crate::metrics::reload(result.is_ok());
    match &result {
        Ok(summary) => info!(%summary, "configuration reloaded"),
        Err(e) => {
            error!(error = %e, "configuration reload rejected; the running configuration stays")
        }
    }
    let status = current_status(shared);
    notify(&[NotifyState::Ready, NotifyState::Status(&status)]);
    result
}

async fn apply(shared: &Arc<Shared>, state: &mut Serving) -> Result<ReloadSummary, ReloadError> {
    let path = shared.life.config_path.clone();
    let loaded = tokio::task::spawn_blocking(move || crate::config::load(&path))
        .await
        .map_err(|e| ReloadError::Load(e.to_string()))?;
    let config = match loaded {
        Ok(c) => c,
        Err(diags) => {
            for d in diags.items() {
                error!(diagnostic = %d, "configuration invalid");
            }
            return Err(ReloadError::Invalid(
                diags.errors().map(ToString::to_string).collect(),
            ));
        }
    };
    for w in &config.warnings {
        warn!(diagnostic = %w, "configuration warning");
    }
    let config = Arc::new(config);
    let profile = match config.profiles.as_slice() {
        [p] => p,
        _ => {
            return Err(ReloadError::NeedsRestart(
                "the configuration must hold exactly one profile".to_owned(),
            ));
        }
    };
    let old = Arc::clone(lock(&shared.switchboard).config());
    if let Some(old) = old.profiles.first()
        && old.var_dir != profile.var_dir
    {
        return Err(ReloadError::NeedsRestart(format!(
            "var_dir changed from {} to {}",
            old.var_dir.display(),
            profile.var_dir.display()
        )));
    }
    // The media threads are started once.
    if let Some(old) = old.profiles.first()
        && old.media.threads != profile.media.threads
    {
        return Err(ReloadError::NeedsRestart(format!(
            "[profile.media] threads changed from {} to {}",
            old.media.threads, profile.media.threads
        )));
    }
    // The store thread and its uploader were built for the running section.
    if let Some(old) = old.profiles.first()
        && old.recordings != profile.recordings
    {
        return Err(ReloadError::NeedsRestart(
            "[profile.recordings] changed (where recordings are kept, or its credentials)"
                .to_owned(),
        ));
    }
    let key = super::store_link::master_key_bytes(&profile.master_key)
        .map_err(|e| ReloadError::NeedsRestart(format!("master key: {e:#}")))?;
    if state.master_key.is_some_and(|fp| fp != fingerprint(&key)) {
        return Err(ReloadError::NeedsRestart(
            "the master key changed".to_owned(),
        ));
    }
    let for_prompts = Arc::clone(&config);
    let (prompts, fallbacks, holds) = tokio::task::spawn_blocking(move || {
        Ok::<_, anyhow::Error>((
            super::load_prompts(&for_prompts)?,
            super::load_fallback_prompts(&for_prompts)?,
            super::load_hold_prompts(&for_prompts)?,
        ))
    })
    .await
    .map_err(|e| ReloadError::Load(e.to_string()))?
    .map_err(|e| ReloadError::Prompt(format!("{e:#}")))?;

    // Bind what is new before changing anything: a failure leaves all as it was.
    let wanted = transport::wanted(profile);
    let mut fresh = Vec::new();
    for &(kind, addr) in &wanted {
        if !state
            .listeners
            .iter()
            .any(|l| l.kind == kind && l.configured == addr)
        {
            let bound = transport::bind(kind, addr, profile.security.udp_receive_buffer_bytes)
                .await
                .map_err(|e| ReloadError::Bind(format!("{e:#}")))?;
            fresh.push(bound);
        }
    }

    // New TLS handshakes use the new certificate (checked at load; a failure
    // here drops the fresh sockets and keeps all else); connections up keep theirs.
    shared
        .transports
        .tls
        .configure(profile, &config.trunks)
        .map_err(|e| ReloadError::Load(format!("{e:#}")))?;

    // Nothing below fails.
    crate::logging::set_caller_data(profile.log_caller_data);
    let mut rng = StdRng::from_os_rng();
    let describe =
        |kind: TransportKind, addr: SocketAddr| format!("{} {addr}", transport::kind_name(kind));
    let mut listeners_removed = Vec::new();
    for l in state
        .listeners
        .extract_if(.., |l| !wanted.contains(&(l.kind, l.configured)))
    {
        listeners_removed.push(describe(l.kind, l.local));
        l.stop(shared);
    }
    let listeners_kept = state.listeners.len();
    let mut listeners_added = Vec::new();
    for bound in fresh {
        listeners_added.push(describe(bound.kind(), bound.local));
        state
            .listeners
            .push(transport::start(shared, bound, &mut rng));
    }
    state.listeners.sort_by_key(|l| {
        wanted
            .iter()
            .position(|w| *w == (l.kind, l.configured))
            .unwrap_or(usize::MAX)
    });
    let (settings, rtp_bind) =
        transport::settings_for(profile, state.listeners.iter().map(|l| (l.kind, l.local)));
    *lock(&shared.rtp_bind) = rtp_bind;
    if let Some(records) = &shared.records {
        records.configure(&key, &config.tenants);
    }
    shared.events.configure(&config.tenants);
    let summary = ReloadSummary {
        trunks: config.trunks.len(),
        tenants: config.tenants.len(),
        routes: config.routes.len(),
        listeners_added,
        listeners_removed,
        listeners_kept,
    };
    *lock(&shared.fallback_prompts) = fallbacks;
    *lock(&shared.hold_prompts) = holds;
    lock(&shared.switchboard).reconfigure(Arc::clone(&config), settings, prompts, &mut rng);
    Ok(summary)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_names_calls_and_drain() {
        assert_eq!(status_text(0, false), "serving: 0 active calls");
        assert_eq!(status_text(1, false), "serving: 1 active call");
        assert_eq!(status_text(3, true), "draining: 3 active calls");
    }

    #[test]
    fn fingerprint_is_sha256() {
        assert_eq!(
            hex::encode(fingerprint(b"abc")),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }
}
