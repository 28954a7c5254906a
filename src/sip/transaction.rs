//! RFC 3261 §17 transaction state machines, sans-IO, plus RFC 6026's
//! "Accepted" state for the INVITE server.
//!
//! Owns: the four transactions ([`ServerInviteTransaction`],
//! [`ServerNonInviteTransaction`], [`ClientInviteTransaction`],
//! [`ClientNonInviteTransaction`]), the [`TransactionKey`] used to match
//! messages to them, and a bounded per-call [`TransactionTable`].
//!
//! Must not touch: message parsing or building (`crate::sip::message`),
//! sockets, the clock. Outbound messages are opaque, already-encoded
//! [`Bytes`] built by the transaction user (TU: the dialog/call layer); a
//! transaction stores them and retransmits exactly those bytes. Inbound
//! messages arrive as method calls (`on_request_retransmission`, `on_ack`,
//! `on_response(status)`), after the TU has parsed them and found the
//! transaction by its [`TransactionKey`].
//!
//! Driving a transaction (the str0m / quinn-proto loop): after every input
//! (`new`, `send_*`, `on_*`, `handle_timeout`) drain [`poll_output`] until it
//! returns `None`, then sleep until [`poll_timeout`] and call
//! `handle_timeout(now)`. Once [`TransactionEvent::Terminated`] is emitted
//! the transaction is inert and can be dropped.
//!
//! Decisions this module makes (the RFC leaves them to the implementation):
//! - **2xx retransmission is owned here**, not by the dialog. A 2xx moves the
//!   INVITE server transaction to RFC 6026 "Accepted", where Timer G
//!   retransmits the 2xx at T1, 2·T1, 4·T1 … capped at T2 (RFC 3261
//!   §13.3.1.4) until [`ServerInviteTransaction::on_ack`]. This happens on
//!   reliable transports too: the 2xx and its ACK are end-to-end and a proxy
//!   on the path may use UDP. With no ACK, Timer H (64·T1 after the 2xx)
//!   emits [`TransactionEvent::TimedOut`]: the TU ends the call with a BYE.
//!   The ACK for a 2xx carries a new branch, so the TU finds this
//!   transaction through its dialog (Call-ID, tags, CSeq number) and calls
//!   `on_ack`. Timer L (64·T1) keeps the transaction in Accepted to absorb
//!   INVITE retransmissions (answered with the 2xx again) and ACK
//!   retransmissions, so a retransmitted INVITE never creates a second call.
//! - **Only the first ACK is surfaced**: [`TransactionEvent::AckReceived`]
//!   is emitted for the first ACK (non-2xx or 2xx); every later ACK is
//!   absorbed silently.
//! - **The client INVITE gets the ACK for a non-2xx from a closure** passed
//!   to [`ClientInviteTransaction::on_response`], called once, on the first
//!   3xx–6xx final response; the transaction resends those bytes for every
//!   retransmission of that final response. A 2xx terminates the client
//!   transaction at once (RFC 3261 §17.1.1.2); the TU ACKs the 2xx and
//!   handles 2xx retransmissions through the dialog.
//! - **Deviation** (re-INVITEs only): RFC 3261 lets an INVITE client
//!   transaction wait in Proceeding forever. A re-INVITE is answered without
//!   a human, so for those ([`ClientInviteTransaction::new`]) Timer B keeps
//!   running in Proceeding and a missing final response ends in
//!   `TimedOut(Timer::B)` at 64·T1. An initial INVITE that rings a person
//!   ([`ClientInviteTransaction::new_initial`], an outbound call) stops
//!   Timer B at the first provisional as the RFC says; its TU bounds the
//!   ringing (answer timeout, then CANCEL).
//!
//! [`poll_output`]: ServerInviteTransaction::poll_output
//! [`poll_timeout`]: ServerInviteTransaction::poll_timeout

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use bytes::Bytes;

use crate::sip::timer::{TIMER_D_UNRELIABLE, Timer, TimerConfig, TimerTable};

/// The RFC 3261 branch magic cookie (§8.1.1.7).
pub const MAGIC_COOKIE: &str = "z9hG4bK";

/// Errors of this module. All are caller misuse or unsupported input; a
/// retransmission or a stray message is never an error, it is absorbed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TransactionError {
    /// The status code is outside what this operation accepts.
    #[error("status code {status} is not valid for {operation}")]
    InvalidStatus {
        /// The rejected status code.
        status: u16,
        /// The operation it was passed to.
        operation: &'static str,
    },
    /// The operation is not allowed in the transaction's current state
    /// (e.g. a second final response).
    #[error("{operation} is not allowed in state {state}")]
    InvalidState {
        /// The rejected operation.
        operation: &'static str,
        /// The state name.
        state: &'static str,
    },
    /// The branch lacks the `z9hG4bK` cookie: RFC 2543 matching (§17.2.3,
    /// by Request-URI, tags, Call-ID, CSeq and Via) is the TU's job.
    #[error("Via branch lacks the RFC 3261 magic cookie")]
    NotRfc3261Branch,
    /// Branch or sent-by is empty.
    #[error("Via branch and sent-by must be non-empty")]
    EmptyKeyPart,
    /// The [`TransactionTable`] holds its maximum number of transactions.
    #[error("transaction table is full ({max} transactions)")]
    TableFull {
        /// The configured maximum.
        max: usize,
    },
    /// A transaction with this key and role already exists.
    #[error("a transaction with this key already exists")]
    DuplicateKey,
}

/// The method part of a [`TransactionKey`].
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum TxMethod {
    /// INVITE, and the ACK for a non-2xx final response, which matches the
    /// INVITE transaction (§17.2.3).
    Invite,
    /// Any other method, kept exactly (SIP methods are case-sensitive).
    /// CANCEL is its own transaction here; see
    /// [`TransactionKey::cancelled_invite`].
    NonInvite(String),
}

/// Identifies a transaction (RFC 3261 §17.1.3 for clients, §17.2.3 for
/// servers): the top Via branch and sent-by plus the method.
///
/// For a server transaction `sent_by` is the peer's top Via `host[:port]`;
/// for a client transaction it is ours, and responses are matched with the
/// branch of their top Via and the method of their CSeq.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct TransactionKey {
    /// The top Via `branch` parameter, compared case-sensitively.
    pub branch: String,
    /// The top Via sent-by, `host[:port]`, ASCII-lowercased.
    pub sent_by: String,
    /// INVITE (also for ACK) or another method.
    pub method: TxMethod,
}

impl TransactionKey {
    /// Builds a key from a request's (or, for CSeq, a response's) parts.
    ///
    /// `method` "INVITE" and "ACK" both give [`TxMethod::Invite`]; any other
    /// method, including CANCEL, gives `NonInvite(method)`.
    pub fn new(branch: &str, sent_by: &str, method: &str) -> Result<Self, TransactionError> {
        if branch.is_empty() || sent_by.is_empty() {
            return Err(TransactionError::EmptyKeyPart);
        }
        if !branch.starts_with(MAGIC_COOKIE) {
            return Err(TransactionError::NotRfc3261Branch);
        }
        let method = match method {
            "INVITE" | "ACK" => TxMethod::Invite,
            other => TxMethod::NonInvite(other.to_owned()),
        };
        Ok(Self {
            branch: branch.to_owned(),
            sent_by: sent_by.to_ascii_lowercase(),
            method,
        })
    }

    /// For a CANCEL's key, the key of the INVITE it cancels (same branch and
    /// sent-by, §9.2). `None` for any other method.
    pub fn cancelled_invite(&self) -> Option<TransactionKey> {
        match &self.method {
            TxMethod::NonInvite(m) if m == "CANCEL" => Some(TransactionKey {
                branch: self.branch.clone(),
                sent_by: self.sent_by.clone(),
                method: TxMethod::Invite,
            }),
            _ => None,
        }
    }
}

/// Whether the transport below guarantees delivery (TCP, TLS) or not (UDP).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    /// TCP/TLS: no retransmission Timers A/E/G (non-2xx); I, J, K, D are zero.
    Reliable,
    /// UDP: retransmissions and the full wait timers.
    Unreliable,
}

/// What the transaction asks of its driver.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TransactionOutput {
    /// Send these bytes to the transaction's peer.
    Transmit(Bytes),
    /// Tell the TU.
    Event(TransactionEvent),
}

/// Events for the transaction user.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TransactionEvent {
    /// Client: a response the TU must see (every 1xx, the first final).
    ResponseReceived(u16),
    /// Server INVITE: the first ACK arrived (for a non-2xx: the transaction
    /// absorbed it and entered Confirmed; for a 2xx: retransmission stopped).
    /// Emitted at most once.
    AckReceived,
    /// The transaction timed out: B or F (no final response), or H (no ACK;
    /// for a 2xx the TU ends the call with a BYE).
    TimedOut(Timer),
    /// The driver reported a transport failure (§17.1.4, §17.2.4).
    TransportError,
    /// The transaction ended; always the last output, emitted once.
    Terminated,
}

