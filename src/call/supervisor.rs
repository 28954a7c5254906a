//! The failure policy of one call's network pipeline (agent, Deepgram),
//! sans-IO: connection states, the reconnect schedule, the agent-silence
//! timer and the decision once reconnecting has not helped (DESIGN §3,
//! `docs/agent-protocol.md` "Failures").
//!
//! Owns: [`PipelineSupervisor`] — told what happened to the connection
//! ([`PipelineSupervisor::on_connected`], [`PipelineSupervisor::on_failed`],
//! [`PipelineSupervisor::on_agent_output`]) and what the media did
//! ([`PipelineSupervisor::prompt_finished`],
//! [`PipelineSupervisor::fallback_played`]), it says when to open or drop a
//! connection and how the call ends ([`SupervisorOutput`]), with one timer
//! (`poll_timeout`/`handle_timeout`, as the rest of `call`).
//! Must not touch: sockets, tasks, clocks (`now` is passed in), the wire
//! protocols (the daemon's pipeline tasks report what happened as
//! [`ConnectionFailure`]s), media (the daemon plays the fallback prompt).
//!
//! Rules:
//! - An *outage* starts when a connection fails (or the first one cannot be
//!   made). Within it, up to `reconnect_attempts` reconnects are tried, each
//!   after an exponential backoff (100 ms doubling to at most 2 s, times a
//!   random factor in [½, 1) from the injected RNG), and each connection
//!   attempt may take `connect_timeout`, cut at the outage's end: the outage
//!   is over `reconnect_within` after it began, reconnected or given up.
//! - A connection that comes up ends the outage only once it has stayed up
//!   for `reconnect_within`: an agent that accepts (or greets) and drops at
//!   once uses up the outage's attempts instead of reconnecting forever. A
//!   call makes at most ten outages' worth of reconnects in all.
//! - HTTP 4xx at the upgrade (but 408 and 429) is permanent: no reconnect.
//! - Agent silence (no audio, no mark for `agent_silence` once the disclosure
//!   prompt has ended and the connection is up) is a failure of the agent,
//!   not of the connection: the bridge gives up at once.
//! - Giving up: `on_failure = "continue"` keeps the call; `"fallback"` plays
//!   the fallback prompt (after the disclosure, if that still plays) and then
//!   hangs up, or hangs up at once when there is no fallback prompt. If the
//!   prompt's end is never reported, the call is hung up
//!   [`FALLBACK_SLACK`] after it should have ended.

use crate::config::{FailurePolicy, OnFailure};
use rand::RngCore;
use serde::Serialize;
use std::collections::VecDeque;
use std::fmt;
use std::time::{Duration, Instant};

/// The first reconnect's backoff before jitter.
pub const BACKOFF_INITIAL: Duration = Duration::from_millis(100);
/// Backoffs double up to this (before jitter).
pub const BACKOFF_MAX: Duration = Duration::from_secs(2);
/// How long past the fallback prompt's expected end the call is hung up
/// even if its end was not reported.
pub const FALLBACK_SLACK: Duration = Duration::from_secs(2);
/// The name of the mark the daemon queues after the fallback prompt.
pub const FALLBACK_MARK: &str = "sipbridge-fallback";

/// How a connection attempt or a connection failed (no secrets: the
/// pipeline task logs the details).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ConnectionFailure {
    /// No connection: refused, unreachable, TLS or protocol error before the upgrade.
    Unreachable,
    /// The connection attempt took longer than `connect_timeout`.
    ConnectTimeout,
    /// The agent answered the upgrade with this HTTP status.
    Rejected(u16),
    /// An established connection closed or broke.
    Dropped,
}

impl ConnectionFailure {
    /// Client errors at the upgrade do not go away by retrying (a wrong
    /// token, a wrong path); timeouts and rate limits do.
    pub fn is_permanent(self) -> bool {
        matches!(self, ConnectionFailure::Rejected(s) if (400..500).contains(&s) && s != 408 && s != 429)
    }
}

/// Why the supervisor gave up on the pipeline.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum GiveUpReason {
    /// A permanent rejection at the upgrade (HTTP status).
    Rejected(u16),
    /// `reconnect_attempts` reconnects failed (or none were allowed).
    ReconnectsExhausted,
    /// The next reconnect would come after `reconnect_within`.
    WindowExceeded,
    /// The agent sent nothing for `agent_silence`.
    AgentSilent,
}

