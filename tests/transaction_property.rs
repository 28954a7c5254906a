#![allow(clippy::unwrap_used, clippy::expect_used)]
//! Seeded random event sequences against every transaction kind, in virtual
//! time: no panic, outputs obey the invariants (one Terminated, last; at most
//! one AckReceived / TimedOut / surfaced final), and every transaction ends
//! within 64·T1 + T4 + 32 s of its anchor (creation for a client, the TU's
//! final response for a server).

use std::time::{Duration, Instant};

use bytes::Bytes;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use sipbridge::sip::timer::{TIMER_D_UNRELIABLE, TimerConfig};
use sipbridge::sip::transaction::{
    ClientInviteTransaction, ClientNonInviteTransaction, ServerInviteTransaction,
    ServerNonInviteTransaction, Transaction, TransactionEvent, TransactionKey, TransactionOutput,
    Transport,
};

#[derive(Debug, Clone, Copy)]
enum Input {
    /// Peer: the request was retransmitted.
    Retransmission,
    /// Peer: an ACK arrived.
    Ack,
    /// Peer: a response with this (possibly invalid) status arrived.
    Response(u16),
    /// TU: send a provisional.
    Provisional,
    /// TU: send a final with this (possibly invalid) status.
    Final(u16),
    /// Driver: the transport failed.
    TransportError,
}

fn random_status(rng: &mut ChaCha8Rng) -> u16 {
    const STATUSES: [u16; 12] = [0, 99, 100, 180, 183, 200, 202, 302, 404, 486, 699, 700];
    STATUSES[rng.random_range(0..STATUSES.len())]
}

fn random_input(rng: &mut ChaCha8Rng, server: bool) -> Input {
    if rng.random_ratio(1, 40) {
        return Input::TransportError;
    }
    if server {
        match rng.random_range(0..4) {
            0 => Input::Retransmission,
            1 => Input::Ack,
            2 => Input::Provisional,
            _ => Input::Final(random_status(rng)),
        }
    } else {
        Input::Response(random_status(rng))
    }
}

struct Outcome {
    terminated_at: Instant,
    anchor: Instant,
}

fn apply(tx: &mut Transaction, now: Instant, input: Input, anchor: &mut Option<Instant>) {
    match (tx, input) {
        (Transaction::ServerInvite(t), Input::Retransmission) => t.on_request_retransmission(now),
        (Transaction::ServerInvite(t), Input::Ack) => t.on_ack(now),
        (Transaction::ServerInvite(t), Input::Provisional) => {
            let _ = t.send_provisional(now, Bytes::from_static(b"180"));
        }
        (Transaction::ServerInvite(t), Input::Final(s)) => {
            let accepted = t.send_final(now, s, Bytes::from(format!("{s}"))).is_ok();
            if accepted {
                anchor.get_or_insert(now);
            }
        }
        (Transaction::ServerNonInvite(t), Input::Retransmission) => {
            t.on_request_retransmission(now)
        }
        (Transaction::ServerNonInvite(t), Input::Provisional) => {
            let _ = t.send_provisional(now, Bytes::from_static(b"100"));
        }
        (Transaction::ServerNonInvite(t), Input::Final(s)) => {
            let accepted = t.send_final(now, s, Bytes::from(format!("{s}"))).is_ok();
            if accepted {
                anchor.get_or_insert(now);
            }
        }
        (Transaction::ClientInvite(t), Input::Response(s)) => {
            let _ = t.on_response(now, s, || Bytes::from_static(b"ACK"));
        }
        (Transaction::ClientNonInvite(t), Input::Response(s)) => {
            let _ = t.on_response(now, s);
        }
        (t, Input::TransportError) => {
            t.on_transport_error(now);
            anchor.get_or_insert(now);
        }
        _ => {}
    }
}

#[derive(Default)]
struct Seen {
    terminated: Option<Instant>,
    acks: usize,
    timeouts: usize,
    finals_surfaced: usize,
}

fn check_outputs(tx: &mut Transaction, now: Instant, seen: &mut Seen, seed: u64) {
    while let Some(out) = tx.poll_output() {
        assert!(
            seen.terminated.is_none(),
            "seed {seed}: output {out:?} after Terminated"
        );
        match out {
            TransactionOutput::Event(TransactionEvent::Terminated) => seen.terminated = Some(now),
            TransactionOutput::Event(TransactionEvent::AckReceived) => {
                assert!(matches!(tx, Transaction::ServerInvite(_)), "seed {seed}");
                seen.acks += 1;
            }
            TransactionOutput::Event(TransactionEvent::TimedOut(_)) => seen.timeouts += 1,
            TransactionOutput::Event(TransactionEvent::ResponseReceived(s)) => {
                assert_eq!(tx.role(), sipbridge::sip::transaction::Role::Client);
                if s >= 200 {
                    seen.finals_surfaced += 1;
                }
            }
            _ => {}
        }
    }
    assert!(seen.acks <= 1, "seed {seed}: AckReceived surfaced twice");
    assert!(seen.timeouts <= 1, "seed {seed}: TimedOut twice");
    assert!(
        seen.finals_surfaced <= 1,
        "seed {seed}: final surfaced twice"
    );
}