/// What a transaction still owes the network once it only absorbs
/// retransmissions: the bytes resent, unchanged, to each retransmission of its
/// request (none for an ACK-absorbing or client transaction) and when it ends.
/// The owner may then drop the transaction and keep only this (see
/// [`crate::call::linger`]): a finished call need not hold its whole state
/// for the 32 s of Timer J.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Residue {
    /// Resent for every retransmission of the request.
    pub resend: Option<Bytes>,
    /// When the transaction would have terminated.
    pub until: Instant,
}

/// Where a transaction is with respect to [`Residue`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Settled {
    /// Terminated: nothing is owed.
    Done,
    /// Only absorbs (and answers) retransmissions until `until`.
    Absorbing(Residue),
    /// It still sends on its own (retransmissions, timeouts the TU must see).
    Active,
}

impl Settled {
    fn absorbing(resend: Option<&Bytes>, until: Option<Instant>) -> Self {
        match until {
            Some(until) => Settled::Absorbing(Residue {
                resend: resend.cloned(),
                until,
            }),
            // No timer left: it would terminate at its next input.
            None => Settled::Done,
        }
    }
}

fn check_status(
    status: u16,
    range: std::ops::RangeInclusive<u16>,
    operation: &'static str,
) -> Result<(), TransactionError> {
    if range.contains(&status) {
        Ok(())
    } else {
        Err(TransactionError::InvalidStatus { status, operation })
    }
}

/// State and plumbing shared by the four transactions.
#[derive(Debug, Clone)]
struct Core {
    key: TransactionKey,
    transport: Transport,
    cfg: TimerConfig,
    timers: TimerTable,
    out: VecDeque<TransactionOutput>,
    terminated: bool,
}

impl Core {
    fn new(key: TransactionKey, transport: Transport, cfg: TimerConfig) -> Self {
        Self {
            key,
            transport,
            cfg,
            timers: TimerTable::default(),
            out: VecDeque::new(),
            terminated: false,
        }
    }

    /// A client transaction's start (§17.1.1.2 / §17.1.2.2): the request goes
    /// out at once, `retransmit` (A or E) fires at T1 on unreliable
    /// transports, `timeout` (B or F) at 64·T1 on every transport.
    fn start_client(
        now: Instant,
        key: TransactionKey,
        transport: Transport,
        cfg: TimerConfig,
        request: &Bytes,
        retransmit: Timer,
        timeout: Timer,
    ) -> Self {
        let mut core = Core::new(key, transport, cfg);
        core.transmit(request);
        if !core.reliable() {
            core.timers.set(retransmit, now + cfg.t1());
        }
        core.timers.set(timeout, now + cfg.timeout_64_t1());
        core
    }

    fn reliable(&self) -> bool {
        self.transport == Transport::Reliable
    }

    fn transmit(&mut self, bytes: &Bytes) {
        // Bytes::clone is a reference-count bump: the exact bytes are resent.
        self.out
            .push_back(TransactionOutput::Transmit(bytes.clone()));
    }

    fn event(&mut self, event: TransactionEvent) {
        self.out.push_back(TransactionOutput::Event(event));
    }

    fn terminate(&mut self) {
        if !self.terminated {
            self.terminated = true;
            self.timers.stop_all();
            self.event(TransactionEvent::Terminated);
        }
    }

    /// Arms `timer` at `now + wait`, or terminates at once when `wait` is
    /// zero (the reliable-transport value of Timers D, I, J and K).
    fn wait_then_terminate(&mut self, now: Instant, timer: Timer, wait: Duration) {
        if wait.is_zero() {
            self.terminate();
        } else {
            self.timers.set(timer, now + wait);
        }
    }

    fn next_interval(&self, interval: Duration) -> Duration {
        interval.saturating_mul(2).min(self.cfg.t2())
    }
}

macro_rules! common_accessors {
    ($state:ty) => {
        /// Next output for the driver, `None` when drained.
        pub fn poll_output(&mut self) -> Option<TransactionOutput> {
            self.core.out.pop_front()
        }

        /// When [`handle_timeout`](Self::handle_timeout) must next be called.
        pub fn poll_timeout(&self) -> Option<Instant> {
            self.core.timers.next_timeout()
        }

        /// The current state.
        pub fn state(&self) -> $state {
            self.state
        }

        /// Whether the transaction has terminated.
        pub fn is_terminated(&self) -> bool {
            self.core.terminated
        }

        /// The key this transaction was created with.
        pub fn key(&self) -> &TransactionKey {
            &self.core.key
        }

        /// The driver could not send (§17.1.4, §17.2.4): emits
        /// [`TransactionEvent::TransportError`] and terminates.
        pub fn on_transport_error(&mut self, now: Instant) {
            let _ = now;
            if !self.core.terminated {
                self.core.event(TransactionEvent::TransportError);
                self.state = <$state>::Terminated;
                self.core.terminate();
            }
        }
    };
}

// ---------------------------------------------------------------------------
// INVITE server (§17.2.1, RFC 6026 §7.1)
// ---------------------------------------------------------------------------

/// States of the INVITE server transaction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ServerInviteState {
    /// Before a final response; provisionals may be sent.
    Proceeding,
    /// A 3xx–6xx was sent; waiting for the ACK (Timers G, H).
    Completed,
    /// The ACK for the 3xx–6xx arrived; absorbing ACK retransmissions (Timer I).
    Confirmed,
    /// RFC 6026: a 2xx was sent; retransmitting it until the ACK (G, H),
    /// absorbing retransmissions until Timer L.
    Accepted,
    /// Done.
    Terminated,
}

impl ServerInviteState {
    fn name(self) -> &'static str {
        match self {
            Self::Proceeding => "Proceeding",
            Self::Completed => "Completed",
            Self::Confirmed => "Confirmed",
            Self::Accepted => "Accepted",
            Self::Terminated => "Terminated",
        }
    }
}

/// The INVITE server transaction: the bridge answering an incoming INVITE.
#[derive(Debug, Clone)]
pub struct ServerInviteTransaction {
    core: Core,
    state: ServerInviteState,
    /// The most recent response sent (provisional or final).
    last_response: Option<Bytes>,
    /// Current Timer G interval.
    g_interval: Duration,
    ack_seen: bool,
}

impl ServerInviteTransaction {
    /// Creates the transaction for a new INVITE. When `trying` is `Some`,
    /// those bytes (a 100 Trying) are transmitted at once and become the
    /// response resent to INVITE retransmissions.
    pub fn new(
        now: Instant,
        key: TransactionKey,
        transport: Transport,
        cfg: TimerConfig,
        trying: Option<Bytes>,
    ) -> Self {
        let _ = now;
        let mut tx = Self {
            core: Core::new(key, transport, cfg),
            state: ServerInviteState::Proceeding,
            last_response: None,
            g_interval: cfg.t1(),
            ack_seen: false,
        };
        if let Some(trying) = trying {
            tx.core.transmit(&trying);
            tx.last_response = Some(trying);
        }
        tx
    }

    /// Sends a provisional (1xx) response. Only in Proceeding.
    pub fn send_provisional(&mut self, now: Instant, resp: Bytes) -> Result<(), TransactionError> {
        let _ = now;
        if self.state != ServerInviteState::Proceeding {
            return Err(self.invalid_state("send_provisional"));
        }
        self.core.transmit(&resp);
        self.last_response = Some(resp);
        Ok(())
    }

    /// Sends the final response (`status` 200–699). Only in Proceeding.
    ///
    /// 2xx → Accepted: Timer G retransmits it at T1, 2·T1, … capped at T2
    /// (on every transport), Timer H times out at 64·T1, Timer L ends the
    /// transaction at 64·T1. 3xx–6xx → Completed: Timer G (unreliable only)
    /// and Timer H (64·T1).
    pub fn send_final(
        &mut self,
        now: Instant,
        status: u16,
        resp: Bytes,
    ) -> Result<(), TransactionError> {
        check_status(status, 200..=699, "send_final")?;
        if self.state != ServerInviteState::Proceeding {
            return Err(self.invalid_state("send_final"));
        }
        self.core.transmit(&resp);
        self.last_response = Some(resp);
        let timeout = self.core.cfg.timeout_64_t1();
        self.g_interval = self.core.cfg.t1();
        if (200..300).contains(&status) {
            self.state = ServerInviteState::Accepted;
            self.core.timers.set(Timer::G, now + self.g_interval);
            self.core.timers.set(Timer::H, now + timeout);
            self.core.timers.set(Timer::L, now + timeout);
        } else {
            self.state = ServerInviteState::Completed;
            if !self.core.reliable() {
                self.core.timers.set(Timer::G, now + self.g_interval);
            }
            self.core.timers.set(Timer::H, now + timeout);
        }
        Ok(())
    }