impl fmt::Display for GiveUpReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            GiveUpReason::Rejected(status) => write!(f, "rejected-{status}"),
            GiveUpReason::ReconnectsExhausted => f.write_str("reconnects-exhausted"),
            GiveUpReason::WindowExceeded => f.write_str("reconnect-window-exceeded"),
            GiveUpReason::AgentSilent => f.write_str("agent-silent"),
        }
    }
}

/// What the call does once the supervisor gave up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureAction {
    /// Clear the playout queue, queue the fallback prompt and a
    /// [`FALLBACK_MARK`]; report it with [`PipelineSupervisor::fallback_played`].
    PlayFallback,
    /// Hang up now.
    HangUp,
    /// Keep the call without the pipeline.
    Continue,
}

/// The connection's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnectionState {
    /// Not started yet.
    Idle,
    /// Connection `attempt` (0: the first, n: the n-th reconnect) in progress.
    Connecting {
        /// Attempt number.
        attempt: u32,
    },
    /// Connected.
    Up,
    /// Waiting for the backoff before reconnect `attempt`.
    Reconnecting {
        /// The reconnect that comes next (1-based, counted over the call).
        attempt: u32,
        /// When it starts.
        at: Instant,
    },
    /// Given up.
    Failed(GiveUpReason),
}

/// What the supervisor asks the call task to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SupervisorOutput {
    /// Open a connection (dropping any previous one); `attempt` is 0 for the
    /// first, n for the n-th reconnect of the call (the agent's `start` says so).
    Connect {
        /// Attempt number.
        attempt: u32,
    },
    /// Drop the current connection (it timed out connecting, or went silent).
    Disconnect,
    /// The pipeline failed for good; drop it and do `action`.
    GaveUp {
        /// Why.
        reason: GiveUpReason,
        /// What the tenant's policy says.
        action: FailureAction,
    },
    /// The fallback prompt has played (or should long have): hang up now.
    HangUp,
}

/// The pipeline part of a CDR.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PipelineSummary {
    /// Connections established.
    pub connections: u32,
    /// Reconnects attempted.
    pub reconnects: u32,
    /// Caller frames dropped because the pipeline was behind (or away).
    pub dropped_frames: u64,
    /// Why the bridge gave up on the pipeline, if it did.
    pub failure: Option<String>,
}

#[derive(Debug, Clone, Copy)]
struct Outage {
    started: Instant,
    attempts: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fallback {
    None,
    /// Decided; its clock starts when the disclosure prompt has finished.
    Pending,
    /// Playing; hang up at this time at the latest.
    Playing(Instant),
    Done,
}

/// Reconnects a call may make in all, whatever its outages: ten outages'
/// worth of the tenant's attempts (at least ten).
fn max_reconnects_per_call(policy: &FailurePolicy) -> u32 {
    policy.reconnect_attempts.max(1).saturating_mul(10)
}

/// One call's pipeline supervisor.
#[derive(Debug)]
pub struct PipelineSupervisor {
    policy: FailurePolicy,
    fallback_len: Option<Duration>,
    state: ConnectionState,
    connect_deadline: Option<Instant>,
    outage: Option<Outage>,
    up_since: Option<Instant>,
    last_output: Option<Instant>,
    prompt_done_at: Option<Instant>,
    /// The caller put the call on hold (no silence timer meanwhile); the
    /// last time it was taken off hold.
    held: bool,
    resumed_at: Option<Instant>,
    fallback: Fallback,
    connections: u32,
    reconnects: u32,
    out: VecDeque<SupervisorOutput>,
}

impl PipelineSupervisor {
    /// A supervisor for a call of a tenant with `policy`; `fallback_len` is
    /// the loaded fallback prompt's length (None: there is none).
    pub fn new(policy: &FailurePolicy, fallback_len: Option<Duration>) -> PipelineSupervisor {
        PipelineSupervisor {
            policy: policy.clone(),
            fallback_len,
            state: ConnectionState::Idle,
            connect_deadline: None,
            outage: None,
            up_since: None,
            last_output: None,
            prompt_done_at: None,
            held: false,
            resumed_at: None,
            fallback: Fallback::None,
            connections: 0,
            reconnects: 0,
            out: VecDeque::new(),
        }
    }