fn run_seed(seed: u64) -> Outcome {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let t1 = Duration::from_millis(rng.random_range(50..=1_000));
    let t2 = t1.max(Duration::from_millis(rng.random_range(50..=8_000)));
    let t4 = Duration::from_millis(rng.random_range(500..=10_000));
    let cfg = TimerConfig::new(t1, t2, t4).unwrap();
    let transport = if rng.random_bool(0.5) {
        Transport::Reliable
    } else {
        Transport::Unreliable
    };
    let t0 = Instant::now();
    let key = |m: &str| TransactionKey::new("z9hG4bK-prop", "192.0.2.1:5060", m).unwrap();
    let kind = rng.random_range(0..4);
    let mut tx = match kind {
        0 => Transaction::ServerInvite(ServerInviteTransaction::new(
            t0,
            key("INVITE"),
            transport,
            cfg,
            rng.random_bool(0.5).then(|| Bytes::from_static(b"100")),
        )),
        1 => Transaction::ServerNonInvite(ServerNonInviteTransaction::new(
            t0,
            key("BYE"),
            transport,
            cfg,
        )),
        2 => Transaction::ClientInvite(ClientInviteTransaction::new(
            t0,
            key("INVITE"),
            transport,
            cfg,
            Bytes::from_static(b"INVITE"),
        )),
        _ => Transaction::ClientNonInvite(ClientNonInviteTransaction::new(
            t0,
            key("BYE"),
            transport,
            cfg,
            Bytes::from_static(b"BYE"),
        )),
    };
    let server = kind < 2;
    let mut anchor = if server { None } else { Some(t0) };

    // A script of peer and TU inputs over 80 s; a server's TU always
    // answers at some point within 40 s.
    let mut script: Vec<(Duration, Input)> = (0..rng.random_range(0..25))
        .map(|_| {
            let at = Duration::from_millis(rng.random_range(0..80_000));
            (at, random_input(&mut rng, server))
        })
        .collect();
    if server {
        let status = if rng.random_bool(0.5) { 200 } else { 486 };
        script.push((
            Duration::from_millis(rng.random_range(0..40_000)),
            Input::Final(status),
        ));
    }
    script.sort_by_key(|(at, _)| *at);

    let mut seen = Seen::default();
    check_outputs(&mut tx, t0, &mut seen, seed);
    let mut script = script.into_iter().peekable();
    loop {
        let next_input = script.peek().map(|(at, _)| t0 + *at);
        let next_timer = tx.poll_timeout();
        match (next_input, next_timer) {
            (Some(i), Some(t)) if t < i => {
                tx.handle_timeout(t);
                check_outputs(&mut tx, t, &mut seen, seed);
            }
            (Some(i), _) => {
                let (_, input) = script.next().unwrap();
                apply(&mut tx, i, input, &mut anchor);
                check_outputs(&mut tx, i, &mut seen, seed);
            }
            (None, Some(t)) => {
                tx.handle_timeout(t);
                check_outputs(&mut tx, t, &mut seen, seed);
            }
            (None, None) => break,
        }
    }
    assert!(tx.is_terminated(), "seed {seed}: never terminated");
    assert_eq!(tx.poll_timeout(), None);
    Outcome {
        terminated_at: seen.terminated.expect("Terminated event emitted"),
        anchor: anchor.expect("server TU answered"),
    }
    .check(cfg, seed)
}

impl Outcome {
    fn check(self, cfg: TimerConfig, seed: u64) -> Self {
        let bound = cfg.timeout_64_t1() + cfg.t4() + TIMER_D_UNRELIABLE;
        assert!(
            self.terminated_at <= self.anchor + bound,
            "seed {seed}: terminated {:?} after its anchor, bound {bound:?}",
            self.terminated_at - self.anchor
        );
        self
    }
}

#[test]
fn random_event_sequences_always_terminate_in_bounded_virtual_time() {
    for seed in 0..3_000 {
        run_seed(seed);
    }
}