    /// A retransmission of the INVITE arrived: resend the most recent
    /// response (nothing if none was sent yet, or in Confirmed). Never
    /// surfaced to the TU.
    pub fn on_request_retransmission(&mut self, now: Instant) {
        let _ = now;
        match self.state {
            ServerInviteState::Proceeding
            | ServerInviteState::Completed
            | ServerInviteState::Accepted => {
                if let Some(resp) = &self.last_response {
                    let resp = resp.clone();
                    self.core.transmit(&resp);
                }
            }
            ServerInviteState::Confirmed | ServerInviteState::Terminated => {}
        }
    }

    /// An ACK for this INVITE arrived (for a non-2xx: matched by key; for a
    /// 2xx: matched by the TU through the dialog).
    ///
    /// Completed → Confirmed with Timer I (T4, or terminate at once on a
    /// reliable transport). Accepted: retransmission stops, Timer L keeps
    /// absorbing. [`TransactionEvent::AckReceived`] is emitted for the first
    /// ACK only; an ACK in Proceeding (no final response yet) is ignored.
    pub fn on_ack(&mut self, now: Instant) {
        match self.state {
            ServerInviteState::Completed => {
                self.ack_seen = true;
                self.core.event(TransactionEvent::AckReceived);
                self.core.timers.stop(Timer::G);
                self.core.timers.stop(Timer::H);
                self.state = ServerInviteState::Confirmed;
                let wait = if self.core.reliable() {
                    Duration::ZERO
                } else {
                    self.core.cfg.t4()
                };
                self.core.wait_then_terminate(now, Timer::I, wait);
                if self.core.terminated {
                    self.state = ServerInviteState::Terminated;
                }
            }
            ServerInviteState::Accepted if !self.ack_seen => {
                self.ack_seen = true;
                self.core.event(TransactionEvent::AckReceived);
                self.core.timers.stop(Timer::G);
                self.core.timers.stop(Timer::H);
            }
            ServerInviteState::Accepted
            | ServerInviteState::Proceeding
            | ServerInviteState::Confirmed
            | ServerInviteState::Terminated => {}
        }
    }

    /// Fires every timer due at `now`.
    pub fn handle_timeout(&mut self, now: Instant) {
        while let Some(timer) = self.core.timers.pop_expired(now) {
            match (self.state, timer) {
                (ServerInviteState::Completed | ServerInviteState::Accepted, Timer::G) => {
                    if let Some(resp) = &self.last_response {
                        let resp = resp.clone();
                        self.core.transmit(&resp);
                    }
                    self.g_interval = self.core.next_interval(self.g_interval);
                    self.core.timers.set(Timer::G, now + self.g_interval);
                }
                (ServerInviteState::Completed | ServerInviteState::Accepted, Timer::H) => {
                    self.core.event(TransactionEvent::TimedOut(Timer::H));
                    self.state = ServerInviteState::Terminated;
                    self.core.terminate();
                }
                (ServerInviteState::Confirmed, Timer::I)
                | (ServerInviteState::Accepted, Timer::L) => {
                    self.state = ServerInviteState::Terminated;
                    self.core.terminate();
                }
                // A timer left over from an earlier state: already stopped
                // by pop_expired, nothing to do.
                _ => {}
            }
        }
    }

    fn invalid_state(&self, operation: &'static str) -> TransactionError {
        TransactionError::InvalidState {
            operation,
            state: self.state.name(),
        }
    }

    /// See [`Settled`]: Confirmed absorbs ACKs (Timer I); Accepted, once the
    /// ACK is in, answers INVITE retransmissions with the 2xx (Timer L).
    pub fn settled(&self) -> Settled {
        match self.state {
            ServerInviteState::Terminated => Settled::Done,
            ServerInviteState::Confirmed => Settled::absorbing(None, self.poll_timeout()),
            ServerInviteState::Accepted if self.ack_seen => {
                Settled::absorbing(self.last_response.as_ref(), self.poll_timeout())
            }
            ServerInviteState::Proceeding
            | ServerInviteState::Completed
            | ServerInviteState::Accepted => Settled::Active,
        }
    }

    common_accessors!(ServerInviteState);
}

// ---------------------------------------------------------------------------
// Non-INVITE server (§17.2.2)
// ---------------------------------------------------------------------------

/// States of the non-INVITE server transaction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ServerNonInviteState {
    /// Request received, nothing sent yet.
    Trying,
    /// A provisional was sent.
    Proceeding,
    /// The final response was sent; absorbing retransmissions (Timer J).
    Completed,
    /// Done.
    Terminated,
}

impl ServerNonInviteState {
    fn name(self) -> &'static str {
        match self {
            Self::Trying => "Trying",
            Self::Proceeding => "Proceeding",
            Self::Completed => "Completed",
            Self::Terminated => "Terminated",
        }
    }
}

/// The non-INVITE server transaction (BYE, CANCEL, OPTIONS, … received).
#[derive(Debug, Clone)]
pub struct ServerNonInviteTransaction {
    core: Core,
    state: ServerNonInviteState,
    last_response: Option<Bytes>,
}

impl ServerNonInviteTransaction {
    /// Creates the transaction for a new non-INVITE request.
    pub fn new(now: Instant, key: TransactionKey, transport: Transport, cfg: TimerConfig) -> Self {
        let _ = now;
        Self {
            core: Core::new(key, transport, cfg),
            state: ServerNonInviteState::Trying,
            last_response: None,
        }
    }

    /// Sends a provisional response: Trying/Proceeding → Proceeding.
    pub fn send_provisional(&mut self, now: Instant, resp: Bytes) -> Result<(), TransactionError> {
        let _ = now;
        match self.state {
            ServerNonInviteState::Trying | ServerNonInviteState::Proceeding => {
                self.core.transmit(&resp);
                self.last_response = Some(resp);
                self.state = ServerNonInviteState::Proceeding;
                Ok(())
            }
            _ => Err(self.invalid_state("send_provisional")),
        }
    }

    /// Sends the final response (`status` 200–699) → Completed, Timer J
    /// (64·T1 unreliable; reliable terminates at once).
    pub fn send_final(
        &mut self,
        now: Instant,
        status: u16,
        resp: Bytes,
    ) -> Result<(), TransactionError> {
        check_status(status, 200..=699, "send_final")?;
        match self.state {
            ServerNonInviteState::Trying | ServerNonInviteState::Proceeding => {
                self.core.transmit(&resp);
                self.last_response = Some(resp);
                self.state = ServerNonInviteState::Completed;
                let wait = if self.core.reliable() {
                    Duration::ZERO
                } else {
                    self.core.cfg.timeout_64_t1()
                };
                self.core.wait_then_terminate(now, Timer::J, wait);
                if self.core.terminated {
                    self.state = ServerNonInviteState::Terminated;
                }
                Ok(())
            }
            _ => Err(self.invalid_state("send_final")),
        }
    }

    /// A retransmission of the request arrived: absorbed in Trying, the last
    /// response is resent in Proceeding and Completed.
    pub fn on_request_retransmission(&mut self, now: Instant) {
        let _ = now;
        if matches!(
            self.state,
            ServerNonInviteState::Proceeding | ServerNonInviteState::Completed
        ) && let Some(resp) = &self.last_response
        {
            let resp = resp.clone();
            self.core.transmit(&resp);
        }
    }

    /// Fires every timer due at `now`.
    pub fn handle_timeout(&mut self, now: Instant) {
        while let Some(timer) = self.core.timers.pop_expired(now) {
            if (self.state, timer) == (ServerNonInviteState::Completed, Timer::J) {
                self.state = ServerNonInviteState::Terminated;
                self.core.terminate();
            }
        }
    }

    fn invalid_state(&self, operation: &'static str) -> TransactionError {
        TransactionError::InvalidState {
            operation,
            state: self.state.name(),
        }
    }

    /// See [`Settled`]: Completed answers retransmissions with its final
    /// response until Timer J.
    pub fn settled(&self) -> Settled {
        match self.state {
            ServerNonInviteState::Terminated => Settled::Done,
            ServerNonInviteState::Completed => {
                Settled::absorbing(self.last_response.as_ref(), self.poll_timeout())
            }
            ServerNonInviteState::Trying | ServerNonInviteState::Proceeding => Settled::Active,
        }
    }

    common_accessors!(ServerNonInviteState);
}

// ---------------------------------------------------------------------------
// INVITE client (§17.1.1)
// ---------------------------------------------------------------------------

/// States of the INVITE client transaction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientInviteState {
    /// INVITE sent, no response yet (Timers A, B).
    Calling,
    /// A provisional arrived (Timer B still runs; see the module docs).
    Proceeding,
    /// A 3xx–6xx arrived and was ACKed; absorbing retransmissions (Timer D).
    Completed,
    /// Done.
    Terminated,
}

/// The INVITE client transaction (our re-INVITEs).
#[derive(Debug, Clone)]
pub struct ClientInviteTransaction {
    core: Core,
    state: ClientInviteState,
    request: Bytes,
    ack: Option<Bytes>,
    a_interval: Duration,
    /// RFC 3261 behaviour: a provisional stops Timer B (initial INVITEs).
    wait_in_proceeding: bool,
}