    /// Starts the first connection (asks for [`SupervisorOutput::Connect`]).
    pub fn start(&mut self, now: Instant) {
        if self.state == ConnectionState::Idle {
            self.connect(now, 0);
        }
    }

    /// The current connection state.
    pub fn state(&self) -> ConnectionState {
        self.state
    }

    /// Counters for the CDR (`dropped_frames` is the daemon's to fill).
    pub fn summary(&self) -> PipelineSummary {
        PipelineSummary {
            connections: self.connections,
            reconnects: self.reconnects,
            dropped_frames: 0,
            failure: match self.state {
                ConnectionState::Failed(reason) => Some(reason.to_string()),
                _ => None,
            },
        }
    }

    /// The connection being attempted is up.
    pub fn on_connected(&mut self, now: Instant) {
        if let ConnectionState::Connecting { .. } = self.state {
            self.state = ConnectionState::Up;
            self.connect_deadline = None;
            self.up_since = Some(now);
            self.connections += 1;
        }
    }

    /// The connection attempt or the connection failed. The RNG jitters the
    /// backoff.
    pub fn on_failed(&mut self, now: Instant, failure: ConnectionFailure, rng: &mut impl RngCore) {
        match self.state {
            ConnectionState::Connecting { .. } | ConnectionState::Up => {}
            _ => return,
        }
        self.connect_deadline = None;
        if let ConnectionFailure::Rejected(status) = failure
            && failure.is_permanent()
        {
            return self.give_up(now, GiveUpReason::Rejected(status));
        }
        let window = self.policy.reconnect_within;
        // Recovered only if the connection lasted a whole window: an agent
        // that greets and then drops at once stays in the same outage (its
        // attempts run out) instead of looping for the rest of the call.
        let recovered = self.state == ConnectionState::Up
            && self
                .up_since
                .is_some_and(|t| now.saturating_duration_since(t) >= window);
        // And whatever the timing, a call reconnects a bounded number of times.
        if self.reconnects >= max_reconnects_per_call(&self.policy) {
            return self.give_up(now, GiveUpReason::ReconnectsExhausted);
        }
        if recovered || self.outage.is_none() {
            self.outage = Some(Outage {
                started: now,
                attempts: 0,
            });
        }
        self.up_since = None;
        let Some(outage) = &mut self.outage else {
            return;
        };
        if outage.attempts >= self.policy.reconnect_attempts {
            return self.give_up(now, GiveUpReason::ReconnectsExhausted);
        }
        let at = now + backoff(outage.attempts, rng);
        if at >= outage.started + window {
            return self.give_up(now, GiveUpReason::WindowExceeded);
        }
        outage.attempts += 1;
        self.state = ConnectionState::Reconnecting {
            attempt: self.reconnects + 1,
            at,
        };
    }

    /// The agent sent audio or a mark.
    pub fn on_agent_output(&mut self, now: Instant) {
        if self.state == ConnectionState::Up {
            self.last_output = Some(now);
        }
    }

    /// The caller put the call on hold (`true`) or took it off (`false`): an
    /// agent has nothing to answer while the caller is away, so the
    /// agent-silence timer stops on hold and starts afresh on resume.
    pub fn set_held(&mut self, now: Instant, held: bool) {
        if self.held && !held {
            self.resumed_at = Some(now);
        }
        self.held = held;
    }

    /// The disclosure prompt has finished (or the call has none): the
    /// agent-silence timer and a pending fallback prompt's bound start now.
    pub fn prompt_finished(&mut self, now: Instant) {
        if self.prompt_done_at.is_none() {
            self.prompt_done_at = Some(now);
        }
        if self.fallback == Fallback::Pending {
            self.arm_fallback(now);
        }
    }

    /// The fallback prompt's mark has been played: asks to hang up.
    pub fn fallback_played(&mut self, _now: Instant) {
        if matches!(self.fallback, Fallback::Pending | Fallback::Playing(_)) {
            self.fallback = Fallback::Done;
            self.out.push_back(SupervisorOutput::HangUp);
        }
    }

    /// When [`PipelineSupervisor::handle_timeout`] must run next.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let reconnect = match self.state {
            ConnectionState::Reconnecting { at, .. } => Some(at),
            _ => None,
        };
        let fallback = match self.fallback {
            Fallback::Playing(t) => Some(t),
            _ => None,
        };
        [
            reconnect,
            self.connect_deadline,
            self.silence_deadline(),
            fallback,
        ]
        .into_iter()
        .flatten()
        .min()
    }

    /// Runs whatever is due at `now`.
    pub fn handle_timeout(&mut self, now: Instant, rng: &mut impl RngCore) {
        if let ConnectionState::Reconnecting { attempt, at } = self.state
            && now >= at
        {
            self.reconnects = attempt;
            self.connect(now, attempt);
        }
        if let (ConnectionState::Connecting { .. }, Some(deadline)) =
            (self.state, self.connect_deadline)
            && now >= deadline
        {
            self.out.push_back(SupervisorOutput::Disconnect);
            self.on_failed(now, ConnectionFailure::ConnectTimeout, rng);
        }
        if self.silence_deadline().is_some_and(|t| now >= t) {
            self.out.push_back(SupervisorOutput::Disconnect);
            self.give_up(now, GiveUpReason::AgentSilent);
        }
        if let Fallback::Playing(t) = self.fallback
            && now >= t
        {
            self.fallback = Fallback::Done;
            self.out.push_back(SupervisorOutput::HangUp);
        }
    }

    /// The next thing to do.
    pub fn poll_output(&mut self) -> Option<SupervisorOutput> {
        self.out.pop_front()
    }

    fn connect(&mut self, now: Instant, attempt: u32) {
        let mut deadline = now + self.policy.connect_timeout;
        if let Some(o) = &self.outage {
            deadline = deadline.min(o.started + self.policy.reconnect_within);
        }
        self.connect_deadline = Some(deadline);
        self.state = ConnectionState::Connecting { attempt };
        self.out.push_back(SupervisorOutput::Connect { attempt });
    }

    fn silence_deadline(&self) -> Option<Instant> {
        let silence = self.policy.agent_silence?;
        if self.state != ConnectionState::Up || self.held {
            return None;
        }
        let from = [
            self.up_since,
            self.prompt_done_at?.into(),
            self.last_output,
            self.resumed_at,
        ]
        .into_iter()
        .flatten()
        .max()?;
        Some(from + silence)
    }

    fn give_up(&mut self, now: Instant, reason: GiveUpReason) {
        self.state = ConnectionState::Failed(reason);
        self.connect_deadline = None;
        let action = match (self.policy.on_failure, self.fallback_len) {
            (OnFailure::Continue, _) => FailureAction::Continue,
            (OnFailure::Fallback, None) => FailureAction::HangUp,
            (OnFailure::Fallback, Some(_)) => {
                self.fallback = Fallback::Pending;
                if self.prompt_done_at.is_some() {
                    self.arm_fallback(now);
                }
                FailureAction::PlayFallback
            }
        };
        self.out
            .push_back(SupervisorOutput::GaveUp { reason, action });
    }

    fn arm_fallback(&mut self, now: Instant) {
        let len = self.fallback_len.unwrap_or_default();
        self.fallback = Fallback::Playing(now + len + FALLBACK_SLACK);
    }
}