impl ClientInviteTransaction {
    /// [`ClientInviteTransaction::new`] for an initial INVITE that may ring a
    /// person: the first provisional stops Timer B, so the transaction waits
    /// in Proceeding until a final response or the TU's CANCEL is answered.
    pub fn new_initial(
        now: Instant,
        key: TransactionKey,
        transport: Transport,
        cfg: TimerConfig,
        request: Bytes,
    ) -> Self {
        let mut txn = Self::new(now, key, transport, cfg, request);
        txn.wait_in_proceeding = true;
        txn
    }

    /// Sends `request` at once. Unreliable: Timer A at T1; always Timer B at 64·T1.
    pub fn new(
        now: Instant,
        key: TransactionKey,
        transport: Transport,
        cfg: TimerConfig,
        request: Bytes,
    ) -> Self {
        let core = Core::start_client(now, key, transport, cfg, &request, Timer::A, Timer::B);
        Self {
            core,
            state: ClientInviteState::Calling,
            request,
            ack: None,
            a_interval: cfg.t1(),
            wait_in_proceeding: false,
        }
    }

    /// A response (status 100–699) matching this transaction arrived.
    ///
    /// - 1xx in Calling/Proceeding → Proceeding, surfaced.
    /// - 2xx in Calling/Proceeding → surfaced, Terminated (the TU ACKs it).
    /// - 3xx–6xx in Calling/Proceeding → `ack_for_non2xx()` is called once,
    ///   its bytes transmitted, the response surfaced, → Completed with
    ///   Timer D (32 s unreliable, terminate at once reliable).
    /// - 3xx–6xx in Completed (a retransmission) → the same ACK is resent,
    ///   nothing surfaced.
    /// - anything else is absorbed.
    pub fn on_response<F: FnOnce() -> Bytes>(
        &mut self,
        now: Instant,
        status: u16,
        ack_for_non2xx: F,
    ) -> Result<(), TransactionError> {
        check_status(status, 100..=699, "on_response")?;
        match self.state {
            ClientInviteState::Calling | ClientInviteState::Proceeding => {
                self.core.timers.stop(Timer::A);
                self.core.event(TransactionEvent::ResponseReceived(status));
                match status {
                    100..=199 => {
                        self.state = ClientInviteState::Proceeding;
                        if self.wait_in_proceeding {
                            self.core.timers.stop(Timer::B);
                        }
                    }
                    200..=299 => {
                        self.state = ClientInviteState::Terminated;
                        self.core.terminate();
                    }
                    _ => {
                        let ack = ack_for_non2xx();
                        self.core.transmit(&ack);
                        self.ack = Some(ack);
                        self.core.timers.stop(Timer::B);
                        self.state = ClientInviteState::Completed;
                        let wait = if self.core.reliable() {
                            Duration::ZERO
                        } else {
                            TIMER_D_UNRELIABLE
                        };
                        self.core.wait_then_terminate(now, Timer::D, wait);
                        if self.core.terminated {
                            self.state = ClientInviteState::Terminated;
                        }
                    }
                }
            }
            ClientInviteState::Completed => {
                if status >= 300
                    && let Some(ack) = &self.ack
                {
                    let ack = ack.clone();
                    self.core.transmit(&ack);
                }
            }
            ClientInviteState::Terminated => {}
        }
        Ok(())
    }

    /// Fires every timer due at `now`.
    pub fn handle_timeout(&mut self, now: Instant) {
        while let Some(timer) = self.core.timers.pop_expired(now) {
            match (self.state, timer) {
                (ClientInviteState::Calling, Timer::A) => {
                    let request = self.request.clone();
                    self.core.transmit(&request);
                    // Timer A doubles without the T2 cap (§17.1.1.2).
                    self.a_interval = self.a_interval.saturating_mul(2);
                    self.core.timers.set(Timer::A, now + self.a_interval);
                }
                (ClientInviteState::Calling | ClientInviteState::Proceeding, Timer::B) => {
                    self.core.event(TransactionEvent::TimedOut(Timer::B));
                    self.state = ClientInviteState::Terminated;
                    self.core.terminate();
                }
                (ClientInviteState::Completed, Timer::D) => {
                    self.state = ClientInviteState::Terminated;
                    self.core.terminate();
                }
                _ => {}
            }
        }
    }

    /// See [`Settled`]: Done once terminated; otherwise Active (in
    /// Completed it resends its ACK to response retransmissions, which a
    /// [`Residue`] does not express).
    pub fn settled(&self) -> Settled {
        if self.state == ClientInviteState::Terminated {
            Settled::Done
        } else {
            Settled::Active
        }
    }

    common_accessors!(ClientInviteState);
}

// ---------------------------------------------------------------------------
// Non-INVITE client (§17.1.2)
// ---------------------------------------------------------------------------

/// States of the non-INVITE client transaction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientNonInviteState {
    /// Request sent (Timers E, F).
    Trying,
    /// A provisional arrived; E now retransmits every T2.
    Proceeding,
    /// The final response arrived; absorbing retransmissions (Timer K).
    Completed,
    /// Done.
    Terminated,
}

/// The non-INVITE client transaction (our BYE, OPTIONS, UPDATE, …).
#[derive(Debug, Clone)]
pub struct ClientNonInviteTransaction {
    core: Core,
    state: ClientNonInviteState,
    request: Bytes,
    e_interval: Duration,
}

impl ClientNonInviteTransaction {
    /// Sends `request` at once. Unreliable: Timer E at T1; always Timer F at 64·T1.
    pub fn new(
        now: Instant,
        key: TransactionKey,
        transport: Transport,
        cfg: TimerConfig,
        request: Bytes,
    ) -> Self {
        let core = Core::start_client(now, key, transport, cfg, &request, Timer::E, Timer::F);
        Self {
            core,
            state: ClientNonInviteState::Trying,
            request,
            e_interval: cfg.t1(),
        }
    }

    /// A response (status 100–699) matching this transaction arrived.
    ///
    /// 1xx in Trying/Proceeding → Proceeding, surfaced (Timer E keeps its
    /// deadline; later firings use T2). 200–699 in Trying/Proceeding →
    /// surfaced, Completed with Timer K (T4 unreliable, terminate at once
    /// reliable). Anything in Completed is absorbed.
    pub fn on_response(&mut self, now: Instant, status: u16) -> Result<(), TransactionError> {
        check_status(status, 100..=699, "on_response")?;
        match self.state {
            ClientNonInviteState::Trying | ClientNonInviteState::Proceeding => {
                self.core.event(TransactionEvent::ResponseReceived(status));
                if status < 200 {
                    self.state = ClientNonInviteState::Proceeding;
                } else {
                    self.core.timers.stop(Timer::E);
                    self.core.timers.stop(Timer::F);
                    self.state = ClientNonInviteState::Completed;
                    let wait = if self.core.reliable() {
                        Duration::ZERO
                    } else {
                        self.core.cfg.t4()
                    };
                    self.core.wait_then_terminate(now, Timer::K, wait);
                    if self.core.terminated {
                        self.state = ClientNonInviteState::Terminated;
                    }
                }
            }
            ClientNonInviteState::Completed | ClientNonInviteState::Terminated => {}
        }
        Ok(())
    }

    /// Fires every timer due at `now`.
    pub fn handle_timeout(&mut self, now: Instant) {
        while let Some(timer) = self.core.timers.pop_expired(now) {
            match (self.state, timer) {
                (ClientNonInviteState::Trying | ClientNonInviteState::Proceeding, Timer::E) => {
                    let request = self.request.clone();
                    self.core.transmit(&request);
                    self.e_interval = if self.state == ClientNonInviteState::Proceeding {
                        self.core.cfg.t2()
                    } else {
                        self.core.next_interval(self.e_interval)
                    };
                    self.core.timers.set(Timer::E, now + self.e_interval);
                }
                (ClientNonInviteState::Trying | ClientNonInviteState::Proceeding, Timer::F) => {
                    self.core.event(TransactionEvent::TimedOut(Timer::F));
                    self.state = ClientNonInviteState::Terminated;
                    self.core.terminate();
                }
                (ClientNonInviteState::Completed, Timer::K) => {
                    self.state = ClientNonInviteState::Terminated;
                    self.core.terminate();
                }
                _ => {}
            }
        }
    }

    /// See [`Settled`]: Completed absorbs response retransmissions until
    /// Timer K.
    pub fn settled(&self) -> Settled {
        match self.state {
            ClientNonInviteState::Terminated => Settled::Done,
            ClientNonInviteState::Completed => Settled::absorbing(None, self.poll_timeout()),
            ClientNonInviteState::Trying | ClientNonInviteState::Proceeding => Settled::Active,
        }
    }

    common_accessors!(ClientNonInviteState);
}

// ---------------------------------------------------------------------------
// A bounded table of transactions (one per call task)
// ---------------------------------------------------------------------------

/// Any of the four transactions, for storing them together.
#[derive(Debug, Clone)]
pub enum Transaction {
    /// INVITE server.
    ServerInvite(ServerInviteTransaction),
    /// Non-INVITE server.
    ServerNonInvite(ServerNonInviteTransaction),
    /// INVITE client.
    ClientInvite(ClientInviteTransaction),
    /// Non-INVITE client.
    ClientNonInvite(ClientNonInviteTransaction),
}

/// Which side of a transaction we are: keys are unique per role only (a
/// peer's branch could equal one of ours).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    /// We sent the request.
    Client,
    /// We received the request.
    Server,
}

macro_rules! each {
    ($tx:expr, $t:ident => $body:expr) => {
        match $tx {
            Transaction::ServerInvite($t) => $body,
            Transaction::ServerNonInvite($t) => $body,
            Transaction::ClientInvite($t) => $body,
            Transaction::ClientNonInvite($t) => $body,
        }
    };
}

impl Transaction {
    /// Client or server.
    pub fn role(&self) -> Role {
        match self {
            Self::ServerInvite(_) | Self::ServerNonInvite(_) => Role::Server,
            Self::ClientInvite(_) | Self::ClientNonInvite(_) => Role::Client,
        }
    }

    /// The transaction's key.
    pub fn key(&self) -> &TransactionKey {
        each!(self, t => t.key())
    }

    /// See the per-type `handle_timeout`.
    pub fn handle_timeout(&mut self, now: Instant) {
        each!(self, t => t.handle_timeout(now))
    }

    /// See the per-type `poll_output`.
    pub fn poll_output(&mut self) -> Option<TransactionOutput> {
        each!(self, t => t.poll_output())
    }

    /// See the per-type `poll_timeout`.
    pub fn poll_timeout(&self) -> Option<Instant> {
        each!(self, t => t.poll_timeout())
    }

    /// Whether it has terminated.
    pub fn is_terminated(&self) -> bool {
        each!(self, t => t.is_terminated())
    }

    /// See the per-type `on_transport_error`.
    pub fn on_transport_error(&mut self, now: Instant) {
        each!(self, t => t.on_transport_error(now))
    }
}

/// The transactions of one call (or of the stateless front door), bounded.
///
/// Lookups are by `(Role, TransactionKey)`. `handle_timeout` and
/// `next_timeout` scan every entry: the table is meant to hold a handful of
/// transactions per call task, not every transaction of the daemon.
#[derive(Debug, Clone)]
pub struct TransactionTable {
    max: usize,
    entries: HashMap<(Role, TransactionKey), Transaction>,
}

impl TransactionTable {
    /// An empty table holding at most `max` transactions.
    pub fn new(max: usize) -> Self {
        Self {
            max,
            entries: HashMap::new(),
        }
    }

    /// Number of transactions held (terminated ones included until drained).
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether the table is empty.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Adds a transaction; fails when full or when its key is taken.
    pub fn insert(&mut self, tx: Transaction) -> Result<(), TransactionError> {
        let id = (tx.role(), tx.key().clone());
        if self.entries.contains_key(&id) {
            return Err(TransactionError::DuplicateKey);
        }
        if self.entries.len() >= self.max {
            return Err(TransactionError::TableFull { max: self.max });
        }
        self.entries.insert(id, tx);
        Ok(())
    }

    /// The transaction with this role and key.
    pub fn get_mut(&mut self, role: Role, key: &TransactionKey) -> Option<&mut Transaction> {
        self.entries.get_mut(&(role, key.clone()))
    }

    /// The transaction with this role and key.
    pub fn get(&self, role: Role, key: &TransactionKey) -> Option<&Transaction> {
        self.entries.get(&(role, key.clone()))
    }

    /// Fires due timers in every transaction.
    pub fn handle_timeout(&mut self, now: Instant) {
        for tx in self.entries.values_mut() {
            tx.handle_timeout(now);
        }
    }

    /// The earliest deadline over all transactions.
    pub fn next_timeout(&self) -> Option<Instant> {
        self.entries
            .values()
            .filter_map(Transaction::poll_timeout)
            .min()
    }