/// The wait before reconnect `n` (0-based within an outage): 100 ms doubling
/// to at most 2 s, times a factor in [½, 1) from the RNG.
fn backoff(n: u32, rng: &mut impl RngCore) -> Duration {
    let base = BACKOFF_INITIAL
        .saturating_mul(1u32.checked_shl(n.min(16)).unwrap_or(u32::MAX))
        .min(BACKOFF_MAX);
    let half = u64::try_from(base.as_micros() / 2).unwrap_or(u64::MAX);
    let jitter = (u128::from(half) * u128::from(rng.next_u32())) >> 32;
    Duration::from_micros(half + u64::try_from(jitter).unwrap_or(0))
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    /// An RNG that always returns the same word (jitter at a known point).
    struct Fixed(u32);

    impl RngCore for Fixed {
        fn next_u32(&mut self) -> u32 {
            self.0
        }
        fn next_u64(&mut self) -> u64 {
            u64::from(self.0)
        }
        fn fill_bytes(&mut self, dest: &mut [u8]) {
            dest.fill(0);
        }
    }

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn policy(on_failure: OnFailure, attempts: u32, window_ms: u64) -> FailurePolicy {
        FailurePolicy {
            on_failure,
            reconnect_attempts: attempts,
            reconnect_within: ms(window_ms),
            connect_timeout: ms(1000),
            agent_silence: None,
            ..FailurePolicy::default()
        }
    }

    fn drain(s: &mut PipelineSupervisor) -> Vec<SupervisorOutput> {
        std::iter::from_fn(|| s.poll_output()).collect()
    }

    /// Jumps time to each wake-up until `until`, collecting outputs with their time.
    fn run_until(
        s: &mut PipelineSupervisor,
        until: Instant,
        rng: &mut impl RngCore,
        mut on_connect: impl FnMut(&mut PipelineSupervisor, Instant, u32),
    ) -> Vec<(Instant, SupervisorOutput)> {
        let mut seen = Vec::new();
        while let Some(t) = s.poll_timeout() {
            if t > until {
                break;
            }
            s.handle_timeout(t, rng);
            // Outputs of `on_connect` itself are collected too (at time `t`).
            while let Some(o) = s.poll_output() {
                seen.push((t, o));
                if let SupervisorOutput::Connect { attempt } = o {
                    on_connect(s, t, attempt);
                }
            }
        }
        seen
    }

    #[test]
    fn backoff_doubles_to_the_cap_with_jitter_in_half_to_one() {
        let lows: Vec<Duration> = (0..7).map(|n| backoff(n, &mut Fixed(0))).collect();
        assert_eq!(
            lows,
            [
                ms(50),
                ms(100),
                ms(200),
                ms(400),
                ms(800),
                ms(1000),
                ms(1000)
            ]
        );
        let highs: Vec<Duration> = (0..6).map(|n| backoff(n, &mut Fixed(u32::MAX))).collect();
        // Just under the base: 100 ms × (½ + ½·(2³²−1)/2³²).
        assert_eq!(highs[0], Duration::from_micros(99_999));
        assert_eq!(highs[5], Duration::from_micros(1_999_999));
        assert_eq!(backoff(1000, &mut Fixed(1 << 31)), ms(1500));
    }

    /// Refused three times, then connected: reconnects at exactly the
    /// jittered backoffs after each refusal.
    #[test]
    fn reconnect_times_follow_the_schedule_and_a_success_ends_the_outage() {
        let t0 = Instant::now();
        let mut rng = Fixed(1 << 31); // factor ¾
        let mut s = PipelineSupervisor::new(&policy(OnFailure::Fallback, 3, 5000), None);
        s.start(t0);
        assert_eq!(drain(&mut s), [SupervisorOutput::Connect { attempt: 0 }]);
        assert_eq!(s.state(), ConnectionState::Connecting { attempt: 0 });
        assert_eq!(s.poll_timeout(), Some(t0 + ms(1000)), "connect timeout");

        s.on_failed(t0 + ms(10), ConnectionFailure::Unreachable, &mut rng);
        assert_eq!(
            s.state(),
            ConnectionState::Reconnecting {
                attempt: 1,
                at: t0 + ms(85)
            }
        );
        let refuse = |s: &mut PipelineSupervisor, t: Instant, _| {
            s.on_failed(
                t + ms(10),
                ConnectionFailure::Unreachable,
                &mut Fixed(1 << 31),
            );
        };
        let seen = run_until(&mut s, t0 + ms(400), &mut rng, refuse);
        assert_eq!(
            seen,
            [
                (t0 + ms(85), SupervisorOutput::Connect { attempt: 1 }),
                // refused at 95, +150 ms
                (t0 + ms(245), SupervisorOutput::Connect { attempt: 2 }),
            ]
        );
        // refused at 255 (+300 ms) → third reconnect at 555, which succeeds.
        let seen = run_until(&mut s, t0 + ms(600), &mut rng, |s, t, _| s.on_connected(t));
        assert_eq!(
            seen,
            [(t0 + ms(555), SupervisorOutput::Connect { attempt: 3 })]
        );
        assert_eq!(s.state(), ConnectionState::Up);
        assert_eq!(
            s.poll_timeout(),
            None,
            "no timer while up without silence check"
        );
        let sum = s.summary();
        assert_eq!((sum.connections, sum.reconnects, sum.failure), (1, 3, None));

        // The agent talks: the outage is over; a later drop gets a fresh budget.
        s.on_agent_output(t0 + ms(700));
        s.on_failed(t0 + ms(9000), ConnectionFailure::Dropped, &mut rng);
        assert_eq!(
            s.state(),
            ConnectionState::Reconnecting {
                attempt: 4,
                at: t0 + ms(9075)
            }
        );
    }

    #[test]
    fn gives_up_after_n_attempts_then_fallback_then_hangup() {
        let t0 = Instant::now();
        let mut rng = Fixed(0);
        let mut s = PipelineSupervisor::new(&policy(OnFailure::Fallback, 2, 5000), Some(ms(1500)));
        s.prompt_finished(t0);
        s.start(t0);
        drain(&mut s);
        s.on_failed(t0, ConnectionFailure::Unreachable, &mut rng);
        let refuse = |s: &mut PipelineSupervisor, t: Instant, _| {
            s.on_failed(t, ConnectionFailure::Unreachable, &mut Fixed(0));
        };
        let seen = run_until(&mut s, t0 + ms(10_000), &mut rng, refuse);
        let gave_up = SupervisorOutput::GaveUp {
            reason: GiveUpReason::ReconnectsExhausted,
            action: FailureAction::PlayFallback,
        };
        assert_eq!(
            seen,
            [
                (t0 + ms(50), SupervisorOutput::Connect { attempt: 1 }),
                (t0 + ms(150), SupervisorOutput::Connect { attempt: 2 }),
                (t0 + ms(150), gave_up),
                // Nobody reported the fallback's mark: bound = 1.5 s + slack.
                (t0 + ms(3650), SupervisorOutput::HangUp),
            ]
        );
        assert_eq!(s.summary().failure.as_deref(), Some("reconnects-exhausted"));
        assert_eq!(s.poll_timeout(), None);
    }

    #[test]
    fn fallback_mark_played_hangs_up_and_waits_for_the_disclosure() {
        let t0 = Instant::now();
        let mut s = PipelineSupervisor::new(&policy(OnFailure::Fallback, 0, 5000), Some(ms(800)));
        s.start(t0);
        drain(&mut s);
        s.on_failed(t0 + ms(5), ConnectionFailure::Unreachable, &mut Fixed(0));
        assert_eq!(
            drain(&mut s),
            [SupervisorOutput::GaveUp {
                reason: GiveUpReason::ReconnectsExhausted,
                action: FailureAction::PlayFallback
            }]
        );
        // The disclosure still plays: no bound yet.
        assert_eq!(s.poll_timeout(), None);
        s.prompt_finished(t0 + ms(4000));
        assert_eq!(s.poll_timeout(), Some(t0 + ms(4000 + 800 + 2000)));
        s.fallback_played(t0 + ms(4810));
        assert_eq!(drain(&mut s), [SupervisorOutput::HangUp]);
        assert_eq!(s.poll_timeout(), None);
        s.fallback_played(t0 + ms(4820));
        assert!(drain(&mut s).is_empty(), "one hang-up only");
    }

    #[test]
    fn rejection_with_401_or_403_is_permanent_503_is_retried() {
        for (status, permanent) in [
            (401, true),
            (403, true),
            (404, true),
            (429, false),
            (503, false),
        ] {
            let t0 = Instant::now();
            let mut s = PipelineSupervisor::new(&policy(OnFailure::Continue, 3, 5000), None);
            s.start(t0);
            drain(&mut s);
            s.on_failed(t0, ConnectionFailure::Rejected(status), &mut Fixed(0));
            if permanent {
                assert_eq!(
                    drain(&mut s),
                    [SupervisorOutput::GaveUp {
                        reason: GiveUpReason::Rejected(status),
                        action: FailureAction::Continue
                    }],
                    "{status}"
                );
                assert_eq!(s.summary().failure, Some(format!("rejected-{status}")));
            } else {
                assert!(drain(&mut s).is_empty());
                assert!(matches!(s.state(), ConnectionState::Reconnecting { .. }));
            }
        }
    }

    #[test]
    fn the_window_bounds_the_outage_including_connect_time() {
        let t0 = Instant::now();
        let mut rng = Fixed(0);
        // Window 600 ms: reconnect 1 at +50 (its connect cut at +600).
        let mut s = PipelineSupervisor::new(&policy(OnFailure::Fallback, 5, 600), None);
        s.start(t0);
        drain(&mut s);
        s.on_failed(t0, ConnectionFailure::Dropped, &mut rng);
        let seen = run_until(&mut s, t0 + ms(5000), &mut rng, |_, _, _| {});
        assert_eq!(
            seen,
            [
                (t0 + ms(50), SupervisorOutput::Connect { attempt: 1 }),
                (t0 + ms(600), SupervisorOutput::Disconnect),
                (
                    t0 + ms(600),
                    SupervisorOutput::GaveUp {
                        reason: GiveUpReason::WindowExceeded,
                        action: FailureAction::HangUp
                    }
                ),
            ]
        );
    }

    #[test]
    fn a_hanging_connect_times_out_and_is_retried() {
        let t0 = Instant::now();
        let mut rng = Fixed(0);
        let mut s = PipelineSupervisor::new(&policy(OnFailure::Continue, 1, 5000), None);
        s.start(t0);
        drain(&mut s);
        let seen = run_until(&mut s, t0 + ms(10_000), &mut rng, |_, _, _| {});
        assert_eq!(
            seen,
            [
                (t0 + ms(1000), SupervisorOutput::Disconnect),
                (t0 + ms(1050), SupervisorOutput::Connect { attempt: 1 }),
                (t0 + ms(2050), SupervisorOutput::Disconnect),
                (
                    t0 + ms(2050),
                    SupervisorOutput::GaveUp {
                        reason: GiveUpReason::ReconnectsExhausted,
                        action: FailureAction::Continue
                    }
                ),
            ]
        );
    }

    #[test]
    fn an_agent_that_connects_and_drops_at_once_cannot_reconnect_forever() {
        let t0 = Instant::now();
        let mut rng = Fixed(0);
        let mut s = PipelineSupervisor::new(&policy(OnFailure::Continue, 2, 5000), None);
        s.start(t0);
        drain(&mut s);
        s.on_connected(t0);
        s.on_failed(t0 + ms(10), ConnectionFailure::Dropped, &mut rng);
        let flap = |s: &mut PipelineSupervisor, t: Instant, _| {
            s.on_connected(t);
            s.on_failed(t + ms(10), ConnectionFailure::Dropped, &mut Fixed(0));
        };
        let seen = run_until(&mut s, t0 + ms(10_000), &mut rng, flap);
        assert_eq!(seen.len(), 3, "{seen:?}");
        assert!(matches!(
            seen[2].1,
            SupervisorOutput::GaveUp {
                reason: GiveUpReason::ReconnectsExhausted,
                ..
            }
        ));
        assert_eq!(s.summary().connections, 3);
    }

    #[test]
    fn silence_timer_starts_after_the_prompt_and_is_reset_by_agent_output() {
        let t0 = Instant::now();
        let mut p = policy(OnFailure::Fallback, 3, 5000);
        p.agent_silence = Some(ms(2000));
        let mut s = PipelineSupervisor::new(&p, None);
        s.start(t0);
        drain(&mut s);
        s.on_connected(t0 + ms(20));
        assert_eq!(
            s.poll_timeout(),
            None,
            "silence counts only after the prompt"
        );
        s.prompt_finished(t0 + ms(4000));
        assert_eq!(s.poll_timeout(), Some(t0 + ms(6000)));
        s.on_agent_output(t0 + ms(5500));
        assert_eq!(s.poll_timeout(), Some(t0 + ms(7500)));
        s.handle_timeout(t0 + ms(7499), &mut Fixed(0));
        assert!(drain(&mut s).is_empty());
        s.handle_timeout(t0 + ms(7500), &mut Fixed(0));
        assert_eq!(
            drain(&mut s),
            [
                SupervisorOutput::Disconnect,
                SupervisorOutput::GaveUp {
                    reason: GiveUpReason::AgentSilent,
                    action: FailureAction::HangUp
                }
            ]
        );
        assert_eq!(s.summary().failure.as_deref(), Some("agent-silent"));
    }

    /// Connects (answering each Connect at once), lets the agent speak, and
    /// drops the connection `up_for` later, until the supervisor gives up;
    /// returns how many connections were made.
    fn flap(s: &mut PipelineSupervisor, t0: Instant, up_for: Duration) -> u32 {
        let mut now = t0;
        let mut connections = 0;
        s.start(now);
        for _ in 0..1000 {
            let out = drain(s);
            if out
                .iter()
                .any(|o| matches!(o, SupervisorOutput::GaveUp { .. }))
            {
                return connections;
            }
            if !out
                .iter()
                .any(|o| matches!(o, SupervisorOutput::Connect { .. }))
            {
                now = s.poll_timeout().expect("a reconnect is scheduled");
                s.handle_timeout(now, &mut Fixed(0));
                continue;
            }
            s.on_connected(now);
            connections += 1;
            s.on_agent_output(now);
            now += up_for;
            s.on_failed(now, ConnectionFailure::Dropped, &mut Fixed(0));
        }
        panic!("never gave up");
    }

    #[test]
    fn an_agent_that_greets_and_drops_does_not_reconnect_forever() {
        let t0 = Instant::now();
        // Up 50 ms each time (it speaks, then drops): one outage, 3 reconnects.
        let mut s = PipelineSupervisor::new(&policy(OnFailure::Continue, 3, 5000), None);
        assert_eq!(
            flap(&mut s, t0, ms(50)),
            4,
            "the first connection and 3 reconnects"
        );
        // Up a whole window each time: each loss is a new outage, but the
        // call's total is bounded (10 × 3 reconnects).
        let mut s = PipelineSupervisor::new(&policy(OnFailure::Continue, 3, 1000), None);
        let connections = flap(&mut s, t0, ms(1000));
        assert_eq!(connections, 31, "the first connection and 30 reconnects");
        assert_eq!(s.summary().failure.as_deref(), Some("reconnects-exhausted"));
    }

    #[test]
    fn silence_timer_stops_on_hold_and_starts_afresh_on_resume() {
        let t0 = Instant::now();
        let mut p = policy(OnFailure::Fallback, 3, 5000);
        p.agent_silence = Some(ms(2000));
        let mut s = PipelineSupervisor::new(&p, None);
        s.prompt_finished(t0);
        s.start(t0);
        drain(&mut s);
        s.on_connected(t0);
        assert_eq!(s.poll_timeout(), Some(t0 + ms(2000)));
        s.set_held(t0 + ms(1000), true);
        assert_eq!(s.poll_timeout(), None, "no silence timer on hold");
        s.handle_timeout(t0 + ms(9000), &mut Fixed(0));
        assert!(drain(&mut s).is_empty(), "a long hold is not agent silence");
        s.set_held(t0 + ms(10_000), false);
        assert_eq!(s.poll_timeout(), Some(t0 + ms(12_000)));
        s.handle_timeout(t0 + ms(12_000), &mut Fixed(0));
        assert!(matches!(
            drain(&mut s).last(),
            Some(SupervisorOutput::GaveUp {
                reason: GiveUpReason::AgentSilent,
                ..
            })
        ));
    }

    #[test]
    fn no_silence_timer_while_reconnecting_and_none_when_off() {
        let t0 = Instant::now();
        let mut p = policy(OnFailure::Continue, 3, 5000);
        p.agent_silence = Some(ms(1000));
        let mut s = PipelineSupervisor::new(&p, None);
        s.prompt_finished(t0);
        s.start(t0);
        drain(&mut s);
        s.on_connected(t0 + ms(10));
        assert_eq!(s.poll_timeout(), Some(t0 + ms(1010)));
        s.on_failed(t0 + ms(500), ConnectionFailure::Dropped, &mut Fixed(0));
        assert_eq!(s.poll_timeout(), Some(t0 + ms(550)), "only the reconnect");

        let mut off = PipelineSupervisor::new(&policy(OnFailure::Continue, 3, 5000), None);
        off.prompt_finished(t0);
        off.start(t0);
        drain(&mut off);
        off.on_connected(t0);
        assert_eq!(off.poll_timeout(), None);
    }

    #[test]
    fn events_after_giving_up_are_ignored() {
        let t0 = Instant::now();
        let mut s = PipelineSupervisor::new(&policy(OnFailure::Continue, 0, 5000), None);
        s.start(t0);
        drain(&mut s);
        s.on_failed(t0, ConnectionFailure::Unreachable, &mut Fixed(0));
        drain(&mut s);
        s.on_connected(t0);
        s.on_failed(t0, ConnectionFailure::Dropped, &mut Fixed(0));
        s.fallback_played(t0);
        assert!(drain(&mut s).is_empty());
        assert_eq!(
            s.state(),
            ConnectionState::Failed(GiveUpReason::ReconnectsExhausted)
        );
    }
}