    /// Takes one pending output from any transaction, tagged with its role
    /// and key. When this returns `None`, every output is drained and the
    /// terminated transactions have been removed.
    pub fn poll_output(&mut self) -> Option<(Role, TransactionKey, TransactionOutput)> {
        for ((role, key), tx) in &mut self.entries {
            if let Some(out) = tx.poll_output() {
                return Some((*role, key.clone(), out));
            }
        }
        self.entries.retain(|_, tx| !tx.is_terminated());
        None
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use std::cell::Cell;

    type Log = Vec<(u64, TransactionOutput)>;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn key(method: &str) -> TransactionKey {
        TransactionKey::new("z9hG4bK-abc", "10.0.0.1:5060", method).unwrap()
    }

    fn b(s: &'static str) -> Bytes {
        Bytes::from_static(s.as_bytes())
    }

    fn send(s: &'static str) -> TransactionOutput {
        TransactionOutput::Transmit(b(s))
    }

    fn ev(e: TransactionEvent) -> TransactionOutput {
        TransactionOutput::Event(e)
    }

    /// The driver side of every transaction, for the virtual-time loop.
    trait Drive {
        fn out(&mut self) -> Option<TransactionOutput>;
        fn timeout(&self) -> Option<Instant>;
        fn fire(&mut self, now: Instant);
    }

    macro_rules! drive_impl {
        ($($t:ty),*) => {$(
            impl Drive for $t {
                fn out(&mut self) -> Option<TransactionOutput> { self.poll_output() }
                fn timeout(&self) -> Option<Instant> { self.poll_timeout() }
                fn fire(&mut self, now: Instant) { self.handle_timeout(now) }
            }
        )*};
    }
    drive_impl!(
        ServerInviteTransaction,
        ServerNonInviteTransaction,
        ClientInviteTransaction,
        ClientNonInviteTransaction
    );

    /// Drains every output, stamped with `now`'s offset from `t0` in ms.
    fn drain(tx: &mut impl Drive, t0: Instant, now: Instant) -> Log {
        let at = u64::try_from((now - t0).as_millis()).unwrap();
        std::iter::from_fn(|| tx.out()).map(|o| (at, o)).collect()
    }

    /// quinn's `Pair::drive`: jump to each wake-up up to `t0 + end`, fire it,
    /// collect what comes out.
    fn run(tx: &mut impl Drive, t0: Instant, end: u64) -> Log {
        let mut log = Vec::new();
        while let Some(at) = tx.timeout() {
            if at > t0 + ms(end) {
                break;
            }
            tx.fire(at);
            log.extend(drain(tx, t0, at));
        }
        log
    }

    fn at(times: &[u64], s: &'static str) -> Log {
        times.iter().map(|t| (*t, send(s))).collect()
    }

    fn cat(parts: Vec<Log>) -> Log {
        parts.into_iter().flatten().collect()
    }

    fn server_invite(
        transport: Transport,
        trying: Option<Bytes>,
    ) -> (Instant, ServerInviteTransaction) {
        let t0 = Instant::now();
        let tx = ServerInviteTransaction::new(
            t0,
            key("INVITE"),
            transport,
            TimerConfig::default(),
            trying,
        );
        (t0, tx)
    }

    /// Timer G with default T1/T2: T1, 2·T1, 4·T1, then T2 = 4 s, up to H at 32 s.
    const G_DEFAULT: [u64; 10] = [
        500, 1500, 3500, 7500, 11500, 15500, 19500, 23500, 27500, 31500,
    ];

    // ----- INVITE server -------------------------------------------------

    #[test]
    fn server_invite_sends_100_trying_at_once() {
        let (t0, mut tx) = server_invite(Transport::Unreliable, Some(b("100")));
        assert_eq!(drain(&mut tx, t0, t0), vec![(0, send("100"))]);
        assert_eq!(tx.state(), ServerInviteState::Proceeding);
        assert_eq!(tx.poll_timeout(), None, "Proceeding has no timer");
        let (t0, mut tx) = server_invite(Transport::Unreliable, None);
        assert_eq!(drain(&mut tx, t0, t0), vec![]);
    }

    #[test]
    fn server_invite_2xx_lost_ack_timer_g_then_h_at_64_t1() {
        let (t0, mut tx) = server_invite(Transport::Unreliable, Some(b("100")));
        tx.send_final(t0, 200, b("200")).unwrap();
        assert_eq!(tx.state(), ServerInviteState::Accepted);
        let mut log = drain(&mut tx, t0, t0);
        log.extend(run(&mut tx, t0, 60_000));
        let expected = cat(vec![
            vec![(0, send("100")), (0, send("200"))],
            at(&G_DEFAULT, "200"),
            vec![
                (32_000, ev(TransactionEvent::TimedOut(Timer::H))),
                (32_000, ev(TransactionEvent::Terminated)),
            ],
        ]);
        assert_eq!(log, expected);
        assert!(tx.is_terminated());
        assert_eq!(tx.state(), ServerInviteState::Terminated);
        assert_eq!(tx.poll_timeout(), None);
    }

    #[test]
    fn server_invite_2xx_retransmits_on_reliable_transport_too() {
        let (t0, mut tx) = server_invite(Transport::Reliable, None);
        tx.send_final(t0, 200, b("200")).unwrap();
        let mut log = drain(&mut tx, t0, t0);
        log.extend(run(&mut tx, t0, 60_000));
        let expected = cat(vec![
            vec![(0, send("200"))],
            at(&G_DEFAULT, "200"),
            vec![
                (32_000, ev(TransactionEvent::TimedOut(Timer::H))),
                (32_000, ev(TransactionEvent::Terminated)),
            ],
        ]);
        assert_eq!(log, expected);
    }

    #[test]
    fn server_invite_2xx_ack_stops_retransmission_timer_l_absorbs_until_64_t1() {
        let (t0, mut tx) = server_invite(Transport::Unreliable, None);
        tx.send_final(t0, 200, b("200")).unwrap();
        let mut log = drain(&mut tx, t0, t0);
        log.extend(run(&mut tx, t0, 2_000));
        tx.on_ack(t0 + ms(2_000));
        log.extend(drain(&mut tx, t0, t0 + ms(2_000)));
        // A retransmitted ACK is absorbed: never surfaced twice.
        tx.on_ack(t0 + ms(2_100));
        log.extend(drain(&mut tx, t0, t0 + ms(2_100)));
        // A retransmitted INVITE gets the 2xx again, never a second call.
        tx.on_request_retransmission(t0 + ms(3_000));
        log.extend(drain(&mut tx, t0, t0 + ms(3_000)));
        assert_eq!(tx.state(), ServerInviteState::Accepted);
        log.extend(run(&mut tx, t0, 60_000));
        assert_eq!(
            log,
            vec![
                (0, send("200")),
                (500, send("200")),
                (1500, send("200")),
                (2000, ev(TransactionEvent::AckReceived)),
                (3000, send("200")),
                (32_000, ev(TransactionEvent::Terminated)),
            ]
        );
    }

    #[test]
    fn server_invite_non2xx_timer_g_capped_at_t2_then_h() {
        let (t0, mut tx) = server_invite(Transport::Unreliable, None);
        tx.send_final(t0, 486, b("486")).unwrap();
        assert_eq!(tx.state(), ServerInviteState::Completed);
        let mut log = drain(&mut tx, t0, t0);
        log.extend(run(&mut tx, t0, 60_000));
        let expected = cat(vec![
            vec![(0, send("486"))],
            at(&G_DEFAULT, "486"),
            vec![
                (32_000, ev(TransactionEvent::TimedOut(Timer::H))),
                (32_000, ev(TransactionEvent::Terminated)),
            ],
        ]);
        assert_eq!(log, expected);
    }

    #[test]
    fn server_invite_non2xx_reliable_sends_once_and_h_still_runs() {
        let (t0, mut tx) = server_invite(Transport::Reliable, None);
        tx.send_final(t0, 486, b("486")).unwrap();
        let mut log = drain(&mut tx, t0, t0);
        log.extend(run(&mut tx, t0, 60_000));
        assert_eq!(
            log,
            vec![
                (0, send("486")),
                (32_000, ev(TransactionEvent::TimedOut(Timer::H))),
                (32_000, ev(TransactionEvent::Terminated)),
            ]
        );
    }

    #[test]
    fn server_invite_ack_for_non2xx_confirmed_then_timer_i() {
        let (t0, mut tx) = server_invite(Transport::Unreliable, None);
        tx.send_final(t0, 486, b("486")).unwrap();
        let mut log = drain(&mut tx, t0, t0);
        log.extend(run(&mut tx, t0, 2_000));
        tx.on_ack(t0 + ms(2_000));
        assert_eq!(tx.state(), ServerInviteState::Confirmed);
        assert_eq!(tx.poll_timeout(), Some(t0 + ms(7_000)), "Timer I = T4");
        log.extend(drain(&mut tx, t0, t0 + ms(2_000)));
        // ACK retransmissions and INVITE retransmissions are absorbed.
        tx.on_ack(t0 + ms(2_500));
        tx.on_request_retransmission(t0 + ms(2_600));
        log.extend(drain(&mut tx, t0, t0 + ms(2_600)));
        log.extend(run(&mut tx, t0, 60_000));
        assert_eq!(
            log,
            vec![
                (0, send("486")),
                (500, send("486")),
                (1500, send("486")),
                (2000, ev(TransactionEvent::AckReceived)),
                (7000, ev(TransactionEvent::Terminated)),
            ]
        );
    }

    #[test]
    fn server_invite_ack_reliable_timer_i_is_zero() {
        let (t0, mut tx) = server_invite(Transport::Reliable, None);
        tx.send_final(t0, 404, b("404")).unwrap();
        tx.on_ack(t0 + ms(40));
        assert_eq!(
            drain(&mut tx, t0, t0 + ms(40)),
            vec![
                (40, send("404")),
                (40, ev(TransactionEvent::AckReceived)),
                (40, ev(TransactionEvent::Terminated)),
            ]
        );
        assert_eq!(tx.state(), ServerInviteState::Terminated);
        assert_eq!(tx.poll_timeout(), None);
    }

    #[test]
    fn server_invite_retransmitted_invite_resends_last_response() {
        let (t0, mut tx) = server_invite(Transport::Unreliable, None);
        // Nothing sent yet: nothing to resend.
        tx.on_request_retransmission(t0);
        assert_eq!(drain(&mut tx, t0, t0), vec![]);
        tx.send_provisional(t0 + ms(10), b("180")).unwrap();
        tx.send_provisional(t0 + ms(20), b("183")).unwrap();
        tx.on_request_retransmission(t0 + ms(30));
        let mut log = drain(&mut tx, t0, t0 + ms(30));
        tx.send_final(t0 + ms(100), 603, b("603")).unwrap();
        tx.on_request_retransmission(t0 + ms(200));
        log.extend(drain(&mut tx, t0, t0 + ms(200)));
        assert_eq!(
            log,
            vec![
                (30, send("180")),
                (30, send("183")),
                (30, send("183")),
                (200, send("603")),
                (200, send("603")),
            ]
        );
    }

    #[test]
    fn server_invite_100_trying_is_resent_to_retransmissions() {
        let (t0, mut tx) = server_invite(Transport::Unreliable, Some(b("100")));
        tx.on_request_retransmission(t0 + ms(500));
        assert_eq!(
            drain(&mut tx, t0, t0 + ms(500)),
            vec![(500, send("100")), (500, send("100"))]
        );
    }

    #[test]
    fn server_invite_ack_before_final_is_ignored() {
        let (t0, mut tx) = server_invite(Transport::Unreliable, None);
        tx.on_ack(t0);
        assert_eq!(drain(&mut tx, t0, t0), vec![]);
        assert_eq!(tx.state(), ServerInviteState::Proceeding);
    }

    #[test]
    fn server_invite_misuse_is_an_error() {
        let (t0, mut tx) = server_invite(Transport::Unreliable, None);
        assert_eq!(
            tx.send_final(t0, 180, b("180")),
            Err(TransactionError::InvalidStatus {
                status: 180,
                operation: "send_final"
            })
        );
        assert!(tx.send_final(t0, 700, b("700")).is_err());
        tx.send_final(t0, 200, b("200")).unwrap();
        assert_eq!(
            tx.send_final(t0, 500, b("500")),
            Err(TransactionError::InvalidState {
                operation: "send_final",
                state: "Accepted"
            })
        );
        assert!(tx.send_provisional(t0, b("180")).is_err());
        assert_eq!(drain(&mut tx, t0, t0), vec![(0, send("200"))]);
    }

    #[test]
    fn late_wake_up_fires_timers_in_deadline_order() {
        let (t0, mut tx) = server_invite(Transport::Unreliable, None);
        tx.send_final(t0, 486, b("486")).unwrap();
        let _ = drain(&mut tx, t0, t0);
        // The driver oversleeps past both G and H: G fires once, then H ends it.
        tx.handle_timeout(t0 + ms(40_000));
        assert_eq!(
            drain(&mut tx, t0, t0 + ms(40_000)),
            vec![
                (40_000, send("486")),
                (40_000, ev(TransactionEvent::TimedOut(Timer::H))),
                (40_000, ev(TransactionEvent::Terminated)),
            ]
        );
    }

    #[test]
    fn transport_error_terminates_once() {
        let (t0, mut tx) = server_invite(Transport::Reliable, None);
        tx.send_final(t0, 200, b("200")).unwrap();
        tx.on_transport_error(t0 + ms(1));
        tx.on_transport_error(t0 + ms(2));
        tx.on_request_retransmission(t0 + ms(3));
        assert_eq!(
            drain(&mut tx, t0, t0),
            vec![
                (0, send("200")),
                (0, ev(TransactionEvent::TransportError)),
                (0, ev(TransactionEvent::Terminated)),
            ]
        );
        assert_eq!(tx.poll_timeout(), None);
    }

    // ----- non-INVITE server ---------------------------------------------

    #[test]
    fn server_non_invite_timer_j_and_retransmission_absorption() {
        let t0 = Instant::now();
        let mut tx = ServerNonInviteTransaction::new(
            t0,
            key("BYE"),
            Transport::Unreliable,
            TimerConfig::default(),
        );
        // Trying: a retransmission is absorbed, nothing to resend.
        tx.on_request_retransmission(t0 + ms(100));
        let mut log = drain(&mut tx, t0, t0 + ms(100));
        tx.send_provisional(t0 + ms(200), b("100")).unwrap();
        assert_eq!(tx.state(), ServerNonInviteState::Proceeding);
        tx.on_request_retransmission(t0 + ms(300));
        log.extend(drain(&mut tx, t0, t0 + ms(300)));
        tx.send_final(t0 + ms(1_000), 200, b("200")).unwrap();
        assert_eq!(tx.state(), ServerNonInviteState::Completed);
        assert_eq!(tx.poll_timeout(), Some(t0 + ms(33_000)), "Timer J = 64·T1");
        tx.on_request_retransmission(t0 + ms(5_000));
        log.extend(drain(&mut tx, t0, t0 + ms(5_000)));
        log.extend(run(&mut tx, t0, 60_000));
        assert_eq!(
            log,
            vec![
                (300, send("100")),
                (300, send("100")),
                (5_000, send("200")),
                (5_000, send("200")),
                (33_000, ev(TransactionEvent::Terminated)),
            ]
        );
        assert!(tx.send_final(t0, 200, b("200")).is_err());
    }

    #[test]
    fn server_non_invite_reliable_timer_j_is_zero() {
        let t0 = Instant::now();
        let mut tx = ServerNonInviteTransaction::new(
            t0,
            key("OPTIONS"),
            Transport::Reliable,
            TimerConfig::default(),
        );
        tx.send_final(t0, 200, b("200")).unwrap();
        assert_eq!(
            drain(&mut tx, t0, t0),
            vec![(0, send("200")), (0, ev(TransactionEvent::Terminated))]
        );
        assert_eq!(tx.state(), ServerNonInviteState::Terminated);
        assert_eq!(tx.poll_timeout(), None);
    }

    // ----- INVITE client -------------------------------------------------

    fn client_invite(transport: Transport) -> (Instant, ClientInviteTransaction) {
        let t0 = Instant::now();
        let tx = ClientInviteTransaction::new(
            t0,
            key("INVITE"),
            transport,
            TimerConfig::default(),
            b("INVITE"),
        );
        (t0, tx)
    }

    fn no_ack() -> Bytes {
        panic!("the ACK must not be built here")
    }

    #[test]
    fn client_invite_timer_a_doubles_uncapped_then_timer_b() {
        let (t0, mut tx) = client_invite(Transport::Unreliable);
        let mut log = drain(&mut tx, t0, t0);
        log.extend(run(&mut tx, t0, 60_000));
        let expected = cat(vec![
            vec![(0, send("INVITE"))],
            at(&[500, 1500, 3500, 7500, 15_500, 31_500], "INVITE"),
            vec![
                (32_000, ev(TransactionEvent::TimedOut(Timer::B))),
                (32_000, ev(TransactionEvent::Terminated)),
            ],
        ]);
        assert_eq!(log, expected);
    }

    #[test]
    fn client_invite_reliable_sends_once() {
        let (t0, mut tx) = client_invite(Transport::Reliable);
        let mut log = drain(&mut tx, t0, t0);
        log.extend(run(&mut tx, t0, 60_000));
        assert_eq!(
            log,
            vec![
                (0, send("INVITE")),
                (32_000, ev(TransactionEvent::TimedOut(Timer::B))),
                (32_000, ev(TransactionEvent::Terminated)),
            ]
        );
    }

    #[test]
    fn client_invite_provisional_stops_a_and_b_still_bounds_proceeding() {
        let (t0, mut tx) = client_invite(Transport::Unreliable);
        let mut log = drain(&mut tx, t0, t0);
        log.extend(run(&mut tx, t0, 1_000));
        tx.on_response(t0 + ms(1_000), 100, no_ack).unwrap();
        tx.on_response(t0 + ms(1_100), 180, no_ack).unwrap();
        assert_eq!(tx.state(), ClientInviteState::Proceeding);
        log.extend(drain(&mut tx, t0, t0 + ms(1_100)));
        log.extend(run(&mut tx, t0, 60_000));
        assert_eq!(
            log,
            vec![
                (0, send("INVITE")),
                (500, send("INVITE")),
                (1_100, ev(TransactionEvent::ResponseReceived(100))),
                (1_100, ev(TransactionEvent::ResponseReceived(180))),
                (32_000, ev(TransactionEvent::TimedOut(Timer::B))),
                (32_000, ev(TransactionEvent::Terminated)),
            ]
        );
    }

    #[test]
    fn initial_invite_waits_in_proceeding_until_final() {
        let t0 = Instant::now();
        let mut tx = ClientInviteTransaction::new_initial(
            t0,
            key("INVITE"),
            Transport::Unreliable,
            TimerConfig::default(),
            b("INVITE"),
        );
        let mut log = drain(&mut tx, t0, t0);
        tx.on_response(t0 + ms(200), 180, no_ack).unwrap();
        log.extend(drain(&mut tx, t0, t0 + ms(200)));
        // Ringing for two minutes: no Timer A, no Timer B.
        log.extend(run(&mut tx, t0, 120_000));
        assert_eq!(tx.state(), ClientInviteState::Proceeding);
        tx.on_response(t0 + ms(120_000), 200, no_ack).unwrap();
        log.extend(drain(&mut tx, t0, t0 + ms(120_000)));
        assert_eq!(
            log,
            vec![
                (0, send("INVITE")),
                (200, ev(TransactionEvent::ResponseReceived(180))),
                (120_000, ev(TransactionEvent::ResponseReceived(200))),
                (120_000, ev(TransactionEvent::Terminated)),
            ]
        );
    }

    #[test]
    fn client_invite_non2xx_acks_and_timer_d() {
        let (t0, mut tx) = client_invite(Transport::Unreliable);
        let mut log = drain(&mut tx, t0, t0);
        let built = Cell::new(0);
        let build_ack = || {
            built.set(built.get() + 1);
            b("ACK")
        };
        tx.on_response(t0 + ms(700), 486, build_ack).unwrap();
        assert_eq!(tx.state(), ClientInviteState::Completed);
        log.extend(drain(&mut tx, t0, t0 + ms(700)));
        // The 486 is retransmitted: the same ACK goes out, nothing surfaced.
        tx.on_response(t0 + ms(800), 486, || b("other")).unwrap();
        tx.on_response(t0 + ms(800), 180, no_ack).unwrap();
        log.extend(drain(&mut tx, t0, t0 + ms(800)));
        log.extend(run(&mut tx, t0, 60_000));
        assert_eq!(built.get(), 1);
        assert_eq!(
            log,
            vec![
                (0, send("INVITE")),
                (700, ev(TransactionEvent::ResponseReceived(486))),
                (700, send("ACK")),
                (800, send("ACK")),
                (32_700, ev(TransactionEvent::Terminated)),
            ]
        );
    }

    #[test]
    fn client_invite_reliable_timer_d_is_zero() {
        let (t0, mut tx) = client_invite(Transport::Reliable);
        tx.on_response(t0 + ms(50), 503, || b("ACK")).unwrap();
        assert_eq!(
            drain(&mut tx, t0, t0 + ms(50)),
            vec![
                (50, send("INVITE")),
                (50, ev(TransactionEvent::ResponseReceived(503))),
                (50, send("ACK")),
                (50, ev(TransactionEvent::Terminated)),
            ]
        );
        assert_eq!(tx.poll_timeout(), None);
    }

    #[test]
    fn client_invite_2xx_terminates_at_once_without_ack() {
        let (t0, mut tx) = client_invite(Transport::Unreliable);
        tx.on_response(t0 + ms(300), 200, no_ack).unwrap();
        tx.on_response(t0 + ms(400), 200, no_ack).unwrap();
        assert_eq!(
            drain(&mut tx, t0, t0 + ms(300)),
            vec![
                (300, send("INVITE")),
                (300, ev(TransactionEvent::ResponseReceived(200))),
                (300, ev(TransactionEvent::Terminated)),
            ]
        );
        assert_eq!(tx.poll_timeout(), None);
        assert_eq!(
            tx.on_response(t0, 99, no_ack),
            Err(TransactionError::InvalidStatus {
                status: 99,
                operation: "on_response"
            })
        );
    }

    // ----- non-INVITE client ---------------------------------------------

    fn client_bye(transport: Transport, cfg: TimerConfig) -> (Instant, ClientNonInviteTransaction) {
        let t0 = Instant::now();
        let tx = ClientNonInviteTransaction::new(t0, key("BYE"), transport, cfg, b("BYE"));
        (t0, tx)
    }

    #[test]
    fn client_non_invite_timer_e_capped_at_t2_then_timer_f() {
        let (t0, mut tx) = client_bye(Transport::Unreliable, TimerConfig::default());
        let mut log = drain(&mut tx, t0, t0);
        log.extend(run(&mut tx, t0, 60_000));
        let expected = cat(vec![
            vec![(0, send("BYE"))],
            at(&G_DEFAULT, "BYE"),
            vec![
                (32_000, ev(TransactionEvent::TimedOut(Timer::F))),
                (32_000, ev(TransactionEvent::Terminated)),
            ],
        ]);
        assert_eq!(log, expected);
    }

    #[test]
    fn client_non_invite_timer_e_in_proceeding_is_t2() {
        let (t0, mut tx) = client_bye(Transport::Unreliable, TimerConfig::default());
        let mut log = drain(&mut tx, t0, t0);
        log.extend(run(&mut tx, t0, 600));
        tx.on_response(t0 + ms(600), 100).unwrap();
        assert_eq!(tx.state(), ClientNonInviteState::Proceeding);
        log.extend(drain(&mut tx, t0, t0 + ms(600)));
        log.extend(run(&mut tx, t0, 60_000));
        let expected = cat(vec![
            vec![(0, send("BYE")), (500, send("BYE"))],
            vec![(600, ev(TransactionEvent::ResponseReceived(100)))],
            // E keeps its 1.5 s deadline, then fires every T2.
            at(
                &[1_500, 5_500, 9_500, 13_500, 17_500, 21_500, 25_500, 29_500],
                "BYE",
            ),
            vec![
                (32_000, ev(TransactionEvent::TimedOut(Timer::F))),
                (32_000, ev(TransactionEvent::Terminated)),
            ],
        ]);
        assert_eq!(log, expected);
    }

    #[test]
    fn client_non_invite_final_timer_k_absorbs_retransmissions() {
        let (t0, mut tx) = client_bye(Transport::Unreliable, TimerConfig::default());
        let mut log = drain(&mut tx, t0, t0);
        log.extend(run(&mut tx, t0, 1_000));
        tx.on_response(t0 + ms(1_000), 200).unwrap();
        assert_eq!(tx.state(), ClientNonInviteState::Completed);
        assert_eq!(tx.poll_timeout(), Some(t0 + ms(6_000)), "Timer K = T4");
        log.extend(drain(&mut tx, t0, t0 + ms(1_000)));
        // A retransmitted final response is absorbed: not surfaced again.
        tx.on_response(t0 + ms(2_000), 200).unwrap();
        log.extend(drain(&mut tx, t0, t0 + ms(2_000)));
        log.extend(run(&mut tx, t0, 60_000));
        assert_eq!(
            log,
            vec![
                (0, send("BYE")),
                (500, send("BYE")),
                (1_000, ev(TransactionEvent::ResponseReceived(200))),
                (6_000, ev(TransactionEvent::Terminated)),
            ]
        );
    }

    #[test]
    fn client_non_invite_reliable_no_e_and_k_is_zero() {
        let (t0, mut tx) = client_bye(Transport::Reliable, TimerConfig::default());
        assert_eq!(tx.poll_timeout(), Some(t0 + ms(32_000)), "only Timer F");
        tx.on_response(t0 + ms(20), 481).unwrap();
        assert_eq!(
            drain(&mut tx, t0, t0 + ms(20)),
            vec![
                (20, send("BYE")),
                (20, ev(TransactionEvent::ResponseReceived(481))),
                (20, ev(TransactionEvent::Terminated)),
            ]
        );
    }

    // ----- custom T1/T2/T4 -------------------------------------------------

    #[test]
    fn custom_t1_t2_t4_are_respected() {
        let cfg = TimerConfig::new(ms(100), ms(400), ms(1_000)).unwrap();
        let t0 = Instant::now();
        let mut tx =
            ServerInviteTransaction::new(t0, key("INVITE"), Transport::Unreliable, cfg, None);
        tx.send_final(t0, 200, b("200")).unwrap();
        let mut log = drain(&mut tx, t0, t0);
        log.extend(run(&mut tx, t0, 60_000));
        let g: Vec<u64> = [100, 300, 700]
            .into_iter()
            .chain((1..=14).map(|k| 700 + 400 * k))
            .collect();
        assert_eq!(g.last(), Some(&6_300));
        let expected = cat(vec![
            vec![(0, send("200"))],
            at(&g, "200"),
            vec![
                (6_400, ev(TransactionEvent::TimedOut(Timer::H))),
                (6_400, ev(TransactionEvent::Terminated)),
            ],
        ]);
        assert_eq!(log, expected);

        // Timer K = T4 = 1 s and Timer E capped at T2 = 400 ms.
        let (t0, mut tx) = client_bye(Transport::Unreliable, cfg);
        let mut log = drain(&mut tx, t0, t0);
        log.extend(run(&mut tx, t0, 1_200));
        tx.on_response(t0 + ms(1_200), 200).unwrap();
        log.extend(drain(&mut tx, t0, t0 + ms(1_200)));
        log.extend(run(&mut tx, t0, 60_000));
        assert_eq!(
            log,
            cat(vec![
                vec![(0, send("BYE"))],
                at(&[100, 300, 700, 1_100], "BYE"),
                vec![
                    (1_200, ev(TransactionEvent::ResponseReceived(200))),
                    (2_200, ev(TransactionEvent::Terminated)),
                ],
            ])
        );
    }

    // ----- keys and the table ------------------------------------------------

    #[test]
    fn key_matching_rules() {
        let invite = key("INVITE");
        assert_eq!(key("ACK"), invite, "ACK matches the INVITE transaction");
        let cancel = key("CANCEL");
        assert_eq!(cancel.method, TxMethod::NonInvite("CANCEL".into()));
        assert_ne!(cancel, invite, "CANCEL is its own transaction");
        assert_eq!(cancel.cancelled_invite(), Some(invite.clone()));
        assert_eq!(key("BYE").cancelled_invite(), None);
        assert_eq!(
            TransactionKey::new("z9hG4bK-abc", "Host.Example.COM:5060", "INVITE")
                .unwrap()
                .sent_by,
            "host.example.com:5060"
        );
        assert_ne!(
            TransactionKey::new("z9hG4bK-ABC", "10.0.0.1:5060", "INVITE").unwrap(),
            invite,
            "branch is compared case-sensitively"
        );
        assert_eq!(
            TransactionKey::new("1234", "10.0.0.1", "INVITE"),
            Err(TransactionError::NotRfc3261Branch)
        );
        assert_eq!(
            TransactionKey::new("z9hG4bK1", "", "INVITE"),
            Err(TransactionError::EmptyKeyPart)
        );
    }

    #[test]
    fn table_is_bounded_and_drops_terminated() {
        let t0 = Instant::now();
        let cfg = TimerConfig::default();
        let mut table = TransactionTable::new(2);
        let server = ServerNonInviteTransaction::new(t0, key("BYE"), Transport::Unreliable, cfg);
        table.insert(Transaction::ServerNonInvite(server)).unwrap();
        let dup = ServerNonInviteTransaction::new(t0, key("BYE"), Transport::Unreliable, cfg);
        assert_eq!(
            table.insert(Transaction::ServerNonInvite(dup)),
            Err(TransactionError::DuplicateKey)
        );
        // Same key, other role: a different transaction.
        let client =
            ClientNonInviteTransaction::new(t0, key("BYE"), Transport::Unreliable, cfg, b("BYE"));
        table.insert(Transaction::ClientNonInvite(client)).unwrap();
        let third = ServerNonInviteTransaction::new(t0, key("OPTIONS"), Transport::Unreliable, cfg);
        assert_eq!(
            table.insert(Transaction::ServerNonInvite(third)),
            Err(TransactionError::TableFull { max: 2 })
        );
        assert_eq!(table.next_timeout(), Some(t0 + ms(500)), "client Timer E");
        assert_eq!(
            table.poll_output(),
            Some((Role::Client, key("BYE"), send("BYE")))
        );
        assert_eq!(table.poll_output(), None);

        // The server answers; its Timer J (32 s) and the client's F (32 s) end both.
        match table.get_mut(Role::Server, &key("BYE")) {
            Some(Transaction::ServerNonInvite(tx)) => tx.send_final(t0, 200, b("200")).unwrap(),
            other => panic!("unexpected {other:?}"),
        }
        assert_eq!(
            table.poll_output(),
            Some((Role::Server, key("BYE"), send("200")))
        );
        assert_eq!(table.poll_output(), None);
        table.handle_timeout(t0 + ms(32_000));
        let mut events = Vec::new();
        while let Some((role, _, out)) = table.poll_output() {
            events.push((role, out));
        }
        assert!(events.contains(&(Role::Server, ev(TransactionEvent::Terminated))));
        assert!(events.contains(&(Role::Client, ev(TransactionEvent::TimedOut(Timer::F)))));
        assert!(table.is_empty(), "terminated transactions are removed");
        assert_eq!(table.next_timeout(), None);
    }
}
